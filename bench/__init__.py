"""Benchmarks: ``python -m bench [--quick] [scan|reversible|model|train|summary] [options]`` (``--help`` lists them).

Every benchmark writes its JSON (and plots, where matplotlib imports) to :data:`OUT` unless told otherwise, and on
a GPU appends its figures as result rows to ``bench/results/`` (:mod:`bench.results`), from which
``python -m bench render`` draws ``docs/results.md``. The benchmarks share :mod:`bench.harness` (timing, oracle
check, floors, rows); the profiling and diagnostic tools are in :mod:`bench.tools`. ``bench`` is not installed:
it runs from the checkout, and these paths are the checkout's wherever it is started from.
"""
import argparse
import os

#: where the benchmarks write their results and ``python -m bench summary`` reads them: ``bench/out/``
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1 (a count or a size), else the command's usage error (exit status 2)."""
    return _at_least(text, int, 1)


def nonnegative_int(text: str) -> int:
    """An argparse ``type``: an int >= 0, else the command's usage error."""
    return _at_least(text, int, 0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0, else the command's usage error."""
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite float >= 0, else the command's usage error."""
    value = _at_least(text, float, 0)
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def device_name(text: str) -> str:
    """An argparse ``type``: a name ``torch.device`` takes (``cpu``, ``cuda``, ``cuda:1``) of a device this machine
    has, else a usage error (a CUDA name without that CUDA device fails here, not as a traceback mid-run). ``cuda:N``
    becomes the current CUDA device and is returned as ``cuda``: the benchmarks synchronise, time and read the memory
    of the current device (they compare the name with ``"cuda"``, and ``cuda:1`` ran as a CPU there: no synchronisation,
    no peak memory)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (device.index or 0):
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s)"
                + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"))
        if device.index is not None:
            torch.cuda.set_device(device.index)
        return "cuda"
    return text


def _at_least(text: str, kind: type, low):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not value >= low:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value
