"""Every tile class of the chunked kernels on the GPU: head dims 16..256 (16-wide, masked 32-wide, 32-, 64-wide
and multi-tile), d != e, sequences that end in a partial chunk, every dtype and float32 precision, forward and
backward against the float64 reference. ``bench/gpu.sh memcheck`` also runs this file under compute-sanitizer."""
import pytest
import torch

from helpers.chunked_check import check

# (d, e): every tile width of ``chunked.config._block`` on both sides, 1 to 8 tiles, unequal and equal pairs
HEAD_DIMS = [(16, 16), (16, 17), (17, 16), (16, 48), (48, 16), (24, 40), (32, 16), (16, 32), (48, 80), (64, 16),
             (16, 64), (80, 48), (96, 160), (112, 64), (128, 200), (144, 32), (200, 128), (255, 16), (16, 255),
             (256, 256), (256, 96), (128, 96), (64, 256)]
MODES = [(torch.float32, "ieee", 1e-5), (torch.float32, "tf32", 5e-3), (torch.bfloat16, "ieee", 1e-2),
         (torch.float16, "ieee", 1e-2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision,tol", MODES, ids=["ieee", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("d,e", HEAD_DIMS, ids=[f"{d}x{e}" for d, e in HEAD_DIMS])
def test_gpu_head_dim_sweep(d, e, dtype, precision, tol, monkeypatch):
    # tf32 and 16-bit inputs through the one-kernel state pass, which these few programs would not pick
    # (``states._one_pass_pays``; the two passes are the exact mode's, swept here at every tile class too)
    from gateloop_kernels.chunked import states

    monkeypatch.setattr(states, "_sm_count", lambda device: 1)
    # n = 65 (a one-step last chunk) and n = 130 over two batch x head programs (three chunks, partial last)
    check(1, 65, 1, d, e, dtype, "cuda", tol, zeros=True, init=True, final=True, precision=precision, poison=True)
    check(2, 130, 1, d, e, dtype, "cuda", tol, zeros=True, init=True, final=True, precision=precision, poison=True)
