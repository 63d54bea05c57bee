"""Packed variable-length sequences (``cu_seqlens``, issue 21) through the head-dim-1 scan: the Triton look-back
kernels (on the CPU under ``TRITON_INTERPRET=1``, on CUDA with ``-m gpu``) and the op's PyTorch path, against each
sequence run alone: the float64 sequential loop and its autograd (``helpers.elementwise_check.oracle``) per
sequence, and at real sizes the unpacked kernel per sequence.

On the CPU the forward runs 8-step tiles saving its state every 4 steps and the backward 4-step tiles (or 4 and
4), with 3 or 5 channels in blocks of 4, so the lengths below put boundaries inside tiles, on tile edges, several
in one tile, and one sequence across several segments.
"""
import pytest
import torch

from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import op as ew_op
from gateloop_kernels.elementwise.torch_path import _torch_backward, _torch_forward

from helpers.elementwise_check import GRAD_NAMES, assert_grads, make, oracle, rel
from helpers.kernels import DEV, needs_kernels

#: 0 (leading, inside, trailing), 1, the tiles' lengths +- 1 (3, 5; 7, 9), three in one tile, 20 across 3 segments
LENS = [0, 2, 1, 3, 5, 0, 7, 9, 1, 20, 0]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
FWD, CARRY, BWD = (8, 4, 1), 4, (4, 4, 1)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs, numpy


def cu_of(lens, device=DEV, dtype=torch.int32):
    return torch.tensor([0] + lens, device=device).cumsum(0).to(dtype)


def packed_inputs(lens, dtype, complex_gate, kv_given, with_h0, C=3, device=DEV):
    """``(args, cu_seqlens, do, g_re, g_im)``: a packed ``(1, T, C)`` problem with an initial state and a final
    state gradient per sequence (``g_im`` ``None`` for a real gate)."""
    q, k, v, a_re, a_im, _, _ = make(1, sum(lens), C, dtype, complex_gate, kv_given, False, device=device)
    N = len(lens)
    h0_re = torch.randn(N, C, device=device) if with_h0 else None
    h0_im = torch.randn(N, C, device=device) if (with_h0 and complex_gate) else None
    do = torch.randn(1, sum(lens), C, device=device).to(dtype)
    g_re = torch.randn(N, C, device=device)
    g_im = torch.randn(N, C, device=device) if complex_gate else None
    return (q, k, v, a_re, a_im, h0_re, h0_im), cu_of(lens, device), do, g_re, g_im


def packed_oracle(args, lens, do, g_re, g_im):
    """Float64 ``(o, hT (N, C) complex, grads)`` with every sequence run alone through the sequential loop."""
    q, k, v, a_re, a_im, h0_re, h0_im = args
    o = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    hT = torch.zeros(len(lens), q.shape[2], dtype=torch.complex128, device=q.device)
    grads = [None if t is None else torch.zeros(t.shape, dtype=torch.float64, device=q.device) for t in args]
    s = 0
    for i, n in enumerate(lens):
        e = s + n
        h0 = [None if t is None else t[i:i + 1] for t in (h0_re, h0_im)]
        if n == 0:  # no step: the final state is the initial one, and so are their gradients
            if h0_re is not None:
                hT[i] = torch.complex(h0_re[i].double(), h0_im[i].double() if h0_im is not None else 0 * h0_re[i].double())
                grads[5][i] = g_re[i]
                if h0_im is not None:
                    grads[6][i] = g_im[i]
            continue
        ro, rh, rg = oracle(*(None if t is None else t[:, s:e] for t in args[:5]), *h0, do[:, s:e], g_re[i:i + 1],
                            None if g_im is None else g_im[i:i + 1])
        o[:, s:e], hT[i] = ro, rh[0]
        for j, g in enumerate(rg):
            if g is not None:
                if j < 5:
                    grads[j][:, s:e] = g
                else:
                    grads[j][i] = g[0]
        s = e
    return o, hT, grads


def check(got_o, got_hr, got_hi, got_grads, ref, args, tol):
    ro, rh, rgrads = ref
    assert got_o.dtype == args[0].dtype and got_hr.shape == rh.shape
    assert rel(got_o, ro) < tol
    assert rel(got_hr, rh.real) < max(tol, 1e-5)  # float32 state whatever the input dtype
    if args[4] is not None:
        assert rel(got_hi, rh.imag) < max(tol, 1e-5)
    else:
        assert got_hi.numel() == 0
    for name, g, r in zip(GRAD_NAMES, got_grads, rgrads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.shape == r.shape, name
            assert rel(g, r) < tol, name


def run_kernels(args, cu, do, g_re, g_im, fwd=FWD, carry_t=CARRY, bwd=BWD):
    o, hr, hi, carries = ew.scan_forward(*args, block=fwd, carry_t=carry_t, cu_seqlens=cu)
    return o, hr, hi, ew.scan_backward(do, g_re, g_im, *args, carries, block=bwd, cu_seqlens=cu)


def run_op(args, cu, do, g_re, g_im):
    """Through ``elementwise_scan``'s autograd: ``(o, hT_re, hT_im, grads)``, every output used."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in args]
    o, hr, hi, _ = ew.elementwise_scan(*leaves, cu_seqlens=cu)
    loss = (o * do).sum() + (hr * g_re).sum() + ((hi * g_im).sum() if g_im is not None else 0)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return o.detach(), hr.detach(), hi.detach(), [None if t is None else next(grads) for t in leaves]


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The op runs its Triton kernels on CPU tensors (under the interpreter)."""
    monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))


# ----------------------------------------------------------------------------- Triton kernels

@needs_kernels
@pytest.mark.parametrize("dtype,complex_gate,kv_given,with_h0,tiles,C", [
    (torch.float32, True, False, True, (FWD, CARRY, BWD), 5),
    (torch.float32, False, True, True, (BWD, 4, BWD), 3),
    (torch.float32, True, True, False, (FWD, CARRY, BWD), 3),
    (torch.bfloat16, True, False, True, (FWD, CARRY, BWD), 3),
])
def test_kernel_packed_matches_each_sequence_alone(dtype, complex_gate, kv_given, with_h0, tiles, C):
    """Outputs, per-sequence final states and every gradient (q, k, v, the gate's parts, the initial states)."""
    args, cu, do, g_re, g_im = packed_inputs(LENS, dtype, complex_gate, kv_given, with_h0, C)
    fwd, carry_t, bwd = tiles
    o, hr, hi, grads = run_kernels(args, cu, do, g_re, g_im, fwd, carry_t, bwd)
    check(o, hr, hi, grads, packed_oracle(args, LENS, do, g_re, g_im), args, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("lens", [[8, 4, 0, 4, 1, 1, 1, 1, 8], [0, 0, 17, 0]], ids=["tile-edges", "empties"])
def test_kernel_boundary_layouts(lens):
    """Boundaries only on tile edges (no tile takes a look-back) and at every step of a tile; a lone sequence
    between empty ones; int64 ``cu_seqlens``."""
    args, cu, do, g_re, g_im = packed_inputs(lens, torch.float32, True, False, True)
    o, hr, hi, grads = run_kernels(args, cu.long(), do, g_re, g_im)
    check(o, hr, hi, grads, packed_oracle(args, lens, do, g_re, g_im), args, 1e-5)


@needs_kernels
def test_kernel_single_sequence_is_the_unpacked_scan():
    """``cu_seqlens = [0, T]`` gives the unpacked kernel's results (with its initial state)."""
    args, cu, do, g_re, g_im = packed_inputs([21], torch.float32, True, False, True)
    packed = run_kernels(args, cu, do, g_re, g_im)
    o, hr, hi, carries = ew.scan_forward(*args, block=FWD, carry_t=CARRY)
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, block=BWD)
    for x, y in zip([*packed[:3], *packed[3]], [o, hr, hi, *grads]):
        assert (x is None) == (y is None)
        if x is not None:
            assert rel(x, y) < 1e-6


@needs_kernels
def test_kernel_no_steps():
    """T = 0: every sequence is empty, its final state the initial one, whose gradient is the final state's."""
    args, cu, do, g_re, g_im = packed_inputs([0, 0, 0], torch.float32, True, False, True)
    o, hr, hi, grads = run_kernels(args, cu, do, g_re, g_im)
    assert o.shape == (1, 0, 3)
    assert torch.equal(hr, args[5]) and torch.equal(hi, args[6])
    assert torch.equal(grads[5], g_re) and torch.equal(grads[6], g_im)


@needs_kernels
def test_kernel_packed_deterministic(deterministic):
    """Without aggregates (each tile waits for its predecessor's inclusive state, or publishes its own at once
    when it holds a boundary): the oracle's results (bitwise repeatability: the GPU twin)."""
    args, cu, do, g_re, g_im = packed_inputs(LENS, torch.float32, True, False, True)
    check(*run_kernels(args, cu, do, g_re, g_im), packed_oracle(args, LENS, do, g_re, g_im), args, 1e-5)


# ----------------------------------------------------------------------------- the op (PyTorch path, kernels)

@pytest.mark.parametrize("dtype,complex_gate,kv_given,with_h0", [
    (torch.float64, True, False, True), (torch.float64, False, True, True), (torch.float64, True, True, False),
    (torch.float32, True, False, True), (torch.bfloat16, False, False, True)])
def test_op_cpu_path_packed(dtype, complex_gate, kv_given, with_h0):
    """The op's PyTorch implementation (off CUDA) through its autograd, float64 to 1e-12."""
    args, cu, do, g_re, g_im = packed_inputs(LENS, dtype, complex_gate, kv_given, with_h0, device="cpu")
    if dtype == torch.float64:
        g_re, g_im = g_re.double(), None if g_im is None else g_im.double()
        args = tuple(None if t is None else t.double() for t in args)
    o, hr, hi, grads = run_op(args, cu, do, g_re, g_im)
    check(o, hr, hi, grads, packed_oracle(args, LENS, do, g_re, g_im), args, TOL[dtype])


@needs_kernels
def test_op_kernel_path_packed(kernel_on_cpu):
    """The op's eager autograd.Function with the Triton kernels at their default tiles (one tile here)."""
    args, cu, do, g_re, g_im = packed_inputs([4, 0, 9, 1, 6], torch.float32, True, False, True)
    o, hr, hi, grads = run_op(args, cu, do, g_re, g_im)
    check(o, hr, hi, grads, packed_oracle(args, [4, 0, 9, 1, 6], do, g_re, g_im), args, 1e-5)


@pytest.mark.parametrize("path", ["torch", pytest.param("kernel", marks=needs_kernels)])
def test_nonfinite_stays_in_its_sequence(path, monkeypatch):
    """A NaN in one sequence's k and an Inf in another's gate reach no other sequence: the boundary is a
    select, not a zero gate (``0 * NaN``). Elsewhere finite and as each sequence alone."""
    lens = [6, 11, 3, 12]
    args, cu, do, g_re, g_im = packed_inputs(lens, torch.float32, True, False, True, device="cpu" if path == "torch" else DEV)
    args = list(args)
    args[1], args[3] = args[1].clone(), args[3].clone()
    args[1][0, 8, 1] = float("nan")  # sequence 1, channel 1
    args[3][0, 19, 2] = float("inf")  # sequence 2, channel 2
    if path == "kernel":
        monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    o, hr, hi, grads = run_op(args, cu, do, g_re, g_im)
    ro, rh, rgrads = packed_oracle(args, lens, do, g_re, g_im)
    keep = torch.ones(1, sum(lens), 3, dtype=torch.bool)
    keep[0, 6:17, 1] = False
    keep[0, 17:20, 2] = False
    for x, r in [(o, ro), *[(g, rg) for g, rg in zip(grads[:5], rgrads[:5])]]:
        assert rel(x[keep], r[keep]) < 1e-5
    clean = torch.ones(len(lens), 3, dtype=torch.bool)
    clean[1, 1] = clean[2, 2] = False
    for x, r in ((hr, rh.real), (hi, rh.imag), (grads[5], rgrads[5]), (grads[6], rgrads[6])):
        assert torch.isfinite(r[clean]).all()
        fin = torch.isfinite(r)
        assert rel(x[fin], r[fin]) < 1e-5


def test_opcheck_and_compile_with_cu_seqlens():
    """The registered ops with ``cu_seqlens`` (fake implementations, autograd registration), and
    torch.compile(fullgraph=True) with ``cu_seqlens`` a tensor input: the eager results."""
    lens = [5, 0, 9, 2]
    args, cu, do, g_re, g_im = packed_inputs(lens, torch.float32, True, False, True, device="cpu")
    leaves = [t.clone().requires_grad_() for t in args]
    torch.library.opcheck(ew.elementwise_scan_op.op, (*leaves, cu))
    torch.library.opcheck(ew.elementwise_scan_op.op, (leaves[0], leaves[1], None, leaves[3], None, None, None, cu))

    def f(q, k, v, ar, ai, h0r, h0i, cu):
        o, hr, hi, _ = ew.elementwise_scan(q, k, v, ar, ai, h0r, h0i, cu_seqlens=cu)
        return (o * do).sum() + (hr * g_re).sum() + (hi * g_im).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves, cu)
    ref = f(*leaves, cu)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for x, y in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves)):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- GPU, real sizes

def _lengths(T, lo=64, hi=8192, extra=(0, 1, 31, 32, 33, 15, 16, 17, 0)):
    """Lengths drawn log-uniformly from ``[lo, hi]`` plus ``extra`` (the tiles' lengths +- 1, empty), to ``T``."""
    lens = list(extra)
    while sum(lens) < T:
        lens.append(int(torch.exp(torch.empty(1).uniform_(torch.log(torch.tensor(float(lo))).item(),
                                                          torch.log(torch.tensor(float(hi))).item())).item()))
    lens[-1] -= sum(lens) - T
    perm = torch.randperm(len(lens)).tolist()
    return [lens[i] for i in perm]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("complex_gate,kv_given,with_h0", [(True, False, True), (False, True, False)])
def test_gpu_packed_real_sizes(dtype, complex_gate, kv_given, with_h0):
    """T = 32768 packed, C = 512, default tiles: against the op's float64 PyTorch path (checked against the
    sequential loop above) and, per sequence, the unpacked kernel."""
    lens = _lengths(32768)
    args, cu, do, g_re, g_im = packed_inputs(lens, dtype, complex_gate, kv_given, with_h0, C=512, device="cuda")
    o, hr, hi, carries = ew.scan_forward(*args, cu_seqlens=cu)
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, cu_seqlens=cu)
    a64 = [None if t is None else t.double() for t in args]
    ro, rhr, rhi = _torch_forward(*a64, cu)
    rgrads = _torch_backward(do.double(), g_re.double(), None if g_im is None else g_im.double(), *a64, cu)
    tol = TOL[dtype]
    assert rel(o, ro) < tol and rel(hr, rhr) < 1e-5
    if complex_gate:
        assert rel(hi, rhi) < 1e-5
    assert_grads(grads, rgrads, tol)
    # each sequence alone through the unpacked kernel
    s = 0
    for i, n in enumerate(lens):
        if n:
            one = [None if t is None else (t[:, s:s + n] if t.dim() == 3 else t[i:i + 1]) for t in args]
            o1, h1r, h1i, _ = ew.scan_forward(*one)
            assert rel(o[:, s:s + n], o1) < tol and rel(hr[i], h1r[0]) < 1e-5
            if complex_gate:
                assert rel(hi[i], h1i[0]) < 1e-5
        s += n


@pytest.mark.gpu
def test_gpu_packed_many_short_and_deterministic(deterministic):
    """Thousands of short sequences (1..40 steps, many boundaries per tile), bitwise reproducible under
    ``torch.use_deterministic_algorithms(True)``, against the float64 PyTorch path."""
    lens = torch.randint(0, 41, (2000,)).tolist()
    args, cu, do, g_re, g_im = packed_inputs(lens, torch.float32, True, False, True, C=256, device="cuda")
    runs = []
    for _ in range(2):
        o, hr, hi, carries = ew.scan_forward(*args, cu_seqlens=cu)
        runs.append([o, hr, hi, *ew.scan_backward(do, g_re, g_im, *args, carries, cu_seqlens=cu)])
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]) if x is not None)
    a64 = [None if t is None else t.double() for t in args]
    ro, rhr, rhi = _torch_forward(*a64, cu)
    rgrads = _torch_backward(do.double(), g_re.double(), g_im.double(), *a64, cu)
    assert rel(runs[0][0], ro) < 1e-5 and rel(runs[0][1], rhr) < 1e-5 and rel(runs[0][2], rhi) < 1e-5
    for name, g, r in zip(GRAD_NAMES, runs[0][3:], rgrads):
        if g is not None:
            assert rel(g, r) < 1e-5, name


@pytest.mark.gpu
def test_gpu_compile_inductor_with_cu_seqlens():
    """torch.compile(fullgraph=True) with inductor and ``cu_seqlens`` a CUDA tensor input: the eager op's
    results and gradients (the kernels inside both)."""
    lens = [300, 0, 1, 4000, 17, 2000]
    args, cu, do, g_re, g_im = packed_inputs(lens, torch.float32, True, False, True, C=256, device="cuda")
    leaves = [t.clone().requires_grad_() for t in args]

    def f(q, k, v, ar, ai, h0r, h0i, cu):
        return ew.elementwise_scan(q, k, v, ar, ai, h0r, h0i, cu_seqlens=cu)[:3]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*leaves, cu)
    ref = f(*leaves, cu)
    for x, y in zip(got, ref):
        assert rel(x, y) < 1e-6

    def loss(outs):  # in eager for both: a float32 sum's order is not the point here
        return (outs[0] * do).sum() + (outs[1] * g_re).sum() + (outs[2] * g_im).sum()
    for x, y in zip(torch.autograd.grad(loss(got), leaves), torch.autograd.grad(loss(ref), leaves)):
        assert rel(x, y) < 1e-5
