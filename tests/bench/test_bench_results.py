"""Results as data: the row schema (every field required, unknown ones refused, types checked), the store, the
harness's timing summary and record switch, each benchmark's rows, and the page rendered from rows."""
import json
import math

import pytest

from bench import harness, render, results, reversible, scan, scan_chunked, train

ENV = dict(gpu="NVIDIA TEST", driver="1.0", torch="2.0", triton="3.0", commit="abc", date="2026-01-02 03:04 UTC")


def _row(**over):
    r = dict(benchmark="scan", op="scan, head dim 1", impl="ours (b,n,h)", shape={"BH": 4096, "n": 2048, "d": 1},
             dtype="float32", precision=None, metric="graph_fwdbwd_ms", unit="ms", median=0.25, spread=[0.24, 0.26],
             **ENV, source="measured", note=None)
    r.update(over)
    return r


def test_a_complete_row_validates():
    assert results.validate(_row()) == _row()


# ids with a prefix: a test id "gpu" would read as the gpu marker (skipped on the CPU)
@pytest.mark.parametrize("field", sorted(results.FIELDS), ids=lambda f: f"field_{f}")
def test_a_missing_field_is_named(field):
    r = _row()
    del r[field]
    with pytest.raises(ValueError, match=f"lacks required field.*'{field}'"):
        results.validate(r)


def test_an_unknown_field_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['median_ms'\]"):
        results.validate(_row(median_ms=1.0))


@pytest.mark.parametrize("over, match", [
    (dict(median="0.25"), "'median' must be"), (dict(median=math.nan), "'median' must be finite"),
    (dict(median=True), "'median' must be"), (dict(gpu=None), "'gpu' .* may not be null"),
    (dict(shape={"n": 2.5}), "'shape' maps names to ints"), (dict(spread=[1.0]), "'spread' is"),
    (dict(spread=[1.0, "x"]), "'spread' is"), (dict(precision=32), "'precision' must be str")])
def test_wrong_types_are_refused_by_field(over, match):
    with pytest.raises(ValueError, match=match):
        results.validate(_row(**over))


def test_append_writes_all_rows_or_none_and_load_names_the_bad_line(tmp_path):
    results.append("scan", [_row(), _row(median=0.3)], str(tmp_path))
    with pytest.raises(ValueError, match="unknown field"):
        results.append("scan", [_row(), _row(extra=1)], str(tmp_path))
    assert len(results.load(str(tmp_path))) == 2
    with open(tmp_path / "scan.jsonl", "a") as fh:
        fh.write(json.dumps(_row(unit=None)) + "\n")
    with pytest.raises(ValueError, match=r"scan\.jsonl:3: field 'unit'"):
        results.load(str(tmp_path))


def test_the_committed_rows_validate_and_say_where_they_come_from():
    rows = results.load()
    assert {r["benchmark"] for r in rows} >= {"scan", "scan_chunked", "ncu", "model", "reversible"}
    for r in rows:
        assert r["source"] == "measured" or r["source"].startswith("carried from RESULTS.md: ") or (
            r["source"] == "predicted" and r["note"]), r  # (predicted: python -m bench cp --predict, its model noted)
        assert r["gpu"] and r["date"][:4].isdigit()


def test_the_committed_page_is_rendered_from_the_committed_rows():
    with open(render.PAGE) as fh:
        assert fh.read() == render.page(results.load()), "docs/results.md is stale: run python -m bench render"


def test_the_page_shows_the_latest_row_of_each_figure_and_the_headline():
    older = _row(median=0.5, date="2025-01-01 00:00 UTC")
    peer = _row(impl="accel-scan", median=0.65)
    other_gpu = _row(gpu="OTHER GPU", median=9.0)
    text = render.page([older, _row(), peer, other_gpu])
    headline = next(ln for ln in text.splitlines() if ln.startswith("| scan, head dim 1"))
    assert "0.250 ms (accelerated-scan: 0.650 ms)" in headline and "| – |" in headline  # no seed row: a dash
    assert "### scan on NVIDIA TEST" in text and "### scan on OTHER GPU" in text
    assert "0.500 ms" not in text and "0.240 ms – 0.260 ms" in text
    assert "![time per token against the sequence length](plots/scan_vs_n.png)" in text
    with pytest.raises(ValueError, match="unknown field"):
        render.page([_row(bogus=1)])


def test_a_headline_line_never_mixes_gpus():
    """A newer row on another GPU for one figure of a line does not replace that figure alone: the line is read
    from the GPU with rows for most of its figures, and names it."""
    ours, peer = _row(), _row(impl="accel-scan", median=0.65)
    newer_elsewhere = _row(gpu="OTHER GPU", median=0.1, date="2027-01-01 00:00 UTC")
    headline = next(ln for ln in render.page([ours, peer, newer_elsewhere]).splitlines()
                    if ln.startswith("| scan, head dim 1"))
    assert "0.250 ms (accelerated-scan: 0.650 ms)" in headline and "0.100 ms" not in headline
    assert headline.rstrip(" |").endswith("NVIDIA TEST, 2026-01-02")


def test_render_main_writes_the_page_and_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results.append("scan", [_row(), _row(shape={"BH": 8192, "n": 1024, "d": 1}, median=0.2)], str(tmp_path / "r"))
    render.main(["--results", str(tmp_path / "r"), "--page", str(tmp_path / "docs" / "results.md"),
                 "--plots", str(tmp_path / "docs" / "plots")])
    assert "| scan, head dim 1" in (tmp_path / "docs" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "docs" / "plots").iterdir()) == sorted(
        f"{name}.png" for name in render.PLOT_FILES)


def test_summarize_takes_the_median_and_the_20th_and_80th_percentiles():
    t = harness.summarize([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    assert (t.median, t.n) == (3.5, 6) and t.p20 == pytest.approx(2.0) and t.p80 == pytest.approx(5.0)
    assert harness.summarize([7.0]) == harness.Timing(7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError, match="empty"):
        harness.summarize([])


def test_rel_err_is_inf_for_a_non_finite_result():
    import torch
    ref = torch.ones(3)
    assert harness.rel_err(torch.tensor([1.0, 1.0, 1.0 + 3e-3]), ref) == pytest.approx(3e-3 / 3 ** 0.5, rel=1e-4)
    assert harness.rel_err(torch.tensor([1.0, math.nan, 1.0]), ref) == math.inf


def test_record_writes_only_when_asked_or_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    assert harness.record("scan", [_row()], None, results_dir=str(tmp_path)) is None  # CPU default: off
    assert harness.record("scan", [_row()], False, results_dir=str(tmp_path)) is None
    path = harness.record("scan", [_row()], True, results_dir=str(tmp_path), log=lambda s: None)
    assert len(results.load(str(tmp_path))) == 1 and path.endswith("scan.jsonl")
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    harness.record("scan", [_row()], None, results_dir=str(tmp_path), log=lambda s: None)  # GPU default: on
    assert len(results.load(str(tmp_path))) == 2


def test_each_benchmark_turns_its_rows_into_valid_result_rows():
    s = scan.result_rows([{"impl": "ours (b,n,h)", "BH": 64, "n": 1024, "dtype": "float32", "fwd_ms": 0.1,
                           "fwd_spread_ms": [0.09, 0.11], "fwdbwd_ms": 0.3, "fwdbwd_spread_ms": [0.2, 0.4],
                           "graph_fwd_ms": math.nan, "fwd_floor_ms": 0.01, "fwdbwd_floor_ms": 0.03},
                          {"impl": "seed", "BH": 64, "n": 1024, "dtype": "float32", "error": "wrong result"}], ENV)
    assert [(r["impl"], r["metric"]) for r in s] == [("ours (b,n,h)", "fwd_ms"), ("ours (b,n,h)", "fwdbwd_ms"),
                                                     ("bytes floor", "fwd_ms"), ("bytes floor", "fwdbwd_ms")]
    c = scan_chunked.result_rows(dict(bh=64, n=2048, d=64, e=64, mode="bf16", floor_bytes_ms=0.04,
                                      floor_flops_ms=0.03, gflop=1.0, ours_fwdbwd_ms=0.4,
                                      ours_fwdbwd_spread_ms=[0.39, 0.41], fla_kernel_fwdbwd_ms=1.9), ENV)
    assert {(r["impl"], r["dtype"], r["precision"]) for r in c} == {
        ("ours", "bfloat16", None), ("fla chunk_simple_gla (kernel)", "bfloat16", None),
        ("bytes floor", "bfloat16", None), ("flops floor", "bfloat16", None)}
    report = {"meta": {"config": {"d_model": 64, "heads": 4, "seq": 32, "batch": 2, "amp": "fp32"}},
              "results": [dict(variant="plain", depth=2, step_ms=2.0, step_ms_all=[1.0, 2.0, 3.0]),
                          dict(variant="rev_ext", depth=2, step_ms=3.0, act_gib=0.5),
                          dict(variant="seed", depth=2, error="OOM")],
              "micro": [dict(dtype="float32", ext_ms=0.1, torch_inplace_ms=0.2, seed_ms=math.nan)]}
    rv = {(r["impl"], r["metric"]): r["median"] for r in reversible.result_rows(report, ENV)}
    assert rv[("rev_ext", "step_vs_plain")] == 1.5 and rv[("rev_ext", "act_gib")] == 0.5
    assert ("seed", "step_ms") not in rv and ("seed", "ms") not in rv and rv[("extension", "ms")] == 0.1
    t = train.result_rows({"config": "tiny", "steps": 3, "model": {"dim": 64, "depth": 2},
                           "task": {"num_keys": 8, "pairs": 2},
                           "runs": {"ours bf16": {"final_acc": 0.5, "seconds": 1.0}}}, ENV)
    assert [(r["impl"], r["dtype"], r["metric"]) for r in t] == [("ours", "bf16 autocast", "final_acc"),
                                                                  ("ours", "bf16 autocast", "seconds")]
