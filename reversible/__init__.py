"""Reversible (RevNet additive-coupling) containers for PyTorch with flat activation memory in depth.

Quick start::

    import torch, reversible
    blocks = [(Attention(dim), FeedForward(dim)) for _ in range(depth)]   # any (f, g) modules
    net = reversible.ReversibleSequence(blocks, dim=-1, merge="mean")
    y = net(x, mask=mask)            # kwargs go to every f and g unless args_route says otherwise

Everything runs on one coupling core (:mod:`reversible.core`): ``y1 = x1 + f(x2)``,
``y2 = x2 + g(y1)``, inverted block by block in place during backward. Drop-in replacements for
lucidrains' per-project ``reversible.py`` files live in :mod:`reversible.compat`.
:func:`extension_info` says whether the fused C++/CUDA in-place steps are live.
"""
from .core import INPUT_MODES, MERGES, Coupling, reverse_couplings, run_couplings
from .diagnostics import reconstruction_error
from ._extension import extension_info
from .dual import (BLOCK_TYPES, DualModalityReversibleSequence, ReversibleCrossAttnBlock,
                   ReversibleCrossModalityAttnBlock, ReversibleSelfAttnBlock)
from .routing import layer_drop, route_args
from .sequence import IrreversibleBlock, ReversibleBlock, ReversibleSequence, SequentialSequence

__all__ = [
    "Coupling", "run_couplings", "reverse_couplings", "MERGES", "INPUT_MODES",
    "ReversibleBlock", "IrreversibleBlock", "ReversibleSequence", "SequentialSequence",
    "DualModalityReversibleSequence", "ReversibleSelfAttnBlock", "ReversibleCrossAttnBlock",
    "ReversibleCrossModalityAttnBlock", "BLOCK_TYPES",
    "route_args", "layer_drop", "reconstruction_error", "extension_info",
]
