"""The seeds' reversible stack, bugs included, for the bug tests: the benchmark's port
(``bench/_seed_reversible.py``) with the mean merge the tests' oracle uses. Not used by the library."""
import functools

from bench._seed_reversible import SeedReversibleSequence as _SeedReversibleSequence

SeedReversibleSequence = functools.partial(_SeedReversibleSequence, merge="mean")
