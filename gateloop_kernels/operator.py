"""Public scan operators with the seed's contracts.

Each checks its arguments once (:mod:`gateloop_kernels._checks`) and runs the scan through
:func:`gateloop_kernels.dispatch.scan`, the one place that picks the path (the elementwise op at head
dim 1, the chunked kernel on CUDA for ``16 <= d, e <= 256``, the chunked reference otherwise).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import lean
from ._checks import (GATE_HEAD, check_chunk_size, check_cu_seqlens, check_gate_loop_inputs, check_initial_state,
                      check_precision, check_simple_inputs)
from .chunked import chunk_gate_loop
from .dispatch import _WARNED, CHUNK_DIMS, DEFAULT_CHUNK, scan  # noqa: F401 (_WARNED: tests reset it here)
from .dtypes import KERNEL_DTYPES as kernel_dtypes
from .dtypes import out_dtype

__all__ = ["gate_loop_operator", "simple_gate_loop_operator", "kernel_dtypes", "chunk_kernel", "CHUNK_DIMS"]


def chunk_kernel() -> Callable:
    """The chunked head-dim-16..256 kernel entry, ``gateloop_kernels.chunked.chunk_gate_loop``."""
    return chunk_gate_loop


def gate_loop_operator(q: Tensor, k: Tensor, v: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                       return_final_state: bool = False, precision: str = "ieee", chunk_size: int = DEFAULT_CHUNK,
                       cp_group=None, check_shapes: bool = True, cu_seqlens: Optional[Tensor] = None):
    """Gate-loop scan: ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t``.

    Args:
        q, k: ``(B, n, d)`` real floating tensors.
        v: ``(B, n, e)`` real floating tensor.
        a: gate, complex (or real: a real gate), ``(B or 1, n, d or 1, e or 1)``, one per step (its time dim is
            ``n``): ``(B, n, 1, 1)`` one gate per sequence, ``(B, n, d, 1)`` one per key dim, ...
        initial_state: optional complex (or real) ``(B, d, e)`` state before the first step.
        return_final_state: also return the complex ``(B, d, e)`` state after the last step.
        precision, chunk_size: as in :func:`gateloop_kernels.gate_loop_heads`.
        cp_group: a ``torch.distributed`` process group over which the time axis is split (this rank
            passes its slice): :func:`gateloop_kernels.context_parallel.gate_loop_operator_cp`; ``check_shapes`` is
            its option (used with ``cp_group`` only).
        cu_seqlens: packed variable-length sequences, as in :func:`gateloop_kernels.gate_loop_heads`: inputs
            ``(1, T, d)`` / ``(1, T, e)``, ``a`` ``(1, T, ...)``, ``initial_state`` and the final state ``(N, d, e)``.
            With ``cp_group``: the group's global boundaries, the same on every rank.

    Returns:
        ``out: (B, n, e)`` in the promoted dtype of ``q, k, v``, or ``(out, final_state)``.

    CUDA inputs run the Triton kernels for a gate per head with ``d = e = 1`` or ``16 <= d, e <= 256``
    (float32/bfloat16/float16); anything else (a gate per key dim, other head dims, float64) runs the
    chunked PyTorch reference, with one warning per kind of input.

    Raises:
        TypeError: non-tensor or integer inputs, a non-int ``chunk_size``. ValueError: shapes, devices, an
        unknown ``precision``, a ``chunk_size`` that is not a power of two >= 16 (or above 128 on the chunked
        kernel); ``cu_seqlens`` errors as :func:`gateloop_kernels.gate_loop_heads`'s.
    """
    if cp_group is not None:
        from .context_parallel import gate_loop_operator_cp  # it imports this module

        return gate_loop_operator_cp(q, k, v, a, initial_state=initial_state, return_final_state=return_final_state,
                                     precision=precision, chunk_size=chunk_size, check_shapes=check_shapes,
                                     cp_group=cp_group, cu_seqlens=cu_seqlens)
    layout, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    N = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, n, q.device)
    check_initial_state(initial_state, B, d, e, q.device, N)
    check_precision(precision)
    chunk_size = check_chunk_size(chunk_size)
    odt = out_dtype(q, k, v)
    if initial_state is None and not return_final_state and layout == GATE_HEAD:
        out = lean.operator_call(q, k, v, a, odt, precision, chunk_size, cu_seqlens)
        if out is not None:
            return out
    q, k, v = q.to(odt), k.to(odt), v.to(odt)
    a_re, a_im = (a.real, a.imag) if a.is_complex() else (a, torch.zeros_like(a))
    if layout != GATE_HEAD:
        q, k, v, a_re, a_im = q[:, :, None], k[:, :, None], v[:, :, None], a_re[:, :, None], a_im[:, :, None]
        s0 = None if initial_state is None else initial_state[:, None]
    elif d == 1 and e == 1 and cu_seqlens is None:
        # (B, n, 1) sequences -> B channels of one batch, time contiguous: (1, n, B) views
        q, k, v = (t.reshape(B, n).t()[None] for t in (q, k, v))
        a_re, a_im = (t[:, :, 0, 0].expand(B, n).t()[None] for t in (a_re, a_im))
        s0 = None if initial_state is None else initial_state[:, 0, 0][None]
    else:
        q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
        a_re, a_im = (t[:, :, 0, 0].expand(B, n)[:, :, None] for t in (a_re, a_im))
        s0 = None if initial_state is None else initial_state[:, None]
    o, state = scan(q, k, v, a_re, a_im, s0, return_final_state, precision, chunk_size, "gate_loop_operator",
                    cu_seqlens)
    if q.ndim == 3:
        out, state = o[0].t()[..., None], (None if state is None else state[0][:, None, None])
    else:
        out, state = o[:, :, 0], (None if state is None else state[:, 0])
    return (out, state) if return_final_state else out


def simple_gate_loop_operator(q: Tensor, kv: Tensor, a: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None,
                              cu_seqlens: Optional[Tensor] = None):
    """The simplified gate loop (real gate, ``kv`` already formed, one state per channel).

    ``h_t = a_t h_{t-1} + kv_t``, ``out_t = q_t h_t``, starting from ``cache = (a_prev, kv_prev)``.

    Args:
        q, kv, a: ``(B, n, D)`` real floating tensors (``a`` is the gate, e.g. a sigmoid).
        cache: ``None`` or ``(a_prev, kv_prev)``, each ``(B, D)``, as returned by a previous call.
        cu_seqlens: packed variable-length sequences, as in :func:`gateloop_kernels.gate_loop_heads`
            (``B = 1``): the cache given and returned holds one entry per sequence, each ``(N, D)``.

    Returns:
        ``(out (B, n, D), (a_last, kv_last))``: ``a_last`` the product of every gate seen (cache
        included), ``kv_last`` the state after the last step; feed it back as ``cache``. Both are in the scan's
        state precision (float32 for 16-bit inputs, as ``out``'s dtype otherwise), not rounded to the inputs' dtype.

    Raises:
        TypeError / ValueError as :func:`gate_loop_operator`.
    """
    check_simple_inputs(q, kv, a, cache, cu_seqlens)
    odt = out_dtype(q, kv, a)
    q, kv, a = q.to(odt), kv.to(odt), a.to(odt)
    cache_a, cache_kv = (None, None) if cache is None else cache
    o, h_last = scan(q, kv, None, a, None, cache_kv, True, "ieee", DEFAULT_CHUNK, "simple_gate_loop_operator",
                     cu_seqlens)
    rdt = h_last.dtype
    if cu_seqlens is None:
        a_last = a.to(rdt).prod(dim=1)
    else:  # each sequence's product of gates: the final state of h_t = a_t h_{t-1} from h = 1, on the scan's path
        zeros, ones = torch.zeros_like(q), q.new_ones((cu_seqlens.shape[0] - 1, q.shape[2]))
        a_last = scan(zeros, zeros, None, a, None, ones, True, "ieee", DEFAULT_CHUNK, "simple_gate_loop_operator",
                      cu_seqlens)[1].to(rdt)
    if cache_a is not None:
        a_last = cache_a.to(rdt) * a_last
    # the cache stays in the scan's state precision (float32 for 16-bit inputs): a bf16 state lost every kv below
    # half its spacing, so decoding one token at a time drifted from (or stalled short of) one call's outputs
    return o, (a_last, h_last)
