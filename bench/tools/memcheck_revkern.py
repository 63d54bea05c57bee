"""Runs each CUDA path of the reversible extension (``csrc/reversible/``, ops ``revkern::*``) once on small inputs,
for ``compute-sanitizer --tool memcheck`` (run by ``bench/gpu.sh memcheck``): vectorized halves (fp32, bf16,
mixed), the scalar strided path (misaligned, transposed), a multi-tensor call over more pairs than one launch
holds, and an empty tensor. Exits non-zero if a result differs from ATen's."""
import sys

import torch

from reversible import _extension

assert _extension.load() and "cuda" in _extension.extension_info()["devices"], _extension.extension_info()
ops = torch.ops.revkern
dev = "cuda"
bad = 0


def check(name, got, want):
    global bad
    ok = all(torch.equal(a, b) for a, b in zip(got, want))
    bad += not ok
    print(f"{name}: {'ok' if ok else 'MISMATCH'}")


for dt, st in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
               (torch.float16, torch.float16), (torch.float64, torch.float64)]:
    buf = torch.randn(3, 5, 2 * 40, device=dev).to(dt)
    gbuf = torch.randn(3, 5, 2 * 40, device=dev).to(dt)
    y, dy = buf[..., 40:], gbuf[..., :40]
    fy, g = torch.randn(3, 5, 40, device=dev).to(st), torch.randn(3, 5, 40, device=dev).to(st)
    wy, wd = y - fy, dy + g
    ops.reconstruct_(y, fy, dy, g)
    check(f"halves {dt}/{st}", [y, dy], [wy.to(dt), wd.to(dt)])
    flat = torch.randn(1 + 999, device=dev).to(dt)[1:]  # misaligned: scalar path
    src = torch.randn(999, device=dev).to(st)
    w = flat + src
    ops.coupling_add_(flat, src)
    check(f"offset {dt}/{st}", [flat], [w.to(dt)])
    t = torch.randn(33, 17, device=dev).to(dt).t()
    s2 = torch.randn(17, 33, device=dev).to(st)
    w = t + s2
    ops.coupling_add_(t, s2)
    check(f"transposed {dt}/{st}", [t], [w.to(dt)])

shapes = [(7, 13), (1, 31), (), (3, 1, 5), (257,), (130, 67), (0, 3)] * 2
ys = [torch.randn(s, device=dev) for s in shapes]
dys = [torch.randn(s, device=dev) for s in shapes]
fys = [torch.randn(s, device=dev) for s in shapes]
gs = [torch.randn(s, device=dev) for s in shapes]
want = [(a - b, c + d) for a, b, c, d in zip(ys, fys, dys, gs)]
ops.reconstruct_multi_(ys, fys, dys, gs)
check("multi (28 pairs)", ys + dys, [w[0] for w in want] + [w[1] for w in want])
torch.cuda.synchronize()
sys.exit(1 if bad else 0)
