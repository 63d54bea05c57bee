"""Markers, the GPU skip and the per-test fixtures of the whole suite. Tests live per package (``gateloop/``,
``reversible/``, ``bench/``; unique file names, no ``__init__.py``); under pytest's default prepend import
mode this conftest puts ``tests/`` on ``sys.path``, so they import what they share from ``helpers``."""
import os
import sys

import pytest
import torch

from helpers import ROOT

# the checkout's packages first: otherwise tests/bench/ and tests/reversible/ (on sys.path as folders of tests/)
# shadow ``bench`` and ``reversible`` as namespace packages wherever the checkout's root is not on sys.path
# (``pytest`` rather than ``python -m pytest``, another working directory, an editable install's finder)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on the CPU)")
    # pytest-xdist's (registered here too for runs without it): tests of one group share a worker, so under
    # `-n 8 --dist loadgroup` (bench/gpu.sh) the suite's largest GPU tests run one at a time
    config.addinivalue_line("markers", "xdist_group(name): run the group's tests on one pytest-xdist worker")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    # fresh random inputs every run, but reproducible from the printed seed on failure
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(autouse=True)
def _gpu_memory(request):
    """GPU tests return their cached blocks after each test, so that pytest-xdist workers on one card hold only
    what their current tests need (each worker's allocator otherwise keeps its largest test's peak); with
    ``GATELOOP_GPU_MEM_LOG=path`` (bench/gpu.sh) each test's peak is appended there."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    path = os.environ.get("GATELOOP_GPU_MEM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{torch.cuda.max_memory_reserved() / 2**30:6.2f} GiB reserved  "
                    f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB allocated  {request.node.nodeid}\n")
    torch.cuda.empty_cache()
