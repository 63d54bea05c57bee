"""The memory tests' CPU tally (kept with the benchmarks, which report the same measure)."""
from bench._live_bytes import LiveBytes

__all__ = ["LiveBytes"]
