"""Full training steps of the GateLoop Transformer: ours against the seed's model, side by side.

``python -m bench model [--quick]``: tokens/s and peak memory of forward + backward + AdamW steps
(dim 512, depth 6, 256 tokens) at head dim 1 (the seed's default, ``heads = dim``) and head dim 64
(``gate_loop_heads=8``), fp32 and bf16 autocast, batch 8 x 2048 and 1 x 32768, plus 1 x 131072 for
ours (reversible too). The seed's model comes from an installed ``gateloop_transformer``; it
cannot run under bf16 autocast (``view_as_complex`` rejects bfloat16), which is reported, not
hidden. On a GPU, rows of ours under ``torch.compile(model)`` are added (``--no-compile`` skips them).
On the CPU a tiny configuration runs through the reference path, and says so.
Writes ``model.json`` to ``--out`` (default ``bench/out``); on a GPU also appends the figures as result rows to
``bench/results/model.jsonl`` (``--no-record`` skips that).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from bench import OUT, device_name, harness, results


def _make(which: str, heads: Optional[int], dim: int, depth: int, reversible: bool) -> nn.Module:
    kwargs = dict(dim=dim, num_tokens=256, depth=depth, gate_loop_heads=heads)
    if which == "seed":
        from gateloop_transformer import Transformer as Seed
        return Seed(**kwargs)
    from gateloop_kernels import Transformer
    if which == "attn":  # softmax attention through SDPA, 8 heads of 64: the baseline a user compares against
        return Transformer(dim=dim, num_tokens=256, depth=depth, use_gate_looped_attn=False, reversible=reversible)
    return Transformer(**kwargs, reversible=reversible)


def measure(which: str, heads: Optional[int], batch: int, seq: int, amp: bool, device: str, dim: int = 512,
            depth: int = 6, reversible: bool = False, steps: int = 5, warmup: int = 2, compiled: bool = False,
            compile_mode: str = "default", device_time: bool = False) -> dict:
    """Median tokens/s over ``steps`` AdamW steps after ``warmup``; peak memory in GiB.

    ``device_time`` (CUDA): also ``device_ms``, the kernels' device time per step (profiler over ``steps`` more
    steps): beside ``step_ms`` it says whether the eager step is host-bound (wall >> device) or device-bound; and
    ``syncs``, the host synchronisations of one more step (``torch.cuda.set_sync_debug_mode("warn")``: each
    synchronising call warns; a step that waits on the device cannot overlap its host work with it).

    ``host_ms``: the median time the host takes to issue a step (its Python, autograd and launches, until the
    step's last call returns, before the wait for the device), each step from an idle device: where it is close
    to ``step_ms`` the step is host-bound, and it compares two models' host cost at the same shape in one run
    (a queue of launches too long for the driver blocks the host: then it includes device time).

    ``compiled``: the steps run ``torch.compile(model, mode=compile_mode)`` (the optimizer stays
    eager); dynamo is reset first, the warm-up (at least one step) covers compilation, and the
    first step's wall time is returned as ``compile_s``.
    """
    torch.manual_seed(0)
    model = _make(which, heads, dim, depth, reversible).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model: Callable[..., torch.Tensor] = model
    if compiled:
        torch._dynamo.reset()  # no graphs or guards left over from the previous configuration
        step_model = torch.compile(model, mode=compile_mode)
        warmup = max(warmup, 1)
    tokens = torch.randint(0, 256, (batch, seq + 1), device=device)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    def step() -> torch.Tensor:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("always", message=".*synchroniz")  # (count_syncs' warnings pass)
            loss = step_model(tokens, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, host, first = [], [], None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        t_host = time.perf_counter() - t0  # the host's enqueueing of the step, from an idle device
        sync()
        if i >= warmup:
            host.append(t_host)
        if i == 0:
            first = time.perf_counter() - t0
            if compiled and device == "cuda":  # the peak of the steps, not of compilation (autotuning buffers)
                torch.cuda.reset_peak_memory_stats()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    t = harness.summarize([x * 1e3 for x in times])
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None  # no allocator stats on CPU
    out = {"tokens_per_s": batch * seq / (t.median * 1e-3), "step_ms": t.median, "step_spread_ms": t.spread,
           "host_ms": harness.summarize([x * 1e3 for x in host]).median, "peak_gib": peak, "loss": loss.item()}
    if device_time and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            sync()
        out["device_ms"] = sum(ev.device_time_total for ev in prof.key_averages()) / steps / 1e3
        out["syncs"] = count_syncs(step)
    if compiled:
        out["compile_s"] = first
        torch._dynamo.reset()
    return out


def count_syncs(fn: Callable[[], object]) -> int:
    """The host synchronisations one call of ``fn`` makes on the current CUDA device (their warnings under
    ``torch.cuda.set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (set_sync_debug_mode's own "Synchronization debug mode is a prototype feature" warning, once per process, made
    # the first model measured show one synchronisation a step)
    return sum("synchroniz" in str(w.message).lower() and "prototype" not in str(w.message) for w in caught)


def cases(device: str, quick: bool, compile: bool = False) -> list[dict]:
    if device != "cuda":
        out = [dict(which=w, heads=h, batch=2, seq=128, amp=amp, dim=64, depth=2)
               for h in (None, 4) for amp in (False, True) for w in ("seed", "ours")]
        if compile:
            out += [dict(which="ours", heads=h, batch=2, seq=128, amp=amp, dim=64, depth=2, compiled=True)
                    for h in (None, 4) for amp in (False, True)]
        return out
    out = []
    for heads in (None, 8):
        for batch, seq in ((8, 2048), (1, 32768)):
            for amp in (False, True):
                for which in ("seed", "ours"):
                    out.append(dict(which=which, heads=heads, batch=batch, seq=seq, amp=amp))
    if not quick:
        for heads in (None, 8):
            for rev in (False, True):
                out.append(dict(which="ours", heads=heads, batch=1, seq=131072, amp=True, reversible=rev))
    if compile:  # few configurations: each compile costs minutes
        out += [dict(which="ours", heads=heads, batch=8, seq=2048, amp=amp, compiled=True)
                for heads in (None, 8) for amp in (False, True)]
    return out


def time_gate(device: str) -> None:
    """The fused gate activation (``gateloop_kernels.gate``) against its PyTorch formula at the head-dim-1
    model's gate size (8 x 2048 x 512): ``do_bench`` medians of the forward and of the backward."""
    if device != "cuda":
        print("[model] gate timing needs a GPU; skipped")
        return
    from gateloop_kernels import gate
    z = 2 * torch.randn(8, 2048, 512, 2, device=device)
    g_re, g_im = torch.randn(2, 8, 2048, 512, device=device)
    for name, fwd, bwd in (("fused kernels", gate.gate_forward, gate.gate_backward),
                           ("PyTorch ops", gate.reference_forward, gate.reference_backward)):
        tf = harness.do_bench(lambda: fwd(z)).median
        tb = harness.do_bench(lambda: bwd(z, g_re, g_im)).median
        print(f"[model] gate (8, 2048, 512) {name:13s} forward {tf * 1e3:7.1f} us  backward {tb * 1e3:7.1f} us")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip the 131072-token runs")
    p.add_argument("--device", default=None, type=device_name)
    p.add_argument("--compile", action="store_true",
                   help="add rows of ours under torch.compile(model) (8 x 2048 on the GPU, ~20 s per compile; "
                        "the default on a GPU)")
    p.add_argument("--no-compile", action="store_true", help="no compiled rows (the default on the CPU)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the compiled rows (default: %(default)s)")
    p.add_argument("--compiled-only", action="store_true",
                   help="only the compiled rows (implies --compile); writes model_compiled_<mode>.json")
    p.add_argument("--extra-only", action="store_true",
                   help="only the rows beyond the eager table: 1 x 131072 and the compiled ones")
    p.add_argument("--gate", action="store_true", help="first time the fused gate activation against its "
                   "PyTorch formula (GPU)")
    p.add_argument("--out", default=OUT, help="where model.json goes (default: bench/out)")
    harness.add_record_argument(p)
    return p


def result_rows(rows: list[dict], env: dict) -> list[dict]:
    """The figures of ``rows`` as result rows (:mod:`bench.results`): tokens/s (spread: from the steps' 20th and
    80th percentile times), step time, the host's time to issue a step and peak memory per configuration that ran."""
    out = []
    for r in rows:
        if not results.finite(r.get("tokens_per_s")):
            continue
        impl = (r["which"] + (" (torch.compile)" if r.get("compiled") else "")
                + (" reversible" if r.get("reversible") else ""))
        shape = {"batch": r["batch"], "seq": r["seq"], "dim": r.get("dim", 512), "depth": r.get("depth", 6),
                 "head_dim": 1 if r["heads"] is None else r.get("dim", 512) // r["heads"]}
        dtype = "bf16 autocast" if r["amp"] else "float32"
        tokens = r["batch"] * r["seq"]
        spread = r.get("step_spread_ms")
        rate = [tokens / (spread[1] * 1e-3), tokens / (spread[0] * 1e-3)] if spread else None
        for metric, unit, value, sp in (("tokens_per_s", "tok/s", r["tokens_per_s"], rate),
                                        ("step_ms", "ms", r["step_ms"], spread),
                                        ("host_ms", "ms", r.get("host_ms"), None),
                                        ("peak_gib", "GiB", r.get("peak_gib"), None)):
            if results.finite(value):
                out.append(results.row("model", "GateLoop Transformer training step (AdamW)", impl, shape, dtype,
                                       metric, unit, value, env, spread=sp))
    return out


def _seed_installed() -> bool:
    return importlib.util.find_spec("gateloop_transformer") is not None


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gate:
        time_gate(device)
    args.compile = args.compile or args.compiled_only or (device == "cuda" and not args.no_compile)
    if device == "cpu":
        print("[model] no GPU: a tiny configuration (dim 64, depth 2, 2 x 128 tokens) through the CPU "
              "reference path; the figures say nothing about GPU speed")
    if args.compile:
        print(f"[model] compiled rows: torch.compile(model, mode={args.compile_mode!r}), inductor backend; "
              "the optimizer step stays eager; compile = wall time of the first step")
    todo = cases(device, args.quick, args.compile)
    if args.compiled_only:
        todo = [c for c in todo if c.get("compiled")]
    if args.extra_only:
        todo = [c for c in todo if c.get("compiled") or c["seq"] > 32768]
    rows = []
    for i, c in enumerate(todo):
        label = (f"{c['which']:4s} heads={c['heads'] or 'dim':>3} {c['batch']}x{c['seq']:<6d} "
                 f"{'bf16' if c['amp'] else 'fp32'}{' rev' if c.get('reversible') else ''}"
                 f"{' compiled' if c.get('compiled') else ''}")
        print(f"[model] ({i + 1}/{len(todo)}) {label} ...", end=" ", flush=True)
        if c.get("compiled"):
            c = {**c, "compile_mode": args.compile_mode}
        try:
            if c["which"] == "seed" and not _seed_installed():
                r = {"skipped": "upstream gateloop_transformer not installed"}
                print(f"skipped ({r['skipped']})")
            else:
                r = measure(device=device, **c)
                mem = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "   (no memory stats on the CPU)"
                comp = f"  (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
                print(f"{r['tokens_per_s'] / 1e3:8.1f}k tok/s  {mem}{comp}", flush=True)
        except torch.cuda.OutOfMemoryError:
            r = {"error": "out of memory"}
            print("out of memory")
        except Exception as err:  # the seed's model under bf16, for one
            r = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
            print(r["error"])
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append({**c, "compiled": bool(c.get("compiled")), **r})
    _table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = harness.environment()
    info = {"device": env["gpu"], "torch": env["torch"], "date": env["date"][:10],
            "compile_mode": args.compile_mode if args.compile else None}
    name = f"model_compiled_{args.compile_mode}.json" if args.compiled_only else "model.json"
    (out / name).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    harness.record("model", result_rows(rows, env), device == "cuda" if args.record is None else args.record,
                   log=print)


def _status(row: dict) -> str:
    """What the table shows where a row has no speed: a peer not installed is not a failure."""
    return "not installed" if row.get("skipped") else "fails" if row.get("error") else "-"


def _table(rows: list[dict]) -> None:
    """One line per configuration: seed, ours eager and, when measured, ours compiled (with its
    speed against ours eager and the compile time)."""
    with_comp = any(r.get("compiled") for r in rows)
    print("\nheads  batch x seq   amp   rev      seed tok/s  seed GiB   ours tok/s  ours GiB   speedup  mem ratio"
          + ("   compiled tok/s  GiB  vs eager  compile s" if with_comp else ""))
    keyf = lambda r: (r["heads"], r["batch"], r["seq"], r["amp"], r.get("reversible", False))  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(keyf(r), {})["ours compiled" if r.get("compiled") else r["which"]] = r
    for (heads, b, s, amp, rev), g in groups.items():
        seed, ours, comp = g.get("seed", {}), g.get("ours", {}), g.get("ours compiled")
        st, sm = seed.get("tokens_per_s"), seed.get("peak_gib")
        ot, om = ours.get("tokens_per_s"), ours.get("peak_gib")
        fmt = lambda x, f: (f % x) if isinstance(x, float) else f"{'-':>{len(f % 0.0)}}"  # noqa: E731
        sp = f"{ot / st:7.1f}x" if st and ot else "      -"
        mr = f"{om / sm:8.2f}" if sm and om else "       -"
        seed_txt = fmt(st, "%13.0f") if st else f"{_status(seed):>13s}"
        line = (f"{str(heads or 'dim'):>5s}  {b:>2d} x {s:<7d} {'bf16' if amp else 'fp32'}  {'yes' if rev else ' no'}  "
                f"{seed_txt} {fmt(sm, '%9.2f')}  {fmt(ot, '%11.0f')} {fmt(om, '%9.2f')}  {sp} {mr}")
        if comp is not None:
            ct = comp.get("tokens_per_s")
            ct_txt = fmt(ct, "%16.0f") if ct else f"{_status(comp):>16s}"
            vs = f"{ct / ot:8.2f}x" if ct and ot else "        -"
            line += f" {ct_txt} {fmt(comp.get('peak_gib'), '%5.2f')}  {vs}  {fmt(comp.get('compile_s'), '%9.1f')}"
        print(line)
