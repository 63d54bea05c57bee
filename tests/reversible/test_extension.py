"""The revkern extension ops (csrc/reversible/) against the plain PyTorch formula, in place, on strided views.

CPU in CI (the extension is JIT-built once per machine, ~10-20 s); the same checks run on the GPU
(marked ``gpu``). Results must be bitwise equal to ATen's: same arithmetic, one rounding.
"""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch.library import opcheck

from reversible import _extension, _inplace

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),  # kernels
         (torch.bfloat16, torch.float32), (torch.float64, torch.float32)]   # ATen fallback inside the op


@pytest.fixture(scope="module")
def ops():
    if not _extension.load():
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"the extension did not build although a C++ compiler exists: {_extension.extension_info()}")
        pytest.skip(f"extension unavailable: {_extension.extension_info()['reason']}")
    return torch.ops.revkern


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _views(kind, shape, dtype, device):
    """(dst_view, base) pairs: a strided view of a fresh buffer; kinds cover split dims and transposes."""
    if kind == "contig":
        base = torch.randn(shape, device=device).to(dtype)
        return base, base
    if kind.startswith("half"):  # first or second half of a split buffer along dim d
        d, which = kind[4:].split("_")
        d = int(d)
        big = list(shape)
        big[d] *= 2
        base = torch.randn(big, device=device).to(dtype)
        return base.chunk(2, dim=d)[int(which)], base
    if kind == "transposed":
        base = torch.randn((shape[1], shape[0], *shape[2:]), device=device).to(dtype)
        return base.transpose(0, 1), base
    if kind == "offset":  # misaligned start: defeats 16-byte vectorization
        base = torch.randn(1 + torch.Size(shape).numel(), device=device).to(dtype)
        return base[1:].view(shape), base
    if kind == "every_other":
        big = list(shape)
        big[-1] *= 2
        base = torch.randn(big, device=device).to(dtype)
        return base[..., ::2], base
    raise ValueError(kind)


KINDS = ["contig", "half0_0", "half0_1", "half1_0", "half1_1", "half-1_0", "half-1_1", "transposed", "offset",
         "every_other"]
SHAPE = (6, 10, 24)


def _ref_reconstruct(y, fy, dy, g):
    y2, dy2 = y.clone(), dy.clone()
    y2.sub_(fy)
    dy2.add_(g)
    return y2, dy2


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_matches_pytorch(ops, device, dtype, kind):
    y, ybase = _views(kind, SHAPE, dtype, device)
    dy, dbase = _views(kind, SHAPE, dtype, device)
    # sources strided differently from the destinations
    fy, _ = _views("transposed", SHAPE, dtype, device)
    g, _ = _views("half-1_1", SHAPE, dtype, device)
    want_y, want_dy = _ref_reconstruct(y, fy, dy, g)
    ybase0, dbase0 = ybase.clone(), dbase.clone()
    ptrs = (y.data_ptr(), dy.data_ptr(), ybase.data_ptr())
    v = (y._version, dy._version)
    ops.reconstruct_(y, fy, dy, g)
    assert torch.equal(y, want_y) and torch.equal(dy, want_dy)
    assert (y.data_ptr(), dy.data_ptr(), ybase.data_ptr()) == ptrs  # in place: same storage
    assert y._version > v[0] and dy._version > v[1]
    # the rest of the buffer (the other half) is untouched
    mask = torch.ones_like(ybase, dtype=torch.bool)
    _views_mask = mask.as_strided(y.shape, y.stride(), y.storage_offset() - ybase.storage_offset())
    _views_mask.fill_(False)
    assert torch.equal(ybase[mask], ybase0[mask]) and torch.equal(dbase[mask], dbase0[mask])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dst_dtype,src_dtype", MIXED)
def test_mixed_dtypes_match_pytorch(ops, device, dst_dtype, src_dtype):
    y, _ = _views("half-1_0", SHAPE, dst_dtype, device)
    dy, _ = _views("half1_1", SHAPE, dst_dtype, device)
    fy = torch.randn(SHAPE, device=device).to(src_dtype)
    g = torch.randn(SHAPE, device=device).to(src_dtype)
    want_y, want_dy = _ref_reconstruct(y, fy, dy, g)
    ops.reconstruct_(y, fy, dy, g)
    assert torch.equal(y, want_y) and torch.equal(dy, want_dy)
    x, _ = _views("transposed", SHAPE, dst_dtype, device)
    want = x.clone().add_(fy)
    ops.coupling_add_(x, fy)
    assert torch.equal(x, want)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contig", "half-1_1", "half0_0", "transposed", "offset"])
def test_coupling_add_matches_pytorch(ops, device, dtype, kind):
    x, _ = _views(kind, SHAPE, dtype, device)
    fx, _ = _views("half1_0", SHAPE, dtype, device)
    want = x.clone().add_(fx)
    ptr = x.data_ptr()
    assert _inplace.coupling_add_(x, fx) is x
    assert torch.equal(x, want) and x.data_ptr() == ptr


@pytest.mark.parametrize("device", _devices())
def test_reconstruct_multi_matches_pytorch(ops, device):
    # a dict/dual stream: different shapes, split dims and dtypes in one call, one empty tensor
    specs = [((3, 5, 8), "half-1_0", torch.float32), ((3, 5, 6), "half-1_1", torch.float32),
             ((4, 7), "half0_1", torch.bfloat16), ((2, 3, 4), "transposed", torch.float64),
             ((0, 4), "contig", torch.float16), ((5,), "offset", torch.float16)]
    ys, fys, dys, gs = [], [], [], []
    for shape, kind, dt in specs:
        ys.append(_views(kind, shape, dt, device)[0])
        dys.append(_views(kind, shape, dt, device)[0])
        fys.append(torch.randn(shape, device=device).to(dt))
        gs.append(_views("contig", shape, dt, device)[0])
    want = [_ref_reconstruct(*a) for a in zip(ys, fys, dys, gs)]
    ptrs = [t.data_ptr() for t in ys + dys]
    _inplace.reconstruct_multi_(ys, fys, dys, gs)
    for (wy, wd), y, dy in zip(want, ys, dys):
        assert torch.equal(y, wy) and torch.equal(dy, wd)
    assert [t.data_ptr() for t in ys + dys] == ptrs


@pytest.mark.parametrize("device", _devices())
def test_many_tensors_and_odd_sizes(ops, device):
    # more tensors than one CUDA launch holds (12 pairs), sizes that leave vector tails,
    # a size-1 dim, a 0-dim tensor, and a larger tensor that spans several parallel_for tasks
    shapes = [(7, 13), (1, 31), (), (3, 1, 5), (257,), (130, 523)] * 3
    ys = [torch.randn(s, device=device) for s in shapes]
    dys = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    fys = [torch.randn(s, device=device) for s in shapes]
    gs = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]
    want = [_ref_reconstruct(*a) for a in zip(ys, fys, dys, gs)]
    ops.reconstruct_multi_(ys, fys, dys, gs)
    for (wy, wd), y, dy in zip(want, ys, dys):
        assert torch.equal(y, wy) and torch.equal(dy, wd)


@pytest.mark.parametrize("device", _devices())
def test_opcheck(ops, device):
    def t(*s, dt=torch.float32):
        return torch.randn(*s, device=device, dtype=dt)

    buf, gbuf = t(4, 5, 12), t(4, 5, 12)
    y, _ = buf.chunk(2, dim=-1)
    dy, _ = gbuf.chunk(2, dim=-1)
    opcheck(ops.reconstruct_.default, (y, t(4, 5, 6), dy, t(4, 5, 6)))
    opcheck(ops.coupling_add_.default, (t(3, 8).t(), t(8, 3, dt=torch.bfloat16)))
    opcheck(ops.reconstruct_multi_.default,
            ([t(3, 4), t(5, dt=torch.float64)], [t(3, 4), t(5, dt=torch.float64)],
             [t(3, 4), t(5, dt=torch.float64)], [t(3, 4), t(5, dt=torch.float64)]))


def test_errors(ops):
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ops.coupling_add_(a, torch.randn(4, 1))
    with pytest.raises(RuntimeError, match="overlap|single memory location"):
        ops.coupling_add_(torch.randn(6).as_strided((4, 6), (1, 0)), b)  # internal overlap
    with pytest.raises(RuntimeError, match="overlap"):
        ops.reconstruct_(a, b, a, b)  # two destinations alias
    with pytest.raises(RuntimeError, match="dtype"):
        ops.coupling_add_(torch.zeros(4, 6, dtype=torch.int32), torch.zeros(4, 6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="same length"):
        ops.reconstruct_multi_([a], [b], [], [])
    w = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.coupling_add_(a, w)
    with torch.no_grad():
        ops.coupling_add_(a, w)  # fine without grad mode
    # the Python helper keeps autograd semantics for grad-requiring inputs (ATen path)
    x = torch.randn(4, 6)
    out = _inplace.coupling_add_(x, w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 6))
    # broadcasting is left to ATen by the helper
    x = torch.randn(4, 6)
    want = x + b[:1]
    _inplace.coupling_add_(x, b[:1])
    assert torch.equal(x, want)


def test_compile_fullgraph(ops):
    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(y, fy, dy, g):
        _inplace.reconstruct_(y, fy, dy, g)
        return y * 2

    buf, fy, gbuf, g = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 8), torch.randn(3, 4)
    y, dy = buf[:, :4], gbuf[:, 4:]
    want_y, want_dy = _ref_reconstruct(y, fy, dy, g)
    out = step(y, fy, dy, g)
    assert torch.equal(y, want_y) and torch.equal(dy, want_dy) and torch.equal(out, want_y * 2)


def test_switch_and_info(ops):
    info = _extension.extension_info()
    assert info["path"] == "extension" and "cpu" in info["devices"] and info["reason"]
    with _extension.use_extension(False):
        assert _extension.extension_info()["path"] == "pytorch"
        assert _extension.ops() is None
        y, fy, dy, g = (torch.randn(3, 4) for _ in range(4))
        want = _ref_reconstruct(y, fy, dy, g)
        _inplace.reconstruct_(y, fy, dy, g)  # PyTorch bodies
        assert torch.equal(y, want[0]) and torch.equal(dy, want[1])
    assert _extension.extension_info()["path"] == "extension"


def test_unavailable_extension_warns_once(monkeypatch):
    state = dict(_extension._state)
    state.update(tried=True, loaded=False, warned=False, reason="simulated: no compiler")
    monkeypatch.setattr(_extension, "_state", state)
    monkeypatch.setattr(_extension, "_enabled", True)
    monkeypatch.setattr(_extension, "_fast", None)
    y, fy, dy, g = (torch.randn(3, 4) for _ in range(4))
    want = _ref_reconstruct(y, fy, dy, g)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _inplace.reconstruct_(y, fy, dy, g)
        _inplace.coupling_add_(torch.randn(3), torch.randn(3))
        _inplace.reconstruct_multi_([torch.randn(2)], [torch.randn(2)], [torch.randn(2)], [torch.randn(2)])
    msgs = [str(w.message) for w in rec if "extension unavailable" in str(w.message)]
    assert len(msgs) == 1 and "simulated" in msgs[0]
    assert torch.equal(y, want[0]) and torch.equal(dy, want[1])
    info = _extension.extension_info()
    assert info["path"] == "pytorch" and "simulated" in info["reason"]
