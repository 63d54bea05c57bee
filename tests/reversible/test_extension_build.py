"""Build checks of the revkern extension that CI can run without a GPU.

* the CUDA source compiles with nvcc (csrc/reversible/check_cuda_compile.sh: the kernels header to sm_90
  machine code, and revkern_cuda.cu with torch's headers through nvcc's front end to PTX;
  REVKERN_CHECK_MODE=full for the full `-c`); started in the background when this module is
  imported so that it overlaps the other tests;
* the C++-only extension JIT-builds from a cold cache (timed; skipped unless
  REVERSIBLE_TEST_COLD_BUILD=1, since the module-scoped load in test_extension.py already builds it);
* the wheel holds only the two libraries, with the extension's sources inside ``reversible/`` where an installed
  copy's JIT build looks for them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from helpers import ROOT

SCRIPT = ROOT / "csrc" / "reversible" / "check_cuda_compile.sh"


def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc") or next(
        (p for p in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc") if os.path.exists(p)), None)


_NVCC = _nvcc()
_proc = None
_t0 = time.perf_counter()
if _NVCC and os.environ.get("REVERSIBLE_TEST_NVCC", "1") != "0":
    _env = dict(os.environ, NVCC=_NVCC, REVKERN_CHECK_ARCHS=os.environ.get("REVKERN_CHECK_ARCHS", "90"),
                REVKERN_CHECK_MODE=os.environ.get("REVKERN_CHECK_MODE", "frontend"))
    _proc = subprocess.Popen(["bash", str(SCRIPT), sys.executable], cwd=ROOT, env=_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cuda_source_compiles_with_nvcc():
    if _proc is None:
        pytest.skip("nvcc not found (or REVERSIBLE_TEST_NVCC=0)")
    out, _ = _proc.communicate(timeout=600)
    if _proc.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    tail = "\n".join(out.strip().splitlines()[-40:])
    assert _proc.returncode == 0, f"nvcc compile check failed:\n{tail}"
    assert "revkern_cuda.cu OK" in out
    print(f"nvcc compile check done {time.perf_counter() - _t0:.1f} s after start")


@pytest.mark.skipif(os.environ.get("REVERSIBLE_TEST_COLD_BUILD") != "1", reason="set REVERSIBLE_TEST_COLD_BUILD=1")
def test_cold_jit_build(tmp_path):
    code = ("import time, torch, reversible._extension as e; t=time.perf_counter(); ok=e.load(); "
            "print(ok, round(time.perf_counter()-t, 1), e.extension_info()['reason'])")
    env = dict(os.environ, REVERSIBLE_EXT_CACHE=str(tmp_path), REVERSIBLE_EXTENSION_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.stdout.startswith("True"), out.stdout + out.stderr
    print("cold JIT build:", out.stdout.strip())


def test_wheel_holds_the_two_libraries_and_the_extension_sources(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools writes its build tree next to setup.py
    for name in ("gateloop_kernels", "reversible", "csrc", "tests", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = dict(os.environ, REVERSIBLE_BUILD_EXTENSION="0")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "whl"), str(src)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"gateloop_kernels", "reversible"}
    sources = {p.name for p in (ROOT / "csrc" / "reversible").iterdir() if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert {n.split("/", 2)[2] for n in names if n.startswith("reversible/csrc/")} == sources
    code = "import reversible._extension as e; print(e._CSRC)"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                           capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == str(site / "reversible" / "csrc"), found.stdout + found.stderr
