"""Reversible stack benchmark: memory and time vs depth, reconstruction error, fused-op microbenchmark.

``python -m bench reversible [options]`` (or ``main(argv)``).

A transformer-like stack of ``(f, g)`` pairs, f = pre-norm causal attention
(``scaled_dot_product_attention``), g = pre-norm MLP (4x, GELU); default d_model 1024, 16 heads,
seq 2048, batch 8, bf16 autocast, fp32 params, depths 4..64 (issue 6). Side by side, on the
same parameters:

* ``rev_ext``   this project's ``reversible.ReversibleSequence`` (merge="sum"), extension on;
* ``rev_noext`` the same with the extension forced off (PyTorch in-place ops);
* ``seed``      a faithful port of the seeds' reversible code (``tests/helpers/seed_reversible.py``, via
                ``bench/peers.py``);
* ``plain``     the residual stack ``x += f(x); x += g(x)`` with plain autograd;
* ``ckpt``      the same with ``torch.utils.checkpoint`` per block (non-reentrant).

Reported per (variant, depth): peak memory, activation memory (peak minus parameters,
gradients and the input with its gradient), step time (forward + backward, median of
``--steps``), time per block and the ratio to ``plain``. Per (variant, depth), a second table: the
backward's peak with every ``.grad`` already filled (gradient accumulation; issue 19, item 00),
which must not grow with depth. Per depth: reconstruction error of the
input after a full inverse pass (ours vs the seed; fp32 and bf16 autocast). At the smallest depth:
gradient error of ours and the seed against plain autograd of the same two-stream function.
Microbenchmark: the fused in-place steps vs the PyTorch in-place ops vs the seed's out-of-place
ops + ``torch.cat``, at the stack's sizes.

Writes a table to stdout, JSON and (if matplotlib imports) a PNG to ``--out`` (bench/out/).
On a machine without CUDA it runs a tiny config in seconds and says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench import OUT, harness, nonnegative_int, positive_int, results
from bench.harness import Timer as _Timer

GiB = 1024 ** 3
MiB = 1024 ** 2
VARIANTS = ("rev_ext", "rev_noext", "seed", "plain", "ckpt")


# ----------------------------------------------------------------------------- the model

class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, d: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mult * d)
        self.fc2 = nn.Linear(mult * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Residual(nn.Module):
    """``x += f(x); x += g(x)`` per block, plain autograd or checkpointed per block."""

    def __init__(self, pairs, checkpoint: bool = False):
        super().__init__()
        self.pairs = nn.ModuleList([nn.ModuleList(p) for p in pairs])
        self.checkpoint = checkpoint

    @staticmethod
    def _block(f, g, x):
        x = x + f(x)
        return x + g(x)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for f, g in self.pairs:
            if self.checkpoint:
                x = checkpoint(self._block, f, g, x, use_reentrant=False)
            else:
                x = self._block(f, g, x)
        return x


def make_pairs(depth: int, d: int, heads: int, device) -> list[tuple[nn.Module, nn.Module]]:
    with torch.device(device):
        return [(Attention(d, heads), MLP(d)) for _ in range(depth)]


def make_stack(depth: int, d: int, heads: int, seq: int, batch: int, device):
    """``(pairs, params, x)``: ``depth`` (attention, MLP) pairs, their parameters and a ``(batch, seq, d)`` input
    that needs grad, drawn from seed 0 (every variant and diagnostic of a depth sees the same weights)."""
    torch.manual_seed(0)
    pairs = make_pairs(depth, d, heads, device)
    params = [p for f, g in pairs for p in (*f.parameters(), *g.parameters())]
    return pairs, params, torch.randn(batch, seq, d, device=device, requires_grad=True)


def make_model(variant: str, pairs):
    import reversible
    from bench.peers import SeedReversibleSequence

    if variant in ("rev_ext", "rev_noext"):
        return reversible.ReversibleSequence(pairs, dim=-1, merge="sum")
    if variant == "seed":
        return SeedReversibleSequence(pairs)
    if variant == "plain":
        return Residual(pairs)
    if variant == "ckpt":
        return Residual(pairs, checkpoint=True)
    raise ValueError(variant)


# ----------------------------------------------------------------------------- measuring

def _ext_ctx(variant: str):
    from reversible import _extension

    return _extension.use_extension(variant != "rev_noext")


def _autocast(device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release(params: list[torch.Tensor], x: torch.Tensor) -> None:
    """Drop every gradient of a measurement and return the memory, so the next one starts from the same base."""
    for p in params:
        p.grad = None
    x.grad = None
    _free()


def _oom_row(e: Exception) -> dict[str, Any]:
    return {"error": f"OOM: {str(e).splitlines()[0]}"}


def _train_step(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, amp: bool):
    """One forward + backward of ``model`` on ``x`` (gradients cleared first): what every variant times."""
    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with _autocast(x.device, amp):
            y = model(x)
        y.float().square().mean().backward()
    return step


def measure(variant: str, model: nn.Module, x: torch.Tensor, params: list[torch.Tensor], amp: bool,
            steps: int, warmup: int) -> dict[str, Any]:
    device = x.device
    cuda = device.type == "cuda"
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    step = _train_step(model, params, x, amp)
    with _ext_ctx(variant):
        try:
            for _ in range(warmup):
                step()
            times = []
            _release(params, x)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            for _ in range(steps):
                with _Timer(device) as t:
                    step()
                times.append(t.ms)
            out: dict[str, Any] = {"step_ms": statistics.median(times), "step_ms_all": [round(v, 3) for v in times]}
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                x_bytes = 2 * x.numel() * x.element_size()  # x and x.grad
                out["peak_gib"] = peak / GiB
                out["act_gib"] = (peak - base - param_bytes - x.numel() * x.element_size()) / GiB
                out["fixed_gib"] = (base + param_bytes + x.numel() * x.element_size()) / GiB
                out["x_gib"] = x_bytes / GiB
        except torch.cuda.OutOfMemoryError as e:
            out = _oom_row(e)
        finally:
            _release(params, x)
    return out


def backward_peak_existing_grads(variant: str, pairs, x: torch.Tensor, amp: bool) -> dict[str, Any]:
    """Peak bytes of one backward over what was live before it, every parameter's ``.grad`` already
    filled (gradient accumulation, ``zero_grad(set_to_none=False)``): a backward that holds all its
    parameter gradients until it ends grows with depth here. CUDA: the allocator's peak; CPU: a tally
    of the storages the backward creates (:class:`bench.peers.LiveBytes`)."""
    from bench.peers import LiveBytes

    params = [p for f, g in pairs for p in (*f.parameters(), *g.parameters())]
    model = make_model(variant, pairs)
    cuda = x.device.type == "cuda"
    try:
        with _ext_ctx(variant):
            for p in params:
                p.grad = torch.zeros_like(p)
            with _autocast(x.device, amp):
                loss = model(x).float().square().mean()
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss.backward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                with LiveBytes() as tally:
                    loss.backward()
                peak = tally.peak
        out: dict[str, Any] = {"bwd_peak_mib": peak / MiB}
    except torch.cuda.OutOfMemoryError as e:
        out = _oom_row(e)
    finally:
        loss = model = None
        _release(params, x)
    out["param_mib"] = sum(p.nbytes for p in params) / MiB
    return out


def print_accumulation_table(rows: list[dict[str, Any]]) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["depth"]): r for r in rows}
    print("\nbackward peak over the memory live before it, with .grad already filled (MiB; params: all blocks'):")
    print(f"{'depth':>6} {'params':>9} " + " ".join(f"{v:>10}" for v in variants))
    for dp in sorted({r["depth"] for r in rows}):
        vals = [cell.get((v, dp), {}) for v in variants]
        par = next((c["param_mib"] for c in vals if "param_mib" in c), float("nan"))
        print(f"{dp:>6} {par:>9.2f} " + " ".join(
            f"{'OOM' if 'error' in c else _fmt(c.get('bwd_peak_mib')):>10}" for c in vals))


def grad_errors(pairs, x: torch.Tensor, amp: bool) -> dict[str, float]:
    """Relative gradient error (max over tensors of ||g - g_ref|| / ||g_ref||) of ours and the
    seed against plain autograd of the same two-stream function (ours with reversible=False)."""
    import reversible
    from bench.peers import SeedReversibleSequence

    params = [p for f, g in pairs for p in (*f.parameters(), *g.parameters())]

    def grads(model, seed=0):
        torch.manual_seed(seed)
        xx = x.detach().clone().requires_grad_()
        with _autocast(x.device, amp):
            y = model(xx)
        gs = torch.autograd.grad(y.float().square().mean(), [xx, *params], allow_unused=True)
        out = [g.float() if g is not None else None for g in gs]
        for p in params:
            p.grad = None
        return out

    def rel(a, b):
        errs = []
        for u, v in zip(a, b):
            if v is None:
                continue
            u = torch.zeros_like(v) if u is None else u
            errs.append(((u - v).norm() / v.norm().clamp_min(1e-30)).item())
        return max(errs)

    ref_model = reversible.ReversibleSequence(pairs, dim=-1, merge="sum")
    ref_model.reversible = False
    ref = grads(ref_model)
    ours = grads(reversible.ReversibleSequence(pairs, dim=-1, merge="sum"))
    # the seed accumulates parameter gradients inside its backward (not returned by autograd.grad)
    seed_model = SeedReversibleSequence(pairs)
    torch.manual_seed(0)
    xx = x.detach().clone().requires_grad_()
    with _autocast(x.device, amp):
        y = seed_model(xx)
    y.float().square().mean().backward()
    seed = [xx.grad.float()] + [p.grad.float() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    return {"ours": rel(ours, ref), "seed": rel(seed, ref)}


def recon_errors(pairs, x: torch.Tensor) -> dict[str, float]:
    import reversible
    from bench.peers import SeedReversibleSequence, seed_reconstruction_error

    ours = reversible.ReversibleSequence(pairs, dim=-1, merge="sum")
    seed = SeedReversibleSequence(pairs)
    out = {}
    with torch.no_grad():
        out["ours_fp32"] = reversible.reconstruction_error(ours, x)
        with _autocast(x.device, True):
            out["ours_bf16"] = reversible.reconstruction_error(ours, x)
        out["seed_fp32"] = seed_reconstruction_error(seed, x)
        out["seed_bf16"] = seed_reconstruction_error(seed, x, autocast_dtype=torch.bfloat16)
    return out


# ----------------------------------------------------------------------------- microbenchmark

def _bench_ms(fn: Callable[[], None], device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with _Timer(device) as t:
        for _ in range(iters):
            fn()
    return t.ms / iters


def microbench(b: int, n: int, d: int, device, iters: int) -> list[dict[str, Any]]:
    """One block's elementwise backward work (two half-steps) at the stack's sizes, three ways."""
    from reversible import _extension, _inplace

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.randn(b, n, 2 * d, device=device, dtype=dtype)
        gbuf = torch.randn(b, n, 2 * d, device=device, dtype=dtype)
        fy = torch.randn(b, n, d, device=device, dtype=dtype)
        g = torch.randn(b, n, d, device=device, dtype=dtype)
        y1, y2 = buf.chunk(2, dim=-1)
        d1, d2 = gbuf.chunk(2, dim=-1)

        def fused():
            _inplace.reconstruct_(y2, fy, d1, g)
            _inplace.reconstruct_(y1, fy, d2, g)

        def seed_like():  # the seeds: out-of-place sub/add per half-step, two cats per block
            x2 = y2 - fy
            dx1 = d1 + g
            x1 = y1 - fy
            dx2 = d2 + g
            torch.cat([x1, x2], dim=-1)
            torch.cat([dx1, dx2], dim=-1)

        with _extension.use_extension(True):
            live = _extension.extension_info()["path"] == "extension" and device.type in _extension._state["devices"]
            t_ext = _bench_ms(fused, device, iters)
        with _extension.use_extension(False):
            t_torch = _bench_ms(fused, device, iters)
        t_seed = _bench_ms(seed_like, device, iters)
        half_bytes = b * n * d * buf.element_size()
        moved = 2 * 6 * half_bytes  # per block: 2 half-steps x (read y, fy, dy, grad; write y, dy)
        rows.append({"dtype": str(dtype).replace("torch.", ""), "ext_live": live, "ext_ms": t_ext,
                     "torch_inplace_ms": t_torch, "seed_ms": t_seed,
                     "ext_GBps": moved / t_ext / 1e6, "speedup_vs_torch": t_torch / t_ext,
                     "speedup_vs_seed": t_seed / t_ext})
        del buf, gbuf, fy, g, y1, y2, d1, d2
        _free()

    # a dict-valued stream: 3 keys of different widths, one launch vs a loop of ATen ops
    widths = (d, d // 2, d // 4)
    ys = [torch.randn(b, n, 2 * w, device=device).chunk(2, -1)[1] for w in widths]
    ds = [torch.randn(b, n, 2 * w, device=device).chunk(2, -1)[0] for w in widths]
    fs = [torch.randn(b, n, w, device=device) for w in widths]
    gs = [torch.randn(b, n, w, device=device) for w in widths]
    with _extension.use_extension(True):
        t_ext = _bench_ms(lambda: _inplace.reconstruct_multi_(ys, fs, ds, gs), device, iters)
    with _extension.use_extension(False):
        t_torch = _bench_ms(lambda: _inplace.reconstruct_multi_(ys, fs, ds, gs), device, iters)
    rows.append({"dtype": "float32 dict(3 keys)", "ext_live": live, "ext_ms": t_ext, "torch_inplace_ms": t_torch,
                 "seed_ms": float("nan"), "ext_GBps": 6 * sum(t.numel() for t in ys) * 4 / t_ext / 1e6,
                 "speedup_vs_torch": t_torch / t_ext, "speedup_vs_seed": float("nan")})
    return rows


def _warm_steps(variants, depth: int, d: int, heads: int, seq: int, batch: int, device, amp: bool):
    """Per variant, ``(name, step)`` after two warm-up steps, inside the variant's extension context, with
    the gradients cleared and the device idle (for the one-step diagnostics below)."""
    pairs, params, x = make_stack(depth, d, heads, seq, batch, device)
    for v in variants:
        model = make_model(v, pairs)
        step = _train_step(model, params, x, amp)
        with _ext_ctx(v):
            step()
            step()
            _release(params, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            yield v, step
        del model, step
        _release(params, x)


def profile_variants(variants, depth: int, d: int, heads: int, seq: int, batch: int, device, amp: bool,
                     rows: int) -> dict[str, Any]:
    """One profiled step per variant: kernel (device) time vs step time, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for v, step in _warm_steps(variants, depth, d, heads, seq, batch, device, amp):
        with profile(activities=acts) as prof:
            with _Timer(device) as t:
                step()
        ka = prof.key_averages()
        dev_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka)
        out[v] = {"step_ms": t.ms, "kernel_ms": dev_us / 1e3}
        print(f"\n[profile] {v} depth {depth}: step {t.ms:.1f} ms (profiled), kernels {dev_us / 1e3:.1f} ms, "
              f"GPU idle {t.ms - dev_us / 1e3:.1f} ms")
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(ka.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    return out


def peak_variants(variants, depth: int, d: int, heads: int, seq: int, batch: int, device, amp: bool,
                  cpp: bool = False) -> None:
    """Per variant: the blocks live at the allocator's peak during one step (CUDA only)."""
    from bench.tools.memory_peak import peak_breakdown, print_breakdown

    if device.type != "cuda":
        print("[peak] needs a CUDA device (the allocator's trace); skipped")
        return
    for v, step in _warm_steps(variants, depth, d, heads, seq, batch, device, amp):
        peak, rows = peak_breakdown(step, cpp=cpp)
        print_breakdown(f"{v} depth {depth}", peak, rows)


def overlap_probe(d: int, heads: int, seq: int, batch: int, device, amp: bool, reps: int = 20) -> dict:
    """What a second CUDA stream could buy the reversible backward (CUDA only).

    A reversible backward could run the next block's recomputed forward (with its graph) on a second stream
    while the current block's backward runs. This times, on one (attention, MLP) block pair of the
    benchmark's config: the recomputed forward alone (F), a backward alone (B), the two in sequence on one
    stream, and the two at once on two streams; returns milliseconds (medians of ``reps`` calls after three,
    each from an idle device) and the step ratio to plain autograd that perfect use of the overlap would give,
    ``(F + overlapped) / (F + B)`` against ``(F + sequence) / (F + B)`` without it.
    """
    if device.type != "cuda":
        print("[overlap] needs a CUDA device; skipped")
        return {}
    torch.manual_seed(0)
    (fa, ga), (fb, gb) = make_pairs(2, d, heads, device)
    xa = torch.randn(batch, seq, d, device=device, requires_grad=True)
    xb = torch.randn(batch, seq, d, device=device, requires_grad=True)
    grad = torch.randn(batch, seq, d, device=device)
    side = torch.cuda.Stream()

    def block(f, g, x):
        with _autocast(device, amp):
            return Residual._block(f, g, x)

    def forward():
        block(fb, gb, xb)  # graph built and dropped, as a recomputation would keep it until its backward

    out_a = block(fa, ga, xa)

    def backward():
        torch.autograd.backward(out_a, grad, retain_graph=True)

    def sequence():
        forward()
        backward()

    def overlapped():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        backward()
        torch.cuda.current_stream().wait_stream(side)

    def time_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            with _Timer(device) as t:  # its end event waits for the device: each call starts from an idle one
                fn()
            times.append(t.ms)
        return statistics.median(times)

    r = {k: time_ms(fn) for k, fn in (("forward_ms", forward), ("backward_ms", backward),
                                       ("sequence_ms", sequence), ("overlapped_ms", overlapped))}
    plain = r["forward_ms"] + r["backward_ms"]
    r["ratio_sequence"] = (r["forward_ms"] + r["sequence_ms"]) / plain
    r["ratio_overlapped"] = (r["forward_ms"] + r["overlapped_ms"]) / plain
    print(f"[overlap] one block (b {batch}, n {seq}, d {d}, {'bf16 autocast' if amp else 'fp32'}): forward "
          f"{r['forward_ms']:.2f} ms, backward {r['backward_ms']:.2f} ms, in sequence {r['sequence_ms']:.2f} ms, "
          f"on two streams {r['overlapped_ms']:.2f} ms; step vs plain: recomputation in sequence "
          f"{r['ratio_sequence']:.3f}x, overlapped {r['ratio_overlapped']:.3f}x")
    return r


# ----------------------------------------------------------------------------- reporting

def _fmt(v, spec=".2f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    plain = {r["depth"]: r.get("step_ms") for r in results if r["variant"] == "plain"}
    print(f"{'depth':>5} {'variant':>10} {'peak GiB':>9} {'act GiB':>8} {'step ms':>9} {'ms/block':>9} {'x plain':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['depth']:>5} {r['variant']:>10}  {r['error'][:60]}")
            continue
        ratio = r["step_ms"] / plain[r["depth"]] if plain.get(r["depth"]) else None
        print(f"{r['depth']:>5} {r['variant']:>10} {_fmt(r.get('peak_gib')):>9} {_fmt(r.get('act_gib')):>8} "
              f"{_fmt(r['step_ms'], '.1f'):>9} {_fmt(r['step_ms'] / r['depth']):>9} {_fmt(ratio):>8}")


def plot(results: list[dict[str, Any]], path: Path, title: str) -> str:
    """Activation memory (where measured: CUDA) and step time against depth, one line per variant, to
    ``path``; returns the line to print: what was written, or why nothing was (no file then)."""
    done = [r for r in results if "error" not in r]
    panels = [(key, label) for key, label in (("act_gib", "activation memory (GiB)"),
                                              ("step_ms", "step time, fwd+bwd (ms)"))
              if any(r.get(key) is not None for r in done)]
    if not panels:
        if path.exists():  # a plot left by an earlier run would contradict the JSON
            path.unlink()
        return "no plot: no step was measured"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib not importable: no plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, ylab) in zip(axes[0], panels):
        for v in VARIANTS:
            pts = [(r["depth"], r[key]) for r in done if r["variant"] == v and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if len(panels) == 1 and panels[0][0] == "step_ms":
        return f"wrote {path} (step time only: activation memory is measured on CUDA only)"
    return f"wrote {path}"


def result_rows(report: dict[str, Any], env: dict) -> list[dict]:
    """The figures of ``report`` as result rows (:mod:`bench.results`): per (variant, depth) step time (spread:
    20th/80th percentile of the timed steps), activation and peak memory; the fused-step microbenchmark's times."""
    cfg = report["meta"]["config"]
    dtype = "bf16 autocast" if cfg["amp"] != "fp32" else "float32"
    out = []
    plain = {r["depth"]: r["step_ms"] for r in report["results"] if r["variant"] == "plain" and "step_ms" in r}
    for r in report["results"]:
        if "error" in r:
            continue
        shape = {"depth": r["depth"], "d_model": cfg["d_model"], "heads": cfg["heads"], "seq": cfg["seq"],
                 "batch": cfg["batch"]}
        spread = harness.summarize(r["step_ms_all"]).spread if r.get("step_ms_all") else None
        for metric, unit, sp in (("step_ms", "ms", spread), ("act_gib", "GiB", None), ("peak_gib", "GiB", None)):
            if results.finite(r.get(metric)):
                out.append(results.row("reversible", "reversible stack, training step", r["variant"], shape, dtype,
                                       metric, unit, r[metric], env, spread=sp))
        if r["depth"] in plain and "step_ms" in r:
            out.append(results.row("reversible", "reversible stack, training step", r["variant"], shape, dtype,
                                   "step_vs_plain", "x", r["step_ms"] / plain[r["depth"]], env))
    for m in report["micro"]:
        shape = {"batch": cfg["batch"], "seq": cfg["seq"], "d_model": cfg["d_model"]}
        for impl, key in (("extension", "ext_ms"), ("torch in-place", "torch_inplace_ms"), ("seed", "seed_ms")):
            if results.finite(m.get(key)):
                out.append(results.row("reversible", "one block's reconstruction steps", impl, shape, m["dtype"],
                                       "ms", "ms", m[key], env))
    return out


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench reversible", description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=positive_int, nargs="+", default=None,
                    help="stack depths (default 4 8 16 32 64; tiny 2 4)")
    ap.add_argument("--d-model", type=positive_int, default=None, help="width (default 1024; tiny 64)")
    ap.add_argument("--heads", type=positive_int, default=None,
                    help="attention heads, dividing --d-model (default 16; tiny 4)")
    ap.add_argument("--seq", type=positive_int, default=None, help="tokens per sequence (default 2048; tiny 32)")
    ap.add_argument("--batch", type=positive_int, default=None, help="sequences (default 8; tiny 2)")
    ap.add_argument("--steps", type=positive_int, default=None, help="timed steps per point (median; default 3, tiny 1)")
    ap.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps before them (default 1)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--no-amp", action="store_true", help="fp32 compute (default: bf16 autocast; tiny: fp32)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast also in the tiny config")
    ap.add_argument("--no-micro", action="store_true", help="skip the fused elementwise steps' microbenchmark")
    ap.add_argument("--micro-only", action="store_true", help="only that microbenchmark")
    ap.add_argument("--micro-iters", type=positive_int, default=None,
                    help="calls averaged per figure there (default 50; tiny 5)")
    ap.add_argument("--no-errors", action="store_true", help="skip reconstruction / gradient errors")
    ap.add_argument("--no-accumulation", action="store_true",
                    help="skip the backward-peak-vs-depth table with .grad already filled")
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU config, also on a GPU")
    ap.add_argument("--profile", type=positive_int, default=None, metavar="DEPTH",
                    help="only profile one step per variant at this depth (kernel time vs step time, top ops)")
    ap.add_argument("--profile-rows", type=positive_int, default=15)
    ap.add_argument("--peak", type=positive_int, default=None, metavar="DEPTH",
                    help="only list what is live at the memory peak of one step per variant at this depth "
                         "(CUDA)")
    ap.add_argument("--peak-cpp", action="store_true", help="--peak with the C++ frames (ATen ops, autograd nodes)")
    ap.add_argument("--overlap-probe", action="store_true",
                    help="only time one block's recomputed forward against a backward on one and on two CUDA "
                         "streams: what a second stream could buy (CUDA)")
    ap.add_argument("--out", default=OUT, help="where the JSON and the PNG go (default: bench/out)")
    harness.add_record_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv or [])

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    if tiny:
        dflt = dict(depths=[2, 4], d_model=64, heads=4, seq=32, batch=2, micro_iters=5)
        print("[bench reversible] " + ("no CUDA device: " if not cuda else "") +
              "running a TINY config (d_model 64, seq 32, batch 2, depths 2 4) to check the script; "
              "its numbers say nothing about the GPU targets")
    else:
        dflt = dict(depths=[4, 8, 16, 32, 64], d_model=1024, heads=16, seq=2048, batch=8, micro_iters=50)
    depths = args.depths or dflt["depths"]
    d, heads = args.d_model or dflt["d_model"], args.heads or dflt["heads"]
    if d % heads:
        parser.error(f"--d-model {d} must be divisible by --heads {heads}")
    seq, batch = args.seq or dflt["seq"], args.batch or dflt["batch"]
    iters = args.micro_iters or dflt["micro_iters"]
    if not cuda:
        torch.set_num_threads(1)  # tiny ops: threading only adds contention on a shared CPU
    amp = (not args.no_amp) and (args.amp or not tiny)  # CPU bf16 autocast is slow: tiny runs fp32
    steps = args.steps or (1 if tiny else 3)

    import reversible

    info = reversible.extension_info()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "config": {"d_model": d, "heads": heads, "seq": seq, "batch": batch, "depths": depths,
                   "amp": "bf16 autocast" if amp else "fp32", "params": "fp32", "steps": steps,
                   "warmup": args.warmup, "tiny": tiny},
        "extension": info,
        "command": "python -m bench reversible " + " ".join(argv or []),
    }
    print(f"[bench reversible] {meta['device']} torch {meta['torch']} | extension: {info['path']} "
          f"({info['source']}, devices {info['devices']}; {info['reason']})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overlap_probe:
        r = overlap_probe(d, heads, seq, batch, device, amp)
        (out_dir / "reversible_overlap.json").write_text(json.dumps({"meta": meta, "overlap": r}, indent=1))
        return
    if args.peak:
        peak_variants(args.variants, args.peak, d, heads, seq, batch, device, amp, args.peak_cpp)
        return
    if args.profile:
        prof = profile_variants(args.variants, args.profile, d, heads, seq, batch, device, amp, args.profile_rows)
        (out_dir / "reversible_profile.json").write_text(json.dumps({"meta": meta, "profile": prof}, indent=1,
                                                                    default=str))
        return
    report: dict[str, Any] = {"meta": meta, "results": [], "errors": {}, "micro": [], "accumulation": []}

    if not args.micro_only:
        for depth in depths:
            pairs, params, x = make_stack(depth, d, heads, seq, batch, device)
            for v in args.variants:
                model = make_model(v, pairs)
                t0 = time.perf_counter()
                r = measure(v, model, x, params, amp, steps, args.warmup)
                r.update(variant=v, depth=depth, wall_s=round(time.perf_counter() - t0, 2))
                report["results"].append(r)
                msg = r.get("error") or (f"step {r['step_ms']:.1f} ms" +
                                         (f", act {r['act_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB"
                                          if "act_gib" in r else ""))
                print(f"  depth {depth:>3} {v:>10}: {msg}", flush=True)
                del model
                _free()
            if not args.no_accumulation:
                for v in args.variants:
                    r = backward_peak_existing_grads(v, pairs, x, amp)
                    r.update(variant=v, depth=depth)
                    report["accumulation"].append(r)
            if not args.no_errors:
                e = recon_errors(pairs, x.detach())
                if depth == min(depths):
                    e["grad_rel_err_bf16"] = grad_errors(pairs, x, amp=True)
                    e["grad_rel_err_fp32"] = grad_errors(pairs, x, amp=False)
                report["errors"][depth] = e
                print(f"  depth {depth:>3} errors: " + json.dumps(e, default=lambda o: round(o, 8)), flush=True)
            del pairs, params, x
            _free()
        print()
        print_table(report["results"])
        if report["accumulation"]:
            print_accumulation_table(report["accumulation"])

    if not args.no_micro:
        report["micro"] = microbench(batch, seq, d, device, iters)
        print(f"\nfused elementwise steps, one block's backward (2 half-steps) at b={batch} n={seq} d={d} "
              f"(halves of a (b, n, 2d) buffer):")
        print(f"{'dtype':>20} {'ext ms':>8} {'torch ms':>9} {'seed ms':>8} {'ext GB/s':>9} {'vs torch':>9} {'vs seed':>8}")
        for m in report["micro"]:
            print(f"{m['dtype']:>20} {m['ext_ms']:>8.3f} {m['torch_inplace_ms']:>9.3f} {_fmt(m['seed_ms'], '.3f'):>8} "
                  f"{m['ext_GBps']:>9.0f} {m['speedup_vs_torch']:>8.2f}x {_fmt(m['speedup_vs_seed']):>7}x")

    tag = "tiny" if tiny else "gpu"
    jpath = out_dir / f"reversible_{tag}.json"
    jpath.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n[bench reversible] wrote {jpath}")
    harness.record("reversible", result_rows(report, harness.environment()),
                   cuda and not tiny if args.record is None else args.record)
    if report["results"]:
        ppath = out_dir / f"reversible_{tag}.png"
        title = f"{meta['device']}, d={d} h={heads} n={seq} b={batch}, {meta['config']['amp']}"
        print(f"[bench reversible] {plot(report['results'], ppath, title)}")


if __name__ == "__main__":
    main(sys.argv[1:])
