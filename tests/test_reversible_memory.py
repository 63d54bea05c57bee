"""Activation memory does not grow with depth (CPU: a live-storage tally; GPU: max_memory_allocated)."""
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import reversible

D = 32


class LiveBytes(TorchDispatchMode):
    """Tallies the bytes of every storage created by an op while active, until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key, n = s.data_ptr(), s.nbytes()
                if n and key not in self.live:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(s, self._free, key)
        return out

    def reset_peak(self):
        self.peak = self.current


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _measure(klass, depth, x):
    f, g = Block(), Block()  # shared across depth: parameter memory is the same at every depth
    net = klass([(f, g)] * depth)
    saved = []
    tally = LiveBytes()
    with tally:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            y = net(x)  # the tally of what autograd saves covers the forward only
        loss = y.square().sum()
        del y
        fwd_live = tally.current
        tally.reset_peak()
        loss.backward()
    return sum(saved), fwd_live, tally.peak


def test_activation_memory_flat_in_depth_cpu():
    x = torch.randn(2, 256, D, requires_grad=True)
    act = x.nbytes
    rev = {d: _measure(reversible.ReversibleSequence, d, x) for d in (4, 16)}
    seq = {d: _measure(reversible.SequentialSequence, d, x) for d in (4, 16)}
    print("saved / live after forward / peak in backward (bytes): reversible", rev, "plain", seq)
    # nothing saved for backward by autograd inside the reversible stack in the forward, at any depth
    assert rev[4][0] == rev[16][0] == 0
    # what stays alive after the forward and the peak during backward do not grow with depth
    assert rev[16][1] == rev[4][1]
    assert rev[16][2] <= rev[4][2] + act // 4
    # ... while plain autograd's grow about linearly
    assert seq[16][0] > 3 * seq[4][0]
    assert seq[16][1] > 3 * seq[4][1]
    assert seq[16][1] > rev[16][1] + 10 * act


@pytest.mark.gpu
def test_activation_memory_flat_in_depth_gpu():
    dev = torch.device("cuda")
    x = torch.randn(8, 2048, 256, device=dev, requires_grad=True)

    def peak(klass, depth):
        f, g = nn.Linear(256, 256).to(dev), nn.Linear(256, 256).to(dev)
        net = klass([(f, g)] * depth)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        net(x).square().sum().backward()
        torch.cuda.synchronize()
        x.grad = None
        return torch.cuda.max_memory_allocated() - base

    act = x.nbytes
    rev4, rev32 = peak(reversible.ReversibleSequence, 4), peak(reversible.ReversibleSequence, 32)
    seq4, seq32 = peak(reversible.SequentialSequence, 4), peak(reversible.SequentialSequence, 32)
    print(f"peak MiB: reversible depth 4 {rev4 / 2**20:.1f}, 32 {rev32 / 2**20:.1f}; "
          f"plain depth 4 {seq4 / 2**20:.1f}, 32 {seq32 / 2**20:.1f}")
    assert rev32 <= rev4 + act // 2
    assert seq32 > seq4 + 20 * act
