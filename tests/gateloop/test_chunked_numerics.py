"""Numerical edge cases of chunk_gate_loop against the float64 sequential loop (issue 19, item 8).

Through the Triton interpreter on the CPU (the kernels' arithmetic, dots exact); GPU-marked twins for CUDA.
"""
import math

import pytest
import torch

from helpers.chunked_check import make_inputs, reference_f64, rel
from helpers.kernels import HAS_CUDA, INTERPRET

if not HAS_CUDA and not INTERPRET:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from gateloop_kernels import reference  # noqa: E402
from gateloop_kernels.chunked import chunk_gate_loop  # noqa: E402

cpu_only = pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
# numpy warns where the interpreter's kernels overflow a masked-out exp (selected away)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def grads_against_loop(inputs, tol, init=True, chunk_size=16, precision="ieee", do_scale=1.0):
    """Output, final state and every gradient of chunk_gate_loop against the float64 loop (relative errors)."""
    q, k, v, ar, ai = inputs
    B, n, H, d = q.shape
    e = v.shape[-1]
    h0 = torch.randn(B, H, d, e, dtype=torch.complex64, device=q.device) if init else None
    do = (torch.randn(B, n, H, e, device=q.device) * do_scale).to(q.dtype)
    leaves = [t.clone().requires_grad_() for t in inputs]
    h0l = h0.clone().requires_grad_() if init else None
    o, st = chunk_gate_loop(*leaves, initial_state=h0l, output_final_state=True, precision=precision,
                            chunk_size=chunk_size)
    (o.float() * do.float()).sum().backward()
    ro, rst, rgrads = reference_f64(q, k, v, ar, ai, h0, do, None, sequential=True)
    errs = {"o": rel(o, ro), "final_state": rel(st, rst)}
    for name, leaf, g in zip(["dq", "dk", "dv", "da_re", "da_im", "dh0"], leaves + ([h0l] if init else []), rgrads):
        errs[name] = rel(leaf.grad, g)
    assert all(x <= tol for x in errs.values()), f"errors over {tol}: {errs}"
    return errs


def tiny_gates(device):
    """Random gates in (0.6, 1) with gates of |a| = 1e-22 and 1e-25 (float32 normal range, squares not)."""
    inputs = make_inputs(1, 40, 2, 16, 32, torch.float32, device)
    ar, ai = inputs[3], inputs[4]
    for t, mag in ((0, 1e-25), (5, 1e-22), (21, 3e-23), (37, 1e-25)):
        ph = float(torch.rand(())) * 2 * math.pi
        ar[:, t], ai[:, t] = mag * math.cos(ph), mag * math.sin(ph)
    return inputs


@cpu_only
def test_cpu_tiny_gates():
    """|a|^2 underflowed in float32: a wrong phasor after the gate (output error 0.22 at |a| = 1e-22), and a
    gate of 1e-25 at step 0 was a reset that passed no gradient to the initial state (dh0 error 1.0)."""
    grads_against_loop(tiny_gates("cpu"), 2e-5)


def fp16_tiny_gates(device):
    """fp16 inputs with a gate of |a| = 1e-24 at step 0 (n = 1 and 40): the carried-state contributions weight q
    (reverse) or k (forward) by decays far below fp16's range."""
    inputs = list(tiny_gates(device))
    for i in range(3):
        inputs[i] = inputs[i].to(torch.float16)
    return inputs


@cpu_only
def test_cpu_fp16_tiny_gates():
    """The chunk's own state contribution multiplied its decay-weighted operand in fp16: a gate of 1e-24 flushed
    it to zero, and the initial state's gradient was 58% off (n = 1); bf16 and float32 were right."""
    grads_against_loop([t[:, :1] for t in fp16_tiny_gates("cpu")], 2e-3)
    grads_against_loop(fp16_tiny_gates("cpu"), 2e-3)


def near_one_error(n, device, window=256):
    """Relative output error of the first and the last ``window`` steps, one head of d = 16, |a| = 0.99999 with
    phases in (-1e-3, 1e-3) (a slow decay: every error in a chunk's total gate compounds over the sequence)."""
    q = torch.randn(1, n, 1, 16, device=device)
    k = torch.randn(1, n, 1, 16, device=device) / 4
    v = torch.randn(1, n, 1, 16, device=device)
    ph = (torch.rand(1, n, 1, device=device) * 2 - 1) * 1e-3
    ar, ai = 0.99999 * torch.cos(ph), 0.99999 * torch.sin(ph)
    o, _ = chunk_gate_loop(q, k, v, ar, ai)
    a = torch.complex(ar.double(), ai.double())[0].T[:, :, None, None]
    r = reference.sequential_reference(*(x[0].transpose(0, 1).double() for x in (q, k, v)), a)
    r = r.transpose(0, 1)[None]
    return rel(o[:, :window], r[:, :window]), rel(o[:, -window:], r[:, -window:])


@cpu_only
def test_cpu_gate_near_one_error_flat_in_n():
    """The last 256 of 2048 steps are as accurate as the first 256 (before: 2e-6..2.8e-6 against 5e-7, the
    float32 log|a| biased by the rounded magnitude and the phasor product drifting off |u| = 1)."""
    head, tail = near_one_error(2048, "cpu")
    assert tail <= 8e-7 and tail <= 2 * max(head, 1e-7), (head, tail)


def fp16_large_scores(device):
    """q = k = 300 (d = 16): q.k = 1.44e6 is past fp16's 65504, the outputs (v = 1e-3: ~1440) are not."""
    q, k, v, ar, ai = make_inputs(1, 24, 1, 16, 16, torch.float32, device)
    q = torch.full_like(q, 300.0)
    k = torch.full_like(k, 300.0)
    v = v * 1e-3
    return [t.to(torch.float16) for t in (q, k, v)] + [ar, ai]


@cpu_only
def test_cpu_fp16_scores_past_fp16_range():
    """The float32 score tile D o (Q K^T) was cast to fp16 for its product with V (and with dO in dv): inf.
    (dO = 1e-3 keeps the exact dv, ~1e3, in fp16's range too.)"""
    grads_against_loop(fp16_large_scores("cpu"), 2e-2, init=False, do_scale=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32", 5e-3)], ids=["ieee", "tf32"])
def test_gpu_tiny_gates(precision, tol):
    grads_against_loop(tiny_gates("cuda"), tol, chunk_size=16, precision=precision)
    grads_against_loop(tiny_gates("cuda"), tol, chunk_size=64, precision=precision)


@pytest.mark.gpu
def test_gpu_gate_near_one_error_flat_in_n():
    errs = {n: near_one_error(n, "cuda") for n in (1024, 8192)}
    # 3xTF32 dots round a little more than the interpreter's exact ones: 0.93e-6 and 1.03e-6 on the H100
    assert all(t <= 2e-6 for _, t in errs.values()), errs
    assert errs[8192][1] <= 2 * max(errs[1024][1], 1e-7), errs


@pytest.mark.gpu
def test_gpu_fp16_scores_past_fp16_range():
    grads_against_loop(fp16_large_scores("cuda"), 2e-2, init=False, chunk_size=64, do_scale=1e-3)


@pytest.mark.gpu
def test_gpu_fp16_tiny_gates():
    grads_against_loop(fp16_tiny_gates("cuda"), 2e-3)
