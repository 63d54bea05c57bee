"""Packed variable-length batches (``cu_seqlens``) through the chunked scan (``chunked._chunk_gate_loop``).

A packed batch ``(1, T, H, .)`` of N sequences must equal each sequence run alone through the same kernels (the
same chunks run the same arithmetic: bitwise equal on the interpreter) and the float64 sequential reference per
sequence: outputs, final states and the gradients of q, k, v, the gate and the initial states; without an initial
state the gradient of each sequence's first gate is exactly zero. Lengths include 0, 1, BT - 1, BT, BT + 1 and
several chunks, in a fresh random order each run (an empty sequence first, last or between).

CPU: the real kernels under ``TRITON_INTERPRET=1``, chunks of 16 steps. GPU (``-m gpu``): head dims 64 and 128,
T ~ 4096, every dtype and float32 precision mode, poisoned allocations (an unwritten output is NaN).
"""
import pytest
import torch

from helpers import strided_1d
from helpers.chunked_check import make_inputs, reference_f64, rel
from helpers.kernels import HAS_CUDA, INTERPRET

if not HAS_CUDA and not INTERPRET:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from gateloop_kernels import chunked  # noqa: E402
from gateloop_kernels.chunked import config  # noqa: E402
from gateloop_kernels.chunked.op import _chunk_op  # noqa: E402
from gateloop_kernels.chunked.states import _chunk_table, _chunk_table_op  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

cpu_only = pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
NAMES = ("dq", "dk", "dv", "da_re", "da_im")


def _cu(lens, device, dtype=torch.int32):
    return torch.tensor([0] + lens, device=device).cumsum(0).to(dtype)


def _scan(q, k, v, ar, ai, h0, do, dht, precision, BT, cu=None):
    """One forward and backward through the kernels: output, final state (None without dht) and the gradients
    of q, k, v, a_re, a_im (and h0 where given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, ar, ai)]
    h0l = None if h0 is None else h0.detach().clone().requires_grad_()
    o, st = chunked._chunk_gate_loop(*leaves, h0l, dht is not None, precision, BT, cu_seqlens=cu)
    loss = (o.float() * do.float()).sum()
    if dht is not None:
        loss = loss + (st * dht.conj()).real.sum()
    loss.backward()
    return o.detach(), st, [t.grad for t in leaves + ([h0l] if h0l is not None else [])]


def check_varlen(lens, H, d, e, dtype, device, tol, precision="ieee", init=False, final=False, BT=16,
                 alone_tol=1e-6, poison=False):
    """The packed batch of ``lens`` (in a random order) against each sequence alone (``alone_tol``; None: not
    run) and the float64 sequential reference per sequence (``tol``), relative errors over the whole batch."""
    lens = [lens[i] for i in torch.randperm(len(lens)).tolist()]
    N, T = len(lens), sum(lens)
    cu = _cu(lens, device, torch.int64 if N % 2 else torch.int32)
    q, k, v, ar, ai = make_inputs(1, T, H, d, e, dtype, device, zeros=T > 1)
    cplx = (lambda *s: torch.complex(torch.randn(*s, device=device), torch.randn(*s, device=device)))
    h0 = cplx(N, H, d, e) if init else None
    dht = cplx(N, H, d, e) if final else None
    do = torch.randn(1, T, H, e, device=device).to(dtype)
    if poison and device == "cuda":
        torch.empty(1 << 28, device=device).fill_(float("nan"))  # freed: the next allocations read NaN
    o, st, grads = _scan(q, k, v, ar, ai, h0, do, dht, precision, BT, cu)
    assert o.shape == (1, T, H, e) and o.dtype == dtype
    assert st is None if not final else (st.shape == (N, H, d, e) and st.dtype == torch.complex64)
    names = NAMES + (("dh0",) if init else ())

    def per_seq(fn):
        """fn's (output, final state, grads) per sequence, joined: time-major ones along time, states along N."""
        outs = [fn(slice(int(a), int(b)), i) for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
        cat = [torch.cat([x[j] for x in outs], 1) for j in range(6)]  # o and the time-major grads
        states = [None if x[6] is None else x[6].reshape(1, H, d, e) for x in outs]
        dh0s = [x[7].reshape(1, H, d, e) for x in outs] if init else []
        return cat[0], (torch.cat(states) if final else None), cat[1:] + ([torch.cat(dh0s)] if init else [])

    def alone(ts, i):
        h = None if h0 is None else h0[i:i + 1]
        ht = None if dht is None else dht[i:i + 1]
        oi, si, gi = _scan(q[:, ts], k[:, ts], v[:, ts], ar[:, ts], ai[:, ts], h, do[:, ts], ht, precision, BT)
        return (oi, *gi[:5], si, gi[5] if init else None)

    def oracle(ts, i):
        h = None if h0 is None else h0[i:i + 1]
        ht = None if dht is None else dht[i:i + 1]
        oi, si, gi = reference_f64(q[:, ts], k[:, ts], v[:, ts], ar[:, ts], ai[:, ts], h, do[:, ts], ht)
        return (oi, *gi[:5], si if final else None, gi[5] if init else None)

    report = {}
    for against, bound, fn in (("alone", alone_tol, alone), ("reference", tol, oracle))[alone_tol is None:]:
        ro, rst, rgrads = per_seq(fn)
        errs = {"o": rel(o, ro), **({"final_state": rel(st, rst)} if final else {})}
        for name, g, r in zip(names, grads, rgrads):
            assert torch.isfinite(g).all(), name
            errs[name] = rel(g, r)
        bad = {k_: v_ for k_, v_ in errs.items() if not v_ <= bound}
        assert not bad, f"{against}: errors over {bound}: {bad} (all: {errs}; lengths {lens})"
        report[against] = errs
    starts = cu[:-1][torch.tensor(lens, device=device) > 0]
    if not init:  # the first gate of a sequence multiplies only the (zero) state before it
        assert (grads[3][0, starts] == 0).all() and (grads[4][0, starts] == 0).all()
    for i in [i for i, n in enumerate(lens) if n == 0]:  # an empty sequence hands its state through
        if final:
            assert torch.equal(st[i], h0[i].to(st.dtype) if init else torch.zeros_like(st[i]))
        if init:
            assert torch.equal(grads[5][i], dht[i] if final else torch.zeros_like(grads[5][i]))
    return report


# ----------------------------------------------------------------------------- CPU (interpreter)

#: with chunks of 16: an empty sequence, one step, BT - 1, BT, BT + 1 and one of several chunks
CPU_LENS = [0, 1, 15, 16, 17, 40]


# Each state pass (two passes in the exact mode, one kernel otherwise) meets both sides of its two per-direction
# flags (an initial state / final-state cotangent to restart from, a final state / initial-state gradient to
# store) across two tests; the per-sequence runs of the same kernels (the interpreter's slowest part) run in one.

@cpu_only
@pytest.mark.parametrize("init,final,alone", [(True, True, True), (False, False, False)])
def test_cpu_float32_exact(init, final, alone):
    """The exact mode's two state passes (_chunk_local + _state_scan), d = e."""
    check_varlen(CPU_LENS, 1, 16, 16, torch.float32, "cpu", 1e-5, init=init, final=final,
                 alone_tol=1e-6 if alone else None)


@cpu_only
def test_cpu_float32_tf32_unequal_dims():
    """The one-kernel state pass (_chunk_states), d != e, final state without initial state."""
    check_varlen(CPU_LENS, 1, 16, 32, torch.float32, "cpu", 5e-3, precision="tf32", final=True)


@cpu_only
@pytest.mark.parametrize("one_kernel", [True, False])
def test_cpu_bfloat16(one_kernel, monkeypatch):
    """The one-kernel state pass (and the two passes, which a long packed batch at few heads runs), initial state
    without final state, d != e. Against the reference the bound of test_chunked.py::test_cpu_half (the kernels'
    bf16 rounding at a few steps reached 8e-3 relative over four seeds; the GPU tests hold 1e-2 at real sizes)."""
    if not one_kernel:
        monkeypatch.setitem(config._CFG[torch.bfloat16], "chunk_states", None)
    check_varlen(CPU_LENS, 1, 32, 16, torch.bfloat16, "cpu", 2e-2, init=True, alone_tol=None)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=cpu_only), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunk_table(device):
    """The device-built table (one launch, ``_build_chunk_table``) against a per-sequence loop, for random lengths
    with empty sequences: slots in order, a sequence's chunks from its first step on, every step in exactly one
    chunk, the slot bound; int32 and int64 ``cu_seqlens``, contiguous or a strided view (every third trial: the
    kernel reads it by offset)."""
    BT = 16
    for trial in range(20):  # the last two: several 1024-wide blocks of sequences and of slots in the kernel
        N = int(torch.randint(1, 8, ())) if trial < 18 else 2500
        lens = (torch.randint(0, 3 * BT, (N,)) * (torch.rand(N) > 0.3)).tolist()
        T = sum(lens)
        cu = _cu(lens, device, (torch.int32, torch.int64)[trial % 2])
        if trial % 3 == 2:  # every other entry of a buffer whose others are garbage
            cu = strided_1d(cu)
        tab = _chunk_table(cu, T, BT).view(-1, 4).tolist()
        want, t = [], 0
        for i, n in enumerate(lens):
            c = max(1, -(-n // BT))
            want += [[t + j * BT, t + n, i, (j == 0) + 2 * (j == c - 1)] for j in range(c)]
            t += n
        assert len(tab) == T // BT + N >= len(want)
        assert tab[:len(want)] == want and all(r == [T, T, N - 1, 0] for r in tab[len(want):]), (lens, tab)


@cpu_only
def test_cpu_all_empty():
    """T = 0 (every sequence empty): no kernel runs, each final state is its initial state, gradient through."""
    H, d, e, N = 1, 16, 16, 3
    q, k, v, ar, ai = make_inputs(1, 0, H, d, e, torch.float32, "cpu")
    h0 = torch.randn(N, H, d, e, dtype=torch.complex64, requires_grad=True)
    o, st = chunked._chunk_gate_loop(q, k, v, ar, ai, h0, True, "ieee", 16, cu_seqlens=_cu([0] * N, "cpu"))
    assert o.shape == (1, 0, H, e) and torch.equal(st, h0)
    dht = torch.randn_like(st)
    (st * dht.conj()).real.sum().backward()
    assert torch.equal(h0.grad, dht)


@cpu_only
def test_cpu_custom_op_opcheck_and_compile():
    """The registered ops with a chunk table (schema, fake tensors, autograd registration), the table's own op, and
    torch.compile(fullgraph=True) with cu_seqlens a tensor input: the same results and gradients as eager."""
    lens, H, d, e, BT = [3, 0, 17], 1, 16, 16, 16
    T = sum(lens)
    cu = _cu(lens, "cpu")
    q, k, v, ar, ai = make_inputs(1, T, H, d, e, torch.float32, "cpu")
    h0 = torch.randn(len(lens), H, 2, d, e)
    args = (q, k, v, ar, ai, h0, True, "tf32x3", BT, cu, _chunk_table(cu, T, BT))
    torch.library.opcheck(_chunk_op.op, [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                    else t for t in args],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(_chunk_table_op.op, (cu, T, BT), test_utils=("test_schema", "test_faketensor"))

    def fn(cu, *x):
        o, st = chunked._chunk_gate_loop(*x, True, "ieee", BT, cu_seqlens=cu)
        return o.sum() + st.abs().sum()

    s0 = torch.complex(h0[:, :, 0], h0[:, :, 1])
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, ar, ai, s0)]
        loss = f(cu, *leaves)
        loss.backward()
        outs.append([loss.detach()] + [t.grad for t in leaves])  # the result too: o.sum()'s gradients never see o
    for name, a, b in zip(("loss",) + NAMES + ("dh0",), *outs):
        torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------- GPU

def gpu_lens(T, extra):
    """Lengths log-uniform in [1, 2048] up to about T steps, with ``extra`` among them."""
    lens = list(extra)
    while sum(lens) < T:
        lens.append(int(torch.exp(torch.empty(()).uniform_(0, 7.62)).round()))
    return lens


GPU_DIMS = [(64, 64), (128, 64)]  # (each new (d, e, dtype) compiles both specialisations of every kernel)
GPU_MODES = [  # dtype, precision, tolerance against the reference, against each sequence alone
    pytest.param(torch.float32, "ieee", 1e-5, 1e-6, id="fp32-ieee"),
    pytest.param(torch.float32, "tf32", 5e-3, 1e-6, id="fp32-tf32"),
    pytest.param(torch.bfloat16, "ieee", 1e-2, 2e-3, id="bf16"),
    pytest.param(torch.float16, "ieee", 1e-2, 2e-3, id="fp16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("d,e", GPU_DIMS)
@pytest.mark.parametrize("dtype,precision,tol,alone_tol", GPU_MODES)
def test_gpu_varlen(d, e, dtype, precision, tol, alone_tol):
    check_varlen(gpu_lens(4096, [0, 1, 63, 64, 65, 0]), 4, d, e, dtype, "cuda", tol, precision=precision,
                 init=True, final=True, BT=64, alone_tol=alone_tol, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision,tol,alone_tol", GPU_MODES[1:])
def test_gpu_varlen_one_kernel_state_pass(dtype, precision, tol, alone_tol, monkeypatch):
    """The one-kernel state pass of tf32 and 16-bit inputs, which ``test_gpu_varlen``'s 4 heads do not run
    (``states._one_pass_pays`` picks two passes for 16 programs; a packed batch at many heads runs this one)."""
    from gateloop_kernels.chunked import states

    monkeypatch.setattr(states, "_sm_count", lambda device: 1)
    check_varlen(gpu_lens(4096, [0, 1, 63, 64, 65, 0]), 4, 64, 64, dtype, "cuda", tol, precision=precision,
                 init=True, final=True, BT=64, alone_tol=alone_tol, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision,tol,alone_tol", GPU_MODES[::2])
def test_gpu_varlen_no_state(dtype, precision, tol, alone_tol):
    """No initial or final state: zero restarts, and each sequence's first gate gradient exactly zero."""
    check_varlen(gpu_lens(4096, [0, 1, 63, 64, 65]), 4, 64, 64, dtype, "cuda", tol, precision=precision,
                 BT=64, alone_tol=alone_tol, poison=True)


@pytest.mark.gpu
def test_gpu_varlen_non_finite_stays_in_its_sequence():
    """A NaN in one sequence's value and an Inf gate in another leave every other sequence's outputs, final
    states and gradients exactly as without them (the restarts are selects)."""
    lens = [100, 0, 300, 64, 700]
    cu = _cu(lens, "cuda")
    T, H, d, e = sum(lens), 2, 64, 64
    q, k, v, ar, ai = make_inputs(1, T, H, d, e, torch.float32, "cuda")
    h0 = torch.randn(len(lens), H, d, e, dtype=torch.complex64, device="cuda")
    dht = torch.randn_like(h0)
    do = torch.randn(1, T, H, e, device="cuda")
    clean = _scan(q, k, v, ar, ai, h0, do, dht, "ieee", 64, cu)
    v, ar = v.clone(), ar.clone()
    v[0, 100 + 150, 1, 3] = float("nan")  # sequence 2
    ar[0, 464 + 10, 0] = float("inf")  # sequence 4
    bad = _scan(q, k, v, ar, ai, h0, do, dht, "ieee", 64, cu)
    keep = torch.ones(T, dtype=torch.bool, device="cuda")
    keep[100:400] = False
    keep[464:] = False
    for name, x, y in zip(("o",) + NAMES, [clean[0]] + clean[2][:5], [bad[0]] + bad[2][:5]):
        assert torch.equal(x[0, keep], y[0, keep]), name
    for i in (0, 1, 3):
        assert torch.equal(clean[1][i], bad[1][i]) and torch.equal(clean[2][5][i], bad[2][5][i]), i


@pytest.mark.gpu
def test_gpu_varlen_exact_one_kernel_state_pass(monkeypatch):
    """The exact float32 mode's one-kernel state pass (``chunk_states_exact``, see test_chunked.py)."""
    from test_chunked import EXACT_ONE_KERNEL

    monkeypatch.setitem(config._CFG[torch.float32], "chunk_states_exact", EXACT_ONE_KERNEL)
    check_varlen(gpu_lens(4096, [0, 1, 63, 64, 65]), 4, 64, 64, torch.float32, "cuda", 1e-5, init=True,
                 final=True, BT=64, poison=True)


@pytest.mark.gpu
def test_gpu_varlen_no_host_sync():
    """The packed forward and backward (chunk table included) never synchronise with the host: CUDA's sync
    debug mode raises on any synchronising call (``.item()``, ``.tolist()``, ``nonzero``, a copy to the host)."""
    lens = [0, 1, 63, 64, 65, 700]
    cu = _cu(lens, "cuda")
    q, k, v, ar, ai = make_inputs(1, sum(lens), 2, 64, 64, torch.bfloat16, "cuda")
    h0 = torch.randn(len(lens), 2, 64, 64, dtype=torch.complex64, device="cuda")
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    _scan(q, k, v, ar, ai, h0, do, dht, "ieee", 64, cu)  # compiled and cached first (the launcher may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _scan(q, k, v, ar, ai, h0, do, dht, "ieee", 64, cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
