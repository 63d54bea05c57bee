"""End to end on the CPU: multi-query associative recall (bench/train.py, tiny config).

The fused model's loss curve equals the seed's (same init, same batches) over the first 30 steps:
fp32 to 1e-4 relative, bf16 autocast within 3e-2 (bf16 noise; later the runs part ways as any two
trainings do, chaotically: fp32 by ~1e-2 and bf16 by ~1e-1 at step 60, measured). The model learns
the task (chance accuracy is 1/8)."""
from __future__ import annotations

import pytest
import torch

from bench import train as T


def _run(which, steps, amp=None):
    mcfg, task, opt = T.CONFIGS["tiny"]
    models = T.build_models(mcfg, task, "cpu", seed=0)
    if which not in models:
        pytest.skip("upstream gateloop_transformer not installed")
    return T.train(models[which], task, steps, opt["batch"], opt["lr"], seed=1, device="cpu", autocast_dtype=amp)


def test_mqar_batches_are_well_formed():
    task = T.TaskConfig(num_keys=8, num_values=8, pairs=3, queries=2)
    tokens, targets = T.mqar_batch(task, 5, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (5, task.seq_len)
    keys, values = tokens[:, 0:6:2], tokens[:, 1:6:2]
    for b in range(5):
        lookup = dict(zip(keys[b].tolist(), values[b].tolist()))
        for pos in range(6, task.seq_len, 2):
            assert targets[b, pos] == lookup[tokens[b, pos].item()] == tokens[b, pos + 1]
    assert (targets[:, :6] == T.IGNORE).all() and (targets[:, 7::2] == T.IGNORE).all()


def test_loss_curve_matches_seed_model():
    steps = 30
    seed = _run("seed", steps)["losses"]
    ours = _run("ours", steps)["losses"]
    bf16 = _run("ours", steps, torch.bfloat16)["losses"]
    for s, o, h in zip(seed, ours, bf16):
        assert abs(o - s) <= 1e-4 * abs(s)
        assert abs(h - s) <= 3e-2 * abs(s)


def test_learns_associative_recall():
    result = _run("ours", T.CONFIGS["tiny"][2]["steps"])
    assert result["final_acc"] >= 0.6, result["final_acc"]
