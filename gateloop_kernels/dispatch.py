"""The one place that picks the scan's path, for every public entry point.

Each entry (``gate_loop_operator``, ``gate_loop_heads``, ``simple_gate_loop_operator``; the layers through
``gate_loop_heads``) checks its own argument forms once (:mod:`gateloop_kernels._checks`), brings them into head
layout (or, at head dims 1, the elementwise op's per-channel layout) and calls :func:`scan`, which does not check
them again:

* a gate per head, ``d = e = 1``, a kernel dtype or not CUDA: the elementwise scan op
  ``gateloop::elementwise_scan`` (:mod:`gateloop_kernels.elementwise`) -- the Triton kernel on CUDA, the
  chunked reference's algorithm in PyTorch elsewhere;
* ``n = 0`` otherwise: :func:`gateloop_kernels.dtypes.empty_scan`;
* a gate per head, ``16 <= d, e <= 256``, a kernel dtype, CUDA: the chunked tensor-core kernel
  (:mod:`gateloop_kernels.chunked`);
* everything else (a gate per key dim or entry, other head dims, float64 on CUDA, not CUDA):
  :func:`gateloop_kernels.reference.chunked_reference`, with one warning per kind of input on CUDA.
  This slow path calls the public oracle, which checks its inputs again.

A packed batch (``cu_seqlens``) takes the same paths: both kernels and the elementwise op's PyTorch twin read
``cu_seqlens`` themselves; where the reference would run, :func:`gateloop_kernels.varlen.varlen_reference` does
(PyTorch on every device, no host loop over sequences).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .chunked import _chunk_gate_loop
from .dtypes import KERNEL_DTYPES, acc_dtypes, empty_scan
from .elementwise import elementwise_scan
from .reference import DEFAULT_CHUNK
from .varlen import varlen_reference as _varlen_reference

__all__ = ["scan", "CHUNK_DIMS", "DEFAULT_CHUNK", "KERNEL_DEVICES"]

#: devices whose tensors take the Triton kernels' paths (tests add "cpu" under ``TRITON_INTERPRET=1``)
KERNEL_DEVICES = ("cuda",)

#: head and value dims the chunked tensor-core kernel covers
CHUNK_DIMS = (16, 256)

_WARNED: set = set()


def _warn_reference(caller: str, a_re: Tensor, d: int, e: int, dtype: torch.dtype) -> None:
    """One warning per kind of input that runs on the GPU through the PyTorch reference."""
    if a_re.ndim != 3:
        why = "a gate per key dim (a: (B, n, d, 1))" if a_re.shape[-1] == 1 else "a gate per value dim / per entry"
        why += " has no Triton kernel yet"
    elif dtype == torch.float64:
        why = "float64 inputs have no Triton kernel"
    else:
        why = f"head dims d={d}, e={e} are outside the kernels' range (d = e = 1, or {CHUNK_DIMS[0]}..{CHUNK_DIMS[1]})"
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"{caller}: {why}; running the chunked PyTorch reference on the GPU (correct, much slower)",
                      stacklevel=4)


def kernel_path(device: torch.device, dtype: torch.dtype, d: int, e: int) -> Optional[str]:
    """The Triton kernel that takes a scan with a gate per head: ``"elementwise"`` (``d = e = 1``), ``"chunked"``
    (:data:`CHUNK_DIMS`), or ``None`` (another device, dtype or head dim)."""
    if device.type not in KERNEL_DEVICES or dtype not in KERNEL_DTYPES:
        return None
    if d == 1 and e == 1:
        return "elementwise"
    return "chunked" if CHUNK_DIMS[0] <= d <= CHUNK_DIMS[1] and CHUNK_DIMS[0] <= e <= CHUNK_DIMS[1] else None


def scan(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
         initial_state: Optional[Tensor], output_final_state: bool, precision: str, chunk_size: int, caller: str,
         cu_seqlens: Optional[Tensor] = None):
    """The scan ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t`` on checked inputs, on the path they pick.

    Args:
        q, k: ``(B, n, H, d)`` (head layout), or ``(B, n, C)``: ``C`` channels of head dims ``d = e = 1`` (the
            elementwise op's own layout, no views needed); one real floating dtype, the output dtype.
        v: ``(B, n, H, e)`` / ``(B, n, C)`` in that dtype, or ``None``: ``k`` already holds ``k_t v_t``
            (``d = e = 1``; the simplified operator).
        a_re, a_im: ``(B, n, H)`` / ``(B, n, C)`` real and imaginary parts of a gate per head, ``a_im = None``
            for a real gate (with ``d = e = 1``); or ``(B or 1, n, 1, d or 1, e or 1)`` for a gate per key dim
            or per entry (``H = 1``; the reference runs it).
        initial_state: ``(B, H, d, e)`` / ``(B, C)``, complex or real, or ``None``.
        output_final_state: also return the final state.
        precision: float32 dots of the chunked kernel, one of :data:`gateloop_kernels.dtypes.PRECISIONS`.
        chunk_size: steps per chunk of the chunked kernel and the reference (a power of two >= 16).
        caller: the public entry's name, for the reference warning.
        cu_seqlens: ``None``, or the checked boundaries ``[0, l_1, ..., n]`` (int32/int64, q's device) of ``N``
            sequences packed in ``B = 1``; ``initial_state`` and the final state are then ``(N, H, d, e)`` /
            ``(N, C)``, one per sequence (:mod:`gateloop_kernels.varlen`).

    Returns:
        ``(o, final_state or None)``: ``o (B, n, H, e)`` / ``(B, n, C)`` in q's dtype; the final state
        ``(B, H, d, e)`` / ``(B, C)``, complex (real for a real gate).
    """
    on_kernels = q.device.type in KERNEL_DEVICES
    rdt = acc_dtypes(q.dtype)[0]  # the real dtype every path computes in
    if a_im is not None and initial_state is not None and not initial_state.is_complex():
        # a real state with a complex gate is the complex state with no imaginary part (differentiable)
        initial_state = initial_state.to(torch.complex128 if initial_state.dtype == torch.float64 else torch.complex64)
    per_channel = q.ndim == 3
    if per_channel or (q.shape[3] == 1 and v.shape[3] == 1 and a_re.ndim == 3):
        if q.dtype in KERNEL_DTYPES or not on_kernels:
            s0 = initial_state
            # a float64 gate with narrower q in float32, as the other paths run it (the state's dtype never depends
            # on the head dim); a narrower gate goes as it is: the kernel widens it as it loads
            a_re, a_im = (t if t is None or t.dtype != torch.float64 else t.to(rdt) for t in (a_re, a_im))
            if not per_channel:  # head dims 1: each head is one channel
                q, k, v = q[..., 0], k[..., 0], v[..., 0]
                s0 = None if s0 is None else s0[..., 0, 0]
            o, hr, hi, _ = elementwise_scan(q, k, v, a_re, a_im, None if s0 is None else s0.real,
                                            None if s0 is None or a_im is None else s0.imag, cu_seqlens=cu_seqlens)
            final = (hr if a_im is None else torch.complex(hr, hi)) if output_final_state else None
            if per_channel:
                return o, final
            return o[..., None], (None if final is None else final[..., None, None])
        if per_channel and cu_seqlens is not None:  # float64 on CUDA, packed: the packed reference runs this layout
            # as it is (in head layout below it read v = None, the simplified operator's, and returned no per-channel o)
            if q.shape[1]:
                _warn_reference(caller, a_re, 1, 1, q.dtype)
            return _varlen_reference(q, k, v, a_re, a_im, initial_state, output_final_state, chunk_size, cu_seqlens)
        if per_channel:  # the reference runs in head layout
            q, k, v = q[..., None], k[..., None], (None if v is None else v[..., None])
            initial_state = None if initial_state is None else initial_state[..., None, None]
    B, n, H, d = q.shape
    e = 1 if v is None else v.shape[-1]
    if n == 0 and cu_seqlens is None:
        o, final = empty_scan((B, 0, H, e), (B, H, d, e), q.dtype, initial_state,
                              *(t for t in (q, k, v, a_re, a_im) if t is not None))
    elif a_re.ndim == 3 and kernel_path(q.device, q.dtype, d, e) == "chunked":
        return _chunk_gate_loop(q, k, v, a_re, a_im, initial_state, output_final_state, precision, chunk_size,
                                cu_seqlens=cu_seqlens)
    else:
        if on_kernels and n:
            _warn_reference(caller, a_re, d, e, q.dtype)
        if cu_seqlens is not None:  # a packed batch off the kernels' paths
            return _varlen_reference(q, k, v, a_re, a_im, initial_state, output_final_state, chunk_size, cu_seqlens)

        def heads_first(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], n, *t.shape[3:])
        gate = heads_first(torch.complex(a_re.to(rdt), torch.zeros_like(a_re, dtype=rdt) if a_im is None
                                         else a_im.to(rdt)))
        s0 = None if initial_state is None else initial_state.reshape(B * H, d, e)
        out, final = reference.chunked_reference(
            heads_first(q), heads_first(k), heads_first(torch.ones_like(k) if v is None else v),
            gate[..., None, None] if a_re.ndim == 3 else gate, s0, return_final_state=True, chunk_size=chunk_size)
        o, final = out.reshape(B, H, n, e).transpose(1, 2), final.reshape(B, H, d, e)
    if a_im is None:
        final = final.real
    if per_channel:
        o, final = o[..., 0], final[..., 0, 0]
    return o, (final if output_final_state else None)
