"""Context parallelism: one sequence split along time across the ranks of a ``torch.distributed`` group.

Rank ``r`` of ``cp_group`` (``W`` ranks) holds the contiguous slice ``r`` of the time axis (slices may
differ in length and may be empty) and gets its slice of the outputs of the scan
``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t`` with one complex gate per step and head:
:func:`gate_loop_heads_cp` (the contract of :func:`gateloop_kernels.gate_loop_heads`) and
:func:`gate_loop_operator_cp` (that of :func:`gateloop_kernels.gate_loop_operator`, ``a: (B, n, 1, 1)``).

The math. Within slice ``r`` write ``c_t = prod_{s <= t} a_s`` (the cumulative gate from the slice
start), ``A_r`` the slice's total gate product (``c`` at its last step; 1 for an empty slice),
``S_r`` the slice's final state scanned from a zero state and ``o^loc_t`` its outputs. With
``S^in_r`` the true state entering slice ``r``, linearity of the recurrence gives

    S_t = c_t S^in_r + S^loc_t,    o_t = o^loc_t + Re(c_t S^in_r)^T q_t
        = o^loc_t + Re(c_t) (Re(S^in_r)^T q_t) - Im(c_t) (Im(S^in_r)^T q_t),
    S^in_0 = initial_state (or 0),   S^in_{j+1} = A_j S^in_j + S_j,   global final state = S^in_W.

The steps, on every rank:

1. the local scan from a zero state, the public ``gate_loop_heads`` / ``gate_loop_operator`` with the
   final state (the Triton kernels on CUDA, the PyTorch path elsewhere), gives ``o^loc`` and ``S_r``
   (an empty slice takes the closed forms ``o^loc = []``, ``S_r = 0``, ``A_r = 1``);
2. ``c_t`` and ``A_r`` come from the same scan run at ``d = e = 1`` on the slice's gate with
   ``k = v = 0`` and initial states ``1`` and ``-i`` (``Re(-i c) = Im c``): products of gates
   forward in time only, never a division by a gate, so gates of 0 are exact and a product of many
   ``|a| < 1`` underflows to its correct value 0; its backward is the scan's own reverse scan;
3. with ``check_shapes=True`` (the default), a small int64 descriptor (batch, heads, head dims,
   dtypes, whether an initial state is given, whether it requires gradients and an int64 fingerprint of its bits
   (written on the device), whether the exchange needs gradients, whether the local
   step failed; packed: ``N``, whether final states are wanted, ``cu_seqlens[-1]`` and an int64 fingerprint of
   the whole ``cu_seqlens``, both written on the device; the slice length, exchanged only) is
   all-gathered and compared, so that a mismatch raises the same error on every rank
   instead of a hang;
4. ``(A_r, S_r)``, packed into one real buffer of ``P = B H (2 + 2 d e)`` elements, is all-gathered
   once (:class:`_GatherStates`: ``all_gather_single`` forward, ``reduce_scatter_single`` (sum)
   backward);
5. every rank folds all ``W`` slices in float32 (float64 for float64 inputs), corrects its outputs
   with ``S^in_r`` (:class:`_Correct`: one einsum, recomputed in backward rather than saved) and
   returns ``S^in_W`` as the final state.

Gradients flow by autograd through all of it. The collective's backward sums, over the ranks, the
gradient each rank's loss puts on slice ``r``'s ``(A_r, S_r)`` and hands it to rank ``r``: so with
each rank's loss being its local loss, the gradients of the sharded inputs (``q, k, v``, the gate) are
those of the summed loss, and the gradients of replicated tensors (parameters, ``initial_state``)
summed over the group equal the single-process ones. DDP and FSDP2 *average* gradients over their
ranks: :func:`context_parallel_mean` (the model's loss) therefore hands each rank ``W`` times its share,
so that their average over a mesh holding the context dimension is the single-process gradient.

Bytes exchanged per call and rank (:func:`context_parallel_bytes`), with ``s`` the itemsize of the
float32 (float64) fold: forward ``W * 8 * DESCRIPTOR_LEN`` (the descriptor, when checked) plus
``W * B * H * (2 + 2 d e) * s`` (the gathered states), backward a reduce-scatter of the same
``W * B * H * (2 + 2 d e) * s``: independent of the slice length. Each rank's time is that of its own
slice's scan plus two collectives of that size and a fold of ``W`` states, so with slices of ``T / W``
tokens the predicted per-step time is ``t_scan(T / W) + t_collective(W, P) + O(W B H d e)``.

Limits: every rank must pass the same ``B, H, d, e`` and dtypes, give an initial state or not alike
(each rank's own copy is read, so pass the same value on every rank, as a replicated tensor; compared
through a fingerprint of its bits with ``check_shapes``, as is its ``requires_grad``: each copy gets only its
rank's share of the gradient), and run
backward whenever one rank does (as with DDP): the outputs of every rank depend on the gathered buffer,
so every rank's backward joins the reduce-scatter. The descriptor check costs one small all-gather and
one host synchronization per call; ``check_shapes=False`` skips it where the ranks' agreement is already
established (the ``Transformer`` checks in its first layer only). Half-precision outputs are rounded
twice (the local scan's output, then the corrected one). Not yet: gates per key dim, torch.compile (the
collectives run eagerly).

Packed sequences (``cu_seqlens``, the group's global boundaries ``[0, ..., T]``, the same tensor on every
rank, ``B = 1``; :func:`_packed_split`): each rank scans its slice packed, with the boundaries clipped to it,
from zero states (the initial states of the sequences that start on it). Only its first segment can continue
a sequence from an earlier rank; the exchange carries, per rank, ``(A_r, S_r)`` of its *last* segment, with
``A_r`` its gate product when that segment continues an earlier sequence and 0 when it starts on the rank
(an empty slice: ``(1, 0)``), so the same fold ``S^in_{j+1} = A_j S^in_j + S_j`` chains through the ranks a
sequence crosses and restarts at boundaries (a selection from flags every rank computes from ``cu_seqlens`` and
the slice lengths, not the product with 0, so a NaN or inf stays in its sequence). The gate-only scan runs
packed from ``1`` / ``-i`` on the first segment (when it continues) and from 0 elsewhere, so ``c_t`` is zero
past the first boundary and the same correction applies, to the first segment's tokens only (a mask). Each
sequence's final state is completed on the rank of its last token (rank 0 for an empty one: its initial state)
and all-reduced (``N H d e`` complex numbers, forward and backward), with
``output_final_state`` only. The slice offsets come from the descriptor (``check_shapes``) or one all-gather
of the ``W`` slice lengths (without it): no other host synchronization.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import (GATE_HEAD, check_chunk_size, check_cu_seqlens, check_gate_dtype, check_gate_loop_inputs,
                      check_heads_inputs, check_initial_state, check_precision, check_same_device, check_varlen_state)
from ._custom_op import first_order
from .dispatch import DEFAULT_CHUNK, scan
from .dtypes import acc_dtypes
from .heads import gate_from_log_polar, gate_from_preactivation, gate_loop_heads
from .operator import gate_loop_operator

__all__ = ["gate_loop_heads_cp", "gate_loop_operator_cp", "context_parallel_mean", "context_parallel_bytes", "DESCRIPTOR_LEN"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
# the last field (this rank's slice length) is exchanged, not compared
_FIELDS = ("failed", "batch B", "heads H", "head dim d", "value dim e", "q dtype", "k dtype", "v dtype",
           "gate dtype", "initial_state dtype", "needs grad", "initial_state needs grad (its requires_grad)",
           "sequences N (len(cu_seqlens) - 1; -1 without)",
           "final states (with cu_seqlens)", "cu_seqlens[-1] (the group's T)",
           "cu_seqlens (an int64 weighted sum of all its entries)",
           "initial_state values (an int64 weighted sum of the bits of all its entries)", "slice length")
#: int64 entries of the descriptor every rank all-gathers before the states
DESCRIPTOR_LEN = len(_FIELDS)
_END = _FIELDS.index("cu_seqlens[-1] (the group's T)")  # then its fingerprint: written on the device (no host read)
_INIT = _FIELDS.index("initial_state values (an int64 weighted sum of the bits of all its entries)")
_PRIME = 2 ** 31 - 1  # the fingerprint's modulus
_FAILED = [1] + [0] * (DESCRIPTOR_LEN - 1)  # the descriptor of a rank whose input failed its local checks


def _descriptor(local: list, needs_grad: bool, initial_state: Optional[Tensor], n: int, sequences: int = -1,
                want_final: bool = False) -> list:
    """This rank's descriptor in ``_FIELDS``' order (``local``: the shape and dtype fields; ``sequences``: ``N``, -1
    unpacked); :func:`_exchange_descriptors` writes the fingerprints and ``cu_seqlens[-1]`` on the device."""
    # each rank's copy gets only its share of the gradient: a rank without requires_grad would drop its share
    init_grad = initial_state is not None and initial_state.requires_grad and torch.is_grad_enabled()
    return [0, *local, int(needs_grad), int(init_grad), sequences, int(want_final), 0 if sequences >= 0 else -1, 0,
            0, n]


def context_parallel_bytes(batch: int, heads: int, d: int, e: int, world_size: int,
                           dtype: torch.dtype = torch.float32, check_shapes: bool = True,
                           sequences: Optional[int] = None, final_states: bool = False) -> dict:
    """Bytes each rank's collectives move per call of :func:`gate_loop_heads_cp` (independent of the slice length).

    Args:
        batch, heads, d, e: ``B, H`` and the head dims (``H = 1`` for :func:`gate_loop_operator_cp`); world_size: ``W``, ranks in the group;
        dtype: the inputs' promoted dtype (float64 folds in float64, anything else in float32).
        check_shapes: as passed to the call (without the check no descriptor is exchanged).
        sequences: ``N`` for a packed call (``cu_seqlens`` of ``N + 1`` entries, ``batch = 1``), else ``None``.
        final_states: a packed call's ``output_final_state`` (``return_final_state``).

    Returns:
        ``{"descriptor": W * 8 * DESCRIPTOR_LEN (0 without the check), "lengths": W * 8 (a packed call without
        the check: the slice lengths, else 0), "forward": W * B * H * (2 + 2 d e) * s, "backward": the same,
        "final_states": N * H * 2 d e * s (a packed call with final states, else 0)}``: the all-gathered
        descriptor or slice lengths, the all-gathered states (``s`` = 4 or 8), the reduce-scatter's input in
        backward (one slot comes back), and the buffer of the per-sequence final states' all-reduce, once
        forward and once backward (a ring all-reduce sends and receives ``2 (W - 1) / W`` times it).
    """
    s = 8 if dtype == torch.float64 else 4
    states = world_size * batch * heads * (2 + 2 * d * e) * s
    packed = sequences is not None
    return {"descriptor": world_size * 8 * DESCRIPTOR_LEN if check_shapes else 0,
            "lengths": world_size * 8 if packed and not check_shapes else 0, "forward": states, "backward": states,
            "final_states": sequences * heads * 2 * d * e * s if packed and final_states else 0}


def _all_gather_single(out: Tensor, x: Tensor, group) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_single(out: Tensor, x: Tensor, group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


class _GatherStates(torch.autograd.Function):
    """``(P,)`` per rank -> ``(W, P)`` on every rank; backward sums each slot's gradient over the ranks
    and returns slot ``r`` to rank ``r`` (a reduce-scatter). ``anchor`` (a tensor needing gradients, or
    ``None``) only makes the output need gradients where this rank's ``packed`` happens not to, so that
    every rank's backward joins the reduce-scatter."""

    @staticmethod
    def forward(ctx, packed: Tensor, group, world: int,  # type: ignore[override]
                anchor: Optional[Tensor]) -> Tensor:
        ctx.group = group
        # the flat (concatenated) form: gloo takes no stacked output
        out = packed.new_empty(world * packed.numel())
        _all_gather_single(out, packed.contiguous(), group)
        return out.view(world, -1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gx = grad.new_empty(grad.shape[1:])
        _reduce_scatter_single(gx, grad.reshape(-1), ctx.group)
        return gx, None, None, None


class _Correct(torch.autograd.Function):
    """``o = o_loc + Re(c_t S_in)^T q_t`` in the fold's dtype, returned in ``o_loc``'s dtype.

    Saves ``q`` (the local scan keeps it anyway), ``c`` and ``S_in`` only: the ``(B, n, H, 2e)``
    product ``[Re S_in, Im S_in]^T q`` is recomputed in backward rather than kept as an activation.
    ``mask`` (bool ``(n,)`` or ``None`` for all): the tokens corrected; the others pass ``o_loc`` and get no
    gradient through ``S_in``, also where ``S_in`` or their ``q`` is not finite (packed: other sequences).
    """

    @staticmethod
    def forward(ctx, o_loc: Tensor, q: Tensor, s_in: Tensor, c_re: Tensor, c_im: Tensor,  # type: ignore[override]
                mask: Optional[Tensor] = None) -> Tensor:
        ctx.save_for_backward(q, s_in, c_re, c_im, mask)
        e = s_in.shape[-1]
        t = torch.einsum("bnhd,bhdf->bnhf", q.to(c_re.dtype), torch.cat([s_in.real, s_in.imag], dim=-1))
        corr = c_re[..., None] * t[..., :e] - c_im[..., None] * t[..., e:]
        if mask is not None:  # a where, not a product: 0 * NaN would carry one sequence's NaN into the next
            corr = torch.where(mask[:, None, None], corr, 0)
        return (o_loc.to(c_re.dtype) + corr).to(o_loc.dtype)

    @staticmethod
    @first_order("context_parallel")
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, s_in, c_re, c_im, mask = ctx.saved_tensors
        e = s_in.shape[-1]
        qf, gf = q.to(c_re.dtype), g.to(c_re.dtype)
        s2 = torch.cat([s_in.real, s_in.imag], dim=-1)
        t = torch.einsum("bnhd,bhdf->bnhf", qf, s2)
        dc_re = (gf * t[..., :e]).sum(-1)
        dc_im = -(gf * t[..., e:]).sum(-1)
        dt = torch.cat([c_re[..., None] * gf, -c_im[..., None] * gf], dim=-1)
        if mask is not None:
            m = mask[:, None]
            dc_re, dc_im = torch.where(m, dc_re, 0), torch.where(m, dc_im, 0)
            dt, qf = torch.where(m[..., None], dt, 0), torch.where(m[..., None], qf, 0)
        dq = torch.einsum("bnhf,bhdf->bnhd", dt, s2)
        if mask is not None:
            dq = torch.where(mask[:, None, None], dq, 0)
        ds2 = torch.einsum("bnhd,bnhf->bhdf", qf, dt)
        # a real loss's gradient for a complex tensor is dL/dRe + i dL/dIm
        return g, dq.to(q.dtype), torch.complex(ds2[..., :e], ds2[..., e:]), dc_re, dc_im, None


def _group_rank(name: str, cp_group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    outside = dist.GroupMember.NON_GROUP_MEMBER  # what new_group() hands the ranks it leaves out
    if cp_group is not outside and not isinstance(cp_group, dist.ProcessGroup):
        from torch.distributed.device_mesh import DeviceMesh
        hint = ("; for a DeviceMesh pass the group of its context dimension, mesh.get_group(<dim>) (a dimension "
                "name or index)" if isinstance(cp_group, DeviceMesh) else "")
        raise TypeError(f"cp_group must be a torch.distributed.ProcessGroup (torch.distributed.group.WORLD for "
                        f"every rank), got {type(cp_group).__name__}{hint}")
    rank = -1 if cp_group is outside else dist.get_rank(cp_group)
    if rank < 0:
        raise ValueError(f"cp_group does not hold this process (global rank {dist.get_rank()}); call "
                         f"{name} only on the ranks of the group")
    return rank, dist.get_world_size(cp_group)


def _dtype_code(t: Optional[Tensor]) -> int:
    if t is None:
        return 0
    return _DTYPES.index(t.dtype) + 1 if t.dtype in _DTYPES else -1


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, gate: dict, initial_state: Optional[Tensor]) -> None:
    """``gate_loop_heads``' contract (dtypes, shapes, one device, a complex or real initial state), checked here
    too because an empty slice does not call it, and before any collective, so that every rank raises."""
    check_heads_inputs(q, k, v, gate.get("z"), gate.get("log_magnitude"), gate.get("phase"), initial_state)


def _empty_slice(q: Tensor, k: Tensor, v: Tensor, a: Tensor, odt: torch.dtype):
    """An empty slice in closed form (an empty sum and product), still tied to every input; head layout,
    ``a`` the complex gate ``(B, 0, H)``, outputs in ``odt``."""
    rdt, cdt = acc_dtypes(odt)
    s_loc = torch.einsum("bnhd,bnhe->bhde", k.to(rdt), v.to(rdt)).to(cdt)
    o_loc = torch.einsum("bnhd,bhde->bnhe", q.to(rdt), s_loc.real).to(odt)
    return o_loc, s_loc, a.prod(dim=1), a.real, a.imag


def _phase_starts(B: int, shape: tuple, cdt: torch.dtype, device) -> Tensor:
    """Initial states ``1`` then ``-i`` (batch halves) of the gate-only scan: its outputs are
    ``Re(c_t)`` and ``Re(-i c_t) = Im(c_t)``."""
    return torch.cat([torch.ones((B, *shape), dtype=cdt, device=device),
                      torch.full((B, *shape), -1j, dtype=cdt, device=device)])


class _Local(NamedTuple):
    """One rank's part in head layout: its slice scanned from a zero state, and its descriptor."""
    q: Tensor  # (B, n, H, d)
    o: Tensor  # (B, n, H, e), the outputs from a zero state
    state: Tensor  # (B, H, d, e) complex, the final state from a zero state
    total: Tensor  # (B, H) complex, the product of the slice's gates
    c_re: Tensor  # (B, n, H), the cumulative gate product from the slice start
    c_im: Tensor
    initial_state: Optional[Tensor]  # (B, H, d, e) or None
    desc: list


def _heads_local(q, k, v, gate: dict, initial_state, precision: str, chunk_size: int) -> _Local:
    _check_shapes(q, k, v, gate, initial_state)
    check_precision(precision)  # here too: an empty slice runs no scan
    chunk_size = check_chunk_size(chunk_size)
    B, n, H, d = q.shape
    odt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    rdt, cdt = acc_dtypes(odt)
    if n == 0:
        o_loc, s_loc, a_tot, c_re, c_im = _empty_slice(q, k, v, torch.complex(*_gate_parts(gate)).to(cdt), odt)
    else:
        o_loc, s_loc = gate_loop_heads(q, k, v, **gate, output_final_state=True, precision=precision,
                                       chunk_size=chunk_size)
        ones = q.new_ones((2 * B, n, H, 1), dtype=rdt)
        zeros = q.new_zeros((2 * B, n, H, 1), dtype=rdt)
        c, c_fin = gate_loop_heads(ones, zeros, zeros, **{name: torch.cat([t, t]) for name, t in gate.items()},
                                   initial_state=_phase_starts(B, (H, 1, 1), cdt, q.device), output_final_state=True)
        a_tot, c_re, c_im = c_fin[:B, :, 0, 0], c[:B, ..., 0], c[B:, ..., 0]
    gate_t = gate.get("z", gate.get("log_magnitude"))
    desc = [B, H, d, v.shape[-1], _dtype_code(q), _dtype_code(k), _dtype_code(v), _dtype_code(gate_t),
            _dtype_code(initial_state)]
    return _Local(q, o_loc, s_loc.to(cdt), a_tot.to(cdt), c_re.to(rdt), c_im.to(rdt), initial_state, desc)


def _operator_local(q, k, v, a, initial_state, precision: str, chunk_size: int) -> _Local:
    layout, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    if layout != GATE_HEAD:
        raise ValueError(f"context parallelism takes one gate per step, a: (B, n, 1, 1) = ({B}, {n}, 1, 1); "
                         f"got a of shape {tuple(a.shape)}")
    check_initial_state(initial_state, B, d, e, q.device)
    check_precision(precision)
    chunk_size = check_chunk_size(chunk_size)
    odt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    rdt, cdt = acc_dtypes(odt)
    a = a.expand(B, n, 1, 1)
    if n == 0:
        o_loc, s_loc, a_tot, c_re, c_im = _empty_slice(q[:, :, None], k[:, :, None], v[:, :, None],
                                                       a[..., 0].to(cdt), odt)
    else:
        o, s = gate_loop_operator(q, k, v, a, return_final_state=True, precision=precision, chunk_size=chunk_size)
        ones = q.new_ones((2 * B, n, 1), dtype=rdt)
        zeros = q.new_zeros((2 * B, n, 1), dtype=rdt)
        c, c_fin = gate_loop_operator(ones, zeros, zeros, torch.cat([a, a]),
                                      initial_state=_phase_starts(B, (1, 1), cdt, q.device), return_final_state=True)
        o_loc, s_loc, a_tot, c_re, c_im = o[:, :, None], s[:, None], c_fin[:B, :, 0], c[:B], c[B:]
    desc = [B, 1, d, e, _dtype_code(q), _dtype_code(k), _dtype_code(v), _dtype_code(a), _dtype_code(initial_state)]
    s0 = None if initial_state is None else initial_state[:, None]
    return _Local(q[:, :, None], o_loc, s_loc.to(cdt), a_tot.to(cdt), c_re.to(rdt), c_im.to(rdt), s0, desc)


def _gate_parts(gate: dict) -> tuple[Tensor, Tensor]:
    if gate.get("z") is not None:
        return gate_from_preactivation(gate["z"])
    return gate_from_log_polar(gate["log_magnitude"], gate["phase"])


def _fingerprint(cu: Tensor) -> Tensor:
    """``sum_i (cu_i w_i mod p)`` over all of ``cu``, ``p`` the prime ``2^31 - 1``, ``w_i = i 2654435761 mod p``
    (Knuth's multiplicative hash: pseudo-random in ``[1, p)``), on ``cu``'s device: exact in int64 (each term is
    below ``2^31``), and two tensors that differ in one entry (by less than ``p``) always differ in it."""
    i = torch.arange(1, cu.numel() + 1, dtype=torch.int64, device=cu.device)
    return (cu.long() % _PRIME * (i * 2654435761 % _PRIME) % _PRIME).sum()


def _bits(t: Tensor) -> Tensor:
    """``t``'s entries as integers of the same bits (complex: real and imaginary parts), flat."""
    r = torch.view_as_real(t) if t.is_complex() else t
    return r.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[r.element_size()]).reshape(-1)


def _exchange_descriptors(desc: list, device: torch.device, group, world: int, cu: Optional[Tensor] = None,
                          init: Optional[Tensor] = None) -> Tensor:
    mine = torch.tensor(desc, dtype=torch.int64, device=device)
    if cu is not None:  # cu_seqlens' last entry and fingerprint, on the device: read on the host with the table only
        mine[_END:_END + 2] = torch.stack([cu[-1].long(), _fingerprint(cu)])
    if init is not None:  # each rank reads its own copy: ranks passing other values would silently disagree
        mine[_INIT] = _fingerprint(_bits(init.detach()))
    out = mine.new_empty(world * DESCRIPTOR_LEN)
    _all_gather_single(out, mine, group)
    return out.view(world, DESCRIPTOR_LEN)


def report_failure(name: str, cp_group, device: torch.device) -> None:
    """Tells the other ranks of ``cp_group`` that this rank's input failed a caller's own checks, made before its
    first checked call (``check_shapes=True``): joins, with a failed descriptor, the descriptor exchange that the
    other ranks enter in that call, so that they raise a RuntimeError naming this rank there instead of waiting
    until the group's timeout. The caller then raises its own error. ``device``: the one the call runs on."""
    _, world = _group_rank(name, cp_group)
    _exchange_descriptors(_FAILED, device, cp_group, world)


def _pack(loc: _Local) -> Tensor:
    """``(A_r, S_r)`` as the one real buffer of ``B H (2 + 2 d e)`` elements that the ranks all-gather."""
    return torch.cat([torch.view_as_real(loc.total).reshape(-1), torch.view_as_real(loc.state).reshape(-1)])


def _split_scan(name: str, cp_group, local: Callable[[], _Local], device: torch.device, check_shapes: bool):
    """The exchange, the fold and the correction behind both entry points: ``(o (B, n, H, e), final state)``."""
    rank, world = _group_rank(name, cp_group)
    if not check_shapes:
        loc = local()
        o, states = _fold(loc, _pack(loc), cp_group, rank, world, device)
        return o, states[world]
    error: Optional[Exception] = None
    desc = _FAILED
    try:
        loc = local()
        packed = _pack(loc)
        desc = _descriptor(loc.desc, packed.requires_grad, loc.initial_state, loc.q.shape[1])
    except Exception as exc:  # reported to every rank below, so that no rank waits in a collective
        error = exc
    _agreed_table(name, desc, error, device, cp_group, world,
                  init=None if error is not None else loc.initial_state)
    o, states = _fold(loc, packed, cp_group, rank, world, device)
    return o, states[world]


def _agreed_table(name: str, desc: list, error: Optional[Exception], device: torch.device, cp_group,
                  world: int, cu: Optional[Tensor] = None, init: Optional[Tensor] = None) -> Tensor:
    """All-gathers the descriptors (``cu``: this rank's ``cu_seqlens``, whose last entry and fingerprint it carries;
    ``init``: its initial state, whose fingerprint it carries), raises, on every rank, the first rank's local error
    or a disagreement, and returns them: ``(W, DESCRIPTOR_LEN)`` on ``device`` (read on the host once, here)."""
    gathered = _exchange_descriptors(desc, device, cp_group, world, cu, init)
    table = gathered.cpu()
    if error is not None:
        raise error
    failed = [j for j in range(world) if table[j, 0]]
    if failed:
        raise RuntimeError(f"{name}: the input of rank(s) {failed} of cp_group failed its checks "
                           "(see the error raised there)")
    for i in range(1, DESCRIPTOR_LEN - 1):
        if (table[:, i] != table[0, i]).any():
            values = table[:, i].tolist()
            if "dtype" in _FIELDS[i]:  # the codes of _dtype_code, by name
                values = [str(_DTYPES[c - 1]).replace("torch.", "") if c > 0 else "none" if c == 0 else "other"
                          for c in values]
            raise ValueError(f"{name}: the ranks of cp_group disagree on {_FIELDS[i]}: {values} "
                             "(by rank); every rank must pass the same batch, heads, head dims and dtypes, give "
                             "initial_state alike (the same values, requires_grad alike), need gradients alike, "
                             "and pass the same "
                             "cu_seqlens and output_final_state")
    return gathered


def _fold(loc: _Local, packed: Tensor, cp_group, rank: int, world: int, device: torch.device,
          anchor: Optional[Tensor] = None, restart: Optional[Tensor] = None, mask: Optional[Tensor] = None):
    """The all-gather, the fold and the correction: ``(o (B, n, H, e), the states entering each slice and
    leaving the last (W + 1, B, H, d, e))``. Packed: ``restart (W,)`` bool, rank ``j``'s last segment starts
    on it (the chain restarts from its ``S_j``); ``mask``: the tokens of this rank's continuing first segment."""
    B, _, H, d = loc.q.shape
    e = loc.o.shape[-1]
    gathered = _GatherStates.apply(packed, cp_group, world, anchor)
    with torch.autocast(device_type=device.type, enabled=False):
        parts = gathered.view(world, -1, 2)
        a_all = torch.complex(parts[:, :B * H, 0], parts[:, :B * H, 1]).reshape(world, B, H, 1, 1)
        s_all = torch.complex(parts[:, B * H:, 0], parts[:, B * H:, 1]).reshape(world, B, H, d, e)
        s = s_all.new_zeros((B, H, d, e)) if loc.initial_state is None else loc.initial_state.to(s_all.dtype)
        prefix = [s]
        for j in range(world):
            if restart is not None:  # a where, not A_j = 0 times the state: 0 * NaN would cross the boundary
                s = torch.where(restart[j], 0, s)
            s = a_all[j] * s + s_all[j]
            prefix.append(s)
        # selecting from the stack of all prefixes keeps every rank's outputs tied to the exchange, so
        # every rank's backward joins its reduce-scatter (rank 0's incoming state needs no other rank)
        states = torch.stack(prefix)
        o = _Correct.apply(loc.o, loc.q, states[rank], loc.c_re, loc.c_im, mask)
    return o, states


class _SumFinals(torch.autograd.Function):
    """The per-sequence final states, each rank's own ones summed over the group (an all-reduce; backward the
    same on the gradients); ``o`` passes through, so that every rank's backward joins that all-reduce whether
    or not its loss uses the final states."""

    @staticmethod
    def forward(ctx, mine: Tensor, o: Tensor, group):  # type: ignore[override]
        ctx.group = group
        buf = torch.view_as_real(mine.detach()).clone(memory_format=torch.contiguous_format)
        dist.all_reduce(buf, group=group)  # as real numbers: gloo reduces no complex tensors
        return torch.view_as_complex(buf), o.view_as(o)

    @staticmethod
    @first_order("context_parallel")
    def backward(ctx, g: Tensor, go: Tensor):  # type: ignore[override]
        buf = torch.view_as_real(g).clone(memory_format=torch.contiguous_format)
        dist.all_reduce(buf, group=ctx.group)
        return torch.view_as_complex(buf), go, None


class _Packed(NamedTuple):
    """One rank's checked part of a packed call, before its slice's offset is known (head layout)."""
    q: Tensor  # (1, n, H, d)
    e: int
    cu: Tensor  # the global boundaries (N + 1,)
    initial_state: Optional[Tensor]  # (N, H, d, e) or None
    run: Callable  # (local cu_seqlens, local initial states or None) -> (o (1, n, H, e), final (N, H, d, e))
    gate: Callable  # () -> (a_re, a_im), each (1, n, H)
    empty: Callable  # () -> the closed forms of _empty_slice
    anchor: Optional[Tensor]  # an input needing gradients, or None
    odt: torch.dtype
    desc: list


def _check_global_cu(cu: Tensor, B: int, device: torch.device) -> int:
    # its last entry is the group's T, checked once the slice lengths are exchanged
    end = cu[-1] if isinstance(cu, Tensor) and cu.ndim == 1 and cu.numel() else 0
    return check_cu_seqlens(cu, B, end, device)


def _check_total(cu: Tensor, total) -> None:
    """``cu_seqlens`` must end at the sum of the slice lengths (``total``: an int, or a tensor on cu's device)."""
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(cu[-1]) != int(total):
            raise ValueError(f"cu_seqlens must end at the group's number of tokens T = {int(total)} (the sum of the "
                             f"slice lengths), got {int(cu[-1])}")
    else:
        torch._assert_async(cu[-1] == total, "cu_seqlens must end at the group's number of tokens (the sum of the "
                                             "slice lengths)")


def _anchor(*tensors: Optional[Tensor]) -> Optional[Tensor]:
    if not torch.is_grad_enabled():
        return None
    return next((t for t in tensors if isinstance(t, Tensor) and t.requires_grad), None)


def _heads_packed(q, k, v, gate: dict, initial_state, precision: str, chunk_size: int, cu: Tensor) -> _Packed:
    _check_shapes(q, k, v, gate, None)
    check_precision(precision)
    chunk_size = check_chunk_size(chunk_size)
    B, n, H, d = q.shape
    e = v.shape[-1]
    N = _check_global_cu(cu, B, q.device)
    if initial_state is not None:
        check_gate_dtype("initial_state", initial_state)
        check_varlen_state("initial_state", initial_state, N, (H, d, e))
    check_same_device(q=q, k=k, v=v, **gate, initial_state=initial_state)
    odt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)

    def run(cu_loc, s0):
        return gate_loop_heads(q, k, v, **gate, initial_state=s0, output_final_state=True, precision=precision,
                               chunk_size=chunk_size, cu_seqlens=cu_loc)

    def empty():
        return _empty_slice(q, k, v, torch.complex(*_gate_parts(gate)).to(acc_dtypes(odt)[1]), odt)

    gate_t = gate.get("z", gate.get("log_magnitude"))
    desc = [B, H, d, e, _dtype_code(q), _dtype_code(k), _dtype_code(v), _dtype_code(gate_t),
            _dtype_code(initial_state)]
    return _Packed(q, e, cu, initial_state, run, lambda: _gate_parts(gate), empty,
                   _anchor(k, v, *gate.values(), initial_state), odt, desc)


def _operator_packed(q, k, v, a, initial_state, precision: str, chunk_size: int, cu: Tensor) -> _Packed:
    layout, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    if layout != GATE_HEAD:
        raise ValueError(f"context parallelism takes one gate per step, a: (B, n, 1, 1) = ({B}, {n}, 1, 1); "
                         f"got a of shape {tuple(a.shape)}")
    check_precision(precision)
    chunk_size = check_chunk_size(chunk_size)
    N = _check_global_cu(cu, B, q.device)
    check_initial_state(initial_state, B, d, e, q.device, N)
    odt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    rdt, cdt = acc_dtypes(odt)
    a = a.expand(B, n, 1, 1)

    def run(cu_loc, s0):
        o, final = gate_loop_operator(q, k, v, a, initial_state=None if s0 is None else s0[:, 0],
                                      return_final_state=True, precision=precision, chunk_size=chunk_size,
                                      cu_seqlens=cu_loc)
        return o[:, :, None], final[:, None]

    def gate():
        g = a[..., 0]
        return (g.real, g.imag) if g.is_complex() else (g.to(rdt), torch.zeros_like(g, dtype=rdt))

    def empty():
        return _empty_slice(q[:, :, None], k[:, :, None], v[:, :, None], a[..., 0].to(cdt), odt)

    desc = [B, 1, d, e, _dtype_code(q), _dtype_code(k), _dtype_code(v), _dtype_code(a), _dtype_code(initial_state)]
    return _Packed(q[:, :, None], e, cu, None if initial_state is None else initial_state[:, None], run, gate, empty,
                   _anchor(k, v, a, initial_state), odt, desc)


def _packed_split(name: str, cp_group, prepare: Callable[[], _Packed], device: torch.device, check_shapes: bool,
                  want_final: bool):
    """A packed call under a group: ``(o (1, n, H, e), the per-sequence final states (N, H, d, e) or None)``.

    Sequence ``i`` holds the global tokens ``cu[i] <= t < cu[i + 1]``; this rank the tokens ``lo <= t < hi``.
    Its slice is scanned packed from zero states (the initial states of the sequences starting here), which
    is exact but for its first segment when that continues a sequence from an earlier rank (``cu[j0] < lo``):
    that segment gets the incoming state ``S_in`` through the gate products ``c_t`` from the slice start,
    zero past its end. Rank ``j`` hands on ``(A_j, S_j)`` of its last segment: its local final state and,
    if the segment continues an earlier sequence, its gate product (else 0, which ends the chain there;
    an empty slice hands on ``(1, 0)``), so ``S_in`` of rank ``r`` is the fold of ranks ``0..r-1``.
    """
    rank, world = _group_rank(name, cp_group)
    if check_shapes:
        error: Optional[Exception] = None
        desc = _FAILED
        try:
            p = prepare()
            desc = _descriptor(p.desc, p.anchor is not None, p.initial_state, p.q.shape[1], p.cu.shape[0] - 1,
                               want_final)
        except Exception as exc:  # reported to every rank, so that no rank waits in a collective
            error = exc
        lengths = _agreed_table(name, desc, error, device, cp_group, world, None if error is not None else p.cu,
                                None if error is not None else p.initial_state)[:, -1]  # the device's copy
    else:
        p = prepare()
        mine = torch.full((1,), p.q.shape[1], dtype=torch.int64, device=device)  # a fill: no host-to-device copy
        lengths = mine.new_empty(world)
        _all_gather_single(lengths, mine, cp_group)
    lo, total = lengths[:rank].sum()[None], lengths.sum()
    _check_total(p.cu, total)
    q, e = p.q, p.e
    _, n, H, d = q.shape
    N = p.cu.shape[0] - 1
    rdt, cdt = acc_dtypes(p.odt)
    cu = p.cu.long()
    hi = lo + n
    nonempty = cu[1:] > cu[:-1]
    # each rank's last segment starts on it (no earlier rank's state enters it): from the slice lengths and cu
    his = lengths.cumsum(0)
    ends_at = torch.searchsorted(cu[1:].contiguous(), his - 1, right=True).clamp(max=N - 1)
    restart = (lengths > 0) & (cu[ends_at] >= his - lengths)
    # who applies each sequence's initial state and who holds its final state: the ranks of its first and last
    # tokens; rank 0 for an empty sequence (its final state is its initial one)
    starts = torch.where(nonempty, (cu[:-1] >= lo) & (cu[:-1] < hi), rank == 0)
    ends = torch.where(nonempty, (cu[1:] > lo) & (cu[1:] <= hi), rank == 0)
    s0 = None if p.initial_state is None else torch.where(starts[:, None, None, None], p.initial_state, 0)
    if n == 0:
        o_loc, s_last, a_last, c_re, c_im = p.empty()
        finals = s0.to(cdt) if s0 is not None else q.new_zeros((N, H, d, e), dtype=cdt)
        c_fin = mask = None
    else:
        cu_loc = (cu - lo).clamp(0, n).to(p.cu.dtype)
        o_loc, finals = p.run(cu_loc, s0)
        a_re, a_im = p.gate()
        j0 = torch.searchsorted(cu[1:].contiguous(), lo, right=True).clamp(max=N - 1)
        cont = (torch.arange(N, device=device) == j0) & (cu[:-1] < lo)  # the first segment continues a sequence
        # its tokens: the only ones that S_in reaches
        mask = torch.arange(n, device=device) < torch.where(cont.any(), cu[j0 + 1] - lo, 0)
        # the gate-only scan from 1 and -i on that segment, from 0 elsewhere: Re c_t, Im c_t, its gate product
        g0 = cont[:, None].to(cdt).expand(N, H)
        g0 = torch.cat([g0, -1j * g0], 1)
        ones = q.new_ones((1, n, 2 * H, 1), dtype=rdt)
        zeros = torch.zeros_like(ones)
        c, c_fin = scan(ones, zeros, zeros, torch.cat([a_re, a_re], 2).to(rdt), torch.cat([a_im, a_im], 2).to(rdt),
                        g0[..., None, None], True, "ieee", DEFAULT_CHUNK, name, cu_loc)
        c_re, c_im, c_fin = c[..., :H, 0], c[..., H:, 0], c_fin[:, :H, 0, 0]
        last = torch.searchsorted(cu[1:].contiguous(), hi - 1, right=True).clamp(max=N - 1)
        a_last, s_last = c_fin[last], finals[last]
    loc = _Local(q, o_loc, s_last.to(cdt), a_last.to(cdt), c_re.to(rdt), c_im.to(rdt), None, [])
    o, states = _fold(loc, _pack(loc), cp_group, rank, world, device, anchor=p.anchor, restart=restart, mask=mask)
    if not want_final:
        return o, None
    with torch.autocast(device_type=device.type, enabled=False):
        mine = finals.to(states.dtype)
        if c_fin is not None:
            # S_in only where the first segment continues: a product with 0 would still carry its NaN (or its
            # gradient's) into the other sequences
            s_in = torch.where(cont[:, None, None, None], states[rank], 0)
            mine = mine + c_fin.to(states.dtype)[:, :, None, None] * s_in
        final, o = _SumFinals.apply(torch.where(ends[:, None, None, None], mine, 0), o, cp_group)
    return o, final


def _device(t) -> torch.device:
    return t.device if isinstance(t, Tensor) else torch.device("cpu")


def gate_loop_heads_cp(q: Tensor, k: Tensor, v: Tensor, *, log_magnitude: Optional[Tensor] = None,
                       phase: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                       precision: str = "ieee", chunk_size: int = DEFAULT_CHUNK, check_shapes: bool = True, cp_group,
                       cu_seqlens: Optional[Tensor] = None):
    """:func:`gateloop_kernels.gate_loop_heads` on a sequence split along time across ``cp_group``.

    Args:
        q, k: ``(B, n_r, H, d)``; v: ``(B, n_r, H, e)``; this rank's slice ``r`` of the time axis
            (``n_r`` may differ between ranks and may be 0). Real floating.
        log_magnitude, phase: ``(B, n_r, H)``; or z: ``(B, n_r, H, 2)``: the gate, as in ``gate_loop_heads``.
        initial_state: complex (or real) ``(B, H, d, e)``, the state before the first rank's first step, or
            ``None``; every rank passes it (the same value, ``requires_grad`` alike) or none does. Its
            gradient on each rank is that rank's share: summed over the group it is the single-process gradient.
        output_final_state: also return the global final state (after the last rank's last step),
            the same on every rank.
        precision, chunk_size: as in ``gate_loop_heads``, for this rank's scan of its slice.
        check_shapes: all-gather and compare a descriptor of every rank's inputs first (default), so that
            mismatched ranks raise a clear error on every rank; it costs one small collective and one host
            synchronization. ``False`` skips it, for calls whose agreement is already known (e.g. every
            layer after the first of a model on one batch): every rank must then pass the same value,
            and ranks that disagree on ``B, H, d, e``, the fold's dtype or gradients get a collective
            error or hang until the group's timeout (NCCL).
        cp_group: a ``torch.distributed.ProcessGroup`` holding this rank (of a ``DeviceMesh``:
            ``mesh.get_group(<dim>)``; ``group.WORLD`` for all, taken after
            ``init_process_group``: before it ``group.WORLD`` is ``None``, which the public entries read as no
            context parallelism).
        cu_seqlens: packed sequences: the GLOBAL boundaries ``[0, l_1, ..., T]`` (1-D int32/int64 on the inputs'
            device, the same values on every rank (compared with ``check_shapes``, all of them through a
            fingerprint), ``T`` the sum of the slice lengths), ``B = 1``; sequences may
            cross any number of ranks and start at a slice start. ``initial_state`` and the final states are then
            ``(N, H, d, e)``, one per sequence (each rank passes the same initial states), as in
            ``gate_loop_heads`` with ``cu_seqlens``; every rank must pass the same ``output_final_state``
            (the final states are all-reduced). Without ``check_shapes`` one all-gather of the slice lengths
            gives this rank's offset.

    Returns:
        ``(o (B, n_r, H, e), final_state or None)``, as ``gate_loop_heads`` on the whole sequence
        gives them for this slice.

    Raises:
        RuntimeError: torch.distributed not initialized; on every rank, when another rank's input
            failed its local checks (with ``check_shapes``). TypeError: ``cp_group`` not a process group;
            wrong dtypes, a non-int ``chunk_size`` (on the rank that passed them). ValueError: this process
            not in ``cp_group``; shapes, an unknown ``precision``, a bad ``chunk_size`` (on the rank that
            passed them); with ``check_shapes``, on every rank, when the ranks disagree on ``B, H, d, e``,
            a dtype, giving an initial state, its values (a fingerprint of their bits) or its ``requires_grad``,
            or whether gradients are needed, and (packed) on ``N``,
            ``cu_seqlens[-1]``, any other entry of ``cu_seqlens`` (its fingerprint) or ``output_final_state``; a
            ``cu_seqlens`` not ending at the group's ``T`` (every rank, CPU; an asynchronous device assertion on
            CUDA).
    """
    gate = {name: t for name, t in (("z", z), ("log_magnitude", log_magnitude), ("phase", phase)) if t is not None}
    if cu_seqlens is not None:
        return _packed_split("gate_loop_heads_cp", cp_group,
                             lambda: _heads_packed(q, k, v, gate, initial_state, precision, chunk_size, cu_seqlens),
                             _device(q), check_shapes, output_final_state)
    o, final = _split_scan("gate_loop_heads_cp", cp_group,
                           lambda: _heads_local(q, k, v, gate, initial_state, precision, chunk_size), _device(q),
                           check_shapes)
    return o, (final if output_final_state else None)


def gate_loop_operator_cp(q: Tensor, k: Tensor, v: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                          return_final_state: bool = False, precision: str = "ieee", chunk_size: int = DEFAULT_CHUNK,
                          check_shapes: bool = True, cp_group, cu_seqlens: Optional[Tensor] = None):
    """:func:`gateloop_kernels.gate_loop_operator` on a sequence split along time across ``cp_group``.

    Args:
        q, k: ``(B, n_r, d)``; v: ``(B, n_r, e)``: this rank's slice of the time axis (may be empty).
        a: the gate, one per step, complex or real, ``(B, n_r, 1, 1)`` (or ``(1, n_r, 1, 1)``).
        initial_state: complex (or real) ``(B, d, e)`` or ``None``, as in :func:`gate_loop_heads_cp`.
        return_final_state: also return the global final state ``(B, d, e)``, the same on every rank.
        precision, chunk_size, check_shapes: as in :func:`gate_loop_heads_cp`.
        cp_group: a ``torch.distributed.ProcessGroup`` holding this rank.
        cu_seqlens: the global boundaries of packed sequences, as in :func:`gate_loop_heads_cp` (``B = 1``;
            ``initial_state`` and the final states ``(N, d, e)``).

    Returns:
        ``out (B, n_r, e)``, or ``(out, final_state)``.

    Raises:
        As :func:`gate_loop_heads_cp`; ValueError also for a gate per key dim or per entry.
    """
    if cu_seqlens is not None:
        o, final = _packed_split("gate_loop_operator_cp", cp_group,
                                 lambda: _operator_packed(q, k, v, a, initial_state, precision, chunk_size, cu_seqlens),
                                 _device(q), check_shapes, return_final_state)
        return (o[:, :, 0], final[:, 0]) if return_final_state else o[:, :, 0]
    o, final = _split_scan("gate_loop_operator_cp", cp_group,
                           lambda: _operator_local(q, k, v, a, initial_state, precision, chunk_size), _device(q),
                           check_shapes)
    return (o[:, :, 0], final[:, 0]) if return_final_state else o[:, :, 0]


class _GlobalMean(torch.autograd.Function):
    """Forward: the group's sum over its count; backward: this rank's share times ``W`` (no collective)."""

    @staticmethod
    def forward(ctx, local_sum: Tensor, local_count, group, world: int) -> Tensor:  # type: ignore[override]
        both = torch.stack([local_sum.detach().to(torch.float64),
                            torch.as_tensor(local_count, dtype=torch.float64, device=local_sum.device)])
        dist.all_reduce(both, group=group)
        # the count stays a tensor: no host synchronization
        ctx.world, ctx.count = world, both[1]
        return (both[0] / both[1]).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return (g * (ctx.world / ctx.count)).to(g.dtype), None, None, None


def context_parallel_mean(local_sum: Tensor, local_count, cp_group) -> Tensor:
    """The mean over a sequence split across ``cp_group``, e.g. the next-token loss of a model.

    Args:
        local_sum: scalar tensor, this rank's sum (e.g. ``cross_entropy(..., reduction="sum")`` of its tokens).
        local_count: how many terms it sums (may be 0): an int, or a scalar tensor on ``local_sum``'s device (e.g.
            ``(labels != -100).sum()``, read without a host synchronization).
        cp_group: the process group (``W`` ranks).

    Returns:
        The group's total over its total count, the same value on every rank (one all-reduce of two
        float64 numbers, no host synchronization). Its backward hands each rank ``W`` times the gradient
        of its own terms: the parameter gradients *averaged* over the group (what DDP and FSDP2 do over
        a mesh holding the context dimension) are those of the single-process mean; summed, ``W`` times them.
    """
    _, world = _group_rank("context_parallel_mean", cp_group)
    if not isinstance(local_sum, Tensor) or local_sum.ndim != 0:
        raise ValueError(f"local_sum must be a scalar tensor, got {getattr(local_sum, 'shape', type(local_sum))}")
    return _GlobalMean.apply(local_sum, local_count, cp_group, world)
