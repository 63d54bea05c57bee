"""The gate activations of the head-layout entry point against the seed's complex formula (float64)."""
from __future__ import annotations

import torch

from gateloop_kernels import gate_from_log_polar, gate_from_preactivation


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
