"""Loads the ``revkern`` C++/CUDA extension (``csrc/reversible/``) that fuses the reversible coupling's
elementwise steps, and says which path is live.

Order of attempts, on first use (not at import):

1. ``reversible._C``: built by ``setup.py`` (a CUDA extension where nvcc and a CUDA torch exist,
   C++ only otherwise);
2. a JIT build of its sources (``reversible/csrc/`` where installed, ``csrc/reversible/`` in a source
   checkout) with ``torch.utils.cpp_extension.load`` (ninja), cached under
   ``$REVERSIBLE_EXT_CACHE`` (default: torch's extension cache, ``~/.cache/torch_extensions``);
   CUDA sources are included when torch has CUDA, a GPU is visible and nvcc is found. A build (not
   a load from the cache, which takes about a second) says so on stderr when it starts and when it
   ends, as ``torch.hub`` does for a download;
3. otherwise the pure-PyTorch bodies in ``reversible._inplace`` run, after ONE warning.

``REVERSIBLE_EXTENSION=0`` (or ``off``/``false``/``pytorch``; read at import) forces the PyTorch
path; :func:`set_enabled` / :func:`use_extension` switch it at run time (tests compare on/off).
``REVERSIBLE_EXTENSION_JIT=0`` (the same words) skips step 2.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["extension_info", "ops", "live_devices", "set_enabled", "use_extension", "load"]

_OPS = ("coupling_add_", "reconstruct_", "reconstruct_multi_")
_HERE = Path(__file__).resolve().parent
# the sources: installed inside the package (setup.py's package_data), else the source checkout's
_CSRC = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc" / "reversible"
_lock = threading.RLock()
_state: dict[str, Any] = {
    "tried": False,      # a load was attempted (success or not)
    "loaded": False,     # torch.ops.revkern.* are registered
    "source": None,      # "installed" | "jit" | None
    "reason": "not loaded yet (loads on first use)",
    "devices": (),       # device types with kernels, e.g. ("cpu", "cuda")
    "build_seconds": None,
    "warned": False,
}
_enabled: bool | None = None  # None: follow REVERSIBLE_EXTENSION (read at import and by set_enabled(None))
# Hot-path cache for reversible._inplace: the device types the extension is live for right now
# (empty when forced off or unavailable); None until resolved (first use, or after a switch).
_fast: frozenset | None = None
_OVERLOADS: dict[str, Any] = {}
# a load from a warm cache takes a second or two: only a longer one (a build) is announced
_NOTICE_AFTER_S = 5.0


def _env_flag(name: str, *off: str) -> bool:
    """An on/off environment variable, on unless set to 0, off, false or no (any case, spaces ignored) or ``off``."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "false", "no", *off)


def _env_enabled() -> bool:
    return _env_flag("REVERSIBLE_EXTENSION", "pytorch")


_env_on = _env_enabled()


def _is_enabled() -> bool:
    return _env_on if _enabled is None else _enabled


def _registered() -> bool:
    try:
        return all(hasattr(torch.ops.revkern, name) for name in _OPS)
    except (AttributeError, RuntimeError):
        return False


def _kernel_devices() -> tuple[str, ...]:
    out = []
    for key, dev in (("CPU", "cpu"), ("CUDA", "cuda")):
        if torch._C._dispatch_has_kernel_for_dispatch_key("revkern::reconstruct_", key):
            out.append(dev)
    return tuple(out)


def _want_cuda() -> bool:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def _jit_build() -> str:
    from torch.utils.cpp_extension import load as cpp_load

    with_cuda = _want_cuda()
    sources = [str(_CSRC / "revkern_ops.cpp")]
    if with_cuda:
        sources.append(str(_CSRC / "revkern_cuda.cu"))
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"extension sources not found: {missing}")
    name = "revkern_cuda" if with_cuda else "revkern_cpu"
    kwargs: dict[str, Any] = {}
    cache = os.environ.get("REVERSIBLE_EXT_CACHE")
    if cache:
        build_dir = Path(cache) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(build_dir)
    extra_cuda = ["-O3", "--expt-relaxed-constexpr"]
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # build for the visible GPUs only (fast JIT); setup.py builds the usual arch list
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        extra_cuda += [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]
    cpp_load(
        name=name,
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=extra_cuda,
        extra_include_paths=[str(_CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("REVERSIBLE_EXT_VERBOSE", "0") == "1",
        **kwargs,
    )
    return "cuda+cpu" if with_cuda else "cpu"


def _notice(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def load() -> bool:
    """Loads the extension if it is not loaded yet; True if its ops are registered."""
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        errors = []
        if _registered():  # e.g. loaded by another copy of this module or by the user
            _state.update(loaded=True, source="preloaded", reason="revkern ops already registered")
        if not _state["loaded"]:
            try:
                import reversible._C  # noqa: F401  (registers torch.ops.revkern.*)

                if _registered():
                    _state.update(loaded=True, source="installed", reason="installed extension reversible._C")
            except ImportError as e:
                errors.append(f"no installed reversible._C ({e})")
            except Exception as e:  # a stale build against another torch, say
                errors.append(f"installed reversible._C failed to load ({type(e).__name__}: {e})")
        if not _state["loaded"] and _env_flag("REVERSIBLE_EXTENSION_JIT"):
            t0 = time.perf_counter()
            announced = threading.Event()

            def announce() -> None:
                announced.set()
                _notice(f"reversible: building the C++ extension from {_CSRC} (first use; cached for later "
                        "runs; up to a minute) ...")

            notice = threading.Timer(_NOTICE_AFTER_S, announce)
            notice.daemon = True
            notice.start()
            try:
                kind = _jit_build()
                if _registered():
                    _state.update(loaded=True, source="jit",
                                  reason=f"JIT-built from {_CSRC} ({kind}) with torch.utils.cpp_extension.load")
                    _state["build_seconds"] = round(time.perf_counter() - t0, 1)
                else:
                    errors.append("JIT build registered no revkern ops")
            except Exception as e:
                errors.append(f"JIT build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})")
            finally:
                notice.cancel()
                notice.join()  # a notice being written finishes before the closing line
            if announced.is_set():
                took = time.perf_counter() - t0
                _notice(f"reversible: C++ extension built in {took:.1f} s" if _state["loaded"] else
                        f"reversible: C++ extension build failed after {took:.1f} s ({errors[-1]}); "
                        "using the PyTorch path")
        elif not _state["loaded"]:
            errors.append(f"no JIT build (REVERSIBLE_EXTENSION_JIT={os.environ['REVERSIBLE_EXTENSION_JIT']!r})")
        if _state["loaded"]:
            _state["devices"] = _kernel_devices()
        else:
            _state["reason"] = "; ".join(errors) or "extension unavailable"
        return _state["loaded"]


def ops():
    """``torch.ops.revkern`` when the extension is enabled and loads, else None (warns once)."""
    if not _is_enabled():
        return None
    if not _state["tried"]:
        load()
    if _state["loaded"]:
        return torch.ops.revkern
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"reversible: C++/CUDA extension unavailable, using the PyTorch path ({_state['reason']})",
            RuntimeWarning,
            stacklevel=4,
        )
    return None


def live_devices() -> frozenset:
    """Device types ("cpu", "cuda") the extension's kernels serve right now (empty: PyTorch path).

    Cached; the first call loads the extension (and warns once if it is unavailable)."""
    global _fast
    if _fast is None:
        o = ops()
        if o is not None:
            _OVERLOADS.update({name: getattr(o, name).default for name in _OPS})
            _fast = frozenset(_state["devices"])
        else:
            _fast = frozenset()
    return _fast


def set_enabled(enabled: bool | None) -> None:
    """Force the extension on (True) or off (False, the PyTorch path); None re-reads the env var."""
    global _enabled, _fast, _env_on
    _enabled = enabled
    if enabled is None:
        _env_on = _env_enabled()
    _fast = None


@contextlib.contextmanager
def use_extension(enabled: bool) -> Iterator[None]:
    """Context manager: run the block with the extension on or off."""
    global _enabled, _fast
    old = _enabled
    _enabled, _fast = enabled, None
    try:
        yield
    finally:
        _enabled, _fast = old, None


def extension_info(load_now: bool = True) -> dict[str, Any]:
    """Which path the in-place steps take and why.

    Returns a dict: ``path`` ("extension" or "pytorch"), ``enabled`` (not forced off),
    ``loaded``, ``source`` ("installed"/"jit"/"preloaded"/None), ``devices`` (device types with
    kernels), ``reason``, ``build_seconds`` (JIT build time in this process, if any).
    With ``load_now`` (default) it loads the extension first if that was not tried yet.
    """
    if load_now and _is_enabled() and not _state["tried"]:
        load()
    enabled = _is_enabled()
    live = enabled and _state["loaded"]
    if not enabled:
        why = "forced off (REVERSIBLE_EXTENSION=0 or set_enabled(False))"
    else:
        why = _state["reason"]
    return {
        "path": "extension" if live else "pytorch",
        "enabled": enabled,
        "loaded": _state["loaded"],
        "source": _state["source"],
        "devices": tuple(_state["devices"]),
        "reason": why,
        "build_seconds": _state["build_seconds"],
    }
