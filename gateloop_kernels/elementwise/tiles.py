"""Device helpers: a program's tile (its batch, rows, channels, masks and offsets in the inputs, the gates and the
outputs), the rows of a dense ``(N, C)`` state, the packed sequences over a tile's rows (``_sequences``), and row
moves that stay in registers when a thread holds one channel's steps (``_row``, ``_shift``; docs/kernels.md
section 2, "Layout")."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_offsets(seg, rem, c0, n, C, NCB, s_b, s_n, s_c, g_b, g_n, g_c,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BIG: tl.constexpr):
    """Indices of the tile of segment ``seg`` and ``rem = batch * NCB + channel block``: ``(b, rows,
    t, c, mc, m, off, goff, boff, gboff)``: in-batch offsets of the tile in the q-like and the gate
    tensors (int32 unless ``BIG``), and the batch offsets to add to their pointers. ``c0`` is always 0, an
    argument the compiler does not specialize on: the channels' alignment is unknown, so loads are not
    vectorized along them and a thread keeps one channel's rows (docs/kernels.md section 2, "Layout")."""
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
def _out_offsets(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED: tl.constexpr, BIG: tl.constexpr):
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
def _state_offsets(sq, c, C, BIG: tl.constexpr):
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
def _row(x, rows, r):
    """Row ``r`` of a ``(BLOCK_T, BLOCK_C)`` tile as a ``(BLOCK_C,)`` vector."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), axis=0)


@triton.jit
def _shift(x, rows, D: tl.constexpr, fill, BLOCK_T: tl.constexpr):
    """Row ``r`` of the result is row ``r - D`` of the ``(BLOCK_T, BLOCK_C)`` tile ``x`` (``D = 1``: down a
    step, ``-1``: up); the row shifted in from outside the tile is ``fill`` (``(BLOCK_C,)``). A select-sum
    over rows: with a tile's rows inside each thread it compiles to register moves (and one add a row)."""
    src = rows - D
    y = tl.sum(tl.where(src[:, None, None] == rows[None, :, None], x[None, :, :], -0.0), axis=1)
    return tl.where(((src < 0) | (src >= BLOCK_T))[:, None], fill[None, :], y)
