"""Measuring how exactly a reversible stack reconstructs its input (low precision drifts)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .core import _check_streams, _rng_replay, _rng_state, _Run, _split_dims, _Stream
from . import _inplace

__all__ = ["reconstruction_error"]


@torch.no_grad()
def reconstruction_error(model: torch.nn.Module, x: Tensor | Mapping[str, Tensor] | tuple[Tensor, Tensor], *,
                         stream_dtype: torch.dtype | None = None, **kwargs: Any) -> float:
    """Run ``model``'s couplings forward on ``x`` and back again, as its backward pass does;
    return the largest absolute error of the reconstructed input (in the buffer's dtype,
    relative to ``max |x|``).

    ``model`` is a :class:`reversible.ReversibleSequence` (or anything with
    ``couplings(kwargs, keys)``, ``dim`` and ``input_mode``; a compat sequence too) or a
    :class:`reversible.DualModalityReversibleSequence` (then ``x = (video, audio)``);
    ``stream_dtype`` overrides the model's buffer dtype (e.g. ``torch.float32`` for a bf16
    model). Dropout is replayed; ``kwargs`` are the model's call keyword arguments. Empty inputs
    give 0.0; a NaN in the input gives NaN. It runs the model as a call does: in train mode BatchNorm's
    running statistics are updated (twice) and the global RNG advances; use ``model.eval()`` or save them first.

    Raises ``TypeError`` for a ``model`` without couplings (a plain module) or an ``x`` of the wrong form, and the
    model's own call's ``TypeError`` / ``ValueError`` for its streams (not floating, an odd split dim in split mode).
    """
    from .dual import DualModalityReversibleSequence

    if isinstance(model, DualModalityReversibleSequence):
        if isinstance(x, (Tensor, Mapping)) or len(x) != 2:
            raise TypeError("for a DualModalityReversibleSequence pass x=(video, audio)")
        inputs = _check_streams("x", "stream input", x)
        couplings = [c for block in model.blocks for c in block.couplings(**kwargs)]
    else:
        if not (callable(getattr(model, "couplings", None)) and hasattr(model, "dim")):
            raise TypeError(f"model must be a reversible.ReversibleSequence (or have couplings(kwargs, keys) and "
                            f"dim), got {type(model).__name__}")
        if not isinstance(x, (Tensor, Mapping)):
            raise TypeError(f"x must be the model's input, a Tensor (or a dict of them for a dict stream), got "
                            f"{type(x).__name__}")
        keys = tuple(x.keys()) if isinstance(x, Mapping) else None
        inputs = _check_streams("x", "stream input", [x[k] for k in keys] if keys is not None else [x])
        couplings = model.couplings(kwargs, keys)
    sd = stream_dtype or getattr(model, "stream_dtype", None)
    input_mode = getattr(model, "input_mode", "duplicate")
    # the checks of the model's own call: an odd split dim would otherwise measure a truncated input
    dims = _split_dims(inputs, model.dim, "stream input", input_mode == "split")
    streams = [_Stream(d, t.dtype, sd or t.dtype) for t, d in zip(inputs, dims)]
    run = _Run(couplings, streams, "cat", input_mode, True)
    bufs = [run.make_buffer(i, t) for i, t in enumerate(inputs)]
    ref = [b.to(torch.float64, copy=True) for b in bufs]  # a copy: .double() of a float64 buffer is the buffer itself
    halves = run.halves(bufs)
    states = []
    for ci, c in enumerate(couplings):
        states.append(_rng_state([halves[s] for s in c.sources]))
        run.step_forward(ci, halves, inplace=True)
    for ci in reversed(range(len(couplings))):
        c = couplings[ci]
        with _rng_replay(states[ci]):
            outs = c.call([run.to_compute(s, halves[s]) for s in c.sources], c.kwargs)
        for t, o in zip(c.targets, outs):
            _inplace.coupling_add_(halves[t], torch.neg(o))
    # empty streams (a batch of 0) have nothing to reconstruct
    err = max(((b.double() - r).abs().max().item() for b, r in zip(bufs, ref) if r.numel()), default=0.0)
    scale = max((r.abs().max().item() for r in ref if r.numel()), default=0.0) or 1.0
    return err / scale
