"""The reversible benchmark's memory measure with existing gradients (issue 19, item 00) on the GPU."""
import pytest
import torch


@pytest.mark.gpu
def test_backward_memory_flat_in_depth_with_existing_grads_gpu():
    """The same on CUDA (allocator peak), bf16 autocast, fp32 parameters: depth 4, 16 and 32 within one
    block's parameter bytes of each other."""
    from bench.reversible import backward_peak_existing_grads, make_pairs

    dev = torch.device("cuda")
    d, heads, seq, batch = 512, 8, 1024, 4
    x = torch.randn(batch, seq, d, device=dev, requires_grad=True)
    peaks, block = {}, None
    # the first backward of a process allocates cuBLAS's workspace (32 MiB on an H100) once: not depth-dependent
    backward_peak_existing_grads("rev_ext", make_pairs(1, d, heads, dev), x, amp=True)
    for depth in (4, 16, 32):
        torch.manual_seed(0)
        pairs = make_pairs(depth, d, heads, dev)
        r = backward_peak_existing_grads("rev_ext", pairs, x, amp=True)
        peaks[depth], block = r["bwd_peak_mib"], r["param_mib"] / depth
        del pairs
    print(f"backward peak over base with existing .grad (MiB) by depth: {peaks}; "
          f"one block's parameters {block:.1f} MiB")
    assert max(peaks.values()) <= min(peaks.values()) + block
