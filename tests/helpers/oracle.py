"""Comparison against a float64 oracle that also holds where values are NaN or Inf.

``value_and_grads`` runs a function and autograd with fixed finite cotangents; ``assert_matches``
checks one result against the oracle's: wherever the oracle's entry is finite, ours is finite and
within ``tol`` times the largest finite oracle magnitude of that tensor (plus the smallest normal number
of our dtype: values below it are not representable exactly); wherever the oracle's entry is NaN or Inf,
ours is not finite either (a non-finite value is never hidden).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def cotangents(outs: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """One finite float64 cotangent per output (complex outputs: over their real view), its values
    representable in the output's dtype: the gradient of a bfloat16 output reaches the function as
    bfloat16, and its rounding, summed over a gate's d x e terms, is no error of the function's."""
    return [torch.randn(real_view(o).shape, dtype=torch.float64, generator=generator).to(real_view(o).dtype)
            .to(torch.float64) for o in outs]


def value_and_grads(fn: Callable, inputs: Sequence[Optional[Tensor]], cots: Optional[Sequence[Tensor]] = None,
                    check_grad_fn: bool = False, generator: Optional[torch.Generator] = None):
    """``(outs, grads, cots)``: ``fn(*inputs)`` as a tuple, the gradients of ``sum(out * cot)`` with respect
    to the inputs (``None`` stays ``None``; an unused input gets zeros), and the cotangents used (drawn from
    ``generator`` when not given). ``check_grad_fn``: the first output must be differentiable (even when
    empty: a user calls backward)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if check_grad_fn:
        assert outs[0].requires_grad, f"the output {tuple(outs[0].shape)} has no grad_fn"
    if cots is None:
        cots = cotangents(outs, generator)
    loss = sum((real_view(o).double() * c.to(o.device)).sum() for o, c in zip(outs, cots) if o.requires_grad)
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(loss, present, allow_unused=True) if torch.is_tensor(loss) else
               [None] * len(present))
    grads = []
    for t in leaves:
        if t is None:
            grads.append(None)
        else:
            g = next(got)
            grads.append(torch.zeros_like(t) if g is None else g)
    return [o.detach() for o in outs], grads, cots


def row_scales(oracle: Callable, inputs: Sequence[Optional[Tensor]], cots: Sequence[Tensor]) -> list[float]:
    """Per input of ``oracle``, the sum over batch rows (dim 0 of every output) of the largest finite |gradient|
    that row's cotangent alone gives it: the scale of a gradient summed over rows, as a stride-0 (expanded)
    input's is, whose rows each bring their own rounding while their values may cancel."""
    total, B = [0.0] * len(inputs), cots[0].shape[0]
    for b in range(B):
        row = [c * (torch.arange(B) == b).view(-1, *[1] * (c.ndim - 1)) if c.ndim and c.shape[0] == B
               else torch.zeros_like(c) for c in cots]
        _, grads, _ = value_and_grads(oracle, inputs, row)
        for i, g in enumerate(grads):
            if g is not None:
                fin = real_view(g).detach()
                fin = fin[torch.isfinite(fin)]
                total[i] += fin.abs().max().item() if fin.numel() else 0.0
    return total


def assert_matches(ours: Tensor, ref: Tensor, tol: float, name: str, scale: Optional[float] = None) -> None:
    """``ours`` within ``tol`` of the oracle ``ref`` relative to max|ref| (or ``scale`` where larger), finite
    exactly where the oracle is."""
    x, y = real_view(ours).detach().double().cpu(), real_view(ref).detach().double().cpu()
    assert x.shape == y.shape, f"{name}: shape {tuple(x.shape)} != oracle {tuple(y.shape)}"
    fin = torch.isfinite(y)
    leaked = fin & ~torch.isfinite(x)
    assert not leaked.any(), (f"{name}: non-finite where the oracle is finite, at "
                              f"{leaked.nonzero()[:8].tolist()} ({int(leaked.sum())} entries)")
    hidden = ~fin & torch.isfinite(x)
    assert not hidden.any(), (f"{name}: finite where the oracle is not, at {hidden.nonzero()[:8].tolist()} "
                              f"({int(hidden.sum())} entries)")
    if fin.any():
        scale = max(y[fin].abs().max().item(), scale or 0.0)
        err = (x[fin] - y[fin]).abs().max().item()
        floor = torch.finfo(real_view(ours).dtype).tiny
        assert err <= tol * scale + floor, f"{name}: max error {err:.3g} > {tol:g} x max|oracle| {scale:.3g}"
