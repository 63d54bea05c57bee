"""The gates of one chunk (``@triton.jit`` device helpers): chunk-local prefixes (log-magnitude ``g``, reset
count ``z``, unit phasor ``u``), the spans ``|prod a_w|`` they give, and the complex decay tiles
``D[t, s] = prod_{s<w<=t} a_w`` built from them without dividing by a gate (docs/design.md sections 3 and 9)."""
import triton
import triton.language as tl

from .dots import _finite


@triton.jit
def _cmul(ar, ai, br, bi):
    """The complex product ``(ar + i ai)(br + i bi)`` as (Re, Im): the phasor scan's combine."""
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _gate_prefix(a_re_ptr, a_im_ptr, t_idx, valid, stride, BT: tl.constexpr):
    """Chunk-local prefixes of the gates at ``t_idx`` (gate 1 where not ``valid``).

    Returns ``g`` (sum of log|a| over finite non-zero gates), ``z`` (a reset count: 1 per zero gate, BT + 1 per
    non-finite gate; see :func:`_span`) and the unit phasor ``(ur, ui)`` (product of a/|a| over finite non-zero
    gates), all inclusive. |a|^2 is formed in float64 from the exact squares of the float32 parts: it neither
    underflows for tiny gates (|a| < 1e-19) nor biases log|a| near |a| = 1 (float32's rounded magnitude did, by
    up to 1e-3 relative: an error that grew linearly with n), and the phasors are unit to float32 rounding.
    """
    ar = tl.load(a_re_ptr + t_idx.to(tl.int64) * stride, mask=valid, other=1.0).to(tl.float64)
    ai = tl.load(a_im_ptr + t_idx.to(tl.int64) * stride, mask=valid, other=0.0).to(tl.float64)
    m2 = ar * ar + ai * ai
    zero = m2 == 0.0
    bad = ~_finite(m2)
    live = ~(zero | bad)
    m2 = tl.where(live, m2, 1.0)
    inv = 1.0 / tl.sqrt(m2)
    lg = tl.where(live, 0.5 * tl.log(m2), 0.0).to(tl.float32)
    pr = tl.where(live, ar * inv, 1.0)
    pi = tl.where(live, ai * inv, 0.0)
    g = tl.cumsum(lg, 0)
    z = tl.cumsum(tl.where(bad, BT + 1, zero.to(tl.int32)), 0)
    ur, ui = tl.associative_scan((pr, pi), 0, _cmul)
    return g, z, ur.to(tl.float32), ui.to(tl.float32)


@triton.jit
def _span(dg, dz, BT: tl.constexpr):
    """|prod a_w| over a span of gates with log-magnitude sum ``dg`` and reset count ``dz`` (differences of
    :func:`_gate_prefix`'s ``g``, ``z``): exp(dg) with no reset, 0 across a zero gate, NaN across a non-finite
    gate (dz > BT). Non-finite gates thus poison exactly the spans that hold them; every per-step quantity of a
    chunk reads its gates through here, so the (BT, BT) decay tiles may treat them as resets (zero), finite."""
    return tl.where(dz == 0, tl.exp(dg), tl.where(dz > BT, float("nan"), 0.0))


@triton.jit
def _last(x, idx, BT: tl.constexpr):
    """``x`` at the chunk's last step (``idx == BT - 1``), as a scalar."""
    return tl.sum(tl.where(idx == BT - 1, x, 0), 0)


@triton.jit
def _ends(g, z, ur, ui, idx, BT: tl.constexpr):
    """The chunk's full prefixes (the values at its last step) of :func:`_gate_prefix`'s outputs."""
    return _last(g, idx, BT), _last(z, idx, BT), _last(ur, idx, BT), _last(ui, idx, BT)


@triton.jit
def _pair_decay(gt, zt, urt, uit, gs, zs, urs, uis, ok):
    """``D[t, s] = [ok and z_t == z_s] exp(g_t - g_s) u_t conj(u_s)`` as (Re, Im) tiles (finite, exact zeros
    outside ``ok``: a product with a non-finite tile is masked with a select, never by these zeros)."""
    ok = ok & (zt[:, None] == zs[None, :])
    mag = tl.where(ok, tl.exp(gt[:, None] - gs[None, :]), 0.0)
    re = mag * (urt[:, None] * urs[None, :] + uit[:, None] * uis[None, :])
    im = mag * (uit[:, None] * urs[None, :] - urt[:, None] * uis[None, :])
    return re, im


@triton.jit
def _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT: tl.constexpr):
    """``D[C-1, s]`` (Re, Im) per s and the chunk total ``A_end`` (Re, Im)."""
    mag = _span(g_end - g, z_end - z, BT)
    wre = mag * (ur_end * ur + ui_end * ui)
    wim = mag * (ui_end * ur - ur_end * ui)
    amag = _span(g_end, z_end, BT)
    return wre, wim, amag * ur_end, amag * ui_end


@triton.jit
def _chunk_gates(gate_re, gate_im, t0, n, H, BT: tl.constexpr):
    """The gates of the chunk starting at step ``t0``: :func:`_gate_prefix`'s ``(g, z, ur, ui)`` and the
    decay to the chunk's end ``D[C-1, s]`` (Re, Im) per step."""
    idx = tl.arange(0, BT)
    t_idx = t0 + idx
    g, z, ur, ui = _gate_prefix(gate_re, gate_im, t_idx, t_idx < n, H, BT)
    g_end, z_end, ur_end, ui_end = _ends(g, z, ur, ui, idx, BT)
    de_re, de_im, _, _ = _end_decay(g, z, ur, ui, g_end, z_end, ur_end, ui_end, BT)
    return g, z, ur, ui, de_re, de_im
