"""Entry point: ``python -m bench [scan|reversible|model|train] [options]``.

Each subcommand lives in ``bench/<name>.py`` and exposes ``main(argv: list[str]) -> None``.
Without a subcommand every benchmark runs with its default (machine-sized) settings.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = ("scan", "reversible", "model", "train")


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv and argv[0] in SUBCOMMANDS:
        names, rest = [argv[0]], argv[1:]
    else:
        names, rest = list(SUBCOMMANDS), argv
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
