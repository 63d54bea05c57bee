"""The chunked scan's outputs: ``_fwd_o``, parallel over (chunk, value block, batch*head), adds to the carried
state's part ``Re(A_t h_c)^T q_t`` the chunk's own ``(Re(D) o Q K^T) V``; ``_forward`` launches the state pass
(:func:`.states._carried`) and it (docs/kernels.md section 1)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import Launcher
from ..dtypes import dense
from .config import MODE_F32, _blocks, _cdiv, _cfg, _dims, _gate_planes, _launch, _readable
from .dots import _dot, _time_dot, _wide_dot
from .gates import _gate_prefix, _pair_decay, _span
from .states import _carried
from .tiles import _at, _chunk_span, _head, _load_state, _load_steps, _load_steps_T, _store_steps


@Launcher
@triton.jit
def _fwd_o(q, k, v, gate_re, gate_im, h, o, tab, n, H, NT, SQK,
           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           HT: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, GS: tl.constexpr):
    """Outputs of one (chunk, value block): the carried state's part plus the chunk's own; ``h`` in
    :func:`_load_state`'s layout (``HT``: transposed); q and k with steps ``SQK`` apart, v and o dense."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bt = _head(i_bh, n, H)
    q += _at(i_bh, n, H, K, SQK)
    k += _at(i_bh, n, H, K, SQK)
    v += bt * V
    o += bt * V
    idx = tl.arange(0, BT)
    t0, n = _chunk_span(tab, i_t, n, BT, VARLEN)
    c0 = i_v * BV
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(gate_re + bt * GS, gate_im + bt * GS, t_idx, t_idx < n, H * GS, BT)
    amag = _span(g, z, BT)
    a_re, a_im = amag * ur, amag * ui
    ph = h + (i_bh.to(tl.int64) * NT + i_t) * 2 * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        r0 = i_k * BK
        b_q = _load_steps(q, t0, r0, n, K, SQK, BT, BK)
        b_kt = _load_steps_T(k, t0, r0, n, K, SQK, BT, BK)
        b_hr = _load_state(ph, r0, c0, K, V, BK, BV, HT)
        b_hi = _load_state(ph + K * V, r0, c0, K, V, BK, BV, HT)
        b_o += _wide_dot(b_q * a_re[:, None], b_hr, MODE, PREC)
        b_o -= _wide_dot(b_q * a_im[:, None], b_hi, MODE, PREC)
        b_a += _dot(b_q, b_kt, MODE, PREC)
    causal = idx[:, None] >= idx[None, :]
    d_re, d_im = _pair_decay(g, z, ur, ui, g, z, ur, ui, causal)
    b_v = _load_steps(v, t0, c0, n, V, H * V, BT, BV)
    b_o += _time_dot(tl.where(causal, d_re * b_a, 0.0), b_v, False, MODE, PREC, BT)
    _store_steps(o, b_o, t0, c0, n, V, H * V, BT, BV)


def _forward(q, k, v, a_re, a_im, h0, store_ht, BT, mode, prec, chunks=None, nseq=None):
    """Outputs and (``store_ht``) final states, (B*H, 2, K, V); ``chunks``: a packed batch's chunk table
    (:func:`_chunk_table`), whose ``nseq`` sequences each have their own initial and final state."""
    B, n, H, K, V = _dims(q, v)
    q, k, sqk = _readable(q, k, H, K)
    v = dense(v)
    NT = _cdiv(n, BT) if chunks is None else chunks.shape[0] // 4
    varlen = chunks is not None
    a_re, a_im, gs = _gate_planes(a_re, a_im, H)
    cfg = _cfg("fwd_o", mode, K, V)
    BK, BV = _blocks(K, V, cfg)
    # float32: the states are stored transposed, (V, K) planes, so that _fwd_o's state dots (contracting over K)
    # stage their operand into shared memory as the K-major tile Hopper's tf32 tensor cores read, with no
    # transpose on the way (row-major planes cost 8-way bank-conflicted stores there, per ncu)
    trans = mode == MODE_F32
    ht = torch.empty((nseq if varlen else B) * H, 2, *((V, K) if trans else (K, V)), device=k.device,
                     dtype=torch.float32) if store_ht else None
    if trans and h0 is not None:
        h0 = h0.transpose(-1, -2).contiguous()
    h, _ = _carried((k, v, h0, ht), None, a_re, a_im, gs, sqk, BT, mode, prec, trans_f=trans,
                    chunks=chunks)
    o = v.new_empty(v.shape)  # dense, whatever v's step stride
    # num_stages=1: with the K loop software-pipelined (num_stages=2) Triton 3.6 miscompiled this kernel
    # on the H100 whenever the loop ran more than once: 7% output error in tf32 at (d, e) = (96, 160),
    # 5.7% in bf16 at (128, 64), while states and every gradient were right (the Hopper dot hazard of
    # flash-linear-attention issue 640); the interpreter gives the right answer for both.
    _fwd_o[(NT, _cdiv(V, BV), B * H)](q, k, v, a_re, a_im, h, o, a_re if chunks is None else chunks, n, H, NT,
                                      sqk, K=K, V=V, BT=BT, BK=BK, BV=BV, HT=trans, MODE=mode, PREC=prec,
                                      VARLEN=varlen, GS=gs, **_launch(cfg))
    if trans and ht is not None:
        ht = ht.transpose(-1, -2).contiguous()
    return o, ht
