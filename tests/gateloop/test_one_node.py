"""The eager call on a kernel path is one autograd node (``gateloop_kernels.lean``, issue 20), with the general
path's results: outputs and every gradient against the same call taken through ``dispatch.scan`` (a requested
final state sends it there), on the kernels under the Triton interpreter and on CUDA."""
import pytest
import torch

import gateloop_kernels as gk
from gateloop_kernels import dispatch
from gateloop_kernels.elementwise import op as ew_op
from tests.helpers.kernels import INTERPRET

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _nodes(out: torch.Tensor) -> int:
    """Autograd nodes behind ``out`` other than the leaves' AccumulateGrad."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack += [g for g, _ in f.next_functions]
    return sum(type(f).__name__ != "AccumulateGrad" for f in seen)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g))


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = (torch.view_as_real(t) if t.is_complex() else t for t in (x, y))
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def kernels_on(monkeypatch):
    """``kernels_on(device)``: skip where ``device`` cannot run the Triton kernels; the CPU runs them under the
    interpreter, through both dispatches."""
    def on(device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if device == "cpu":
            if not INTERPRET:
                pytest.skip("the CPU runs the kernels only under TRITON_INTERPRET=1")
            monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
            monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    return on


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, gate, dtype", [(1, "complex", torch.float32), (1, "real", torch.bfloat16),
                                            (16, "complex", torch.float32), (16, "real", torch.bfloat16)])
def test_operator_is_one_node_with_the_general_paths_results(kernels_on, device, d, gate, dtype):
    kernels_on(device)
    B, n = 3, 21
    q, k, v = (torch.randn(B, n, d, device=device).to(dtype).requires_grad_() for _ in range(3))
    mag, ph = 0.8 + 0.2 * torch.rand(B, n, 1, 1, device=device), torch.randn(B, n, 1, 1, device=device)
    a = (torch.polar(mag, ph) if gate == "complex" else mag).requires_grad_()
    g = torch.randn(B, n, d, device=device).to(dtype)
    out = gk.gate_loop_operator(q, k, v, a)
    assert _nodes(out) == 1
    ref, _ = gk.gate_loop_operator(q, k, v, a, return_final_state=True)
    assert _nodes(ref) > 1  # the general path: the comparison is between two paths
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol
    for x, y in zip(_grads(out, [q, k, v, a], g), _grads(ref, [q, k, v, a], g)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert rel_err(x, y) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, form, packed", [(1, "z", False), (16, "polar", False), (16, "z", True),
                                             (1, "polar", True)])
def test_heads_is_one_node_with_the_general_paths_results(kernels_on, device, d, form, packed):
    kernels_on(device)
    B, n, H = (1, 41, 2) if packed else (2, 21, 2)
    q, k, v = (torch.randn(B, n, H, d, device=device).requires_grad_() for _ in range(3))
    if form == "z":
        gate = {"z": torch.randn(B, n, H, 2, device=device).requires_grad_()}
    else:
        gate = {"log_magnitude": (-0.2 * torch.rand(B, n, H, device=device)).requires_grad_(),
                "phase": torch.randn(B, n, H, device=device).requires_grad_()}
    cu = torch.tensor([0, 17, 17, 30, n], device=device) if packed else None
    g = torch.randn(B, n, H, d, device=device)
    out, _ = gk.gate_loop_heads(q, k, v, **gate, cu_seqlens=cu, chunk_size=16)
    assert _nodes(out) == 1
    ref, _ = gk.gate_loop_heads(q, k, v, **gate, cu_seqlens=cu, chunk_size=16, output_final_state=True)
    assert _nodes(ref) > 1
    inputs = [q, k, v, *gate.values()]
    assert rel_err(out, ref) <= 1e-6
    for x, y in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        assert rel_err(x, y) <= 1e-6
