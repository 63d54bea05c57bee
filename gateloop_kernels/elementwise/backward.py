"""The head-dim-1 scan's backward: ``_bwd_kernel`` runs the adjoint ``lam_t = conj(a_{t+1}) lam_{t+1} + q_t do_t``
in reverse time with the same look-back, recomputes ``h`` in its tile from the forward's ``carries`` and writes
``dq, dk, dv``, the gate gradient and the initial state's; :func:`scan_backward` launches it (docs/design.md
section 5, "Backward")."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import Launcher
from .config import (_check_shapes, _needs_int64, _num_segments, _one_layout, _out_like, _varlen_args,
                     tile_config)
from .lookback import _clear, _lookback, _publish
from .scans import _apply_carry, _combine, _combine_reset, _scan_reverse, _scan_reverse_reset
from .workspace import launch_with_workspace
from .tiles import _out_offsets, _row, _sequences, _shift, _state_offsets, _tile_offsets


@Launcher
@triton.jit(do_not_specialize=["c0", "clr_n"])
def _bwd_kernel(do_ptr, gTr_ptr, gTi_ptr, q_ptr, k_ptr, v_ptr, ar_ptr, ai_ptr, h0r_ptr, h0i_ptr, car_ptr,
                dq_ptr, dk_ptr, dv_ptr, dar_ptr, dai_ptr, dh0r_ptr, dh0i_ptr, ws_ptr, agg_off, ticket_off,
                clr_ptr, clr_n, c0,
                cu_ptr, NSEQ, NBIS, n, B, C, NCB, NSEG,
                s_b, s_n, s_c, g_b, g_n, g_c, o_b, o_n, o_c, d_b, d_n, d_c,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                COMPLEX: tl.constexpr, KV_GIVEN: tl.constexpr, HAS_H0: tl.constexpr, HAS_GT: tl.constexpr,
                BIG: tl.constexpr, DETERMINISTIC: tl.constexpr, OUT_STRIDED: tl.constexpr, VARLEN: tl.constexpr):
    """One tile of the backward: the adjoint's look-back words, then the gradients of the tile's steps."""
    # ws: inclusive states (1 word per segment and channel), aggregates (2) from agg_off, the ticket; clr: the other
    # workspace, cleared for the next launch (workspace.py)
    inc_ptr = ws_ptr
    agg_ptr = ws_ptr + agg_off
    vid = tl.atomic_add(ws_ptr + ticket_off, 1).to(tl.int32)
    seg = NSEG - 1 - vid // (B * NCB)
    b, rows, t, c, mc, m, off, goff, boff, gboff = _tile_offsets(seg, vid % (B * NCB), c0, n, C, NCB, s_b, s_n, s_c,
                                                         g_b, g_n, g_c, BLOCK_T, BLOCK_C, BIG)
    ooff, oboff = _out_offsets(b, t, c, off, boff, o_b, o_n, o_c, OUT_STRIDED, BIG)
    do_ptr += boff
    q_ptr += boff
    k_ptr += boff
    v_ptr += boff
    dq_ptr += oboff
    dk_ptr += oboff
    dv_ptr += oboff
    # the gate's gradient has strides of its own: the caller's buffers (a complex gradient's planes) or dq's
    dtt = t[:, None].to(tl.int64) if BIG else t[:, None]
    doff = dtt * d_n + c[None, :] * d_c
    dar_ptr += b.to(tl.int64) * d_b
    dai_ptr += b.to(tl.int64) * d_b
    ar_ptr += gboff
    ai_ptr += gboff

    # reverse adjoint: lam_t = b_t lam_{t+1} + g_t with b_t = conj(a_{t+1}) (1 past the end): the tile's
    # gate shifted up a step, the last row from the step after the tile
    a_r = tl.load(ar_ptr + goff, mask=m, other=1.0).to(tl.float32)
    if COMPLEX:
        a_i = tl.load(ai_ptr + goff, mask=m, other=0.0).to(tl.float32)
    else:
        a_i = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    tn = seg * BLOCK_T + BLOCK_T
    mn = mc & ((c * 0 + tn) < n)
    noff = (tn.to(tl.int64) if BIG else tn) * g_n + c * g_c
    br = _shift(a_r, rows, -1, tl.load(ar_ptr + noff, mask=mn, other=1.0).to(tl.float32), BLOCK_T)
    if COMPLEX:
        bi = -_shift(a_i, rows, -1, tl.load(ai_ptr + noff, mask=mn, other=0.0).to(tl.float32), BLOCK_T)
    else:
        bi = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    do = tl.load(do_ptr + off, mask=m, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = q * do
    if VARLEN:
        # a sequence's last step resets the adjoint to q do + its final state's gradient
        sq, st, fin = _sequences(cu_ptr, NSEQ, NBIS, seg * BLOCK_T, t, n, BLOCK_T)
        opens = tl.where(st, sq, -1)  # the sequence a row starts (-1: none): one vector kept for later, not two
        g_i = tl.zeros_like(g)
        if HAS_GT:
            fm = fin[:, None] & mc[None, :]
            g += tl.load(gTr_ptr + _state_offsets(sq, c, C, BIG), mask=fm, other=0.0).to(tl.float32)
            if COMPLEX:
                g_i = tl.load(gTi_ptr + _state_offsets(sq, c, C, BIG), mask=fm, other=0.0).to(tl.float32)
        B_r, B_i, L_r, L_i = _scan_reverse_reset(
            br, bi, g, g_i, tl.broadcast_to(fin[:, None].to(tl.float32), [BLOCK_T, BLOCK_C]))
        # rows up to the tile's last sequence end drop the carry (-1: no end in the tile)
        last_end = tl.max(tl.where(fin, rows, -1), axis=0)
    else:
        B_r, B_i, L_r, L_i = _scan_reverse(br, bi, g)
    Br_0, Bi_0, Lr_0, Li_0 = _row(B_r, rows, 0), _row(B_i, rows, 0), _row(L_r, rows, 0), _row(L_i, rows, 0)
    sidx = (seg * B + b).to(tl.int64) * C + c
    if VARLEN:
        # as in the forward: a tile holding a sequence's end publishes its inclusive adjoint at once, and
        # takes no look-back when its last step ends a sequence
        reset = (c * 0 + last_end) >= 0
        _publish(inc_ptr, sidx, mc & reset, Lr_0, Li_0, Lr_0, Li_0, 1)
        if not DETERMINISTIC:
            _publish(agg_ptr, sidx, mc & ((c * 0 + seg) < NSEG - 1) & ~reset, Br_0, Bi_0, Lr_0, Li_0, 2)
        stop = tl.where(last_end == BLOCK_T - 1, seg + 1, NSEG)
    elif not DETERMINISTIC:
        if seg < NSEG - 1:
            _publish(agg_ptr, sidx, mc, Br_0, Bi_0, Lr_0, Li_0, 2)
    if HAS_GT and not VARLEN:
        gTr = tl.load(gTr_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        gTi = tl.load(gTi_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(gTr)
    else:
        gTr = tl.zeros([BLOCK_C], tl.float32)
        gTi = tl.zeros([BLOCK_C], tl.float32)
    if VARLEN:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, -1, stop, b, B, C, c, mc, gTr, gTi, BLOCK_C)
    else:
        car_r, car_i = _lookback(agg_ptr, inc_ptr, seg, -1, NSEG, b, B, C, c, mc, gTr, gTi, BLOCK_C)
    inc_r = Br_0 * car_r - Bi_0 * car_i + Lr_0
    inc_i = Br_0 * car_i + Bi_0 * car_r + Li_0
    if VARLEN:
        _publish(inc_ptr, sidx, mc & ~reset, inc_r, inc_i, inc_r, inc_i, 1)
        lam_r, lam_i = _apply_carry(B_r, B_i, L_r, L_i, rows <= last_end, car_r, car_i)
    else:
        _publish(inc_ptr, sidx, mc, inc_r, inc_i, inc_r, inc_i, 1)
        lam_r = L_r + B_r * car_r[None, :] - B_i * car_i[None, :]
        lam_i = L_i + B_r * car_i[None, :] + B_i * car_r[None, :]

    # forward state entering the tile: the forward pass's state after segment seg - 1
    if seg > 0:
        pidx = ((seg - 1) * 2 * B + b).to(tl.int64) * C + c
        f_r = tl.load(car_ptr + pidx, mask=mc, other=0.0)
        f_i = tl.load(car_ptr + pidx + B * C, mask=mc, other=0.0)
    elif HAS_H0 and not VARLEN:
        f_r = tl.load(h0r_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
        f_i = tl.load(h0i_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32) if COMPLEX else tl.zeros_like(f_r)
    else:
        f_r = tl.zeros([BLOCK_C], tl.float32)
        f_i = tl.zeros([BLOCK_C], tl.float32)
    # h_t inside the tile (the state entering it folded into step 0), and y_t = h_{t-1}: h shifted down
    k = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
    if KV_GIVEN:
        x = k
    else:
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        x = k * v
    first = (rows == 0)[:, None]
    if VARLEN:
        # y_t at a sequence's first step is its initial state (zero without), not the state before it
        st = opens >= 0
        sm = st[:, None] & mc[None, :]
        s0r = tl.zeros_like(x)
        s0i = tl.zeros_like(x)
        if HAS_H0:
            s0r = tl.load(h0r_ptr + _state_offsets(opens, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
            if COMPLEX:
                s0i = tl.load(h0i_ptr + _state_offsets(opens, c, C, BIG), mask=sm, other=0.0).to(tl.float32)
        y0r = tl.where(st[:, None], s0r, tl.where(first, f_r[None, :], 0.0))
        y0i = tl.where(st[:, None], s0i, tl.where(first, f_i[None, :], 0.0))
        inj = first | st[:, None]
        x_r = tl.where(inj, x + a_r * y0r - a_i * y0i, x)
        x_i = tl.where(inj, a_r * y0i + a_i * y0r, 0.0)
        _, _, h_r, h_i, _ = tl.associative_scan(
            (a_r, a_i, x_r, x_i, tl.broadcast_to(st[:, None].to(tl.float32), [BLOCK_T, BLOCK_C])), 0, _combine_reset)
        y_r = tl.where(st[:, None], y0r, _shift(h_r, rows, 1, f_r, BLOCK_T))
        y_i = tl.where(st[:, None], y0i, _shift(h_i, rows, 1, f_i, BLOCK_T))
    else:
        x_r = tl.where(first, x + a_r * f_r[None, :] - a_i * f_i[None, :], x)
        x_i = tl.where(first, a_r * f_i[None, :] + a_i * f_r[None, :], 0.0)
        _, _, h_r, h_i = tl.associative_scan((a_r, a_i, x_r, x_i), 0, _combine)
        y_r = _shift(h_r, rows, 1, f_r, BLOCK_T)
        y_i = _shift(h_i, rows, 1, f_i, BLOCK_T)
    tl.store(dq_ptr + ooff, (h_r * do).to(dq_ptr.dtype.element_ty), mask=m)
    if KV_GIVEN:
        tl.store(dk_ptr + ooff, lam_r.to(dk_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(dk_ptr + ooff, (lam_r * v).to(dk_ptr.dtype.element_ty), mask=m)
        tl.store(dv_ptr + ooff, (lam_r * k).to(dv_ptr.dtype.element_ty), mask=m)
    # da_t = lam_t conj(y_t), stored through the gate gradient's own strides
    tl.store(dar_ptr + doff, (lam_r * y_r + lam_i * y_i).to(dar_ptr.dtype.element_ty), mask=m)
    if COMPLEX:
        tl.store(dai_ptr + doff, (lam_i * y_r - lam_r * y_i).to(dai_ptr.dtype.element_ty), mask=m)
    if HAS_H0 and VARLEN:
        # dh0_i = conj(a_t) lam_t at sequence i's first step (an empty sequence's: the launcher's copy of its gT)
        tl.store(dh0r_ptr + _state_offsets(opens, c, C, BIG), a_r * lam_r + a_i * lam_i, mask=sm)
        if COMPLEX:
            tl.store(dh0i_ptr + _state_offsets(opens, c, C, BIG), a_r * lam_i - a_i * lam_r, mask=sm)
    elif HAS_H0:
        if seg == 0:
            # dh0 = conj(a_0) lam_0
            a0r, a0i = _row(a_r, rows, 0), _row(a_i, rows, 0)
            l0r, l0i = _row(lam_r, rows, 0), _row(lam_i, rows, 0)
            tl.store(dh0r_ptr + b * C + c, a0r * l0r + a0i * l0i, mask=mc)
            if COMPLEX:
                tl.store(dh0i_ptr + b * C + c, a0r * l0i - a0i * l0r, mask=mc)
    _clear(clr_ptr, clr_n, 1024)


def scan_backward(do: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], q: Tensor, k: Tensor,
                  v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor], h0_re: Optional[Tensor],
                  h0_im: Optional[Tensor], carries: Tensor, block: Optional[tuple[int, int, int]] = None,
                  cu_seqlens: Optional[Tensor] = None, da_out: Optional[tuple[Tensor, Optional[Tensor]]] = None):
    """Backward of :func:`scan_forward` (same arguments, plus the output and final-state gradients).

    ``do``: ``(B, n, C)``, gradient of ``o``; ``dhT_re/dhT_im``: ``(B, C)`` (``(N, C)`` with ``cu_seqlens``)
    gradient of the final state (``None``: zero); ``carries``: from :func:`scan_forward`; ``block``: as
    there, with ``BLOCK_T`` equal to the forward's ``carry_t``; ``da_out``: ``(da_re, da_im)`` buffers to write
    the gate's gradient into (``(B, n, C)`` in the gate's dtype, both with one set of strides, not overlapping:
    the planes of a complex gradient's real view, so no kernel interleaves them afterwards), else new ones.

    Returns:
        ``(dq, dk, dv, da_re, da_im, dh0_re, dh0_im)``: ``dq, dk, dv`` dense as ``o`` is (``dv`` is
        ``None`` when ``v`` is), gate gradients in the gate's dtype (``da_im`` ``None`` for a real
        gate), ``dh0_*`` float32 of the initial state's shape or ``None`` without an initial state.
    """
    _check_shapes(q, k, v, a_re, a_im, cu_seqlens)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dev = q.device
    complex_gate = a_im is not None
    q, k, v, do = _one_layout(q, k, v, do)
    a_re, a_im = _one_layout(a_re, a_im)
    dq, dk = _out_like(q, q.dtype), _out_like(q, k.dtype)
    dv = _out_like(q, v.dtype) if v is not None else None
    da_re, da_im = da_out or (_out_like(q, a_re.dtype), _out_like(q, a_im.dtype) if complex_gate else None)
    has_h0 = h0_re is not None
    dh0_re = torch.empty((nseq, C), dtype=torch.float32, device=dev) if has_h0 else None
    dh0_im = torch.empty((nseq, C), dtype=torch.float32, device=dev) if (has_h0 and complex_gate) else None
    # where no step runs the initial state's gradient is the final one's (n = 0, empty packed sequences)
    if n == 0 or B * C == 0 or cu_seqlens is not None:
        for dh0, dhT in ((dh0_re, dhT_re), (dh0_im, dhT_im)):
            if dh0 is not None:
                dh0.copy_(dhT) if dhT is not None else dh0.zero_()
    if n == 0 or B * C == 0:
        return dq, dk, dv, da_re, da_im, dh0_re, dh0_im
    block_t, block_c, warps = block or tile_config(n, C, backward=True)
    nseg = _num_segments(n, block_t)
    ncb = -(-C // block_c)
    dummy = dh0_re if has_h0 else da_re
    # either part of the final-state gradient may be absent (zero); the kernel takes both or neither
    has_gt = dhT_re is not None or (complex_gate and dhT_im is not None)
    gTr = (dhT_re.contiguous() if dhT_re is not None else torch.zeros_like(dhT_im)) if has_gt else dummy
    gTi = (dhT_im.contiguous() if dhT_im is not None else torch.zeros_like(gTr)) if (has_gt and complex_gate) else gTr
    words = nseg * B * C  # look-back words: inclusive states (1 per segment and channel), aggregates (2), the ticket
    launch_with_workspace(3 * words + 1, nseg * B * ncb, dev, lambda ws, clr, clr_n: _bwd_kernel[(nseg * B * ncb,)](
        do, gTr, gTi, q, k, v if v is not None else k, a_re, a_im if complex_gate else a_re,
        h0_re.contiguous() if has_h0 else dummy,
        h0_im.contiguous() if (has_h0 and complex_gate) else dummy, carries,
        dq, dk, dv if dv is not None else dk, da_re, da_im if complex_gate else da_re,
        dh0_re if has_h0 else dummy, dh0_im if (has_h0 and complex_gate) else dummy,
        ws, words, 3 * words, clr, clr_n, 0, *_varlen_args(cu_seqlens, ws),
        n, B, C, ncb, nseg, *q.stride(), *a_re.stride(), *dq.stride(), *da_re.stride(),
        BLOCK_T=block_t, BLOCK_C=block_c, COMPLEX=complex_gate, KV_GIVEN=v is None,
        HAS_H0=has_h0, HAS_GT=has_gt,
        BIG=_needs_int64(q, a_re, dq, da_re) or (cu_seqlens is not None and nseq * C >= 2 ** 31),
        DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
        OUT_STRIDED=dq.stride() != q.stride(), VARLEN=cu_seqlens is not None, num_warps=warps))
    return dq, dk, dv, da_re, da_im, dh0_re, dh0_im
