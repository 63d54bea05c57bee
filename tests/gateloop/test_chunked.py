"""chunk_gate_loop (Triton chunked scan) against the float64 sequential reference.

CPU: the real kernels under ``TRITON_INTERPRET=1`` (CI sets it) on small shapes.
GPU (``-m gpu``): real sizes, every precision mode, poisoned outputs, long sequences.
"""
import pytest
import torch

from gateloop_kernels import reference

from helpers.chunked_check import check, make_inputs, reference_f64, rel
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
    from gateloop_kernels.chunked import config

    assert config._blocks(64, 128, config._cfg("bwd_dqk", config.MODE_F32, 64, 128)) == (32, 64)
    check(1, 70, 1, 64, 128, torch.float32, "cpu", 2e-5, zeros=True, init=True, final=True)


#: a one-kernel state pass for the exact float32 mode (``chunked.config._CFG``'s ``chunk_states_exact``; the default,
#: None, runs the two passes): the best one-kernel configuration of the H200 search (docs/history.md)
EXACT_ONE_KERNEL = {"cap": 32, "num_warps": 2, "num_stages": 2}


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_float32_exact_one_kernel_state_pass(monkeypatch):
    from gateloop_kernels.chunked import config

    monkeypatch.setitem(config._CFG[torch.float32], "chunk_states_exact", EXACT_ONE_KERNEL)
    check(1, 40, 2, 16, 32, torch.float32, "cpu", 2e-5, zeros=True, init=True, final=True, chunk_size=16)


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half(dtype):
    check(2, 35, 1, 16, 16, dtype, "cpu", 2e-2, zeros=True, init=True, final=True, chunk_size=16)


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
def test_cpu_bfloat16_two_pass_state_pass(monkeypatch):
    """16-bit inputs through the two state passes (what a long sequence at few heads runs,
    ``states._one_pass_pays``): float32 states where the one kernel stores bf16 ones."""
    from gateloop_kernels.chunked import config

    monkeypatch.setitem(config._CFG[torch.bfloat16], "chunk_states", None)
    check(2, 35, 1, 16, 32, torch.bfloat16, "cpu", 2e-2, zeros=True, init=True, final=True, chunk_size=16)


_INTERPRETED = pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")


@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", torch.float32, marks=_INTERPRETED),
                                           pytest.param("cpu", torch.bfloat16, marks=_INTERPRETED),
                                           pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_complex_gate_parts_read_in_place(device, dtype):
    """A complex gate's parts (``a.real``, ``a.imag``: element stride 2) reach every kernel (both state-pass forms:
    exact float32 two passes, bf16 one kernel) without copies, with the results of dense copies bit for bit (the same
    arithmetic) and the float64 reference's; other layouts are copied dense."""
    from gateloop_kernels.chunked import config

    B, n, H, d, e = 2, 37, 2, 16, 32
    q, k, v, ar, ai = make_inputs(B, n, H, d, e, dtype, device, zeros=True)
    a = torch.complex(ar, ai)
    re, im, gs = config._gate_planes(a.real, a.imag, H)
    assert gs == 2 and re.data_ptr() == a.data_ptr() and im.data_ptr() == a.data_ptr() + 4
    assert config._gate_step(ar, H) == 1 and config._gate_step(ar.transpose(0, 1), H) is None
    assert config._gate_planes(a.real[:, ::2], a.imag[:, ::2], H)[2] == 1  # (a step of 4: copied)
    do = torch.randn(B, n, H, e, device=device).to(dtype)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    ac = a.clone().requires_grad_()
    o, _ = chunk_gate_loop(*x, ac.real, ac.imag, chunk_size=16)
    grads = torch.autograd.grad(o, [*x, ac], do)
    y = [t.clone().requires_grad_() for t in (q, k, v, ar, ai)]
    o_dense, _ = chunk_gate_loop(*y, chunk_size=16)
    dense = torch.autograd.grad(o_dense, y, do)
    assert torch.equal(o, o_dense)
    assert all(torch.equal(g, h) for g, h in zip(grads[:3], dense[:3]))
    assert torch.equal(torch.view_as_real(grads[3]), torch.stack(dense[3:], -1))
    ro, _, rgrads = reference_f64(q, k, v, ar, ai, None, do, None)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel(o, ro) < tol
    assert all(rel(g, r) < tol for g, r in zip(dense, rgrads))


@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", torch.float32, marks=_INTERPRETED),
                                           pytest.param("cpu", torch.bfloat16, marks=_INTERPRETED),
                                           pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_projection_views_read_in_place(device, dtype):
    """q and k as views of one fused projection's ``(B, n, W)`` output (steps ``W`` apart, not ``H d``) reach every
    kernel (both state-pass forms) without copies, with the results of dense copies bit for bit and the float64
    reference's; layouts the kernels cannot read in place, or q and k of different step strides, are copied."""
    from gateloop_kernels.chunked import config

    B, n, H, d, e = 2, 37, 2, 16, 32
    W = 2 * H * d + H * e + 6  # q | k | v | other columns (a gate's, an output gate's)
    q, k, v, ar, ai = make_inputs(B, n, H, d, e, dtype, device, zeros=True)
    fused = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2), torch.randn(B, n, 6, device=device).to(dtype)], -1)

    def views(t):
        return (t[..., :H * d].unflatten(-1, (H, d)), t[..., H * d:2 * H * d].unflatten(-1, (H, d)),
                t[..., 2 * H * d:2 * H * d + H * e].unflatten(-1, (H, e)))
    fq, fk, _ = views(fused)
    assert config._step_stride(fq, H, d) == W and config._step_stride(q, H, d) == H * d
    assert config._step_stride(q.transpose(0, 1), H, d) is None and config._step_stride(q[..., ::2], H, d // 2) is None
    assert config._step_stride(q[:, :1], H, d) == n * H * d and config._step_stride(q[:1, :1], H, d) == H * d
    assert config._step_stride(q[:, :, 1:], 1, d) == H * d  # one head of two, in place
    assert config._step_stride(q[:1].expand(B, n, H, d), H, d) is None  # batches overlapping (stride 0)
    rq, rk, S = config._readable(fq, fk, H, d)
    assert S == W and rq.data_ptr() == fused.data_ptr() and rk.data_ptr() == fk.data_ptr()
    rq, rk, S = config._readable(fq, k, H, d)  # step strides W and H d: both dense
    assert S == H * d and rq.is_contiguous() and rk.data_ptr() == k.data_ptr()
    do = torch.randn(B, n, H, e, device=device).to(dtype)
    x = fused.clone().requires_grad_()
    o, _ = chunk_gate_loop(*views(x), ar, ai, chunk_size=16)
    gx = torch.autograd.grad(o, x, do)[0]
    y = [t.clone().requires_grad_() for t in (q, k, v)]
    o_dense, _ = chunk_gate_loop(*y, ar, ai, chunk_size=16)
    dense = torch.autograd.grad(o_dense, y, do)
    assert torch.equal(o, o_dense)
    assert all(torch.equal(g, h) for g, h in zip(views(gx), dense)) and not gx[..., -6:].any()
    ro, _, rgrads = reference_f64(q, k, v, ar, ai, None, do, None)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel(o, ro) < tol
    assert all(rel(g, r) < tol for g, r in zip(dense, rgrads))


def test_state_pass_form_rule():
    """The one-kernel state pass where its programs per direction fill half the GPU's multiprocessors or its walk
    is short for its grid, two passes for a long walk on a narrow grid (B*H = 8, d = 64 on an H100: 32 programs
    over 132 SMs, two passes past 64 chunks); the interpreter (one program at a time) always takes the one
    kernel."""
    from gateloop_kernels.chunked import states

    assert states._sm_count(torch.device("cpu")) == 1
    assert not states._one_pass_pays(32, 512, 132) and not states._one_pass_pays(32, 65, 132)
    assert states._one_pass_pays(32, 64, 132)
    assert states._one_pass_pays(66, 4096, 132) and states._one_pass_pays(128, 128, 132)
    assert not states._one_pass_pays(64, 256, 132) and states._one_pass_pays(1, 10 ** 6, 1)
