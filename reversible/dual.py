"""Two-stream (video / audio) reversible sequences with three block types (NUWA's layout).

Each stream is split in halves along ``dim``: video ``x = [x1 | x2]`` (halves 0, 1), audio
``m = [m1 | m2]`` (halves 2, 3). The block types couple them as follows:

* ``intra_modality_self_attn`` (:class:`ReversibleSelfAttnBlock`)::

      y1 = x1 + f(x2);  y2 = x2 + g(y1);  n1 = m1 + j(m2);  n2 = m2 + k(n1)

* ``intra_modality_cross_attn`` (:class:`ReversibleCrossAttnBlock`): the same, with
  ``f(x2, context=, context_mask=, mask=video_mask)`` and ``j(m2, context=, context_mask=, mask=audio_mask)``.
* ``inter_modality_cross_attn`` (:class:`ReversibleCrossModalityAttnBlock`)::

      y1 = x1 + f(x2, m2, mask=video_mask, context_mask=audio_mask);  y2 = x2 + k(y1)
      n1 = m1 + j(m2, y2, mask=audio_mask, context_mask=video_mask);  n2 = m2 + g(n1)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .core import MERGES, Coupling, _check_stream_dtype, reverse_couplings, run_couplings

__all__ = ["ReversibleSelfAttnBlock", "ReversibleCrossAttnBlock", "ReversibleCrossModalityAttnBlock",
           "DualModalityReversibleSequence", "BLOCK_TYPES"]


class _DualBlock(nn.Module):
    def __init__(self, f: Callable[..., Any], g: Callable[..., Any], j: Callable[..., Any],
                 k: Callable[..., Any]) -> None:
        super().__init__()
        for name, fn in zip("fgjk", (f, g, j, k)):
            if not callable(fn):
                raise TypeError(f"{type(self).__name__}: {name} must be callable, got {type(fn).__name__}")
        self.f, self.g, self.j, self.k = f, g, j, k

    def couplings(self, **kwargs: Any) -> list[Coupling]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, m: Tensor, _reverse: bool = True, *, dim: int = -1,
                **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``([x1|x2], [m1|m2]) -> ([y1|y2], [n1|n2])`` along ``dim`` (with gradients; reversible
        memory when ``_reverse``)."""
        y, n = run_couplings([x, m], self.couplings(**kwargs), dims=dim, merge="cat", input_mode="split",
                             reversible=_reverse)
        return y, n

    def backward_pass(self, y: Tensor, n: Tensor, dy: Tensor, dn: Tensor, *, dim: int = -1,
                      **kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reconstruct ``(x, m, dx, dm)`` from outputs and their gradients; parameter gradients go to ``.grad``."""
        (x, m), (dx, dm) = reverse_couplings([y, n], [dy, dn], self.couplings(**kwargs), dims=dim)
        return x, m, dx, dm


class ReversibleSelfAttnBlock(_DualBlock):
    """Video and audio each get their own ``(f, g)`` / ``(j, k)`` coupling; no keyword arguments."""

    def couplings(self, **kwargs: Any) -> list[Coupling]:
        return [Coupling(self.f, (0,), (1,)), Coupling(self.g, (1,), (0,)),
                Coupling(self.j, (2,), (3,)), Coupling(self.k, (3,), (2,))]


class ReversibleCrossAttnBlock(_DualBlock):
    """Like the self-attention block; ``f`` and ``j`` also attend to an external ``context``."""

    def couplings(self, *, context: Tensor | None = None, context_mask: Tensor | None = None,
                  video_mask: Tensor | None = None, audio_mask: Tensor | None = None, **kwargs: Any) -> list[Coupling]:
        if context is None:
            raise ValueError("an intra_modality_cross_attn block needs `context`")
        fa = {"context": context, "context_mask": context_mask, "mask": video_mask}
        ja = {"context": context, "context_mask": context_mask, "mask": audio_mask}
        return [Coupling(self.f, (0,), (1,), fa), Coupling(self.g, (1,), (0,)),
                Coupling(self.j, (2,), (3,), ja), Coupling(self.k, (3,), (2,))]


class ReversibleCrossModalityAttnBlock(_DualBlock):
    """Video attends to audio (``f``), then audio to the updated video (``j``)."""

    def couplings(self, *, video_mask: Tensor | None = None, audio_mask: Tensor | None = None,
                  **kwargs: Any) -> list[Coupling]:
        return [Coupling(self.f, (0,), (1, 3), {"mask": video_mask, "context_mask": audio_mask}),
                Coupling(self.k, (1,), (0,)),
                Coupling(self.j, (2,), (3, 1), {"mask": audio_mask, "context_mask": video_mask}),
                Coupling(self.g, (3,), (2,))]


BLOCK_TYPES: dict[str, type[_DualBlock]] = {
    "intra_modality_self_attn": ReversibleSelfAttnBlock,
    "intra_modality_cross_attn": ReversibleCrossAttnBlock,
    "inter_modality_cross_attn": ReversibleCrossModalityAttnBlock,
}


class DualModalityReversibleSequence(nn.Module):
    """A video/audio reversible stack of the three block types above.

    Args:
        input_blocks: per layer, the ``(f, g, j, k)`` functions.
        block_types: per layer, one of ``BLOCK_TYPES``' keys.
        dim: the split dim of both streams (the seed uses the feature dim, -1).
        merge: ``"mean"`` (the seed), ``"sum"`` or ``"cat"``.
        stream_dtype, preserve_rng_state: as in :class:`reversible.ReversibleSequence`.
    """

    block_types_map = BLOCK_TYPES

    def __init__(self, input_blocks: Iterable[Sequence[Callable[..., Any]]], block_types: Sequence[str], *,
                 dim: int = -1, merge: str = "mean", stream_dtype: torch.dtype | None = None,
                 preserve_rng_state: bool = True) -> None:
        super().__init__()
        if isinstance(input_blocks, (Tensor, _DualBlock)) or not isinstance(input_blocks, Iterable):
            raise TypeError(f"input_blocks must be a list of (f, g, j, k) per layer, got {type(input_blocks).__name__}")
        if isinstance(block_types, str) or not isinstance(block_types, Iterable):
            raise TypeError(f"block_types must be a list of layer type names, one per layer (e.g. "
                            f"['intra_modality_self_attn']), got {type(block_types).__name__}")
        input_blocks, block_types = list(input_blocks), list(block_types)
        if len(input_blocks) != len(block_types):
            raise ValueError(f"got {len(input_blocks)} blocks but {len(block_types)} block types")
        if not input_blocks:
            raise ValueError("DualModalityReversibleSequence needs at least one block")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        _check_stream_dtype(stream_dtype)
        self.block_types = block_types
        blocks = nn.ModuleList([])
        for i, (fns, kind) in enumerate(zip(input_blocks, block_types)):
            if kind not in self.block_types_map:
                raise ValueError(f"unknown layer type {kind!r} for block {i}; expected one of {list(self.block_types_map)}")
            if isinstance(fns, _DualBlock):
                blocks.append(fns)
                continue
            fns = list(fns)
            if len(fns) != 4:
                raise ValueError(f"block {i} needs four functions (f, g, j, k), got {len(fns)}")
            blocks.append(self.block_types_map[kind](*fns))
        self.blocks = blocks
        self.dim = dim
        self.merge = merge
        self.stream_dtype = stream_dtype
        self.preserve_rng_state = preserve_rng_state

    def forward(self, video: Tensor, audio: Tensor, *, context: Tensor | None = None,
                context_mask: Tensor | None = None, video_mask: Tensor | None = None,
                audio_mask: Tensor | None = None, reverse: bool = True) -> list[Tensor]:
        """Returns ``[video, audio]``; ``reverse=False`` runs with plain autograd."""
        kwargs = {"context": context, "context_mask": context_mask, "video_mask": video_mask,
                  "audio_mask": audio_mask}
        couplings = [c for block in self.blocks for c in block.couplings(**kwargs)]
        return run_couplings([video, audio], couplings, dims=self.dim, merge=self.merge,
                             stream_dtype=self.stream_dtype, preserve_rng_state=self.preserve_rng_state,
                             reversible=reverse)
