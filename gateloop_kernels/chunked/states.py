"""The chunked scan's state passes: the complex states ``h_c`` entering each chunk (forward) and the adjoints
``dh_c`` of the states leaving each chunk (reverse), float32 (Re, Im) planes per chunk.

``_chunk_states``  parallel over (batch*head [x direction], key block, value block), sequential over chunks: the
                   state tile stays in registers (tf32 and 16-bit dots);
``_chunk_local`` + ``_state_scan``  the same in two passes for the exact float32 mode: each chunk's own state
                   (adjoint) contribution and total gate, in parallel over chunks; then the carry across chunks,
                   in place, elementwise over the state (memory-bound).

The backward needs both directions: each of these kernels runs the two in one launch there. ``_carried``
launches them; ``_chunk_table`` builds a packed batch's chunk table, which every kernel reads behind its
``VARLEN`` constexpr (docs/kernels.md section 1, docs/design.md section 3).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._custom_op import PlainOp
from .._launch import Launcher
from .config import MODE_BF16, MODE_F32, _blocks, _cdiv, _cfg, _dims, _launch
from .dots import _wide_dot
from .gates import _end_decay, _ends, _gate_prefix, _span
from .tiles import (_at, _chunk_span, _head, _load_state, _load_steps, _load_steps_T, _opens_closes, _seq_ends, _slot,
                    _state_offsets, _store_state)


@triton.jit
def _chunk_contrib(x, y, gate_re, gate_im, t0, r0, c0, n, H, SX, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                   GS: tl.constexpr):
    """One chunk's own contribution to the carried state, ``(u_re, u_im, ae_re, ae_im)``, for the
    ``(BK, BV)`` state tile at ``(r0, c0)`` of the chunk starting at step ``t0`` (pointers at the head, x's steps
    ``SX`` apart, y dense):

    forward (x = k, y = v):  U = sum_s D[C-1, s] k_s v_s^T (the chunk's state from a zero start);
    reverse (x = q, y = dO): U = sum_t conj(A_t) q_t do_t^T (the chunk's adjoint of its entering state);
    and the chunk's total gate ``A = prod_t a_t`` (not conjugated, in both directions). ``GS``: the gate planes'
    element stride (1, or 2 for a complex tensor's interleaved parts).
    """
    idx = tl.arange(0, BT)
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(gate_re, gate_im, t_idx, t_idx < n, H * GS, BT)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    if REV:
        amag = _span(g, z, BT)
        w_re, w_im = amag * ur, -amag * ui
        emag = _span(g_end, z_end, BT)
        ae_re, ae_im = emag * ur_end, emag * ui_end
    else:
        w_re, w_im, ae_re, ae_im = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    b_xt = _load_steps_T(x, t0, r0, n, K, SX, BT, BK)
    b_y = _load_steps(y, t0, c0, n, V, H * V, BT, BV)
    # the decay-weighted operand leaves fp16's range for tiny or long decays: _wide_dot (tf32 there)
    return (_wide_dot(b_xt * w_re[None, :], b_y, MODE, PREC), _wide_dot(b_xt * w_im[None, :], b_y, MODE, PREC),
            ae_re, ae_im)


@triton.jit
def _chunk_local_job(x, y, gate_re, gate_im, u, atot, tab, i_tb, n, H, NT, SX,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     REV: tl.constexpr, TRANS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                     VARLEN: tl.constexpr, GS: tl.constexpr):
    """Chunk ``i_tb % NT`` of batch*head ``i_tb // NT``: the chunk's own state contribution ``U_c``
    (:func:`_chunk_contrib`) into ``u`` (in :func:`_store_state`'s layout) and its total gate ``A_c`` (Re, Im)
    into ``atot``."""
    i_k, i_v = tl.program_id(1), tl.program_id(2)
    i_bh, i_t = i_tb // NT, i_tb % NT
    bt = _head(i_bh, n, H)
    r0, c0 = i_k * BK, i_v * BV
    t0, end = _chunk_span(tab, i_t, n, BT, VARLEN)
    u_re, u_im, ae_re, ae_im = _chunk_contrib(x + _at(i_bh, n, H, K, SX), y + bt * V, gate_re + bt * GS,
                                              gate_im + bt * GS, t0, r0, c0, end, H, SX, K, V, BT, BK, BV, REV, MODE,
                                              PREC, GS)
    pu = u + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    _store_state(pu, u_re, r0, c0, K, V, BK, BV, TRANS)
    _store_state(pu + K * V, u_im, r0, c0, K, V, BK, BV, TRANS)
    if (i_k == 0) & (i_v == 0):
        pa = atot + (i_bh.to(tl.int64) * NT + i_t) * 2
        tl.store(pa, ae_re)
        tl.store(pa + 1, ae_im)


@Launcher
@triton.jit
def _chunk_local(kx, vy, u_f, at_f, qx, doy, u_r, at_r, gate_re, gate_im, tab, n, H, NT, NTBH, SQK,
                 K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 FWD: tl.constexpr, BWD: tl.constexpr, TRANS_F: tl.constexpr, MODE: tl.constexpr,
                 PREC: tl.constexpr, VARLEN: tl.constexpr, GS: tl.constexpr):
    """Per chunk, in parallel, :func:`_chunk_local_job` of the forward direction (``FWD``: k, v into
    ``u_f``, ``at_f``; transposed planes if ``TRANS_F``) and/or the reverse one (``BWD``: q, dO into ``u_r``,
    ``at_r``); with both, one launch runs the two (grid axis 0 is ``2 * NTBH``: the forward's chunks first)."""
    i = tl.program_id(0)
    if FWD and BWD:
        if i < NTBH:
            _chunk_local_job(kx, vy, gate_re, gate_im, u_f, at_f, tab, i, n, H, NT, SQK, K, V, BT, BK, BV, False,
                             TRANS_F, MODE, PREC, VARLEN, GS)
        else:
            _chunk_local_job(qx, doy, gate_re, gate_im, u_r, at_r, tab, i - NTBH, n, H, NT, SQK, K, V, BT, BK, BV,
                             True, False, MODE, PREC, VARLEN, GS)
    elif FWD:
        _chunk_local_job(kx, vy, gate_re, gate_im, u_f, at_f, tab, i, n, H, NT, SQK, K, V, BT, BK, BV, False,
                         TRANS_F, MODE, PREC, VARLEN, GS)
    else:
        _chunk_local_job(qx, doy, gate_re, gate_im, u_r, at_r, tab, i, n, H, NT, SQK, K, V, BT, BK, BV, True,
                         False, MODE, PREC, VARLEN, GS)


@triton.jit
def _scan_load(u, atot, tab, i_bh, i_t, NT, offs, m, KV: tl.constexpr, REV: tl.constexpr, VARLEN: tl.constexpr):
    """Chunk ``i_t`` (counted from the end with ``REV``; none past NT) of the scan: its slot, mask, total gate,
    contribution, and (``VARLEN``) its sequence and the block masks of whether the carry opens / closes that
    sequence there (block masks: the interpreter rejects a mask combined with a scalar condition)."""
    i_t = tl.full([], 0, tl.int32) + i_t  # a tensor, also where i_t is a Python int (interpreter)
    ok = i_t < NT
    i_s = tl.where(ok, i_t, 0)
    if REV:
        i_s = NT - 1 - i_s
    seq, opens, closes = i_s, m, m  # (unused without VARLEN)
    if VARLEN:
        seq, o1, c1 = _seq_ends(tab, i_s, REV)
        opens = m & ((offs * 0 + (o1 & ok).to(tl.int32)) != 0)
        closes = m & ((offs * 0 + (c1 & ok).to(tl.int32)) != 0)
    pu = u + (i_bh.to(tl.int64) * NT + i_s) * 2 * KV
    pa = atot + (i_bh.to(tl.int64) * NT + i_s) * 2
    a_re = tl.where(ok, tl.load(pa), 1.0)
    a_im = tl.where(ok, tl.load(pa + 1), 0.0)
    if REV:
        a_im = -a_im
    okv = m & ((offs * 0 + i_t) < NT)
    u_re = tl.load(pu + offs, mask=okv, other=0.0)
    u_im = tl.load(pu + KV + offs, mask=okv, other=0.0)
    return pu, okv, a_re, a_im, u_re, u_im, seq, opens, closes


@triton.jit
def _scan_step(s_re, s_im, pu, okv, a_re, a_im, u_re, u_im, offs, m, s0, sT, i_bh, H, seq, opens, closes,
               KV: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, VARLEN: tl.constexpr):
    if VARLEN:
        # a sequence's first chunk (in the scan's direction) restarts the carry from its own s0 (zero without)
        if HAS_S0:
            p0 = s0 + (seq * H + i_bh) * 2 * KV
            s_re = tl.where(opens, tl.load(p0 + offs, mask=opens, other=0.0), s_re)
            s_im = tl.where(opens, tl.load(p0 + KV + offs, mask=opens, other=0.0), s_im)
        else:
            s_re = tl.where(opens, 0.0, s_re)
            s_im = tl.where(opens, 0.0, s_im)
    tl.store(pu + offs, s_re, mask=okv)
    tl.store(pu + KV + offs, s_im, mask=okv)
    s_re, s_im = a_re * s_re - a_im * s_im + u_re, a_re * s_im + a_im * s_re + u_im
    if VARLEN and STORE_ST:
        pt = sT + (seq * H + i_bh) * 2 * KV
        tl.store(pt + offs, s_re, mask=closes)
        tl.store(pt + KV + offs, s_im, mask=closes)
    return s_re, s_im


@triton.jit
def _state_scan_job(u, atot, s0, sT, tab, i_bh, H, NT, KV: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, REV: tl.constexpr, VARLEN: tl.constexpr):
    """In place over the chunks of batch*head ``i_bh``: slot c holds U_c on entry and the carried state on exit.

    forward: slot c <- S (entering chunk c), S <- A_c S + U_c; reverse (c from the end):
    slot c <- L (adjoint of the state leaving chunk c), L <- conj(A_c) L + U_c.
    Eight chunks per iteration, all loaded before any is overwritten: one memory round trip per eight steps on
    the sequential path (with four, ncu measured the scan at 47-62% of the copy rate on the H200, latency-bound:
    too few bytes in flight). ``VARLEN`` (a packed batch, ``B = 1``): each sequence's carry starts from its own
    ``s0`` at its first chunk (in the scan's direction) and is stored to ``sT`` after its last.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < KV
    s_re = tl.zeros([BLOCK], dtype=tl.float32)
    s_im = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_S0 and not VARLEN:
        p0 = s0 + i_bh.to(tl.int64) * 2 * KV
        s_re += tl.load(p0 + offs, mask=m, other=0.0)
        s_im += tl.load(p0 + KV + offs, mask=m, other=0.0)
    for j in range(0, NT, 8):  # (sq, op, cl: a chunk's sequence and its opens / closes masks, VARLEN)
        p0, k0, ar0, ai0, ur0, ui0, sq0, op0, cl0 = _scan_load(u, atot, tab, i_bh, j, NT, offs, m, KV,
                                                               REV, VARLEN)
        p1, k1, ar1, ai1, ur1, ui1, sq1, op1, cl1 = _scan_load(u, atot, tab, i_bh, j + 1, NT, offs, m, KV,
                                                               REV, VARLEN)
        p2, k2, ar2, ai2, ur2, ui2, sq2, op2, cl2 = _scan_load(u, atot, tab, i_bh, j + 2, NT, offs, m, KV,
                                                               REV, VARLEN)
        p3, k3, ar3, ai3, ur3, ui3, sq3, op3, cl3 = _scan_load(u, atot, tab, i_bh, j + 3, NT, offs, m, KV,
                                                               REV, VARLEN)
        p4, k4, ar4, ai4, ur4, ui4, sq4, op4, cl4 = _scan_load(u, atot, tab, i_bh, j + 4, NT, offs, m, KV,
                                                               REV, VARLEN)
        p5, k5, ar5, ai5, ur5, ui5, sq5, op5, cl5 = _scan_load(u, atot, tab, i_bh, j + 5, NT, offs, m, KV,
                                                               REV, VARLEN)
        p6, k6, ar6, ai6, ur6, ui6, sq6, op6, cl6 = _scan_load(u, atot, tab, i_bh, j + 6, NT, offs, m, KV,
                                                               REV, VARLEN)
        p7, k7, ar7, ai7, ur7, ui7, sq7, op7, cl7 = _scan_load(u, atot, tab, i_bh, j + 7, NT, offs, m, KV,
                                                               REV, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p0, k0, ar0, ai0, ur0, ui0, offs, m, s0, sT, i_bh, H, sq0,
                                op0, cl0, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p1, k1, ar1, ai1, ur1, ui1, offs, m, s0, sT, i_bh, H, sq1,
                                op1, cl1, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p2, k2, ar2, ai2, ur2, ui2, offs, m, s0, sT, i_bh, H, sq2,
                                op2, cl2, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p3, k3, ar3, ai3, ur3, ui3, offs, m, s0, sT, i_bh, H, sq3,
                                op3, cl3, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p4, k4, ar4, ai4, ur4, ui4, offs, m, s0, sT, i_bh, H, sq4,
                                op4, cl4, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p5, k5, ar5, ai5, ur5, ui5, offs, m, s0, sT, i_bh, H, sq5,
                                op5, cl5, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p6, k6, ar6, ai6, ur6, ui6, offs, m, s0, sT, i_bh, H, sq6,
                                op6, cl6, KV, HAS_S0, STORE_ST, VARLEN)
        s_re, s_im = _scan_step(s_re, s_im, p7, k7, ar7, ai7, ur7, ui7, offs, m, s0, sT, i_bh, H, sq7,
                                op7, cl7, KV, HAS_S0, STORE_ST, VARLEN)
    if STORE_ST and not VARLEN:
        pt = sT + i_bh.to(tl.int64) * 2 * KV
        tl.store(pt + offs, s_re, mask=m)
        tl.store(pt + KV + offs, s_im, mask=m)


@Launcher
@triton.jit
def _state_scan(u_f, at_f, s0_f, sT_f, u_r, at_r, s0_r, sT_r, tab, H, NT, KV: tl.constexpr, BLOCK: tl.constexpr,
                FWD: tl.constexpr, BWD: tl.constexpr, HAS_S0_F: tl.constexpr, STORE_ST_F: tl.constexpr,
                HAS_S0_R: tl.constexpr, STORE_ST_R: tl.constexpr, VARLEN: tl.constexpr):
    """:func:`_state_scan_job` of the forward direction (``FWD``) and/or the reverse one (``BWD``); with both,
    grid axis 2 picks the direction (0: forward), so the two memory-bound scans share one launch."""
    i_bh = tl.program_id(1)
    if FWD and BWD:
        if tl.program_id(2) == 0:
            _state_scan_job(u_f, at_f, s0_f, sT_f, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_F, STORE_ST_F, False, VARLEN)
        else:
            _state_scan_job(u_r, at_r, s0_r, sT_r, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_R, STORE_ST_R, True, VARLEN)
    elif FWD:
        _state_scan_job(u_f, at_f, s0_f, sT_f, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_F, STORE_ST_F, False, VARLEN)
    else:
        _state_scan_job(u_r, at_r, s0_r, sT_r, tab, i_bh, H, NT, KV, BLOCK, HAS_S0_R, STORE_ST_R, True, VARLEN)


@triton.jit
def _chunk_states_job(x, y, gate_re, gate_im, h, s0, sT, tab, i_bh, n, H, NT, SX,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      REV: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, TRANS: tl.constexpr,
                      MODE: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr,
                      GS: tl.constexpr):
    """The carried states of one (key block, value block) tile of batch*head ``i_bh``, chunk after chunk.

    forward (x = k, y = v): slot c <- S (the state entering chunk c), S <- A_c S + U_c with
    U_c = sum_s D[C-1, s] k_s v_s^T; reverse (x = q, y = dO, c from the end): slot c <- L (the adjoint of
    the state leaving chunk c), L <- conj(A_c) L + U_c with U_c = sum_t conj(A_t) q_t do_t^T.
    The state stays in registers; a chunk's loads do not depend on it (software-pipelined, STAGES). States in
    memory (initial, per chunk, final) are in :func:`_store_state`'s layout. ``VARLEN`` (a packed batch, ``B = 1``):
    each sequence's carry starts from its own ``s0`` at its first chunk (in this direction) and is stored to
    ``sT`` after its last. x's steps are ``SX`` apart, y is dense.
    """
    i_k, i_v = tl.program_id(1), tl.program_id(2)
    bt = _head(i_bh, n, H)
    x += _at(i_bh, n, H, K, SX)
    y += bt * V
    gate_re += bt * GS
    gate_im += bt * GS
    r0, c0 = i_k * BK, i_v * BV
    s_re = tl.zeros([BK, BV], dtype=tl.float32)
    s_im = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0 and not VARLEN:
        p0 = s0 + i_bh.to(tl.int64) * 2 * K * V
        s_re += _load_state(p0, r0, c0, K, V, BK, BV, TRANS)
        s_im += _load_state(p0 + K * V, r0, c0, K, V, BK, BV, TRANS)
    ph = h + i_bh.to(tl.int64) * NT * 2 * K * V
    if VARLEN:
        st_off, st_ok = _state_offsets(r0, c0, K, V, BK, BV, TRANS)
        # each slot's table entries are read one chunk ahead: read in the chunk whose loads they address, they
        # make Triton's pipeliner wait for every copy in flight (async_wait 0), serialising the chunk loads
        t0_n, end_n, seq_n, flags_n = _slot(tab, tl.full([], 0, tl.int32) + (NT - 1 if REV else 0))
    for j in tl.range(0, NT, num_stages=STAGES):
        i_t = tl.full([], 0, tl.int32) + j  # a tensor, also where j is a Python int (interpreter)
        if REV:
            i_t = NT - 1 - i_t
        if VARLEN:
            t0, end, seq, flags = t0_n, end_n, seq_n, flags_n
            t0_n, end_n, seq_n, flags_n = _slot(tab, tl.maximum(i_t - 1, 0) if REV else tl.minimum(i_t + 1, NT - 1))
        else:
            t0, end = i_t * BT, n
        u_re, u_im, ae_re, ae_im = _chunk_contrib(x, y, gate_re, gate_im, t0, r0, c0, end, H, SX, K, V, BT, BK, BV,
                                                  REV, MODE, PREC, GS)
        if REV:
            ae_im = -ae_im
        if VARLEN:
            # restarts as predicated loads/stores and selects, not branches: a branch in the loop body keeps
            # Triton from software-pipelining the chunk loads
            seq, opens, closes = _opens_closes(seq, flags, REV)
            ps = (seq * H + i_bh) * 2 * K * V
            if HAS_S0:
                m0 = tl.where(opens, st_ok, False)
                s_re = tl.where(opens, tl.load(s0 + ps + st_off, mask=m0, other=0.0), s_re)
                s_im = tl.where(opens, tl.load(s0 + ps + K * V + st_off, mask=m0, other=0.0), s_im)
            else:
                s_re = tl.where(opens, 0.0, s_re)
                s_im = tl.where(opens, 0.0, s_im)
        pc = ph + i_t.to(tl.int64) * 2 * K * V
        _store_state(pc, s_re, r0, c0, K, V, BK, BV, TRANS)
        _store_state(pc + K * V, s_im, r0, c0, K, V, BK, BV, TRANS)
        s_re, s_im = ae_re * s_re - ae_im * s_im + u_re, ae_re * s_im + ae_im * s_re + u_im
        if VARLEN and STORE_ST:
            mT = tl.where(closes, st_ok, False)
            tl.store(sT + ps + st_off, s_re, mask=mT)
            tl.store(sT + ps + K * V + st_off, s_im, mask=mT)
    if STORE_ST and not VARLEN:
        pt = sT + i_bh.to(tl.int64) * 2 * K * V
        _store_state(pt, s_re, r0, c0, K, V, BK, BV, TRANS)
        _store_state(pt + K * V, s_im, r0, c0, K, V, BK, BV, TRANS)


@Launcher
@triton.jit
def _chunk_states(kx, vy, h_f, s0_f, sT_f, qx, doy, h_r, s0_r, sT_r, gate_re, gate_im, tab, n, H, NT, BH, SQK,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  FWD: tl.constexpr, BWD: tl.constexpr, HAS_S0_F: tl.constexpr, STORE_ST_F: tl.constexpr,
                  HAS_S0_R: tl.constexpr, STORE_ST_R: tl.constexpr, TRANS_F: tl.constexpr, MODE: tl.constexpr,
                  PREC: tl.constexpr, STAGES: tl.constexpr, VARLEN: tl.constexpr, GS: tl.constexpr):
    """:func:`_chunk_states_job` of the forward direction (``FWD``: k, v into ``h_f``, transposed planes if
    ``TRANS_F``) and/or the reverse one (``BWD``: q, dO into ``h_r``); with both, one launch runs the two (grid
    axis 0 is ``2 * BH``)."""
    i = tl.program_id(0)
    if FWD and BWD:
        if i < BH:
            _chunk_states_job(kx, vy, gate_re, gate_im, h_f, s0_f, sT_f, tab, i, n, H, NT, SQK, K, V, BT, BK, BV,
                              False, HAS_S0_F, STORE_ST_F, TRANS_F, MODE, PREC, STAGES, VARLEN, GS)
        else:
            _chunk_states_job(qx, doy, gate_re, gate_im, h_r, s0_r, sT_r, tab, i - BH, n, H, NT, SQK, K, V, BT, BK,
                              BV, True, HAS_S0_R, STORE_ST_R, False, MODE, PREC, STAGES, VARLEN, GS)
    elif FWD:
        _chunk_states_job(kx, vy, gate_re, gate_im, h_f, s0_f, sT_f, tab, i, n, H, NT, SQK, K, V, BT, BK, BV, False,
                          HAS_S0_F, STORE_ST_F, TRANS_F, MODE, PREC, STAGES, VARLEN, GS)
    else:
        _chunk_states_job(qx, doy, gate_re, gate_im, h_r, s0_r, sT_r, tab, i, n, H, NT, SQK, K, V, BT, BK, BV, True,
                          HAS_S0_R, STORE_ST_R, False, MODE, PREC, STAGES, VARLEN, GS)


@Launcher
@triton.jit
def _build_chunk_table(cu, ends, tab, N, NS, n, LOG, BT: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_chunk_table` in one program: each sequence's chunk count and their running sum (the slot after
    its last chunk) into ``ends``, then per slot its sequence by binary search over ``ends`` (``LOG`` halvings)
    and the slot's four entries."""
    carry = tl.zeros([], dtype=tl.int32)
    for b in range(0, N, BLOCK):
        i = b + tl.arange(0, BLOCK)
        m = i < N
        length = (tl.load(cu + i + 1, mask=m, other=0) - tl.load(cu + i, mask=m, other=0)).to(tl.int32)
        cnt = tl.where(m, tl.maximum((length + BT - 1) // BT, 1), 0)
        tl.store(ends + i, carry + tl.cumsum(cnt, 0), mask=m)
        carry += tl.sum(cnt, 0)
    tl.debug_barrier()  # (every thread's ends written before any is read)
    for s0 in range(0, NS, BLOCK):
        slot = s0 + tl.arange(0, BLOCK)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = lo + N
        for _ in range(0, LOG):  # lo <- the first sequence whose chunks end after the slot (N: none)
            mid = (lo + hi) // 2
            right = (tl.load(ends + mid, mask=mid < N, other=0) <= slot) & (lo < hi)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right | (lo >= hi), hi, mid)
        real = lo < N
        seq = tl.minimum(lo, N - 1)
        start = tl.load(cu + seq).to(tl.int32)
        stop = tl.load(cu + seq + 1).to(tl.int32)
        cnt = tl.maximum((stop - start + BT - 1) // BT, 1)
        j = slot - (tl.load(ends + seq) - cnt)  # the chunk's index in its sequence
        flags = ((j == 0) & real).to(tl.int32) + 2 * ((j == cnt - 1) & real).to(tl.int32)
        p = tab + slot * 4
        m = slot < NS
        tl.store(p, tl.where(real, start + j * BT, n), mask=m)
        tl.store(p + 1, tl.where(real, stop, n), mask=m)
        tl.store(p + 2, seq, mask=m)
        tl.store(p + 3, flags, mask=m)


def _chunk_table_impl(cu_seqlens: Tensor, n: int, BT: int) -> Tensor:
    N = cu_seqlens.shape[0] - 1
    NS = n // BT + N
    tab = torch.empty(NS * 4, device=cu_seqlens.device, dtype=torch.int32)
    ends = torch.empty(N, device=cu_seqlens.device, dtype=torch.int32)
    # the kernel reads cu_seqlens by offset: a strided view (cu[::2]) would be read as its buffer
    _build_chunk_table[(1,)](cu_seqlens.contiguous(), ends, tab, N, NS, n, N.bit_length() + 1, BT=BT, BLOCK=1024,
                             num_warps=4)
    return tab


# registered for torch.compile / fake tensors (dynamo does not trace a Triton launch outside an op)
_chunk_table_op = PlainOp("gateloop::chunk_table", _chunk_table_impl,
                          lambda cu_seqlens, n, BT: cu_seqlens.new_empty((n // BT + cu_seqlens.shape[0] - 1) * 4,
                                                                         dtype=torch.int32))


def _chunk_table(cu_seqlens: Tensor, n: int, BT: int) -> Tensor:
    """The chunk table of a packed batch of ``n`` steps holding the sequences ``cu_seqlens`` delimits, built on
    the device (no host synchronisation; one launch, :func:`_build_chunk_table`): chunks start at each
    sequence's first step, so a sequence of length l takes ``max(1, ceil(l / BT))`` chunk slots (an empty one,
    one empty chunk: it carries its initial state to its final one). Flat int32, 4 entries per slot: first step,
    end step (exclusive: the kernels mask steps from there), sequence, flags (1: the sequence's first chunk, 2:
    its last). The slot count is a bound from shapes only, ``n // BT + N`` (the sum over sequences of
    ``(l + BT) / BT``); slots past the last chunk are empty (``t0 = end = n``, sequence ``N - 1``, no flags) and
    change nothing."""
    return _chunk_table_op(cu_seqlens, n, BT)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter's CPU (it runs one program at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _one_pass_pays(programs: int, NT: int, sms: int) -> bool:
    """Whether the one-kernel state pass, ``programs`` programs per direction (B*H x state tiles) each walking
    ``NT`` chunks in order, beats the two passes on ``sms`` multiprocessors: when its grid fills half the GPU, or
    when its walk is short for its grid (``NT <= 2 * programs``). Within a wave the walk costs ``NT`` times one
    chunk's latency whatever the grid, while the two passes move every chunk's state through memory (time with
    the grid) plus a second launch and a round trip. Measured on the H100 (``python -m bench.tools.state_forms``,
    bf16 fwd+bwd, d = 64; docs/kernels.md section 1): 32 programs over 64 chunks, one kernel 0.72 ms against two
    passes 0.78; over 512 chunks 2.36 against 1.64 (packed 2.67 against 1.74); 64 programs over 256 chunks
    1.56 against 1.52; 128 programs over 128 chunks, one kernel 492 against 770 us of state passes."""
    return 2 * programs >= sms or NT <= 2 * programs


def _carried(fwd, rev, a_re, a_im, gs, sqk, BT, mode, prec, trans_f=False, chunks=None):
    """Chunk states and/or adjoint states, each (B*H, NT, 2, K, V): ``fwd = (k, v, s0, sT)`` gives the states
    entering each chunk, ``rev = (q, dO, s0, sT)`` the adjoints of the states leaving each chunk (``s0``: the
    initial state / final-state gradient or None; ``sT``: where to store the final state / initial-state
    gradient, or None); either may be None. Returns ``(h, dh)``, None for an absent direction. ``a_re, a_im, gs``:
    the gate planes and their element stride (:func:`.config._gate_planes`). ``trans_f``: the
    forward direction's states (and its ``s0``, ``sT``) are stored as (V, K) planes, the transposes. With both
    (the backward), each kernel runs the two directions in one launch (fewer launches, and the two
    low-occupancy passes share the GPU).

    One-pass dots (tf32, 16-bit) carry the state through the chunks in one kernel (``_chunk_states``); the
    exact float32 mode's three dots per chunk lengthen that sequential loop, so unless its table entry
    (``chunk_states_exact``) names a configuration it computes every chunk's contribution in parallel first
    and then scans them (``_chunk_local`` + ``_state_scan``).
    (docs/kernels.md section 1 has the timings of both forms.)

    ``chunks``: the chunk table of a packed batch (:func:`_chunk_table`; ``B = 1``), whose slots are the chunks;
    ``s0``, ``sT`` then hold one state per sequence, (N, H, 2, K, V). ``sqk``: the step stride of k (and q) as
    :func:`.config._readable` gave them to the launcher; v and dO dense."""
    x, y = (fwd or rev)[:2]
    B, n, H, K, V = _dims(x, y)
    BH, NT = B * H, (_cdiv(n, BT) if chunks is None else chunks.shape[0] // 4)
    tab = a_re if chunks is None else chunks  # (never read without VARLEN)
    jobs = (fwd is not None) + (rev is not None)
    f_x, f_y, f_s0, f_sT = fwd or (x, y, None, None)
    r_x, r_y, r_s0, r_sT = rev or (x, y, None, None)
    flags = dict(FWD=fwd is not None, BWD=rev is not None, HAS_S0_F=f_s0 is not None, STORE_ST_F=f_sT is not None,
                 HAS_S0_R=r_s0 is not None, STORE_ST_R=r_sT is not None)

    def per_job(shape, dtype):  # a buffer per present direction
        return [torch.empty(shape, device=x.device, dtype=dtype) if j is not None else None for j in (fwd, rev)]

    def ptrs(*ts):  # an absent direction's or state's pointer is never accessed (its flag is off): any buffer
        stand_in = next(t for t in ts if t is not None)
        return [stand_in if t is None else t for t in ts]

    cfg = _cfg("chunk_states_exact" if mode == MODE_F32 and prec != "tf32" else "chunk_states", mode)
    if cfg is not None:
        BK, BV = _blocks(K, V, cfg)
        if not _one_pass_pays(BH * _cdiv(K, BK) * _cdiv(V, BV), NT, _sm_count(x.device)):
            cfg = None  # the two passes below
    if cfg is not None:
        # bf16 inputs: the states are stored in bf16 (every dot reading them rounds them to bf16 anyway; they
        # are carried in float32 registers), half the memory and traffic of float32 states
        h_f, h_r = per_job((BH, NT, 2, K, V), torch.bfloat16 if mode == MODE_BF16 else torch.float32)
        hf, s0f, sTf, hr, s0r, sTr = ptrs(h_f, f_s0, f_sT, h_r, r_s0, r_sT)
        _chunk_states[(jobs * BH, _cdiv(K, BK), _cdiv(V, BV))](
            f_x, f_y, hf, s0f, sTf, r_x, r_y, hr, s0r, sTr, a_re, a_im, tab, n, H, NT, BH, sqk,
            K=K, V=V, BT=BT, BK=BK, BV=BV, **flags, TRANS_F=trans_f, MODE=mode, PREC=prec,
            STAGES=cfg["num_stages"], VARLEN=chunks is not None, GS=gs, num_warps=cfg["num_warps"])
        return h_f, h_r
    cfg = _cfg("chunk_local", mode)
    BK, BV = _blocks(K, V, cfg)
    u_f, u_r = per_job((BH, NT, 2, K, V), torch.float32)
    a_f, a_r = per_job((BH, NT, 2), torch.float32)
    uf, af, s0f, sTf, ur, ar, s0r, sTr = ptrs(u_f, a_f, f_s0, f_sT, u_r, a_r, r_s0, r_sT)
    # chunks x heads (x directions) on grid axis 0 (axes 1 and 2 stop at 65535: n = 2^20 at B*H = 8 is
    # 131072 chunks)
    _chunk_local[(jobs * NT * BH, _cdiv(K, BK), _cdiv(V, BV))](
        f_x, f_y, uf, af, r_x, r_y, ur, ar, a_re, a_im, tab, n, H, NT, NT * BH, sqk, K=K, V=V, BT=BT, BK=BK,
        BV=BV, FWD=flags["FWD"], BWD=flags["BWD"], TRANS_F=trans_f, MODE=mode, PREC=prec,
        VARLEN=chunks is not None, GS=gs, **_launch(cfg))
    cfg = _cfg("state_scan", mode)
    BLOCK = min(cfg["block"], 1 << (K * V - 1).bit_length())
    _state_scan[(_cdiv(K * V, BLOCK), BH, jobs)](
        uf, af, s0f, sTf, ur, ar, s0r, sTr, tab, H, NT, KV=K * V, BLOCK=BLOCK, **flags, VARLEN=chunks is not None,
        **_launch(cfg))
    return u_f, u_r
