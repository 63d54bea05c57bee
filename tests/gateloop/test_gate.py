"""The gate activations of the head-layout entry point against the seed's complex formula (float64)."""
from __future__ import annotations

import pytest
import torch

from gateloop_kernels import gate, gate_from_log_polar, gate_from_preactivation

from helpers.kernels import DEV, needs_kernels


def _seed_gate(z: torch.Tensor) -> torch.Tensor:
    c = torch.view_as_complex(z)
    return torch.polar(c.abs().sigmoid(), c.angle())


def test_preactivation_matches_seed_values_and_gradients():
    z = torch.randn(3, 17, 4, 2, dtype=torch.float64)
    z[0, 0, 0] = 0.0  # the gate is 0.5 there and its gradient zero, as the complex original
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a_re, a_im = gate_from_preactivation(za)
    ref = _seed_gate(zb)
    assert (a_re - ref.real).abs().max() < 1e-14 and (a_im - ref.imag).abs().max() < 1e-14
    w = torch.randn(2, *ref.shape, dtype=torch.float64)
    g = torch.autograd.grad((a_re * w[0] + a_im * w[1]).sum(), za)[0]
    g_ref = torch.autograd.grad((ref.real * w[0] + ref.imag * w[1]).sum(), zb)[0]
    assert torch.isfinite(g).all() and (g - g_ref).abs().max() < 1e-12
    assert torch.autograd.gradcheck(gate_from_preactivation, (torch.randn(4, 3, 2, dtype=torch.float64,
                                                                          requires_grad=True),))


def test_preactivation_saves_only_its_input():
    z = torch.randn(2, 64, 8, 2, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a_re, a_im = gate_from_preactivation(z)
    assert sum(saved.values()) == z.numel() * z.element_size()


def test_log_polar():
    lm, ph = -torch.rand(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a_re, a_im = gate_from_log_polar(lm, ph)
    ref = torch.polar(lm.exp(), ph)
    assert (a_re - ref.real).abs().max() < 1e-15 and (a_im - ref.imag).abs().max() < 1e-15


# ----------------------------------------------------------------------------- the fused kernels


def _check_kernels(z: torch.Tensor, both_grads: bool = True) -> None:
    """``gate.gate_forward`` / ``gate_backward`` against the float64 reference: values (all of magnitude
    <= 1) to 5e-7, four float32 ulps at 1 (the GPU's sigmoid rounds its exponential: 2.1e-7 seen over 8M
    gates on the H200), and the gradient to 1e-6 relative, zero gradient at z = 0."""
    z64 = z.double()
    g_re = torch.randn(z.shape[:-1], device=z.device)
    g_im = torch.randn(z.shape[:-1], device=z.device) if both_grads else None
    a_re, a_im = gate.gate_forward(z)
    r_re, r_im = gate.reference_forward(z64)
    assert a_re.dtype == torch.float32 and a_re.shape == z.shape[:-1]
    assert (a_re.double() - r_re).abs().max() < 5e-7 and (a_im.double() - r_im).abs().max() < 5e-7
    dz = gate.gate_backward(z, g_re, g_im)
    ref = gate.reference_backward(z64, g_re.double(), None if g_im is None else g_im.double())
    assert dz.dtype == z.dtype and dz.shape == z.shape
    tol = 1e-6 if z.dtype == torch.float32 else 1e-2  # a 16-bit dz rounds once
    assert ((dz.double() - ref).norm() / ref.norm()).item() < tol
    zero = (z == 0).all(-1)
    assert (dz[zero] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("both_grads", [True, False])
def test_kernels_against_reference(dtype, both_grads):
    z = (3 * torch.randn(2, 37, 5, 2)).to(device=DEV, dtype=dtype)  # 370 gates: one partial block
    z[0, :3] = 0.0  # hard zeros (the reference's where-branches)
    z[1, 0, :, 1] = 0.0  # real gates, both signs
    _check_kernels(z, both_grads)


@pytest.mark.gpu
def test_gpu_kernels_at_model_size_and_through_autograd():
    z = 2 * torch.randn(8, 2048, 512, 2, device="cuda")  # the head-dim-1 model's gates
    z[0, 0] = 0.0
    _check_kernels(z)
    zk = z.clone().requires_grad_()
    zr = z.double().requires_grad_()
    a_re, a_im = gate_from_preactivation(zk)  # the kernels, through SigmoidPolar
    r_re, r_im = gate_from_preactivation(zr)  # float64: the reference path
    w = torch.randn(2, *a_re.shape, device="cuda", dtype=torch.float64)
    g = torch.autograd.grad((a_re * w[0] + a_im * w[1]).sum(), zk)[0]
    g_ref = torch.autograd.grad((r_re * w[0] + r_im * w[1]).sum(), zr)[0]
    assert ((g.double() - g_ref).norm() / g_ref.norm()).item() < 1e-6


def _seed_gate_f64(z: torch.Tensor) -> torch.Tensor:
    """The seed's gate in float64 (exact where float32's squares under- or overflow)."""
    return _seed_gate(z.double().cpu())


@pytest.mark.parametrize("path", ["reference", pytest.param("kernel", marks=needs_kernels)])
def test_extreme_preactivations(path):
    """|z| from 1e-30 to 1e30, infinities and NaN: float32 squares would underflow (the phase lost: 0.5 at 1e-23)
    or overflow (0 at 1e20); a NaN must come out NaN, not be taken for z = 0."""
    inf, nan = float("inf"), float("nan")
    vals = [(1e-23, 1e-23), (-3e-30, 2e-30), (1e20, 1e20), (3e19, 0.0), (-1e30, 5e29), (inf, 0.3), (0.3, -inf),
            (inf, inf), (1e-40, 0.0), (0.0, 0.0), (nan, 0.3), (0.2, nan)]
    z = torch.tensor(vals, dtype=torch.float32).reshape(len(vals), 1, 2)
    ref = _seed_gate_f64(z)
    if path == "kernel":
        a_re, a_im = gate.gate_forward(z.to(DEV))
    else:
        a_re, a_im = gate.reference_forward(z)
    got = torch.complex(a_re.double().cpu(), a_im.double().cpu())
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), (got, ref)
    assert (got[fin] - ref[fin]).abs().max() < 1e-6, (got, ref)
    # gradients: as the seed's where finite; NaN for a NaN or an infinite input (the seed's too)
    zg = z[[0, 1, 2, 3, 4, 10, 5]].clone()
    # cotangents kept apart (g_re in [1, 1.1), g_im in [0.4, 0.5)): with equal ones the float32 formula's two terms
    # cancel at |z| ~ 1e-23, where the derivative is ~1e22, and a relative comparison measures the cancellation
    g_re = 1 + 0.1 * torch.rand(zg.shape[:-1], dtype=torch.float64)
    g_im = 0.4 + 0.1 * torch.rand(zg.shape[:-1], dtype=torch.float64)
    if path == "kernel":
        dz = gate.gate_backward(zg.to(DEV), g_re.float().to(DEV), g_im.float().to(DEV)).double().cpu()
    else:
        dz = gate.reference_backward(zg, g_re, g_im).double()
    zr = zg.double().requires_grad_()
    a = _seed_gate(zr)
    (dz_ref,) = torch.autograd.grad((a.real * g_re + a.imag * g_im).sum(), zr)
    assert torch.isfinite(dz[:5]).all() and torch.isnan(dz[5]).any() and torch.isnan(dz[6]).all()  # NaN, inf
    assert ((dz[:5] - dz_ref[:5]).abs() <= 1e-5 * dz_ref[:5].abs() + 1e-30).all(), (dz, dz_ref)
