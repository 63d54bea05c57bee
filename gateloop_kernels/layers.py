"""Drop-in layers for lucidrains' ``gateloop-transformer`` running on the fused scan.

``GateLoopedAttention``, ``SimpleGateLoopLayer``, ``CausalFullAttention`` and ``Transformer`` take
the seed's constructor arguments (same defaults) and hold the same parameters under the same
names, so a ``state_dict`` saved from the seed's modules loads here and gives the same outputs.
What differs is inside: heads stay in the ``(b, n, h, d)`` layout, the gate activation
``polar(sigmoid(|z|), angle z)`` is computed in real arithmetic, no complex tensors are built and
no ``torch.utils.checkpoint`` wraps the scan (the kernels keep no per-step state), so the layers
also run under bf16 autocast. ``Transformer(..., reversible=True)`` runs the same blocks through
the :mod:`reversible` core (activation memory flat in depth).

Inference: every attention layer takes ``cache=`` / ``return_cache=`` (gate-looped attention: the complex
state per head, advanced by the fused decode step of :mod:`gateloop_kernels.decode`; full attention: a
:class:`KVCache`; the simplified layer: the seed's ``(a, kv)`` pair), and so does ``Transformer.forward``
(a :class:`TransformerCache`); ``Transformer.generate`` samples continuations.

Packed variable-length sequences: every layer and ``Transformer.forward`` take ``cu_seqlens=`` (``x (1, T, dim)``
holding ``N`` documents, boundaries as in :func:`gateloop_kernels.gate_loop_heads`): no state, attention or loss
target crosses a boundary, so a packed batch computes exactly what its documents compute one by one.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Module, ModuleList

from ._checks import check_cu_seqlens, check_layer_input, count_cu_seqlens, is_int
from ._eager import eager_function
from .decode import gate_loop_decode_step
from .dtypes import promote
from .heads import gate_loop_heads
from .operator import simple_gate_loop_operator
from .varlen import positions, sequence_ids

__all__ = ["RMSNorm", "PreNorm", "PostNorm", "FeedForward", "CausalFullAttention", "GateLoopedAttention",
           "SimpleGateLoopLayer", "Transformer", "KVCache", "TransformerCache"]


class RMSNorm(Module):
    """``normalize(x) * sqrt(dim) * gamma`` over the last dim (the seed's), computed as PyTorch's
    ``rms_norm`` (one fused kernel each way where PyTorch has one, against ~5 forward and ~10 backward
    elementwise kernels) in the promoted dtype of ``x`` and ``gamma``, as the seed's formula promotes.
    ``eps = 1e-24 / dim`` stands for ``normalize``'s floor of 1e-12 on the norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim ** 0.5  # the seed's attribute
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dim = self.gamma.shape[0]
        dt = promote(x.dtype, self.gamma.dtype)
        return F.rms_norm(x.to(dt), (dim,), self.gamma.to(dt), eps=1e-24 / dim)


class PreNorm(Module):
    """``fn(RMSNorm(x)) + x``."""

    def __init__(self, dim: int, fn: Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = RMSNorm(dim)

    def branch(self, x: Tensor, **kwargs: Any) -> Tensor:
        """The residual branch alone, ``fn(norm(x))`` (what a reversible coupling adds)."""
        return self.fn(self.norm(x), **kwargs)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.branch(x, **kwargs) + x


class PostNorm(Module):
    """``LayerNorm(fn(x) + x)``."""

    def __init__(self, dim: int, fn: Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.norm(self.fn(x, **kwargs) + x)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # noqa: N802 (the seed's name)
    """``Linear(dim, dim*mult) -> GELU -> Linear(dim*mult, dim)``."""
    return nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


def _scale_grad_setup(ctx, inputs, output) -> None:
    ctx.frac = inputs[1]


#: identity forward (a view: no kernel), gradient times ``frac`` backward; its torch.func form (grad, vjp, vmap of a
#: model) from the scan ops' own helper
_ScaleGrad = eager_function("ScaleGrad", lambda t, frac: t.view_as(t), _scale_grad_setup,
                            lambda ctx, g: (g * ctx.frac, None))


def _plain_linear(m: Module) -> bool:
    """``m`` is an ``nn.Linear`` whose call is its weight's product alone: no subclass (quantized, parametrized,
    an adapter's wrapper) and no hook of its own."""
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                         or m._backward_pre_hooks)


def _in_projections(layer: Module, x: Tensor, with_a: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(qkv, a, gates)``: :class:`GateLoopedAttention`'s input projections of ``x`` (``to_qkv``; ``to_a`` with
    its bias, None without ``with_a``; ``to_gates``' linear part or None) as one GEMM over their stacked weights:
    one weight cast under autocast, one product forward and two backward instead of one each per projection (a
    training step's eager host time is mostly such per-layer PyTorch calls; ``python -m bench.tools.op_count``).
    The bias is added after the product, in its own dtype where that is wider (float32 under autocast: the gate's
    logits rounded once, as inside the separate projection's fused add).

    Where a projection is not a plain ``nn.Linear`` (a quantized or adapted one, a wrapper) or a hook is registered
    on it or globally, the three are called as modules instead, so that what they add is not bypassed (hooks on
    the ``to_a`` / ``to_gates`` containers themselves are not run: their linear parts are called)."""
    lin_a = layer.to_a[0]
    mods = [layer.to_qkv] + ([lin_a] if with_a else []) + ([layer.to_gates[0]] if layer.to_gates is not None else [])
    if not all(map(_plain_linear, mods)) or _global_hooks():
        return (layer.to_qkv(x), lin_a(x) if with_a else None,
                layer.to_gates[0](x) if layer.to_gates is not None else None)
    ws = [layer.to_qkv.weight] + ([lin_a.weight] if with_a else [])
    ws += [layer.to_gates[0].weight] if layer.to_gates is not None else []
    parts = list(F.linear(x, torch.cat(ws)).split([w.shape[0] for w in ws], dim=-1))
    qkv = parts.pop(0)
    a = parts.pop(0) if with_a else None
    if a is not None and lin_a.bias is not None:
        a = a + lin_a.bias
    return qkv, a, parts[0] if parts else None


def _global_hooks() -> bool:
    """Whether a module hook is registered for every module (``nn.modules.module.register_module_forward_hook``...)."""
    mm = nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or mm._global_backward_pre_hooks)


def _frac_gradient(t: Tensor, frac: float) -> Tensor:
    """Same value, gradient scaled by ``frac`` (the seed's slower-moving gate parameters). The seed
    writes ``t * frac + t.detach() * (1 - frac)``: three kernels that give ``t`` up to rounding; this is
    ``t`` exactly, and one kernel in the backward."""
    return _ScaleGrad.apply(t, frac)


class CausalFullAttention(Module):
    """The seed's causal attention baseline (softmax, or linear with a data-dependent decay).

    Input ``(b, n, dim)``, output ``(b, n, dim)``. ``rotary_emb=True`` needs ``rotary-embedding-torch``.
    Unlike the gate-loop layers it is not causal for non-finite values: both paths are dense masked
    products (PyTorch's attention, or ``masked scores @ v``) whose masked zeros multiply later tokens, so a
    NaN or Inf at token t reaches the outputs (and gradients) of earlier tokens.
    """

    def __init__(self, dim: int, *, dim_head: int = 64, heads: int = 8, rotary_emb: bool = False,
                 add_swish_gating: bool = False, data_dependent_rel_pos: bool = False,
                 frac_gradient_data_dependent_rel_pos: float = 0.5, softmax_normalize: Optional[bool] = None) -> None:
        super().__init__()
        dim_inner = dim_head * heads
        self.heads = heads
        self.softmax_normalize = (not data_dependent_rel_pos) if softmax_normalize is None else softmax_normalize
        self.scale = dim_head ** -0.5
        self.rotary_emb = None
        if rotary_emb:
            try:
                from rotary_embedding_torch import RotaryEmbedding
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("rotary_emb=True needs `pip install rotary-embedding-torch`") from err
            self.rotary_emb = RotaryEmbedding(dim_head)
        self.to_qkv = nn.Sequential(nn.Linear(dim, dim_inner * 3, bias=False))
        self.data_dependent_rel_pos = data_dependent_rel_pos
        self.frac_gradient_data_dependent_rel_pos = frac_gradient_data_dependent_rel_pos
        if data_dependent_rel_pos:
            self.to_a = nn.Sequential(nn.Linear(dim, dim_inner, bias=False))
        self.to_gates = nn.Sequential(nn.Linear(dim, dim_inner, bias=False), nn.SiLU()) if add_swish_gating else None
        self.to_out = nn.Sequential(nn.Identity(), nn.Linear(dim_inner, dim))

    def _heads(self, t: Tensor) -> Tensor:  # (b, n, h*d) -> (b, h, n, d)
        return t.unflatten(-1, (self.heads, t.shape[-1] // self.heads)).transpose(1, 2)  # sized: n may be 0

    def new_cache(self, batch: int, capacity: int, *, device=None, dtype: Optional[torch.dtype] = None) -> "KVCache":
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``capacity`` tokens (it grows past that
        in eager calls): zero ``k``, ``v`` ``(batch, heads, capacity, dim_head)`` in ``dtype``; ``dtype`` /
        ``device`` default to the layer's parameters'.

        Raises TypeError for a non-int size or a ``dtype`` that is not a real floating ``torch.dtype``, ValueError
        for a negative size."""
        _check_cache_args(dtype, batch=batch, capacity=capacity)
        w = self.to_qkv[0].weight
        dim_head = w.shape[0] // (3 * self.heads)
        shape = (batch, self.heads, capacity, dim_head)
        k = torch.zeros(shape, device=w.device if device is None else device, dtype=dtype or w.dtype)
        return KVCache(k, torch.zeros_like(k))

    def _rotate(self, t: Tensor, pos: Optional[Tensor]) -> Tensor:
        """Rotary embedding at positions ``pos (n,)`` (device int64), or ``0..n-1`` for ``None``."""
        if pos is None:
            return self.rotary_emb.rotate_queries_or_keys(t)
        from rotary_embedding_torch import apply_rotary_emb

        # positions in t's dtype, as the library's own get_seq_pos makes them
        freqs = self.rotary_emb(pos.to(t.dtype) / self.rotary_emb.interpolate_factor)
        return apply_rotary_emb(freqs, t, seq_dim=-2)

    def forward(self, x: Tensor, ablate_complex: bool = False, ablate_state_transition: bool = False,
                cache: Optional["KVCache"] = None, return_cache: bool = False, cp_group=None,
                cu_seqlens: Optional[Tensor] = None):
        """``x (b, n, dim)`` -> ``(b, n, dim)``, or ``(out, cache)`` with ``return_cache``.

        ``cu_seqlens``: ``x (1, T, dim)`` holds packed documents; a token attends to the earlier tokens of its own
        document only (a block-diagonal causal mask built on the device, ``(T, T)`` booleans), rotary positions
        restart at each document. Not with a cache (NotImplementedError).

        The cache keeps every key (scaled by its token's data-dependent factor, which depends on that token
        alone: the seed's product runs over feature pairs, not time) and value, detached; a given one is extended
        in place (buffers reallocated only when full), any number of tokens per call. Under autograd the output's
        gradient reaches this call's ``x`` through its queries, keys and values (not the cached ones).
        """
        if cp_group is not None:
            raise ValueError("CausalFullAttention (softmax attention) cannot run on a sequence split across ranks "
                             "(cp_group); use GateLoopedAttention")
        dim = self.to_qkv[0].in_features
        check_layer_input("x", x, 3, f"(b, n, dim) = (b, n, {dim})", dim)
        b, n, _ = x.shape
        if cu_seqlens is not None:
            if cache is not None or return_cache:
                raise NotImplementedError("cu_seqlens (packed sequences) with a cache is not supported")
            check_cu_seqlens(cu_seqlens, b, n, x.device)
        q, k, v = map(self._heads, self.to_qkv(x).chunk(3, dim=-1))
        if cache is None and return_cache:
            dtype = promote(v.dtype, self.to_qkv[0].weight.dtype)
            cache = self.new_cache(b, n, device=x.device, dtype=dtype)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be the KVCache of this layer (new_cache() or a return_cache=True call), "
                                f"got {type(cache).__name__}")
            cache.check(q, v)
        # a fresh cache holds nothing: positions 0..n-1 and plain causal attention, as without one
        pos = None if cache is None or cache.length == 0 else cache.pos + torch.arange(n, device=x.device)
        if cu_seqlens is not None:
            pos = positions(cu_seqlens, n)
        if self.rotary_emb is not None:
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        q = q * self.scale
        if self.data_dependent_rel_pos and not ablate_state_transition:
            z = _frac_gradient(self.to_a(x), self.frac_gradient_data_dependent_rel_pos)
            z = self._heads(z).unflatten(-1, (-1, 2))  # (b, h, n, d/2, 2): (re, im) per feature pair
            if ablate_complex:
                z = torch.stack([z[..., 0], torch.zeros_like(z[..., 0])], dim=-1)
            if z.dtype in (torch.bfloat16, torch.float16):  # torch.polar takes no 16-bit parts (bf16 parameters)
                z = z.float()
            a = torch.polar(torch.linalg.vector_norm(z, dim=-1).sigmoid(), torch.atan2(z[..., 1], z[..., 0]))
            # the seed's cumulative product runs over the feature pairs (dim -2 of its (..., d/2, 1)
            # tensor), not over time; kept as is so that trained weights mean the same thing
            cum_real = a.cumprod(dim=-1).real.clamp(min=1e-10)[..., None]
            # back in q's dtype, as autocast's attention would take them (a float32 q beside a bf16 v raised)
            q = (q.unflatten(-1, (-1, 2)) * cum_real).flatten(-2).to(q.dtype)
            k = (k.unflatten(-1, (-1, 2)) / cum_real).flatten(-2).to(k.dtype)
        mask = None
        if cu_seqlens is not None:
            seq = sequence_ids(cu_seqlens, n)
            mask = (seq[:, None] == seq[None, :]).tril()  # (n, n): earlier tokens of the same document
        if cache is not None:
            cache.append(k, v, n)
            if pos is not None:
                if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                    # the buffers hold this call's keys detached: a copy with them live, so that gradients reach
                    # them and later appends leave what the backward saved intact
                    k, v = (buf.to(q.dtype).index_copy(2, pos, t) for buf, t in ((cache.k, k), (cache.v, v)))
                else:
                    k, v = cache.k.to(q.dtype), cache.v.to(q.dtype)
                mask = torch.arange(k.shape[2], device=x.device) <= pos[:, None]  # (n, capacity)
        if self.softmax_normalize:
            out = (F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0) if mask is None
                   else F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0))
        else:
            sim = q @ k.transpose(-1, -2)
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() if mask is None else mask
            out = sim.masked_fill(~keep, 0.0) @ v
        out = out.transpose(1, 2).flatten(2)
        if self.to_gates is not None:
            out = out * self.to_gates(x)
        out = self.to_out(out)
        return (out, cache) if return_cache else out


class KVCache:
    """The key/value cache of a :class:`CausalFullAttention`.

    ``k``, ``v``: ``(b, heads, capacity, dim_head)`` buffers (the layer's parameter dtype: exact copies of
    lower-precision activations), the first ``length`` slots filled; ``pos``: the same count as a device
    int64 scalar, which the layer reads (so a captured CUDA graph of a decode step advances it by itself);
    ``length``: its host copy, which decides when the buffers grow (eager calls only).
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v
        self.pos = torch.zeros((), dtype=torch.int64, device=k.device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def check(self, q: Tensor, v: Tensor) -> None:
        """Raise unless this cache fits a layer call with queries ``q`` and values ``v`` ``(b, h, n, d)``:
        ValueError for another ``(b, h, d)`` or device, TypeError for buffers narrower than ``v``'s dtype,
        RuntimeError for a cache made under ``torch.inference_mode()`` used outside it."""
        _check_not_inference("cache", self)
        b, h, _, d = v.shape
        if (self.k.shape[0], self.k.shape[1], self.k.shape[3]) != (b, h, d):
            raise ValueError(f"cache holds (b, heads, dim_head) = ({self.k.shape[0]}, {self.k.shape[1]}, "
                             f"{self.k.shape[3]}), the call ({b}, {h}, {d}) (a cache from another layer or batch "
                             "size?)")
        if promote(v.dtype, self.k.dtype) != self.k.dtype:
            raise TypeError(f"cache is {self.k.dtype}, narrower than the {v.dtype} activations (a cache from "
                            f"another dtype?)")
        if self.k.device != v.device:
            raise ValueError(f"cache is on {self.k.device}, the layer's inputs on {v.device}")

    def append(self, k: Tensor, v: Tensor, n: int) -> None:
        """Write ``n`` new keys and values ``(b, h, n, d)`` after the ones held, in place."""
        if self.length + n > self.capacity:
            grown = max(2 * self.capacity, self.length + n)
            pad = (0, 0, 0, grown - self.capacity)
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        idx = self.pos + torch.arange(n, device=k.device)
        self.k.index_copy_(2, idx, k.detach().to(self.k.dtype))
        self.v.index_copy_(2, idx, v.detach().to(self.v.dtype))
        self.pos.add_(n)
        self.length += n


class GateLoopedAttention(Module):
    """Gate-looped attention (the seed's ``GateLoopedAttention``) on the fused head-layout scan.

    Input ``(b, n, dim)``, output ``(b, n, dim)``. ``heads`` defaults to ``dim_inner`` (head dim 1,
    the seed's default). ``checkpoint_gate_looped_attn`` is accepted for compatibility and has
    no effect: the scan keeps no per-step state, so there is nothing to checkpoint.
    """

    def __init__(self, dim: int, heads: Optional[int] = None, dim_inner: Optional[int] = None,
                 checkpoint_gate_looped_attn: bool = True, add_swish_gating: bool = True, sub_ln: bool = False,
                 frac_gradient_state_transition: float = 0.9) -> None:
        super().__init__()
        dim_inner = dim if dim_inner is None else dim_inner
        heads = dim_inner if heads is None else heads
        if not is_int(heads):
            raise TypeError(f"heads (gate loop heads) must be an int, got {type(heads).__name__}")
        if heads < 1:
            raise ValueError(f"heads (gate loop heads) must be >= 1, got {heads}")
        if dim_inner % heads:
            raise ValueError(f"dim_inner {dim_inner} must be divisible by the number of gate loop heads {heads}")
        self.frac_gradient_state_transition = frac_gradient_state_transition
        self.checkpoint_gate_looped_attn = checkpoint_gate_looped_attn
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.to_a = nn.Sequential(nn.Linear(dim, heads * 2))
        self.maybe_sub_ln = nn.LayerNorm(dim_inner) if sub_ln else nn.Identity()
        self.to_gates = nn.Sequential(nn.Linear(dim, dim_inner, bias=False), nn.SiLU()) if add_swish_gating else None
        self.to_out = (nn.Linear(dim_inner, dim, bias=False) if dim_inner != dim or add_swish_gating
                       else nn.Identity())

    def new_cache(self, batch: int, *, device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The state before any token: zeros ``(batch, H, d, e)``, complex128 for a float64 ``dtype``
        (default: the parameters'), else complex64.

        Raises TypeError for a non-int ``batch`` or a ``dtype`` that is not a real floating ``torch.dtype``,
        ValueError for a negative ``batch``."""
        _check_cache_args(dtype, batch=batch)
        w = self.to_qkv.weight
        heads = self.to_a[0].out_features // 2
        d = w.shape[0] // (3 * heads)
        return torch.zeros((batch, heads, d, d), device=w.device if device is None else device,
                           dtype=_state_dtype(dtype or w.dtype))

    def forward(self, x: Tensor, ablate_complex: bool = False, ablate_state_transition: bool = False,
                cache: Optional[Tensor] = None, return_cache: bool = False, cp_group=None, check_shapes: bool = True,
                cu_seqlens: Optional[Tensor] = None):
        """``x (b, n, dim)`` -> ``(b, n, dim)``, or ``(out, cache)`` with ``return_cache``.

        ``cp_group``, ``check_shapes``: the sequence split across a process group, as in ``gate_loop_heads``. With
        ``check_shapes``, a rank whose input fails this layer's own checks raises its error, and every other rank a
        RuntimeError naming it from the descriptor exchange (no hang).

        ``cu_seqlens``: ``x (1, T, dim)`` holds ``N`` packed documents, each scanned from a zero state
        (:func:`gateloop_kernels.gate_loop_heads`), or from its state in a cache of ``N`` states ``(N, H, d, e)``
        (the one a packed call with ``return_cache`` returns), advanced by the scan. With ``cp_group``: the group's
        global boundaries, ``x`` this rank's slice (no cache).

        The cache is the complex state per head, ``(b, H, d, e)``, complex64 (complex128 for float64
        inputs), detached: pass it back to continue the sequence. A given cache is updated in place
        (same storage), by the fused decode step for one token (``n = 1``) where autograd records nothing (under
        ``torch.no_grad()``), else by the scan from it. Under autograd the output's gradient reaches this call's
        ``x`` and the parameters through this call's tokens; none flows through the cache (it is detached).
        """
        # written against attributes the upstream class has too, so patch_gateloop_transformer()
        # can install it on upstream instances
        try:
            dim = getattr(self.to_qkv, "in_features", None)  # None for a wrapped projection: its own call checks x
            check_layer_input("x", x, 3, "(b, n, dim)" if dim is None else f"(b, n, dim) = (b, n, {dim})", dim)
            b, n, _ = x.shape
            heads = self.to_a[0].out_features // 2
            qkv, a, gates = _in_projections(self, x, with_a=not ablate_state_transition)
            q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))
            z = None
            if a is not None:
                z = _frac_gradient(a, self.frac_gradient_state_transition).unflatten(-1, (heads, 2))
            if ablate_complex and not ablate_state_transition:
                z = torch.stack([z[..., 0], torch.zeros_like(z[..., 0])], dim=-1)
            if cp_group is not None and (cache is not None or return_cache):
                raise ValueError("a cache is for decoding on one rank: not with cp_group")
            if cache is not None:
                _check_state_cache(cache, q, v, b, None if cu_seqlens is None else count_cu_seqlens(cu_seqlens))
        except Exception:
            if cp_group is not None and check_shapes:
                from .context_parallel import report_failure

                # the other ranks wait in this call's descriptor exchange: they raise there instead of hanging
                report_failure("GateLoopedAttention", cp_group, next(self.parameters()).device)
            raise
        # the fused step overwrites the state and builds no graph: under autograd one token takes the scan too
        recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qkv, z, cache))
        if cache is not None and n == 1 and cu_seqlens is None and not recording:
            # the step updates a dense state: a strided cache (e.g. cache[::2], a beam's rows) through a copy
            state = cache if cache.is_contiguous() else cache.contiguous()
            o = gate_loop_decode_step(q[:, 0], k[:, 0], v[:, 0], state,
                                      z=None if ablate_state_transition else z[:, 0])
            if state is not cache:
                cache.copy_(state)
            out = o[:, None]
        else:
            want_state = cache is not None or return_cache
            # the backward may read the initial state the scan saved: a copy, which the cache's update leaves intact
            init = cache.clone() if cache is not None and recording else cache
            if ablate_state_transition:
                no_decay = torch.zeros(b, n, heads, device=x.device, dtype=torch.float32)  # gate exp(0 + 0i) = 1
                out, state = gate_loop_heads(q, k, v, log_magnitude=no_decay, phase=no_decay, initial_state=init,
                                             output_final_state=want_state, cp_group=cp_group,
                                             check_shapes=check_shapes, cu_seqlens=cu_seqlens)
            else:
                out, state = gate_loop_heads(q, k, v, z=z, initial_state=init, output_final_state=want_state,
                                             cp_group=cp_group, check_shapes=check_shapes, cu_seqlens=cu_seqlens)
            if cache is None and want_state:
                cache = state.detach().to(_state_dtype(out.dtype)).contiguous()
            elif cache is not None:
                cache.copy_(state.detach())
        out = self.maybe_sub_ln(out.flatten(2))
        if gates is not None:
            out = self.to_gates[1](gates) * out
        out = self.to_out(out)
        return (out, cache) if return_cache else out


def _check_cache_args(dtype: Optional[torch.dtype], **sizes: int) -> None:
    """A cache constructor's arguments: int ``sizes`` >= 0 and a real floating ``dtype`` or None."""
    for name, value in sizes.items():
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a real floating torch.dtype (the parameters' precision) or None, got {dtype!r}")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _check_not_inference(name: str, cache) -> None:
    """RuntimeError naming ``name`` where ``cache`` (a state tensor or a :class:`KVCache`) holds inference tensors
    (made under ``torch.inference_mode()``) and the call runs outside it: its in-place update would fail there."""
    tensors = (cache.k, cache.v, cache.pos) if isinstance(cache, KVCache) else (cache,)
    # else PyTorch's own 'Inplace update to inference tensor outside InferenceMode', naming no cache
    if not torch.is_inference_mode_enabled() and any(isinstance(t, Tensor) and t.is_inference() for t in tensors):
        raise RuntimeError(f"{name} was made under torch.inference_mode() and calls update it in place, which PyTorch "
                           "allows only inside inference_mode: make the cache outside it (torch.no_grad() is enough "
                           "to decode), run this call under torch.inference_mode() too, or continue from a copy made "
                           "outside it (copy.deepcopy(cache); a state tensor: cache.clone())")


def _check_state_cache(cache: Tensor, q: Tensor, v: Tensor, b: int, documents: Optional[int] = None) -> None:
    """A gate-loop cache must be the state this layer would make for these inputs (``b`` sequences, or ``documents``
    packed ones with ``cu_seqlens``), usable in this call's inference mode."""
    _, _, heads, d = q.shape
    e = v.shape[-1]
    if not isinstance(cache, Tensor):
        raise TypeError(f"cache must be the complex state tensor a previous call returned, got {type(cache).__name__}")
    want = _state_dtype(promote(q.dtype, v.dtype))
    if cache.dtype != want:
        raise TypeError(f"cache must be {want} for {q.dtype} activations (a cache from another dtype?), got "
                        f"{cache.dtype}")
    if tuple(cache.shape) != (b if documents is None else documents, heads, d, e):
        if documents is not None:  # not "(b, ...) = (N, ...)": x's b is 1 in a packed call
            raise ValueError(f"with cu_seqlens, cache holds one state per packed document: (N, H, d, e) = "
                             f"({documents}, {heads}, {d}, {e}) with N = len(cu_seqlens) - 1 = {documents}, got "
                             f"{tuple(cache.shape)}")
        raise ValueError(f"cache must be the state (b, H, d, e) = ({b}, {heads}, {d}, {e}) (a cache from another "
                         f"layer or batch size?), got {tuple(cache.shape)}")
    if cache.device != q.device:
        raise ValueError(f"cache is on {cache.device}, the layer's inputs on {q.device}")
    _check_not_inference("cache", cache)


class SimpleGateLoopLayer(Module):
    """The seed's simplified gate loop (real sigmoid gate per channel) on the fused operator.

    ``forward(x, cache=None, return_cache=False, cu_seqlens=None)``: ``x (b, n, dim)`` -> ``(b, n, dim)``; the cache
    is the seed's ``(a, kv)`` pair, each ``(b * dim, 1)``. With ``cu_seqlens`` (``x (1, T, dim)`` holding ``N``
    packed documents, :func:`gateloop_kernels.simple_gate_loop_operator`) each document scans alone and the
    cache holds one state per document, each ``(N * dim, 1)``; ``reverse=True`` reverses each document.
    ``use_heinsen`` / ``use_jax_associative_scan`` are accepted for compatibility: every choice runs the same exact
    fused scan.
    """

    def __init__(self, dim: int, prenorm: bool = True, use_heinsen: bool = False,
                 use_jax_associative_scan: bool = False, post_ln: bool = False, reverse: bool = False) -> None:
        super().__init__()
        if use_heinsen and use_jax_associative_scan:
            raise ValueError("choose at most one of use_heinsen and use_jax_associative_scan")
        self.dim = dim
        self.norm = RMSNorm(dim) if prenorm else nn.Identity()
        self.to_qkva = nn.Sequential(nn.Linear(dim, dim * 3, bias=False))
        self.maybe_post_ln = nn.LayerNorm(dim) if post_ln else nn.Identity()
        self.reverse = reverse

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None, return_cache: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        check_layer_input("x", x, 3, f"(b, n, dim) = (b, n, {self.dim})", self.dim)
        if self.reverse:
            if return_cache or cache is not None:
                raise ValueError("caching only works with a non-reversed sequence (reverse=False)")
            x = torch.flip(x, dims=(-2,))
            if cu_seqlens is not None:  # the reversed row holds the documents reversed, in reverse order
                check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
                cu_seqlens = x.shape[1] - cu_seqlens.flip(0)
        states = x.shape[0] if cu_seqlens is None else count_cu_seqlens(cu_seqlens)
        q, kv, a = self.to_qkva[0](self.norm(x)).chunk(3, dim=-1)
        if cache is not None:
            if not (isinstance(cache, (tuple, list)) and len(cache) == 2
                    and all(isinstance(c, Tensor) and c.numel() == states * self.dim for c in cache)):
                rows = f"{states} {'documents' if cu_seqlens is not None else 'sequences'} * dim {self.dim}"
                shape = f" of shape {tuple(cache.shape)}" if isinstance(cache, Tensor) else ""
                got = ([tuple(getattr(c, "shape", ())) for c in cache] if isinstance(cache, (tuple, list))
                       else f"a {type(cache).__name__}{shape}")
                raise ValueError(f"cache must be the (a, kv) pair of ({rows}, 1) tensors this layer returns, "
                                 f"got {got}")
            cache = tuple(c.reshape(states, q.shape[-1]) for c in cache)  # sized: b may be 0
        out, (a_last, kv_last) = simple_gate_loop_operator(q, kv, a.sigmoid(), cache=cache, cu_seqlens=cu_seqlens)
        out = self.maybe_post_ln(out)
        if self.reverse:
            out = torch.flip(out, dims=(-2,))
        if not return_cache:
            return out
        return out, (a_last.reshape(-1, 1), kv_last.reshape(-1, 1))


class Transformer(Module):
    """The seed's GateLoop ``Transformer`` (token embedding, gate-looped or full attention + MLP
    blocks, logits), same arguments and parameter names, plus ``reversible``.

    ``reversible=True`` runs the blocks as reversible couplings ``y1 = x1 + attn(x2)``,
    ``y2 = x2 + ff(y1)`` (input duplicated, output halves averaged; a different function from
    the residual stack, with flat activation memory in depth). Needs pre-norm blocks. With a cache, the
    same couplings run in plain autograd (generation needs no activation memory). Under ``torch.compile`` the
    reversible stack runs eagerly between the compiled graphs (not with ``fullgraph=True``: dynamo's error says why).
    ``forward(x, return_loss=False, ..., cache=None, return_cache=False)``: ``x`` token ids ``(b, n)``; logits
    ``(b, n, num_tokens)`` or, with ``return_loss``, the next-token cross-entropy (``n >= 2``, else a
    ValueError); with a cache (:meth:`init_cache`, :class:`TransformerCache`) the tokens continue cached
    sequences: one prefill call for a prompt, then one decode step per token. ``cu_seqlens=`` runs a packed
    ``(1, T)`` batch of documents (see :meth:`forward`). :meth:`generate` samples
    continuations on top (:mod:`gateloop_kernels.generate`).
    """

    def __init__(self, dim: int, *, num_tokens: int, depth: int, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4, checkpoint_gate_looped_attn: bool = True, use_gate_looped_attn: bool = True,
                 gate_loop_heads: Optional[int] = None, attn_add_swish_gating: bool = True,
                 dim_gate_looped_attn: Optional[int] = None, attn_softmax_normalize: Optional[bool] = None,
                 data_dependent_rel_pos: bool = False, frac_gradient_state_transition: float = 0.9,
                 ablate_complex: bool = False, ablate_state_transition: bool = False, rotary_emb: bool = False,
                 post_ln_norm: bool = False, sub_ln: bool = False, reversible: bool = False) -> None:
        super().__init__()
        if reversible and post_ln_norm:
            raise ValueError("reversible=True needs pre-norm blocks (post_ln_norm=False)")
        self.ablate_complex = ablate_complex
        self.ablate_state_transition = ablate_state_transition
        self.reversible = reversible
        self.token_emb = nn.Embedding(num_tokens, dim)
        wrapper = PostNorm if post_ln_norm else PreNorm
        self.layers = ModuleList([])
        for _ in range(depth):
            if use_gate_looped_attn:
                mixer: Module = GateLoopedAttention(
                    dim=dim, heads=gate_loop_heads, dim_inner=dim_gate_looped_attn,
                    add_swish_gating=attn_add_swish_gating, sub_ln=sub_ln,
                    checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                    frac_gradient_state_transition=frac_gradient_state_transition)
            else:
                mixer = CausalFullAttention(
                    dim=dim, dim_head=dim_head, heads=heads, rotary_emb=rotary_emb,
                    add_swish_gating=attn_add_swish_gating, softmax_normalize=attn_softmax_normalize,
                    data_dependent_rel_pos=data_dependent_rel_pos,
                    frac_gradient_data_dependent_rel_pos=frac_gradient_state_transition)
            self.layers.append(ModuleList([wrapper(dim, mixer), wrapper(dim, FeedForward(dim=dim, mult=ff_mult))]))
        self.to_logits = (nn.Linear(dim, num_tokens, bias=False) if post_ln_norm
                          else nn.Sequential(RMSNorm(dim), nn.Linear(dim, num_tokens, bias=False)))
        if reversible and depth:  # a stack needs a block; depth 0 is the embedding and logits alone
            from reversible import ReversibleSequence

            blocks = [(_Branch(attn), _Branch(ff)) for attn, ff in self.layers]
            attn_only = {name: [(True, False)] * depth
                         for name in ("ablate_complex", "ablate_state_transition", "cp_group", "cu_seqlens")}
            attn_only["check_shapes"] = [(False, False)] + [(True, False)] * (depth - 1)  # the first layer checks
            # kept out of the module tree: it shares the layers' parameters, and the state_dict
            # must keep the seed's names
            self.__dict__["_reversible_stack"] = ReversibleSequence(blocks, dim=-1, merge="mean",
                                                                    args_route=attn_only)

    def init_cache(self, batch_size: int, max_length: int = 0, *, device=None,
                   dtype: Optional[torch.dtype] = None) -> "TransformerCache":
        """An empty cache for ``batch_size`` sequences: zero states for gate-looped attention, key/value
        buffers of ``max_length`` tokens for full attention (they grow past it in eager calls; a captured
        decode graph needs them sized in advance). ``device`` / ``dtype`` default to the parameters'.

        Raises TypeError for a non-int ``batch_size`` / ``max_length`` or a ``dtype`` that is not a real floating
        ``torch.dtype``, ValueError for a negative size."""
        _check_cache_args(dtype, batch_size=batch_size, max_length=max_length)
        w = self.token_emb.weight
        device = w.device if device is None else device
        dtype = dtype or w.dtype
        layers = []
        for attn, _ in self.layers:
            mixer = attn.fn
            if isinstance(mixer, CausalFullAttention):
                layers.append(mixer.new_cache(batch_size, max_length, device=device, dtype=dtype))
            elif hasattr(mixer, "new_cache"):
                layers.append(mixer.new_cache(batch_size, device=device, dtype=dtype))
            else:  # an upstream layer that patch_gateloop_transformer() does not replace
                raise TypeError(f"{type(mixer).__name__} keeps no inference cache: build the model with "
                                "gateloop_kernels.Transformer")
        return TransformerCache(self, layers, batch_size, dtype)

    def forward(self, x: Tensor, return_loss: bool = False, ablate_complex: Optional[bool] = None,
                ablate_state_transition: Optional[bool] = None, cache: Optional["TransformerCache"] = None,
                return_cache: bool = False, labels: Optional[Tensor] = None, cp_group=None,
                cu_seqlens: Optional[Tensor] = None):
        """``x (b, n)`` token ids -> logits ``(b, n, num_tokens)``; the loss with ``return_loss``;
        ``(logits, cache)`` with ``return_cache``.

        ``cu_seqlens`` (1-D int32/int64 ``[0, l_1, l_1 + l_2, ..., T]`` on ``x``'s device): ``x (1, T)`` holds
        ``N`` packed documents; no layer mixes tokens of two documents, so the logits are each document's own.
        With ``return_loss`` all ``T`` tokens are inputs and each token's target is the next token of its own
        document (a document's last token has none; ``labels=`` may give ``(1, T)`` targets instead, already
        shifted: ``labels[:, t]`` is token ``t``'s target, -100 for none): the loss is the mean over all the
        documents' targets, i.e. the documents' losses weighted by their ``l_i - 1`` targets (NaN where no document
        has two tokens). With a cache for ``N`` sequences, a packed call is the prefill of ``N`` prompts of
        different lengths (gate-looped layers; full attention's key/value cache raises NotImplementedError), after
        which decode steps take ``(N, 1)`` tokens. With
        ``cp_group`` too (no cache), ``cu_seqlens`` holds the group's global boundaries (the same tensor on every
        rank) and ``x (1, n_r)`` this rank's slice of the row; with ``return_loss`` pass the slice's ``labels``
        (the next token in the same document, -100 at a document's last token).

        With a cache (from :meth:`init_cache` or a previous ``return_cache=True`` call) the tokens continue
        the cached sequences: a prompt of any length is one call (the scan from the cached states), then one
        new token per sequence is a decode step (the fused step under ``torch.no_grad()``; under autograd the
        same result by the scan, with gradients through this call's tokens only: the cache is detached).
        The cache is updated in place. Raises ValueError for a cache of another model or batch size, or
        with ``return_loss`` (labels given or not); TypeError for a cache made for another dtype or that is not
        a ``TransformerCache``. Given ``labels`` are the targets of ``x``'s tokens, already shifted (``labels[:, t]``
        the token after ``x[:, t]``; not Hugging Face's / flash-linear-attention's ``labels=input_ids``, which those
        models shift; ``labels=x`` trains each token to predict itself): integers shaped and placed as ``x``
        (TypeError / ValueError).

        ``cp_group`` (a ``torch.distributed`` process group): ``x`` is this rank's slice of the sequences'
        time axis (rank r holds slice r) and, with ``return_loss``, ``labels (b, n)`` are the next tokens of its
        tokens; the loss is then the mean over the whole sequence on every rank, and the parameter gradients
        averaged over the group (as DDP and FSDP2 do) are the single-process ones (docs/context_parallel.md).
        A rank whose arguments fail the checks above (or the embedding) raises its error, and every other rank a
        RuntimeError naming it from the first layer's descriptor exchange (no hang); a cache is not taken (ValueError).
        """
        ablate_complex = self.ablate_complex if ablate_complex is None else ablate_complex
        ablate_state_transition = (self.ablate_state_transition if ablate_state_transition is None
                                   else ablate_state_transition)
        sequences = None  # the rows of x, unless packed
        try:
            check_layer_input("x", x, 2, "(b, n) of token ids" if cu_seqlens is None else "(1, T) of token ids")
            if return_loss and labels is not None:
                _check_labels(labels, x)
            if cu_seqlens is not None:
                if cp_group is None:  # under a group the layers check it against the group's T
                    sequences = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
                if return_loss and labels is None and cp_group is None:
                    labels = _packed_targets(x, cu_seqlens)
            if return_loss and (cache is not None or return_cache):
                raise ValueError("return_loss=True does not take or return a cache")
            if cp_group is not None and (cache is not None or return_cache):
                raise ValueError("a cache is for decoding on one rank: not with cp_group")
            if return_loss and labels is None:
                if cp_group is not None:
                    raise ValueError("under cp_group pass this slice's labels= (the next token of each of its tokens)")
                if x.shape[1] < 2:  # the loss of no target is a mean over nothing: NaN
                    raise ValueError(f"return_loss=True needs at least 2 tokens (each predicts the next), got x of "
                                     f"shape {tuple(x.shape)}")
                x, labels = x[:, :-1], x[:, 1:]
            if cache is None and return_cache:
                cache = self.init_cache(x.shape[0] if sequences is None else sequences, x.shape[1], device=x.device)
            if cache is not None:
                if not isinstance(cache, TransformerCache):
                    raise TypeError(f"cache must be a TransformerCache (from init_cache() or a return_cache=True "
                                    f"call), got {type(cache).__name__}")
                cache.check(self, x, sequences)
            h = self.token_emb(x)
        except Exception:
            if cp_group is not None and self.layers and isinstance(self.layers[0][0].fn, GateLoopedAttention):
                from .context_parallel import report_failure

                # the other ranks wait in the first layer's descriptor exchange: they raise there instead of hanging
                report_failure("Transformer.forward", cp_group, self.token_emb.weight.device)
            raise
        kwargs = dict(ablate_complex=ablate_complex, ablate_state_transition=ablate_state_transition)
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        later = kwargs
        if cp_group is not None:
            kwargs["cp_group"] = cp_group
            # the first layer's check covers the others: one batch, and every rank runs the same model
            later = dict(kwargs, check_shapes=False)
        reversible = getattr(self, "reversible", False)  # patched upstream models have no such attribute
        if reversible and cache is None:
            if self.layers:  # depth 0: no couplings, the mean of the duplicated input is h
                stack = self.__dict__["_reversible_stack"]
                stack.train(self.training)
                h = stack(h, **later)
        elif reversible:
            # the stack's couplings run in plain autograd: y1 = x1 + attn(x2), y2 = x2 + ff(y1), halves averaged
            h1 = h2 = h
            for (attn, ff), c in zip(self.layers, cache.layers):
                h1 = h1 + attn.branch(h2, cache=c, **kwargs)
                h2 = h2 + ff.branch(h1)
            h = (h1 + h2).mul_(0.5)
        else:
            for i, ((attn, ff), c) in enumerate(zip(self.layers, cache.layers if cache is not None
                                                    else [None] * len(self.layers))):
                h = ff(attn(h, cache=c, **(later if i else kwargs)))
        logits = self.to_logits(h)
        if return_loss and cp_group is not None:
            from .context_parallel import context_parallel_mean

            # labels of -100 have no target (cross_entropy's ignore_index; packed labels hold one at each document's
            # last token): the count of the others, on the device
            count = (labels != -100).sum()
            return context_parallel_mean(F.cross_entropy(logits.transpose(1, 2), labels.long(), reduction="sum"), count,
                                         cp_group)
        if return_loss:
            return F.cross_entropy(logits.transpose(1, 2), labels.long())  # int32 token ids too
        return (logits, cache) if return_cache else logits

    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = True,
                 cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """``prompt (b, p)`` token ids followed by ``max_new_tokens`` sampled ones, ``(b, p + max_new_tokens)``:
        see :func:`gateloop_kernels.generate.generate`."""
        from .generate import generate

        return generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token=eos_token, generator=generator, cuda_graph=cuda_graph, cu_seqlens=cu_seqlens)


def _check_labels(labels: Tensor, x: Tensor) -> None:
    """Given targets: one integer id (or -100, none) per token of ``x``, on its device (``.long()`` would truncate
    float targets, and cross_entropy's own errors name no argument)."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of target token ids (-100: no target), got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.shape != x.shape or labels.device != x.device:
        raise ValueError(f"labels must have the shape and device of x, {tuple(x.shape)} on {x.device} (one target per "
                         f"token), got {tuple(labels.shape)} on {labels.device}")


def _packed_targets(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Next-token targets ``(1, T)`` of packed documents: ``x[t + 1]`` where it is in ``t``'s document, else -100
    (ignored by ``F.cross_entropy``)."""
    T = x.shape[1]
    has_next = torch.cat([positions(cu_seqlens, T)[1:] > 0, torch.zeros(1, dtype=torch.bool, device=x.device)])
    nxt = torch.cat([x[:, 1:], x.new_full((1, 1), -100)], dim=1)
    # [:T]: an empty row (T = 0) has no targets, not the one appended -100 (a (1, 1) label for (1, 0) logits)
    return torch.where(has_next, nxt, -100)[:, :T]


class TransformerCache:
    """The inference cache of a :class:`Transformer`: ``layers`` holds one cache per block (a gate-looped
    layer's complex state ``(batch_size, H, d, e)``, complex64 or complex128 for a float64 ``dtype``; a
    :class:`KVCache`), made for one model, ``batch_size`` sequences and ``dtype`` (the parameters' precision).
    Calls update it in place: copy it (``copy.deepcopy``) to branch two continuations from one prefix."""

    def __init__(self, model: Module, layers: list, batch_size: int, dtype: torch.dtype) -> None:
        self._model = weakref.ref(model)
        self.layers = layers
        self.batch_size = batch_size
        self.dtype = dtype

    def check(self, model: Module, x: Tensor, sequences: Optional[int] = None) -> None:
        """Raise unless this cache can continue ``model``'s sequences with tokens ``x (b, n)`` (``sequences``:
        how many ``x`` holds, ``b`` unless packed): ValueError for another model, another number of layer caches or
        of sequences, TypeError for another dtype, RuntimeError for a cache made under ``torch.inference_mode()``
        used outside it (each layer checks its own cache's shape, dtype and device)."""
        if self._model() is not model:
            raise ValueError("cache was made by another model (or for another Transformer instance)")
        if len(self.layers) != len(model.layers):  # the forward zips them with the blocks: a short list skips blocks
            raise ValueError(f"cache.layers must hold one cache per block, {len(model.layers)}, got {len(self.layers)}")
        sequences = x.shape[0] if sequences is None and x.ndim == 2 else sequences
        if x.ndim != 2 or sequences != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got tokens of shape {tuple(x.shape)}"
                             + ("" if sequences == x.shape[0] else f" packing {sequences} sequences"))
        dtype = model.token_emb.weight.dtype
        # the cache must hold the parameters' precision; float64 states are complex128, all others complex64
        if (promote(dtype, self.dtype) != self.dtype
                or (dtype == torch.float64) != (self.dtype == torch.float64)):
            raise TypeError(f"cache was made for {self.dtype}, the model is {dtype}")
        for i, layer in enumerate(self.layers):  # all before any block runs: a failing one would leave others updated
            _check_not_inference(f"cache.layers[{i}]", layer)

    def __deepcopy__(self, memo: dict) -> "TransformerCache":
        """A branch for the same model: the layer caches copied, the model referred to as before."""
        other = object.__new__(TransformerCache)
        other.__dict__.update(self.__dict__, layers=copy.deepcopy(self.layers, memo))
        return other

    def __getstate__(self) -> dict:
        # pickling reached the model's weak reference and failed with "cannot pickle 'weakref.ReferenceType'"
        raise TypeError("a TransformerCache refers to its model and is not saved: save cache.layers (plus batch_size "
                        "and dtype) and rebuild it with TransformerCache(model, layers, batch_size, dtype)")


class _Branch(Module):
    """A pre-norm block's residual branch as a coupling function (no second copy of parameters)."""

    def __init__(self, block: PreNorm) -> None:
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: parameters stay under the Transformer's names

    def parameters(self, recurse: bool = True):  # the reversible core collects gradients through these
        return self.block.parameters(recurse)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.block.branch(x, **kwargs)

