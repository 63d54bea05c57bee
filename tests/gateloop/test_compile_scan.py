"""torch.compile(fullgraph=True) over the public scan functions, and opcheck of the custom ops."""
import os

import pytest
import torch

import gateloop_kernels as G
from gateloop_kernels import elementwise as ew

from helpers.kernels import DEV


def test_opcheck_elementwise_scan():
    B, n, C = 2, 19, 3
    q, k, v, ar, ai = (torch.randn(B, n, C, device=DEV, requires_grad=True) for _ in range(5))
    ar2, ai2 = (0.5 * ar).detach().requires_grad_(), (0.5 * ai).detach().requires_grad_()
    h0r, h0i = (torch.randn(B, C, device=DEV, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ew.elementwise_scan_op.op, (q, k, v, ar2, ai2, h0r, h0i))
    torch.library.opcheck(ew.elementwise_scan_op.op, (q, k, None, ar2, None, None, None))


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    B, n, H = 2, 24, 3

    def model(q, k, v, z, q2, kv, a2):
        o, s = G.gate_loop_heads(q, k, v, z=z, output_final_state=True)
        o2, (al, hl) = G.simple_gate_loop_operator(q2, kv, a2)
        return o.sum() + s.real.sum() + o2.sum() + hl.sum()

    args = [torch.randn(B, n, H, 1, device=DEV, requires_grad=True) for _ in range(3)]
    args.append(torch.randn(B, n, H, 2, device=DEV, requires_grad=True))
    args += [torch.randn(B, n, 4, device=DEV, requires_grad=True), torch.randn(B, n, 4, device=DEV, requires_grad=True),
             torch.rand(B, n, 4, device=DEV, requires_grad=True)]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    ref = model(*args)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(got, args)
    rg = torch.autograd.grad(ref, args)
    for x, y in zip(g, rg):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)


def test_compile_seed_operator_fullgraph():
    torch._dynamo.reset()
    B, n = 3, 20
    q, k, v = (torch.randn(B, n, 1, device=DEV) for _ in range(3))
    a = torch.polar(torch.rand(B, n, 1, 1, device=DEV), torch.randn(B, n, 1, 1, device=DEV))
    f = torch.compile(lambda *t: G.gate_loop_operator(*t), fullgraph=True, backend="aot_eager")
    assert torch.allclose(f(q, k, v, a), G.gate_loop_operator(q, k, v, a), atol=1e-6)


@pytest.mark.gpu
def test_compile_inductor_gpu():
    torch._dynamo.reset()
    B, n, H = 2, 4096, 256
    q, k, v = (torch.randn(B, n, H, 1, device="cuda", requires_grad=True) for _ in range(3))
    z = torch.randn(B, n, H, 2, device="cuda", requires_grad=True)
    f = lambda *t: G.gate_loop_heads(*t[:3], z=t[3])[0].square().sum()  # noqa: E731
    got = torch.compile(f, fullgraph=True)(q, k, v, z)
    ref = f(q, k, v, z)
    assert torch.allclose(got, ref, rtol=1e-5)
    g = torch.autograd.grad(got, [q, k, v, z])
    rg = torch.autograd.grad(ref, [q, k, v, z])
    for x, y in zip(g, rg):  # inductor fuses the gate activation differently: compare by norm
        assert ((x - y).norm() / y.norm()).item() < 1e-4
    torch.library.opcheck(ew.elementwise_scan_op.op, (q[..., 0].detach(), k[..., 0].detach(), v[..., 0].detach(),
                                                   0.5 * z[..., 0].detach(), 0.5 * z[..., 1].detach(), None, None))


def _same_grads(fn_a, fn_b, leaves):
    """fn_a and fn_b give bitwise equal outputs and gradients (random output gradients, all outputs used)."""
    outs_a, outs_b = fn_a(*leaves), fn_b(*leaves)
    used = [i for i, o in enumerate(outs_a) if o.is_floating_point() and o.numel()]
    gouts = [torch.randn_like(outs_a[i]) for i in used]
    diff = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    ga = torch.autograd.grad([outs_a[i] for i in used], diff, gouts)
    gb = torch.autograd.grad([outs_b[i] for i in used], diff, gouts)
    for x, y in zip([outs_a[i] for i in used] + list(ga), [outs_b[i] for i in used] + list(gb)):
        assert torch.equal(x, y)


def test_eager_path_is_the_custom_op():
    """Eager calls skip the custom-op dispatch (``_custom_op.py``) but run the same implementation and backward:
    bitwise the same outputs and gradients as the registered ops, initial and final states included."""
    B, n, C = 2, 19, 3
    q, k, v, ar, ai = (torch.randn(B, n, C, device=DEV) for _ in range(5))
    h0r, h0i = (torch.randn(B, C, device=DEV) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v, 0.5 * ar, 0.5 * ai, h0r, h0i)]
    _same_grads(ew.elementwise_scan_op.eager.apply, ew.elementwise_scan_op.op, leaves)
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return  # the chunked kernels need CUDA or the interpreter
    from gateloop_kernels.chunked.op import _chunk_op
    B, n, H, d = 1, 40, 2, 16
    q, k, v = (torch.randn(B, n, H, d, device=DEV) for _ in range(3))
    ar, ai = 0.9 * torch.rand(B, n, H, device=DEV), 0.3 * torch.rand(B, n, H, device=DEV)
    h0 = torch.randn(B, H, 2, d, d, device=DEV)
    leaves = [t.requires_grad_() for t in (q, k, v, ar, ai, h0)] + [True, "tf32x3", 16]
    _same_grads(_chunk_op.eager.apply, _chunk_op.op, leaves)


def test_compile_dynamic_lengths_one_graph(monkeypatch):
    """torch.compile(dynamic=True) over the head-dim-1 kernel path compiles once for every length and batch size of
    one tile-width range: the elementwise op's fake implementation sized its ``carries`` through ``int(n)`` and
    ``int(C)`` (the tile table's powers of two), which specialized the length and the channels (the operator's batch)
    and recompiled at each new length. Outputs and gradients are the eager call's."""
    from gateloop_kernels import dispatch
    from gateloop_kernels.elementwise import op as ew_op
    from helpers.kernels import HAS_CUDA, INTERPRET
    if not (HAS_CUDA or INTERPRET):
        pytest.skip("the CPU runs the kernels only under TRITON_INTERPRET=1")
    if DEV == "cpu":
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)

    f = lambda *t: G.gate_loop_operator(*t)  # noqa: E731
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend=backend)
    for B, n in ((3, 17), (3, 33), (4, 64), (2, 100)):
        q, k, v = (torch.randn(B, n, 1, device=DEV, requires_grad=True) for _ in range(3))
        a = torch.polar(0.5 + 0.5 * torch.rand(B, n, 1, 1, device=DEV),
                        torch.randn(B, n, 1, 1, device=DEV)).requires_grad_()
        got, ref = compiled(q, k, v, a), f(q, k, v, a)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        for x, y in zip(torch.autograd.grad(got, [q, k, v, a], g), torch.autograd.grad(ref, [q, k, v, a], g)):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1


def test_compile_dynamic_packed_lengths_one_graph():
    """torch.compile(dynamic=True) over packed sequences (``cu_seqlens``) compiles once for every total length:
    check_cu_seqlens formatted the symbolic ``T`` into its device-side assertion's message, which specialized it
    (a recompile per length). Outputs, final states and gradients are the eager call's."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)

    def f(q, k, v, z, cu):
        o, s = G.gate_loop_heads(q, k, v, z=z, cu_seqlens=cu, output_final_state=True)
        return o, torch.view_as_real(s)

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend=backend)
    for T, cuts in ((17, (5, 5)), (33, (10, 30)), (64, (1, 40))):
        q, k, v = (torch.randn(1, T, 2, 1, device=DEV, requires_grad=True) for _ in range(3))
        z = torch.randn(1, T, 2, 2, device=DEV, requires_grad=True)
        cu = torch.tensor((0, *cuts, T), device=DEV, dtype=torch.int32)
        got, ref = compiled(q, k, v, z, cu), f(q, k, v, z, cu)
        gs = [torch.randn_like(r) for r in ref]
        for x, y in zip(list(got) + list(torch.autograd.grad(got, [q, k, v, z], gs)),
                        list(ref) + list(torch.autograd.grad(ref, [q, k, v, z], gs))):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
