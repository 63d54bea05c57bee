"""Autoregressive generation with a :class:`gateloop_kernels.Transformer`: one prefill call over the prompt,
then one decode step per new token on the model's cache (O(1) time and memory per token for gate-looped
attention), on CUDA replayed from a captured CUDA graph."""
from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import check_cu_seqlens, is_int

__all__ = ["generate", "sample"]

_EOS_CHECK = 16
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """One token id per row of ``logits (b, vocab)``: the argmax at ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest and to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus).

    Args:
        logits: ``(b, vocab)``, any real floating dtype (sampled in float32), ``vocab >= 1``. A row without a
            softmax never raises (no host check, no device fault: ``generate`` keeps its one sync a call); at any
            ``temperature > 0`` it takes the probabilities uniform over the tokens argmax ranks first (``top_k``
            and ``top_p`` then cut as in any row), one of which ``temperature == 0`` returns (the first): a row with
            NaN logits over those (NaN ranks above all, as in ``torch.argmax``), else a row with ``+inf`` logits
            over those, a row of all ``-inf`` over all tokens (argmax: 0). A temperature below float32's normal
            range (~1.2e-38) draws among the row's maxima.
        temperature: a real number (Python or NumPy), ``0 <= temperature < inf``; 0 is greedy.
        top_k: an int (Python or NumPy, not a bool) ``>= 1`` or None (all tokens); ``top_k >= vocab`` keeps all.
        top_p: a real number in ``(0, 1]`` or None (1: no nucleus cut; the most likely token is always kept).
        generator: the ``torch.Generator`` of the draws (on ``logits``' device).

    Returns:
        ``(b,)`` int64 on ``logits``' device.

    Raises:
        TypeError: ``logits`` not a real floating tensor, ``temperature`` or ``top_p`` not a real number (a bool
        or a tensor is not), ``top_k`` not an int. ValueError: ``logits`` not ``(b, vocab)`` with ``vocab >= 1``,
        ``temperature`` negative, infinite or NaN, ``top_k < 1``, ``top_p`` outside ``(0, 1]``.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a real floating tensor (b, vocab), got "
                        f"{logits.dtype if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (b, vocab) with vocab >= 1, got shape {tuple(logits.shape)}")
    _check_sampling(temperature, top_k, top_p)
    return _sample(logits, temperature, _index(top_k), top_p, generator)


def _index(value: Optional[int]) -> Optional[int]:
    # a checked NumPy int as a Python int: torch.topk, shapes and fills then see one type
    return None if value is None else operator.index(value)


def _real(value) -> bool:
    # a Python or NumPy number (not a tensor, which every step would read on the host); a bool is a flag
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not _real(temperature):
        raise TypeError(f"temperature must be a real number, finite and >= 0 (0: greedy), got "
                        f"{type(temperature).__name__}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
    if top_k is not None and not is_int(top_k):
        raise TypeError(f"top_k must be a positive int or None, got {type(top_k).__name__}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not _real(top_p):
        raise TypeError(f"top_p must be a real number in (0, 1] or None, got {type(top_p).__name__}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> Tensor:
    """:func:`sample` on checked arguments (generate's every step)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)  # NaN where the row holds one, as argmax ranks NaN first
    # shifted first: a tiny temperature sends the others to -inf, never the largest to inf (NaN probabilities).
    # A row without a softmax (+inf or NaN logits, or all -inf: inf - inf is NaN) draws among the tokens argmax
    # ranks first, on the device: multinomial would fault (on CUDA a device-side assert) and a check would sync
    maxima = (logits == top) | logits.isnan()
    shifted = torch.where(top.isfinite(), logits - top, torch.where(maxima, 0.0, -math.inf))
    # a temperature below float32's normal range rounds to 0 in the division (0 / 0: NaN): its limit, the maxima alone
    logits = (shifted / temperature if temperature >= _FLOAT32_TINY
              else torch.where(shifted == 0, 0.0, -math.inf))
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _check_args(prompt: Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                top_p: Optional[float], eos_token: Optional[int], vocab: int, device: torch.device) -> None:
    if not isinstance(prompt, Tensor) or prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt must be an int64 (or int32) tensor of token ids, got "
                        f"{prompt.dtype if isinstance(prompt, Tensor) else type(prompt).__name__}")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, p) with p >= 1 tokens, got shape {tuple(prompt.shape)}")
    if prompt.device != device:
        raise ValueError(f"prompt must be on the model's device {device} (prompt.to({str(device)!r})), got "
                         f"{prompt.device}")
    # one host sync a call: on CUDA an id out of range would be a device-side assert that ends the process's CUDA use
    if prompt.numel() and not bool(((prompt >= 0) & (prompt < vocab)).all()):
        raise ValueError(f"prompt holds token ids outside [0, {vocab}) (the model's vocabulary)")
    if not is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    if eos_token is not None and not is_int(eos_token):
        raise TypeError(f"eos_token must be an int token id or None, got {type(eos_token).__name__}")
    if eos_token is not None and not 0 <= eos_token < vocab:
        raise ValueError(f"eos_token must be a token id in [0, {vocab}), got {eos_token!r}")


def _captured_step(step: Callable[[Tensor], Tensor], token: Tensor, cache) -> Optional[Callable[[Tensor], Tensor]]:
    """``step`` as a replay of a CUDA graph (``token (b, 1)`` -> logits), or ``None`` where capture fails.

    The caller has run one eager step (kernels compiled, buffers allocated); capture records the next one
    without running it, so the first replay is that step."""
    static_in = token.clone()
    lengths = [c.length for c in cache.layers if hasattr(c, "length")]
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_in)
    except Exception as err:  # noqa: BLE001 - any failure of capture falls back to eager
        for c, n in zip((c for c in cache.layers if hasattr(c, "length")), lengths):
            c.length = n
        warnings.warn(f"generate: CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly",
                      stacklevel=3)
        return None
    # capture ran the Python side of one step (host counters) without its kernels: the first replay does them
    def replay(tok: Tensor) -> Tensor:
        static_in.copy_(tok)
        graph.replay()
        return static_out

    return replay


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token: Optional[int] = None,
             generator: Optional[torch.Generator] = None, cuda_graph: bool = True,
             cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """``prompt (b, p)`` with ``max_new_tokens`` tokens appended, ``(b, p + max_new_tokens)`` int64.

    Args:
        model: a :class:`gateloop_kernels.Transformer` (or an upstream one patched by ``patch_gateloop_transformer``).
        prompt: ``(b, p)`` int64 or int32 token ids in ``[0, num_tokens)``, ``p >= 1``, on the model's device.
        max_new_tokens: an int (Python or NumPy, not a bool) ``>= 0`` (0 returns the prompt as int64).
        temperature, top_k, top_p, generator: as :func:`sample` (``temperature=0``: greedy).
        eos_token: an int token id (Python or NumPy) or None. A row that emits it is finished: it keeps getting
            ``eos_token`` (once all are, decoding stops and the rest is padded with it). The other rows are
            unaffected.
        cuda_graph: on CUDA, capture the decode step once as a CUDA graph and replay it; where capture fails it
            runs eagerly, with one warning.
        cu_seqlens: ``[0, l_1, ..., T]`` (1-D int32/int64 on the prompt's device, every ``l_i >= 1``, a gate-looped
            model): ``prompt (1, T)`` packs ``N`` prompts of different lengths, prefilled in one call; the result is
            then the ``N`` continuations alone, ``(N, max_new_tokens)`` int64.

    The prompt is one prefill call, then each token is a decode step on the model's cache (see
    :meth:`Transformer.forward`); tokens come from :func:`sample`. Runs under ``torch.no_grad()``, in the model's
    current mode (and dtype, or the caller's autocast). The token ids are checked on the host (one sync a call).

    Raises:
        TypeError: a non-integer prompt, ``max_new_tokens``, ``top_k`` or ``eos_token``; ``temperature`` or ``top_p``
        not a real number (a bool or a tensor is not); ``cu_seqlens`` not an int32/int64 tensor. ValueError:
        ``max_new_tokens < 0``, a prompt not ``(b, p >= 1)``, on another device than the model or with ids outside
        the vocabulary, ``temperature`` negative, infinite or NaN, ``top_k < 1``, ``top_p`` outside ``(0, 1]``,
        ``eos_token`` out of range; ``cu_seqlens`` not 1-D, with a prompt of batch > 1, on another device, with bad
        values or an empty prompt. NotImplementedError: ``cu_seqlens`` with a full-attention model.
    """
    vocab = model.token_emb.num_embeddings
    _check_args(prompt, max_new_tokens, temperature, top_k, top_p, eos_token, vocab, model.token_emb.weight.device)
    max_new_tokens, top_k, eos_token = _index(max_new_tokens), _index(top_k), _index(eos_token)
    prompt = prompt.long()
    b, p = prompt.shape
    if cu_seqlens is not None:
        b = check_cu_seqlens(cu_seqlens, prompt.shape[0], p, prompt.device)
        if not bool((cu_seqlens.diff() > 0).all()):  # a host sync, once per call: an empty prompt has no logits
            raise ValueError("cu_seqlens: every packed prompt needs at least one token")
        p = 0  # the result holds the continuations alone
    out = torch.empty((b, p + max_new_tokens), dtype=torch.int64, device=prompt.device)
    if p:
        out[:, :p] = prompt
    if max_new_tokens == 0:
        return out
    from .layers import Transformer

    cache = Transformer.init_cache(model, b, prompt.shape[1] + max_new_tokens, device=prompt.device)
    # an upstream model patched by patch_gateloop_transformer() keeps its own forward (no cache): ours, called on it
    forward = model if isinstance(model, Transformer) else functools.partial(Transformer.forward, model)

    def step(tok: Tensor) -> Tensor:
        return forward(tok, cache=cache)[:, -1]

    def pick(logits: Tensor) -> Tensor:
        return _sample(logits, temperature, top_k, top_p, generator)

    if cu_seqlens is None:
        tok = pick(step(prompt))
    else:  # each prompt's last token predicts its first new one
        tok = pick(forward(prompt, cache=cache, cu_seqlens=cu_seqlens)[0, cu_seqlens[1:].long() - 1])
    finished = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    run = step
    for i in range(max_new_tokens):
        if eos_token is not None:
            tok = tok.masked_fill(finished, eos_token)
            finished |= tok == eos_token
        out[:, p + i] = tok
        if i == max_new_tokens - 1:
            break
        # every row finished: the rest is padding (a host sync, so only every _EOS_CHECK steps)
        if eos_token is not None and i % _EOS_CHECK == _EOS_CHECK - 1 and bool(finished.all()):
            out[:, p + i + 1:] = eos_token
            break
        logits = run(tok[:, None])
        if i == 0 and cuda_graph and prompt.is_cuda:
            run = _captured_step(step, tok[:, None], cache) or step
        tok = pick(logits)
    return out
