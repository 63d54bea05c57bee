"""Property-based tests (hypothesis) of every public scan entry point and both Triton kernels.

Drawn: shapes with ``n`` in {0, 1, chunk - 1, chunk, chunk + 1} or random (chunk: the reference's
default on the CPU paths, 16 for the kernels), head dims 1..256 (mostly small; 128 and 256 with one
sequence of a few steps), ``d != e``, layouts (contiguous, a stride-0 batch from ``expand``, transposed,
sliced), dtypes (float32, float64, bfloat16; float16 for the kernels), gates (random, with exact
zeros, exactly 1, of modulus 1, tiny 1e-30..1e-22, above 1, near 1; complex or real), an initial state
(complex or real) and the final state, and sometimes one NaN or Inf in one input.

Oracle: the float64 sequential loop (``sequential_reference``, ``simple_sequential_reference``) on the
same values, and its autograd for the gradients, through ``helpers.oracle.assert_matches``: where the
oracle's entry is finite ours is finite and within a dtype's tolerance times the tensor's largest
oracle magnitude, and non-finite where the oracle's is. Tensor values and the cotangents come from a drawn
seed (a failure replays).

Time: ``GATELOOP_PROPERTY_SCALE`` multiplies every test's number of examples (1 in CI, e.g. 20 for a
long local run); the kernel tests run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the oracle
stays on the CPU).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import gateloop_kernels as gk
from gateloop_kernels import reference as R

from helpers.kernels import DEV, needs_kernels
from helpers.oracle import assert_matches, real_view, row_scales, value_and_grads

Tensor = torch.Tensor
f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SCALE = float(os.environ.get("GATELOOP_PROPERTY_SCALE", "1"))
#: tolerance per input dtype, times the largest oracle magnitude of each compared tensor
TOL = {f64: 1e-10, f32: 5e-5, bf16: 2e-2, f16: 5e-3}
#: the chunked kernel's bf16 tensor-core operands: its output's largest error reaches ~2% of the largest output
#: where gates are ~1 (RMS 1.6%, flat in n; docs/kernels.md section 1): 2% failed 1 case in ~1000 tensors
KERNEL_TOL = {**TOL, bf16: 3e-2}
BAD = (math.nan, math.inf, -math.inf)


def budget(examples: int, shrink: bool = True):
    """``examples`` (times ``GATELOOP_PROPERTY_SCALE``); ``shrink=False``: report a failure as found (the
    interpreted kernels take seconds an example, and shrinking runs hundreds) unless the scale is above 1."""
    phases = list(Phase) if shrink or SCALE > 1 else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None, derandomize=False, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- drawn cases

@dataclass
class Case:
    B: int
    n: int
    d: int
    e: int
    dtype: torch.dtype
    layout: str  # of q, k, v: contiguous | expanded | transposed | sliced
    gate: str  # random | zeros | one | unit | tiny | big | near1
    complex_gate: bool
    gate_bcast: bool  # one gate sequence for the whole batch (a (1, n, ...) gate)
    init: Optional[str]  # None | complex | real
    final: bool
    poison: Optional[tuple]  # (input name, step, value) or None
    seed: int
    H: int = 1


@st.composite
def cases(draw, chunk: int, dims, dtypes, inputs=("q", "k", "v", "a"), heads=False, rows: int = 3):
    """A :class:`Case`; ``rows``: the most sequences ``B H`` (the interpreted kernels take ~1 s a sequence)."""
    big = draw(st.integers(0, 9)) == 9  # one example in ten at head dim 128 / 256
    if big:
        d, e = draw(st.sampled_from([(128, 128), (256, 256), (128, 256), (256, 128), (128, 64)]))
        B, H, n = 1, 1, draw(st.sampled_from([0, 1, 2, 3]))
    else:
        d, e = draw(dims), draw(dims)
        B = draw(st.integers(1, rows))
        H = draw(st.integers(1, max(1, min(2, rows // B)))) if heads else 1
        n = draw(st.one_of(st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1]), st.integers(2, 2 * chunk + 3)))
    gate = draw(st.sampled_from(["random", "random", "zeros", "one", "unit", "tiny", "big", "near1"]))
    poison = None
    if n and draw(st.integers(0, 4)) == 4:  # one in five
        poison = (draw(st.sampled_from(inputs)), draw(st.integers(0, n - 1)), draw(st.sampled_from(BAD)))
    return Case(B=B, n=n, d=d, e=e, dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(["contiguous", "contiguous", "expanded", "transposed", "sliced"])),
                gate=gate, complex_gate=draw(st.booleans()), gate_bcast=draw(st.booleans()),
                init=draw(st.sampled_from([None, "complex", "real"])), final=draw(st.booleans()),
                poison=poison, seed=draw(st.integers(0, 2 ** 31 - 1)), H=H)


#: head dims of the CPU paths (1: the elementwise op; others: the chunked reference)
SMALL_DIMS = st.sampled_from([1, 1, 2, 3, 5, 8, 16, 17, 32])


# ----------------------------------------------------------------------------- tensors of a case

class Maker:
    """Tensors of a case from its seed: logical values (poisoned as drawn) and the layout to pass them in."""

    def __init__(self, case: Case):
        self.case = case
        self.gen = torch.Generator().manual_seed(case.seed)

    def randn(self, *shape) -> Tensor:
        return torch.randn(*shape, dtype=f64, generator=self.gen)

    def rand(self, *shape) -> Tensor:
        return torch.rand(*shape, dtype=f64, generator=self.gen)

    def poisoned(self, name: str, x: Tensor) -> Tensor:
        p = self.case.poison
        if p is not None and p[0] == name:
            x = x.clone()
            x[(0, p[1]) + (0,) * (x.ndim - 2)] = p[2]
        return x

    def data(self, name: str, *shape) -> tuple[Tensor, Callable]:
        """``(base, view)``: ``view(base)`` is the logical ``(B, n, ...)`` tensor in the case's layout,
        ``base`` the leaf (float64; its values are rounded to the case's dtype)."""
        c = self.case
        B, rest = shape[0], shape[1:]
        batch = 1 if c.layout == "expanded" else B
        x = self.poisoned(name, self.randn(batch, *rest).to(c.dtype).to(f64))
        if c.layout == "expanded":
            return x, lambda t: t.expand(B, *rest)
        if c.layout == "transposed":
            return x.transpose(1, -1).contiguous(), lambda t: t.transpose(1, -1)
        if c.layout == "sliced":
            base = self.randn(B, 2 * rest[0], *rest[1:-1], rest[-1] + 2)
            base[:, ::2, ..., 1:rest[-1] + 1] = x
            return base.to(c.dtype).to(f64), lambda t: t[:, ::2, ..., 1:rest[-1] + 1]
        return x, lambda t: t

    def gate_modulus(self, *shape) -> Tensor:
        kind, u = self.case.gate, self.rand(*shape)
        mag = {"random": 0.5 + 0.5 * u,
               "zeros": torch.where(u < 0.25, torch.zeros_like(u), 0.5 + 0.5 * u),
               "one": torch.ones_like(u), "unit": torch.ones_like(u),
               "tiny": 10.0 ** (-30 + 8 * u),
               "big": 1.0 + 0.3 * u,
               "near1": torch.full_like(u, 0.99999)}[kind]
        return self.poisoned("a", mag)

    def gate(self, *shape) -> tuple[Tensor, Tensor]:
        """(modulus, phase) float64; the phase is 0 for a real gate (a sign in the modulus instead)."""
        mag = self.gate_modulus(*shape)
        c = self.case
        if not c.complex_gate or c.gate == "one":
            sign = torch.where(self.rand(*shape) < 0.5, -1.0, 1.0) if c.gate not in ("one", "near1") else 1.0
            return mag * sign, torch.zeros_like(mag)
        scale = 1e-3 if c.gate == "near1" else math.pi
        return mag, (2 * self.rand(*shape) - 1) * scale


def leaf_dtype(case: Case, complex_: bool = False) -> torch.dtype:
    real = f64 if case.dtype == f64 else f32
    return (torch.complex128 if real == f64 else torch.complex64) if complex_ else real


def compare(fn: Callable, oracle: Callable, ours_in: list, oracle_in: list, names: list, case: Case,
            out_needs_grad: bool = True, joint: tuple = (), tols: Optional[dict] = None) -> None:
    """``fn(*ours_in)`` against ``oracle(*oracle_in)`` (the same values in float64), outputs and gradients
    under the same cotangents, drawn from the case's seed (a replayed case is the same test), within
    ``(tols or TOL)[case.dtype]``. ``out_needs_grad``: the first output must carry a ``grad_fn``. An input expanded over
    the batch: a gradient's tolerance scales with its rows' magnitudes summed (:func:`helpers.oracle.row_scales`),
    not with their sum, which may cancel (bf16: ~1% a row). ``joint``: pairs of names that are the real and
    imaginary parts of one complex gradient (``a_re``, ``a_im``), held to the pair's largest magnitude as a
    complex tensor is: one part may cancel to near zero while the rounding of its terms stays that of both."""
    tol, gen = (tols or TOL)[case.dtype], torch.Generator().manual_seed(case.seed ^ 0x5EED)
    outs, grads, cots = value_and_grads(fn, ours_in, check_grad_fn=out_needs_grad, generator=gen)
    ref_outs, ref_grads, _ = value_and_grads(oracle, oracle_in, cots)
    for i, (x, y) in enumerate(zip(outs, ref_outs)):
        assert_matches(x, y, tol, f"output {i}")
    scales = row_scales(oracle, oracle_in, cots) if case.layout == "expanded" else [None] * len(names)
    for pair in joint:
        i, j = (names.index(x) for x in pair)
        both = [real_view(g).abs()[torch.isfinite(real_view(g))].max().item() if g is not None and
                torch.isfinite(real_view(g)).any() else 0.0 for g in (ref_grads[i], ref_grads[j])]
        scales[i] = scales[j] = max(*both, scales[i] or 0.0, scales[j] or 0.0)
    for name, g, rg, scale in zip(names, grads, ref_grads, scales):
        if g is not None:
            assert_matches(g, rg, tol, f"grad {name}", scale)


def as64(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t.to(torch.complex128) if t.is_complex() else t.to(f64)


# ----------------------------------------------------------------------------- CPU entry points


def operator_inputs(case: Case):
    """Leaves ``[q, k, v, a, h0]`` in the case's dtypes, the float64 copies, and the view of each."""
    c, mk = case, Maker(case)
    (qb, qv), (kb, kv), (vb, vv) = mk.data("q", c.B, c.n, c.d), mk.data("k", c.B, c.n, c.d), mk.data("v", c.B, c.n, c.e)
    Bg = 1 if c.gate_bcast else c.B
    mag, ph = mk.gate(Bg, c.n, 1, 1)
    a = torch.polar(mag, ph) if c.complex_gate else mag
    h0 = None
    if c.init is not None:
        h0 = torch.complex(mk.randn(c.B, c.d, c.e), mk.randn(c.B, c.d, c.e)) if c.init == "complex" else \
            mk.randn(c.B, c.d, c.e)
    ours = [qb.to(c.dtype), kb.to(c.dtype), vb.to(c.dtype), a.to(leaf_dtype(c, c.complex_gate)),
            None if h0 is None else h0.to(leaf_dtype(c, c.init == "complex"))]
    # a broadcast gate passed as is, or expanded to the batch (stride 0) with expanded q, k, v
    av = (lambda t: t.expand(c.B, *t.shape[1:])) if (c.gate_bcast and c.layout == "expanded") else (lambda t: t)
    return ours, [as64(t) for t in ours], (qv, kv, vv, av)


@budget(20)
@given(case=cases(R.DEFAULT_CHUNK, SMALL_DIMS, [f32, f64, bf16]))
def test_gate_loop_operator(case):
    ours, o64, (qv, kv, vv, av) = operator_inputs(case)

    def run(fn):
        def f(q, k, v, a, h0):
            res = fn(qv(q), kv(k), vv(v), av(a), initial_state=h0, return_final_state=case.final)
            return res if case.final else (res,)
        return f

    def seq(q, k, v, a, initial_state, return_final_state):
        return R.sequential_reference(q, k, v, a, initial_state, return_final_state)

    compare(run(gk.gate_loop_operator), run(seq), ours, o64, ["q", "k", "v", "a", "h0"], case)


@budget(15)
@given(case=cases(R.DEFAULT_CHUNK, SMALL_DIMS, [f32, f64, bf16], heads=True),
       z_form=st.booleans(), z_scale=st.sampled_from([1.0, 1.0, 1e-23, 1e20]))
def test_gate_loop_heads(case, z_form, z_scale):
    """Head layout ``(B, n, H, d)``; the gate as log-magnitude and phase, or the seed's ``z`` (scaled by
    ``z_scale``: ``|z|`` whose square leaves float32's range)."""
    c, mk = case, Maker(case)
    (qb, qv), (kb, kv), (vb, vv) = (mk.data(x, c.B, c.n, c.H, dim) for x, dim in (("q", c.d), ("k", c.d), ("v", c.e)))
    gdt = leaf_dtype(c)
    if z_form:
        gate = [mk.poisoned("a", mk.randn(c.B, c.n, c.H, 2) * z_scale).to(gdt)]
    else:
        mag, ph = mk.gate(c.B, c.n, c.H)
        sign_ph = torch.where(mag < 0, math.pi, 0.0)  # a negative real gate: modulus |a|, phase pi
        gate = [mag.abs().log().to(gdt), (ph + sign_ph).to(gdt)]
    h0 = None if c.init is None else torch.complex(mk.randn(c.B, c.H, c.d, c.e), mk.randn(c.B, c.H, c.d, c.e))
    ours = [qb.to(c.dtype), kb.to(c.dtype), vb.to(c.dtype), *gate,
            None if h0 is None else h0.to(leaf_dtype(c, True))]

    def run(q, k, v, *rest):
        g, h0 = rest[:-1], rest[-1]
        kw = dict(z=g[0]) if z_form else dict(log_magnitude=g[0], phase=g[1])
        o, s = gk.gate_loop_heads(qv(q), kv(k), vv(v), initial_state=h0, output_final_state=c.final, **kw)
        return (o, s) if c.final else (o,)

    def oracle(q, k, v, *rest):
        g, h0 = rest[:-1], rest[-1]
        if z_form:
            a = torch.polar(torch.sigmoid(torch.linalg.vector_norm(g[0], dim=-1)), torch.atan2(g[0][..., 1], g[0][..., 0]))
        else:
            a = torch.polar(g[0].exp(), g[1])
        B, n, H = a.shape

        def bh(x):
            return x.transpose(1, 2).reshape(B * H, n, x.shape[-1])
        o, s = R.sequential_reference(bh(qv(q)), bh(kv(k)), bh(vv(v)), a.transpose(1, 2).reshape(B * H, n, 1, 1),
                                      None if h0 is None else h0.reshape(B * H, *h0.shape[2:]), True)
        o = o.reshape(B, H, n, o.shape[-1]).transpose(1, 2)
        return (o, s.reshape(B, H, *s.shape[1:])) if c.final else (o,)

    names = ["q", "k", "v"] + (["z"] if z_form else ["log_magnitude", "phase"]) + ["h0"]
    compare(run, oracle, ours, [as64(t) for t in ours], names, c, joint=() if z_form else (("log_magnitude", "phase"),))


@budget(20)
@given(case=cases(R.DEFAULT_CHUNK, st.sampled_from([1, 2, 3, 8, 32]), [f32, f64, bf16], inputs=("q", "k", "a")))
def test_simple_gate_loop_operator(case):
    """``(B, n, D)`` with ``D = d``; ``k`` plays ``kv``; a real gate; ``init`` gives a cache."""
    c, mk = case, Maker(case)
    (qb, qv), (kb, kv) = mk.data("q", c.B, c.n, c.d), mk.data("k", c.B, c.n, c.d)
    mag, _ = mk.gate(c.B, c.n, c.d)
    cache = [] if c.init is None else [mk.rand(c.B, c.d).to(c.dtype), mk.randn(c.B, c.d).to(c.dtype)]
    ours = [qb.to(c.dtype), kb.to(c.dtype), mag.to(c.dtype), *cache]

    def run(fn):
        def f(q, kv_, a, *cache):
            o, (a_last, kv_last) = fn(qv(q), kv(kv_), a, tuple(cache) if cache else None)
            return o, a_last, kv_last
        return f

    compare(run(gk.simple_gate_loop_operator), run(R.simple_sequential_reference), ours,
            [as64(t) for t in ours], ["q", "kv", "a", "cache_a", "cache_kv"], c)


# ----------------------------------------------------------------------------- Triton kernels

KERNEL_CHUNK = 16
#: the interpreter's numpy warns on the NaN and Inf of poisoned cases
quiet_numpy = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@needs_kernels
@quiet_numpy
@budget(5, shrink=False)
@given(case=cases(KERNEL_CHUNK, st.sampled_from([16, 16, 16, 24, 32, 48]), [f32, bf16, f16], heads=True, rows=2))
def test_chunk_gate_loop_kernel(case):
    from gateloop_kernels.chunked import chunk_gate_loop
    c, mk = case, Maker(case)
    (qb, qv), (kb, kv), (vb, vv) = (mk.data(x, c.B, c.n, c.H, dim) for x, dim in (("q", c.d), ("k", c.d), ("v", c.e)))
    mag, ph = mk.gate(c.B, c.n, c.H)
    a = torch.polar(mag.abs(), ph + torch.where(mag < 0, math.pi, 0.0))
    h0 = None if c.init is None else torch.complex(mk.randn(c.B, c.H, c.d, c.e), mk.randn(c.B, c.H, c.d, c.e))
    ours = [qb.to(c.dtype), kb.to(c.dtype), vb.to(c.dtype), a.real.to(f32), a.imag.to(f32),
            None if h0 is None else h0.to(torch.complex64)]
    oracle_in, ours = [as64(t) for t in ours], [None if t is None else t.to(DEV) for t in ours]

    def run(q, k, v, ar, ai, h0):
        o, s = chunk_gate_loop(qv(q), kv(k), vv(v), ar, ai, initial_state=h0, output_final_state=c.final,
                               chunk_size=KERNEL_CHUNK)
        return (o, s) if c.final else (o,)

    def oracle(q, k, v, ar, ai, h0):
        B, n, H = ar.shape

        def bh(x):
            return x.transpose(1, 2).reshape(B * H, n, x.shape[-1])
        a = torch.complex(ar, ai).transpose(1, 2).reshape(B * H, n, 1, 1)
        o, s = R.sequential_reference(bh(qv(q)), bh(kv(k)), bh(vv(v)), a,
                                      None if h0 is None else h0.reshape(B * H, *h0.shape[2:]), True)
        o = o.reshape(B, H, n, o.shape[-1]).transpose(1, 2)
        return (o, s.reshape(B, H, *s.shape[1:])) if c.final else (o,)

    compare(run, oracle, ours, oracle_in, ["q", "k", "v", "a_re", "a_im", "h0"], c,
            joint=(("a_re", "a_im"),), tols=KERNEL_TOL)


class _ElementwiseKernel(torch.autograd.Function):
    """``elementwise.scan_forward`` / ``scan_backward`` (the Triton kernels themselves) as one autograd op."""

    @staticmethod
    def forward(ctx, q, k, v, a_re, a_im, h0_re, h0_im, block):
        from gateloop_kernels import elementwise as ew
        o, hr, hi, carries = ew.scan_forward(q, k, v, a_re, a_im, h0_re, h0_im, block=block)
        ctx.save_for_backward(q, k, v, a_re, a_im, h0_re, h0_im, carries)
        ctx.block = block
        return o, hr, hi

    @staticmethod
    def backward(ctx, do, g_re, g_im):
        from gateloop_kernels import elementwise as ew
        q, k, v, a_re, a_im, h0_re, h0_im, carries = ctx.saved_tensors
        grads = ew.scan_backward(do, g_re, g_im if a_im is not None else None, q, k, v, a_re, a_im, h0_re, h0_im,
                                 carries, block=ctx.block)
        return (*grads, None)


@needs_kernels
@quiet_numpy
@budget(5, shrink=False)
@given(case=cases(KERNEL_CHUNK, st.sampled_from([1, 2, 3, 8, 33]), [f32, bf16, f16], rows=2),
       kv_given=st.booleans(), segments=st.booleans())
def test_elementwise_scan_kernel(case, kv_given, segments):
    """Channels ``C = d`` of ``(B, n, C)``; ``segments``: 16-step tiles (the look-back across tiles)."""
    c, mk = case, Maker(case)
    (qb, qv), (kb, kv), (vb, vv) = (mk.data(x, c.B, c.n, c.d) for x in ("q", "k", "v"))
    mag, ph = mk.gate(c.B, c.n, c.d)
    a = torch.polar(mag.abs(), ph + torch.where(mag < 0, math.pi, 0.0)) if c.complex_gate else torch.complex(mag, 0 * mag)
    h0 = None if c.init is None else torch.complex(mk.randn(c.B, c.d), mk.randn(c.B, c.d))
    cplx = c.complex_gate
    ours = [qb.to(c.dtype), kb.to(c.dtype), None if kv_given else vb.to(c.dtype), a.real.to(f32),
            a.imag.to(f32) if cplx else None, None if h0 is None else h0.real.to(f32),
            None if (h0 is None or not cplx) else h0.imag.to(f32)]
    block = (16, 4, 1) if segments else None
    oracle_in, ours = [as64(t) for t in ours], [None if t is None else t.to(DEV) for t in ours]

    def run(q, k, v, ar, ai, hr, hi):
        return _ElementwiseKernel.apply(qv(q), kv(k), None if v is None else vv(v), ar, ai, hr, hi, block)

    def oracle(q, k, v, ar, ai, hr, hi):
        B, n, C = ar.shape

        def chan(x):  # (B, n, C) -> (B C, n, 1): each channel a scan of head dim 1
            return x.transpose(1, 2).reshape(B * C, n, 1)
        q, k = qv(q), kv(k)
        v = torch.ones_like(k) if v is None else vv(v)
        a = torch.complex(ar, ai if ai is not None else torch.zeros_like(ar))
        h0 = None if hr is None else torch.complex(hr, hi if hi is not None else torch.zeros_like(hr))
        o, s = R.sequential_reference(chan(q), chan(k), chan(v), chan(a)[..., None],
                                      None if h0 is None else h0.reshape(B * C, 1, 1), True)
        s = s.reshape(B, C)
        return o.reshape(B, C, n).transpose(1, 2), s.real, s.imag if ai is not None else s.new_zeros(0).real

    compare(run, oracle, ours, oracle_in, ["q", "k", "v", "a_re", "a_im", "h0_re", "h0_im"],
            c, out_needs_grad=False, joint=(("a_re", "a_im"), ("h0_re", "h0_im")))
