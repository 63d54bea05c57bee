"""Public scan operators with the seed's contracts, and the one place that picks a path.

* head gate, ``d = e = 1`` (and the simplified operator): the elementwise scan op
  ``gateloop::elementwise_scan`` (:mod:`gateloop_kernels.elementwise`) -- the Triton kernel on CUDA,
  the chunked reference's algorithm in PyTorch elsewhere;
* head gate, ``16 <= d, e <= 256`` on CUDA: the chunked tensor-core kernel
  (``gateloop_kernels.chunked.chunk_gate_loop``);
* everything else (other gate layouts, other sizes, float64): :func:`reference.chunked_reference`.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from ._checks import GATE_HEAD, check_gate_loop_inputs, check_initial_state, check_simple_inputs
from .chunked import chunk_gate_loop
from .reference import empty_scan
from .elementwise import elementwise_scan

__all__ = ["gate_loop_operator", "simple_gate_loop_operator", "kernel_dtypes", "chunk_kernel",
           "scan_head_gate", "CHUNK_DIMS"]

#: input dtypes the Triton kernels take (state and accumulation are float32 for all of them)
kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)
#: head and value dims the chunked tensor-core kernel covers
CHUNK_DIMS = (16, 256)


def chunk_kernel() -> Callable:
    """The chunked head-dim-16..256 kernel entry, ``gateloop_kernels.chunked.chunk_gate_loop``."""
    return chunk_gate_loop


def _complex_state(s: Optional[Tensor]) -> Optional[Tensor]:
    """An initial state as complex (a real one is the state with no imaginary part; differentiable)."""
    if s is None or s.is_complex():
        return s
    return s.to(torch.complex128 if s.dtype == torch.float64 else torch.complex64)


def scan_head_gate(q: Tensor, k: Tensor, v: Tensor, a_re: Tensor, a_im: Tensor,
                   initial_state: Optional[Tensor], output_final_state: bool):
    """Head-layout scan with the gate as real parts; the dispatch behind every public entry point.

    Args:
        q, k: ``(B, n, H, d)``; v: ``(B, n, H, e)``; real floating, one dtype.
        a_re, a_im: ``(B, n, H)`` gate real and imaginary parts (float32 recommended).
        initial_state: complex or real ``(B, H, d, e)`` or ``None``.
        output_final_state: also return the complex ``(B, H, d, e)`` final state.

    Returns:
        ``(o (B, n, H, e) in q's dtype, final_state or None)``.
    """
    B, n, H, d = q.shape
    e = v.shape[-1]
    initial_state = _complex_state(initial_state)
    if n == 0 and not (d == 1 and e == 1):  # the d = e = 1 op takes n = 0; the other paths return bare zeros
        o, final = empty_scan((B, 0, H, e), (B, H, d, e), q.dtype, initial_state, q, k, v, a_re, a_im)
        return o, (final if output_final_state else None)
    if d == 1 and e == 1 and (q.dtype in kernel_dtypes or not q.is_cuda):
        h0r = h0i = None
        if initial_state is not None:
            h0r, h0i = initial_state.real[..., 0, 0], initial_state.imag[..., 0, 0]
        o, hr, hi, _ = elementwise_scan(q[..., 0], k[..., 0], v[..., 0], a_re, a_im, h0r, h0i)
        final = torch.complex(hr, hi)[..., None, None] if output_final_state else None
        return o[..., None], final
    if (q.is_cuda and q.dtype in kernel_dtypes
            and CHUNK_DIMS[0] <= d <= CHUNK_DIMS[1] and CHUNK_DIMS[0] <= e <= CHUNK_DIMS[1]):
        return chunk_gate_loop(q, k, v, a_re.float(), a_im.float(), initial_state=initial_state,
                     output_final_state=output_final_state)
    # reference: head-major copies, a complex gate
    def heads_first(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(B * H, n, *t.shape[3:])
    a = torch.complex(a_re.float(), a_im.float()) if q.dtype != torch.float64 else \
        torch.complex(a_re.double(), a_im.double())
    s0 = None if initial_state is None else initial_state.reshape(B * H, d, e)
    out, state = reference.chunked_reference(heads_first(q), heads_first(k), heads_first(v),
                                             heads_first(a)[..., None, None], s0, return_final_state=True)
    o = out.reshape(B, H, n, e).transpose(1, 2)
    return o, (state.reshape(B, H, d, e) if output_final_state else None)


_WARNED: set = set()


def _warn_reference(layout: str, d: int, e: int, dtype: torch.dtype) -> None:
    """One warning per kind of input that runs on the GPU through the PyTorch reference."""
    if layout != GATE_HEAD:
        why = "a gate per key dim (a: (B, n, d, 1))" if layout == "key" else "a gate per value dim / per entry"
        why += " has no Triton kernel yet"
    elif dtype == torch.float64:
        why = "float64 inputs have no Triton kernel"
    else:
        why = f"head dims d={d}, e={e} are outside the kernels' range (d = e = 1, or {CHUNK_DIMS[0]}..{CHUNK_DIMS[1]})"
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"gate_loop_operator: {why}; running the chunked PyTorch reference on the GPU "
                      "(correct, much slower)", stacklevel=3)


def gate_loop_operator(q: Tensor, k: Tensor, v: Tensor, a: Tensor, *, initial_state: Optional[Tensor] = None,
                       return_final_state: bool = False, cp_group=None):
    """Gate-loop scan: ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = Re(S_t)^T q_t``.

    Args:
        q, k: ``(B, n, d)`` real floating tensors.
        v: ``(B, n, e)`` real floating tensor.
        a: gate, complex (or real: a real gate), 4 dims broadcastable to ``(B, n, d, e)``:
            ``(B, n, 1, 1)`` one gate per sequence, ``(B, n, d, 1)`` one per key dim, ...
        initial_state: optional complex (or real) ``(B, d, e)`` state before the first step.
        return_final_state: also return the complex ``(B, d, e)`` state after the last step.
        cp_group: a ``torch.distributed`` process group over which the time axis is split (this rank
            passes its slice): :func:`gateloop_kernels.context_parallel.gate_loop_operator_cp`.

    Returns:
        ``out: (B, n, e)`` in the promoted dtype of ``q, k, v``, or ``(out, final_state)``.

    CUDA inputs run the Triton kernels for a gate per head with ``d = e = 1`` or ``16 <= d, e <= 256``
    (float32/bfloat16/float16); anything else (a gate per key dim, other head dims, float64) runs the
    chunked PyTorch reference, with one warning per kind of input.

    Raises:
        TypeError: non-tensor or integer inputs. ValueError: shapes, devices.
    """
    if cp_group is not None:
        from .context_parallel import gate_loop_operator_cp  # it imports this module

        return gate_loop_operator_cp(q, k, v, a, initial_state=initial_state, return_final_state=return_final_state,
                                     cp_group=cp_group)
    layout, B, n, d, e = check_gate_loop_inputs(q, k, v, a)
    check_initial_state(initial_state, B, d, e, q.device)
    initial_state = _complex_state(initial_state)
    odt = reference.out_dtype(q, k, v)
    if n == 0 and not (d == 1 and e == 1 and layout == GATE_HEAD):
        out, state = empty_scan((B, 0, e), (B, d, e), odt, initial_state, q, k, v, a)
        return (out, state) if return_final_state else out
    fast_1 = d == 1 and e == 1 and (odt in kernel_dtypes or not q.is_cuda)
    fast_chunk = q.is_cuda and odt in kernel_dtypes and CHUNK_DIMS[0] <= min(d, e) and max(d, e) <= CHUNK_DIMS[1]
    if layout != GATE_HEAD or not (fast_1 or fast_chunk) or (odt == torch.float64 and not fast_1):
        if q.is_cuda:
            _warn_reference(layout, d, e, odt)
        return reference.chunked_reference(q, k, v, a, initial_state=initial_state,
                                           return_final_state=return_final_state)
    q, k, v = q.to(odt), k.to(odt), v.to(odt)
    if a.is_complex():
        a_re, a_im = a.real, a.imag
    else:
        a_re, a_im = a, torch.zeros_like(a)
    a_re, a_im = a_re[:, :, 0, 0].expand(B, n), a_im[:, :, 0, 0].expand(B, n)
    if fast_1:
        # (B, n, 1) sequences -> one batch of B channels, time contiguous: (1, n, B) views
        def chan(t: Tensor) -> Tensor:
            return t.reshape(B, n).t()[None]
        h0r = h0i = None
        if initial_state is not None:
            h0r, h0i = initial_state.real[:, 0, 0][None], initial_state.imag[:, 0, 0][None]
        o, hr, hi, _ = elementwise_scan(chan(q), chan(k), chan(v), a_re.t()[None], a_im.t()[None], h0r, h0i)
        out = o[0].t()[..., None]
        state = torch.complex(hr[0], hi[0])[:, None, None]
    else:
        s0 = None if initial_state is None else initial_state[:, None]
        out, state = scan_head_gate(q[:, :, None], k[:, :, None], v[:, :, None], a_re[:, :, None], a_im[:, :, None],
                                    s0, return_final_state)
        out = out[:, :, 0]
        state = None if state is None else state[:, 0]
    return (out, state) if return_final_state else out


def simple_gate_loop_operator(q: Tensor, kv: Tensor, a: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None):
    """The simplified gate loop (real gate, ``kv`` already formed, one state per channel).

    ``h_t = a_t h_{t-1} + kv_t``, ``out_t = q_t h_t``, starting from ``cache = (a_prev, kv_prev)``.

    Args:
        q, kv, a: ``(B, n, D)`` real floating tensors (``a`` is the gate, e.g. a sigmoid).
        cache: ``None`` or ``(a_prev, kv_prev)``, each ``(B, D)``, as returned by a previous call.

    Returns:
        ``(out (B, n, D), (a_last, kv_last))``: ``a_last`` the product of every gate seen (cache
        included), ``kv_last`` the state after the last step; feed it back as ``cache``.

    Raises:
        TypeError / ValueError as :func:`gate_loop_operator`.
    """
    check_simple_inputs(q, kv, a, cache)
    odt = reference.out_dtype(q, kv, a)
    if not (odt in kernel_dtypes or not q.is_cuda):
        return reference.simple_chunked_reference(q, kv, a, cache)
    q, kv, a = q.to(odt), kv.to(odt), a.to(odt)
    cache_a, cache_kv = (None, None) if cache is None else cache
    o, h_last, _, _ = elementwise_scan(q, kv, None, a, None, cache_kv, None)
    rdt = h_last.dtype
    a_last = a.to(rdt).prod(dim=1)
    if cache_a is not None:
        a_last = cache_a.to(rdt) * a_last
    return o, (a_last.to(odt), h_last.to(odt))
