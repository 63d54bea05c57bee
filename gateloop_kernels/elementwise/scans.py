"""Device helpers: the tile scans over complex affine maps ``h -> a h + x`` (``_combine``), their resetting form for
packed sequences (``_combine_reset``: a select at a sequence's first step), the reverse-time scans of the adjoint and
the carry's application to a scanned tile (docs/design.md section 5, "Tile scan")."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(ar1, ai1, hr1, hi1, ar2, ai2, hr2, hi2):
    """Compose the complex affine maps ``h -> a1 h + h1`` then ``h -> a2 h + h2``."""
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * hr1 - ai2 * hi1 + hr2, ar2 * hi1 + ai2 * hr1 + hi2)


@triton.jit
def _combine_reset(ar1, ai1, hr1, hi1, r1, ar2, ai2, hr2, hi2, r2):
    """:func:`_combine` for maps that may reset (``r = 1``: ``h -> h2``, the state before is dropped). A select,
    not a zero gate, so not even a NaN or Inf crosses a sequence boundary; a reset map's ``a`` is never used."""
    ar, ai, hr, hi = _combine(ar1, ai1, hr1, hi1, ar2, ai2, hr2, hi2)
    keep = r2 != 0
    return (tl.where(keep, ar2, ar), tl.where(keep, ai2, ai), tl.where(keep, hr2, hr), tl.where(keep, hi2, hi),
            tl.maximum(r1, r2))


@triton.jit
def _scan_reverse(ar, ai, x):
    """Inclusive reverse-time scan of ``h -> a h + x`` (real ``x``) along axis 0: ``(A_r, A_i, H_r, H_i)``.

    Written as flip, forward scan, flip: with a tile's rows inside each thread the flips move no data,
    where ``associative_scan(reverse=True)`` shuffles every component across lanes (Triton 3.6)."""
    A_r, A_i, H_r, H_i = tl.associative_scan((tl.flip(ar, 0), tl.flip(ai, 0), tl.flip(x, 0), tl.zeros_like(x)),
                                             0, _combine)
    return tl.flip(A_r, 0), tl.flip(A_i, 0), tl.flip(H_r, 0), tl.flip(H_i, 0)


@triton.jit
def _scan_reverse_reset(ar, ai, xr, xi, r):
    """:func:`_scan_reverse` of resetting maps (complex ``x``, resets ``r``): ``(A_r, A_i, H_r, H_i)``."""
    A_r, A_i, H_r, H_i, _ = tl.associative_scan((tl.flip(ar, 0), tl.flip(ai, 0), tl.flip(xr, 0), tl.flip(xi, 0),
                                                 tl.flip(r, 0)), 0, _combine_reset)
    return tl.flip(A_r, 0), tl.flip(A_i, 0), tl.flip(H_r, 0), tl.flip(H_i, 0)


@triton.jit
def _apply_carry(A_r, A_i, H_r, H_i, reset, car_r, car_i):
    """Composed maps ``(A, H)`` applied to the ``(BLOCK_C,)`` state ``car``, but for the rows where ``reset``
    (``(BLOCK_T,)``: their map drops the state): ``(h_r, h_i)``."""
    h_r = H_r + A_r * car_r[None, :] - A_i * car_i[None, :]
    h_i = H_i + A_r * car_i[None, :] + A_i * car_r[None, :]
    return tl.where(reset[:, None], H_r, h_r), tl.where(reset[:, None], H_i, h_i)
