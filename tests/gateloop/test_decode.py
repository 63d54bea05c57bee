"""The fused decode step (gateloop_kernels.decode): the Triton kernel (under the interpreter on the CPU) and the
PyTorch step against the float64 sequential reference, in place on the cached state; bad input."""
from __future__ import annotations

import pytest
import torch

from gateloop_kernels import decode as D
from gateloop_kernels.heads import gate_from_preactivation
from gateloop_kernels.reference import sequential_reference

interp = pytest.mark.skipif(not __import__("os").environ.get("TRITON_INTERPRET"), reason="needs TRITON_INTERPRET=1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes


def _inputs(B, T, H, d, e, dtype, device="cpu", strided=False):
    if strided:  # heads of one (B, T, 3 H d) projection, as the layers slice them
        qkv = torch.randn(B, T, H, 3 * d, device=device).to(dtype)
        q, k = qkv[..., :d], qkv[..., d:2 * d]
        v = torch.randn(B, T, H, e, device=device).to(dtype)
    else:
        q, k = (torch.randn(B, T, H, d, device=device).to(dtype) for _ in range(2))
        v = torch.randn(B, T, H, e, device=device).to(dtype)
    z = torch.randn(B, T, H, 2, device=device).to(dtype)
    return q, k, v, z


def _oracle(q, k, v, z, gate=True):
    """Float64 sequential reference of T steps from a zero state: ``(o (B, T, H, e), state (B, H, d, e))``."""
    B, T, H, d = q.shape
    e = v.shape[-1]
    if gate:
        a_re, a_im = gate_from_preactivation(z.double())
        a = torch.complex(a_re, a_im)
    else:
        a = torch.ones(B, T, H, dtype=torch.complex128, device=q.device)

    def heads_first(t):
        return t.double().transpose(1, 2).reshape(B * H, T, -1)
    o, s = sequential_reference(heads_first(q), heads_first(k), heads_first(v),
                                a.transpose(1, 2).reshape(B * H, T)[..., None, None], return_final_state=True)
    return o.reshape(B, H, T, e).transpose(1, 2), s.reshape(B, H, d, e)


def _run(q, k, v, z, state, gate=True):
    outs = [D.gate_loop_decode_step(q[:, t], k[:, t], v[:, t], state, z=z[:, t] if gate else None)
            for t in range(q.shape[1])]
    return torch.stack(outs, dim=1)


def _rel(a, b):
    a, b = (t.to(torch.complex128) if t.is_complex() else t.double() for t in (a, b))
    return ((a - b).abs().norm() / b.abs().norm().clamp_min(1e-30)).item()


def _no_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch step ran where the kernel should")
    monkeypatch.setattr(D, "decode_step_reference", fail)


@interp
@pytest.mark.parametrize("B,H,d,e", [(3, 5, 1, 1), (2, 3, 8, 8), (1, 2, 16, 5), (2, 1, 3, 300), (1, 1, 256, 256)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-decay"])
def test_kernel_matches_float64_reference(monkeypatch, B, H, d, e, gate):
    T = 4 if d * e < 4096 else 2
    q, k, v, z = _inputs(B, T, H, d, e, torch.float32, strided=d == 8)
    ref_o, ref_s = _oracle(q, k, v, z, gate)
    torch_state = torch.zeros(B, H, d, e, dtype=torch.complex64)
    torch_o = _run(q, k, v, z, torch_state, gate)  # the PyTorch step
    state = torch.zeros(B, H, d, e, dtype=torch.complex64)
    ptr = state.data_ptr()
    _no_reference(monkeypatch)
    with D.interpreted():
        o = _run(q, k, v, z, state, gate)
    assert o.dtype == torch.float32 and o.shape == (B, T, H, e)
    assert state.data_ptr() == ptr
    assert _rel(o, ref_o) <= 1e-5 and _rel(state, ref_s) <= 1e-5
    assert _rel(o, torch_o) <= 1e-5 and _rel(state, torch_state) <= 1e-6


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs(monkeypatch, dtype):
    """Half inputs, float32 state: the state to float32 rounding of the (rounded) inputs, outputs to the dtype's."""
    q, k, v, z = _inputs(2, 3, 3, 8, 4, dtype)
    ref_o, ref_s = _oracle(q, k, v, z)
    state = torch.zeros(2, 3, 8, 4, dtype=torch.complex64)
    _no_reference(monkeypatch)
    with D.interpreted():
        o = _run(q, k, v, z, state)
    assert o.dtype == dtype
    assert _rel(state, ref_s) <= 1e-5
    assert _rel(o, ref_o) <= 1e-2


@interp
@pytest.mark.parametrize("d,e,conj", [(0, 4, False), (4, 0, False), (3, 4, True)], ids=["d0", "e0", "conj-state"])
def test_kernel_empty_head_dims_and_conjugate_state_as_pytorch_step(d, e, conj):
    """On the kernel's devices a head dim of 0 was a ZeroDivisionError in the block sizes and a state that is a
    conjugate view (``s.conj()``) a RuntimeError of view_as_real; the PyTorch step takes both."""
    q, k, v, z = (t[:, 0] for t in _inputs(2, 1, 3, d, e, torch.float32))
    state = torch.randn(2, 3, d, e, dtype=torch.complex64)
    want_state = state.clone().conj() if conj else state.clone()
    want = D.gate_loop_decode_step(q, k, v, want_state, z=z)
    state = state.conj() if conj else state
    with D.interpreted():
        o = D.gate_loop_decode_step(q, k, v, state, z=z)
    assert o.shape == (2, 3, e) and _rel(o, want) <= 1e-6 and _rel(state, want_state) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,e", [(1, 1), (8, 16)])
def test_pytorch_step_matches_reference(dtype, d, e):
    q, k, v, z = _inputs(2, 5, 3, d, e, dtype)
    ref_o, ref_s = _oracle(q, k, v, z)
    state = torch.zeros(2, 3, d, e, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
    o = _run(q, k, v, z, state)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert o.dtype == dtype
    assert _rel(o, ref_o) <= tol and _rel(state, ref_s) <= tol


def test_errors():
    q, k, v, z = (t[:, 0] for t in _inputs(2, 1, 3, 4, 4, torch.float32))
    state = torch.zeros(2, 3, 4, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="state must be torch.complex64"):
        D.gate_loop_decode_step(q, k, v, state.to(torch.complex128), z=z)
    with pytest.raises(TypeError, match="state must be a complex"):
        D.gate_loop_decode_step(q, k, v, state.real.contiguous(), z=z)
    with pytest.raises(ValueError, match="state must be"):
        D.gate_loop_decode_step(q, k, v, state[:1], z=z)
    with pytest.raises(ValueError, match="contiguous"):
        D.gate_loop_decode_step(q, k, v, state.transpose(-1, -2), z=z)
    with pytest.raises(ValueError, match="z must be"):
        D.gate_loop_decode_step(q, k, v, state, z=z[..., :1])
    with pytest.raises(ValueError, match="q, k must be"):
        D.gate_loop_decode_step(q[None], k, v, state, z=z)
    with pytest.raises(RuntimeError, match="inference-only"):
        D.gate_loop_decode_step(q.requires_grad_(), k, v, state, z=z)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,d,e", [(1, 512, 1, 1), (1024, 8, 1, 1), (1, 8, 64, 64), (128, 8, 64, 64),
                                     (3, 2, 256, 256), (16, 4, 100, 37), (1024, 2, 16, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_cuda(monkeypatch, B, H, d, e, dtype):
    q, k, v, z = _inputs(B, 3, H, d, e, dtype, device="cuda", strided=True)
    ref_o, ref_s = _oracle(q, k, v, z)
    state = torch.zeros(B, H, d, e, dtype=torch.complex64, device="cuda")
    _no_reference(monkeypatch)
    o = _run(q, k, v, z, state)
    assert _rel(state, ref_s) <= 1e-5
    assert _rel(o, ref_o) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_kernel_cuda_graph_capture():
    """The step captured once and replayed advances the state in place like eager steps."""
    B, T, H, d, e = 4, 6, 4, 32, 32
    q, k, v, z = _inputs(B, T, H, d, e, torch.float32, device="cuda")
    ref_o, _ = _oracle(q, k, v, z)
    state = torch.zeros(B, H, d, e, dtype=torch.complex64, device="cuda")
    ins = [t[:, 0].clone() for t in (q, k, v, z)]
    D.gate_loop_decode_step(*ins[:3], state, z=ins[3])  # step 0, eager (compiles the kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = D.gate_loop_decode_step(*ins[:3], state, z=ins[3])
    outs = []
    for t in range(1, T):
        for buf, src in zip(ins, (q, k, v, z)):
            buf.copy_(src[:, t])
        graph.replay()
        outs.append(out.clone())
    assert _rel(torch.stack(outs, 1), ref_o[:, 1:]) <= 1e-5
