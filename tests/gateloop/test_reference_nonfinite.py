"""A NaN or Inf at step t reaches outputs at t and later only, on the CPU path, forward and backward;
tiny gates (|a| down to 1e-30 in float32) stay exact.

Oracle: ``sequential_reference`` in float64 and its autograd, whose finiteness pattern is the true
math's (a NaN gate or NaN ``q`` at step t makes the adjoints of earlier steps NaN; a NaN ``k`` or ``v``
does not). Wherever the oracle's entry is finite ours is finite and within tolerance (float32: 2e-5,
float64: 1e-12, times the tensor's largest finite oracle magnitude), and non-finite where it is not
(``helpers.oracle.assert_matches``). Besides: every output before t, every gradient of steps before t for a
bad ``k`` or ``v``, and every value of the other batch element stay finite.
"""
from __future__ import annotations

import math

import pytest
import torch

import gateloop_kernels as gk
from gateloop_kernels import reference as R

from helpers.oracle import assert_matches, value_and_grads

f64 = torch.float64
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def make(B, n, d, e, dtype):
    q, k, v = torch.randn(B, n, d, dtype=f64), torch.randn(B, n, d, dtype=f64), torch.randn(B, n, e, dtype=f64)
    a = torch.polar(0.5 + 0.5 * torch.rand(B, n, 1, 1, dtype=f64), torch.randn(B, n, 1, 1, dtype=f64))
    h0 = torch.randn(B, d, e, dtype=torch.complex128)
    cdt = torch.complex128 if dtype == f64 else torch.complex64
    return [q.to(dtype), k.to(dtype), v.to(dtype), a.to(cdt), h0.to(cdt)]


def poison(inputs, which, t, value):
    """Set step ``t`` of batch element 0 of input ``which`` (one entry of it) to ``value``."""
    inputs = [x.clone() for x in inputs]
    x = inputs["qkva".index(which)]
    x[0, t, 0] = value
    return inputs


def seq(q, k, v, a, h0, final=True):
    return R.sequential_reference(q, k, v, a, initial_state=h0, return_final_state=final)


def check(fn, inputs, which, t, tol):
    """``fn`` against ``seq`` in float64 with the same cotangents, then the causality statements."""
    outs, grads, cots = value_and_grads(fn, inputs)
    as64 = [None if x is None else x.to(torch.complex128 if x.is_complex() else f64) for x in inputs]
    ref_outs, ref_grads, _ = value_and_grads(lambda *x: seq(*x, final=len(outs) == 2), as64, cots)
    for i, (x, y) in enumerate(zip(outs, ref_outs)):
        assert_matches(x, y, tol, f"output {i}")
    for name, g, rg in zip(("q", "k", "v", "a", "h0"), grads, ref_grads):
        if g is not None:
            assert_matches(g, rg, tol, f"grad {name}")
    if which is None:
        return
    out = outs[0]
    assert torch.isfinite(out[0, :t]).all(), "an output before the bad step is not finite"
    assert not torch.isfinite(out[0, t:]).all(), "the bad value vanished"
    assert torch.isfinite(out[1:]).all() and torch.isfinite(torch.view_as_real(outs[1][1:])).all()
    for g in (g for g in grads if g is not None):
        assert torch.isfinite(torch.view_as_real(g[1:]) if g.is_complex() else g[1:]).all(), "other batch element"
    if which in "kv":
        for name, g in zip("qkva", grads[:4]):
            gv = torch.view_as_real(g) if g.is_complex() else g
            assert torch.isfinite(gv[0, :t]).all(), f"grad {name} before the bad {which} step is not finite"


# the two cases (head dim 4, default chunk of 64)

def test_nan_in_k_mid_chunk_leaves_earlier_outputs_finite():
    inputs = poison(make(2, 300, 4, 3, torch.float32), "k", 150, math.nan)
    check(lambda *x: R.chunked_reference(*x[:4], initial_state=x[4], return_final_state=True),
          inputs, "k", 150, TOL[torch.float32])


def test_inf_in_k_leaves_earlier_outputs_finite():
    inputs = poison(make(2, 8, 4, 3, torch.float32), "k", 3, math.inf)
    check(lambda *x: R.chunked_reference(*x[:4], initial_state=x[4], return_final_state=True),
          inputs, "k", 3, TOL[torch.float32])


# every input, value and dtype; chunks of 8 (and a non-power-of-two 7) over n = 21: the bad step
# at the start, inside and at the end of a chunk

@pytest.mark.parametrize("dtype", [torch.float32, f64], ids=["f32", "f64"])
@pytest.mark.parametrize("d,e", [(4, 3), (1, 1)])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("which", list("qkva"))
def test_chunked_reference_is_causal(which, bad, d, e, dtype):
    t = int(torch.randint(0, 21, ()))
    inputs = poison(make(2, 21, d, e, dtype), which, t, BAD[bad])
    for chunk in (8, 7):
        check(lambda *x: R.chunked_reference(*x[:4], initial_state=x[4], return_final_state=True,
                                             chunk_size=chunk),
              inputs, which, t, TOL[dtype])


# the public entry points on the CPU (head dim 1: the elementwise op's PyTorch path; 4: the reference)

@pytest.mark.parametrize("d,e", [(4, 3), (1, 1)])
@pytest.mark.parametrize("which", list("qkva"))
def test_gate_loop_operator_is_causal(which, d, e):
    t = 9
    inputs = poison(make(2, 21, d, e, torch.float32), which, t, math.nan)
    inputs[4] = None
    check(lambda q, k, v, a, _: gk.gate_loop_operator(q, k, v, a, return_final_state=True),
          inputs, which, t, TOL[torch.float32])


@pytest.mark.parametrize("d,e", [(4, 3), (1, 1)])
@pytest.mark.parametrize("which", list("qkva"))
def test_gate_loop_heads_is_causal(which, d, e):
    """Head layout with one head; the gate as log-magnitude and phase (a NaN gate: a NaN phase)."""
    t = 9
    q, k, v, a, h0 = make(2, 21, d, e, torch.float32)
    logm, ph = a.abs().log()[..., 0], a.angle()[..., 0]  # (B, n, 1): one head
    if which == "a":
        ph[0, t] = math.nan
    else:
        q, k, v, a = poison([q, k, v, a], which, t, math.nan)

    def heads(q, k, v, logm, ph, h0):
        o, s = gk.gate_loop_heads(q[:, :, None], k[:, :, None], v[:, :, None], log_magnitude=logm,
                                  phase=ph, initial_state=h0[:, None], output_final_state=True)
        return o[:, :, 0], s[:, 0]

    outs, grads, cots = value_and_grads(heads, [q, k, v, logm, ph, h0])
    ref_outs, ref_grads, _ = value_and_grads(
        lambda q, k, v, logm, ph, h0: seq(q, k, v, torch.polar(logm.exp(), ph)[..., None], h0),
        [q.double(), k.double(), v.double(), logm.double(), ph.double(), h0.to(torch.complex128)], cots)
    for i, (x, y) in enumerate(zip(outs, ref_outs)):
        assert_matches(x, y, TOL[torch.float32], f"output {i}")
    for name, g, rg in zip(("q", "k", "v", "log_magnitude", "phase", "h0"), grads, ref_grads):
        assert_matches(g, rg, TOL[torch.float32], f"grad {name}")
    assert torch.isfinite(outs[0][0, :t]).all() and torch.isfinite(outs[0][1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, f64], ids=["f32", "f64"])
@pytest.mark.parametrize("which", ["q", "kv", "a"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_simple_gate_loop_operator_is_causal(which, bad, dtype):
    """The simplified operator (float32: the elementwise op; float64: ``simple_chunked_reference``)."""
    B, n, D, t = 2, 21, 3, 9
    q, kv = torch.randn(B, n, D, dtype=dtype), torch.randn(B, n, D, dtype=dtype)
    a = (0.5 + 0.5 * torch.rand(B, n, D, dtype=dtype)) * torch.randn(B, n, D, dtype=dtype).sign()
    cache = (torch.rand(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype))
    ins = dict(q=q, kv=kv, a=a)
    ins[which] = ins[which].clone()
    ins[which][0, t, 0] = BAD[bad]

    def flat(fn):
        return lambda q, kv, a, ca, ckv: (lambda o, c: (o, *c))(*fn(q, kv, a, (ca, ckv)))

    inputs = [ins["q"], ins["kv"], ins["a"], *cache]
    outs, grads, cots = value_and_grads(flat(gk.simple_gate_loop_operator), inputs)
    ref_outs, ref_grads, _ = value_and_grads(flat(R.simple_sequential_reference), [x.double() for x in inputs], cots)
    for i, (x, y) in enumerate(zip(outs, ref_outs)):
        assert_matches(x, y, TOL[dtype], f"output {i}")
    for name, g, rg in zip(("q", "kv", "a", "cache_a", "cache_kv"), grads, ref_grads):
        assert_matches(g, rg, TOL[dtype], f"grad {name}")
    assert torch.isfinite(outs[0][0, :t]).all() and torch.isfinite(outs[0][1]).all()
    if which == "kv":
        assert all(torch.isfinite(g[0, :t]).all() for g in grads[:3])


# tiny gates: products of gates underflow to subnormals and zero in float32; the gradients must not be
# formed by dividing by a gate (torch.cumprod's backward does: (g a) / a loses g a to underflow)

@pytest.mark.parametrize("init", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("d,e", [(4, 3), (1, 1)])
@pytest.mark.parametrize("mag,scale", [(1e-22, 1.0), (1e-30, 1.0), (1e-30, 1e-4), (1e-25, 1e-3)])
def test_tiny_gates_float32(mag, scale, d, e, init):
    """``q, k, v`` (and the initial state) scaled by ``scale``. Without an initial and a final state
    every gate gradient is of one magnitude, so an underflowed one is not hidden by a larger one at the
    first or the last step (the tolerance scales with the tensor's largest entry)."""
    B, n = 2, 40
    q, k, v, _, h0 = make(B, n, d, e, torch.float32)
    q, k, v, h0 = q * scale, k * scale, v * scale, (h0 * scale if init else None)
    a = torch.polar(mag * (1 + torch.rand(B, n, 1, 1, dtype=f64)), torch.randn(B, n, 1, 1, dtype=f64))
    inputs = [q, k, v, a.to(torch.complex64), h0]
    for fn in (lambda *x: R.chunked_reference(*x[:4], initial_state=x[4], return_final_state=init, chunk_size=16),
               lambda *x: gk.gate_loop_operator(*x[:4], initial_state=x[4], return_final_state=init)):
        check(fn, inputs, None, n, TOL[torch.float32])
