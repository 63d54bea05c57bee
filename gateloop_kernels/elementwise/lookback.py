"""Device helpers of the decoupled look-back (docs/design.md section 5, "Decoupled look-back" and "Words"): two
float32 packed into one int64 word that a zeroed word cannot be mistaken for (``_pack``, ``_unpack``,
``_written``), publishing a tile's aggregate or inclusive state (``_publish``), the walk back over the earlier
segments' words to the state entering a tile (``_lookback``), and each program's share of zeroing the other
workspace for the next launch (``_clear``, ``workspace.py``)."""
from __future__ import annotations

import triton
import triton.language as tl

from .scans import _combine


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
    """The two float32 ``(lo, hi)`` of a word :func:`_pack` wrote."""
    lo = ((w & 0xFFFFFFFF) - 1).to(tl.uint32).to(tl.float32, bitcast=True)
    return lo, (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _written(w):
    """Whether a word has been written (a zeroed one has not)."""
    return (w & 0xFFFFFFFF) != 0


@triton.jit
def _publish(buf_ptr, sidx, mc, r0, r1, r2, r3, WORDS: tl.constexpr):
    """``(r0, r1)`` as word ``sidx * WORDS``, and ``(r2, r3)`` after it when ``WORDS == 2``."""
    tl.store(buf_ptr + sidx * WORDS, _pack(r0, r1), mask=mc)
    if WORDS == 2:
        tl.store(buf_ptr + sidx * WORDS + 1, _pack(r2, r3), mask=mc)


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


@triton.jit
def _clear(clr_ptr, clr_n, BLOCK: tl.constexpr):
    """Zero this program's share of ``clr_ptr[:clr_n]``: the other workspace's dirty words (``workspace.py``)."""
    per = tl.cdiv(clr_n, tl.num_programs(0))
    start = tl.program_id(0).to(tl.int64) * per
    end = tl.minimum(start + per, clr_n)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(clr_ptr + offs, tl.zeros([BLOCK], tl.int64), mask=offs < end)
