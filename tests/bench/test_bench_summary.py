"""The benchmark summary reads what the benchmarks wrote, and says so when nothing is there."""
import json

from bench import summary


def test_summary_reads_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(summary, "OUT", str(tmp_path))
    summary.main([])
    assert "no results" in capsys.readouterr().out
    rows = [dict(which="seed", heads=8, batch=8, seq=2048, amp=False, tokens_per_s=1e4),
            dict(which="ours", heads=8, batch=8, seq=2048, amp=False, tokens_per_s=1.4e5),
            dict(which="seed", heads=8, batch=8, seq=2048, amp=True, error="RuntimeError: view_as_complex"),
            dict(which="ours", heads=8, batch=8, seq=2048, amp=True, tokens_per_s=2.5e5)]
    (tmp_path / "model.json").write_text(json.dumps({"info": {}, "rows": rows}))
    (tmp_path / "train.json").write_text(json.dumps({"config": "tiny", "steps": 5, "runs": {"ours fp32": {"final_acc": 0.5}}}))
    (tmp_path / "scan.json").write_text(json.dumps({"meta": {}, "rows": [{"impl": "ours (b,n,h)", "BH": 4, "n": 8}]}))
    summary.main([])
    out = capsys.readouterr().out
    assert "14.0x the seed" in out and "seed: RuntimeError" in out and "ours fp32 0.50" in out
    assert "could not read" in out  # a scan row without its fields is reported, not a crash


def test_summary_chunked_rows_show_device_time_when_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(summary, "OUT", str(tmp_path))
    (tmp_path / "scan_chunked.json").write_text(json.dumps({"rows": [
        dict(bh=64, n=2048, d=64, mode="ieee", ours_fwdbwd_ms=1.2, ours_device_fwdbwd_ms=1.1),
        dict(bh=64, n=2048, d=64, mode="bf16", ours_fwdbwd_ms=0.9)]}))
    summary.main([])
    out = capsys.readouterr().out
    assert "ieee: fwd+bwd ours 1.200 ms (device 1.100 ms), seed" in out
    assert "bf16: fwd+bwd ours 0.900 ms, seed" in out
