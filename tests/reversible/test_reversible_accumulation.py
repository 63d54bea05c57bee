"""Parameter gradients of a reversible stack when ``.grad`` already holds values (gradient accumulation,
``zero_grad(set_to_none=False)``): memory stays flat in depth, values equal plain autograd's, and
``torch.autograd.grad`` returns gradients without touching ``.grad`` (plain autograd's semantics)."""
import pytest
import torch
from torch import nn

import reversible

from helpers.live_bytes import LiveBytes
from helpers.seed_reversible_oracle import assert_close_all

TOL = 1e-10


class Block(nn.Module):
    def __init__(self, d, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _stack(klass, depth, d, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return klass([(Block(d, dtype), Block(d, dtype)) for _ in range(depth)])


def _backward_peak(depth, d, x):
    """Peak of the bytes allocated during ``loss.backward()`` (live-storage tally), for ``depth`` blocks
    with distinct parameters whose ``.grad`` starts filled."""
    net = _stack(reversible.ReversibleSequence, depth, d, x.dtype)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    loss = net(x).square().sum()
    with LiveBytes() as tally:  # counts what the backward allocates, nothing from before
        loss.backward()
    return tally.peak, sum(p.nbytes for p in net.parameters()) // depth


DEPTHS = (2, 8, 24)


def test_backward_memory_flat_in_depth_with_existing_grads():
    """With ``.grad`` already filled, the backward accumulates each block's parameter gradients as they
    are produced: the peak of what its backward allocates does not grow with depth (74248 B at depth
    2, 8 and 24). Tolerance: an eighth of one block's parameter bytes (less than one step's gradients)
    from depth 2 to 8 and 24. Before the fix the peak grew by one block's parameter bytes per block
    (174088 / 573448 / 1638408 B at depth 2 / 8 / 24): all blocks' gradients were held until the
    stack's backward ended."""
    d = 64  # parameters dominate: a block holds 2 * (64 * 64 + 64) float64 = 66560 B, a stream half 8 KiB
    x = torch.randn(2, 8, d, dtype=torch.float64, requires_grad=True)
    peaks = {}
    for depth in DEPTHS:
        peaks[depth], block = _backward_peak(depth, d, x)
        x.grad = None
    print("backward peak over base with existing .grad (bytes), by depth:", peaks, "one block's parameters:", block)
    for depth in DEPTHS[1:]:
        assert peaks[depth] <= peaks[DEPTHS[0]] + block // 8, (depth, peaks)


@pytest.mark.parametrize("existing", [False, True])
def test_accumulated_grads_equal_plain_autograd(existing):
    """Two micro-batches accumulated into ``.grad`` (starting as None or filled) equal plain autograd's."""
    d, depth = 6, 3
    rev = _stack(reversible.ReversibleSequence, depth, d)
    ref = _stack(reversible.SequentialSequence, depth, d)
    init = [torch.randn_like(p) for p in rev.parameters()] if existing else None
    for net in (rev, ref):
        if init is not None:
            for p, g in zip(net.parameters(), init):
                p.grad = g.clone()
    xs = [torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    got_x, want_x = [], []
    for x in xs:
        rev(x).square().sum().backward()
        got_x.append(x.grad)
        x.grad = None
        ref(x).square().sum().backward()
        want_x.append(x.grad)
        x.grad = None
    assert_close_all([p.grad for p in rev.parameters()] + got_x, [p.grad for p in ref.parameters()] + want_x, TOL)


def test_autograd_grad_leaves_dot_grad_alone():
    """``torch.autograd.grad(loss, inputs)`` returns the gradients (as plain autograd does) and leaves
    every ``.grad`` as it was, whether ``inputs`` holds parameters, the input, or some of them."""
    d, depth = 6, 3
    rev = _stack(reversible.ReversibleSequence, depth, d)
    ref = _stack(reversible.SequentialSequence, depth, d)
    sentinel = [torch.randn_like(p) for p in rev.parameters()]
    for p, s in zip(rev.parameters(), sentinel):
        p.grad = s.clone()
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    params, ref_params = list(rev.parameters()), list(ref.parameters())
    for pick in (slice(None), slice(2, 4), slice(0, 0)):
        got = torch.autograd.grad(rev(x).square().sum(), [x, *params[pick]])
        want = torch.autograd.grad(ref(x).square().sum(), [x, *ref_params[pick]])
        assert_close_all(list(got), list(want), TOL)
        assert x.grad is None
        assert all(torch.equal(p.grad, s) for p, s in zip(params, sentinel))


def test_backward_with_inputs_accumulates_only_those():
    """``loss.backward(inputs=[...])`` accumulates into the listed tensors' ``.grad`` only (plain autograd's
    semantics), adding to what they hold."""
    d, depth = 6, 3
    rev = _stack(reversible.ReversibleSequence, depth, d)
    ref = _stack(reversible.SequentialSequence, depth, d)
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    init = [torch.randn_like(p) for p in rev.parameters()]
    for net in (rev, ref):
        for p, g in zip(net.parameters(), init):
            p.grad = g.clone()
        picked = list(net.parameters())[1:4]
        net(x).square().sum().backward(inputs=picked)
    assert x.grad is None
    assert_close_all([p.grad for p in rev.parameters()], [p.grad for p in ref.parameters()], TOL)
    assert all(torch.equal(p.grad, g) for i, (p, g) in enumerate(zip(rev.parameters(), init)) if not 1 <= i < 4)
