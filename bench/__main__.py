"""Entry point: ``python -m bench [--quick] [SUBCOMMAND [options]]``.

Each subcommand lives in ``bench/<name>.py`` and exposes ``build_parser() -> argparse.ArgumentParser`` and
``main(argv: list[str]) -> None``. Without a subcommand every benchmark runs with its default
(machine-sized) settings, and the short summary of all of them is printed last (``render``, which redraws
``docs/results.md`` from ``bench/results/``, runs only when named). The profiling and diagnostic tools are in
``bench/tools/`` (``python -m bench.tools.<name> --help`` for the ones with options; ``host_probe``, ``memcheck`` and
``memcheck_revkern`` need CUDA and take no ``--help``). Every command line is
checked in full before anything runs: an unknown subcommand or option exits with status 2 at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: name -> one-line help; the order in which ``python -m bench`` runs them ("summary" last)
SUBCOMMANDS = {
    "scan": "head-dim-1 scan vs the seed and accelerated-scan, then the chunked scan (head dims 16-256); "
            "--varlen: packed documents (cu_seqlens) vs unpacked and padded",
    "reversible": "reversible stack: memory and time vs depth, reconstruction and gradient errors",
    "model": "GateLoop Transformer training steps, ours vs the seed: tokens/s and peak memory",
    "train": "MQAR recall training, ours vs the seed: loss curves and accuracy",
    "summary": "print the short table of the results in bench/out/ again",
    "render": "draw docs/results.md and its plots from the result rows in bench/results/",
    "generate": "prefill and per-token decode of the Transformer with its caches, against the seed and a KV cache",
    "overhead": "the eager call's host overhead beside its device time, and the model step against an SDPA model",
    "cp": "context-parallel scan over torch.distributed ranks (--nproc W): per-rank time against one process; "
          "--train: a few training steps on a (data, context) mesh; --predict: the predicted scaling from one "
          "device",
}
#: the subcommands ``python -m bench`` runs without a subcommand, in this order
RUN_ALL = ("scan", "reversible", "model", "train", "summary")
#: what ``--quick`` passes to each subcommand when no subcommand is named
QUICK = {"scan": ["--quick"], "model": ["--quick"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of gateloop_kernels and reversible. Without a subcommand all of them run, sized to "
                    "the machine (tiny sizes through the PyTorch reference on a CPU), and a summary is printed last.",
        epilog="Results go to bench/out/ (JSON; PNG plots where matplotlib imports); on a GPU the figures are also "
               "appended as rows to bench/results/<benchmark>.jsonl (--no-record skips that), which `python -m bench "
               "render` draws as docs/results.md. `python -m bench SUBCOMMAND --help` lists a subcommand's options; "
               "the profiling tools are in bench/tools/: python -m bench.tools.<name> --help for ncu, offline_kernels, "
               "op_count and state_forms; host_probe (its modes in its docstring), memcheck and memcheck_revkern need "
               "CUDA and take no --help.")
    p.add_argument("--quick", action="store_true",
                   help="without a subcommand: " + "; ".join(f"{k} {' '.join(v)}" for k, v in QUICK.items())
                   + " (the others as they are)")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", title="subcommands")
    for name, text in SUBCOMMANDS.items():
        # the subcommand's own parser (bench/<name>.py) reads its options and its --help
        sub.add_parser(name, help=text, add_help=False)
    return p


def plan(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``[(subcommand, its argv)]`` for ``python -m bench *argv``, every argv checked by the subcommand's
    parser first: an unknown subcommand or option exits here (``SystemExit(2)``), before anything runs."""
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.command is None:
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)} (a subcommand's options go after its name)")
        todo = [(name, QUICK.get(name, []) if args.quick else []) for name in RUN_ALL]
    elif args.quick:
        p.error(f"--quick is for the run of all benchmarks; a subcommand's options go after its name "
                f"(python -m bench {args.command} --help lists them)")
    else:
        todo = [(args.command, rest)]
    for name, sub_argv in todo:
        importlib.import_module(f"bench.{name}").build_parser().parse_args(sub_argv)
    return todo


def main(argv: list[str]) -> None:
    todo = plan(argv)
    from bench.summary import device_line
    print(f"[bench] {device_line()}", flush=True)
    for name, sub_argv in todo:
        print(f"[bench] === {name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main(sub_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
