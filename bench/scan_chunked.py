"""Benchmark of the chunked Triton scan (``gateloop_kernels.chunked.chunk_gate_loop``), issue 5.

``python -m bench.scan_chunked [--quick] [--peers seed,fla] [--sweep] [--json PATH]``; also called at
the end of ``python -m bench scan``. For each ``(B*H, n, d)`` (``e = d``) and input mode (float32
"ieee" / "tf32x3" / "tf32", bf16) it prints the two floors first (bytes over the copy bandwidth and flops
over the matrix rate, both measured on the device at the start, ``bench/_ceilings.py``: the exact float32
modes at the faster of strict float32 and a third of tf32, since they run as three tf32 dots), checks the
result against a float64 oracle, then times forward and forward+backward (``triton.testing.do_bench``
medians) and the peak memory beyond inputs, outputs and gradients. Peers in the same run, when importable: the seed's
operator (``reference.associative_scan_reference``, skipped where it would need > 60 GB) and fla's
``chunk_simple_gla`` through the real rewrite (``q' = [q cos P, q sin P]``, ``k' = [k cos P, k sin P]``,
``g = log|a|``, key dim ``2d``): kernel alone, and with the rotation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from bench import OUT, harness, results
from bench.harness import ceilings, describe, rel_err
from gateloop_kernels.chunked.config import MAX_BT
from gateloop_kernels.dtypes import PRECISIONS

MAIN = [(64, 2048, 64), (32, 8192, 64), (16, 4096, 128)]
SWEEP = [(8, 1 << p, 64) for p in (11, 13, 15, 17, 20)]
HEADS = 4  # B*H is split as B = BH / HEADS, H = HEADS (the layers' (B, n, H, d) layout)


def log(*a):
    print(*a, flush=True)


def split_bh(bh):
    h = HEADS if bh % HEADS == 0 else 1
    return bh // h, h


def rate(mode, c):
    """FLOP/s ceiling of a mode from the measured ceilings ``c``: exact float32 is three tf32 dots (or FFMA)."""
    if mode in ("ieee", "tf32x3"):
        return max(c["fp32"], c["tf32"] / 3)
    return c[mode]


def floors(bh, n, d, e, mode, C=64):
    """(bytes floor seconds, flops floor seconds, flops) for forward + backward on this device."""
    esz = 2 if mode == "bf16" else 4
    per_tok_in = (2 * d + e) * esz + 8  # q, k, v, a (re, im float32)
    per_tok = 2 * per_tok_in + 2 * e * esz + (2 * d + e) * esz + 8  # fwd in+o, bwd in+do+grads
    byts = bh * n * per_tok
    nc = math.ceil(n / C)
    fwd = 2 * C * C * (d + e) + 8 * C * d * e  # QK^T, (D o A) V, inter (Re, Im), state update
    bwd = 4 * C * d * e * 2 + 2 * C * C * (d + e) + 2 * (4 * C * d * e + 2 * C * C * d) + 4 * C * d * e \
        + 2 * C * C * e + 4 * C ** 3  # h recompute, dh, P, dq, dk, dv, gate R
    flops = bh * nc * (fwd + bwd)
    c = ceilings()
    return byts / c["copy_bw"], flops / rate(mode, c), flops


def make(bh, n, d, e, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, H = split_bh(bh)
    q = torch.randn(B, n, H, d, device="cuda", generator=g).to(dtype)
    k = (torch.randn(B, n, H, d, device="cuda", generator=g) / d ** 0.5).to(dtype)
    v = torch.randn(B, n, H, e, device="cuda", generator=g).to(dtype)
    r = torch.rand(B, n, H, device="cuda", generator=g) * 0.1 + 0.9
    ph = (torch.rand(B, n, H, device="cuda", generator=g) * 2 - 1) * 0.5
    do = torch.randn(B, n, H, e, device="cuda", generator=g).to(dtype)
    return q, k, v, r * torch.cos(ph), r * torch.sin(ph), do


def oracle(q, k, v, ar, ai, do, with_grads=True):
    """float64 chunked reference (checked against the sequential one in tests) on the GPU."""
    from gateloop_kernels import reference
    B, n, H, d = q.shape
    e = v.shape[-1]
    leaves = [t.detach().double().requires_grad_(with_grads) for t in (q, k, v, ar, ai)]

    def bh(x):
        return x.permute(0, 2, 1, 3).reshape(B * H, n, x.shape[-1])

    a = torch.complex(leaves[3], leaves[4]).permute(0, 2, 1).reshape(B * H, n)[:, :, None, None]
    o = reference.chunked_reference(bh(leaves[0]), bh(leaves[1]), bh(leaves[2]), a)
    o = o.reshape(B, H, n, e).permute(0, 2, 1, 3)
    grads = torch.autograd.grad(o, leaves, do.double()) if with_grads else None
    return o.detach(), grads


def bench_fn(fn, quick) -> harness.Timing:
    return harness.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)


def time_pair(run, inputs, do, quick):
    """(fwd :class:`~bench.harness.Timing`, fwd+bwd Timing, extra peak bytes) for ``run(*inputs) -> o``."""
    def fwd():
        with torch.no_grad():
            run(*inputs)

    def fwdbwd():
        o = run(*inputs)
        torch.autograd.grad(o, [t for t in inputs if t.requires_grad], do)

    t_f = bench_fn(fwd, quick)
    t_fb = bench_fn(fwdbwd, quick)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = run(*inputs)
    gr = torch.autograd.grad(o, [t for t in inputs if t.requires_grad], do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept = o.numel() * o.element_size() + sum(g.numel() * g.element_size() for g in gr)
    del o, gr
    return t_f, t_fb, max(0, peak - kept)


def check_and_time(label, run, inputs, do, ro, rg, quick, in_bytes):
    """``run`` against the oracle's output ``ro`` and gradients ``rg`` (each skipped when None), then
    :func:`time_pair`; logs one line and returns ``err_o``, ``err_grad_max``, ``fwd_ms``, ``fwdbwd_ms`` (medians;
    ``fwd_spread_ms``, ``fwdbwd_spread_ms``: 20th/80th percentiles), ``extra_mem_frac`` (extra peak bytes over the
    inputs' bytes)."""
    r = {}
    if ro is not None:
        o = run(*inputs)
        r["err_o"] = rel_err(o, ro)
        if rg is not None:
            r["err_grad_max"] = max(rel_err(g_, r_) for g_, r_ in zip(torch.autograd.grad(o, inputs, do), rg))
        del o
    t_f, t_fb, extra = time_pair(run, inputs, do, quick)
    r.update(fwd_ms=t_f.median, fwd_spread_ms=t_f.spread, fwdbwd_ms=t_fb.median, fwdbwd_spread_ms=t_fb.spread)
    r["extra_mem_frac"] = extra / in_bytes
    log(f"[scan_chunked]   {label}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms, extra mem "
        f"{r['extra_mem_frac'] * 100:.0f}% of inputs, err o {r.get('err_o', float('nan')):.2e} "
        f"grads {r.get('err_grad_max', float('nan')):.2e}")
    return r


def profile(run, inputs, do):
    """Per-kernel device times of one forward+backward; returns their sum in ms (device time, no host)."""
    from bench.tools.kernel_times import kernel_times
    rows = kernel_times(run, inputs, do, reps=5, warmup=2)
    for name, us, _ in rows[:10]:
        log(f"[scan_chunked]     {us:9.1f} us  {name[:70]}")
    return sum(us for _, us, _ in rows) / 1e3


def ours(precision, chunk_size=64):
    from gateloop_kernels.chunked import chunk_gate_loop

    def run(q, k, v, ar, ai):
        return chunk_gate_loop(q, k, v, ar, ai, precision=precision, chunk_size=chunk_size)[0]
    return run


def seed_op(q, k, v, ar, ai):
    from gateloop_kernels import reference
    B, n, H, d = q.shape
    e = v.shape[-1]

    def bh(x):
        return x.permute(0, 2, 1, 3).reshape(B * H, n, x.shape[-1])
    a = torch.complex(ar, ai).permute(0, 2, 1).reshape(B * H, n)[:, :, None, None]
    o = reference.associative_scan_reference(bh(q), bh(k), bh(v), a)
    return o.reshape(B, H, n, e).permute(0, 2, 1, 3)


def fla_available():
    try:
        import fla.ops.common.chunk_o as co
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
        co.TRITON_ABOVE_3_7_1 = True  # pass the Hopper guard (docs/kernels.md: gradients checked at K = 128/256)
        return True
    except Exception as ex:  # noqa: BLE001
        log(f"[scan_chunked] fla not importable ({type(ex).__name__}: {ex}); fla columns skipped")
        return False


def fla_rotate(q, k, ar, ai):
    ph = torch.atan2(ai, ar).cumsum(1)  # global phase: the rewrite's own (fp32) weakness at long n
    c, s = torch.cos(ph)[..., None], torch.sin(ph)[..., None]
    q2 = torch.cat([q * c, q * s], -1).to(q.dtype)
    k2 = torch.cat([k * c, k * s], -1).to(k.dtype)
    g = 0.5 * torch.log(ar * ar + ai * ai)
    return q2, k2, g


def fla_kernel(q2, k2, v, g):
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla(q2, k2, v, g, scale=1.0)[0]


def fla_full(q, k, v, ar, ai):
    q2, k2, g = fla_rotate(q, k, ar, ai)
    return fla_kernel(q2, k2, v, g)


# 4-warp tiles also with a register cap (maxnreg): 168 fits three programs per SM, 128 four (255 fits two)
_CAPPED = [{"cap": c, "num_warps": 4, "maxnreg": r} for c in (32, 64) for r in (168, 128)]
# and with key and value tiles of different widths (cap_v: the value tile's)
_MIXED = [{"cap": c, "cap_v": 96 - c, "num_warps": 4} for c in (32, 64)]
_TILES = [{"cap": c, "num_warps": w} for c in (32, 64) for w in (4, 8)] + _CAPPED + _MIXED
TUNE = {  # candidate launch configurations per kernel (gateloop_kernels.chunked.config._CFG)
    "chunk_local": [{"cap": c, "num_warps": w} for c in (32, 64) for w in (2, 4, 8)] + _CAPPED + _MIXED,
    "state_scan": [{"block": b, "num_warps": w} for b, w in ((256, 2), (512, 4), (1024, 2), (1024, 4), (2048, 4),
                                                            (2048, 8))],
    "chunk_states": [{"cap": c, "num_warps": w, "num_stages": st} for c in (32, 64) for w in (2, 4) for st in (2, 3, 4)],
    # None: the two passes chunk_local + state_scan (the exact mode's default)
    "chunk_states_exact": [None] + [{"cap": c, "num_warps": w, "num_stages": st}
                                    for c in (32, 64) for w in (1, 2, 4) for st in (2, 3, 4)],
    "fwd_o": _TILES, "bwd_dqk": _TILES, "bwd_dv": _TILES, "bwd_gate": _TILES,
}
#: the kernels whose device time --tune sums for a table entry (default: the entry's own kernel)
TUNE_KERNELS = {"chunk_states_exact": ("_chunk_states", "_chunk_local", "_state_scan")}


def tune(shapes, modes, kernels=tuple(TUNE)):
    """Coordinate search over ``chunked.config._CFG``: each kernel's candidates in turn (the others at their best
    so far), timed per kernel with torch.profiler over one forward+backward; every candidate's output and
    gradients are checked against the default configuration's (a miscompiled tile shape shows up here)."""
    from bench.tools.kernel_times import kernel_times
    from gateloop_kernels.chunked import config

    for (bh, n, d) in shapes:
        for mode in modes:
            dtype = torch.bfloat16 if mode == "bf16" else torch.float32
            q, k, v, ar, ai, do = make(bh, n, d, d, dtype)
            inputs = [t.requires_grad_() for t in (q, k, v, ar, ai)]
            run = ours("ieee" if mode == "bf16" else mode)
            o = run(*inputs)
            base = [o.detach()] + list(torch.autograd.grad(o, inputs, do))
            tol = 1e-2 if mode == "bf16" else (5e-3 if mode == "tf32" else 1e-5)
            table = config._CFG[dtype]
            default = dict(table)  # (entries are replaced, never edited in place)
            for kern in kernels:
                cands, best = TUNE[kern], None
                for cfg in cands:
                    table[kern] = cfg
                    try:
                        o = run(*inputs)
                        got = [o.detach()] + list(torch.autograd.grad(o, inputs, do))
                        err = max(rel_err(g_, b_) for g_, b_ in zip(got, base))
                        us = sum(t for name, t, _ in kernel_times(run, inputs, do, reps=10, warmup=2)
                                 if name.startswith(TUNE_KERNELS.get(kern, ("_" + kern,))))
                    except Exception as ex:  # noqa: BLE001
                        log(f"[tune] ({bh},{n},{d}) {mode} {kern} {cfg}: failed {type(ex).__name__}: {str(ex)[:120]}")
                        continue
                    ok = err <= tol
                    log(f"[tune] ({bh},{n},{d}) {mode} {kern:12s} {str(cfg):52s} {us:8.1f} us  "
                        f"diff {err:.1e}{'' if ok else '  WRONG'}")
                    if ok and (best is None or us < best[0]):
                        best = (us, cfg)
                table[kern] = best[1] if best else default[kern]
                log(f"[tune] ({bh},{n},{d}) {mode} {kern}: best {table[kern]}" + (f" {best[0]:.1f} us" if best else ""))
            log(f"[tune] ({bh},{n},{d}) {mode}: {table}")
            table.update(default)
            del inputs, q, k, v, ar, ai, do, base
            torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scan_chunked", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return ap


def _comma_list(allowed=None, shape=False):
    """An argparse ``type`` for a comma list, checked where it is parsed (the benchmark reads it only on a GPU,
    after the device line): each item one of ``allowed``, a ``BH:n:d`` shape of positive ints (``shape``; the whole
    text may be one of ``allowed`` then), or a chunk size (a power of two, 16..MAX_BT); the string itself is the value."""
    def check(text: str) -> str:
        if shape and allowed is not None and text in allowed:  # --shapes main
            return text
        for item in filter(None, text.split(",")):
            if allowed is not None and not shape:
                ok = item in allowed
            elif shape:
                parts = item.split(":")
                ok = len(parts) == 3 and all(x.isdigit() and int(x) > 0 for x in parts)
            else:
                ok = item.isdigit() and int(item) in _CHUNKS
            if not ok:
                want = ("BH:n:d with positive ints" + (f" (or {', '.join(allowed)})" if allowed else "") if shape
                        else f"one of {', '.join(allowed)}" if allowed is not None
                        else f"a chunk size {', '.join(map(str, _CHUNKS[:-1]))} or {_CHUNKS[-1]}")
                raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not {want}")
        return text
    return check


_MODES = PRECISIONS + ("bf16",)
_CHUNKS = tuple(2 ** i for i in range(4, MAX_BT.bit_length()))  # the kernels' chunk sizes, 16..MAX_BT


def add_arguments(ap) -> None:
    """This benchmark's options, on a parser or an argument group (``python -m bench scan`` offers them too)."""
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--peers", default="seed,fla", type=_comma_list(("seed", "fla", "none")),
                    help="comma list of seed,fla (or 'none')")
    ap.add_argument("--sweep", action="store_true", help="also the n sweep to 2^20 (B*H = 8, d = 64)")
    ap.add_argument("--modes", default="ieee,tf32,bf16", type=_comma_list(_MODES),
                    help="comma list of ieee, tf32x3, tf32, bf16")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of one fwd+bwd (torch.profiler)")
    ap.add_argument("--shapes", default="main", type=_comma_list(("main",), shape=True), help="'main' or BH:n:d,... ")
    ap.add_argument("--json", default=None, help="where the rows go (default: scan_chunked.json in bench/out, or in "
                    "python -m bench scan's --out)")
    ap.add_argument("--fla-shapes", default="64:2048:64", type=_comma_list(shape=True),
                    help="BH:n:d,... where fla runs (it autotunes per shape)")
    ap.add_argument("--sweep-modes", default="ieee", type=_comma_list(_MODES), help="modes for the n sweep")
    ap.add_argument("--tune", action="store_true", help="only search the kernels' launch configurations "
                    "(gateloop_kernels.chunked.config._CFG) at --shapes and --modes, and print the best")
    ap.add_argument("--tune-kernels", default=",".join(TUNE), type=_comma_list(tuple(TUNE)),
                    help="kernels --tune searches")
    ap.add_argument("--chunk-sizes", default="", type=_comma_list(),
                    help="comma list of other chunk sizes (e.g. 32,128) to time ours with too, each checked against "
                         "the oracle")
    harness.add_record_argument(ap)


#: JSON key prefix -> implementation in the result rows: ours, the seed, fla's kernel alone and with the rotation
_IMPLS = {"ours": "ours", "seed": "seed", "fla_kernel": "fla chunk_simple_gla (kernel)",
          "fla_rot": "fla chunk_simple_gla (with rotation)"}


def result_rows(r: dict, env: dict) -> list[dict]:
    """The figures of one benchmark row ``r`` as result rows (:mod:`bench.results`): each implementation's timed
    medians (with spread), device time and extra memory, and the two floors (``impl = "bytes floor"``,
    ``"flops floor"``)."""
    shape = {"BH": r["bh"], "n": r["n"], "d": r["d"], "e": r["e"]}
    dtype, prec = ("bfloat16", None) if r["mode"] == "bf16" else ("float32", r["mode"])
    out = []

    def add(impl, metric, unit, value, spread=None, note=None):
        if results.finite(value):
            out.append(results.row("scan_chunked", "chunked scan", impl, shape, dtype, metric, unit, value, env,
                                   precision=prec, spread=spread, note=note))
    for prefix, impl in _IMPLS.items():
        for metric in ("fwd_ms", "fwdbwd_ms", "device_fwdbwd_ms"):
            spread = r.get(f"{prefix}_{metric.replace('_ms', '_spread_ms')}")
            add(impl, metric, "ms", r.get(f"{prefix}_{metric}"), spread)
        add(impl, "extra_mem_frac", "fraction of the inputs' bytes", r.get(f"{prefix}_extra_mem_frac"))
    add("bytes floor", "fwdbwd_ms", "ms", r["floor_bytes_ms"], note="inputs, outputs and gradients moved once "
        "over the measured copy bandwidth")
    add("flops floor", "fwdbwd_ms", "ms", r["floor_flops_ms"], note=f"{r['gflop']:.1f} GFLOP over the measured "
        "matrix rate of the mode")
    return out


def main(argv=None, args=None):
    """Runs the benchmark on ``argv``, or on ``args`` already parsed (by ``python -m bench scan``)."""
    args = build_parser().parse_args(argv) if args is None else args
    if not torch.cuda.is_available():
        log("[scan_chunked] needs a CUDA GPU; skipped")
        return
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    use_fla = "fla" in peers and fla_available()
    modes = args.modes.split(",")
    shapes = MAIN if args.shapes == "main" else [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    if args.tune:
        tune(shapes, modes, args.tune_kernels.split(","))
        return
    if args.sweep:
        shapes = shapes + SWEEP
    env = harness.environment()
    dev = env["gpu"]
    log(f"[scan_chunked] device {dev}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    log(f"[scan_chunked] {describe(ceilings())}")
    fla_shapes = [tuple(int(x) for x in t.split(":")) for t in args.fla_shapes.split(",") if t]
    out = args.json or os.path.join(OUT, "scan_chunked.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    rows = []
    for (bh, n, d) in shapes:
        e = d
        for mode in modes:
            if (bh, n, d) in SWEEP and (bh, n, d) not in MAIN and mode not in args.sweep_modes.split(","):
                continue
            dtype = torch.bfloat16 if mode == "bf16" else torch.float32
            tb, tf, flops = floors(bh, n, d, e, mode)
            row = dict(bh=bh, n=n, d=d, e=e, mode=mode, floor_bytes_ms=tb * 1e3, floor_flops_ms=tf * 1e3,
                       gflop=flops / 1e9)
            log(f"[scan_chunked] ({bh}, {n}, {d}) {mode}: floors bytes {tb * 1e3:.3f} ms, "
                f"flops {tf * 1e3:.3f} ms ({flops / 1e9:.1f} GFLOP fwd+bwd)")
            q, k, v, ar, ai, do = make(bh, n, d, e, dtype)
            inputs = [t.requires_grad_() for t in (q, k, v, ar, ai)]
            in_bytes = sum(t.numel() * t.element_size() for t in inputs)
            prec = "ieee" if mode == "bf16" else mode
            run = ours(prec)
            # correctness first (gradients up to 2^18 tokens, outputs up to 2^21: the float64 oracle's memory)
            tokens = bh * n
            ro, rg = oracle(q, k, v, ar, ai, do, tokens <= (1 << 18)) if tokens <= (1 << 21) else (None, None)
            r = check_and_time("ours", run, inputs, do, ro, rg, args.quick, in_bytes)
            row.update({k_: r[k_] for k_ in ("err_o", "err_grad_max") if k_ in r})
            row.update({f"ours_{k_}": x for k_, x in r.items() if k_ not in ("err_o", "err_grad_max")})
            if args.profile:
                row["ours_device_fwdbwd_ms"] = profile(run, inputs, do)
            for bt in (int(c) for c in args.chunk_sizes.split(",") if c):
                r = check_and_time(f"ours, chunk {bt}", ours(prec, bt), inputs, do, ro, rg, args.quick, in_bytes)
                row.update({f"bt{bt}_{k_}": x for k_, x in r.items()})
            if "seed" in peers and prec != "tf32x3":
                est = bh * n * d * e * 8 * 7
                if est > 60e9:
                    log(f"[scan_chunked]   seed: skipped (would need ~{est / 1e9:.0f} GB)")
                else:
                    try:
                        if ro is not None:
                            row["seed_err_o"] = rel_err(seed_op(*inputs).detach(), ro)
                        t = harness.do_bench(lambda: torch.autograd.grad(seed_op(*inputs), inputs, do), warmup=1,
                                             rep=1).median
                        row["seed_fwdbwd_ms"] = t
                        log(f"[scan_chunked]   seed: fwd+bwd {t:.1f} ms")
                    except torch.OutOfMemoryError:
                        log("[scan_chunked]   seed: out of memory, skipped")
                    torch.cuda.empty_cache()
            if use_fla and mode in ("tf32", "bf16") and (bh, n, d) in fla_shapes:
                # fla runs its float32 dots in tf32 whatever we ask: compare it in those rows
                try:
                    q2, k2, g = fla_rotate(q.detach(), k.detach(), ar.detach(), ai.detach())
                    kin = [t.requires_grad_() for t in (q2, k2, v.detach().clone(), g)]
                    if ro is not None:
                        row["fla_err_o"] = rel_err(fla_full(*inputs).detach(), ro)
                    f_f, f_fb, f_extra = time_pair(fla_kernel, kin, do, args.quick)
                    r_f, r_fb, r_extra = time_pair(fla_full, inputs, do, args.quick)
                    for key, t in (("fla_kernel_fwd", f_f), ("fla_kernel_fwdbwd", f_fb), ("fla_rot_fwd", r_f),
                                   ("fla_rot_fwdbwd", r_fb)):
                        row.update({f"{key}_ms": t.median, f"{key}_spread_ms": t.spread})
                    row.update(fla_kernel_extra_mem_frac=f_extra / in_bytes, fla_rot_extra_mem_frac=r_extra / in_bytes)
                    f_f, f_fb, r_f, r_fb = f_f.median, f_fb.median, r_f.median, r_fb.median
                    # extra memory as a fraction of our inputs' bytes, like ours (fla's kernel inputs are larger:
                    # q and k rotated to 2d)
                    log(f"[scan_chunked]   fla kernel: fwd {f_f:.3f} fwd+bwd {f_fb:.3f} ms, extra mem "
                        f"{f_extra / in_bytes * 100:.0f}%; with rotation: fwd {r_f:.3f} fwd+bwd {r_fb:.3f} ms, "
                        f"extra mem {r_extra / in_bytes * 100:.0f}%; err o {row.get('fla_err_o', float('nan')):.2e}")
                except Exception as ex:  # noqa: BLE001
                    log(f"[scan_chunked]   fla failed: {type(ex).__name__}: {str(ex)[:200]}")
            rows.append(row)
            with open(out, "w") as fh:  # after every row: a run stopped at its time limit keeps what it measured
                json.dump(dict(device=dev, date=env["date"], rows=rows), fh, indent=1)
            harness.record("scan_chunked", result_rows(row, env), args.record, log=log)
            del inputs, q, k, v, ar, ai, do, ro, rg
            torch.cuda.empty_cache()
    # table
    hdr = ["shape", "mode", "floorB", "floorF", "fwd", "fwd+bwd", "device", "mem%", "err_o", "err_g", "seed", "fla_k", "fla_rot"]
    log("\n" + " | ".join(hdr))
    for r in rows:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"
        log(" | ".join([f"({r['bh']},{r['n']},{r['d']})", r["mode"], f("floor_bytes_ms"), f("floor_flops_ms"),
                        f("ours_fwd_ms"), f("ours_fwdbwd_ms"), f("ours_device_fwdbwd_ms"),
                        f("ours_extra_mem_frac", "{:.0%}"),
                        f("err_o", "{:.1e}"), f("err_grad_max", "{:.1e}"), f("seed_fwdbwd_ms", "{:.1f}"),
                        f("fla_kernel_fwdbwd_ms"), f("fla_rot_fwdbwd_ms")]))
    log(f"[scan_chunked] wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
