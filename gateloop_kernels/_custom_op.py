"""Op registration shared by the scan ops: a forward and a backward ``torch.library.custom_op`` (with their fake
implementations and the forward's autograd formula), the eager Function of the same implementations
(:func:`gateloop_kernels._eager.eager_function`), and the switch that picks one per call; :class:`PlainOp` the
same for a non-differentiable op (an index table, a check).

torch.compile, export and fake tensors see the registered ops (opcheck, fullgraph capture); eager calls run the
implementations through the Function, which skips the custom-op dispatch's host cost (``_eager.py`` says why).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._C import _functions
from torch._subclasses.fake_tensor import is_fake

from ._eager import eager_function


def traced(x: Tensor) -> bool:
    """Whether a call on ``x`` must go through the registered custom op (tracing or a fake tensor)."""
    return torch.compiler.is_compiling() or is_fake(x)


def _no_double_backward(name: str, grads: tuple) -> tuple:
    """``grads`` of a backward run with ``create_graph=True``: as they are where the implementation recorded a
    graph (the PyTorch paths), else (the kernels record none) each one behind a node that raises
    ``RuntimeError`` when differentiated: a gradient of the gradient then raises instead of coming out silently
    zero (``torch.autograd.function.once_differentiable``'s mechanism, which checks only the incoming gradients:
    ``grad(out.sum(), x, create_graph=True)`` passes none that need grad)."""
    if any(isinstance(g, Tensor) and g.requires_grad for g in grads):
        return grads
    err = _functions.DelayedError(f"{name}: double backward (create_graph=True, a gradient of the gradient) is not "
                                  f"supported on the Triton kernels' paths".encode(), len(grads))
    return err(*(g.detach().requires_grad_() if isinstance(g, Tensor) else g for g in grads))


def first_order(name: str) -> Callable:
    """``torch.autograd.function.once_differentiable`` for a Function's backward, with :func:`_no_double_backward`'s
    check: the backward runs without autograd, and under ``create_graph=True`` its gradients raise (naming ``name``)
    when differentiated, whether or not the incoming gradients need grad."""
    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            return _no_double_backward(name, out if isinstance(out, tuple) else (out,))
        return wrapper
    return wrap


class _Saved:
    """The ``ctx`` of a :meth:`DifferentiableOp.forward_saved` call: what setup_context stores, for the vjp."""
    eager = True

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool) -> None:
        pass  # the vjp takes None for an unused output either way


class DifferentiableOp:
    """A differentiable op registered once for tracing and once for eager calls.

    Args:
        names: the qualified names (``"namespace::name"``) of the forward op and of its backward op.
        eager_name: the eager autograd.Function's class name.
        forward, forward_fake: the forward's implementation (typed: the op schema is inferred from its
            annotations) and fake implementation.
        backward, backward_fake: the same for the backward op.
        setup_context: ``setup_context(ctx, inputs, output)`` as ``register_autograd`` takes it.
        vjp: ``vjp(ctx, backward, *grad_outputs)`` returning one gradient per forward input; ``backward`` is
            the backward op while traced and its implementation in eager calls.

    Calling the object runs the forward: the registered op when :func:`traced` holds for the first argument,
    else the eager Function. ``op`` and ``backward_op`` are the registered ops (``torch.library.opcheck``),
    ``eager`` the Function.
    """

    def __init__(self, names: tuple[str, str], eager_name: str, forward: Callable, forward_fake: Callable,
                 backward: Callable, backward_fake: Callable, setup_context: Callable, vjp: Callable) -> None:
        self.op = torch.library.custom_op(names[0], mutates_args=())(forward)
        self.op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(names[1], mutates_args=())(backward)
        self.backward_op.register_fake(backward_fake)

        def op_backward(ctx, *grads):
            eager = getattr(ctx, "eager", False)
            out = vjp(ctx, backward if eager else self.backward_op, *grads)
            if eager and torch.is_grad_enabled():  # create_graph=True
                return _no_double_backward(eager_name, tuple(out))
            return out

        self.op.register_autograd(op_backward, setup_context=setup_context)
        self.eager = eager_function(eager_name, forward, setup_context, op_backward)
        self._forward, self._setup_context, self._vjp, self._backward = forward, setup_context, vjp, backward

    def forward_saved(self, *args) -> tuple:
        """``(outputs, saved)``: the implementation run inside another autograd.Function's forward (no node of its
        own), with what its backward needs in ``saved`` for :meth:`vjp_saved`."""
        saved = _Saved()
        out = self._forward(*args)
        self._setup_context(saved, args, out)
        return out, saved

    def vjp_saved(self, saved: "_Saved", *grads, backward: Optional[Callable] = None) -> tuple:
        """The input gradients of a :meth:`forward_saved` call from its output gradients (``None``: zero);
        ``backward`` in place of the backward implementation (same arguments), e.g. one writing into given buffers."""
        return self._vjp(saved, backward or self._backward, *grads)

    def __call__(self, *args):
        return (self.op if traced(args[0]) else self.eager.apply)(*args)


class PlainOp:
    """A non-differentiable op registered for tracing and called directly in eager mode.

    ``PlainOp(name, impl, fake)(*args)`` runs the registered op ``name`` (``impl`` typed: the schema is inferred
    from its annotations; ``fake`` its fake implementation) when :func:`traced` holds for the first argument, else
    ``impl`` itself (no custom-op dispatch). ``op`` is the registered op (``torch.library.opcheck``).
    """

    def __init__(self, name: str, impl: Callable, fake: Callable) -> None:
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.op.register_fake(fake)
        self._impl = impl

    def __call__(self, *args):
        return (self.op if traced(args[0]) else self._impl)(*args)
