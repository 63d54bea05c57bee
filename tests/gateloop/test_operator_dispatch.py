"""Public operators (dispatch, head layout, gate parametrizations) against the float64 references."""
import pytest
import torch

import gateloop_kernels as G
from gateloop_kernels import operator as op
from gateloop_kernels import reference as R

from helpers.kernels import DEV


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def seed_gate(z):
    a = torch.view_as_complex(z.contiguous())
    return torch.polar(a.abs().sigmoid(), a.angle())


def heads_first(t):
    B, n, H = t.shape[:3]
    return t.transpose(1, 2).reshape(B * H, n, *t.shape[3:])


@pytest.mark.parametrize("with_state", [False, True])
def test_gate_loop_operator_d1_matches_sequential(with_state):
    B, n = 5, 70
    q, k, v = (torch.randn(B, n, 1, dtype=torch.float64, device=DEV, requires_grad=True) for _ in range(3))
    a = torch.polar(torch.rand(B, n, 1, 1, dtype=torch.float64, device=DEV),
                    torch.randn(B, n, 1, 1, dtype=torch.float64, device=DEV)).requires_grad_()
    s0 = torch.randn(B, 1, 1, dtype=torch.complex128, device=DEV, requires_grad=True) if with_state else None
    o, s = op.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True)
    ro, rs = R.sequential_reference(q, k, v, a, s0, True)
    assert rel(o, ro) < 1e-12 and (s - rs).abs().max() < 1e-12
    w = torch.randn_like(o)
    ins = [t for t in (q, k, v, a, s0) if t is not None]
    g = torch.autograd.grad((o * w).sum() + s.real.sum() - 2 * s.imag.sum(), ins)
    rg = torch.autograd.grad((ro * w).sum() + rs.real.sum() - 2 * rs.imag.sum(), ins)
    for x, y in zip(g, rg):
        assert (x - y).abs().max() < 1e-10


def test_gate_loop_operator_float32_and_bf16():
    B, n = 3, 50
    q, k, v = (torch.randn(B, n, 1, device=DEV) for _ in range(3))
    a = torch.polar(torch.rand(B, n, 1, 1, device=DEV), torch.randn(B, n, 1, 1, device=DEV))
    ref = R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128))
    assert rel(op.gate_loop_operator(q, k, v, a), ref) < 1e-5
    out = op.gate_loop_operator(q.bfloat16(), k.bfloat16(), v.bfloat16(), a)
    assert out.dtype == torch.bfloat16  # the dtype of q, k, v (no complex bf16 gate exists)
    assert rel(out, ref) < 1e-2


def test_gate_loop_operator_other_shapes_use_reference():
    B, n, d, e = 2, 20, 3, 2
    q, k = torch.randn(B, n, d, device=DEV), torch.randn(B, n, d, device=DEV)
    v = torch.randn(B, n, e, device=DEV)
    a = torch.polar(torch.rand(B, n, d, 1, device=DEV), torch.randn(B, n, d, 1, device=DEV))
    ref = R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128))
    assert rel(op.gate_loop_operator(q, k, v, a), ref) < 1e-5


@pytest.mark.parametrize("with_cache", [False, True])
def test_simple_operator_matches_sequential(with_cache):
    B, n, D = 2, 40, 6
    q, kv = (torch.randn(B, n, D, dtype=torch.float64, device=DEV, requires_grad=True) for _ in range(2))
    a = torch.rand(B, n, D, dtype=torch.float64, device=DEV, requires_grad=True)
    cache = None
    if with_cache:
        cache = (torch.rand(B, D, dtype=torch.float64, device=DEV, requires_grad=True),
                 torch.randn(B, D, dtype=torch.float64, device=DEV, requires_grad=True))
    o, (al, hl) = op.simple_gate_loop_operator(q, kv, a, cache)
    ro, (ral, rhl) = R.simple_sequential_reference(q, kv, a, cache)
    assert rel(o, ro) < 1e-12 and rel(al, ral) < 1e-12 and rel(hl, rhl) < 1e-12
    ins = [q, kv, a] + (list(cache) if cache else [])
    w = torch.randn_like(o)
    g = torch.autograd.grad((o * w).sum() + al.sum() + 3 * hl.sum(), ins)
    rg = torch.autograd.grad((ro * w).sum() + ral.sum() + 3 * rhl.sum(), ins)
    for x, y in zip(g, rg):
        assert (x - y).abs().max() < 1e-10


def test_simple_operator_segments_continue():
    """Two calls chained through the cache equal one call over the whole sequence."""
    B, n, D = 2, 30, 4
    q, kv, a = torch.randn(B, n, D, device=DEV), torch.randn(B, n, D, device=DEV), torch.rand(B, n, D, device=DEV)
    full, (al, hl) = op.simple_gate_loop_operator(q, kv, a)
    o1, c1 = op.simple_gate_loop_operator(q[:, :13], kv[:, :13], a[:, :13])
    o2, (al2, hl2) = op.simple_gate_loop_operator(q[:, 13:], kv[:, 13:], a[:, 13:], c1)
    assert rel(torch.cat([o1, o2], 1), full) < 1e-6 and rel(hl2, hl) < 1e-6 and rel(al2, al) < 1e-5


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("form", ["z", "log_polar"])
def test_heads_entry_point(d, form):
    B, n, H = 2, 33, 3
    q, k, v = (torch.randn(B, n, H, d, dtype=torch.float64, device=DEV, requires_grad=True) for _ in range(3))
    if form == "z":
        z = torch.randn(B, n, H, 2, dtype=torch.float64, device=DEV)
        z[0, 0, 0] = 0.0  # |z| = 0: gate 0.5, finite gradient
        z.requires_grad_()
        o, s = G.gate_loop_heads(q, k, v, z=z, output_final_state=True)
        a, gate_in = seed_gate(z), [z]
    else:
        lm = (-torch.rand(B, n, H, dtype=torch.float64, device=DEV)).requires_grad_()
        ph = torch.randn(B, n, H, dtype=torch.float64, device=DEV, requires_grad=True)
        o, s = G.gate_loop_heads(q, k, v, log_magnitude=lm, phase=ph, output_final_state=True)
        a, gate_in = torch.polar(lm.exp(), ph), [lm, ph]
    ro, rs = R.sequential_reference(heads_first(q), heads_first(k), heads_first(v), heads_first(a)[..., None, None],
                                    None, True)
    ro = ro.reshape(B, H, n, d).transpose(1, 2)
    assert o.shape == (B, n, H, d) and s.shape == (B, H, d, d)
    assert rel(o, ro) < 1e-12 and (s - rs.reshape(B, H, d, d)).abs().max() < 1e-12
    w = torch.randn_like(o)
    g = torch.autograd.grad((o * w).sum(), [q, k, v] + gate_in)
    rg = torch.autograd.grad((ro * w).sum(), [q, k, v] + gate_in)
    for x, y in zip(g, rg):
        assert torch.isfinite(x).all() and (x - y).abs().max() < 1e-10


def test_heads_rejects_bad_gate_arguments():
    """No gate or two gate forms, and a gate of the wrong H: the entry's own errors (a ValueError from deeper in the
    scan, e.g. the elementwise op's "a_re must have the shape of q", passed this before)."""
    q = torch.randn(1, 4, 2, 1)
    with pytest.raises(ValueError, match="give the gate either as z, or as both log_magnitude and phase"):
        G.gate_loop_heads(q, q, q)
    with pytest.raises(ValueError, match="give the gate either as z, or as both log_magnitude and phase"):
        G.gate_loop_heads(q, q, q, z=torch.randn(1, 4, 2, 2), phase=torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match=r"the gate must be \(B, n, H\) = \(1, 4, 2\) .*got \(1, 4, 3\)"):
        G.gate_loop_heads(q, q, q, z=torch.randn(1, 4, 3, 2))


def test_chunk_kernel_is_the_chunked_module_entry():
    from gateloop_kernels import chunked
    assert op.chunk_kernel() is chunked.chunk_gate_loop


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_operators_real_size(dtype):
    """(B H, n) = (4096, 2048) through the seed contract and the head layout, against float64."""
    B, n, H = 4, 2048, 1024
    q, k, v = (torch.randn(B, n, H, 1, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    z = torch.randn(B, n, H, 2, device="cuda", requires_grad=True)
    o = G.gate_loop_heads(q, k, v, z=z)[0]
    a = seed_gate(z.double())
    qs, ks, vs = (heads_first(t.double()) for t in (q, k, v))
    ro = R.chunked_reference(qs, ks, vs, heads_first(a)[..., None, None], chunk_size=256)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(o, ro.reshape(B, H, n, 1).transpose(1, 2)) < tol
    o2 = G.gate_loop_operator(heads_first(q), heads_first(k), heads_first(v), heads_first(seed_gate(z))[..., None, None])
    assert rel(o2, ro) < tol
    w = torch.randn_like(o)
    g = torch.autograd.grad((o * w).sum(), [q, k, v, z])
    rg = torch.autograd.grad((ro.reshape(B, H, n, 1).transpose(1, 2) * w).sum(), [q, k, v, z])
    for x, y in zip(g, rg):
        assert rel(x, y) < tol


@pytest.mark.gpu
def test_gpu_heads_dispatch_chunked_head_dim():
    """16 <= d, e <= 256 on CUDA goes to the chunked kernel when it exists; either way it matches float64."""
    B, n, H, d = 2, 300, 3, 32
    q, k, v = (torch.randn(B, n, H, d, device="cuda") for _ in range(3))
    z = torch.randn(B, n, H, 2, device="cuda")
    o, s = G.gate_loop_heads(q, k, v, z=z, output_final_state=True)
    a = seed_gate(z.double())
    ro, rs = R.chunked_reference(heads_first(q.double()), heads_first(k.double()), heads_first(v.double()),
                                 heads_first(a)[..., None, None], None, True)
    assert rel(o, ro.reshape(B, H, n, d).transpose(1, 2)) < 1e-4
    assert ((s - rs.reshape(B, H, d, d)).abs().max() / rs.abs().max()).item() < 1e-4


@pytest.mark.gpu
def test_gpu_reference_fallback_warns_once():
    B, n, d, e = 2, 20, 3, 2
    q, k, v = torch.randn(B, n, d, device="cuda"), torch.randn(B, n, d, device="cuda"), torch.randn(B, n, e, device="cuda")
    a = torch.polar(torch.rand(B, n, d, 1, device="cuda"), torch.randn(B, n, d, 1, device="cuda"))
    op._WARNED.clear()
    with pytest.warns(UserWarning, match="per key dim"):
        op.gate_loop_operator(q, k, v, a)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.gate_loop_operator(q, k, v, a)  # once only
