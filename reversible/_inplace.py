"""The fused elementwise steps of the reversible coupling, done in place.

These are the only places the reversible core touches activation and gradient buffers
elementwise. When the C++/CUDA extension (``csrc/reversible/``, loaded by ``reversible._extension``) is
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

_FLOATS = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
_ops = _extension._OVERLOADS  # op name -> torch.ops.revkern.<name>.default, filled on first use


def _live(t: Tensor) -> bool:
    """True if the extension serves t's device (the hot path: one cached lookup)."""
    devs = _extension._fast
    if devs is None:
        devs = _extension.live_devices()
    return bool(devs) and t.device.type in devs


def coupling_add_(x: Tensor, fx: Tensor) -> Tensor:
    """Forward coupling in place: ``x += fx``; returns ``x`` (same storage)."""
    if (_live(x) and x.shape == fx.shape and x.dtype in _FLOATS and fx.dtype in _FLOATS
            and not (torch.is_grad_enabled() and (x.requires_grad or fx.requires_grad))):
        _ops["coupling_add_"](x, fx)
        return x
    return x.add_(fx)


def reconstruct_(y: Tensor, fy: Tensor, dy: Tensor, grad: Tensor) -> None:
    """Backward reconstruction in place: ``y -= fy`` and ``dy += grad``.

    ``y``/``fy`` and ``dy``/``grad`` are pairwise the same shape; ``y`` and ``dy`` may be
    strided views (a half of a split activation / gradient buffer).
    """
    with torch.no_grad():
        if (_live(y) and y.shape == fy.shape and dy.shape == grad.shape and y.dtype in _FLOATS
                and fy.dtype in _FLOATS and dy.dtype in _FLOATS and grad.dtype in _FLOATS):
            _ops["reconstruct_"](y, fy, dy, grad)
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
        if _live(ys[0]) and all(
                y.shape == fy.shape and dy.shape == g.shape and y.dtype in _FLOATS and fy.dtype in _FLOATS
                and dy.dtype in _FLOATS and g.dtype in _FLOATS for y, fy, dy, g in zip(ys, fys, dys, grads)):
            _ops["reconstruct_multi_"](list(ys), list(fys), list(dys), list(grads))
            return
        for y, fy, dy, g in zip(ys, fys, dys, grads):
            y.sub_(fy)
            dy.add_(g)
