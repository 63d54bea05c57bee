"""The packed-sequence benchmark (``python -m bench scan --varlen``, :mod:`bench.varlen`) at tiny sizes on the CPU:
it runs, checks the packed result against the padded one, and writes the ratios it prints."""
import json

import pytest
import torch

from bench import harness, scan, varlen


@pytest.fixture
def one_thread():
    """Tiny shapes: more intra-op threads only contend with the other test workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lengths_are_log_uniform_draws_that_fill_the_row():
    ls = varlen.draw_lengths(1000, 8, 300, seed=3)
    assert sum(ls) == 1000 and min(ls) >= 1 and max(ls) <= 300
    assert ls == varlen.draw_lengths(1000, 8, 300, seed=3) != varlen.draw_lengths(1000, 8, 300, seed=4)


def test_scan_varlen_runs_only_the_packed_benchmark(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(varlen, "main", lambda argv: seen.append(argv))
    monkeypatch.setattr(scan, "run_case", lambda *a, **k: pytest.fail("the head-dim-1 benchmark ran"))
    scan.main(["--varlen", "--quick", "--no-record", "--out", str(tmp_path)])
    assert seen == [["--out", str(tmp_path), "--quick", "--no-record"]]


def test_tiny_run_checks_packed_against_padded_and_writes_the_ratios(tmp_path, capsys, one_thread):
    rows = varlen.main(["--tokens", "80", "--min-len", "2", "--max-len", "24", "--head-dims", "1,16",
                        "--channels", "3", "--heads", "1", "--quick", "--no-record", "--out", str(tmp_path)])
    assert [(r["d"], r["dtype"]) for r in rows] == [(1, "float32"), (1, "bfloat16"), (16, "float32"),
                                                     (16, "bfloat16")]
    for r in rows:
        assert "error" not in r and r["rel_err"] <= (1e-5 if r["dtype"] == "float32" else 2e-2), r
        assert r["packed_over_unpacked"] == pytest.approx(r["packed_ms"] / r["unpacked_ms"])
        assert r["padded_over_unpacked"] == pytest.approx(r["padded_ms"] / r["unpacked_ms"])
    saved = json.loads((tmp_path / "varlen.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and sum(saved["meta"]["lengths"]) == 80
    assert "pack/unp" in capsys.readouterr().out
    recorded = varlen.result_rows(rows, harness.environment())
    assert len(recorded) == 5 * len(rows) and {r["benchmark"] for r in recorded} == {"varlen"}
