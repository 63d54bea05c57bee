"""Argument checks of the public entries a new user hits first: clear errors that name the argument."""
import pytest
import torch

import gateloop_kernels as gk


def test_preactivation_of_a_scalar_names_z():
    with pytest.raises(ValueError, match="z must end in a dimension of 2"):
        gk.gate_from_preactivation(torch.tensor(1.0))


def _chunk_inputs(B=1, n=5, H=1, d=16, dtype=torch.float32):
    q, k, v = (torch.randn(B, n, H, d, dtype=dtype) for _ in range(3))
    return q, k, v, torch.full((B, n, H), 0.9), torch.zeros(B, n, H)


@pytest.mark.parametrize("state, error, match", [
    (torch.ones(1, 1, 16, 16, dtype=torch.int64), TypeError, "initial_state must be a floating-point or complex"),
    ([[0.0]], TypeError, "initial_state must be a torch.Tensor"),
    (torch.ones(1, 1, 16, 16, device="meta"), ValueError, "initial_state on meta"),
])
def test_chunk_gate_loop_checks_the_initial_states_type_and_device(state, error, match):
    """An integer state was silently cast, a list raised AttributeError, another device reached the kernels."""
    from gateloop_kernels.chunked import chunk_gate_loop
    with pytest.raises(error, match=match):
        chunk_gate_loop(*_chunk_inputs(), initial_state=state, chunk_size=16)


def test_chunk_gate_loop_refuses_float64_rather_than_narrowing_it():
    """float64 q, k, v ran in float32 and came back float32 (its docstring: outputs in the input dtype)."""
    from gateloop_kernels.chunked import chunk_gate_loop
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 q, k, v"):
        chunk_gate_loop(*_chunk_inputs(dtype=torch.float64), chunk_size=16)


@pytest.mark.parametrize("chunk, error", [(16.0, TypeError), (None, TypeError), (True, TypeError), (0, ValueError)])
@pytest.mark.parametrize("name", ["chunked_reference", "simple_chunked_reference", "diagonal_scan_chunked"])
def test_reference_chunk_size_is_checked(name, chunk, error):
    """A float or None chunk_size raised AttributeError / a comparison TypeError from inside the references, and 0
    ZeroDivisionError from diagonal_scan_chunked."""
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    args = {"chunked_reference": (x, x, x, torch.rand(2, 5, 1, 1, dtype=torch.float64)),
            "simple_chunked_reference": (x, x, x), "diagonal_scan_chunked": (x, x)}[name]
    with pytest.raises(error, match="chunk_size must be"):
        getattr(gk.reference, name)(*args, chunk_size=chunk)
