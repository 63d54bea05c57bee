"""A NaN or Inf in the head-dim-1 scan is causal (issue 19, item 2): a bad value at step t of one sequence
reaches outputs at t and later of that sequence only, and, in k or v, gradients of steps before t stay
finite (a bad q or gate at t rightly reaches the gradients of earlier steps). In general: wherever the float64 sequential loop (and its autograd) is finite, ours is finite and
close. Checked on the Triton kernels (under ``TRITON_INTERPRET=1``, 8-step tiles so that the bad value sits
inside the second of four segments and the look-back carries it on), on the op's CPU implementation, and
on CUDA (GPU-marked, every input dtype).
"""
import math

import pytest
import torch

import gateloop_kernels as G
from gateloop_kernels import elementwise as ew
from gateloop_kernels import reference as R

from helpers.elementwise_check import GRAD_NAMES, make, oracle
from helpers.kernels import DEV, needs_kernels

B, N, C = 2, 29, 5
BAD = ((1, 13, 2, math.nan), (0, 22, 4, math.inf))  # (sequence, step, channel, value): one of each kind
BLOCK = (8, 8, 1)
INPUTS = ("q", "k", "v", "a_re", "a_im")


def run(path, args, do, g_re, g_im, block=BLOCK):
    """``(o, hT_re, hT_im, grads)`` through the Triton kernels or the op's CPU implementation."""
    if path == "kernel":
        o, hr, hi, carries = ew.scan_forward(*args, block=block)
        return o, hr, hi, ew.scan_backward(do, g_re, g_im, *args, carries, block=block)
    leaves = [None if t is None else t.clone().requires_grad_() for t in args]
    o, hr, hi, _ = ew.elementwise_scan(*leaves)
    loss = (o.float() * do.float()).sum() + (hr * g_re).sum() + (hi * g_im).sum()
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return o.detach(), hr.detach(), hi.detach(), [None if t is None else next(grads) for t in leaves]


def assert_close_where_finite(x, ref, tol, what):
    """Finite wherever ``ref`` is, and close there (norm-relative over the finite entries)."""
    fin = torch.isfinite(ref)
    x = x.double()
    assert torch.isfinite(x[fin]).all(), f"{what}: non-finite where the float64 loop is finite"
    scale = ref[fin].norm().clamp_min(1e-30)
    assert ((x[fin] - ref[fin]).norm() / scale).item() < tol, what


def untouched(t, bad):
    """The ``(sequence, channel)`` series of a ``(B, n, C)`` tensor that no bad value is in, ``(series, n)``."""
    keep = torch.ones(t.shape[0], t.shape[2], dtype=torch.bool, device=t.device)
    for b, _, c, _ in bad:
        keep[b, c] = False
    return t.transpose(1, 2)[keep]


def check_causal(path, where, dtype=torch.float32, shape=(B, N, C), bad=BAD, block=BLOCK):
    args = list(make(*shape, dtype, True, False, True))
    i = INPUTS.index(where)
    args[i] = args[i].clone()
    for b, t, c, value in bad:
        args[i][b, t, c] = value
    do = torch.randn(shape, device=args[0].device).to(dtype)
    g_re, g_im = (torch.randn(shape[0], shape[2], device=args[0].device) for _ in range(2))
    o, hr, hi, grads = run(path, args, do, g_re, g_im, block)
    ro, rh, rgrads = oracle(*args, do, g_re, g_im)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(untouched(o, bad)).all(), "an output of another sequence"
    for b, t, c, _ in bad:
        assert torch.isfinite(o[b, :t, c]).all(), "an output before the bad step"
    assert_close_where_finite(o, ro, tol, "o")
    assert_close_where_finite(hr, rh.real, 1e-5, "hT_re")
    assert_close_where_finite(hi, rh.imag, 1e-5, "hT_im")
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        if g is None:
            continue
        if g.dim() == 3:
            assert torch.isfinite(untouched(g, bad)).all(), f"{name} of another sequence"
            for b, t, c, _ in bad:
                if where in ("k", "v"):
                    assert torch.isfinite(g[b, :t, c]).all(), f"{name} before the bad step"
        assert_close_where_finite(g, r, tol, name)


PATHS = ["cpu", pytest.param("kernel", marks=needs_kernels)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", INPUTS)
def test_nonfinite_is_causal(path, where):
    """A NaN in one sequence and an Inf in another, both in ``where``."""
    check_causal(path, where)


@pytest.mark.parametrize("path", PATHS)
def test_edge_gates_match_where_finite(path):
    """Gates of 0 (hard resets), 1, 1e-30, above 1 and NaN mixed in (and one Inf in v): wherever the float64
    loop is finite, so are our outputs, final state and gradients, and close to it."""
    args = list(make(B, N, C, torch.float32, True, False, True))
    pick = torch.randint(0, 6, (B, N, C), device=DEV)
    mag = torch.stack([torch.zeros(B, N, C, device=DEV), torch.ones(B, N, C, device=DEV),
                       torch.full((B, N, C), 1e-30, device=DEV), torch.full((B, N, C), 1.3, device=DEV),
                       torch.rand(B, N, C, device=DEV), torch.rand(B, N, C, device=DEV)])
    mag = mag.gather(0, pick[None])[0]
    mag[0, 20, 1] = math.nan
    ph = torch.randn(B, N, C, device=DEV)
    args[3], args[4] = mag * torch.cos(ph), mag * torch.sin(ph)
    args[2] = args[2].clone()
    args[2][1, N - 4, 4] = math.inf
    do = torch.randn(B, N, C, device=DEV)
    g_re, g_im = torch.randn(B, C, device=DEV), torch.randn(B, C, device=DEV)
    o, hr, hi, grads = run(path, args, do, g_re, g_im)
    ro, rh, rgrads = oracle(*args, do, g_re, g_im)
    assert_close_where_finite(o, ro, 1e-5, "o")
    assert_close_where_finite(hr, rh.real, 1e-5, "hT_re")
    assert_close_where_finite(hi, rh.imag, 1e-5, "hT_im")
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        if g is not None:
            assert_close_where_finite(g, r, 1e-5, name)


def test_operator_d1_nan_is_causal():
    """The public operator at head dim 1 (the seed's (B, n, 1) layout): a NaN in k at step t leaves every
    output before t, every other sequence, and every gradient of q, k, v before t finite."""
    b, t = 1, 40
    q, k, v = (torch.randn(3, 100, 1) for _ in range(3))
    k[b, t] = math.nan
    a = torch.polar(torch.rand(3, 100, 1, 1), torch.randn(3, 100, 1, 1))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o = G.gate_loop_operator(*leaves, a)
    ro = R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128))
    assert torch.isfinite(o[:, :t]).all() and torch.isfinite(o[[0, 2]]).all()
    assert_close_where_finite(o.detach(), ro, 1e-5, "o")
    o.backward(torch.randn_like(o))
    for x in leaves:
        assert torch.isfinite(x.grad[:, :t]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", INPUTS)
@pytest.mark.parametrize("channels", [3, 64], ids=["narrow", "wide"])
def test_gpu_nonfinite_is_causal(dtype, where, channels):
    """On CUDA with the default tiles (narrow and wide configurations, many segments: the bad values sit
    some 40 segments in), every dtype."""
    bad = ((1, 1237, channels // 2, math.nan), (0, 801, channels - 1, math.inf))
    check_causal("kernel", where, dtype=dtype, shape=(2, 1500, channels), bad=bad, block=None)
