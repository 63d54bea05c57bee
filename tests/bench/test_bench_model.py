"""``bench/model.py``'s table and result rows (no model runs here)."""
import torch

from bench import model as bench_model
from bench import results


def test_bench_table_puts_compiled_rows_beside_eager(capsys):
    """``bench/model.py``'s table: a compiled row of ours lands on its configuration's line (after seed
    and ours eager), with its speed against ours eager and its compile time."""
    base = dict(heads=8, batch=8, seq=2048, amp=True)
    rows = [dict(base, which="seed", compiled=False, error="RuntimeError: view_as_complex"),
            dict(base, which="ours", compiled=False, tokens_per_s=1e5, peak_gib=2.0),
            dict(base, which="ours", compiled=True, tokens_per_s=3e5, peak_gib=1.5, compile_s=42.0)]
    bench_model._table(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "compiled tok/s" in lines[0] and len(lines) == 2
    assert "fails" in lines[1] and "100000" in lines[1] and "300000" in lines[1]
    assert "3.00x" in lines[1] and "42.0" in lines[1]


def test_result_rows_carry_tokens_per_second_with_spread_and_skip_failed_configurations():
    base = dict(heads=8, batch=8, seq=2048, amp=False)
    rows = [dict(base, which="seed", compiled=False, error="RuntimeError: x"),
            dict(base, which="ours", compiled=False, tokens_per_s=16384 / 0.05, step_ms=50.0,
                 step_spread_ms=[40.0, 80.0], host_ms=20.0, peak_gib=2.0)]
    env = dict(gpu="G", driver=None, torch="t", triton="tr", commit=None, date="2026-01-01 00:00 UTC")
    out = bench_model.result_rows(rows, env)
    by = {r["metric"]: r for r in out}
    assert set(by) == {"tokens_per_s", "step_ms", "host_ms", "peak_gib"} and all(r["impl"] == "ours" for r in out)
    assert by["host_ms"]["median"] == 20.0
    assert by["tokens_per_s"]["spread"] == [16384 / 0.08, 16384 / 0.04]  # the slow step gives the low rate
    assert by["tokens_per_s"]["shape"] == {"batch": 8, "seq": 2048, "dim": 512, "depth": 6, "head_dim": 64}
    for r in out:
        results.validate(r)


def test_count_syncs_ignores_the_debug_modes_own_warning(monkeypatch):
    """``set_sync_debug_mode("warn")`` warns once per process that it is a prototype feature ("Synchronization debug
    mode ..."): counted as a synchronisation, it put one a step on whichever model was measured first (the docs then
    read it as ours' one-time initialisation). Only the synchronising calls' own warnings count."""
    import warnings

    from bench import model
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: mode == "warn" and warnings.warn(
        "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations"))
    assert model.count_syncs(lambda: None) == 0
    assert model.count_syncs(lambda: warnings.warn("called a synchronizing CUDA operation")) == 1
