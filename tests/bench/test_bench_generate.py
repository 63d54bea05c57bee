"""``python -m bench.generate`` (the generation benchmark) runs on the CPU."""
import json


def test_bench_generate_runs(tmp_path):
    """``python -m bench.generate`` on the CPU: one row per model, with its figures."""
    from bench import generate as bench_generate

    bench_generate.main(["--head-dims", "1", "--batches", "2", "--prompts", "8", "--new", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert {r["which"] for r in rows} >= {"ours", "attn"}
    for r in rows:
        assert r["decode_ms"] > 0 and r["tokens_per_s"] > 0, r
