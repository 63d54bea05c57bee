"""chunk_gate_loop is causal for non-finite inputs: a NaN or Inf at step t reaches no output before t.

The oracle is the float64 sequential loop (and autograd through it) on the same inputs: wherever its output,
final state or gradient entry is finite, ours must be finite and within the usual tolerance; a non-finite
output or final-state entry of the loop must stay non-finite in ours (a bad token is not hidden). Which
gradients are finite follows from the math and is read off the loop, not assumed: e.g. a NaN in k at step p
leaves dk and dv of later steps finite (dk_t = Re(L_t) v_t, dv_t = Re(L_t)^T k_t: the adjoint L_t never sees
k_p), a NaN gate or q at step p poisons the adjoint of every earlier step, and dq of earlier steps stays finite.

One call covers a dtype: batch element b poisons step ``steps[b]`` (the first, a middle and the last step of a
chunk, and a step of the last, partial chunk), head h poisons q, k, v or the gate, with NaN and Inf in a
checkerboard over (b, h) (``flip`` swaps them: two calls cover every case). A leak into another sequence would
show in its steps before its own bad step, which the loop keeps finite.
"""
import pytest
import torch

from helpers.chunked_check import make_inputs, reference_f64
from helpers.kernels import HAS_CUDA, INTERPRET

if not HAS_CUDA and not INTERPRET:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from gateloop_kernels.chunked import chunk_gate_loop  # noqa: E402

# numpy warns on every NaN the interpreter's kernels compute (by design here)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def poisoned_inputs(n, d, e, C, dtype, device, flip):
    steps = (C // 2 - 1, C - 1, C, n - 2)  # middle, last, first of a chunk; in the last, partial chunk
    assert n % C and n - 2 >= n // C * C, "the last step must fall in a partial chunk"
    q, k, v, ar, ai = make_inputs(len(steps), n, 4, d, e, dtype, device)
    for b, t in enumerate(steps):
        val = [float("nan"), float("inf")]
        val = [val[(b + h + flip) % 2] for h in range(4)]
        q[b, t, 0, torch.randint(d, ())] = val[0]
        k[b, t, 1, torch.randint(d, ())] = val[1]
        v[b, t, 2, torch.randint(e, ())] = val[2]
        (ar if b % 2 else ai)[b, t, 3] = val[3]
    return steps, (q, k, v, ar, ai)


def compare(name, ours, ref, tol, head_dim, forward):
    """``ours`` against the float64 ``ref`` where ``ref`` is finite."""
    ours = ours.detach().to(ref.dtype)
    fin = torch.isfinite(ref)
    leak = fin & ~torch.isfinite(ours)
    assert not leak.any(), f"{name}: non-finite where the float64 loop is finite, at {leak.nonzero()[:8].tolist()}"
    if forward:
        hidden = ~fin & torch.isfinite(ours)
        assert not hidden.any(), f"{name}: finite where the float64 loop is not, at {hidden.nonzero()[:8].tolist()}"
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    diff, size = torch.where(fin, ours - ref, zero), torch.where(fin, ref, zero)
    dims = [i for i in range(ref.ndim) if i not in (0, head_dim)]
    if dims:
        diff, size = diff.abs().square().sum(dims).sqrt(), size.abs().square().sum(dims).sqrt()
    # per (batch, head) slice, against the norm over every slice (a slice may hold one finite entry, e.g. the
    # gate gradient at a bad gate's own step: a single sum, too cancelling to hold to 16-bit tolerance alone)
    err = diff.abs() / size.abs().norm().clamp_min(1e-30)
    assert (err <= tol).all(), f"{name}: error over {tol} per (batch, head):\n{err}"


def check_causal(n, d, e, C, dtype, device, flip, tol, precision="ieee"):
    steps, inputs = poisoned_inputs(n, d, e, C, dtype, device, flip)
    q, k, v, ar, ai = inputs
    B, _, H, _ = q.shape
    h0 = torch.randn(B, H, d, e, dtype=torch.complex64, device=device)
    do = torch.randn(B, n, H, e, device=device).to(dtype)
    dht = torch.randn(B, H, d, e, dtype=torch.complex64, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    h0l = h0.clone().requires_grad_()
    o, st = chunk_gate_loop(*leaves, initial_state=h0l, output_final_state=True, precision=precision,
                            chunk_size=C)
    ((o.float() * do.float()).sum() + (st * dht.conj()).real.sum()).backward()
    ro, rst, rgrads = reference_f64(q, k, v, ar, ai, h0, do, dht, sequential=True)
    assert not torch.isfinite(ro).all(), "the poison reached no output of the float64 loop"
    compare("o", o, ro, tol, 2, forward=True)
    compare("final state", st, rst, tol, 1, forward=True)
    for name, leaf, g, hd in zip(["dq", "dk", "dv", "da_re", "da_im", "dh0"], leaves + [h0l], rgrads,
                                 [2, 2, 2, 2, 2, 1]):
        compare(name, leaf.grad, g, tol, hd, forward=False)
    # the statement of the issue, spelled out: nothing before the bad step is touched, forward or (for k, v)
    # backward
    for b, t in enumerate(steps):
        assert torch.isfinite(o[b, :t]).all()
        for h in (1, 2):
            assert all(torch.isfinite(x.grad[b, :t, h]).all() for x in leaves) and torch.isfinite(h0l.grad[b, h]).all()


@pytest.mark.skipif(HAS_CUDA and not INTERPRET, reason="CPU interpreter test")
@pytest.mark.parametrize("dtype,tol,flip", [(torch.float32, 2e-5, 0), (torch.bfloat16, 2e-2, 1)],
                         ids=["float32", "bfloat16"])
def test_cpu_nonfinite_is_causal(dtype, tol, flip):
    """n = 24 in chunks of 16: two chunks, the second partial; d != e. (fp16 differs from bf16 only in running
    the score products in tf32: the GPU test covers it, the interpreter's ~10 s are spared.)"""
    check_causal(24, 16, 32, 16, dtype, "cpu", flip, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("flip", [0, 1])
@pytest.mark.parametrize("d,e", [(16, 32), (64, 64), (48, 160), (128, 96), (256, 256)])
@pytest.mark.parametrize("dtype,precision,tol", [
    (torch.float32, "ieee", 1e-5), (torch.float32, "tf32", 5e-3), (torch.bfloat16, "ieee", 1e-2),
    (torch.float16, "ieee", 1e-2)], ids=["ieee", "tf32", "bfloat16", "float16"])
def test_gpu_nonfinite_is_causal(dtype, precision, tol, d, e, flip):
    """n = 150 in chunks of 64 (the default): three chunks, the last partial."""
    check_causal(150, d, e, 64, dtype, "cuda", flip, tol, precision=precision)
