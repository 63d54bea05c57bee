"""Inputs a new user passes to the public API (issue 19): expanded, transposed and sliced tensors; torch.func
transforms; empty sequences; real initial states; a one-token loss. Each against the float64 sequential
reference (autograd for gradients) or as a clear error.

The head-dim-1 paths run the CPU implementation here, and the Triton kernel under ``TRITON_INTERPRET=1``
(``needs_kernels``); GPU-marked tests run the same on CUDA.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

import gateloop_kernels as G
from gateloop_kernels import dispatch
from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import op as ew_op
from gateloop_kernels import reference as R
from gateloop_kernels.layers import CausalFullAttention, GateLoopedAttention, SimpleGateLoopLayer

from helpers.elementwise_check import GRAD_NAMES, make, oracle
from helpers.kernels import DEV, INTERPRET, needs_kernels

F64 = torch.float64


def rel(x, ref):
    x, ref = (torch.view_as_real(t.resolve_conj()) if t.is_complex() else t for t in (x, ref))
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def dense(t):
    """Every element at its own address and no gaps (sorted strides 1, size, size*size, ...)."""
    want = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if st != want:
            return False
        want *= sz
    return True


def layout(x, how):
    """``x`` (values kept) expanded (batch stride 0: every batch element the first one's values), transposed
    (time-major memory) or sliced (a view into a wider tensor)."""
    if how == "expanded":
        return x[:1].expand(x.shape)
    if how == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "sliced":
        wide = torch.randn(*x.shape[:-1], 3 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., x.shape[-1]:2 * x.shape[-1]] = x
        return wide[..., x.shape[-1]:2 * x.shape[-1]]
    return x


def gate(B, n, d=1, e=1, dtype=F64, device=DEV):
    cdt = torch.complex128 if dtype == F64 else torch.complex64
    return torch.polar(0.5 + 0.5 * torch.rand(B, n, d, e, dtype=dtype, device=device),
                       torch.randn(B, n, d, e, dtype=dtype, device=device)).to(cdt)


def _check_operator_d1(q, k, v, a, tol):
    """``gate_loop_operator`` at d = e = 1 (q, k, v leaves) against the float64 sequential reference: the output and
    the gradients of its sum in q, k, v (left in ``.grad``) within ``tol`` relative; returns the output."""
    o = G.gate_loop_operator(q, k, v, a)
    o.sum().backward()
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro = R.sequential_reference(*ref_ins, a.to(torch.complex128))
    ro.sum().backward()
    assert rel(o, ro) < tol
    for x, y in zip((q, k, v), ref_ins):
        assert rel(x.grad, y.grad) < tol
    return o


def check_grads(out, ref, ins, ref_ins):
    w = torch.randn_like(ref)
    g = torch.autograd.grad((out * w).sum(), ins)
    rg = torch.autograd.grad((ref * w).sum(), ref_ins)
    for x, y in zip(g, rg):
        assert rel(x, y) < 1e-10


# ----------------------------------------------------------------------------- item 1: strides

@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
@pytest.mark.parametrize("which", ["q", "k", "v", "a", "all"])
def test_operator_d1_any_strides(how, which):
    """gate_loop_operator at d = e = 1 with one (or every) input expanded / transposed / sliced: outputs
    dense, forward and gradients as the sequential reference's."""
    B, n = 3, 37
    base = {"q": torch.randn(B, n, 1, dtype=F64, device=DEV), "k": torch.randn(B, n, 1, dtype=F64, device=DEV),
            "v": torch.randn(B, n, 1, dtype=F64, device=DEV), "a": gate(B, n)}
    ins = {name: layout(t, how) if which in (name, "all") else t for name, t in base.items()}
    leaves = {name: t.detach().requires_grad_() for name, t in ins.items()}
    o = G.gate_loop_operator(leaves["q"], leaves["k"], leaves["v"], leaves["a"])
    assert dense(o)
    ref_leaves = {name: t.detach().clone().requires_grad_() for name, t in ins.items()}
    ro = R.sequential_reference(*ref_leaves.values())
    assert rel(o, ro) < 1e-12
    check_grads(o, ro, list(leaves.values()), list(ref_leaves.values()))


@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
def test_heads_and_simple_any_strides(how):
    """gate_loop_heads (head dim 1, z gate) and simple_gate_loop_operator with strided inputs."""
    B, n, H = 2, 19, 3
    q, k, v = (layout(torch.randn(B, n, H, 1, dtype=F64, device=DEV), how) for _ in range(3))
    z = layout(torch.randn(B, n, H, 2, dtype=F64, device=DEV), how)
    o, _ = G.gate_loop_heads(q, k, v, z=z)
    assert dense(o)
    a = torch.view_as_complex(z.contiguous())
    a = torch.polar(a.abs().sigmoid(), a.angle())
    for h in range(H):
        ro = R.sequential_reference(q[:, :, h], k[:, :, h], v[:, :, h], a[:, :, h, None, None])
        assert rel(o[:, :, h], ro) < 1e-12
    qs, kv = (layout(torch.randn(B, n, 4, dtype=F64, device=DEV), how) for _ in range(2))
    gs = layout(torch.rand(B, n, 4, dtype=F64, device=DEV), how)
    leaves = [t.detach().requires_grad_() for t in (qs, kv, gs)]
    out, (a_last, kv_last) = G.simple_gate_loop_operator(*leaves)
    assert dense(out)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (qs, kv, gs)]
    rout, (ra, rkv) = R.simple_sequential_reference(*ref_leaves)
    assert rel(out, rout) < 1e-12 and rel(kv_last, rkv) < 1e-12 and rel(a_last, ra) < 1e-12
    check_grads(out, rout, leaves, ref_leaves)


def _strided_args(args, how):
    """The kernel's ``(q, k, v, a_re, a_im, h0_re, h0_im)`` with q and the gate in ``how``'s layout."""
    q, k, v, a_re, a_im, h0_re, h0_im = args
    return layout(q, how), k, v, layout(a_re, how), a_im, h0_re, h0_im


@needs_kernels
@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
def test_kernel_any_strides(how):
    """The Triton kernels with q and the gate in another layout than k and v, and an expanded output
    gradient (what ``o.sum().backward()`` passes): outputs and gradients dense, every value as the
    float64 oracle's. Before: the outputs took q's strides (overlapping writes when q is expanded)."""
    B, n, C = 2, 19, 3  # three 8-step segments, the last one partial
    args = _strided_args(make(B, n, C, torch.float32, True, False, True), how)
    block = (8, 8, 1)
    o, hT_re, hT_im, carries = ew.scan_forward(*args, block=block)
    do = torch.randn(1, n, C, device=DEV).expand(B, n, C)
    g_re, g_im = torch.randn(B, C, device=DEV), torch.randn(B, C, device=DEV)
    ro, rh, rgrads = oracle(*args, do, g_re, g_im)
    assert dense(o) and rel(o, ro) < 1e-5
    assert rel(hT_re, rh.real) < 1e-5 and rel(hT_im, rh.imag) < 1e-5
    grads = ew.scan_backward(do, g_re, g_im, *args, carries, block=block)
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        assert dense(g) and rel(g, r) < 1e-5, name


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The elementwise op runs its Triton kernels on CPU tensors (under the interpreter)."""
    monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))


@needs_kernels
def test_kernel_op_expanded_q_autograd(kernel_on_cpu):
    """Through the op's autograd with the Triton kernels: the seed's (1, n, 1) q expanded to (B, n, 1)."""
    B, n = 3, 21
    q = torch.randn(1, n, 1).expand(B, n, 1).requires_grad_()
    k, v = torch.randn(B, n, 1, requires_grad=True), torch.randn(B, n, 1, requires_grad=True)
    _check_operator_d1(q, k, v, gate(B, n, dtype=torch.float32), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_any_strides(how, dtype):
    """On CUDA: strided inputs through the public operators (d = 1 and the simplified one), outputs dense,
    results as the float64 reference's (float32 1e-5, 16-bit 1e-2)."""
    B, n = 4, 3000
    q, k, v = (layout(torch.randn(B, n, 1, device="cuda"), how).to(dtype).requires_grad_() for _ in range(3))
    a = layout(gate(B, n, dtype=torch.float32, device="cuda"), how)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    o = _check_operator_d1(q, k, v, a, tol)
    assert dense(o) and all(dense(x.grad) for x in (q, k, v))
    qs, kv = (layout(torch.randn(B, n, 64, device="cuda"), how).to(dtype) for _ in range(2))
    gs = layout(torch.rand(B, n, 64, device="cuda"), how).to(dtype)
    out, _ = G.simple_gate_loop_operator(qs, kv, gs)
    rout, _ = R.simple_sequential_reference(qs.double(), kv.double(), gs.double())
    assert dense(out) and rel(out, rout) < tol


# ----------------------------------------------------------------------------- item 4: torch.func

@pytest.mark.parametrize("d", [1, 16])
def test_func_grad_vmap_public(d):
    """torch.func.grad, vmap and per-sample vmap(grad) of gate_loop_operator against autograd of the
    sequential reference (CPU: the elementwise op at d = 1, the chunked reference at 16). Before: "must
    override the setup_context staticmethod" at d = 1."""
    B, n = 2, 9
    q, k, v = (torch.randn(B, n, d, dtype=F64, device=DEV) for _ in range(3))
    a = gate(B, n)
    s0 = torch.randn(B, d, d, dtype=torch.complex128, device=DEV)

    def loss(fn, q, k, a, s0):
        o, s = fn(q, k, v, a, initial_state=s0, return_final_state=True)
        return (o ** 2).sum() + s.real.sum() - s.imag.sum()

    def ours(*xs):
        return loss(G.gate_loop_operator, *xs)

    def ref(*xs):
        return loss(lambda *t, **kw: R.sequential_reference(*t, kw["initial_state"], True), *xs)

    got = grad(ours, argnums=(0, 1, 2, 3))(q, k, a, s0)
    want = grad(ref, argnums=(0, 1, 2, 3))(q, k, a, s0)
    for x, y in zip(got, want):
        assert rel(x, y) < 1e-10
    Q, A = torch.randn(3, B, n, d, dtype=F64, device=DEV), torch.stack([gate(B, n) for _ in range(3)])
    out = vmap(lambda q, a: G.gate_loop_operator(q, k, v, a))(Q, A)
    assert rel(out, torch.stack([R.sequential_reference(x, k, v, y) for x, y in zip(Q, A)])) < 1e-12
    per_sample = vmap(grad(ours), in_dims=(0, None, 0, None))(Q, k, A, s0)
    assert rel(per_sample, torch.stack([grad(ref)(x, k, y, s0) for x, y in zip(Q, A)])) < 1e-10


def test_func_jacrev_and_clear_limits():
    """At head dim 1: jacrev (vmap over the backward) matches the reference's; forward mode and a gradient of
    the gradient name the limitation instead of PyTorch's internal errors."""
    B, n = 2, 6
    q, k, v = (torch.randn(B, n, 1, dtype=F64, device=DEV) for _ in range(3))
    a = gate(B, n)
    jac = torch.func.jacrev(lambda q: G.gate_loop_operator(q, k, v, a))(q)
    assert rel(jac, torch.func.jacrev(lambda q: R.sequential_reference(q, k, v, a))(q)) < 1e-12
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: G.gate_loop_operator(q, k, v, a), (q,), (q,))
    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda q: grad(lambda q: (G.gate_loop_operator(q, k, v, a) ** 2).sum())(q).sum())(q)


def test_func_grad_vmap_heads_z_gate():
    """gate_loop_heads with the z gate (SigmoidPolar) under grad and vmap, against plain autograd."""
    B, n, H = 2, 11, 3
    q, k, v = (torch.randn(B, n, H, 1, dtype=F64, device=DEV) for _ in range(3))
    z = torch.randn(B, n, H, 2, dtype=F64, device=DEV)

    def f(z):
        return (G.gate_loop_heads(q, k, v, z=z)[0] ** 2).sum()

    zz = z.clone().requires_grad_()
    assert rel(grad(f)(z), torch.autograd.grad(f(zz), zz)[0]) < 1e-12
    Z = torch.randn(4, B, n, H, 2, dtype=F64, device=DEV)
    assert rel(vmap(f)(Z), torch.stack([f(x) for x in Z])) < 1e-12


@needs_kernels
def test_func_through_elementwise_kernel(monkeypatch):
    """grad, vmap and vmap(grad) with the Triton kernels running (their backward sees plain tensors, not
    torch.func's wrappers), against plain autograd of the op's CPU implementation."""
    B, n, C = 2, 9, 3
    q, k, v, a_re, a_im, h0_re, h0_im = make(B, n, C, torch.float32, True, False, True)

    def f(q, h0_re):
        o, hr, hi, _ = ew.elementwise_scan(q, k, v, a_re, a_im, h0_re, h0_im)
        return (o ** 2).sum() + hr.sum() - hi.sum()

    Q = torch.randn(2, B, n, C)
    want = grad(f, argnums=(0, 1))(q, h0_re)  # the CPU implementation: pure PyTorch, checked against autograd above
    want_out = torch.stack([ew.elementwise_scan(x, k, v, a_re, a_im, h0_re, h0_im)[0] for x in Q])
    want_per_sample = torch.stack([grad(f)(x, h0_re) for x in Q])
    monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    for x, y in zip(grad(f, argnums=(0, 1))(q, h0_re), want):
        assert rel(x, y) < 1e-5
    assert rel(vmap(lambda q: ew.elementwise_scan(q, k, v, a_re, a_im, h0_re, h0_im)[0])(Q), want_out) < 1e-5
    assert rel(vmap(grad(f), in_dims=(0, None))(Q, h0_re), want_per_sample) < 1e-5


@needs_kernels
def test_func_through_chunked_kernel():
    """chunk_gate_loop (head dim 16, the Triton chunked kernels) under grad, vmap and vmap(grad), against plain
    autograd of the same kernels on the batch the mapped dim folds into (batch elements are independent, so
    per-sample gradients are those of the summed loss). An unmapped input folds into a contiguous batch."""
    from gateloop_kernels.chunked import chunk_gate_loop
    B, n, H, d = 1, 16, 1, 16
    k, v = (torch.randn(B, n, H, d) for _ in range(2))
    are, aim = 0.9 * torch.rand(B, n, H), 0.1 * torch.randn(B, n, H)
    Q = torch.randn(2, B, n, H, d)

    def f(q):
        return (chunk_gate_loop(q, k, v, are, aim, chunk_size=16)[0] ** 2).sum()

    flat = Q.flatten(0, 1).requires_grad_()
    want_out = chunk_gate_loop(flat, *(t.expand(2, *t.shape[1:]) for t in (k, v, are, aim)), chunk_size=16)[0]
    want_grad, = torch.autograd.grad((want_out ** 2).sum(), flat)
    assert rel(grad(f)(Q[0]), want_grad[:1]) < 1e-6
    assert rel(vmap(lambda q: chunk_gate_loop(q, k, v, are, aim, chunk_size=16)[0])(Q), want_out[:, None]) < 1e-6
    assert rel(vmap(grad(f))(Q), want_grad[:, None]) < 1e-6


# ----------------------------------------------------------------------------- item 5: empty sequences, real states

def _entry(name, B, n, d, dtype=F64):
    """``(run, inputs, state_in)``: ``run()`` -> ``(out, final state)`` of one public entry point."""
    q, k, v = (torch.randn(B, n, d, dtype=dtype, device=DEV, requires_grad=True) for _ in range(3))
    if name == "operator":
        a = gate(B, n, dtype=dtype).requires_grad_()
        s0 = torch.randn(B, d, d, dtype=torch.complex128, device=DEV, requires_grad=True)
        return (lambda: G.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True)), [q, k, v, a], s0
    if name == "operator_key_gate":
        a = gate(B, n, d, 1, dtype=dtype).requires_grad_()
        s0 = torch.randn(B, d, d, dtype=torch.complex128, device=DEV, requires_grad=True)
        return (lambda: G.gate_loop_operator(q, k, v, a, initial_state=s0, return_final_state=True)), [q, k, v, a], s0
    if name in ("heads_z", "heads_log_polar"):
        q, k, v = (t.detach()[:, :, None].requires_grad_() for t in (q, k, v))
        s0 = torch.randn(B, 1, d, d, dtype=torch.complex128, device=DEV, requires_grad=True)
        if name == "heads_z":
            z = torch.randn(B, n, 1, 2, dtype=dtype, device=DEV, requires_grad=True)
            return (lambda: G.gate_loop_heads(q, k, v, z=z, initial_state=s0, output_final_state=True)), \
                [q, k, v, z], s0
        lm, ph = (torch.randn(B, n, 1, dtype=dtype, device=DEV, requires_grad=True) for _ in range(2))
        return (lambda: G.gate_loop_heads(q, k, v, log_magnitude=lm, phase=ph, initial_state=s0,
                                          output_final_state=True)), [q, k, v, lm, ph], s0
    assert name == "simple"
    a = torch.rand(B, n, d, dtype=dtype, device=DEV, requires_grad=True)
    cache = [torch.randn(B, d, dtype=dtype, device=DEV, requires_grad=True) for _ in range(2)]

    def run():
        out, (a_last, kv_last) = G.simple_gate_loop_operator(q, k, a, cache=tuple(cache))
        return out, torch.complex(kv_last, a_last)  # both parts of the cache, as one "state"
    return run, [q, k, a], cache


ENTRIES = [("operator", 1), ("operator", 2), ("operator", 8), ("operator_key_gate", 4), ("heads_z", 1),
           ("heads_z", 8), ("heads_log_polar", 1), ("heads_log_polar", 8), ("simple", 1), ("simple", 8)]


@pytest.mark.parametrize("name,d", ENTRIES)
def test_empty_sequence_is_differentiable(name, d):
    """n = 0: the output has a grad_fn, every input gets an (empty) gradient and the final state's gradient
    reaches the initial state unchanged. Before: no grad_fn at d >= 2, an IndexError at d = 1 with a state."""
    _check_empty_sequence(name, d, F64)


def _check_empty_sequence(name, d, dtype):
    """``test_empty_sequence_is_differentiable``'s checks on one entry point in ``dtype``."""
    run, ins, s0 = _entry(name, 2, 0, d, dtype=dtype)
    out, state = run()
    assert out.shape[1] == 0 and out.grad_fn is not None
    (out.sum() + state.real.sum() + 2 * state.imag.sum()).backward()
    for t in ins:
        assert t.grad is not None and t.grad.shape == t.shape
    if name == "simple":
        assert torch.equal(s0[0].grad, torch.full_like(s0[0], 2.0)) and torch.equal(s0[1].grad, torch.ones_like(s0[1]))
    else:
        assert torch.equal(s0.grad, torch.full_like(s0, 1 + 2j))


@pytest.mark.parametrize("fn", ["sequential_reference", "chunked_reference",
                                pytest.param("chunk_gate_loop", marks=needs_kernels)])
def test_empty_sequence_direct_kernel_and_references(fn):
    """n = 0 through the chunked kernel's entry and the references themselves (not only the public entries):
    the output has a grad_fn and the initial state's gradient is the final state's."""
    from gateloop_kernels import reference
    from gateloop_kernels.chunked import chunk_gate_loop
    B, H, d, e = 2, 2, 16, 32
    q, k = (torch.randn(B, 0, H, d, requires_grad=True) for _ in range(2))
    v = torch.randn(B, 0, H, e, requires_grad=True)
    ar, ai = (torch.randn(B, 0, H, requires_grad=True) for _ in range(2))
    h0 = torch.randn(B, H, d, e, dtype=torch.complex64, requires_grad=True)
    if fn == "chunk_gate_loop":
        out, state = chunk_gate_loop(q, k, v, ar, ai, initial_state=h0, output_final_state=True)
    else:
        heads_first = lambda t: t.transpose(1, 2).reshape(B * H, 0, t.shape[-1])  # noqa: E731
        a = torch.complex(ar, ai).transpose(1, 2).reshape(B * H, 0)[:, :, None, None]
        out, state = getattr(reference, fn)(heads_first(q), heads_first(k), heads_first(v), a,
                                            h0.reshape(B * H, d, e), return_final_state=True)
        state = state.reshape(B, H, d, e)
    assert out.shape[1] == 0 and out.grad_fn is not None
    (out.sum() + state.real.sum() + 2 * state.imag.sum()).backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v, ar, ai))
    assert torch.equal(h0.grad, torch.full_like(h0, 1 + 2j))


@pytest.mark.parametrize("path", ["cpu", pytest.param("kernel", marks=needs_kernels)])
@pytest.mark.parametrize("complex_gate", [True, False])
def test_elementwise_empty_segment_with_state(path, complex_gate, request):
    """The elementwise op at n = 0 with an initial state: the state passes through, and its gradient is the
    final state's. Before: IndexError (``a[:, 0]``) in the CPU backward."""
    if path == "kernel":
        request.getfixturevalue("kernel_on_cpu")
    q, k, v, a_re, a_im, h0_re, h0_im = make(2, 0, 3, torch.float32, complex_gate, False, True)
    leaves = [t if t is None else t.requires_grad_() for t in (h0_re, h0_im)]
    o, hr, hi, _ = ew.elementwise_scan(q, k, v, a_re, a_im, *leaves)
    g_re, g_im = torch.randn_like(hr), torch.randn_like(hi)
    grads = torch.autograd.grad((hr * g_re).sum() + (hi * g_im).sum(), [t for t in leaves if t is not None])
    assert torch.equal(grads[0], g_re)
    if complex_gate:
        assert torch.equal(grads[1], g_im)


@pytest.mark.parametrize("entry", ["operator", "heads"])
@pytest.mark.parametrize("d", [1, 8])
def test_real_initial_state(entry, d):
    """A real initial state is the complex one with no imaginary part (its gradient the real part of that
    one's). Before: "imag is not implemented" at d = e = 1 (operator) and a ValueError (heads)."""
    B, n = 2, 13
    q, k, v = (torch.randn(B, n, d, dtype=F64, device=DEV) for _ in range(3))
    a = gate(B, n)
    s_real = torch.randn(B, d, d, dtype=F64, device=DEV, requires_grad=True)
    s_cplx = s_real.detach().to(torch.complex128).requires_grad_()

    def run(s):
        if entry == "operator":
            return G.gate_loop_operator(q, k, v, a, initial_state=s, return_final_state=True)
        o, st = G.gate_loop_heads(q[:, :, None], k[:, :, None], v[:, :, None], log_magnitude=a.abs().log()[..., 0],
                                  phase=a.angle()[..., 0], initial_state=s[:, None], output_final_state=True)
        return o[:, :, 0], st[:, 0]

    (o1, st1), (o2, st2) = run(s_real), run(s_cplx)
    assert rel(o1, o2) < 1e-12 and (st1 - st2).abs().max() < 1e-12
    w = torch.randn_like(o1)
    g1, = torch.autograd.grad((o1 * w).sum() + st1.real.sum() + st1.imag.sum(), s_real)
    g2, = torch.autograd.grad((o2 * w).sum() + st2.real.sum() + st2.imag.sum(), s_cplx)
    assert not g1.is_complex() and rel(g1, g2.real) < 1e-12


def test_transformer_loss_needs_two_tokens():
    """A next-token loss of one token has no target: a ValueError naming the argument. Before: NaN."""
    model = G.Transformer(16, num_tokens=10, depth=1)
    with pytest.raises(ValueError, match="return_loss"):
        model(torch.randint(0, 10, (2, 1), device="cpu"), return_loss=True)
    assert torch.isfinite(model(torch.randint(0, 10, (2, 2)), return_loss=True))


@pytest.mark.parametrize("d", [1, 4])
def test_state_dtype_follows_q_not_the_head_dim(d):
    """A float64 gate with float32 q, k, v: the output float32 and the final state complex64 at every head dim, its
    values those of the float32-rounded gate (float64 loop). Before: complex128 at head dim 1, complex64 above."""
    q, k, v = (torch.randn(2, 7, d) for _ in range(3))
    a = torch.polar(torch.rand(2, 7, 1, 1, dtype=F64), torch.randn(2, 7, 1, 1, dtype=F64))
    o, s = G.gate_loop_operator(q, k, v, a, return_final_state=True)
    lm, ph = -torch.rand(2, 7, 1, dtype=F64), torch.randn(2, 7, 1, dtype=F64)
    oh, sh = G.gate_loop_heads(q[:, :, None], k[:, :, None], v[:, :, None], log_magnitude=lm, phase=ph,
                               output_final_state=True)
    assert (o.dtype, s.dtype, oh.dtype, sh.dtype) == (torch.float32, torch.complex64) * 2
    ro, rs = R.sequential_reference(q.double(), k.double(), v.double(), a.to(torch.complex64).to(torch.complex128),
                                    None, True)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5


def test_inputs_of_the_wrong_rank_name_the_argument():
    """Tokens, activations and caches of the wrong shape: a ValueError naming the argument and the shape it must
    have. Before: unpacking and reshape errors from inside the layers."""
    model = G.Transformer(16, num_tokens=11, depth=1, gate_loop_heads=2)
    for tokens in (torch.randint(0, 11, (3,)), torch.randint(0, 11, (1, 3, 2))):
        for loss in (False, True):
            with pytest.raises(ValueError, match=r"x must have shape \(b, n\) of token ids"):
                model(tokens, return_loss=loss)
    for layer in (GateLoopedAttention(16), SimpleGateLoopLayer(16), CausalFullAttention(16, dim_head=8, heads=2)):
        for x in (torch.randn(5, 16), torch.randn(2, 5, 8)):
            with pytest.raises(ValueError, match=r"x must have shape \(b, n, dim\) = \(b, n, 16\)"):
                layer(x)
    layer = SimpleGateLoopLayer(8)
    _, cache = layer(torch.randn(2, 5, 8), return_cache=True)
    with pytest.raises(ValueError, match=r"cache must be the \(a, kv\) pair of \(2 sequences \* dim 8, 1\)"):
        layer(torch.randn(2, 5, 8), cache=tuple(c[:8] for c in cache))
    with pytest.raises(ValueError, match="one gate per step"):  # a gate constant in time is not broadcast
        G.gate_loop_operator(*[torch.randn(2, 7, 4)] * 3, torch.rand(2, 1, 1, 1))


@pytest.mark.parametrize("make_layer", [
    lambda: GateLoopedAttention(16), lambda: GateLoopedAttention(16, heads=2), lambda: SimpleGateLoopLayer(16),
    lambda: CausalFullAttention(16, dim_head=8, heads=2),
    lambda: CausalFullAttention(16, dim_head=8, heads=2, data_dependent_rel_pos=True)],
    ids=["gla_d1", "gla_d8", "simple", "full_softmax", "full_linear"])
def test_layers_empty_sequence(make_layer):
    """Layers take a sequence of 0 tokens: an empty output, and a backward."""
    layer = make_layer().double()
    x = torch.randn(2, 0, 16, dtype=F64, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("name,d", [("operator", 1), ("operator", 16), ("heads_z", 1), ("heads_z", 16), ("simple", 1)])
def test_gpu_empty_sequence_is_differentiable(name, d):
    """As ``test_empty_sequence_is_differentiable`` in float32 on CUDA (the kernels' dispatch, d = 16 the
    chunked kernel's)."""
    _check_empty_sequence(name, d, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 16])
def test_gpu_func_grad_vmap(d):
    """torch.func.grad and vmap(grad) through the CUDA kernels (float32), against the float64 reference."""
    B, n = 2, 300
    q, k, v = (torch.randn(B, n, d, device="cuda") for _ in range(3))
    a = gate(B, n, dtype=torch.float32, device="cuda")

    def ours(q):
        return (G.gate_loop_operator(q, k, v, a) ** 2).sum()

    def ref(q):
        return (R.sequential_reference(q, k.double(), v.double(), a.to(torch.complex128)) ** 2).sum()

    assert rel(grad(ours)(q), grad(ref)(q.double())) < 1e-4
    Q = torch.randn(3, B, n, d, device="cuda")
    assert rel(vmap(grad(ours))(Q), torch.stack([grad(ref)(x.double()) for x in Q])) < 1e-4


@pytest.mark.parametrize("make_layer", [
    lambda: GateLoopedAttention(16), lambda: GateLoopedAttention(16, heads=2, sub_ln=True),
    lambda: SimpleGateLoopLayer(16)], ids=["gla_d1", "gla_d8", "simple"])
def test_layers_nan_is_causal(make_layer):
    """A NaN in one feature of token t leaves that sequence's earlier outputs and the other sequence's outputs
    and input gradients finite. (At head dim 8 on the CPU this runs the chunked reference, whose NaN
    causality is item 2 of issue 19.)"""
    layer = make_layer()
    x = torch.randn(2, 12, 16)
    x[1, 5, 3] = float("nan")
    x.requires_grad_()
    out = layer(x)
    assert torch.isfinite(out[1, :5]).all() and torch.isfinite(out[0]).all()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(x.grad[0]).all()


def test_layers_empty_batch():
    """A batch of 0 sequences through every layer, and the simple layer's cache round trip."""
    for layer in (GateLoopedAttention(16), GateLoopedAttention(16, heads=2), SimpleGateLoopLayer(16),
                  CausalFullAttention(16, dim_head=8, heads=2)):
        x = torch.randn(0, 5, 16, requires_grad=True)
        out = layer(x)
        assert out.shape == (0, 5, 16)
        out.sum().backward()
    layer = SimpleGateLoopLayer(16)
    out, cache = layer(torch.randn(0, 5, 16), return_cache=True)
    assert layer(torch.randn(0, 3, 16), cache=cache).shape == (0, 3, 16)


GATE_KINDS = {"zero": 0.0, "one": 1.0, "tiny": 1e-30, "above_one": 1.05, "nan": float("nan")}


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), n=st.sampled_from([0, 1, 2, 63, 64, 65, 130]),
       hows=st.tuples(*[st.sampled_from(["plain", "expanded", "transposed", "sliced"])] * 4),
       specials=st.lists(st.sampled_from(sorted(GATE_KINDS)), max_size=4), dtype=st.sampled_from(["f32", "f64"]),
       state=st.sampled_from([None, "complex", "real"]))
def test_operator_d1_property(B, n, hows, specials, dtype, state):
    """The public operator at head dim 1 (the elementwise op's CPU implementation here) over sequence
    lengths around the chunk (64), strides, gates of 0, 1, 1e-30, above 1 and NaN, float32/float64 and real
    or complex initial states: outputs, final state and every gradient finite wherever the float64
    sequential loop's are, and close to it there."""
    dt = F64 if dtype == "f64" else torch.float32
    tol = 1e-10 if dtype == "f64" else 1e-4
    q, k, v = (layout(torch.randn(B, n, 1, dtype=dt), how) for how in hows[:3])
    mag = 0.5 + 0.5 * torch.rand(B, n, 1, 1, dtype=dt)
    for i, kind in enumerate(specials):
        if n:
            mag.view(-1)[(7 * i + 3) % mag.numel()] = GATE_KINDS[kind]
    a = layout(torch.polar(mag, torch.randn(B, n, 1, 1, dtype=dt)), hows[3])
    s0 = None
    if state is not None:
        s0 = torch.randn(B, 1, 1, dtype=dt) if state == "real" else torch.randn(B, 1, 1, dtype=torch.complex128)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, a)] + ([s0.requires_grad_()] if s0 is not None else [])
    o, st_ = G.gate_loop_operator(*leaves[:4], initial_state=leaves[4] if s0 is not None else None,
                                  return_final_state=True)
    ref_leaves = [t.detach().to(torch.complex128 if t.is_complex() else F64).requires_grad_() for t in leaves]
    ro, rst = R.sequential_reference(*ref_leaves[:4], ref_leaves[4] if s0 is not None else None, True)
    w = torch.randn(B, n, 1, dtype=F64)
    loss = (o.double() * w).sum() + st_.real.double().sum() - st_.imag.double().sum()
    # the float64 loop returns bare zeros at n = 0: the zero terms connect it to its inputs
    rloss = (ro * w).sum() + rst.real.sum() - rst.imag.sum() + sum(t.real.sum() * 0 for t in ref_leaves)
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(rloss, ref_leaves)
    pairs = [(o, ro), (torch.view_as_real(st_), torch.view_as_real(rst))] + list(zip(got, want))
    for x, y in pairs:
        x, y = (torch.view_as_real(t) if t.is_complex() else t for t in (x, y))
        fin = torch.isfinite(y)
        assert torch.isfinite(x[fin]).all()
        err = (x[fin].double() - y[fin]).abs().max() if fin.any() else 0.0
        assert err <= tol * max(1.0, y[fin].abs().max().item() if fin.any() else 1.0)


@pytest.mark.parametrize("make_layer", [lambda: GateLoopedAttention(8, heads=2),
                                        lambda: GateLoopedAttention(8, heads=2, add_swish_gating=False),
                                        lambda: CausalFullAttention(8, dim_head=4, heads=2,
                                                                    data_dependent_rel_pos=True)],
                         ids=["gate-looped", "gate-looped-noswish", "full-ddrp"])
def test_layers_under_torch_func_grad(make_layer):
    """torch.func.grad of a layer's parameters (MAML, per-sample gradients) equals autograd's (was: RuntimeError from
    the gate's gradient-scaling Function, written without setup_context: found by a new user's probe)."""
    torch.manual_seed(0)
    layer = make_layer().double()
    x = torch.randn(2, 5, 8, dtype=F64)
    params = dict(layer.named_parameters())
    got = grad(lambda p: torch.func.functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for name, p in params.items():
        assert torch.allclose(got[name], p.grad, rtol=1e-10, atol=1e-12), name
    per_sample = vmap(grad(lambda p, xi: torch.func.functional_call(layer, p, (xi[None],)).pow(2).sum()),
                      in_dims=(None, 0))(params, x)
    assert all(torch.allclose(per_sample[name].sum(0), got[name], rtol=1e-10, atol=1e-12) for name in params)


def test_gate_looped_projections_run_as_modules_where_they_are_not_plain():
    """The fused input projection (one GEMM over the stacked weights) stands in for the modules only where they are
    plain nn.Linear without hooks: a forward hook, a wrapper (an adapter) or a global hook are honoured (were
    silently bypassed: found by a new user's probe)."""
    torch.manual_seed(0)
    layer = GateLoopedAttention(8, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=F64)
    ref = layer(x)
    doubled = GateLoopedAttention(8, heads=2).double()
    doubled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        doubled.to_qkv.weight.mul_(2)
    want = doubled(x)
    assert not torch.allclose(want, ref)
    handle = layer.to_qkv.register_forward_hook(lambda m, i, o: o * 2)
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o * 2 if m is layer.to_qkv else None)
    try:
        assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()

    class Adapter(torch.nn.Module):  # a LoRA-like wrapper: the base projection plus its own term
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, t):
            return self.base(t) * 2

    layer.to_qkv = Adapter(layer.to_qkv)
    assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12)


def test_loss_takes_int32_tokens():
    torch.manual_seed(0)
    model = G.Transformer(16, num_tokens=20, depth=1, gate_loop_heads=2).double()
    t = torch.randint(0, 20, (2, 9))
    assert torch.equal(model(t.int(), return_loss=True), model(t, return_loss=True))
    assert torch.equal(model(t.int(), return_loss=True, labels=t.int()), model(t, return_loss=True, labels=t))


def test_loss_labels_are_checked():
    """Given labels were taken as they came: float targets silently truncated by ``.long()`` (2.7 -> 2), a
    mis-shaped tensor failed in cross_entropy with a RuntimeError that names no argument."""
    model = G.Transformer(16, num_tokens=20, depth=1, gate_loop_heads=2)
    t = torch.randint(0, 20, (2, 9))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(t, return_loss=True, labels=t.float() + 0.7)
    with pytest.raises(ValueError, match=r"labels must have the shape and device of x, \(2, 9\)"):
        model(t, return_loss=True, labels=t[:, 1:])
    cu = torch.tensor([0, 4, 9])
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(t[:1], return_loss=True, labels=t[:1, :4], cu_seqlens=cu)


@pytest.mark.parametrize("entry", ["operator", "heads"])
def test_reference_outputs_and_gradients_are_dense(entry):
    """The chunked reference pads the time axis to whole chunks: its outputs and the gradients autograd returns were
    views into the padded buffers (holes; ``.view`` failed, a short sequence kept a chunk's memory alive: found by a
    new user's probe). Outputs and gradients are dense (the head layout's output a transpose of a contiguous
    buffer), their storage their own size."""
    torch.manual_seed(0)
    if entry == "operator":
        x = [torch.randn(2, 23, 16, dtype=F64, requires_grad=True) for _ in range(3)]
        a = torch.polar(torch.rand(2, 23, 1, 1, dtype=F64), torch.randn(2, 23, 1, 1, dtype=F64)).requires_grad_()
        out = G.gate_loop_operator(*x, a, chunk_size=16)
    else:
        x = [torch.randn(1, 5, 2, 16, dtype=F64, requires_grad=True) for _ in range(3)]
        a = torch.randn(1, 5, 2, 2, dtype=F64, requires_grad=True)
        out, _ = G.gate_loop_heads(*x, z=a, chunk_size=1024)
    grads = torch.autograd.grad(out, [*x, a], torch.randn_like(out))
    for t in (out, *grads):
        reach = 1  # dense: the dims sorted by stride each step over exactly what the smaller ones cover
        for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
            assert st == reach, (t.shape, t.stride())
            reach *= sz
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (t.shape, t.stride())


def _penalty_case(entry, on_kernels):
    """``(out, inputs)`` of one public call with an initial or final state (the general path: the scan ops'
    own autograd Functions): float32 on ``DEV`` on the kernels, else float64 on the CPU."""
    kw = dict(dtype=torch.float32, device=DEV) if on_kernels else dict(dtype=F64)
    if entry == "operator":
        x = [torch.randn(2, 9, 1, **kw, requires_grad=True) for _ in range(3)]
        a = torch.polar(0.5 + 0.5 * torch.rand(2, 9, 1, 1, **kw), torch.randn(2, 9, 1, 1, **kw))
        return G.gate_loop_operator(*x, a.requires_grad_(), return_final_state=True)[0], [*x, a]
    if entry == "simple":
        x = [torch.randn(2, 9, 3, **kw, requires_grad=True) for _ in range(2)]
        a = torch.rand(2, 9, 3, **kw, requires_grad=True)
        return G.simple_gate_loop_operator(*x, a)[0], [*x, a]
    x = [torch.randn(1, 16, 1, 16, **kw, requires_grad=True) for _ in range(3)]
    z = torch.randn(1, 16, 1, 2, **kw, requires_grad=True)
    return G.gate_loop_heads(*x, z=z, output_final_state=True, chunk_size=16)[0], [*x, z]


@needs_kernels
@pytest.mark.parametrize("entry", ["operator", "simple", "heads"])
def test_double_backward_on_kernel_paths_raises(monkeypatch, entry):
    """A gradient penalty (``create_graph=True``, the gradient in the loss) through a call with a state on a Triton
    kernel's path: the kernels record no graph, so the penalty's gradient came out silently zero (the loss's
    backward ran, or a later ``grad`` raised PyTorch's "does not require grad"; found by a new user's probe). Its
    backward raises naming double backward."""
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(0)
    out, inputs = _penalty_case(entry, True)
    g = torch.autograd.grad(out.sum(), inputs[1], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        (out.square().sum() + g.square().sum()).backward()


@pytest.mark.skipif(DEV == "cuda", reason="the CPU's PyTorch paths")
@pytest.mark.parametrize("entry", ["operator", "simple"])
def test_double_backward_off_the_kernels_is_exact(entry):
    """Off the kernels (PyTorch implementations of the same ops) the penalty's gradient is the float64 oracle's:
    the double-backward guard leaves a backward that recorded its graph alone, and one that legitimately has none
    (only q needs grad: dq does not depend on q) passes."""
    torch.manual_seed(0)
    out, inputs = _penalty_case(entry, False)
    refs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = (R.sequential_reference(*refs) if entry == "operator" else R.simple_sequential_reference(*refs)[0])
    for o, x in ((out, inputs), (ref, refs)):
        g = torch.autograd.grad(o.sum(), x[1], create_graph=True)[0]
        (o.square().sum() + g.square().sum()).backward()
    for x, r in zip(inputs, refs):
        assert rel(x.grad, r.grad) < 1e-12
    q = inputs[0].detach().requires_grad_()
    out = (G.gate_loop_operator(q, *(t.detach() for t in inputs[1:]), return_final_state=True)[0]
           if entry == "operator" else G.simple_gate_loop_operator(q, *(t.detach() for t in inputs[1:]))[0])
    g = torch.autograd.grad(out.sum(), q, create_graph=True)[0]
    (out.square().sum() + g.square().sum()).backward()  # g is constant in q: nothing to differentiate twice


@needs_kernels
def test_double_backward_through_one_node_raises(monkeypatch):
    """The same penalty through the one-node path (no state) raises: ``grad(out.sum(), k, create_graph=True)`` got a
    gradient without a graph there (once_differentiable marks only when the incoming gradient needs grad), and the
    penalty's gradient came out silently zero."""
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    x = [torch.randn(2, 9, 1, device=DEV, requires_grad=True) for _ in range(3)]
    a = torch.polar(0.5 + 0.5 * torch.rand(2, 9, 1, 1, device=DEV), torch.randn(2, 9, 1, 1, device=DEV))
    out = G.gate_loop_operator(*x, a.requires_grad_())
    g = torch.autograd.grad(out.sum(), x[1], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiate twice|double backward"):
        (out.square().sum() + g.square().sum()).backward()


@needs_kernels
@pytest.mark.parametrize("entry", ["heads", "chunk_gate_loop"])
def test_chunk_above_the_kernels_limit_raises_naming_it(monkeypatch, entry):
    """A chunk_size past what the chunked kernels take (their chunk x chunk tiles): 2**40 raised the interpreter's
    'out of range for int32' (found by a new user's probe). A ValueError names chunk_size and the limit; the
    limit itself runs and matches the default chunk's results."""
    from gateloop_kernels.chunked import chunk_gate_loop
    from gateloop_kernels.chunked.config import MAX_BT
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 150, 2, 16, device=DEV) for _ in range(3))
    z = torch.randn(1, 150, 2, 2, device=DEV)

    def call(chunk):
        if entry == "heads":
            return G.gate_loop_heads(q, k, v, z=z, chunk_size=chunk)[0]
        a = torch.view_as_complex(z.contiguous()).sigmoid()
        return chunk_gate_loop(q, k, v, a.real.contiguous(), a.imag.contiguous(), chunk_size=chunk)[0]
    for chunk in (2 * MAX_BT, 2 ** 40):
        with pytest.raises(ValueError, match=f"chunk_size must be at most {MAX_BT}"):
            call(chunk)
    assert rel(call(MAX_BT), call(64)) < 1e-5


# ---- argument checks of the entries a new user hits first: clear errors that name the argument

def test_preactivation_of_a_scalar_names_z():
    with pytest.raises(ValueError, match="z must end in a dimension of 2"):
        G.gate_from_preactivation(torch.tensor(1.0))


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


@needs_kernels
def test_numpy_int_chunk_size_runs_as_the_int(monkeypatch):
    """Integer checks take what operator.index takes (is_int): a NumPy chunk_size is passed on as a Python int (a
    kernel constexpr: np.int64 raised 'no attribute bit_length' inside the kernels), also by chunk_gate_loop; bools
    (NumPy's too) stay rejected."""
    import numpy as np

    from gateloop_kernels.chunked import chunk_gate_loop
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEV) for _ in range(3))
    z = torch.randn(1, 40, 2, 2, device=DEV)
    assert torch.equal(G.gate_loop_heads(q, k, v, z=z, chunk_size=np.int64(16))[0],
                       G.gate_loop_heads(q, k, v, z=z, chunk_size=16)[0])
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert torch.equal(R.diagonal_scan_chunked(x, x, chunk_size=np.int32(2))[0],
                       R.diagonal_scan_chunked(x, x, chunk_size=2)[0])
    if INTERPRET:  # (chunk_gate_loop runs only the kernels: these CPU inputs through the interpreter)
        args = _chunk_inputs()
        assert torch.equal(chunk_gate_loop(*args, chunk_size=np.int64(16))[0], chunk_gate_loop(*args, chunk_size=16)[0])
    for bad in (np.bool_(True), True, torch.tensor(16)):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            G.gate_loop_heads(q, k, v, z=z, chunk_size=bad)


@pytest.mark.parametrize("chunk, error", [(16.0, TypeError), (None, TypeError), (True, TypeError), (0, ValueError)])
@pytest.mark.parametrize("name", ["chunked_reference", "simple_chunked_reference", "diagonal_scan_chunked"])
def test_reference_chunk_size_is_checked(name, chunk, error):
    """A float or None chunk_size raised AttributeError / a comparison TypeError from inside the references, and 0
    ZeroDivisionError from diagonal_scan_chunked."""
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    args = {"chunked_reference": (x, x, x, torch.rand(2, 5, 1, 1, dtype=torch.float64)),
            "simple_chunked_reference": (x, x, x), "diagonal_scan_chunked": (x, x)}[name]
    with pytest.raises(error, match="chunk_size must be"):
        getattr(G.reference, name)(*args, chunk_size=chunk)
