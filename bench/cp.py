"""Context-parallel scan: ``python -m bench.cp [--nproc W] [--seq T] [--batch B] [--heads H] [--dim D] [--dtype DT]``.

Spawns ``W`` ranks (NCCL on ``W`` GPUs when there are that many, else gloo on the CPU), splits one
sequence of ``T`` tokens into ``W`` slices and times, per rank, forward + backward of
:func:`gateloop_kernels.context_parallel.gate_loop_heads_cp` (median of ``--repeat``), next to its parts:
``gate_loop_heads`` alone on the rank's ``T / W`` slice and the two collectives alone
(all-gather + reduce-scatter of the ``W * B * H * (2 + 2 D^2)`` floats the call exchanges). Prints
measured vs the lower bound "slice scan + collectives" (the gate-only scan, the output correction and
the fold come on top: ``docs/context_parallel.md``, predicted scaling) and the single-process time of the whole sequence
on rank 0's device, with the bytes per call (:func:`context_parallel_bytes`).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gateloop_kernels import gate_loop_heads
from gateloop_kernels.context_parallel import context_parallel_bytes, gate_loop_heads_cp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cp", description=__doc__.split("\n\n")[1])
    p.add_argument("--nproc", type=int, default=2, help="ranks W (default 2)")
    p.add_argument("--seq", type=int, default=None, help="whole sequence length T (default 65536 on GPUs, 512 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head dims d = e (1, or 16..256 for the kernels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeat", type=int, default=5)
    return p


def _median_s(fn, repeat: int, device: torch.device) -> float:
    times = []
    for i in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up (compilation, autotuning)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, port: int, args, results) -> None:
    cuda = torch.cuda.device_count() >= world
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renamed the *_tensor collectives
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        T = args.seq or (65536 if cuda else 512)
        B, H, D, dt = args.batch, args.heads, args.dim, DTYPES[args.dtype]
        bounds = [T * j // world for j in range(world + 1)]
        n = bounds[rank + 1] - bounds[rank]
        g = torch.Generator().manual_seed(rank)

        def inputs(length):
            x = [torch.randn(B, length, H, D, generator=g).to(device, dt).requires_grad_() for _ in range(3)]
            return x, torch.randn(B, length, H, 2, generator=g).to(device).requires_grad_()

        (q, k, v), z = inputs(n)

        def cp_step():
            o, _ = gate_loop_heads_cp(q, k, v, z=z, cp_group=dist.group.WORLD)
            o.float().sum().backward()

        def slice_step():
            o, _ = gate_loop_heads(q, k, v, z=z)
            o.float().sum().backward()

        nbytes = context_parallel_bytes(B, H, D, D, world, dt)
        fold_dt = torch.float64 if dt == torch.float64 else torch.float32
        gathered = torch.empty(nbytes["forward"] // fold_dt.itemsize, dtype=fold_dt, device=device)
        mine = gathered.new_zeros(gathered.numel() // world)

        def collectives():
            dist.all_gather_into_tensor(gathered, mine)
            dist.reduce_scatter_tensor(mine, gathered)

        row = {"rank": rank, "n": n, "cp": _median_s(cp_step, args.repeat, device),
               "slice": _median_s(slice_step, args.repeat, device),
               "collectives": _median_s(collectives, args.repeat, device)}
        if rank == 0:
            (q, k, v), z = inputs(T)
            row["single"] = _median_s(slice_step, args.repeat, device)
            row["device"] = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
            row["bytes"] = nbytes
        out = [None] * world
        dist.all_gather_object(out, row)
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args.nproc, port, args, results), nprocs=args.nproc, start_method="spawn")
    rows = results.get()
    r0 = rows[0]
    print(f"device: {r0['device']}; W = {args.nproc}, T = {sum(r['n'] for r in rows)}, B = {args.batch}, "
          f"H = {args.heads}, d = e = {args.dim}, {args.dtype}; forward + backward, median of {args.repeat}")
    print(f"bytes per call and rank: {r0['bytes']} (independent of T)")
    print(f"single process, whole sequence: {r0['single'] * 1e3:9.2f} ms")
    print(f"{'rank':>4} {'n':>8} {'measured ms':>12} {'slice ms':>9} {'collect. ms':>11} {'slice+coll. ms':>14}")
    for r in rows:
        print(f"{r['rank']:>4} {r['n']:>8} {r['cp'] * 1e3:12.2f} {r['slice'] * 1e3:9.2f} "
              f"{r['collectives'] * 1e3:11.2f} {(r['slice'] + r['collectives']) * 1e3:14.2f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
