"""The elementwise (d = e = 1) Triton kernels against the float64 sequential scan.

On the CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``) on small shapes whose
tiles leave partial blocks and carry across several segments; on a GPU (``-m gpu``) at real sizes.
"""
import pytest
import torch
import triton
import triton.language as tl

from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import backward, forward, lookback
from gateloop_kernels.elementwise.torch_path import _torch_backward, _torch_forward

from helpers.elementwise_check import GRAD_NAMES, assert_grads, make, oracle, rel
from helpers.kernels import DEV, needs_kernels

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def f64(t):
    return None if t is None else t.double()


CASES = [(dt, cg, kv, h0) for dt in (torch.float32, torch.bfloat16, torch.float16)
         for cg in (True, False) for kv in (False, True) for h0 in (True,)]
CASES += [(torch.float32, True, False, False), (torch.float32, False, True, False)]


@pytest.mark.parametrize("n", [1, 15, 16, 37, 2048, 1 << 20])
@pytest.mark.parametrize("C", [1, 5, 8, 16, 31, 32, 64, 1024])
def test_tile_config_invariants(n, C):
    """The backward's tile divides the forward's (the forward saves its state every backward tile), both
    are powers of 2, and no thread holds more than 16 steps of a channel in the narrow tiles."""
    ft, fc, fw = ew.tile_config(n, C)
    bt, bc, bw = ew.tile_config(n, C, backward=True)
    for x in (ft, fc, bt, bc):
        assert x & (x - 1) == 0
    assert ft % bt == 0 and bc <= max(64, C) and fc <= max(64, C)
    if C < 32:
        assert (ft, fc, fw) == (bt, bc, bw)
        assert ft // (32 // fc * fw) <= 16  # steps per thread: the lanes the channels leave run along time


@triton.jit
def _pack_roundtrip(lo_ptr, hi_ptr, lo_out, hi_out, ok_out, N: tl.constexpr):
    i = tl.arange(0, N)
    w = lookback._pack(tl.load(lo_ptr + i), tl.load(hi_ptr + i))
    lo, hi = lookback._unpack(w)
    tl.store(lo_out + i, lo)
    tl.store(hi_out + i, hi)
    tl.store(ok_out + i, lookback._written(w).to(tl.int32) + 2 * lookback._written(w * 0).to(tl.int32))


@needs_kernels
def test_lookback_word_packing_is_exact_and_flagged():
    """Every float pair survives a look-back word bit for bit (NaN as a NaN); a written word always reads
    as written, a zeroed one never does."""
    special = [0.0, -0.0, 1.0, -1.5, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, float("inf"), float("-inf"),
               float("nan")]
    lo = torch.tensor(special + [0.0] * 5, device=DEV)
    lo.view(torch.int32)[-5:] = torch.tensor([-1, 0x7FFFFFFF, -2, 1, 0x7F800001], dtype=torch.int32)
    lo = torch.cat([lo, torch.randn(16, device=DEV)])
    hi = torch.cat([lo[16:], lo[:16]])
    outs = [torch.empty_like(lo), torch.empty_like(lo), torch.empty(32, dtype=torch.int32, device=DEV)]
    _pack_roundtrip[(1,)](lo, hi, *outs, N=32)
    for got, want in zip(outs[:2], (lo, hi)):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got.view(torch.int32)[~nan], want.view(torch.int32)[~nan])
    assert (outs[2] == 1).all()


@needs_kernels
@pytest.mark.parametrize("dtype,complex_gate,kv_given,with_h0", CASES)
def test_kernel_matches_oracle_small(dtype, complex_gate, kv_given, with_h0):
    """n = 37 with 8-step tiles (5 segments, last one partial), 5 channels in tiles of 4."""
    B, n, C = 2, 37, 5
    args = make(B, n, C, dtype, complex_gate, kv_given, with_h0)
    block = (8, 4, 1)
    o, hT_re, hT_im, carries = ew.scan_forward(*args, block=block)
    do = torch.randn(B, n, C, device=DEV).to(dtype)
    g_re = torch.randn(B, C, device=DEV)
    g_im = torch.randn(B, C, device=DEV) if complex_gate else None
    ro, rh, rgrads = oracle(*args, do, g_re, g_im)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert rel(o, ro) < tol
    assert rel(hT_re, rh.real) < 1e-5
    if complex_gate:
        assert rel(hT_im, rh.imag) < 1e-5
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, block=block)
    for name, g, r, inp in zip(GRAD_NAMES, grads, rgrads, args):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == (inp.dtype if inp.dim() == 3 else torch.float32), name
            assert rel(g, r) < tol, name


def check_fwd_bwd(args, fwd_block, carry_t, bwd_block):
    """Forward in ``fwd_block`` tiles saving states every ``carry_t`` steps, backward in ``bwd_block``
    tiles: outputs, final state and every gradient against the float64 oracle (float32, 1e-5).
    Returns the forward's ``carries``."""
    q, _, _, _, a_im = args[:5]
    B, n, C = q.shape
    o, hT_re, hT_im, carries = ew.scan_forward(*args, block=fwd_block, carry_t=carry_t)
    do = torch.randn(B, n, C, device=DEV)
    g_re = torch.randn(B, C, device=DEV)
    g_im = torch.randn(B, C, device=DEV) if a_im is not None else None
    ro, rh, rgrads = oracle(*args, do, g_re, g_im)
    assert rel(o, ro) < 1e-5 and rel(hT_re, rh.real) < 1e-5
    if a_im is not None:
        assert rel(hT_im, rh.imag) < 1e-5
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, block=bwd_block)
    assert_grads(grads, rgrads, 1e-5)
    return carries


@needs_kernels
@pytest.mark.parametrize("fwd_t,carry_t", [(16, 8), (32, 8), (32, 16)])
@pytest.mark.parametrize("complex_gate", [True, False])
def test_kernel_backward_tiles_shorter_than_forward(fwd_t, carry_t, complex_gate):
    """The forward saves its state every ``carry_t`` steps inside its longer tiles (n = 75: the last
    forward tile and the last backward tile are partial); the backward runs ``carry_t``-step tiles."""
    B, n, C = 2, 75, 6
    args = make(B, n, C, torch.float32, complex_gate, False, True)
    carries = check_fwd_bwd(args, (fwd_t, 4, 1), carry_t, (carry_t, 8, 1))
    assert carries.numel() == ew.carries_numel(B, n, C, carry_t)


@needs_kernels
@pytest.mark.parametrize("complex_gate", [True, False])
def test_kernel_int64_offsets(monkeypatch, complex_gate):
    """The 64-bit offset path (taken past 2^31 elements per batch) on a small problem, forced."""
    for launcher in (forward, backward):
        monkeypatch.setattr(launcher, "_needs_int64", lambda *ts: True)
    check_fwd_bwd(make(1, 40, 20, torch.float32, complex_gate, False, True), (32, 32, 1), 16, (16, 32, 1))


@needs_kernels
def test_kernel_deterministic_lookback(deterministic):
    """Under ``torch.use_deterministic_algorithms(True)`` the look-back only waits for inclusive states;
    results as the oracle's, forward and backward, with tiles of different lengths."""
    check_fwd_bwd(make(2, 75, 6, torch.float32, True, False, True), (32, 4, 1), 16, (16, 8, 1))


@needs_kernels
def test_kernel_rejects_carry_step_not_dividing_tile():
    args = make(1, 40, 3, torch.float32, True, False, False)
    with pytest.raises(ValueError, match="carry_t"):
        ew.scan_forward(*args, block=(16, 4, 1), carry_t=32)


@needs_kernels
def test_kernel_time_contiguous_layout_and_zero_gates():
    """The seed's (B, n, 1) layout viewed as one batch of B time-contiguous channels; hard resets."""
    B, n = 6, 45
    q, k, v, a_re, a_im, h0_re, h0_im = make(B, n, 1, torch.float32, True, False, True, zero_gates=True)
    chan = [t[..., 0].t()[None] for t in (q, k, v, a_re, a_im)]
    h0 = [h0_re.t(), h0_im.t()]
    assert chan[0].stride(1) == 1
    block = (16, 2, 1)
    o, hr, hi, carries = ew.scan_forward(*chan, *h0, block=block)
    do = torch.randn_like(chan[0])
    g_re, g_im = torch.randn(1, B, device=DEV), torch.randn(1, B, device=DEV)
    ro, rh, rgrads = oracle(*chan, *h0, do, g_re, g_im)
    assert rel(o, ro) < 1e-5 and rel(hr, rh.real) < 1e-5 and rel(hi, rh.imag) < 1e-5
    grads = ew.scan_backward(do, g_re, g_im, *chan, *h0, carries, block=block)
    for g, r in zip(grads, rgrads):
        assert rel(g, r) < 1e-5


@needs_kernels
def test_kernel_single_segment_and_empty():
    q, k, v, a_re, a_im, h0_re, h0_im = make(1, 3, 2, torch.float32, True, False, True)
    o, hr, hi, _ = ew.scan_forward(q, k, v, a_re, a_im, h0_re, h0_im, block=(16, 2, 1))
    ro, rh, _ = oracle(q, k, v, a_re, a_im, h0_re, h0_im, torch.ones_like(q), torch.zeros_like(hr), None)
    assert rel(o, ro) < 1e-5 and rel(hr, rh.real) < 1e-5
    e = [t[:, :0] for t in (q, k, v, a_re, a_im)]
    o, hr, hi, _ = ew.scan_forward(*e, h0_re, h0_im)
    assert o.shape == (1, 0, 2) and torch.equal(hr, h0_re) and torch.equal(hi, h0_im)


@needs_kernels
@pytest.mark.parametrize("absent", ["re", "im"])
def test_kernel_final_state_gradient_one_part(absent):
    """The backward launcher takes either part of the final state's gradient alone (the other is zero)."""
    B, n, C = 2, 37, 5
    args = make(B, n, C, torch.float32, True, False, True)
    _, _, _, carries = ew.scan_forward(*args, block=(8, 4, 1))
    do = torch.randn(B, n, C, device=DEV)
    g = torch.randn(B, C, device=DEV)
    g_re, g_im = (None, g) if absent == "re" else (g, None)
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, block=(8, 4, 1))
    zero = torch.zeros_like(g)
    _, _, ref = oracle(*args, do, zero if g_re is None else g_re, zero if g_im is None else g_im)
    for got, want in zip(grads, ref):
        assert rel(got, want) < 1e-5


@needs_kernels
@pytest.mark.parametrize("used", ["o", "hT_re", "hT_im", "hT"])
def test_op_autograd_with_unused_outputs(used):
    """Through the custom op's autograd, a loss that uses only some outputs (the others get no
    gradient at all, not zeros) gives the oracle's gradients."""
    B, n, C = 2, 21, 3
    args = make(B, n, C, torch.float32, True, False, True)
    leaves = [t.clone().requires_grad_() for t in args]
    o, hr, hi, _ = ew.elementwise_scan(*leaves)
    do = torch.randn_like(o) if used == "o" else torch.zeros_like(o)
    g_re = torch.randn_like(hr) if used in ("hT_re", "hT") else torch.zeros_like(hr)
    g_im = torch.randn_like(hi) if used in ("hT_im", "hT") else torch.zeros_like(hi)
    loss = {"o": lambda: (o * do).sum(), "hT_re": lambda: (hr * g_re).sum(), "hT_im": lambda: (hi * g_im).sum(),
            "hT": lambda: (hr * g_re).sum() + (hi * g_im).sum()}[used]()
    grads = torch.autograd.grad(loss, leaves)
    _, _, ref = oracle(*args, do, g_re, g_im)
    for g, r in zip(grads, ref):
        assert rel(g, r) < 1e-5


# ----------------------------------------------------------------------------- GPU, real sizes

def _poison():
    """Fill the allocator's free blocks with NaN so that an unwritten output shows. At most 4 GiB (more
    than a case's outputs and workspace): the allocator keeps the block, and 8 test processes that each kept
    30% of the free memory ran the GPU out of memory under pytest-xdist."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(min(int(free * 0.3), 4 << 30) // 4, device="cuda").fill_(float("nan"))
    del x


def _torch_oracle(args, do, g_re, g_im):
    """Float64 forward/backward through the PyTorch implementation (validated against autograd above)."""
    a64 = [f64(t) for t in args]
    o, hr, hi = _torch_forward(*a64)
    grads = _torch_backward(do.double(), f64(g_re), f64(g_im), *a64)
    return o, hr, hi, grads


@pytest.mark.gpu
@pytest.mark.xdist_group("big_gpu_memory")  # up to 19 GiB each: one at a time under pytest-xdist
@pytest.mark.parametrize("B,n,C,layout", [(4, 2048, 1024, "bnc"), (1, 2048, 4096, "time"), (2, 1 << 20, 32, "bnc"),
                                          (1, 1 << 20, 64, "time")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("complex_gate", [True, False])
def test_gpu_real_sizes(B, n, C, layout, dtype, complex_gate):
    args = list(make(B, n, C, dtype, complex_gate, not complex_gate, True, device="cuda"))
    if layout == "time":  # time-contiguous: channels strided by n
        args = [None if t is None else (t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 3 else t)
                for t in args]
    do = torch.randn(B, n, C, device="cuda").to(dtype)
    g_re = torch.randn(B, C, device="cuda")
    g_im = torch.randn(B, C, device="cuda") if complex_gate else None
    _poison()
    o, hr, hi, carries = ew.scan_forward(*args)
    _poison()
    grads = ew.scan_backward(do, g_re, g_im, *args, carries)
    torch.cuda.synchronize()
    ro, rhr, rhi, rgrads = _torch_oracle(args, do, g_re, g_im)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(o, ro) < tol
    assert rel(hr, rhr) < 1e-5
    if complex_gate:
        assert rel(hi, rhi) < 1e-5
    assert_grads(grads, rgrads, tol)


@pytest.mark.gpu
def test_gpu_zero_gates_and_repeatability():
    """Hard resets stay finite, and every run matches the oracle. Runs may differ in the last bits (the
    look-back's path depends on timing: docs/design.md section 5, "Reproducibility"), not more."""
    args = make(2, 4096, 256, torch.float32, True, False, True, device="cuda", zero_gates=True)
    outs = [ew.scan_forward(*args)[0] for _ in range(3)]
    ro, *_ = _torch_oracle(args, torch.ones_like(args[0]), None, None)
    assert all(rel(o, ro) < 1e-5 for o in outs)
    assert all(rel(o, outs[0]) < 1e-6 for o in outs[1:])


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bitwise_reproducible(deterministic):
    """Under ``torch.use_deterministic_algorithms(True)``: forward and backward bit-identical run to run."""
    args = make(2, 4096, 256, torch.float32, True, False, True, device="cuda", zero_gates=True)
    do = torch.randn_like(args[0])
    runs = []
    for _ in range(3):
        o, hr, hi, carries = ew.scan_forward(*args)
        runs.append([o, hr, hi, *[g for g in ew.scan_backward(do, None, None, *args, carries) if g is not None]])
    ro, *_ = _torch_oracle(args, do, None, None)
    assert rel(runs[0][0], ro) < 1e-5
    assert all(torch.equal(x, y) for run in runs[1:] for x, y in zip(runs[0], run))
