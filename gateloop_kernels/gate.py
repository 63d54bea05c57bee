"""The seed's gate activation ``polar(sigmoid(|z|), angle(z))`` in real arithmetic, fused.

``z = (B, n, H, 2)`` holds the real and imaginary parts of the pre-activation. The PyTorch reference
(``_reference_parts``, forward and backward formulas below) is the oracle and the path on the CPU, for
float64 and under torch.compile (inductor fuses it there); on CUDA eager calls run one Triton kernel
forward and one backward (``gate_forward`` / ``gate_backward``) instead of ~12 + ~25 elementwise
kernels, which at head dim 1 (one gate per channel) were a fifth of a bf16 model step.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._eager import with_transforms
from ._launch import Launcher
from .dtypes import dense

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: devices whose tensors take the gate kernels (read at call time: tools and tests add "cpu" under TRITON_INTERPRET=1)
KERNEL_DEVICES = ("cuda",)
_BLOCK = 1024  # grids are computed on the host as -(-N // _BLOCK): recent Triton's triton.cdiv costs ~9 us a call


@triton.jit
def _parts(z, offs, m):
    """(nonzero, r, sigmoid(r), cos, sin) of the gates at ``offs`` (float32); r = 1 where z = 0.

    |z| is scaled by max(|x|, |y|) before squaring (as hypot does): x^2 + y^2 underflows below ~1e-19 and
    overflows above ~1e19 in float32. A NaN passes through (it is not taken for z = 0)."""
    x = tl.load(z + 2 * offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(z + 2 * offs + 1, mask=m, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    ay = tl.abs(y)
    big = tl.maximum(ax, ay, propagate_nan=tl.PropagateNan.ALL)
    nz = big != 0.0
    den = tl.where(nz, big, 1.0)  # a quotient, not a reciprocal: 1 / big overflows for subnormal big
    # the larger component scales to +-1 exactly (also at infinity, where x / big is NaN)
    xs = tl.where(ax == big, tl.where(x < 0, -1.0, 1.0), tl.div_rn(x, den))
    ys = tl.where(ay == big, tl.where(y < 0, -1.0, 1.0), tl.div_rn(y, den))
    unit = tl.sqrt_rn(xs * xs + ys * ys)  # in [1, sqrt(2)]
    r = tl.where(nz, big * unit, 1.0)
    s = tl.sigmoid(tl.where(nz, r, 0.0))
    c = tl.where(nz, tl.div_rn(xs, unit), 1.0)
    sn = tl.where(nz, tl.div_rn(ys, unit), 0.0)
    return nz, r, s, c, sn


@Launcher
@triton.jit
def _gate_fwd_kernel(z, a_re, a_im, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    _, _, s, c, sn = _parts(z, offs, m)
    tl.store(a_re + offs, s * c, mask=m)
    tl.store(a_im + offs, s * sn, mask=m)


@Launcher
@triton.jit
def _gate_bwd_kernel(z, g_re, g_im, dz, N, BLOCK: tl.constexpr, HAS_RE: tl.constexpr, HAS_IM: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    nz, r, s, c, sn = _parts(z, offs, m)
    gr = tl.load(g_re + offs, mask=m, other=0.0).to(tl.float32) if HAS_RE else tl.zeros_like(r)
    gi = tl.load(g_im + offs, mask=m, other=0.0).to(tl.float32) if HAS_IM else tl.zeros_like(r)
    ds = s * (1 - s)  # d sigmoid / d r
    t = tl.div_rn(s, r)  # the angular part's 1/r
    mixed = (ds - t) * c * sn
    gx = gr * (ds * c * c + t * sn * sn) + gi * mixed
    gy = gr * mixed + gi * (ds * sn * sn + t * c * c)
    gx = tl.where(nz, gx, 0.0)  # the gate is a constant 0.5 at z = 0
    gy = tl.where(nz, gy, 0.0)
    gx = tl.where(r == float("inf"), float("nan"), gx)  # an infinite z has no derivative (the seed's: NaN)
    gy = tl.where(r == float("inf"), float("nan"), gy)
    tl.store(dz + 2 * offs, gx.to(dz.dtype.element_ty), mask=m)
    tl.store(dz + 2 * offs + 1, gy.to(dz.dtype.element_ty), mask=m)


def gate_forward(z: Tensor) -> tuple[Tensor, Tensor]:
    """Kernel forward: contiguous ``z (..., 2)`` float32/bf16/fp16 on CUDA (or the CPU under
    ``TRITON_INTERPRET=1``) -> ``(a_re, a_im)``, float32, ``z.shape[:-1]``."""
    N = z.numel() // 2
    a_re = torch.empty(z.shape[:-1], dtype=torch.float32, device=z.device)
    a_im = torch.empty_like(a_re)
    if N:
        _gate_fwd_kernel[(-(-N // _BLOCK),)](z, a_re, a_im, N, BLOCK=_BLOCK)
    return a_re, a_im


def gate_backward(z: Tensor, g_re: Optional[Tensor], g_im: Optional[Tensor]) -> Tensor:
    """Kernel backward: ``dz`` (``z``'s shape and dtype) from the gradients of ``a_re``, ``a_im``
    (contiguous, ``z.shape[:-1]``, any float dtype; ``None`` is zero)."""
    N = z.numel() // 2
    dz = torch.empty_like(z)
    if N:
        _gate_bwd_kernel[(-(-N // _BLOCK),)](z, z if g_re is None else g_re, z if g_im is None else g_im,
                                             dz, N, BLOCK=_BLOCK, HAS_RE=g_re is not None, HAS_IM=g_im is not None)
    return dz


def _reference_parts(z: Tensor):
    """:func:`_parts` in PyTorch: |z| without squaring, NaN passed through."""
    zf = z.double() if z.dtype == torch.float64 else z.float()
    x, y = zf[..., 0], zf[..., 1]
    ax, ay = x.abs(), y.abs()
    big = torch.maximum(ax, ay)
    nz = big != 0
    one = torch.ones_like(big)
    den = torch.where(nz, big, one)  # a quotient, not a reciprocal: 1 / big overflows for subnormal big
    xs = torch.where(ax == big, torch.where(x < 0, -one, one), x / den)
    ys = torch.where(ay == big, torch.where(y < 0, -one, one), y / den)
    unit = torch.sqrt(xs * xs + ys * ys)
    r = torch.where(nz, big * unit, one)
    mag = torch.sigmoid(torch.where(nz, r, torch.zeros_like(r)))
    cos = torch.where(nz, xs / unit, one)
    sin = torch.where(nz, ys / unit, torch.zeros_like(r))
    return nz, r, mag, cos, sin


def reference_forward(z: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch forward: ``(a_re, a_im)`` float32 (float64 for float64 ``z``)."""
    _, _, mag, cos, sin = _reference_parts(z)
    return mag * cos, mag * sin


def reference_backward(z: Tensor, g_re: Optional[Tensor], g_im: Optional[Tensor]) -> Tensor:
    """PyTorch backward: ``dz`` in ``z``'s dtype (the derivative of the polar form, zero at ``z = 0``)."""
    nz, r, s, c, sn = _reference_parts(z)
    g_re = torch.zeros_like(r) if g_re is None else g_re.to(r.dtype)
    g_im = torch.zeros_like(r) if g_im is None else g_im.to(r.dtype)
    ds = s * (1 - s)
    t = s / r
    mixed = (ds - t) * c * sn
    gx = g_re * (ds * c * c + t * sn * sn) + g_im * mixed
    gy = g_re * mixed + g_im * (ds * sn * sn + t * c * c)
    zero, nan = torch.zeros_like(gx), torch.full_like(gx, float("nan"))
    gx, gy = torch.where(nz, gx, zero), torch.where(nz, gy, zero)
    gx, gy = torch.where(r.isinf(), nan, gx), torch.where(r.isinf(), nan, gy)  # an infinite z has no derivative
    return torch.stack([gx, gy], dim=-1).to(z.dtype)


def _use_kernel(z: Tensor) -> bool:
    # torch.func hands the backward its wrappers, which a kernel cannot read: the reference runs there
    return (z.device.type in KERNEL_DEVICES and z.dtype in _KERNEL_DTYPES and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def sigmoid_polar_parts(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(a_re, a_im)`` of ``z (..., 2)`` without autograd: the kernel where it applies, else PyTorch."""
    z = dense(z)
    return gate_forward(z) if _use_kernel(z) else reference_forward(z)


def sigmoid_polar_grad(z: Tensor, g_re: Optional[Tensor], g_im: Optional[Tensor]) -> Tensor:
    """``dz`` from the gradients of :func:`sigmoid_polar_parts`' outputs (``None``: zero)."""
    z = dense(z)
    if _use_kernel(z):
        return gate_backward(z, None if g_re is None else dense(g_re), None if g_im is None else dense(g_im))
    return reference_backward(z, g_re, g_im)


def polar_parts(log_magnitude: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(log_magnitude + i phase)`` as ``(a_re, a_im)``, float32 (float64 if either input is)."""
    dt = torch.float64 if torch.float64 in (log_magnitude.dtype, phase.dtype) else torch.float32
    mag = torch.exp(log_magnitude.to(dt))
    ph = phase.to(dt)
    return mag * torch.cos(ph), mag * torch.sin(ph)


class _SigmoidPolarTransformed(torch.autograd.Function):
    """:class:`SigmoidPolar` in the ``setup_context`` form, with a vmap rule (elementwise: a mapped dim is one
    more leading dim), for ``torch.func`` transforms."""

    @staticmethod
    def forward(z: Tensor):  # type: ignore[override]
        return sigmoid_polar_parts(z)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0].contiguous())

    @staticmethod
    def backward(ctx, g_re: Optional[Tensor], g_im: Optional[Tensor]):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return sigmoid_polar_grad(z, g_re, g_im)

    @staticmethod
    def vmap(info, in_dims, z: Tensor):
        return SigmoidPolar.apply(z.movedim(in_dims[0], 0)), (0, 0)


class SigmoidPolar(torch.autograd.Function):
    """``(a_re, a_im)`` of ``z (..., 2)``; saves only ``z`` (the intermediates would be ~10 floats per step
    and head: more than the scan itself keeps) and recomputes them in backward. Runs under ``torch.func``
    (grad, vjp, vmap) as :class:`_SigmoidPolarTransformed`."""

    @staticmethod
    def forward(ctx, z: Tensor):  # type: ignore[override]
        z = z.contiguous()
        out = _SigmoidPolarTransformed.forward(z)
        _SigmoidPolarTransformed.setup_context(ctx, (z,), out)
        return out

    backward = _SigmoidPolarTransformed.backward


with_transforms(SigmoidPolar, _SigmoidPolarTransformed)
