"""The head-dim-1 scan's op registration and entry: the forward and backward implementations (the Triton
launchers on ``KERNEL_DEVICES``, the PyTorch path elsewhere), their fake implementations and autograd formula,
registered once through :class:`gateloop_kernels._custom_op.DifferentiableOp` (``gateloop::elementwise_scan`` /
``_backward``), and :func:`elementwise_scan`, the dispatch's call. Eager calls run the same implementations through
an autograd.Function (see ``_custom_op.py``).

``KERNEL_DEVICES`` is read here at call time: tests under ``TRITON_INTERPRET=1`` patch it on this module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._custom_op import DifferentiableOp
from ..dtypes import cast
from .backward import scan_backward
from .config import _check_shapes, _out_like, carries_numel
from .forward import scan_forward
from .torch_path import _torch_backward, _torch_forward


#: devices whose tensors run the Triton kernels in the ops (tests add "cpu" under ``TRITON_INTERPRET=1``)
KERNEL_DEVICES = ("cuda",)


def _carries_numel(q: Tensor) -> int:
    """Size of the ``carries`` the op returns for ``q``: none off the kernel devices."""
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
    _check_shapes(q, k, v, a_re, a_im, cu_seqlens)
    o, hr, hi = _torch_forward(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens)
    out = _out_like(q, q.dtype).copy_(o)
    # copies: an op's output may not be its input, which the state is when n = 0
    return (out, hr.clone(memory_format=torch.contiguous_format), hi.clone(memory_format=torch.contiguous_format),
            torch.zeros(0, dtype=torch.float32, device=q.device))


def _scan_fake(q, k, v, a_re, a_im, h0_re, h0_im, cu_seqlens=None):
    """Fake (meta) form of :func:`_scan_impl`: its outputs' shapes, dtypes and strides."""
    B, _, C = q.shape
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    off_kernels = q.device.type not in KERNEL_DEVICES
    sdt = torch.float64 if (off_kernels and torch.promote_types(q.dtype, a_re.dtype) == torch.float64) else torch.float32
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
    return [torch.empty(0, dtype=q.dtype, device=q.device) if g is None else cast(g, r.dtype)
            for g, r in zip(grads, refs)]


def _scan_backward_fake(do, dhT_re, dhT_im, q, k, v, a_re, a_im, h0_re, h0_im, carries, cu_seqlens=None):
    """Fake (meta) form of :func:`_scan_backward_impl`."""
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
