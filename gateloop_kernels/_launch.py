"""Kernel launches at a fraction of Triton's host cost: after Triton has compiled and launched a kernel for
one specialization, later launches with the same specialization call its compiled launcher directly.

``JITFunction.run`` binds every argument, specializes it in C++, builds and hashes a cache key, checks the
kernel's global values and queries the device and stream on each call: ~60-110 us of host time per launch on
the H100 machine, 5-6 launches per forward+backward (docs/kernels.md section 5). :class:`Launcher` keeps
Triton's semantics by keying its own cache on everything Triton specializes on, coarsened never, refined
where cheaper (docs/kernels.md section 5 lists the key):

* tensors: dtype, whether the address is a multiple of 16, whether on CUDA (launched as their addresses);
* integers: whether the value is 1, a multiple of 16, and its width class (32-bit, 64-bit, unsigned 64);
* other non-constexpr values (floats, bools, None): their type, bools and None their value;
* constexpr arguments and launch options (``num_warps``...): their values;
* the current CUDA device.

A key seen for the first time, a launch under a Triton launch hook (profilers), every launch off CUDA (the
interpreter), and every launch while ``ENABLED`` is false (``GATELOOP_DIRECT_LAUNCH=0`` in the environment;
benchmarks flip it to compare) go through Triton unchanged.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import torch
import triton
from torch import Tensor

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - Triton < 3.4 has no knobs module
    _knobs = None

#: direct launches on (see the module docstring)
ENABLED = os.environ.get("GATELOOP_DIRECT_LAUNCH", "1") != "0"

_LO32, _HI32 = -(2 ** 31), 2 ** 31
_LO64, _HI64 = -(2 ** 63), 2 ** 63


def _device() -> int:
    return torch.cuda.current_device()


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _keyed(device: int, args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """``(cache key, launch arguments)`` of a launch on ``device``: the key holds the device, the keywords
    (constexprs, launch options) and a part per positional argument. A tensor becomes its address, which the compiled
    launcher takes as it is (of a tensor it would call ``data_ptr()`` and check the address with a driver call, per
    pointer and launch); its key part is its dtype, then one int for its 16-byte alignment and whether it is on CUDA
    (a tensor elsewhere misses the cache, and Triton's own launch raises its error). A 32-bit int's part is one
    negative code (-1: the value 1, -2: a multiple of 16, -3: other), apart from bools' ``True`` / ``False`` and the
    tensors' 4..7; a wider int's a tuple. One loop, no call and no tuple per 32-bit int or tensor: ~40 arguments a
    launch, on every launch (a key and its lookup: 6.4 against 10.2 us with a tuple per argument, best of 15
    interleaved rounds on the 2-core CPU)."""
    keys, vals = [], []
    key, val = keys.append, vals.append
    for x in args:
        tx = type(x)
        if tx is int and _LO32 <= x < _HI32:
            key(-1 if x == 1 else -2 if x % 16 == 0 else -3)
            val(x)
        elif tx is Tensor or isinstance(x, Tensor):
            p = x.data_ptr()
            key(x.dtype)
            key(4 + (p % 16 == 0) + 2 * x.is_cuda)
            val(p)
        elif tx is int or (tx is not bool and isinstance(x, int)):
            key((x == 1, x % 16 == 0, 0 if _LO32 <= x < _HI32 else 1 if _LO64 <= x < _HI64 else 2))
            val(x)
        else:  # bools and None by value, other values (floats) by type
            key(x if tx is bool or x is None else tx)
            val(x)
    return (device, tuple(kwargs.items()), *keys), vals


class Launcher:
    """``Launcher(jit_fn)[grid](*args, **kwargs)`` launches like ``jit_fn[grid](*args, **kwargs)``.

    Call sites pass the kernel's non-constexpr parameters positionally and its constexpr parameters and launch
    options by keyword, the same split at every call of one site (the key relies on the positions).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._direct = isinstance(fn, triton.runtime.JITFunction)
        self._cache: dict = {}
        self._params = [(p.name, p.default) for p in inspect.signature(fn.fn).parameters.values()]

    def __getitem__(self, grid: tuple) -> Callable:
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    @staticmethod
    def _hooked() -> bool:
        if _knobs is None:
            return True
        for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
            calls = getattr(hook, "calls", None)  # Triton >= 3.5: a chain, empty unless a profiler added to it
            if hook is not None and (calls is None or calls):
                return True
        return False

    def run(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if not (ENABLED and self._direct) or self._hooked():
            self.fn[grid](*args, **kwargs)
            return
        device = _device()
        key, vals = _keyed(device, args, kwargs)
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable constexpr: Triton's own path
            self.fn[grid](*args, **kwargs)
            return
        if hit is None:
            kernel = self.fn[grid](*args, **kwargs)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel  # Triton's asynchronous compile
            tail = tuple(kwargs[name] if name in kwargs else default for name, default in self._params[len(args):])
            self._cache[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
            return
        run, function, packed, tail = hit
        g = tuple(grid) + (1, 1)
        run(g[0], g[1], g[2], _stream(device), function, packed, None, None, None, *vals, *tail)
