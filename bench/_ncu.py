"""Nsight Compute helpers for the chunked scan: a forward+backward to profile, and a summary of a source page.

``python -m bench._ncu run [--shape BH,n,d,e] [--precision ieee]``: two forward+backward passes of
``chunk_gate_loop`` on ``bench.scan_chunked``'s float32 inputs (the first warms up), the program ncu profiles,
e.g.::

    ncu --clock-control none -k regex:_fwd_o -s 1 -c 1 --section WarpStateStats --section SourceCounters \\
        --import-source no -o fwd_o python3 -m bench._ncu run
    ncu --import fwd_o.ncu-rep --page source --csv --print-source sass > fwd_o.csv

``python -m bench._ncu sass fwd_o.csv [--top 12]``: where the warps stalled (by reason, by opcode, the top
instructions) and which shared-memory instructions replayed (bank conflicts: excessive wavefronts).

``bash bench/gpu.sh ncu`` runs both for each kernel in ``$NCU_KERNELS`` (not run on a GPU yet as a stage: its
commands are the ones run by hand in the ninth session).
"""
from __future__ import annotations

import argparse
import collections
import csv


def run(shape: tuple[int, int, int, int], precision: str) -> None:
    import torch

    from bench.scan_chunked import make, ours

    q, k, v, a_re, a_im, do = make(*shape, torch.float32)
    xs = [t.requires_grad_() for t in (q, k, v, a_re, a_im)]
    scan = ours(precision)
    for _ in range(2):
        torch.autograd.grad(scan(*xs), xs, do)
    torch.cuda.synchronize()


def _num(row: list[str], col: dict[str, int], key: str) -> float:
    try:
        return float(row[col[key]].replace(",", ""))
    except (KeyError, ValueError):
        return 0.0


def summarize(path: str, top: int = 12) -> list[str]:
    """Lines of text: stall reasons (share of all samples), samples by opcode, shared wavefronts (excessive /
    all) by opcode, and the ``top`` instructions by samples with their main stall reason."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    col = {h: i for i, h in enumerate(rows[head])}
    data = rows[head + 1:]
    reasons = [h for h in rows[head] if h.startswith("stall_") and "Not Issued" not in h]
    samples = "Warp Stall Sampling (All Samples)"
    by_reason: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    excessive: collections.Counter = collections.Counter()
    wavefronts: collections.Counter = collections.Counter()
    for r in data:
        for s in reasons:
            by_reason[s] += _num(r, col, s)
        words = r[col["Source"]].split()
        op = (words[1] if words and words[0].startswith("@") and len(words) > 1 else (words or ["?"])[0])
        op = op.split(".")[0]
        by_op[op] += _num(r, col, samples)
        excessive[op] += _num(r, col, "L1 Wavefronts Shared Excessive")
        wavefronts[op] += _num(r, col, "L1 Wavefronts Shared")
    total = sum(by_reason.values()) or 1.0
    out = [f"{path}: {total:.0f} stall samples",
           "  by reason: " + ", ".join(f"{s[6:]} {100 * v / total:.1f}%" for s, v in by_reason.most_common(8)),
           "  by opcode: " + ", ".join(f"{o} {100 * v / total:.1f}%" for o, v in by_op.most_common(10)),
           "  shared wavefronts, excessive / all: "
           + ", ".join(f"{o} {excessive[o]:.0f} / {wavefronts[o]:.0f}" for o in wavefronts if wavefronts[o])]
    for r in sorted(data, key=lambda r: -_num(r, col, samples))[:top]:
        main = max(reasons, key=lambda s: _num(r, col, s)) if reasons else "stall_?"
        extra = _num(r, col, "L1 Wavefronts Shared Excessive")
        source = r[col["Source"]].strip()[:80]
        out.append(f"  {_num(r, col, samples):7.0f} {main[6:]:10s} excessive {extra:9.0f}  {source}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench._ncu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="two forward+backward passes of the chunked scan (float32)")
    r.add_argument("--shape", default="64,2048,64,64", help="BH,n,d,e (as bench.scan_chunked splits B*H)")
    r.add_argument("--precision", default="ieee")
    s = sub.add_parser("sass", help="summarize ncu's source page (--page source --csv --print-source sass)")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(tuple(int(x) for x in args.shape.split(",")), args.precision)
    else:
        print("\n".join(summarize(args.csv, args.top)))


if __name__ == "__main__":
    main()
