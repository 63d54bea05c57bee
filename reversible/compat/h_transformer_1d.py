"""Drop-in for ``h_transformer_1d/reversible.py``: same names, constructors and call signatures.

``ReversibleSequence(blocks, args_route={}, layer_dropout=0.)`` duplicates ``x`` on the last dim,
routes keyword arguments per layer with ``args_route`` (unrouted ones are dropped, as in the
original), drops layers while training, and returns the *sum* of the two halves.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import sequence as _seq
from ..routing import layer_drop, route_args
from ._common import CompatBlock, CompatFunction, Deterministic, ResidualSequentialSequence

__all__ = ["route_args", "layer_drop", "Deterministic", "ReversibleBlock", "_ReversibleFunction",
           "SequentialSequence", "ReversibleSequence"]


class ReversibleBlock(CompatBlock):
    """``forward(x, f_args={}, g_args={})`` on ``x = [x1 | x2]`` split along dim 2."""

    split_dim = 2


class _ReversibleFunction(CompatFunction):
    split_dim = 2


class SequentialSequence(ResidualSequentialSequence):
    """``SequentialSequence(layers, args_route={}, layer_dropout=0.)``: plain residual layers."""


class ReversibleSequence(_seq.ReversibleSequence):
    """``ReversibleSequence(blocks, args_route={}, layer_dropout=0.)``; ``forward(x, **kwargs)``."""

    def __init__(self, blocks: Iterable[Any], args_route: Mapping[str, Any] | None = None,
                 layer_dropout: float = 0.0) -> None:
        super().__init__([ReversibleBlock(f=f, g=g) for f, g in blocks], dim=-1, merge="sum",
                         args_route=args_route, default_route=None, layer_dropout=layer_dropout)
