"""Launch table of the chunked scan's kernels: tile widths, warps and register caps per kernel and input dtype
(``docs/kernels.md`` section 1 has the table, how it was searched, and the hazards behind its exceptions)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dtypes import cast, dense

#: the values of the kernels' ``MODE`` constexpr: the input dtype, which their tensor-core dots run in
#: (float32 at the ``precision`` asked for)
MODE_F32, MODE_BF16, MODE_FP16 = 0, 1, 2
_MODE_OF_DTYPE = {torch.float32: MODE_F32, torch.bfloat16: MODE_BF16, torch.float16: MODE_FP16}
_DTYPE_OF_MODE = {m: t for t, m in _MODE_OF_DTYPE.items()}
#: steps per chunk unless the caller asks for another (a power of two >= 16)
_DEFAULT_BT = 64
#: the longest chunk the kernels take: their (chunk x chunk) score tiles live in registers and shared memory
MAX_BT = 128
# Launch configuration per kernel and input dtype: ``cap`` bounds the key/value tile width (see ``_block``;
# ``cap_v``, where given, the value tile's), ``maxnreg`` caps the registers; for the state scan, ``block``
# elements per program. Picked by GPU timings at (64, 2048, 64) with ``python -m bench.scan_chunked --tune``
# (which edits this table in memory and checks every configuration against the default's results;
# docs/kernels.md section 1). bf16 differs from float32 in the dq/dk and dv kernels' tiles (64-wide, no register
# cap) and in _fwd_o's 8 warps (hazard H2b, docs/kernels.md). fp16 keeps the configuration validated before the
# search for every kernel with tensor-core dots: the tuned 4-warp one faulted there (an illegal address at
# (d, e) = (96, 160) with Triton 3.6 on the H100; bf16, which differs only in running its state dots in bf16
# instead of tf32, passed at every test shape).
_SEARCHED = {
    "chunk_local": {"cap": 64, "num_warps": 4},
    # eight chunks in flight per program (_state_scan_job), 4 warps: faster than four chunks on 2 warps
    "state_scan": {"block": 1024, "num_warps": 4},
    "chunk_states": {"cap": 32, "num_warps": 2, "num_stages": 3},
    # the exact float32 mode's state pass: None runs the two passes chunk_local + state_scan, a configuration
    # runs chunk_states with it (see _carried)
    "chunk_states_exact": None,
    "fwd_o": {"cap": 64, "num_warps": 4},
    # 32-wide key and 64-wide value tiles: faster than 64-wide both
    "bwd_dqk": {"cap": 32, "cap_v": 64, "num_warps": 4},
    # the one kernel a register cap helped (it spills 128 bytes)
    "bwd_dv": {"cap": 32, "num_warps": 4, "maxnreg": 128},
    "bwd_gate": {"cap": 64, "num_warps": 4},
}
_CFG = {
    torch.float32: dict(_SEARCHED),
    # 16-bit outputs on 8 warps: on 4 (the float32 entry) Triton 3.6 gave a 120% wrong output (and an illegal
    # address at real sizes) on the H100 at (d, e) = (256, 96), 64-wide key and 32-wide value tiles
    torch.bfloat16: {**_SEARCHED, "fwd_o": {"cap": 64, "num_warps": 8}, "bwd_dqk": {"cap": 64, "num_warps": 4},
                     "bwd_dv": {"cap": 64, "num_warps": 4}},
    torch.float16: {**_SEARCHED, "fwd_o": {"cap": 64, "num_warps": 8}, "bwd_dqk": {"cap": 32, "num_warps": 8},
                    "bwd_dv": {"cap": 32, "num_warps": 4}, "bwd_gate": {"cap": 32, "num_warps": 8}},
}
# Head dims that are not multiples of 32 (16-wide or masked tiles): the output and backward kernels run 32-wide
# tiles on 2 warps, below a warpgroup, so Triton lowers their dots to mma.sync instead of wgmma. Triton 3.6's
# wgmma lowering of these tiles is wrong on the H100 (docs/kernels.md): with 8 warps an illegal shared-memory
# read in _bwd_dqk's three-dot product at d = 16 and wrong float32 gate gradients at (d, e) = (48, 16); with 4
# warps a 100-300% wrong 16-bit dq at d = 16 and a wrong bf16 output at (48, 16); with 8 warps an illegal address
# in a bf16 backward at (48, 80) at real sizes.
# tests/gateloop/test_chunked_sweep.py checks every tile class on the GPU (and under compute-sanitizer in gpu.sh).
_IRREGULAR = {"cap": 32, "num_warps": 2}


def _cfg(kernel: str, mode: int, K: int = 32, V: int = 32) -> dict:
    """The launch configuration of ``kernel`` (a ``_SEARCHED`` key) for input ``mode`` at key and value head dims
    ``K``, ``V``: the table's entry, or for the output and backward kernels the exceptions below."""
    cfg = _CFG[_DTYPE_OF_MODE[mode]][kernel]
    if kernel == "fwd_o" or kernel.startswith("bwd_"):
        if K % 32 or V % 32:
            return _IRREGULAR
        # 16-bit dots on key and value tiles of different widths (64 and 32: a head dim of 96) on 8 warps: on 4,
        # Triton 3.6 gave the H100 a 94% wrong bf16 dv at (d, e) = (128, 96) (and a wrong output at (256, 96))
        if mode != MODE_F32 and cfg["num_warps"] < 8 and len(set(_blocks(K, V, cfg))) > 1:
            return {**cfg, "num_warps": 8}
    return cfg


def _cdiv(a: int, b: int) -> int:
    # host arithmetic: recent Triton (3.9 in CI) makes triton.cdiv a constexpr function, ~9 us a call
    return -(-a // b)


def _block(D: int, cap: int) -> int:
    """Tile width for a head dim: the largest power of two in [32, cap] dividing D, so tiles need no
    column masks (96 -> 32); 16 for D <= 16; else 32-wide tiles with masks (48 -> 32 + 16 masked).
    (With Triton 3.6 on the H100, masked 64-wide tiles gave wrong tf32 outputs at d = 96 and a fault in a
    bf16 backward at e = 48, and 16-wide tiles at D = 48 faulted too: none of these is used.)"""
    b = cap
    while b >= 32:
        if D % b == 0:
            return b
        b //= 2
    if D <= 16:
        return 16
    return 32


def _launch(cfg: dict) -> dict:
    """Launch options of a one-stage kernel's table entry: its warps, and its register cap where it names one
    (``maxnreg``: fewer registers per thread, more programs per SM, at the price of spills)."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": 1}
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def _blocks(K: int, V: int, cfg: dict) -> tuple[int, int]:
    """Key and value tile widths of a table entry: ``cap`` bounds both, ``cap_v`` (where given) the value one."""
    return _block(K, cfg["cap"]), _block(V, cfg.get("cap_v", cfg["cap"]))




def _dims(q: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """``(B, n, H, K, V)`` of the kernels' inputs: ``q (B, n, H, K)``, ``v (B, n, H, V)``, or ``(B, n, K)`` /
    ``(B, n, V)`` as one head (the operator's seed layout, the same memory: no views to and from ``(B, n, 1, K)``,
    whose aten calls are host time on every eager call); the gate planes are then ``(B, n)``."""
    if q.dim() == 3:
        return q.shape[0], q.shape[1], 1, q.shape[2], v.shape[-1]
    return (*q.shape, v.shape[-1])


def _step_stride(t: Tensor, H: int, C: int) -> Optional[int]:
    """The step stride ``S`` the kernels read a ``(B, n, H, C)`` input with in place (``(B, n, C)``: one head): unit
    element stride, heads ``C`` apart, steps ``S >= H C`` apart, batches ``n S`` apart (a dense input: ``S = H C``);
    None for any other layout."""
    if t.is_contiguous():  # (the common case, one cheap check: every launcher asks)
        return H * C
    B, n = t.shape[0], t.shape[1]
    st = t.stride()
    if st[-1] != 1 or (t.dim() == 4 and H > 1 and st[2] != C):
        return None
    S = st[1] if n > 1 else (st[0] if B > 1 else H * C)
    if S < H * C or (B > 1 and st[0] != n * S):
        return None
    return S


def _readable(q: Tensor, k: Tensor, H: int, K: int) -> tuple[Tensor, Tensor, int]:
    """``(q, k, S)``: q and k as the kernels read them, with one step stride ``S`` (:func:`_step_stride`): in place
    where theirs agree, e.g. views of one fused projection's ``(B, n, W)`` output (``qkv.chunk(3, -1)``, ``S = W``:
    no copies), else dense copies (``S = H K``). v, dO and the outputs stay dense: a separate step stride for v cost
    ``_fwd_o`` 23 registers (151 against 128 at d = e = 64 bf16, Triton 3.6 for sm_90: one of its 8-warp programs
    per SM instead of two), its tile offsets no longer shared with the output's."""
    sq, sk = _step_stride(q, H, K), _step_stride(k, H, K)
    if sq is None or sq != sk:
        return dense(q), dense(k), H * K
    return q, k, sq


def _gate_step(a: Tensor, H: int) -> Optional[int]:
    """The element stride ``GS`` the kernels read a ``(B, n, H)`` float32 gate plane with: 1 for a dense plane, 2 for
    a complex tensor's real or imaginary parts in place (strides ``(n H GS, H GS, GS)``, size-1 dims aside); None
    for any other layout."""
    if a.is_contiguous():  # (the common case, one cheap check: op_args and every launcher ask)
        return 1
    for gs in (1, 2):
        if all(st == want for st, want, size in zip(a.stride(), (a.shape[1] * H * gs, H * gs, gs), a.shape)
               if size > 1):
            return gs
    return None


def _gate_planes(a_re: Tensor, a_im: Tensor, H: int) -> tuple[Tensor, Tensor, int]:
    """``(a_re, a_im, GS)``: float32 gate planes in one layout the kernels read (:func:`_gate_step`), copied dense
    only where they are not (a complex gate's parts are read in place, without the two copies)."""
    a_re, a_im = cast(a_re, torch.float32), cast(a_im, torch.float32)
    gs = _gate_step(a_re, H)
    if gs is None or _gate_step(a_im, H) != gs:
        return dense(a_re), dense(a_im), 1
    return a_re, a_im, gs
