"""Context parallelism on packed sequences (``cu_seqlens`` with ``cp_group``) against the single-process packed call.

Every rank builds the whole packed row from one seed and passes its contiguous slice with the GLOBAL
``cu_seqlens``; its slice of the outputs, the per-sequence final states and every gradient (q, k, v, the gate;
the per-sequence initial states summed over the group, a replicated input) must equal those of
``gate_loop_heads`` / ``gate_loop_operator`` on the whole row. Rank ``r``'s loss is its local loss (its outputs
plus its own weighting of the final states), the reference loss their sum.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gateloop_kernels import gate_loop_heads, gate_loop_operator
from gateloop_kernels.context_parallel import DESCRIPTOR_LEN, context_parallel_bytes

from helpers.distributed import expect_raises, max_rel_err, raise_failures, spawn

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
                check_shapes=True) -> list[str]:
    T, N, H = sum(slices), len(seqs), 2
    assert sum(seqs) == T
    cu = torch.tensor([0, *torch.tensor(seqs).cumsum(0).tolist()], dtype=torch.int32)
    x, init, w_o, w_f = _inputs(seed, T, N, H, d, e, dtype, form, world)
    start, n = sum(slices[:rank]), slices[rank]

    ref = {name: t.clone().requires_grad_() for name, t in x.items()}
    ref_init = init.clone().requires_grad_() if with_init else None
    o, f = _scan(ref, ref_init, cu, True)
    loss = (o * w_o).sum()
    if with_final:
        loss = loss + sum((f * w.conj()).real.sum() for w in w_f)
    loss.backward()

    mine = {name: t[:, start:start + n].clone().requires_grad_() for name, t in x.items()}
    my_init = init.clone().requires_grad_() if with_init else None
    o_cp, f_cp = _scan(mine, my_init, cu, with_final, group, check_shapes)
    loss_cp = (o_cp * w_o[:, start:start + n]).sum()
    if with_final:
        loss_cp = loss_cp + (f_cp * w_f[rank].conj()).real.sum()
    loss_cp.backward()

    checks = [("o", o_cp, o[:, start:start + n])]
    if with_final:
        checks.append(("final_state", f_cp, f))
    elif f_cp is not None:
        return ["final_state returned without output_final_state"]
    for name in x:
        checks.append((f"d{name}", mine[name].grad, ref[name].grad[:, start:start + n]))
    if with_init:
        # a rank whose slice starts no sequence (and returns no final states) does not use it
        gi = torch.zeros_like(init) if my_init.grad is None else my_init.grad.clone()
        dist.all_reduce(gi, group=group)
        checks.append(("dinitial_state (summed over ranks)", gi, ref_init.grad))
    case = (f"slices={slices} seqs={seqs} d={d} e={e} {dtype} gate={form} init={with_init} final={with_final} "
            f"check_shapes={check_shapes}")
    out = []
    for name, got, want in checks:
        if got is None:
            out.append(f"{case}: rank {rank} {name} is None")
            continue
        err = max_rel_err(got, want)
        if not err <= TOL[dtype]:
            out.append(f"{case}: rank {rank} {name} relative error {err:.2e} > {TOL[dtype]:.0e}")
    return out


# (slices, sequences): crossing 0, 1 and 2 rank boundaries, a boundary at a slice start, empty sequences
# (first, middle, last, at a slice boundary), an empty slice (middle, first), a slice inside one sequence
CASES = {
    2: [([6, 9], [4, 7, 0, 4]), ([6, 9], [6, 0, 9]), ([0, 10], [3, 7, 0])],
    3: [([5, 0, 7], [2, 8, 2]), ([4, 4, 4], [3, 6, 3]), ([5, 3, 4], [0, 5, 0, 3, 4, 0]), ([3, 6, 0], [9])],
}


def _worker(rank, world, seed):
    failures = []
    group = dist.group.WORLD
    for i, (slices, seqs) in enumerate(CASES[world]):
        for j, (d, e) in enumerate(((1, 1), (16, 16))):
            dtype = (torch.float64, torch.float32)[(i + j) % 2]
            form = ("z", "log_polar")[i % 2]
            failures += _check_case(group, rank, world, seed + 10 * i + j, slices, seqs, d, e, dtype, form,
                                    True, True)
        # without initial / final states, the operator, check_shapes=False
        failures += _check_case(group, rank, world, seed + 10 * i + 5, slices, seqs, 16, 8, torch.float64, "z",
                                i % 2 == 0, i % 2 == 1, check_shapes=i % 2 == 1)
        failures += _check_case(group, rank, world, seed + 10 * i + 6, slices, seqs, 1 + 15 * (i % 2), 1 + 15 * (i % 2),
                                torch.float64, "operator", True, i % 2 == 0, check_shapes=i % 2 == 0)
    raise_failures(failures)


def test_cp_varlen_matches_single_process(_seed):
    """2 and 3 ranks: packed sequences with global cu_seqlens, crossing 0, 1 and 2 rank boundaries, a boundary at a
    slice start, empty sequences and slices; outputs, per-sequence final states and every gradient equal the
    single-process packed call (float64 1e-12, float32 1e-5), head dims 1 and 16, gate_loop_heads (both gate
    forms) and gate_loop_operator, with and without initial / final states and the shape check."""
    spawn(_worker, 2, _seed)
    spawn(_worker, 3, _seed)
