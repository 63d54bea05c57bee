"""The chunked scan's op registration and entries: the forward and backward implementations on stacked
(Re, Im) float32 state planes, their fake implementations and autograd formula, registered once through
:class:`gateloop_kernels._custom_op.DifferentiableOp` (``gateloop::chunk_gate_loop_fwd`` / ``_bwd``), and the
entries :func:`chunk_gate_loop` (checks its arguments) and :func:`_chunk_gate_loop` (the dispatch's call).

All-real schemas: states travel as stacked (Re, Im) float32 planes (S, H, 2, d, e), S the batch or (packed batch)
the sequences; an absent final state / initial-state gradient is an empty tensor. A packed batch passes its
``cu_seqlens`` (for N only: the kernels read ``chunks``, its chunk table). Eager calls run the same
implementations through an autograd.Function (see ``_custom_op.py``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from .._checks import check_chunk_gate_loop_inputs
from .._custom_op import DifferentiableOp
from ..dtypes import cast, dense, empty_scan, promote
from .config import _DEFAULT_BT, _MODE_OF_DTYPE, MAX_BT, _dims, _gate_planes, _readable
from .gradients import _backward
from .outputs import _forward
from .states import _chunk_table


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor, h0: Optional[Tensor],
              output_final_state: bool, prec: str, BT: int, cu_seqlens: Optional[Tensor] = None,
              chunks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    B, n, H, K, V = _dims(q, v)
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if cu_seqlens is not None and B != 1:  # (e.g. a vmap folding its dim into the batch)
        raise ValueError(f"cu_seqlens: a packed batch has B = 1, got q of shape {tuple(q.shape)}")
    o, ht = _forward(q, k, v, a_re, a_im, h0, output_final_state, BT, _MODE_OF_DTYPE[q.dtype], prec, chunks, S)
    ht = ht.view(S, H, 2, K, V) if ht is not None else q.new_empty(0, dtype=torch.float32)
    return o, ht


def _fwd_fake(q, k, v, a_re, a_im, h0, output_final_state, prec, BT, cu_seqlens=None, chunks=None):
    B, n, H, K, V = _dims(q, v)
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = (S, H, 2, K, V) if output_final_state else (0,)
    return v.new_empty(v.shape), q.new_empty(shape, dtype=torch.float32)


def _bwd_impl(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor, h0: Optional[Tensor], do: Tensor,
              dht: Optional[Tensor], prec: str, BT: int, chunks: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd_run(q, k, v, a_re, a_im, h0, do, dht, prec, BT, chunks)


def backward_into(da_re: Tensor, da_im: Tensor) -> Callable:
    """:func:`_bwd_impl` writing the gate's gradient into ``da_re, da_im`` (float32 planes, both in one layout
    :func:`.config._gate_step` takes: e.g. a complex gradient's parts in place), for
    ``_chunk_op.vjp_saved(..., backward=)``."""
    return functools.partial(_bwd_run, da_out=(da_re, da_im))


def _bwd_run(q, k, v, a_re, a_im, h0, do, dht, prec, BT, chunks=None, da_out=None):
    """:func:`_bwd_impl`, the gate's gradient written into ``da_out`` where given."""
    _, _, H, K, V = _dims(q, v)
    dq, dk, dv, da_re, da_im, dh0 = _backward(q, k, v, a_re, a_im, h0, dense(do), dht, BT,
                                              _MODE_OF_DTYPE[q.dtype], prec, chunks, da_out)
    dh0 = dh0.view(h0.shape[0], H, 2, K, V) if dh0 is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, da_re, da_im, dh0


def _bwd_fake(q, k, v, a_re, a_im, h0, do, dht, prec, BT, chunks=None):
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(a_re),
            torch.empty_like(a_im), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, a_re, a_im, h0, output_final_state, prec, BT = inputs[:9]
    chunks = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(q, k, v, a_re, a_im, h0, chunks)
    ctx.cfg = (output_final_state, prec, BT, len(inputs))


def _vjp(ctx, backward, do, dht):
    q, k, v, a_re, a_im, h0, chunks = ctx.saved_tensors
    output_final_state, prec, BT, n_inputs = ctx.cfg
    if not output_final_state:
        dht = None
    elif dht is not None:
        dht = dht.to(torch.float32).contiguous()
    dq, dk, dv, da_re, da_im, dh0 = backward(q, k, v, a_re, a_im, h0, cast(do, q.dtype), dht, prec, BT, chunks)
    return (dq, dk, dv, da_re, da_im, dh0 if h0 is not None else None) + (None,) * (n_inputs - 6)


_chunk_op = DifferentiableOp(("gateloop::chunk_gate_loop_fwd", "gateloop::chunk_gate_loop_bwd"), "ChunkGateLoop",
                             _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, _setup_context, _vjp)


def chunk_gate_loop(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    precision: str = "ieee", *, chunk_size: int = _DEFAULT_BT):
    """Chunked gate-loop scan with a complex gate per head (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        q, k: ``(B, n, H, d)``; v: ``(B, n, H, e)``; float32, bfloat16 or float16 (one dtype is used:
            the promoted one), ``16 <= d, e <= 256``.
        a_re, a_im: ``(B, n, H)`` real and imaginary parts of the gate ``a_t`` (computed in float32).
            Zero gates (hard resets) are legal.
        initial_state: optional complex ``(B, H, d, e)`` state before step 0.
        output_final_state: also return the complex ``(B, H, d, e)`` state after the last step.
        precision: float32 dots: ``"ieee"`` (default, exact to float32: runs as 3xTF32, which
            measured ~2e-7 relative per dot on the H100, like FFMA, at 6x the speed), ``"tf32x3"``
            (the same) or ``"tf32"`` (fast opt-in, ~1e-3 relative). 16-bit inputs
            use their own tensor-core dots whatever this says (float32 accumulation).
        chunk_size: steps per chunk (a power of two in [16, 128]; 64 by default).

    Returns:
        ``(o, final_state)``: ``o (B, n, H, e)`` in the input dtype; ``final_state`` complex64
        ``(B, H, d, e)`` or ``None``. Differentiable in q, k, v, a_re, a_im and initial_state.

    Non-finite inputs stay causal: a NaN or Inf in q, k, v or the gate at step t reaches no output before t, nor
    another sequence or head; wherever the exact (sequential) output or gradient is finite, so is ours (up to
    the overflow limitation below).

    Limitation: each chunk forms the scores ``q_t . k_s`` before weighting them by ``v``, so an output that fits
    the dtype can still overflow when ``|q| |k|`` alone exceeds its range (e.g. float32 ``q, k ~ 1e19`` with
    ``v ~ 1e-38``: exact outputs ~40, ours inf; the sequential reference forms ``k v^T`` first). fp16 inputs
    form the scores in float32 (fp16 range only bounds q, k, v and the outputs).
    """
    chunk_size = check_chunk_gate_loop_inputs(q, k, v, a_re, a_im, initial_state, precision, chunk_size)
    return _chunk_gate_loop(q, k, v, a_re, a_im, initial_state, output_final_state, precision, chunk_size)


def _chunk_gate_loop(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor, initial_state: Optional[Tensor],
                     output_final_state: bool, precision: str, chunk_size: int, cu_seqlens: Optional[Tensor] = None):
    """:func:`chunk_gate_loop` on checked arguments (the dispatch's call: the public entries checked them).

    ``cu_seqlens`` (1-D int32/int64 on the inputs' device, ``[0, l_1, ..., T]``, validated by the caller): the
    inputs are one packed batch (``B = 1``, ``T`` steps) of ``N`` sequences, each scanned from its own initial
    state (``initial_state`` complex ``(N, H, d, e)``, zero without) as if alone: ``S = a S0_i + k v^T`` at its
    first step, so that step's gate only multiplies ``S0_i``. The final states are ``(N, H, d, e)``; an empty
    sequence's is its initial state. One launch sequence for the whole batch, no host synchronisation (the
    kernels read the chunk table, :func:`_chunk_table`, on the device)."""
    B, n, H, d = q.shape
    e = v.shape[-1]
    dtype = promote(q.dtype, k.dtype, v.dtype)
    if dtype not in _MODE_OF_DTYPE:
        dtype = torch.float32
    q, k, v = (t.to(dtype) for t in (q, k, v))
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(torch.complex64)
        h0 = torch.stack([h0.real, h0.imag], dim=2).contiguous()  # (S, H, 2, d, e)
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if n == 0:
        o, ht = empty_scan((B, 0, H, e), (S, H, d, e), dtype, initial_state, q, k, v, a_re, a_im)
        return o, (ht.to(torch.complex64) if output_final_state else None)
    o, ht = _chunk_op(*op_args(q, k, v, a_re, a_im, h0, output_final_state, precision, chunk_size, cu_seqlens))
    return o, (torch.complex(ht[:, :, 0], ht[:, :, 1]) if output_final_state else None)


def op_args(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor, h0: Optional[Tensor],
            output_final_state: bool, precision: str, chunk_size: int, cu_seqlens: Optional[Tensor]) -> tuple:
    """:data:`_chunk_op`'s arguments for inputs in one kernel dtype: q and k as they are where the kernels read them in
    place (:func:`.config._readable`: dense, or views of one fused projection's output), else dense copies; v dense;
    float32 gates (a complex gate's parts read in place, :func:`.config._gate_planes`), ``h0`` as stacked (Re, Im)
    planes, the precision the kernels run and, for a packed batch, ``cu_seqlens`` and its chunk table. ``(B, n, d)``
    inputs with ``(B, n)`` gate planes are one head (:func:`.config._dims`): outputs and gradients then come as
    ``(B, n, e)``, ``(B, n, d)``; outputs and gradients are always dense."""
    if chunk_size > MAX_BT:
        raise ValueError(f"chunk_size must be at most {MAX_BT} on the chunked Triton kernels' path (CUDA, head dims "
                         f"16..256), got {chunk_size}")
    # exact float32: Triton's IEEE (FFMA) dots are ~6x slower than 3xTF32 on Hopper at the same accuracy
    # (docs/design.md section 6), so "ieee" runs 3xTF32
    H, K = _dims(q, v)[2:4]
    args = (*_readable(q, k, H, K)[:2], dense(v), *_gate_planes(a_re, a_im, H)[:2], h0,
            output_final_state, "tf32x3" if precision == "ieee" else precision, chunk_size)
    if cu_seqlens is not None:
        args += (cu_seqlens, _chunk_table(cu_seqlens, q.shape[1], chunk_size))
    return args
