"""The head-dim-1 scan in PyTorch: the custom op's implementation off the kernel devices (:func:`_torch_forward`,
:func:`_torch_backward`, on ``reference.diagonal_scan_chunked``), with packed sequences as a chunked segmented
scan whose resets are selects (:func:`_segmented_scan`) and ``torch.searchsorted`` for each step's sequence
(docs/design.md section 5, "Off CUDA" and "Packed sequences")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dtypes import acc_dtypes
from ..reference import diagonal_scan_chunked


def _packed_rows(cu_seqlens: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per step of a packed batch: ``(seq, start, last)``, its sequence (the last ``i`` with ``cu[i] <= t``: empty
    sequences hold no step) and whether it is that sequence's first and last step; on the device, no sync."""
    pos = torch.arange(n, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens.contiguous(), pos, right=True) - 1
    return seq, cu_seqlens[seq] == pos, cu_seqlens[seq + 1] == pos + 1


def _segmented_scan(a: Tensor, x: Tensor, reset: Tensor, chunk: int = 64) -> Tensor:
    """``h_t = x_t`` where ``reset_t`` (``(n,)`` bool), else ``a_t h_{t-1} + x_t``, from ``h_{-1} = 0``, along dim 1
    of ``(B, n, D)``. Chunked like ``reference.diagonal_scan_chunked`` (steps within chunks, then the carries over
    chunk ends), with the resets as selects: nothing crosses one, not even a NaN or Inf."""
    B, n, D = x.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n
    ac = torch.cat([a, a.new_ones(B, pad, D)], 1).reshape(B, nc, chunk, D)
    xc = torch.cat([x, x.new_zeros(B, pad, D)], 1).reshape(B, nc, chunk, D)
    rc = torch.cat([reset, reset.new_zeros(pad)]).reshape(1, nc, chunk, 1)
    hl, pr, seen = torch.zeros_like(xc[:, :, 0]), torch.ones_like(ac[:, :, 0]), torch.zeros_like(rc[:, :, 0])
    local, prods, seens = [], [], []
    for t in range(chunk):
        hl = torch.where(rc[:, :, t], xc[:, :, t], ac[:, :, t] * hl + xc[:, :, t])
        pr = pr * ac[:, :, t]
        seen = seen | rc[:, :, t]
        local.append(hl)
        prods.append(pr)
        seens.append(seen)
    hloc, cum, seen = torch.stack(local, 2), torch.stack(prods, 2), torch.stack(seens, 2)  # (B | 1, nc, chunk, D | 1)
    h, starts = torch.zeros_like(xc[:, 0, 0]), []
    for c in range(nc):
        starts.append(h)
        h = torch.where(seen[:, c, -1], hloc[:, c, -1], cum[:, c, -1] * h + hloc[:, c, -1])
    out = torch.where(seen, hloc, hloc + cum * torch.stack(starts, 1)[:, :, None])
    return out.reshape(B, nc * chunk, D)[:, :n]


def _packed_states(a: Tensor, x: Tensor, h0: Optional[Tensor], cu_seqlens: Tensor):
    """States of packed sequences (``a, x: (1, n, C)``, ``h0: (N, C)`` or ``None``): ``(h, y, rows)`` with ``y_t``
    the state step ``t`` multiplies (a sequence's initial state, zero without, at its first step; without one
    the first gate is not read) and ``rows`` :func:`_packed_rows`."""
    seq, start, last = rows = _packed_rows(cu_seqlens, x.shape[1])
    st = start[None, :, None]
    s0 = torch.zeros_like(x) if h0 is None else h0[seq][None]
    h = _segmented_scan(a, x if h0 is None else torch.where(st, a * s0 + x, x), start)
    y = torch.where(st, s0, torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1))
    return h, y, rows


def _per_sequence(cu_seqlens: Tensor, h: Tensor, row: Tensor, empty: Optional[Tensor]) -> Tensor:
    """``(N, C)``: ``h[0, row[i]]`` for every non-empty sequence ``i``, ``empty[i]`` (zero: ``None``) for the others."""
    nonempty = (cu_seqlens[1:] > cu_seqlens[:-1])[:, None]
    picked = h[0, row.clamp(0, h.shape[1] - 1)]
    return torch.where(nonempty, picked, torch.zeros_like(picked) if empty is None else empty.to(h.dtype))


def _torch_forward(q: Tensor, k: Tensor, v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor],
                   h0_re: Optional[Tensor], h0_im: Optional[Tensor],
                   cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The same scan in PyTorch (the chunked reference's algorithm): the ops' non-CUDA implementation."""
    rdt, cdt = acc_dtypes(torch.promote_types(q.dtype, a_re.dtype))
    x = k.to(rdt) if v is None else k.to(rdt) * v.to(rdt)
    if cu_seqlens is not None:
        cplx = a_im is not None
        a = torch.complex(a_re.to(rdt), a_im.to(rdt)) if cplx else a_re.to(rdt)
        h0 = None if h0_re is None else (torch.complex(h0_re.to(rdt), h0_im.to(rdt)) if cplx else h0_re.to(rdt))
        if q.shape[1] == 0:
            o = q.to(rdt)
            last = torch.zeros((cu_seqlens.shape[0] - 1, q.shape[2]), dtype=a.dtype, device=q.device) \
                if h0 is None else h0
        else:
            h, _, _ = _packed_states(a, x.to(a.dtype), h0, cu_seqlens)
            o = q.to(rdt) * (h.real if cplx else h)
            last = _per_sequence(cu_seqlens, h, cu_seqlens[1:] - 1, h0)
        return (o, last.real, last.imag) if cplx else (o, last, last.new_zeros(0))
    if a_im is None:
        h, last = diagonal_scan_chunked(a_re.to(rdt), x, None if h0_re is None else h0_re.to(rdt))
        return q.to(rdt) * h, last, last.new_zeros(0)
    h0 = None if h0_re is None else torch.complex(h0_re.to(rdt), h0_im.to(rdt))
    h, last = diagonal_scan_chunked(torch.complex(a_re.to(rdt), a_im.to(rdt)), x.to(cdt), h0)
    return q.to(rdt) * h.real, last.real, last.imag


def _torch_backward(do: Tensor, dhT_re: Optional[Tensor], dhT_im: Optional[Tensor], q: Tensor, k: Tensor,
                    v: Optional[Tensor], a_re: Tensor, a_im: Optional[Tensor], h0_re: Optional[Tensor],
                    h0_im: Optional[Tensor], cu_seqlens: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """The adjoint scan (docs/design.md section 5, "Backward") in PyTorch: the ops' non-CUDA backward."""
    rdt, cdt = acc_dtypes(torch.promote_types(q.dtype, a_re.dtype))
    qf, kf, dof = q.to(rdt), k.to(rdt), do.to(rdt)
    x = kf if v is None else kf * v.to(rdt)
    cplx = a_im is not None
    a = torch.complex(a_re.to(rdt), a_im.to(rdt)) if cplx else a_re.to(rdt)
    B, n, C = q.shape
    nseq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if h0_re is None:
        h0 = torch.zeros((nseq, C), dtype=a.dtype, device=q.device)
    else:
        h0 = torch.complex(h0_re.to(rdt), h0_im.to(rdt)) if cplx else h0_re.to(rdt)
    gT = torch.zeros_like(h0)
    if dhT_re is not None:
        gT = gT + dhT_re.to(rdt)
    if cplx and dhT_im is not None:
        gT = gT + 1j * dhT_im.to(rdt)
    g = (qf * dof).to(a.dtype)
    if cu_seqlens is None:
        h, _ = diagonal_scan_chunked(a, x.to(a.dtype), h0)
        y = torch.cat([h0[:, None], h], dim=1)[:, :n]  # h_{t-1}
        # the adjoint over steps -1 .. n-1 (b_t = conj(a_{t+1}), 1 past the end; no output at -1): lam_{-1} is
        # dh0 = conj(a_0) lam_0, and gT itself when n = 0
        b = torch.cat([a, torch.ones_like(h0[:, None])], dim=1).conj()
        lam, _ = diagonal_scan_chunked(b.flip(1), torch.cat([torch.zeros_like(h0[:, None]), g], 1).flip(1), gT)
        dh0, lam = lam[:, -1], lam[:, :-1].flip(1)
    elif n == 0:
        h = y = lam = x.to(a.dtype)
        dh0 = gT
    else:
        # packed: the adjoint restarts at each sequence's last step from its final state's gradient
        h, y, (seq, _, last) = _packed_states(a, x.to(a.dtype), None if h0_re is None else h0, cu_seqlens)
        b = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1).conj()
        g = torch.where(last[None, :, None], g + gT[seq][None], g)
        lam = _segmented_scan(b.flip(1), g.flip(1), last.flip(0)).flip(1)
        dh0 = _per_sequence(cu_seqlens, a.conj() * lam, cu_seqlens[:-1], gT)
    lam_re = lam.real if cplx else lam
    h_re = h.real if cplx else h
    da = lam * y.conj() if cplx else lam * y
    if h0_re is None:
        dh0 = None
    dk = lam_re.clone() if v is None else lam_re * v.to(rdt)
    dv = None if v is None else lam_re * kf
    parts = [h_re * dof, dk, dv, da.real if cplx else da, da.imag if cplx else None,
             None if dh0 is None else (dh0.real if cplx else dh0), dh0.imag if (dh0 is not None and cplx) else None]
    return [None if p is None else p.contiguous() for p in parts]
