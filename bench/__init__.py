"""Benchmarks: ``python -m bench [--quick] [scan|reversible|model|train|summary] [options]`` (``--help`` lists them).

Every benchmark writes its JSON (and plots, where matplotlib imports) to :data:`OUT` unless told otherwise, and on
a GPU appends its figures as result rows to ``bench/results/`` (:mod:`bench.results`), from which
``python -m bench render`` draws ``docs/results.md``. The benchmarks share :mod:`bench.harness` (timing, oracle
check, floors, rows); the profiling and diagnostic tools are in :mod:`bench.tools`. ``bench`` is not installed:
it runs from the checkout, and these paths are the checkout's wherever it is started from.
"""
import os

#: where the benchmarks write their results and ``python -m bench summary`` reads them: ``bench/out/``
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
