"""One recurrent step of the gate-loop scan for every head at once: the decode step of generation.

``a = polar(sigmoid(|z|), angle z)``, ``S <- a S + k v^T`` in place on the cached complex state,
``o = Re(S)^T q``. On CUDA (or on the CPU under the Triton interpreter inside :func:`interpreted`)
float32/bf16/fp16 inputs with a complex64 state run one Triton launch for all batch rows and heads,
head dims 1..256, with no host synchronisation and no allocation but the output, so a decode loop
built on it can be captured in a CUDA graph. Everything else (the CPU, float64) runs the PyTorch step
:func:`decode_step_reference`, the same operations in the same order as
:func:`gateloop_kernels.reference.sequential_reference`.

The state is the one ``gate_loop_heads(..., output_final_state=True)`` returns: complex ``(B, H, d, e)``,
complex64 (complex128 for float64 inputs), contiguous; the kernel reads and writes its interleaved
real/imaginary float32 parts (``torch.view_as_real``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_real_float, check_same_device
from ._launch import Launcher
from .dtypes import promote
from .gate import _parts, reference_forward

__all__ = ["gate_loop_decode_step", "decode_step_reference", "interpreted", "MAX_HEAD_DIM"]

#: largest head (key and value) dim the kernel takes
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # state entries per program: 32 per thread at 4 warps, real and imaginary in registers
_MIN_PROGRAMS = 128  # about one per SM
_INTERPRETED = False


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """Run the kernel on CPU tensors too (needs ``TRITON_INTERPRET=1``): the tests' way to check it."""
    global _INTERPRETED
    prev, _INTERPRETED = _INTERPRETED, True
    try:
        yield
    finally:
        _INTERPRETED = prev


@Launcher
@triton.jit
def _decode_kernel(q, k, v, z, S, o, R, H, d, e,
                   sqb, sqh, skb, skh, svb, svh, sob, soh,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, GATE: tl.constexpr):
    # a [BLOCK_R rows (b, h), BLOCK_D, BLOCK_E] tile of the state; the whole d is in one program, so
    # the reduction over d for o needs no second pass
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    ee = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rm, dm, em = r < R, dd < d, ee < e
    b, h = r // H, r % H
    qk_m = rm[:, None] & dm[None, :]
    qv = tl.load(q + (b * sqb + h * sqh)[:, None] + dd[None, :], mask=qk_m, other=0.0).to(tl.float32)
    kv_ = tl.load(k + (b * skb + h * skh)[:, None] + dd[None, :], mask=qk_m, other=0.0).to(tl.float32)
    ve_m = rm[:, None] & em[None, :]
    vv = tl.load(v + (b * svb + h * svh)[:, None] + ee[None, :], mask=ve_m, other=0.0).to(tl.float32)
    if GATE:
        _, _, s, c, sn = _parts(z, r, rm)  # z contiguous (R, 2): gate r at z + 2 r
        a_re = (s * c)[:, None, None]
        a_im = (s * sn)[:, None, None]
    m3 = rm[:, None, None] & dm[None, :, None] & em[None, None, :]
    offs = 2 * ((r * d * e)[:, None, None] + (dd * e)[None, :, None] + ee[None, None, :])
    s_re = tl.load(S + offs, mask=m3, other=0.0)
    s_im = tl.load(S + offs + 1, mask=m3, other=0.0)
    outer = kv_[:, :, None] * vv[:, None, :]
    if GATE:
        n_re = a_re * s_re - a_im * s_im + outer
        n_im = a_re * s_im + a_im * s_re
    else:
        n_re = s_re + outer
        n_im = s_im
    tl.store(S + offs, n_re, mask=m3)
    tl.store(S + offs + 1, n_im, mask=m3)
    out = tl.sum(qv[:, :, None] * n_re, axis=1)
    tl.store(o + (b * sob + h * soh)[:, None] + ee[None, :], out.to(o.dtype.element_ty), mask=ve_m)


def _blocks(R: int, d: int, e: int) -> tuple[int, int, int]:
    bd = triton.next_power_of_2(d)
    be = min(triton.next_power_of_2(e), max(1, _TILE // bd))
    br = min(triton.next_power_of_2(R), max(1, _TILE // (bd * be)), 1024)
    # few rows (batch 1): narrower value blocks, so that more SMs share the state's traffic
    while be > 8 and -(-R // br) * -(-e // be) < _MIN_PROGRAMS:
        be //= 2
    return br, bd, be


def _last_dim_dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def decode_kernel_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, z: Optional[Tensor]) -> Tensor:
    """The Triton step (arguments as :func:`gate_loop_decode_step`, already checked and of one dtype)."""
    B, H, d = q.shape
    e = v.shape[-1]
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    o = torch.empty((B, H, e), dtype=q.dtype, device=q.device)
    R = B * H
    if R * d * e == 0:  # an empty state: nothing to update, and o is a sum over no key dims
        return o.zero_()
    br, bd, be = _blocks(R, d, e)
    zz = q if z is None else z.contiguous()
    grid = (-(-R // br), -(-e // be))
    _decode_kernel[grid](q, k, v, zz, torch.view_as_real(state), o, R, H, d, e,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         o.stride(0), o.stride(1),
                         BLOCK_R=br, BLOCK_D=bd, BLOCK_E=be, GATE=z is not None,
                         num_warps=4 if bd * be * br <= 2048 else 8)
    return o


def decode_step_reference(q: Tensor, k: Tensor, v: Tensor, state: Tensor, z: Optional[Tensor]) -> Tensor:
    """The PyTorch step (arguments as :func:`gate_loop_decode_step`): the sequential reference's update,
    in place on ``state``, elementwise only (autocast leaves it in the state's precision)."""
    rdt = state.real.dtype
    kv = k.to(rdt)[..., :, None] * v.to(rdt)[..., None, :]
    if z is None:
        state.add_(kv)
    else:
        a_re, a_im = reference_forward(z)
        state.mul_(torch.complex(a_re.to(rdt), a_im.to(rdt))[..., None, None]).add_(kv)
    return (q.to(rdt)[..., :, None] * state.real).sum(dim=-2).to(q.dtype)


def _use_kernel(q: Tensor, state: Tensor) -> bool:
    # a conjugate view has no real/imaginary view for the kernel to write (PyTorch updates it in place)
    return ((q.is_cuda or _INTERPRETED) and q.dtype in _KERNEL_DTYPES and state.dtype == torch.complex64
            and not state.is_conj() and q.shape[-1] <= MAX_HEAD_DIM and not torch.compiler.is_compiling())


def gate_loop_decode_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, *, z: Optional[Tensor]) -> Tensor:
    """One step of the gate loop for all heads, updating ``state`` in place.

    Args:
        q, k: ``(B, H, d)``; v: ``(B, H, e)``; real floating (computed in their promoted dtype).
        state: complex ``(B, H, d, e)``, contiguous: complex64 (complex128 for float64 inputs), as returned
            by ``gate_loop_heads(..., output_final_state=True)``. Overwritten with ``a S + k v^T``.
        z: ``(B, H, 2)``, the gate's pre-activation (``polar(sigmoid(|z|), angle z)``, as
            :func:`gateloop_kernels.gate_from_preactivation`), or ``None`` for the gate 1 (no decay).

    Returns:
        ``o (B, H, e)`` in the inputs' promoted dtype, ``Re(S)^T q`` of the updated state.

    Inference only: no autograd graph is built through the step (the state is overwritten).

    Raises:
        TypeError: ``q``, ``k``, ``v``, ``z`` not real floating tensors, ``state`` not complex or not the complex
        dtype of the inputs (complex64, complex128 for float64). ValueError: shapes other than the above, tensors
        on more than one device, a non-contiguous ``state``. RuntimeError: called where autograd would need a graph
        through the step (an input requiring grad with grad mode on); the layers take the scan there instead.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_real_float(name, t)
    if z is not None:
        check_real_float("z", z)
    if not isinstance(state, Tensor) or not state.is_complex():
        raise TypeError(f"state must be a complex tensor, got "
                        f"{state.dtype if isinstance(state, Tensor) else type(state).__name__}")
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k must be (B, H, d) and v (B, H, e) with one (B, H); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, d = q.shape
    e = v.shape[-1]
    if tuple(state.shape) != (B, H, d, e):
        raise ValueError(f"state must be (B, H, d, e) = ({B}, {H}, {d}, {e}), got {tuple(state.shape)}")
    if z is not None and tuple(z.shape) != (B, H, 2):
        raise ValueError(f"z must be (B, H, 2) = ({B}, {H}, 2), got {tuple(z.shape)}")
    check_same_device(q=q, k=k, v=v, state=state, z=z)
    dt = promote(q.dtype, k.dtype, v.dtype)
    want = torch.complex128 if dt == torch.float64 else torch.complex64
    if state.dtype != want:
        raise TypeError(f"state must be {want} for {dt} inputs, got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, z, state)):
        raise RuntimeError("the decode step is inference-only (it overwrites the state): run it under "
                           "torch.no_grad() or torch.inference_mode()")
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if _use_kernel(q, state):
        return decode_kernel_step(q, k, v, state, z)
    return decode_step_reference(q, k, v, state, z)
