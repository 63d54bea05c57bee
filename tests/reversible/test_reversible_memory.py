"""Activation memory does not grow with depth (CPU: a live-storage tally; GPU: max_memory_allocated)."""
import pytest
import torch
from torch import nn

import reversible

from helpers.live_bytes import LiveBytes

D = 32


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


class TokenBytes(LiveBytes):
    """:class:`LiveBytes` restricted to activation-sized storages (a dim equal to the token count)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def counts(self, func, t) -> bool:
        return isinstance(t, torch.Tensor) and self.tokens in t.shape


class _Mlp(nn.Module):
    """The benchmark's g: pre-norm 4x MLP with GELU."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("amp", [False, True])
def test_backward_peak_is_buffers_plus_one_step(amp):
    """Peak of the activation-sized bytes allocated during backward, in units of one stream half H
    (fp32, tokens x d). Live before backward: the buffer (2H) and the output (1H). Backward adds the
    gradient buffer (2H) and one step's recompute + vjp: for the MLP (hidden 4d) at its fc2 backward,
    fp32: LayerNorm out 1 + fc1 out 4 + GELU out 4 + its gradient 4 + the output kept for the
    reconstruction 1 = 14H; bf16 autocast: LayerNorm out cast 0.5 + fc1 out 2 + GELU out 2 + its
    gradient 2 + the output's gradient cast 0.5 + the bf16 output kept 0.5 = 7.5H.
    Nothing else: the output gradient (1H) is released before the stack's backward (it only fills the
    gradient buffer), and under autocast the fp32 copy of a recomputed output is not held through
    its vjp (the reconstruction subtracts the bf16 output). Before: 17H / 11H."""
    from reversible import _extension

    d, n = 32, 600
    torch.manual_seed(0)
    net = reversible.ReversibleSequence([(_Mlp(d), _Mlp(d)) for _ in range(2)], merge="sum")
    x = torch.randn(1, n, d, requires_grad=True)
    half = x.nbytes
    with _extension.use_extension(False):
        tally = TokenBytes(n)
        with tally:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = net(x)
            loss = y.float().square().mean()
            before = tally.current
            tally.reset_peak()
            loss.backward()
    assert before == 3 * half  # buffer (2, *half) + merged output
    extra = (tally.peak - before) / half
    expected = 2 + (7.5 if amp else 14)
    print(f"amp={amp}: backward peak over the forward's {before / half:.2f} H: {extra:.3f} H (expected {expected})")
    assert extra <= expected + 0.25


def test_recomputation_makes_no_wide_copy_of_a_narrow_output():
    """Under bf16 autocast the coupling outputs are bf16 and the stream float32: the backward's recomputation
    starts the vjp from the bf16 output (the engine casts the float32 gradient), so it makes no float32 copy of
    it. Counted with a dispatch mode: casts bf16 -> float32 of a stream-half-sized tensor made with grad mode on
    during one backward, i.e. in the recomputation (the engine's own casts of gradients run with grad mode off;
    the previous code made one such copy per coupling step, 6 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import reversible

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widening = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func.overloadpacket is torch.ops.aten._to_copy and args[0].dtype == torch.bfloat16
                    and kwargs.get("dtype") == torch.float32 and args[0].shape == half and torch.is_grad_enabled()):
                self.widening += 1
            return func(*args, **kwargs)

    torch.manual_seed(0)
    half = (2, 8, 16)
    blocks = [(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)) for _ in range(3)]
    model = reversible.ReversibleSequence(blocks, dim=-1, merge="sum")
    x = torch.randn(*half, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    loss = y.float().square().mean()
    with Casts() as mode:
        loss.backward()
    assert mode.widening == 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
