"""Packed variable-length sequences (``cu_seqlens``, issue 21): ``python -m bench scan --varlen`` (or
``python -m bench.varlen [options]``).

Documents with lengths drawn log-uniformly from ``[--min-len, --max-len]`` (the last one cut so that they fill
``--tokens`` exactly; seeded) are run through :func:`gateloop_kernels.gate_loop_heads` three ways, forward +
backward (q, k, v and the gate's ``z`` need gradients):

* ``packed``: one ``(1, T, H, d)`` row with ``cu_seqlens``;
* ``unpacked``: the same ``T`` tokens as one sequence (what packing costs: the target is packed <= 1.1x this);
* ``padded``: a ``(N, max length, H, d)`` batch, each document padded to the longest (what packing saves).

The packed result is first checked against the padded one (each document alone, in its own batch row): outputs
and gradients, relative error. Cases: head dim 1 (``--channels`` heads of ``d = e = 1``) and head dim 64
(``--heads`` heads), float32 and bfloat16. Prints a table with the ratios packed / unpacked and padded /
unpacked, writes ``varlen.json`` to ``--out`` and, on a GPU, appends result rows to ``bench/results/varlen.jsonl``.
On a GPU each variant is timed twice: the eager call (``fwdbwd_ms``, host overhead included: at head dim 1 and
these sizes the call is host-bound, so its ratios compare host paths) and replays of a CUDA graph of it
(``graph_ms``, the kernels alone: the ``*_graph`` ratios are the kernels' cost of packing).
On a machine without CUDA it runs tiny sizes through the PyTorch paths (not kernel timings) and says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import torch

from bench import OUT, harness, results
from bench.harness import rel_err

OP = "packed documents (cu_seqlens), fwd+bwd"


def _log(msg: str) -> None:
    print(f"[varlen] {msg}", flush=True)


def add_arguments(ap) -> None:
    """This benchmark's options (defaults sized to the machine where ``None``)."""
    ap.add_argument("--tokens", type=int, default=None, help="T, tokens per packed row (GPU 32768, CPU 256)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest document drawn (GPU 64, CPU 4)")
    ap.add_argument("--max-len", type=int, default=None, help="longest document drawn (GPU 8192, CPU 64)")
    ap.add_argument("--head-dims", default="1,64", help="comma list of head dims d = e")
    ap.add_argument("--channels", type=int, default=None, help="heads at head dim 1 (GPU 512, CPU 8)")
    ap.add_argument("--heads", type=int, default=None, help="heads at the other head dims (GPU 8, CPU 1)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the lengths and the inputs")
    ap.add_argument("--quick", action="store_true", help="fewer timed repetitions")
    ap.add_argument("--out", default=OUT, help="where varlen.json goes (default: bench/out)")
    harness.add_record_argument(ap)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.varlen", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def draw_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Document lengths log-uniform in ``[lo, hi]`` summing to ``total`` (the last one cut to fit)."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
    lengths[-1] -= sum(lengths) - total
    return lengths


def _inputs(T: int, H: int, d: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, d, generator=g) for _ in range(3))
    z = torch.randn(1, T, H, 2, generator=g)
    return [q.to(device, dtype), (k / d ** 0.5).to(device, dtype), v.to(device, dtype), z.to(device)]


def _padded(t: torch.Tensor, slot: torch.Tensor, N: int, L: int) -> torch.Tensor:
    """``(1, T, ...)`` -> ``(N, L, ...)``: token ``t`` at flat slot ``slot[t]``, zeros elsewhere."""
    buf = t.new_zeros((N * L, *t.shape[2:]))
    return buf.index_copy(0, slot, t[0]).unflatten(0, (N, L))


def run_case(lengths: list[int], H: int, d: int, dtype: torch.dtype, device: str, quick: bool, seed: int) -> dict:
    from gateloop_kernels import gate_loop_heads

    cuda = device == "cuda"
    T, N, L = sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    slot = torch.cat([i * L + torch.arange(n) for i, n in enumerate(lengths)]).to(device)
    base = _inputs(T, H, d, dtype, device, seed)
    variants = {
        "packed": ([t.clone() for t in base], dict(cu_seqlens=cu)),
        "unpacked": ([t.clone() for t in base], {}),
        "padded": ([_padded(t, slot, N, L) for t in base], {}),
    }
    row = dict(T=T, N=N, max_len=L, H=H, d=d, dtype=str(dtype).replace("torch.", ""))
    outs = {}
    for name, (leaves, kw) in variants.items():
        leaves = [t.requires_grad_() for t in leaves]

        def fwd(leaves=leaves, kw=kw):
            q, k, v, z = leaves
            return gate_loop_heads(q, k, v, z=z, **kw)[0]

        out = fwd()
        gout = torch.ones_like(out) if name != "padded" else _padded(torch.ones_like(base[2]), slot, N, L)
        grads = torch.autograd.grad(out, leaves, gout)
        if name == "padded":  # back to the packed layout: each document's own batch row
            out, grads = (out.flatten(0, 1)[slot][None],
                          tuple(g.flatten(0, 1)[slot][None] for g in grads))
        outs[name] = (out, grads)

        def step(fwd=fwd, gout=gout):
            torch.autograd.backward(fwd(), gout)
        timing = (harness.do_bench(step, warmup=5 if quick else 25, rep=20 if quick else 100, grad_to_none=leaves)
                  if cuda else harness.wall_times(step, reps=1 if quick else 3))
        row[f"{name}_ms"], row[f"{name}_spread_ms"] = timing.median, timing.spread
        for t in leaves:
            t.grad = None
        if cuda:  # the kernels alone (replays of a CUDA graph): at head dim 1 the eager call is host-bound
            fresh = [t.detach().clone().requires_grad_() for t in leaves]
            graph = harness.do_bench_graph(lambda: torch.autograd.grad(fwd(fresh), fresh, gout), log=_log)
            row[f"{name}_graph_ms"], row[f"{name}_graph_spread_ms"] = graph.median, graph.spread
    po, pg = outs["packed"]
    ro, rg = outs["padded"]
    row["rel_err"] = max([rel_err(po, ro)] + [rel_err(a, b) for a, b in zip(pg, rg)])
    row["packed_over_unpacked"] = row["packed_ms"] / row["unpacked_ms"]
    row["padded_over_unpacked"] = row["padded_ms"] / row["unpacked_ms"]
    if cuda:
        row["packed_over_unpacked_graph"] = row["packed_graph_ms"] / row["unpacked_graph_ms"]
        row["padded_over_unpacked_graph"] = row["padded_graph_ms"] / row["unpacked_graph_ms"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if not row["rel_err"] <= tol:
        row["error"] = "wrong result"
    return row


def _table(rows: list[dict]) -> str:
    head = (f"{'d':>3s} {'H':>4s} {'dtype':8s} {'T':>6s} {'N':>4s} {'max len':>7s} {'packed ms':>9s} "
            f"{'unpacked':>9s} {'padded':>9s} {'pack/unp':>8s} {'pad/unp':>8s} {'err':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['d']:3d} {r['H']:4d} {r['dtype']:8s} {r['T']:6d} {r['N']:4d} {r['max_len']:7d} "
                     f"{r['packed_ms']:9.3f} {r['unpacked_ms']:9.3f} {r['padded_ms']:9.3f} "
                     f"{r['packed_over_unpacked']:8.2f} {r['padded_over_unpacked']:8.2f} {r['rel_err']:8.1e}"
                     + (f"  {r['error'].upper()}" if "error" in r else ""))
    return "\n".join(lines)


def result_rows(rows: list[dict], env: dict) -> list[dict]:
    """Each case's three timings (with spread) and the two ratios as result rows (:mod:`bench.results`)."""
    out = []
    for r in rows:
        if "error" in r:
            continue
        shape = {"T": r["T"], "N": r["N"], "max_len": r["max_len"], "H": r["H"], "d": r["d"]}
        for impl in ("packed", "unpacked", "padded"):
            out.append(results.row("varlen", OP, impl, shape, r["dtype"], "fwdbwd_ms", "ms", r[f"{impl}_ms"], env,
                                   spread=r[f"{impl}_spread_ms"]))
            if results.finite(r.get(f"{impl}_graph_ms", float("nan"))):
                out.append(results.row("varlen", OP, impl, shape, r["dtype"], "graph_ms", "ms", r[f"{impl}_graph_ms"],
                                       env, spread=r[f"{impl}_graph_spread_ms"]))
        for metric in ("packed_over_unpacked", "padded_over_unpacked", "packed_over_unpacked_graph",
                       "padded_over_unpacked_graph"):
            if results.finite(r.get(metric, float("nan"))):
                out.append(results.row("varlen", OP, "ratio", shape, r["dtype"], metric, "x", r[metric], env))
    return out


def main(argv=None, args=None) -> list[dict]:
    """Runs the benchmark on ``argv``, or on ``args`` already parsed; returns its rows."""
    args = build_parser().parse_args(argv) if args is None else args
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    big = dict(tokens=32768, min_len=64, max_len=8192, channels=512, heads=8)
    tiny = dict(tokens=256, min_len=4, max_len=64, channels=8, heads=1)
    size = {k: getattr(args, k) if getattr(args, k) is not None else (big if cuda else tiny)[k] for k in big}
    if not cuda:
        _log("no CUDA device: tiny sizes through the PyTorch paths (timings are not kernel timings)")
    lengths = draw_lengths(size["tokens"], size["min_len"], size["max_len"], args.seed)
    _log(f"{len(lengths)} documents, {size['tokens']} tokens, lengths {min(lengths)}..{max(lengths)} "
         f"(log-uniform in [{size['min_len']}, {size['max_len']}], seed {args.seed})")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rows = []
    for d in (int(x) for x in args.head_dims.split(",")):
        H = size["channels"] if d == 1 else size["heads"]
        for name in args.dtypes.split(","):
            row = run_case(lengths, H, d, dtypes[name], device, args.quick, args.seed)
            rows.append(row)
            _log(f"d={d} H={H} {name}: packed {row['packed_ms']:.3f} ms, unpacked {row['unpacked_ms']:.3f} ms "
                 f"({row['packed_over_unpacked']:.2f}x), padded {row['padded_ms']:.3f} ms "
                 f"({row['padded_over_unpacked']:.2f}x), error {row['rel_err']:.1e}"
                 + (f"; kernels alone (CUDA graph) {row['packed_over_unpacked_graph']:.2f}x packed, "
                    f"{row['padded_over_unpacked_graph']:.2f}x padded" if "packed_over_unpacked_graph" in row else ""))
    print(_table(rows), flush=True)
    env = harness.environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "varlen.json")
    with open(path, "w") as f:
        json.dump({"meta": {"device": env["gpu"], "torch": env["torch"], "date": env["date"], "lengths": lengths},
                   "rows": rows}, f, indent=1)
    _log(f"json: {path}")
    harness.record("varlen", result_rows(rows, env), args.record, log=_log)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
