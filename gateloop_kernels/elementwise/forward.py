"""The head-dim-1 scan's forward: ``_fwd_kernel`` scans one ``(BLOCK_T, BLOCK_C)`` tile per program, takes the state
entering it by the decoupled look-back, writes ``o_t = q_t Re(h_t)``, the final state and the ``carries`` (the state
every ``CARRY_T`` steps, for the backward); :func:`scan_forward` launches it (docs/design.md section 5,
docs/kernels.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import Launcher
from .config import (_check_shapes, _needs_int64, _num_segments, _one_layout, _out_like, _varlen_args,
                     carries_numel, tile_config)
from .lookback import _clear, _lookback, _publish
from .scans import _apply_carry, _combine, _combine_reset
from .workspace import launch_with_workspace
from .tiles import _out_offsets, _row, _sequences, _state_offsets, _tile_offsets


@Launcher
@triton.jit(do_not_specialize=["c0", "clr_n"])
def _fwd_kernel(q_ptr, k_ptr, v_ptr, ar_ptr, ai_ptr, h0r_ptr, h0i_ptr,
                o_ptr, hTr_ptr, hTi_ptr, car_ptr, ws_ptr, agg_off, ticket_off, clr_ptr, clr_n, c0, cu_ptr, NSEQ, NBIS,
                n, B, C, NCB, NSEG, NCAR,
                s_b, s_n, s_c, g_b, g_n, g_c, o_b, o_n, o_c,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CARRY_T: tl.constexpr,
                COMPLEX: tl.constexpr, KV_GIVEN: tl.constexpr, HAS_H0: tl.constexpr, BIG: tl.constexpr,
                DETERMINISTIC: tl.constexpr, OUT_STRIDED: tl.constexpr, VARLEN: tl.constexpr):
    """One tile of the forward scan: its outputs, its look-back words, its final-state rows and carries."""
    # ws: inclusive states (1 word per segment and channel), aggregates (2) from agg_off, the ticket; clr: the other
    # workspace, cleared for the next launch (workspace.py)
    inc_ptr = ws_ptr
    agg_ptr = ws_ptr + agg_off
    vid = tl.atomic_add(ws_ptr + ticket_off, 1).to(tl.int32)
    seg = vid // (B * NCB)
    b, rows, t, c, mc, m, off, goff, boff, gboff = _tile_offsets(seg, vid % (B * NCB), c0, n, C, NCB, s_b, s_n, s_c,
                                                         g_b, g_n, g_c, BLOCK_T, BLOCK_C, BIG)
    ooff, oboff = _out_offsets(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED, BIG)
    q_ptr += boff
    k_ptr += boff
    v_ptr += boff
    o_ptr += oboff
    ar_ptr += gboff
    ai_ptr += gboff

    x = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
    if not KV_GIVEN:
        x = x * tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    ar = tl.load(ar_ptr + goff, mask=m, other=1.0).to(tl.float32)
    if COMPLEX:
        ai = tl.load(ai_ptr + goff, mask=m, other=0.0).to(tl.float32)
    else:
        ai = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    if VARLEN:
        # a sequence's first step resets the state to a_t h0_i + x_t (its own initial state, zero without)
        sq, st, fin = _sequences(cu_ptr, NSEQ, NBIS, seg * BLOCK_T, t, n, BLOCK_T)
        x_i = tl.zeros_like(x)
        if HAS_H0:
            sm = st[:, None] & mc[None, :]
            s0r = tl.load(h0r_ptr + _state_offsets(sq, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            s0i = tl.zeros_like(x)
            if COMPLEX:
                s0i = tl.load(h0i_ptr + _state_offsets(sq, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            x_i = tl.where(sm, ar * s0i + ai * s0r, 0.0)
            x = tl.where(sm, x + ar * s0r - ai * s0i, x)
        A_r, A_i, H_r, H_i, _ = tl.associative_scan(
            (ar, ai, x, x_i, tl.broadcast_to(st[:, None].to(tl.float32), [BLOCK_T, BLOCK_C])), 0, _combine_reset)
        # rows from the tile's first start on drop the carry (BLOCK_T: no start); recomputed, not kept from the scan
        first_start = tl.min(tl.where(st, rows, BLOCK_T), axis=0)
    else:
        A_r, A_i, H_r, H_i = tl.associative_scan((ar, ai, x, tl.zeros_like(x)), 0, _combine)

    last = BLOCK_T - 1
    Ar_l, Ai_l, Hr_l, Hi_l = _row(A_r, rows, last), _row(A_i, rows, last), _row(H_r, rows, last), _row(H_i, rows, last)
    sidx = (seg * B + b).to(tl.int64) * C + c
    if VARLEN:
        # a tile holding a sequence start knows its inclusive state without the carry: published at once,
        # so no later tile waits for (or folds across) this one's look-back
        reset = (c * 0 + first_start) < BLOCK_T  # per channel: the interpreter's masks are vectors
        _publish(inc_ptr, sidx, mc & reset, Hr_l, Hi_l, Hr_l, Hi_l, 1)
        if not DETERMINISTIC:
            _publish(agg_ptr, sidx, mc & ((c * 0 + seg) > 0) & ~reset, Ar_l, Ai_l, Hr_l, Hi_l, 2)
        # only the rows before the tile's first start take the carry: no look-back when step 0 starts one
        stop = tl.where(first_start == 0, seg - 1, -1)
    elif not DETERMINISTIC:  # without aggregates the look-back waits for inclusive states: one rounding path
        if seg > 0:
            _publish(agg_ptr, sidx, mc, Ar_l, Ai_l, Hr_l, Hi_l, 2)
    if HAS_H0 and not VARLEN:
        h0r = tl.load(h0r_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        h0i = tl.load(h0i_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(h0r)
    else:
        h0r = tl.zeros([BLOCK_C], tl.float32)
        h0i = tl.zeros([BLOCK_C], tl.float32)
    if VARLEN:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, 1, stop, b, B, C, c, mc, h0r, h0i, BLOCK_C)
    else:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, 1, -1, b, B, C, c, mc, h0r, h0i, BLOCK_C)
    inc_r = Ar_l * car_r - Ai_l * car_i + Hr_l
    inc_i = Ar_l * car_i + Ai_l * car_r + Hi_l
    if VARLEN:
        _publish(inc_ptr, sidx, mc & ~reset, inc_r, inc_i, inc_r, inc_i, 1)
    else:
        _publish(inc_ptr, sidx, mc, inc_r, inc_i, inc_r, inc_i, 1)
        if seg == NSEG - 1:
            tl.store(hTr_ptr + b * C + c, inc_r, mask=mc)
            if COMPLEX:
                tl.store(hTi_ptr + b * C + c, inc_i, mask=mc)
    # the state after every CARRY_T steps, for the backward (whose tiles are CARRY_T steps long)
    for j in tl.static_range(BLOCK_T // CARRY_T):
        r = (j + 1) * CARRY_T - 1
        Ar_j, Ai_j = _row(A_r, rows, r), _row(A_i, rows, r)
        sb = seg * (BLOCK_T // CARRY_T) + j
        cidx = (sb * 2 * B + b).to(tl.int64) * C + c
        ok = mc & ((c * 0 + sb) < NCAR)
        if VARLEN:
            reset_j = (c * 0 + r) >= first_start
            Hr_j, Hi_j = _row(H_r, rows, r), _row(H_i, rows, r)
            tl.store(car_ptr + cidx, tl.where(reset_j, Hr_j, Ar_j * car_r - Ai_j * car_i + Hr_j), mask=ok)
            tl.store(car_ptr + cidx + B * C, tl.where(reset_j, Hi_j, Ar_j * car_i + Ai_j * car_r + Hi_j), mask=ok)
        else:
            tl.store(car_ptr + cidx, Ar_j * car_r - Ai_j * car_i + _row(H_r, rows, r), mask=ok)
            tl.store(car_ptr + cidx + B * C, Ar_j * car_i + Ai_j * car_r + _row(H_i, rows, r), mask=ok)

    if VARLEN:
        h_r, h_i = _apply_carry(A_r, A_i, H_r, H_i, rows >= first_start, car_r, car_i)
        # each sequence's last step is its final state (empty sequences keep the launcher's initial state)
        fm = fin[:, None] & mc[None, :]
        tl.store(hTr_ptr + _state_offsets(sq, c, C, BIG), h_r, mask=fm)
        if COMPLEX:
            tl.store(hTi_ptr + _state_offsets(sq, c, C, BIG), h_i, mask=fm)
    else:
        h_r = H_r + A_r * car_r[None, :] - A_i * car_i[None, :]
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + ooff, (q * h_r).to(o_ptr.dtype.element_ty), mask=m)
    _clear(clr_ptr, clr_n, 1024)


def scan_forward(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                 h0_re: Optional[Tensor] = None, h0_im: Optional[Tensor] = None,
                 block: Optional[tuple[int, int, int]] = None,
                 carry_t: Optional[int] = None,
                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward elementwise scan on the device of ``q`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        q, k: ``(B, n, C)`` float32/bfloat16/float16 (any strides). ``v``: like ``q``, or ``None``
            when ``k`` already holds ``kv = k v`` (the simplified operator).
        a_re, a_im: the gate's real and imaginary parts ``(B, n, C)`` (any float dtype, any strides);
            ``a_im = None`` for a real gate.
        h0_re, h0_im: optional initial state ``(B, C)`` (``h0_im`` only with a complex gate).
        block: ``(BLOCK_T, BLOCK_C, num_warps)`` override (tests); default :func:`tile_config`.
        carry_t: steps between the saved states, the backward's ``BLOCK_T`` (a power of 2 that divides
            ``BLOCK_T``); default: ``block``'s ``BLOCK_T`` when given, else the backward's :func:`tile_config`.
        cu_seqlens: ``None``, or packed sequences: int32/int64 ``(N + 1,)`` on the inputs' device,
            ``[0, l_1, l_1 + l_2, ..., n]`` (values not checked here), with ``B = 1``; each sequence's state
            starts from its initial state ``h0[i]`` (``(N, C)``; zero without) before its first step.

    Returns:
        ``(o, hT_re, hT_im, carries)``: ``o`` of ``q``'s shape and dtype, dense (``q``'s strides where ``q``
        is dense, else dense in its dim order: ``_out_like``); the final state float32
        ``(B, C)`` (``(N, C)`` per sequence with ``cu_seqlens``: an empty sequence's is its initial state;
        ``hT_im`` empty for a real gate); ``carries`` float32 (:func:`carries_numel`), the
        state after every ``carry_t`` steps, saved for the backward.

    Raises:
        ValueError: shape mismatch, ``cu_seqlens`` not 1-D or with ``B != 1``, or a ``carry_t`` that does not
        divide ``BLOCK_T``.
    """
    _check_shapes(q, k, v, a_re, a_im, cu_seqlens)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v = _one_layout(q, k, v)
    a_re, a_im = _one_layout(a_re, a_im)
    complex_gate = a_im is not None
    dev = q.device
    hT_re = torch.empty((nseq, C), dtype=torch.float32, device=dev)
    hT_im = torch.empty((nseq, C) if complex_gate else (0,), dtype=torch.float32, device=dev)
    o = _out_like(q, q.dtype)
    block_t, block_c, warps = block or tile_config(n, C)
    carry_t = carry_t or (block_t if block else tile_config(n, C, backward=True)[0])
    if carry_t > block_t or block_t % carry_t:
        raise ValueError(f"carry_t {carry_t} must divide BLOCK_T {block_t}")
    nseg = _num_segments(n, block_t)
    carries = torch.empty(carries_numel(B, n, C, carry_t), dtype=torch.float32, device=dev)
    # the initial state is the final one where no step runs: everywhere when n = 0, for empty packed sequences
    if n == 0 or B * C == 0 or cu_seqlens is not None:
        if h0_re is not None:
            hT_re.copy_(h0_re)
            if complex_gate:
                hT_im.copy_(h0_im)
        else:
            hT_re.zero_()
            hT_im.zero_()
    if n == 0 or B * C == 0:
        return o, hT_re, hT_im, carries
    ncb = -(-C // block_c)
    h0r = h0_re.contiguous() if h0_re is not None else hT_re
    h0i = h0_im.contiguous() if (h0_im is not None and complex_gate) else hT_re
    # c0 = 0 is a kernel argument the compiler does not specialize on: the channel offsets' alignment is
    # unknown, so loads are not vectorized along the channels and each thread keeps one channel's steps
    words = nseg * B * C  # look-back words: inclusive states (1 per segment and channel), aggregates (2), the ticket
    launch_with_workspace(3 * words + 1, nseg * B * ncb, dev, lambda ws, clr, clr_n: _fwd_kernel[(nseg * B * ncb,)](
        q, k, v if v is not None else k, a_re, a_im if complex_gate else a_re, h0r, h0i,
        o, hT_re, hT_im if complex_gate else hT_re, carries, ws, words, 3 * words, clr, clr_n, 0,
        *_varlen_args(cu_seqlens, ws), n, B, C, ncb, nseg, _num_segments(n, carry_t), *q.stride(), *a_re.stride(),
        *o.stride(), BLOCK_T=block_t, BLOCK_C=block_c, CARRY_T=carry_t, COMPLEX=complex_gate, KV_GIVEN=v is None,
        HAS_H0=h0_re is not None, BIG=_needs_int64(q, a_re, o) or (cu_seqlens is not None and nseq * C >= 2 ** 31),
        DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
        OUT_STRIDED=o.stride() != q.stride(), VARLEN=cu_seqlens is not None, num_warps=warps))
    return o, hT_re, hT_im, carries
