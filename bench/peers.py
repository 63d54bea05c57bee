"""The seeds' reversible stack, the reversible benchmark's baseline: ``tests/_seed_reversible.py`` of this checkout
(the bug tests' baseline too, so one port serves both), with the two halves summed as h-transformer-1d's
``ReversibleSequence`` does. ``bench`` runs from the checkout, where that file is."""
from __future__ import annotations

import functools
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "_seed_reversible.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_seed_reversible", _PATH)
    if spec is None or not os.path.exists(_PATH):
        raise ImportError(f"the seeds' reversible port is not at {_PATH}: run bench from a checkout")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_seed = _load()
#: ``SeedReversibleSequence(pairs, dim=-1)``: the seeds' stack, halves summed
SeedReversibleSequence = functools.partial(_seed.SeedReversibleSequence, merge="sum")
seed_reconstruction_error = _seed.seed_reconstruction_error
