"""bench.tools.op_count: the host work per layer of a training step stays within a budget of the SDPA model's.

The eager step is host-bound at the model benchmark's sizes (docs/kernels.md section 5), so a change that adds
PyTorch calls or launches to the scan layer slows every user's step. Per layer at dim 32 on the CPU (forward +
backward; float32 / bf16 autocast): softmax attention through SDPA 160 / 184 aten operator calls, ours at head dim 16
(the chunked kernels) 164 / 180 and 10 / 8 launches (float32's exact mode: two state passes), at head dim 1 (the
look-back scan) 169 / 188 and 4 launches; the budgets are these counts: SDPA's + 4 at head dim 16, + 9 at head dim 1.
History: 214 / 222 against 186 at dim 512 bf16 before the layer's three input projections ran as one GEMM; at head
dim 16, 3 -> 1 ``clone`` since the kernels read q and k as views of that GEMM's output."""
import contextlib

import pytest
import torch

from bench.tools import op_count
from gateloop_kernels import gate_loop_operator
from helpers.kernels import needs_kernels


@needs_kernels
@pytest.mark.parametrize("amp", [False, True])
def test_scan_layers_stay_within_the_host_budget(amp):
    dim = 32
    attn_ops, attn_launches, _ = op_count.per_layer(dict(use_gate_looped_attn=False), amp, "cpu", dim)
    for kw, max_launches, extra in ((dict(gate_loop_heads=2), 8 if amp else 10, 4), (dict(), 4, 9)):  # d = 16, 1
        ops, launches, by_name = op_count.per_layer(kw, amp, "cpu", dim)
        assert attn_launches == 0 and 0 < launches <= max_launches, (kw, launches)
        assert ops <= attn_ops + extra, (kw, ops, attn_ops, by_name.most_common(10))


@needs_kernels
def test_counts_see_the_kernel_paths_only_once_per_launch():
    """A launch's own (interpreted) operators are not counted: the per-layer count equals the count with every
    launch a no-op."""
    from gateloop_kernels._launch import Launcher
    from gateloop_kernels.elementwise import workspace

    kw = dict(gate_loop_heads=2)
    ops, launches, _ = op_count.per_layer(kw, False, "cpu", 32)
    real = Launcher.run
    Launcher.run = lambda self, grid, args, kwargs: None
    try:
        stub_ops, stub_launches, _ = op_count.per_layer(kw, False, "cpu", 32)
    finally:
        Launcher.run = real
        workspace.reset()  # the stubbed launches cleared no workspace
    assert (ops, launches) == (stub_ops, stub_launches)


@needs_kernels
@pytest.mark.parametrize("d, max_ops, launches", [(1, 22, 2), (16, 20, 8)])
def test_operator_call_stays_within_its_host_budget(d, max_ops, launches):
    """One eager ``gate_loop_operator`` forward+backward (complex gate per sequence, the one-node path): its aten calls
    (views, allocations, casts: each a few us of host time on the H100 machine) and launches. Head dim 1 took 54
    calls before its layout views became one ``as_strided`` each (``lean._channels``), 30 before the kernel wrote the
    complex gate's gradient into its planes (no ``torch.complex``, no gate-plane views), 24 before the look-back
    workspaces were reused (no zero fill per launch); head dim 16 38, 34 before the chunked kernels read the
    complex gate's parts in place (two copies forward and the interleave of its gradient backward: 3 device kernels),
    32 before the chunked kernels took the operator's ``(B, n, d)`` inputs and ``(B, n)`` gate planes as one head
    (no unsqueeze / select views to and from ``(B, n, 1, d)``)."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 40, d, generator=g).requires_grad_() for _ in range(3)]
    a = torch.polar(torch.full((3, 40, 1, 1), 0.9), torch.zeros(3, 40, 1, 1)).requires_grad_()
    gout = torch.randn(3, 40, d, generator=g)
    counter = op_count._Count()
    with op_count._kernels_as_on_gpu("cpu"):
        for i in range(3):  # the first calls compile and fill caches
            with op_count._counting(counter) if i == 2 else contextlib.nullcontext():
                torch.autograd.grad(gate_loop_operator(*x, a), [*x, a], gout)
    ops = sum(counter.ops.values())
    assert counter.launches == launches and ops <= max_ops, (ops, counter.launches, counter.ops.most_common(10))
    assert not {"zeros", "zero_", "fill_", "new_zeros", "zeros_like"} & set(counter.ops)  # no per-call zero fill
