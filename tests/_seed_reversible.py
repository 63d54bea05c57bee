"""A minimal port of the *behaviour* of the seeds' reversible.py (lucidrains), for tests only.

It reproduces what the seeds do wrong, so each bug test can show that it fails there:
RNG state kept on the module (last forward wins), recomputation outside the forward's autocast
state, parameters reached only through a nested ``torch.autograd.backward`` inside the
Function's backward (so they are not inputs of the graph: no gradients when the input needs
none, and DDP sees them as unused). Not used by the library.
"""
import torch
from torch import nn


class _SeedRng(nn.Module):
    """Keeps the CPU RNG state of the *last* forward on the module, as the seeds' Deterministic."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.saved = None

    def forward(self, x, record=False, replay=False):
        if record:
            self.saved = torch.get_rng_state()
        if not replay:
            return self.net(x)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.saved)
            return self.net(x)


class SeedBlock(nn.Module):
    def __init__(self, f, g, dim=-1):
        super().__init__()
        self.f, self.g, self.dim = _SeedRng(f), _SeedRng(g), dim

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=self.dim)
        with torch.no_grad():
            y1 = x1 + self.f(x2, record=self.training)
            y2 = x2 + self.g(y1, record=self.training)
        return torch.cat([y1, y2], dim=self.dim)

    def backward_pass(self, y, dy):
        y1, y2 = y.chunk(2, dim=self.dim)
        dy1, dy2 = dy.chunk(2, dim=self.dim)
        with torch.enable_grad():  # no autocast here: the seeds' bug
            y1 = y1.detach().requires_grad_()
            gy1 = self.g(y1, replay=True)
            torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + y1.grad
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            fx2 = self.f(x2, replay=True)
            torch.autograd.backward(fx2, dx1)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + x2.grad
            return torch.cat([x1, x2.detach()], dim=self.dim), torch.cat([dx1, dx2], dim=self.dim)


class _SeedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks):
        for b in blocks:
            x = b(x)
        ctx.y, ctx.blocks = x.detach(), blocks
        return x

    @staticmethod
    def backward(ctx, dy):
        y = ctx.y
        for b in ctx.blocks[::-1]:
            y, dy = b.backward_pass(y, dy)
        return dy, None


class SeedReversibleSequence(nn.Module):
    """``cat([x, x])`` -> blocks -> mean of the halves, the seeds' way."""

    def __init__(self, pairs, dim=-1):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList([SeedBlock(f, g, dim) for f, g in pairs])

    def forward(self, x):
        x = torch.cat([x, x], dim=self.dim)
        out = _SeedFunction.apply(x, self.blocks)
        return torch.stack(out.chunk(2, dim=self.dim)).mean(dim=0)
