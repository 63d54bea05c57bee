"""The benchmarks' floors: ceilings of the device in use (H100 figures without CUDA), and the rate each
precision mode of the chunked scan is held to."""
import pytest
import torch

from bench import _ceilings, scan_chunked


def test_ceilings_without_cuda_are_the_h100_figures_and_say_so():
    if torch.cuda.is_available():
        pytest.skip("measures the device on a GPU machine (bench.scan prints it)")
    c = _ceilings.ceilings()
    assert c["measured"] is False and {k: c[k] for k in _ceilings.H100} == _ceilings.H100
    assert "not measured" in _ceilings.describe(c)


def test_exact_modes_are_held_to_the_faster_exact_rate():
    c = {"copy_bw": 4e12, "fp32": 50e12, "tf32": 360e12, "bf16": 700e12}
    # the exact float32 modes run as three tf32 dots: their ceiling is tf32 / 3 where that beats FFMA
    assert scan_chunked.rate("ieee", c) == scan_chunked.rate("tf32x3", c) == pytest.approx(120e12)
    assert scan_chunked.rate("ieee", dict(c, tf32=120e12)) == 50e12
    assert scan_chunked.rate("tf32", c) == 360e12 and scan_chunked.rate("bf16", c) == 700e12


def test_floors_use_the_measured_ceilings(monkeypatch):
    c = {"copy_bw": 2e12, "fp32": 50e12, "tf32": 300e12, "bf16": 600e12, "measured": True, "device": "x"}
    monkeypatch.setattr(scan_chunked, "ceilings", lambda: c)
    tb, tf, flops = scan_chunked.floors(64, 2048, 64, 64, "bf16")
    tb2, tf2, flops2 = scan_chunked.floors(64, 2048, 64, 64, "ieee")
    assert flops == flops2 > 0 and tf == pytest.approx(flops / 600e12) and tf2 == pytest.approx(flops / 100e12)
    assert tb2 == pytest.approx(2 * tb, rel=0.02)  # float32 inputs move twice the bytes of bf16 ones (the gate aside)
