"""A faithful port of the seeds' reversible stack (h-transformer-1d's ``reversible.py``, seed 001), bugs
included: the baseline of the bug tests and of the reversible benchmark (``bench/peers.py`` loads this file).
Not used by the library. Its behaviour is kept as the seed has it:

* the RNG state is recorded on the module (``Deterministic``), not per call;
* the recomputation in backward runs in whatever autocast state the autograd engine has
  (none), so under ``torch.autocast`` the forward runs in bf16 and the recomputation in fp32;
* every block's backward allocates new tensors (``y2 - gy1``, ``dy1 + y1.grad``) and two
  ``torch.cat`` of the full width;
* parameter gradients are accumulated inside the Function's backward.

Split dim: the last one by default (the seed's ``dim=2`` for ``(batch, seq, features)`` inputs). The
output merges the two halves by averaging them by default (``merge="mean"``: axial-attention's, what the
bug tests' oracle uses); the benchmark sums them (``merge="sum"``: h-transformer-1d's ``ReversibleSequence``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import Function

from reversible.compat._common import Deterministic as _Deterministic  # the seeds' RNG wrapper, as they have it

__all__ = ["SeedReversibleSequence", "seed_reconstruction_error"]


class _SeedBlock(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module, dim: int = -1):
        super().__init__()
        self.f = _Deterministic(f)
        self.g = _Deterministic(g)
        self.dim = dim

    def forward(self, x):
        x1, x2 = torch.chunk(x, 2, dim=self.dim)
        with torch.no_grad():
            y1 = x1 + self.f(x2, record_rng=self.training)
            y2 = x2 + self.g(y1, record_rng=self.training)
        return torch.cat([y1, y2], dim=self.dim)

    def backward_pass(self, y, dy):
        y1, y2 = torch.chunk(y, 2, dim=self.dim)
        del y
        dy1, dy2 = torch.chunk(dy, 2, dim=self.dim)
        del dy

        with torch.enable_grad():
            y1.requires_grad = True
            gy1 = self.g(y1, set_rng=True)
            torch.autograd.backward(gy1, dy2)

        with torch.no_grad():
            x2 = y2 - gy1
            del y2, gy1
            dx1 = dy1 + y1.grad
            del dy1
            y1.grad = None

        with torch.enable_grad():
            x2.requires_grad = True
            fx2 = self.f(x2, set_rng=True)
            torch.autograd.backward(fx2, dx1, retain_graph=True)

        with torch.no_grad():
            x1 = y1 - fx2
            del y1, fx2
            dx2 = dy2 + x2.grad
            del dy2
            x2.grad = None
            x = torch.cat([x1, x2.detach()], dim=self.dim)
            dx = torch.cat([dx1, dx2], dim=self.dim)
        return x, dx


class _SeedFunction(Function):
    @staticmethod
    def forward(ctx, x, blocks):
        for block in blocks:
            x = block(x)
        ctx.y = x.detach()
        ctx.blocks = blocks
        return x

    @staticmethod
    def backward(ctx, dy):
        y = ctx.y
        for block in ctx.blocks[::-1]:
            y, dy = block.backward_pass(y, dy)
        return dy, None


class SeedReversibleSequence(nn.Module):
    """``blocks``: a list of ``(f, g)`` module pairs. ``forward(x)``: ``cat([x, x], dim)`` -> blocks ->
    the two halves averaged (``merge="mean"``) or summed (``"sum"``)."""

    def __init__(self, blocks, dim: int = -1, merge: str = "mean"):
        super().__init__()
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        self.dim, self.merge = dim, merge
        self.blocks = nn.ModuleList([_SeedBlock(f, g, dim) for f, g in blocks])

    def forward(self, x):
        x = torch.cat([x, x], dim=self.dim)
        out = _SeedFunction.apply(x, self.blocks)
        halves = torch.stack(out.chunk(2, dim=self.dim))
        return halves.sum(dim=0) if self.merge == "sum" else halves.mean(dim=0)


@torch.no_grad()
def seed_reconstruction_error(model: SeedReversibleSequence, x: torch.Tensor, autocast_dtype=None) -> float:
    """What the seed's backward reconstructs: forward under ``autocast_dtype`` (if any), the inverse
    outside autocast (as its backward runs). Largest abs error relative to ``max |x|``."""
    x = torch.cat([x, x], dim=-1)
    ref = x.double()
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(
        x.device.type, enabled=False)
    with ctx:
        y = x
        for blk in model.blocks:
            y = blk(y)
    for blk in reversed(model.blocks):
        y1, y2 = torch.chunk(y, 2, dim=-1)
        x2 = y2 - blk.g(y1, set_rng=True)
        x1 = y1 - blk.f(x2, set_rng=True)
        y = torch.cat([x1, x2], dim=-1)
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
