"""Triton kernels for the elementwise gate loop (head dim ``d = e = 1``) and the simplified operator.

Per channel ``c`` of a ``(B, n, C)`` tensor (any strides; channels contiguous is the fast case):

    forward   h_t = a_t h_{t-1} + x_t,  o_t = q_t Re(h_t),  x_t = k_t v_t (or ``kv_t`` given)
    backward  lam_t = conj(a_{t+1}) lam_{t+1} + q_t do_t  (lam_{n-1} also gets dL/dh_{n-1})
              dq_t = Re(h_t) do_t, dk_t = Re(lam_t) v_t, dv_t = Re(lam_t) k_t (dkv_t = Re(lam_t)),
              da_t = lam_t conj(h_{t-1}),  dh_{-1} = conj(a_0) lam_0

with a complex gate ``a = a_re + i a_im`` (``a_im = None``: a real gate) and an optional initial
state ``h_{-1}``. The state and all arithmetic are float32 whatever the input dtype.

Algorithm: one pass over the data. The grid is ``segments x batch x channel blocks``; each
program loads one ``(BLOCK_T, BLOCK_C)`` tile, scans it locally (``tl.associative_scan`` over
complex affine maps ``h -> a h + x``), publishes the tile's aggregate map, then finds the state
entering its tile by a *decoupled look-back* over the previous segments' published aggregates and
inclusive states, publishes its own inclusive state, and writes its outputs. Programs take
segments in order from an atomic ticket, so a program only ever waits for programs that are
already running (no deadlock). Published floats go in pairs into 64-bit words that a zeroed word
cannot be mistaken for (``_pack``), so a reader that sees a word written sees its values: no fences.
The backward runs the same look-back in reverse time for ``lam``; it recomputes ``h`` per tile
from the states the forward saved after every backward tile (``carries``: float32, ``2 B C`` per
backward tile of ``CARRY_T`` steps).

Layout: with 32 channels or more, each thread holds one channel's ``BLOCK_T`` steps of a tile and a
warp 32 neighbouring channels (coalesced, not vectorized), so the tile scans, the row extractions, the
reverse scan's flips and the backward's one-step shifts (``_shift``: the gate one step ahead, the state
one step behind) stay in registers: no shared memory or shuffles but the look-back's checks, and each
input is loaded once.

Packed sequences (``cu_seqlens``, ``B = 1``, the ``VARLEN`` specialization; the others compile as without it):
a sequence's first step ``t`` runs ``h_t = a_t h0_i + x_t`` from its own initial state (zero without; its gate is
then not read), its last step writes the final state ``i``, and the adjoint restarts there from that state's
gradient. Each tile finds its rows' sequences from ``cu_seqlens`` itself (``_sequences``: a bisection, then one
read per boundary in the tile); a boundary is a select in the tile scans (``_combine_reset``), not a zero gate, so
nothing crosses it, not a NaN either; a tile holding a boundary publishes its inclusive state at once, and one
whose first step starts a sequence (backward: whose last ends one) takes no look-back.

Results are not bitwise reproducible run to run: a tile's entering state is built from whatever its
predecessors have published when it looks (an inclusive state, or aggregates to fold first), so its
rounding depends on timing, as in CUB's decoupled look-back scans. Every path is exact up to float32
rounding. Under ``torch.use_deterministic_algorithms(True)`` no aggregates are published, so the
look-back never folds: each tile waits for its predecessor's inclusive state, one rounding path, bitwise
reproducible (and slower: the tiles of a channel block publish their states one after another).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._custom_op import DifferentiableOp

__all__ = ["scan_forward", "scan_backward", "tile_config"]


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _combine(ar1, ai1, hr1, hi1, ar2, ai2, hr2, hi2):
    """Compose the complex affine maps ``h -> a1 h + h1`` then ``h -> a2 h + h2``."""
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * hr1 - ai2 * hi1 + hr2, ar2 * hi1 + ai2 * hr1 + hi2)


@triton.jit
def _combine_reset(ar1, ai1, hr1, hi1, r1, ar2, ai2, hr2, hi2, r2):
    """:func:`_combine` for maps that may reset (``r = 1``: ``h -> h2``, the state before is dropped). A select,
    not a zero gate, so not even a NaN or Inf crosses a sequence boundary; a reset map's ``a`` is never used."""
    ar, ai, hr, hi = _combine(ar1, ai1, hr1, hi1, ar2, ai2, hr2, hi2)
    keep = r2 != 0
    return (tl.where(keep, ar2, ar), tl.where(keep, ai2, ai), tl.where(keep, hr2, hr), tl.where(keep, hi2, hi),
            tl.maximum(r1, r2))


@triton.jit
def _scan_reverse_reset(ar, ai, xr, xi, r):
    """:func:`_scan_reverse` of resetting maps (complex ``x``, resets ``r``): ``(A_r, A_i, H_r, H_i)``."""
    A_r, A_i, H_r, H_i, _ = tl.associative_scan((tl.flip(ar, 0), tl.flip(ai, 0), tl.flip(xr, 0), tl.flip(xi, 0),
                                                 tl.flip(r, 0)), 0, _combine_reset)
    return tl.flip(A_r, 0), tl.flip(A_i, 0), tl.flip(H_r, 0), tl.flip(H_i, 0)


@triton.jit
def _apply(A_r, A_i, H_r, H_i, reset, car_r, car_i):
    """Composed maps ``(A, H)`` applied to the ``(BLOCK_C,)`` state ``car``, but for the rows where ``reset``
    (``(BLOCK_T,)``: their map drops the state): ``(h_r, h_i)``."""
    h_r = H_r + A_r * car_r[None, :] - A_i * car_i[None, :]
    h_i = H_i + A_r * car_i[None, :] + A_i * car_r[None, :]
    return tl.where(reset[:, None], H_r, h_r), tl.where(reset[:, None], H_i, h_i)


@triton.jit
def _state_off(sq, c, C, BIG: tl.constexpr):
    """Offsets of rows ``sq`` (``(BLOCK_T,)``) and channels ``c`` in a dense ``(N, C)`` state (int32 unless ``BIG``)."""
    return (sq[:, None].to(tl.int64) if BIG else sq[:, None]) * C + c[None, :]


@triton.jit
def _sequences(cu_ptr, NSEQ, NBIS, t0, t, n, BLOCK_T: tl.constexpr):
    """Packed sequences (``cu_seqlens`` at ``cu_ptr``, ``NSEQ + 1`` entries) over the rows ``t`` of the tile
    that starts at step ``t0``: ``(sq, start, last)``, each row's sequence (the last ``i`` with ``cu[i] <= t``:
    empty sequences hold no row) and whether the row is its sequence's first and last step (rows past ``n``:
    neither). A bisection (``NBIS`` reads) finds row 0's sequence, then one read per boundary inside the tile
    or at its end: no table, no host synchronisation."""
    lo = t0 * 0
    hi = lo + NSEQ
    for _ in range(NBIS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid).to(tl.int32) <= t0
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    sq = t * 0 + lo
    start = t == tl.load(cu_ptr + lo).to(tl.int32)
    last = t < 0
    t_end = t0 + BLOCK_T
    j = lo + 1
    cj = tl.load(cu_ptr + tl.minimum(j, NSEQ)).to(tl.int32)
    while (j <= NSEQ) & (cj <= t_end):
        sq += (cj <= t).to(tl.int32)
        start = start | (cj == t)
        last = last | (cj == t + 1)
        j += 1
        cj = tl.load(cu_ptr + tl.minimum(j, NSEQ)).to(tl.int32)
    return sq, start & (t < n), last


@triton.jit
def _scan_reverse(ar, ai, x):
    """Inclusive reverse-time scan of ``h -> a h + x`` (real ``x``) along axis 0: ``(A_r, A_i, H_r, H_i)``.

    Written as flip, forward scan, flip: with a tile's rows inside each thread the flips move no data,
    where ``associative_scan(reverse=True)`` shuffles every component across lanes (Triton 3.6)."""
    A_r, A_i, H_r, H_i = tl.associative_scan((tl.flip(ar, 0), tl.flip(ai, 0), tl.flip(x, 0), tl.zeros_like(x)),
                                             0, _combine)
    return tl.flip(A_r, 0), tl.flip(A_i, 0), tl.flip(H_r, 0), tl.flip(H_i, 0)


@triton.jit
def _shift(x, rows, D: tl.constexpr, fill, BLOCK_T: tl.constexpr):
    """Row ``r`` of the result is row ``r - D`` of the ``(BLOCK_T, BLOCK_C)`` tile ``x`` (``D = 1``: down a
    step, ``-1``: up); the row shifted in from outside the tile is ``fill`` (``(BLOCK_C,)``). A select-sum
    over rows: with a tile's rows inside each thread it compiles to register moves (and one add a row)."""
    src = rows - D
    y = tl.sum(tl.where(src[:, None, None] == rows[None, :, None], x[None, :, :], -0.0), axis=1)
    return tl.where(((src < 0) | (src >= BLOCK_T))[:, None], fill[None, :], y)


@triton.jit
def _pack(lo, hi):
    """Two float32 -> one int64 word: ``hi``'s bits, then ``lo``'s bits plus one (mod 2^32), so a zeroed
    word reads as unwritten and every written one as written (NaNs are made canonical first: 0xFFFFFFFF,
    the one pattern that would wrap to zero, is a NaN). One store: a reader sees both values or none."""
    lo = tl.where(lo == lo, lo, float("nan"))
    lo_bits = (lo.to(tl.uint32, bitcast=True) + 1).to(tl.int64) & 0xFFFFFFFF
    return (hi.to(tl.uint32, bitcast=True).to(tl.int64) << 32) | lo_bits


@triton.jit
def _unpack(w):
    lo = ((w & 0xFFFFFFFF) - 1).to(tl.uint32).to(tl.float32, bitcast=True)
    return lo, (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _written(w):
    return (w & 0xFFFFFFFF) != 0


@triton.jit
def _row(x, rows, r):
    """Row ``r`` of a ``(BLOCK_T, BLOCK_C)`` tile as a ``(BLOCK_C,)`` vector."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), axis=0)


@triton.jit
def _publish(buf_ptr, sidx, mc, r0, r1, r2, r3, WORDS: tl.constexpr):
    """``(r0, r1)`` as word ``sidx * WORDS``, and ``(r2, r3)`` after it when ``WORDS == 2``."""
    tl.store(buf_ptr + sidx * WORDS, _pack(r0, r1), mask=mc)
    if WORDS == 2:
        tl.store(buf_ptr + sidx * WORDS + 1, _pack(r2, r3), mask=mc)


@triton.jit
def _tile(seg, rem, c0, n, C, NCB, s_b, s_n, s_c, g_b, g_n, g_c,
          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BIG: tl.constexpr):
    """Indices of the tile of segment ``seg`` and ``rem = batch * NCB + channel block``: ``(b, rows,
    t, c, mc, m, off, goff, boff, gboff)``: in-batch offsets of the tile in the q-like and the gate
    tensors (int32 unless ``BIG``), and the batch offsets to add to their pointers. ``c0`` is always 0, an
    argument the compiler does not specialize on: the channels' alignment is unknown, so loads are not
    vectorized along them and a thread keeps one channel's rows (module docstring)."""
    b = rem // NCB
    cb = rem % NCB
    rows = tl.arange(0, BLOCK_T)
    t = seg * BLOCK_T + rows
    c = c0 + cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    m = (t < n)[:, None] & mc[None, :]
    tt = t[:, None].to(tl.int64) if BIG else t[:, None]
    off = tt * s_n + c[None, :] * s_c
    goff = tt * g_n + c[None, :] * g_c
    return b, rows, t, c, mc, m, off, goff, b.to(tl.int64) * s_b, b.to(tl.int64) * g_b


@triton.jit
def _out_tile(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED: tl.constexpr, BIG: tl.constexpr):
    """``(in-batch offsets, batch offset)`` of the tile in the outputs: the inputs' own unless the outputs
    have other strides (``OUT_STRIDED``: inputs expanded or sliced, outputs always dense)."""
    ooff = off
    oboff = boff
    if OUT_STRIDED:
        tt = t[:, None].to(tl.int64) if BIG else t[:, None]
        ooff = tt * o_n + c[None, :] * o_c
        oboff = b.to(tl.int64) * o_b
    return ooff, oboff


@triton.jit
def _lookback(agg_ptr, inc_ptr, seg, step, stop, b, B, C, c, mc, init_r, init_i, BLOCK_C: tl.constexpr):
    """State entering segment ``seg`` (complex ``(BLOCK_C,)`` pair).

    Walks ``j = seg - step, seg - 2 step, ...`` until a segment's inclusive state is published,
    folding in the aggregates published on the way (spinning while neither is there). Reaching
    ``stop`` means the walk passed the first segment: the state there is ``init``. Where no aggregates
    are published (the kernels' ``DETERMINISTIC``), it waits for the previous segment's inclusive state.
    """
    j = seg - step
    found = j * 0
    acc_ar = tl.full([BLOCK_C], 1.0, tl.float32)
    acc_ai = tl.zeros([BLOCK_C], tl.float32)
    acc_hr = tl.zeros([BLOCK_C], tl.float32)
    acc_hi = tl.zeros([BLOCK_C], tl.float32)
    car_r = tl.zeros([BLOCK_C], tl.float32)
    car_i = tl.zeros([BLOCK_C], tl.float32)
    while (j != stop) & (found == 0):
        sidx = (j * B + b).to(tl.int64) * C + c
        w = tl.load(inc_ptr + sidx, mask=mc, other=1, volatile=True)
        u0 = tl.load(agg_ptr + sidx * 2, mask=mc, other=1, volatile=True)
        u1 = tl.load(agg_ptr + sidx * 2 + 1, mask=mc, other=1, volatile=True)
        inc_ok = tl.min(_written(w).to(tl.int32), axis=0) == 1
        agg_ok = tl.min((_written(u0) & _written(u1)).to(tl.int32), axis=0) == 1
        take_agg = agg_ok & (inc_ok == 0)
        hr, hi = _unpack(w)
        ur, ui = _unpack(u0)
        vr, vi = _unpack(u1)
        ar, ai, xr, xi = _combine(ur, ui, vr, vi, acc_ar, acc_ai, acc_hr, acc_hi)
        car_r = tl.where(inc_ok, acc_ar * hr - acc_ai * hi + acc_hr, car_r)
        car_i = tl.where(inc_ok, acc_ar * hi + acc_ai * hr + acc_hi, car_i)
        acc_ar = tl.where(take_agg, ar, acc_ar)
        acc_ai = tl.where(take_agg, ai, acc_ai)
        acc_hr = tl.where(take_agg, xr, acc_hr)
        acc_hi = tl.where(take_agg, xi, acc_hi)
        j = tl.where(take_agg, j - step, j)
        found = tl.where(inc_ok, 1, found)
    car_r = tl.where(found == 1, car_r, acc_ar * init_r - acc_ai * init_i + acc_hr)
    car_i = tl.where(found == 1, car_i, acc_ar * init_i + acc_ai * init_r + acc_hi)
    return car_r, car_i


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["c0"])
def _fwd_kernel(q_ptr, k_ptr, v_ptr, ar_ptr, ai_ptr, h0r_ptr, h0i_ptr,
                o_ptr, hTr_ptr, hTi_ptr, car_ptr, ws_ptr, agg_off, ticket_off, c0, cu_ptr, NSEQ, NBIS,
                n, B, C, NCB, NSEG, NCAR,
                s_b, s_n, s_c, g_b, g_n, g_c, o_b, o_n, o_c,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CARRY_T: tl.constexpr,
                COMPLEX: tl.constexpr, KV_GIVEN: tl.constexpr, HAS_H0: tl.constexpr, BIG: tl.constexpr,
                DETERMINISTIC: tl.constexpr, OUT_STRIDED: tl.constexpr, VARLEN: tl.constexpr):
    # ws: the look-back words laid out by _workspace
    inc_ptr = ws_ptr
    agg_ptr = ws_ptr + agg_off
    vid = tl.atomic_add(ws_ptr + ticket_off, 1).to(tl.int32)
    seg = vid // (B * NCB)
    b, rows, t, c, mc, m, off, goff, boff, gboff = _tile(seg, vid % (B * NCB), c0, n, C, NCB, s_b, s_n, s_c,
                                                         g_b, g_n, g_c, BLOCK_T, BLOCK_C, BIG)
    ooff, oboff = _out_tile(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED, BIG)
    q_ptr += boff
    k_ptr += boff
    v_ptr += boff
    o_ptr += oboff
    ar_ptr += gboff
    ai_ptr += gboff

    x = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
    if not KV_GIVEN:
        x = x * tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    ar = tl.load(ar_ptr + goff, mask=m, other=1.0).to(tl.float32)
    if COMPLEX:
        ai = tl.load(ai_ptr + goff, mask=m, other=0.0).to(tl.float32)
    else:
        ai = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    if VARLEN:
        # a sequence's first step resets the state to a_t h0_i + x_t (its own initial state, zero without)
        sq, st, fin = _sequences(cu_ptr, NSEQ, NBIS, seg * BLOCK_T, t, n, BLOCK_T)
        x_i = tl.zeros_like(x)
        if HAS_H0:
            sm = st[:, None] & mc[None, :]
            s0r = tl.load(h0r_ptr + _state_off(sq, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            s0i = tl.zeros_like(x)
            if COMPLEX:
                s0i = tl.load(h0i_ptr + _state_off(sq, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            x_i = tl.where(sm, ar * s0i + ai * s0r, 0.0)
            x = tl.where(sm, x + ar * s0r - ai * s0i, x)
        A_r, A_i, H_r, H_i, _ = tl.associative_scan(
            (ar, ai, x, x_i, tl.broadcast_to(st[:, None].to(tl.float32), [BLOCK_T, BLOCK_C])), 0, _combine_reset)
        # rows from the tile's first start on drop the carry (BLOCK_T: no start); recomputed, not kept from the scan
        first_start = tl.min(tl.where(st, rows, BLOCK_T), axis=0)
    else:
        A_r, A_i, H_r, H_i = tl.associative_scan((ar, ai, x, tl.zeros_like(x)), 0, _combine)

    last = BLOCK_T - 1
    Ar_l, Ai_l, Hr_l, Hi_l = _row(A_r, rows, last), _row(A_i, rows, last), _row(H_r, rows, last), _row(H_i, rows, last)
    sidx = (seg * B + b).to(tl.int64) * C + c
    if VARLEN:
        # a tile holding a sequence start knows its inclusive state without the carry: published at once,
        # so no later tile waits for (or folds across) this one's look-back
        reset = (c * 0 + first_start) < BLOCK_T  # per channel: the interpreter's masks are vectors
        _publish(inc_ptr, sidx, mc & reset, Hr_l, Hi_l, Hr_l, Hi_l, 1)
        if not DETERMINISTIC:
            _publish(agg_ptr, sidx, mc & ((c * 0 + seg) > 0) & ~reset, Ar_l, Ai_l, Hr_l, Hi_l, 2)
        # only the rows before the tile's first start take the carry: no look-back when step 0 starts one
        stop = tl.where(first_start == 0, seg - 1, -1)
    elif not DETERMINISTIC:  # without aggregates the look-back waits for inclusive states: one rounding path
        if seg > 0:
            _publish(agg_ptr, sidx, mc, Ar_l, Ai_l, Hr_l, Hi_l, 2)
    if HAS_H0 and not VARLEN:
        h0r = tl.load(h0r_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        h0i = tl.load(h0i_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(h0r)
    else:
        h0r = tl.zeros([BLOCK_C], tl.float32)
        h0i = tl.zeros([BLOCK_C], tl.float32)
    if VARLEN:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, 1, stop, b, B, C, c, mc, h0r, h0i, BLOCK_C)
    else:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, 1, -1, b, B, C, c, mc, h0r, h0i, BLOCK_C)
    inc_r = Ar_l * car_r - Ai_l * car_i + Hr_l
    inc_i = Ar_l * car_i + Ai_l * car_r + Hi_l
    if VARLEN:
        _publish(inc_ptr, sidx, mc & ~reset, inc_r, inc_i, inc_r, inc_i, 1)
    else:
        _publish(inc_ptr, sidx, mc, inc_r, inc_i, inc_r, inc_i, 1)
        if seg == NSEG - 1:
            tl.store(hTr_ptr + b * C + c, inc_r, mask=mc)
            if COMPLEX:
                tl.store(hTi_ptr + b * C + c, inc_i, mask=mc)
    # the state after every CARRY_T steps, for the backward (whose tiles are CARRY_T steps long)
    for j in tl.static_range(BLOCK_T // CARRY_T):
        r = (j + 1) * CARRY_T - 1
        Ar_j, Ai_j = _row(A_r, rows, r), _row(A_i, rows, r)
        sb = seg * (BLOCK_T // CARRY_T) + j
        cidx = (sb * 2 * B + b).to(tl.int64) * C + c
        ok = mc & ((c * 0 + sb) < NCAR)
        if VARLEN:
            reset_j = (c * 0 + r) >= first_start
            Hr_j, Hi_j = _row(H_r, rows, r), _row(H_i, rows, r)
            tl.store(car_ptr + cidx, tl.where(reset_j, Hr_j, Ar_j * car_r - Ai_j * car_i + Hr_j), mask=ok)
            tl.store(car_ptr + cidx + B * C, tl.where(reset_j, Hi_j, Ar_j * car_i + Ai_j * car_r + Hi_j), mask=ok)
        else:
            tl.store(car_ptr + cidx, Ar_j * car_r - Ai_j * car_i + _row(H_r, rows, r), mask=ok)
            tl.store(car_ptr + cidx + B * C, Ar_j * car_i + Ai_j * car_r + _row(H_i, rows, r), mask=ok)

    if VARLEN:
        h_r, h_i = _apply(A_r, A_i, H_r, H_i, rows >= first_start, car_r, car_i)
        # each sequence's last step is its final state (empty sequences keep the launcher's initial state)
        fm = fin[:, None] & mc[None, :]
        tl.store(hTr_ptr + _state_off(sq, c, C, BIG), h_r, mask=fm)
        if COMPLEX:
            tl.store(hTi_ptr + _state_off(sq, c, C, BIG), h_i, mask=fm)
    else:
        h_r = H_r + A_r * car_r[None, :] - A_i * car_i[None, :]
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + ooff, (q * h_r).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["c0"])
def _bwd_kernel(do_ptr, gTr_ptr, gTi_ptr, q_ptr, k_ptr, v_ptr, ar_ptr, ai_ptr, h0r_ptr, h0i_ptr, car_ptr,
                dq_ptr, dk_ptr, dv_ptr, dar_ptr, dai_ptr, dh0r_ptr, dh0i_ptr, ws_ptr, agg_off, ticket_off, c0,
                cu_ptr, NSEQ, NBIS, n, B, C, NCB, NSEG,
                s_b, s_n, s_c, g_b, g_n, g_c, o_b, o_n, o_c,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                COMPLEX: tl.constexpr, KV_GIVEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_GT: tl.constexpr,
                BIG: tl.constexpr, DETERMINISTIC: tl.constexpr, OUT_STRIDED: tl.constexpr, VARLEN: tl.constexpr):
    # ws: the look-back words laid out by _workspace
    inc_ptr = ws_ptr
    agg_ptr = ws_ptr + agg_off
    vid = tl.atomic_add(ws_ptr + ticket_off, 1).to(tl.int32)
    seg = NSEG - 1 - vid // (B * NCB)
    b, rows, t, c, mc, m, off, goff, boff, gboff = _tile(seg, vid % (B * NCB), c0, n, C, NCB, s_b, s_n, s_c,
                                                         g_b, g_n, g_c, BLOCK_T, BLOCK_C, BIG)
    ooff, oboff = _out_tile(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED, BIG)
    do_ptr += boff
    q_ptr += boff
    k_ptr += boff
    v_ptr += boff
    dq_ptr += oboff
    dk_ptr += oboff
    dv_ptr += oboff
    dar_ptr += oboff
    dai_ptr += oboff
    ar_ptr += gboff
    ai_ptr += gboff

    # reverse adjoint: lam_t = b_t lam_{t+1} + g_t with b_t = conj(a_{t+1}) (1 past the end): the tile's
    # gate shifted up a step, the last row from the step after the tile
    a_r = tl.load(ar_ptr + goff, mask=m, other=1.0).to(tl.float32)
    if COMPLEX:
        a_i = tl.load(ai_ptr + goff, mask=m, other=0.0).to(tl.float32)
    else:
        a_i = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    tn = seg * BLOCK_T + BLOCK_T
    mn = mc & ((c * 0 + tn) < n)
    noff = (tn.to(tl.int64) if BIG else tn) * g_n + c * g_c
    br = _shift(a_r, rows, -1, tl.load(ar_ptr + noff, mask=mn, other=1.0).to(tl.float32), BLOCK_T)
    if COMPLEX:
        bi = -_shift(a_i, rows, -1, tl.load(ai_ptr + noff, mask=mn, other=0.0).to(tl.float32), BLOCK_T)
    else:
        bi = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    do = tl.load(do_ptr + off, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = q * do
    if VARLEN:
        # a sequence's last step resets the adjoint to q do + its final state's gradient
        sq, st, fin = _sequences(cu_ptr, NSEQ, NBIS, seg * BLOCK_T, t, n, BLOCK_T)
        opens = tl.where(st, sq, -1)  # the sequence a row starts (-1: none): one vector kept for later, not two
        g_i = tl.zeros_like(g)
        if HAS_GT:
            fm = fin[:, None] & mc[None, :]
            g += tl.load(gTr_ptr + _state_off(sq, c, C, BIG), mask=fm, other=0.0).to(tl.float32)
            if COMPLEX:
                g_i = tl.load(gTi_ptr + _state_off(sq, c, C, BIG), mask=fm, other=0.0).to(tl.float32)
        B_r, B_i, L_r, L_i = _scan_reverse_reset(
            br, bi, g, g_i, tl.broadcast_to(fin[:, None].to(tl.float32), [BLOCK_T, BLOCK_C]))
        # rows up to the tile's last sequence end drop the carry (-1: no end in the tile)
        last_end = tl.max(tl.where(fin, rows, -1), axis=0)
    else:
        B_r, B_i, L_r, L_i = _scan_reverse(br, bi, g)
    Br_0, Bi_0, Lr_0, Li_0 = _row(B_r, rows, 0), _row(B_i, rows, 0), _row(L_r, rows, 0), _row(L_i, rows, 0)
    sidx = (seg * B + b).to(tl.int64) * C + c
    if VARLEN:
        # as in the forward: a tile holding a sequence's end publishes its inclusive adjoint at once, and
        # takes no look-back when its last step ends a sequence
        reset = (c * 0 + last_end) >= 0
        _publish(inc_ptr, sidx, mc & reset, Lr_0, Li_0, Lr_0, Li_0, 1)
        if not DETERMINISTIC:
            _publish(agg_ptr, sidx, mc & ((c * 0 + seg) < NSEG - 1) & ~reset, Br_0, Bi_0, Lr_0, Li_0, 2)
        stop = tl.where(last_end == BLOCK_T - 1, seg + 1, NSEG)
    elif not DETERMINISTIC:
        if seg < NSEG - 1:
            _publish(agg_ptr, sidx, mc, Br_0, Bi_0, Lr_0, Li_0, 2)
    if HAS_GT and not VARLEN:
        gTr = tl.load(gTr_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        gTi = tl.load(gTi_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(gTr)
    else:
        gTr = tl.zeros([BLOCK_C], tl.float32)
        gTi = tl.zeros([BLOCK_C], tl.float32)
    if VARLEN:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, -1, stop, b, B, C, c, mc, gTr, gTi, BLOCK_C)
    else:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, -1, NSEG, b, B, C, c, mc, gTr, gTi, BLOCK_C)
    inc_r = Br_0 * car_r - Bi_0 * car_i + Lr_0
    inc_i = Br_0 * car_i + Bi_0 * car_r + Li_0
    if VARLEN:
        _publish(inc_ptr, sidx, mc & ~reset, inc_r, inc_i, inc_r, inc_i, 1)
        lam_r, lam_i = _apply(B_r, B_i, L_r, L_i, rows <= last_end, car_r, car_i)
    else:
        _publish(inc_ptr, sidx, mc, inc_r, inc_i, inc_r, inc_i, 1)
        lam_r = L_r + B_r * car_r[None, :] - B_i * car_i[None, :]
        lam_i = L_i + B_r * car_i[None, :] + B_i * car_r[None, :]

    # forward state entering the tile: the forward pass's state after segment seg - 1
    if seg > 0:
        pidx = ((seg - 1) * 2 * B + b).to(tl.int64) * C + c
        f_r = tl.load(car_ptr + pidx, mask=mc, other=0.0)
        f_i = tl.load(car_ptr + pidx + B * C, mask=mc, other=0.0)
    elif HAS_H0 and not VARLEN:
        f_r = tl.load(h0r_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        f_i = tl.load(h0i_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(f_r)
    else:
        f_r = tl.zeros([BLOCK_C], tl.float32)
        f_i = tl.zeros([BLOCK_C], tl.float32)
    # h_t inside the tile (the state entering it folded into step 0), and y_t = h_{t-1}: h shifted down
    k = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
    if KV_GIVEN:
        x = k
    else:
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        x = k * v
    first = (rows == 0)[:, None]
    if VARLEN:
        # y_t at a sequence's first step is its initial state (zero without), not the state before it
        st = opens >= 0
        sm = st[:, None] & mc[None, :]
        s0r = tl.zeros_like(x)
        s0i = tl.zeros_like(x)
        if HAS_H0:
            s0r = tl.load(h0r_ptr + _state_off(opens, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            if COMPLEX:
                s0i = tl.load(h0i_ptr + _state_off(opens, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
        y0r = tl.where(st[:, None], s0r, tl.where(first, f_r[None, :], 0.0))
        y0i = tl.where(st[:, None], s0i, tl.where(first, f_i[None, :], 0.0))
        inj = first | st[:, None]
        x_r = tl.where(inj, x + a_r * y0r - a_i * y0i, x)
        x_i = tl.where(inj, a_r * y0i + a_i * y0r, 0.0)
        _, _, h_r, h_i, _ = tl.associative_scan(
            (a_r, a_i, x_r, x_i, tl.broadcast_to(st[:, None].to(tl.float32), [BLOCK_T, BLOCK_C])), 0, _combine_reset)
        y_r = tl.where(st[:, None], y0r, _shift(h_r, rows, 1, f_r, BLOCK_T))
        y_i = tl.where(st[:, None], y0i, _shift(h_i, rows, 1, f_i, BLOCK_T))
    else:
        x_r = tl.where(first, x + a_r * f_r[None, :] - a_i * f_i[None, :], x)
        x_i = tl.where(first, a_r * f_i[None, :] + a_i * f_r[None, :], 0.0)
        _, _, h_r, h_i = tl.associative_scan((a_r, a_i, x_r, x_i), 0, _combine)
        y_r = _shift(h_r, rows, 1, f_r, BLOCK_T)
        y_i = _shift(h_i, rows, 1, f_i, BLOCK_T)
    tl.store(dq_ptr + ooff, (h_r * do).to(dq_ptr.dtype.element_ty), mask=m)
    if KV_GIVEN:
        tl.store(dk_ptr + ooff, lam_r.to(dk_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dk_ptr + ooff, (lam_r * v).to(dk_ptr.dtype.element_ty), mask=m)
        tl.store(dv_ptr + ooff, (lam_r * k).to(dv_ptr.dtype.element_ty), mask=m)
    # da_t = lam_t conj(y_t); gate gradients are stored in the outputs' layout
    tl.store(dar_ptr + ooff, (lam_r * y_r + lam_i * y_i).to(dar_ptr.dtype.element_ty), mask=m)
    if COMPLEX:
        tl.store(dai_ptr + ooff, (lam_i * y_r - lam_r * y_i).to(dai_ptr.dtype.element_ty), mask=m)
    if HAS_H0 and VARLEN:
        # dh0_i = conj(a_t) lam_t at sequence i's first step (an empty sequence's: the launcher's copy of its gT)
        tl.store(dh0r_ptr + _state_off(opens, c, C, BIG), a_r * lam_r + a_i * lam_i, mask=sm)
        if COMPLEX:
            tl.store(dh0i_ptr + _state_off(opens, c, C, BIG), a_r * lam_i - a_i * lam_r, mask=sm)
    elif HAS_H0:
        if seg == 0:
            # dh0 = conj(a_0) lam_0
            a0r, a0i = _row(a_r, rows, 0), _row(a_i, rows, 0)
            l0r, l0i = _row(lam_r, rows, 0), _row(lam_i, rows, 0)
            tl.store(dh0r_ptr + b * C + c, a0r * l0r + a0i * l0i, mask=mc)
            if COMPLEX:
                tl.store(dh0i_ptr + b * C + c, a0r * l0i - a0i * l0r, mask=mc)


# ----------------------------------------------------------------------------- launchers

#: ``(BLOCK_T, BLOCK_C, num_warps)`` of the forward and of the backward where a batch has 32 channels
#: or more (at most one warp per 32 channels of the tile). Each thread holds one channel's ``BLOCK_T``
#: steps, so a tile's scans run in registers. The
#: backward's tiles may be shorter than the forward's (the forward saves its state every backward tile):
#: 16 steps take 184 registers; 32 spill 384 B and, on the H200 at (4096, 2048), were 3% faster in
#: float32 (``python -m bench scan --sweep``) but took 0.255 ms in bfloat16, against 0.177 for the
#: previous 16-step backward (not explained yet).
WIDE_FWD, WIDE_BWD = (32, 64, 2), (16, 64, 2)
#: both passes with fewer channels: tiles of up to 64 steps and 16 channels, one warp (the lanes that the
#: channels leave run along time), at most 16 steps per thread (32-step tiles at 16 channels).
NARROW = (64, 16, 1)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def tile_config(n: int, C: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_C, num_warps)`` for a ``(B, n, C)`` problem, forward or backward.

    The backward's ``BLOCK_T`` divides the forward's: the forward saves its state after every backward
    tile (``carries``). Deterministic in its arguments (the fake implementations use it).
    """
    block_t, block_c, warps = (WIDE_BWD if backward else WIDE_FWD) if C >= 32 else NARROW
    block_c = min(block_c, _pow2(C))
    if C < 32:
        block_t = min(block_t, 16 * 32 * warps // block_c)
    else:  # warps only along the channels: a warp along time would put the scans in shared memory
        warps = min(warps, block_c // 32)
    return min(block_t, max(16, _pow2(n))), block_c, warps


def _big(*ts: Tensor) -> bool:
    """Whether an in-batch offset (time and channel strides, one step past the end) may pass int32."""
    return any((t.shape[1] + 1) * abs(t.stride(1)) + t.shape[2] * abs(t.stride(2)) >= 2 ** 31 for t in ts)


def _segments(n: int, block_t: int) -> int:
    return max(1, -(-n // block_t))


def _workspace(nseg: int, B: int, C: int, device: torch.device) -> tuple[Tensor, int, int]:
    """A kernel's zeroed look-back words and its offsets ``(ws, agg_off, ticket_off)``: inclusive states
    (1 word per channel and segment) from 0, aggregates (2) from ``agg_off``, the ticket at ``ticket_off``."""
    words = nseg * B * C
    return torch.zeros(3 * words + 1, dtype=torch.int64, device=device), words, 3 * words


def carries_numel(B: int, n: int, C: int, carry_t: Optional[int] = None) -> int:
    """Number of float32 of the forward's ``carries`` (the state after every ``carry_t`` steps, real and
    imaginary planes; ``carry_t`` defaults to the backward's ``BLOCK_T``)."""
    carry_t = carry_t or tile_config(n, C, backward=True)[0]
    return _segments(n, carry_t) * 2 * B * C


def _strided_like(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` with the strides of ``ref`` (a copy only where they differ; ``ref`` must not overlap)."""
    if x.stride() == ref.stride():
        return x
    return torch.empty_strided(ref.shape, ref.stride(), dtype=x.dtype, device=x.device).copy_(x)


def _overlaps(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (expanded, stride 0): dims sorted by stride must each
    step past everything the smaller ones reach. Conservative: an exotic ``as_strided`` view may count."""
    reach = 0
    for st, sz in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if st <= reach:
            return True
        reach += st * (sz - 1)
    return False


def _one_layout(*ts: Optional[Tensor]) -> list[Optional[Tensor]]:
    """``ts`` (one shape) with one stride set, the kernel reads them with: the first's, copies only where
    strides differ. Where a copy is needed and the first overlaps (it is expanded), it is made dense first."""
    ref = ts[0]
    if any(t is not None and t.stride() != ref.stride() for t in ts[1:]) and _overlaps(ref):
        ref = torch.empty_like(ref).copy_(ref)
    return [ref] + [None if t is None else _strided_like(t, ref) for t in ts[1:]]


def _out_like(q: Tensor, dtype: torch.dtype) -> Tensor:
    """A kernel output of ``q``'s shape: ``q``'s strides where ``q`` is dense, else dense in ``q``'s dim
    order; never overlapping, so every element has its own write (an expanded ``q``'s strides would not)."""
    return torch.empty_like(q, dtype=dtype)


def _check(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
           cu_seqlens: Optional[Tensor] = None) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be (B, n, C), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("a_re", a_re), ("a_im", a_im)):
        if t is not None and t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    # cu_seqlens' values are the caller's to check (that would synchronise); its shape and the batch are not
    if cu_seqlens is not None and (cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1 or q.shape[0] != 1):
        raise ValueError(f"cu_seqlens must be 1-D (N + 1,) with q of batch 1, got cu_seqlens "
                         f"{tuple(cu_seqlens.shape)} and q {tuple(q.shape)}")


def _varlen_args(cu_seqlens: Optional[Tensor], dummy: Tensor) -> tuple[Tensor, int, int]:
    """The kernels' ``(cu_ptr, NSEQ, NBIS)``: ``cu_seqlens``, its number of sequences and the bisection's steps
    (``dummy`` and zeros without)."""
    if cu_seqlens is None:
        return dummy, 0, 0
    nseq = cu_seqlens.shape[0] - 1
    return cu_seqlens.contiguous(), nseq, nseq.bit_length()


def scan_forward(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                 h0_re: Optional[Tensor] = None, h0_im: Optional[Tensor] = None,
                 block: Optional[tuple[int, int, int]] = None,
                 carry_t: Optional[int] = None,
                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward elementwise scan on the device of ``q`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        q, k: ``(B, n, C)`` float32/bfloat16/float16 (any strides). ``v``: like ``q``, or ``None``
            when ``k`` already holds ``kv = k v`` (the simplified operator).
        a_re, a_im: the gate's real and imaginary parts ``(B, n, C)`` (any float dtype, any strides);
            ``a_im = None`` for a real gate.
        h0_re, h0_im: optional initial state ``(B, C)`` (``h0_im`` only with a complex gate).
        block: ``(BLOCK_T, BLOCK_C, num_warps)`` override (tests); default :func:`tile_config`.
        carry_t: steps between the saved states, the backward's ``BLOCK_T`` (a power of 2 that divides
            ``BLOCK_T``); default: ``block``'s ``BLOCK_T`` when given, else the backward's :func:`tile_config`.
        cu_seqlens: ``None``, or packed sequences: int32/int64 ``(N + 1,)`` on the inputs' device,
            ``[0, l_1, l_1 + l_2, ..., n]`` (values not checked here), with ``B = 1``; each sequence's state
            starts from its initial state ``h0[i]`` (``(N, C)``; zero without) before its first step.

    Returns:
        ``(o, hT_re, hT_im, carries)``: ``o`` of ``q``'s shape and dtype, dense (``q``'s strides where ``q``
        is dense, else dense in its dim order: ``_out_like``); the final state float32
        ``(B, C)`` (``(N, C)`` per sequence with ``cu_seqlens``: an empty sequence's is its initial state;
        ``hT_im`` empty for a real gate); ``carries`` float32 (:func:`carries_numel`), the
        state after every ``carry_t`` steps, saved for the backward.

    Raises:
        ValueError: shape mismatch, ``cu_seqlens`` not 1-D or with ``B != 1``, or a ``carry_t`` that does not
        divide ``BLOCK_T``.
    """
    _check(q, k, v, a_re, a_im, cu_seqlens)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v = _one_layout(q, k, v)
    a_re, a_im = _one_layout(a_re, a_im)
    complex_gate = a_im is not None
    dev = q.device
    hT_re = torch.empty((nseq, C), dtype=torch.float32, device=dev)
    hT_im = torch.empty((nseq, C) if complex_gate else (0,), dtype=torch.float32, device=dev)
    o = _out_like(q, q.dtype)
    block_t, block_c, warps = block or tile_config(n, C)
    carry_t = carry_t or (block_t if block else tile_config(n, C, backward=True)[0])
    if carry_t > block_t or block_t % carry_t:
        raise ValueError(f"carry_t {carry_t} must divide BLOCK_T {block_t}")
    nseg = _segments(n, block_t)
    carries = torch.empty(carries_numel(B, n, C, carry_t), dtype=torch.float32, device=dev)
    # the initial state is the final one where no step runs: everywhere when n = 0, for empty packed sequences
    if n == 0 or B * C == 0 or cu_seqlens is not None:
        if h0_re is not None:
            hT_re.copy_(h0_re)
            if complex_gate:
                hT_im.copy_(h0_im)
        else:
            hT_re.zero_()
            hT_im.zero_()
    if n == 0 or B * C == 0:
        return o, hT_re, hT_im, carries
    ncb = -(-C // block_c)
    h0r = h0_re.contiguous() if h0_re is not None else hT_re
    h0i = h0_im.contiguous() if (h0_im is not None and complex_gate) else hT_re
    ws, agg_off, ticket_off = _workspace(nseg, B, C, dev)
    # c0 = 0 is a kernel argument the compiler does not specialize on: the channel offsets' alignment is
    # unknown, so loads are not vectorized along the channels and each thread keeps one channel's steps
    _fwd_kernel[(nseg * B * ncb,)](
        q, k, v if v is not None else k, a_re, a_im if complex_gate else a_re, h0r, h0i,
        o, hT_re, hT_im if complex_gate else hT_re, carries, ws, agg_off, ticket_off, 0,
        *_varlen_args(cu_seqlens, ws), n, B, C, ncb, nseg, _segments(n, carry_t), *q.stride(), *a_re.stride(),
        *o.stride(), BLOCK_T=block_t, BLOCK_C=block_c, CARRY_T=carry_t, COMPLEX=complex_gate, KV_GIVEN=v is None,
        HAS_H0=h0_re is not None, BIG=_big(q, a_re, o) or (cu_seqlens is not None and nseq * C >= 2 ** 31), DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
        OUT_STRIDED=o.stride() != q.stride(), VARLEN=cu_seqlens is not None, num_warps=warps)
    return o, hT_re, hT_im, carries


def scan_backward(do: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], q: Tensor, k: Tensor,
                  v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor], h0_re: Optional[Tensor],
                  h0_im: Optional[Tensor], carries: Tensor, block: Optional[tuple[int, int, int]] = None,
                  cu_seqlens: Optional[Tensor] = None):
    """Backward of :func:`scan_forward` (same arguments, plus the output and final-state gradients).

    ``do``: ``(B, n, C)``, gradient of ``o``; ``dhT_re/dhT_im``: ``(B, C)`` (``(N, C)`` with ``cu_seqlens``)
    gradient of the final state (``None``: zero); ``carries``: from :func:`scan_forward`; ``block``: as
    there, with ``BLOCK_T`` equal to the forward's ``carry_t``.

    Returns:
        ``(dq, dk, dv, da_re, da_im, dh0_re, dh0_im)``: ``dq, dk, dv`` dense as ``o`` is (``dv`` is
        ``None`` when ``v`` is), gate gradients in the gate's dtype (``da_im`` ``None`` for a real
        gate), ``dh0_*`` float32 of the initial state's shape or ``None`` without an initial state.
    """
    _check(q, k, v, a_re, a_im, cu_seqlens)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dev = q.device
    complex_gate = a_im is not None
    q, k, v, do = _one_layout(q, k, v, do)
    a_re, a_im = _one_layout(a_re, a_im)
    dq, dk = _out_like(q, q.dtype), _out_like(q, k.dtype)
    dv = _out_like(q, v.dtype) if v is not None else None
    da_re = _out_like(q, a_re.dtype)
    da_im = _out_like(q, a_im.dtype) if complex_gate else None
    has_h0 = h0_re is not None
    dh0_re = torch.empty((nseq, C), dtype=torch.float32, device=dev) if has_h0 else None
    dh0_im = torch.empty((nseq, C), dtype=torch.float32, device=dev) if (has_h0 and complex_gate) else None
    # where no step runs the initial state's gradient is the final one's (n = 0, empty packed sequences)
    if n == 0 or B * C == 0 or cu_seqlens is not None:
        for dh0, dhT in ((dh0_re, dhT_re), (dh0_im, dhT_im)):
            if dh0 is not None:
                dh0.copy_(dhT) if dhT is not None else dh0.zero_()
    if n == 0 or B * C == 0:
        return dq, dk, dv, da_re, da_im, dh0_re, dh0_im
    block_t, block_c, warps = block or tile_config(n, C, backward=True)
    nseg = _segments(n, block_t)
    ncb = -(-C // block_c)
    ws, agg_off, ticket_off = _workspace(nseg, B, C, dev)
    dummy = dh0_re if has_h0 else da_re
    # either part of the final-state gradient may be absent (zero); the kernel takes both or neither
    has_gt = dhT_re is not None or (complex_gate and dhT_im is not None)
    gTr = (dhT_re.contiguous() if dhT_re is not None else torch.zeros_like(dhT_im)) if has_gt else dummy
    gTi = (dhT_im.contiguous() if dhT_im is not None else torch.zeros_like(gTr)) if (has_gt and complex_gate) else gTr
    _bwd_kernel[(nseg * B * ncb,)](
        do, gTr, gTi, q, k, v if v is not None else k, a_re, a_im if complex_gate else a_re,
        h0_re.contiguous() if has_h0 else dummy,
        h0_im.contiguous() if (has_h0 and complex_gate) else dummy, carries,
        dq, dk, dv if dv is not None else dk, da_re, da_im if complex_gate else da_re,
        dh0_re if has_h0 else dummy, dh0_im if (has_h0 and complex_gate) else dummy,
        ws, agg_off, ticket_off, 0, *_varlen_args(cu_seqlens, ws),
        n, B, C, ncb, nseg, *q.stride(), *a_re.stride(), *dq.stride(),
        BLOCK_T=block_t, BLOCK_C=block_c, COMPLEX=complex_gate, KV_GIVEN=v is None,
        HAS_H0=has_h0, HAS_GT=has_gt, BIG=_big(q, a_re, dq) or (cu_seqlens is not None and nseq * C >= 2 ** 31), DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
        OUT_STRIDED=dq.stride() != q.stride(), VARLEN=cu_seqlens is not None, num_warps=warps)
    return dq, dk, dv, da_re, da_im, dh0_re, dh0_im


# ----------------------------------------------------------------------------- custom ops

def _packed_rows(cu_seqlens: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per step of a packed batch: ``(seq, start, last)``, its sequence (the last ``i`` with ``cu[i] <= t``: empty
    sequences hold no step) and whether it is that sequence's first and last step; on the device, no sync."""
    pos = torch.arange(n, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens, pos, right=True) - 1
    return seq, cu_seqlens[seq] == pos, cu_seqlens[seq + 1] == pos + 1


def _segmented_scan(a: Tensor, x: Tensor, reset: Tensor, chunk: int = 64) -> Tensor:
    """``h_t = x_t`` where ``reset_t`` (``(n,)`` bool), else ``a_t h_{t-1} + x_t``, from ``h_{-1} = 0``, along dim 1
    of ``(B, n, D)``. Chunked like ``reference.diagonal_scan_chunked`` (steps within chunks, then the carries over
    chunk ends), with the resets as selects: nothing crosses one, not even a NaN or Inf."""
    B, n, D = x.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n
    ac = torch.cat([a, a.new_ones(B, pad, D)], 1).reshape(B, nc, chunk, D)
    xc = torch.cat([x, x.new_zeros(B, pad, D)], 1).reshape(B, nc, chunk, D)
    rc = torch.cat([reset, reset.new_zeros(pad)]).reshape(1, nc, chunk, 1)
    hl, pr, seen = torch.zeros_like(xc[:, :, 0]), torch.ones_like(ac[:, :, 0]), torch.zeros_like(rc[:, :, 0])
    local, prods, seens = [], [], []
    for t in range(chunk):
        hl = torch.where(rc[:, :, t], xc[:, :, t], ac[:, :, t] * hl + xc[:, :, t])
        pr = pr * ac[:, :, t]
        seen = seen | rc[:, :, t]
        local.append(hl)
        prods.append(pr)
        seens.append(seen)
    hloc, cum, seen = torch.stack(local, 2), torch.stack(prods, 2), torch.stack(seens, 2)  # (B | 1, nc, chunk, D | 1)
    h, starts = torch.zeros_like(xc[:, 0, 0]), []
    for c in range(nc):
        starts.append(h)
        h = torch.where(seen[:, c, -1], hloc[:, c, -1], cum[:, c, -1] * h + hloc[:, c, -1])
    out = torch.where(seen, hloc, hloc + cum * torch.stack(starts, 1)[:, :, None])
    return out.reshape(B, nc * chunk, D)[:, :n]


def _packed_states(a: Tensor, x: Tensor, h0: Optional[Tensor], cu_seqlens: Tensor):
    """States of packed sequences (``a, x: (1, n, C)``, ``h0: (N, C)`` or ``None``): ``(h, y, rows)`` with ``y_t``
    the state step ``t`` multiplies (a sequence's initial state, zero without, at its first step; without one
    the first gate is not read) and ``rows`` :func:`_packed_rows`."""
    seq, start, last = rows = _packed_rows(cu_seqlens, x.shape[1])
    st = start[None, :, None]
    s0 = torch.zeros_like(x) if h0 is None else h0[seq][None]
    h = _segmented_scan(a, x if h0 is None else torch.where(st, a * s0 + x, x), start)
    y = torch.where(st, s0, torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1))
    return h, y, rows


def _per_sequence(cu_seqlens: Tensor, h: Tensor, row: Tensor, empty: Optional[Tensor]) -> Tensor:
    """``(N, C)``: ``h[0, row[i]]`` for every non-empty sequence ``i``, ``empty[i]`` (zero: ``None``) for the others."""
    nonempty = (cu_seqlens[1:] > cu_seqlens[:-1])[:, None]
    picked = h[0, row.clamp(0, h.shape[1] - 1)]
    return torch.where(nonempty, picked, torch.zeros_like(picked) if empty is None else empty.to(h.dtype))


def _torch_forward(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                   h0_re: Optional[Tensor], h0_im: Optional[Tensor],
                   cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The same scan in PyTorch (the chunked reference's algorithm): the ops' non-CUDA implementation."""
    from .dtypes import acc_dtypes
    from .reference import diagonal_scan_chunked
    rdt, cdt = acc_dtypes(torch.promote_types(q.dtype, a_re.dtype))
    x = k.to(rdt) if v is None else k.to(rdt) * v.to(rdt)
    if cu_seqlens is not None:
        cplx = a_im is not None
        a = torch.complex(a_re.to(rdt), a_im.to(rdt)) if cplx else a_re.to(rdt)
        h0 = None if h0_re is None else (torch.complex(h0_re.to(rdt), h0_im.to(rdt)) if cplx else h0_re.to(rdt))
        if q.shape[1] == 0:
            o = q.to(rdt)
            last = torch.zeros((cu_seqlens.shape[0] - 1, q.shape[2]), dtype=a.dtype, device=q.device) \
                if h0 is None else h0
        else:
            h, _, _ = _packed_states(a, x.to(a.dtype), h0, cu_seqlens)
            o = q.to(rdt) * (h.real if cplx else h)
            last = _per_sequence(cu_seqlens, h, cu_seqlens[1:] - 1, h0)
        return (o, last.real, last.imag) if cplx else (o, last, last.new_zeros(0))
    if a_im is None:
        h, last = diagonal_scan_chunked(a_re.to(rdt), x, None if h0_re is None else h0_re.to(rdt))
        return q.to(rdt) * h, last, last.new_zeros(0)
    h0 = None if h0_re is None else torch.complex(h0_re.to(rdt), h0_im.to(rdt))
    h, last = diagonal_scan_chunked(torch.complex(a_re.to(rdt), a_im.to(rdt)), x.to(cdt), h0)
    return q.to(rdt) * h.real, last.real, last.imag


def _torch_backward(do: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], q: Tensor, k: Tensor,
                    v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor], h0_re: Optional[Tensor],
                    h0_im: Optional[Tensor], cu_seqlens: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """The adjoint scan (module docstring) in PyTorch: the ops' non-CUDA backward."""
    from .dtypes import acc_dtypes
    from .reference import diagonal_scan_chunked
    rdt, cdt = acc_dtypes(torch.promote_types(q.dtype, a_re.dtype))
    qf, kf, dof = q.to(rdt), k.to(rdt), do.to(rdt)
    x = kf if v is None else kf * v.to(rdt)
    cplx = a_im is not None
    a = torch.complex(a_re.to(rdt), a_im.to(rdt)) if cplx else a_re.to(rdt)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if h0_re is None:
        h0 = torch.zeros((nseq, C), dtype=a.dtype, device=q.device)
    else:
        h0 = torch.complex(h0_re.to(rdt), h0_im.to(rdt)) if cplx else h0_re.to(rdt)
    gT = torch.zeros_like(h0)
    if dhT_re is not None:
        gT = gT + dhT_re.to(rdt)
    if cplx and dhT_im is not None:
        gT = gT + 1j * dhT_im.to(rdt)
    g = (qf * dof).to(a.dtype)
    if cu_seqlens is None:
        h, _ = diagonal_scan_chunked(a, x.to(a.dtype), h0)
        y = torch.cat([h0[:, None], h], dim=1)[:, :n]  # h_{t-1}
        # the adjoint over steps -1 .. n-1 (b_t = conj(a_{t+1}), 1 past the end; no output at -1): lam_{-1} is
        # dh0 = conj(a_0) lam_0, and gT itself when n = 0
        b = torch.cat([a, torch.ones_like(h0[:, None])], dim=1).conj()
        lam, _ = diagonal_scan_chunked(b.flip(1), torch.cat([torch.zeros_like(h0[:, None]), g], 1).flip(1), gT)
        dh0, lam = lam[:, -1], lam[:, :-1].flip(1)
    elif n == 0:
        h = y = lam = x.to(a.dtype)
        dh0 = gT
    else:
        # packed: the adjoint restarts at each sequence's last step from its final state's gradient
        h, y, (seq, _, last) = _packed_states(a, x.to(a.dtype), None if h0_re is None else h0, cu_seqlens)
        b = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1).conj()
        g = torch.where(last[None, :, None], g + gT[seq][None], g)
        lam = _segmented_scan(b.flip(1), g.flip(1), last.flip(0)).flip(1)
        dh0 = _per_sequence(cu_seqlens, a.conj() * lam, cu_seqlens[:-1], gT)
    lam_re = lam.real if cplx else lam
    h_re = h.real if cplx else h
    da = lam * y.conj() if cplx else lam * y
    if h0_re is None:
        dh0 = None
    dk = lam_re.clone() if v is None else lam_re * v.to(rdt)
    dv = None if v is None else lam_re * kf
    parts = [h_re * dof, dk, dv, da.real if cplx else da, da.imag if cplx else None,
             None if dh0 is None else (dh0.real if cplx else dh0), dh0.imag if (dh0 is not None and cplx) else None]
    return [None if p is None else p.contiguous() for p in parts]


#: devices whose tensors run the Triton kernels in the ops (tests add "cpu" under ``TRITON_INTERPRET=1``)
KERNEL_DEVICES = ("cuda",)


def _carries_numel(q: Tensor) -> int:
    if q.device.type not in KERNEL_DEVICES:
        return 0
    B, n, C = q.shape
    return carries_numel(B, n, C)


def _scan_impl(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
               h0_re: Optional[Tensor], h0_im: Optional[Tensor],
               cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Op form of :func:`scan_forward`: ``(o, hT_re, hT_im, carries)``.

    CUDA tensors run the Triton kernel; other devices the PyTorch implementation (``carries``
    empty). ``hT_*`` are float32 ``(B, C)``, or ``(N, C)`` with ``cu_seqlens`` (float64 for float64
    inputs off CUDA); ``hT_im`` is empty for a real gate (``a_im = None``).
    """
    if q.device.type in KERNEL_DEVICES:
        return scan_forward(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens=cu_seqlens)
    _check(q, k, v, a_re, a_im, cu_seqlens)
    o, hr, hi = _torch_forward(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens)
    out = _out_like(q, q.dtype).copy_(o)
    # copies: an op's output may not be its input, which the state is when n = 0
    return (out, hr.clone(memory_format=torch.contiguous_format), hi.clone(memory_format=torch.contiguous_format),
            torch.zeros(0, dtype=torch.float32, device=q.device))


def _scan_fake(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens=None):
    B, _, C = q.shape
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    sdt = torch.float64 if (q.device.type not in KERNEL_DEVICES and torch.promote_types(q.dtype, a_re.dtype) == torch.float64) \
        else torch.float32
    o = _out_like(q, q.dtype)
    hr = q.new_empty((B, C), dtype=sdt)
    hi = q.new_empty((B, C) if a_im is not None else (0,), dtype=sdt)
    return o, hr, hi, q.new_empty((_carries_numel(q),), dtype=torch.float32)


def _scan_backward_impl(do: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], q: Tensor,
                        k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                        h0_re: Optional[Tensor], h0_im: Optional[Tensor], carries: Tensor,
                        cu_seqlens: Optional[Tensor] = None) -> list[Tensor]:
    """Op form of :func:`scan_backward`: ``[dq, dk, dv, da_re, da_im, dh0_re, dh0_im]``, empty where
    the input is absent. Gradients in their input's dtype."""
    if q.device.type in KERNEL_DEVICES:
        grads = scan_backward(do, dhT_re, dhT_im, q, k, v, a_re, a_im, h0_re, h0_im, carries, cu_seqlens=cu_seqlens)
    else:
        grads = _torch_backward(do, dhT_re, dhT_im, q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens)
    refs = (q, k, v, a_re, a_im, h0_re, h0_im)
    return [torch.empty(0, dtype=q.dtype, device=q.device) if g is None else g.to(r.dtype)
            for g, r in zip(grads, refs)]


def _scan_backward_fake(do, dhT_re, dhT_im, q, k, v, a_re, a_im, h0_re, h0_im, carries, cu_seqlens=None):
    dev = q.device

    def like(t: Optional[Tensor]) -> Tensor:
        if t is None:
            return torch.empty(0, dtype=q.dtype, device=dev)
        if dev.type in KERNEL_DEVICES and t.dim() == 3:
            return _out_like(q, t.dtype)
        return torch.empty(t.shape, dtype=t.dtype, device=dev)
    return [like(t) for t in (q, k, v, a_re, a_im, h0_re, h0_im)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, a_re, a_im, h0_re, h0_im, *cu_seqlens = inputs  # cu_seqlens may be left out of eager calls
    cu_seqlens = cu_seqlens[0] if cu_seqlens else None
    ctx.absent = [t is None for t in inputs[:7]]
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs (carries, final state)
    ctx.save_for_backward(q, k, v, a_re, a_im, h0_re, h0_im, output[3], cu_seqlens)


def _vjp(ctx, backward, do, dhT_re, dhT_im, _dcarries):
    q, k, v, a_re, a_im, h0_re, h0_im, carries, cu_seqlens = ctx.saved_tensors
    if do is None:  # only the final state is used
        do = torch.zeros_like(q)
    if a_im is None or (dhT_im is not None and dhT_im.numel() == 0):
        dhT_im = None
    grads = backward(do, dhT_re, dhT_im, q, k, v, a_re, a_im, h0_re, h0_im, carries, cu_seqlens)
    return (*(None if absent else g for g, absent in zip(grads, ctx.absent)), None)


elementwise_scan_op = DifferentiableOp(("gateloop::elementwise_scan", "gateloop::elementwise_scan_backward"),
                                       "ElementwiseScan", _scan_impl, _scan_fake, _scan_backward_impl,
                                       _scan_backward_fake, _setup_context, _vjp)


def elementwise_scan(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                     h0_re: Optional[Tensor], h0_im: Optional[Tensor],
                     cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The differentiable scan, ``(o, hT_re, hT_im, carries)`` as :func:`_scan_impl` says: the custom op
    ``gateloop::elementwise_scan`` (``elementwise_scan_op.op``) under torch.compile and for fake tensors, the
    same implementation and backward through an autograd.Function in eager calls (see ``_custom_op.py``).

    ``cu_seqlens``: packed sequences as :func:`scan_forward` takes them (``(1, T, C)`` inputs, ``h0_*`` and the
    final state ``(N, C)``; values validated by the caller, never read on the host). Gradients flow to every
    input and initial state; the first gate of a sequence without an initial state gets zero."""
    return elementwise_scan_op(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens)
