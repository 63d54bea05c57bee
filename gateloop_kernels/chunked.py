"""Chunked gate-loop scan on tensor cores (Triton): a complex gate per head, head dims 16..256.

``S_t = a_t S_{t-1} + k_t v_t^T`` (complex ``d x e`` state, complex scalar gate per head and step),
``o_t = Re(S_t)^T q_t``, computed chunk by chunk (``BT = 64`` steps) as in ``docs/design.md``:

* gates are only ever combined forward in time inside a chunk: chunk-local log-magnitude
  ``g_t = sum_{w<=t} log|a_w|``, a count ``z_t`` of zero gates (hard resets) and the unit phasor
  ``u_t = prod_{w<=t} a_w/|a_w|`` (a complex cumulative product, so no phase is ever accumulated as
  an angle); ``D[t, s] = prod_{s<w<=t} a_w = [z_t == z_s] exp(g_t - g_s) u_t conj(u_s)`` for ``t >= s``.
  Nothing divides by a gate, so zero gates are exact in the forward and in every gradient;
* the state entering each chunk is carried as a complex matrix (Re and Im planes, float32; stored in bf16 for
  bf16 inputs, whose dots round it to bf16 anyway). The float32 forward stores its planes transposed, (e, d):
  its output dots contract over d and read their state operand K-major from shared memory (see ``_forward``).

Kernels (all accumulate in float32; the dots run in the input dtype for bf16/fp16; for float32 either as
three tf32 dots of hi/lo operand halves, exact to float32 (``_rdot``; the default), or as one tf32 dot):

``_chunk_states`` parallel over (batch*head, key block, value block), sequential over chunks: the
               states ``h_c`` entering each chunk / adjoints ``dh_c`` of the state leaving it (tf32 and
               16-bit dots);
``_chunk_local`` + ``_state_scan``  the same in two passes for the exact float32 mode: each chunk's own
               state (adjoint) contribution and total gate, in parallel over chunks; then the carry across
               chunks, in place, elementwise over the state (memory-bound);
(the backward needs both the states and their adjoints: each of these kernels runs the two directions in one
launch there);
``_fwd_o``        parallel over (value block, chunk, batch*head): outputs;
``_bwd_dqk``, ``_bwd_dv``, ``_bwd_gate``  parallel over (chunk, batch*head): dq and dk (and the
               gate-gradient pieces psi, phi, sigma), dv, and the complex gate gradient.

Non-finite values stay causal (a NaN/Inf at step t reaches no output before t) at no cost to finite inputs beyond
one sum per time contraction: masks of score tiles are selects, never multiplications by zero; the dots that
contract over a chunk's steps (``_tdot``, and R in ``_bwd_gate``) check their time-indexed operand and only when it
holds a non-finite value zero the steps it must not reach and NaN-fill the rows the exact result is non-finite in;
a non-finite gate counts as a reset (``z``) inside the (BT, BT) decay tiles, finite, while every per-step span that
holds it (``_span``) is NaN. |a|^2 is formed in float64 (tiny gates, log|a| near 1), the phasor product too.

Packed variable-length batches (``cu_seqlens``, ``_chunk_gate_loop``): chunks are aligned to sequence starts by a
chunk table built on the device (``_chunk_table``); every kernel, behind a ``VARLEN`` constexpr, reads its chunk's
steps from it, and the state passes restart each sequence from its own initial state (docs/kernels.md, section 1).

Per-key-dim gates ``a: (B, n, d, 1)`` have no kernel here: ``gateloop_kernels.dispatch`` sends them to
the reference (``reference.chunked_reference``, which runs the sequential loop for that layout) with a
one-time warning.

The gate gradient is the division-free form ``grad_a_u = <Lambda_u, S_{u-1}>`` (``Lambda`` the
adjoint state), expanded per chunk (``tests/gateloop/test_chunked_math.py`` holds the float64 prototype
of exactly these formulas, checked against autograd):
``grad_a_u = sum_{t>=u} conj(D[t,u]) (R[t,u] + psi_t conj(A_{u-1}))
+ conj(D[C-1,u]) (sigma conj(A_{u-1}) + sum_{s<u} conj(D[u-1,s]) phi_s)``, with
``P = (Q K^T) o (dO V^T)``, ``R = P conj(D_shift)^T``, ``psi_t = q_t^T conj(h) do_t``,
``phi_s = k_s^T dh v_s``, ``sigma = <dh, h>``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_chunk_gate_loop_inputs
from ._custom_op import DifferentiableOp
from .dtypes import PRECISIONS, empty_scan

__all__ = ["chunk_gate_loop", "PRECISIONS"]

_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DEFAULT_BT = 64
# Launch configuration per kernel and input dtype: ``cap`` bounds the key/value tile width (see ``_block``;
# ``cap_v``, where given, the value tile's), ``maxnreg`` caps the registers; for the state scan, ``block``
# elements per program. Picked on the H100 at (64, 2048, 64) with ``python -m bench.scan_chunked --tune``
# (which edits this table in memory and checks every configuration against the default's results; on the H200
# in the ninth session); docs/history.md has the timings. bf16 differs from float32 in the dq/dk and dv
# kernels' tiles (64-wide, no register cap) and in _fwd_o's 8 warps (hazard H2b, docs/kernels.md). fp16 keeps the configuration validated before the search for every
# kernel with tensor-core dots: the tuned 4-warp one faulted there (an illegal address at
# (d, e) = (96, 160) with Triton 3.6 on the H100; bf16, which differs only in running its state dots in bf16
# instead of tf32, passed at every test shape).
_SEARCHED = {
    "chunk_local": {"cap": 64, "num_warps": 4},
    # eight chunks in flight per program, 4 warps (tenth session, H200: 141 -> 119.5 / 391 -> 269.8 /
    # 292 -> 244.1 us at (64, 2048, 64) / (32, 8192, 64) / (16, 4096, 128) against four chunks, 2 warps)
    "state_scan": {"block": 1024, "num_warps": 4},
    "chunk_states": {"cap": 32, "num_warps": 2, "num_stages": 3},
    # the exact float32 mode's state pass: None runs the two passes chunk_local + state_scan, a configuration
    # runs chunk_states with it (see _carried)
    "chunk_states_exact": None,
    "fwd_o": {"cap": 64, "num_warps": 4},
    # 32-wide key and 64-wide value tiles (ninth session, H200: 325 -> 298 us at (64, 2048, 64), 543 -> 463 us
    # at (16, 4096, 128) against 64-wide both)
    "bwd_dqk": {"cap": 32, "cap_v": 64, "num_warps": 4},
    # the one kernel a register cap helped (ninth session, H200: 136.5 -> 125.5 us; it spills 128 bytes)
    "bwd_dv": {"cap": 32, "num_warps": 4, "maxnreg": 128},
    "bwd_gate": {"cap": 64, "num_warps": 4},
}
_CFG = {
    torch.float32: dict(_SEARCHED),
    # 16-bit outputs on 8 warps: on 4 (the float32 entry) Triton 3.6 gave a 120% wrong output (and an illegal
    # address at real sizes) on the H100 at (d, e) = (256, 96), 64-wide key and 32-wide value tiles
    torch.bfloat16: {**_SEARCHED, "fwd_o": {"cap": 64, "num_warps": 8}, "bwd_dqk": {"cap": 64, "num_warps": 4},
                     "bwd_dv": {"cap": 64, "num_warps": 4}},
    torch.float16: {**_SEARCHED, "fwd_o": {"cap": 64, "num_warps": 8}, "bwd_dqk": {"cap": 32, "num_warps": 8},
                    "bwd_dv": {"cap": 32, "num_warps": 4}, "bwd_gate": {"cap": 32, "num_warps": 8}},
}
_DTYPE = {m: t for t, m in _MODE.items()}
# Head dims that are not multiples of 32 (16-wide or masked tiles): the output and backward kernels run 32-wide
# tiles on 2 warps, below a warpgroup, so Triton lowers their dots to mma.sync instead of wgmma. Triton 3.6's
# wgmma lowering of these tiles is wrong on the H100 (docs/kernels.md): with 8 warps an illegal shared-memory
# read in _bwd_dqk's three-dot product at d = 16 and wrong float32 gate gradients at (d, e) = (48, 16); with 4
# warps a 100-300% wrong 16-bit dq at d = 16 and a wrong bf16 output at (48, 16); with 8 warps an illegal address
# in a bf16 backward at (48, 80) at real sizes.
# tests/gateloop/test_chunked_sweep.py checks every tile class on the GPU (and under compute-sanitizer in gpu.sh).
_IRREGULAR = {"cap": 32, "num_warps": 2}


def _cfg(kernel: str, mode: int, K: int = 32, V: int = 32) -> dict:
    cfg = _CFG[_DTYPE[mode]][kernel]
    if kernel == "fwd_o" or kernel.startswith("bwd_"):
        if K % 32 or V % 32:
            return _IRREGULAR
        # 16-bit dots on key and value tiles of different widths (64 and 32: a head dim of 96) on 8 warps: on 4,
        # Triton 3.6 gave the H100 a 94% wrong bf16 dv at (d, e) = (128, 96) (and a wrong output at (256, 96))
        if mode != 0 and cfg["num_warps"] < 8 and len(set(_blocks(K, V, cfg))) > 1:
            return {**cfg, "num_warps": 8}
    return cfg


# Under TRITON_INTERPRET=1 (Triton 3.9) a 16-bit tl.dot returns garbage: emulate it there by rounding
# the operands to the 16-bit dtype and multiplying in float32 (the interpreter's dots are exact anyway).
_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _tf32_hi(x):
    """x with its low 13 mantissa bits cleared: exact in tf32, and x - _tf32_hi(x) is exact in float32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _rdot(a, b, EXACT: tl.constexpr):
    """float32 ``a @ b`` on tensor cores: exact to float32 as three tf32 dots of hi/lo halves
    (a_hi b_lo + a_lo b_hi + a_hi b_hi; the dropped a_lo b_lo is ~2^-20 relative) when EXACT, else one tf32
    dot. (Triton 3.6's own tf32x3 lowering ran the gate kernel's product 2-3x slower on the H100.)"""
    if EXACT:
        a_hi = _tf32_hi(a)
        b_hi = _tf32_hi(b)
        acc = tl.dot(a_hi, b - b_hi, input_precision="tf32")
        acc = tl.dot(a - a_hi, b_hi, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _dot(a, b, MODE: tl.constexpr, PREC: tl.constexpr):
    """Dot with float32 accumulation: float32 operands at PREC, else the 16-bit input dtype."""
    if MODE == 0:
        if PREC == "tf32x3":
            return _rdot(a.to(tl.float32), b.to(tl.float32), True)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif _INTERP:
        if MODE == 1:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
        else:
            return tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32))
    elif MODE == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _sdot(a, b, MODE: tl.constexpr, PREC: tl.constexpr):
    """Dot with a float32 operand of unbounded range (a state, or a score tile such as ``D o (Q K^T)``, whose
    entries exceed 65504 where the outputs still fit fp16): fp16 has too little range, so it runs in tf32 there."""
    if MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return _dot(a, b, MODE, PREC)


@triton.jit
def _tdot(m, y, REV: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """``m @ y`` contracting over the chunk's steps (:func:`_sdot`), causal for non-finite rows of ``y``.

    ``m`` is a (BT, BT) score tile, zero (selected) above the diagonal, or below it with ``REV`` (a transposed
    one): row t of the product sums steps s <= t of ``y`` (REV: s >= t). Inside the dot a NaN/Inf row of ``y``
    meets those zeros (0 * NaN = NaN) and would reach every row. So when ``y`` holds one (checked with one sum:
    the only extra work of the common, finite case) its rows from each column's first non-finite step on (REV: up
    to its last) are zeroed before the one product, and the result's rows from that step on (REV: up to it) are
    NaN afterwards: the exact result there is non-finite too (it holds that step's term).
    """
    rows = tl.arange(0, BT)[:, None]
    clean = _finite(tl.sum(tl.sum(y.to(tl.float32), 1), 0))
    p = tl.full([1, y.shape[1]], -1 if REV else BT, tl.int32)  # the step per column (none)
    if not clean:
        bad = ~_finite(y.to(tl.float32))
        if REV:
            p = tl.max(tl.where(bad, rows, -1), 0)[None, :]
            y = tl.where(rows > p, y, 0.0)
        else:
            p = tl.min(tl.where(bad, rows, BT), 0)[None, :]
            y = tl.where(rows < p, y, 0.0)
    out = _sdot(m, y, MODE, PREC)
    if not clean:
        out = tl.where((rows > p) if REV else (rows < p), out, float("nan"))
    return out


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _gate_prefix(are_ptr, aim_ptr, t_idx, valid, stride, BT: tl.constexpr):
    """Chunk-local prefixes of the gates at ``t_idx`` (gate 1 where not ``valid``).

    Returns ``g`` (sum of log|a| over finite non-zero gates), ``z`` (a reset count: 1 per zero gate, BT + 1 per
    non-finite gate; see :func:`_span`) and the unit phasor ``(ur, ui)`` (product of a/|a| over finite non-zero
    gates), all inclusive. |a|^2 is formed in float64 from the exact squares of the float32 parts: it neither
    underflows for tiny gates (|a| < 1e-19) nor biases log|a| near |a| = 1 (float32's rounded magnitude did, by
    up to 1e-3 relative: an error that grew linearly with n), and the phasors are unit to float32 rounding.
    """
    ar = tl.load(are_ptr + t_idx.to(tl.int64) * stride, mask=valid, other=1.0).to(tl.float64)
    ai = tl.load(aim_ptr + t_idx.to(tl.int64) * stride, mask=valid, other=0.0).to(tl.float64)
    m2 = ar * ar + ai * ai
    zero = m2 == 0.0
    bad = ~_finite(m2)
    live = ~(zero | bad)
    m2 = tl.where(live, m2, 1.0)
    inv = 1.0 / tl.sqrt(m2)
    lg = tl.where(live, 0.5 * tl.log(m2), 0.0).to(tl.float32)
    pr = tl.where(live, ar * inv, 1.0)
    pi = tl.where(live, ai * inv, 0.0)
    g = tl.cumsum(lg, 0)
    z = tl.cumsum(tl.where(bad, BT + 1, zero.to(tl.int32)), 0)
    ur, ui = tl.associative_scan((pr, pi), 0, _cmul)
    return g, z, ur.to(tl.float32), ui.to(tl.float32)


@triton.jit
def _span(dg, dz, BT: tl.constexpr):
    """|prod a_w| over a span of gates with log-magnitude sum ``dg`` and reset count ``dz`` (differences of
    :func:`_gate_prefix`'s ``g``, ``z``): exp(dg) with no reset, 0 across a zero gate, NaN across a non-finite
    gate (dz > BT). Non-finite gates thus poison exactly the spans that hold them; every per-step quantity of a
    chunk reads its gates through here, so the (BT, BT) decay tiles may treat them as resets (zero), finite."""
    return tl.where(dz == 0, tl.exp(dg), tl.where(dz > BT, float("nan"), 0.0))


@triton.jit
def _last(x, idx, BT: tl.constexpr):
    return tl.sum(tl.where(idx == BT - 1, x, 0), 0)


@triton.jit
def _ends(g, z, ur, ui, idx, BT: tl.constexpr):
    """The chunk's full prefixes (the values at its last step) of :func:`_gate_prefix`'s outputs."""
    return _last(g, idx, BT), _last(z, idx, BT), _last(ur, idx, BT), _last(ui, idx, BT)


@triton.jit
def _pair_decay(gt, zt, urt, uit, gs, zs, urs, uis, ok):
    """``D[t, s] = [ok and z_t == z_s] exp(g_t - g_s) u_t conj(u_s)`` as (Re, Im) tiles (finite, exact zeros
    outside ``ok``: a product with a non-finite tile is masked with a select, never by these zeros)."""
    ok = ok & (zt[:, None] == zs[None, :])
    mag = tl.where(ok, tl.exp(gt[:, None] - gs[None, :]), 0.0)
    re = mag * (urt[:, None] * urs[None, :] + uit[:, None] * uis[None, :])
    im = mag * (uit[:, None] * urs[None, :] - urt[:, None] * uis[None, :])
    return re, im


@triton.jit
def _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT: tl.constexpr):
    """``D[C-1, s]`` (Re, Im) per s and the chunk total ``A_end`` (Re, Im)."""
    mag = _span(g_end - g, z_end - z, BT)
    wre = mag * (ur_end * ur + ui_end * ui)
    wim = mag * (ui_end * ur - ur_end * ui)
    amag = _span(g_end, z_end, BT)
    return wre, wim, amag * ur_end, amag * ui_end


@triton.jit
def _head(i_bh, n, H):
    """Offset, in steps x heads, of head ``i_bh % H`` of batch ``i_bh // H`` in a ``(B, n, H, ...)`` tensor."""
    return (i_bh // H).to(tl.int64) * n * H + i_bh % H


@triton.jit
def _chunk_span(tab, i_t, n, BT: tl.constexpr, VARLEN: tl.constexpr):
    """Steps ``[t0, end)`` of chunk slot ``i_t``: from the chunk table (:func:`_chunk_table`) with ``VARLEN``,
    else ``[i_t BT, n)`` (the mask bound ``end`` may pass the chunk: every tile is BT steps from t0)."""
    if VARLEN:
        p = tab + i_t.to(tl.int64) * 4
        return tl.load(p), tl.load(p + 1)
    return i_t * BT, n


@triton.jit
def _seq_ends(tab, i_t, REV: tl.constexpr):
    """Sequence index of chunk slot ``i_t`` (packed batch) and whether the carry opens / closes the sequence
    there: forward, its first / last chunk; reverse (``REV``), its last / first chunk."""
    p = tab + i_t.to(tl.int64) * 4
    seq = tl.load(p + 2).to(tl.int64)
    flags = tl.load(p + 3)
    first = (flags & 1) != 0
    last = (flags & 2) != 0
    if REV:
        return seq, last, first
    return seq, first, last


@triton.jit
def _chunk_gates(are, aim, t0, n, H, BT: tl.constexpr):
    """The gates of the chunk starting at step ``t0``: :func:`_gate_prefix`'s ``(g, z, ur, ui)`` and the
    decay to the chunk's end ``D[C-1, s]`` (Re, Im) per step."""
    idx = tl.arange(0, BT)
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(are, aim, t_idx, t_idx < n, H, BT)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    de_re, de_im, _, _ = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    return g, z, ur, ui, de_re, de_im


@triton.jit
def _ld_t(ptr, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    """(BT, BC) tile of a time-major (n, C) matrix with row stride S (zeros outside)."""
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[:, None]
    else:
        m = ((t0 + rr) < n)[:, None] & (cc < C)[None, :]
    return tl.load(ptr + t0.to(tl.int64) * S + rr[:, None] * S + cc[None, :], mask=m, other=0.0)


@triton.jit
def _ld_tT(ptr, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    """Transposed (BC, BT) tile of a time-major (n, C) matrix with row stride S."""
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[None, :]
    else:
        m = (cc < C)[:, None] & ((t0 + rr) < n)[None, :]
    return tl.load(ptr + t0.to(tl.int64) * S + rr[None, :] * S + cc[:, None], mask=m, other=0.0)


@triton.jit
def _st_t(ptr, x, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[:, None]
    else:
        m = ((t0 + rr) < n)[:, None] & (cc < C)[None, :]
    tl.store(ptr + t0.to(tl.int64) * S + rr[:, None] * S + cc[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _ld_s(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """(BK, BV) tile of a row-major (K, V) state plane."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        return tl.load(ptr + rr[:, None] * V + cc[None, :])
    m = (rr < K)[:, None] & (cc < V)[None, :]
    return tl.load(ptr + rr[:, None] * V + cc[None, :], mask=m, other=0.0)


@triton.jit
def _ld_sT(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Transposed (BV, BK) tile of a row-major (K, V) state plane."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        return tl.load(ptr + rr[None, :] * V + cc[:, None])
    m = (cc < V)[:, None] & (rr < K)[None, :]
    return tl.load(ptr + rr[None, :] * V + cc[:, None], mask=m, other=0.0)


@triton.jit
def _st_s(ptr, x, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        tl.store(ptr + rr[:, None] * V + cc[None, :], x.to(ptr.dtype.element_ty))
    else:
        m = (rr < K)[:, None] & (cc < V)[None, :]
        tl.store(ptr + rr[:, None] * V + cc[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _ld_state(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              TRANS: tl.constexpr):
    """(BK, BV) tile of a (K, V) state plane stored row-major, or (``TRANS``) stored as its (V, K) transpose."""
    if TRANS:
        return _ld_sT(ptr, c0, r0, V, K, BV, BK)
    return _ld_s(ptr, r0, c0, K, V, BK, BV)


@triton.jit
def _state_offsets(r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TRANS: tl.constexpr):
    """Offsets and bounds mask of the (BK, BV) tile at (r0, c0) of a state plane in :func:`_ld_state`'s layout."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    ok = (rr < K)[:, None] & (cc < V)[None, :]
    if TRANS:
        return cc[None, :] * K + rr[:, None], ok
    return rr[:, None] * V + cc[None, :], ok


@triton.jit
def _st_state(ptr, x, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              TRANS: tl.constexpr):
    """Store the (BK, BV) tile ``x`` of a (K, V) state plane in :func:`_ld_state`'s layout."""
    if TRANS:
        _st_s(ptr, tl.trans(x), c0, r0, V, K, BV, BK)
    else:
        _st_s(ptr, x, r0, c0, K, V, BK, BV)


@triton.jit
def _scores(a, b, t0, n, C: tl.constexpr, H, BT: tl.constexpr, BC: tl.constexpr, MODE: tl.constexpr,
            PREC: tl.constexpr):
    """``A B^T`` of one chunk, (BT, BT) float32, for time-major (n, C) inputs of row stride H * C."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_c in range(tl.cdiv(C, BC)):
        acc += _dot(_ld_t(a, t0, i_c * BC, n, C, H * C, BT, BC), _ld_tT(b, t0, i_c * BC, n, C, H * C, BT, BC),
                    MODE, PREC)
    return acc


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _chunk_contrib(x, y, are, aim, t0, r0, c0, n, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    """One chunk's own contribution to the carried state, ``(u_re, u_im, ae_re, ae_im)``, for the
    ``(BK, BV)`` state tile at ``(r0, c0)`` of the chunk starting at step ``t0`` (pointers at the head):

    forward (x = k, y = v):  U = sum_s D[C-1, s] k_s v_s^T (the chunk's state from a zero start);
    reverse (x = q, y = dO): U = sum_t conj(A_t) q_t do_t^T (the chunk's adjoint of its entering state);
    and the chunk's total gate ``A = prod_t a_t`` (not conjugated, in both directions).
    """
    idx = tl.arange(0, BT)
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(are, aim, t_idx, t_idx < n, H, BT)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    if REV:
        amag = _span(g, z, BT)
        w_re, w_im = amag * ur, -amag * ui
        emag = _span(g_end, z_end, BT)
        ae_re, ae_im = emag * ur_end, emag * ui_end
    else:
        w_re, w_im, ae_re, ae_im = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    b_xt = _ld_tT(x, t0, r0, n, K, H * K, BT, BK)
    b_y = _ld_t(y, t0, c0, n, V, H * V, BT, BV)
    # the decay-weighted operand leaves fp16's range for tiny or long decays: _sdot (tf32 there)
    return _sdot(b_xt * w_re[None, :], b_y, MODE, PREC), _sdot(b_xt * w_im[None, :], b_y, MODE, PREC), ae_re, ae_im


@triton.jit
def _chunk_local_job(x, y, are, aim, u, atot, tab, i_tb, n, H, NT,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     REV: tl.constexpr, TRANS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                     VARLEN: tl.constexpr):
    """Chunk ``i_tb % NT`` of batch*head ``i_tb // NT``: the chunk's own state contribution ``U_c``
    (:func:`_chunk_contrib`) into ``u`` (in :func:`_st_state`'s layout) and its total gate ``A_c`` (Re, Im)
    into ``atot``."""
    i_k, i_v = tl.program_id(1), tl.program_id(2)
    i_bh, i_t = i_tb // NT, i_tb % NT
    bt = _head(i_bh, n, H)
    r0, c0 = i_k * BK, i_v * BV
    t0, end = _chunk_span(tab, i_t, n, BT, VARLEN)
    u_re, u_im, ae_re, ae_im = _chunk_contrib(x + bt * K, y + bt * V, are + bt, aim + bt, t0, r0, c0, end, H,
                                              K, V, BT, BK, BV, REV, MODE, PREC)
    pu = u + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    _st_state(pu, u_re, r0, c0, K, V, BK, BV, TRANS)
    _st_state(pu + K * V, u_im, r0, c0, K, V, BK, BV, TRANS)
    if (i_k == 0) & (i_v == 0):
        pa = atot + (i_bh.to(tl.int64) * NT + i_t) * 2
        tl.store(pa, ae_re)
        tl.store(pa + 1, ae_im)


@triton.jit
def _chunk_local(kx, vy, u_f, at_f, qx, doy, u_r, at_r, are, aim, tab, n, H, NT, NTBH,
                 K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 FWD: tl.constexpr, BWD: tl.constexpr, TRANS_F: tl.constexpr, MODE: tl.constexpr,
                 PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Per chunk, in parallel, :func:`_chunk_local_job` of the forward direction (``FWD``: k, v into
    ``u_f``, ``at_f``; transposed planes if ``TRANS_F``) and/or the reverse one (``BWD``: q, dO into ``u_r``,
    ``at_r``); with both, one launch runs the two (grid axis 0 is ``2 * NTBH``: the forward's chunks first)."""
    i = tl.program_id(0)
    if FWD and BWD:
        if i < NTBH:
            _chunk_local_job(kx, vy, are, aim, u_f, at_f, tab, i, n, H, NT, K, V, BT, BK, BV, False, TRANS_F, MODE,
                             PREC, VARLEN)
        else:
            _chunk_local_job(qx, doy, are, aim, u_r, at_r, tab, i - NTBH, n, H, NT, K, V, BT, BK, BV, True, False,
                             MODE, PREC, VARLEN)
    elif FWD:
        _chunk_local_job(kx, vy, are, aim, u_f, at_f, tab, i, n, H, NT, K, V, BT, BK, BV, False, TRANS_F, MODE, PREC,
                         VARLEN)
    else:
        _chunk_local_job(qx, doy, are, aim, u_r, at_r, tab, i, n, H, NT, K, V, BT, BK, BV, True, False, MODE, PREC,
                         VARLEN)


@triton.jit
def _scan_load(u, atot, tab, i_bh, i_t, NT, offs, m, KV: tl.constexpr, REV: tl.constexpr, VARLEN: tl.constexpr):
    """Chunk ``i_t`` (counted from the end with ``REV``; none past NT) of the scan: its slot, mask, total gate,
    contribution, and (``VARLEN``) its sequence and the block masks of whether the carry opens / closes that
    sequence there (block masks: the interpreter rejects a mask combined with a scalar condition)."""
    i_t = tl.full([], 0, tl.int32) + i_t  # a tensor, also where i_t is a Python int (interpreter)
    ok = i_t < NT
    i_s = tl.where(ok, i_t, 0)
    if REV:
        i_s = NT - 1 - i_s
    seq, opens, closes = i_s, m, m  # (unused without VARLEN)
    if VARLEN:
        seq, o1, c1 = _seq_ends(tab, i_s, REV)
        opens = m & ((offs * 0 + (o1 & ok).to(tl.int32)) != 0)
        closes = m & ((offs * 0 + (c1 & ok).to(tl.int32)) != 0)
    pu = u + (i_bh.to(tl.int64) * NT + i_s) * 2 * KV
    pa = atot + (i_bh.to(tl.int64) * NT + i_s) * 2
    a_re = tl.where(ok, tl.load(pa), 1.0)
    a_im = tl.where(ok, tl.load(pa + 1), 0.0)
    if REV:
        a_im = -a_im
    okv = m & ((offs * 0 + i_t) < NT)
    u_re = tl.load(pu + offs, mask=okv, other=0.0)
    u_im = tl.load(pu + KV + offs, mask=okv, other=0.0)
    return pu, okv, a_re, a_im, u_re, u_im, seq, opens, closes


@triton.jit
def _scan_step(s_re, s_im, pu, okv, a_re, a_im, u_re, u_im, offs, m, s0, sT, i_bh, H, seq, opens, closes,
               KV: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, VARLEN: tl.constexpr):
    if VARLEN:
        # a sequence's first chunk (in the scan's direction) restarts the carry from its own s0 (zero without)
        if HAS_S0:
            p0 = s0 + (seq * H + i_bh) * 2 * KV
            s_re = tl.where(opens, tl.load(p0 + offs, mask=opens, other=0.0), s_re)
            s_im = tl.where(opens, tl.load(p0 + KV + offs, mask=opens, other=0.0), s_im)
        else:
            s_re = tl.where(opens, 0.0, s_re)
            s_im = tl.where(opens, 0.0, s_im)
    tl.store(pu + offs, s_re, mask=okv)
    tl.store(pu + KV + offs, s_im, mask=okv)
    s_re, s_im = a_re * s_re - a_im * s_im + u_re, a_re * s_im + a_im * s_re + u_im
    if VARLEN and STORE_ST:
        pt = sT + (seq * H + i_bh) * 2 * KV
        tl.store(pt + offs, s_re, mask=closes)
        tl.store(pt + KV + offs, s_im, mask=closes)
    return s_re, s_im


@triton.jit
def _state_scan_job(u, atot, s0, sT, tab, i_bh, H, NT, KV: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, REV: tl.constexpr, VARLEN: tl.constexpr):
    """In place over the chunks of batch*head ``i_bh``: slot c holds U_c on entry and the carried state on exit.

    forward: slot c <- S (entering chunk c), S <- A_c S + U_c; reverse (c from the end):
    slot c <- L (adjoint of the state leaving chunk c), L <- conj(A_c) L + U_c.
    Eight chunks per iteration, all loaded before any is overwritten: one memory round trip per eight steps on
    the sequential path (with four, ncu measured the scan at 47-62% of the copy rate on the H200, latency-bound:
    too few bytes in flight). ``VARLEN`` (a packed batch, ``B = 1``): each sequence's carry starts from its own
    ``s0`` at its first chunk (in the scan's direction) and is stored to ``sT`` after its last.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < KV
    s_re = tl.zeros([BLOCK], dtype=tl.float32)
    s_im = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_S0 and not VARLEN:
        p0 = s0 + i_bh.to(tl.int64) * 2 * KV
        s_re += tl.load(p0 + offs, mask=m, other=0.0)
        s_im += tl.load(p0 + KV + offs, mask=m, other=0.0)
    for j in range(0, NT, 8):  # (sq, op, cl: a chunk's sequence and its opens / closes masks, VARLEN)
        p0, k0, ar0, ai0, ur0, ui0, sq0, op0, cl0 = _scan_load(u, atot, tab, i_bh, j, NT, offs, m, KV,
                                                               REV, VARLEN)
        p1, k1, ar1, ai1, ur1, ui1, sq1, op1, cl1 = _scan_load(u, atot, tab, i_bh, j + 1, NT, offs, m, KV,
                                                               REV, VARLEN)
        p2, k2, ar2, ai2, ur2, ui2, sq2, op2, cl2 = _scan_load(u, atot, tab, i_bh, j + 2, NT, offs, m, KV,
                                                               REV, VARLEN)
        p3, k3, ar3, ai3, ur3, ui3, sq3, op3, cl3 = _scan_load(u, atot, tab, i_bh, j + 3, NT, offs, m, KV,
                                                               REV, VARLEN)
        p4, k4, ar4, ai4, ur4, ui4, sq4, op4, cl4 = _scan_load(u, atot, tab, i_bh, j + 4, NT, offs, m, KV,
                                                               REV, VARLEN)
        p5, k5, ar5, ai5, ur5, ui5, sq5, op5, cl5 = _scan_load(u, atot, tab, i_bh, j + 5, NT, offs, m, KV,
                                                               REV, VARLEN)
        p6, k6, ar6, ai6, ur6, ui6, sq6, op6, cl6 = _scan_load(u, atot, tab, i_bh, j + 6, NT, offs, m, KV,
                                                               REV, VARLEN)
        p7, k7, ar7, ai7, ur7, ui7, sq7, op7, cl7 = _scan_load(u, atot, tab, i_bh, j + 7, NT, offs, m, KV,
                                                               REV, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p0, k0, ar0, ai0, ur0, ui0, offs, m, s0, sT, i_bh, H, sq0,
                                op0, cl0, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p1, k1, ar1, ai1, ur1, ui1, offs, m, s0, sT, i_bh, H, sq1,
                                op1, cl1, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p2, k2, ar2, ai2, ur2, ui2, offs, m, s0, sT, i_bh, H, sq2,
                                op2, cl2, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p3, k3, ar3, ai3, ur3, ui3, offs, m, s0, sT, i_bh, H, sq3,
                                op3, cl3, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p4, k4, ar4, ai4, ur4, ui4, offs, m, s0, sT, i_bh, H, sq4,
                                op4, cl4, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p5, k5, ar5, ai5, ur5, ui5, offs, m, s0, sT, i_bh, H, sq5,
                                op5, cl5, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p6, k6, ar6, ai6, ur6, ui6, offs, m, s0, sT, i_bh, H, sq6,
                                op6, cl6, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p7, k7, ar7, ai7, ur7, ui7, offs, m, s0, sT, i_bh, H, sq7,
                                op7, cl7, KV, HAS_S0, STORE_ST, VARLEN)
    if STORE_ST and not VARLEN:
        pt = sT + i_bh.to(tl.int64) * 2 * KV
        tl.store(pt + offs, s_re, mask=m)
        tl.store(pt + KV + offs, s_im, mask=m)


@triton.jit
def _state_scan(u_f, at_f, s0_f, sT_f, u_r, at_r, s0_r, sT_r, tab, H, NT, KV: tl.constexpr, BLOCK: tl.constexpr,
                FWD: tl.constexpr, BWD: tl.constexpr, HAS_S0_F: tl.constexpr, STORE_ST_F: tl.constexpr,
                HAS_S0_R: tl.constexpr, STORE_ST_R: tl.constexpr, VARLEN: tl.constexpr):
    """:func:`_state_scan_job` of the forward direction (``FWD``) and/or the reverse one (``BWD``); with both,
    grid axis 2 picks the direction (0: forward), so the two memory-bound scans share one launch."""
    i_bh = tl.program_id(1)
    if FWD and BWD:
        if tl.program_id(2) == 0:
            _state_scan_job(u_f, at_f, s0_f, sT_f, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_F, STORE_ST_F, False, VARLEN)
        else:
            _state_scan_job(u_r, at_r, s0_r, sT_r, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_R, STORE_ST_R, True, VARLEN)
    elif FWD:
        _state_scan_job(u_f, at_f, s0_f, sT_f, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_F, STORE_ST_F, False, VARLEN)
    else:
        _state_scan_job(u_r, at_r, s0_r, sT_r, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_R, STORE_ST_R, True, VARLEN)


@triton.jit
def _chunk_states_job(x, y, are, aim, h, s0, sT, tab, i_bh, n, H, NT,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      REV: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, TRANS: tl.constexpr,
                      MODE: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr):
    """The carried states of one (key block, value block) tile of batch*head ``i_bh``, chunk after chunk.

    forward (x = k, y = v): slot c <- S (the state entering chunk c), S <- A_c S + U_c with
    U_c = sum_s D[C-1, s] k_s v_s^T; reverse (x = q, y = dO, c from the end): slot c <- L (the adjoint of
    the state leaving chunk c), L <- conj(A_c) L + U_c with U_c = sum_t conj(A_t) q_t do_t^T.
    The state stays in registers; a chunk's loads do not depend on it (software-pipelined, STAGES). States in
    memory (initial, per chunk, final) are in :func:`_st_state`'s layout. ``VARLEN`` (a packed batch, ``B = 1``):
    each sequence's carry starts from its own ``s0`` at its first chunk (in this direction) and is stored to
    ``sT`` after its last.
    """
    i_k, i_v = tl.program_id(1), tl.program_id(2)
    bt = _head(i_bh, n, H)
    x += bt * K
    y += bt * V
    are += bt
    aim += bt
    r0, c0 = i_k * BK, i_v * BV
    s_re = tl.zeros([BK, BV], dtype=tl.float32)
    s_im = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0 and not VARLEN:
        p0 = s0 + i_bh.to(tl.int64) * 2 * K * V
        s_re += _ld_state(p0, r0, c0, K, V, BK, BV, TRANS)
        s_im += _ld_state(p0 + K * V, r0, c0, K, V, BK, BV, TRANS)
    ph = h + i_bh.to(tl.int64) * NT * 2 * K * V
    if VARLEN:
        st_off, st_ok = _state_offsets(r0, c0, K, V, BK, BV, TRANS)
    for j in tl.range(0, NT, num_stages=STAGES):
        i_t = tl.full([], 0, tl.int32) + j  # a tensor, also where j is a Python int (interpreter)
        if REV:
            i_t = NT - 1 - i_t
        t0, end = _chunk_span(tab, i_t, n, BT, VARLEN)
        u_re, u_im, ae_re, ae_im = _chunk_contrib(x, y, are, aim, t0, r0, c0, end, H, K, V, BT, BK, BV, REV,
                                                  MODE, PREC)
        if REV:
            ae_im = -ae_im
        if VARLEN:
            # restarts as predicated loads/stores and selects, not branches: a branch in the loop body keeps
            # Triton from software-pipelining the chunk loads
            seq, opens, closes = _seq_ends(tab, i_t, REV)
            ps = (seq * H + i_bh) * 2 * K * V
            if HAS_S0:
                m0 = tl.where(opens, st_ok, False)
                s_re = tl.where(opens, tl.load(s0 + ps + st_off, mask=m0, other=0.0), s_re)
                s_im = tl.where(opens, tl.load(s0 + ps + K * V + st_off, mask=m0, other=0.0), s_im)
            else:
                s_re = tl.where(opens, 0.0, s_re)
                s_im = tl.where(opens, 0.0, s_im)
        pc = ph + i_t.to(tl.int64) * 2 * K * V
        _st_state(pc, s_re, r0, c0, K, V, BK, BV, TRANS)
        _st_state(pc + K * V, s_im, r0, c0, K, V, BK, BV, TRANS)
        s_re, s_im = ae_re * s_re - ae_im * s_im + u_re, ae_re * s_im + ae_im * s_re + u_im
        if VARLEN and STORE_ST:
            mT = tl.where(closes, st_ok, False)
            tl.store(sT + ps + st_off, s_re, mask=mT)
            tl.store(sT + ps + K * V + st_off, s_im, mask=mT)
    if STORE_ST and not VARLEN:
        pt = sT + i_bh.to(tl.int64) * 2 * K * V
        _st_state(pt, s_re, r0, c0, K, V, BK, BV, TRANS)
        _st_state(pt + K * V, s_im, r0, c0, K, V, BK, BV, TRANS)


@triton.jit
def _chunk_states(kx, vy, h_f, s0_f, sT_f, qx, doy, h_r, s0_r, sT_r, are, aim, tab, n, H, NT, BH,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  FWD: tl.constexpr, BWD: tl.constexpr, HAS_S0_F: tl.constexpr, STORE_ST_F: tl.constexpr,
                  HAS_S0_R: tl.constexpr, STORE_ST_R: tl.constexpr, TRANS_F: tl.constexpr, MODE: tl.constexpr,
                  PREC: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr):
    """:func:`_chunk_states_job` of the forward direction (``FWD``: k, v into ``h_f``, transposed planes if
    ``TRANS_F``) and/or the reverse one (``BWD``: q, dO into ``h_r``); with both, one launch runs the two (grid
    axis 0 is ``2 * BH``)."""
    i = tl.program_id(0)
    if FWD and BWD:
        if i < BH:
            _chunk_states_job(kx, vy, are, aim, h_f, s0_f, sT_f, tab, i, n, H, NT, K, V, BT, BK, BV, False,
                              HAS_S0_F, STORE_ST_F, TRANS_F, MODE, PREC, STAGES, VARLEN)
        else:
            _chunk_states_job(qx, doy, are, aim, h_r, s0_r, sT_r, tab, i - BH, n, H, NT, K, V, BT, BK, BV, True,
                              HAS_S0_R, STORE_ST_R, False, MODE, PREC, STAGES, VARLEN)
    elif FWD:
        _chunk_states_job(kx, vy, are, aim, h_f, s0_f, sT_f, tab, i, n, H, NT, K, V, BT, BK, BV, False,
                          HAS_S0_F, STORE_ST_F, TRANS_F, MODE, PREC, STAGES, VARLEN)
    else:
        _chunk_states_job(qx, doy, are, aim, h_r, s0_r, sT_r, tab, i, n, H, NT, K, V, BT, BK, BV, True,
                          HAS_S0_R, STORE_ST_R, False, MODE, PREC, STAGES, VARLEN)


@triton.jit
def _fwd_o(q, k, v, are, aim, h, o, tab, n, H, NT,
           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HT: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
    """Outputs of one (chunk, value block): the carried state's part plus the chunk's own; ``h`` in
    :func:`_ld_state`'s layout (``HT``: transposed)."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bt = _head(i_bh, n, H)
    q += bt * K
    k += bt * K
    v += bt * V
    o += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    c0 = i_v * BV
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(are + bt, aim + bt, t_idx, t_idx < n, H, BT)
    amag = _span(g, z, BT)
    a_re, a_im = amag * ur, amag * ui
    ph = h + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        r0 = i_k * BK
        b_q = _ld_t(q, t0, r0, n, K, H * K, BT, BK)
        b_kt = _ld_tT(k, t0, r0, n, K, H * K, BT, BK)
        b_hr = _ld_state(ph, r0, c0, K, V, BK, BV, HT)
        b_hi = _ld_state(ph + K * V, r0, c0, K, V, BK, BV, HT)
        b_o += _sdot(b_q * a_re[:, None], b_hr, MODE, PREC)
        b_o -= _sdot(b_q * a_im[:, None], b_hi, MODE, PREC)
        b_a += _dot(b_q, b_kt, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_v = _ld_t(v, t0, c0, n, V, H * V, BT, BV)
    b_o += _tdot(tl.where(causal, d_re * b_a, 0.0), b_v, False, MODE, PREC, BT)
    _st_t(o, b_o, t0, c0, n, V, H * V, BT, BV)


@triton.jit
def _bwd_dqk(q, k, v, do, are, aim, h, dh, dq, dk, aux, tab, n, H, NT,
             K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
    """dq, dk of one chunk, and the gate-gradient pieces psi, phi (per step) and sigma (per chunk) in aux."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += bt * K
    k += bt * K
    dq += bt * K
    dk += bt * K
    v += bt * V
    do += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    g, z, ur, ui, de_re, de_im = _chunk_gates(are + bt, aim + bt, t0, n, H, BT)
    amag = _span(g, z, BT)
    a_re, a_im = amag * ur, amag * ui
    ph = h + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    pd = dh + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_adv = _scores(do, v, t0, n, V, H, BT, BV, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_ddv = tl.where(causal, d_re * b_adv, 0.0)
    psi_re = tl.zeros([BT], dtype=tl.float32)
    psi_im = tl.zeros([BT], dtype=tl.float32)
    phi_re = tl.zeros([BT], dtype=tl.float32)
    phi_im = tl.zeros([BT], dtype=tl.float32)
    sig_re = 0.0
    sig_im = 0.0
    # per key block: dq (from dO h^T) and then dk (from V dh^T) in separate value loops, so only one
    # pair of (BT, BK) accumulators is live at a time (both at once spilled under 3xTF32 on sm_90)
    for i_k in range(tl.cdiv(K, BK)):
        r0 = i_k * BK
        g_re = tl.zeros([BT, BK], dtype=tl.float32)
        g_im = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            c0 = i_v * BV
            b_do = _ld_t(do, t0, c0, n, V, H * V, BT, BV)
            g_re += _sdot(b_do, _ld_sT(ph, r0, c0, K, V, BK, BV), MODE, PREC)
            g_im += _sdot(b_do, _ld_sT(ph + K * V, r0, c0, K, V, BK, BV), MODE, PREC)
        b_k = _ld_t(k, t0, r0, n, K, H * K, BT, BK)
        b_dq = a_re[:, None] * g_re - a_im[:, None] * g_im + _tdot(b_ddv, b_k, False, MODE, PREC, BT)
        _st_t(dq, b_dq, t0, r0, n, K, H * K, BT, BK)
        qf = _ld_t(q, t0, r0, n, K, H * K, BT, BK).to(tl.float32)
        psi_re += tl.sum(qf * g_re, 1)
        psi_im -= tl.sum(qf * g_im, 1)
        w_re = tl.zeros([BT, BK], dtype=tl.float32)
        w_im = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            c0 = i_v * BV
            b_v = _ld_t(v, t0, c0, n, V, H * V, BT, BV)
            # transposed (BV, BK) views of h and dh
            b_hr = _ld_sT(ph, r0, c0, K, V, BK, BV)
            b_hi = _ld_sT(ph + K * V, r0, c0, K, V, BK, BV)
            b_dr = _ld_sT(pd, r0, c0, K, V, BK, BV)
            b_di = _ld_sT(pd + K * V, r0, c0, K, V, BK, BV)
            w_re += _sdot(b_v, b_dr, MODE, PREC)
            w_im += _sdot(b_v, b_di, MODE, PREC)
            f_hr, f_hi, f_dr, f_di = (b_hr.to(tl.float32), b_hi.to(tl.float32), b_dr.to(tl.float32),
                                      b_di.to(tl.float32))
            sig_re += tl.sum(tl.sum(f_dr * f_hr + f_di * f_hi, 1), 0)
            sig_im += tl.sum(tl.sum(f_di * f_hr - f_dr * f_hi, 1), 0)
        b_q = _ld_t(q, t0, r0, n, K, H * K, BT, BK)
        b_dk = de_re[:, None] * w_re + de_im[:, None] * w_im + _tdot(tl.trans(b_ddv), b_q, True, MODE, PREC, BT)
        _st_t(dk, b_dk, t0, r0, n, K, H * K, BT, BK)
        kf = _ld_t(k, t0, r0, n, K, H * K, BT, BK).to(tl.float32)
        phi_re += tl.sum(kf * w_re, 1)
        phi_im += tl.sum(kf * w_im, 1)
    pa = aux + (i_bh.to(tl.int64) * NT + i_t) * 6 * BT
    tl.store(pa + idx, psi_re)
    tl.store(pa + BT + idx, psi_im)
    tl.store(pa + 2 * BT + idx, phi_re)
    tl.store(pa + 3 * BT + idx, phi_im)
    tl.store(pa + 4 * BT + idx, tl.zeros([BT], dtype=tl.float32) + sig_re)
    tl.store(pa + 5 * BT + idx, tl.zeros([BT], dtype=tl.float32) + sig_im)


@triton.jit
def _bwd_dv(q, k, do, are, aim, dh, dv, tab, n, H, NT,
            K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
    """dv of one chunk: (D o QK^T)^T dO + Re(conj(D[C-1, s]) dh^T k_s)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += bt * K
    k += bt * K
    do += bt * V
    dv += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    g, z, ur, ui, de_re, de_im = _chunk_gates(are + bt, aim + bt, t0, n, H, BT)
    pd = dh + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_aqk = _scores(q, k, t0, n, K, H, BT, BK, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_dqkt = tl.trans(tl.where(causal, d_re * b_aqk, 0.0))
    for i_v in range(tl.cdiv(V, BV)):
        c0 = i_v * BV
        b_do = _ld_t(do, t0, c0, n, V, H * V, BT, BV)
        u_re = tl.zeros([BT, BV], dtype=tl.float32)
        u_im = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            r0 = i_k * BK
            b_k = _ld_t(k, t0, r0, n, K, H * K, BT, BK)
            u_re += _sdot(b_k, _ld_s(pd, r0, c0, K, V, BK, BV), MODE, PREC)
            u_im += _sdot(b_k, _ld_s(pd + K * V, r0, c0, K, V, BK, BV), MODE, PREC)
        b_dv = _tdot(b_dqkt, b_do, True, MODE, PREC, BT) + de_re[:, None] * u_re + de_im[:, None] * u_im
        _st_t(dv, b_dv, t0, c0, n, V, H * V, BT, BV)


@triton.jit
def _bwd_gate(q, k, v, do, are, aim, dare, daim, aux, tab, n, H, NT,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              MODE: tl.constexpr, PREC: tl.constexpr, EXACT_R: tl.constexpr, VARLEN: tl.constexpr):
    """The complex gate gradient of one chunk (division-free, see the module docstring)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += bt * K
    k += bt * K
    v += bt * V
    do += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    t_idx = t0 + idx
    valid = t_idx < n
    # P = (Q K^T) o (dO V^T)
    b_p = _scores(q, k, t0, n, K, H, BT, BK, MODE, PREC) * _scores(do, v, t0, n, V, H, BT, BV, MODE, PREC)
    g, z, ur, ui = _gate_prefix(are + bt, aim + bt, t_idx, valid, H, BT)
    # exclusive prefixes (the state before step u): the same scan over the gates shifted by one
    xs = t_idx - 1
    gx, zx, uxr, uxi = _gate_prefix(are + bt, aim + bt, xs, (idx > 0) & (xs < n), H, BT)
    pa = aux + (i_bh.to(tl.int64) * NT + i_t) * 6 * BT
    xmag = _span(gx, zx, BT)
    ax_re, ax_im = xmag * uxr, xmag * uxi
    psi_re = tl.load(pa + idx)
    psi_im = tl.load(pa + BT + idx)
    # R = P E^T and ephi[u] = sum_{s<u} E[u, s] phi_s, with E[u, s] = conj(D[u-1, s]) for s < u (the decay
    # from after step s to before step u); R on tensor cores, exact to float32 in the exact modes (three tf32
    # dots of hi/lo halves), one tf32 dot in the tf32 mode and for 16-bit inputs (~5e-4 relative, under their
    # own rounding)
    phi_re = tl.load(pa + 2 * BT + idx)
    phi_im = tl.load(pa + 3 * BT + idx)
    later = idx[:, None] > idx[None, :]
    e_re, e_im = _pair_decay(gx, zx, uxr, uxi, g, z, ur, ui, later)
    e_im = -e_im
    # :func:`_tdot`'s causal product with the steps along P's columns (E strictly lower): where P holds a
    # non-finite value, row t of R takes, for u <= P's first non-finite step s in row t, the product with P's
    # steps from s on zeroed, and is NaN for u > s
    cols = idx[None, :]
    clean = _finite(tl.sum(tl.sum(b_p, 1), 0))
    first = tl.full([BT, 1], BT, tl.int32)
    if not clean:
        first = tl.min(tl.where(_finite(b_p), BT, cols), 1)[:, None]
        b_p = tl.where(cols < first, b_p, 0.0)
    r_re = _rdot(b_p, tl.trans(e_re), EXACT_R)
    r_im = _rdot(b_p, tl.trans(e_im), EXACT_R)
    if not clean:
        r_re = tl.where(cols <= first, r_re, float("nan"))
        r_im = tl.where(cols <= first, r_im, float("nan"))
    # (selects, not E's zeros, keep a non-finite phi_s / row of M from the steps before s / after t)
    ephi_re = tl.sum(tl.where(later, e_re * phi_re[None, :] - e_im * phi_im[None, :], 0.0), 1)
    ephi_im = tl.sum(tl.where(later, e_re * phi_im[None, :] + e_im * phi_re[None, :], 0.0), 1)
    # M = R + psi conj(A_{u-1}); t1[u] = sum_{t>=u} conj(D[t, u]) M[t, u], one plane of M at a time
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    m_re = tl.where(causal, r_re + psi_re[:, None] * ax_re[None, :] + psi_im[:, None] * ax_im[None, :], 0.0)
    t1_re = tl.sum(d_re * m_re, 0)
    t1_im = -tl.sum(d_im * m_re, 0)
    m_im = tl.where(causal, r_im + psi_im[:, None] * ax_re[None, :] - psi_re[:, None] * ax_im[None, :], 0.0)
    t1_re += tl.sum(d_im * m_im, 0)
    t1_im += tl.sum(d_re * m_im, 0)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    de_re, de_im, ae_re, ae_im = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    s_re = tl.load(pa + 4 * BT)
    s_im = tl.load(pa + 5 * BT)
    t2_re = ax_re * s_re + ax_im * s_im + ephi_re
    t2_im = ax_re * s_im - ax_im * s_re + ephi_im
    ga_re = t1_re + de_re * t2_re + de_im * t2_im
    ga_im = t1_im + de_re * t2_im - de_im * t2_re
    tl.store(dare + bt + t_idx.to(tl.int64) * H, ga_re, mask=valid)
    tl.store(daim + bt + t_idx.to(tl.int64) * H, ga_im, mask=valid)


# ----------------------------------------------------------------------------- launchers

def _cdiv(a: int, b: int) -> int:
    # host arithmetic: recent Triton (3.9 in CI) makes triton.cdiv a constexpr function, ~9 us a call
    return -(-a // b)


def _block(D: int, cap: int) -> int:
    """Tile width for a head dim: the largest power of two in [32, cap] dividing D, so tiles need no
    column masks (96 -> 32); 16 for D <= 16; else 32-wide tiles with masks (48 -> 32 + 16 masked).
    (With Triton 3.6 on the H100, masked 64-wide tiles gave wrong tf32 outputs at d = 96 and a fault in a
    bf16 backward at e = 48, and 16-wide tiles at D = 48 faulted too: none of these is used.)"""
    b = cap
    while b >= 32:
        if D % b == 0:
            return b
        b //= 2
    if D <= 16:
        return 16
    return 32


def _launch(cfg: dict) -> dict:
    """Launch options of a one-stage kernel's table entry: its warps, and its register cap where it names one
    (``maxnreg``: fewer registers per thread, more programs per SM, at the price of spills)."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": 1}
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def _blocks(K: int, V: int, cfg: dict) -> tuple[int, int]:
    """Key and value tile widths of a table entry: ``cap`` bounds both, ``cap_v`` (where given) the value one."""
    return _block(K, cfg["cap"]), _block(V, cfg.get("cap_v", cfg["cap"]))


def _chunk_table(cu_seqlens: Tensor, n: int, BT: int) -> Tensor:
    """The chunk table of a packed batch of ``n`` steps holding the sequences ``cu_seqlens`` delimits, built on
    the device (no host synchronisation): chunks start at each sequence's first step, so a sequence of
    length l takes ``max(1, ceil(l / BT))`` chunk slots (an empty one, one empty chunk: it carries its initial
    state to its final one). Flat int32, 4 entries per slot: first step, end step (exclusive: the kernels mask
    steps from there), sequence, flags (1: the sequence's first chunk, 2: its last). The slot count is a bound
    from shapes only, ``n // BT + N`` (the sum over sequences of ``(l + BT) / BT``); slots past the last
    chunk are empty (``t0 = end = n``, no flags) and change nothing."""
    N = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int64)
    cnt = ((cu[1:] - cu[:-1] + BT - 1) // BT).clamp_min(1)
    ends = cnt.cumsum(0)
    slot = torch.arange(n // BT + N, device=cu.device)
    seq = torch.searchsorted(ends, slot, right=True)
    real = seq < N
    seq = seq.clamp_max(N - 1)
    j = slot - (ends - cnt)[seq]  # the chunk's index in its sequence
    t0 = torch.where(real, cu[seq] + j * BT, n)
    end = torch.where(real, cu[seq + 1], n)
    flags = ((j == 0) & real).to(torch.int64) + 2 * ((j == cnt[seq] - 1) & real).to(torch.int64)
    return torch.stack([t0, end, seq, flags], 1).to(torch.int32).reshape(-1)


def _carried(fwd, rev, are, aim, BT, mode, prec, trans_f=False, chunks=None):
    """Chunk states and/or adjoint states, each (B*H, NT, 2, K, V): ``fwd = (k, v, s0, sT)`` gives the states
    entering each chunk, ``rev = (q, dO, s0, sT)`` the adjoints of the states leaving each chunk (``s0``: the
    initial state / final-state gradient or None; ``sT``: where to store the final state / initial-state
    gradient, or None); either may be None. Returns ``(h, dh)``, None for an absent direction. ``trans_f``: the
    forward direction's states (and its ``s0``, ``sT``) are stored as (V, K) planes, the transposes. With both
    (the backward), each kernel runs the two directions in one launch (fewer launches, and the two
    low-occupancy passes share the GPU).

    One-pass dots (tf32, 16-bit) carry the state through the chunks in one kernel (``_chunk_states``); the
    exact float32 mode's three dots per chunk lengthen that sequential loop, so unless its table entry
    (``chunk_states_exact``) names a configuration it computes every chunk's contribution in parallel first
    and then scans them (``_chunk_local`` + ``_state_scan``).
    (H100, forward+backward device time of the three state passes at (64, 2048, 64) / (32, 8192, 64) /
    (16, 4096, 128), two passes -> one kernel: bf16 293 -> 144, 770 -> 492, 605 -> 271 us; tf32 342 -> 176,
    850 -> 641, 686 -> 322 us; exact 387 -> 463, 925 -> 1352, 764 -> 906 us (its best tiles); docs/history.md.)

    ``chunks``: the chunk table of a packed batch (:func:`_chunk_table`; ``B = 1``), whose slots are the chunks;
    ``s0``, ``sT`` then hold one state per sequence, (N, H, 2, K, V)."""
    x, y = (fwd or rev)[:2]
    B, n, H, K = x.shape
    V = y.shape[-1]
    BH, NT = B * H, (_cdiv(n, BT) if chunks is None else chunks.shape[0] // 4)
    tab = are if chunks is None else chunks  # (never read without VARLEN)
    jobs = (fwd is not None) + (rev is not None)
    f_x, f_y, f_s0, f_sT = fwd or (x, y, None, None)
    r_x, r_y, r_s0, r_sT = rev or (x, y, None, None)
    flags = dict(FWD=fwd is not None, BWD=rev is not None, HAS_S0_F=f_s0 is not None, STORE_ST_F=f_sT is not None,
                 HAS_S0_R=r_s0 is not None, STORE_ST_R=r_sT is not None)

    def per_job(shape, dtype):  # a buffer per present direction
        return [torch.empty(shape, device=x.device, dtype=dtype) if j is not None else None for j in (fwd, rev)]

    def ptrs(*ts):  # an absent direction's or state's pointer is never accessed (its flag is off): any buffer
        stand_in = next(t for t in ts if t is not None)
        return [stand_in if t is None else t for t in ts]

    cfg = _cfg("chunk_states_exact" if mode == 0 and prec != "tf32" else "chunk_states", mode)
    if cfg is not None:
        BK, BV = _blocks(K, V, cfg)
        # bf16 inputs: the states are stored in bf16 (every dot reading them rounds them to bf16 anyway; they
        # are carried in float32 registers), half the memory and traffic of float32 states
        h_f, h_r = per_job((BH, NT, 2, K, V), torch.bfloat16 if mode == 1 else torch.float32)
        hf, s0f, sTf, hr, s0r, sTr = ptrs(h_f, f_s0, f_sT, h_r, r_s0, r_sT)
        _chunk_states[(jobs * BH, _cdiv(K, BK), _cdiv(V, BV))](
            f_x, f_y, hf, s0f, sTf, r_x, r_y, hr, s0r, sTr, are, aim, tab, n, H, NT, BH,
            K=K, V=V, BT=BT, BK=BK, BV=BV, **flags, TRANS_F=trans_f, MODE=mode, PREC=prec,
            STAGES=cfg["num_stages"], VARLEN=chunks is not None, num_warps=cfg["num_warps"])
        return h_f, h_r
    cfg = _cfg("chunk_local", mode)
    BK, BV = _blocks(K, V, cfg)
    u_f, u_r = per_job((BH, NT, 2, K, V), torch.float32)
    a_f, a_r = per_job((BH, NT, 2), torch.float32)
    uf, af, s0f, sTf, ur, ar, s0r, sTr = ptrs(u_f, a_f, f_s0, f_sT, u_r, a_r, r_s0, r_sT)
    # chunks x heads (x directions) on grid axis 0 (axes 1 and 2 stop at 65535: n = 2^20 at B*H = 8 is
    # 131072 chunks)
    _chunk_local[(jobs * NT * BH, _cdiv(K, BK), _cdiv(V, BV))](
        f_x, f_y, uf, af, r_x, r_y, ur, ar, are, aim, tab, n, H, NT, NT * BH, K=K, V=V, BT=BT, BK=BK, BV=BV,
        FWD=flags["FWD"], BWD=flags["BWD"], TRANS_F=trans_f, MODE=mode, PREC=prec, VARLEN=chunks is not None,
        **_launch(cfg))
    cfg = _cfg("state_scan", mode)
    BLOCK = min(cfg["block"], 1 << (K * V - 1).bit_length())
    _state_scan[(_cdiv(K * V, BLOCK), BH, jobs)](
        uf, af, s0f, sTf, ur, ar, s0r, sTr, tab, H, NT, KV=K * V, BLOCK=BLOCK, **flags, VARLEN=chunks is not None,
        **_launch(cfg))
    return u_f, u_r


def _forward(q, k, v, are, aim, h0, store_ht, BT, mode, prec, chunks=None, nseq=None):
    """Outputs and (``store_ht``) final states, (B*H, 2, K, V); ``chunks``: a packed batch's chunk table
    (:func:`_chunk_table`), whose ``nseq`` sequences each have their own initial and final state."""
    B, n, H, K = q.shape
    V = v.shape[-1]
    NT = _cdiv(n, BT) if chunks is None else chunks.shape[0] // 4
    varlen = chunks is not None
    cfg = _cfg("fwd_o", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    # float32: the states are stored transposed, (V, K) planes, so that _fwd_o's state dots (contracting over K)
    # stage their operand into shared memory as the K-major tile Hopper's tf32 tensor cores read, with no
    # transpose on the way (row-major planes cost 8-way bank-conflicted stores there: ncu, ninth session)
    trans = mode == 0
    ht = torch.empty((nseq if varlen else B) * H, 2, *((V, K) if trans else (K, V)), device=k.device,
                     dtype=torch.float32) if store_ht else None
    if trans and h0 is not None:
        h0 = h0.transpose(-1, -2).contiguous()
    h, _ = _carried((k, v, h0, ht), None, are, aim, BT, mode, prec, trans_f=trans, chunks=chunks)
    o = torch.empty_like(v)
    # num_stages=1: with the K loop software-pipelined (num_stages=2) Triton 3.6 miscompiled this kernel
    # on the H100 whenever the loop ran more than once: 7% output error in tf32 at (d, e) = (96, 160),
    # 5.7% in bf16 at (128, 64), while states and every gradient were right (the Hopper dot hazard of
    # flash-linear-attention issue 640); the interpreter gives the right answer for both.
    _fwd_o[(NT, _cdiv(V, BV), B * H)](q, k, v, are, aim, h, o, are if chunks is None else chunks, n, H, NT,
                                      K=K, V=V, BT=BT, BK=BK, BV=BV, HT=trans, MODE=mode, PREC=prec, VARLEN=varlen,
                                      **_launch(cfg))
    if trans and ht is not None:
        ht = ht.transpose(-1, -2).contiguous()
    return o, ht


def _backward(q, k, v, are, aim, h0, do, dht, BT, mode, prec, chunks=None):
    """Gradients of q, k, v, the gate planes and (where ``h0`` is given) the initial states; ``chunks``: a packed
    batch's chunk table (:func:`_chunk_table`), ``h0``, ``dht`` then one state per sequence."""
    B, n, H, K = q.shape
    V = v.shape[-1]
    NT = _cdiv(n, BT) if chunks is None else chunks.shape[0] // 4
    tab, varlen = (are, False) if chunks is None else (chunks, True)
    dh0 = torch.empty(h0.shape[0] * H, 2, K, V, device=q.device, dtype=torch.float32) if h0 is not None else None
    h, dh = _carried((k, v, h0, None), (q, do, dht, dh0), are, aim, BT, mode, prec, chunks=chunks)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dare, daim = torch.empty_like(are), torch.empty_like(aim)
    aux = torch.empty(B * H * NT, 6, BT, device=q.device, dtype=torch.float32)
    cfg = _cfg("bwd_dqk", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_dqk[(NT, B * H)](q, k, v, do, are, aim, h, dh, dq, dk, aux, tab, n, H, NT, K=K, V=V, BT=BT, BK=BK,
                          BV=BV, MODE=mode, PREC=prec, VARLEN=varlen, **_launch(cfg))
    del h  # released once the last kernel reading it is queued (stream-ordered)
    cfg = _cfg("bwd_dv", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_dv[(NT, B * H)](q, k, do, are, aim, dh, dv, tab, n, H, NT,
                         K=K, V=V, BT=BT, BK=BK, BV=BV, MODE=mode, PREC=prec, VARLEN=varlen, **_launch(cfg))
    del dh
    cfg = _cfg("bwd_gate", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_gate[(NT, B * H)](q, k, v, do, are, aim, dare, daim, aux, tab, n, H, NT,
                           K=K, V=V, BT=BT, BK=BK, BV=BV, MODE=mode, PREC=prec,
                           EXACT_R=mode == 0 and prec != "tf32", VARLEN=varlen, **_launch(cfg))
    return dq, dk, dv, dare, daim, dh0


# ----------------------------------------------------------------------------- custom ops (torch.compile)
# All-real schemas: states travel as stacked (Re, Im) float32 planes (S, H, 2, d, e), S the batch or (packed batch)
# the sequences; an absent final state / initial-state gradient is an empty tensor. A packed batch passes its
# ``cu_seqlens`` (for N only: the kernels read ``chunks``, its chunk table). Eager calls run the same
# implementations through an autograd.Function (see ``_custom_op.py``).

def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, are: Tensor, aim: Tensor, h0: Optional[Tensor],
              output_final_state: bool, prec: str, BT: int, cu_seqlens: Optional[Tensor] = None,
              chunks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    B, n, H, K = q.shape
    V = v.shape[-1]
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if cu_seqlens is not None and B != 1:  # (e.g. a vmap folding its dim into the batch)
        raise ValueError(f"cu_seqlens: a packed batch has B = 1, got q of shape {tuple(q.shape)}")
    o, ht = _forward(q, k, v, are, aim, h0, output_final_state, BT, _MODE[q.dtype], prec, chunks, S)
    ht = ht.view(S, H, 2, K, V) if ht is not None else q.new_empty(0, dtype=torch.float32)
    return o, ht


def _fwd_fake(q, k, v, are, aim, h0, output_final_state, prec, BT, cu_seqlens=None, chunks=None):
    B, n, H, K = q.shape
    V = v.shape[-1]
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = (S, H, 2, K, V) if output_final_state else (0,)
    return torch.empty_like(v), q.new_empty(shape, dtype=torch.float32)


def _bwd_impl(q: Tensor, k: Tensor, v: Tensor, are: Tensor, aim: Tensor, h0: Optional[Tensor], do: Tensor,
              dht: Optional[Tensor], prec: str, BT: int, chunks: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    H, K, V = q.shape[2], q.shape[3], v.shape[-1]
    dq, dk, dv, dare, daim, dh0 = _backward(q, k, v, are, aim, h0, do.contiguous(), dht, BT, _MODE[q.dtype], prec,
                                            chunks)
    dh0 = dh0.view(h0.shape[0], H, 2, K, V) if dh0 is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dare, daim, dh0


def _bwd_fake(q, k, v, are, aim, h0, do, dht, prec, BT, chunks=None):
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(are),
            torch.empty_like(aim), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, are, aim, h0, output_final_state, prec, BT = inputs[:9]
    chunks = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(q, k, v, are, aim, h0, chunks)
    ctx.cfg = (output_final_state, prec, BT, len(inputs))


def _vjp(ctx, backward, do, dht):
    q, k, v, are, aim, h0, chunks = ctx.saved_tensors
    output_final_state, prec, BT, n_inputs = ctx.cfg
    if not output_final_state:
        dht = None
    elif dht is not None:
        dht = dht.to(torch.float32).contiguous()
    dq, dk, dv, dare, daim, dh0 = backward(q, k, v, are, aim, h0, do.to(q.dtype), dht, prec, BT, chunks)
    return (dq, dk, dv, dare, daim, dh0 if h0 is not None else None) + (None,) * (n_inputs - 6)


_chunk_op = DifferentiableOp(("gateloop::chunk_gate_loop_fwd", "gateloop::chunk_gate_loop_bwd"), "ChunkGateLoop",
                             _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _vjp)


def chunk_gate_loop(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    precision: str = "ieee", *, chunk_size: int = _DEFAULT_BT):
    """Chunked gate-loop scan with a complex gate per head (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        q, k: ``(B, n, H, d)``; v: ``(B, n, H, e)``; float32, bfloat16 or float16 (one dtype is used:
            the promoted one), ``16 <= d, e <= 256``.
        a_re, a_im: ``(B, n, H)`` real and imaginary parts of the gate ``a_t`` (computed in float32).
            Zero gates (hard resets) are legal.
        initial_state: optional complex ``(B, H, d, e)`` state before step 0.
        output_final_state: also return the complex ``(B, H, d, e)`` state after the last step.
        precision: float32 dots: ``"ieee"`` (default, exact to float32: runs as 3xTF32, which
            measured ~2e-7 relative per dot on the H100, like FFMA, at 6x the speed), ``"tf32x3"``
            (the same) or ``"tf32"`` (fast opt-in, ~1e-3 relative). 16-bit inputs
            use their own tensor-core dots whatever this says (float32 accumulation).
        chunk_size: steps per chunk (a power of two >= 16; 64 by default).

    Returns:
        ``(o, final_state)``: ``o (B, n, H, e)`` in the input dtype; ``final_state`` complex64
        ``(B, H, d, e)`` or ``None``. Differentiable in q, k, v, a_re, a_im and initial_state.

    Non-finite inputs stay causal: a NaN or Inf in q, k, v or the gate at step t reaches no output before t, nor
    another sequence or head; wherever the exact (sequential) output or gradient is finite, so is ours (up to
    the overflow limitation below).

    Limitation: each chunk forms the scores ``q_t . k_s`` before weighting them by ``v``, so an output that fits
    the dtype can still overflow when ``|q| |k|`` alone exceeds its range (e.g. float32 ``q, k ~ 1e19`` with
    ``v ~ 1e-38``: exact outputs ~40, ours inf; the sequential reference forms ``k v^T`` first). fp16 inputs
    form the scores in float32 (fp16 range only bounds q, k, v and the outputs).
    """
    check_chunk_gate_loop_inputs(q, k, v, a_re, a_im, initial_state, precision, chunk_size)
    return _chunk_gate_loop(q, k, v, a_re, a_im, initial_state, output_final_state, precision, chunk_size)


def _chunk_gate_loop(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor, initial_state: Optional[Tensor],
                     output_final_state: bool, precision: str, chunk_size: int, cu_seqlens: Optional[Tensor] = None):
    """:func:`chunk_gate_loop` on checked arguments (the dispatch's call: the public entries checked them).

    ``cu_seqlens`` (1-D int32/int64 on the inputs' device, ``[0, l_1, ..., T]``, validated by the caller): the
    inputs are one packed batch (``B = 1``, ``T`` steps) of ``N`` sequences, each scanned from its own initial
    state (``initial_state`` complex ``(N, H, d, e)``, zero without) as if alone: ``S = a S0_i + k v^T`` at its
    first step, so that step's gate only multiplies ``S0_i``. The final states are ``(N, H, d, e)``; an empty
    sequence's is its initial state. One launch sequence for the whole batch, no host synchronisation (the
    kernels read the chunk table, :func:`_chunk_table`, on the device)."""
    B, n, H, d = q.shape
    e = v.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in _MODE:
        dtype = torch.float32
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    are, aim = a_re.to(torch.float32).contiguous(), a_im.to(torch.float32).contiguous()
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(torch.complex64)
        h0 = torch.stack([h0.real, h0.imag], dim=2).contiguous()  # (S, H, 2, d, e)
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if n == 0:
        o, ht = empty_scan((B, 0, H, e), (S, H, d, e), dtype, initial_state, q, k, v, a_re, a_im)
        return o, (ht.to(torch.complex64) if output_final_state else None)
    # exact float32: Triton's IEEE (FFMA) dots are ~6x slower than 3xTF32 on Hopper at the same accuracy
    # (measured on the H100: 22 ms vs 3.6 ms forward+backward at (64, 2048, 64)), so "ieee" runs 3xTF32
    prec = "tf32x3" if precision == "ieee" else precision
    args = (q, k, v, are, aim, h0, output_final_state, prec, chunk_size)
    if cu_seqlens is not None:
        args += (cu_seqlens, _chunk_table(cu_seqlens, n, chunk_size))
    o, ht = _chunk_op(*args)
    return o, (torch.complex(ht[:, :, 0], ht[:, :, 1]) if output_final_state else None)
