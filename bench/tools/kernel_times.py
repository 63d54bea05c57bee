"""Per-kernel device time of one forward+backward, for the benchmarks' ``--profile`` options."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def kernel_times(run: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
                 reps: int = 10, warmup: int = 3) -> list[tuple[str, float, int]]:
    """``(kernel name, device us per iteration, launches per iteration)``, largest first, of
    ``torch.autograd.grad(run(*inputs), inputs, grad_out)`` on the GPU (torch.profiler, after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        torch.autograd.grad(run(*inputs), inputs, grad_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            torch.autograd.grad(run(*inputs), inputs, grad_out)
        torch.cuda.synchronize()
    rows = [(ev.key, ev.device_time_total / reps, ev.count // reps) for ev in prof.key_averages()
            if ev.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])
