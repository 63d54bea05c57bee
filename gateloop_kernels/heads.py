"""Head-aware entry point for layers: ``(B, n, H, d)`` tensors and a real parametrization of the gate.

Layers keep heads in the native ``(b, n, h, d)`` layout (no ``(b h) n d`` transposes) and never build
complex tensors: the gate is given either as log-magnitude and phase, or as the raw pre-activation
``z`` of the seed's ``polar(sigmoid(|z|), angle(z))``, computed here in real arithmetic.
Dispatch (in :mod:`gateloop_kernels.operator`): ``d = e = 1`` -> the elementwise scan op,
``16 <= d, e <= 256`` on CUDA -> the chunked kernel when present, anything else -> the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_gate_dtype, check_real_float, check_same_device
from .gate import SigmoidPolar
from .operator import scan_head_gate

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
    check_real_float("z", z)
    if z.shape[-1] != 2:
        raise ValueError(f"z must end in a dimension of 2 (real, imaginary), got {tuple(z.shape)}")
    return SigmoidPolar.apply(z)


def gate_from_log_polar(log_magnitude: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(log_magnitude + i phase)`` as ``(a_re, a_im)`` (float32, or float64 for float64 inputs)."""
    check_real_float("log_magnitude", log_magnitude)
    check_real_float("phase", phase)
    if log_magnitude.shape != phase.shape:
        raise ValueError(f"log_magnitude and phase must have one shape, got {tuple(log_magnitude.shape)} "
                         f"and {tuple(phase.shape)}")
    dt = torch.float64 if torch.float64 in (log_magnitude.dtype, phase.dtype) else torch.float32
    mag = torch.exp(log_magnitude.to(dt))
    ph = phase.to(dt)
    return mag * torch.cos(ph), mag * torch.sin(ph)


def gate_loop_heads(q: Tensor, k: Tensor, v: Tensor, *, log_magnitude: Optional[Tensor] = None,
                    phase: Optional[Tensor] = None, z: Optional[Tensor] = None,
                    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                    cp_group=None):
    """Gate-loop scan per head, ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t``, in head layout.

    Args:
        q, k: ``(B, n, H, d)``; v: ``(B, n, H, e)``; real floating (converted to their promoted dtype).
        log_magnitude, phase: ``(B, n, H)``, the gate ``exp(log_magnitude + i phase)``; or
        z: ``(B, n, H, 2)``, the gate ``polar(sigmoid(|z|), angle(z))`` (the seed's activation).
        initial_state: complex (or real: no imaginary part) ``(B, H, d, e)`` or ``None``.
        output_final_state: also return the final complex ``(B, H, d, e)`` state.
        cp_group: a ``torch.distributed`` process group over which the time axis is split (this rank
            passes its slice): :func:`gateloop_kernels.context_parallel.gate_loop_heads_cp`.

    Returns:
        ``(o, final_state)``: ``o (B, n, H, e)`` in the inputs' promoted dtype; ``final_state`` or ``None``.

    Raises:
        TypeError: wrong dtypes. ValueError: shapes, devices, or not exactly one gate form.
    """
    if cp_group is not None:
        from .context_parallel import gate_loop_heads_cp  # it imports this module

        return gate_loop_heads_cp(q, k, v, log_magnitude=log_magnitude, phase=phase, z=z, initial_state=initial_state,
                                  output_final_state=output_final_state, cp_group=cp_group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_real_float(name, t)
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, n, H, d) and v (B, n, H, e) with one (B, n, H); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (z is None) == (log_magnitude is None and phase is None) or (z is None and (log_magnitude is None or phase is None)):
        raise ValueError("give the gate either as z, or as both log_magnitude and phase")
    a_re, a_im = gate_from_preactivation(z) if z is not None else gate_from_log_polar(log_magnitude, phase)
    B, n, H, d = q.shape
    e = v.shape[-1]
    if tuple(a_re.shape) != (B, n, H):
        raise ValueError(f"the gate must be (B, n, H) = ({B}, {n}, {H}) (z: (B, n, H, 2)), got {tuple(a_re.shape)}")
    if initial_state is not None:
        check_gate_dtype("initial_state", initial_state)
        if tuple(initial_state.shape) != (B, H, d, e):
            raise ValueError(f"initial_state must be (B, H, d, e) = ({B}, {H}, {d}, {e}), got "
                             f"{tuple(initial_state.shape)}")
    check_same_device(q=q, k=k, v=v, gate=a_re, initial_state=initial_state)
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return scan_head_gate(q.to(dt), k.to(dt), v.to(dt), a_re, a_im, initial_state, output_final_state)
