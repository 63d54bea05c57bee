"""The scan's dtype policy, shared by the kernels, the dispatch and the references.

Outputs come back in the promoted real dtype of ``q, k, v`` (the gate's precision does not decide it:
there is no complex bf16); state and accumulation run in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

__all__ = ["KERNEL_DTYPES", "PRECISIONS", "real_dtype", "out_dtype", "acc_dtypes", "cast", "empty_scan"]

#: input dtypes the Triton kernels take (state and accumulation are float32 for all of them)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``precision`` of float32 dots on the chunked kernel: "ieee" exact to float32 (the default, run as three
#: TF32 products), "tf32x3" the same by name, "tf32" the fast opt-in (~1e-3 relative)
PRECISIONS = ("ieee", "tf32x3", "tf32")


def real_dtype(t: Tensor) -> torch.dtype:
    """The real dtype of ``t`` (its own dtype unless complex)."""
    return t.real.dtype if t.is_complex() else t.dtype


@functools.lru_cache(maxsize=None)
def _promote2(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.promote_types(a, b)


def promote(*dtypes: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` over ``dtypes``, memoized: a dict lookup where each call is a dispatched aten operator
    (host time on every layer call)."""
    if torch.compiler.is_compiling():  # dynamo warns of "silent incorrectness" at a traced lru_cache; a constant here
        return functools.reduce(torch.promote_types, dtypes)
    return functools.reduce(_promote2, dtypes)


def out_dtype(*ts: Tensor) -> torch.dtype:
    """Promoted real dtype of the inputs: the dtype outputs are returned in."""
    return promote(*(real_dtype(t) for t in ts))


def acc_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(real, complex) accumulation dtypes: float64 stays float64, everything else runs in float32."""
    return (torch.float64, torch.complex128) if dtype == torch.float64 else (torch.float32, torch.complex64)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where it would return ``t`` (the eager path's host time: ~1-3 us a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def dense(t: Tensor) -> Tensor:
    """``t.contiguous()`` without the call where it would return ``t`` (a dispatched call: ~1-2 us of host time)."""
    return t if t.is_contiguous() else t.contiguous()


def empty_scan(out_shape: tuple, state_shape: tuple, dtype: torch.dtype, initial_state: Optional[Tensor],
               *inputs: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, final_state)`` of an empty sequence (``n = 0``): ``out`` has no values but is a function of
    every input that needs grad (their sums are 0), so a backward gives each its (empty) gradient as at
    ``n > 0``; the final state is the initial one (zeros without), complex in ``dtype``'s accumulation."""
    out = torch.zeros(out_shape, dtype=dtype, device=inputs[0].device)
    for t in (*inputs, initial_state):
        if t is not None and t.requires_grad:
            out = out + t.real.sum().to(dtype)
    cdt = acc_dtypes(dtype)[1]
    state = (torch.zeros(state_shape, dtype=cdt, device=out.device) if initial_state is None
             else initial_state.to(cdt))
    return out, state
