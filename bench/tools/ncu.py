"""Nsight Compute helpers for the chunked scan: a forward+backward to profile, and a summary of a source page.

``python -m bench.tools.ncu run [--shape BH,n,d,e] [--precision ieee]``: two forward+backward passes of
``chunk_gate_loop`` on ``bench.scan_chunked``'s float32 inputs (the first warms up), the program ncu profiles,
e.g.::

    ncu --clock-control none -k regex:_fwd_o -s 1 -c 1 --section WarpStateStats --section SourceCounters \\
        --import-source no -o fwd_o python3 -m bench.tools.ncu run
    ncu --import fwd_o.ncu-rep --page source --csv --print-source sass > fwd_o.csv

``python -m bench.tools.ncu sass fwd_o.csv [--top 12]``: where the warps stalled (by reason, by opcode, the top
instructions) and which shared-memory instructions replayed (bank conflicts: excessive wavefronts).

``python -m bench.tools.ncu roofline [--precision ieee] [--dtype float32]``: runs ncu itself over ``run`` and prints,
per chunked-scan kernel of the second (warm) forward+backward: device time, DRAM bytes and their rate as a share
of the copy bandwidth (``bench._ceilings.copy_bandwidth``, measured first), tensor-pipe utilization, achieved occupancy and shared-memory bank conflicts.

``bash bench/gpu.sh ncu`` runs both for each kernel in ``$NCU_KERNELS`` (not run on a GPU yet as a stage: its
commands are the ones run by hand in the ninth session).
"""
from __future__ import annotations

import argparse
import collections
import csv
import subprocess
import sys

#: ncu metrics of the roofline table (ncu drops a name it does not know without an error)
_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
            "sm__warps_active.avg.pct_of_peak_sustained_active",
            "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "launch__registers_per_thread")


def _tensor_metric() -> str:
    """This ncu's tensor-pipe utilization metric (the names differ between versions and chips): the first
    ``sm__pipe_tensor*cycles_active`` counter ``ncu --query-metrics`` lists, a GMMA (Hopper wgmma) one first."""
    res = subprocess.run(["ncu", "--query-metrics"], capture_output=True, text=True)
    names = [ln.split()[0] for ln in res.stdout.splitlines()
             if ln.startswith("sm__pipe_tensor") and "cycles_active" in ln.split()[0]]
    if not names:
        raise RuntimeError("ncu --query-metrics lists no sm__pipe_tensor*cycles_active counter")
    print("tensor-pipe counters:", ", ".join(names), file=sys.stderr)
    return sorted(names, key=lambda m: "gmma" not in m)[0] + ".avg.pct_of_peak_sustained_elapsed"


def run(shape: tuple[int, int, int, int], precision: str, dtype: str = "float32") -> None:
    import torch

    from bench.scan_chunked import make, ours

    q, k, v, a_re, a_im, do = make(*shape, getattr(torch, dtype))
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


def table(path: str, copy_bps: float) -> list[str]:
    """Lines of text from ncu's raw page (``--csv --page raw --print-units base``) of two forward+backward passes:
    per kernel name, the latter half of its launches (the warm pass), summed, slowest first; DRAM bytes over
    time as a share of ``copy_bps``; the tensor-pipe and occupancy columns are time-weighted means."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    head = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    col = {h: i for i, h in enumerate(rows[head])}
    tensor = next((h for h in rows[head] if h.startswith("sm__pipe_tensor")), None)
    if tensor is None:
        raise ValueError(f"{path}: no sm__pipe_tensor* column (ncu drops a metric name it does not know)")
    by_name: dict[str, list[list[str]]] = collections.defaultdict(list)
    for r in rows[head + 2:]:  # the row after the header holds the units
        if len(r) == len(rows[head]):
            by_name[r[col["Kernel Name"]]].append(r)

    def total(rs, key):
        return sum(_num(r, col, key) for r in rs)

    def mean(rs, key):  # weighted by device time
        ns = total(rs, "gpu__time_duration.sum") or 1.0
        return sum(_num(r, col, key) * _num(r, col, "gpu__time_duration.sum") for r in rs) / ns

    warm = sorted(((name, rs[len(rs) // 2:]) for name, rs in by_name.items()),
                  key=lambda kv: -total(kv[1], "gpu__time_duration.sum"))
    out = [f"{'kernel':14s} {'launches':>8s} {'us':>8s} {'DRAM MB':>8s} {'of copy':>8s} {'L2 MB':>8s} "
           f"{'tensor %':>8s} {'warps %':>8s} {'regs':>5s} {'conflicts':>10s}"]
    total_ns = total_bytes = 0.0
    for name, rs in warm:
        ns = total(rs, "gpu__time_duration.sum") or 1.0
        dram = total(rs, "dram__bytes_read.sum") + total(rs, "dram__bytes_write.sum")
        total_ns += ns
        total_bytes += dram
        out.append(f"{name[:14]:14s} {len(rs):8d} {ns / 1e3:8.1f} {dram / 1e6:8.1f} "
                   f"{100 * dram / (ns * 1e-9) / copy_bps:7.1f}% {total(rs, 'lts__t_bytes.sum') / 1e6:8.1f} "
                   f"{mean(rs, tensor):8.1f} {mean(rs, 'sm__warps_active.avg.pct_of_peak_sustained_active'):8.1f} "
                   f"{max(_num(r, col, 'launch__registers_per_thread') for r in rs):5.0f} "
                   f"{total(rs, 'l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum'):10.0f}")
    out.append(f"{'all':14s} {'':8s} {total_ns / 1e3:8.1f} {total_bytes / 1e6:8.1f} "
               f"{100 * total_bytes / (total_ns * 1e-9) / copy_bps:7.1f}%   (tensor metric: {tensor}; copy "
               f"{copy_bps / 1e12:.2f} TB/s)")
    return out


def roofline(shape: str, precision: str, dtype: str, csv_path: str) -> list[str]:
    """Run ncu over two forward+backward passes of ``run`` and return :func:`table`'s lines."""
    from bench._ceilings import copy_bandwidth

    copy_bps = copy_bandwidth()
    cmd = ["ncu", "--clock-control", "none", "-k", "regex:^_(chunk|state|fwd|bwd)", "--metrics",
           ",".join(_METRICS + (_tensor_metric(),)), "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, "-m", "bench.tools.ncu", "run", "--shape", shape, "--precision", precision, "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or '"ID"' not in res.stdout:
        raise RuntimeError(f"ncu failed (rc {res.returncode}): {(res.stderr or res.stdout)[-500:]}")
    with open(csv_path, "w") as f:
        f.write(res.stdout)
    return table(csv_path, copy_bps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tools.ncu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="two forward+backward passes of the chunked scan (float32)")
    r.add_argument("--shape", default="64,2048,64,64", help="BH,n,d,e (as bench.scan_chunked splits B*H)")
    r.add_argument("--precision", default="ieee")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    f = sub.add_parser("roofline", help="ncu over `run`: per kernel time, DRAM bytes, tensor-pipe use")
    f.add_argument("--shape", default="64,2048,64,64", help="BH,n,d,e")
    f.add_argument("--precision", default="ieee")
    f.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    f.add_argument("--csv", default="bench/out/ncu_roofline.csv", help="where ncu's raw page is kept")
    s = sub.add_parser("sass", help="summarize ncu's source page (--page source --csv --print-source sass)")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(tuple(int(x) for x in args.shape.split(",")), args.precision, args.dtype)
    elif args.cmd == "roofline":
        print("\n".join(roofline(args.shape, args.precision, args.dtype, args.csv)))
    else:
        print("\n".join(summarize(args.csv, args.top)))


if __name__ == "__main__":
    main()
