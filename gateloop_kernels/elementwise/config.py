"""The head-dim-1 scan's launch configuration and host-side layout: the tile table (``WIDE_FWD``, ``WIDE_BWD``,
``NARROW``, applied by :func:`tile_config`), the segments, the ``carries`` the forward saves for the backward, the
strides the kernels read their inputs with and write their outputs in, and the launchers' shape checks
(docs/kernels.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


#: ``(BLOCK_T, BLOCK_C, num_warps)`` of the forward and of the backward where a batch has 32 channels
#: or more (at most one warp per 32 channels of the tile). Each thread holds one channel's ``BLOCK_T``
#: steps, so a tile's scans run in registers. The backward's tiles may be shorter than the forward's (the
#: forward saves its state every backward tile): 16 steps fit in registers where 32 spill (docs/kernels.md
#: section 2).
WIDE_FWD, WIDE_BWD = (32, 64, 2), (16, 64, 2)
#: both passes with fewer channels: tiles of up to 64 steps and 16 channels, one warp (the lanes that the
#: channels leave run along time), at most 16 steps per thread (32-step tiles at 16 channels).
NARROW = (64, 16, 1)


def _next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def tile_config(n: int, C: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_C, num_warps)`` for a ``(B, n, C)`` problem, forward or backward.

    The backward's ``BLOCK_T`` divides the forward's: the forward saves its state after every backward
    tile (``carries``). Deterministic in its arguments (the fake implementations use it).
    """
    block_t, block_c, warps = (WIDE_BWD if backward else WIDE_FWD) if C >= 32 else NARROW
    block_c = min(block_c, _next_pow2(C))
    if C < 32:
        block_t = _narrow_steps(block_t, block_c, warps)
    else:  # warps only along the channels: a warp along time would put the scans in shared memory
        warps = min(warps, block_c // 32)
    return min(block_t, max(16, _next_pow2(n))), block_c, warps


def _needs_int64(*ts: Tensor) -> bool:
    """Whether an in-batch offset (time and channel strides, one step past the end) may pass int32."""
    return any((t.shape[1] + 1) * abs(t.stride(1)) + t.shape[2] * abs(t.stride(2)) >= 2 ** 31 for t in ts)


def _num_segments(n: int, block_t: int) -> int:
    """Tiles (segments) of ``block_t`` steps along ``n``, at least one."""
    if isinstance(n, int):
        return max(1, -(-n // block_t))
    return torch.sym_max(1, -(-n // block_t))  # a symbolic n (fake implementations): no guard on its value


def _table_carry_t(C: int) -> int:
    """The backward's ``BLOCK_T`` in the table for ``C`` channels (:func:`tile_config`'s before its cut to ``n``)
    without ``int(C)``: ``C`` is compared only at the tile widths where that ``BLOCK_T`` changes, so a symbolic
    ``C`` (a fake implementation's under torch.compile's dynamic shapes) is guarded to a range, not specialized."""
    if C >= 32:
        return WIDE_BWD[0]
    block_t, block_c, warps = NARROW
    p = 1  # min(block_c, next_pow2(C)), or a narrower width of the same BLOCK_T
    while p < block_c and (_narrow_steps(block_t, 2 * p, warps) == _narrow_steps(block_t, p, warps) or p < C):
        p *= 2
    return _narrow_steps(block_t, p, warps)


def _narrow_steps(block_t: int, block_c: int, warps: int) -> int:
    """A narrow tile's steps: the table's ``block_t``, at most 16 steps per thread over ``block_c`` channels."""
    return min(block_t, 16 * 32 * warps // block_c)


def carries_numel(B: int, n: int, C: int, carry_t: Optional[int] = None) -> int:
    """Number of float32 of the forward's ``carries`` (the state after every ``carry_t`` steps, real and
    imaginary planes; ``carry_t`` defaults to the backward's ``BLOCK_T``)."""
    # the table's BLOCK_T, not tile_config's cut to n: the cut only shortens a tile that n fits in (one segment
    # either way), and a fake implementation's n must stay symbolic (no recompile per length under torch.compile)
    carry_t = carry_t or _table_carry_t(C)
    return _num_segments(n, carry_t) * 2 * B * C


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


def _check_shapes(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                  cu_seqlens: Optional[Tensor] = None) -> None:
    """ValueError unless ``q`` is ``(B, n, C)``, ``k, v, a_re, a_im`` (where given) have its shape, and ``cu_seqlens``
    (where given) is 1-D with ``B = 1``."""
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
