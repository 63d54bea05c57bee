"""Eager calls of the scan custom ops without the custom-op dispatch.

``torch.library.custom_op`` puts a Python dispatch layer around every call and its backward (default filling,
redispatch, a dynamo guard): about 140 us of host time per forward+backward of the chunked op on a CI CPU,
as much as all of its launchers. Eager calls therefore run the ops' own implementation and backward formula
through a plain ``torch.autograd.Function``; torch.compile and export tracing, and fake tensors, keep the
registered ops (their fake implementations, opcheck, fullgraph capture).

Under ``torch.func`` transforms (grad, vjp, jacrev, vmap) the same implementation runs as a Function of the
``setup_context`` form with a ``vmap`` rule that folds the mapped dim into the batch dim (the ops treat batch
elements independently); plain calls keep the cheaper ``forward(ctx, ...)`` form (:func:`with_transforms`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _fold_vmap(fn: type[torch.autograd.Function]) -> Callable:
    """A vmap rule for an op whose tensor arguments and results of 2 dims or more all lead with the batch dim
    (1-dim ones -- saved workspaces, empty placeholders -- are not per batch element and pass as they are):
    the mapped dim joins the batch, ``(V, B, ...) -> (V B, ...)``, the op runs once, and its results are
    split back. Unmapped arguments of 2 dims or more are expanded to every mapped element; a folded argument
    is contiguous where the one given was."""
    def vmap(info, in_dims, *args):
        V = info.batch_size
        B = None
        folded = []
        for x, d in zip(args, in_dims):
            if isinstance(x, Tensor) and (d is not None or x.dim() >= 2):
                contiguous = x.is_contiguous()
                x = x.expand(V, *x.shape) if d is None else x.movedim(d, 0)
                B = x.shape[1] if B is None else B
                x = x.flatten(0, 1)  # a view where it can be: stride 0 along the batch for an expanded input
                if contiguous:  # the op may have been handed contiguous tensors for its kernels' sake
                    x = x.contiguous()
            folded.append(x)
        try:
            outs = fn.apply(*folded)
        except ValueError as err:
            # a packed batch's boundaries (a 1-D integer tensor) take no folded batch: its shape error names the
            # folded batch, not the user's, so say where it came from (other errors pass as they are)
            if not any(isinstance(x, Tensor) and x.dim() == 1 and not x.is_floating_point() and not x.is_complex()
                       for x in args):
                raise
            raise ValueError(f"{err} (under torch.func.vmap the mapped dim joins the batch dim, {V} x {B}; a packed "
                             "batch (cu_seqlens, batch 1) cannot take it on the Triton kernels' path)") from err
        single = isinstance(outs, Tensor)
        outs = (outs,) if single else tuple(outs)
        per_batch = [isinstance(o, Tensor) and o.dim() >= 2 for o in outs]
        split = tuple(o.unflatten(0, (V, B)) if p else o for o, p in zip(outs, per_batch))
        dims = tuple(0 if p else None for p in per_batch)
        return (split[0], dims[0]) if single else (split, dims)
    return vmap


class _SavedCtx:
    """A backward's ``ctx`` with the saved tensors given explicitly (unwrapped by torch.func); every other
    attribute is the original ctx's."""

    def __init__(self, ctx, saved: tuple) -> None:
        self._ctx, self.saved_tensors, self.eager = ctx, saved, True

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def eager_function(name: str, forward: Callable, setup_context: Callable,
                   backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function from a custom op's implementation and its ``register_autograd`` pair.

    ``backward`` sees ``ctx.eager = True`` and should then call the backward op's implementation directly.
    Under ``torch.func`` transforms, ``apply`` runs a second Function of the ``setup_context`` form (the form
    torch.func needs; PyTorch binds its arguments by signature on every call, ~40 us, so plain calls keep
    the ``forward(ctx, ...)`` form) with a vmap rule that folds the mapped dim into the batch
    (``_fold_vmap``: every tensor argument and result of 2 dims or more leads with the batch dim), and whose
    backward runs as a Function of its own, since its kernels must see plain tensors, not the transforms'
    wrappers; that backward cannot be differentiated again (double backward raises), and forward mode
    (jvp) raises NotImplementedError.
    """
    def fwd(ctx, *inputs):
        ctx.eager = True
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out

    def setup(ctx, inputs, output):
        ctx.eager = True
        setup_context(ctx, inputs, output)

    def bwd_forward(ctx, nsaved, *tensors):
        return tuple(backward(_SavedCtx(ctx, tensors[:nsaved]), *tensors[nsaved:]))

    def bwd_backward(ctx, *grads):
        raise RuntimeError(f"{name}: double backward (a gradient of the gradient, torch.func.hessian) is not "
                           "supported")

    def no_jvp(ctx, *tangents):
        raise NotImplementedError(f"{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported; "
                                  "reverse mode (grad, vjp, jacrev) and vmap are")

    bwd_fn = type(name + "Backward", (torch.autograd.Function,), {
        "forward": staticmethod(bwd_forward), "setup_context": staticmethod(lambda ctx, inputs, output: None),
        "backward": staticmethod(bwd_backward)})
    bwd_fn.vmap = staticmethod(_fold_vmap(bwd_fn))

    def transformed_bwd(ctx, *grads):
        if not torch._C._are_functorch_transforms_active():
            return backward(ctx, *grads)
        saved = ctx.saved_tensors  # torch.func wrappers: through bwd_fn, which unwraps them
        return bwd_fn.apply(ctx, len(saved), *saved, *grads)

    transformed = type(name + "Transformed", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(transformed_bwd), "jvp": staticmethod(no_jvp)})
    transformed.vmap = staticmethod(_fold_vmap(transformed))

    plain = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward)})
    return with_transforms(plain, transformed)


def with_transforms(plain: type[torch.autograd.Function],
                    transformed: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``plain`` (the ``forward(ctx, ...)`` form) with an ``apply`` that runs ``transformed`` (the same function
    in the ``setup_context`` form, with a vmap rule) under ``torch.func`` transforms."""
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return transformed.apply(*args)
        return torch.autograd.Function.apply.__func__(cls, *args)

    plain.apply = classmethod(apply)
    return plain
