"""Drop-in for ``se3_transformer_pytorch/reversible.py``: same names, constructors and signatures.

Streams are dicts of tensors (one per feature degree). ``ReversibleSequence(blocks)`` duplicates
every tensor on the last dim, gives the keyword arguments of ``forward(x, **kwargs)`` to the
attention (``f``) only, and returns a dict of the *means* of the two halves. Unlike the original,
the tensors of a dict need not share their leading dims (no concatenation across keys).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .. import sequence as _seq
from ..core import run_couplings
from ._common import Deterministic

__all__ = ["map_values", "dict_chunk", "dict_sum", "dict_subtract", "dict_cat", "dict_set_",
           "dict_backwards_", "dict_del_", "values", "Deterministic", "ReversibleBlock",
           "_ReversibleFunction", "SequentialSequence", "ReversibleSequence"]


# the original file's dict helpers, kept for code that imports them

def map_values(fn: Callable[[Any], Any], x: Mapping[Any, Any]) -> dict[Any, Any]:
    return {k: fn(v) for k, v in x.items()}


def dict_chunk(x: Mapping[Any, Tensor], chunks: int, dim: int) -> tuple[dict[Any, Tensor], dict[Any, Tensor]]:
    parts = {k: v.chunk(chunks, dim=dim) for k, v in x.items()}
    return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}


def dict_sum(x: Mapping[Any, Tensor], y: Mapping[Any, Tensor]) -> dict[Any, Tensor]:
    return {k: x[k] + y[k] for k in x}


def dict_subtract(x: Mapping[Any, Tensor], y: Mapping[Any, Tensor]) -> dict[Any, Tensor]:
    return {k: x[k] - y[k] for k in x}


def dict_cat(x: Mapping[Any, Tensor], y: Mapping[Any, Tensor], dim: int) -> dict[Any, Tensor]:
    return {k: torch.cat((v, y[k]), dim=dim) for k, v in x.items()}


def dict_set_(x: Mapping[Any, Tensor], key: str, value: Any) -> None:
    for v in x.values():
        setattr(v, key, value)


def dict_backwards_(outputs: Mapping[Any, Tensor], grad_tensors: Mapping[Any, Tensor]) -> None:
    for k, v in outputs.items():
        torch.autograd.backward(v, grad_tensors[k], retain_graph=True)


def dict_del_(x: dict[Any, Any]) -> None:
    x.clear()


def values(d: Mapping[Any, Any]) -> list[Any]:
    return list(d.values())


class ReversibleBlock(_seq.ReversibleBlock):
    """``ReversibleBlock(f, g)`` on dict streams; ``forward(x, **kwargs)`` (kwargs to ``f``)."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__(Deterministic(f), Deterministic(g))

    def forward(self, x: Mapping[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(x, kwargs, None, dim=-1)

    def backward_pass(self, y: Mapping[str, Tensor], dy: Mapping[str, Tensor],  # type: ignore[override]
                      **kwargs: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return super().backward_pass(y, dy, kwargs, None, dim=-1)


class _ReversibleFunction:
    """Shim for ``_ReversibleFunction.apply(x, blocks, kwargs)``: ``x`` is every key's
    ``[x1 | x2]`` concatenated on the last dim; ``kwargs`` holds ``input_keys`` and ``split_dims``."""

    @staticmethod
    def apply(x: Tensor, blocks: Iterable[ReversibleBlock], kwargs: Mapping[str, Any]) -> Tensor:
        kwargs = dict(kwargs)
        keys = tuple(kwargs.pop("input_keys"))
        split_dims = tuple(kwargs.pop("split_dims"))
        parts = x.split(split_dims, dim=-1)
        couplings = [c for b in blocks for c in b.couplings(kwargs, None, keys)]
        outs = run_couplings(list(parts), couplings, dims=-1, merge="cat", input_mode="split")
        return torch.cat(outs, dim=-1)


class SequentialSequence(nn.Module):
    """``SequentialSequence(blocks)``: ``x = attn(x, **kwargs)``, ``x = ff(x)`` per layer (the
    blocks carry their own residuals)."""

    def __init__(self, blocks: Any) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: Any, **kwargs: Any) -> Any:
        for (attn, ff) in self.blocks:
            x = attn(x, **kwargs)
            x = ff(x)
        return x


class ReversibleSequence(_seq.ReversibleSequence):
    """``ReversibleSequence(blocks)``; ``forward(x: dict, **kwargs) -> dict``."""

    def __init__(self, blocks: Iterable[Any]) -> None:
        super().__init__([ReversibleBlock(f, g) for (f, g) in blocks], dim=-1, merge="mean",
                         default_route=(True, False))

    def forward(self, x: Mapping[str, Tensor], **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        if not isinstance(x, Mapping):
            raise TypeError(f"se3_transformer ReversibleSequence takes a dict of tensors, got {type(x).__name__}")
        return self._run(x, kwargs)
