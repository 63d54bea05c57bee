"""The head-dim-1 scan's inputs and float64 oracle, shared by the elementwise tests: ``make`` draws the
op's arguments ``(q, k, v, a_re, a_im, h0_re, h0_im)``, ``oracle`` runs the float64 sequential loop and its
autograd, ``GRAD_NAMES`` names the gradients in argument order."""
import torch

from helpers.kernels import DEV

GRAD_NAMES = ("dq", "dk", "dv", "da_re", "da_im", "dh0_re", "dh0_im")


def rel(x, ref):
    """``||x - ref|| / ||ref||`` in float64; asserts ``x`` is finite (an unwritten output is not)."""
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values (unwritten output?)"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_grads(grads, rgrads, tol: float) -> None:
    """Each gradient present exactly where the oracle's is, and within ``tol`` relative of it."""
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert rel(g, r) < tol, name


def make(B, n, C, dtype, complex_gate, kv_given, with_h0, device=DEV, zero_gates=False):
    q, k, v = (torch.randn(B, n, C, device=device).to(dtype) for _ in range(3))
    mag = 0.5 + 0.5 * torch.rand(B, n, C, device=device)
    ph = torch.randn(B, n, C, device=device) if complex_gate else torch.zeros(B, n, C, device=device)
    if zero_gates:
        mag = torch.where(torch.rand_like(mag) < 0.1, torch.zeros_like(mag), mag)
    a_re = mag * torch.cos(ph)
    a_im = mag * torch.sin(ph) if complex_gate else None
    h0_re = torch.randn(B, C, device=device) if with_h0 else None
    h0_im = torch.randn(B, C, device=device) if (with_h0 and complex_gate) else None
    return q, k, None if kv_given else v, a_re, a_im, h0_re, h0_im


def oracle(q, k, v, a_re, a_im, h0_re, h0_im, do, g_re, g_im):
    """Float64 sequential forward, and gradients through autograd of the same loop."""
    ins = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, a_re, a_im, h0_re, h0_im)]
    q64, k64, v64, ar, ai, h0r, h0i = ins
    a = torch.complex(ar, ai) if ai is not None else torch.complex(ar, torch.zeros_like(ar))
    x = k64 if v64 is None else k64 * v64
    B, n, C = q.shape
    h = torch.zeros(B, C, dtype=torch.complex128, device=q.device)
    if h0r is not None:
        h = torch.complex(h0r, h0i if h0i is not None else torch.zeros_like(h0r))
    outs = []
    for t in range(n):
        h = a[:, t] * h + x[:, t]
        outs.append(q64[:, t] * h.real)
    o = torch.stack(outs, 1)
    loss = (o * do.double()).sum() + (h.real * g_re.double()).sum()
    if g_im is not None:
        loss = loss + (h.imag * g_im.double()).sum()
    present = [t for t in ins if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return o.detach(), h.detach(), [None if t is None else next(grads) for t in ins]
