"""Public scan operators with the seed's contracts; dispatch to the fastest path for the inputs.

CPU tensors (and shapes no kernel covers yet) run the chunked PyTorch reference
(:mod:`gateloop_kernels.reference`); CUDA tensors run the Triton kernels where they exist.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference

__all__ = ["gate_loop_operator", "simple_gate_loop_operator"]


def gate_loop_operator(q: Tensor, k: Tensor, v: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                       return_final_state: bool = False):
    """Gate-loop scan: ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t``.

    Args:
        q, k: ``(B, n, d)`` real floating tensors.
        v: ``(B, n, e)`` real floating tensor.
        a: gate, complex (or real: a real gate), 4 dims broadcastable to ``(B, n, d, e)``:
            ``(B, n, 1, 1)`` one gate per sequence, ``(B, n, d, 1)`` one per key dim, ...
        initial_state: optional complex ``(B, d, e)`` state before the first step.
        return_final_state: also return the complex ``(B, d, e)`` state after the last step.

    Returns:
        ``out: (B, n, e)`` in the promoted dtype of ``q, k, v``, or ``(out, final_state)``.

    Raises:
        TypeError: non-tensor or integer inputs. ValueError: shapes, devices.
    """
    return reference.chunked_reference(q, k, v, a, initial_state=initial_state,
                                       return_final_state=return_final_state)


def simple_gate_loop_operator(q: Tensor, kv: Tensor, a: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None):
    """The simplified gate loop (real gate, ``kv`` already formed, one state per channel).

    ``h_t = a_t h_{t-1} + kv_t``, ``out_t = q_t h_t``, starting from ``cache = (a_prev, kv_prev)``.

    Args:
        q, kv, a: ``(B, n, D)`` real floating tensors (``a`` is the gate, e.g. a sigmoid).
        cache: ``None`` or ``(a_prev, kv_prev)``, each ``(B, D)``, as returned by a previous call.

    Returns:
        ``(out (B, n, D), (a_last, kv_last))``: ``a_last`` the product of every gate seen (cache
        included), ``kv_last`` the state after the last step; feed it back as ``cache``.

    Raises:
        TypeError / ValueError as :func:`gate_loop_operator`.
    """
    return reference.simple_chunked_reference(q, kv, a, cache)
