"""The Transformer trained under DDP and FSDP2 on a data x context device mesh, against one process.

4 ranks (gloo): every rank builds the same model and global batch from one seed; the single-process
model runs the whole batch. Each wrapped run shards the batch over ``dp`` (rank's sequences) and the time
axis over ``cp`` (rank's unequal token slice, ``cp_group=`` the mesh's context group, its ``labels``), then
checks, for two SGD steps: the rank's loss against the single-process loss of its data shard, and the
parameter gradients after the wrapper's reduction (DDP's all-reduce, FSDP2's reduce-scatter, gathered back
with ``full_tensor``) against the single-process gradients of the global batch; float64, loss 1e-12 and
gradients 1e-10 relative (float32, one FSDP2 case and on CUDA: 2e-5 and 2e-4).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gateloop_kernels import Transformer

from helpers.distributed import max_rel_err, raise_failures, spawn

B, T, VOCAB = 4, 12, 32
D = 16  # model width: gate_loop_heads=1 is one head of dim 16
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 2e-4)}  # loss, gradients
LENGTHS = [5, 7]  # the context ranks' slices of the T tokens


def _wrap(model, how, flat, mesh_2d):
    """DDP, or FSDP2 sharding over every rank: both over the flattened mesh, for the parameters are replicated
    over dp and cp alike; or HSDP on the (dp, cp) mesh: replicated over dp, sharded over cp."""
    if how == "ddp":
        return DDP(model, process_group=flat.get_group())
    fully_shard(model, mesh=flat if how == "fsdp" else mesh_2d)
    return model


def _full(g):
    return g.full_tensor() if isinstance(g, DTensor) else g


def _case(rank, seed, how, flat, mesh_2d, cp, reversible, heads, device, dtype, steps=2):
    """One wrapped run (``cp`` 1: data parallel over every rank; 2: the (dp, cp) mesh) against the
    single-process model: the failed comparisons."""
    torch.manual_seed(seed)
    tol_loss, tol_grad = TOL[dtype]
    ref = Transformer(D, num_tokens=VOCAB, depth=2, gate_loop_heads=heads, reversible=reversible).to(device, dtype)
    model = _wrap(copy.deepcopy(ref), how, flat, mesh_2d)
    tokens = torch.randint(0, VOCAB, (B, T + 1)).to(device)
    dp = flat.size() // cp
    dp_rank, cp_rank = divmod(rank, cp)  # the (dp, cp) mesh's row-major layout
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    if cp == 1:
        x, kwargs = tokens[rows], {}
    else:
        start, n = sum(LENGTHS[:cp_rank]), LENGTHS[cp_rank]
        x = tokens[rows, :-1][:, start:start + n]
        kwargs = dict(labels=tokens[rows, 1:][:, start:start + n], cp_group=mesh_2d["cp"].get_group())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    case = f"{how} dp={dp} cp={cp} reversible={reversible} gate_loop_heads={heads}"
    failures = []
    for step in range(steps):
        with torch.no_grad():
            want = ref(tokens[rows], return_loss=True)
        ref(tokens, return_loss=True).backward()
        loss = model(x, return_loss=True, **kwargs)
        loss.backward()
        err = max_rel_err(loss.detach(), want)
        if not err <= tol_loss:
            failures.append(f"{case} step {step}: rank {rank} loss relative error {err:.2e}")
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            err = max_rel_err(_full(p.grad), p_ref.grad)
            if not err <= tol_grad:
                failures.append(f"{case} step {step}: rank {rank} d{name} relative error {err:.2e}")
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
    return failures


def _train_worker(rank, world, device, seed):
    flat = init_device_mesh(device, (world,), mesh_dim_names=("dp_cp",))
    mesh_2d = init_device_mesh(device, (2, world // 2), mesh_dim_names=("dp", "cp"))
    cases = [("ddp", 1, True, 1), ("ddp", 2, False, None), ("ddp", 2, True, 1), ("fsdp", 1, False, 1),
             ("fsdp", 2, True, None), ("hsdp", 2, False, 1), ("fsdp", 2, False, 1)]
    failures = []
    for i, (how, cp, reversible, heads) in enumerate(cases):
        # float64 on the CPU but for the last case: FSDP2 averages float32 gradients with ReduceOp.AVG, float64
        # ones by a sum and a division; float32 on CUDA (the kernels)
        dtype = torch.float64 if device == "cpu" and i < len(cases) - 1 else torch.float32
        failures += _case(rank, seed + i, how, flat, mesh_2d, cp, reversible, heads,
                          device if device == "cpu" else f"cuda:{rank}", dtype)
    raise_failures(failures)


def test_cp_trains_under_ddp_and_fsdp2(_seed):
    """4 ranks: DDP and FSDP2 over all of them, data parallel alone or on the 2 x 2 (dp, cp) mesh, and HSDP
    on that mesh; residual and reversible, head dims 1 and 16: two SGD steps, the loss and the reduced
    gradients equal the single-process run of the global batch (float64: 1e-12, 1e-10 relative; one FSDP2
    case in float32: 2e-5, 2e-4)."""
    spawn(_train_worker, 4, "cpu", _seed)


@pytest.mark.gpu
def test_cp_trains_under_ddp_and_fsdp2_nccl(_seed):
    """The same on 4 GPUs (NCCL, the Triton kernels at head dims 1 and 16), float32: loss 2e-5, gradients
    2e-4 relative (to each gradient's largest entry)."""
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    spawn(_train_worker, 4, "cuda", _seed)
