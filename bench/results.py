"""Results as data: every published figure is one row of a JSON Lines file ``bench/results/<benchmark>.jsonl``.

A row (:data:`FIELDS` lists the fields; every one is required, :data:`NULLABLE` may be ``null``)::

    {"benchmark": "scan_chunked", "op": "chunked scan", "impl": "ours",
     "shape": {"BH": 64, "n": 2048, "d": 64, "e": 64}, "dtype": "float32", "precision": "ieee", "metric": "fwdbwd_ms", "unit": "ms", "median": 1.061,
     "spread": [1.05, 1.07], "gpu": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130",
     "triton": "3.6.0", "commit": "b2c150c", "date": "2026-12-01 04:12 UTC", "source": "measured", "note": null}

``spread`` is ``[20th, 80th percentile]`` of the timed calls where the benchmark measured it; ``source`` is
``"measured"`` for rows a benchmark appended, or where a figure was carried over from the narrative record
(``docs/history.md``), ``"carried from RESULTS.md <section>"``. :func:`validate` raises ``ValueError`` naming
the field that is missing, unknown or of the wrong type. The benchmarks append rows when run on a GPU
(``--record``/``--no-record``, :func:`bench.harness.record`); ``python -m bench render`` draws
``docs/results.md`` and the plots from them.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional

#: where the rows live: ``bench/results/`` of the checkout
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_STR = (str,)
_NUM = (int, float)
#: field -> accepted types (``dict`` for ``shape``: names to ints; ``list`` for ``spread``: two numbers)
FIELDS = {
    "benchmark": _STR, "op": _STR, "impl": _STR, "shape": (dict,), "dtype": _STR, "precision": _STR,
    "metric": _STR, "unit": _STR, "median": _NUM, "spread": (list,), "gpu": _STR, "driver": _STR,
    "torch": _STR, "triton": _STR, "commit": _STR, "date": _STR, "source": _STR, "note": _STR,
}
#: fields that may be ``null``: no precision choice (16-bit inputs, whole models), no spread (one sample, or a
#: carried figure), a driver, version or commit the record does not state, no note
NULLABLE = {"precision", "spread", "driver", "torch", "triton", "commit", "note"}


def validate(row: dict) -> dict:
    """``row`` itself if it is a valid result row; else ``ValueError`` naming the field at fault."""
    if not isinstance(row, dict):
        raise ValueError(f"a result row is a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in result row (known: {sorted(FIELDS)})")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"result row lacks required field(s) {missing}")
    for field, types in FIELDS.items():
        val = row[field]
        if val is None:
            if field not in NULLABLE:
                raise ValueError(f"field {field!r} of a result row may not be null")
            continue
        if not isinstance(val, types) or isinstance(val, bool):
            raise ValueError(f"field {field!r} must be {' or '.join(t.__name__ for t in types)}, "
                             f"got {type(val).__name__} {val!r}")
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in row["shape"].items()):
        raise ValueError(f"field 'shape' maps names to ints, got {row['shape']!r}")
    if row["spread"] is not None and (len(row["spread"]) != 2 or not all(isinstance(x, _NUM) for x in row["spread"])):
        raise ValueError(f"field 'spread' is [low, high] (two numbers) or null, got {row['spread']!r}")
    if not math.isfinite(row["median"]):
        raise ValueError(f"field 'median' must be finite, got {row['median']!r}")
    return row


def row(benchmark: str, op: str, impl: str, shape: dict, dtype: str, metric: str, unit: str, median: float,
        env: dict, precision: Optional[str] = None, spread: Optional[list] = None, source: str = "measured",
        note: Optional[str] = None) -> dict:
    """A validated row; ``env`` is :func:`bench.harness.environment` (gpu, driver, torch, triton, commit, date)."""
    return validate({"benchmark": benchmark, "op": op, "impl": impl, "shape": dict(shape), "dtype": dtype,
                     "precision": precision, "metric": metric, "unit": unit, "median": float(median),
                     "spread": None if spread is None else [float(x) for x in spread],
                     **{k: env[k] for k in ("gpu", "driver", "torch", "triton", "commit", "date")},
                     "source": source, "note": note})


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def append(benchmark: str, rows: Iterable[dict], results_dir: Optional[str] = None) -> str:
    """Append ``rows`` (each validated first: nothing is written if one is invalid) to
    ``<results_dir>/<benchmark>.jsonl`` (default :data:`RESULTS`); returns the path."""
    rows = [validate(r) for r in rows]
    d = results_dir or RESULTS
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{benchmark}.jsonl")
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def load(results_dir: Optional[str] = None) -> list[dict]:
    """Every row of every ``*.jsonl`` in ``results_dir`` (default :data:`RESULTS`), validated; a bad row raises
    ``ValueError`` with its file and line."""
    d = results_dir or RESULTS
    rows = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(d, name)) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(validate(json.loads(line)))
                except ValueError as e:  # json.JSONDecodeError is a ValueError too
                    raise ValueError(f"{os.path.join(d, name)}:{i}: {e}") from None
    return rows
