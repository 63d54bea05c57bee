"""Make an installed upstream ``gateloop_transformer`` run on this package's operator and layers."""
from __future__ import annotations

import functools
import importlib

__all__ = ["patch_gateloop_transformer"]

_UP_SIMPLE = "gateloop_transformer.simplified_gate_loop"


def _simple_operator(q, kv, a, cache=None, heinsen=False):
    """Upstream's simplified ``gate_loop_operator`` on ours (the heinsen form too: ours is the exact scan)."""
    from .operator import simple_gate_loop_operator

    return simple_gate_loop_operator(q, kv, a, cache)


# pickled by the name it replaces (a lambda did not pickle): a saved layer loads with or without the patch
_simple_operator.__module__, _simple_operator.__qualname__ = _UP_SIMPLE, "gate_loop_operator"


def _simple_layer_getstate(self) -> dict:
    """Upstream ``SimpleGateLoopLayer``'s state for pickle and deepcopy, its ``gate_loop_fn`` (upstream's operator,
    or a partial of it) re-pointed at the operator bound now: one stored before the patch is no longer the
    object under its name, which pickle refuses ("not the same object as ...gate_loop_operator")."""
    from torch import nn

    state = nn.Module.__getstate__(self)
    fn = state.get("gate_loop_fn")
    base = fn.func if isinstance(fn, functools.partial) else fn
    if (getattr(base, "__module__", None), getattr(base, "__qualname__", None)) == (_UP_SIMPLE, "gate_loop_operator"):
        op = importlib.import_module(_UP_SIMPLE).gate_loop_operator
        state["gate_loop_fn"] = functools.partial(op, *fn.args, **fn.keywords) if base is not fn else op
    return state


def patch_gateloop_transformer() -> None:
    """Patch the upstream package in place (like Liger-Kernel patches Hugging Face models).

    After the call, upstream's ``gate_loop_operator`` (both modules) is ours, and the ``forward``
    of its ``GateLoopedAttention`` and ``SimpleGateLoopLayer`` is ours too -- for models created
    before the call as well, since parameters and their names are the same. Its ``Transformer`` gains
    ``init_cache`` and ``generate`` (ours; its ``forward`` stays upstream's, without a cache): a gate-looped
    upstream model can generate (one with full attention raises TypeError). Patched models pickle
    (``torch.save(model)``) and load with or without the patch.
    Idempotent. Raises ``ImportError`` if ``gateloop_transformer`` is not installed.
    """
    from . import layers
    from .operator import gate_loop_operator

    up = importlib.import_module("gateloop_transformer.gateloop_transformer")
    up_simple = importlib.import_module(_UP_SIMPLE)
    up.gate_loop_operator = gate_loop_operator
    up.GateLoopedAttention.forward = layers.GateLoopedAttention.forward
    up.GateLoopedAttention.new_cache = layers.GateLoopedAttention.new_cache
    up.Transformer.init_cache = layers.Transformer.init_cache
    up.Transformer.generate = layers.Transformer.generate
    up_simple.gate_loop_operator = _simple_operator
    up_simple.SimpleGateLoopLayer.forward = layers.SimpleGateLoopLayer.forward
    up_simple.SimpleGateLoopLayer.__getstate__ = _simple_layer_getstate
