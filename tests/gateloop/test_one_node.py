"""The eager call on a kernel path is one autograd node (``gateloop_kernels.lean``, issue 20), with the general
path's results: outputs and every gradient against the same call taken through ``dispatch.scan`` (a requested
final state sends it there), on the kernels under the Triton interpreter and on CUDA."""
import pytest
import torch

import gateloop_kernels as gk
from gateloop_kernels import dispatch
from gateloop_kernels.elementwise import op as ew_op
from gateloop_kernels import reference as R
from tests.helpers.kernels import INTERPRET

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _nodes(out: torch.Tensor) -> int:
    """Autograd nodes behind ``out`` other than the leaves' AccumulateGrad."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack += [g for g, _ in f.next_functions]
    return sum(type(f).__name__ != "AccumulateGrad" for f in seen)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g))


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = (torch.view_as_real(t) if t.is_complex() else t for t in (x, y))
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def kernels_on(monkeypatch):
    """``kernels_on(device)``: skip where ``device`` cannot run the Triton kernels; the CPU runs them under the
    interpreter, through both dispatches."""
    def on(device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if device == "cpu":
            if not INTERPRET:
                pytest.skip("the CPU runs the kernels only under TRITON_INTERPRET=1")
            monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))
            monkeypatch.setattr(ew_op, "KERNEL_DEVICES", ("cuda", "cpu"))
    return on


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, gate, dtype", [(1, "complex", torch.float32), (1, "real", torch.bfloat16),
                                            (16, "complex", torch.float32), (16, "real", torch.bfloat16)])
def test_operator_is_one_node_with_the_general_paths_results(kernels_on, device, d, gate, dtype):
    kernels_on(device)
    B, n = 3, 21
    q, k, v = (torch.randn(B, n, d, device=device).to(dtype).requires_grad_() for _ in range(3))
    mag, ph = 0.8 + 0.2 * torch.rand(B, n, 1, 1, device=device), torch.randn(B, n, 1, 1, device=device)
    a = (torch.polar(mag, ph) if gate == "complex" else mag).requires_grad_()
    g = torch.randn(B, n, d, device=device).to(dtype)
    out = gk.gate_loop_operator(q, k, v, a)
    assert _nodes(out) == 1
    ref, _ = gk.gate_loop_operator(q, k, v, a, return_final_state=True)
    assert _nodes(ref) > 1  # the general path: the comparison is between two paths
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) <= tol
    for x, y in zip(_grads(out, [q, k, v, a], g), _grads(ref, [q, k, v, a], g)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert rel_err(x, y) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["complex", "real"])
def test_operator_one_node_reads_strided_slices(kernels_on, device, gate):
    """The head-dim-1 one-node path builds its kernel views from each input's own strides and storage offset:
    inputs that are every other step of a wider tensor past an offset, a gate sliced from a larger one."""
    kernels_on(device)
    B, n = 3, 19
    base = torch.randn(3, B + 1, 2 * n, 2, device=device, requires_grad=True)
    mag = (0.8 + 0.2 * torch.rand(B + 1, 2 * n, 2, 1, device=device)).requires_grad_()
    ph = torch.randn(B + 1, 2 * n, 2, 1, device=device, requires_grad=True)

    def slices():
        full = torch.polar(mag, ph) if gate == "complex" else mag
        return [base[i, 1:, ::2, 1:] for i in range(3)] + [full[1:, 1::2, 1:]]
    g = torch.randn(B, n, 1, device=device)
    out = gk.gate_loop_operator(*slices())
    assert type(out.grad_fn).__name__ == "_OneNodeBackward"  # the one-node path took the slices
    ref, _ = gk.gate_loop_operator(*slices(), return_final_state=True)
    leaves = [base, mag] + ([ph] if gate == "complex" else [])
    assert rel_err(out, ref) <= 1e-6
    for x, y in zip(_grads(out, leaves, g), _grads(ref, leaves, g)):
        assert rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["complex", "real"])
def test_operator_one_node_chunked_one_head_layout(kernels_on, device, gate):
    """Head dims >= 16: the kernels take the operator's ``(B, n, d)`` inputs and the gate's ``(B, n)`` planes as one
    head, without views to ``(B, n, 1, d)``: strided slices past an offset (d != e), and a packed batch
    (``cu_seqlens``, an empty sequence among them), against the general path."""
    kernels_on(device)
    B, n, d, e = 2, 25, 16, 32
    base = torch.randn(3, B + 1, 2 * n, 2 * e, device=device, requires_grad=True)
    mag = (0.8 + 0.2 * torch.rand(B + 1, 2 * n, 1, 1, device=device)).requires_grad_()
    ph = torch.randn(B + 1, 2 * n, 1, 1, device=device, requires_grad=True)

    def slices():
        full = torch.polar(mag, ph) if gate == "complex" else mag
        return [base[0, 1:, ::2, 3:3 + d], base[1, 1:, ::2, 1:1 + d], base[2, 1:, ::2, e:], full[1:, 1::2]]
    g = torch.randn(B, n, e, device=device)
    leaves = [base, mag] + ([ph] if gate == "complex" else [])
    out = gk.gate_loop_operator(*slices(), chunk_size=16)
    assert type(out.grad_fn).__name__ == "_OneNodeBackward" and out.shape == (B, n, e)
    ref, _ = gk.gate_loop_operator(*slices(), chunk_size=16, return_final_state=True)
    assert rel_err(out, ref) <= 1e-6
    for x, y in zip(_grads(out, leaves, g), _grads(ref, leaves, g)):
        assert rel_err(x, y) <= 1e-6
    # packed: one row of three sequences (9, 0, 16 steps)
    cu = torch.tensor([0, 9, 9, n], device=device)
    out = gk.gate_loop_operator(*(t[:1] for t in slices()), chunk_size=16, cu_seqlens=cu)
    assert type(out.grad_fn).__name__ == "_OneNodeBackward"
    ref, _ = gk.gate_loop_operator(*(t[:1] for t in slices()), chunk_size=16, cu_seqlens=cu, return_final_state=True)
    assert rel_err(out, ref) <= 1e-6
    for x, y in zip(_grads(out, leaves, g[:1]), _grads(ref, leaves, g[:1])):
        assert rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 16])
def test_operator_one_node_transposed_complex_gate(kernels_on, device, d):
    """A complex gate that is dense but permuted (a transposed ``(n, B, 1, 1)`` tensor, strides ``(1, B, 1, 1)``):
    the chunked backward writes the gate's gradient into a buffer of its own (empty_like kept the gate's strides, a
    layout the kernel cannot write: it raised), with the general path's results and the float64 reference's."""
    kernels_on(device)
    B, n = 3, 21
    qkv = torch.randn(B, n, 3 * d, device=device, requires_grad=True)
    a = torch.polar(0.6 + 0.35 * torch.rand(n, B, 1, 1, device=device),
                    torch.randn(n, B, 1, 1, device=device)).transpose(0, 1).detach().requires_grad_()
    g = torch.randn(B, n, d, device=device)
    out = gk.gate_loop_operator(*qkv.chunk(3, -1), a, chunk_size=16)
    assert type(out.grad_fn).__name__ == "_OneNodeBackward"
    ref, _ = gk.gate_loop_operator(*qkv.chunk(3, -1), a, chunk_size=16, return_final_state=True)
    want = R.sequential_reference(*qkv.detach().double().chunk(3, -1), a.detach().to(torch.complex128))
    assert rel_err(out, ref) <= 1e-6 and rel_err(out, want) <= 1e-5
    for x, y in zip(_grads(out, [qkv, a], g), _grads(ref, [qkv, a], g)):
        assert x.shape == y.shape and rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry, d", [("operator", 16), ("heads", 16), ("operator", 1), ("heads", 1)])
def test_one_node_inplace_change_after_forward_raises(kernels_on, device, entry, d):
    """The one node's backward reads q, k (at d >= 16 in place: views of the fused projection), v, the gate planes
    and z as autograd's saved tensors: an in-place change to one of them, or to their base, between the forward and
    the backward raises as in plain autograd (the general path's), instead of a silently wrong gradient."""
    kernels_on(device)
    B, n, H = 2, 21, 2
    shape = (B, n, 3 * d) if entry == "operator" else (B, n, 3 * H * d)

    def call(qkv, gate):
        if entry == "operator":
            return gk.gate_loop_operator(*qkv.chunk(3, -1), gate, chunk_size=16)
        return gk.gate_loop_heads(*(t.unflatten(-1, (H, d)) for t in qkv.chunk(3, -1)), z=gate, chunk_size=16)[0]
    for changed in ("qkv", "gate"):
        x = torch.randn(shape, device=device, requires_grad=True)
        zl = torch.randn(B, n, *((1, 1) if entry == "operator" else (H, 2)), device=device, requires_grad=True)
        qkv, gate = x * 1.0, zl * 1.0  # non-leaves (a projection's output, the gate's)
        if entry == "operator":
            gate = torch.polar(0.6 + 0.35 * torch.sigmoid(gate), gate)
        out = call(qkv, gate)
        assert type(out.grad_fn).__name__ == "_OneNodeBackward"
        with torch.no_grad():
            (qkv if changed == "qkv" else gate).mul_(2)
        with pytest.raises(RuntimeError, match="modified (by an )?inplace"):
            torch.autograd.grad(out.sum(), [x, zl])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, form, packed", [(1, "z", False), (16, "polar", False), (16, "z", True),
                                             (1, "polar", True)])
def test_heads_is_one_node_with_the_general_paths_results(kernels_on, device, d, form, packed):
    kernels_on(device)
    B, n, H = (1, 41, 2) if packed else (2, 21, 2)
    q, k, v = (torch.randn(B, n, H, d, device=device).requires_grad_() for _ in range(3))
    if form == "z":
        gate = {"z": torch.randn(B, n, H, 2, device=device).requires_grad_()}
    else:
        gate = {"log_magnitude": (-0.2 * torch.rand(B, n, H, device=device)).requires_grad_(),
                "phase": torch.randn(B, n, H, device=device).requires_grad_()}
    cu = torch.tensor([0, 17, 17, 30, n], device=device) if packed else None
    g = torch.randn(B, n, H, d, device=device)
    out, _ = gk.gate_loop_heads(q, k, v, **gate, cu_seqlens=cu, chunk_size=16)
    assert _nodes(out) == 1
    ref, _ = gk.gate_loop_heads(q, k, v, **gate, cu_seqlens=cu, chunk_size=16, output_final_state=True)
    assert _nodes(ref) > 1
    inputs = [q, k, v, *gate.values()]
    assert rel_err(out, ref) <= 1e-6
    for x, y in zip(_grads(out, inputs, g), _grads(ref, inputs, g)):
        assert rel_err(x, y) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_operator_one_node_nan_is_causal(kernels_on, device):
    """The head-dim-1 one node (gate gradient written into the complex gradient's planes): a NaN in k at step t of
    one sequence leaves the outputs before t, every other sequence, the q, k, v gradients before t and the gate's
    gradient up to t (``da_s = lam_s conj(h_{s-1})`` reads k before s only) finite, and equal to the float64 loop
    there."""
    kernels_on(device)
    b, t, B, n = 1, 40, 3, 100
    q, k, v = (torch.randn(B, n, 1, device=device) for _ in range(3))
    k[b, t] = float("nan")
    a = torch.polar(0.5 + 0.5 * torch.rand(B, n, 1, 1, device=device), torch.randn(B, n, 1, 1, device=device))
    leaves = [x.requires_grad_() for x in (q, k, v, a)]
    out = gk.gate_loop_operator(*leaves)
    assert type(out.grad_fn).__name__ == "_OneNodeBackward"
    g = torch.randn_like(out)
    grads = _grads(out, leaves, g)
    ref_leaves = [x.detach().cpu().to(torch.complex128 if x.is_complex() else torch.float64).requires_grad_()
                  for x in leaves]
    ref = R.sequential_reference(*ref_leaves)
    ref_grads = _grads(ref, ref_leaves, g.cpu().double())
    keep = [(slice(None), slice(0, t)), ([0, 2], slice(None))]  # steps before t, the other sequences
    for x, y, last in zip([out, *grads], [ref, *ref_grads], [t, t, t, t, t + 1]):
        for rows, steps in keep + [([b], slice(0, last))]:
            xs, ys = x.detach().cpu()[rows, steps], y.detach()[rows, steps]
            assert torch.isfinite(xs).all()
            assert rel_err(xs, ys) <= 1e-5
