"""The Transformer on a sequence split across ranks (``cp_group=``) against the single-process model.

Every rank builds the same model and tokens from one seed, runs its slice of the tokens with its
labels under the group, and compares the loss (the same on every rank) with the single-process loss of
the whole sequence, and its parameter gradients averaged over the group (as DDP and FSDP2 reduce them)
with the single-process ones.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from gateloop_kernels import Transformer

from gateloop_kernels import context_parallel

from helpers.distributed import expect_raises, max_rel_err, raise_failures, spawn


def _model_worker(rank, world, seed):
    group = dist.group.WORLD
    lengths = [7, 10]
    B, T = 2, sum(lengths)
    start, n = sum(lengths[:rank]), lengths[rank]
    failures = []
    for i, (heads, reversible) in enumerate(((None, False), (1, False), (None, True), (1, True))):
        torch.manual_seed(seed + i)
        model = Transformer(16, num_tokens=32, depth=2, gate_loop_heads=heads, reversible=reversible).double()
        tokens = torch.randint(0, 32, (B, T + 1))
        ref_loss = model(tokens, return_loss=True)
        ref_loss.backward()
        cp_model = copy.deepcopy(model)
        cp_model.zero_grad(set_to_none=True)
        x, labels = tokens[:, :-1][:, start:start + n], tokens[:, 1:][:, start:start + n]
        checks = []
        exchange = context_parallel._exchange_descriptors
        context_parallel._exchange_descriptors = lambda *a: checks.append(1) or exchange(*a)
        try:
            loss = cp_model(x, return_loss=True, labels=labels, cp_group=group)
            forward_checks = len(checks)
            loss.backward()
        finally:
            context_parallel._exchange_descriptors = exchange
        case = f"lengths={lengths} gate_loop_heads={heads} reversible={reversible}"
        # the first layer checks the ranks agree (again when reversible's backward recomputes it), no other
        if (forward_checks, len(checks)) != (1, 1 + reversible):
            failures.append(f"{case}: {forward_checks} descriptor exchanges in forward, {len(checks)} in all")
        err = max_rel_err(loss.detach(), ref_loss.detach())
        if not err <= 1e-12:
            failures.append(f"{case}: rank {rank} loss relative error {err:.2e}")
        for (name, p), p_ref in zip(cp_model.named_parameters(), model.parameters()):
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g, group=group)  # DDP and FSDP2 over the context dimension average these
            err = max_rel_err(g / world, p_ref.grad)
            if not err <= 1e-10:
                failures.append(f"{case}: rank {rank} d{name} (averaged over ranks) relative error {err:.2e}")
    # labels of -100 (no target, cross_entropy's ignore_index) count for nothing under the group too (the mean was
    # over every label: found by a new user's probe)
    torch.manual_seed(seed + 9)
    model = Transformer(16, num_tokens=32, depth=2, gate_loop_heads=1).double()
    tokens = torch.randint(0, 32, (B, T + 1))
    labels = tokens[:, 1:].clone()
    labels[:, -1], labels[0, 2], labels[1, lengths[0]] = -100, -100, -100  # the last, one inside, one at rank 1's start
    ref_loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), labels)
    ref_loss.backward()
    cp_model = copy.deepcopy(model)
    cp_model.zero_grad(set_to_none=True)
    loss = cp_model(tokens[:, :-1][:, start:start + n], return_loss=True, labels=labels[:, start:start + n],
                    cp_group=group)
    loss.backward()
    if not max_rel_err(loss.detach(), ref_loss.detach()) <= 1e-12:
        failures.append(f"labels with -100: rank {rank} loss {loss.item()} vs {ref_loss.item()}")
    for (name, p), p_ref in zip(cp_model.named_parameters(), model.parameters()):
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(g, group=group)
        if not max_rel_err(g / world, p_ref.grad) <= 1e-10:
            failures.append(f"labels with -100: rank {rank} d{name} (averaged over ranks) off")
    # ranks disagreeing on the batch or the dtype: the first layer's check raises on every rank
    failures += expect_raises(ValueError, "batch B", lambda: model(x[:1 + rank], cp_group=group))
    failures += expect_raises(ValueError, "q dtype: ['float64', 'float32']",
                              lambda: (model.float() if rank else model)(x, cp_group=group))
    softmax = Transformer(16, num_tokens=32, depth=1, use_gate_looped_attn=False).double()
    try:
        softmax(torch.randint(0, 32, (B, n)), cp_group=group)
        failures.append(f"rank {rank}: softmax attention under cp_group raised nothing")
    except ValueError as exc:
        if "cp_group" not in str(exc):
            failures.append(f"rank {rank}: softmax attention's error does not name cp_group: {exc}")
    raise_failures(failures)


def test_cp_transformer_matches_single_process(_seed):
    """2 ranks: the loss (float64, 1e-12) on every rank and the parameter gradients averaged over the
    group (1e-10) equal the single-process model's, residual and reversible, head dims 1 and 16, with one
    descriptor check per forward (the first layer's); ranks disagreeing on the batch or dtype raise on
    every rank; softmax attention under a group raises."""
    spawn(_model_worker, 2, _seed)


def _local_errors_worker(rank, world, seed):
    group = dist.group.WORLD
    torch.manual_seed(seed)
    x = torch.randint(0, 32, (1, 6))
    cu = torch.tensor([0, 4, 12])
    failures = []
    # (the failing rank, reversible, packed, its call, its error, a fragment of it)
    for i, (bad, reversible, packed, call, exc_type, fragment) in enumerate((
            (0, False, False, lambda m: m(x, labels=x[:, :-1], return_loss=True, cp_group=group), ValueError, "labels"),
            (1, False, False, lambda m: m(x[None], labels=x, return_loss=True, cp_group=group), ValueError, "x must"),
            (0, True, False, lambda m: m(x, labels=x.float(), return_loss=True, cp_group=group), TypeError, "labels"),
            (1, False, True, lambda m: m(x, labels=x[:, 1:], return_loss=True, cp_group=group, cu_seqlens=cu),
             ValueError, "labels"),
            (0, False, False, lambda m: m(x, return_cache=True, cp_group=group), ValueError, "cache"),
            (1, False, False, lambda m: m(x + 32, cp_group=group), IndexError, "index out of range"))):
        model = Transformer(16, num_tokens=32, depth=2, gate_loop_heads=1, reversible=reversible).double()
        kw = dict(cu_seqlens=cu) if packed else {}
        if rank == bad:
            failures += [f"case {i}: {f}" for f in expect_raises(exc_type, fragment, lambda: call(model))]
        else:
            failures += [f"case {i}: {f}" for f in expect_raises(
                RuntimeError, f"rank(s) [{bad}]", lambda: model(x, labels=x, return_loss=True, cp_group=group, **kw))]
        # the ranks are still in step: a valid call next runs through on both
        loss = model(x, labels=x, return_loss=True, cp_group=group, **kw)
        if not torch.isfinite(loss):
            failures.append(f"case {i}: rank {rank} loss after the error {loss}")
    raise_failures(failures)


def test_cp_transformer_local_input_error_raises_everywhere(_seed):
    """Found by a new user's probe: a rank whose Transformer arguments failed the model's own checks (labels or x of
    the wrong shape, float labels, a cache under cp_group, token ids outside the vocabulary) raised alone while the
    other ranks waited in the first layer's descriptor exchange until the group's timeout; now that rank raises its
    error and the others a RuntimeError naming it, residual, reversible and packed, and the next call runs."""
    spawn(_local_errors_worker, 2, _seed)


def _layer_errors_worker(rank, world, seed):
    from gateloop_kernels import GateLoopedAttention

    group = dist.group.WORLD
    torch.manual_seed(seed)
    layer = GateLoopedAttention(16, heads=1).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    failures = []
    for i, (bad, call, exc_type, fragment) in enumerate((
            (0, lambda: layer(x[..., :8], cp_group=group), ValueError, "x must"),
            (1, lambda: layer(x.float(), cp_group=group), RuntimeError, "dtype"),
            (0, lambda: layer(x, return_cache=True, cp_group=group), ValueError, "cache"))):
        if rank == bad:
            failures += [f"case {i}: {f}" for f in expect_raises(exc_type, fragment, call)]
        else:
            failures += [f"case {i}: {f}" for f in expect_raises(RuntimeError, f"rank(s) [{bad}]",
                                                                   lambda: layer(x, cp_group=group))]
        out = layer(x, cp_group=group)  # the ranks are still in step
        if not torch.isfinite(out).all():
            failures.append(f"case {i}: rank {rank} output after the error is not finite")
    raise_failures(failures)


def test_cp_layer_local_input_error_raises_everywhere(_seed):
    """GateLoopedAttention called directly under cp_group: a rank whose input fails the layer's own checks (x's
    width, a dtype the projections refuse, a cache) raised alone while the other ranks waited in the descriptor
    exchange until the group's timeout; now the others raise a RuntimeError naming it, and the next call runs."""
    spawn(_layer_errors_worker, 2, _seed)


def _step_worker(rank, world, device_kind, seed, amps):
    """A training step's loss and averaged parameter gradients under ``cp_group`` (one device per rank; NCCL on
    GPUs) against the same step in one process on the same device: float32 (the scan's exact mode) and, in
    ``amps``, bf16 autocast; head dims 1 and 16, residual and reversible."""
    import itertools

    group = dist.group.WORLD
    dev = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    B, T = 2, 192
    n = T // world
    start = rank * n
    failures = []
    for i, (heads, reversible, amp) in enumerate(itertools.product((None, 4), (False, True), amps)):
        torch.manual_seed(seed + i)
        model = Transformer(64, num_tokens=64, depth=2, gate_loop_heads=heads, reversible=reversible).to(dev)
        tokens = torch.randint(0, 64, (B, T + 1)).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            ref_loss = model(tokens, return_loss=True)
        ref_loss.backward()
        cp_model = copy.deepcopy(model)
        cp_model.zero_grad(set_to_none=True)
        x, labels = tokens[:, :-1][:, start:start + n], tokens[:, 1:][:, start:start + n]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = cp_model(x, return_loss=True, labels=labels, cp_group=group)
        loss.backward()
        # float32: the 1e-5 (summation order only). bf16 "within its noise": at most twice the one-device
        # bf16 step's own distance from the float32 step, per quantity (and 1e-3 where that is tiny)
        noise = _float32_distances(model, tokens, ref_loss) if amp else None
        case = f"{device_kind} gate_loop_heads={heads} reversible={reversible} bf16={amp}"
        tol = 1e-5 if not amp else max(2 * noise["loss"], 1e-3)
        err = max_rel_err(loss.detach().float(), ref_loss.detach().float())
        if not err <= tol:
            failures.append(f"{case}: rank {rank} loss relative error {err:.2e} > {tol:.2e}")
        for (name, p), p_ref in zip(cp_model.named_parameters(), model.parameters()):
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g, group=group)
            err = max_rel_err(g / world, p_ref.grad)
            tol = 1e-5 if not amp else max(2 * noise[name], 1e-3)
            if not err <= tol:
                failures.append(f"{case}: rank {rank} d{name} (averaged over ranks) relative error {err:.2e} > "
                                f"{tol:.2e}")
    raise_failures(failures)


def _float32_distances(model, tokens, loss16) -> dict:
    """How far the one-device bf16-autocast step (its loss ``loss16`` and ``model``'s gradients, already
    computed) is from the float32 step of the same model and tokens: the loss's and each parameter gradient's
    relative error."""
    fp32 = copy.deepcopy(model)
    fp32.zero_grad(set_to_none=True)
    loss32 = fp32(tokens, return_loss=True)
    loss32.backward()
    out = {"loss": max_rel_err(loss16.detach().float(), loss32.detach())}
    for (name, p), p32 in zip(model.named_parameters(), fp32.parameters()):
        out[name] = max_rel_err(p.grad.float(), p32.grad) if p32.grad is not None else 0.0
    return out


@pytest.mark.gpu
def test_cp_transformer_step_nccl_matches_one_gpu(_seed):
    """2 GPUs, NCCL: the context-parallel training step equals the one-GPU step (float32 exact scan 1e-5; bf16
    autocast within twice the one-GPU bf16 step's distance from float32), head dims 1 and 16, residual and
    reversible."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    spawn(_step_worker, 2, "cuda", _seed, (False, True))
