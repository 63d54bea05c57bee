"""The fused elementwise steps of the reversible coupling, done in place.

These are the only places the reversible core touches activation and gradient buffers
elementwise. Each function has a pure-PyTorch body here; when the C++/CUDA extension is
available it replaces them with one fused launch (see ``reversible._extension``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["coupling_add_", "reconstruct_", "reconstruct_multi_"]


def coupling_add_(x: Tensor, fx: Tensor) -> Tensor:
    """Forward coupling in place: ``x += fx``; returns ``x`` (same storage)."""
    return x.add_(fx)


def reconstruct_(y: Tensor, fy: Tensor, dy: Tensor, grad: Tensor) -> None:
    """Backward reconstruction in place: ``y -= fy`` and ``dy += grad``.

    ``y``/``fy`` and ``dy``/``grad`` are pairwise the same shape; ``y`` and ``dy`` may be
    strided views (a half of a split activation / gradient buffer).
    """
    with torch.no_grad():
        y.sub_(fy)
        dy.add_(grad)


def reconstruct_multi_(ys: Sequence[Tensor], fys: Sequence[Tensor], dys: Sequence[Tensor],
                       grads: Sequence[Tensor]) -> None:
    """:func:`reconstruct_` over lists of tensors (dict-valued / multi-modality streams)."""
    if not (len(ys) == len(fys) == len(dys) == len(grads)):
        raise ValueError("reconstruct_multi_: all four lists must have the same length")
    for y, fy, dy, g in zip(ys, fys, dys, grads):
        reconstruct_(y, fy, dy, g)
