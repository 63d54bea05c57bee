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

Predicted scaling (``--predict [--worlds W ...] [--seq T ...] [--dims D ...] [--link-gbps BW]
[--link-latency-us L]``): one process, one device, no process group. For each ``W`` it times forward +
backward of what one rank runs on its ``ceil(T / W)`` slice -- :func:`gate_loop_heads_cp` itself
(``check_shapes=False``) with its two collectives replaced by local copies, next to its parts (the slice's
``gate_loop_heads`` scan, the per-rank scans ``_heads_local`` (slice + gate-only scan), the output
correction ``_Correct``) -- and adds the modelled collectives: all-gather forward and reduce-scatter
backward, each ``L + (W - 1) / W * bytes / BW`` with ``bytes`` the all-gathered states of
:func:`context_parallel_bytes` (nothing at ``W = 1``). Defaults: ``BW`` = 3600 Gbit/s (450 GB/s, one
direction of an H100 SXM's NVLink 4: 18 links x 25 GB/s), ``L`` = 10 us per collective (an assumption of the
order of NCCL's small-message latency on NVLink; the measured ``--nproc W`` run prints the real one).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import time
import warnings
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from bench import harness, nonnegative_float, positive_float, positive_int, results
from gateloop_kernels import Transformer, gate_loop_heads
from gateloop_kernels import context_parallel as cpm
from gateloop_kernels.context_parallel import context_parallel_bytes, gate_loop_heads_cp
from gateloop_kernels.reference import DEFAULT_CHUNK

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
WRAPS = ("ddp", "fsdp", "hsdp")
#: --predict's link model: one direction of an H100 SXM's NVLink 4 (18 links x 25 GB/s = 450 GB/s), in Gbit/s
LINK_GBPS = 3600.0
#: --predict's latency per collective, microseconds (the order of NCCL's small-message latency on NVLink)
LINK_LATENCY_US = 10.0


class _Seq(argparse.Action):
    """``--seq T [T ...]``: ``seqs`` the list (``--predict``), ``seq`` the first (the other modes take one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.seqs, namespace.seq = list(values), values[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench cp", description=__doc__.split("\n\n")[1])
    p.add_argument("--nproc", type=positive_int, default=2, help="ranks W (default 2)")
    p.add_argument("--seq", type=positive_int, nargs="+", action=_Seq, default=None,
                   help="whole sequence length T (default 65536 on GPUs, 512 on CPU; --train: 8192, 128; "
                        "--predict: one or more, default 32768 131072 on a GPU, 64 on the CPU)")
    p.set_defaults(seqs=None)
    p.add_argument("--batch", type=positive_int, default=1, help="sequences (--train: per data-parallel rank)")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--dim", type=positive_int, default=64, help="head dims d = e (1, or 16..256 for the kernels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeat", type=positive_int, default=5)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): NCCL on one GPU per rank when there are enough, else gloo on the CPU")
    pr = p.add_argument_group("predicted scaling on one device (--predict)")
    pr.add_argument("--predict", action="store_true",
                    help="one process: time a rank's T/W slice on this device, add the modelled collectives")
    pr.add_argument("--worlds", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="ranks W (default 1 2 4 8)")
    pr.add_argument("--dims", type=positive_int, nargs="+", default=[1, 64], help="head dims d = e (default 1 64)")
    pr.add_argument("--link-gbps", type=positive_float, default=LINK_GBPS,
                    help=f"link bandwidth per direction, Gbit/s (default {LINK_GBPS:g}: H100 SXM NVLink 4, 450 GB/s)")
    pr.add_argument("--link-latency-us", type=nonnegative_float, default=LINK_LATENCY_US,
                    help=f"latency per collective, microseconds (default {LINK_LATENCY_US:g})")
    harness.add_record_argument(pr)
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="train a Transformer on a (data, context) mesh instead")
    t.add_argument("--cp", type=positive_int, default=None, help="context ranks C per sequence (default W; W %% C == 0)")
    t.add_argument("--wrap", choices=WRAPS, default="fsdp",
                   help="DDP or FSDP2 over all ranks, or HSDP (replicated over data, sharded over context)")
    t.add_argument("--steps", type=positive_int, default=10)
    t.add_argument("--depth", type=positive_int, default=2)
    t.add_argument("--vocab", type=positive_int, default=256)
    t.add_argument("--lr", type=positive_float, default=3e-3)
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
               "collectives": _median_s(collectives, args.repeat, device),
               # the rank's peak over its context-parallel steps (inputs, gradients, the step's temporaries)
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None}
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
        if cuda:
            peaks = [None] * world
            dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device))
            if rank == 0:
                total = torch.cuda.get_device_properties(device).total_memory
                longest = longest_seq(T, max(peaks), total)
                print(f"peak memory of the fullest GPU {max(peaks) / 2 ** 30:.2f} GiB of {total / 2 ** 30:.1f}: "
                      f"the longest sequence this mesh would train, memory linear in T, ~{longest} tokens",
                      flush=True)
                shape = {"B": args.batch, "T": T, "W": world, "C": cp, "H": args.heads, "d": args.dim,
                         "depth": args.depth}
                op = f"Transformer training step on a {dp} x {cp} (data x context) mesh, {args.wrap}"
                env = harness.environment()
                harness.record("cp", [
                    results.row("cp", op, "ours", shape, args.dtype, "peak_gib", "GiB", max(peaks) / 2 ** 30, env,
                                note=f"the fullest of {world} GPUs ({_interconnect()})"),
                    results.row("cp", op, "ours", shape, args.dtype, "longest_trainable_seq", "tokens", longest, env,
                                source="predicted", note=f"T x {LONGEST_FRACTION:g} of the GPU's memory / peak "
                                                         "(memory linear in T)")], args.record)
    finally:
        dist.destroy_process_group()


#: the share of a GPU's memory a training run may fill in :func:`longest_seq` (allocator slack, CUDA context)
LONGEST_FRACTION = 0.9


def longest_seq(T: int, peak_bytes: int, total_bytes: int) -> int:
    """The longest sequence a training step would fit, from its peak at ``T`` tokens: memory taken as linear in
    ``T`` (the model's parameters and optimizer state are small beside the activations at these lengths), up to
    :data:`LONGEST_FRACTION` of the GPU's memory."""
    return int(T * LONGEST_FRACTION * total_bytes / peak_bytes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_train(rank: int, world: int, port: int, args) -> None:
    _train_rank(rank, world, f"tcp://127.0.0.1:{port}", args)


def collective_ms(state_bytes: int, world: int, link_gbps: float, latency_us: float) -> float:
    """The modelled exchange of one call, forward + backward: an all-gather and a reduce-scatter of the
    ``state_bytes`` states buffer (:func:`context_parallel_bytes` ``["forward"]``), each its latency plus the
    ``(W - 1) / W`` of the buffer a ring moves over the link; 0 for one rank (nothing to exchange)."""
    if world == 1:
        return 0.0
    return 2 * (latency_us * 1e-3 + (world - 1) / world * state_bytes * 8 / (link_gbps * 1e9) * 1e3)


@contextlib.contextmanager
def _standin_group(rank: int, world: int):
    """``gateloop_kernels.context_parallel`` as rank ``rank`` of ``world`` in this one process: its group
    lookup and its two collectives replaced by local copies (every slot of the all-gather gets this rank's
    states; the reduce-scatter hands back slot ``rank``), so that the rank's whole per-call computation runs
    as it does under a group, without the exchange (which :func:`collective_ms` models)."""
    def gather(out, x, group):
        out.view(world, -1).copy_(x)

    def scatter(out, x, group):
        out.copy_(x.view(world, -1)[rank])

    with mock.patch.object(cpm, "_group_rank", lambda name, group: (rank, world)), \
            mock.patch.object(cpm, "_all_gather_single", gather), \
            mock.patch.object(cpm, "_reduce_scatter_single", scatter):
        yield


def predict_rank(B: int, T: int, W: int, H: int, D: int, dt: torch.dtype, device: torch.device,
                 time_fn, link_gbps: float, latency_us: float) -> dict:
    """One rank's part of a ``W``-rank call on ``T`` tokens: forward + backward medians (ms) of its
    ``ceil(T / W)`` slice's pieces timed by ``time_fn(fn, leaves) -> Timing``, the modelled collectives and
    the predicted step."""
    n = -(-T // W)  # the longest slice sets the step
    g = torch.Generator().manual_seed(W)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(device, dt).requires_grad_() for _ in range(3))
    z = torch.randn(B, n, H, 2, generator=g).to(device).requires_grad_()
    leaves = [q, k, v, z]
    fdt = torch.float64 if dt == torch.float64 else torch.float32
    cdt = torch.complex128 if dt == torch.float64 else torch.complex64

    def slice_scan():
        o, _ = gate_loop_heads(q, k, v, z=z)
        o.float().sum().backward()

    def local_scans():  # the per-rank scans of gate_loop_heads_cp: the slice's and the gate-only one
        loc = cpm._heads_local(q, k, v, {"z": z}, None, "ieee", DEFAULT_CHUNK)
        (loc.o.float().sum() + torch.view_as_real(loc.state).sum() + torch.view_as_real(loc.total).sum()
         + loc.c_re.sum() + loc.c_im.sum()).backward()

    o_loc = torch.randn(B, n, H, D, generator=g).to(device, dt).requires_grad_()
    s_in = torch.randn(B, H, D, D, dtype=cdt, generator=g).to(device).requires_grad_()
    c_re, c_im = (torch.rand(B, n, H, dtype=fdt, generator=g).to(device).requires_grad_() for _ in range(2))

    def correction():
        cpm._Correct.apply(o_loc, q, s_in, c_re, c_im).float().sum().backward()

    def rank_step():
        o, _ = gate_loop_heads_cp(q, k, v, z=z, check_shapes=False, cp_group=None)  # the stand-in ignores it
        o.float().sum().backward()

    t = {"slice_scan_ms": time_fn(slice_scan, leaves), "local_scans_ms": time_fn(local_scans, leaves),
         "correction_ms": time_fn(correction, [o_loc, q, s_in, c_re, c_im])}
    with _standin_group(W - 1, W):
        t["rank_compute_ms"] = time_fn(rank_step, leaves)
    coll = collective_ms(context_parallel_bytes(B, H, D, D, W, dt)["forward"], W, link_gbps, latency_us)
    pred = t["rank_compute_ms"].median + coll
    return {"n": n, "timings": t, "gate_scan_ms": t["local_scans_ms"].median - t["slice_scan_ms"].median,
            "fold_ms": t["rank_compute_ms"].median - t["local_scans_ms"].median - t["correction_ms"].median,
            "collective_ms": coll, "predicted_step_ms": pred, "predicted_tokens_per_s": B * T / pred * 1e3}


def _predict(args) -> list[dict]:
    """``--predict``: the table, printed, and its result rows (recorded on a GPU or with ``--record``)."""
    cuda = _use_cuda(args, torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dt, B, H = DTYPES[args.dtype], args.batch, args.heads
    seqs = args.seqs or ([32768, 131072] if cuda else [64])

    def time_fn(fn, leaves):
        return harness.do_bench(fn, grad_to_none=leaves) if cuda else harness.wall_times(fn, reps=args.repeat)

    env = harness.environment()
    model = (f"collectives modelled: {args.link_latency_us:g} us + (W-1)/W bytes at {args.link_gbps:g} Gbit/s, "
             "twice (all-gather forward, reduce-scatter backward)")
    name = torch.cuda.get_device_name(device) if cuda else "CPU: NOT GPU figures (tiny sizes, wall clock)"
    print(f"device: {name}; predicted W-rank step from one device, B = {B}, H = {H}, {args.dtype}, forward + "
          f"backward, check_shapes=False; {model}")
    print(f"{'d':>3} {'T':>8} {'W':>3} {'n':>8} {'slice ms':>9} {'gate ms':>8} {'corr ms':>8} {'fold ms':>8} "
          f"{'compute ms':>10} {'coll. ms':>8} {'pred. ms':>9} {'tokens/s':>10} {'eff.':>5}")
    rows = []
    for D in args.dims:
        for T in seqs:
            single_ms = None
            for W in sorted(set(args.worlds) | {1}):  # W = 1's slice scan: the whole sequence in one process
                r = predict_rank(B, T, W, H, D, dt, device, time_fn, args.link_gbps, args.link_latency_us)
                single_ms = single_ms or r["timings"]["slice_scan_ms"].median
                r["strong_scaling_efficiency"] = single_ms / (W * r["predicted_step_ms"])
                if W not in args.worlds:
                    continue
                tm = r["timings"]
                print(f"{D:>3} {T:>8} {W:>3} {r['n']:>8} {tm['slice_scan_ms'].median:9.3f} {r['gate_scan_ms']:8.3f} "
                      f"{tm['correction_ms'].median:8.3f} {r['fold_ms']:8.3f} {tm['rank_compute_ms'].median:10.3f} "
                      f"{r['collective_ms']:8.3f} {r['predicted_step_ms']:9.3f} {r['predicted_tokens_per_s']:10.4g} "
                      f"{r['strong_scaling_efficiency']:5.2f}", flush=True)
                shape = {"B": B, "T": T, "W": W, "H": H, "d": D, "e": D}
                op = "context-parallel step, one rank"

                def add(metric, unit, value, spread=None, source="measured", note=None):
                    rows.append(results.row("cp", op, "ours", shape, args.dtype, metric, unit, value, env,
                                            spread=spread, source=source, note=note))
                for metric, timing in tm.items():
                    add(metric, "ms", timing.median, timing.spread if cuda else None)
                for metric in ("gate_scan_ms", "fold_ms"):
                    add(metric, "ms", r[metric], note="difference of medians")
                for metric, unit in (("collective_ms", "ms"), ("predicted_step_ms", "ms"),
                                     ("predicted_tokens_per_s", "tokens/s"), ("strong_scaling_efficiency", "ratio")):
                    add(metric, unit, r[metric], source="predicted", note=model)
    if not cuda:
        print("(CPU wall-clock times of the interpreted or reference kernels: not GPU figures)")
    harness.record("cp", rows, args.record)
    return rows


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seqs and len(args.seqs) > 1 and not args.predict:
        parser.error("--seq takes one length T except with --predict")
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # this process is one rank
    need, have = (1 if args.predict or torchrun else args.nproc), torch.cuda.device_count()  # one GPU per rank here
    if args.device == "cuda" and have < need:
        parser.error(f"--device cuda needs {need} CUDA device(s) (one per rank), this machine has {have}")
    if args.predict:
        _predict(args)
        return
    if args.train:
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
    harness.record("cp", measured_rows(rows, args, harness.environment(), _interconnect()), args.record)


def measured_rows(rows: list[dict], args, env: dict, interconnect: str) -> list[dict]:
    """Prints the step over ``W`` ranks (the slowest rank's, unchecked) against one process, and returns its result
    rows: step and single-process ms, tokens/s, strong-scaling efficiency, the collectives' ms alone and their
    share of the step, the checked step, and (CUDA) the peak memory of the fullest GPU."""
    W, T = len(rows), sum(r["n"] for r in rows)
    step = max(r["unchecked"] for r in rows)
    coll = max(r["collectives"] for r in rows)
    single = rows[0]["single"]
    eff = single / (W * step)
    peaks = [r["peak_gib"] for r in rows if r["peak_gib"] is not None]
    print(f"step over {W} ranks (slowest, unchecked): {step * 1e3:.2f} ms, {args.batch * T / step:.4g} tokens/s, "
          f"strong-scaling efficiency {eff:.2f}, collectives alone {coll / step:.0%} of it"
          + (f", peak {max(peaks):.2f} GiB per GPU" if peaks else ""))
    shape = {"B": args.batch, "T": T, "W": W, "H": args.heads, "d": args.dim, "e": args.dim}
    note = f"{W} ranks, one {rows[0]['device']} each; {interconnect}; median of {args.repeat}"
    op = "context-parallel step, measured over W ranks"
    values = [("step_ms", "ms", step * 1e3), ("checked_step_ms", "ms", max(r["cp"] for r in rows) * 1e3),
              ("single_process_ms", "ms", single * 1e3), ("tokens_per_s", "tokens/s", args.batch * T / step),
              ("strong_scaling_efficiency", "ratio", eff), ("collective_ms", "ms", coll * 1e3),
              ("collective_share", "ratio", coll / step)]
    values += [("peak_gib", "GiB", max(peaks))] if peaks else []
    return [results.row("cp", op, "ours", shape, args.dtype, metric, unit, value, env, note=note)
            for metric, unit, value in values]


def _interconnect() -> str:
    """GPU 0's NVLink links as ``nvidia-smi`` reports them (the rows name the machine's interconnect)."""
    try:
        out = subprocess.run(["nvidia-smi", "nvlink", "--status", "-i", "0"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "interconnect unknown (no nvidia-smi)"
    links = [line for line in out.splitlines() if "GB/s" in line and "inactive" not in line.lower()]
    return f"NVLink, {len(links)} active links on GPU 0" if links else "no active NVLink on GPU 0 (PCIe)"


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
