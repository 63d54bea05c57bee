"""The fused elementwise steps of the reversible coupling, done in place.

These are the only places the reversible core touches activation and gradient buffers
elementwise. When the C++/CUDA extension (``csrc/``, loaded by ``reversible._extension``) is
live for the tensors' device, each call is one fused kernel launch (``torch.ops.revkern.*``,
one launch per dtype pair for all updates of the call); otherwise the pure-PyTorch bodies
below run. Both give bitwise-identical results (same arithmetic, one rounding per element).

Force the PyTorch path with ``REVERSIBLE_EXTENSION=0`` or
``reversible._extension.set_enabled(False)`` / ``use_extension(False)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _extension

__all__ = ["coupling_add_", "reconstruct_", "reconstruct_multi_"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _ext(tensors: Sequence[Tensor], pairs: Sequence[tuple[Tensor, Tensor]]):
    """The extension's op namespace if it can take these tensors, else None."""
    ops = _extension.ops()
    if ops is None:
        return None
    dev = tensors[0].device
    if dev.type not in _extension._state["devices"]:
        return None
    for t in tensors:
        if t.device != dev or t.dtype not in _FLOATS:
            return None
    for d, s in pairs:
        if d.shape != s.shape:  # broadcasting: leave it to ATen
            return None
    return ops


def coupling_add_(x: Tensor, fx: Tensor) -> Tensor:
    """Forward coupling in place: ``x += fx``; returns ``x`` (same storage)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or fx.requires_grad)):
        ops = _ext((x, fx), ((x, fx),))
        if ops is not None:
            ops.coupling_add_(x, fx)
            return x
    return x.add_(fx)


def reconstruct_(y: Tensor, fy: Tensor, dy: Tensor, grad: Tensor) -> None:
    """Backward reconstruction in place: ``y -= fy`` and ``dy += grad``.

    ``y``/``fy`` and ``dy``/``grad`` are pairwise the same shape; ``y`` and ``dy`` may be
    strided views (a half of a split activation / gradient buffer).
    """
    with torch.no_grad():
        ops = _ext((y, fy, dy, grad), ((y, fy), (dy, grad)))
        if ops is not None:
            ops.reconstruct_(y, fy, dy, grad)
            return
        y.sub_(fy)
        dy.add_(grad)


def reconstruct_multi_(ys: Sequence[Tensor], fys: Sequence[Tensor], dys: Sequence[Tensor],
                       grads: Sequence[Tensor]) -> None:
    """:func:`reconstruct_` over lists of tensors (dict-valued / multi-modality streams)."""
    if not (len(ys) == len(fys) == len(dys) == len(grads)):
        raise ValueError("reconstruct_multi_: all four lists must have the same length")
    if not ys:
        return
    with torch.no_grad():
        ops = _ext((*ys, *fys, *dys, *grads), (*zip(ys, fys), *zip(dys, grads)))
        if ops is not None:
            ops.reconstruct_multi_(list(ys), list(fys), list(dys), list(grads))
            return
        for y, fy, dy, g in zip(ys, fys, dys, grads):
            y.sub_(fy)
            dy.add_(g)
