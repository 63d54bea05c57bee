"""The device-side check of packed-sequence boundaries: whether ``cu_seqlens`` starts at 0, never decreases and
ends at ``T``, as a one-element tensor that ``torch._assert_async`` consumes (no host synchronisation).

On CUDA one launch (:func:`_boundaries_ok`) replaces the ten PyTorch calls of the same test written with tensor
ops (:func:`_ok_reference`, which the CPU and tests use): every packed call runs it once per checking entry
(each layer and the scan), and at the 5-20 us a call of a GPU host the ten calls cost about as much as a packed
head-dim-1 scan's kernels. Registered as ``gateloop::cu_seqlens_ok`` for torch.compile and fake tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._custom_op import PlainOp
from ._launch import Launcher


@Launcher
@triton.jit
def _boundaries_ok(cu, ok, N, T, BLOCK: tl.constexpr):
    """``ok <- 1`` where ``cu[0] == 0``, ``cu[N] == T`` and ``cu[i + 1] >= cu[i]`` for every ``i < N``, else 0."""
    good = (tl.load(cu) == 0) & (tl.load(cu + N) == T)
    for b in range(0, N, BLOCK):
        i = b + tl.arange(0, BLOCK)
        m = i < N
        step = tl.load(cu + i + 1, mask=m, other=0) - tl.load(cu + i, mask=m, other=0)
        good = good & (tl.min(tl.where(m, step, 0), 0) >= 0)
    tl.store(ok, good.to(tl.int32))


def _ok_reference(cu_seqlens: Tensor, T: int) -> Tensor:
    return (cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()


def _ok_impl(cu_seqlens: Tensor, T: int) -> Tensor:
    if cu_seqlens.device.type != "cuda":
        return _ok_reference(cu_seqlens, T).to(torch.int32)
    ok = torch.empty((), device=cu_seqlens.device, dtype=torch.int32)
    # read by offset: a strided view (cu[::2]) would be read as its buffer
    _boundaries_ok[(1,)](cu_seqlens.contiguous(), ok, cu_seqlens.shape[0] - 1, T, BLOCK=1024, num_warps=4)
    return ok


_ok_op = PlainOp("gateloop::cu_seqlens_ok", _ok_impl, lambda cu_seqlens, T: cu_seqlens.new_empty((), dtype=torch.int32))


def boundaries_ok(cu_seqlens: Tensor, T: int) -> Tensor:
    """A one-element tensor, nonzero iff ``cu_seqlens`` (1-D int32/int64, at least one entry) starts at 0, never
    decreases and ends at ``T``; computed on ``cu_seqlens``' device without a host synchronisation."""
    return _ok_op(cu_seqlens, T)
