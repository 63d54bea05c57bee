"""Multi-process tests on one machine, shared by the context-parallel tests: ``spawn`` runs a worker on every
rank of a fresh process group (gloo, or NCCL when the worker's first argument is ``"cuda"``) with timeouts
on the group and on the join, so a hang fails the test instead of CI; workers collect failed comparisons
(``max_rel_err``, ``expect_raises``) and raise them together (``raise_failures``)."""
from __future__ import annotations

import gc
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; fail on any error or after JOIN_TIMEOUT_S."""
    port = _free_port()
    ctx = mp.start_processes(_entry, args=(world, port, fn, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {JOIN_TIMEOUT_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)  # several ranks share few cores: intra-op threads would only contend
    backend = "nccl" if args and args[0] == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        gc.collect()  # autograd graphs that hold the group go before it does
        dist.destroy_process_group()
    # a clean rank leaves without the interpreter's teardown, where gloo's threads can abort the process
    # ("terminate called without an active exception") after its work is done and checked
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def max_rel_err(got, want) -> float:
    if want.numel() == 0:
        return 0.0 if got.numel() == 0 else float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def slice_checks(o_cp, o, f_cp, f, with_final: bool, mine: dict, ref: dict, start: int, n: int) -> list:
    """``(name, got, want)`` of a rank's time slice ``[start, start + n)`` against the single-process run: the
    outputs, the final state (asked for), the gradient of each input of ``mine`` (its slice of ``ref``'s)."""
    checks = [("o", o_cp, o[:, start:start + n])]
    if with_final:
        checks.append(("final_state", f_cp, f))
    for name in mine:
        checks.append((f"d{name}", mine[name].grad, ref[name].grad[:, start:start + n]))
    return checks


def check_failures(case: str, rank: int, checks: list, tol: float) -> list:
    """The failures among ``checks`` (``(name, got, want)``): a missing tensor, a relative error above ``tol``."""
    out = []
    for name, got, want in checks:
        if got is None:
            out.append(f"{case}: rank {rank} {name} is None")
            continue
        err = max_rel_err(got, want)
        if not err <= tol:
            out.append(f"{case}: rank {rank} {name} relative error {err:.2e} > {tol:.0e}")
    return out


def raise_failures(failures) -> None:
    if failures:
        raise AssertionError("\n".join(failures))


def expect_raises(exc_type, fragment, fn) -> list:
    """``[]`` when ``fn()`` raises ``exc_type`` with ``fragment`` in its message, else the failure."""
    try:
        fn()
    except exc_type as exc:
        if fragment not in str(exc):
            return [f"raised {exc_type.__name__} without {fragment!r}: {exc}"]
        return []
    except Exception:
        return [f"expected {exc_type.__name__}, got {traceback.format_exc()}"]
    return [f"expected {exc_type.__name__} ({fragment!r}), nothing raised"]


def host_sync_failures(rank: int, run, what: str, synchronizing=None) -> list:
    """Failures of ``run()`` under CUDA's sync debug mode "error" (it must not synchronize with the host; ``what``
    names it); ``synchronizing``, when given, must raise there (the detector works). Warm ``run`` up first."""
    torch.cuda.synchronize()
    failures = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        if synchronizing is not None:
            failures += expect_raises(RuntimeError, "synchroniz", synchronizing)
    except RuntimeError:
        failures.append(f"rank {rank}: {what} synchronized with the host:\n{traceback.format_exc()}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return failures
