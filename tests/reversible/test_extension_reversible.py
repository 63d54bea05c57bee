"""Every reversible variant gives the same outputs and gradients with the revkern extension on
and off (float64 to <= 1e-12, float32 to <= 1e-6; in practice bitwise, since the fused ops do
ATen's arithmetic), and the extension's ops are really the ones called when it is on."""
from __future__ import annotations

import pytest
import torch

import reversible
from reversible import _extension

from helpers.op_log import OpLog
from helpers.seed_reversible_oracle import CrossFn, DictFn, Fn

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
D = 6


@pytest.fixture(scope="module", autouse=True)
def _need_extension():
    if not _extension.load():
        pytest.skip(f"extension unavailable: {_extension.extension_info()['reason']}")


def _run_both(build, run, seed, device="cpu"):
    """``run(model, log)`` -> list of tensors (outputs + grads), with the extension on and off."""
    results = {}
    for on in (True, False):
        torch.manual_seed(1234)
        model = build().to(device)
        with _extension.use_extension(on):
            torch.manual_seed(seed)
            results[on] = [t.detach().clone() if t is not None else None for t in run(model)]
    return results[True], results[False]


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return list(gs)


def _assert_same(a, b, dtype):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, i
            continue
        err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, y.double().abs().max().item()) if y.numel() else 1.0
        assert err / scale <= TOL[dtype], f"tensor {i}: on/off differ by {err / scale:.3e}"


def _xs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim,merge", [(-1, "mean"), (1, "sum"), (2, "cat")])
def test_tensor_stream(dtype, dim, merge, device, _seed):
    shape = {1: (2, 3, 4, D), 2: (2, 4, 3, D), -1: (2, 5, D)}[dim]

    def build():
        return reversible.ReversibleSequence([(Fn(D, 0.2, dtype), Fn(D, 0.2, dtype)) for _ in range(4)],
                                             dim=dim, merge=merge)

    def run(model):
        x = _xs(shape, dtype, device, _seed)
        y = model(x)
        w = torch.randn_like(y)
        return [y, *_grads((y * w).sum(), [x, *model.parameters()])]

    on, off = _run_both(build, run, _seed, device)
    _assert_same(on, off, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer_dropout", [0.0, 0.5])
def test_routing_and_layer_dropout(dtype, layer_dropout, _seed):
    depth = 4
    route = {"scale": [(True, False), (False, True), (True, True), (False, False)],
             "shift": [(False, True), (True, True), (False, False), (True, False)]}

    def build():
        return reversible.ReversibleSequence([(Fn(D, 0.1, dtype), Fn(D, 0.1, dtype)) for _ in range(depth)],
                                             args_route=route, default_route=None, layer_dropout=layer_dropout)

    def run(model):
        x = _xs((2, 5, D), dtype, "cpu", _seed)
        scale = _xs((D,), dtype, "cpu", _seed + 1)
        shift = _xs((2, 5, D), dtype, "cpu", _seed + 2).detach()
        y = model(x, scale=scale, shift=shift)
        return [y, *_grads(y.square().sum(), [x, scale, *model.parameters()])]

    on, off = _run_both(build, run, _seed)
    _assert_same(on, off, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dict_stream(dtype, _seed):
    dims = {"0": 4, "1": 3, "2": 5}

    def build():
        return reversible.ReversibleSequence([(DictFn(dims, 0.1, dtype), DictFn(dims, 0.1, dtype)) for _ in range(3)])

    def run(model):
        x = {k: _xs((2, 7, 2, d), dtype, "cpu", _seed + i) for i, (k, d) in enumerate(dims.items())}
        y = model(x)
        loss = sum((y[k] * torch.linspace(-1, 1, y[k].numel(), dtype=dtype).view_as(y[k])).sum() for k in y)
        return [*y.values(), *_grads(loss, [*x.values(), *model.parameters()])]

    on, off = _run_both(build, run, _seed)
    _assert_same(on, off, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dual_modality(dtype, _seed):
    types = ["intra_modality_self_attn", "intra_modality_cross_attn", "inter_modality_cross_attn"]

    def build():
        blocks = []
        for t in types:
            if t == "intra_modality_self_attn":
                blocks.append(tuple(Fn(D, 0.1, dtype) for _ in range(4)))
            else:
                blocks.append((CrossFn(D, 0.1, dtype), Fn(D, 0.1, dtype), CrossFn(D, 0.1, dtype), Fn(D, 0.1, dtype)))
        return reversible.DualModalityReversibleSequence(blocks, types)

    def run(model):
        video, audio = _xs((2, 5, D), dtype, "cpu", _seed), _xs((2, 3, D), dtype, "cpu", _seed + 1)
        context = _xs((2, 4, D), dtype, "cpu", _seed + 2)
        g = torch.Generator().manual_seed(_seed)
        kw = dict(context=context, context_mask=(torch.rand(2, 4, generator=g) > 0.3).to(dtype),
                  video_mask=(torch.rand(2, 5, generator=g) > 0.2).to(dtype),
                  audio_mask=(torch.rand(2, 3, generator=g) > 0.2).to(dtype))
        v, a = model(video, audio, **kw)
        loss = (v * v.detach().sin()).sum() + (a * a.detach().cos()).sum()
        return [v, a, *_grads(loss, [video, audio, context, *model.parameters()])]

    on, off = _run_both(build, run, _seed)
    _assert_same(on, off, dtype)


@pytest.mark.parametrize("stream_dtype", [None, torch.float32])
def test_autocast_bf16(stream_dtype, _seed):
    """CPU autocast (bf16 compute, fp32 params); with an fp32 stream the fused ops see mixed dtypes."""

    def build():
        return reversible.ReversibleSequence([(Fn(D, 0.1, torch.float32), Fn(D, 0.1, torch.float32)) for _ in range(3)],
                                             stream_dtype=stream_dtype)

    def run(model):
        x = _xs((2, 5, D), torch.float32, "cpu", _seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        return [y, *_grads(y.float().square().sum(), [x, *model.parameters()])]

    on, off = _run_both(build, run, _seed)
    _assert_same(on, off, torch.float32)


def test_extension_ops_are_called_when_on(_seed):
    net = reversible.ReversibleSequence([(Fn(D, 0.0), Fn(D, 0.0)) for _ in range(3)])
    dims = {"a": 3, "b": 4}
    dnet = reversible.ReversibleSequence([(DictFn(dims, 0.0), DictFn(dims, 0.0)) for _ in range(2)])
    for on in (True, False):
        with _extension.use_extension(on):
            log = OpLog()
            with log:
                x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
                net(x).sum().backward()
                xd = {k: torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True) for k, d in dims.items()}
                sum(v.sum() for v in dnet(xd).values()).backward()
            names = set(log.ops)
            if on:
                assert {"revkern::coupling_add_", "revkern::reconstruct_", "revkern::reconstruct_multi_"} <= names
                assert "aten::sub_.Tensor" not in names
            else:
                assert not any(n.startswith("revkern::") for n in names)
