"""Benchmarks: ``python -m bench [--quick] [scan|reversible|model|train|summary] [options]`` (``--help`` lists them).

Every benchmark writes its JSON (and plots, where matplotlib imports) to :data:`OUT` unless told otherwise.
"""
import os

#: where the benchmarks write their results and ``python -m bench summary`` reads them: ``bench/out/``
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
