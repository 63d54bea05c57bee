"""Benchmarks: ``python -m bench [scan|reversible|model]`` (no argument runs all that fit the machine)."""
