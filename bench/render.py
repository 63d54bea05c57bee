"""Draws the results page ``docs/results.md`` and its plots from the result rows in ``bench/results/``.

``python -m bench render [--results DIR] [--page PATH] [--plots DIR] [--no-plots]``: the headline table, then per
benchmark and GPU the latest row of each (op, implementation, shape, dtype, precision, metric), and PNG plots
(matplotlib; without it the page is written and the plots are left as they are): time per token against the
sequence length and against the head dim, with the peers and the bytes floor; the reversible stack's activation
memory and step time against depth. Older rows stay in the data; the page shows the latest.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Optional

from bench import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "results.md")
PLOTS = os.path.join(ROOT, "docs", "plots")
#: the fields that name a figure: rows equal in these are measurements of the same figure (the latest shown)
KEY = ("benchmark", "op", "impl", "shape", "dtype", "precision", "metric", "gpu")

_SCAN1 = dict(benchmark="scan", shape={"BH": 4096, "n": 2048, "d": 1}, dtype="float32", metric="graph_fwdbwd_ms")
_CHUNK = dict(benchmark="scan_chunked", shape={"BH": 64, "n": 2048, "d": 64, "e": 64}, dtype="float32")
_MODEL = dict(benchmark="model", metric="tokens_per_s")


def _m(hd: int, amp: bool, impl: str, metric: str = "tokens_per_s", b: int = 8, s: int = 2048) -> dict:
    return dict(benchmark="model", impl=impl, metric=metric, dtype="bf16 autocast" if amp else "float32",
                shape={"batch": b, "seq": s, "dim": 512, "depth": 6, "head_dim": hd})


def _model_cells(hd: int, amp: bool) -> tuple[list, list]:
    seed = [_m(hd, amp, "seed"), ", ", _m(hd, amp, "seed", "peak_gib")] if not amp else ["does not run"]
    ours = [_m(hd, amp, "ours"), " / ", _m(hd, amp, "ours (torch.compile)"), ", ", _m(hd, amp, "ours", "peak_gib"),
            " / ", _m(hd, amp, "ours (torch.compile)", "peak_gib")]
    return seed, ours


_REV8 = dict(benchmark="reversible", shape={"depth": 8, "d_model": 1024, "heads": 16, "seq": 2048, "batch": 8})
#: (what, the seed's cell, ours): a cell is text and row selectors (a dict of fields a row must equal), each
#: selector replaced by the latest matching row's value
HEADLINE = [
    ("scan, head dim 1, (B·H, n) = (4096, 2048), fp32 fwd+bwd (device time)",
     [dict(_SCAN1, impl="seed (upstream)")],
     [dict(_SCAN1, impl="ours (b,n,h)"), " (accelerated-scan: ", dict(_SCAN1, impl="accel-scan"), ")"]),
    ("scan, head dim 64, (B·H, n) = (64, 2048), fp32 fwd+bwd, rel. error of the gradients",
     [dict(_CHUNK, impl="seed", metric="fwdbwd_ms", precision="ieee")],
     [dict(_CHUNK, impl="ours", metric="fwdbwd_ms", precision="ieee"), ", ",
      dict(_CHUNK, impl="ours", metric="err_grad_max", precision="ieee"), " (fla's kernel, tf32, same run: ",
      dict(_CHUNK, impl="fla chunk_simple_gla (kernel)", metric="fwdbwd_ms", precision="tf32"), ")"]),
    ("GateLoop Transformer, dim 512, depth 6, head dim 64, 8 x 2048, fp32 training (eager / `torch.compile`)",
     *_model_cells(64, False)),
    ("the same under bf16 autocast (eager / `torch.compile`)", *_model_cells(64, True)),
    ("the same, head dim 1, fp32 (eager / `torch.compile`)", *_model_cells(1, False)),
    ("the same, head dim 1, bf16 (eager / `torch.compile`)", *_model_cells(1, True)),
    ("1 x 131072 tokens, head dim 64, bf16, `reversible=True`", ["–"],
     [_m(64, True, "ours reversible", b=1, s=131072), ", ",
      _m(64, True, "ours reversible", "peak_gib", b=1, s=131072)]),
    ("reversible stack, d_model 1024, depth 8: activation memory / step time vs plain autograd",
     [dict(_REV8, impl="seed", metric="act_gib"), " / ", dict(_REV8, impl="seed", metric="step_vs_plain")],
     [dict(_REV8, impl="rev_ext", metric="act_gib"), " / ", dict(_REV8, impl="rev_ext", metric="step_vs_plain")]),
]


def fmt_value(v: float, unit: str) -> str:
    """A figure as the page prints it, with its unit."""
    if unit == "ms":
        return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"
    if unit == "us":
        return f"{v:.1f} µs"
    if unit == "tok/s":
        return f"{v / 1e3:.1f}k tok/s"
    if unit in ("GiB", "MiB", "MB"):
        return f"{v:.2f} {unit}"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "%":
        return f"{v:.1f}%"
    if unit.startswith("fraction"):
        return f"{v:.0%}"
    if unit == "relative error":
        return f"{v:.1e}"
    return f"{v:.4g} {unit}"


def fmt_shape(shape: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def _key(row: dict) -> tuple:
    return tuple(tuple(sorted(row[k].items())) if k == "shape" else row[k] for k in KEY)


def latest(rows: list[dict]) -> list[dict]:
    """The latest row (by date, then file order) of each figure (:data:`KEY`)."""
    best: dict = {}
    for r in rows:
        k = _key(r)
        if k not in best or r["date"] >= best[k]["date"]:
            best[k] = r
    return list(best.values())


def select(rows: list[dict], sel: dict) -> Optional[dict]:
    """The latest of the rows equal to ``sel`` in each of its fields, or ``None``."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in sel.items())]
    return max(hits, key=lambda r: r["date"]) if hits else None


def _cell(rows: list[dict], parts: list) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        r = select(rows, p)
        out.append(fmt_value(r["median"], r["unit"]) if r else "–")
    return "".join(out)


def _line_gpu(rows: list[dict], parts: list) -> Optional[str]:
    """The GPU a headline line is read from: the one with rows for most of its figures, then the latest (one
    line never mixes GPUs: H100 and H200 timings are not comparable)."""
    found: dict[str, list] = {}
    for p in parts:
        if isinstance(p, dict):
            for r in rows:
                if all(r.get(k) == v for k, v in p.items()):
                    found.setdefault(r["gpu"], []).append(r["date"])
    if not found:
        return None
    return max(found, key=lambda g: (len(found[g]), max(found[g])))


def _headline(rows: list[dict]) -> list[str]:
    lines = ["| what | seed (lucidrains) | this package | GPU, date |", "| --- | ---: | ---: | --- |"]
    for what, seed, ours in HEADLINE:
        gpu = _line_gpu(rows, seed + ours)
        on = [r for r in rows if r["gpu"] == gpu]
        dates = sorted({r["date"][:10] for p in seed + ours if isinstance(p, dict) and (r := select(on, p))})
        lines.append(f"| {what} | {_cell(on, seed)} | {_cell(on, ours)} | {gpu or '–'}, {', '.join(dates) or '–'} |")
    return lines


def _spread(r: dict) -> str:
    if r["spread"] is None:
        return ""
    return f"{fmt_value(r['spread'][0], r['unit'])} – {fmt_value(r['spread'][1], r['unit'])}"


def _tables(rows: list[dict]) -> list[str]:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["benchmark"], r["gpu"])].append(r)
    out = []
    for (bench, gpu), rs in sorted(groups.items()):
        out += [f"### {bench} on {gpu}", "",
                "| op | implementation | shape | dtype | precision | metric | median | spread (p20 – p80) | date "
                "| source |",
                "| --- | --- | --- | --- | --- | --- | ---: | --- | --- | --- |"]
        rs.sort(key=lambda r: (r["op"], sorted(r["shape"].items()), r["dtype"], r["precision"] or "", r["metric"],
                               r["impl"]))
        for r in rs:
            src = r["source"] + (f"; {r['note']}" if r["note"] else "")
            out.append(f"| {r['op']} | {r['impl']} | {fmt_shape(r['shape'])} | {r['dtype']} | "
                       f"{r['precision'] or '–'} | "
                       f"{r['metric']} | {fmt_value(r['median'], r['unit'])} | {_spread(r)} | {r['date']} | {src} |")
        out.append("")
    return out


PLOT_FILES = {"scan_vs_n": "time per token against the sequence length",
              "scan_vs_head_dim": "time per token against the head dim",
              "reversible_vs_depth": "reversible stack: activation memory and step time against depth"}


def page(rows: list[dict], plots_rel: Optional[str] = "plots") -> str:
    """The Markdown of the results page for ``rows`` (validated); ``plots_rel``: where the PNGs are, relative to the
    page (``None``: no plot links)."""
    rows = latest([results.validate(r) for r in rows])
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench render` from the rows in `bench/results/*.jsonl` (one row per figure: op,",
             "implementation, shape, dtype, precision, metric, median and spread, GPU, driver, torch/Triton versions,",
             "commit, date, source); do not edit by hand. A row whose source reads \"carried from RESULTS.md\" was",
             "measured in an earlier session and copied from the narrative record, frozen in",
             "[`history.md`](history.md); the others were appended by the benchmarks. Where a figure was measured",
             "more than once, the latest row is shown.", "", "## Headline", ""]
    lines += _headline(rows) + [""]
    if plots_rel is not None:
        lines += ["## Plots", ""] + [f"![{text}]({plots_rel}/{name}.png)" for name, text in PLOT_FILES.items()] + [""]
    lines += ["## All figures, by benchmark and GPU", ""] + _tables(rows)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots

def _gpu_with_most(rows: list[dict]) -> Optional[str]:
    count: dict = defaultdict(int)
    for r in rows:
        count[r["gpu"]] += 1
    return max(count, key=count.get) if count else None


def _per_token_ns(r: dict) -> float:
    s = r["shape"]
    return r["median"] * 1e6 / (s["BH"] * s["n"])


def _chunked_lines(rows: list[dict], x: str, fixed: dict) -> dict:
    """label -> sorted points (x, ns per token) of the chunked scan's fwd+bwd: ours (device time), the peers and
    the bytes floor, at the shapes equal to ``fixed``."""
    lines: dict = defaultdict(list)
    for r in rows:
        if r["benchmark"] != "scan_chunked" or r["op"] != "chunked scan":
            continue
        if any(r["shape"].get(k) != v for k, v in fixed.items()):
            continue
        mode = r["precision"] or r["dtype"]
        if r["impl"] == "ours" and r["metric"] == "device_fwdbwd_ms":
            label = f"ours {mode} (device time)"
        elif r["impl"] != "ours" and r["metric"] == "fwdbwd_ms" and r["impl"] != "flops floor":
            label = f"{r['impl']} {mode}"
        else:
            continue
        lines[label].append((r["shape"][x], _per_token_ns(r)))
    return {k: sorted(set(v)) for k, v in lines.items()}


def _draw(ax, lines: dict, xlabel: str, ylabel: str, logx: bool = True) -> None:
    for label, pts in sorted(lines.items()):
        style = ":" if "floor" in label else "--" if ("seed" in label or "fla" in label or "accel" in label) else "-"
        ax.plot(*zip(*pts), style, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=6)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    """Writes the PNGs of :data:`PLOT_FILES` to ``out_dir``; returns the paths (``ImportError`` without
    matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows)
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name, gpu):
        fig.suptitle(f"{PLOT_FILES[name]} ({gpu}; bench/results/)", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: the same rows give the same file
        plt.close(fig)
        written.append(path)

    # time per token against n: head dim 1 at the total size with the most n; the chunked scan at d = 64
    scan = [r for r in rows if r["benchmark"] == "scan" and r["metric"] == "graph_fwdbwd_ms"]
    chunk = [r for r in rows if r["benchmark"] == "scan_chunked"]
    gpu = _gpu_with_most(scan + chunk)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_total: dict = defaultdict(set)
    for r in scan:
        if r["gpu"] == gpu:
            by_total[r["shape"]["BH"] * r["shape"]["n"]].add(r["shape"]["n"])
    lines: dict = defaultdict(list)
    if by_total:
        total = max(by_total, key=lambda t: (len(by_total[t]), t))
        for r in scan:
            if r["gpu"] == gpu and r["shape"]["BH"] * r["shape"]["n"] == total:
                lines[f"{r['impl']} {r['dtype']}"].append((r["shape"]["n"], _per_token_ns(r)))
        axes[0].set_title(f"head dim 1, B·H·n = {total} (CUDA-graph device time)", fontsize=8)
    _draw(axes[0], {k: sorted(v) for k, v in lines.items()}, "sequence length n", "fwd+bwd ns per token and head")
    axes[1].set_title("chunked scan, d = e = 64", fontsize=8)
    _draw(axes[1], _chunked_lines([r for r in chunk if r["gpu"] == gpu], "n", {"d": 64}), "sequence length n",
          "fwd+bwd ns per token and head")
    save(fig, "scan_vs_n", gpu)

    fig, ax = plt.subplots(1, 1, figsize=(7, 4.5))
    ax.set_title("chunked scan, d = e", fontsize=8)
    _draw(ax, _chunked_lines([r for r in chunk if r["gpu"] == gpu], "d", {}), "head dim d",
          "fwd+bwd ns per token and head")
    save(fig, "scan_vs_head_dim", gpu)

    rev = [r for r in rows if r["benchmark"] == "reversible" and r["op"] == "reversible stack, training step"]
    gpu = _gpu_with_most(rev)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, ylabel in ((axes[0], "act_gib", "activation memory (GiB)"), (axes[1], "step_ms", "step time (ms)"),
                               (axes[2], "step_vs_plain", "step time / plain autograd's")):
        lines = defaultdict(list)
        for r in rev:
            if r["gpu"] == gpu and r["metric"] == metric:
                lines[r["impl"]].append((r["shape"]["depth"], r["median"]))
        _draw(ax, {k: sorted(v) for k, v in lines.items()}, "depth (blocks)", ylabel)
    save(fig, "reversible_vs_depth", gpu)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench render", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=results.RESULTS, help="the rows (default: bench/results/)")
    p.add_argument("--page", default=PAGE, help="the page to write (default: docs/results.md)")
    p.add_argument("--plots", default=PLOTS, help="where the PNGs go (default: docs/plots/)")
    p.add_argument("--no-plots", action="store_true", help="only the page")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    rows = results.load(args.results)
    rel = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.page)))
    os.makedirs(os.path.dirname(os.path.abspath(args.page)), exist_ok=True)
    with open(args.page, "w") as fh:
        fh.write(page(rows, rel))
    print(f"[render] {len(rows)} rows -> {args.page}")
    if args.no_plots:
        return
    try:
        for path in plots(rows, args.plots):
            print(f"[render] plot: {path}")
    except ImportError:
        print("[render] matplotlib not importable: the plots were not redrawn")
