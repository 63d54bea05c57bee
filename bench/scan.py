"""Scan benchmark, head dim 1: ``python -m bench scan [--quick] [--out DIR] [--sweep] [--profile] [--no-chunked]``
(``--varlen``: only the packed-sequence benchmark, :mod:`bench.varlen`).

For ``(B*H, n, d=1)`` problems -- ``(4096, 2048)``, ``(64, 1024)`` and an n sweep from 1k to 1M at a
fixed total size -- in float32 and bfloat16, times the forward and forward+backward
(``triton.testing.do_bench``, median after warm-up) of:

* ``ours (b,n,h)``: the elementwise op on the native head layout (``gateloop::elementwise_scan``);
* ``ours seed-op``: :func:`gateloop_kernels.gate_loop_operator` with the seed's ``(B H, n, 1)`` tensors
  and complex gate;
* ``seed``: upstream ``gateloop_transformer``'s operator when importable, else
  :func:`gateloop_kernels.reference.associative_scan_reference`;
* ``accel-scan``: ``accelerated_scan.complex.scan`` (``(B, C, T)`` layout) when importable.

Each result is checked against a float64 oracle before it is timed. Prints a table, writes
``scan.json`` and (with matplotlib, where two or more n were timed at one total size: not with ``--quick``)
``scan.png`` to ``--out`` (default ``bench/out``). Bytes floor:
each input read once and each output written once, over the copy bandwidth measured on the device at the
start (``bench/_ceilings.py``). On a GPU the figures are also appended as result rows to
``bench/results/scan.jsonl`` (``--no-record`` skips that; ``python -m bench render`` draws them).
On a machine without CUDA it runs tiny sizes through the reference only, and says so. ``--calling-thread`` runs
every implementation's backward on the calling thread, ``--pin-core N`` keeps it on autograd's device thread with both
threads on core N (rows say so in ``impl``; the chunked scan's run is unchanged).
Afterwards runs ``bench.scan_chunked`` (unless ``--no-chunked``), whose options it accepts too.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional

import torch

from bench import OUT, harness, results, scan_chunked
from bench.harness import ceilings, describe, rel_err
from gateloop_kernels import elementwise as ew
from gateloop_kernels import operator as op
from gateloop_kernels import reference as R
from gateloop_kernels.elementwise import config as ew_config
from gateloop_kernels.elementwise.torch_path import _torch_backward, _torch_forward

TOTAL = 4096 * 2048


def _log(msg: str) -> None:
    print(f"[scan] {msg}", flush=True)


def floor_bytes(numel: int, dtype: torch.dtype, backward: bool) -> int:
    """Fewest bytes: q, k, v, o in ``dtype``, the gate as two float32; backward adds do, dq, dk, dv, da."""
    s = torch.tensor([], dtype=dtype).element_size()
    fwd = 3 * s + 8 + s
    bwd = (4 * s + 8) + (3 * s + 8)
    return numel * (fwd + (bwd if backward else 0))


def _seed_operator() -> tuple[str, Callable]:
    try:
        from gateloop_transformer.gateloop_transformer import gate_loop_operator as upstream
        return "seed (upstream)", upstream
    except Exception:  # noqa: BLE001 - any import failure means: not installed here
        return "seed (reference)", R.associative_scan_reference


def _accel_scan() -> Optional[Callable]:
    try:
        from accelerated_scan.complex import scan
        return scan
    except Exception:  # noqa: BLE001
        return None


def _make(BH: int, n: int, dtype: torch.dtype, device: str, B: int):
    H = BH // B
    # drawn on the CPU: a failed graph capture of a peer must not disturb the device generator
    q, k, v = (torch.randn(B, n, H).to(device=device, dtype=dtype) for _ in range(3))
    mag = 0.9 + 0.1 * torch.rand(B, n, H)
    ph = 0.1 * torch.randn(B, n, H)
    return q, k, v, (mag * torch.cos(ph)).to(device), (mag * torch.sin(ph)).to(device)


def _impls(q, k, v, a_re, a_im):
    """name -> (setup() -> (inputs requiring grad, forward(*inputs) -> out (B, n, H)))"""
    B, n, H = q.shape
    seed_name, seed_fn = _seed_operator()
    accel = _accel_scan()

    def heads_first(t):  # (B, n, H) -> (B H, n, 1)
        return t.transpose(1, 2).reshape(B * H, n, 1).contiguous()

    def back(t):  # (B H, n, 1) -> (B, n, H)
        return t.reshape(B, H, n).transpose(1, 2)

    impls = {}
    impls["ours (b,n,h)"] = (lambda: [t.clone().requires_grad_() for t in (q, k, v, a_re, a_im)],
                             lambda *t: ew.elementwise_scan(*t, None, None)[0])

    def seed_inputs():
        a = torch.complex(heads_first(a_re), heads_first(a_im))[..., None]
        return [heads_first(t).requires_grad_() for t in (q, k, v)] + [a.requires_grad_()]

    impls["ours seed-op"] = (seed_inputs, lambda q_, k_, v_, a_: back(op.gate_loop_operator(q_, k_, v_, a_)))
    impls[seed_name] = (seed_inputs, lambda q_, k_, v_, a_: back(seed_fn(q_, k_, v_, a_)))
    if accel is not None and q.is_cuda:
        def acc_inputs():  # (1, B H, n): channels x time, time contiguous
            def tl_(t):
                return t.transpose(1, 2).reshape(1, B * H, n).contiguous()
            a = torch.complex(tl_(a_re), tl_(a_im))
            return [tl_(t).requires_grad_() for t in (q, k, v)] + [a.requires_grad_()]

        def acc_fwd(q_, k_, v_, a_):
            h = accel(a_, (k_ * v_).float())
            return (q_ * h.real).to(q_.dtype).reshape(B, H, n).transpose(1, 2)
        impls["accel-scan"] = (acc_inputs, acc_fwd)
    return impls


def _time_graph(fn: Callable) -> harness.Timing:
    """CUDA-graph replays of ``fn``: device time without host overhead (NaN if ``fn`` cannot be captured)."""
    return harness.do_bench_graph(fn, rep=100, log=_log)


def _time(fn: Callable, cuda: bool, grad_to_none=None) -> harness.Timing:
    """``do_bench`` (events around each call, host overhead included); on the CPU, 5 wall-clock calls."""
    return harness.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none) if cuda else harness.wall_times(fn)


def _put(row: dict, key: str, t: harness.Timing) -> None:
    """``row[key]``: the median; ``row[key + "_spread"]``: the 20th and 80th percentiles."""
    row[key] = t.median
    row[key.replace("_ms", "_spread_ms")] = t.spread


def run_case(BH: int, n: int, dtype: torch.dtype, device: str, check_grads: bool = True) -> list[dict]:
    cuda = device == "cuda"
    B = 4 if BH % 4 == 0 and BH >= 64 else 1
    q, k, v, a_re, a_im = _make(BH, n, dtype, device, B)
    numel = BH * n
    ref_o, _, _ = _torch_forward(q.double(), k.double(), v.double(), a_re.double(), a_im.double(), None, None)
    do = torch.randn(q.shape).to(q)
    ref_g = _torch_backward(do.double(), None, None, q.double(), k.double(), v.double(), a_re.double(),
                            a_im.double(), None, None) if check_grads else None
    rows = []
    for name, (setup, fwd) in _impls(q, k, v, a_re, a_im).items():
        row = {"impl": name, "BH": BH, "n": n, "d": 1, "dtype": str(dtype).replace("torch.", "")}
        try:
            inputs = setup()
            out = fwd(*inputs)
            row["rel_err_fwd"] = rel_err(out, ref_o)
            if name.startswith("ours") and ref_g is not None:
                grads = torch.autograd.grad(out, inputs[:3], do)
                row["rel_err_grads"] = max(rel_err(g.reshape(q.shape) if g.shape == q.shape else
                                                g.reshape(B, -1, n).transpose(1, 2), r)
                                           for g, r in zip(grads, ref_g[:3]))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if row["rel_err_fwd"] > tol or row.get("rel_err_grads", 0.0) > tol:
                row["error"] = "wrong result"
                rows.append(row)
                _log(f"{name}: WRONG (fwd {row['rel_err_fwd']:.2e}, grads {row.get('rel_err_grads', 0):.2e})")
                continue
            with torch.no_grad():
                _put(row, "fwd_ms", _time(lambda: fwd(*inputs), cuda))
            gout = torch.randn(out.shape).to(out)

            def step():
                torch.autograd.backward(fwd(*inputs), gout)
            _put(row, "fwdbwd_ms", _time(step, cuda, grad_to_none=inputs))
            if cuda:  # fresh leaves: ones that went through backward() keep AccumulateGrad nodes
                ginputs = setup()
                with torch.no_grad():
                    _put(row, "graph_fwd_ms", _time_graph(lambda: fwd(*ginputs)))
                _put(row, "graph_fwdbwd_ms", _time_graph(lambda: torch.autograd.grad(fwd(*ginputs), ginputs, gout)))
                for t in inputs:
                    t.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                for t in inputs:
                    t.grad = None
            for key, bwd in (("fwd", False), ("fwdbwd", True)):
                nbytes = floor_bytes(numel, dtype, bwd)
                row[f"{key}_GBps"] = nbytes / (row[f"{key}_ms"] * 1e-3) / 1e9
                row[f"{key}_floor_ms"] = nbytes / ceilings()["copy_bw"] * 1e3
                row[f"{key}_frac_floor"] = row[f"{key}_floor_ms"] / row[f"{key}_ms"]
                if f"graph_{key}_ms" in row:
                    row[f"graph_{key}_frac_floor"] = row[f"{key}_floor_ms"] / row[f"graph_{key}_ms"]
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        _log(f"{name:18s} BH={BH:5d} n={n:8d} {row['dtype']:8s} " +
             (f"fwd {row['fwd_ms']:.4f} ms  fwd+bwd {row['fwdbwd_ms']:.4f} ms  graph: fwd "
              f"{row.get('graph_fwd_ms', float('nan')):.4f} fwd+bwd {row.get('graph_fwdbwd_ms', float('nan')):.4f}"
              if "fwd_ms" in row else row["error"]))
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'impl':18s} {'BH':>6s} {'n':>8s} {'dtype':8s} {'fwd ms':>8s} {'f+b ms':>8s} {'g.fwd':>8s} "
            f"{'g.f+b':>8s} {'fwd GB/s':>9s} {'f+b GB/s':>9s} {'flr/fwd':>7s} {'flr/f+b':>7s} {'flr/g.f':>7s} "
            f"{'flr/g.fb':>8s} {'peak MB':>8s} {'err':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "fwd_ms" not in r:
            lines.append(f"{r['impl']:18s} {r['BH']:6d} {r['n']:8d} {r['dtype']:8s} {r.get('error', '')}")
            continue
        nan = float("nan")
        lines.append(f"{r['impl']:18s} {r['BH']:6d} {r['n']:8d} {r['dtype']:8s} {r['fwd_ms']:8.4f} "
                     f"{r['fwdbwd_ms']:8.4f} {r.get('graph_fwd_ms', nan):8.4f} {r.get('graph_fwdbwd_ms', nan):8.4f} "
                     f"{r['fwd_GBps']:9.0f} {r['fwdbwd_GBps']:9.0f} {r['fwd_frac_floor']:7.2f} "
                     f"{r['fwdbwd_frac_floor']:7.2f} {r.get('graph_fwd_frac_floor', nan):7.2f} "
                     f"{r.get('graph_fwdbwd_frac_floor', nan):8.2f} {r.get('peak_extra_MB', nan):8.1f} "
                     f"{max(r['rel_err_fwd'], r.get('rel_err_grads', 0.0)):8.1e}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: str, title: str = "") -> None:
    """Forward and forward+backward time against n at the fixed total size ``B*H*n`` measured at the most
    values of n (the GPU's sweep at 8M, the CPU's two tiny shapes at 4096); no file, and a line saying why,
    where no total size was measured at two values of n (``--quick``)."""
    done = [r for r in rows if "fwd_ms" in r]
    ns: dict[int, set] = {}
    for r in done:
        ns.setdefault(r["BH"] * r["n"], set()).add(r["n"])
    total = max(ns, key=lambda t: (len(ns[t]), t), default=None)
    if total is None or len(ns[total]) < 2:
        _log("no plot: no total size B*H*n was timed at two values of n or more (the n sweep runs without --quick)")
        if os.path.exists(path):  # a plot left by an earlier run would contradict scan.json
            os.remove(path)
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no plot")
        return
    sweep = [r for r in done if r["BH"] * r["n"] == total]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms")):
        for impl in sorted({r["impl"] for r in sweep}):
            for dt, style in (("float32", "-"), ("bfloat16", "--")):
                pts = sorted((r["n"], r[key]) for r in sweep if r["impl"] == impl and r["dtype"] == dt)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {dt}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"n (B*H = {total} / n, d = 1)")
        ax.set_ylabel(key.replace("_ms", "") + " time (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _log(f"plot: {path}")


def result_rows(rows: list[dict], env: dict) -> list[dict]:
    """The figures of ``rows`` as result rows (:mod:`bench.results`): per implementation and case the timed
    medians with their spread and the peak memory; per case the bytes floor (``impl = "bytes floor"``)."""
    out, floors_done = [], set()
    for r in rows:
        if "fwd_ms" not in r:
            continue
        shape = {"BH": r["BH"], "n": r["n"], "d": 1}
        for metric in ("fwd_ms", "fwdbwd_ms", "graph_fwd_ms", "graph_fwdbwd_ms"):
            if results.finite(r.get(metric)):
                out.append(results.row("scan", "scan, head dim 1", r["impl"], shape, r["dtype"], metric, "ms",
                                       r[metric], env, spread=r.get(metric.replace("_ms", "_spread_ms"))))
        if results.finite(r.get("peak_extra_MB")):
            out.append(results.row("scan", "scan, head dim 1", r["impl"], shape, r["dtype"], "peak_extra_MB", "MiB",
                                   r["peak_extra_MB"], env))
        if (r["BH"], r["n"], r["dtype"]) not in floors_done:
            floors_done.add((r["BH"], r["n"], r["dtype"]))
            for metric in ("fwd_ms", "fwdbwd_ms"):
                out.append(results.row("scan", "scan, head dim 1", "bytes floor", shape, r["dtype"], metric, "ms",
                                       r[metric.replace("_ms", "_floor_ms")], env,
                                       note="bytes in and out once over the measured copy bandwidth"))
    return out


def _sweep_tiles() -> None:
    """Tile sweep of our kernels (``elementwise.config.WIDE_FWD``, ``WIDE_BWD``, ``NARROW``): graph-replay times
    at (4096, 2048) (1024 channels per batch), (64, 1024) and (32, 2^18) (16 and 8), float32, for
    tuning; every configuration's output and gradients are compared with the default's."""
    names = ("WIDE_FWD", "WIDE_BWD", "NARROW")
    saved = tuple(getattr(ew_config, nm) for nm in names)
    wide = [((32, 64, 2), (16, 64, 2)), ((16, 64, 2), (16, 64, 2)), ((32, 128, 4), (16, 128, 4)),
            ((32, 32, 1), (16, 32, 1)), ((64, 64, 2), (16, 64, 2)), ((32, 64, 2), (8, 64, 2)),
            ((32, 64, 2), (32, 64, 2)), ((32, 32, 1), (32, 32, 1)), ((64, 64, 2), (32, 64, 2))]
    narrow = [(64, 16, 1), (32, 16, 1), (64, 16, 2), (64, 16, 4)]
    cases = [((4096, 2048), [(f, b, saved[2]) for f, b in wide]),
             ((64, 1024), [(saved[0], saved[1], nw) for nw in narrow]),
             ((32, 1 << 18), [(saved[0], saved[1], nw) for nw in narrow])]
    for (BH, n), cfgs in cases:
        ins = _make(BH, n, torch.float32, "cuda", 4)
        gout = torch.randn(ins[0].shape).to(ins[0])

        def fwd_bwd():  # the launchers: graph capture of autograd.grad over reused leaves failed here
            o, _, _, carries = ew.scan_forward(*ins)
            return (o, *ew.scan_backward(gout, None, None, *ins, None, None, carries)[:5])
        ref = fwd_bwd()
        for cfg in cfgs:
            for nm, val in zip(names, cfg):
                setattr(ew_config, nm, val)
            try:
                err = max(rel_err(x, y) for x, y in zip(fwd_bwd(), ref))
                f = _time_graph(lambda: ew.scan_forward(*ins)).median
                fb = _time_graph(fwd_bwd).median
            except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects
                _log(f"({BH}, {n}) {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            _log(f"({BH}, {n}) fwd {cfg[0]} bwd {cfg[1]} narrow {cfg[2]}: graph fwd {f:.4f} ms  fwd+bwd {fb:.4f} ms"
                 f"  vs default {err:.1e}")
        for nm, val in zip(names, saved):
            setattr(ew_config, nm, val)


def _profile() -> None:
    """Host overhead of each layer of our call (``bench.tools.host_probe``) and per-kernel device times at
    (4096, 2048) float32 (``torch.profiler``)."""
    from bench.tools import host_probe
    host_probe.main()
    from bench.tools.kernel_times import kernel_times
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, a_re, a_im = _make(4096, 2048, dtype, "cuda", 4)
        for name, (setup, fwd) in _impls(q, k, v, a_re, a_im).items():
            if "seed" in name:
                continue
            rows = kernel_times(fwd, setup(), torch.randn(q.shape).to(q))
            for kernel, us, calls in rows:
                _log(f"  {name} {str(dtype)[6:]}: {us:8.1f} us/iter  x{calls}  {kernel[:90]}")
            _log(f"  {name} {str(dtype)[6:]}: device total {sum(r[1] for r in rows):.1f} us per fwd+bwd")

def build_parser() -> argparse.ArgumentParser:
    """This benchmark's options and those of ``bench.scan_chunked``, which it runs last: ``--quick``,
    ``--sweep`` and ``--profile`` apply to both."""
    p = argparse.ArgumentParser(prog="python -m bench scan", description=__doc__.splitlines()[0],
                                conflict_handler="resolve")  # ours replace the chunked benchmark's namesakes
    scan_chunked.add_arguments(p.add_argument_group("the chunked scan, run last (python -m bench.scan_chunked)"))
    p.add_argument("--quick", action="store_true",
                   help="only the two headline shapes (the chunked scan: fewer repetitions)")
    p.add_argument("--out", default=OUT, help="where scan.json, scan.png and scan_chunked.json go (default: bench/out)")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep tile sizes of our kernel (the chunked scan: also the n sweep to 2^20)")
    p.add_argument("--no-chunked", action="store_true", help="skip bench.scan_chunked")
    p.add_argument("--varlen", action="store_true", help="only the packed-sequence benchmark (cu_seqlens) at its "
                   "defaults, with --quick, --out and --record: python -m bench.varlen --help for its own options")
    p.add_argument("--profile", action="store_true", help="host overheads and per-kernel device times first "
                   "(the chunked scan: per-kernel times of one fwd+bwd)")
    harness.add_thread_argument(p)
    harness.add_record_argument(p)
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.varlen:
        from bench import varlen

        varlen.main(["--out", args.out] + (["--quick"] if args.quick else [])
                    + ([] if args.record is None else ["--record" if args.record else "--no-record"]))
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        shapes = [(4096, 2048), (64, 1024)]
        if not args.quick:
            shapes += [(TOTAL // n, n) for n in (1024, 16384, 262144, 1 << 20)]
        _log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
             + (", backward on the calling thread" if args.calling_thread else "")
         + (f", threads pinned to core {args.pin_core}" if args.pin_core is not None else ""))
        _log(describe(ceilings()))
    else:
        shapes = [(16, 256), (4, 1024)]
        _log("no CUDA device: tiny sizes, every path runs the PyTorch reference (timings are not kernel timings; "
             "the CUDA-graph times g.*, their floors flr/g.* and peak MB need CUDA: nan here; GB/s and the floors "
             "flr/* of the GPU's copy bandwidth read ~0)")
    if cuda and args.profile:
        _profile()
    if cuda and args.sweep:
        _sweep_tiles()
    rows = []
    with harness.backward_thread(args):  # every implementation's backward alike
        for BH, n in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                rows += run_case(BH, n, dtype, device, check_grads=BH * n <= TOTAL)
    print(_table(rows), flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = harness.environment()
    meta = {"device": env["gpu"], "torch": env["torch"], "date": env["date"], "ceilings": ceilings(),
            "peers": {"seed": _seed_operator()[0],
                      "accelerated-scan": "installed" if _accel_scan() else "not installed"}}
    with open(os.path.join(args.out, "scan.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    _log(f"json: {os.path.join(args.out, 'scan.json')}")
    harness.record("scan", harness.thread_rows(result_rows(rows, env), args), args.record, log=_log)
    _plot(rows, os.path.join(args.out, "scan.png"), f"{meta['device']}, torch {meta['torch']}" +
          ("" if cuda else ": the PyTorch reference on tiny sizes, not kernel timings"))
    if not args.no_chunked:
        args.json = args.json or os.path.join(args.out, "scan_chunked.json")
        scan_chunked.main(args=args)
