"""The chunked scan's gradients, each kernel parallel over (chunk, batch*head): ``_bwd_dqk`` dq and dk (and the
gate-gradient pieces psi, phi, sigma), ``_bwd_dv`` dv, ``_bwd_gate`` the complex gate gradient; ``_backward``
launches the state pass of both directions (:func:`.states._carried`) and them.

The gate gradient is the division-free form ``grad_a_u = <Lambda_u, S_{u-1}>`` (``Lambda`` the adjoint state),
expanded per chunk (docs/design.md section 4; ``tests/gateloop/test_chunked_math.py`` holds the float64 prototype
of exactly these formulas, checked against autograd):
``grad_a_u = sum_{t>=u} conj(D[t,u]) (R[t,u] + psi_t conj(A_{u-1}))
+ conj(D[C-1,u]) (sigma conj(A_{u-1}) + sum_{s<u} conj(D[u-1,s]) phi_s)``, with
``P = (Q K^T) o (dO V^T)``, ``R = P conj(D_shift)^T``, ``psi_t = q_t^T conj(h) do_t``,
``phi_s = k_s^T dh v_s``, ``sigma = <dh, h>``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import Launcher
from ..dtypes import dense
from .config import MODE_F32, _blocks, _cdiv, _cfg, _dims, _gate_planes, _gate_step, _launch, _readable
from .dots import _finite, _scores, _split_dot, _time_dot, _wide_dot
from .gates import _chunk_gates, _end_decay, _ends, _gate_prefix, _pair_decay, _span
from .states import _carried
from .tiles import _at, _chunk_span, _head, _load_plane, _load_plane_T, _load_steps, _store_steps


@Launcher
@triton.jit
def _bwd_dqk(q, k, v, do, gate_re, gate_im, h, dh, dq, dk, aux, tab, n, H, NT, SQK,
             K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, GS: tl.constexpr):
    """dq, dk of one chunk, and the gate-gradient pieces psi, phi (per step) and sigma (per chunk) in aux; q and k
    with steps ``SQK`` apart, v, do, dq, dk dense."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += _at(i_bh, n, H, K, SQK)
    k += _at(i_bh, n, H, K, SQK)
    dq += bt * K
    dk += bt * K
    v += bt * V
    do += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    g, z, ur, ui, de_re, de_im = _chunk_gates(gate_re + bt * GS, gate_im + bt * GS, t0, n, H * GS, BT)
    amag = _span(g, z, BT)
    a_re, a_im = amag * ur, amag * ui
    ph = h + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    pd = dh + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_adv = _scores(do, v, t0, n, V, H * V, H * V, BT, BV, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_ddv = tl.where(causal, d_re * b_adv, 0.0)
    psi_re = tl.zeros([BT], dtype=tl.float32)
    psi_im = tl.zeros([BT], dtype=tl.float32)
    phi_re = tl.zeros([BT], dtype=tl.float32)
    phi_im = tl.zeros([BT], dtype=tl.float32)
    sig_re = 0.0
    sig_im = 0.0
    # per key block: dq (from dO h^T) and then dk (from V dh^T) in separate value loops, so only one
    # pair of (BT, BK) accumulators is live at a time (both at once spilled under 3xTF32 on sm_90)
    for i_k in range(tl.cdiv(K, BK)):
        r0 = i_k * BK
        g_re = tl.zeros([BT, BK], dtype=tl.float32)
        g_im = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            c0 = i_v * BV
            b_do = _load_steps(do, t0, c0, n, V, H * V, BT, BV)
            g_re += _wide_dot(b_do, _load_plane_T(ph, r0, c0, K, V, BK, BV), MODE, PREC)
            g_im += _wide_dot(b_do, _load_plane_T(ph + K * V, r0, c0, K, V, BK, BV), MODE, PREC)
        b_k = _load_steps(k, t0, r0, n, K, SQK, BT, BK)
        b_dq = a_re[:, None] * g_re - a_im[:, None] * g_im + _time_dot(b_ddv, b_k, False, MODE, PREC, BT)
        _store_steps(dq, b_dq, t0, r0, n, K, H * K, BT, BK)
        qf = _load_steps(q, t0, r0, n, K, SQK, BT, BK).to(tl.float32)
        psi_re += tl.sum(qf * g_re, 1)
        psi_im -= tl.sum(qf * g_im, 1)
        w_re = tl.zeros([BT, BK], dtype=tl.float32)
        w_im = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            c0 = i_v * BV
            b_v = _load_steps(v, t0, c0, n, V, H * V, BT, BV)
            # transposed (BV, BK) views of h and dh
            b_hr = _load_plane_T(ph, r0, c0, K, V, BK, BV)
            b_hi = _load_plane_T(ph + K * V, r0, c0, K, V, BK, BV)
            b_dr = _load_plane_T(pd, r0, c0, K, V, BK, BV)
            b_di = _load_plane_T(pd + K * V, r0, c0, K, V, BK, BV)
            w_re += _wide_dot(b_v, b_dr, MODE, PREC)
            w_im += _wide_dot(b_v, b_di, MODE, PREC)
            f_hr, f_hi, f_dr, f_di = (b_hr.to(tl.float32), b_hi.to(tl.float32), b_dr.to(tl.float32),
                                      b_di.to(tl.float32))
            sig_re += tl.sum(tl.sum(f_dr * f_hr + f_di * f_hi, 1), 0)
            sig_im += tl.sum(tl.sum(f_di * f_hr - f_dr * f_hi, 1), 0)
        b_q = _load_steps(q, t0, r0, n, K, SQK, BT, BK)
        b_dk = de_re[:, None] * w_re + de_im[:, None] * w_im + _time_dot(tl.trans(b_ddv), b_q, True, MODE, PREC, BT)
        _store_steps(dk, b_dk, t0, r0, n, K, H * K, BT, BK)
        kf = _load_steps(k, t0, r0, n, K, SQK, BT, BK).to(tl.float32)
        phi_re += tl.sum(kf * w_re, 1)
        phi_im += tl.sum(kf * w_im, 1)
    pa = aux + (i_bh.to(tl.int64) * NT + i_t) * 6 * BT
    tl.store(pa + idx, psi_re)
    tl.store(pa + BT + idx, psi_im)
    tl.store(pa + 2 * BT + idx, phi_re)
    tl.store(pa + 3 * BT + idx, phi_im)
    tl.store(pa + 4 * BT + idx, tl.zeros([BT], dtype=tl.float32) + sig_re)
    tl.store(pa + 5 * BT + idx, tl.zeros([BT], dtype=tl.float32) + sig_im)


@Launcher
@triton.jit
def _bwd_dv(q, k, do, gate_re, gate_im, dh, dv, tab, n, H, NT, SQK,
            K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, GS: tl.constexpr):
    """dv of one chunk: (D o QK^T)^T dO + Re(conj(D[C-1, s]) dh^T k_s); q and k with steps ``SQK`` apart."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += _at(i_bh, n, H, K, SQK)
    k += _at(i_bh, n, H, K, SQK)
    do += bt * V
    dv += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    g, z, ur, ui, de_re, de_im = _chunk_gates(gate_re + bt * GS, gate_im + bt * GS, t0, n, H * GS, BT)
    pd = dh + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_aqk = _scores(q, k, t0, n, K, SQK, SQK, BT, BK, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_dqkt = tl.trans(tl.where(causal, d_re * b_aqk, 0.0))
    for i_v in range(tl.cdiv(V, BV)):
        c0 = i_v * BV
        b_do = _load_steps(do, t0, c0, n, V, H * V, BT, BV)
        u_re = tl.zeros([BT, BV], dtype=tl.float32)
        u_im = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            r0 = i_k * BK
            b_k = _load_steps(k, t0, r0, n, K, SQK, BT, BK)
            u_re += _wide_dot(b_k, _load_plane(pd, r0, c0, K, V, BK, BV), MODE, PREC)
            u_im += _wide_dot(b_k, _load_plane(pd + K * V, r0, c0, K, V, BK, BV), MODE, PREC)
        b_dv = _time_dot(b_dqkt, b_do, True, MODE, PREC, BT) + de_re[:, None] * u_re + de_im[:, None] * u_im
        _store_steps(dv, b_dv, t0, c0, n, V, H * V, BT, BV)


@Launcher
@triton.jit
def _bwd_gate(q, k, v, do, gate_re, gate_im, dgate_re, dgate_im, aux, tab, n, H, NT, SQK,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              MODE: tl.constexpr, PREC: tl.constexpr, EXACT_R: tl.constexpr, VARLEN: tl.constexpr,
              GS: tl.constexpr, DGS: tl.constexpr):
    """The complex gate gradient of one chunk (division-free: the module docstring), stored with element stride
    ``DGS`` (2: into a complex tensor's interleaved parts); q and k with steps ``SQK`` apart."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bt = _head(i_bh, n, H)
    q += _at(i_bh, n, H, K, SQK)
    k += _at(i_bh, n, H, K, SQK)
    v += bt * V
    do += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    t_idx = t0 + idx
    valid = t_idx < n
    # P = (Q K^T) o (dO V^T)
    b_p = (_scores(q, k, t0, n, K, SQK, SQK, BT, BK, MODE, PREC)
           * _scores(do, v, t0, n, V, H * V, H * V, BT, BV, MODE, PREC))
    g, z, ur, ui = _gate_prefix(gate_re + bt * GS, gate_im + bt * GS, t_idx, valid, H * GS, BT)
    # exclusive prefixes (the state before step u): the same scan over the gates shifted by one
    xs = t_idx - 1
    gx, zx, uxr, uxi = _gate_prefix(gate_re + bt * GS, gate_im + bt * GS, xs, (idx > 0) & (xs < n), H * GS, BT)
    pa = aux + (i_bh.to(tl.int64) * NT + i_t) * 6 * BT
    xmag = _span(gx, zx, BT)
    ax_re, ax_im = xmag * uxr, xmag * uxi
    psi_re = tl.load(pa + idx)
    psi_im = tl.load(pa + BT + idx)
    # R = P E^T and ephi[u] = sum_{s<u} E[u, s] phi_s, with E[u, s] = conj(D[u-1, s]) for s < u (the decay
    # from after step s to before step u); R on tensor cores, exact to float32 in the exact modes (three tf32
    # dots of hi/lo halves), one tf32 dot in the tf32 mode and for 16-bit inputs (~5e-4 relative, under their
    # own rounding)
    phi_re = tl.load(pa + 2 * BT + idx)
    phi_im = tl.load(pa + 3 * BT + idx)
    later = idx[:, None] > idx[None, :]
    e_re, e_im = _pair_decay(gx, zx, uxr, uxi, g, z, ur, ui, later)
    e_im = -e_im
    # :func:`_time_dot`'s causal product with the steps along P's columns (E strictly lower): where P holds a
    # non-finite value, row t of R takes, for u <= P's first non-finite step s in row t, the product with P's
    # steps from s on zeroed, and is NaN for u > s
    cols = idx[None, :]
    clean = _finite(tl.sum(tl.sum(b_p, 1), 0))
    first = tl.full([BT, 1], BT, tl.int32)
    if not clean:
        first = tl.min(tl.where(_finite(b_p), BT, cols), 1)[:, None]
        b_p = tl.where(cols < first, b_p, 0.0)
    r_re = _split_dot(b_p, tl.trans(e_re), EXACT_R)
    r_im = _split_dot(b_p, tl.trans(e_im), EXACT_R)
    if not clean:
        r_re = tl.where(cols <= first, r_re, float("nan"))
        r_im = tl.where(cols <= first, r_im, float("nan"))
    # (selects, not E's zeros, keep a non-finite phi_s / row of M from the steps before s / after t)
    ephi_re = tl.sum(tl.where(later, e_re * phi_re[None, :] - e_im * phi_im[None, :], 0.0), 1)
    ephi_im = tl.sum(tl.where(later, e_re * phi_im[None, :] + e_im * phi_re[None, :], 0.0), 1)
    # M = R + psi conj(A_{u-1}); t1[u] = sum_{t>=u} conj(D[t, u]) M[t, u], one plane of M at a time
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    m_re = tl.where(causal, r_re + psi_re[:, None] * ax_re[None, :] + psi_im[:, None] * ax_im[None, :], 0.0)
    t1_re = tl.sum(d_re * m_re, 0)
    t1_im = -tl.sum(d_im * m_re, 0)
    m_im = tl.where(causal, r_im + psi_im[:, None] * ax_re[None, :] - psi_re[:, None] * ax_im[None, :], 0.0)
    t1_re += tl.sum(d_im * m_im, 0)
    t1_im += tl.sum(d_re * m_im, 0)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    de_re, de_im, ae_re, ae_im = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    s_re = tl.load(pa + 4 * BT)
    s_im = tl.load(pa + 5 * BT)
    t2_re = ax_re * s_re + ax_im * s_im + ephi_re
    t2_im = ax_re * s_im - ax_im * s_re + ephi_im
    ga_re = t1_re + de_re * t2_re + de_im * t2_im
    ga_im = t1_im + de_re * t2_im - de_im * t2_re
    tl.store(dgate_re + (bt + t_idx.to(tl.int64) * H) * DGS, ga_re, mask=valid)
    tl.store(dgate_im + (bt + t_idx.to(tl.int64) * H) * DGS, ga_im, mask=valid)


def _backward(q, k, v, a_re, a_im, h0, do, dht, BT, mode, prec, chunks=None, da_out=None):
    """Gradients of q, k, v, the gate planes and (where ``h0`` is given) the initial states; ``chunks``: a packed
    batch's chunk table (:func:`_chunk_table`), ``h0``, ``dht`` then one state per sequence; ``da_out``: ``(da_re,
    da_im)`` float32 planes to write the gate's gradient into (e.g. a complex gradient's parts in place, in a layout
    :func:`.config._gate_step` takes), else new dense ones."""
    B, n, H, K, V = _dims(q, v)
    q, k, sqk = _readable(q, k, H, K)
    v = dense(v)
    NT = _cdiv(n, BT) if chunks is None else chunks.shape[0] // 4
    tab, varlen = (a_re, False) if chunks is None else (chunks, True)
    dh0 = torch.empty(h0.shape[0] * H, 2, K, V, device=q.device, dtype=torch.float32) if h0 is not None else None
    a_re, a_im, gs = _gate_planes(a_re, a_im, H)
    h, dh = _carried((k, v, h0, None), (q, do, dht, dh0), a_re, a_im, gs, sqk, BT, mode, prec,
                     chunks=chunks)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # dense, whatever q, k, v's strides
    da_re, da_im = da_out or (torch.empty_like(a_re), torch.empty_like(a_im))  # (dense: a_re's GS is 1 or 2)
    dgs = _gate_step(da_re, H)
    aux = torch.empty(B * H * NT, 6, BT, device=q.device, dtype=torch.float32)
    cfg = _cfg("bwd_dqk", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_dqk[(NT, B * H)](q, k, v, do, a_re, a_im, h, dh, dq, dk, aux, tab, n, H, NT, sqk, K=K, V=V, BT=BT,
                          BK=BK, BV=BV, MODE=mode, PREC=prec, VARLEN=varlen, GS=gs, **_launch(cfg))
    del h  # released once the last kernel reading it is queued (stream-ordered)
    cfg = _cfg("bwd_dv", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_dv[(NT, B * H)](q, k, do, a_re, a_im, dh, dv, tab, n, H, NT, sqk,
                         K=K, V=V, BT=BT, BK=BK, BV=BV, MODE=mode, PREC=prec, VARLEN=varlen, GS=gs, **_launch(cfg))
    del dh
    cfg = _cfg("bwd_gate", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    _bwd_gate[(NT, B * H)](q, k, v, do, a_re, a_im, da_re, da_im, aux, tab, n, H, NT, sqk,
                           K=K, V=V, BT=BT, BK=BK, BV=BV, MODE=mode, PREC=prec,
                           EXACT_R=mode == MODE_F32 and prec != "tf32", VARLEN=varlen, GS=gs, DGS=dgs,
                           **_launch(cfg))
    return dq, dk, dv, da_re, da_im, dh0
