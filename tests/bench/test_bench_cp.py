"""``python -m bench cp`` (bench/cp.py): the runnable context-parallel training example, and the timing.

Runs the example at tiny sizes in a subprocess (2 ranks, one sequence split over both, FSDP2; a timeout
instead of a hang) and compares the losses it prints with the same model trained in this process on the
whole sequences (the example's own ``build_model`` and ``batch``): the first step's loss to 1e-5 relative,
the second (after one AdamW step on the sharded parameters) to 1e-4; float32. ``--predict`` (one process):
its stand-in group against the float64 sequential reference, its collective model, its table's rows.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from bench import cp
from gateloop_kernels import gate_from_preactivation
from gateloop_kernels.reference import sequential_reference
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
    assert re.search(r"step over 2 ranks \(slowest, unchecked\): [\d.]+ ms, [\d.e+]+ tokens/s, strong-scaling "
                     r"efficiency [\d.]+, collectives alone \d+% of it$", out, flags=re.M), out


def test_cp_measured_rows():
    """The measured step's rows: the slowest rank's unchecked step, efficiency = one process / (W x step), the
    collectives' share, the fullest GPU's peak; validated rows naming the ranks, devices and interconnect."""
    ranks = [{"rank": 0, "n": 60, "cp": 0.012, "unchecked": 0.010, "collectives": 0.001, "peak_gib": 2.0,
              "single": 0.032, "device": "GPU X"},
             {"rank": 1, "n": 68, "cp": 0.013, "unchecked": 0.011, "collectives": 0.002, "peak_gib": 2.5}]
    args = cp.build_parser().parse_args(["--nproc", "2", "--batch", "2", "--heads", "4", "--dim", "64"])
    env = {"gpu": "GPU X", "driver": None, "torch": "t", "triton": "tr", "commit": None, "date": "d"}
    rows = {r["metric"]: r for r in cp.measured_rows(ranks, args, env, "NVLink, 18 active links on GPU 0")}
    got = {m: r["median"] for m, r in rows.items()}
    assert got == pytest.approx({"step_ms": 11.0, "checked_step_ms": 13.0, "single_process_ms": 32.0,
                                 "tokens_per_s": 2 * 128 / 0.011, "strong_scaling_efficiency": 0.032 / 0.022,
                                 "collective_ms": 2.0, "collective_share": 2 / 11, "peak_gib": 2.5})
    r = rows["step_ms"]
    assert r["shape"] == {"B": 2, "T": 128, "W": 2, "H": 4, "d": 64, "e": 64} and r["source"] == "measured"
    assert "GPU X" in r["note"] and "18 active links" in r["note"]


@pytest.mark.gpu
def test_cp_train_example_nccl(_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    argv = [*ARGV, "--device", "cuda", "--wrap", "fsdp", "--seed", str(_seed % 1000)]
    argv[argv.index("--seq") + 1] = "256"
    _check(argv, timeout=300, device="cuda", tol=(1e-4, 1e-3))


def test_cp_predict_standin_rank_runs_the_real_fold():
    """``--predict`` times the last rank of ``W`` in one process with the collectives replaced by local copies,
    every slot of the all-gather holding this rank's states: its outputs must then be those of the last slice
    of the slice repeated ``W`` times (the float64 sequential reference), i.e. the real fold and correction."""
    B, n, H, D, W = 1, 5, 2, 3, 3
    q, k, v = (torch.randn(B, n, H, D, dtype=torch.float64) for _ in range(3))
    z = torch.randn(B, n, H, 2, dtype=torch.float64)
    with cp._standin_group(W - 1, W):
        o, _ = cp.gate_loop_heads_cp(q, k, v, z=z, check_shapes=False, cp_group=None)

    def heads_first(t):  # (B, W n, H, ...) -> (B H, W n, ...), the slice repeated W times
        return t.repeat(1, W, *([1] * (t.ndim - 2))).transpose(1, 2).reshape(B * H, W * n, *t.shape[3:])
    a = torch.complex(*gate_from_preactivation(z))
    want = sequential_reference(heads_first(q), heads_first(k), heads_first(v), heads_first(a)[..., None, None])
    want = want.reshape(B, H, W * n, D).transpose(1, 2)[:, -n:]
    assert (o - want).abs().max() <= 1e-10 * want.abs().max()


def test_cp_collective_model():
    """All-gather + reduce-scatter of ``context_parallel_bytes``' states buffer: latency plus (W-1)/W of it at
    the link's rate, twice; nothing on one rank."""
    nbytes = cp.context_parallel_bytes(1, 8, 64, 64, 8)["forward"]
    assert nbytes == 8 * 8 * (2 + 2 * 64 * 64) * 4
    assert cp.collective_ms(nbytes, 8, 3600, 10) == pytest.approx(2 * (0.01 + 7 / 8 * nbytes / 450e9 * 1e3))
    assert cp.collective_ms(nbytes, 1, 3600, 10) == 0.0


def test_cp_predict_table_on_cpu(capsys):
    """``--predict`` at tiny sizes on the CPU: says its times are not GPU figures, and gives a valid result row
    per metric and (d, T, W), the prediction being the rank's measured compute plus the modelled exchange."""
    args = cp.build_parser().parse_args(["--predict", "--worlds", "1", "2", "--seq", "16", "--dims", "1", "4",
                                         "--heads", "2", "--dtype", "float32", "--repeat", "1", "--device", "cpu",
                                         "--no-record"])
    rows = cp._predict(args)
    assert "NOT GPU figures" in capsys.readouterr().out
    got = {(r["shape"]["d"], r["shape"]["W"], r["metric"]): r["median"] for r in rows}
    assert {(d, W) for d, W, _ in got} == {(1, 1), (1, 2), (4, 1), (4, 2)}
    for d in (1, 4):
        for W in (1, 2):
            coll = cp.collective_ms(cp.context_parallel_bytes(1, 2, d, d, W)["forward"], W, cp.LINK_GBPS,
                                    cp.LINK_LATENCY_US)
            assert got[d, W, "collective_ms"] == pytest.approx(coll)
            pred = got[d, W, "rank_compute_ms"] + coll
            assert got[d, W, "predicted_step_ms"] == pytest.approx(pred)
            assert got[d, W, "predicted_tokens_per_s"] == pytest.approx(16 / pred * 1e3)
            assert got[d, W, "strong_scaling_efficiency"] == pytest.approx(
                got[d, 1, "slice_scan_ms"] / (W * pred))
            assert all(got[d, W, m] > 0 for m in ("slice_scan_ms", "local_scans_ms", "correction_ms"))


@pytest.mark.gpu
def test_cp_predict_on_cuda(capsys):
    """``--predict`` on one GPU (the Triton kernels, do_bench): the stand-in rank against the single-process scan of
    the slice repeated ``W`` times (float32), and a small table whose predicted steps are positive."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    B, n, H, D, W = 1, 64, 2, 16, 4
    q, k, v = (torch.randn(B, n, H, D, device="cuda") for _ in range(3))
    z = torch.randn(B, n, H, 2, device="cuda")
    with cp._standin_group(W - 1, W):
        o, _ = cp.gate_loop_heads_cp(q, k, v, z=z, check_shapes=False, cp_group=None)
    whole, _ = cp.gate_loop_heads(*(t.repeat(1, W, 1, 1) for t in (q, k, v)), z=z.repeat(1, W, 1, 1))
    torch.testing.assert_close(o, whole[:, -n:], rtol=1e-4, atol=1e-4)
    args = cp.build_parser().parse_args(["--predict", "--worlds", "1", "2", "--seq", "4096", "--dims", "1", "64",
                                         "--device", "cuda", "--no-record"])
    rows = cp._predict(args)
    assert all(r["median"] > 0 for r in rows if r["metric"] == "predicted_step_ms")
    assert "NOT GPU figures" not in capsys.readouterr().out


def test_longest_seq_is_linear_in_memory():
    gib = 2 ** 30
    assert cp.longest_seq(8192, 10 * gib, 80 * gib) == int(8192 * cp.LONGEST_FRACTION * 8)
    assert cp.longest_seq(8192, 10 * gib, 80 * gib) * 2 == cp.longest_seq(16384, 10 * gib, 80 * gib)
