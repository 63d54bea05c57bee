"""The chunked scan's check against the float64 sequential reference, shared by the chunked tests: random
inputs (``make_inputs``), the float64 reference with its gradients (``reference_f64``), relative error
(``rel``) and one forward and backward through ``chunk_gate_loop`` against it (``check``)."""
import torch

from gateloop_kernels import reference
from gateloop_kernels.chunked import chunk_gate_loop


def make_inputs(B, n, H, d, e, dtype, device, zeros=False, mag=(0.6, 1.0)):
    q = torch.randn(B, n, H, d, device=device).to(dtype)
    k = (torch.randn(B, n, H, d, device=device) / d ** 0.5).to(dtype)
    v = torch.randn(B, n, H, e, device=device).to(dtype)
    r = torch.rand(B, n, H, device=device) * (mag[1] - mag[0]) + mag[0]
    ph = (torch.rand(B, n, H, device=device) * 2 - 1) * 3.14159
    ar, ai = r * torch.cos(ph), r * torch.sin(ph)
    if zeros:
        m = torch.rand(B, n, H, device=device) < 0.05
        m[:, 1] = True  # a reset near the start (not at 0, so the initial state still matters)
        m[:, -1] = True
        ar, ai = ar.masked_fill(m, 0.0), ai.masked_fill(m, 0.0)
    return q, k, v, ar, ai


def reference_f64(q, k, v, ar, ai, h0, do, dht, sequential=False):
    """Float64 sequential reference (layouts converted: B*H becomes the batch); output and grads.
    ``sequential``: the sequential loop on every device (the oracle of where non-finite values may reach)."""
    B, n, H, d = q.shape
    e = v.shape[-1]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, ar, ai)]
    h0l = None if h0 is None else h0.detach().to(torch.complex128).requires_grad_()

    def bh(x):
        return x.permute(0, 2, 1, 3).reshape(B * H, n, x.shape[-1])

    a = torch.complex(leaves[3], leaves[4]).permute(0, 2, 1).reshape(B * H, n)[:, :, None, None]
    # the float64 sequential loop on the CPU; on the GPU the float64 chunked reference (checked against
    # the sequential one in test_reference.py), which is fast enough for real sizes
    oracle = reference.chunked_reference if q.is_cuda and not sequential else reference.sequential_reference
    o, st = oracle(bh(leaves[0]), bh(leaves[1]), bh(leaves[2]), a, None if h0l is None else h0l.reshape(B * H, d, e),
                   return_final_state=True)
    o = o.reshape(B, H, n, e).permute(0, 2, 1, 3)
    st = st.reshape(B, H, d, e)
    loss = (o * do.double()).sum()
    if dht is not None:
        loss = loss + (st * dht.to(torch.complex128).conj()).real.sum()
    loss.backward()
    grads = [t.grad for t in leaves] + ([h0l.grad] if h0l is not None else [])
    return o.detach(), st.detach(), grads


def rel(x, y):
    x, y = x.detach().to(torch.complex128 if x.is_complex() or y.is_complex() else torch.float64), y.detach()
    y = y.to(x.dtype)
    return ((x - y).abs().norm() / y.abs().norm().clamp_min(1e-30)).item()


def check(B, n, H, d, e, dtype, device, tol, zeros=False, init=False, final=False, chunk_size=64,
          precision="ieee", poison=False):
    q, k, v, ar, ai = make_inputs(B, n, H, d, e, dtype, device, zeros)
    h0 = torch.complex(torch.randn(B, H, d, e, device=device), torch.randn(B, H, d, e, device=device)) \
        if init else None
    do = torch.randn(B, n, H, e, device=device).to(dtype)
    dht = torch.complex(torch.randn(B, H, d, e, device=device), torch.randn(B, H, d, e, device=device)) \
        if final else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ar, ai)]
    h0l = h0.clone().requires_grad_() if init else None
    if poison and device == "cuda":
        torch.empty(1 << 28, device=device).fill_(float("nan"))  # freed: the next allocations read NaN
    o, st = chunk_gate_loop(*leaves, initial_state=h0l, output_final_state=final, precision=precision,
                            chunk_size=chunk_size)
    assert o.dtype == dtype and o.shape == (B, n, H, e)
    loss = (o.float() * do.float()).sum()
    if final:
        assert st.shape == (B, H, d, e) and st.dtype == torch.complex64
        loss = loss + (st * dht.conj()).real.sum()
    else:
        assert st is None
    if poison and device == "cuda":
        torch.empty(1 << 28, device=device).fill_(float("nan"))
    loss.backward()
    ro, rst, rgrads = reference_f64(q, k, v, ar, ai, h0, do, dht)
    errs = {"o": rel(o, ro)}
    if final:
        errs["final_state"] = rel(st, rst)
    names = ["dq", "dk", "dv", "da_re", "da_im"] + (["dh0"] if init else [])
    for name, leaf, g in zip(names, leaves + ([h0l] if init else []), rgrads):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        errs[name] = rel(leaf.grad, g)
    bad = {k_: v_ for k_, v_ in errs.items() if not v_ <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errs})"
    return errs
