"""Input validation of every public entry point, one pass per call: clear errors that name the argument.

Each entry checks its own argument forms here once and then calls :func:`gateloop_kernels.dispatch.scan`,
which takes them as checked.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from ._boundaries import boundaries_ok
from .dtypes import PRECISIONS

#: gate layouts: one complex gate per sequence step ("head"), one per key dim, anything else
GATE_HEAD, GATE_KEY, GATE_GENERAL = "head", "key", "general"


def is_int(value) -> bool:
    """Whether ``value`` is an integer as ``operator.index`` takes one (a Python or NumPy int), but not a bool (a
    flag) or a tensor (read on the host: a sync). Callers that pass it on take ``operator.index(value)``: kernels,
    constexprs and custom ops want a Python int."""
    if isinstance(value, (bool, Tensor)):
        return False
    try:
        operator.index(value)  # NumPy's bool has no __index__: rejected here
    except TypeError:
        return False
    return True


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


def check_layer_input(name: str, x: Tensor, ndim: int, shape: str, last: Optional[int] = None) -> None:
    """A layer's input: a tensor of ``ndim`` dims (``shape`` names them in the message), ``last`` its last size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim or (last is not None and x.shape[-1] != last):
        raise ValueError(f"{name} must have shape {shape}, got {_shape(x)}")


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
        raise ValueError(f"a must have shape (B or 1, n, d or 1, e or 1) = ({B} or 1, {n}, {d} or 1, {e} or 1): "
                         f"one gate per step (its time dim is n, never broadcast), e.g. ({B}, {n}, 1, 1), "
                         f"got {_shape(a)}")
    check_same_device(q=q, k=k, v=v, a=a)
    if a.shape[2] == 1 and a.shape[3] == 1:
        layout = GATE_HEAD
    elif a.shape[3] == 1:
        layout = GATE_KEY
    else:
        layout = GATE_GENERAL
    return layout, B, n, d, e


def check_simple_inputs(q: Tensor, kv: Tensor, a: Tensor, cache: Optional[tuple[Tensor, Tensor]],
                        cu_seqlens: Optional[Tensor] = None) -> tuple[int, int, int]:
    """Validate ``simple_gate_loop_operator`` inputs; return ``(B, n, D)``.

    ``q, kv, a: (B, n, D)`` real floating; ``cache``: ``None`` or ``(a_prev, kv_prev)`` of shape ``(B, D)``, or
    ``(N, D)`` with ``cu_seqlens`` (:func:`check_cu_seqlens`).
    """
    for name, t in (("q", q), ("kv", kv), ("a", a)):
        check_real_float(name, t)
    if q.ndim != 3:
        raise ValueError(f"q must have shape (B, n, D), got {_shape(q)}")
    for name, t in (("kv", kv), ("a", a)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (B, n, D) = {_shape(q)}, got {_shape(t)}")
    B, n, D = q.shape
    N = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, n, q.device)
    cache_a = cache_kv = None
    if cache is not None:
        if not (isinstance(cache, (tuple, list)) and len(cache) == 2):
            raise TypeError("cache must be None or a pair (a_prev, kv_prev)")
        cache_a, cache_kv = cache
        for name, t in (("cache[0] (a_prev)", cache_a), ("cache[1] (kv_prev)", cache_kv)):
            check_real_float(name, t)
            if N is not None:
                check_varlen_state(name, t, N, (D,))
            elif tuple(t.shape) != (B, D):
                raise ValueError(f"{name} must have shape (B, D) = ({B}, {D}), got {_shape(t)}")
    check_same_device(q=q, kv=kv, a=a, cache_a=cache_a, cache_kv=cache_kv)
    return B, n, D


def check_initial_state(initial_state: Optional[Tensor], B: int, d: int, e: int, device: torch.device,
                        sequences: Optional[int] = None) -> None:
    """``initial_state``: ``None`` or ``(B, d, e)``; ``(sequences, d, e)`` for a packed batch of that many."""
    if initial_state is None:
        return
    check_gate_dtype("initial_state", initial_state)
    if sequences is not None:
        check_varlen_state("initial_state", initial_state, sequences, (d, e))
    elif tuple(initial_state.shape) != (B, d, e):
        raise ValueError(f"initial_state must have shape (B, d, e) = ({B}, {d}, {e}), got {_shape(initial_state)}")
    if initial_state.device != device:
        raise ValueError(f"initial_state must be on {device}, got {initial_state.device}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_reference_chunk(chunk_size: int) -> int:
    """The references' ``chunk_size``: any positive int (the public entries also want a power of two >= 16);
    returned as a Python int."""
    if not is_int(chunk_size):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    chunk_size = operator.index(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


def check_chunk_size(chunk_size: int) -> int:
    """A scan entry's ``chunk_size``: a power of two >= 16, returned as a Python int (a kernel constexpr)."""
    chunk_size = check_reference_chunk(chunk_size)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def check_preactivation(z: Tensor) -> None:
    check_real_float("z", z)
    if z.ndim == 0 or z.shape[-1] != 2:
        raise ValueError(f"z must end in a dimension of 2 (real, imaginary), got {tuple(z.shape)}")


def check_log_polar(log_magnitude: Tensor, phase: Tensor) -> None:
    check_real_float("log_magnitude", log_magnitude)
    check_real_float("phase", phase)
    if log_magnitude.shape != phase.shape:
        raise ValueError(f"log_magnitude and phase must have one shape, got {tuple(log_magnitude.shape)} "
                         f"and {tuple(phase.shape)}")


def check_heads_inputs(q: Tensor, k: Tensor, v: Tensor, z: Optional[Tensor], log_magnitude: Optional[Tensor],
                       phase: Optional[Tensor], initial_state: Optional[Tensor],
                       cu_seqlens: Optional[Tensor] = None) -> None:
    """Validate ``gate_loop_heads`` inputs: ``q, k: (B, n, H, d)``, ``v: (B, n, H, e)`` real floating; the gate as
    ``z: (B, n, H, 2)`` or as both ``log_magnitude, phase: (B, n, H)``; ``initial_state: (B, H, d, e)`` (``(N, H,
    d, e)`` with ``cu_seqlens``, :func:`check_cu_seqlens`); one device.
    Raises ``TypeError`` for non-tensors / wrong dtypes and ``ValueError`` for shapes, devices and gate forms."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_real_float(name, t)
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, n, H, d) and v (B, n, H, e) with one (B, n, H); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (z is None) == (log_magnitude is None and phase is None) or \
            (z is None and (log_magnitude is None or phase is None)):
        raise ValueError("give the gate either as z, or as both log_magnitude and phase")
    if z is not None:
        check_preactivation(z)
        gate, gate_shape = z, tuple(z.shape[:-1])
    else:
        check_log_polar(log_magnitude, phase)
        gate, gate_shape = log_magnitude, tuple(log_magnitude.shape)
    B, n, H, d = q.shape
    e = v.shape[-1]
    if gate_shape != (B, n, H):
        raise ValueError(f"the gate must be (B, n, H) = ({B}, {n}, {H}) (z: (B, n, H, 2)), got {gate_shape}")
    N = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, n, q.device)
    if initial_state is not None:
        check_gate_dtype("initial_state", initial_state)
        if N is not None:
            check_varlen_state("initial_state", initial_state, N, (H, d, e))
        elif tuple(initial_state.shape) != (B, H, d, e):
            raise ValueError(f"initial_state must be (B, H, d, e) = ({B}, {H}, {d}, {e}), got "
                             f"{tuple(initial_state.shape)}")
    check_same_device(q=q, k=k, v=v, gate=gate, phase=phase, initial_state=initial_state)


def check_chunk_gate_loop_inputs(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor,
                                 initial_state: Optional[Tensor], precision: str, chunk_size: int) -> int:
    """Validate a direct call of ``chunked.chunk_gate_loop`` (the public entries check their own forms); returns
    ``chunk_size`` as a Python int (:func:`check_chunk_size`)."""
    check_precision(precision)
    for name, t in (("q", q), ("k", k), ("v", v), ("a_re", a_re), ("a_im", a_im)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor")
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        # the kernels compute in float32: float64 inputs would come back silently narrowed
        raise TypeError(f"chunk_gate_loop takes float32, bfloat16 or float16 q, k, v, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype} (gateloop_kernels.gate_loop_heads runs float64)")
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, n, H, d) and v (B, n, H, e); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, n, H, d = q.shape
    e = v.shape[-1]
    if a_re.shape != (B, n, H) or a_im.shape != (B, n, H):
        raise ValueError(f"a_re, a_im must be (B, n, H) = ({B}, {n}, {H}); got {tuple(a_re.shape)}, "
                         f"{tuple(a_im.shape)}")
    if not (16 <= d <= 256 and 16 <= e <= 256):
        raise ValueError(f"chunk_gate_loop needs 16 <= d, e <= 256, got d={d}, e={e}")
    chunk_size = check_chunk_size(chunk_size)
    if initial_state is not None:
        check_gate_dtype("initial_state", initial_state)
        if tuple(initial_state.shape) != (B, H, d, e):
            raise ValueError(f"initial_state must be (B, H, d, e) = ({B}, {H}, {d}, {e}), "
                             f"got {tuple(initial_state.shape)}")
    check_same_device(q=q, k=k, v=v, a_re=a_re, a_im=a_im, initial_state=initial_state)
    return chunk_size


def count_cu_seqlens(cu_seqlens: Tensor) -> int:
    """The number of sequences ``N`` of ``cu_seqlens`` after its metadata checks (a tensor, int32/int64, 1-D, not
    empty: TypeError / ValueError naming it), for callers that size something by ``N`` before
    :func:`check_cu_seqlens` runs (no launch, no value read)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [0, l_1, l_1 + l_2, ..., T] with at least one entry, got shape "
                         f"{_shape(cu_seqlens)}")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens(cu_seqlens: Tensor, B: int, T: int, device: torch.device) -> int:
    """Validate packed-sequence boundaries ``cu_seqlens = [0, l_1, l_1 + l_2, ..., T]`` for inputs of batch ``B``
    and ``T`` tokens on ``device``; return the number of sequences ``N = len(cu_seqlens) - 1``.

    Type, dtype, dims, device and ``B = 1`` are metadata checks. The values (start at 0, non-decreasing, last
    entry ``T``) are checked without a host synchronisation: on a CPU tensor in eager mode at once (a
    ``ValueError``); on CUDA, and under ``torch.compile``, by an asynchronous device-side assertion
    (``torch._assert_async`` on :func:`gateloop_kernels._boundaries.boundaries_ok`, one launch: the process's next
    synchronising CUDA call fails);
    :func:`gateloop_kernels.varlen.validate_cu_seqlens` raises a ``ValueError`` at once instead, at the cost of a
    host synchronisation. Whatever the values,
    every index the scan derives from them is clamped (no out-of-bounds read).

    Raises:
        TypeError: not a tensor, not int32/int64. ValueError: not 1-D or empty, ``B != 1``, another device,
        bad values (CPU, eager).
    """
    N = count_cu_seqlens(cu_seqlens)
    if B != 1:
        raise ValueError(f"with cu_seqlens the inputs are one packed batch of shape (1, T, ...): B must be 1, got "
                         f"B = {B}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the inputs' device {device}, got {cu_seqlens.device}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if cu_seqlens[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu_seqlens[0].item()}")
        if cu_seqlens[-1] != T:
            raise ValueError(f"cu_seqlens must end at the number of tokens T = {T}, got {cu_seqlens[-1].item()}")
        if (cu_seqlens[1:] < cu_seqlens[:-1]).any():
            raise ValueError(f"cu_seqlens must be non-decreasing (sequence lengths >= 0), got {cu_seqlens.tolist()}")
    else:
        # no T's value in a traced message: formatting a symbolic T (torch.compile's dynamic shapes) specializes it
        end = "the inputs' number of tokens" if torch.compiler.is_compiling() else f"T = {T}"
        torch._assert_async(boundaries_ok(cu_seqlens, T), f"cu_seqlens must start at 0, be non-decreasing and end at "
                                                          f"{end}")
    return N


def check_varlen_state(name: str, state: Optional[Tensor], N: int, rest: tuple) -> None:
    """With ``cu_seqlens``, ``state`` (an initial state or cache) holds one entry per sequence: ``(N, *rest)``."""
    if state is not None and tuple(state.shape) != (N, *rest):
        dims = ", ".join(str(r) for r in rest)
        raise ValueError(f"with cu_seqlens, {name} holds one state per sequence: (N, {dims}) with N = "
                         f"len(cu_seqlens) - 1 = {N}, got {_shape(state)}")
