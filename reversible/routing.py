"""Per-layer keyword-argument routing and layer dropout (the seeds' ``route_args`` / ``layer_drop``)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

import torch

__all__ = ["route_args", "layer_drop", "check_router"]

T = TypeVar("T")
Route = Sequence[bool]


def check_router(router: Mapping[str, Sequence[Route]], depth: int) -> None:
    """Raise ``ValueError`` unless every route list has ``depth`` entries of two booleans."""
    if not isinstance(router, Mapping):
        raise TypeError(f"args_route must be a mapping of keyword -> per-layer (f, g) routes, got {type(router).__name__}")
    for key, routes in router.items():
        try:
            routes = list(routes)
        except TypeError:
            raise TypeError(f"args_route[{key!r}] must be a sequence of per-layer (route_to_f, route_to_g) pairs, got "
                            f"{type(routes).__name__}") from None
        if len(routes) != depth:
            raise ValueError(f"args_route[{key!r}] has {len(routes)} entries but there are {depth} layers; "
                             "each argument route map must have the same depth as the number of layers")
        for r in routes:
            try:
                pair = len(tuple(r)) == 2
            except TypeError:  # a bool or None where a pair belongs
                pair = False
            if not pair:
                raise ValueError(f"args_route[{key!r}] entries must be (route_to_f, route_to_g) pairs, got {r!r}")


def route_args(router: Mapping[str, Sequence[Route]], args: Mapping[str, Any], depth: int,
               default: Route | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Split keyword arguments into per-layer ``(f_kwargs, g_kwargs)`` pairs.

    ``router[key][i] = (to_f, to_g)`` says whether ``key`` goes to layer ``i``'s ``f`` and/or
    ``g``. Keys not in ``router`` go to every layer as ``default`` says (``None``: dropped, as
    the seeds do).
    """
    routed: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {}) for _ in range(depth)]
    for key, val in args.items():
        if key in router:
            routes = list(router[key])
        elif default is not None:
            routes = [default] * depth
        else:
            continue
        for (f_args, g_args), (to_f, to_g) in zip(routed, routes):
            if to_f:
                f_args[key] = val
            if to_g:
                g_args[key] = val
    return routed


def layer_drop(layers: Sequence[T], prob: float) -> list[T]:
    """Drop each layer with probability ``prob`` (one uniform draw per layer from the global
    CPU generator, as the seeds do); at least the first layer is always kept."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"layer dropout probability must be in [0, 1), got {prob}")
    layers = list(layers)
    to_drop = torch.empty(len(layers)).uniform_(0, 1) < prob
    kept = [layer for layer, drop in zip(layers, to_drop) if not drop]
    return kept if kept else layers[:1]
