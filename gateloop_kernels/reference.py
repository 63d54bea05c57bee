"""Pure-PyTorch references of the gate-loop scan: the test oracles and the CPU path.

Three implementations of ``o_t = Re(S_t)^T q_t`` with ``S_t = a_t S_{t-1} + k_t v_t^T``
(see ``docs/design.md``), each a small function, all differentiable through autograd:

* :func:`associative_scan_reference` -- the seed's semantics (a parallel associative scan that
  materializes every state, ``O(B n d e)`` memory);
* :func:`sequential_reference` -- a plain loop over time, the float64 ground truth;
* :func:`chunked_reference` -- the chunked algorithm the kernels implement: chunk-local gate
  products (only ever products of gates *forward* in time, no division, so zero gates are exact),
  the complex state carried between chunks. Memory ``O(B n (d + e + C) + B (n / C) d e)``.

The same trio exists for the simplified operator (real gate, ``kv`` given, per channel).
Half-precision inputs are computed in float32; float64 stays float64. Outputs come back in the
promoted dtype of ``q, k, v`` (the gate's precision does not decide it: there is no complex bf16).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import GATE_HEAD, check_gate_loop_inputs, check_initial_state, check_reference_chunk, check_simple_inputs
from .dtypes import acc_dtypes, empty_scan, out_dtype, real_dtype  # noqa: F401 (real_dtype: re-exported)

__all__ = [
    "associative_scan_reference",
    "sequential_reference",
    "chunked_reference",
    "simple_associative_scan_reference",
    "simple_sequential_reference",
    "simple_chunked_reference",
    "diagonal_scan_chunked",
]

DEFAULT_CHUNK = 64


def _no_autocast(fn: Callable) -> Callable:
    """Run ``fn`` in its own accumulation dtypes whatever autocast region it is called from
    (plain ``with`` blocks, so torch.compile traces through them)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------- (1) associative scan

def _associative_scan(op: Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]],
                      elems: Sequence[Tensor]) -> list[Tensor]:
    """Inclusive scan of ``elems`` (tuples of tensors, time on dim 1) under the associative ``op``.

    Odd/even recursion: combine neighbouring pairs, scan the half-length sequence, then fill
    the even positions from their odd predecessors.
    """
    n = elems[0].shape[1]
    if n < 2:
        return list(elems)
    paired = op([x[:, 0:n - 1:2] for x in elems], [x[:, 1:n:2] for x in elems])
    odd = _associative_scan(op, paired)  # prefixes ending at positions 1, 3, 5, ...
    evens_right = [x[:, 2::2] for x in elems]
    m = evens_right[0].shape[1]
    evens = op([o[:, :m] for o in odd], evens_right)  # prefixes ending at positions 2, 4, ...
    out = []
    for x, ev, od in zip(elems, evens, odd):
        full = torch.cat([x[:, :1], ev], dim=1)
        merged = full.new_empty((x.shape[0], n, *full.shape[2:]))
        merged[:, 0::2] = full
        merged[:, 1::2] = od
        out.append(merged)
    return out


def _gate_combine(left: Sequence[Tensor], right: Sequence[Tensor]) -> list[Tensor]:
    a_i, s_i = left
    a_j, s_j = right
    return [a_j * a_i, a_j * s_i + s_j]


@_no_autocast
def associative_scan_reference(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """The seed's ``gate_loop_operator``: materializes every ``S_t`` via an associative scan.

    Shapes as :func:`gateloop_kernels.gate_loop_operator`. Memory ``O(B n d e)``.
    """
    check_gate_loop_inputs(q, k, v, a)
    odt = out_dtype(q, k, v)
    rdt, cdt = acc_dtypes(odt)
    kv = torch.einsum("bnd,bne->bnde", k.to(rdt), v.to(rdt)).to(cdt)
    _, states = _associative_scan(_gate_combine, [a.to(cdt), kv])
    return torch.einsum("bnd,bnde->bne", q.to(rdt), states.real).to(odt)


# ----------------------------------------------------------------------------- (2) sequential

@_no_autocast
def sequential_reference(q: Tensor, k: Tensor, v: Tensor, a: Tensor, initial_state: Optional[Tensor] = None,
                         return_final_state: bool = False):
    """Plain loop over time (the ground truth): any gate layout broadcastable to ``(B, n, d, e)``.

    ``initial_state``: optional complex ``(B, d, e)`` state before step 0. Returns ``out (B, n, e)``,
    and the final complex state ``(B, d, e)`` too when ``return_final_state``.
    """
    _, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    check_initial_state(initial_state, B, d, e, q.device)
    odt = out_dtype(q, k, v)
    rdt, cdt = acc_dtypes(odt)
    qf, kf, vf = q.to(rdt), k.to(rdt), v.to(rdt)
    ac = a.to(cdt).expand(B, n, d, e)
    state = q.new_zeros((B, d, e), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    outs = []
    for t in range(n):
        state = ac[:, t] * state + (kf[:, t, :, None] * vf[:, t, None, :]).to(cdt)
        outs.append(torch.einsum("bd,bde->be", qf[:, t], state.real))
    if n == 0:
        out, state = empty_scan((B, 0, e), (B, d, e), odt, initial_state, q, k, v, a)
    else:
        out = torch.stack(outs, dim=1).to(odt)
    return (out, state) if return_final_state else out


# ----------------------------------------------------------------------------- (3) chunked

def _pad_time(t: Tensor, total: int, value: float) -> Tensor:
    """``t`` padded with ``value`` along dim 1 to ``total`` steps; by ``F.pad``, whose backward copies (``cat``'s
    would hand the caller's input a view with holes into the padded gradient: the README promises dense ones)."""
    extra = total - t.shape[1]
    if extra == 0:
        return t
    return F.pad(t, (0, 0) * (t.ndim - 2) + (0, extra), value=value)


def _fit_chunk(chunk_size: int, n: int) -> int:
    """``chunk_size``, or the power of two covering ``n`` steps where that is smaller: a longer chunk computes the
    same on no-op padding, its work and memory growing with ``chunk_size`` (``2**40`` for 20 steps ran out of
    memory; ``2**16`` took minutes)."""
    return min(chunk_size, 1 << max(n - 1, 0).bit_length())


def diagonal_scan_chunked(a: Tensor, x: Tensor, h0: Optional[Tensor] = None,
                          chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """First-order scan ``h_t = a_t h_{t-1} + x_t`` per channel, chunked.

    ``a, x: (B, n, D)`` (real or complex, one dtype), ``h0: (B, D)`` or ``None``; ``chunk_size`` a positive int
    (TypeError / ValueError otherwise).
    Returns ``(h (B, n, D), h_last (B, D))``. Within a chunk the scan runs step by step for all
    chunks at once; the carries between chunks run over the ``n / C`` chunk ends. Memory ``O(B n D)``.
    """
    chunk_size = check_reference_chunk(chunk_size)
    B, n, D = x.shape
    h = x.new_zeros((B, D)) if h0 is None else h0.to(x.dtype)
    if n == 0:
        return x, h
    C = _fit_chunk(chunk_size, n)
    nc = -(-n // C)
    ac = _pad_time(a, nc * C, 1.0).reshape(B, nc, C, D)
    xc = _pad_time(x, nc * C, 0.0).reshape(B, nc, C, D)
    hloc, cum = _scan_chunks(ac, xc)  # (B, nc, C, D)
    starts = []
    for c in range(nc):
        starts.append(h)
        h = cum[:, c, -1] * h + hloc[:, c, -1]
    out = hloc + cum * torch.stack(starts, dim=1)[:, :, None]
    return out.reshape(B, nc * C, D)[:, :n], h


def _scan_chunks(ac: Tensor, xc: Tensor) -> tuple[Tensor, Tensor]:
    """Each chunk of ``ac, xc: (..., C, D)`` scanned alone from a zero state, step by step for all chunks at once:
    ``(h (..., C, D), gate products prod_{u <= t} a_u (..., C, D))``."""
    local, prods = [], []
    hl, pr = torch.zeros_like(xc[..., 0, :]), torch.ones_like(ac[..., 0, :])
    for t in range(ac.shape[-2]):
        hl = ac[..., t, :] * hl + xc[..., t, :]
        pr = pr * ac[..., t, :]
        local.append(hl)
        prods.append(pr)
    return torch.stack(local, dim=-2), torch.stack(prods, dim=-2)


def _cumprod(a: Tensor) -> Tensor:
    """Inclusive product along the last dim by doubling (Hillis-Steele): in autograd each gate's gradient
    is a product of the others, where ``torch.cumprod``'s backward divides by the gate (NaN for a NaN
    gate whose true gradient is finite; precision lost where ``grad * gate`` underflows)."""
    shift = 1
    while shift < a.shape[-1]:
        a = torch.cat((a[..., :shift], a[..., shift:] * a[..., :-shift]), dim=-1)
        shift *= 2
    return a


def _reverse_exclusive_cumprod(a: Tensor) -> Tensor:
    """``r[s] = prod_{s < u} a_u`` along the last dim (forward products only: exact at zero gates)."""
    return _cumprod(torch.cat((a[..., 1:], torch.ones_like(a[..., :1])), dim=-1).flip(-1)).flip(-1)


def _causal_attend(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """``out_t = sum_{s <= t} Re(prod_{s < u <= t} a_u) (q_t . k_s) v_s`` along dim -2 (a power-of-two length).

    ``q, k: (..., P, d)``, ``v: (..., P, e)``, ``a: (..., P)`` complex. Halving: each level pairs the
    later half of every ``2m``-block with its earlier half, so every product and every contraction
    (forward and in autograd's backward) involves a step and earlier ones only: a NaN or Inf at step
    ``s`` reaches rows ``t >= s`` only, where a masked ``P x P`` matmul multiplies it by zero into every row.
    """
    P = q.shape[-2]
    out = (q * k).sum(-1, keepdim=True) * v
    m = P // 2
    while m:
        g = P // (2 * m)
        ql = q.unflatten(-2, (g, 2, m))[..., 1, :, :]
        ke, ve = k.unflatten(-2, (g, 2, m))[..., 0, :, :], v.unflatten(-2, (g, 2, m))[..., 0, :, :]
        ae, al = a.unflatten(-1, (g, 2, m)).unbind(-2)
        # decay from earlier column s to later row t: (prod_{s < u in earlier half}) (prod_{u <= t in later half})
        lt, rs = _cumprod(al), _reverse_exclusive_cumprod(ae)
        decay = (lt[..., :, None] * rs[..., None, :]).real
        add = (decay * (ql @ ke.transpose(-1, -2))) @ ve
        first, second = out.unflatten(-2, (g, 2, m)).split(1, dim=-3)
        out = torch.cat((first, second + add[..., None, :, :]), dim=-3).flatten(-4, -2)
        m //= 2
    return out


def _chunked_head_gate(q: Tensor, k: Tensor, v: Tensor, a: Tensor, state: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """Scalar complex gate per step ``a: (B, n)``; ``q, k: (B, n, d)``, ``v: (B, n, e)``, ``state: (B, d, e)``."""
    B, n, d = q.shape
    e = v.shape[2]
    C = _fit_chunk(C, n)
    nc = -(-n // C)
    P = 1 << (C - 1).bit_length()  # each chunk padded to a power of two (gate 1, zero inputs: no-op steps)

    def chunks(t: Tensor, value: float) -> Tensor:
        t = _pad_time(t, nc * C, value).reshape(B, nc, C, *t.shape[2:])
        return _pad_time(t.flatten(0, 1), P, value).unflatten(0, (B, nc))

    qc, kc, vc, ac = chunks(q, 0.0), chunks(k, 0.0), chunks(v, 0.0), chunks(a, 1.0)
    out, cum, update = _chunk_local(qc, kc, vc, ac)
    starts = []
    # unbind, not update[:, c]: one backward stack instead of a zero-filled (B, nc, d, e) per chunk
    for total, upd in zip(cum[:, :, -1, None, None].unbind(1), update.unbind(1)):
        starts.append(state)
        state = total * state + upd
    out = _add_state(out, cum, qc, torch.stack(starts, dim=1))
    return out[:, :, :C].reshape(B, nc * C, e)[:, :n].contiguous(), state  # not a view of the padded chunks


def _chunk_local(qc: Tensor, kc: Tensor, vc: Tensor, ac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What each chunk does alone (``qc, kc: (..., P, d)``, ``vc: (..., P, e)``, ``ac: (..., P)`` complex, a
    power-of-two ``P``): the outputs of its own steps, the gate products ``prod_{u <= t} a_u`` and its own
    state update ``sum_s prod_{s < u} a_u k_s v_s^T`` ``(..., d, e)`` complex."""
    out = _causal_attend(qc, kc, vc, ac)
    cum = _cumprod(ac)
    to_end = _reverse_exclusive_cumprod(ac)
    upd_re = (kc * to_end.real[..., None]).transpose(-1, -2) @ vc
    upd_im = (kc * to_end.imag[..., None]).transpose(-1, -2) @ vc
    return out, cum, torch.complex(upd_re, upd_im)


def _add_state(out: Tensor, cum: Tensor, qc: Tensor, s: Tensor) -> Tensor:
    """A chunk's outputs plus the contribution ``Re(prod_{u <= t} a_u s)^T q_t`` of the state ``s (..., d, e)``
    entering it."""
    return out + cum.real[..., None] * (qc @ s.real) - cum.imag[..., None] * (qc @ s.imag)


@_no_autocast
def chunked_reference(q: Tensor, k: Tensor, v: Tensor, a: Tensor, initial_state: Optional[Tensor] = None,
                      return_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK):
    """Chunked gate-loop scan (docs/design.md) for a gate per head ``a: (B|1, n, 1, 1)``.

    ``d = e = 1`` runs as a chunked first-order scan; ``d, e > 1`` as intra-chunk decayed attention
    over the step pairs ``s <= t`` only (:func:`_causal_attend`) plus a complex state carried between
    chunks. Either way a NaN or Inf at step ``t`` reaches outputs at ``t`` and later only, and gradients
    as the true math does (a bad ``k`` or ``v`` none of earlier steps). Other gate layouts (per key dim,
    per value dim) fall back to :func:`sequential_reference`. Arguments and returns as there.
    """
    layout, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    if layout != GATE_HEAD:
        return sequential_reference(q, k, v, a, initial_state, return_final_state)
    check_initial_state(initial_state, B, d, e, q.device)
    chunk_size = check_reference_chunk(chunk_size)
    odt = out_dtype(q, k, v)
    rdt, cdt = acc_dtypes(odt)
    qf, kf, vf = q.to(rdt), k.to(rdt), v.to(rdt)
    gate = a.to(cdt)[:, :, 0, 0].expand(B, n)
    state = q.new_zeros((B, d, e), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    if n == 0:
        out, state = empty_scan((B, 0, e), (B, d, e), odt, initial_state, q, k, v, a)
    elif d == 1 and e == 1:
        h, last = diagonal_scan_chunked(gate[..., None], (kf * vf).to(cdt), state[:, :, 0], chunk_size)
        out, state = (qf * h.real).to(odt), last[:, :, None]
    else:
        out, state = _chunked_head_gate(qf, kf, vf, gate, state, chunk_size)
        out = out.to(odt)
    return (out, state) if return_final_state else out


# ----------------------------------------------------------------------------- simplified operator

def _simple_finish(q: Tensor, h: Tensor, a: Tensor, cache_a: Optional[Tensor], h_last: Tensor, odt: torch.dtype):
    a_last = a.prod(dim=1)
    if cache_a is not None:
        a_last = cache_a.to(a.dtype) * a_last
    return (q * h).to(odt), (a_last.to(odt), h_last.to(odt))


def _simple_prepare(q: Tensor, kv: Tensor, a: Tensor, cache):
    check_simple_inputs(q, kv, a, cache)
    odt = out_dtype(q, kv, a)
    rdt, _ = acc_dtypes(odt)
    cache_a, cache_kv = (None, None) if cache is None else (cache[0].to(rdt), cache[1].to(rdt))
    return q.to(rdt), kv.to(rdt), a.to(rdt), cache_a, cache_kv, odt


@_no_autocast
def simple_associative_scan_reference(q: Tensor, kv: Tensor, a: Tensor, cache=None):
    """The seed's simplified ``gate_loop_operator(q, kv, a, cache)``: the cache is a prefix step.

    ``q, kv, a: (B, n, D)`` real; ``cache``: ``(a_prev, kv_prev)`` each ``(B, D)`` or ``None``.
    Returns ``(q * h, (a_last, kv_last))`` with ``a_last`` the product of all gates seen.
    """
    qf, kvf, af, cache_a, cache_kv, odt = _simple_prepare(q, kv, a, cache)
    if cache is not None:
        af = torch.cat([cache_a[:, None], af], dim=1)
        kvf = torch.cat([cache_kv[:, None], kvf], dim=1)
    if af.shape[1] == 0:
        B, _, D = q.shape
        ones, zeros = q.new_ones((B, D), dtype=odt), q.new_zeros((B, D), dtype=odt)
        return q.new_zeros(q.shape, dtype=odt), (ones, zeros)
    a_scan, h = _associative_scan(_gate_combine, [af, kvf])
    if cache is not None:
        a_scan, h = a_scan[:, 1:], h[:, 1:]
    a_last = a_scan[:, -1] if a_scan.shape[1] else cache_a
    h_last = h[:, -1] if h.shape[1] else cache_kv
    return (qf * h).to(odt), (a_last.to(odt), h_last.to(odt))


@_no_autocast
def simple_sequential_reference(q: Tensor, kv: Tensor, a: Tensor, cache=None):
    """Plain loop over time for the simplified operator; arguments and returns as the seed's."""
    qf, kvf, af, cache_a, cache_kv, odt = _simple_prepare(q, kv, a, cache)
    h = qf.new_zeros((q.shape[0], q.shape[2])) if cache_kv is None else cache_kv
    hs = []
    for t in range(q.shape[1]):
        h = af[:, t] * h + kvf[:, t]
        hs.append(h)
    hall = torch.stack(hs, dim=1) if hs else torch.zeros_like(qf)
    return _simple_finish(qf, hall, af, cache_a, h, odt)


@_no_autocast
def simple_chunked_reference(q: Tensor, kv: Tensor, a: Tensor, cache=None, chunk_size: int = DEFAULT_CHUNK):
    """Chunked simplified operator (:func:`diagonal_scan_chunked`); arguments and returns as the seed's."""
    qf, kvf, af, cache_a, cache_kv, odt = _simple_prepare(q, kv, a, cache)
    h, h_last = diagonal_scan_chunked(af, kvf, cache_kv, chunk_size)
    return _simple_finish(qf, h, af, cache_a, h_last, odt)
