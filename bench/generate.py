"""Generation: prefill time, per-token decode latency, tokens/s and peak memory, ours against the seed.

``python -m bench.generate [--quick]`` (``python -m bench generate`` once registered in ``bench/__main__.py``):
the dim-512, depth-6 GateLoop Transformer at head dim 1 and 64, batch 1, 16 and 128, prompts of 512, 8192
and 32768 tokens, 256 new tokens. Ours: one prefill call over the prompt (in ``--prefill-chunk`` pieces, each
continuing the cache), then decode steps on the cache, on CUDA replayed from one captured CUDA graph (the
median of the steps' event times is the latency). Against: this package's softmax-attention ``Transformer``
with its key/value cache at the same size, and the seed's model, which has no cache: each new token is a
full forward over the whole prefix (timed at the prompt length). Runs out of memory are recorded as such.
On the CPU a tiny configuration runs eagerly through the reference paths: a check that it runs, not a speed.
Writes ``generate.json`` to ``--out`` (default ``bench/out``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from bench import OUT, device_name, harness, positive_int, results

VOCAB = 256


def _make(which: str, head_dim: int, dim: int, depth: int) -> nn.Module:
    if which == "seed":
        from gateloop_transformer import Transformer as Seed
        return Seed(dim=dim, num_tokens=VOCAB, depth=depth, gate_loop_heads=None if head_dim == 1 else dim // head_dim)
    from gateloop_kernels import Transformer
    if which == "attn":
        return Transformer(dim=dim, num_tokens=VOCAB, depth=depth, use_gate_looped_attn=False,
                           heads=dim // head_dim, dim_head=head_dim)
    return Transformer(dim=dim, num_tokens=VOCAB, depth=depth,
                       gate_loop_heads=None if head_dim == 1 else dim // head_dim)


class _Timer:
    """Wall time on the CPU, CUDA events on the GPU (milliseconds)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


@torch.no_grad()
def measure_ours(which: str, head_dim: int, batch: int, prompt: int, new: int, device: str, dtype: torch.dtype,
                 dim: int, depth: int, prefill_chunk: int, graph: bool) -> dict:
    from gateloop_kernels import Transformer
    from gateloop_kernels.generate import _captured_step

    torch.manual_seed(0)
    model = _make(which, head_dim, dim, depth).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, VOCAB, (batch, prompt + new), device=device)
    timer = _Timer(device)

    def prefill(cache) -> None:
        for s in range(0, prompt, prefill_chunk):
            model(tokens[:, s:min(prompt, s + prefill_chunk)], cache=cache)
    # an untimed prefill and step first: the kernels compile for these shapes outside the timed region
    warm = model.init_cache(batch, prompt + new)
    prefill(warm)
    model(tokens[:, prompt:prompt + 1], cache=warm)
    del warm
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = model.init_cache(batch, prompt + new)
    prefill_ms = timer(lambda: prefill(cache))

    def step(tok: torch.Tensor) -> torch.Tensor:
        return Transformer.forward(model, tok, cache=cache)[:, -1]
    step(tokens[:, prompt:prompt + 1])  # one eager step: what capture needs first
    run, graphed = step, False
    if graph and device == "cuda":
        captured = _captured_step(step, tokens[:, prompt + 1:prompt + 2], cache)
        run, graphed = (captured, True) if captured is not None else (step, False)
    times = [timer(lambda t=t: run(tokens[:, t:t + 1])) for t in range(prompt + 1, prompt + new)]
    latency = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"prefill_ms": prefill_ms, "decode_ms": latency, "tokens_per_s": batch / latency * 1e3,
            "peak_gib": peak, "cuda_graph": graphed}


@torch.no_grad()
def measure_seed(head_dim: int, batch: int, prompt: int, device: str, dtype: torch.dtype, dim: int, depth: int,
                 reps: int = 3) -> dict:
    import warnings

    torch.manual_seed(0)
    model = _make("seed", head_dim, dim, depth).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, VOCAB, (batch, prompt), device=device)
    timer = _Timer(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's checkpoint warns about use_reentrant
        model(tokens[:, :8])
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [timer(lambda: model(tokens)) for _ in range(reps)]
    latency = statistics.median(times)  # no cache: every new token is a forward over the whole prefix
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"decode_ms": latency, "tokens_per_s": batch / latency * 1e3, "peak_gib": peak}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="prompts of 512 and 8192 tokens only, batch 1 and 16")
    p.add_argument("--dim", type=positive_int, default=512)
    p.add_argument("--depth", type=positive_int, default=6)
    p.add_argument("--head-dims", type=positive_int, nargs="+", default=[1, 64])
    p.add_argument("--batches", type=positive_int, nargs="+", default=None, help="default 1 16 128 (CPU: 1 2)")
    p.add_argument("--prompts", type=positive_int, nargs="+", default=None, help="default 512 8192 32768 (CPU: 16 64)")
    p.add_argument("--new", type=positive_int, default=None, help="new tokens (default 256; CPU: 8)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the models' parameter dtype")
    p.add_argument("--prefill-chunk", type=positive_int, default=8192, help="prefill in pieces of this many tokens")
    p.add_argument("--no-graph", action="store_true", help="decode eagerly on CUDA too")
    p.add_argument("--no-seed", action="store_true", help="skip the seed's model")
    p.add_argument("--no-attn", action="store_true", help="skip the softmax-attention Transformer")
    p.add_argument("--seed-max-prompt", type=positive_int, default=8192,
                   help="the seed's full forward is timed up to this prompt length")
    p.add_argument("--device", type=device_name, choices=["cpu", "cuda"], default=None,
                   help="default: cuda where there is a CUDA device, else cpu")
    p.add_argument("--out", default=OUT, help="where generate.json goes (default: bench/out)")
    harness.add_record_argument(p)
    return p


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    if cpu:
        print("[generate] no GPU: a tiny configuration through the CPU paths; the figures say nothing about GPU speed")
        dim, depth = min(args.dim, 64), min(args.depth, 2)
    else:
        dim, depth = args.dim, args.depth
    if any(dim % hd for hd in args.head_dims):
        parser.error(f"every --head-dims must divide the model width {dim}" + (" (--dim, at most 64 on the CPU)" if cpu
                                                                                 else " (--dim)"))
    batches = args.batches or ([1, 2] if cpu else [1, 16] if args.quick else [1, 16, 128])
    prompts = args.prompts or ([16, 64] if cpu else [512, 8192] if args.quick else [512, 8192, 32768])
    new = args.new or (8 if cpu else 256)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    seed = not args.no_seed and importlib.util.find_spec("gateloop_transformer") is not None
    rows = []
    for hd in args.head_dims:
        for b in batches:
            for p in prompts:
                todo = [("ours", hd), *([] if args.no_attn else [("attn", min(64, dim))]),
                        *([("seed", hd)] if seed and p <= args.seed_max_prompt and dtype == torch.float32 else [])]
                for which, h in todo:
                    label = f"{which:4s} hd={h:<3d} b={b:<4d} prompt={p:<6d}"
                    print(f"[generate] {label} ...", end=" ", flush=True)
                    try:
                        if which == "seed":
                            r = measure_seed(h, b, p, device, dtype, dim, depth)
                        else:
                            r = measure_ours(which, h, b, p, new, device, dtype, dim, depth, args.prefill_chunk,
                                             not args.no_graph)
                        pre = f"prefill {r['prefill_ms']:9.2f} ms  " if "prefill_ms" in r else " " * 24
                        mem = "" if r["peak_gib"] is None else f"  {r['peak_gib']:6.2f} GiB"
                        print(f"{pre}decode {r['decode_ms']:8.3f} ms/token  {r['tokens_per_s']:10.1f} tok/s{mem}")
                    except torch.cuda.OutOfMemoryError:
                        r = {"error": "out of memory"}
                        print("out of memory")
                    finally:
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    rows.append({"which": which, "head_dim": h, "batch": b, "prompt": p, "new": new, **r})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "dim": dim, "depth": depth, "dtype": args.dtype}
    (out / "generate.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    for line in target_lines(rows):
        print(f"[generate] {line}")
    harness.record("generate", result_rows(rows, harness.environment(), dim, depth, args.dtype), args.record,
                   log=print)


def target_lines(rows: list[dict]) -> list[str]:
    """Issue 22's targets from the rows: decode latency flat in the prompt, the speed-up over the seed at an
    8192-token prompt, the batch-1 step time."""
    ms = {(r["which"], r["head_dim"], r["batch"], r["prompt"]): r["decode_ms"] for r in rows if "decode_ms" in r}
    out = []
    for (which, hd, b, p), t in sorted(ms.items()):
        if which != "ours":
            continue
        prompts = sorted(q for (w, h, bb, q) in ms if (w, h, bb) == (which, hd, b))
        if p == prompts[-1] and len(prompts) > 1:
            out.append(f"ours hd={hd} b={b}: decode {t:.3f} ms at prompt {p} / {ms[(which, hd, b, prompts[0])]:.3f} "
                       f"ms at {prompts[0]} = {t / ms[(which, hd, b, prompts[0])]:.2f}x (target <= 1.1)")
        if ("seed", hd, b, p) in ms and p == 8192:
            out.append(f"ours hd={hd} b={b} prompt 8192: seed per token / ours = {ms[('seed', hd, b, p)] / t:.0f}x "
                       "(target >= 100)")
        if b == 1 and p == prompts[0]:
            out.append(f"ours hd={hd} b=1: decode step {t:.3f} ms (target <= 0.3 with the captured graph)")
    return out


def result_rows(rows: list[dict], env: dict, dim: int, depth: int, dtype: str) -> list[dict]:
    out = []
    for r in rows:
        shape = {"batch": r["batch"], "prompt": r["prompt"], "new": r["new"], "head_dim": r["head_dim"], "dim": dim,
                 "depth": depth}
        impl = {"ours": "ours (state cache" + (", CUDA graph)" if r.get("cuda_graph") else ", eager)"),
                "attn": "softmax attention (KV cache" + (", CUDA graph)" if r.get("cuda_graph") else ", eager)"),
                "seed": "seed (no cache: a forward per token)"}[r["which"]]
        for metric, unit in (("prefill_ms", "ms"), ("decode_ms", "ms"), ("tokens_per_s", "tok/s"), ("peak_gib", "GiB")):
            if results.finite(r.get(metric)):
                out.append(results.row("generate", "Transformer generation", impl, shape, dtype, metric, unit,
                                       r[metric], env))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
