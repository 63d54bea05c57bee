"""The scan's three references agree with each other (float64), and the public CPU path behaves.

Oracle: ``sequential_reference`` in float64 (a plain loop over time). Tolerances: float64
paths agree to 1e-10 relative; the float32 chunked path stays within 1e-5 of float64 at n = 65536.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gateloop_kernels as gk
from gateloop_kernels import reference as R

f64 = torch.float64


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


def make_gate(shape, dtype=f64, zeros=0, real=False):
    mag = torch.rand(shape, dtype=dtype) * 0.6 + 0.4
    if real:
        a = mag * torch.sign(torch.randn(shape, dtype=dtype))
    else:
        a = torch.polar(mag, torch.rand(shape, dtype=dtype) * 2 * math.pi - math.pi)
    if zeros:
        flat = a.view(-1) if a.is_contiguous() else a.reshape(-1)
        idx = torch.randperm(flat.numel())[:zeros]
        a = a.clone()
        a.view(-1)[idx] = 0
    return a


def make_qkv(B, n, d, e, dtype=f64):
    return (torch.randn(B, n, d, dtype=dtype), torch.randn(B, n, d, dtype=dtype), torch.randn(B, n, e, dtype=dtype))


def gate_shape(kind, B, n, d, e):
    return {"head": (B, n, 1, 1), "head_bcast": (1, n, 1, 1), "key": (B, n, d, 1),
            "value": (B, n, 1, e), "full": (B, n, d, e)}[kind]


def grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((torch.view_as_real(o) if o.is_complex() else o).mul(w).sum() for o, w in zip(outs, _weights(outs)))
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    # an input the output does not depend on (a gate at n = 1) has gradient zero
    gs = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, gs))
    return outs, gs


_WEIGHTS: dict = {}


def _weights(outs):
    # fixed cotangents per output shape within one test, so two implementations see the same ones
    key = tuple(tuple(o.shape) for o in outs)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = [torch.randn(torch.view_as_real(o).shape if o.is_complex() else o.shape, dtype=f64)
                         for o in outs]
    return _WEIGHTS[key]


def compare(fn_a, fn_b, inputs, tol):
    _WEIGHTS.clear()
    outs_a, g_a = grads(fn_a, inputs)
    outs_b, g_b = grads(fn_b, inputs)
    for x, y in zip(outs_a, outs_b):
        assert torch.isfinite(torch.view_as_real(x) if x.is_complex() else x).all()
        assert rel(x, y) <= tol, rel(x, y)
    for i, (x, y) in enumerate(zip(g_a, g_b)):
        assert torch.isfinite(torch.view_as_real(x) if x.is_complex() else x).all(), f"grad {i} not finite"
        assert rel(x, y) <= tol or (x - y).abs().max() <= tol, (i, rel(x, y))


# ----------------------------------------------------------------------------- agreement


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), n=st.integers(1, 40), d=st.sampled_from([1, 2, 5]), e=st.sampled_from([1, 3]),
       kind=st.sampled_from(["head", "head_bcast", "key", "value", "full"]),
       zeros=st.integers(0, 3), real=st.booleans(), chunk=st.sampled_from([4, 7, 16]))
def test_three_references_agree_float64(B, n, d, e, kind, zeros, real, chunk):
    q, k, v = make_qkv(B, n, d, e)
    a = make_gate(gate_shape(kind, B, n, d, e), zeros=zeros, real=real)
    ref = R.sequential_reference
    compare(R.associative_scan_reference, ref, (q, k, v, a), 1e-10)
    compare(lambda *x: R.chunked_reference(*x, chunk_size=chunk), ref, (q, k, v, a), 1e-10)


@pytest.mark.parametrize("d,e", [(1, 1), (3, 2)])
def test_chunked_gradcheck_complex_gate(d, e):
    B, n = 2, 11
    q, k, v = make_qkv(B, n, d, e)
    a = make_gate((B, n, 1, 1), zeros=1)
    h0 = torch.randn(B, d, e, dtype=torch.complex128)
    inputs = [t.requires_grad_(True) for t in (q, k, v, a, h0)]

    def fn(q, k, v, a, h0):
        out, last = R.chunked_reference(q, k, v, a, initial_state=h0, return_final_state=True, chunk_size=4)
        return out, torch.view_as_real(last)

    assert torch.autograd.gradcheck(fn, inputs)


def test_zero_gates_give_finite_exact_gradients():
    B, n, d, e = 2, 37, 4, 3
    q, k, v = make_qkv(B, n, d, e)
    a = make_gate((B, n, 1, 1))
    a[:, ::5] = 0  # hard resets
    compare(lambda *x: R.chunked_reference(*x, chunk_size=8), R.sequential_reference, (q, k, v, a), 1e-10)
    # a reset forgets the past exactly: the output after it does not depend on inputs before it
    out = R.chunked_reference(q, k, v, a, chunk_size=8)
    q2 = q.clone()
    k2 = k.clone()
    k2[:, :5] += 1.0
    assert torch.equal(R.chunked_reference(q2, k2, v, a, chunk_size=8)[:, 5:], out[:, 5:])


@pytest.mark.parametrize("d,e", [(1, 1), (4, 3)])
def test_initial_and_final_state_segments(d, e):
    B, n, cut = 2, 50, 23
    q, k, v = make_qkv(B, n, d, e)
    a = make_gate((B, n, 1, 1))
    h0 = torch.randn(B, d, e, dtype=torch.complex128)
    whole, last = R.sequential_reference(q, k, v, a, initial_state=h0, return_final_state=True)
    o1, s1 = R.chunked_reference(q[:, :cut], k[:, :cut], v[:, :cut], a[:, :cut], initial_state=h0,
                                 return_final_state=True, chunk_size=8)
    o2, s2 = R.chunked_reference(q[:, cut:], k[:, cut:], v[:, cut:], a[:, cut:], initial_state=s1,
                                 return_final_state=True, chunk_size=8)
    assert rel(torch.cat([o1, o2], 1), whole) < 1e-12
    assert rel(s2, last) < 1e-12


@pytest.mark.parametrize("d,e", [(1, 1), (8, 8)])
def test_float32_chunked_long_sequence(d, e):
    B, n = 2, 65536
    q, k, v = make_qkv(B, n, d, e)
    a = make_gate((B, n, 1, 1))
    a = torch.polar(a.abs() * 0.05 + 0.95, a.angle())  # long memory: the hard case for precision
    truth = R.chunked_reference(q, k, v, a)  # float64; agreement with the loop is tested above
    out32 = R.chunked_reference(q.float(), k.float(), v.float(), a.to(torch.complex64))
    assert out32.dtype == torch.float32
    assert rel(out32.double(), truth) <= 1e-5


def _saved_bytes(fn, *inputs) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st_ = t.untyped_storage()
        seen[st_.data_ptr()] = st_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_chunked_memory_does_not_hold_per_step_states():
    B, n, d, e, C = 1, 1024, 64, 64, R.DEFAULT_CHUNK
    q, k, v = (t.float().requires_grad_(True) for t in make_qkv(B, n, d, e))
    a = make_gate((B, n, 1, 1)).to(torch.complex64).requires_grad_(True)
    per_step_states = B * n * d * e * 8  # complex64 state at every step
    chunked = _saved_bytes(R.chunked_reference, q, k, v, a)
    seed = _saved_bytes(R.associative_scan_reference, q, k, v, a)
    assert seed > per_step_states  # the measure sees the seed's materialized states
    # the documented bound O(B n (d + e + C) + B (n / C) d e), with small constants
    bound = 16 * 4 * B * n * (d + e + C) + 3 * B * (n // C) * d * e * 8
    assert chunked < min(bound, per_step_states / 4), (chunked, bound, per_step_states)


# ----------------------------------------------------------------------------- simplified operator


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), n=st.integers(0, 40), D=st.integers(1, 4), use_cache=st.booleans(),
       chunk=st.sampled_from([4, 16]))
def test_simple_references_agree(B, n, D, use_cache, chunk):
    q, kv = torch.randn(B, n, D, dtype=f64), torch.randn(B, n, D, dtype=f64)
    a = torch.rand(B, n, D, dtype=f64)
    cache = (torch.rand(B, D, dtype=f64), torch.randn(B, D, dtype=f64)) if use_cache else None

    def flat(fn):
        def run(q, kv, a, *c):
            out, (al, hl) = fn(q, kv, a, tuple(c) if c else None)
            return out, al, hl
        return run

    inputs = (q, kv, a, *cache) if cache else (q, kv, a)
    if n == 0:
        for fn in (R.simple_associative_scan_reference, R.simple_chunked_reference):
            out = flat(fn)(*inputs)
            ref = flat(R.simple_sequential_reference)(*inputs)
            for x, y in zip(out, ref):
                assert x.shape == y.shape and torch.equal(x, y)
        return
    compare(flat(R.simple_associative_scan_reference), flat(R.simple_sequential_reference), inputs, 1e-10)
    compare(flat(lambda *x: R.simple_chunked_reference(*x, chunk_size=chunk)), flat(R.simple_sequential_reference),
            inputs, 1e-10)


def test_simple_cache_continues_a_sequence():
    B, n, D, cut = 2, 30, 3, 13
    q, kv = torch.randn(B, n, D, dtype=f64), torch.randn(B, n, D, dtype=f64)
    a = torch.rand(B, n, D, dtype=f64)
    whole, (a_all, h_all) = gk.simple_gate_loop_operator(q, kv, a)
    o1, cache = gk.simple_gate_loop_operator(q[:, :cut], kv[:, :cut], a[:, :cut])
    o2, (a2, h2) = gk.simple_gate_loop_operator(q[:, cut:], kv[:, cut:], a[:, cut:], cache=cache)
    assert rel(torch.cat([o1, o2], 1), whole) < 1e-12
    assert rel(a2, a_all) < 1e-12 and rel(h2, h_all) < 1e-12
    assert rel(a_all, a.prod(1)) < 1e-12


# ----------------------------------------------------------------------------- public API behaviour


def test_public_operator_matches_seed_semantics():
    B, n, d, e = 2, 70, 4, 5
    q, k, v = (t.float() for t in make_qkv(B, n, d, e))
    a = make_gate((B, n, 1, 1)).to(torch.complex64)
    out = gk.gate_loop_operator(q, k, v, a)
    assert out.shape == (B, n, e) and out.dtype == torch.float32
    assert rel(out.double(), R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128))) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_input_dtype(dtype):
    q, k, v = (t.to(dtype) for t in make_qkv(2, 20, 1, 1))
    a = make_gate((2, 20, 1, 1)).to(torch.complex64)
    out = gk.gate_loop_operator(q, k, v, a)
    assert out.dtype == dtype
    ref = R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128))
    assert rel(out.double(), ref) < 1e-2


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_lengths(n):
    for d, e in ((1, 1), (3, 2)):
        q, k, v = make_qkv(2, n, d, e)
        a = make_gate((2, n, 1, 1))
        out, last = gk.gate_loop_operator(q, k, v, a, return_final_state=True)
        ref, ref_last = R.sequential_reference(q, k, v, a, return_final_state=True)
        assert out.shape == (2, n, e) and last.shape == (2, d, e)
        assert torch.allclose(out, ref) and torch.allclose(last, ref_last)


def test_nan_propagates_forward_in_time():
    B, n = 2, 40
    q, k, v = make_qkv(B, n, 1, 1)
    a = make_gate((B, n, 1, 1))
    v[0, 17] = float("nan")
    out = gk.gate_loop_operator(q, k, v, a)
    assert torch.isnan(out[0, 17:]).all()  # as in the seed: every later step of that sequence
    assert torch.isfinite(out[0, :17]).all() and torch.isfinite(out[1]).all()
    q, k, v = make_qkv(B, n, 3, 2)
    k[1, 20] = float("nan")
    out = gk.gate_loop_operator(q, k, v, a)
    assert torch.isnan(out[1, 20:]).all() and torch.isfinite(out[0]).all()


def _bad(**over):
    B, n, d, e = 2, 5, 3, 4
    args = dict(q=torch.randn(B, n, d), k=torch.randn(B, n, d), v=torch.randn(B, n, e),
                a=torch.randn(B, n, 1, 1, dtype=torch.complex64))
    args.update(over)
    return args


# each error starts by naming the argument (a bare "q" or "a" matched nearly any message: with the q rank check
# removed, "k must have the shape of q" passed for q's)
@pytest.mark.parametrize("over,exc,word", [
    (dict(q=torch.randn(2, 5)), ValueError, r"^q must have shape \(B, n, d\), got \(2, 5\)"),
    (dict(k=torch.randn(2, 5, 2)), ValueError, r"^k must have the shape of q"),
    (dict(v=torch.randn(3, 5, 4)), ValueError, r"^v must have shape \(B, n, e\) = \(2, 5, e\), got \(3, 5, 4\)"),
    (dict(v=torch.randn(2, 6, 4)), ValueError, r"^v must have shape \(B, n, e\) = \(2, 5, e\), got \(2, 6, 4\)"),
    (dict(a=torch.randn(2, 5, 2, 1, dtype=torch.complex64)), ValueError, r"^a must have shape .*got \(2, 5, 2, 1\)$"),
    (dict(a=torch.randn(2, 5, 1, dtype=torch.complex64)), ValueError, r"^a must have shape .*got \(2, 5, 1\)$"),
    (dict(a=torch.randn(2, 4, 1, 1, dtype=torch.complex64)), ValueError, r"^a must have shape .*got \(2, 4, 1, 1\)$"),
    (dict(q=torch.randint(0, 3, (2, 5, 3))), TypeError, r"^q must be a real floating-point tensor"),
    (dict(a=torch.ones(2, 5, 1, 1, dtype=torch.int64)), TypeError, r"^a must be a floating-point or complex tensor"),
    (dict(v=torch.randn(2, 5, 4, dtype=torch.complex64)), TypeError, r"^v must be a real floating-point tensor"),
    (dict(q=torch.randn(2, 5, 3, device="meta")), ValueError, r"one device, got q on meta"),
])
def test_bad_input_errors(over, exc, word):
    with pytest.raises(exc, match=word):
        gk.gate_loop_operator(**_bad(**over))


def test_bad_initial_state_and_cache():
    args = _bad()
    with pytest.raises(ValueError, match="initial_state"):
        gk.gate_loop_operator(**args, initial_state=torch.zeros(2, 3, 3, dtype=torch.complex64))
    q = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="cache"):
        gk.simple_gate_loop_operator(q, q, q.sigmoid(), cache=(torch.ones(2, 4), torch.ones(2, 3)))
    with pytest.raises(TypeError, match="cache"):
        gk.simple_gate_loop_operator(q, q, q.sigmoid(), cache=torch.ones(2, 3))
    with pytest.raises(ValueError, match="kv"):
        gk.simple_gate_loop_operator(q, q[:, :4], q.sigmoid())


@pytest.mark.parametrize("chunk", [2 ** 16, 2 ** 40])
@pytest.mark.parametrize("packed", [False, True])
def test_chunk_size_beyond_the_sequence(chunk, packed):
    """A ``chunk_size`` far above the sequence's length (a power of two >= 16, so accepted) is the one-chunk scan:
    the reference padded every chunk to it (2**40 for 20 steps: an allocation error; 2**16: minutes of work, a
    Python loop over its steps; found by a new user's probe). Now as fast as one chunk and exact: the matrix state
    (head dims 4, packed or not) and the first-order scan (head dims 1 of the public reference; a gate per key dim
    packed)."""
    n, H, d = 20, 2, 4
    q, k, v = (torch.randn(1, n, H, d, dtype=f64) for _ in range(3))
    z = torch.randn(1, n, H, 2, dtype=f64)
    s0 = torch.randn(3 if packed else 1, H, d, d, dtype=torch.complex128)
    cu = torch.tensor([0, 7, 7, n]) if packed else None
    o, s = gk.gate_loop_heads(q, k, v, z=z, initial_state=s0, output_final_state=True, chunk_size=chunk, cu_seqlens=cu)
    a = torch.complex(*gk.gate_from_preactivation(z))
    bounds = [0, 7, 7, n] if packed else [0, n]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        for h in range(H):
            ro, rs = R.sequential_reference(q[:, lo:hi, h], k[:, lo:hi, h], v[:, lo:hi, h], a[:, lo:hi, h, None, None],
                                            s0[i:i + 1, h], return_final_state=True)
            if hi > lo:
                assert rel(o[:, lo:hi, h], ro) < 1e-12
            assert rel(s[i:i + 1, h], rs) < 1e-12
    ak = make_gate((1, n, d, 1))
    if packed:  # a gate per key dim: the first-order scan over the d e entries
        o = gk.gate_loop_operator(q[:, :, 0], k[:, :, 0], v[:, :, 0], ak, chunk_size=chunk, cu_seqlens=cu)
        ref = torch.cat([R.sequential_reference(q[:, lo:hi, 0], k[:, lo:hi, 0], v[:, lo:hi, 0], ak[:, lo:hi])
                         for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
    else:
        x = [t[:, :, 0, :1] for t in (q, k, v)]
        o = R.chunked_reference(*x, ak[..., :1, :], chunk_size=chunk)
        ref = R.sequential_reference(*x, ak[..., :1, :])
    assert rel(o, ref) < 1e-12
