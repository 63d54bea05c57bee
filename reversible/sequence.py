"""Reversible (and the matching irreversible) sequences of ``(f, g)`` coupling blocks."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .core import INPUT_MODES, MERGES, Coupling, _check_stream_dtype, reverse_couplings, run_couplings
from .routing import Route, check_router, layer_drop, route_args

__all__ = ["ReversibleBlock", "IrreversibleBlock", "ReversibleSequence", "SequentialSequence", "Stream"]

Stream = Union[Tensor, Mapping[str, Tensor]]


def _as_module(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    if not callable(fn):
        raise TypeError(f"{name} must be callable (usually an nn.Module), got {type(fn).__name__}")
    return fn


class ReversibleBlock(nn.Module):
    """One additive-coupling block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

    ``f`` and ``g`` must keep the shape of the half they get. On a dict-valued stream they take
    and return dicts of halves (one per key). Calling the block runs it alone with reversible
    memory on ``x = [x1 | x2]`` split along ``dim``; inside a :class:`ReversibleSequence` the
    block only contributes its :meth:`couplings`.
    """

    reversible = True

    def __init__(self, f: Callable[..., Any], g: Callable[..., Any]) -> None:
        super().__init__()
        self.f = _as_module(f, "f")
        self.g = _as_module(g, "g")

    def couplings(self, f_args: Mapping[str, Any] | None = None, g_args: Mapping[str, Any] | None = None,
                  keys: Sequence[str] | None = None) -> list[Coupling]:
        """The block's two steps on halves ``(0, 1)`` (or, per key, ``(2i, 2i+1)``)."""
        if keys is None:
            first, second = (0,), (1,)
        else:
            keys = tuple(keys)
            first = tuple(2 * i for i in range(len(keys)))
            second = tuple(2 * i + 1 for i in range(len(keys)))
        return [Coupling(self.f, first, second, dict(f_args or {}), keys),
                Coupling(self.g, second, first, dict(g_args or {}), keys)]

    def forward(self, x: Stream, f_args: Mapping[str, Any] | None = None, g_args: Mapping[str, Any] | None = None,
                *, dim: int = -1) -> Stream:
        """``[x1 | x2] -> [y1 | y2]`` along ``dim`` (a dict of such tensors for a dict stream)."""
        keys = _keys(x)
        inputs = [x[k] for k in keys] if keys is not None else [x]
        outs = run_couplings(inputs, self.couplings(f_args, g_args, keys), dims=dim, merge="cat",
                             input_mode="split", reversible=self.reversible)
        return dict(zip(keys, outs)) if keys is not None else outs[0]

    def backward_pass(self, y: Stream, dy: Stream, f_args: Mapping[str, Any] | None = None,
                      g_args: Mapping[str, Any] | None = None, *, dim: int = -1) -> tuple[Stream, Stream]:
        """Reconstruct ``(x, dx)`` from ``(y, dy)``; parameter gradients go to ``.grad``."""
        keys = _keys(y)
        ys = [y[k] for k in keys] if keys is not None else [y]
        dys = [dy[k] for k in keys] if keys is not None else [dy]
        xs, dxs = reverse_couplings(ys, dys, self.couplings(f_args, g_args, keys), dims=dim)
        if keys is not None:
            return dict(zip(keys, xs)), dict(zip(keys, dxs))
        return xs[0], dxs[0]


class IrreversibleBlock(ReversibleBlock):
    """:class:`ReversibleBlock` computed with plain autograd (activations kept)."""

    reversible = False


def _keys(x: Any) -> tuple[str, ...] | None:
    if isinstance(x, Tensor):
        return None
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("a dict-valued stream needs at least one tensor")
        for k, v in x.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"dict stream value {k!r} must be a Tensor, got {type(v).__name__}")
        return tuple(x.keys())
    raise TypeError(f"a stream must be a Tensor or a dict of Tensors, got {type(x).__name__}")


def _as_block(b: Any, i: int, klass: type[ReversibleBlock]) -> ReversibleBlock:
    if isinstance(b, ReversibleBlock):
        return b
    try:
        pair = list(b)
    except TypeError:
        raise TypeError(f"block {i} must be a ReversibleBlock or an (f, g) pair, got {type(b).__name__}") from None
    if len(pair) != 2:
        raise ValueError(f"block {i} must be an (f, g) pair, got {len(pair)} functions")
    return klass(*pair)


class ReversibleSequence(nn.Module):
    """A stack of ``(f, g)`` coupling blocks whose activation memory does not grow with depth.

    Args:
        blocks: ``ReversibleBlock`` instances or ``(f, g)`` pairs.
        dim: the dim the stream is split on (1 for channels-first images, -1 for tokens...).
        merge: how the two output halves are combined: ``"mean"``, ``"sum"`` or ``"cat"``.
        args_route: ``{kwarg: [(to_f, to_g)] * depth}``: which layers' ``f`` / ``g`` get each
            keyword argument of :meth:`forward`.
        default_route: where keyword arguments not in ``args_route`` go, ``(to_f, to_g)`` for
            every layer; ``None`` drops them.
        layer_dropout: probability of skipping each block while training.
        stream_dtype: floating dtype of the activation/gradient buffers (``torch.float32`` keeps the
            reconstruction exact to fp32 rounding for bf16/fp16 inputs); TypeError for a non-dtype, ValueError
            for a non-floating one.
        preserve_rng_state: replay each call's RNG state in recomputation (dropout in f, g): the default
            generators' only, not a ``torch.Generator`` that f or g pass to random ops (see :func:`run_couplings`).
        input_mode: ``"duplicate"`` (``x`` goes to both halves) or ``"split"`` (``x`` is
            ``[x1 | x2]`` along ``dim``).

    Call with a tensor or a dict of tensors (each key a stream; ``f`` and ``g`` then take and
    return dicts) plus keyword arguments for ``f`` / ``g``.
    """

    reversible = True
    block_class: type[ReversibleBlock] = ReversibleBlock

    def __init__(self, blocks: Iterable[Any], *, dim: int = -1, merge: str = "mean",
                 args_route: Mapping[str, Sequence[Route]] | None = None,
                 default_route: Route | None = (True, True), layer_dropout: float = 0.0,
                 stream_dtype: torch.dtype | None = None, preserve_rng_state: bool = True,
                 input_mode: str = "duplicate") -> None:
        super().__init__()
        if isinstance(blocks, (Tensor, ReversibleBlock)) or not isinstance(blocks, Iterable):
            raise TypeError(f"blocks must be a list of ReversibleBlocks or (f, g) pairs, one per layer, got "
                            f"{type(blocks).__name__}")
        self.blocks = nn.ModuleList([_as_block(b, i, self.block_class) for i, b in enumerate(blocks)])
        if len(self.blocks) == 0:
            raise ValueError(f"{type(self).__name__} needs at least one block")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int (the split dim), got {type(dim).__name__}")
        if isinstance(layer_dropout, bool) or not isinstance(layer_dropout, (int, float)) \
                or not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be a number in [0, 1), got {layer_dropout!r}")
        _check_stream_dtype(stream_dtype)
        if default_route is not None and (not isinstance(default_route, (tuple, list)) or len(default_route) != 2):
            raise ValueError(f"default_route must be a (to_f, to_g) pair or None, got {default_route!r}")
        self.args_route = dict(args_route or {})
        check_router(self.args_route, len(self.blocks))
        self.dim = dim
        self.merge = merge
        self.default_route = None if default_route is None else tuple(default_route)
        self.layer_dropout = layer_dropout
        self.stream_dtype = stream_dtype
        self.preserve_rng_state = preserve_rng_state
        self.input_mode = input_mode

    def couplings(self, kwargs: Mapping[str, Any], keys: Sequence[str] | None = None, *,
                  default_route: Route | None | str = "module") -> list[Coupling]:
        """The steps of one call: routed kwargs, layer dropout applied (while training).

        ``default_route`` overrides the module's for this call (``"module"``: keep it)."""
        default = self.default_route if isinstance(default_route, str) else default_route
        check_router(self.args_route, len(self.blocks))  # per call: blocks or routes may have changed since __init__
        routed = route_args(self.args_route, kwargs, len(self.blocks), default=default)
        layers = list(zip(self.blocks, routed))
        if self.training and self.layer_dropout > 0:
            layers = layer_drop(layers, self.layer_dropout)
        return [c for block, (f_args, g_args) in layers for c in block.couplings(f_args, g_args, keys)]

    def forward(self, x: Stream, **kwargs: Any) -> Stream:
        """Run the stack on ``x`` (a tensor, or a dict of tensors); ``kwargs`` are routed to f / g."""
        return self._run(x, kwargs)

    def _run(self, x: Stream, kwargs: Mapping[str, Any], default_route: Route | None | str = "module") -> Stream:
        keys = _keys(x)
        inputs = [x[k] for k in keys] if keys is not None else [x]
        couplings = self.couplings(kwargs, keys, default_route=default_route)
        outs = run_couplings(inputs, couplings, dims=self.dim, merge=self.merge,
                             input_mode=self.input_mode, stream_dtype=self.stream_dtype,
                             preserve_rng_state=self.preserve_rng_state, reversible=self.reversible)
        return dict(zip(keys, outs)) if keys is not None else outs[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, merge={self.merge!r}, layer_dropout={self.layer_dropout}"


class SequentialSequence(ReversibleSequence):
    """The irreversible counterpart of :class:`ReversibleSequence`: the same coupling, same
    arguments, same outputs, computed with plain autograd (activations kept)."""

    reversible = False
    block_class = IrreversibleBlock
