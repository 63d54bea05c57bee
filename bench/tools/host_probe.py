"""Host (CPU) cost of each layer of our head-dim-1 scan call, on a tiny problem with the device idle.

``python -m bench.tools.host_probe`` (also run by ``python -m bench scan --profile``): microseconds per
call of the allocator, a zero fill, a bare Triton launch, our launchers, the custom op, and forward +
backward through autograd (with and without the autograd engine's device thread), then where the
time goes by ``torch.profiler`` (CPU events on every thread). ``--cases`` instead profiles the public
``gate_loop_operator`` forward+backward at the cases of ``python -m bench overhead``: host microseconds per call
through Triton's launcher and with direct launches, with and without the autograd engine's device thread, beside
a trivial ``autograd.grad``'s, then the functions that take the time (``cProfile``; ``--no-cprofile`` skips it).
``--threads``: why a backward on autograd's device thread costs more than on the calling thread: the time spent
inside the backward's body in each mode, a Python node doing nothing, and one doing 40 view ops.
``--stubbed`` (on a CPU, no GPU needed): the host microseconds of the public calls' Python (checks, views, the op
implementations, the direct launcher's key, autograd) with every Triton launch replaced by a stub, CPU tensors
standing in for CUDA ones: a forward+backward of ``gate_loop_operator`` at head dims 1 and 64 and of
``gate_loop_heads`` (z gate), the figures host-side changes are predicted and checked with before a GPU run.
``--model``: the host milliseconds of a training step of ``python -m bench overhead``'s models (ours with 8 heads
and with head dim 1, the SDPA model) at a size that leaves the device idle, at depth 1 and 6 (their difference: one
block's host cost), then a cProfile of ours.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import triton
import triton.language as tl

from gateloop_kernels import elementwise as ew


@triton.jit
def _noop(x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
          n, B, C, NCB, NSEG, s0, s1, s2, g0, g1, g2, X: tl.constexpr, Y: tl.constexpr):
    pass


def host_us(fn: Callable, reps: int = 300) -> float:
    """Mean wall microseconds per call of ``fn`` (device synchronized before and after)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    B, n, C = 1, 64, 32
    q, k, v, a_re, a_im = (torch.randn(B, n, C, device="cuda") for _ in range(5))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, a_re, a_im)]
    _, _, _, car = ew.scan_forward(q, k, v, a_re, a_im)
    N = ew.carries_numel(B, n, C)
    ptrs = [torch.empty(1, device="cuda") for _ in range(20)]

    def fwd_bwd_op():  # the public function: eager calls skip the custom-op dispatch (gateloop_kernels/_eager.py)
        torch.autograd.grad(ew.elementwise_scan(*leaves, None, None)[0], leaves, q)

    def fwd_bwd_registered():  # the registered custom op itself (what torch.compile traces)
        torch.autograd.grad(ew.elementwise_scan_op.op(*leaves, None, None)[0], leaves, q)

    def trivial_autograd():
        torch.autograd.grad(leaves[0] * 2.0, leaves[0], q)
    rows = [
        ("torch.empty (float32 carries)", lambda: torch.empty(N, device="cuda")),
        ("torch.zeros (float32 carries)", lambda: torch.zeros(N, device="cuda")),
        ("bare Triton launch, 32 args", lambda: _noop[(1,)](q, *ptrs, n, B, C, 1, 1, 1, 1, 1, 1, 1, 1, X=1, Y=2)),
        ("scan_forward (launcher)", lambda: ew.scan_forward(q, k, v, a_re, a_im)),
        ("scan_backward (launcher)", lambda: ew.scan_backward(q, None, None, q, k, v, a_re, a_im, None, None, car)),
        ("op forward, no grad", lambda: ew.elementwise_scan(q, k, v, a_re, a_im, None, None)),
        ("autograd.grad of x * 2", trivial_autograd),
        ("registered custom op, fwd + bwd", fwd_bwd_registered),
        ("op forward + backward (autograd.grad)", fwd_bwd_op),
    ]
    with torch.no_grad():
        res = [(name, host_us(fn)) for name, fn in rows[:-3]]
    res += [(name, host_us(fn)) for name, fn in rows[-3:]]
    torch.autograd.set_multithreading_enabled(False)
    res.append(("op forward + backward, autograd multithreading off", host_us(fwd_bwd_op)))
    torch.autograd.set_multithreading_enabled(True)
    for name, us in res:
        print(f"[host] {name:55s} {us:8.1f} us", flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fwd_bwd_op()
        torch.cuda.synchronize()
    print("[host] torch.profiler, 20 op forward + backward, by self CPU time (all threads):\n"
          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def _profiled(fn: Callable[[], object], title: str, keys: tuple = ("tottime",), top: int = 30) -> None:
    """Run ``fn`` under cProfile with the backward on this thread (autograd's device thread off, so that the
    backward's Python is seen) and print the top functions by each of ``keys``."""
    import cProfile
    import io
    import pstats

    torch.autograd.set_multithreading_enabled(False)
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        prof.disable()
        torch.autograd.set_multithreading_enabled(True)
    for key in keys:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(top)
        print(f"[host] {title} by {key}:\n{text.getvalue()}", flush=True)


def profile_cases(reps: int = 100, top: int = 30, profile: bool = True) -> None:
    """Host time of eager forward+backward calls of ``gate_loop_operator`` per overhead case: through Triton's
    launcher or with direct launches (gateloop_kernels/_launch.py), with the autograd engine's device thread
    (PyTorch's default) or the backward on the calling thread; the floor of a trivial ``autograd.grad`` in both
    modes; then a cProfile of ``reps`` calls (single-threaded, so that the backward's Python is seen). Each figure
    is the lower of two interleaved measurements (the host is noisy)."""
    from bench.overhead import CASES, _inputs
    from gateloop_kernels import _launch, gate_loop_operator

    x = torch.randn(64, device="cuda", requires_grad=True)
    floor = {}
    for threads in (True, False, True, False):
        torch.autograd.set_multithreading_enabled(threads)
        us = host_us(lambda: torch.autograd.grad(x * 2.0, x, x), reps)
        floor[threads] = min(us, floor.get(threads, us))
    print(f"[host] floor, autograd.grad of x * 2: {floor[True]:.1f} us (device thread), {floor[False]:.1f} us "
          "(calling thread)", flush=True)
    for B, n, d, dtype, precision in CASES:
        inputs = _inputs(min(B, 64), min(n, 512), d, dtype, "cuda")  # the host cost does not depend on the size
        kw = {} if precision is None else {"precision": precision}
        gout = torch.randn_like(inputs[0])

        def call():
            torch.autograd.grad(gate_loop_operator(*inputs, **kw), inputs, gout)
        res: dict = {}
        for _ in range(2):
            for threads in (True, False):
                torch.autograd.set_multithreading_enabled(threads)
                for direct in (False, True):
                    _launch.ENABLED = direct
                    us = host_us(call, reps)
                    res[threads, direct] = min(us, res.get((threads, direct), us))
        _launch.ENABLED = True
        print(f"[host] d={d} {dtype} {precision}: us per fwd+bwd, Triton's launcher / direct launches: "
              f"device thread {res[True, False]:.1f} / {res[True, True]:.1f}, calling thread "
              f"{res[False, False]:.1f} / {res[False, True]:.1f}", flush=True)
        if not profile:
            continue

        def calls():
            for _ in range(reps):
                call()
        _profiled(calls, f"d={d} {dtype} {precision}: cProfile of {reps} calls (direct launches, calling thread)",
                  top=top)
    torch.autograd.set_multithreading_enabled(True)


def profile_model(top: int = 30, profile: bool = True) -> None:
    """Host milliseconds per training step (AdamW, bf16 autocast) of each model of ``python -m bench overhead
    --model`` at 1 x 64 tokens (the device idle: the step's wall time is its host time), at depth 1 and 6; the
    difference over 5 is one block's forward + backward + optimizer host cost. Then cProfile over ours' steps."""
    from bench.model import measure

    models = [("ours", 8, "ours, 8 heads of 64"), ("ours", None, "ours, head dim 1"), ("attn", None, "SDPA")]
    for which, heads, name in models:
        ms = {depth: min(measure(which, heads, 1, 64, True, "cuda", depth=depth, steps=30, warmup=3)["step_ms"]
                         for _ in range(2)) for depth in (1, 6)}
        print(f"[host] model step {name}: depth 1 {ms[1]:.2f} ms, depth 6 {ms[6]:.2f} ms, one block "
              f"{(ms[6] - ms[1]) / 5:.3f} ms", flush=True)
    if not profile:
        return
    _profiled(lambda: measure("ours", 8, 1, 64, True, "cuda", depth=6, steps=50, warmup=1),
              "model step ours, 8 heads, depth 6: cProfile of 51 steps", ("tottime", "cumulative"), top)


def probe_threads(reps: int = 200) -> None:
    """Host microseconds per forward+backward with the backward on autograd's device thread and on the calling
    thread: the whole call, the time inside ``lean._OneNode``'s forward and backward bodies, and two Python
    nodes (a backward returning its gradient; one doing 40 view ops first) that isolate the hand-off's cost from
    a slower body."""
    from bench.overhead import _inputs
    from gateloop_kernels import gate_loop_operator, lean

    spent = {"forward": 0.0, "backward": 0.0}

    def timed(name, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - t0
        return staticmethod(wrapper)
    fwd, bwd = lean._OneNode.forward, lean._OneNode.backward
    lean._OneNode.forward, lean._OneNode.backward = timed("forward", fwd), timed("backward", bwd)

    class _Pass(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, views):
            ctx.views = views
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            for _ in range(ctx.views):
                g = g.t()
            return g, None
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    best: dict = {}  # (case, mode, what) -> the lower of the two rounds' us

    def keep(case, mode, what, us):
        best[(case, mode, what)] = min(us, best.get((case, mode, what), math.inf))
    try:
        for d, dtype in ((1, torch.float32), (64, torch.bfloat16)):
            inputs = _inputs(64, 512, d, dtype, "cuda")
            gout = torch.randn_like(inputs[0])
            for threads in (True, False, True, False):
                torch.autograd.set_multithreading_enabled(threads)
                host_us(lambda: torch.autograd.grad(gate_loop_operator(*inputs), inputs, gout), 20)
                spent.update(forward=0.0, backward=0.0)
                us = host_us(lambda: torch.autograd.grad(gate_loop_operator(*inputs), inputs, gout), reps)
                n = reps + 5
                mode = "device" if threads else "calling"
                fwd_us, bwd_us = spent["forward"] / n * 1e6, spent["backward"] / n * 1e6
                print(f"[host] threads d={d} {dtype}: {mode} thread: call {us:.1f} us, "
                      f"forward body {fwd_us:.1f} us, backward body {bwd_us:.1f} us", flush=True)
                for what, v in (("call", us), ("forward_body", fwd_us), ("backward_body", bwd_us)):
                    keep((d, dtype), mode, what, v)
        for views in (0, 40):
            for threads in (True, False, True, False):
                torch.autograd.set_multithreading_enabled(threads)
                us = host_us(lambda: torch.autograd.grad(_Pass.apply(x, views), x, x), reps)
                print(f"[host] threads: Python node, {views} views in its backward: "
                      f"{'device' if threads else 'calling'} thread {us:.1f} us", flush=True)
                keep(views, "device" if threads else "calling", "call", us)
    finally:
        lean._OneNode.forward, lean._OneNode.backward = fwd, bwd
        torch.autograd.set_multithreading_enabled(True)
    _record_threads(best)


def _record_threads(best: dict) -> None:
    """``probe_threads``' figures as result rows (``bench/results/overhead.jsonl``, on a GPU)."""
    from bench import harness, results
    env = harness.environment()
    rows = []
    for (case, mode, what), us in best.items():
        if isinstance(case, tuple):
            (d, dtype), op = case, "gate_loop_operator fwd+bwd host (autograd thread)"
            shape, dt = {"B": 64, "n": 512, "d": d, "e": d}, str(dtype).replace("torch.", "")
            note = f"{what}: the whole call, or the time inside lean._OneNode's forward / backward body"
        else:
            op, shape, dt = "Python autograd node fwd+bwd (floor)", {"views": case}, "float32"
            note = f"a Function whose backward does {case} view ops, (64, 64) tensor"
        rows.append(results.row("overhead", op, "ours" if isinstance(case, tuple) else "torch", shape, dt,
                                f"host_us_{what}_{mode}_thread", "us", us, env, note=note))
    harness.record("overhead", rows, None)


def probe_stubbed(reps: int = 300) -> None:
    """Host microseconds per eager forward+backward with the Triton launches stubbed (see the module docstring):
    CPU tensors take the kernel paths (the devices lists patched), each launch computes its direct launcher's key
    and returns, the gate kernels return empty outputs. The best of 5 rounds of ``reps`` calls."""
    from unittest import mock

    from gateloop_kernels import _launch, dispatch, gate as gate_mod, gate_loop_heads, gate_loop_operator
    from gateloop_kernels.elementwise import op as ew_op, workspace

    def stub_run(self, grid, args, kwargs):
        self._cache.get(_launch._keyed(0, args, kwargs)[0])
    patches = [mock.patch.object(dispatch, "KERNEL_DEVICES", ("cuda", "cpu")),
               mock.patch.object(ew_op, "KERNEL_DEVICES", ("cuda", "cpu")),
               mock.patch.object(_launch.Launcher, "run", stub_run),
               mock.patch.object(gate_mod, "_use_kernel", lambda z: True),
               mock.patch.object(gate_mod, "gate_forward", lambda z: (torch.empty(z.shape[:-1]),) * 2),
               mock.patch.object(gate_mod, "gate_backward", lambda z, g_re, g_im: torch.empty_like(z))]
    g = torch.Generator().manual_seed(0)

    def operator_case(B, n, d, dtype):
        x = [torch.randn(B, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]
        a = torch.polar(torch.full((B, n, 1, 1), 0.9), torch.zeros(B, n, 1, 1)).requires_grad_()
        gout = torch.randn(B, n, d, generator=g).to(dtype)
        return lambda: torch.autograd.grad(gate_loop_operator(*x, a), [*x, a], gout)

    def heads_case(B, n, H, d, dtype):
        x = [torch.randn(B, n, H, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]
        z = torch.randn(B, n, H, 2, generator=g, requires_grad=True)
        gout = torch.randn(B, n, H, d, generator=g).to(dtype)
        return lambda: torch.autograd.grad(gate_loop_heads(*x, z=z)[0], [*x, z], gout)

    cases = [("gate_loop_operator (64, 64, 1) float32", operator_case(64, 64, 1, torch.float32)),
             ("gate_loop_operator (8, 64, 64) bfloat16", operator_case(8, 64, 64, torch.bfloat16)),
             ("gate_loop_heads (8, 64, 8, 64) bfloat16, z", heads_case(8, 64, 8, 64, torch.bfloat16))]
    for p in patches:
        p.start()
    try:
        for name, fn in cases:
            for _ in range(50):
                fn()
            best = math.inf
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                best = min(best, (time.perf_counter() - t0) / reps * 1e6)
            print(f"[host] stubbed launches, {name}: {best:.1f} us per forward+backward", flush=True)
    finally:
        for p in reversed(patches):
            p.stop()
        workspace.reset()  # the stubbed launches cleared no look-back workspace


if __name__ == "__main__":
    import sys
    args = sys.argv[1:]
    if "--stubbed" in args:
        probe_stubbed()
    elif "--threads" in args:
        probe_threads()
    elif "--model" in args:
        profile_model(profile="--no-cprofile" not in args)
    elif "--cases" in args:
        profile_cases(profile="--no-cprofile" not in args)
    else:
        main()
