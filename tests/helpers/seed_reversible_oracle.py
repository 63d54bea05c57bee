"""Plain-autograd oracles of the coupling the seeds compute, and small test modules.

Written independently of the library: straight-line autograd, no in-place tricks.
"""
import torch
from torch import nn


class Fn(nn.Module):
    """A step function with dropout and optional keyword arguments (``scale``, ``shift``)."""

    def __init__(self, d, p=0.1, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.drop = nn.Dropout(p)

    def forward(self, x, scale=None, shift=None, **ignored):
        h = self.drop(torch.tanh(self.lin(x)))
        if scale is not None:
            h = h * scale
        if shift is not None:
            h = h + shift
        return h


class DictFn(nn.Module):
    """Dict -> dict step with dropout, mixing keys (like an SE3 block)."""

    def __init__(self, dims, p=0.1, dtype=torch.float64):
        super().__init__()
        self.keys = list(dims)
        self.lins = nn.ModuleDict({k: nn.Linear(d, d, dtype=dtype) for k, d in dims.items()})
        self.mix = nn.Parameter(torch.randn(len(dims), dtype=dtype))
        self.drop = nn.Dropout(p)

    def forward(self, x, scale=None):
        gate = torch.stack([x[k].mean() for k in self.keys]) @ self.mix
        out = {k: self.drop(torch.tanh(self.lins[k](x[k]))) * torch.sigmoid(gate) for k in self.keys}
        if scale is not None:
            out = {k: v * scale for k, v in out.items()}
        return out


class CrossFn(nn.Module):
    """``fn(x, ctx, mask=, context_mask=)``: x attends (crudely) to another tensor."""

    def __init__(self, d, p=0.1, dtype=torch.float64):
        super().__init__()
        self.q = nn.Linear(d, d, dtype=dtype)
        self.kv = nn.Linear(d, d, dtype=dtype)
        self.drop = nn.Dropout(p)

    def forward(self, x, context=None, mask=None, context_mask=None, **ignored):
        c = self.kv(context)
        if context_mask is not None:
            c = c * context_mask[..., None]
        att = torch.softmax(self.q(x) @ c.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        out = self.drop(att @ c)
        if mask is not None:
            out = out * mask[..., None]
        return out


def oracle_layer_drop(n, prob):
    """Which layers survive, consuming the global RNG exactly as the seeds' layer_drop."""
    to_drop = torch.empty(n).uniform_(0, 1) < prob
    keep = [i for i in range(n) if not to_drop[i]]
    return keep if keep else [0]


def merge_halves(a, b, merge, dim):
    if merge == "mean":
        return torch.stack([a, b]).mean(0)
    if merge == "sum":
        return a + b
    return torch.cat([a, b], dim=dim)


def oracle_sequence(pairs, x, dim=-1, merge="mean", f_args=None, g_args=None, layer_dropout=0.0,
                    training=True, split=False):
    """``x1 = x2 = x`` (``split``: the two halves of ``x`` along ``dim``); per layer ``x1 = x1 + f(x2)``,
    ``x2 = x2 + g(x1)``; then merge."""
    n = len(pairs)
    f_args = f_args or [{}] * n
    g_args = g_args or [{}] * n
    keep = oracle_layer_drop(n, layer_dropout) if (training and layer_dropout > 0) else range(n)
    x1, x2 = x.chunk(2, dim) if split else (x, x)
    for i in keep:
        f, g = pairs[i]
        x1 = x1 + f(x2, **f_args[i])
        x2 = x2 + g(x1, **g_args[i])
    return merge_halves(x1, x2, merge, dim)


def oracle_dict_sequence(pairs, x, f_kwargs=None, merge="mean"):
    x1 = dict(x)
    x2 = dict(x)
    for f, g in pairs:
        fx = f(x2, **(f_kwargs or {}))
        x1 = {k: x1[k] + fx[k] for k in x1}
        gx = g(x1)
        x2 = {k: x2[k] + gx[k] for k in x2}
    return {k: merge_halves(x1[k], x2[k], merge, -1) for k in x}


def oracle_dual(blocks, types, video, audio, context=None, context_mask=None, video_mask=None, audio_mask=None):
    """NUWA's three block types, plain autograd, mean merge on the last dim."""
    x1 = x2 = video
    m1 = m2 = audio
    for (f, g, j, k), t in zip(blocks, types):
        if t == "intra_modality_self_attn":
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
            m1 = m1 + j(m2)
            m2 = m2 + k(m1)
        elif t == "intra_modality_cross_attn":
            x1 = x1 + f(x2, context=context, context_mask=context_mask, mask=video_mask)
            x2 = x2 + g(x1)
            m1 = m1 + j(m2, context=context, context_mask=context_mask, mask=audio_mask)
            m2 = m2 + k(m1)
        else:
            x1 = x1 + f(x2, m2, mask=video_mask, context_mask=audio_mask)
            x2 = x2 + k(x1)
            m1 = m1 + j(m2, x2, mask=audio_mask, context_mask=video_mask)
            m2 = m2 + g(m1)
    return [(x1 + x2) / 2, (m1 + m2) / 2]


def grads_of(loss, tensors):
    """Gradients of ``loss`` w.r.t. ``tensors`` (zeros where unused), without touching ``.grad``."""
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, gs)]


def backward_grads(loss, tensors):
    """Gradients through ``loss.backward()`` (what the seeds fill in as a side effect), read from
    ``.grad`` (zeros where none) and cleared again."""
    for t in tensors:
        t.grad = None
    loss.backward()
    out = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def rel_err(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_all(got, want, tol, what="tensor"):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what} {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        e = rel_err(a.double(), b.double())
        assert e <= tol, f"{what} {i}: relative error {e:.3e} > {tol:.1e}"


def _as_tensors(out):
    """An output as a list of tensors: a tensor, a sequence, or a dict of them (in its order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values()) if isinstance(out, dict) else list(out)


def assert_matches_oracle(run, oracle, tensors, seed, tol):
    """``run()`` against ``oracle()``, each called with the RNG seeded by ``seed`` (so both draw the same dropout
    masks and layer drops): the same outputs (a tensor, a sequence or a dict of tensors) and the same gradients
    in ``tensors`` of ``sum_i <out_i, w_i>`` for random ``w_i``, to ``tol`` relative (:func:`assert_close_all`)."""
    torch.manual_seed(seed)
    got = _as_tensors(run())
    ws = [torch.randn_like(y) for y in got]
    got_grads = grads_of(sum((y * w).sum() for y, w in zip(got, ws)), tensors)
    torch.manual_seed(seed)
    want = _as_tensors(oracle())
    want_grads = grads_of(sum((y * w).sum() for y, w in zip(want, ws)), tensors)
    assert_close_all(got, want, tol, "output")
    assert_close_all(got_grads, want_grads, tol, "grad")
