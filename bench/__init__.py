"""Benchmarks: ``python -m bench [scan|reversible|model|train]`` (no argument runs all that fit the machine)."""
