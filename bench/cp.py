"""Context-parallel scan: ``python -m bench cp [--nproc W] [--seq T] [--batch B] [--heads H] [--dim D] [--dtype DT]``.

Timing (default): spawns ``W`` ranks (NCCL on ``W`` GPUs when there are that many, else gloo on the
CPU; ``--device`` forces either), splits one sequence of ``T`` tokens into ``W`` slices and times, per rank, forward + backward of
:func:`gateloop_kernels.context_parallel.gate_loop_heads_cp` (median of ``--repeat``), with and without
its shape check (``check_shapes``: one small all-gather and a host synchronization), next to its parts:
``gate_loop_heads`` alone on the rank's ``T / W`` slice and the two collectives alone (all-gather +
reduce-scatter of the ``W * B * H * (2 + 2 D^2)`` floats the call exchanges). Prints measured vs the
lower bound "slice scan + collectives" (the gate-only scan, the output correction and the fold come on
top: ``docs/context_parallel.md``, predicted scaling) and the single-process time of the whole sequence
on rank 0's device, with the bytes per call (:func:`context_parallel_bytes`).

Training (``--train [--cp C] [--wrap ddp|fsdp|hsdp] [--steps N] [--depth L]``): a GateLoop ``Transformer``
(width ``H * D``, ``H`` gate-loop heads of dim ``D``) trains ``N`` AdamW steps on a ``(W / C, C)`` device
mesh (data x context): each data rank draws ``B`` sequences of ``T`` tokens, each context rank holds a
contiguous ``T / C`` slice of them (``cp_group=`` the mesh's context group), the model wrapped in DDP or
FSDP2 (``fully_shard``) over all ``W`` ranks, or HSDP (replicated over data, sharded over context). Rank 0
prints the loss per step (the mean over the data ranks; the same on every context rank). The same code
runs ``W`` spawned ranks (NCCL on ``W`` GPUs, else gloo on the CPU) or under ``torchrun`` (one process
per rank; ``--nproc`` is then ignored), e.g. ``torchrun --nproc-per-node 4 -m bench cp --train --cp 2``.
The task: every sequence counts up by one (mod the vocabulary) from a random start, which a model
learns from the previous token alone, so the loss falls within a few steps.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from gateloop_kernels import Transformer, gate_loop_heads
from gateloop_kernels.context_parallel import context_parallel_bytes, gate_loop_heads_cp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
WRAPS = ("ddp", "fsdp", "hsdp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cp", description=__doc__.split("\n\n")[1])
    p.add_argument("--nproc", type=int, default=2, help="ranks W (default 2)")
    p.add_argument("--seq", type=int, default=None,
                   help="whole sequence length T (default 65536 on GPUs, 512 on CPU; --train: 8192, 128)")
    p.add_argument("--batch", type=int, default=1, help="sequences (--train: per data-parallel rank)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head dims d = e (1, or 16..256 for the kernels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): NCCL on one GPU per rank when there are enough, else gloo on the CPU")
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="train a Transformer on a (data, context) mesh instead")
    t.add_argument("--cp", type=int, default=None, help="context ranks C per sequence (default W; W %% C == 0)")
    t.add_argument("--wrap", choices=WRAPS, default="fsdp",
                   help="DDP or FSDP2 over all ranks, or HSDP (replicated over data, sharded over context)")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--depth", type=int, default=2)
    t.add_argument("--vocab", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    return p


def _use_cuda(args, enough_gpus: bool) -> bool:
    if args.device == "cuda" and not enough_gpus:
        raise RuntimeError("--device cuda: fewer GPUs than ranks")
    return enough_gpus if args.device == "auto" else args.device == "cuda"


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
    cuda = _use_cuda(args, torch.cuda.device_count() >= world)
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

        def cp_step(check_shapes=True):
            o, _ = gate_loop_heads_cp(q, k, v, z=z, check_shapes=check_shapes, cp_group=dist.group.WORLD)
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
               "unchecked": _median_s(lambda: cp_step(False), args.repeat, device),
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


def build_model(args) -> Transformer:
    """The ``--train`` model, the same on every rank (seeded by ``--seed``), float64 parameters for
    ``--dtype float64``, else float32 (bfloat16 runs under autocast)."""
    torch.manual_seed(args.seed)
    model = Transformer(args.heads * args.dim, num_tokens=args.vocab, depth=args.depth, gate_loop_heads=args.heads)
    return model.double() if args.dtype == "float64" else model


def batch(args, step: int, sequences: int, length: int) -> Tensor:
    """Step ``step``'s global batch, ``(sequences, length + 1)`` token ids counting up from random starts
    (the same on every rank: each takes its rows and its slice)."""
    g = torch.Generator().manual_seed(args.seed * 100003 + step)
    start = torch.randint(0, args.vocab, (sequences, 1), generator=g)
    return (start + torch.arange(length + 1)) % args.vocab


def _train_rank(rank: int, world: int, init_method: str, args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    launched = init_method == "env://"
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = _use_cuda(args, torch.cuda.is_available() if launched else torch.cuda.device_count() >= world)
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif not launched:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        cp = args.cp or world
        dp = world // cp
        mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
        flat = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_cp",))
        dp_rank, cp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
        T = args.seq or (8192 if cuda else 128)
        bounds = [T * j // cp for j in range(cp + 1)]
        lo, hi = bounds[cp_rank], bounds[cp_rank + 1]
        model = build_model(args).to(device)
        if args.wrap == "ddp":
            model = DDP(model, process_group=flat.get_group())
        else:  # the parameters are replicated over data and context alike: shard over both, or over context only
            fully_shard(model, mesh=flat if args.wrap == "fsdp" else mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        cp_group = mesh["cp"].get_group() if cp > 1 else None
        if rank == 0:
            name = torch.cuda.get_device_name(device) + " (NCCL)" if cuda else "CPU (gloo)"
            print(f"device: {name}; W = {world} ranks = {dp} data x {cp} context, {args.wrap}; per data rank "
                  f"{args.batch} x {T} tokens, per context rank {T // cp}-{-(-T // cp)}; Transformer width "
                  f"{args.heads * args.dim}, {args.heads} heads of dim {args.dim}, depth {args.depth}, "
                  f"{args.dtype}", flush=True)
        amp = args.dtype == "bfloat16"
        for step in range(args.steps):
            t0 = time.perf_counter()
            tokens = batch(args, step, dp * args.batch, T)[dp_rank * args.batch:(dp_rank + 1) * args.batch]
            x, labels = tokens[:, lo:hi].to(device), tokens[:, lo + 1:hi + 1].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(x, return_loss=True, labels=labels, cp_group=cp_group)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().to(torch.float64)
            dist.all_reduce(mean)  # the ranks of one data shard agree: the mean over all is that over data
            if rank == 0:
                print(f"step {step + 1:4d}/{args.steps}  loss {mean.item() / world:.6f}  "
                      f"{time.perf_counter() - t0:.3f} s", flush=True)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_train(rank: int, world: int, port: int, args) -> None:
    _train_rank(rank, world, f"tcp://127.0.0.1:{port}", args)


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train:
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # this process is one rank
        world = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
        if args.cp is not None and (args.cp < 1 or world % args.cp):
            parser.error(f"--cp {args.cp} must divide the number of ranks {world}")
        if torchrun:
            _train_rank(int(os.environ["RANK"]), world, "env://", args)
        else:
            mp.start_processes(_spawned_train, args=(args.nproc, _free_port(), args), nprocs=args.nproc,
                               start_method="spawn")
        return
    port = _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args.nproc, port, args, results), nprocs=args.nproc, start_method="spawn")
    rows = results.get()
    r0 = rows[0]
    print(f"device: {r0['device']}; W = {args.nproc}, T = {sum(r['n'] for r in rows)}, B = {args.batch}, "
          f"H = {args.heads}, d = e = {args.dim}, {args.dtype}; forward + backward, median of {args.repeat}")
    print(f"bytes per call and rank: {r0['bytes']} (independent of T)")
    print(f"single process, whole sequence: {r0['single'] * 1e3:9.2f} ms")
    print(f"{'rank':>4} {'n':>8} {'measured ms':>12} {'unchecked ms':>12} {'slice ms':>9} {'collect. ms':>11} "
          f"{'slice+coll. ms':>14}")
    for r in rows:
        print(f"{r['rank']:>4} {r['n']:>8} {r['cp'] * 1e3:12.2f} {r['unchecked'] * 1e3:12.2f} {r['slice'] * 1e3:9.2f} "
              f"{r['collectives'] * 1e3:11.2f} {(r['slice'] + r['collectives']) * 1e3:14.2f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
