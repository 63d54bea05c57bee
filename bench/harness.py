"""What every benchmark shares: timing, the oracle check, the run's environment, and result rows.

* :func:`do_bench` / :func:`do_bench_graph`: ``triton.testing``'s timers (warm-up, then the L2 cache cleared
  before each timed call), reduced to a :class:`Timing` (median and the 20th/80th percentiles);
  :func:`wall_times` and :class:`Timer` time on the host where there is no GPU (or around whole steps).
* :func:`rel_err`: relative error of a result against its oracle (``inf`` where the result is not finite).
* :func:`environment`: GPU, driver, torch and Triton versions, commit and date of a run, for every row.
* :func:`backward_thread` / ``--calling-thread`` / ``--pin-core``: where a benchmark's backwards run.
* :func:`record`: appends result rows (:mod:`bench.results`) to ``bench/results/<benchmark>.jsonl``.
* The floors' ceilings are :func:`bench._ceilings.ceilings` (re-exported here).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import statistics
import subprocess
import time
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from bench._ceilings import ceilings, describe  # noqa: F401 - the floors' ceilings, one import for the benchmarks


class Timing(NamedTuple):
    """Milliseconds: the median of ``n`` timed calls and the 20th and 80th percentiles (the spread)."""
    median: float
    p20: float
    p80: float
    n: int

    @property
    def spread(self) -> list[float]:
        return [self.p20, self.p80]


NAN_TIMING = Timing(float("nan"), float("nan"), float("nan"), 0)


def summarize(times_ms: Sequence[float]) -> Timing:
    """The :class:`Timing` of a list of times (the median as ``statistics.median``, as Triton >= 3.4 takes it)."""
    ts = sorted(float(t) for t in times_ms)
    if not ts:
        raise ValueError("times_ms is empty")
    if len(ts) == 1:
        return Timing(ts[0], ts[0], ts[0], 1)
    q = statistics.quantiles(ts, n=5, method="inclusive")  # 20th, 40th, 60th, 80th percentiles
    return Timing(statistics.median(ts), q[0], q[3], len(ts))


def do_bench(fn: Callable, warmup: int = 25, rep: int = 100, grad_to_none=None) -> Timing:
    """``triton.testing.do_bench``: ``warmup`` then ``rep`` milliseconds of calls, CUDA events around each
    (host overhead included)."""
    import triton.testing
    return summarize(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="all"))


def do_bench_graph(fn: Callable, rep: int = 100, grad_to_none=None, log: Callable[[str], None] = print) -> Timing:
    """``triton.testing.do_bench_cudagraph``: replays of ``fn`` captured in a CUDA graph, device time without host
    overhead; :data:`NAN_TIMING` (and a line to ``log``) where ``fn`` cannot be captured."""
    import triton.testing
    try:
        return summarize(triton.testing.do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="all"))
    except Exception as e:  # noqa: BLE001 - capture is not supported by every peer
        log(f"graph capture failed: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.synchronize()
        return NAN_TIMING


def wall_times(fn: Callable, reps: int = 5) -> Timing:
    """Host wall time of ``reps`` calls after one warm-up call (the CPU runs, where there are no CUDA events)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return summarize(ts)


class Timer:
    """``with Timer(device) as t: ...`` sets ``t.ms``: CUDA events on a CUDA device (the end event waited for),
    else the host's wall clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64; ``inf`` where ``x`` has a NaN or an infinity."""
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _git_commit() -> Optional[str]:
    import os
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without .git (the device machine) names its commit
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (a copy of the tree): the row says so with null


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    """The fields every result row of this run shares: ``gpu`` (``"cpu"`` without CUDA), ``driver``, ``torch``,
    ``triton``, ``commit`` (``None`` outside a git checkout) and ``date`` (UTC)."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        tv = None
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "driver": _driver() if cuda else None,
            "torch": torch.__version__, "triton": tv, "commit": _git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def add_record_argument(p) -> None:
    """``--record`` / ``--no-record`` on a benchmark's parser: whether its result rows are appended to
    ``bench/results/`` (default: on a CUDA device only, where the figures are kernel figures)."""
    p.add_argument("--record", action="store_true", default=None,
                   help="append the result rows to bench/results/<benchmark>.jsonl (the default on a GPU)")
    p.add_argument("--no-record", dest="record", action="store_false",
                   help="do not append result rows (the default on a CPU)")


def _core(text: str) -> int:
    """``--pin-core N``: a core this process may run on, else the command's usage error."""
    import argparse
    import os
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not text.isdigit() or int(text) not in allowed:
        raise argparse.ArgumentTypeError(f"must be one of this process's cores {allowed}, got {text!r}")
    return int(text)


def add_thread_argument(p) -> None:
    """``--calling-thread`` and ``--pin-core`` on a benchmark's parser (see :func:`backward_thread`)."""
    p.add_argument("--calling-thread", action="store_true",
                   help="run every backward on the calling thread (torch.autograd.set_multithreading_enabled(False)), "
                        "not on autograd's device thread; rows say so in impl")
    p.add_argument("--pin-core", type=_core, metavar="N",
                   help="pin the timing thread, and the autograd device thread its first backward starts, to core N "
                        "(os.sched_setaffinity; Linux): the backward's hand-off then stays on one core; rows say so")


@contextlib.contextmanager
def backward_thread(args) -> Iterator[None]:
    """The context a benchmark times its calls in (``args``: :func:`add_thread_argument`'s options). PyTorch runs the
    backward of CUDA tensors on a per-device thread on another core (a hand-off and cold caches per backward), which
    ``--calling-thread`` avoids and ``--pin-core`` keeps on one core (docs/kernels.md section 5). The device thread
    is started by a process's first backward and keeps the mask it started with."""
    import os
    before = None
    if args.pin_core is not None:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {args.pin_core})  # pid 0: this thread (Linux); threads it starts inherit the mask
    try:
        with torch.autograd.set_multithreading_enabled(not args.calling_thread):
            yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def thread_rows(rows: list[dict], args) -> list[dict]:
    """``rows`` with ``impl`` naming the thread options in ``args`` (the rows of each mode stay apart); the floors
    (``impl`` "... floor": no call timed) as they are."""
    from bench import results
    suffix = ((" (backward on the calling thread)" if args.calling_thread else "")
              + (" (threads pinned to one core)" if args.pin_core is not None else ""))
    if not suffix:
        return rows
    return [r if r["impl"].endswith(" floor") else results.validate(dict(r, impl=r["impl"] + suffix)) for r in rows]


def record(benchmark: str, rows: list[dict], flag: Optional[bool], log: Callable[[str], None] = print,
           results_dir: Optional[str] = None) -> Optional[str]:
    """Append ``rows`` (validated) to ``<results_dir>/<benchmark>.jsonl`` where ``flag`` (``--record``) asks
    for it, or by default on a CUDA device; returns the path written, or ``None``."""
    from bench import results
    if not (torch.cuda.is_available() if flag is None else flag):
        return None
    if not rows:
        return None
    path = results.append(benchmark, rows, results_dir)
    log(f"[{benchmark}] {len(rows)} result rows appended to {path}")
    return path
