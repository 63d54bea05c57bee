"""The benchmark command line (``python -m bench``): a wrong command fails at once with status 2, before any
benchmark runs; ``--help`` works everywhere and lists the options; no empty plot is written; a peer that is
not installed is reported as such. No benchmark runs here: their ``main`` functions are replaced."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bench
from bench import __main__ as cli
from bench import model, reversible, scan, scan_chunked, summary, train

from helpers import ROOT

NAMES = ("scan", "reversible", "model", "train", "summary")


@pytest.fixture
def calls(monkeypatch):
    """Every subcommand's ``main`` replaced by a recorder: ``calls`` lists ``(name, argv)`` as they run."""
    seen = []
    for name in NAMES:
        monkeypatch.setattr(f"bench.{name}.main", lambda argv, name=name: seen.append((name, list(argv))))
    return seen


def test_misspelt_subcommand_exits_2_at_once_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # before the fix this ran the whole scan benchmark first (minutes): the timeout turns that into a failure
    p = subprocess.run([sys.executable, "-m", "bench", "scna"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "invalid choice: 'scna'" in p.stderr
    assert p.stdout == ""  # nothing ran, not even the device line


@pytest.mark.parametrize("argv", [["--quik"], ["scan", "--quik"], ["scan", "--peers", "none", "--bogus", "1"],
                                  ["reversible", "--quick"], ["model", "--steps", "3"], ["train", "--quick"],
                                  ["summary", "extra"], ["--quick", "scan"]])
def test_unknown_option_exits_2_before_anything_runs(argv, calls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert calls == []
    err = capsys.readouterr().err
    assert "error:" in err and "usage: python -m bench" in err


@pytest.mark.parametrize("argv, message", [
    (["reversible", "--depths", "0"], "argument --depths: must be >= 1, got '0'"),
    (["reversible", "--warmup", "-1"], "argument --warmup: must be >= 0"),
    (["reversible", "--d-model", "x"], "argument --d-model: invalid int value: 'x'"),
    (["train", "--steps", "0"], "argument --steps: must be >= 1"),  # was the config's 600 steps (0 read as unset)
    (["train", "--steps", "-1"], "argument --steps: must be >= 1"),  # was a ZeroDivisionError after the runs
    (["generate", "--new", "-1"], "argument --new: must be >= 1"),
    (["generate", "--prefill-chunk", "0"], "argument --prefill-chunk: must be >= 1"),
    (["cp", "--nproc", "0"], "argument --nproc: must be >= 1"),  # was a hang: a process group of no ranks
    (["cp", "--repeat", "0"], "argument --repeat: must be >= 1"),
    (["cp", "--predict", "--worlds", "0"], "argument --worlds: must be >= 1"),
    (["cp", "--predict", "--link-gbps", "0"], "argument --link-gbps: must be > 0"),
    (["cp", "--train", "--vocab", "0"], "argument --vocab: must be >= 1")])
def test_a_count_out_of_range_is_a_usage_error_before_anything_runs(argv, message, capsys):
    """Counts and sizes are checked by the parser (found by a new user: each of these was a traceback, a hang or a
    silent default)."""
    with pytest.raises(SystemExit) as e:
        cli.plan(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["scan", "--shapes", "foo"], "argument --shapes: 'foo' in 'foo' is not BH:n:d with positive ints (or main)"),
    (["scan", "--shapes", "64:2048"], "is not BH:n:d"),
    (["scan", "--modes", "ieee,fp8"], "argument --modes: 'fp8' in 'ieee,fp8' is not one of ieee, tf32x3, tf32, bf16"),
    (["scan", "--peers", "accelerated-scan"], "argument --peers: 'accelerated-scan'"),
    (["scan", "--chunk-sizes", "48"], "argument --chunk-sizes: '48' in '48' is not a chunk size 16, 32, 64 or 128"),
    (["scan", "--tune-kernels", "fwd"], "argument --tune-kernels: 'fwd'")])
def test_a_wrong_chunked_scan_list_is_a_usage_error_on_any_machine(argv, message, capsys):
    """The chunked scan reads these lists only on a GPU, after its device line (found by a new user: on the GPU
    ``--shapes foo`` was a ValueError traceback, on the CPU every wrong list passed silently)."""
    with pytest.raises(SystemExit) as e:
        cli.plan(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    args = scan.build_parser().parse_args(["--shapes", "32:8192:64,16:4096:128", "--modes", "tf32,bf16",
                                           "--peers", "none", "--chunk-sizes", "32,128", "--tune-kernels", "bwd_dqk"])
    assert (args.shapes, args.modes, args.chunk_sizes) == ("32:8192:64,16:4096:128", "tf32,bf16", "32,128")
    assert scan.build_parser().parse_args([]).shapes == "main"


@pytest.mark.parametrize("argv, message", [
    (["train", "--device", "bogus"], "argument --device: not a torch device: 'bogus'"),  # was a RuntimeError
    (["model", "--device", "gpu"], "argument --device: not a torch device: 'gpu'"),  # was a table of "fails"
    (["overhead", "--shape", "8by2048"], "argument --shape: must be BxT with positive ints"),  # a GPU's ValueError
    (["overhead", "--shape", "8x0"], "argument --shape: must be BxT with positive ints")])
def test_a_wrong_device_or_model_shape_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.plan(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    from bench import overhead
    assert overhead.build_parser().parse_args(["--shape", "8x2048", "--shape", "1x8192"]).shape == [(8, 2048),
                                                                                                    (1, 8192)]
    if torch.cuda.device_count() >= 2:  # cuda:N is the current device, named "cuda" as the benchmarks compare it
        assert model.build_parser().parse_args(["--device", "cuda:1"]).device == "cuda"
        assert torch.cuda.current_device() == 1
        torch.cuda.set_device(0)
    assert model.build_parser().parse_args(["--device", "cpu"]).device == "cpu"


@pytest.mark.parametrize("argv", [["train", "--device", "cuda"], ["model", "--device", "cuda"],
                                  ["generate", "--device", "cuda"], ["model", "--device", "cuda:{n}"]])
def test_a_cuda_device_the_machine_lacks_is_a_usage_error(argv, capsys):
    """Found by a new user on a CPU: ``--device cuda`` was an AssertionError traceback (train, generate) or 24
    failing rows and exit status 0 (model)."""
    n = torch.cuda.device_count()
    argv = [a.format(n=n) for a in argv]
    if n and argv[-1] == "cuda":
        assert cli.plan(argv) == [(argv[0], argv[1:])]  # the machine has one: accepted
        return
    with pytest.raises(SystemExit) as e:
        cli.plan(argv)
    assert e.value.code == 2
    assert f"argument --device: '{argv[-1]}': this machine has {n} CUDA device(s)" in capsys.readouterr().err


def test_cp_device_cuda_without_a_gpu_per_rank_is_a_usage_error(capsys):
    from bench import cp
    n = torch.cuda.device_count()
    with pytest.raises(SystemExit) as e:  # cp's parser checks it in main, before any rank is spawned
        cp.main(["--device", "cuda", "--nproc", str(n + 1)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m bench cp" in err
    assert f"--device cuda needs {n + 1} CUDA device(s) (one per rank), this machine has {n}" in err


def test_heads_that_do_not_divide_the_width_are_a_usage_error(tmp_path, capsys):
    from bench import generate
    with pytest.raises(SystemExit) as e:  # was a RuntimeError from a view in the first block's attention
        reversible.main(["--heads", "3", "--d-model", "64", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--d-model 64 must be divisible by --heads 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # was the Transformer's ValueError about 21 gate loop heads
        generate.main(["--head-dims", "3", "--dim", "64", "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "every --head-dims must divide the model width 64" in capsys.readouterr().err


def test_quick_runs_every_benchmark_with_its_quick_options(calls):
    cli.main(["--quick"])
    assert calls == [("scan", ["--quick"]), ("reversible", []), ("model", ["--quick"]), ("train", []),
                     ("summary", [])]


def test_subcommand_gets_its_options_and_the_chunked_ones_through_scan(calls):
    cli.main(["scan", "--quick", "--peers", "none"])
    assert calls == [("scan", ["--quick", "--peers", "none"])]
    args = scan.build_parser().parse_args(["--quick", "--peers", "none", "--sweep"])
    assert (args.quick, args.peers, args.sweep, args.no_chunked) == (True, "none", True, False)


@pytest.mark.parametrize("name,option", [(None, "--quick"), ("scan", "--no-chunked"), ("scan", "--peers"),
                                         ("reversible", "--depths"), ("model", "--compile"), ("train", "--steps"),
                                         ("summary", "--help")])
def test_help_lists_the_options(name, option, calls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"] if name else ["--help"])
    assert e.value.code == 0
    assert calls == []
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m bench{' ' + name if name else ''} ")
    assert option in out
    if name is None:
        assert all(n in out for n in NAMES)


def test_every_benchmark_writes_to_bench_out_by_default():
    for mod in (scan, reversible, model, train):
        assert Path(mod.build_parser().parse_args([]).out) == Path(bench.OUT), mod.__name__
    assert Path(bench.OUT) == ROOT / "bench" / "out"
    assert summary.OUT == bench.OUT
    assert scan_chunked.build_parser().parse_args([]).json is None  # resolved to bench/out/scan_chunked.json


# ----------------------------------------------------------------------------- plots

def _scan_rows(shapes):
    return [dict(impl=impl, BH=bh, n=n, dtype=dt, fwd_ms=0.1 * n / 256, fwdbwd_ms=0.3 * n / 256)
            for bh, n in shapes for impl in ("ours (b,n,h)", "seed (upstream)") for dt in ("float32", "bfloat16")]


def _rev_rows(memory):
    return [dict(variant=v, depth=dep, step_ms=1.0 + dep, **({"act_gib": 0.1 * dep} if memory else {}))
            for v in reversible.VARIANTS for dep in (2, 4)]


def test_no_plot_without_data(tmp_path, capsys):
    png = tmp_path / "scan.png"
    png.write_bytes(b"a plot of an earlier run")
    scan._plot([dict(impl="ours (b,n,h)", BH=4, n=8, dtype="float32", error="out of memory")], str(png))
    assert not png.exists()
    assert "no plot: no total size" in capsys.readouterr().out
    rpng = tmp_path / "reversible_tiny.png"
    rpng.write_bytes(b"a plot of an earlier run")
    assert reversible.plot([dict(variant="plain", depth=2, error="OOM")], rpng, "t").startswith("no plot")
    assert not rpng.exists()


def test_scan_plot_only_where_two_n_were_timed_at_one_size(tmp_path, capsys):
    png = tmp_path / "scan.png"
    scan._plot(_scan_rows([(4096, 2048), (64, 1024)]), str(png))  # the GPU's --quick shapes: one n per size
    assert not png.exists()
    assert "no plot" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" among others
        scan._plot(_scan_rows([(16, 256), (4, 1024)]), str(png), "cpu")  # the CPU's shapes: 4096 elements each
    assert png.stat().st_size > 10_000


def test_reversible_plot_without_memory_draws_time_only(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "reversible_tiny.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = reversible.plot(_rev_rows(memory=False), png, "cpu")  # the CPU: no allocator statistics
    assert msg.startswith(f"wrote {png}") and "step time only" in msg
    assert png.stat().st_size > 10_000
    assert reversible.plot(_rev_rows(memory=True), png, "gpu") == f"wrote {png}"


# ----------------------------------------------------------------------------- peers

def test_seed_not_installed_is_reported_as_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gateloop_transformer", None)  # import fails as if not installed

    def fake_measure(which, heads, batch, seq, amp, device, dim=512, depth=6, **kw):
        model._make(which, heads, dim, depth, False)  # the seed's import fails here when it is tried
        return {"tokens_per_s": 1e3, "step_ms": 1.0, "peak_gib": None, "loss": 1.0}

    monkeypatch.setattr(model, "measure", fake_measure)
    model.main(["--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = out[out.index("heads  batch"):]
    assert "not installed" in table and "fails" not in table
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert all("skipped" in r and "error" not in r for r in rows if r["which"] == "seed")
    monkeypatch.setattr(summary, "OUT", str(tmp_path))
    summary.main([])
    assert "seed not installed" in capsys.readouterr().out


def test_summary_says_which_scan_peers_are_not_installed(tmp_path, monkeypatch, capsys):
    rows = [dict(impl=impl, BH=16, n=256, dtype="float32", fwdbwd_ms=ms, graph_fwdbwd_ms=float("nan"))
            for impl, ms in (("ours (b,n,h)", 1.0), ("seed (reference)", 2.0))]
    peers = {"seed": "seed (reference)", "accelerated-scan": "not installed"}
    (tmp_path / "scan.json").write_text(json.dumps({"meta": {"peers": peers}, "rows": rows}))
    monkeypatch.setattr(summary, "OUT", str(tmp_path))
    summary.main([])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("scan d=1"))
    assert "ours 1.000 ms" in line and "reference 2.000 ms (upstream not installed)" in line
    assert "accelerated-scan not installed" in line


def test_overhead_calling_thread_rows_say_so(monkeypatch):
    """``bench overhead --calling-thread`` runs its cases with autograd's multithreading off and marks every row's
    impl (the rows stand beside the default's, which take the device thread)."""
    from bench import harness, overhead
    seen, recorded = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(overhead, "CASES", [(2, 8, 1, torch.float32, "ieee")])
    monkeypatch.setattr(harness, "environment", lambda: dict(gpu="test", driver=None, torch="t", triton="t",
                                                              commit=None, date="d"))

    def fake_case(B, n, d, dtype, precision, profile):
        seen.append(torch._C._is_multithreading_enabled())
        return {"B": B, "n": n, "d": d, "dtype": "float32", "precision": precision, "device_ms": 1.0,
                "host_ms": 2.0, "eager": harness.summarize([3.0]), "graph": harness.summarize([1.0])}
    monkeypatch.setattr(overhead, "run_case", fake_case)
    monkeypatch.setattr(harness, "record", lambda bench, rows, flag, log=None: recorded.extend(rows))
    overhead.main(["--calling-thread", "--no-record"])
    overhead.main(["--no-record"])
    assert seen == [False, True]
    impls = [r["impl"] for r in recorded]
    assert impls[:4] == ["ours (backward on the calling thread)"] * 4 and impls[4:] == ["ours"] * 4


def test_scan_calling_thread_rows_say_so(monkeypatch, tmp_path):
    """``bench scan --calling-thread`` times every implementation (ours and the peers alike) with autograd's
    multithreading off and marks every row's impl, as ``bench overhead`` does (the drop-in's comparison with
    accelerated-scan in both modes)."""
    from bench import harness, scan
    seen, recorded = [], []

    def fake_case(BH, n, dtype, device, check_grads=True):
        seen.append(torch._C._is_multithreading_enabled())
        return [{"impl": "accel-scan", "BH": BH, "n": n, "d": 1, "dtype": "float32", "fwd_ms": 1.0, "fwdbwd_ms": 2.0,
                 "fwd_floor_ms": 0.5, "fwdbwd_floor_ms": 1.0, "fwd_GBps": 1.0, "fwdbwd_GBps": 1.0,
                 "fwd_frac_floor": 0.5, "fwdbwd_frac_floor": 0.5, "rel_err_fwd": 0.0}]
    monkeypatch.setattr(scan, "run_case", fake_case)
    monkeypatch.setattr(scan, "_plot", lambda *a, **k: None)
    monkeypatch.setattr(harness, "record", lambda bench, rows, flag, log=None: recorded.append(rows))
    for extra in (["--calling-thread"], []):
        scan.main(["--quick", "--no-chunked", "--no-record", "--out", str(tmp_path)] + extra)
    assert seen == [False] * 4 + [True] * 4
    with_thread, default = ({r["impl"] for r in rows if r["impl"] != "bytes floor"} for rows in recorded)
    assert with_thread == {"accel-scan (backward on the calling thread)"} and default == {"accel-scan"}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_overhead_pin_core_pins_the_timing_thread_and_says_so(monkeypatch):
    """``bench overhead --pin-core N`` times its cases with this thread's affinity {N} (the autograd device thread a
    first backward starts inherits it), restores the mask afterwards and marks the rows; a core outside this
    process's mask is a usage error (exit status 2)."""
    from bench import harness, overhead
    core = max(os.sched_getaffinity(0))
    before, seen, recorded = os.sched_getaffinity(0), [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(overhead, "CASES", [(2, 8, 1, torch.float32, "ieee")])
    monkeypatch.setattr(harness, "environment", lambda: dict(gpu="test", driver=None, torch="t", triton="t",
                                                              commit=None, date="d"))

    def fake_case(B, n, d, dtype, precision, profile):
        seen.append(os.sched_getaffinity(0))
        return {"B": B, "n": n, "d": d, "dtype": "float32", "precision": precision, "device_ms": 1.0,
                "host_ms": 2.0, "eager": harness.summarize([3.0]), "graph": harness.summarize([1.0])}
    monkeypatch.setattr(overhead, "run_case", fake_case)
    monkeypatch.setattr(harness, "record", lambda bench, rows, flag, log=None: recorded.extend(rows))
    overhead.main(["--pin-core", str(core), "--no-record"])
    assert seen == [{core}] and os.sched_getaffinity(0) == before
    assert {r["impl"] for r in recorded} == {"ours (threads pinned to one core)"}
    with pytest.raises(SystemExit) as e:
        overhead.main(["--pin-core", "100000", "--no-record"])
    assert e.value.code == 2
