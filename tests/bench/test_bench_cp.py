"""``python -m bench cp`` (bench/cp.py): the runnable context-parallel training example, and the timing.

Runs the example at tiny sizes in a subprocess (2 ranks, one sequence split over both, FSDP2; a timeout
instead of a hang) and compares the losses it prints with the same model trained in this process on the
whole sequences (the example's own ``build_model`` and ``batch``): the first step's loss to 1e-5 relative,
the second (after one AdamW step on the sharded parameters) to 1e-4; float32.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from bench import cp
from helpers import ROOT


def _bench_cp(argv, timeout) -> str:
    """``python -m bench.cp *argv``'s output, in a subprocess (a timeout rather than a hang)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "bench.cp", *argv], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _example(argv, timeout):
    out = _bench_cp(argv, timeout)
    return [float(x) for x in re.findall(r"^step +\d+/\d+ +loss (\S+)", out, flags=re.M)], out


def _one_process(argv, steps, device="cpu"):
    args = cp.build_parser().parse_args(argv)
    model = cp.build_model(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(steps):
        loss = model(cp.batch(args, step, args.batch, args.seq).to(device), return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _check(argv, timeout, device="cpu", tol=(1e-5, 1e-4)):
    got, out = _example(argv, timeout)
    want = _one_process(argv, 2, device)
    assert len(got) == 2, out
    for step, (g, w, t) in enumerate(zip(got, want, tol)):
        assert abs(g - w) <= t * abs(w), f"step {step + 1}: example {g}, one process {w}\n{out}"


ARGV = ["--train", "--nproc", "2", "--steps", "2", "--seq", "16", "--heads", "2", "--dim", "16", "--depth", "1",
        "--vocab", "32", "--dtype", "float32"]  # --device cpu or cuda follows


def test_cp_train_example_matches_one_process(_seed):
    _check([*ARGV, "--device", "cpu", "--wrap", "fsdp", "--seed", str(_seed % 1000)], timeout=120)


def test_cp_timing_runs():
    """The timing mode at tiny sizes: a row per rank (measured, unchecked, slice, collectives) and the
    bytes per call of ``context_parallel_bytes``."""
    out = _bench_cp(["--nproc", "2", "--seq", "24", "--heads", "2", "--dim", "16", "--repeat", "1", "--dtype",
                     "float32", "--device", "cpu"], timeout=120)
    rows = re.findall(r"^ +(\d) +(\d+)((?: +\d+\.\d+){5})$", out, flags=re.M)
    assert [(r, int(n)) for r, n, _ in rows] == [("0", 12), ("1", 12)], out
    assert all(float(t) > 0 for *_, times in rows for t in times.split()), out
    assert f"bytes per call and rank: {cp.context_parallel_bytes(1, 2, 16, 16, 2)}" in out, out


@pytest.mark.gpu
def test_cp_train_example_nccl(_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    argv = [*ARGV, "--device", "cuda", "--wrap", "fsdp", "--seed", str(_seed % 1000)]
    argv[argv.index("--seq") + 1] = "256"
    _check(argv, timeout=300, device="cuda", tol=(1e-4, 1e-3))
