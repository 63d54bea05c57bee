"""The device's ceilings behind the benchmarks' floors, measured once per run on the GPU in use.

``ceilings()`` returns ``{"copy_bw": bytes/s, "fp32": FLOP/s, "tf32": ..., "bf16": ..., "measured": bool,
"device": name}``: a device-to-device copy of 1 GiB (bytes read + written over the median time) and an
8192^3 matrix product per precision (strict float32, tf32, bf16), each on random data (``do_bench``
medians after warm-up). Without CUDA it returns the H100 figures of ``docs/design.md`` and says so
(``measured = False``), so the CPU runs of the benchmarks still print floors.
"""
from __future__ import annotations

import functools

import torch

#: measured on the H100 80GB (docs/kernels.md, section 8): used where there is no GPU to measure
H100 = {"copy_bw": 3.0e12, "fp32": 52e12, "tf32": 375e12, "bf16": 790e12}


def _matmul_rate(dtype: torch.dtype, precision: str, n: int = 8192) -> float:
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n ** 3 / (ms * 1e-3)


def copy_bandwidth() -> float:
    """Bytes per second (read + written) of a 1 GiB device-to-device copy of random float32, on CUDA."""
    from triton.testing import do_bench

    x = torch.randn(1 << 28, device="cuda")  # 1 GiB of float32, random (zeros can run faster)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.nbytes / (ms * 1e-3)


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """Copy bandwidth and matrix rates of the current CUDA device (or the H100 figures without CUDA)."""
    if not torch.cuda.is_available():
        return {**H100, "measured": False, "device": "none (H100 figures from docs/kernels.md)"}
    out = {"copy_bw": copy_bandwidth()}
    out["fp32"] = _matmul_rate(torch.float32, "highest")
    out["tf32"] = _matmul_rate(torch.float32, "high")
    out["bf16"] = _matmul_rate(torch.bfloat16, "highest")
    torch.cuda.empty_cache()
    return {**out, "measured": True, "device": torch.cuda.get_device_name()}


def describe(c: dict) -> str:
    """One line for the benchmarks' logs."""
    how = "measured" if c["measured"] else "not measured (no CUDA): H100 figures"
    return (f"ceilings {how}: copy {c['copy_bw'] / 1e12:.2f} TB/s, matmul fp32 {c['fp32'] / 1e12:.0f}, "
            f"tf32 {c['tf32'] / 1e12:.0f}, bf16 {c['bf16'] / 1e12:.0f} TFLOP/s")
