"""Compile this package's Triton kernels for a GPU on a machine without one, and report what the compiler made.

``python -m bench.tools.offline_kernels [--op elementwise|chunked] [--shape ...] [--lengths ...] [--dtype float32] [--arch 90]
[--json]``

Runs one forward and one backward of the head-dim-1 scan (:mod:`gateloop_kernels.elementwise`, shape ``B,n,C``)
or of the chunked scan (:mod:`gateloop_kernels.chunked`, shape ``B,n,H,d,e``) on CPU tensors with each kernel
replaced by a recorder, binds every recorded launch the way Triton's launcher does (same specialization: 16-byte alignment,
integers equal to 1, ``do_not_specialize``), compiles it for ``sm_<arch>`` and prints, per launch: registers and
spilled bytes (``cuobjdump`` on the cubin), the static counts of shared-memory stores/loads, warp shuffles,
barriers and global loads in the PTX, the blocked layouts and the pipelined loops' waits in the TTGIR. That answers layout and register
questions without device time (``docs/history.md``, sixth session: the in-register tile scans were found so).

Use the Triton of the GPU image (3.6.0 for the lent H100/H200): ``pip download --no-deps triton==3.6.0`` and
install it in a side environment; other versions choose other layouts. ``_pack_args`` is a private method of
Triton 3.6's ``JITFunction``. Needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import backward as ew_backward, forward as ew_forward
from gateloop_kernels.chunked import gradients, op, outputs, states
from gateloop_kernels._launch import Launcher
from gateloop_kernels.chunked.config import _DEFAULT_BT


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, fn: JITFunction, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def compile_call(fn: JITFunction, args: tuple, kwargs: dict, arch: int) -> Any:
    """The compiled kernel Triton would build for ``fn[grid](*args, **kwargs)`` on ``sm_<arch>``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def report(kernel: Any) -> dict:
    """Registers, local (spill) bytes and static instruction counts of a compiled kernel."""
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    out = {"shared st/ld": (ptx.count("st.shared"), ptx.count("ld.shared")),
           # 32-bit scalar stores into shared memory, against vector ones: a tile staged for a tensor-core dot
           # with a transpose is stored element by element (bank conflicts; docs/history.md, ninth session)
           "shared st scalar/vector": (len(re.findall(r"st\.shared\.[bfu]32", ptx)),
                                       len(re.findall(r"st\.shared\.v[24]", ptx))),
           "shfl": ptx.count("shfl.sync"),
           "bar": ptx.count("bar.sync"), "ld.global": ptx.count("ld.global"),
           "mma (wgmma / mma.sync)": (ptx.count("wgmma.mma_async"), ptx.count("mma.sync")),
           # copies a software-pipelined loop leaves in flight at each wait: 0 in a loop means its loads serialise
           # (docs/kernels.md section 1, "A packed walk and Triton's pipeliner")
           "async waits": [int(x) for x in re.findall(r"async_wait[^{\n]*\{num = (\d+)", ttgir)],
           "layouts": sorted(set(re.findall(r"#ttg\.blocked<\{([^}]*)\}>", ttgir)))}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    for key, pat in (("registers", r"REG:(\d+)"), ("stack bytes", r"STACK:(\d+)"), ("local bytes", r"LOCAL:(\d+)")):
        m = re.search(pat, usage)
        out[key] = int(m.group(1)) if m else None
    return out


def _record(modules: tuple, run: Any) -> list:
    """``(kernel, args, kwargs)`` of every kernel launch of ``run()``, with the Triton functions of ``modules`` (those
    whose launchers ``run`` calls) replaced by recorders meanwhile (and put back before anything is compiled)."""
    calls: list = []
    saved = {(module, name): fn for module in modules for name, fn in vars(module).items()
             if isinstance(fn, (KernelInterface, Launcher))}
    try:
        for (module, name), fn in saved.items():
            setattr(module, name, _Recorder(fn.fn if isinstance(fn, Launcher) else fn, calls))
        run()
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    return calls


def record_elementwise(B: int, n: int, C: int, dtype: torch.dtype) -> list:
    """The launches of one forward and one backward of the head-dim-1 scan (complex gate, no initial state)."""
    q, k, v = (torch.randn(B, n, C).to(dtype) for _ in range(3))
    a_re, a_im = torch.rand(B, n, C), torch.rand(B, n, C)

    def run() -> None:
        _, _, _, carries = ew.scan_forward(q, k, v, a_re, a_im)
        ew.scan_backward(q, None, None, q, k, v, a_re, a_im, None, None, carries)
    return _record((ew_forward, ew_backward), run)


def record_chunked(B: int, n: int, H: int, d: int, e: int, dtype: torch.dtype, precision: str = "ieee",
                   lengths: list[int] | None = None) -> list:
    """The launches of one forward and one backward of the chunked scan (no initial or final state); with
    ``lengths`` (``B = 1``, they sum to ``n``), of a packed batch of sequences of those lengths (``cu_seqlens``)."""
    q, k = (torch.randn(B, n, H, d).to(dtype) for _ in range(2))
    v = torch.randn(B, n, H, e).to(dtype)
    a_re, a_im = torch.rand(B, n, H), torch.rand(B, n, H)
    cu = None if lengths is None else torch.tensor([0] + lengths).cumsum(0)

    def run() -> None:
        chunks = None if cu is None else states._chunk_table(cu, n, _DEFAULT_BT)
        op._fwd_impl(q, k, v, a_re, a_im, None, False, precision, _DEFAULT_BT, cu, chunks)
        op._bwd_impl(q, k, v, a_re, a_im, None, torch.randn_like(v), None, precision, _DEFAULT_BT, chunks)
    return _record((states, outputs, gradients), run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tools.offline_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--op", default="elementwise", choices=("elementwise", "chunked"))
    p.add_argument("--shape", help="B,n,C (elementwise; default 4,2048,1024) or B,n,H,d,e (chunked; default "
                                   "16,2048,4,64,64)")
    p.add_argument("--precision", default="ieee", help="chunked float32 dots: ieee, tf32x3 or tf32")
    p.add_argument("--lengths", help="chunked: a packed batch (cu_seqlens) of sequences of these lengths, "
                                     "l1,l2,... (the shape's B = 1 and n their sum)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true", help="one JSON list of the launches instead of the text")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    dtype = getattr(torch, args.dtype)
    if args.op == "elementwise":
        shape = tuple(int(x) for x in (args.shape or "4,2048,1024").split(","))
        calls = record_elementwise(*shape, dtype)
    else:
        shape = tuple(int(x) for x in (args.shape or "16,2048,4,64,64").split(","))
        lengths = None if args.lengths is None else [int(x) for x in args.lengths.split(",")]
        if lengths is not None and (shape[0] != 1 or sum(lengths) != shape[1]):
            p.error(f"--lengths {args.lengths} sum to {sum(lengths)}: the shape must be 1,{sum(lengths)},H,d,e")
        calls = record_chunked(*shape, dtype, args.precision, lengths)
    rows = []
    for fn, a, kw in calls:
        rows.append({"kernel": fn.__name__, "constexprs": {k: v for k, v in kw.items() if k.isupper()},
                     "num_warps": kw.get("num_warps"), **report(compile_call(fn, a, kw, args.arch))})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.op} scan, shape {shape}, {args.dtype}")
    for row in rows:
        print(f"{row.pop('kernel')} {row.pop('constexprs')} num_warps={row.pop('num_warps')}")
        for key, val in row.items():
            print(f"    {key}: {val}")


if __name__ == "__main__":
    main()
