"""Where ``bench`` lives: not installed (``setup.py`` packages only the two libraries), run from the checkout and
writing into the checkout's ``bench/out/`` and ``bench/results/`` wherever it is started from; its tools in
``bench/tools/``; no test but the benchmark tool tests (``tests/bench/test_bench_*.py``) imports it."""
import ast
import os
import re
import subprocess
import sys

from setuptools import find_packages

import bench
from bench import results

from helpers import ROOT


def _find_packages_kwargs() -> dict:
    """The keyword arguments of the ``find_packages(...)`` call in ``setup.py``'s ``packages=``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "find_packages"]
    assert len(calls) == 1, "setup.py should call find_packages once"
    return {kw.arg: ast.literal_eval(kw.value) for kw in calls[0].keywords}


def test_setup_packages_only_the_two_libraries():
    packages = find_packages(where=str(ROOT), **_find_packages_kwargs())
    assert {p.split(".")[0] for p in packages} == {"gateloop_kernels", "reversible"}, packages
    assert "reversible.compat" in packages and "bench" not in packages


def test_outputs_resolve_to_the_checkout_from_any_working_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import bench, bench.results as r; print(bench.OUT); print(r.RESULTS)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == [str(ROOT / "bench" / "out"), str(ROOT / "bench" / "results")]
    assert bench.OUT == out[0] and results.RESULTS == out[1]


def test_tools_run_as_modules_of_bench_tools(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "bench.tools.ncu", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "python -m bench.tools.ncu" in p.stdout, p.stderr
    tools = {f.stem for f in (ROOT / "bench" / "tools").glob("*.py")} - {"__init__"}
    assert tools == {"ncu", "offline_kernels", "memcheck", "memcheck_revkern", "host_probe", "kernel_times",
                     "memory_peak", "op_count", "state_forms"}
    assert not [f.name for f in (ROOT / "bench").glob("_*.py") if f.name not in ("__init__.py", "__main__.py",
                                                                                  "_ceilings.py")]


def test_only_the_benchmark_tool_tests_import_bench():
    pattern = re.compile(r"^\s*(from\s+bench[\s.]|import\s+bench\b)", re.M)
    tests = ROOT / "tests"
    files = list(tests.rglob("*.py"))
    assert tests / "gateloop" / "test_chunked.py" in files and tests / "helpers" / "seed_reversible.py" in files
    allowed = sorted(tests.rglob("test_bench_*.py"))
    assert allowed == sorted((tests / "bench").glob("test_*.py")), "tests/bench/ holds the test_bench_*.py files"
    offenders = [str(f.relative_to(tests)) for f in files if f not in allowed and pattern.search(f.read_text())]
    assert offenders == []


def test_the_seed_port_lives_in_tests_and_the_benchmark_sums_its_halves():
    import torch

    from bench import peers
    assert not (ROOT / "bench" / "_seed_reversible.py").exists()
    helpers = ROOT / "tests" / "helpers"
    assert peers._HELPERS == str(helpers) and peers._seed.__file__ == str(helpers / "seed_reversible.py")
    assert peers.LiveBytes.__module__ == "bench_live_bytes"  # the memory tests' tally, loaded from tests/helpers/
    assert peers.LiveBytes.__init__.__code__.co_filename == str(helpers / "live_bytes.py")
    pairs = [(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))]
    bench_seed, test_seed = peers.SeedReversibleSequence(pairs), peers._seed.SeedReversibleSequence(pairs)
    x = torch.randn(3, 2)
    with torch.no_grad():
        assert (bench_seed.merge, test_seed.merge) == ("sum", "mean")
        torch.testing.assert_close(bench_seed(x), 2 * test_seed(x))
