"""The drop-in layers against the seed's modules (upstream ``gateloop-transformer``, float64, <= 1e-8),
the reversible Transformer against plain autograd of the same coupling, and bf16 autocast."""
from __future__ import annotations

import warnings

import pytest
import torch

from gateloop_kernels import layers as L

up = pytest.importorskip("gateloop_transformer", reason="upstream gateloop-transformer not installed")

CONFIGS = [
    dict(),
    dict(gate_loop_heads=2),
    dict(gate_loop_heads=1, dim_gate_looped_attn=32),
    dict(ablate_complex=True),
    dict(ablate_state_transition=True),
    dict(post_ln_norm=True, sub_ln=True, attn_add_swish_gating=False),
    dict(use_gate_looped_attn=False),
    dict(use_gate_looped_attn=False, rotary_emb=True),
    dict(use_gate_looped_attn=False, data_dependent_rel_pos=True),
    dict(use_gate_looped_attn=False, data_dependent_rel_pos=True, ablate_complex=True),
]


def _loss_and_grads(model, x):
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's checkpoint warns about use_reentrant
        loss = model(x, return_loss=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
def test_transformer_matches_seed_state_dict(kw):
    ref = up.Transformer(dim=16, num_tokens=20, depth=2, dim_head=8, heads=2, **kw).double()
    ours = L.Transformer(dim=16, num_tokens=20, depth=2, dim_head=8, heads=2, **kw).double()
    ours.load_state_dict(ref.state_dict())  # strict: same names, same shapes
    x = torch.randint(0, 20, (2, 41))
    l_ref, g_ref = _loss_and_grads(ref, x)
    l_ours, g_ours = _loss_and_grads(ours, x)
    assert abs(l_ref - l_ours) <= 1e-8 * abs(l_ref)
    assert g_ref.keys() == g_ours.keys()
    for name in g_ref:
        a, b = g_ref[name], g_ours[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).norm() <= 1e-8 * a.norm().clamp_min(1e-12), name


@pytest.mark.parametrize("kw", [dict(), dict(post_ln=True), dict(prenorm=False), dict(reverse=True)])
def test_simple_layer_matches_seed(kw):
    from gateloop_transformer.simplified_gate_loop import SimpleGateLoopLayer as Seed
    ref, ours = Seed(8, **kw).double(), L.SimpleGateLoopLayer(8, **kw).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 19, 8, dtype=torch.float64, requires_grad=True)
    o_ref, o_ours = ref(x), ours(x)
    assert (o_ref - o_ours).abs().max() <= 1e-10
    w = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * w).sum(), [x, *ref.parameters()])
    g_ours = torch.autograd.grad((o_ours * w).sum(), [x, *ours.parameters()])
    for a, b in zip(g_ref, g_ours):
        assert (a - b).norm() <= 1e-8 * a.norm()


def test_simple_layer_cache_matches_seed():
    from gateloop_transformer.simplified_gate_loop import SimpleGateLoopLayer as Seed
    ref, ours = Seed(8).double(), L.SimpleGateLoopLayer(8).double()
    ours.load_state_dict(ref.state_dict())
    x1, x2 = torch.randn(2, 11, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    o1, c_ref = ref(x1, return_cache=True)
    p1, c_ours = ours(x1, return_cache=True)
    for a, b in zip(c_ref, c_ours):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-12
    assert (ref(x2, cache=c_ref) - ours(x2, cache=c_ours)).abs().max() <= 1e-10


@pytest.fixture
def patched(monkeypatch):
    """``patch_gateloop_transformer()`` for one test: every attribute it sets is restored afterwards (it restored two of
    seven, leaving upstream's SimpleGateLoopLayer ours for the rest of the session: later comparisons against the seed
    compared ours with ours)."""
    import gateloop_transformer.gateloop_transformer as upm
    import gateloop_transformer.simplified_gate_loop as ups
    from gateloop_kernels import patch_gateloop_transformer

    for obj, names in ((upm, ("gate_loop_operator",)), (ups, ("gate_loop_operator",)),
                       (upm.GateLoopedAttention, ("forward", "new_cache")), (upm.Transformer, ("init_cache", "generate")),
                       (ups.SimpleGateLoopLayer, ("forward", "__getstate__"))):
        for name in names:  # recorded by monkeypatch (a missing one is deleted again)
            monkeypatch.setattr(obj, name, getattr(obj, name, None), raising=False)
    return patch_gateloop_transformer


def test_patch_gateloop_transformer_keeps_outputs_and_gradients(patched):
    """The same upstream instances (created before the patch) give the same loss and parameter gradients after it
    (float64, 1e-10): the Transformer, and the simplified layer (the seed's scan or its heinsen form) with a cache."""
    import gateloop_transformer.gateloop_transformer as upm
    from gateloop_transformer.simplified_gate_loop import SimpleGateLoopLayer as Seed

    torch.manual_seed(0)
    model = up.Transformer(dim=16, num_tokens=20, depth=2, gate_loop_heads=2).double()
    simple = [Seed(8).double(), Seed(8, use_heinsen=True).double()]
    x = torch.randint(0, 20, (2, 30))
    xs = torch.randn(2, 9, 8, dtype=torch.float64)

    def run():
        out = [_loss_and_grads(model, x)]
        for m in simple:
            o1, cache = m(xs[:, :5], return_cache=True)
            o = torch.cat([o1, m(xs[:, 5:], cache=cache)], dim=1)
            out.append((o.detach(), dict(zip("wg", torch.autograd.grad(o.square().sum(), list(m.parameters()))))))
        return out
    before = run()
    patched()
    assert upm.GateLoopedAttention.forward is L.GateLoopedAttention.forward
    after = run()
    for (a, ga), (b, gb), tol in zip(before, after, (1e-10, 1e-10, 1e-6)):  # heinsen: the seed's log-space scan
        assert (a - b).abs().max() <= tol * a.abs().max()
        for name in ga:
            assert (ga[name] - gb[name]).norm() <= tol * ga[name].norm(), name


def test_patched_simple_layer_pickles(patched, monkeypatch):
    """Upstream SimpleGateLoopLayers made before and after the patch (plain and heinsen) survive torch.save /
    pickle, giving the same outputs; the saved operator is upstream's by name, so the pickle loads without the
    patch too (upstream's own operator then). Before: the patch's operator was a lambda (unpicklable) and a layer
    made before it held upstream's replaced operator ("not the same object as ...gate_loop_operator")."""
    import io
    import pickle

    import gateloop_transformer.simplified_gate_loop as ups

    upstream_op = ups.gate_loop_operator
    torch.manual_seed(0)
    before = [ups.SimpleGateLoopLayer(8), ups.SimpleGateLoopLayer(8, use_heinsen=True)]
    patched()
    layers = before + [ups.SimpleGateLoopLayer(8), ups.SimpleGateLoopLayer(8, use_heinsen=True)]
    x = torch.randn(2, 17, 8)
    for layer in layers:
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), layer(x))
        saved = pickle.dumps(layer)
        with monkeypatch.context() as m:  # loaded where upstream is not patched
            m.setattr(ups, "gate_loop_operator", upstream_op)
            fn = pickle.loads(saved).gate_loop_fn
        assert getattr(fn, "func", fn) is upstream_op


def test_rmsnorm_is_the_seeds_formula():
    """``RMSNorm`` (PyTorch's rms_norm) against the seed's ``normalize(x) * sqrt(dim) * gamma``: float64 to
    1e-14 with a zero row (both give 0 there) and tiny rows, and the seed's dtype promotion."""
    norm = L.RMSNorm(24).double()
    with torch.no_grad():
        norm.gamma.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    x[0, 0] = 0.0
    x[0, 1] *= 1e-20
    ref = torch.nn.functional.normalize(x, dim=-1) * 24 ** 0.5 * norm.gamma
    assert (norm(x) - ref).abs().max() < 1e-14
    xb = torch.randn(2, 24, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot dispatch to fused" mixed-dtype warning
        out = L.RMSNorm(24)(xb)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("softmax_normalize", [None, True])
def test_data_dependent_rel_pos_in_16_bit(softmax_normalize):
    """Found by a serving probe: ``CausalFullAttention(data_dependent_rel_pos=True)`` with bf16 parameters raised in
    ``torch.polar`` ("Expected both inputs to be Half, Float or Double"), and under bf16 autocast its phase
    (``atan2``) ran in bf16, 0.2-0.36 relative error against float64 at seeds 0 and 1 without softmax (the keys are
    divided by gate products down to 1e-10). The gate is now formed in float32 and q, k return to their dtype: both
    within bf16's few percent of float64."""
    import copy

    for seed in (0, 1):
        torch.manual_seed(seed)
        m = L.CausalFullAttention(32, dim_head=8, heads=2, data_dependent_rel_pos=True,
                                  softmax_normalize=softmax_normalize)
        x = torch.randn(2, 17, 32)
        ref = copy.deepcopy(m).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(x)
        bf16 = copy.deepcopy(m).to(torch.bfloat16)(x.to(torch.bfloat16))
        assert bf16.dtype == torch.bfloat16
        for y in (auto, bf16):
            assert ((y.double() - ref).norm() / ref.norm()).item() < 0.06
