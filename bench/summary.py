"""The short table printed last by ``python -m bench``: headline figures from the JSON each benchmark
wrote to ``bench/out/`` (only the ones that ran). ``python -m bench summary`` prints it again."""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Callable

import torch

from bench import OUT


def device_line() -> str:
    """What this machine is: GPU name or CPU, torch and Triton versions."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        tv = "absent"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only (reference paths, tiny sizes)"
    return f"device: {dev} | torch {torch.__version__} | triton {tv}"


def _load(name: str) -> Any:
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _ms(x: Any) -> str:
    return f"{x:.3f} ms" if isinstance(x, (int, float)) else "-"


def _scan(lines: list[str]) -> None:
    data = _load("scan.json")
    if data:
        peers = data.get("meta", {}).get("peers", {})
        by_case: dict = {}
        for r in data["rows"]:
            by_case.setdefault((r["BH"], r["n"], r["dtype"]), {})[r["impl"]] = r
        for (bh, n, dt), impls in by_case.items():
            # "seed (reference)": the PyTorch reference stands in where upstream is not installed
            seed_name = next((k for k in impls if k.startswith("seed")), peers.get("seed", "seed (upstream)"))
            ours, seed = impls.get("ours (b,n,h)", {}), impls.get(seed_name, {})
            graph = ours.get("graph_fwdbwd_ms")
            device_time = isinstance(graph, float) and graph == graph  # NaN where no CUDA graph was timed
            key = "graph_fwdbwd_ms" if device_time else "fwdbwd_ms"
            if "accel-scan" in impls:
                acc = _ms(impls["accel-scan"].get(key))
            else:
                acc = {"not installed": "not installed", "installed": "not run (CUDA only)"}.get(
                    peers.get("accelerated-scan"), "-")
            seed_txt = (f"the seed's PyTorch reference {_ms(seed.get(key))} (upstream not installed)"
                        if seed_name == "seed (reference)" else f"seed {_ms(seed.get(key))}")
            lines.append(f"scan d=1 ({bh}, {n}) {dt}: fwd+bwd {'device' if device_time else 'end-to-end'} time: "
                         f"ours {_ms(ours.get(key))}, {seed_txt}, accelerated-scan {acc}")
    chunked = _load("scan_chunked.json")
    if chunked:
        for r in chunked["rows"]:
            dev = f" (device {_ms(r['ours_device_fwdbwd_ms'])})" if "ours_device_fwdbwd_ms" in r else ""
            lines.append(f"scan chunked ({r['bh']}, {r['n']}, {r['d']}) {r['mode']}: fwd+bwd ours "
                         f"{_ms(r.get('ours_fwdbwd_ms'))}{dev}, seed {_ms(r.get('seed_fwdbwd_ms'))}, "
                         f"fla kernel {_ms(r.get('fla_kernel_fwdbwd_ms'))}")


def _reversible(lines: list[str]) -> None:
    for path in sorted(glob.glob(os.path.join(OUT, "reversible_*.json"))):
        with open(path) as fh:
            data = json.load(fh)
        if "results" not in data:
            continue
        rows = {(r["depth"], r["variant"]): r for r in data["results"]}
        for depth in sorted({d for d, _ in rows}):
            plain = rows.get((depth, "plain"), {}).get("step_ms")
            parts = []
            for v in ("rev_ext", "ckpt", "seed"):
                r = rows.get((depth, v))
                if r and plain:
                    act = r.get("act_gib")
                    parts.append(f"{v} {r['step_ms'] / plain:.2f}x" + (f" {act:.2f} GiB" if act is not None else ""))
            lines.append(f"reversible {os.path.basename(path)[11:-5]} depth {depth}: step vs plain: " + ", ".join(parts))


def _model(lines: list[str]) -> None:
    data = _load("model.json")
    if not data:
        return
    groups: dict = {}
    for r in data["rows"]:
        which = r["which"] + (" compiled" if r.get("compiled") else "")
        groups.setdefault((r["heads"], r["batch"], r["seq"], r["amp"], r.get("reversible", False)), {})[which] = r
    for (heads, b, s, amp, rev), g in groups.items():
        ours, seed = g.get("ours", {}), g.get("seed", {})
        if "tokens_per_s" not in ours:
            continue
        vs = (f"{ours['tokens_per_s'] / seed['tokens_per_s']:.1f}x the seed" if "tokens_per_s" in seed
              else "seed not installed" if seed.get("skipped") else "seed: " + str(seed.get("error", "-"))[:40])
        comp = g.get("ours compiled", {})
        if "tokens_per_s" in comp:
            vs += f"; compiled {comp['tokens_per_s'] / 1e3:.1f}k tok/s"
        lines.append(f"model heads={heads or 'dim'} {b}x{s} {'bf16' if amp else 'fp32'}{' rev' if rev else ''}: "
                     f"{ours['tokens_per_s'] / 1e3:.1f}k tok/s, {vs}")


def _train(lines: list[str]) -> None:
    data = _load("train.json")
    if data:
        accs = ", ".join(f"{k} {v['final_acc']:.2f}" for k, v in data["runs"].items())
        lines.append(f"train MQAR ({data['config']}, {data['steps']} steps): recall accuracy {accs}")


SECTIONS: list[Callable[[list[str]], None]] = [_scan, _reversible, _model, _train]


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="python -m bench summary", description=__doc__.split("\n\n")[0])


def main(argv: list[str]) -> None:
    build_parser().parse_args(argv)
    lines: list[str] = []
    for section in SECTIONS:
        try:
            section(lines)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # an older JSON layout
            lines.append(f"({section.__name__[1:]}: could not read its JSON: {type(err).__name__} {err})")
    print(device_line())
    print("\n".join(lines) if lines else "no results in bench/out yet")
