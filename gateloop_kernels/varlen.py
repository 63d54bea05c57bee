"""Packed variable-length sequences (``cu_seqlens``): the PyTorch reference scan and the index maps the layers use.

A packed batch is ``B = 1`` row of ``T`` tokens holding ``N`` sequences, sequence ``i`` the tokens
``cu_seqlens[i] <= t < cu_seqlens[i + 1]`` (``cu_seqlens = [0, l_1, l_1 + l_2, ..., T]``, int32/int64, on the
inputs' device). Each sequence scans alone: its state starts from its initial state ``S0_i`` (zero without
one) before its first token, ``S_first = a_first S0_i + k_first v_first^T``, so the first token's gate
multiplies only ``S0_i`` (its gradient is zero without an initial state), and its final state is the state
after its last token (``S0_i`` itself for an empty sequence).

Everything here reads ``cu_seqlens`` on the device (index maps, ``searchsorted``, gathers): no host
synchronisation, no loop over sequences, static shapes (``torch.compile(fullgraph=True)`` traces it). Indices
are clamped, so even ``cu_seqlens`` values that were never checked cannot index out of bounds.

:func:`varlen_reference` runs the scan of :func:`gateloop_kernels.dispatch.scan` on a packed batch where no kernel
does (head dims other than 1 and 16..256, gates per key dim or entry, float64 on CUDA, matrix states on the CPU):

* a state of independent channels (head dims ``d = e = 1``, the simplified operator, or a gate per key dim
  / per entry over the ``d e`` entries): the first-order scan of each chunk alone (the step loop of
  :func:`gateloop_kernels.reference.diagonal_scan_chunked`) on the layout below, the state
  entering each sequence's first chunk replaced by ``S0_i`` (not a gate of 0, which gives 0 * inf = NaN: a
  non-finite sequence would reach the next);
* a gate per head with a matrix state: the chunked algorithm of
  :func:`gateloop_kernels.reference.chunked_reference` on a layout where every sequence starts a chunk
  (each padded to a multiple of the chunk size with no-op steps: at most ``T / C + N`` chunks), the state
  carried between chunks replaced by ``S0_i`` at each sequence's first chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_cu_seqlens, count_cu_seqlens, is_int
from .dtypes import acc_dtypes, empty_scan
from .reference import _add_state, _chunk_local, _fit_chunk, _no_autocast, _scan_chunks

__all__ = ["validate_cu_seqlens", "varlen_reference", "sequence_ids", "positions"]


def validate_cu_seqlens(cu_seqlens: Tensor, T: int) -> int:
    """Check ``cu_seqlens`` for ``T`` tokens at once, values included, wherever it lives; return ``N``.

    The scans check a CUDA ``cu_seqlens``' values by an asynchronous device-side assertion (no host
    synchronisation); this reads them on the host (a synchronisation for a CUDA tensor: call it where that costs
    nothing, e.g. where the batch is packed) and raises the scans' ``TypeError`` / ``ValueError`` naming them, and
    a ``TypeError`` / ``ValueError`` for a ``T`` that is not an int >= 0 or a ``cu_seqlens`` without values (meta)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if not is_int(T):
        raise TypeError(f"T (the number of tokens) must be an int, got {type(T).__name__}")
    if T < 0:
        raise ValueError(f"T (the number of tokens) must be >= 0, got {T}")
    if cu_seqlens.is_meta:
        raise ValueError("cu_seqlens is a meta tensor: it holds no values to check")
    host = cu_seqlens.cpu()
    return check_cu_seqlens(host, 1, T, host.device)


def sequence_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    """The sequence of each token, ``(T,)`` int64 on ``cu_seqlens``' device (clamped to ``[0, N - 1]``).

    ``cu_seqlens``' type, dtype and dims are checked (:func:`gateloop_kernels._checks.count_cu_seqlens`:
    TypeError / ValueError naming it), not its values (no host read)."""
    count_cu_seqlens(cu_seqlens)  # else a list fails as "'list' object has no attribute 'device'"
    t = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True).clamp(max=max(cu_seqlens.shape[0] - 2, 0))


def positions(cu_seqlens: Tensor, T: int) -> Tensor:
    """Each token's position in its own sequence, ``(T,)`` int64 (0 at each sequence's first token); checks as
    :func:`sequence_ids`."""
    seq = sequence_ids(cu_seqlens, T)  # its checks first
    return torch.arange(T, device=cu_seqlens.device) - cu_seqlens.long()[seq]


def _chunk_layout(cu_seqlens: Tensor, T: int, C: int) -> tuple[Tensor, int, Tensor, Tensor, Tensor, Tensor]:
    """A layout of ``NC = T // C + N`` chunks of ``C`` slots where every sequence starts a chunk (no chunk holds two
    sequences; the rest of a sequence's last chunk is padding): ``(slot of each token (T,), NC, whether each chunk
    starts a sequence (NC,), its sequence (NC,), each sequence's last chunk (N,), its length (N,))``, clamped."""
    N = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    lengths = (cu[1:] - cu[:-1]).clamp(min=0)
    chunks_of = (lengths + C - 1) // C
    chunk_end = torch.cumsum(chunks_of, 0)
    first_chunk = chunk_end - chunks_of
    NC = T // C + N  # sum of ceil(l_i / C) over the sequences is at most this
    # token t goes to its sequence's first chunk plus its position t - cu[seq] (positions() without a second search)
    slot = ((first_chunk * C - cu[:-1])[sequence_ids(cu_seqlens, T)] + torch.arange(T, device=cu.device)).clamp(
        0, NC * C - 1)
    chunk = torch.arange(NC, device=cu.device)
    owner = torch.searchsorted(chunk_end, chunk, right=True).clamp(max=N - 1)
    starts = (chunk == first_chunk[owner]) & (chunks_of[owner] > 0)
    return slot, NC, starts, owner, (first_chunk + chunks_of - 1).clamp(0, NC - 1), lengths


def _carry(starts: Tensor, inits, totals, updates, state: Tensor) -> tuple[list, list]:
    """The states entering and leaving each chunk of :func:`_chunk_layout` (lists of ``NC``), from ``state`` (zero):
    a chunk that starts a sequence (``starts (NC,)``) is entered from its ``inits`` entry (``torch.where``, not a
    gate of 0: 0 * inf would carry a non-finite state into the next sequence), then
    ``state = total * state + update``."""
    entering, leaving = [], []
    for start, init, total, upd in zip(starts.unbind(0), inits, totals, updates):
        state = torch.where(start, init, state)
        entering.append(state)
        state = total * state + upd
        leaving.append(state)
    return entering, leaving


def _varlen_diagonal(a: Tensor, x: Tensor, s0: Optional[Tensor], cu_seqlens: Tensor,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """``h_t = a_t h_{t-1} + x_t`` per channel and sequence: ``a, x: (T, D)`` one dtype, ``s0: (N, D)`` or ``None``.
    Returns ``(h (T, D), final (N, D))``. On :func:`_chunk_layout`: each chunk scans alone from zero and the state
    entering a sequence's first chunk is replaced (``torch.where``) by ``S0_i``, so nothing of one sequence, a
    non-finite value included, reaches another in either pass (a gate of 0 at a first token would give 0 * inf)."""
    T, D = x.shape
    C = _fit_chunk(chunk_size, T)
    slot, NC, starts, owner, last_chunk, lengths = _chunk_layout(cu_seqlens, T, C)

    def chunked(t: Tensor, fill: float) -> Tensor:
        return t.new_full((NC * C, D), fill).index_copy(0, slot, t).unflatten(0, (NC, C))

    hloc, cum = _scan_chunks(chunked(a, 1.0), chunked(x, 0.0))  # (NC, C, D), each chunk from zero
    zero = x.new_zeros(D)
    s0 = None if s0 is None else s0.to(x.dtype)
    entering, leaving = _carry(starts, (zero.expand(NC, D) if s0 is None else s0[owner]).unbind(0),
                               cum[:, -1].unbind(0), hloc[:, -1].unbind(0), zero)
    h = (hloc + cum * torch.stack(entering)[:, None]).flatten(0, 1)[slot]
    before = zero.expand(lengths.shape[0], D) if s0 is None else s0
    return h, torch.where((lengths > 0)[:, None], torch.stack(leaving)[last_chunk], before)


def _varlen_heads(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, s0: Optional[Tensor], cu_seqlens: Tensor,
                  C: int) -> tuple[Tensor, Tensor]:
    """A complex gate per head and a matrix state: ``q, k: (H, T, d)``, ``v: (H, T, e)``, ``gate: (H, T)``,
    ``s0: (N, H, d, e)`` or ``None``; ``C`` a power of two. Returns ``(o (H, T, e), final (N, H, d, e))``."""
    H, T, d = q.shape
    e = v.shape[-1]
    C = _fit_chunk(C, T)  # no sequence is longer: a longer chunk is padding, N of them
    slot, NC, starts, owner, last_chunk, lengths = _chunk_layout(cu_seqlens, T, C)

    def chunked(t: Tensor, fill: float) -> Tensor:
        buf = t.new_full((H, NC * C, *t.shape[2:]), fill)
        return buf.index_copy(1, slot, t).unflatten(1, (NC, C))

    qc, kc, vc, ac = chunked(q, 0.0), chunked(k, 0.0), chunked(v, 0.0), chunked(gate, 1.0)
    out, cum, update = _chunk_local(qc, kc, vc, ac)
    state = torch.zeros((H, d, e), dtype=gate.dtype, device=q.device)
    s0c = (torch.zeros_like(state)[:, None].expand(H, NC, d, e) if s0 is None
           else s0.to(gate.dtype)[owner].transpose(0, 1))
    # unbind, not update[:, c]: one backward stack instead of a zero-filled (H, NC, d, e) per chunk
    entering, leaving = _carry(starts, s0c.unbind(1), cum[:, :, -1, None, None].unbind(1), update.unbind(1), state)
    out = _add_state(out, cum, qc, torch.stack(entering, dim=1)).flatten(1, 2)[:, slot]
    final = torch.stack(leaving, dim=1)[:, last_chunk].transpose(0, 1)  # (N, H, d, e)
    before = torch.zeros_like(state)[None] if s0 is None else s0.to(gate.dtype)
    return out, torch.where((lengths > 0)[:, None, None, None], final, before)


@_no_autocast
def varlen_reference(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                     initial_state: Optional[Tensor], output_final_state: bool, chunk_size: int,
                     cu_seqlens: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`gateloop_kernels.dispatch.scan` on a packed batch, in PyTorch on any device.

    Arguments and returns as ``scan``'s with ``B = 1``, except that ``initial_state`` and the final state hold
    one state per sequence: ``(N, H, d, e)`` / ``(N, C)``, ``N = len(cu_seqlens) - 1``. Checked inputs.
    Differentiable through autograd.
    """
    odt = q.dtype
    rdt, cdt = acc_dtypes(odt)
    T = q.shape[1]
    N = cu_seqlens.shape[0] - 1
    per_channel = q.ndim == 3
    real_gate = a_im is None
    if T == 0:
        out_shape = q.shape if per_channel else (*q.shape[:3], 1 if v is None else v.shape[3])
        state_shape = (N, q.shape[2]) if per_channel else (N, q.shape[2], q.shape[3], out_shape[3])
        o, final = empty_scan(out_shape, state_shape, odt, initial_state,
                              *(t for t in (q, k, v, a_re, a_im) if t is not None))
        if real_gate:
            final = final.real
        return o, (final if output_final_state else None)
    gate = a_re.to(rdt) if real_gate else torch.complex(a_re.to(rdt), a_im.to(rdt))
    s0 = None if initial_state is None else initial_state.to(rdt if real_gate else cdt)
    q_, k_ = q[0].to(rdt), k[0].to(rdt)
    v_ = None if v is None else v[0].to(rdt)
    if per_channel or (q.shape[3] == 1 and v.shape[3] == 1 and a_re.ndim == 3):
        # independent channels: (T, C), head dims 1 folded away
        squeeze = not per_channel
        if squeeze:
            q_, k_, v_ = q_[..., 0], k_[..., 0], v_[..., 0]
            s0 = None if s0 is None else s0[..., 0, 0]
        kv = k_ if v_ is None else k_ * v_
        h, final = _varlen_diagonal(gate[0], kv.to(gate.dtype), s0, cu_seqlens, chunk_size)
        o = (q_ * h.real).to(odt)[None]
        if squeeze:
            o, final = o[..., None], final[..., None, None]
    elif a_re.ndim == 3:
        o, final = _varlen_heads(q_.transpose(0, 1), k_.transpose(0, 1), v_.transpose(0, 1), gate[0].t(), s0,
                                 cu_seqlens, chunk_size)
        o = o.transpose(0, 1).to(odt)[None]
    else:
        # a gate per key dim or per entry (H = 1): the d e state entries are independent channels
        _, _, _, d = q.shape
        e = v.shape[3]
        kv = (k_[:, 0, :, None] * v_[:, 0, None, :]).flatten(1).to(gate.dtype)
        g = gate[0, :, 0].expand(T, d, e).flatten(1)
        h, final = _varlen_diagonal(g, kv, None if s0 is None else s0[:, 0].flatten(1), cu_seqlens, chunk_size)
        o = torch.einsum("td,tde->te", q_[:, 0], h.real.unflatten(1, (d, e))).to(odt)[None, :, None]
        final = final.unflatten(1, (d, e))[:, None]
    if real_gate:
        final = final.real
    return o, (final if output_final_state else None)

