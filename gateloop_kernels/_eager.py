"""Eager calls of the scan custom ops without the custom-op dispatch.

``torch.library.custom_op`` puts a Python dispatch layer around every call and its backward (default filling,
redispatch, a dynamo guard): about 140 us of host time per forward+backward of the chunked op on a CI CPU,
as much as all of its launchers. Eager calls therefore run the ops' own implementation and backward formula
through a plain ``torch.autograd.Function``; torch.compile and export tracing, and fake tensors, keep the
registered ops (their fake implementations, opcheck, fullgraph capture).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def traced(x: Tensor) -> bool:
    """Whether a call on ``x`` must go through the registered custom op (tracing or a fake tensor)."""
    return torch.compiler.is_compiling() or is_fake(x)


def eager_function(name: str, forward: Callable, setup_context: Callable,
                   backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function from a custom op's implementation and its ``register_autograd`` pair.

    ``backward`` sees ``ctx.eager = True`` and should then call the backward op's implementation directly.
    """
    def fwd(ctx, *inputs):
        ctx.eager = True
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward)})
