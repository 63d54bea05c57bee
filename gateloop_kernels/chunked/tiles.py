"""Addressing of the chunked scan's kernels (``@triton.jit`` device helpers): a head's offset, a chunk's steps
(from the packed batch's chunk table with ``VARLEN``), and masked loads and stores of time-major tiles
(``(BT, BC)`` blocks of a ``(n, C)`` input) and of state-plane tiles (``(BK, BV)`` blocks of a ``(K, V)`` plane,
row-major or stored transposed)."""
import triton
import triton.language as tl


@triton.jit
def _head(i_bh, n, H):
    """Offset, in steps x heads, of head ``i_bh % H`` of batch ``i_bh // H`` in a ``(B, n, H, ...)`` tensor."""
    return (i_bh // H).to(tl.int64) * n * H + i_bh % H


@triton.jit
def _at(i_bh, n, H, C: tl.constexpr, S):
    """Offset of head ``i_bh % H`` of batch ``i_bh // H`` at step 0 in a ``(B, n, H, C)`` input with steps ``S``
    apart and batches ``n S`` (``config._step_stride``; a dense input's ``S = H C`` gives ``_head(i_bh, n, H) * C``)."""
    return (i_bh // H).to(tl.int64) * n * S + (i_bh % H) * C


@triton.jit
def _slot(tab, i_t):
    """The four chunk-table entries of slot ``i_t``: first step, end step, sequence, flags."""
    p = tab + i_t.to(tl.int64) * 4
    return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)


@triton.jit
def _chunk_span(tab, i_t, n, BT: tl.constexpr, VARLEN: tl.constexpr):
    """Steps ``[t0, end)`` of chunk slot ``i_t``: from the chunk table (:func:`.states._chunk_table`) with ``VARLEN``,
    else ``[i_t BT, n)`` (the mask bound ``end`` may pass the chunk: every tile is BT steps from t0)."""
    if VARLEN:
        t0, end, _, _ = _slot(tab, i_t)  # (the unused entries' loads are dead code to the compiler)
        return t0, end
    return i_t * BT, n


@triton.jit
def _opens_closes(seq, flags, REV: tl.constexpr):
    """A slot's sequence (int64) and whether the carry opens / closes that sequence there: forward, its
    first / last chunk; reverse (``REV``), its last / first chunk."""
    first = (flags & 1) != 0
    last = (flags & 2) != 0
    if REV:
        return seq.to(tl.int64), last, first
    return seq.to(tl.int64), first, last


@triton.jit
def _seq_ends(tab, i_t, REV: tl.constexpr):
    """:func:`_opens_closes` of chunk slot ``i_t`` (packed batch), read from the table."""
    _, _, seq, flags = _slot(tab, i_t)
    return _opens_closes(seq, flags, REV)


@triton.jit
def _load_steps(ptr, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    """(BT, BC) tile of a time-major (n, C) matrix with row stride S (zeros outside)."""
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[:, None]
    else:
        m = ((t0 + rr) < n)[:, None] & (cc < C)[None, :]
    return tl.load(ptr + t0.to(tl.int64) * S + rr[:, None] * S + cc[None, :], mask=m, other=0.0)


@triton.jit
def _load_steps_T(ptr, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    """Transposed (BC, BT) tile of a time-major (n, C) matrix with row stride S."""
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[None, :]
    else:
        m = (cc < C)[:, None] & ((t0 + rr) < n)[None, :]
    return tl.load(ptr + t0.to(tl.int64) * S + rr[None, :] * S + cc[:, None], mask=m, other=0.0)


@triton.jit
def _store_steps(ptr, x, t0, c0, n, C: tl.constexpr, S, BT: tl.constexpr, BC: tl.constexpr):
    """Store the (BT, BC) tile ``x`` into a time-major (n, C) matrix with row stride S (in its dtype)."""
    rr = tl.arange(0, BT)
    cc = c0 + tl.arange(0, BC)
    if C % BC == 0:
        m = ((t0 + rr) < n)[:, None]
    else:
        m = ((t0 + rr) < n)[:, None] & (cc < C)[None, :]
    tl.store(ptr + t0.to(tl.int64) * S + rr[:, None] * S + cc[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _load_plane(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """(BK, BV) tile of a row-major (K, V) state plane."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        return tl.load(ptr + rr[:, None] * V + cc[None, :])
    m = (rr < K)[:, None] & (cc < V)[None, :]
    return tl.load(ptr + rr[:, None] * V + cc[None, :], mask=m, other=0.0)


@triton.jit
def _load_plane_T(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Transposed (BV, BK) tile of a row-major (K, V) state plane."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        return tl.load(ptr + rr[None, :] * V + cc[:, None])
    m = (cc < V)[:, None] & (rr < K)[None, :]
    return tl.load(ptr + rr[None, :] * V + cc[:, None], mask=m, other=0.0)


@triton.jit
def _store_plane(ptr, x, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Store the (BK, BV) tile ``x`` into a row-major (K, V) state plane (in its dtype)."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    if K % BK == 0 and V % BV == 0:
        tl.store(ptr + rr[:, None] * V + cc[None, :], x.to(ptr.dtype.element_ty))
    else:
        m = (rr < K)[:, None] & (cc < V)[None, :]
        tl.store(ptr + rr[:, None] * V + cc[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _load_state(ptr, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                TRANS: tl.constexpr):
    """(BK, BV) tile of a (K, V) state plane stored row-major, or (``TRANS``) stored as its (V, K) transpose."""
    if TRANS:
        return _load_plane_T(ptr, c0, r0, V, K, BV, BK)
    return _load_plane(ptr, r0, c0, K, V, BK, BV)


@triton.jit
def _state_offsets(r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TRANS: tl.constexpr):
    """Offsets and bounds mask of the (BK, BV) tile at (r0, c0) of a state plane in :func:`_load_state`'s layout."""
    rr = r0 + tl.arange(0, BK)
    cc = c0 + tl.arange(0, BV)
    ok = (rr < K)[:, None] & (cc < V)[None, :]
    if TRANS:
        return cc[None, :] * K + rr[:, None], ok
    return rr[:, None] * V + cc[None, :], ok


@triton.jit
def _store_state(ptr, x, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 TRANS: tl.constexpr):
    """Store the (BK, BV) tile ``x`` of a (K, V) state plane in :func:`_load_state`'s layout."""
    if TRANS:
        _store_plane(ptr, tl.trans(x), c0, r0, V, K, BV, BK)
    else:
        _store_plane(ptr, x, r0, c0, K, V, BK, BV)
