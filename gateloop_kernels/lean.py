"""The eager call as one autograd node: the public entries' kernel paths without a graph of views around them.

An eager ``gate_loop_operator`` / ``gate_loop_heads`` call on a Triton kernel's path runs as one
``torch.autograd.Function``: the gate's activation (the complex gate's parts, the sigmoid-polar kernel, or
exp/cos/sin), the views into the kernel's layout, dtype casts and the kernel op's implementation
(:meth:`gateloop_kernels._custom_op.DifferentiableOp.forward_saved`) run in its forward without autograd, and its
backward chains the op's backward and the activation's by hand. The graph autograd would otherwise record
(selects of a complex gate's parts, transposes, expands, casts: 20-30 nodes per call, most of them a zero fill
and a copy in the backward) is host time on every call and, at head dim 1, device time as large as the scan's.

Calls it does not cover return ``None`` from :func:`operator_call` / :func:`heads_call` and take the general path
(:func:`gateloop_kernels.dispatch.scan`, same results): traced calls (torch.compile, fake tensors) and
``torch.func`` transforms, which need the registered ops; an initial state or a requested final state; a gate
broadcast over the batch or per key dim; empty sequences; inputs off the kernels' devices and dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from . import gate as _gate
from ._custom_op import first_order, traced
from .chunked.op import _chunk_op, backward_into, op_args
from .dtypes import cast
from .elementwise import elementwise_scan_op
from .elementwise.backward import scan_backward

__all__ = ["operator_call", "heads_call"]


def _path(q: Tensor, d: int, e: int, dtype: torch.dtype, n: int) -> Optional[str]:
    """:func:`gateloop_kernels.dispatch.kernel_path` where this call can run in one node, else ``None``."""
    if n == 0 or traced(q) or torch._C._are_functorch_transforms_active():
        return None
    return dispatch.kernel_path(q.device, dtype, d, e)


def _plane(t: Tensor, offset: int) -> Tensor:
    """The ``(B, n)`` plane of a ``(B, n, 1, 1[, 2])`` gate (``offset`` 1: the imaginary parts of a complex gate's
    real view), one view where indexing takes two to four."""
    return t.as_strided(t.shape[:2], t.stride()[:2], t.storage_offset() + offset)


def _channels(t: Tensor, offset: int = 0) -> Tensor:
    """A ``(B, n, ...)`` tensor with size-1 trailing dims as the elementwise op's ``(1, n, B)`` layout: ``B``
    channels of one batch, time contiguous for the seed's ``(B, n, 1)``; one view for reshape, t and unsqueeze
    (``offset`` 1 on a complex gate's real view: its imaginary parts)."""
    (B, n), (s0, s1) = t.shape[:2], t.stride()[:2]
    return t.as_strided((1, n, B), (n * s1, s1, s0), t.storage_offset() + offset)


def _gate_channels(g: Tensor, form: str) -> tuple[Tensor, Optional[Tensor]]:
    """The operator's ``(B, n, 1, 1)`` gate (or its gradient's buffer) as :func:`_channels` planes ``(re, im)``
    (``im`` ``None`` for a real gate): one view each, read and written by the kernel in place."""
    if form == "complex":
        parts = torch.view_as_real(g)
        return _channels(parts), _channels(parts, 1)
    return _channels(g), None


def _sequences(t: Tensor, ndim: int) -> Tensor:
    """:func:`_channels`' inverse: a ``(1, n, B)`` tensor as ``(B, n)`` followed by size-1 dims up to ``ndim``."""
    (_, n, B), (_, s1, s2) = t.shape, t.stride()
    return t.as_strided((B, n) + (1,) * (ndim - 2), (s2, s1) + (1,) * (ndim - 2), t.storage_offset())


def _gate_parts(form: str, g0: Tensor, g1: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(a_re, a_im)`` (``a_im`` ``None`` for a real gate) of a gate in ``form``: ``"complex"`` / ``"real"``
    (the operator's ``(B, n, 1, 1)`` gate: ``(B, n)`` views), ``"z"`` (``(B, n, H, 2)`` pre-activation) or
    ``"polar"`` (log-magnitude ``g0`` and phase ``g1``, ``(B, n, H)``)."""
    if form == "complex":
        parts = torch.view_as_real(g0)
        return _plane(parts, 0), _plane(parts, 1)
    if form == "real":
        return _plane(g0, 0), None
    if form == "z":
        return _gate.sigmoid_polar_parts(g0)
    return _gate.polar_parts(g0, g1)


def _gate_grads(form: str, g0: Tensor, g1: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                da_re: Tensor, da_im: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The gradients of :func:`_gate_parts`' inputs from those of its outputs (in ``(B, n[, H])`` layout)."""
    if form == "complex":
        rdt = torch.float64 if g0.dtype == torch.complex128 else torch.float32
        return torch.complex(cast(da_re, rdt), cast(da_im, rdt)).reshape(g0.shape), None
    if form == "real":
        return cast(da_re, g0.dtype).reshape(g0.shape), None
    if form == "z":
        return _gate.sigmoid_polar_grad(g0, da_re, da_im), None
    # a = exp(lm + i ph): da/dlm = a, da/dph = i a
    return (da_re * a_re + da_im * a_im).to(g0.dtype), (da_im * a_re - da_re * a_im).to(g1.dtype)


class _OneNode(torch.autograd.Function):
    """``o = scan(q, k, v, gate(g0, g1))`` on a kernel path: see the module docstring. ``spec`` is
    ``(entry, form, path, dtype, precision, chunk_size)``, entry ``"operator"`` (``(B, n, d)`` inputs) or
    ``"heads"`` (``(B, n, H, d)``)."""

    @staticmethod
    def forward(ctx, spec, q, k, v, g0, g1, cu_seqlens):  # type: ignore[override]
        entry, form, path, dt, precision, chunk_size = spec
        x = [cast(t, dt) for t in (q, k, v)]
        if entry == "operator" and path == "elementwise":
            # (B, n, 1) sequences -> B channels of one batch, time contiguous: (1, n, B) views
            x = [_channels(t) for t in x]
            a_re, a_im = _gate_channels(g0, form)
        else:  # the operator's (B, n, d) inputs and (B, n) gate planes are the chunked kernels' one-head layout
            a_re, a_im = _gate_parts(form, g0, g1)
            if entry == "heads" and path == "elementwise":
                x = [t[..., 0] for t in x]
        if path == "elementwise":
            out, saved = elementwise_scan_op.forward_saved(*x, a_re, a_im, None, None, cu_seqlens)
            o = out[0]
        else:
            a_im = torch.zeros_like(a_re) if a_im is None else a_im
            args = op_args(*x, a_re, a_im, None, False, precision, chunk_size, cu_seqlens)
            (o, _), saved = _chunk_op.forward_saved(*args)
        # what the backward reads goes through autograd's saved tensors (q, k may be views of a fused projection,
        # z is read again): an in-place change after this call raises there, as in plain autograd, not a wrong gradient
        ctx.save_for_backward(*saved.saved_tensors, g0 if form == "z" else None)
        saved.saved_tensors = ()
        ctx.spec, ctx.saved = spec, saved
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.gate = (g0, g1, a_re, a_im) if form == "polar" else (g0, g1, None, None)
        if entry == "operator" and path == "elementwise":
            return _sequences(o, 3)
        return o[..., None] if entry == "heads" and path == "elementwise" else o

    @staticmethod
    @first_order("gate_loop_operator / gate_loop_heads")  # the kernels record no graph: a 2nd derivative raises
    def backward(ctx, do):  # type: ignore[override]
        entry, form, path, dt, _, _ = ctx.spec
        ctx.saved.saved_tensors = ctx.saved_tensors[:-1]  # (autograd's version check: raises after an in-place change)
        if entry == "operator" and path == "elementwise":
            do = _channels(do)
        elif entry == "heads" and path == "elementwise":
            do = do[..., 0]
        g0, g1, a_re, a_im = ctx.gate
        if entry == "operator" and path == "elementwise":
            # the kernel writes the gate's gradient in its final layout: a complex gradient's planes, no interleave
            dg0 = torch.empty_like(g0)
            da_out = _gate_channels(dg0, form)
            dq, dk, dv, *_ = elementwise_scan_op.vjp_saved(
                ctx.saved, do, None, None, None,
                backward=lambda *args: scan_backward(*args[:11], cu_seqlens=args[11], da_out=da_out))
            dq, dk, dv = (cast(_sequences(g, 3), t) for g, t in zip((dq, dk, dv), ctx.dtypes))
            return None, dq, dk, dv, dg0, None, None
        if path == "chunked" and form == "complex" and g0.dtype == torch.complex64:
            # the kernel writes the gradient's parts in place (element stride 2): no interleave afterwards; dense,
            # since empty_like keeps a permuted gate's strides (e.g. a (n, B) transpose), which the kernel cannot write
            dg0 = torch.empty_like(g0, memory_format=torch.contiguous_format)
            da = _gate_parts(form, dg0, None)
            dq, dk, dv, *_ = _chunk_op.vjp_saved(ctx.saved, do, None, backward=backward_into(*da))
            dq, dk, dv = (cast(g, t) for g, t in zip((dq, dk, dv), ctx.dtypes))
            return None, dq, dk, dv, dg0, None, None
        if path == "elementwise":
            dq, dk, dv, da_re, da_im, *_ = elementwise_scan_op.vjp_saved(ctx.saved, do, None, None, None)
        else:
            dq, dk, dv, da_re, da_im, *_ = _chunk_op.vjp_saved(ctx.saved, do, None)
        if entry == "heads" and path == "elementwise":
            dq, dk, dv = (t[..., None] for t in (dq, dk, dv))
        dq, dk, dv = (cast(g, t) for g, t in zip((dq, dk, dv), ctx.dtypes))
        dg0, dg1 = _gate_grads(form, g0, g1, a_re, a_im, da_re, da_im)
        return None, dq, dk, dv, dg0, dg1, None


def operator_call(q: Tensor, k: Tensor, v: Tensor, a: Tensor, dtype: torch.dtype, precision: str, chunk_size: int,
                  cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """``gate_loop_operator``'s output in one node, for checked inputs with a ``(B, n, 1, 1)`` gate per
    sequence, no initial state and no final state; ``None`` where the general path must run."""
    B, n, d = q.shape
    e = v.shape[-1]
    path = _path(q, d, e, dtype, n)
    if path is None or a.shape != (B, n, 1, 1):
        return None
    if path == "elementwise" and cu_seqlens is not None:
        return None  # the packed (1, T, 1) layout: one channel, the general path's views
    form = "complex" if a.is_complex() else "real"
    return _OneNode.apply(("operator", form, path, dtype, precision, chunk_size), q, k, v, a, None, cu_seqlens)


def heads_call(q: Tensor, k: Tensor, v: Tensor, z: Optional[Tensor], log_magnitude: Optional[Tensor],
               phase: Optional[Tensor], dtype: torch.dtype, precision: str, chunk_size: int,
               cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """``gate_loop_heads``' output in one node, for checked inputs without initial or final state; ``None``
    where the general path must run."""
    n, d, e = q.shape[1], q.shape[3], v.shape[3]
    path = _path(q, d, e, dtype, n)
    if path is None:
        return None
    form, g0, g1 = ("z", z, None) if z is not None else ("polar", log_magnitude, phase)
    return _OneNode.apply(("heads", form, path, dtype, precision, chunk_size), q, k, v, g0, g1, cu_seqlens)
