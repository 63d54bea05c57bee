"""Input validation shared by every entry point: clear errors that name the argument."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

#: gate layouts: one complex gate per sequence step ("head"), one per key dim, anything else
GATE_HEAD, GATE_KEY, GATE_GENERAL = "head", "key", "general"


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_real_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {t.dtype}")


def check_gate_dtype(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be a floating-point or complex tensor, got {t.dtype}")


def check_same_device(**tensors: Optional[Tensor]) -> torch.device:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    first = next(iter(devices.values()))
    if any(dev != first for dev in devices.values()):
        listing = ", ".join(f"{k} on {dev}" for k, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_gate_loop_inputs(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> tuple[str, int, int, int, int]:
    """Validate ``gate_loop_operator`` inputs; return ``(gate_layout, B, n, d, e)``.

    ``q, k: (B, n, d)``, ``v: (B, n, e)`` real floating; ``a`` complex or real with 4 dims, each
    either 1 or the matching size of ``(B, n, d, e)`` (``a``'s ``n`` must equal ``n``).
    Raises ``TypeError`` for non-tensors / wrong dtypes and ``ValueError`` for shapes and devices.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_real_float(name, t)
    check_gate_dtype("a", a)
    if q.ndim != 3:
        raise ValueError(f"q must have shape (B, n, d), got {_shape(q)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (B, n, d) = {_shape(q)}, got {_shape(k)}")
    B, n, d = q.shape
    if v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have shape (B, n, e) = ({B}, {n}, e), got {_shape(v)}")
    e = v.shape[2]
    if a.ndim != 4 or a.shape[0] not in (1, B) or a.shape[1] != n or a.shape[2] not in (1, d) \
            or a.shape[3] not in (1, e):
        raise ValueError(f"a must be broadcastable to (B, n, d, e) = ({B}, {n}, {d}, {e}) with a 4-dim shape "
                         f"such as ({B}, {n}, 1, 1) or ({B}, {n}, {d}, 1), got {_shape(a)}")
    check_same_device(q=q, k=k, v=v, a=a)
    if a.shape[2] == 1 and a.shape[3] == 1:
        layout = GATE_HEAD
    elif a.shape[3] == 1:
        layout = GATE_KEY
    else:
        layout = GATE_GENERAL
    return layout, B, n, d, e


def check_simple_inputs(q: Tensor, kv: Tensor, a: Tensor,
                        cache: Optional[tuple[Tensor, Tensor]]) -> tuple[int, int, int]:
    """Validate ``simple_gate_loop_operator`` inputs; return ``(B, n, D)``.

    ``q, kv, a: (B, n, D)`` real floating; ``cache``: ``None`` or ``(a_prev, kv_prev)`` of shape ``(B, D)``.
    """
    for name, t in (("q", q), ("kv", kv), ("a", a)):
        check_real_float(name, t)
    if q.ndim != 3:
        raise ValueError(f"q must have shape (B, n, D), got {_shape(q)}")
    for name, t in (("kv", kv), ("a", a)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (B, n, D) = {_shape(q)}, got {_shape(t)}")
    B, n, D = q.shape
    cache_a = cache_kv = None
    if cache is not None:
        if not (isinstance(cache, (tuple, list)) and len(cache) == 2):
            raise TypeError("cache must be None or a pair (a_prev, kv_prev)")
        cache_a, cache_kv = cache
        for name, t in (("cache[0] (a_prev)", cache_a), ("cache[1] (kv_prev)", cache_kv)):
            check_real_float(name, t)
            if tuple(t.shape) != (B, D):
                raise ValueError(f"{name} must have shape (B, D) = ({B}, {D}), got {_shape(t)}")
    check_same_device(q=q, kv=kv, a=a, cache_a=cache_a, cache_kv=cache_kv)
    return B, n, D


def check_initial_state(initial_state: Optional[Tensor], B: int, d: int, e: int, device: torch.device) -> None:
    if initial_state is None:
        return
    check_gate_dtype("initial_state", initial_state)
    if tuple(initial_state.shape) != (B, d, e):
        raise ValueError(f"initial_state must have shape (B, d, e) = ({B}, {d}, {e}), got {_shape(initial_state)}")
    if initial_state.device != device:
        raise ValueError(f"initial_state must be on {device}, got {initial_state.device}")
