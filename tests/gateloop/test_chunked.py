"""chunk_gate_loop (Triton chunked scan) against the float64 sequential reference.

CPU: the real kernels under ``TRITON_INTERPRET=1`` (CI sets it) on small shapes.
GPU (``-m gpu``): real sizes, every precision mode, poisoned outputs, long sequences.
"""
import pytest
import torch

from gateloop_kernels import reference

from helpers.chunked_check import check, make_inputs, rel
from helpers.kernels import HAS_CUDA, INTERPRET

if not HAS_CUDA and not INTERPRET:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from gateloop_kernels.chunked import chunk_gate_loop  # noqa: E402


# ----------------------------------------------------------------------------- CPU (interpreter)

@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
@pytest.mark.parametrize("n,H,d,e,chunk,zeros,init,final", [
    (40, 2, 16, 32, 16, True, True, True),    # zero gates, initial + final state, d != e
    (170, 1, 16, 16, 16, True, True, True),   # 11 chunks: the state scan's 8-chunk loop runs twice, masked
    (70, 1, 32, 16, 64, False, False, False),  # n not a multiple of a 64-chunk, d = 32
    (33, 1, 24, 40, 16, True, True, False),    # dims that are not powers of two
])
def test_cpu_float32(n, H, d, e, chunk, zeros, init, final):
    check(1, n, H, d, e, torch.float32, "cpu", 2e-5, zeros=zeros, init=init, final=final, chunk_size=chunk)


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_float32_wide_heads():
    """Head dims past one tile: several key and value blocks per kernel, key and value tiles of different
    widths (the float32 dq/dk kernel's 32 x 64), states stored transposed in the forward."""
    from gateloop_kernels import chunked

    assert chunked._blocks(64, 128, chunked._cfg("bwd_dqk", 0, 64, 128)) == (32, 64)
    check(1, 70, 1, 64, 128, torch.float32, "cpu", 2e-5, zeros=True, init=True, final=True)


#: a one-kernel state pass for the exact float32 mode (``chunked._CFG``'s ``chunk_states_exact``; the default,
#: None, runs the two passes): the best one-kernel configuration of the H200 search (docs/history.md)
EXACT_ONE_KERNEL = {"cap": 32, "num_warps": 2, "num_stages": 2}


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_float32_exact_one_kernel_state_pass(monkeypatch):
    from gateloop_kernels import chunked

    monkeypatch.setitem(chunked._CFG[torch.float32], "chunk_states_exact", EXACT_ONE_KERNEL)
    check(1, 40, 2, 16, 32, torch.float32, "cpu", 2e-5, zeros=True, init=True, final=True, chunk_size=16)


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half(dtype):
    check(2, 35, 1, 16, 16, dtype, "cpu", 2e-2, zeros=True, init=True, final=True, chunk_size=16)


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_precision_modes_and_errors():
    check(1, 20, 1, 16, 16, torch.float32, "cpu", 2e-5, chunk_size=16, precision="tf32x3")
    q, k, v, ar, ai = make_inputs(1, 8, 1, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="precision"):
        chunk_gate_loop(q, k, v, ar, ai, precision="fast")
    with pytest.raises(ValueError, match="16 <= d"):
        chunk_gate_loop(q[..., :8], k[..., :8], v, ar, ai)
    with pytest.raises(ValueError, match="a_re"):
        chunk_gate_loop(q, k, v, ar[:, :4], ai)
    o, st = chunk_gate_loop(q[:, :0], k[:, :0], v[:, :0], ar[:, :0], ai[:, :0], output_final_state=True)
    assert o.shape == (1, 0, 1, 16) and st.abs().sum() == 0


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_backward_peak_holds_states_once():
    """Peak bytes allocated by the backward (tally of the tensors its factory calls create): the
    gradients, the chunk states h and adjoint states dh and the gate workspace (6 floats per step),
    nothing more (the gate kernel keeps its BT x BT products in registers, no scratch). Chunks of 16
    steps at d = e = 32, so the states dominate the workspace."""
    from helpers.live_bytes import LiveBytes

    from gateloop_kernels import chunked

    aten = torch.ops.aten
    factories = (aten.empty, aten.empty_like, aten.empty_strided, aten.zeros, aten.zeros_like, aten.new_empty,
                 aten.new_zeros, aten.full, aten.ones)

    class Tally(LiveBytes):
        def counts(self, func, t):  # (the interpreter copies kernel arguments with set_: not counted)
            return isinstance(t, torch.Tensor) and func.overloadpacket in factories

    B, n, H, K, V, BT = 1, 64, 2, 32, 32, 16
    q, k, v, ar, ai = make_inputs(B, n, H, K, V, torch.float32, "cpu")
    do = torch.randn(B, n, H, V)
    with Tally() as tally:
        grads = chunked._backward(q, k, v, ar, ai, None, do, None, BT, 0, "tf32x3")
    chunks = B * H * (n // BT)
    states = 2 * chunks * 2 * K * V * 4  # h and dh, float32 (Re, Im)
    aux = chunks * 6 * BT * 4
    grad_bytes = sum(g.nbytes for g in grads if g is not None)
    extra = tally.peak - grad_bytes
    assert states <= extra <= states + 2 * aux, (extra, states, aux)


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = [  # B, n, H, d, e
    (2, 1000, 4, 64, 64),
    (1, 777, 3, 128, 64),
    (2, 300, 2, 16, 48),
    (1, 200, 2, 256, 256),
    (1, 513, 2, 96, 160),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-3)])
def test_gpu_float32(shape, precision, tol):
    check(*shape, torch.float32, "cuda", tol, zeros=True, init=True, final=True, precision=precision, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_float32_exact_one_kernel_state_pass(shape, monkeypatch):
    from gateloop_kernels import chunked

    monkeypatch.setitem(chunked._CFG[torch.float32], "chunk_states_exact", EXACT_ONE_KERNEL)
    check(*shape, torch.float32, "cuda", 1e-5, zeros=True, init=True, final=True, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half(shape, dtype):
    check(*shape, dtype, "cuda", 1e-2, zeros=True, init=True, final=True, poison=True)


@pytest.mark.gpu
@pytest.mark.xdist_group("big_gpu_memory")  # 19 GiB: one at a time under pytest-xdist
def test_gpu_long_sequence_error_growth():
    """Error at n = 2^20 is within 10x the error at n = 2^10 (forward and gradients, float32)."""
    errs = {}
    for n in (1 << 10, 1 << 20):
        torch.manual_seed(0)
        B, H, d, e = 1, 1, 64, 64
        q, k, v, ar, ai = make_inputs(B, n, H, d, e, torch.float32, "cuda", mag=(0.97, 1.0))
        do = torch.randn(B, n, H, e, device="cuda")
        leaves = [t.clone().requires_grad_() for t in (q, k, v, ar, ai)]
        o, _ = chunk_gate_loop(*leaves)
        (o * do).sum().backward()
        # float64 chunked reference (same math as the sequential one, checked in test_reference.py)
        rl = [t.double().requires_grad_() for t in (q, k, v, ar, ai)]
        a = torch.complex(rl[3], rl[4])[0].T.reshape(H, n)[:, :, None, None]
        ro = reference.chunked_reference(rl[0][0].transpose(0, 1), rl[1][0].transpose(0, 1),
                                         rl[2][0].transpose(0, 1), a)
        ro = ro.transpose(0, 1)[None]
        (ro * do.double()).sum().backward()
        errs[n] = [rel(o, ro)] + [rel(x.grad, y.grad) for x, y in zip(leaves, rl)]
    small, big = errs[1 << 10], errs[1 << 20]
    assert all(b <= 10 * max(s, 1e-7) for s, b in zip(small, big)), errs
    assert all(b <= 1e-5 for b in big), errs


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_custom_op_opcheck_and_compile():
    from gateloop_kernels import chunked
    q, k, v, ar, ai = make_inputs(1, 20, 1, 16, 16, torch.float32, "cpu")
    h0 = torch.randn(1, 1, 2, 16, 16)
    args = (q, k, v, ar, ai, h0, True, "tf32x3", 16)
    torch.library.opcheck(chunked._chunk_op.op, [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, ar, ai)]
    fn = torch.compile(lambda *x: chunk_gate_loop(*x, chunk_size=16)[0], backend="aot_eager", fullgraph=True)
    o = fn(*leaves)
    ref = chunk_gate_loop(*[t.detach() for t in leaves], chunk_size=16)[0]
    torch.testing.assert_close(o, ref)
    o.sum().backward()
    assert all(t.grad is not None for t in leaves)
