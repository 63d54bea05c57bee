"""Context parallelism on packed sequences (``cu_seqlens`` with ``cp_group``) against the single-process packed call.

Every rank builds the whole packed row from one seed and passes its contiguous slice with the GLOBAL
``cu_seqlens``; its slice of the outputs, the per-sequence final states and every gradient (q, k, v, the gate;
the per-sequence initial states summed over the group, a replicated input) must equal those of
``gate_loop_heads`` / ``gate_loop_operator`` on the whole row. Rank ``r``'s loss is its local loss (its outputs
plus its own weighting of the final states), the reference loss their sum.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from gateloop_kernels import Transformer, gate_loop_heads, gate_loop_operator
from gateloop_kernels import context_parallel
from gateloop_kernels.context_parallel import DESCRIPTOR_LEN, context_parallel_bytes

from helpers.distributed import (check_failures, expect_raises, host_sync_failures, max_rel_err, raise_failures,
                                 slice_checks, spawn)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _inputs(seed, T, N, H, d, e, dtype, form, world):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=dt)

    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    if form == "operator":
        x = {"q": rnd(1, T, d), "k": rnd(1, T, d), "v": rnd(1, T, e)}
        x["a"] = torch.polar(0.5 + 0.5 * torch.rand(1, T, 1, 1, generator=g, dtype=dtype), rnd(1, T, 1, 1))
        return x, rnd(N, d, e, dt=cdt), rnd(1, T, e), [rnd(N, d, e, dt=cdt) for _ in range(world)]
    x = {"q": rnd(1, T, H, d), "k": rnd(1, T, H, d), "v": rnd(1, T, H, e)}
    if form == "z":
        x["z"] = 1.5 * rnd(1, T, H, 2)
    else:
        x["log_magnitude"] = -0.3 * rnd(1, T, H).abs()
        x["phase"] = rnd(1, T, H)
    return x, rnd(N, H, d, e, dt=cdt), rnd(1, T, H, e), [rnd(N, H, d, e, dt=cdt) for _ in range(world)]


def _scan(x, init, cu, with_final, group=None, check_shapes=True):
    if "a" in x:
        out = gate_loop_operator(**x, initial_state=init, return_final_state=with_final, cu_seqlens=cu,
                                 cp_group=group, check_shapes=check_shapes)
        return out if with_final else (out, None)
    return gate_loop_heads(**x, initial_state=init, output_final_state=with_final, cu_seqlens=cu, cp_group=group,
                           check_shapes=check_shapes)


def _check_case(group, rank, world, seed, slices, seqs, d, e, dtype, form, with_init, with_final,
                check_shapes=True, final_ranks=None, device="cpu") -> list[str]:
    """One configuration; ``final_ranks``: the ranks whose loss uses the final states (default all)."""
    T, N, H = sum(slices), len(seqs), 2
    assert sum(seqs) == T
    cu = torch.tensor([0, *torch.tensor(seqs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    x, init, w_o, w_f = _inputs(seed, T, N, H, d, e, dtype, form, world)
    x, init, w_o = {name: t.to(device) for name, t in x.items()}, init.to(device), w_o.to(device)
    w_f = [w.to(device) for w in w_f]
    start, n = sum(slices[:rank]), slices[rank]

    ref = {name: t.clone().requires_grad_() for name, t in x.items()}
    ref_init = init.clone().requires_grad_() if with_init else None
    o, f = _scan(ref, ref_init, cu, True)
    loss = (o * w_o).sum()
    final_ranks = range(world) if final_ranks is None else final_ranks
    if with_final:
        loss = loss + sum((f * w_f[r].conj()).real.sum() for r in final_ranks)
    loss.backward()

    mine = {name: t[:, start:start + n].clone().requires_grad_() for name, t in x.items()}
    my_init = init.clone().requires_grad_() if with_init else None
    o_cp, f_cp = _scan(mine, my_init, cu, with_final, group, check_shapes)
    loss_cp = (o_cp * w_o[:, start:start + n]).sum()
    if with_final and rank in final_ranks:
        loss_cp = loss_cp + (f_cp * w_f[rank].conj()).real.sum()
    loss_cp.backward()

    if not with_final and f_cp is not None:
        return ["final_state returned without output_final_state"]
    checks = slice_checks(o_cp, o, f_cp, f, with_final, mine, ref, start, n)
    if with_init:
        # a rank whose slice starts no sequence (and returns no final states) does not use it
        gi = torch.zeros_like(init) if my_init.grad is None else my_init.grad.clone()
        dist.all_reduce(gi, group=group)
        checks.append(("dinitial_state (summed over ranks)", gi, ref_init.grad))
    case = (f"slices={slices} seqs={seqs} d={d} e={e} {dtype} gate={form} init={with_init} final={with_final} "
            f"check_shapes={check_shapes} final used on {list(final_ranks)}")
    return check_failures(case, rank, checks, TOL[dtype])


# (slices, sequences): crossing 0, 1 and 2 rank boundaries, a boundary at a slice start, empty sequences
# (first, middle, last, at a slice boundary), an empty slice (middle, first), a slice inside one sequence
CASES = {
    2: [([6, 9], [4, 7, 0, 4]), ([6, 9], [6, 0, 9]), ([0, 10], [3, 7, 0])],
    3: [([5, 0, 7], [2, 8, 2]), ([4, 4, 4], [3, 6, 3]), ([5, 3, 4], [0, 5, 0, 3, 4, 0]), ([3, 6, 0], [9])],
}


def _worker(rank, world, seed):
    """3 ranks: the 3-rank cases on the whole group, then the 2-rank cases on ranks [0, 1] (one spawn for both)."""
    failures = []
    pair = dist.new_group([0, 1])
    for w, group in ((3, dist.group.WORLD), (2, pair)):
        if rank >= w:
            continue
        for i, (slices, seqs) in enumerate(CASES[w]):
            s = seed + 100 * w + 10 * i
            for j, (d, e) in enumerate(((1, 1), (16, 16))):
                dtype = (torch.float64, torch.float32)[(i + j) % 2]
                form = ("z", "log_polar")[i % 2]
                failures += _check_case(group, rank, w, s + j, slices, seqs, d, e, dtype, form, True, True)
            # without initial / final states, the operator, check_shapes=False
            failures += _check_case(group, rank, w, s + 5, slices, seqs, 16, 8, torch.float64, "z",
                                    i % 2 == 0, i % 2 == 1, check_shapes=i % 2 == 1)
            failures += _check_case(group, rank, w, s + 6, slices, seqs, 1 + 15 * (i % 2), 1 + 15 * (i % 2),
                                    torch.float64, "operator", True, i % 2 == 0, check_shapes=i % 2 == 0)
    raise_failures(failures)


def _errors_worker(rank, world, seed):
    """Bad packed input raises on every rank, the final states used on one rank only, bytes per call."""
    group = dist.group.WORLD
    failures = []

    def call(n=4, cu=(0, 3, 8), d=1, final=True, check=True, grad=True):
        x = [torch.randn(1, n, 2, d, requires_grad=grad) for _ in range(3)]
        o, f = gate_loop_heads(*x, z=torch.randn(1, n, 2, 2), output_final_state=final, cp_group=group,
                               cu_seqlens=torch.tensor(cu), check_shapes=check)
        return o, f, x

    failures += expect_raises(ValueError, "sequences N", lambda: call(cu=(0, 8) if rank else (0, 3, 8)))
    failures += expect_raises(ValueError, "final states", lambda: call(final=rank == 0))
    # cu_seqlens ending elsewhere on one rank: every rank raises (was: that rank alone, the others waited in the
    # states' all-gather until the group's timeout)
    failures += expect_raises(ValueError, "cu_seqlens[-1]", lambda: call(cu=(0, 3, 9) if rank else (0, 3, 8)))
    for check in (True, False):  # the same cu_seqlens on every rank: the same error everywhere
        failures += expect_raises(ValueError, "T = 8", lambda: call(cu=(0, 3, 9), check=check))
    failures += expect_raises(ValueError, "B must be 1", lambda: gate_loop_heads(
        *(torch.randn(2, 4, 2, 1) for _ in range(3)), z=torch.randn(2, 4, 2, 2), cp_group=group,
        cu_seqlens=torch.tensor([0, 8])))
    if rank == 1:
        failures += expect_raises(ValueError, "initial_state", lambda: gate_loop_heads(
            *(torch.randn(1, 4, 2, 1) for _ in range(3)), z=torch.randn(1, 4, 2, 2), cp_group=group,
            initial_state=torch.zeros(3, 2, 1, 1, dtype=torch.complex64), cu_seqlens=torch.tensor([0, 8])))
    else:
        failures += expect_raises(RuntimeError, "rank(s) [1]", lambda: gate_loop_heads(
            *(torch.randn(1, 4, 2, 1) for _ in range(3)), z=torch.randn(1, 4, 2, 2), cp_group=group,
            initial_state=torch.zeros(1, 2, 1, 1, dtype=torch.complex64), cu_seqlens=torch.tensor([0, 8])))
    # the final states in one rank's loss only: that rank's backward still meets the others'
    for final_ranks in ([1], [0]):
        failures += _check_case(group, rank, world, seed, [5, 6], [3, 4, 4], 16, 16, torch.float64, "z", True, True,
                                final_ranks=final_ranks)
    failures += _check_case(group, rank, world, seed, [5, 6], [3, 4, 4], 16, 16, torch.float64, "z", True, True)

    # bytes: every collective's buffer, for two slice lengths, with and without the check
    sent = []
    names = ("all_gather_single", "reduce_scatter_single", "all_reduce")
    real = {name: getattr(dist, name) for name in names}

    def recorder(name):
        def wrapped(*args, **kwargs):
            buf = args[0] if name in ("all_gather_single", "all_reduce") else args[1]
            sent.append((name, buf.numel() * buf.element_size()))
            return real[name](*args, **kwargs)
        return wrapped

    d, N = 16, 3
    for check in (True, False):
        counts = []
        for n in (3, 40):
            sent.clear()
            for name in names:
                setattr(dist, name, recorder(name))
            try:
                o, f, x = call(n=n, cu=(0, 1, n, 2 * n), d=d, check=check)
                (o.sum() + f.real.sum()).backward()
            finally:
                for name, fn in real.items():
                    setattr(dist, name, fn)
            counts.append(list(sent))
        want = context_parallel_bytes(1, 2, d, d, world, check_shapes=check, sequences=N, final_states=True)
        expected = [("all_gather_single", want["descriptor"] or want["lengths"]),
                    ("all_gather_single", want["forward"]), ("all_reduce", want["final_states"]),
                    ("all_reduce", want["final_states"]), ("reduce_scatter_single", want["backward"])]
        if counts[0] != expected or counts[1] != expected:
            failures.append(f"check_shapes={check}: bytes exchanged {counts} (slice lengths 3, 40), expected "
                            f"{expected} each")
        if want["final_states"] != N * 2 * 2 * d * d * 4 or want["lengths"] != (0 if check else world * 8) \
                or want["descriptor"] != (world * 8 * DESCRIPTOR_LEN if check else 0):
            failures.append(f"context_parallel_bytes {want} disagrees with its formula")
    raise_failures(failures)


def _inner_cu_worker(rank, world):
    group = dist.group.WORLD
    what = "disagree on cu_seqlens (an int64 weighted sum"
    failures = []
    for cu, check in (((0, 3, 8), (0, 4, 8)), ((0, 2, 3, 5, 8), (0, 2, 4, 5, 8)), ((0, 2, 3, 5, 8), (0, 1, 4, 5, 8))):
        # the same N and T, other inner boundaries on rank 1: heads (int64) and operator (int32) alike
        mine = torch.tensor(check if rank else cu)
        failures += expect_raises(ValueError, what, lambda: gate_loop_heads(
            *(torch.randn(1, 4, 2, 1) for _ in range(3)), z=torch.randn(1, 4, 2, 2), cp_group=group, cu_seqlens=mine))
        failures += expect_raises(ValueError, what, lambda: gate_loop_operator(
            *(torch.randn(1, 4, 1) for _ in range(3)), torch.rand(1, 4, 1, 1), cp_group=group, cu_seqlens=mine.int()))
    # the same values as int32 on one rank and int64 on the other agree
    o = gate_loop_operator(*(torch.randn(1, 4, 1) for _ in range(3)), torch.rand(1, 4, 1, 1), cp_group=group,
                           cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32 if rank else torch.int64))
    if o.shape != (1, 4, 1):
        failures.append(f"rank {rank}: output of shape {tuple(o.shape)}")
    raise_failures(failures)


def test_cp_varlen_inner_cu_seqlens_mismatch_raises_everywhere():
    """Found by a new user's probe: ranks passing cu_seqlens of the same N and T but other inner boundaries got
    silently wrong results (the descriptor compared N and cu_seqlens[-1] only); a fingerprint of every entry, in the
    same descriptor, now raises a ValueError on every rank."""
    spawn(_inner_cu_worker, 2)


def test_cu_seqlens_fingerprint_is_exact():
    """The fingerprint is exact in int64 where a plain weighted sum would overflow (entries near 2^31, many of them),
    the same for int32 and int64 boundaries, and tells apart tensors that differ in one entry by 1."""
    cu = torch.arange(0, 2 ** 31 - 2 ** 20, 2 ** 11, dtype=torch.int64)  # 2^20 entries near int32's end
    p, want = 2 ** 31 - 1, 0
    for i, c in enumerate(cu.tolist(), 1):
        want += c % p * (i * 2654435761 % p) % p
    assert context_parallel._fingerprint(cu).item() == want
    assert context_parallel._fingerprint(cu.int()).item() == want
    for j in (1, 1000, cu.numel() - 2):
        other = cu.clone()
        other[j] += 1
        assert context_parallel._fingerprint(other).item() != want


def _model_worker(rank, world, seed):
    """The packed Transformer's loss (the same on every rank) and its parameter gradients averaged over the group
    against the single-process packed model: 3 ranks (an empty slice) reversible with head dim 1, then ranks
    [0, 1] residual with head dim 16."""
    pair = dist.new_group([0, 1])
    seqs = [5, 6, 0, 5]
    cu = torch.tensor([0, *torch.tensor(seqs).cumsum(0).tolist()])
    failures = []
    for i, (group, w, slices, heads, reversible) in enumerate(((dist.group.WORLD, 3, [7, 0, 9], 1, True),
                                                                (pair, 2, [7, 9], None, False))):
        if rank >= w:
            continue
        T, start, n = sum(slices), sum(slices[:rank]), slices[rank]
        torch.manual_seed(seed + i)
        model = Transformer(16, num_tokens=32, depth=2, gate_loop_heads=heads, reversible=reversible).double()
        tokens = torch.randint(0, 32, (1, T))
        ref_loss = model(tokens, return_loss=True, cu_seqlens=cu)
        ref_loss.backward()
        labels = torch.full_like(tokens, -100)  # the next token in the same document
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            labels[0, a:b - 1] = tokens[0, a + 1:b]
        cp_model = copy.deepcopy(model)
        cp_model.zero_grad(set_to_none=True)
        checks = []
        exchange = context_parallel._exchange_descriptors
        context_parallel._exchange_descriptors = lambda *a: checks.append(1) or exchange(*a)
        try:
            loss = cp_model(tokens[:, start:start + n], return_loss=True, labels=labels[:, start:start + n],
                            cp_group=group, cu_seqlens=cu)
            forward_checks = len(checks)
            loss.backward()
        finally:
            context_parallel._exchange_descriptors = exchange
        case = f"slices={slices} seqs={seqs} gate_loop_heads={heads} reversible={reversible}"
        if forward_checks != 1:
            failures.append(f"{case}: {forward_checks} descriptor exchanges in forward")
        err = max_rel_err(loss.detach(), ref_loss.detach())
        if not err <= 1e-12:
            failures.append(f"{case}: rank {rank} loss relative error {err:.2e}")
        for (name, p), p_ref in zip(cp_model.named_parameters(), model.parameters()):
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g, group=group)
            err = max_rel_err(g / w, p_ref.grad)
            if not err <= 1e-10:
                failures.append(f"{case}: rank {rank} d{name} (averaged over ranks) relative error {err:.2e}")
    raise_failures(failures)


def test_cp_varlen_bad_input_final_on_one_rank_and_bytes(_seed):
    """2 ranks: disagreeing N or output_final_state, cu_seqlens not ending at the group's T, B != 1: a clear error
    on every rank; a bad initial_state on one rank: its ValueError, a RuntimeError elsewhere; the final states
    used by one rank's loss only: still exact, no hang; bytes per call equal context_parallel_bytes for two
    slice lengths, with and without the check."""
    spawn(_errors_worker, 2, _seed)


def test_cp_varlen_transformer(_seed):
    """The packed Transformer's loss under a group equals the single-process packed loss (float64 1e-12) on every
    rank, its parameter gradients averaged over the group the single-process ones (1e-10): 3 ranks (an empty
    slice) reversible with head dim 1, 2 ranks residual with head dim 16; one descriptor check per forward."""
    spawn(_model_worker, 3, _seed)


def _kernel_worker(rank, world, device_kind, seed):
    """The Triton kernels' packed paths under the group: on CUDA (NCCL), or on the CPU through the interpreter."""
    failures = []
    if device_kind == "cpu":
        from gateloop_kernels import dispatch
        from gateloop_kernels.elementwise import op as ew_op

        # the op reads its own module's KERNEL_DEVICES (the package's name was set before: the PyTorch path ran)
        dispatch.KERNEL_DEVICES = ew_op.KERNEL_DEVICES = ("cuda", "cpu")
        device = "cpu"
    else:
        device = f"cuda:{rank}"
    if device_kind == "cpu":
        cases = [([5, 0, 7], [2, 8, 2], 1, 1)]
    elif world == 3:
        cases = [([300, 0, 517], [2, 700, 0, 115], 1, 1), ([64, 64, 200], [63, 1, 200, 64], 64, 64),
                 ([100, 100, 100], [1, 250, 49], 128, 128)]
    else:
        cases = [([300, 517], [2, 700, 0, 115], 1, 1), ([64, 200], [63, 1, 200], 64, 64),
                 ([100, 200], [100, 150, 50], 128, 128), ([0, 90], [30, 60], 16, 16)]
    for i, (slices, seqs, d, e) in enumerate(cases):
        for with_init, with_final in ((True, True), (False, False))[:1 if device_kind == "cpu" else 2]:
            failures += _check_case(dist.group.WORLD, rank, world, seed + i, slices, seqs, d, e, torch.float32, "z",
                                    with_init, with_final, device=device)
    raise_failures(failures)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels on the CPU need TRITON_INTERPRET=1")
def test_cp_varlen_kernels_interpreted(_seed):
    """3 ranks, the Triton kernels (interpreted on the CPU) as each rank's packed scan: float32 1e-5."""
    spawn(_kernel_worker, 3, "cpu", _seed)


@pytest.mark.gpu
def test_cp_varlen_nccl_matches_single_process(_seed):
    """3 ranks over NCCL (2 where only 2 GPUs; skipped with fewer): packed sequences crossing ranks, a boundary at
    a slice start, an empty slice, head dims 1, 16, 64, 128, float32 1e-5."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_kernel_worker, min(torch.cuda.device_count(), 3), "cuda", _seed)


def _no_sync_worker(rank, world, device_kind, seed):
    """Warmed up, a packed forward + backward with check_shapes=False synchronizes nothing with the host."""
    torch.cuda.manual_seed(seed)
    n, H, d = 96, 4, 64
    cu = torch.tensor([0, 50, 50, 150, 2 * n], device="cuda")
    x = [torch.randn(1, n, H, d, device="cuda", requires_grad=True) for _ in range(3)]
    z = torch.randn(1, n, H, 2, device="cuda", requires_grad=True)
    s0 = torch.randn(4, H, d, d, dtype=torch.complex64, device="cuda", requires_grad=True)

    def step(check):
        o, f = gate_loop_heads(*x, z=z, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                               check_shapes=check, cp_group=dist.group.WORLD)
        (o.sum() + f.real.sum()).backward()

    step(True)
    step(False)
    raise_failures(host_sync_failures(rank, lambda: step(False), "packed, check_shapes=False"))


@pytest.mark.gpu
def test_cp_varlen_nccl_unchecked_does_not_synchronize(_seed):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_no_sync_worker, 2, "cuda", _seed)


def test_cp_varlen_matches_single_process(_seed):
    """2 and 3 ranks: packed sequences with global cu_seqlens, crossing 0, 1 and 2 rank boundaries, a boundary at a
    slice start, empty sequences and slices; outputs, per-sequence final states and every gradient equal the
    single-process packed call (float64 1e-12, float32 1e-5), head dims 1 and 16, gate_loop_heads (both gate
    forms) and gate_loop_operator, with and without initial / final states and the shape check."""
    spawn(_worker, 3, _seed)


def _nonfinite_worker(rank, world, seed):
    """A NaN / inf in one packed sequence stays in it across ranks (docs/design.md: nothing crosses a boundary)."""
    group = dist.group.WORLD
    slices = [4, 5, 3]
    start, n = sum(slices[:rank]), slices[rank]
    failures = []
    # (sequences, the bad token, its input, check_shapes, operator): a sequence ending at a slice end, one crossing
    # into the next slice and ending there, a bad gate, and one crossing two boundaries that stays finite
    for i, (seqs, t, name, check, operator) in enumerate((([4, 5, 3], 1, "k", True, False),
                                                          ([5, 7], 0, "k", False, False),
                                                          ([6, 6], 1, "z", True, False),
                                                          ([3, 1, 8], 3, "v", True, True),
                                                          ([6, 6], 2, "a", False, True))):
        T, N, H, d, e = sum(slices), len(seqs), 2, 3, 2
        cu = torch.tensor([0, *torch.tensor(seqs).cumsum(0).tolist()])
        x, init, w_o, w_f = _inputs(seed + i, T, N, H, d, e, torch.float64, "operator" if operator else "z", world)
        x[name][:, t] = float("nan") if i % 2 else float("inf")
        ref = {k: v.clone().requires_grad_() for k, v in x.items()}
        ref_init = init.clone().requires_grad_()
        o, f = _scan(ref, ref_init, cu, True)
        # the finite outputs' and final states' loss: the gradients of the other sequences stay finite
        (o[o.isfinite()] * w_o[o.isfinite()]).sum().backward(retain_graph=True)
        (f[f.isfinite()].real * w_f[0].real[f.isfinite()]).sum().backward()
        mine = {k: v[:, start:start + n].clone().requires_grad_() for k, v in x.items()}
        my_init = init.clone().requires_grad_()
        o_cp, f_cp = _scan(mine, my_init, cu, True, group, check)
        w = w_o[:, start:start + n]
        (o_cp[o_cp.isfinite()] * w[o_cp.isfinite()]).sum().backward(retain_graph=True)
        ((f_cp[f_cp.isfinite()].real * w_f[0].real[f_cp.isfinite()]).sum() / world).backward()
        gi = my_init.grad.clone()
        dist.all_reduce(gi, group=group)
        checks = [("o", o_cp, o[:, start:start + n]), ("final states", f_cp, f), ("dinitial_state", gi, ref_init.grad)]
        checks += [(f"d{k}", mine[k].grad, ref[k].grad[:, start:start + n]) for k in x]
        case = f"seqs={seqs} non-finite {name}[{t}] check_shapes={check}"
        for what, got, want in checks:
            if not torch.equal(got.isfinite(), want.isfinite()):
                failures.append(f"{case}: rank {rank} {what}: {int((~got.isfinite()).sum())} non-finite entries, "
                                f"single process {int((~want.isfinite()).sum())}")
        finite = [(what, *(torch.where(t.isfinite(), t, 0).detach() for t in (got, want)))
                  for what, got, want in checks]
        failures += check_failures(case, rank, finite, 1e-12)
    raise_failures(failures)


def test_cp_varlen_nonfinite_stays_in_its_sequence(_seed):
    """3 ranks, packed: an inf / NaN in one sequence (k, v, the gate; heads and operator) leaves every other sequence's
    outputs, final states and gradients equal to the single-process packed call's, also where the bad sequence
    ends at a slice end or crosses into the next slice (0 * NaN carried it through the fold and the correction:
    every later sequence on every later rank was NaN)."""
    spawn(_nonfinite_worker, 3, _seed)
