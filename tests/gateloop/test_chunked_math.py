"""Float64 PyTorch prototype of the exact algorithm the chunked Triton kernels run.

Every formula the kernels in ``gateloop_kernels/chunked/`` rely on is mirrored here step by
step (chunk-local log-magnitude ``g``, zero-gate counts ``z``, unit phasors ``u``; chunk states
``h``; adjoint states ``dh``; the per-chunk gradient including the division-free gate gradient)
and checked against autograd through ``reference.sequential_reference`` in float64.
"""
import pytest
import torch

from gateloop_kernels import reference


def _prefix(ar, ai):
    """Chunk-local prefix of gates ``(..., C)``: log-magnitude sum g, zero count z, phasor (ur, ui)."""
    mag = torch.sqrt(ar * ar + ai * ai)
    zero = mag == 0
    lg = torch.where(zero, torch.zeros_like(mag), torch.log(torch.where(zero, torch.ones_like(mag), mag)))
    pr = torch.where(zero, torch.ones_like(mag), ar / torch.where(zero, torch.ones_like(mag), mag))
    pi = torch.where(zero, torch.zeros_like(mag), ai / torch.where(zero, torch.ones_like(mag), mag))
    g = lg.cumsum(-1)
    z = zero.to(torch.int64).cumsum(-1)
    u = torch.complex(pr, pi).cumprod(-1)
    return g, z, u.real, u.imag


def _pair(gt, zt, urt, uit, gs, zs, urs, uis, lower):
    """D[t, s] = prod_{s < w <= t} a_w (Re, Im) for t-vectors and s-vectors, masked by ``lower``."""
    ok = lower & (zt[:, None] == zs[None, :])
    mag = torch.where(ok, torch.exp(torch.where(ok, gt[:, None] - gs[None, :], torch.zeros_like(gt[:, None] - gs[None, :]))),
                      torch.zeros((), dtype=gt.dtype))
    re = mag * (urt[:, None] * urs[None, :] + uit[:, None] * uis[None, :])
    im = mag * (uit[:, None] * urs[None, :] - urt[:, None] * uis[None, :])
    return re, im


def _chunk_quantities(ar, ai, C):
    """Per-chunk gate quantities for one sequence chunk ``ar, ai: (C,)`` (padded with gate 1)."""
    g, z, ur, ui = _prefix(ar, ai)
    one = torch.ones(1, dtype=ar.dtype)
    zero = torch.zeros(1, dtype=ar.dtype)
    gx, zx, uxr, uxi = _prefix(torch.cat([one, ar[:-1]]), torch.cat([zero, ai[:-1]]))  # exclusive
    idx = torch.arange(C)
    ge = idx[:, None] >= idx[None, :]
    gt_ = idx[:, None] > idx[None, :]
    Dre, Dim = _pair(g, z, ur, ui, g, z, ur, ui, ge)
    # E[u, s] = conj(D[u-1, s]) for s < u
    Ere, Eim = _pair(gx, zx, uxr, uxi, g, z, ur, ui, gt_)
    Eim = -Eim
    last = C - 1
    Dend_re, Dend_im = Dre[last], Dim[last]  # D[C-1, s]
    amag = torch.where(z == 0, torch.exp(g), torch.zeros_like(g))
    Are, Aim = amag * ur, amag * ui  # A_t = prod_{w <= t} a_w
    axmag = torch.where(zx == 0, torch.exp(gx), torch.zeros_like(gx))
    Axre, Axim = axmag * uxr, axmag * uxi  # A_{t-1}
    return dict(Dre=Dre, Dim=Dim, Ere=Ere, Eim=Eim, Dend_re=Dend_re, Dend_im=Dend_im, Are=Are, Aim=Aim,
                Axre=Axre, Axim=Axim, Aend_re=Are[last], Aend_im=Aim[last])


def prototype(q, k, v, ar, ai, h0re, h0im, do, dhtre, dhtim, C):
    """One sequence: q, k (n, d), v, do (n, e), ar, ai (n,), h0 (d, e) Re/Im, dht grad of final state.

    Returns o, final state (re, im) and grads dq, dk, dv, da (re, im), dh0 (re, im).
    """
    n, d = q.shape
    e = v.shape[1]
    nc = -(-n // C)
    pad = nc * C - n

    def p(x, val=0.0):
        return torch.cat([x, x.new_full((pad, *x.shape[1:]), val)]) if pad else x

    q, k, v, do = p(q), p(k), p(v), p(do)
    ar, ai = p(ar, 1.0), p(ai, 0.0)
    Q = [dict(**_chunk_quantities(ar[c * C:(c + 1) * C], ai[c * C:(c + 1) * C], C)) for c in range(nc)]
    sl = [slice(c * C, (c + 1) * C) for c in range(nc)]
    # forward: chunk states (kernel "fwd_h") and outputs (kernel "fwd_o")
    hre, him = [], []
    Sre, Sim = h0re.clone(), h0im.clone()
    for c in range(nc):
        hre.append(Sre)
        him.append(Sim)
        G = Q[c]
        kc, vc = k[sl[c]], v[sl[c]]
        Sre, Sim = (G["Aend_re"] * Sre - G["Aend_im"] * Sim + (kc * G["Dend_re"][:, None]).T @ vc,
                    G["Aend_re"] * Sim + G["Aend_im"] * Sre + (kc * G["Dend_im"][:, None]).T @ vc)
    o = torch.zeros(nc * C, e, dtype=q.dtype)
    for c in range(nc):
        G = Q[c]
        qc, kc, vc = q[sl[c]], k[sl[c]], v[sl[c]]
        o[sl[c]] = (qc * G["Are"][:, None]) @ hre[c] - (qc * G["Aim"][:, None]) @ him[c] + (G["Dre"] * (qc @ kc.T)) @ vc
    # backward: adjoint states (kernel "bwd_dh"): dhn[c] = adjoint of the state leaving chunk c
    dhn_re, dhn_im = [None] * nc, [None] * nc
    Lre, Lim = dhtre.clone(), dhtim.clone()
    for c in reversed(range(nc)):
        dhn_re[c], dhn_im[c] = Lre, Lim
        G = Q[c]
        qc, doc = q[sl[c]], do[sl[c]]
        Lre, Lim = (G["Aend_re"] * Lre + G["Aend_im"] * Lim + (qc * G["Are"][:, None]).T @ doc,
                    G["Aend_re"] * Lim - G["Aend_im"] * Lre - (qc * G["Aim"][:, None]).T @ doc)
    dh0re, dh0im = Lre, Lim
    # per chunk gradients (kernel "bwd_chunk")
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dare, daim = torch.zeros_like(ar), torch.zeros_like(ai)
    for c in range(nc):
        G = Q[c]
        qc, kc, vc, doc = q[sl[c]], k[sl[c]], v[sl[c]], do[sl[c]]
        Aqk, Adv = qc @ kc.T, doc @ vc.T
        Dqk, Ddv = G["Dre"] * Aqk, G["Dre"] * Adv
        Gre, Gim = doc @ hre[c].T, doc @ him[c].T
        Hre, Him = vc @ dhn_re[c].T, vc @ dhn_im[c].T
        dq[sl[c]] = G["Are"][:, None] * Gre - G["Aim"][:, None] * Gim + Ddv @ kc
        dk[sl[c]] = G["Dend_re"][:, None] * Hre + G["Dend_im"][:, None] * Him + Ddv.T @ qc
        Wre, Wim = kc @ dhn_re[c], kc @ dhn_im[c]
        dv[sl[c]] = Dqk.T @ doc + G["Dend_re"][:, None] * Wre + G["Dend_im"][:, None] * Wim
        psi_re, psi_im = (qc * Gre).sum(1), -(qc * Gim).sum(1)
        phi_re, phi_im = (kc * Hre).sum(1), (kc * Him).sum(1)
        sig_re = (dhn_re[c] * hre[c] + dhn_im[c] * him[c]).sum()
        sig_im = (dhn_im[c] * hre[c] - dhn_re[c] * him[c]).sum()
        P = Aqk * Adv
        Rre, Rim = P @ G["Ere"].T, P @ G["Eim"].T
        Axre, Axim = G["Axre"], G["Axim"]
        Mre = Rre + psi_re[:, None] * Axre[None, :] + psi_im[:, None] * Axim[None, :]
        Mim = Rim + psi_im[:, None] * Axre[None, :] - psi_re[:, None] * Axim[None, :]
        t1re = (G["Dre"] * Mre + G["Dim"] * Mim).sum(0)
        t1im = (G["Dre"] * Mim - G["Dim"] * Mre).sum(0)
        Ephi_re = (G["Ere"] * phi_re[None, :] - G["Eim"] * phi_im[None, :]).sum(1)
        Ephi_im = (G["Ere"] * phi_im[None, :] + G["Eim"] * phi_re[None, :]).sum(1)
        T2re = Axre * sig_re + Axim * sig_im + Ephi_re
        T2im = Axre * sig_im - Axim * sig_re + Ephi_im
        dare[sl[c]] = t1re + G["Dend_re"] * T2re + G["Dend_im"] * T2im
        daim[sl[c]] = t1im + G["Dend_re"] * T2im - G["Dend_im"] * T2re
    return (o[:n], (Sre, Sim), dq[:n], dk[:n], dv[:n], (dare[:n], daim[:n]), (dh0re, dh0im))


@pytest.mark.parametrize("n,d,e,C,zeros", [(37, 5, 3, 8, False), (40, 4, 6, 8, True), (9, 3, 3, 16, True)])
def test_prototype_matches_autograd(n, d, e, C, zeros):
    dt = torch.float64
    q, k = torch.randn(n, d, dtype=dt), torch.randn(n, d, dtype=dt)
    v, do = torch.randn(n, e, dtype=dt), torch.randn(n, e, dtype=dt)
    mag = torch.rand(n, dtype=dt) * 0.5 + 0.6
    ph = torch.rand(n, dtype=dt) * 6.28 - 3.14
    ar, ai = mag * torch.cos(ph), mag * torch.sin(ph)
    if zeros:
        zi = torch.randperm(n)[: max(2, n // 6)]
        ar[zi] = 0.0
        ai[zi] = 0.0
        ar[n - 1], ai[n - 1] = 0.0, 0.0
    h0 = torch.complex(torch.randn(d, e, dtype=dt), torch.randn(d, e, dtype=dt))
    dht = torch.complex(torch.randn(d, e, dtype=dt), torch.randn(d, e, dtype=dt))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, ar, ai)]
    h0l = h0.clone().requires_grad_()
    a = torch.complex(leaves[3], leaves[4])[None, :, None, None]
    o, st = reference.sequential_reference(leaves[0][None], leaves[1][None], leaves[2][None], a, h0l[None],
                                           return_final_state=True)
    loss = (o[0] * do).sum() + (st[0] * dht.conj()).real.sum()
    loss.backward()
    res = prototype(q, k, v, ar, ai, h0.real, h0.imag, do, dht.real, dht.imag, C)
    po, (sre, sim), dq, dk, dv, (dar, dai), (d0re, d0im) = res
    torch.testing.assert_close(po, o[0].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.complex(sre, sim), st[0].detach(), rtol=1e-10, atol=1e-10)
    for got, leaf in zip((dq, dk, dv, dar, dai), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.complex(d0re, d0im), h0l.grad, rtol=1e-9, atol=1e-9)
