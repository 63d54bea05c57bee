"""Recurrent inference: layer and Transformer caches (prefill + decode steps give the logits of one full forward
at every position), ``Transformer.generate`` (greedy = the argmax continuation of full forwards, eos, sampling),
cache tensors that keep their size and storage, and bad input."""
from __future__ import annotations

import copy
import importlib.util
import math
import warnings

import pytest
import torch

import gateloop_kernels as gk
from gateloop_kernels import decode as D
from gateloop_kernels import layers as L

VOCAB, LENGTH = 50, 67  # the CPU scans' chunk is 64: prompts of 63 and 65 straddle it

GATE_LOOP = {
    "hd1": dict(),
    "hd8-noswish-subln": dict(gate_loop_heads=4, attn_add_swish_gating=False, sub_ln=True),
    "hd16-postnorm": dict(gate_loop_heads=2, post_ln_norm=True),
    "hd8-ablate-complex": dict(gate_loop_heads=4, ablate_complex=True),
    "hd8-no-decay": dict(gate_loop_heads=4, ablate_state_transition=True),
    "hd1-reversible": dict(reversible=True),
    "hd8-reversible": dict(gate_loop_heads=4, reversible=True),
}
FULL = dict(use_gate_looped_attn=False, heads=2, dim_head=16)
FULL_ATTN = {
    "full-rotary": dict(FULL, rotary_emb=True),
    "full-ddrp": dict(FULL, data_dependent_rel_pos=True),
    "full-ddrp-softmax": dict(FULL, data_dependent_rel_pos=True, attn_softmax_normalize=True),
    "full-rotary-reversible": dict(FULL, rotary_emb=True, reversible=True),
}
CONFIGS = {**GATE_LOOP, **FULL_ATTN}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes


def _model(kw, dtype=torch.float64, device="cpu"):
    if kw.get("rotary_emb") and importlib.util.find_spec("rotary_embedding_torch") is None:
        pytest.skip("rotary_emb=True needs rotary-embedding-torch (the test extra; bench/gpu.sh installs it from .whl/)")
    return L.Transformer(dim=32, num_tokens=VOCAB, depth=2, **kw).to(device=device, dtype=dtype)


def _max_rel(got, want):
    """Largest relative error over positions (b, n) of logits ``(b, n, vocab)``."""
    err = (got.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1)
    return err.max().item()


def _prefill_then_decode(model, x, p, cache=None):
    logits, cache = model(x[:, :p], cache=cache, return_cache=True)
    steps = [model(x[:, t:t + 1], cache=cache) for t in range(p, x.shape[1])]
    return torch.cat([logits, *steps], dim=1), cache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_decode_matches_full_forward(name, dtype):
    """float64 to 1e-10; float32 to 1e-5, or to 8x the float32 full forward's own error where the model is
    worse conditioned than that (the data-dependent rel pos divides keys by products down to 1e-10: its
    float32 forward alone is up to ~1.3e-5 from float64), both against the float32 and the float64 forward."""
    model = _model(CONFIGS[name], dtype)
    model64 = copy.deepcopy(model).double()
    # p = 1 and the chunk +- 1 on one sequence; a long prompt (3 chunks and a part) on a longer one
    for length, prompts in ((LENGTH, (1, 63, 65)), (4 * 64 + 5, (4 * 64 + 2,))):
        x = torch.randint(0, VOCAB, (2, length))
        with torch.no_grad():
            full, truth = model(x), model64(x)
            tol = 1e-10 if dtype == torch.float64 else max(1e-5, 8 * _max_rel(full, truth))
            for p in prompts:
                got, _ = _prefill_then_decode(model, x, p)
                assert _max_rel(got, full) <= tol, (name, p)
                assert _max_rel(got, truth) <= max(tol, 1e-10), (name, p)


@pytest.mark.skipif(not __import__("os").environ.get("TRITON_INTERPRET"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["hd1", "hd8-noswish-subln", "hd8-no-decay"])
def test_prefill_decode_through_the_kernel(monkeypatch, name):
    """The layers' decode steps through the Triton kernel (interpreted), float32."""
    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch step ran where the kernel should")
    monkeypatch.setattr(D, "decode_step_reference", fail)
    model = _model(CONFIGS[name], torch.float32)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), D.interpreted():
        full = model(x)
        got, _ = _prefill_then_decode(model, x, 5)
    assert _max_rel(got, full) <= 1e-5


LAYERS = {
    "gate-loop-hd1": lambda: L.GateLoopedAttention(16),
    "gate-loop-hd8": lambda: L.GateLoopedAttention(16, heads=2, sub_ln=True),
    "full-rotary": lambda: L.CausalFullAttention(16, dim_head=8, heads=2, rotary_emb=True, add_swish_gating=True),
    "full-ddrp": lambda: L.CausalFullAttention(16, dim_head=8, heads=2, data_dependent_rel_pos=True),
    "simple": lambda: L.SimpleGateLoopLayer(16),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_prefill_decode(name, dtype):
    layer = LAYERS[name]().to(dtype)
    x = torch.randn(3, 12, 16, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        full = layer(x)
        out, cache = layer(x[:, :4], return_cache=True)
        outs = [out]
        for t in range(4, 12):
            o, cache = layer(x[:, t:t + 1], cache=cache, return_cache=True)
            outs.append(o)
        # a continuation of several tokens from a cache too
        out2, _ = layer(x[:, :4], return_cache=True)
        _, cache2 = layer(x[:, :4], return_cache=True)
        rest = layer(x[:, 4:], cache=cache2)
    got = torch.cat(outs, dim=1)
    assert (got - full).norm() <= tol * full.norm()
    assert (torch.cat([out2, rest], 1) - full).norm() <= tol * full.norm()


@pytest.mark.parametrize("name", ["gate-loop-hd1", "gate-loop-hd8", "full-rotary", "full-ddrp"])
def test_cached_calls_under_autograd(name):
    """Found by a new user's probe, calls on a cache with gradients enabled: full attention dropped the gradient
    through the call's own keys and values (read back from the detached buffers: 0.3-0.96 relative error, silently),
    the head-dim-1 layer's backward raised 'modified by an inplace operation' (the cache's update overwrote the
    initial state its scan saved), one token raised the decode step's 'inference-only'. Each call's gradient with
    respect to its own inputs is the full forward's (no gradient crosses the cache), three calls then one backward."""
    layer = LAYERS[name]().double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    full = layer(x)
    w = torch.randn_like(full)
    spans = [(4, 7), (7, 8), (8, 9)]
    want = torch.cat([torch.autograd.grad((full[:, a:b] * w[:, a:b]).sum(), x, retain_graph=True)[0][:, a:b]
                      for a, b in spans], dim=1)
    with torch.no_grad():
        _, cache = layer(x[:, :4], return_cache=True)
    xs = x.detach()[:, 4:].requires_grad_()
    out = torch.cat([layer(xs[:, a - 4:b - 4], cache=cache) for a, b in spans], dim=1)
    grad, = torch.autograd.grad((out * w[:, 4:]).sum(), xs)
    assert (out - full[:, 4:]).norm() <= 1e-10 * full[:, 4:].norm()
    assert (grad - want).norm() <= 1e-10 * want.norm()


def test_one_token_prompt_under_autograd():
    """A one-token prompt with return_cache=True under autograd raised 'inference-only' where two tokens ran."""
    model = _model(GATE_LOOP["hd8-noswish-subln"])
    x = torch.randint(0, VOCAB, (2, 4))
    got, _ = _prefill_then_decode(model, x, 1)
    assert got.requires_grad and _max_rel(got, model(x)) <= 1e-10


def _greedy_oracle(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("name", ["hd1", "hd8-noswish-subln", "hd8-reversible", "full-rotary", "full-ddrp"])
def test_greedy_generate_matches_full_forwards(name):
    model = _model(CONFIGS[name])
    prompt = torch.randint(0, VOCAB, (3, 5))
    with torch.no_grad():
        want = _greedy_oracle(model, prompt, 8)
    got = model.generate(prompt, 8, temperature=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["hd1", "hd8-noswish-subln", "hd8-reversible"])
def test_packed_prompts_generate_as_each_alone(name):
    """Prompts of 5, 1 and 66 tokens (across the CPU scan's 64-step chunk) packed with cu_seqlens: one prefill,
    then batch-3 decode steps; each continuation is the greedy one of its prompt generated alone."""
    model = _model(GATE_LOOP[name])
    lens = [5, 1, 66]
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in lens]
    cu = torch.tensor([0, 5, 6, 72])
    got = model.generate(torch.cat(prompts, 1), 7, temperature=0, cu_seqlens=cu)
    want = torch.cat([model.generate(p, 7, temperature=0)[:, p.shape[1]:] for p in prompts])
    assert got.shape == (3, 7) and torch.equal(got, want)


def test_packed_prompts_bad_input():
    prompt = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="at least one token"):
        _model(GATE_LOOP["hd1"]).generate(prompt, 3, cu_seqlens=torch.tensor([0, 4, 4, 6]))
    with pytest.raises(NotImplementedError, match="cache"):  # full attention's key/value cache is not packed
        _model(FULL_ATTN["full-rotary"]).generate(prompt, 3, cu_seqlens=torch.tensor([0, 4, 6]))
    model = _model(GATE_LOOP["hd1"])
    with pytest.raises(ValueError, match="cache holds 3 sequences"):
        model(prompt, cache=model.init_cache(3), cu_seqlens=torch.tensor([0, 4, 6]))


def test_generate_eos_pads_finished_rows():
    model = _model(GATE_LOOP["hd8-noswish-subln"])
    prompt = torch.randint(0, VOCAB, (4, 3))
    free = model.generate(prompt, 10, temperature=0)
    eos = int(free[0, 3 + 2])  # row 0 emits it at step 2 (or earlier)
    got = model.generate(prompt, 10, temperature=0, eos_token=eos)
    want = free.clone()
    for row in want:
        hits = (row[3:] == eos).nonzero()
        if len(hits):
            row[3 + int(hits[0]):] = eos
    assert torch.equal(got, want)
    assert (got[0, 5:] == eos).all()
    # one row: finished by step 2, decoding stops early and pads
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    got1 = model.generate(prompt[:1], 40, temperature=0, eos_token=eos)
    assert torch.equal(got1[:, 3:6], want[:1, 3:6]) and (got1[0, 5:] == eos).all()
    assert len(calls) <= 17


def test_sampling():
    model = _model(GATE_LOOP["hd1"])
    prompt = torch.randint(0, VOCAB, (3, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 6, top_p=1e-9), greedy)
    a = model.generate(prompt, 6, temperature=1.5, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=1.5, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    assert model.generate(prompt, 0).shape == (3, 4)
    # a tiny temperature samples the argmax (its logits / T would overflow unshifted: NaN probabilities)
    assert torch.equal(model.generate(prompt, 6, temperature=1e-39), greedy)
    with torch.no_grad():  # top_k: every sampled token among the k most likely under the full forward
        logits = model(a[:, :-1])[:, 3:]
    ranks = (logits > logits.gather(-1, a[:, 4:, None])).sum(-1)
    assert (ranks < 10).all()


def test_sampling_infinite_logits():
    """An overflowed (+inf) logit is the argmax, but sampling shifted the row by its maximum (inf - inf: NaN) and
    multinomial raised 'probability tensor contains either inf, nan' (on CUDA a device-side assert); it now draws
    among the +inf tokens alone, with top_k / top_p too, and leaves finite rows as they were."""
    from gateloop_kernels.generate import sample

    logits = torch.tensor([[math.inf, 0.0, 1.0, math.inf], [0.0, 3.0, 1.0, 2.0]]).repeat(50, 1)
    g = torch.Generator().manual_seed(0)
    for kw in ({}, {"top_k": 3}, {"top_p": 0.9}, {"temperature": 0.5}):
        tok = sample(logits, generator=g, **kw)
        assert set(tok[::2].tolist()) == {0, 3}
        assert set(tok[1::2].tolist()) <= {0, 1, 2, 3}
    assert set(sample(logits[1::2], top_k=1).tolist()) == {1}


def test_sampling_rows_without_a_softmax():
    """Found by a serving-path probe: a row of all -inf logits (every token masked) or with a NaN logit made
    sample() / generate() raise inside multinomial ('probability tensor contains either inf, nan', on CUDA a
    device-side assert that ends the process). It now draws uniformly, on the device, among the tokens argmax ranks
    first (NaN above all, as torch.argmax; all -inf: every token), one of which temperature=0 returns; other rows
    of the batch are unaffected."""
    from gateloop_kernels.generate import sample

    nan, inf = math.nan, math.inf
    rows = torch.tensor([[-inf] * 4, [1.0, nan, 2.0, nan], [inf, nan, 0.0, -inf], [-inf, 0.0, -inf, -inf]])
    first = {0: {0, 1, 2, 3}, 1: {1, 3}, 2: {1}, 3: {1}}  # the argmax ties of each row
    logits = rows.repeat(1000, 1)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert all(int(t) in first[r] for r, t in enumerate(sample(rows, temperature=0)))
    for kw in ({}, {"top_k": 2}, {"top_p": 0.9}, {"temperature": 1e-3}, {"temperature": 1e-40}):
        tok = sample(logits, generator=g, **kw).view(1000, 4)
        for r, allowed in first.items():
            counts = torch.bincount(tok[:, r], minlength=4)
            # uniform over the ties (top_k keeps ties, top_p 0.9 keeps up to 4 equal ones): 1000 / |ties| each,
            # binomial std <= 16, so 100 is over 6 std
            assert set(counts.nonzero()[:, 0].tolist()) == allowed, (kw, r, counts)
            assert (counts[sorted(allowed)] - 1000 / len(allowed)).abs().max() < 100, (kw, r, counts)
    model = _model(GATE_LOOP["hd1"])
    with torch.no_grad():
        model.to_logits[-1].weight[5] = nan  # logit 5 NaN at every step: argmax's only choice
    prompt = torch.randint(0, VOCAB, (2, 3))
    got = model.generate(prompt, 3, generator=g)
    assert (got[:, 3:] == 5).all() and torch.equal(model.generate(prompt, 3, temperature=0), got)


def test_tiny_temperature_and_prompt_device():
    """Found by a new user's probe: a temperature below float32's normal range (1e-300, 5e-324: finite and > 0, so
    accepted) rounded to 0 in the division and multinomial raised on the NaN probabilities; it now samples the argmax
    (its limit). A prompt on another device than the model failed inside the first layer ('cache is on cpu, the
    layer's inputs on meta'); now a ValueError naming prompt, before any forward."""
    from gateloop_kernels.generate import sample

    logits = torch.randn(8, VOCAB)
    for t in (1e-300, 5e-324):
        assert torch.equal(sample(logits, temperature=t), logits.argmax(-1))
    model = _model(GATE_LOOP["hd1"])
    prompt = torch.randint(0, VOCAB, (2, 3))
    assert torch.equal(model.generate(prompt, 3, temperature=1e-300), model.generate(prompt, 3, temperature=0))
    with pytest.raises(ValueError, match="prompt must be on the model's device meta"):
        model.to("meta").generate(prompt, 2)


@pytest.mark.parametrize("name", ["hd8-noswish-subln", "hd1-reversible", "full-rotary"])
def test_cache_keeps_size_and_storage(name):
    """Decode steps write in place: every cache tensor keeps its shape and storage, whatever the token count."""
    model = _model(CONFIGS[name])
    x = torch.randint(0, VOCAB, (2, 20))
    cache = model.init_cache(2, 20)

    def tensors(c):
        return [t for lc in c.layers for t in ((lc.k, lc.v, lc.pos) if isinstance(lc, L.KVCache) else (lc,))]
    before = [(t.data_ptr(), t.shape) for t in tensors(cache)]
    with torch.no_grad():
        model(x[:, :4], cache=cache)
        for t in range(4, 20):
            model(x[:, t:t + 1], cache=cache)
    assert [(t.data_ptr(), t.shape) for t in tensors(cache)] == before


def test_strided_cache_decodes_in_place():
    """A strided view of a gate-loop cache (rows of a larger one, e.g. the even beams ``cache[::2]``) continued by a
    prefill but failed a decode step with the decode step's 'state must be contiguous'; now both update it in place."""
    layer = L.GateLoopedAttention(16, heads=2).double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x[::2])
        _, cache = layer(x[:, :3], return_cache=True)
        rows = cache[::2]
        assert not rows.is_contiguous()
        outs = [layer(x[::2, t:t + 1], cache=rows) for t in range(3, 5)]
    assert (torch.cat(outs, 1) - full[:, 3:]).abs().max() <= 1e-10
    _, want = layer(x[::2], return_cache=True)
    assert torch.allclose(cache[::2], want, rtol=1e-12, atol=1e-12)


def test_kv_cache_grows_past_its_capacity():
    model = _model(FULL_ATTN["full-rotary"])
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(x)
        got, cache = _prefill_then_decode(model, x, 3, cache=model.init_cache(2, 4))
    assert _max_rel(got, full) <= 1e-10
    assert cache.layers[0].capacity >= 12


def test_bad_input():
    model, other = _model(GATE_LOOP["hd8-noswish-subln"]), _model(GATE_LOOP["hd8-noswish-subln"])
    x = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        _, cache = model(x, return_cache=True)
        with pytest.raises(ValueError, match="another model"):
            other(x[:, :1], cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences"):
            model(x[:1, :1], cache=cache)
        with pytest.raises(ValueError, match="return_loss"):
            model(x, cache=cache, return_loss=True)
        with pytest.raises(TypeError, match="made for torch.float64"):
            model.float()(x[:, :1], cache=cache)
        model.double()
        layer = model.layers[0][0].fn
        h = torch.randn(2, 1, 32, dtype=torch.float64)
        with pytest.raises(ValueError, match="another layer or batch size"):
            layer(h, cache=cache.layers[0][:1])
        with pytest.raises(TypeError, match="another dtype"):
            layer(h, cache=cache.layers[0].to(torch.complex64))
        full = L.CausalFullAttention(32, dim_head=8, heads=2).double()
        kv = full.new_cache(2, 4)
        with pytest.raises(ValueError, match="another layer or batch size"):
            full(h[:1], cache=kv)
        with pytest.raises(TypeError, match="another dtype"):
            full(h, cache=full.new_cache(2, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(x, -1)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        model.generate(x, 2.0)
    with pytest.raises(TypeError, match="prompt must be"):
        model.generate(x.float(), 2)
    with pytest.raises(ValueError, match="p >= 1"):
        model.generate(x[:, :0], 2)
    for bad in (-1, VOCAB):  # before: IndexError from the embedding (on CUDA a device-side assert)
        with pytest.raises(ValueError, match=r"token ids outside \[0, "):
            model.generate(torch.cat([x, torch.full_like(x[:, :1], bad)], 1), 2)
    for kwargs, what in ((dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
                         (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                         (dict(eos_token=VOCAB), "eos_token")):
        with pytest.raises(ValueError, match=what):
            model.generate(x, 2, **kwargs)


def test_bad_input_named():
    """Found by a new user's probe: each bad argument raises an error naming it (before: a loss with labels= took a
    cache and advanced it, sample() drew from the inverted distribution at a negative temperature, a float eos_token
    silently never matched, cryptic IndexError / AttributeError from inside)."""
    model = _model(GATE_LOOP["hd8-noswish-subln"])
    x = torch.randint(0, VOCAB, (2, 6))
    cache = model.init_cache(2)
    before = [t.clone() for t in cache.layers]
    with pytest.raises(ValueError, match="return_loss"):
        model(x, return_loss=True, labels=x, cache=cache)
    with pytest.raises(ValueError, match="return_loss"):
        model(x, return_loss=True, labels=x, return_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.layers))  # the cache untouched
    with pytest.raises(TypeError, match="TransformerCache"):
        model(x, cache=(None,))
    for bad, err, what in ((-1, ValueError, "batch_size"), (2.0, TypeError, "batch_size")):
        with pytest.raises(err, match=what):
            model.init_cache(bad)
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(2, -1)
    with pytest.raises(TypeError, match="dtype"):
        model.init_cache(2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="eos_token"):
        model.generate(x, 2, eos_token=26.5)
    with pytest.raises(TypeError, match="top_k"):
        model.generate(x, 2, top_k=True)
    from gateloop_kernels.generate import sample
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    for kwargs, err, what in ((dict(temperature=-1.0), ValueError, "temperature"), (dict(top_k=0), ValueError, "top_k"),
                              (dict(top_p=0.0), ValueError, "top_p"), (dict(top_k=1.5), TypeError, "top_k")):
        with pytest.raises(err, match=what):
            sample(logits, **kwargs)
    with pytest.raises(ValueError, match=r"\(b, vocab\)"):
        sample(logits[0])
    with pytest.raises(TypeError, match="logits"):
        sample(logits.long())
    assert sample(logits, temperature=0).tolist() == [1]


def test_cache_constructors_check_their_arguments():
    """init_cache(dtype="float32") raised AttributeError 'str' object has no attribute 'is_floating_point'; the
    layers' new_cache took a negative or float batch to torch.zeros' errors (naming no argument) and an integer dtype
    silently (a complex64 state, int key/value buffers). All three now raise naming the argument."""
    full = L.CausalFullAttention(16, dim_head=8, heads=2)
    for make in (_model(GATE_LOOP["hd1"]).init_cache, L.GateLoopedAttention(16).new_cache,
                 lambda b, **kw: full.new_cache(b, 4, **kw)):
        for kwargs, err, what in ((dict(dtype="float32"), TypeError, "dtype must be a real floating torch.dtype"),
                                  (dict(dtype=torch.int32), TypeError, "dtype must be a real floating"),
                                  (dict(b=-1), ValueError, r"(batch|batch_size) must be >= 0, got -1"),
                                  (dict(b=2.0), TypeError, r"(batch|batch_size) must be an int, got float")):
            kwargs = dict(kwargs)
            with pytest.raises(err, match=what):
                make(kwargs.pop("b", 2), **kwargs)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        full.new_cache(2, -3)


@pytest.mark.parametrize("name", ["hd1", "hd1-reversible", "full-rotary"])
def test_cache_missing_a_layer_raises(name):
    """A TransformerCache whose layers list lost an entry (cache.layers.pop()) ran the model without its last block:
    logits 0.15-0.44 off, silently; now a ValueError. A full-attention block given a state tensor raised
    AttributeError 'Tensor' object has no attribute 'check'; now a TypeError naming the KVCache."""
    model = _model(CONFIGS[name])
    x = torch.randint(0, VOCAB, (2, 5))
    cache = model.init_cache(2, 5)
    cache.layers.pop()
    with torch.no_grad(), pytest.raises(ValueError, match="one cache per block, 2, got 1"):
        model(x, cache=cache)
    full = L.CausalFullAttention(16, dim_head=8, heads=2)
    with torch.no_grad(), pytest.raises(TypeError, match="cache must be the KVCache"):
        full(torch.randn(2, 1, 16), cache=torch.zeros(2, 2, 4, 8))


@pytest.mark.parametrize("name", ["hd8-noswish-subln", "full-ddrp"])
def test_inference_mode_cache_used_outside_it_named(name):
    """Found by a serving-path probe: a cache made under torch.inference_mode() and used outside it raised PyTorch's
    'Inplace update to inference tensor outside InferenceMode', naming no cache (full attention's buffers were left
    grown, so the next call failed with an IndexError). Now a RuntimeError naming the cache and the fixes, before
    any block runs (the cache untouched); a copy made outside inference_mode continues as a cache made there would:
    the logits of one full forward."""
    model = _model(CONFIGS[name])
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.inference_mode():
        _, cache = model(x[:, :5], return_cache=True)
    before = copy.deepcopy(cache)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"cache.layers\[0\] was made under "
                                                                                r"torch.inference_mode\(\).*deepcopy"):
            model(x[:, 5:], cache=cache)
    layer, state = model.layers[0][0].fn, cache.layers[0]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^cache was made under torch.inference_mode"):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=state)
    for a, b in zip(cache.layers, before.layers):  # untouched
        assert all(torch.equal(t, u) for t, u in ((a.k, b.k), (a.v, b.v), (a.pos, b.pos))) if isinstance(a, L.KVCache) \
            else torch.equal(a, b)
    with torch.no_grad():
        want = model(x)[:, 5:]
        got = model(x[:, 5:], cache=before)  # the deepcopy holds normal tensors
    assert _max_rel(got, want) < 1e-10
    with torch.inference_mode():  # inside inference_mode the cache itself continues
        assert _max_rel(model(x[:, 5:], cache=cache), want) < 1e-10


def test_sampling_arguments_of_the_wrong_type_named():
    """Found by a new user's probe: temperature="1" or None and top_p="x" raised Python's own "'<=' not supported
    between instances of 'int' and 'str'", naming no argument; now a TypeError naming the argument and its range, in
    sample() and generate() alike (which also checks before any forward)."""
    from gateloop_kernels.generate import sample

    model = _model(GATE_LOOP["hd1"])
    x = torch.randint(0, VOCAB, (1, 3))
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    for kwargs, what in ((dict(temperature="1"), r"temperature must be a real number, finite and >= 0"),
                         (dict(temperature=None), "temperature must be a real number"),
                         (dict(temperature=True), "temperature must be a real number"),
                         (dict(temperature=torch.tensor(1.0)), "temperature must be a real number"),
                         (dict(temperature=1j), "temperature must be a real number"),
                         (dict(top_p="x"), r"top_p must be a real number in \(0, 1\] or None"),
                         (dict(top_p=True), "top_p must be a real number"),
                         (dict(top_k=1.5), "top_k must be a positive int or None")):
        for call in (lambda: sample(logits, **kwargs), lambda: model.generate(x, 2, **kwargs)):
            with pytest.raises(TypeError, match=what):
                call()
    import numpy as np  # NumPy numbers are real numbers
    assert sample(logits, temperature=np.float64(0.0), top_p=np.float32(0.5)).tolist() == [1]


def test_numpy_ints_taken_as_ints():
    """Found by a serving-path probe: max_new_tokens, top_k and eos_token rejected NumPy ints (TypeError) while
    temperature and top_p took NumPy numbers. Every int check now takes what operator.index takes (not a bool, not
    a tensor): the same tokens as the Python ints."""
    import numpy as np

    from gateloop_kernels.generate import sample

    model = _model(GATE_LOOP["hd1"])
    prompt = torch.randint(0, VOCAB, (2, 3))
    seed = int(torch.randint(0, 2**31, ()))
    eos = int(model.generate(prompt, 3, temperature=0)[0, 4])
    got = model.generate(prompt, np.int64(4), top_k=np.int32(5), eos_token=np.int64(eos),
                         generator=torch.Generator().manual_seed(seed))
    want = model.generate(prompt, 4, top_k=5, eos_token=eos, generator=torch.Generator().manual_seed(seed))
    assert got.shape == (2, 7) and torch.equal(got, want)
    logits = torch.randn(4, VOCAB)
    assert torch.equal(sample(logits, top_k=np.uint8(1)), logits.argmax(-1))
    for kw, what in ((dict(top_k=np.bool_(True)), "top_k"), (dict(eos_token=True), "eos_token"),
                     (dict(max_new_tokens=torch.tensor(2)), "max_new_tokens")):
        kw = dict(kw)
        with pytest.raises(TypeError, match=f"{what} must be"):
            model.generate(prompt, kw.pop("max_new_tokens", 2), **kw)


@pytest.mark.parametrize("make_layer", [lambda: L.SimpleGateLoopLayer(16), lambda: L.GateLoopedAttention(16, heads=4)],
                         ids=["simple", "gate-looped"])
def test_layer_cu_seqlens_checked_before_use(make_layer):
    """A layer sizes its cache check by cu_seqlens: its type and dims are checked first (before: AttributeError
    'list' object has no attribute 'shape', IndexError, or a cache error for a 2-D cu_seqlens)."""
    layer = make_layer()
    x = torch.randn(1, 5, 16)
    cache = layer.new_cache(2) if hasattr(layer, "new_cache") else None
    for cu, err in (([0, 3, 5], TypeError), (torch.tensor(5), ValueError), (torch.tensor([[0, 3, 5]]), ValueError)):
        with pytest.raises(err, match="cu_seqlens"):
            layer(x, cu_seqlens=cu, cache=cache)


def test_simple_layer_cache_error_is_short():
    with pytest.raises(ValueError, match=r"got a Tensor of shape \(2, 32, 1\)$"):
        L.SimpleGateLoopLayer(16)(torch.randn(2, 4, 16), cache=torch.zeros(2, 32, 1))


# ----------------------------------------------------------------------------- GPU

GPU_CONFIGS = {"hd1": dict(), "hd16": dict(gate_loop_heads=2), "hd64": dict(gate_loop_heads=1, dim_gate_looped_attn=64),
               "hd16-reversible": dict(gate_loop_heads=2, reversible=True), "full-rotary": FULL_ATTN["full-rotary"]}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_prefill_decode_cuda(name):
    model = _model(GPU_CONFIGS[name], torch.float32, "cuda")
    x = torch.randint(0, VOCAB, (4, 150), device="cuda")
    with torch.no_grad():
        full = model(x)
        for p in (1, 63, 65, 129):
            got, _ = _prefill_then_decode(model, x, p)
            # float32 sums in another order (chunked scan vs decode steps, 150 steps, depth 2): up to 1.1e-5 seen
            assert _max_rel(got, full) <= 3e-5, p
        with torch.autocast("cuda", torch.bfloat16):
            full16 = model(x)
            got16, _ = _prefill_then_decode(model, x, 65)
    assert _max_rel(got16, full16) <= 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True], ids=["f32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_generate_cuda_graph(name, amp):
    """The captured decode graph gives the eager loop's tokens, and capture succeeds (no fallback warning)."""
    model = _model(GPU_CONFIGS[name], torch.float32, "cuda")
    prompt = torch.randint(0, VOCAB, (8, 17), device="cuda")
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        eager = model.generate(prompt, 24, temperature=0, cuda_graph=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed = model.generate(prompt, 24, temperature=0, cuda_graph=True)
    assert not [w for w in caught if "capture failed" in str(w.message)], [str(w.message) for w in caught]
    assert torch.equal(graphed, eager)
    gen = torch.Generator("cuda")
    a = model.generate(prompt, 24, top_k=20, generator=gen.manual_seed(1), cuda_graph=False)
    b = model.generate(prompt, 24, top_k=20, generator=gen.manual_seed(1), cuda_graph=True)
    assert torch.equal(a, b)


def test_patched_upstream_model_generates():
    """An upstream gate-looped model, patched in place, generates the argmax continuation of its own forward."""
    up = pytest.importorskip("gateloop_transformer.gateloop_transformer")
    import gateloop_transformer.simplified_gate_loop as up_simple
    from gateloop_kernels import patch_gateloop_transformer

    saved = {(cls, name): cls.__dict__.get(name) for cls, names in
             ((up.GateLoopedAttention, ("forward", "new_cache")), (up.Transformer, ("init_cache", "generate")),
              (up_simple.SimpleGateLoopLayer, ("forward", "__getstate__"))) for name in names}
    saved_ops = up.gate_loop_operator, up_simple.gate_loop_operator
    model = up.Transformer(dim=16, num_tokens=VOCAB, depth=2, gate_loop_heads=2).double()
    prompt = torch.randint(0, VOCAB, (2, 4))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the seed's checkpoint warns about use_reentrant
        want = _greedy_oracle(model, prompt, 6)
    try:
        patch_gateloop_transformer()
        got = model.generate(prompt, 6, temperature=0)
        full_attn = up.Transformer(dim=16, num_tokens=VOCAB, depth=1, use_gate_looped_attn=False)
        with pytest.raises(TypeError, match="keeps no inference cache"):
            full_attn.generate(prompt, 2)
    finally:
        up.gate_loop_operator, up_simple.gate_loop_operator = saved_ops
        for (cls, name), fn in saved.items():
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hd1", "hd64", "full-rotary"])
def test_decode_memory_flat_cuda(name):
    """Allocated GPU memory is the same after 10 and after 40 decode steps (the cache sized in advance)."""
    model = _model(GPU_CONFIGS[name], torch.float32, "cuda")
    x = torch.randint(0, VOCAB, (4, 140), device="cuda")
    cache = model.init_cache(4, 140)
    with torch.no_grad():
        model(x[:, :100], cache=cache)
        for t in range(100, 140):
            model(x[:, t:t + 1], cache=cache)
            if t == 109:
                torch.cuda.synchronize()
                allocated = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated



def test_failed_capture_falls_back(monkeypatch):
    """Where capture fails midway (here: the step raises after the layers ran, as an op that cannot be
    captured would) the step stays eager: one warning, and the key/value caches' host-side length is what it
    was before the attempt (capture runs the Python side of a step, not its kernels)."""
    import contextlib

    from gateloop_kernels import generate as G

    model = _model(FULL_ATTN["full-rotary"])
    x = torch.randint(0, VOCAB, (2, 6))
    cache = model.init_cache(2, 8)
    with torch.no_grad():
        model(x[:, :5], cache=cache)

    def step(t):
        model(t, cache=cache)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    with torch.no_grad(), pytest.warns(UserWarning, match="capture failed .*not permitted.*decoding eagerly"):
        assert G._captured_step(step, x[:, 5:6], cache) is None
    assert [c.length for c in cache.layers] == [5, 5]


@pytest.mark.parametrize("amp", [False, True], ids=["bf16", "bf16-autocast-layer"])
def test_simple_cache_keeps_float32_state_in_bf16(amp):
    """Found by a serving probe: ``simple_gate_loop_operator`` returned its cache rounded to the inputs' dtype, so bf16
    decoding (a bf16 model or autocast) one token at a time added each ``kv`` to a bf16 state: at a gate of 1 (where a
    bf16 sigmoid saturates) the state stopped at 256 (``kv = 1`` is half its bf16 spacing there) while one call over
    the same 300 tokens reached 300. The cache keeps the scan's float32 state: token by token equals one call."""
    T = 300
    if amp:  # the layer under autocast, its gate saturated (sigmoid(20) is 1 in bf16), kv from the projection
        layer = L.SimpleGateLoopLayer(4)
        with torch.no_grad():
            w = layer.to_qkva[0].weight
            w.zero_()
            w[:4] = w[4:8] = torch.eye(4)  # q = kv = the normed input
            w[8:, 0] = 20.0
        x = torch.ones(1, T, 4)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            full = layer(x)
            out, cache = layer(x[:, :1], return_cache=True)
            outs = [out]
            for t in range(1, T):
                o, cache = layer(x[:, t:t + 1], cache=cache, return_cache=True)
                outs.append(o)
    else:
        q = a = torch.ones(1, T, 3, dtype=torch.bfloat16)
        kv = torch.ones(1, T, 3, dtype=torch.bfloat16)
        full, _ = gk.simple_gate_loop_operator(q, kv, a)
        cache, outs = None, []
        for t in range(T):
            o, cache = gk.simple_gate_loop_operator(q[:, t:t + 1], kv[:, t:t + 1], a[:, t:t + 1], cache=cache)
            outs.append(o)
        assert all(c.dtype == torch.float32 for c in cache)
    got = torch.cat(outs, dim=1)
    assert full.dtype == got.dtype == torch.bfloat16
    assert (got.float() - full.float()).abs().max() <= 1e-2 * full.float().abs().max()


def test_cache_save_named_and_rebuilt_from_its_layers():
    """Found by a serving probe: ``torch.save(cache)`` failed with "cannot pickle 'weakref.ReferenceType' object"
    (the cache refers to its model weakly), naming no way out. Now a TypeError that names it; the layers saved and
    loaded, rebuilt into a cache for the model, continue the sequences as the original cache does."""
    import io

    model = _model(CONFIGS["hd8-noswish-subln"])
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        _, cache = model(x[:, :5], return_cache=True)
        with pytest.raises(TypeError, match=r"save cache.layers .*TransformerCache\(model, layers, batch_size, dtype\)"):
            torch.save(cache, io.BytesIO())
        buf = io.BytesIO()
        torch.save(cache.layers, buf)
        buf.seek(0)
        rebuilt = gk.TransformerCache(model, torch.load(buf), cache.batch_size, cache.dtype)
        branch = copy.deepcopy(cache)  # deepcopy still branches (the model referred to, the layers copied)
        want = model(x)[:, 5:]
        for c in (rebuilt, branch, cache):
            assert _max_rel(model(x[:, 5:], cache=c), want) < 1e-10
