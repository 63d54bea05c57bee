"""One dispatch, one validation pass (issue 25): every public entry point checks its arguments once and reaches
exactly one backend (the elementwise op, the chunked kernel, the empty scan or the reference) once, through
``gateloop_kernels.dispatch.scan``; ``precision=`` and ``chunk_size=`` reach the backend and are checked.

The backends and the validation helpers are wrapped by spies that count calls and run the real functions, so
the results are also checked against the float64 sequential reference.
"""
import warnings
from collections import Counter

import pytest
import torch

import gateloop_kernels as G
from gateloop_kernels import chunked, dispatch, heads, operator
from gateloop_kernels.chunked import op as chunked_op
from gateloop_kernels import reference as R
from gateloop_kernels.layers import GateLoopedAttention
from helpers.kernels import DEV, needs_kernels

F64 = torch.float64
BACKENDS = ("elementwise_scan", "_chunk_gate_loop", "empty_scan", "chunked_reference")
CHECKS = {operator: ("check_gate_loop_inputs", "check_initial_state", "check_simple_inputs", "check_precision",
                     "check_chunk_size"),
          heads: ("check_heads_inputs", "check_precision", "check_chunk_size"),
          chunked_op: ("check_chunk_gate_loop_inputs",)}


@pytest.fixture
def log(monkeypatch):
    """``[(name, args, kwargs)]`` of every backend and validation call, in order."""
    calls = []

    def spy(mod, name):
        real = getattr(mod, name)

        def wrapper(*args, **kwargs):
            calls.append((name, args, kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(mod, name, wrapper)

    for name in BACKENDS[:3]:
        spy(dispatch, name)
    spy(R, "chunked_reference")
    for mod, names in CHECKS.items():
        for name in names:
            spy(mod, name)
    return calls


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The dispatch takes the Triton kernels' paths for CPU tensors (run by the interpreter), warnings reset."""
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_WARNED", set())


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def polar(*shape, dtype=F64):
    return torch.polar(0.5 + 0.5 * torch.rand(*shape, dtype=dtype, device=DEV),
                       torch.randn(*shape, dtype=dtype, device=DEV))


def operator_case(d, gate="head", n=13, dtype=F64, **kw):
    """``(run, oracle)`` for ``gate_loop_operator`` on ``(2, n, d)`` inputs with a gate per head / key dim."""
    q, k, v = (torch.randn(2, n, d, dtype=dtype, device=DEV) for _ in range(3))
    a = polar(2, n, d if gate == "key" else 1, 1, dtype=dtype)
    s0 = torch.randn(2, d, d, dtype=torch.complex128, device=DEV)
    return (lambda: G.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True, **kw),
            lambda: R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex128), s0, True))


def heads_case(d, n=13, dtype=F64, form="z", **kw):
    """``(run, oracle)`` for ``gate_loop_heads`` on ``(2, n, 3, d)`` inputs, the oracle per head."""
    B, H = 2, 3
    q, k, v = (torch.randn(B, n, H, d, dtype=dtype, device=DEV) for _ in range(3))
    a = polar(B, n, H)
    s0 = torch.randn(B, H, d, d, dtype=torch.complex128, device=DEV)
    gate = dict(z=torch.randn(B, n, H, 2, dtype=F64, device=DEV)) if form == "z" else \
        dict(log_magnitude=a.abs().log(), phase=a.angle())
    if form == "z":
        z = torch.view_as_complex(gate["z"])
        a = torch.polar(z.abs().sigmoid(), z.angle())

    def oracle():
        outs = [R.sequential_reference(q[:, :, h].double(), k[:, :, h].double(), v[:, :, h].double(),
                                       a[:, :, h, None, None], s0[:, h], True) for h in range(H)]
        return torch.stack([o for o, _ in outs], 2), torch.stack([s for _, s in outs], 1)
    return (lambda: G.gate_loop_heads(q, k, v, **gate, initial_state=s0, output_final_state=True, **kw)), oracle


def simple_case(n=13):
    q, kv = (torch.randn(2, n, 5, dtype=F64, device=DEV) for _ in range(2))
    a = torch.rand(2, n, 5, dtype=F64, device=DEV)
    cache = (torch.rand(2, 5, dtype=F64, device=DEV), torch.randn(2, 5, dtype=F64, device=DEV))
    return (lambda: G.simple_gate_loop_operator(q, kv, a, cache)), \
        (lambda: R.simple_sequential_reference(q, kv, a, cache))


OPERATOR_CHECKS = {"check_gate_loop_inputs": 1, "check_initial_state": 1, "check_precision": 1, "check_chunk_size": 1}
HEADS_CHECKS = {"check_heads_inputs": 1, "check_precision": 1, "check_chunk_size": 1}
CASES = {  # name: (case, the one backend off the kernel devices, the validation calls)
    "operator_d1": (lambda: operator_case(1), "elementwise_scan", OPERATOR_CHECKS),
    "operator_d4": (lambda: operator_case(4), "chunked_reference", OPERATOR_CHECKS),
    "operator_key_gate": (lambda: operator_case(4, gate="key"), "chunked_reference", OPERATOR_CHECKS),
    "operator_n0": (lambda: operator_case(4, n=0), "empty_scan", OPERATOR_CHECKS),
    "heads_d1_z": (lambda: heads_case(1), "elementwise_scan", HEADS_CHECKS),
    "heads_d4_log_polar": (lambda: heads_case(4, form="log_polar"), "chunked_reference", HEADS_CHECKS),
    "heads_n0": (lambda: heads_case(4, n=0), "empty_scan", HEADS_CHECKS),
    "simple": (simple_case, "elementwise_scan", {"check_simple_inputs": 1}),
}


def assert_one_path(log, backend, checks):
    counts = Counter(name for name, _, _ in log)
    assert {b: counts[b] for b in BACKENDS} == {b: int(b == backend) for b in BACKENDS}, counts
    names = {name for names in CHECKS.values() for name in names}
    assert {c: counts[c] for c in names} == {c: checks.get(c, 0) for c in names}, counts


@pytest.mark.parametrize("where", [pytest.param("cpu", marks=pytest.mark.skipif(DEV == "cuda", reason="CPU only")),
                                   "kernel_device"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_entry_one_backend_one_validation(log, request, where, name):
    """Each public entry reaches exactly one backend once and runs each of its checks once (chunk_gate_loop's own
    none), with the float64 sequential reference's results; on a kernel device float64 takes the reference."""
    case, backend, checks = CASES[name]
    if where == "kernel_device":
        request.getfixturevalue("kernels_on_cpu")
        backend = "chunked_reference" if backend == "elementwise_scan" else backend
    run, oracle = case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's warning on a kernel device
        got = run()
    want = oracle()
    assert_one_path(log, backend, checks)
    for x, y in zip(got, want):
        for xs, ys in zip(*(t if isinstance(t, tuple) else (t,) for t in (x, y))):
            assert xs.shape == ys.shape and xs.dtype == ys.dtype
            if xs.numel():
                assert rel(xs, ys) < 1e-12 if not xs.is_complex() else (xs - ys).abs().max() < 1e-12


@pytest.mark.skipif(DEV == "cuda", reason="the CPU path")
def test_layer_goes_through_heads_once(log):
    """A layer forward is one gate_loop_heads call: one validation, one backend."""
    GateLoopedAttention(16, heads=2).double()(torch.randn(2, 9, 16, dtype=F64))
    assert_one_path(log, "chunked_reference", HEADS_CHECKS)


@pytest.mark.skipif(DEV == "cuda", reason="the CPU path")
@pytest.mark.parametrize("entry", ["operator", "heads"])
def test_chunk_size_reaches_the_reference(log, entry):
    run, oracle = operator_case(4, n=40, chunk_size=16) if entry == "operator" else heads_case(4, n=40, chunk_size=16)
    o, s = run()
    (ref,) = [kw for name, _, kw in log if name == "chunked_reference"]
    assert ref["chunk_size"] == 16
    ro, rs = oracle()
    assert rel(o, ro) < 1e-12 and (s - rs).abs().max() < 1e-12


@needs_kernels
@pytest.mark.parametrize("entry,precision,tol", [("operator", "tf32x3", 1e-5), ("heads", "tf32", 5e-3),
                                                 ("heads", "ieee", 1e-5)])
def test_kernel_paths_precision_and_chunk_size_reach_the_kernel(log, kernels_on_cpu, entry, precision, tol):
    """float32 at head dim 16 on a kernel device: the chunked kernel, once, with the entry's precision and
    chunk_size, its own checks not run again; results as the float64 reference's."""
    make = operator_case if entry == "operator" else heads_case
    run, oracle = make(16, n=20, dtype=torch.float32, precision=precision, chunk_size=16)
    o, s = run()
    assert_one_path(log, "_chunk_gate_loop", OPERATOR_CHECKS if entry == "operator" else HEADS_CHECKS)
    (args,) = [args for name, args, _ in log if name == "_chunk_gate_loop"]
    assert args[-2:] == (precision, 16)
    ro, rs = oracle()
    assert rel(o, ro) < tol and ((s - rs).abs().max() / rs.abs().max()).item() < tol


@needs_kernels
def test_kernel_paths_reference_warns_once_naming_the_entry(log, kernels_on_cpu):
    """On a kernel device the reference fallback warns once per kind of input, naming the entry point."""
    run, _ = heads_case(4, dtype=torch.float32)
    with pytest.warns(UserWarning, match="gate_loop_heads: head dims d=4, e=4"):
        run()
    with pytest.warns(UserWarning, match="gate_loop_operator: float64 inputs"):
        operator_case(1)[0]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run()
        operator_case(4, dtype=torch.float32)[0]()  # the same kind through the other entry
    counts = Counter(name for name, _, _ in log)
    assert counts["chunked_reference"] == 4 and counts["elementwise_scan"] == 0


@needs_kernels
def test_direct_chunk_gate_loop_checks_once(log):
    """chunked.chunk_gate_loop called directly keeps its own checks (once) and errors."""
    q, k, v = (torch.randn(1, 16, 1, 16, device=DEV) for _ in range(3))
    ar, ai = torch.rand(1, 16, 1, device=DEV), torch.zeros(1, 16, 1, device=DEV)
    chunked.chunk_gate_loop(q, k, v, ar, ai, chunk_size=16)
    counts = Counter(name for name, _, _ in log)
    assert counts["check_chunk_gate_loop_inputs"] == 1 and counts["_chunk_gate_loop"] == 0  # dispatch's spy only
    with pytest.raises(ValueError, match="precision"):
        chunked.chunk_gate_loop(q, k, v, ar, ai, precision="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked.chunk_gate_loop(q, k, v, ar, ai, chunk_size=24)


@pytest.mark.parametrize("entry", ["operator", "heads"])
@pytest.mark.parametrize("kw,exc", [(dict(precision="fast"), ValueError), (dict(precision=None), ValueError),
                                    (dict(chunk_size=48), ValueError), (dict(chunk_size=8), ValueError),
                                    (dict(chunk_size=0), ValueError), (dict(chunk_size=64.0), TypeError),
                                    (dict(chunk_size=True), TypeError)])
def test_bad_precision_and_chunk_size(log, entry, kw, exc):
    """An unknown precision or a chunk size that is not a power of two >= 16 is an error naming the argument,
    before any backend runs (whatever path the inputs would take)."""
    run, _ = operator_case(1, **kw) if entry == "operator" else heads_case(1, **kw)
    with pytest.raises(exc, match=next(iter(kw))):
        run()
    assert not [name for name, _, _ in log if name in BACKENDS]
