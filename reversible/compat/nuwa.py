"""Drop-in for ``nuwa_pytorch/reversible_video_audio.py`` (and ``nuwa_pytorch/reversible.py``).

``DualModalityReversibleSequence(input_blocks, block_types)`` with
``forward(video, audio, *, context, context_mask=None, video_mask=None, audio_mask=None,
reverse=True)`` returns ``[video, audio]``, each the mean of its two halves (split on the last
dim). The three block types are the core's, with ``f, g, j, k`` wrapped in ``Deterministic`` so
state-dict keys match. From ``nuwa_pytorch/reversible.py``: ``route_args``, ``ReversibleBlock``,
``SequentialSequence(layers, args_route={})`` and ``ReversibleSequence(blocks, args_route={})``
(sum of the halves).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import dual as _dual
from .. import sequence as _seq
from ..core import run_couplings
from ..routing import route_args
from ._common import CompatBlock, CompatFunction, Deterministic, ResidualSequentialSequence

__all__ = ["exists", "null_context", "split_at_index", "Deterministic", "ReversibleSelfAttnBlock",
           "ReversibleCrossAttnBlock", "ReversibleCrossModalityAttnBlock", "ReversibleFunction",
           "reversible_apply", "irreversible_apply", "DualModalityReversibleSequence",
           "route_args", "ReversibleBlock", "_ReversibleFunction", "SequentialSequence", "ReversibleSequence"]


def exists(val: Any) -> bool:
    return val is not None


@contextmanager
def null_context() -> Iterator[None]:
    yield


def split_at_index(dim: int, index: int, t: Tensor) -> tuple[Tensor, Tensor]:
    """``t[..., :index]`` and ``t[..., index:]`` on ``dim`` (counted from the front, as the seed's slices are):
    Python slicing, so an index past the end or negative behaves as the seed's."""
    pre = (slice(None),) * dim
    return t[(*pre, slice(None, index))], t[(*pre, slice(index, None))]


class _Wrapped:
    """Mixin: wrap f, g, j, k in Deterministic; the seed's call signatures (split on dim 2)."""

    def __init__(self, f: nn.Module, g: nn.Module, j: nn.Module, k: nn.Module) -> None:
        super().__init__(Deterministic(f), Deterministic(g), Deterministic(j), Deterministic(k))  # type: ignore[call-arg]

    def forward(self, x: Tensor, m: Tensor, _reverse: bool = True, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return super().forward(x, m, _reverse, dim=2, **kwargs)  # type: ignore[misc]

    def backward_pass(self, y: Tensor, n: Tensor, dy: Tensor, dn: Tensor, **kwargs: Any):
        return super().backward_pass(y, n, dy, dn, dim=2, **kwargs)  # type: ignore[misc]


class ReversibleSelfAttnBlock(_Wrapped, _dual.ReversibleSelfAttnBlock):
    pass


class ReversibleCrossAttnBlock(_Wrapped, _dual.ReversibleCrossAttnBlock):
    pass


class ReversibleCrossModalityAttnBlock(_Wrapped, _dual.ReversibleCrossModalityAttnBlock):
    pass


def _apply(inp: Tensor, ind: int, blocks: Iterable[Any], kwargs: Mapping[str, Any], reversible: bool) -> Tensor:
    x, m = split_at_index(1, ind, inp)
    couplings = [c for b in blocks for c in b.couplings(**kwargs)]
    y, n = run_couplings([x, m], couplings, dims=2, merge="cat", input_mode="split", reversible=reversible)
    return torch.cat((y, n), dim=1)


class ReversibleFunction:
    """Shim for ``ReversibleFunction.apply(inp, ind, blocks, kwargs)``: ``inp`` is video and audio
    (each ``[x1 | x2]`` on dim 2) concatenated on dim 1 at ``ind``."""

    @staticmethod
    def apply(inp: Tensor, ind: int, blocks: Iterable[Any], kwargs: Mapping[str, Any]) -> Tensor:
        return _apply(inp, ind, blocks, kwargs, True)


reversible_apply = ReversibleFunction.apply


def irreversible_apply(inputs: Tensor, ind: int, blocks: Iterable[Any], kwargs: Mapping[str, Any]) -> Tensor:
    return _apply(inputs, ind, blocks, kwargs, False)


class DualModalityReversibleSequence(_dual.DualModalityReversibleSequence):
    """``DualModalityReversibleSequence(input_blocks, block_types)``."""

    block_types_map = {
        "intra_modality_self_attn": ReversibleSelfAttnBlock,
        "intra_modality_cross_attn": ReversibleCrossAttnBlock,
        "inter_modality_cross_attn": ReversibleCrossModalityAttnBlock,
    }

    def __init__(self, input_blocks: Iterable[Sequence[nn.Module]], block_types: Sequence[str]) -> None:
        super().__init__(input_blocks, block_types, dim=-1, merge="mean")


# ---- nuwa_pytorch/reversible.py

class ReversibleBlock(CompatBlock):
    """``forward(x, f_args={}, g_args={})`` on ``x = [x1 | x2]`` split along dim 2."""

    split_dim = 2


class _ReversibleFunction(CompatFunction):
    split_dim = 2


class SequentialSequence(ResidualSequentialSequence):
    """``SequentialSequence(layers, args_route={})``: plain residual layers."""

    def __init__(self, layers: Any, args_route: Mapping[str, Any] | None = None) -> None:
        super().__init__(layers, args_route)


class ReversibleSequence(_seq.ReversibleSequence):
    """``ReversibleSequence(blocks, args_route={})``; ``forward(x, **kwargs)``; sum of the halves."""

    def __init__(self, blocks: Iterable[Any], args_route: Mapping[str, Any] | None = None) -> None:
        super().__init__([ReversibleBlock(f=f, g=g) for f, g in blocks], dim=-1, merge="sum",
                         args_route=args_route, default_route=None)
