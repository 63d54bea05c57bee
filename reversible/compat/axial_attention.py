"""Drop-in for ``axial_attention/reversible.py``: same names, constructors and call signatures.

``ReversibleSequence(blocks)`` duplicates ``x`` on dim 1 (channels), gives the keyword arguments
of ``forward(x, arg_route=(True, True), **kwargs)`` to every ``f`` / ``g`` as ``arg_route`` says,
and returns the *mean* of the two halves. ``IrreversibleBlock(f, g)`` is the same coupling with
plain autograd.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from torch import Tensor

from .. import sequence as _seq
from ._common import CompatBlock, CompatFunction, Deterministic

__all__ = ["Deterministic", "ReversibleBlock", "IrreversibleBlock", "_ReversibleFunction", "ReversibleSequence"]


class ReversibleBlock(CompatBlock):
    """``forward(x, f_args={}, g_args={})`` on ``x = [x1 | x2]`` split along dim 1."""

    split_dim = 1


class IrreversibleBlock(_seq.IrreversibleBlock):
    """``IrreversibleBlock(f, g)``; ``forward(x, f_args, g_args)`` on ``[x1 | x2]`` along dim 1."""

    def forward(self, x: Tensor, f_args: Mapping[str, Any], g_args: Mapping[str, Any]) -> Tensor:  # type: ignore[override]
        return super().forward(x, f_args, g_args, dim=1)


class _ReversibleFunction(CompatFunction):
    split_dim = 1


class ReversibleSequence(_seq.ReversibleSequence):
    """``ReversibleSequence(blocks)``; ``forward(x, arg_route=(True, True), **kwargs)``."""

    def __init__(self, blocks: Iterable[Any]) -> None:
        super().__init__([ReversibleBlock(f, g) for (f, g) in blocks], dim=1, merge="mean")

    def forward(self, x: Tensor, arg_route: Sequence[bool] = (True, True), **kwargs: Any) -> Tensor:  # type: ignore[override]
        return self._run(x, kwargs, default_route=tuple(arg_route))

    def couplings(self, kwargs: Mapping[str, Any], keys: Sequence[str] | None = None, *,
                  default_route: Any = "module") -> list:
        """The core's, taking the call's ``arg_route`` from ``kwargs`` too (as :func:`reversible.reconstruction_error`
        passes the call's keyword arguments)."""
        kwargs = dict(kwargs)
        route = kwargs.pop("arg_route", None)
        if route is not None and isinstance(default_route, str):
            default_route = tuple(route)
        return super().couplings(kwargs, keys, default_route=default_route)
