"""Head-aware entry point for layers: ``(B, n, H, d)`` tensors and a real parametrization of the gate.

Layers keep heads in the native ``(b, n, h, d)`` layout (no ``(b h) n d`` transposes) and never build
complex tensors: the gate is given either as log-magnitude and phase, or as the raw pre-activation
``z`` of the seed's ``polar(sigmoid(|z|), angle(z))``, computed here in real arithmetic.
The path is picked by :func:`gateloop_kernels.dispatch.scan`: ``d = e = 1`` -> the elementwise scan op,
``16 <= d, e <= 256`` on CUDA -> the chunked kernel, anything else -> the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import lean
from ._checks import check_chunk_size, check_heads_inputs, check_log_polar, check_precision, check_preactivation
from .dispatch import DEFAULT_CHUNK, scan
from .dtypes import promote
from .gate import SigmoidPolar, polar_parts

__all__ = ["gate_loop_heads", "gate_from_preactivation", "gate_from_log_polar"]


def gate_from_preactivation(z: Tensor) -> tuple[Tensor, Tensor]:
    """The seed's gate ``polar(sigmoid(|z|), angle(z))`` of ``z = z[..., 0] + i z[..., 1]``, in real arithmetic.

    Args:
        z: ``(..., 2)`` real floating tensor.

    Returns:
        ``(a_re, a_im)``, each ``z.shape[:-1]``, float32 (float64 for float64 ``z``). At ``z = 0``
        the gate is ``0.5`` (angle 0) with gradient zero. Backward recomputes from ``z`` (nothing
        else is saved). On CUDA one Triton kernel each way (:mod:`gateloop_kernels.gate`).
    """
    check_preactivation(z)
    return SigmoidPolar.apply(z)


def gate_from_log_polar(log_magnitude: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(log_magnitude + i phase)`` as ``(a_re, a_im)`` (float32, or float64 for float64 inputs)."""
    check_log_polar(log_magnitude, phase)
    return polar_parts(log_magnitude, phase)


def gate_loop_heads(q: Tensor, k: Tensor, v: Tensor, *, log_magnitude: Optional[Tensor] = None,
                    phase: Optional[Tensor] = None, z: Optional[Tensor] = None,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    precision: str = "ieee", chunk_size: int = DEFAULT_CHUNK, cp_group=None, check_shapes: bool = True,
                    cu_seqlens: Optional[Tensor] = None):
    """Gate-loop scan per head, ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t``, in head layout.

    Args:
        q, k: ``(B, n, H, d)``; v: ``(B, n, H, e)``; real floating (converted to their promoted dtype).
        log_magnitude, phase: ``(B, n, H)``, the gate ``exp(log_magnitude + i phase)``; or
        z: ``(B, n, H, 2)``, the gate ``polar(sigmoid(|z|), angle(z))`` (the seed's activation).
        initial_state: complex (or real: no imaginary part) ``(B, H, d, e)`` or ``None``.
        output_final_state: also return the final complex ``(B, H, d, e)`` state.
        precision: float32 dots of the chunked kernel: ``"ieee"`` (default, exact to float32, run as three
            TF32 products), ``"tf32x3"`` (the same) or ``"tf32"`` (fast, ~1e-3 relative); 16-bit inputs and
            the other paths do not use it.
        chunk_size: steps per chunk of the chunked kernel and of the PyTorch reference, a power of two
            ``>= 16`` (default 64; at most 128 on the chunked kernel); the head-dim-1 scan picks its own tiles.
        cp_group: a ``torch.distributed`` process group over which the time axis is split (this rank
            passes its slice): :func:`gateloop_kernels.context_parallel.gate_loop_heads_cp`; ``check_shapes`` is its
            option (used with ``cp_group`` only).
        cu_seqlens: packed variable-length sequences: ``None``, or 1-D int32/int64 ``[0, l_1, l_1 + l_2, ..., n]``
            on the inputs' device, for ``B = 1`` holding ``N = len(cu_seqlens) - 1`` sequences (tokens
            ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``, lengths >= 0). Each sequence scans alone from
            ``initial_state[i]`` (zero without), so ``initial_state`` and the final state are ``(N, H, d, e)``;
            the gate of a sequence's first token multiplies only its initial state; an empty sequence's final
            state is its initial one. No host synchronisation (values checked as
            :func:`gateloop_kernels._checks.check_cu_seqlens` says). With ``cp_group``: the group's global
            boundaries, the same on every rank (sequences may cross ranks).

    Returns:
        ``(o, final_state)``: ``o (B, n, H, e)`` in the inputs' promoted dtype; ``final_state`` or ``None``.

    Raises:
        TypeError: wrong dtypes, a non-int ``chunk_size``, a ``cu_seqlens`` not int32/int64. ValueError: shapes,
        devices, not exactly one gate form, an unknown ``precision``, a ``chunk_size`` that is not a power of two
        >= 16 (or above 128 on the chunked kernel), a ``cu_seqlens`` not 1-D or with ``B != 1`` or bad values, an
        ``initial_state`` without ``N`` states.
    """
    if cp_group is not None:
        from .context_parallel import gate_loop_heads_cp  # it imports this module

        return gate_loop_heads_cp(q, k, v, log_magnitude=log_magnitude, phase=phase, z=z, initial_state=initial_state,
                                  output_final_state=output_final_state, precision=precision, chunk_size=chunk_size,
                                  check_shapes=check_shapes, cp_group=cp_group, cu_seqlens=cu_seqlens)
    check_heads_inputs(q, k, v, z, log_magnitude, phase, initial_state, cu_seqlens)
    check_precision(precision)
    chunk_size = check_chunk_size(chunk_size)
    dt = promote(q.dtype, k.dtype, v.dtype)
    if initial_state is None and not output_final_state:
        o = lean.heads_call(q, k, v, z, log_magnitude, phase, dt, precision, chunk_size, cu_seqlens)
        if o is not None:
            return o, None
    a_re, a_im = SigmoidPolar.apply(z) if z is not None else polar_parts(log_magnitude, phase)
    return scan(q.to(dt), k.to(dt), v.to(dt), a_re, a_im, initial_state, output_final_state, precision, chunk_size,
                "gate_loop_heads", cu_seqlens)
