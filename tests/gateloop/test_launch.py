"""The direct launcher (gateloop_kernels/_launch.py): a launch goes through Triton whenever anything Triton
specializes on differs from every earlier launch, and otherwise calls the compiled launcher with the same
arguments Triton would pass; on the GPU, results through the direct path equal Triton's."""
import enum

import pytest
import torch

from gateloop_kernels import _launch, gate_loop_heads
from gateloop_kernels.reference import sequential_reference


class _Size(enum.IntEnum):
    BLOCK = 32


def _kernel(x_ptr, n, scale, y_ptr=None, BLOCK: int = 64, FLAG: bool = False):  # the fake kernel's signature
    pass


class _Compiled:
    def __init__(self, log: list) -> None:
        self.log, self.function, self.packed_metadata = log, "function", "packed"

    def run(self, *args) -> None:
        self.log.append(("direct", args))


class _FakeJit:
    """Stands in for a JITFunction: ``fake[grid](...)`` is "Triton's" launch, logged, returning a compiled kernel."""
    fn = staticmethod(_kernel)

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log)
        return launch


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(_launch, "_device", lambda: 0)
    monkeypatch.setattr(_launch, "_stream", lambda device: 1234)
    fake = _FakeJit()
    lt = _launch.Launcher(fake)
    lt._direct = True
    return lt, fake.log


def test_second_launch_with_the_same_specialization_is_direct(launcher):
    lt, log = launcher
    x, y = torch.zeros(64), torch.zeros(64)
    lt[(3,)](x, 32, 0.5, y, BLOCK=128)
    assert log[-1][0] == "triton"
    lt[(5, 2)](x, 48, 0.25, y, BLOCK=128)  # another value, same class: multiple of 16, not 1, 32-bit
    kind, args = log[-1]
    # grid padded to three, the stream, the function, Triton's metadata, no launch metadata or hooks, then
    # every parameter in order (tensors as their addresses): given keywords, defaults for the rest
    assert kind == "direct" and args == (5, 2, 1, 1234, "function", "packed", None, None, None,
                                         x.data_ptr(), 48, 0.25, y.data_ptr(), 128, False)
    assert len(log) == 2


@pytest.mark.parametrize("change", ["int_one", "int_unaligned", "int_wide", "dtype", "misaligned", "none",
                                    "constexpr", "option", "bool_for_one", "bool_for_zero", "int_subclass"])
def test_any_specialization_change_goes_through_triton(launcher, change):
    lt, log = launcher
    buf = torch.zeros(80)
    x, y = buf[:64], torch.zeros(64)
    args, kw = [x, 32, 0.5, y], {"BLOCK": 128}
    lt[(1,)](*args, **kw)
    lt[(1,)](*args, **kw)
    assert [e[0] for e in log] == ["triton", "direct"]
    if change == "int_one":
        args[1] = 1
    elif change == "int_unaligned":
        args[1] = 33
    elif change == "int_wide":
        args[1] = 2 ** 40
    elif change == "dtype":
        args[0] = x.double()
    elif change == "misaligned":
        args[0] = buf[1:65]  # 4 bytes past a 16-byte boundary
    elif change == "none":
        args[3] = None
    elif change == "constexpr":
        kw["FLAG"] = True
    elif change == "option":
        kw["num_warps"] = 8
    elif change in ("bool_for_one", "bool_for_zero"):  # True == 1 and False == 0 in Python: keyed apart anyway
        args[1] = 1 if change == "bool_for_one" else 0
        lt[(1,)](*args, **kw)
        lt[(1,)](*args, **kw)
        assert log[-1][0] == "direct"
        args[1] = change == "bool_for_one"
    elif change == "int_subclass":  # an int that is not exactly int (e.g. an IntEnum): its own key part
        args[1] = _Size.BLOCK
    lt[(1,)](*args, **kw)
    assert log[-1][0] == "triton"
    lt[(1,)](*args, **kw)
    assert log[-1][0] == "direct"


def test_launch_hooks_and_interpreted_kernels_go_through_triton(launcher, monkeypatch):
    lt, log = launcher
    x = torch.zeros(64)
    lt[(1,)](x, 32, 0.5)
    if _launch._knobs is not None:
        monkeypatch.setattr(_launch._knobs.runtime, "launch_enter_hook", lambda *a: None)
        lt[(1,)](x, 32, 0.5)
        assert log[-1][0] == "triton"
    lt._direct = False
    lt[(1,)](x, 32, 0.5)
    assert log[-1][0] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 64])
def test_gpu_direct_launches_match_triton_and_respecialize(d):
    """Repeated calls (direct launches after Triton's first) give the first call's results bit for bit
    (deterministic mode: the head-dim-1 look-back otherwise sums in a timing-dependent order); the same data
    4 bytes off a 16-byte boundary (another specialization: Triton's launch, then direct) gives the float64
    loop's results."""
    B, n, H = 2, 200, 4
    aligned = [torch.randn(B, n, H, d, device="cuda") for _ in range(3)]
    misaligned = [torch.empty(B * n * H * d + 1, device="cuda")[1:].view(B, n, H, d).copy_(t) for t in aligned]
    assert all(t.data_ptr() % 16 == 4 for t in misaligned)
    logm = -0.1 * torch.rand(B, n, H, device="cuda")
    phase = torch.randn(B, n, H, device="cuda")

    def run(q, k, v):
        q, k, v, lm, ph = (t.detach().requires_grad_() for t in (q, k, v, logm, phase))
        o, _ = gate_loop_heads(q, k, v, log_magnitude=lm, phase=ph, precision="ieee")
        o.backward(torch.ones_like(o))
        return [o.detach(), q.grad, k.grad, v.grad, lm.grad, ph.grad]

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(*aligned)
        for _ in range(2):
            for x, y in zip(first, run(*aligned)):
                assert torch.equal(x, y)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    a = torch.polar(logm.double().exp(), phase.double())
    ref = torch.stack([sequential_reference(*(t[:, :, h].double() for t in aligned), a[:, :, h, None, None])
                       for h in range(H)], dim=2)
    for out in (first[0], run(*misaligned)[0], run(*misaligned)[0]):
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_every_launched_kernel_goes_through_a_launcher():
    """A kernel launched as ``name[grid](...)`` anywhere in the package is a :class:`Launcher` (a new kernel
    launched bare would pay Triton's full host cost on every call)."""
    import importlib
    import pkgutil
    import re

    import gateloop_kernels

    launched = 0
    for info in pkgutil.walk_packages(gateloop_kernels.__path__, "gateloop_kernels."):
        module = importlib.import_module(info.name)
        source = open(module.__file__).read()
        for name in set(re.findall(r"\b(_[A-Za-z0-9_]+)\[", source)):
            obj = getattr(module, name, None)
            if hasattr(obj, "fn") and hasattr(obj, "__getitem__"):  # a Triton kernel, wrapped or not
                assert isinstance(obj, _launch.Launcher), f"{info.name}.{name} is launched without a Launcher"
                launched += 1
    assert launched >= 12


@pytest.mark.gpu
def test_gpu_tensor_off_cuda_misses_the_cache_and_gets_tritons_error():
    """The direct path launches tensors as their addresses, unchecked: a CPU tensor where the cached launches had a
    CUDA one must miss the cache and meet Triton's own check (a clear error, not a kernel reading host memory);
    the direct launches' results are the sigmoid-polar gate's."""
    from gateloop_kernels.gate import _gate_fwd_kernel
    z = torch.randn(300, 2, device="cuda")
    ref = torch.sigmoid(z.norm(dim=-1)) * torch.view_as_complex(z) / z.norm(dim=-1)
    for _ in range(3):  # Triton's launch, then direct ones
        a_re, a_im = torch.empty(300, device="cuda"), torch.empty(300, device="cuda")
        _gate_fwd_kernel[(3,)](z, a_re, a_im, 300, BLOCK=128)
        torch.testing.assert_close(torch.complex(a_re, a_im), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cpu tensor"):
        _gate_fwd_kernel[(3,)](z, a_re.cpu(), a_im, 300, BLOCK=128)
