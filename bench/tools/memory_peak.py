"""What is live at the peak of one step: the CUDA caching allocator's trace, replayed.

For the benchmarks' ``--peak`` options: records the allocator's history over one call of ``step``,
finds the moment the allocated bytes peak, and groups the blocks live then by size and by the Python
frames that allocated them (innermost first; allocations made by C++ autograd nodes have none).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable

import torch

MiB = 1024 ** 2


def _where(frames: list[dict], depth: int) -> str:
    py = [f for f in frames if f["filename"].endswith(".py") and not f["filename"].endswith(
        ("torch/cuda/memory.py", "tools/memory_peak.py"))]
    # C++ frames (recorded with cpp=True): the ATen ops and autograd nodes that allocated
    ops = [f["name"][:60] for f in frames if not f["filename"].endswith(".py")
           and ("at::native::" in f["name"] or "autograd::generated::" in f["name"])]
    where = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in py[:depth])
    return " | ".join(x for x in (" < ".join(dict.fromkeys(ops[:4])), where) if x) or "(no python frames)"


def peak_breakdown(step: Callable[[], None], depth: int = 3, cpp: bool = False
                   ) -> tuple[int, list[tuple[int, int, str]]]:
    """Run ``step()`` once under the allocator's recorder (``cpp``: also C++ frames, slower). Returns
    ``(peak bytes above the start, [(block bytes, count, where)])``, largest groups first, for the blocks
    live at the peak that were allocated during the step (blocks allocated before it are the baseline)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="all" if cpp else "python",
                                             max_entries=1_000_000)
    try:
        step()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _where(ev.get("frames", []), depth))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    groups = Counter(at_peak.values())
    rows = sorted(((size, count, where) for (size, where), count in groups.items()), key=lambda r: -r[0] * r[1])
    return peak, rows


def print_breakdown(label: str, peak: int, rows: list[tuple[int, int, str]], limit: int = 20) -> None:
    print(f"\n[peak] {label}: {peak / MiB:.0f} MiB allocated during the step at its peak; live blocks:")
    for size, count, where in rows[:limit]:
        print(f"[peak] {count:3d} x {size / MiB:8.1f} MiB = {count * size / MiB:8.1f} MiB  {where}")
    rest = sum(s * c for s, c, _ in rows[limit:])
    if rest:
        print(f"[peak]       ({len(rows) - limit} more groups, {rest / MiB:.1f} MiB)")
