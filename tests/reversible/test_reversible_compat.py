"""Code written against each seed's reversible.py works unchanged with reversible.compat.*,
with the same outputs and gradients as the plain-autograd oracle of the same coupling."""
import inspect

import pytest
import torch
from torch import nn

import reversible
from reversible.compat import axial_attention, h_transformer_1d, nuwa, se3_transformer

from helpers.seed_reversible_oracle import (CrossFn, DictFn, Fn, assert_close_all, assert_matches_oracle,
                                            oracle_dict_sequence, oracle_dual, oracle_sequence)

TOL = 1e-10
D = 6

# public names and call signatures of the seeds' files (parameter names, in order)
SEED_API = {
    h_transformer_1d: {
        "route_args": ["router", "args", "depth"], "layer_drop": ["layers", "prob"],
        "Deterministic": ["net"], "ReversibleBlock": ["f", "g"],
        "ReversibleBlock.forward": ["x", "f_args", "g_args"],
        "ReversibleBlock.backward_pass": ["y", "dy", "f_args", "g_args"],
        "SequentialSequence": ["layers", "args_route", "layer_dropout"],
        "ReversibleSequence": ["blocks", "args_route", "layer_dropout"],
        "ReversibleSequence.forward": ["x", "kwargs"], "_ReversibleFunction.apply": ["x", "blocks", "args"],
    },
    axial_attention: {
        "Deterministic": ["net"], "ReversibleBlock": ["f", "g"], "IrreversibleBlock": ["f", "g"],
        "IrreversibleBlock.forward": ["x", "f_args", "g_args"],
        "ReversibleBlock.forward": ["x", "f_args", "g_args"],
        "ReversibleSequence": ["blocks"], "ReversibleSequence.forward": ["x", "arg_route", "kwargs"],
    },
    se3_transformer: {
        "map_values": ["fn", "x"], "dict_chunk": ["x", "chunks", "dim"], "dict_sum": ["x", "y"],
        "dict_subtract": ["x", "y"], "dict_cat": ["x", "y", "dim"], "dict_set_": ["x", "key", "value"],
        "dict_backwards_": ["outputs", "grad_tensors"], "dict_del_": ["x"], "values": ["d"],
        "Deterministic": ["net"], "ReversibleBlock": ["f", "g"], "ReversibleBlock.forward": ["x", "kwargs"],
        "ReversibleBlock.backward_pass": ["y", "dy", "kwargs"], "SequentialSequence": ["blocks"],
        "ReversibleSequence": ["blocks"], "ReversibleSequence.forward": ["x", "kwargs"],
        "_ReversibleFunction.apply": ["x", "blocks", "kwargs"],
    },
    nuwa: {
        "exists": ["val"], "null_context": [], "split_at_index": ["dim", "index", "t"],
        "ReversibleSelfAttnBlock": ["f", "g", "j", "k"], "ReversibleCrossAttnBlock": ["f", "g", "j", "k"],
        "ReversibleCrossModalityAttnBlock": ["f", "g", "j", "k"],
        "ReversibleSelfAttnBlock.forward": ["x", "m", "_reverse", "kwargs"],
        "ReversibleCrossModalityAttnBlock.backward_pass": ["y", "n", "dy", "dn", "kwargs"],
        "ReversibleFunction.apply": ["inp", "ind", "blocks", "kwargs"],
        "reversible_apply": ["inp", "ind", "blocks", "kwargs"],
        "irreversible_apply": ["inputs", "ind", "blocks", "kwargs"],
        "DualModalityReversibleSequence": ["input_blocks", "block_types"],
        "DualModalityReversibleSequence.forward": ["video", "audio", "context", "context_mask", "video_mask",
                                                   "audio_mask", "reverse"],
        "Deterministic": ["net"], "route_args": ["router", "args", "depth"],
        "ReversibleSequence": ["blocks", "args_route"], "SequentialSequence": ["layers", "args_route"],
    },
}


@pytest.mark.parametrize("module", list(SEED_API), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_same_public_names_and_signatures(module):
    for name, params in SEED_API[module].items():
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part)
        sig = inspect.signature(obj)
        got = [p for p in sig.parameters if p != "self"]
        if name == "route_args":  # ours has an extra optional `default`
            got = got[:3]
        assert got == params, f"{module.__name__}.{name}{sig}"


def test_h_transformer_1d(_seed):
    depth = 4
    blocks = [(Fn(D), Fn(D)) for _ in range(depth)]
    route = {"scale": [(True, False)] * depth, "shift": [(False, True)] * depth}  # like h-transformer's mask
    net = h_transformer_1d.ReversibleSequence(blocks, args_route=route, layer_dropout=0.25)
    assert "blocks.0.f.net.lin.weight" in net.state_dict()  # checkpoints of the seed load
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(D, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 5, D, dtype=torch.float64)
    tensors = [x, scale, *net.parameters()]
    assert_matches_oracle(lambda: net(x, scale=scale, shift=shift, ignored=1),
                          lambda: oracle_sequence(blocks, x, merge="sum", f_args=[{"scale": scale}] * depth,
                                                  g_args=[{"shift": shift}] * depth, layer_dropout=0.25),
                          tensors, _seed, TOL)

    seq = h_transformer_1d.SequentialSequence(nn.ModuleList([nn.ModuleList(b) for b in blocks]),
                                              args_route=route).eval()
    ref = x
    for f, g in blocks:
        ref = ref + f(ref, scale=scale)
        ref = ref + g(ref, shift=shift)
    assert_close_all([seq(x, scale=scale, shift=shift)], [ref], TOL)

    # the Function and a block used directly
    xx = torch.cat([x, x], dim=-1)
    y = h_transformer_1d._ReversibleFunction.apply(xx, net.blocks.eval(), [{"f_args": {}, "g_args": {}}] * depth)
    ref = oracle_sequence(blocks, x, merge="cat", training=False)
    assert_close_all([y], [ref], TOL)
    yb = net.blocks[0](xx)
    xr, _ = net.blocks[0].backward_pass(yb.detach(), torch.zeros_like(yb))
    assert_close_all([xr], [xx.detach()], 1e-12)


class ImgFn(nn.Module):
    def __init__(self, c, p=0.1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, dtype=torch.float64)
        self.drop = nn.Dropout(p)

    def forward(self, x, scale=None):
        h = self.drop(torch.tanh(self.conv(x)))
        return h if scale is None else h * scale


def test_axial_attention(_seed):
    c = 3
    layers = nn.ModuleList([nn.ModuleList([ImgFn(c), ImgFn(c)]) for _ in range(3)])  # as AxialImageTransformer
    net = axial_attention.ReversibleSequence(layers)
    x = torch.randn(2, c, 5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    tensors = [x, scale, *net.parameters()]
    pairs = [tuple(l) for l in layers]
    assert_matches_oracle(lambda: net(x, arg_route=(True, False), scale=scale),
                          lambda: oracle_sequence(pairs, x, dim=1, f_args=[{"scale": scale}] * 3),
                          tensors, _seed, TOL)
    assert_matches_oracle(lambda: net(x, scale=scale),
                          lambda: oracle_sequence(pairs, x, dim=1, f_args=[{"scale": scale}] * 3,
                                                  g_args=[{"scale": scale}] * 3),
                          tensors, _seed, TOL)
    irr = axial_attention.IrreversibleBlock(*pairs[0]).eval()
    xx = torch.cat([x, x], dim=1)
    assert_close_all([irr(xx, {}, {})], [oracle_sequence(pairs[:1], x, dim=1, merge="cat", training=False)], TOL)


def test_axial_attention_arg_route_reaches_reconstruction_error(_seed):
    """reconstruction_error(net, x, **call_kwargs) with the axial call's own arg_route raised "forward() got an
    unexpected keyword argument 'arg_route'" (routed to f and g as a model argument): it now routes as the call."""
    c = 3
    net = axial_attention.ReversibleSequence([(ImgFn(c), ImgFn(c)) for _ in range(2)])
    x = torch.randn(2, c, 5, 4, dtype=torch.float64)
    scale = torch.tensor(0.7, dtype=torch.float64)
    for route, want in (((True, False), [{"scale": scale}, {}]), ((False, True), [{}, {"scale": scale}])):
        assert [dict(cp.kwargs) for cp in net.couplings({"arg_route": route, "scale": scale})] == want * 2
        assert reversible.reconstruction_error(net, x, arg_route=route, scale=scale) < 1e-12


def test_se3_transformer(_seed):
    dims = {"0": 4, "1": 3}
    blocks = nn.ModuleList([nn.ModuleList([DictFn(dims), DictFn(dims)]) for _ in range(3)])
    net = se3_transformer.ReversibleSequence(blocks)
    x = {k: torch.randn(2, 5, 2, d, dtype=torch.float64, requires_grad=True) for k, d in dims.items()}
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    pairs = [tuple(b) for b in blocks]
    assert_matches_oracle(lambda: net(x, scale=scale),  # kwargs go to the attention (f) only
                          lambda: oracle_dict_sequence(pairs, x, f_kwargs={"scale": scale}),
                          [*x.values(), scale, *net.parameters()], _seed, TOL)

    # the seed's Function calling convention, with all keys concatenated on the last dim
    net.eval()
    xx = {k: torch.cat([v, v], dim=-1) for k, v in x.items()}
    flat = torch.cat(se3_transformer.values(xx), dim=-1)
    kw = {"input_keys": list(xx), "split_dims": [v.shape[-1] for v in xx.values()]}
    out = se3_transformer._ReversibleFunction.apply(flat, net.blocks, kw)
    ref = oracle_dict_sequence(pairs, x, merge="cat")
    assert_close_all([out], [torch.cat(list(ref.values()), dim=-1)], TOL)

    seq = se3_transformer.SequentialSequence(blocks).eval()
    r = x
    for f, g in pairs:
        r = g(f(r))
    assert_close_all(list(seq(x).values()), list(r.values()), TOL)
    assert se3_transformer.dict_sum({"a": torch.ones(1)}, {"a": torch.ones(1)})["a"].item() == 2


def test_nuwa_dual_modality(_seed):
    d = 6
    types = ["intra_modality_self_attn", "intra_modality_cross_attn", "inter_modality_cross_attn"]
    blocks = [(Fn(d), Fn(d), Fn(d), Fn(d)), (CrossFn(d), Fn(d), CrossFn(d), Fn(d)),
              (CrossFn(d), Fn(d), CrossFn(d), Fn(d))]
    net = nuwa.DualModalityReversibleSequence(blocks, types)
    assert "blocks.2.j.net.q.weight" in net.state_dict()
    video = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    audio = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 4, d, dtype=torch.float64, requires_grad=True)
    kw = dict(context=context, context_mask=torch.ones(2, 4, dtype=torch.float64),
              video_mask=(torch.rand(2, 5) > 0.2).double(), audio_mask=(torch.rand(2, 3) > 0.2).double())
    for reverse in (True, False):
        assert_matches_oracle(lambda: net(video, audio, reverse=reverse, **kw),
                              lambda: oracle_dual(blocks, types, video, audio, **kw),
                              [video, audio, context, *net.parameters()], _seed, TOL)

    # the Function calling convention: video and audio concatenated on dim 1
    net.eval()
    inp = torch.cat([torch.cat([video, video], -1), torch.cat([audio, audio], -1)], dim=1)
    fkw = {"context": context, **{k: kw[k] for k in ("context_mask", "video_mask", "audio_mask")}}
    out = nuwa.reversible_apply(inp, video.shape[1], net.blocks, fkw)
    out2 = nuwa.irreversible_apply(inp, video.shape[1], net.blocks, fkw)
    v_ref, a_ref = oracle_dual(blocks, types, video, audio, **kw)
    vo, ao = nuwa.split_at_index(1, video.shape[1], out)
    assert_close_all([(vo[..., :d] + vo[..., d:]) / 2, (ao[..., :d] + ao[..., d:]) / 2], [v_ref, a_ref], TOL)
    assert_close_all([out2], [out], TOL)
    # a block's backward_pass inverts its forward
    y, n = net.blocks[2](torch.cat([video, video], -1), torch.cat([audio, audio], -1), **fkw)
    xr, mr, _, _ = net.blocks[2].backward_pass(y.detach(), n.detach(), torch.zeros_like(y), torch.zeros_like(n), **fkw)
    assert_close_all([xr, mr], [torch.cat([video, video], -1), torch.cat([audio, audio], -1)], 1e-12)


def test_nuwa_reversible_sequence(_seed):
    depth = 3
    blocks = [(Fn(D), Fn(D)) for _ in range(depth)]
    route = {"scale": [(True, True), (False, True), (True, False)]}
    net = nuwa.ReversibleSequence(blocks, args_route=route)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(D, dtype=torch.float64, requires_grad=True)
    tensors = [x, scale, *net.parameters()]
    fa = [{"scale": scale} if r[0] else {} for r in route["scale"]]
    ga = [{"scale": scale} if r[1] else {} for r in route["scale"]]
    assert_matches_oracle(lambda: net(x, scale=scale),
                          lambda: oracle_sequence(blocks, x, merge="sum", f_args=fa, g_args=ga), tensors, _seed, TOL)


def test_install_points_an_unedited_package_at_the_compat_module(tmp_path, monkeypatch):
    import sys

    import reversible.compat as compat

    pkg = tmp_path / "nuwa_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from nuwa_pytorch.nuwa_pytorch import Model\n")
    (pkg / "nuwa_pytorch.py").write_text(
        "from nuwa_pytorch.reversible import ReversibleSequence\n"
        "from nuwa_pytorch.reversible_video_audio import DualModalityReversibleSequence\n"
        "class Model:\n    seq, dual = ReversibleSequence, DualModalityReversibleSequence\n")
    (pkg / "reversible.py").write_text("raise ImportError('the original was imported')\n")
    (pkg / "reversible_video_audio.py").write_text("raise ImportError('the original was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("nuwa_pytorch", "nuwa_pytorch.nuwa_pytorch", *compat.TARGETS["nuwa"]):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        compat.install("nuwa")
        import nuwa_pytorch

        assert nuwa_pytorch.Model.seq is nuwa.ReversibleSequence
        assert nuwa_pytorch.Model.dual is nuwa.DualModalityReversibleSequence
    finally:
        for name in ("nuwa_pytorch", "nuwa_pytorch.nuwa_pytorch", *compat.TARGETS["nuwa"]):
            sys.modules.pop(name, None)
    with pytest.raises(ValueError, match="unknown compat module"):
        compat.install("nope")
