"""One forward+backward of each scan kernel, small shapes, for ``compute-sanitizer --tool memcheck``
(run by ``bench/gpu.sh memcheck``, with ``memcheck_revkern`` for the reversible extension):
the elementwise scan (complex and real gate, initial state), the chunked scan (initial and final state), the eager
operator's one node with a complex gate (its parts and its gradient's read and written in place; head-dim-1 launches
smaller than the ones before, which clear the reused workspace) and the fused gate activation."""
import torch

from gateloop_kernels import elementwise as ew
from gateloop_kernels import gate_from_preactivation, gate_loop_operator
from gateloop_kernels.chunked import chunk_gate_loop

dev = "cuda"
for cplx in (True, False):
    q, k, v, ar, ai = (torch.randn(2, 3000, 40, device=dev, requires_grad=True) for _ in range(5))
    h0r, h0i = (torch.randn(2, 40, device=dev, requires_grad=True) for _ in range(2))
    o, hr, hi, _ = ew.elementwise_scan(q, k, v if cplx else None, 0.5 * ar, 0.5 * ai if cplx else None,
                                       h0r, h0i if cplx else None)
    (o.sum() + hr.sum()).backward()

B, n, H, d, e = 1, 300, 2, 64, 32
q, k = torch.randn(B, n, H, d, device=dev), torch.randn(B, n, H, d, device=dev)
v = torch.randn(B, n, H, e, device=dev)
ar, ai = torch.rand(B, n, H, device=dev), torch.rand(B, n, H, device=dev) * 0.1
h0 = torch.randn(B, H, d, e, dtype=torch.complex64, device=dev)
xs = [t.requires_grad_() for t in (q, k, v, ar, ai, h0)]
o, st = chunk_gate_loop(*xs[:5], initial_state=xs[5], output_final_state=True)
(o.sum() + st.abs().sum()).backward()

for d in (64, 1):
    x = [torch.randn(3, 200, d, device=dev, requires_grad=True) for _ in range(3)]
    a = torch.polar(0.9 + 0.1 * torch.rand(3, 200, 1, 1, device=dev), torch.randn(3, 200, 1, 1, device=dev))
    gate_loop_operator(*x, a.requires_grad_()).sum().backward()

z = torch.randn(3, 1001, 7, 2, device=dev, requires_grad=True)  # a partial last block
a_re, a_im = gate_from_preactivation(z)
(a_re.sum() + a_im.sum()).backward()

torch.cuda.synchronize()
print("memcheck run done")
