"""Tensor-core products of the chunked scan's kernels (``@triton.jit`` device helpers), all accumulating in
float32: ``_dot`` runs a product in the input dtype (float32 at ``PREC``), ``_split_dot`` float32 exactly as three
tf32 dots, ``_wide_dot`` a product whose operand may leave fp16's range, ``_time_dot`` a contraction over a chunk's
steps that keeps non-finite values causal, ``_scores`` a chunk's ``A B^T`` (docs/design.md sections 6, 7, 9).
"""
import os

import triton
import triton.language as tl

from .config import MODE_BF16, MODE_F32, MODE_FP16
from .tiles import _load_steps, _load_steps_T

# the kernels' MODE values as constexprs (device code compares against these)
_F32, _BF16, _FP16 = tl.constexpr(MODE_F32), tl.constexpr(MODE_BF16), tl.constexpr(MODE_FP16)

# Under TRITON_INTERPRET=1 (Triton 3.9) a 16-bit tl.dot returns garbage: emulate it there by rounding
# the operands to the 16-bit dtype and multiplying in float32 (the interpreter's dots are exact anyway).
_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _tf32_hi(x):
    """x with its low 13 mantissa bits cleared: exact in tf32, and x - _tf32_hi(x) is exact in float32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _split_dot(a, b, EXACT: tl.constexpr):
    """float32 ``a @ b`` on tensor cores: exact to float32 as three tf32 dots of hi/lo halves
    (a_hi b_lo + a_lo b_hi + a_hi b_hi; the dropped a_lo b_lo is ~2^-20 relative) when EXACT, else one tf32
    dot. (Triton 3.6's own tf32x3 lowering ran the gate kernel's product 2-3x slower on the H100.)"""
    if EXACT:
        a_hi = _tf32_hi(a)
        b_hi = _tf32_hi(b)
        acc = tl.dot(a_hi, b - b_hi, input_precision="tf32")
        acc = tl.dot(a - a_hi, b_hi, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _dot(a, b, MODE: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` accumulated in float32, in the input dtype ``MODE``: float32 operands at ``PREC`` (``"tf32x3"``:
    :func:`_split_dot`), 16-bit ones in their own dtype."""
    if MODE == _F32:
        if PREC == "tf32x3":
            return _split_dot(a.to(tl.float32), b.to(tl.float32), True)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    elif _INTERP:
        if MODE == _BF16:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
        else:
            return tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32))
    elif MODE == _BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _wide_dot(a, b, MODE: tl.constexpr, PREC: tl.constexpr):
    """:func:`_dot` for a float32 operand of unbounded range (a state, or a score tile such as ``D o (Q K^T)``, whose
    entries exceed 65504 where the outputs still fit fp16): fp16 has too little range, so it runs in tf32 there."""
    if MODE == _FP16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return _dot(a, b, MODE, PREC)


@triton.jit
def _time_dot(m, y, REV: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr):
    """``m @ y`` contracting over the chunk's steps (:func:`_wide_dot`), causal for non-finite rows of ``y``.

    ``m`` is a (BT, BT) score tile, zero (selected) above the diagonal, or below it with ``REV`` (a transposed
    one): row t of the product sums steps s <= t of ``y`` (REV: s >= t). Inside the dot a NaN/Inf row of ``y``
    meets those zeros (0 * NaN = NaN) and would reach every row. So when ``y`` holds one (checked with one sum:
    the only extra work of the common, finite case) its rows from each column's first non-finite step on (REV: up
    to its last) are zeroed before the one product, and the result's rows from that step on (REV: up to it) are
    NaN afterwards: the exact result there is non-finite too (it holds that step's term).
    """
    rows = tl.arange(0, BT)[:, None]
    clean = _finite(tl.sum(tl.sum(y.to(tl.float32), 1), 0))
    p = tl.full([1, y.shape[1]], -1 if REV else BT, tl.int32)  # the step per column (none)
    if not clean:
        bad = ~_finite(y.to(tl.float32))
        if REV:
            p = tl.max(tl.where(bad, rows, -1), 0)[None, :]
            y = tl.where(rows > p, y, 0.0)
        else:
            p = tl.min(tl.where(bad, rows, BT), 0)[None, :]
            y = tl.where(rows < p, y, 0.0)
    out = _wide_dot(m, y, MODE, PREC)
    if not clean:
        out = tl.where((rows > p) if REV else (rows < p), out, float("nan"))
    return out


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _scores(a, b, t0, n, C: tl.constexpr, SA, SB, BT: tl.constexpr, BC: tl.constexpr, MODE: tl.constexpr,
            PREC: tl.constexpr):
    """``A B^T`` of one chunk, (BT, BT) float32, for time-major (n, C) inputs of row strides SA and SB."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_c in range(tl.cdiv(C, BC)):
        acc += _dot(_load_steps(a, t0, i_c * BC, n, C, SA, BT, BC),
                    _load_steps_T(b, t0, i_c * BC, n, C, SB, BT, BC), MODE, PREC)
    return acc
