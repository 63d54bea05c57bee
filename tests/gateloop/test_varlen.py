"""Packed variable-length sequences (``cu_seqlens``, issue 21): a packed batch equals its sequences run one by one
(the oracle: the same public function on each sequence alone) -- outputs, final states and the gradients of q, k,
v, the gate and the initial states -- through the scan functions, the layers and the model; every bad
``cu_seqlens`` raises an error naming it. Fresh random lengths each run, always with 0, 1 and chunk size +- 1."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import gateloop_kernels as G
from gateloop_kernels import layers as L
from gateloop_kernels.varlen import validate_cu_seqlens

from helpers import ROOT, strided_1d
from helpers.kernels import needs_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
C = 16  # the chunk size of the CPU tests: lengths around it meet and cross chunk edges


def _lengths(n_random: int = 3, high: int = 40, chunk: int = C) -> list[int]:
    fixed = [0, 1, chunk - 1, chunk, chunk + 1]
    ls = fixed + torch.randint(0, high, (n_random,)).tolist()
    return [ls[i] for i in torch.randperm(len(ls)).tolist()]


def _cu(lengths: list[int], device="cpu", dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=dtype)


def _bounds(lengths):
    out, s = [], 0
    for n in lengths:
        out.append((s, s + n))
        s += n
    return out


def _documents_loss(model, tokens, lengths):
    """The documents' losses run one by one, weighted by their targets (l_i - 1): the packed loss's oracle."""
    weighted, targets = 0.0, 0
    for a, b in _bounds(lengths):
        if b - a >= 2:
            weighted = weighted + (b - a - 1) * model(tokens[:, a:b], return_loss=True)
            targets += b - a - 1
    return weighted / targets


def _close(x: torch.Tensor, y: torch.Tensor, tol: float, what: str) -> None:
    x, y = x.detach().to(torch.complex128 if x.is_complex() else torch.float64), \
        y.detach().to(torch.complex128 if y.is_complex() else torch.float64)
    assert x.shape == y.shape, (what, x.shape, y.shape)
    err = (x - y).norm().item()
    assert err <= tol * y.norm().item(), f"{what}: |diff| {err:.3e} vs |ref| {y.norm().item():.3e} (tol {tol})"


def _loss(outs, cots):
    return sum((o * c).real.sum() if o.is_complex() else (o * c).sum() for o, c in zip(outs, cots))


def _check_packed(packed_fn, alone_fn, leaves, lengths, tol):
    """``packed_fn(*leaves) -> outputs``; ``alone_fn(i, a, b, *leaves) -> outputs`` of sequence ``i`` (tokens
    ``a:b``), each output concatenated over sequences along its ``cat_dim`` (the outputs' second element: dims)."""
    outs, dims = packed_fn(*leaves)
    parts = [alone_fn(i, a, b, *leaves)[0] for i, (a, b) in enumerate(_bounds(lengths))]
    refs = [torch.cat([p[j] for p in parts], dim=dims[j]) for j in range(len(outs))]
    for j, (o, r) in enumerate(zip(outs, refs)):
        _close(o, r, tol, f"output {j}")
    cots = [torch.randn_like(r) for r in refs]
    want = [t for t in leaves if t.requires_grad]
    g = torch.autograd.grad(_loss(outs, cots), want)
    rg = torch.autograd.grad(_loss(refs, cots), want)
    for j, (x, y) in enumerate(zip(g, rg)):
        _close(x, y, tol, f"gradient of input {j}")
    return g


# ----------------------------------------------------------------------------- the scan functions

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,e", [(1, 1), (16, 16), (64, 64), (16, 8), (1, 16)])
@pytest.mark.parametrize("with_state", [True, False])
def test_heads_packed_equals_each_alone(dtype, d, e, with_state, H=2, n_random=3):
    lengths = _lengths(n_random)
    cu, T, N = _cu(lengths), sum(lengths), len(lengths)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    leaves = [torch.randn(1, T, H, x, dtype=dtype, requires_grad=True) for x in (d, d, e)]
    leaves.append(torch.randn(1, T, H, 2, dtype=dtype, requires_grad=True))
    leaves.append(torch.randn(N, H, d, e, dtype=cdt, requires_grad=with_state))

    def packed(q, k, v, z, s0):
        o, f = G.gate_loop_heads(q, k, v, z=z, initial_state=s0 if with_state else None, output_final_state=True,
                                 chunk_size=C, cu_seqlens=cu)
        return (o, f), (1, 0)

    def alone(i, a, b, q, k, v, z, s0):
        o, f = G.gate_loop_heads(q[:, a:b], k[:, a:b], v[:, a:b], z=z[:, a:b],
                                 initial_state=s0[i:i + 1] if with_state else None, output_final_state=True,
                                 chunk_size=C)
        return (o, f), None

    g = _check_packed(packed, alone, leaves, lengths, TOL[dtype])
    if not with_state:  # a first token's gate multiplies only the (zero) state before its sequence
        firsts = [a for a, b in _bounds(lengths) if b > a]
        assert torch.all(g[3][0, firsts] == 0)


@needs_kernels
@pytest.mark.parametrize("d,e", [(1, 1), (16, 32)])
def test_kernel_paths_packed_equals_each_alone(monkeypatch, d, e):
    """The dispatch's packed paths through the Triton kernels (the interpreter on the CPU): the elementwise op at
    head dim 1, the chunked kernel at 16..256, against each sequence alone on the same kernel."""
    from gateloop_kernels import dispatch
    from gateloop_kernels.elementwise import op as ew_op

    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    test_heads_packed_equals_each_alone(torch.float32, d, e, with_state=True, H=1, n_random=1)


@pytest.mark.parametrize("layout", ["head", "key", "entry"])
@pytest.mark.parametrize("d,e", [(1, 1), (16, 8)])
def test_operator_packed_equals_each_alone(layout, d, e):
    dtype = torch.float64
    lengths = _lengths()
    cu, T, N = _cu(lengths, dtype=torch.int64), sum(lengths), len(lengths)
    gshape = {"head": (1, T, 1, 1), "key": (1, T, d, 1), "entry": (1, T, d, e)}[layout]
    a = torch.polar(0.5 + 0.5 * torch.rand(gshape, dtype=dtype), torch.randn(gshape, dtype=dtype))
    leaves = [torch.randn(1, T, x, dtype=dtype, requires_grad=True) for x in (d, d, e)]
    leaves += [a.requires_grad_(), torch.randn(N, d, e, dtype=torch.complex128, requires_grad=True)]

    def packed(q, k, v, a, s0):
        return G.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True, chunk_size=C,
                                    cu_seqlens=cu), (1, 0)

    def alone(i, lo, hi, q, k, v, a, s0):
        return G.gate_loop_operator(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], a[:, lo:hi], initial_state=s0[i:i + 1],
                                    return_final_state=True, chunk_size=C), None

    _check_packed(packed, alone, leaves, lengths, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_cache", [True, False])
def test_simple_operator_packed_equals_each_alone(dtype, with_cache):
    lengths, D = _lengths(), 3
    cu, T, N = _cu(lengths), sum(lengths), len(lengths)
    leaves = [torch.randn(1, T, D, dtype=dtype, requires_grad=True) for _ in range(2)]
    leaves.append(torch.rand(1, T, D, dtype=dtype, requires_grad=True))
    leaves += [torch.rand(N, D, dtype=dtype, requires_grad=with_cache),
               torch.randn(N, D, dtype=dtype, requires_grad=with_cache)]

    def packed(q, kv, a, ca, ckv):
        o, (al, hl) = G.simple_gate_loop_operator(q, kv, a, cache=(ca, ckv) if with_cache else None, cu_seqlens=cu)
        return (o, al, hl), (1, 0, 0)

    def alone(i, lo, hi, q, kv, a, ca, ckv):
        o, (al, hl) = G.simple_gate_loop_operator(q[:, lo:hi], kv[:, lo:hi], a[:, lo:hi],
                                                  cache=(ca[i:i + 1], ckv[i:i + 1]) if with_cache else None)
        return (o, al, hl), None

    _check_packed(packed, alone, leaves, lengths, TOL[dtype])


@pytest.mark.filterwarnings("ignore:simple_gate_loop_operator")
@pytest.mark.parametrize("with_cache", [True, False])
def test_simple_operator_packed_float64_on_a_kernel_device(monkeypatch, with_cache):
    """float64 ``simple_gate_loop_operator`` with ``cu_seqlens`` on a kernel device (CUDA; here the CPU marked as one:
    float64 runs no kernel) raised AttributeError "'NoneType' object has no attribute 'shape'": ``scan`` brought the
    per-channel scan into head layout with ``v = None`` (``k`` holds ``k v``) for the packed reference, which read
    ``v``'s head dim (and its head-layout output was returned as it was). Now as each sequence alone (outputs,
    caches, gradients), through the layer too."""
    from gateloop_kernels import dispatch

    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    test_simple_operator_packed_equals_each_alone(torch.float64, with_cache)
    if with_cache:
        test_layer_packed_equals_each_document("simple reverse")


def test_packed_matches_the_sequential_oracle():
    """Not only consistent with itself: each packed sequence against the float64 sequential loop."""
    lengths, H, d, e = _lengths(), 2, 16, 8
    cu, T, N = _cu(lengths), sum(lengths), len(lengths)
    q, k = torch.randn(2, 1, T, H, d, dtype=torch.float64)
    v = torch.randn(1, T, H, e, dtype=torch.float64)
    lm, ph = -torch.rand(1, T, H, dtype=torch.float64), torch.randn(1, T, H, dtype=torch.float64)
    s0 = torch.randn(N, H, d, e, dtype=torch.complex128)
    o, f = G.gate_loop_heads(q, k, v, log_magnitude=lm, phase=ph, initial_state=s0, output_final_state=True,
                             chunk_size=C, cu_seqlens=cu)
    a = torch.polar(lm.exp(), ph)
    for i, (lo, hi) in enumerate(_bounds(lengths)):
        for h in range(H):
            ro, rf = G.reference.sequential_reference(q[:, lo:hi, h], k[:, lo:hi, h], v[:, lo:hi, h],
                                                      a[:, lo:hi, h, None, None], s0[i:i + 1, h], True)
            _close(o[:, lo:hi, h], ro, 1e-12, f"sequence {i} head {h} output")
            _close(f[i, h], rf[0], 1e-12, f"sequence {i} head {h} final state")


@pytest.mark.parametrize("layout", ["head", "key", "entry"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_sequence_reaches_no_other(layout, bad):
    """docs/design.md: nothing, a non-finite value included, crosses a boundary in either pass. A gate per key dim or
    entry (varlen_reference's first-order scan) gave NaN outputs and final states to every later sequence after an
    inf or NaN in one (its gate of 0 at each first token made 0 * inf). Here each finite sequence's outputs, final
    state and gradients (of a loss over the finite sequences only) equal its run alone."""
    lengths, d, e, dtype = [5, 20, 0, 7], 4, 3, torch.float64
    cu, T, N = _cu(lengths), sum(lengths), len(lengths)
    gshape = {"head": (1, T, 1, 1), "key": (1, T, d, 1), "entry": (1, T, d, e)}[layout]
    a = torch.polar(0.5 + 0.5 * torch.rand(gshape, dtype=dtype), torch.randn(gshape, dtype=dtype))
    q, k, v = (torch.randn(1, T, x, dtype=dtype) for x in (d, d, e))
    v[0, 10, 1] = bad  # in sequence 1
    s0 = torch.randn(N, d, e, dtype=torch.complex128)
    leaves = [t.requires_grad_() for t in (q, k, v, a, s0)]
    o, f = G.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True, chunk_size=C, cu_seqlens=cu)
    finite = [(i, lo, hi) for i, (lo, hi) in enumerate(_bounds(lengths)) if i != 1]
    co, cf = torch.randn_like(o), torch.randn_like(f)
    grads = torch.autograd.grad(sum((o[:, lo:hi] * co[:, lo:hi]).sum() + (f[i] * cf[i]).real.sum()
                                    for i, lo, hi in finite), leaves)
    for i, lo, hi in finite:
        ro, rf = G.gate_loop_operator(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], a[:, lo:hi], initial_state=s0[i:i + 1],
                                      return_final_state=True, chunk_size=C)
        _close(o[:, lo:hi], ro, 1e-12, f"sequence {i} output")
        _close(f[i:i + 1], rf, 1e-12, f"sequence {i} final state")
        rg = torch.autograd.grad((ro * co[:, lo:hi]).sum() + (rf * cf[i:i + 1]).real.sum(), leaves)
        for name, g, r in zip("q k v a s0".split(), grads, rg):
            part = (slice(i, i + 1),) if name == "s0" else (slice(None), slice(lo, hi))
            _close(g[part], r[part], 1e-12, f"sequence {i} gradient of {name}")


def test_compile_fullgraph_with_cu_seqlens_tensor():
    torch._dynamo.reset()
    lengths = [3, 0, 17, 1, 9]
    cu, T = _cu(lengths), sum(lengths)
    q, k, v = (torch.randn(1, T, 2, 16, requires_grad=True) for _ in range(3))
    z = torch.randn(1, T, 2, 2, requires_grad=True)

    def fn(q, k, v, z, cu):
        o, s = G.gate_loop_heads(q, k, v, z=z, output_final_state=True, chunk_size=C, cu_seqlens=cu)
        return o.square().sum() + s.abs().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, ref = compiled(q, k, v, z, cu), fn(q, k, v, z, cu)
    _close(got, ref, 1e-5, "compiled loss")
    for x, y in zip(torch.autograd.grad(got, (q, k, v, z)), torch.autograd.grad(ref, (q, k, v, z))):
        _close(x, y, 1e-5, "compiled gradient")


# ----------------------------------------------------------------------------- bad cu_seqlens

def _heads_call(cu, B=1, T=6, N=None, **kw):
    q = torch.randn(B, T, 2, 4)
    return G.gate_loop_heads(q, q, q, z=torch.randn(B, T, 2, 2), cu_seqlens=cu, **kw)


@pytest.mark.parametrize("cu,err,match", [
    ([0, 2, 6], TypeError, "cu_seqlens must be a torch.Tensor"),
    (torch.tensor([0.0, 2.0, 6.0]), TypeError, "cu_seqlens must be an int32 or int64"),
    (torch.tensor([[0, 2, 6]]), ValueError, "cu_seqlens must be 1-D"),
    (torch.tensor([], dtype=torch.int64), ValueError, "cu_seqlens must be 1-D"),
    (torch.tensor([1, 2, 6]), ValueError, "cu_seqlens must start at 0"),
    (torch.tensor([0, 4, 2, 6]), ValueError, "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 2, 5]), ValueError, "cu_seqlens must end at the number of tokens T = 6"),
    (torch.tensor([0, 2, 7]), ValueError, "cu_seqlens must end at the number of tokens T = 6"),
    (torch.tensor([0, 2, 6], device="meta"), ValueError, "cu_seqlens must be on the inputs' device"),
])
def test_bad_cu_seqlens_raise_naming_it(cu, err, match):
    with pytest.raises(err, match=match):
        _heads_call(cu)
    q = torch.randn(1, 6, 4)
    with pytest.raises(err, match=match):
        G.gate_loop_operator(q, q, q, torch.rand(1, 6, 1, 1), cu_seqlens=cu)
    with pytest.raises(err, match=match):
        G.simple_gate_loop_operator(q, q, q.sigmoid(), cu_seqlens=cu)
    if not (isinstance(cu, torch.Tensor) and cu.device.type == "meta"):  # it reads the values on the host
        with pytest.raises(err, match=match):
            validate_cu_seqlens(cu, 6)


def test_validate_cu_seqlens_checks_T():
    """``T`` was taken as it came: ``"6"`` raised 'must end at T = 6, got 6', a float or a tensor passed; a meta
    ``cu_seqlens`` failed copying out its (absent) values with a NotImplementedError."""
    cu = torch.tensor([0, 2, 6])
    for bad in ("6", 6.0, torch.tensor(6), True):
        with pytest.raises(TypeError, match="T .* must be an int"):
            validate_cu_seqlens(cu, bad)
    with pytest.raises(ValueError, match="T .* must be >= 0"):
        validate_cu_seqlens(cu, -1)
    with pytest.raises(ValueError, match="meta tensor"):
        validate_cu_seqlens(cu.to("meta"), 6)
    assert validate_cu_seqlens(cu, 6) == 2


@needs_kernels
def test_boundaries_kernel_matches_the_reference():
    """The one-launch value check of ``cu_seqlens`` (what CUDA calls assert on, ``_boundaries._boundaries_ok``; on
    the CPU through the interpreter) against the tensor-op test: valid boundaries and each way to break them (a
    nonzero start, a wrong end, one decrease anywhere, also past the first 1024-wide block), int32 and int64; the
    op (``_ok_impl``) on a strided view of the same boundaries."""
    from gateloop_kernels import _boundaries as b
    from helpers.kernels import DEV

    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    for trial in range(24):
        N = [1, 3, 2500][trial % 3]
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.randint(0, 9, (N,), generator=g).cumsum(0)])
        T = int(cu[-1])
        kind = trial // 3 % 4
        if kind == 1:
            cu[0] = 1
        elif kind == 2:
            T += 1
        elif kind == 3 and N > 1:
            i = int(torch.randint(1, N, (), generator=g))
            cu[i] = cu[i + 1] + 1
        cu = cu.to(DEV, (torch.int32, torch.int64)[trial % 2])
        ok = torch.empty((), dtype=torch.int32, device=DEV)
        b._boundaries_ok[(1,)](cu, ok, N, T, BLOCK=1024)
        assert bool(ok) == bool(b._ok_reference(cu, T)), (N, kind, cu.tolist()[:8])
        assert bool(ok) == (kind == 0 or (kind == 3 and N == 1))
        assert bool(b._ok_impl(strided_1d(cu), T)) == bool(ok), (N, kind)  # the op reads a view by its strides
    torch.library.opcheck(b._ok_op.op, (cu, T), test_utils=("test_schema", "test_faketensor"))


def test_packed_batch_must_be_one_row_and_states_one_per_sequence():
    cu = torch.tensor([0, 2, 6])
    assert validate_cu_seqlens(torch.tensor([0, 2, 2, 6], dtype=torch.int32), 6) == 3
    with pytest.raises(ValueError, match="B must be 1"):
        _heads_call(cu, B=2)
    with pytest.raises(ValueError, match=r"initial_state holds one state per sequence: \(N, 2, 4, 4\) with N = .* 2"):
        _heads_call(cu, initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.complex64))
    q = torch.randn(1, 6, 4)
    with pytest.raises(ValueError, match="initial_state holds one state per sequence"):
        G.gate_loop_operator(q, q, q, torch.rand(1, 6, 1, 1), initial_state=torch.zeros(3, 4, 4), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cache\[1\] \(kv_prev\) holds one state per sequence"):
        G.simple_gate_loop_operator(q, q, q.sigmoid(), cache=(torch.ones(2, 4), torch.ones(1, 4)), cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        _heads_call(cu, cp_group=object())
    layer = L.GateLoopedAttention(dim=8, heads=2)
    # the count of documents, not "(b, H, d, e) = (2, ...)" for x of b = 1
    with pytest.raises(ValueError, match=r"cache holds one state per packed document: \(N, H, d, e\) = \(2, 2, 4, "
                                         r"4\) with N = len\(cu_seqlens\) - 1 = 2, got \(1, 2, 4, 4\)"):
        layer(torch.randn(1, 6, 8), cu_seqlens=cu, cache=layer.new_cache(1))
    with pytest.raises(NotImplementedError, match="cache"):
        L.CausalFullAttention(dim=8, dim_head=4, heads=2)(torch.randn(1, 6, 8), cu_seqlens=cu, return_cache=True)
    model = L.Transformer(dim=8, num_tokens=5, depth=1, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        model(torch.randint(0, 5, (1, 5)), cu_seqlens=cu, return_loss=True)


def test_empty_packed_batch_gives_the_initial_states_back():
    s0 = torch.randn(3, 2, 4, 4, dtype=torch.complex128, requires_grad=True)
    q = torch.randn(1, 0, 2, 4, dtype=torch.float64)
    o, f = G.gate_loop_heads(q, q, q, z=torch.randn(1, 0, 2, 2, dtype=torch.float64), initial_state=s0,
                             output_final_state=True, cu_seqlens=torch.zeros(4, dtype=torch.int64))
    assert o.shape == (1, 0, 2, 4) and torch.equal(f, s0)
    g, = torch.autograd.grad(f.real.sum() + 2 * f.imag.sum(), s0)  # the final states' gradient passes through
    assert torch.equal(g, torch.full_like(s0, 1 + 2j))


def test_sequence_ids_and_positions_against_a_loop():
    """The public index maps against a Python loop over random lengths (empty ones among them), int32 and int64:
    int64 as documented; a ``cu_seqlens`` of the wrong type, dtype or dims raises naming it (a list raised
    AttributeError "'list' object has no attribute 'device'")."""
    from gateloop_kernels.varlen import positions, sequence_ids

    lengths = _lengths(n_random=2, high=10)
    want_seq = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    want_pos = torch.tensor([p for n in lengths for p in range(n)])
    for dtype in (torch.int32, torch.int64):
        cu = _cu(lengths, dtype=dtype)
        seq, pos = sequence_ids(cu, sum(lengths)), positions(cu, sum(lengths))
        assert seq.dtype == pos.dtype == torch.int64
        assert torch.equal(seq, want_seq) and torch.equal(pos, want_pos)
    assert sequence_ids(torch.tensor([0]), 0).shape == positions(torch.tensor([0, 0]), 0).shape == (0,)
    for bad, err in (([0, 2, 5], TypeError), (torch.tensor([0.0, 2.0, 5.0]), TypeError),
                     (torch.tensor([[0, 2, 5]]), ValueError)):
        for fn in (sequence_ids, positions):
            with pytest.raises(err, match="^cu_seqlens must be"):
                fn(bad, 5)


# ----------------------------------------------------------------------------- layers and the model

LAYERS = {
    "gate-looped head dim 1": lambda: L.GateLoopedAttention(dim=8),
    "gate-looped head dim 16": lambda: L.GateLoopedAttention(dim=8, dim_inner=32, heads=2, sub_ln=True),
    "simple": lambda: L.SimpleGateLoopLayer(dim=8),
    "simple reverse": lambda: L.SimpleGateLoopLayer(dim=8, reverse=True),
    "softmax attention, rotary": lambda: L.CausalFullAttention(dim=8, dim_head=4, heads=2, rotary_emb=True),
    "linear attention, data-dependent": lambda: L.CausalFullAttention(dim=8, dim_head=4, heads=2,
                                                                      data_dependent_rel_pos=True),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_packed_equals_each_document(name):
    if "rotary" in name:
        pytest.importorskip("rotary_embedding_torch")
    layer = LAYERS[name]().double()
    lengths = _lengths(n_random=2, high=20)
    cu, T = _cu(lengths), sum(lengths)
    x = torch.randn(1, T, 8, dtype=torch.float64, requires_grad=True)
    _check_packed(lambda x: ((layer(x, cu_seqlens=cu),), (1,)),
                  lambda i, a, b, x: ((layer(x[:, a:b]),), None), [x], lengths, 1e-12)


@pytest.mark.parametrize("layer", [lambda: L.SimpleGateLoopLayer(dim=4),
                                   lambda: L.GateLoopedAttention(dim=4, dim_inner=32, heads=2)],
                         ids=["simple", "gate-looped head dim 16"])
def test_layer_packed_cache_continues_each_document(layer):
    layer = layer().double()
    first, second = _lengths(n_random=1, high=10), _lengths(n_random=1, high=10)  # as many documents each
    x1 = torch.randn(1, sum(first), 4, dtype=torch.float64)
    x2 = torch.randn(1, sum(second), 4, dtype=torch.float64)
    _, cache = layer(x1, cu_seqlens=_cu(first), return_cache=True)
    out, _ = layer(x2, cache=cache, cu_seqlens=_cu(second), return_cache=True)
    for (a1, b1), (a2, b2) in zip(_bounds(first), _bounds(second)):
        whole = layer(torch.cat([x1[:, a1:b1], x2[:, a2:b2]], dim=1))
        _close(out[:, a2:b2], whole[:, b1 - a1:], 1e-12, "continued document")


@pytest.mark.parametrize("kind", ["gate-looped", "full attention", "reversible"])
def test_transformer_packed_loss_is_the_token_weighted_documents(kind):
    torch.manual_seed(1)
    model = L.Transformer(dim=16, num_tokens=11, depth=2, heads=2, dim_head=8, gate_loop_heads=2,
                          use_gate_looped_attn=kind != "full attention", reversible=kind == "reversible").double()
    lengths = [0, 1, 2] + torch.randint(3, 30, (3,)).tolist()
    lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    cu, T = _cu(lengths), sum(lengths)
    tokens = torch.randint(0, 11, (1, T))
    params = [p for p in model.parameters()]
    loss = model(tokens, cu_seqlens=cu, return_loss=True)
    ref = _documents_loss(model, tokens, lengths)
    _close(loss, ref, 1e-12, "loss")
    for p, g, rg in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        _close(g, rg, 1e-11, f"gradient of a {tuple(p.shape)} parameter")
    logits = model(tokens, cu_seqlens=cu)
    for a, b in _bounds(lengths):
        if b > a:
            _close(logits[:, a:b], model(tokens[:, a:b]), 1e-12, "logits")


def test_transformer_packed_loss_of_an_empty_row_is_nan_as_without_targets():
    """A packed row of no tokens (``cu_seqlens`` [0] or [0, 0], T = 0) has no target: its loss is NaN with zero
    parameter gradients, as a row of one-token documents (the documented "NaN where no document has two tokens").
    Before, the targets had one -100 too many, (1, 1) for (1, 0) logits, and cross_entropy raised 'Expected target
    size [1, 0], got [1, 1]'."""
    model = L.Transformer(dim=8, num_tokens=5, depth=1, heads=2, dim_head=4)
    params = list(model.parameters())
    for cu in (torch.tensor([0]), torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 1, 2])):
        tokens = torch.randint(0, 5, (1, int(cu[-1])))
        loss = model(tokens, cu_seqlens=cu, return_loss=True)
        assert loss.isnan(), (cu, loss)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, params))
    lengths = _lengths(n_random=2, high=5)
    tokens = torch.randint(0, 5, (1, sum(lengths)))
    assert L._packed_targets(tokens, _cu(lengths)).shape == tokens.shape  # one target (or -100) per token


def test_transformer_packed_labels_are_shifted_targets():
    """``labels=`` are already-shifted targets (documented: not Hugging Face's / fla's ``labels=input_ids``): the
    packed default targets built by a loop (the next token in the same document, -100 at each document's last
    token) passed as labels give the default packed loss; the tokens themselves do not."""
    model = L.Transformer(dim=8, num_tokens=7, depth=1, heads=2, dim_head=4).double()
    lengths = _lengths(n_random=1, high=6)
    cu, tokens = _cu(lengths), torch.randint(0, 7, (1, sum(lengths)))
    want = torch.tensor([[tokens[0, t + 1] if t + 1 < b else -100 for a, b in _bounds(lengths) for t in range(a, b)]])
    loss = model(tokens, cu_seqlens=cu, return_loss=True)
    _close(model(tokens, cu_seqlens=cu, return_loss=True, labels=want), loss, 1e-15, "loss with the shifted labels")
    assert not torch.isclose(model(tokens, cu_seqlens=cu, return_loss=True, labels=tokens), loss)


# ----------------------------------------------------------------------------- GPU twins at real sizes

def _log_uniform_lengths(total: int, lo: int, hi: int, chunk: int) -> list[int]:
    ls = [0, 1, chunk - 1, chunk, chunk + 1]
    while sum(ls) < total:
        ls.append(int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(()).item())))
    ls[-1] -= sum(ls) - total
    return [ls[i] for i in torch.randperm(len(ls)).tolist()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 64, 128])
def test_gpu_heads_packed_equals_each_alone(dtype, d):
    H = 64 if d == 1 else 4
    lengths = _log_uniform_lengths(8192, 64, 4096, 64)
    cu, T, N = _cu(lengths, device="cuda"), sum(lengths), len(lengths)
    leaves = [torch.randn(1, T, H, d, device="cuda", dtype=dtype) for _ in range(3)]
    leaves[1] = leaves[1] / d ** 0.5
    leaves = [t.requires_grad_() for t in leaves]
    leaves.append(torch.randn(1, T, H, 2, device="cuda", requires_grad=True))
    leaves.append(torch.randn(N, H, d, d, device="cuda", dtype=torch.complex64, requires_grad=True))

    def packed(q, k, v, z, s0):
        return G.gate_loop_heads(q, k, v, z=z, initial_state=s0, output_final_state=True, cu_seqlens=cu), (1, 0)

    def alone(i, a, b, q, k, v, z, s0):
        return G.gate_loop_heads(q[:, a:b], k[:, a:b], v[:, a:b], z=z[:, a:b], initial_state=s0[i:i + 1],
                                 output_final_state=True), None

    _check_packed(packed, alone, leaves, lengths, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 64])
def test_gpu_compile_fullgraph_inductor_with_cu_seqlens(d):
    torch._dynamo.reset()
    H = 64 if d == 1 else 4
    lengths = _log_uniform_lengths(1024, 64, 512, 64)  # the reference's chunk loop unrolls: few chunks
    cu, T = _cu(lengths, device="cuda"), sum(lengths)
    q, k, v = (torch.randn(1, T, H, d, device="cuda", requires_grad=True) for _ in range(3))
    z = torch.randn(1, T, H, 2, device="cuda", requires_grad=True)

    def fn(q, k, v, z, cu):
        o, s = G.gate_loop_heads(q, k, v, z=z, output_final_state=True, cu_seqlens=cu)
        return o.square().sum() + s.abs().sum()

    compiled = torch.compile(fn, fullgraph=True)
    got, ref = compiled(q, k, v, z, cu), fn(q, k, v, z, cu)
    _close(got, ref, 1e-4, "compiled loss")
    for x, y in zip(torch.autograd.grad(got, (q, k, v, z)), torch.autograd.grad(ref, (q, k, v, z))):
        _close(x, y, 1e-4, "compiled gradient")


@pytest.mark.gpu
def test_gpu_transformer_packed_loss_is_the_token_weighted_documents():
    model = L.Transformer(dim=128, num_tokens=256, depth=2, gate_loop_heads=2).cuda()
    lengths = _log_uniform_lengths(2048, 16, 1024, 64)
    cu, T = _cu(lengths, device="cuda"), sum(lengths)
    tokens = torch.randint(0, 256, (1, T), device="cuda")
    loss = model(tokens, cu_seqlens=cu, return_loss=True)
    _close(loss, _documents_loss(model, tokens, lengths), 1e-5, "loss")


@pytest.mark.gpu
def test_gpu_validate_cu_seqlens_raises_at_once():
    assert validate_cu_seqlens(torch.tensor([0, 5, 9], device="cuda"), 9) == 2
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        validate_cu_seqlens(torch.tensor([0, 7, 5, 9], device="cuda"), 9)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["[1, 5, 9]", "[0, 7, 5, 9]", "[0, 5, 8]", "[0, 5, 900000]"])
def test_gpu_bad_cu_seqlens_values_fail_loudly_not_out_of_bounds(bad):
    """On CUDA the values are checked by a device-side assertion (no host sync): the process fails with it, never
    with an illegal memory access or a silent result (run apart: an assertion ends the process's CUDA context)."""
    code = ("import torch, gateloop_kernels as G\n"
            "q = torch.randn(1, 9, 2, 64, device='cuda')\n"
            f"cu = torch.tensor({bad}, device='cuda', dtype=torch.int32)\n"
            "o, s = G.gate_loop_heads(q, q, q, z=torch.randn(1, 9, 2, 2, device='cuda'), cu_seqlens=cu,"
            " output_final_state=True)\n"
            "torch.cuda.synchronize()\n"
            "print('NO ERROR', o.sum().item())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "NO ERROR" not in p.stdout, p.stdout + p.stderr
    assert "illegal memory access" not in p.stderr
    assert "cu_seqlens" in p.stderr or "device-side assert" in p.stderr, p.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("use_gate_looped_attn", [True, False])
def test_gpu_packed_model_step_never_synchronises(use_gate_looped_attn):
    """cu_seqlens is read on the device only: a packed training step runs under CUDA's sync debug mode "error"
    (which raises at any host synchronisation: .item(), .tolist(), nonzero, a copy to the host)."""
    model = L.Transformer(dim=128, num_tokens=256, depth=2, gate_loop_heads=2, heads=2, dim_head=64,
                          use_gate_looped_attn=use_gate_looped_attn).cuda()
    lengths = _log_uniform_lengths(1024, 16, 512, 64)
    cu, T = _cu(lengths, device="cuda"), sum(lengths)
    tokens = torch.randint(0, 256, (1, T), device="cuda")
    model(tokens, cu_seqlens=cu, return_loss=True).backward()  # warm-up: first-call work may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(tokens, cu_seqlens=cu, return_loss=True).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.filterwarnings("error")
def test_strided_cu_seqlens_is_read_by_its_strides():
    """``cu_seqlens`` as a strided view (every other entry of a buffer holding garbage between): the same results as
    its contiguous copy, no warning (``searchsorted`` warns on a non-contiguous boundary tensor). The kernels that
    read it by offset are covered by ``test_chunk_table`` and ``test_boundaries_kernel_matches_the_reference``."""
    cu = torch.tensor([0, 3, 3, 7, 10])
    strided = strided_1d(cu)
    q, k, v = (torch.randn(1, 10, 2, 4) for _ in range(3))
    lm, ph = -torch.rand(1, 10, 2), torch.randn(1, 10, 2)
    for c in (cu, strided):
        o, s = G.gate_loop_heads(q, k, v, log_magnitude=lm, phase=ph, cu_seqlens=c, output_final_state=True)
        o1, (a1, kv1) = G.simple_gate_loop_operator(q[..., 0, :], k[..., 0, :], lm.exp()[..., :1].expand(1, 10, 4),
                                                    cu_seqlens=c)
        if c is cu:
            want = (o, s, o1, a1, kv1)
    assert all(torch.equal(x, y) for x, y in zip((o, s, o1, a1, kv1), want))


def test_vmap_over_a_packed_batch_names_vmap(monkeypatch):
    """Found by a packed-sequence probe: ``torch.func.vmap`` over a packed call on the kernels' path raised "cu_seqlens
    must be 1-D (N + 1,) with q of batch 1, got ... q (2, 41, 3)" for a q of batch 1 (the vmap rule folds the mapped
    dim into the batch). The message now says vmap folded it and that packed batches cannot take it there."""
    from gateloop_kernels import dispatch
    from gateloop_kernels.elementwise import op as ew_op
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU runs the kernels only under TRITON_INTERPRET=1")
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    cu = torch.tensor([0, 17, 41])
    q, k, v = (torch.randn(2, 1, 41, 3, 1) for _ in range(3))
    z = torch.randn(2, 1, 41, 3, 2)
    with pytest.raises(ValueError, match=r"q of batch 1.*under torch.func.vmap the mapped dim joins the batch"):
        torch.func.vmap(lambda q, k, v, z: G.gate_loop_heads(q, k, v, z=z, cu_seqlens=cu)[0])(q, k, v, z)
