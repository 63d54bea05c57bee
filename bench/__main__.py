"""Entry point: ``python -m bench [scan|reversible|model|train|summary] [options]``.

Each subcommand lives in ``bench/<name>.py`` and exposes ``main(argv: list[str]) -> None``.
Without a subcommand every benchmark runs with its default (machine-sized) settings, and a short
summary of all of them is printed last (``bench/summary.py``).
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = ("scan", "reversible", "model", "train", "summary")


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    from bench.summary import device_line
    print(f"[bench] {device_line()}", flush=True)
    if argv and argv[0] in SUBCOMMANDS:
        names, rest = [argv[0]], argv[1:]
    else:
        names, rest = list(SUBCOMMANDS), argv  # "summary" last
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                print(f"[bench] {name}: not available yet, skipped")
                continue
            raise
        print(f"[bench] === {name} ===", flush=True)
        mod.main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
