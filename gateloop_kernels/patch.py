"""Make an installed upstream ``gateloop_transformer`` run on this package's operator and layers."""
from __future__ import annotations

import importlib

__all__ = ["patch_gateloop_transformer"]


def patch_gateloop_transformer() -> None:
    """Patch the upstream package in place (like Liger-Kernel patches Hugging Face models).

    After the call, upstream's ``gate_loop_operator`` (both modules) is ours, and the ``forward``
    of its ``GateLoopedAttention`` and ``SimpleGateLoopLayer`` is ours too -- for models created
    before the call as well, since parameters and their names are the same. Its ``Transformer`` gains
    ``init_cache`` and ``generate`` (ours; its ``forward`` stays upstream's, without a cache): a gate-looped
    upstream model can generate (one with full attention raises TypeError).
    Idempotent. Raises ``ImportError`` if ``gateloop_transformer`` is not installed.
    """
    from . import layers
    from .operator import gate_loop_operator, simple_gate_loop_operator

    up = importlib.import_module("gateloop_transformer.gateloop_transformer")
    up_simple = importlib.import_module("gateloop_transformer.simplified_gate_loop")
    up.gate_loop_operator = gate_loop_operator
    up.GateLoopedAttention.forward = layers.GateLoopedAttention.forward
    up.GateLoopedAttention.new_cache = layers.GateLoopedAttention.new_cache
    up.Transformer.init_cache = layers.Transformer.init_cache
    up.Transformer.generate = layers.Transformer.generate
    up_simple.gate_loop_operator = lambda q, kv, a, cache=None, heinsen=False: simple_gate_loop_operator(q, kv, a, cache)
    up_simple.SimpleGateLoopLayer.forward = layers.SimpleGateLoopLayer.forward
