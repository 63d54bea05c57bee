"""Host work per layer of a training step, counted: PyTorch operator calls and Triton kernel launches.

``python -m bench.tools.op_count [--amp] [--dim 512]``: one forward+backward of the ``Transformer`` at depth 1 and
depth 2 (the difference is one layer: attention block + feed-forward) for ours at head dim 64 and head dim 1 and the
same model with softmax attention through SDPA; prints the aten operator calls (``TorchDispatchMode``) and our
kernel launches per layer, and the operators by name. The eager step is host-bound wherever each call's host cost
times the calls exceeds the device time (``docs/kernels.md`` section 5), so these counts are what the eager step's
host time scales with. Off CUDA the Triton kernels run through the interpreter (``main`` sets ``TRITON_INTERPRET=1``
when no GPU is present; callers of :func:`per_layer` set it themselves), on the kernel paths a GPU would take, and the operators the interpreter runs inside a
launch are not counted.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: (name, Transformer keyword arguments) of the models compared
MODELS = (("ours, 8 heads (head dim 64 at dim 512)", dict(gate_loop_heads=8)), ("ours, head dim 1", dict()),
          ("SDPA attention", dict(use_gate_looped_attn=False)))


class _Count(TorchDispatchMode):
    """Counts aten operator calls by name and our kernel launches; nothing inside a launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches = 0
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernels_as_on_gpu(device: str) -> Iterator[None]:
    """Off CUDA: the dispatch, the elementwise op and the gate activation take their kernel paths (interpreted)."""
    if device == "cuda":
        yield
        return
    from gateloop_kernels import dispatch, gate
    from gateloop_kernels.elementwise import op as ew_op

    modules = (dispatch, ew_op, gate)
    saved = [m.KERNEL_DEVICES for m in modules]
    for m in modules:
        m.KERNEL_DEVICES = ("cuda", "cpu")
    try:
        yield
    finally:
        for m, devices in zip(modules, saved):
            m.KERNEL_DEVICES = devices


@contextlib.contextmanager
def _counting(counter: _Count) -> Iterator[None]:
    from gateloop_kernels._launch import Launcher

    run = Launcher.run

    def counted(self, grid, args, kwargs):
        counter.launches += 1
        counter._inside += 1
        try:
            run(self, grid, args, kwargs)
        finally:
            counter._inside -= 1
    Launcher.run = counted
    try:
        with counter:
            yield
    finally:
        Launcher.run = run


def step_counts(model_kwargs: dict, depth: int, amp: bool, device: str, dim: int = 512, seq: int = 65) -> _Count:
    """The counts of one forward+backward (after two uncounted ones) of a ``Transformer`` of ``depth`` layers."""
    from gateloop_kernels import Transformer

    torch.manual_seed(0)
    model = Transformer(dim=dim, num_tokens=256, depth=depth, **model_kwargs).to(device)
    tokens = torch.randint(0, 256, (1, seq), device=device)
    counter = _Count()
    with _kernels_as_on_gpu(device):
        for i in range(3):
            with _counting(counter) if i == 2 else contextlib.nullcontext():
                with torch.autocast(device, torch.bfloat16, enabled=amp):
                    loss = model(tokens, return_loss=True)
                loss.backward()
    return counter


def per_layer(model_kwargs: dict, amp: bool, device: str, dim: int = 512) -> tuple[int, int, collections.Counter]:
    """(aten operator calls, kernel launches, operators by name) of one layer's forward+backward."""
    one, two = (step_counts(model_kwargs, depth, amp, device, dim) for depth in (1, 2))
    return (sum(two.ops.values()) - sum(one.ops.values()), two.launches - one.launches, two.ops - one.ops)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.tools.op_count", description=__doc__.splitlines()[0])
    ap.add_argument("--amp", action="store_true", help="under bf16 autocast (as the model benchmark's bf16 rows)")
    ap.add_argument("--dim", type=int, default=512, help="model width (default 512: 8 heads of 64)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # before the package's first import: its kernels are then built for the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = []
    for name, kw in MODELS:
        ops, launches, by_name = per_layer(kw, args.amp, device, args.dim)
        out.append(dict(model=name, ops=ops, launches=launches))
        print(f"[op_count] {name}: {ops} aten operator calls and {launches} kernel launches per layer "
              f"(forward+backward{', bf16 autocast' if args.amp else ''}, {device}); by name: "
              + ", ".join(f"{k} {v}" for k, v in by_name.most_common(12)), flush=True)
    return out


if __name__ == "__main__":
    main()
