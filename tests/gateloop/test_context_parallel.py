"""Context parallelism (gateloop_kernels.context_parallel) against the single-process scan.

Each test spawns its ranks itself (gloo on the CPU, NCCL on GPUs) with timeouts on the process group
and on the join, so a hang fails the test instead of CI. Every rank builds the whole sequence from one
seed, runs its slice through ``gate_loop_heads_cp`` and the whole sequence through ``gate_loop_heads``,
and compares its slice of the outputs, the final state and every gradient; rank ``r``'s loss is its
local loss (its outputs, plus its own weighting of the final state), the reference loss their sum.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from gateloop_kernels import gate_loop_heads, gate_loop_operator
from gateloop_kernels import heads as heads_module
from gateloop_kernels import operator as operator_module
from gateloop_kernels.context_parallel import (DESCRIPTOR_LEN, context_parallel_bytes, context_parallel_mean,
                                               gate_loop_heads_cp, gate_loop_operator_cp)

from helpers.distributed import (check_failures, expect_raises, host_sync_failures, max_rel_err, raise_failures,
                                 slice_checks, spawn)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- one case

def _inputs(seed, lengths, B, H, d, e, dtype, form, device):
    """The whole sequence: ``form`` "z" / "log_polar" (head layout, gate_loop_heads) or "operator"
    ((B, T, d) layout, a complex gate (B, T, 1, 1) with one exact zero, gate_loop_operator)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=dt).to(device)

    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    if form == "operator":
        x = {"q": rnd(B, T, d), "k": rnd(B, T, d), "v": rnd(B, T, e)}
        mag = 0.5 + 0.5 * torch.rand(B, T, 1, 1, generator=g, dtype=dtype)
        mag[:, T // 3] = 0.0  # a zero gate: the cumulative products past it are exactly 0
        x["a"] = torch.polar(mag, rnd(B, T, 1, 1).cpu()).to(device)
        init, w_o = rnd(B, d, e, dt=cdt), rnd(B, T, e)
        return x, init, w_o, [rnd(B, d, e, dt=cdt) for _ in lengths]
    x = {"q": rnd(B, T, H, d), "k": rnd(B, T, H, d), "v": rnd(B, T, H, e)}
    if form == "z":
        x["z"] = 1.5 * rnd(B, T, H, 2)
    else:
        x["log_magnitude"] = -0.5 * rnd(B, T, H).abs()
        x["phase"] = rnd(B, T, H)
    init = rnd(B, H, d, e, dt=cdt)
    w_o = rnd(B, T, H, e)
    w_f = [rnd(B, H, d, e, dt=cdt) for _ in lengths]  # rank r's weighting of the final state
    return x, init, w_o, w_f


def _scan(x, init, with_final, group=None):
    """The single-process scan (``group=None``) or the split one, for either API: ``(o, final or None)``."""
    if "a" in x:
        if group is None:
            return gate_loop_operator(**x, initial_state=init, return_final_state=True)
        out = gate_loop_operator_cp(**x, initial_state=init, return_final_state=with_final, cp_group=group)
        return out if with_final else (out, None)
    if group is None:
        return gate_loop_heads(**x, initial_state=init, output_final_state=True)
    return gate_loop_heads_cp(**x, initial_state=init, output_final_state=with_final, cp_group=group)


def _check_case(group, rank, world, seed, lengths, d, e, dtype, form, with_init, with_final,
                device="cpu") -> list[str]:
    """One configuration on ``group`` (rank ``rank`` of ``world``); returns the failed comparisons."""
    B, H = 2, 3
    x, init, w_o, w_f = _inputs(seed, lengths, B, H, d, e, dtype, form, device)
    start, n = sum(lengths[:rank]), lengths[rank]

    ref = {name: t.clone().requires_grad_() for name, t in x.items()}
    ref_init = init.clone().requires_grad_() if with_init else None
    o, f = _scan(ref, ref_init, True)
    loss = (o * w_o).sum()
    if with_final:
        loss = loss + sum((f * w.conj()).real.sum() for w in w_f)
    loss.backward()

    mine = {name: t[:, start:start + n].clone().requires_grad_() for name, t in x.items()}
    my_init = init.clone().requires_grad_() if with_init else None
    o_cp, f_cp = _scan(mine, my_init, with_final, group)
    loss_cp = (o_cp * w_o[:, start:start + n]).sum()
    if with_final:
        loss_cp = loss_cp + (f_cp * w_f[rank].conj()).real.sum()
    loss_cp.backward()

    if not with_final and f_cp is not None:
        return ["final_state returned without output_final_state"]
    checks = slice_checks(o_cp, o, f_cp, f, with_final, mine, ref, start, n)
    if with_init:
        g = my_init.grad.clone()
        dist.all_reduce(g, group=group)  # a replicated input: its gradient is shared out over the ranks
        checks.append(("dinitial_state (summed over ranks)", g, ref_init.grad))
    case = f"lengths={lengths} d={d} e={e} {dtype} gate={form} init={with_init} final={with_final}"
    return check_failures(case, rank, checks, TOL[dtype])


def _cases(world):
    lengths = {2: [[7, 12], [0, 9], [9, 0]], 4: [[5, 0, 9, 3], [3, 3, 3, 3]]}[world]
    for i, ls in enumerate(lengths):
        for d, e in ((1, 1), (16, 16)):
            for dtype in (torch.float64, torch.float32):
                form = "z" if (i + d) % 2 else "log_polar"
                for with_init, with_final in ((True, True), ((i + d) % 2 == 0, (i + d) % 2 == 1)):
                    yield ls, d, e, dtype, form, with_init, with_final
        for d, e in ((1, 1), (16, 8)):
            yield ls, d, e, torch.float64 if i % 2 else torch.float32, "operator", i % 2 == 0, True


# ----------------------------------------------------------------------------- workers

def _matches_worker(rank, world, seed):
    """4 ranks: the cases on the whole group, and the 2-rank cases on the halves [0, 1] and [2, 3] at once;
    gate_loop_heads_cp and gate_loop_operator_cp."""
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = halves[rank // 2]
    failures = []
    for i, case in enumerate(_cases(4)):
        failures += _check_case(dist.group.WORLD, rank, 4, seed + i, *case)
    for i, case in enumerate(_cases(2)):
        failures += _check_case(half, rank % 2, 2, seed + 1000 + i, *case)
    raise_failures(failures)


def _errors_worker(rank, world, seed):
    """Bad input raises on every rank (and leaves the group usable); context_parallel_mean; precision and
    chunk_size reach the scan; bytes exchanged do not grow with n; check_shapes=False drops the descriptor
    collective only."""
    group = dist.group.WORLD
    failures = []

    def call(B=2, n=4, H=3, d=1, e=1, dtype=torch.float32, k_shape=None, grad=True, grp=group, with_q=False, **kw):
        q = torch.randn(B, n, H, d, dtype=dtype, requires_grad=grad)
        k = torch.randn(*(k_shape or (B, n, H, d)), dtype=dtype)
        v = torch.randn(B, n, H, e, dtype=dtype)
        o, _ = gate_loop_heads_cp(q, k, v, z=torch.randn(B, n, H, 2, requires_grad=grad), cp_group=grp, **kw)
        return (o, q) if with_q else o

    failures += expect_raises(ValueError, "batch B", lambda: call(B=2 if rank == 0 else 3))
    failures += expect_raises(ValueError, "heads H", lambda: call(H=3 + rank))
    failures += expect_raises(ValueError, "q dtype", lambda: call(dtype=torch.float64 if rank else torch.float32))
    failures += expect_raises(ValueError, "needs grad", lambda: call(grad=rank == 0))
    if rank == 1:  # a local shape error there: its own ValueError, a RuntimeError naming it elsewhere
        failures += expect_raises(ValueError, "q, k must be", lambda: call(k_shape=(2, 5, 3, 1)))
    else:
        failures += expect_raises(RuntimeError, "rank(s) [1]", lambda: call())
    # an initial state on another device: that rank's ValueError before the exchange, a RuntimeError naming it
    # elsewhere (was PyTorch's device error in the fold, after the collective: the ranks out of step)
    s0 = torch.zeros(2, 3, 1, 1, dtype=torch.complex64, device="meta" if rank == 1 else "cpu")
    failures += expect_raises(ValueError if rank == 1 else RuntimeError, "one device" if rank == 1 else "rank(s) [1]",
                              lambda: call(initial_state=s0))
    # a real initial state, as gate_loop_heads takes it (was refused under a group): the complex one's results
    s0 = torch.randn(2, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 4))
    x = [torch.randn(2, 4, 3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 5))
         for _ in range(4)]
    # each rank reads its own initial state: other values on one rank (one bit of one entry: an unseeded random
    # state per rank, say) raise on every rank (silently different results on each rank before)
    other = s0.clone()
    other.view(torch.int64)[1, 2, 0, 0] ^= rank
    failures += expect_raises(ValueError, "disagree on initial_state values",
                              lambda: gate_loop_heads_cp(*x[:3], z=x[3].expand(-1, -1, -1, 2), initial_state=other,
                                                         cp_group=group))
    z = torch.cat([x[3][..., :1], x[3][..., :1]], -1)
    real, _ = gate_loop_heads_cp(*x[:3], z=z, initial_state=s0, cp_group=group)
    cplx, _ = gate_loop_heads_cp(*x[:3], z=z, initial_state=s0.to(torch.complex128), cp_group=group)
    if not torch.equal(real, cplx):
        failures.append(f"rank {rank}: a real initial state gave other outputs than the same complex one")
    for dtype in (torch.bfloat16, torch.float16):  # an empty slice's outputs too come in the inputs' dtype
        for d in (1, 16):
            o = call(n=0 if rank == 0 else 4, d=d, e=d, dtype=dtype)
            if o.dtype != dtype:
                failures.append(f"rank {rank}: {dtype} inputs (d = {d}) gave {o.dtype} outputs")
    only0 = dist.new_group([0])
    if rank == 0:
        failures += _check_case(only0, 0, 1, seed, [6], 1, 1, torch.float64, "z", True, True)
    else:
        failures += expect_raises(ValueError, "does not hold this process", lambda: call(grp=only0))
    failures += expect_raises(TypeError, "ProcessGroup", lambda: call(grp=None))
    # a DeviceMesh: the error names the call that gives its group
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    failures += expect_raises(TypeError, "got DeviceMesh; for a DeviceMesh pass the group of its context dimension, "
                              "mesh.get_group(<dim>)", lambda: call(grp=mesh))
    # still in step after all of that
    failures += _check_case(group, rank, world, seed + 1, [4] * world, 16, 16, torch.float64, "z", True, True)

    # context_parallel_mean: the group's mean on every rank, each rank's backward W times its own share
    terms = torch.randn(2 * world + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mine = terms.tensor_split(world)[rank].clone().requires_grad_()  # unequal shares
    mean = context_parallel_mean(mine.sum(), mine.numel(), group)
    mean.backward()
    if (mean - terms.mean()).abs() > 1e-14 or (mine.grad - world / terms.numel()).abs().max() > 1e-16:
        failures.append(f"context_parallel_mean: {mean.item()} vs {terms.mean().item()}, grad {mine.grad}")

    # precision and chunk_size reach this rank's scan, through gate_loop_heads and gate_loop_operator too;
    # bad values raise where they are passed (an empty slice included), a RuntimeError naming it elsewhere
    seen = []
    for module in (heads_module, operator_module):
        real_scan = module.scan

        def recording(*args, _scan=real_scan):
            bound = inspect.signature(_scan).bind(*args).arguments
            seen.append((bound["precision"], bound["chunk_size"]))
            return _scan(*args)

        module.scan = recording
        try:
            B, n, d = 2, 5, 16
            if module is heads_module:
                gate_loop_heads(*(torch.randn(B, n, 3, d) for _ in range(3)), z=torch.randn(B, n, 3, 2),
                                precision="tf32", chunk_size=32, cp_group=group)
            else:
                gate_loop_operator(*(torch.randn(B, n, d) for _ in range(3)), torch.rand(B, n, 1, 1),
                                   precision="tf32", chunk_size=32, cp_group=group)
        finally:
            module.scan = real_scan
        # seen: the slice's scan (head dim 16: these values) and the gate-only scan (head dim 1: its defaults)
        if ("tf32", 32) not in seen:
            failures.append(f"rank {rank}: precision / chunk_size did not reach the scan via {module.__name__}: {seen}")
        seen.clear()
    for kw, fragment in ((dict(precision="fast"), "precision"), (dict(chunk_size=24), "chunk_size")):
        if rank == 0:
            failures += expect_raises(ValueError, fragment, lambda: call(n=0, d=16, e=16, **kw))
        else:
            failures += expect_raises(RuntimeError, "rank(s) [0]", lambda: call(d=16, e=16))

    # bytes: record every collective's buffer, for two slice lengths, with and without the descriptor check
    sent = []
    real = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single")}

    def recorder(name):
        def wrapped(out, x, *args, **kwargs):
            buf = out if name == "all_gather_single" else x
            sent.append((name, buf.numel() * buf.element_size()))
            return real[name](out, x, *args, **kwargs)
        return wrapped

    B, H, d, e = 2, 3, 16, 8
    for check in (True, False):
        counts, results = [], []
        for n in (3, 40):
            sent.clear()
            for name in real:
                setattr(dist, name, recorder(name))
            try:
                torch.manual_seed(seed + n)
                o, q = call(B=B, n=n, H=H, d=d, e=e, with_q=True, check_shapes=check)
                o.sum().backward()
            finally:
                for name, fn in real.items():
                    setattr(dist, name, fn)
            counts.append(list(sent))
            results.append((o.detach(), q.grad))
        want = context_parallel_bytes(B, H, d, e, world, check_shapes=check)
        expected = [("all_gather_single", want["descriptor"])] if check else []
        expected += [("all_gather_single", want["forward"]), ("reduce_scatter_single", want["backward"])]
        if counts[0] != expected or counts[1] != expected:
            failures.append(f"check_shapes={check}: bytes exchanged {counts} (slice lengths 3, 40), expected "
                            f"{expected} each")
        if want["forward"] != world * B * H * (2 + 2 * d * e) * 4 or (
                want["descriptor"] != (world * 8 * DESCRIPTOR_LEN if check else 0)):
            failures.append(f"context_parallel_bytes {want} disagrees with its formula")
        if check:
            checked = results
        elif not all(torch.equal(a, b) for r, c in zip(results, checked) for a, b in zip(r, c)):
            failures.append(f"rank {rank}: check_shapes=False changed the outputs or gradients")

    # a gradient penalty (create_graph=True): the context-parallel nodes record no graph, so differentiating the
    # gradient raises on every rank (was silently zero: once_differentiable marked nothing for o.sum()'s gradient)
    o, q = call(with_q=True)
    g = torch.autograd.grad(o.sum(), q, create_graph=True)[0]
    failures += expect_raises(RuntimeError, "double backward", lambda: (o.square().sum() + g.square().sum()).backward())
    raise_failures(failures)


def _nccl_worker(rank, world, device_kind, seed):
    device = f"cuda:{rank}"
    failures = []
    for i, (ls, d, e) in enumerate((([40, 0], 1, 1), ([33, 70], 16, 16), ([64, 17], 64, 32), ([5, 128], 128, 128))):
        for with_init, with_final in ((False, False), (True, True)):
            failures += _check_case(dist.group.WORLD, rank, world, seed + i, ls, d, e, torch.float32,
                                    "z" if i % 2 else "log_polar", with_init, with_final, device=device)
    raise_failures(failures)


# ----------------------------------------------------------------------------- tests

def test_cp_matches_single_process(_seed):
    """2 and 4 ranks: outputs, final states and every gradient equal the single-process scan
    (float64 1e-12, float32 1e-5 relative), head dims 1 and 16, unequal and empty slices, initial and
    final states, both gate forms of gate_loop_heads_cp and gate_loop_operator_cp (with a zero gate)."""
    spawn(_matches_worker, 4, _seed)


def test_cp_bad_input_raises_everywhere_and_bytes(_seed):
    """Mismatched B / H / dtypes / needs-grad, a local error on one rank (shapes, precision, chunk_size), a
    group without this rank: a clear error on every rank, no hang; context_parallel_mean; precision and
    chunk_size reach the scan; bytes per call equal the formula for two slice lengths, with and without
    check_shapes (same outputs and gradients)."""
    spawn(_errors_worker, 2, _seed)


def _init_grad_worker(rank, world, seed):
    """initial_state requiring gradients on rank 0 only: a ValueError on every rank naming it (was: rank 1's share
    of its gradient silently lost, the summed gradient not the single-process one); the group stays in step."""
    x, init, w_o, _ = _inputs(seed, [3, 4], 1, 1, 1, 1, torch.float64, "z", "cpu")
    ref_init = init.clone().requires_grad_()
    o, _ = _scan(x, ref_init, True)
    (o * w_o).sum().backward()
    start, n = (0, 3) if rank == 0 else (3, 4)
    # the sharded inputs need gradients on every rank (the descriptor's 'needs grad' agrees)
    mine = {name: t[:, start:start + n].clone().requires_grad_() for name, t in x.items()}
    my_init = init.clone().requires_grad_(rank == 0)
    failures = []
    try:
        o_cp, _ = _scan(mine, my_init, False, dist.group.WORLD)
        (o_cp * w_o[:, start:start + n]).sum().backward()
        g = my_init.grad.clone() if my_init.grad is not None else torch.zeros_like(init)
        dist.all_reduce(g)
        failures.append(f"rank {rank}: nothing raised; dinitial_state summed over the ranks has relative error "
                        f"{max_rel_err(g, ref_init.grad):.2e} against the single process")
    except ValueError as exc:
        if "initial_state needs grad" not in str(exc):
            failures.append(f"rank {rank}: ValueError without 'initial_state needs grad': {exc}")
    # packed sequences (two, the first crossing the ranks): the same check
    packed = {name: t.clone().requires_grad_() for name, t in mine.items()}
    s0 = torch.cat([init, init]).requires_grad_(rank == 0)
    failures += expect_raises(ValueError, "initial_state needs grad", lambda: gate_loop_heads_cp(
        **packed, initial_state=s0, cu_seqlens=torch.tensor([0, 5, 7]), cp_group=dist.group.WORLD))
    failures += _check_case(dist.group.WORLD, rank, world, seed + 1, [3, 4], 1, 1, torch.float64, "z", True, False)
    raise_failures(failures)


def test_cp_initial_state_requires_grad_on_some_ranks_raises(_seed):
    spawn(_init_grad_worker, 2, _seed)


@pytest.mark.gpu
def test_cp_nccl_matches_single_process(_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_nccl_worker, 2, "cuda", _seed)


def _no_sync_worker(rank, world, device_kind, seed):
    """Warmed up (compilation, autotuning), forward + backward with check_shapes=False synchronizes nothing
    with the host; with the check it does (so the detector works)."""
    torch.cuda.manual_seed(seed)
    B, n, H, d = 2, 96, 4, 64
    x = [torch.randn(B, n, H, d, device="cuda", requires_grad=True) for _ in range(3)]
    z = torch.randn(B, n, H, 2, device="cuda", requires_grad=True)

    def step(check):
        o, _ = gate_loop_heads_cp(*x, z=z, check_shapes=check, cp_group=dist.group.WORLD)
        o.sum().backward()

    step(True)
    step(False)
    raise_failures(host_sync_failures(rank, lambda: step(False), "check_shapes=False", lambda: step(True)))


@pytest.mark.gpu
def test_cp_nccl_unchecked_does_not_synchronize(_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_no_sync_worker, 2, "cuda", _seed)
