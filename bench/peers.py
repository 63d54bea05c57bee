"""What the benchmarks share with the tests, loaded from the checkout's ``tests/helpers/`` (``bench`` runs from
the checkout; no test imports ``bench``): the seeds' reversible stack, the reversible benchmark's baseline
(``tests/helpers/seed_reversible.py``, the bug tests' baseline too), with the two halves summed as
h-transformer-1d's ``ReversibleSequence`` does; and the CPU memory tally (``tests/helpers/live_bytes.py``)."""
from __future__ import annotations

import functools
import importlib.util
import os

_HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers")


def _load(name: str):
    path = os.path.join(_HELPERS, name + ".py")
    spec = importlib.util.spec_from_file_location("bench_" + name, path)
    if spec is None or not os.path.exists(path):
        raise ImportError(f"{path} is missing: run bench from a checkout")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_seed = _load("seed_reversible")
#: ``SeedReversibleSequence(pairs, dim=-1)``: the seeds' stack, halves summed
SeedReversibleSequence = functools.partial(_seed.SeedReversibleSequence, merge="sum")
seed_reconstruction_error = _seed.seed_reconstruction_error
#: the CPU memory tally of the memory tests
LiveBytes = _load("live_bytes").LiveBytes
