"""The coupling core against plain-autograd oracles (float64, <= 1e-10 relative)."""
import pytest
import torch
from torch import nn

import reversible
from reversible import _inplace

from helpers.op_log import OpLog
from helpers.seed_reversible_oracle import (CrossFn, DictFn, Fn, assert_close_all, assert_matches_oracle, grads_of,
                                            oracle_dict_sequence, oracle_dual, oracle_sequence)

TOL = 1e-10
D = 6


def _pairs(depth, d=D, p=0.1):
    return [(Fn(d, p), Fn(d, p)) for _ in range(depth)]

def _shape_for(dim):
    return {1: (2, 3, 4, D), 2: (2, 4, 3, D), -1: (2, 5, D)}[dim]


@pytest.mark.parametrize("dim", [1, 2, -1])
@pytest.mark.parametrize("merge", ["mean", "sum", "cat"])
def test_tensor_stream_matches_oracle(dim, merge, _seed):
    depth = 3
    pairs = _pairs(depth)
    net = reversible.ReversibleSequence(pairs, dim=dim, merge=merge)
    x = torch.randn(_shape_for(dim), dtype=torch.float64, requires_grad=True)
    assert_matches_oracle(lambda: net(x), lambda: oracle_sequence(pairs, x, dim=dim, merge=merge),
                          [x, *net.parameters()], _seed, TOL)


@pytest.mark.parametrize("layer_dropout", [0.0, 0.5])
def test_kwarg_routing_and_layer_dropout(layer_dropout, _seed):
    depth = 4
    pairs = _pairs(depth)
    route = {
        "scale": [(True, False), (False, True), (True, True), (False, False)],
        "shift": [(False, True), (True, True), (False, False), (True, False)],
    }
    net = reversible.ReversibleSequence(pairs, args_route=route, default_route=None, layer_dropout=layer_dropout)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(D, dtype=torch.float64, requires_grad=True)  # a kwarg tensor that needs grad
    shift = torch.randn(2, 5, D, dtype=torch.float64)
    tensors = [x, scale, *net.parameters()]
    f_args = [{k: v for k, v in (("scale", scale), ("shift", shift)) if route[k][i][0]} for i in range(depth)]
    g_args = [{k: v for k, v in (("scale", scale), ("shift", shift)) if route[k][i][1]} for i in range(depth)]
    for trial in range(3):  # different layer drops
        assert_matches_oracle(lambda: net(x, scale=scale, shift=shift, unrouted=123),
                              lambda: oracle_sequence(pairs, x, f_args=f_args, g_args=g_args,
                                                      layer_dropout=layer_dropout),
                              tensors, _seed + trial, TOL)


def test_default_route_sends_kwargs_to_f_and_g(_seed):
    pairs = _pairs(2)
    net = reversible.ReversibleSequence(pairs)  # default: every kwarg to every f and g
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert_matches_oracle(lambda: net(x, scale=scale),
                          lambda: oracle_sequence(pairs, x, f_args=[{"scale": scale}] * 2, g_args=[{"scale": scale}] * 2),
                          [x, scale, *net.parameters()], _seed, TOL)


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_dict_streams_match_oracle(merge, _seed):
    dims = {"0": 4, "1": 3, "2": 5}
    pairs = [(DictFn(dims), DictFn(dims)) for _ in range(3)]
    net = reversible.ReversibleSequence(pairs, merge=merge, args_route={"scale": [(True, False)] * 3},
                                        default_route=None)
    x = {k: torch.randn(2, 7, 2, d, dtype=torch.float64, requires_grad=True) for k, d in dims.items()}
    scale = torch.randn((), dtype=torch.float64, requires_grad=True)
    y = net(x, scale=scale)
    assert isinstance(y, dict) and list(y) == list(dims)
    assert_matches_oracle(lambda: net(x, scale=scale),
                          lambda: oracle_dict_sequence(pairs, x, f_kwargs={"scale": scale}, merge=merge),
                          [*x.values(), scale, *net.parameters()], _seed, TOL)


def _dual_setup(dtype=torch.float64):
    d = 6
    types = ["intra_modality_self_attn", "intra_modality_cross_attn", "inter_modality_cross_attn",
             "intra_modality_cross_attn", "inter_modality_cross_attn"]
    blocks = []
    for t in types:
        if t == "intra_modality_self_attn":
            blocks.append((Fn(d), Fn(d), Fn(d), Fn(d)))
        elif t == "intra_modality_cross_attn":
            blocks.append((CrossFn(d), Fn(d), CrossFn(d), Fn(d)))
        else:
            blocks.append((CrossFn(d), Fn(d), CrossFn(d), Fn(d)))
    return d, types, blocks


def test_dual_modality_matches_oracle(_seed):
    d, types, blocks = _dual_setup()
    net = reversible.DualModalityReversibleSequence(blocks, types)
    video = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    audio = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 4, d, dtype=torch.float64, requires_grad=True)
    kw = dict(context=context, context_mask=(torch.rand(2, 4) > 0.3).double(),
              video_mask=(torch.rand(2, 5) > 0.2).double(), audio_mask=(torch.rand(2, 3) > 0.2).double())
    for reverse in (True, False):  # reverse=False: the same function with plain autograd
        assert_matches_oracle(lambda: net(video, audio, reverse=reverse, **kw),
                              lambda: oracle_dual(blocks, types, video, audio, **kw),
                              [video, audio, context, *net.parameters()], _seed, TOL)


def test_split_input_mode_and_block_alone(_seed):
    pairs = _pairs(2)
    x = torch.randn(2, 5, 2 * D, dtype=torch.float64, requires_grad=True)
    net = reversible.ReversibleSequence(pairs, input_mode="split", merge="cat")
    assert_matches_oracle(lambda: net(x), lambda: oracle_sequence(pairs, x, merge="cat", split=True),
                          [x, *net.parameters()], _seed, TOL)

    # a block alone, reversible and irreversible, and its backward_pass inverse
    blk = reversible.ReversibleBlock(*pairs[0]).eval()
    irr = reversible.IrreversibleBlock(*pairs[0]).eval()
    yb = blk(x)
    assert_close_all([yb], [irr(x)], TOL)
    xr, dx = blk.backward_pass(yb.detach(), torch.ones_like(yb))
    assert_close_all([xr], [x.detach()], 1e-12)
    assert_close_all([dx], grads_of(irr(x).sum(), [x]), TOL)


def test_shared_blocks_and_unused_params(_seed):
    f, g = Fn(D), Fn(D)
    g.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    pairs = [(f, g)] * 4  # weight tying across depth
    net = reversible.ReversibleSequence(pairs)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(_seed)
    net(x).sum().backward()
    assert g.unused.grad is None
    got = [x.grad, *(p.grad for p in (*f.parameters(), g.lin.weight, g.lin.bias))]
    x.grad = None
    torch.manual_seed(_seed)
    want = grads_of(oracle_sequence(pairs, x).sum(), [x, *f.parameters(), g.lin.weight, g.lin.bias])
    assert_close_all(got, want, TOL)


def test_eval_and_no_grad_paths(_seed):
    pairs = _pairs(3)
    net = reversible.ReversibleSequence(pairs).eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    assert not y.requires_grad
    assert_close_all([y], [oracle_sequence(pairs, x, training=False)], TOL)


def test_returned_tensor_is_never_modified(_seed):
    for merge in ("mean", "cat"):
        net = reversible.ReversibleSequence(_pairs(3), merge=merge)
        x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
        y = net(x)
        kept = y.detach().clone()
        y.sum().backward()
        assert torch.equal(y.detach(), kept)
        assert x.grad is not None


def test_backward_is_in_place_through_the_helpers(monkeypatch, _seed):
    calls = {"reconstruct_": 0, "reconstruct_multi_": 0, "coupling_add_": 0}
    for name in calls:
        orig = getattr(_inplace, name)

        def wrapped(*a, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(*a)
        monkeypatch.setattr(_inplace, name, wrapped)
    depth = 5
    net = reversible.ReversibleSequence(_pairs(depth, p=0.0))
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = net(x)
    assert calls["coupling_add_"] == 2 * depth
    log = OpLog()
    with log:
        y.sum().backward()
    assert calls["reconstruct_"] == 2 * depth
    assert not {"aten::cat", "aten::stack"} & log.packets()

    dims = {"a": 3, "b": 4}
    dnet = reversible.ReversibleSequence([(DictFn(dims), DictFn(dims)) for _ in range(2)])
    out = dnet({k: torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True) for k, d in dims.items()})
    sum(v.sum() for v in out.values()).backward()
    assert calls["reconstruct_multi_"] == 4

    # dual streams: a video step and an audio step that touch different halves share one launch
    calls.update(reconstruct_=0, reconstruct_multi_=0)
    types = ["intra_modality_self_attn"] * 2
    dual = reversible.DualModalityReversibleSequence([(Fn(D), Fn(D), Fn(D), Fn(D)) for _ in types], types)
    v, a = dual(torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True))
    with log:
        (v.sum() + a.sum()).backward()
    assert calls == {"reconstruct_": 0, "reconstruct_multi_": 4, "coupling_add_": calls["coupling_add_"]}
    assert "aten::cat" not in log.packets()


def test_backward_twice_is_a_clear_error():
    net = reversible.ReversibleSequence(_pairs(2))
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = net(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        y.backward()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least one block"):
        reversible.ReversibleSequence([])
    with pytest.raises(ValueError, match="merge"):
        reversible.ReversibleSequence(_pairs(1), merge="max")
    with pytest.raises(ValueError, match="same depth"):
        reversible.ReversibleSequence(_pairs(2), args_route={"mask": [(True, True)]})
    with pytest.raises(ValueError, match=r"\(f, g\) pair"):
        reversible.ReversibleSequence([(Fn(D),)])
    with pytest.raises(ValueError, match="layer_dropout"):
        reversible.ReversibleSequence(_pairs(1), layer_dropout=1.0)
    net = reversible.ReversibleSequence(_pairs(1))
    with pytest.raises(ValueError, match="out of range"):
        reversible.ReversibleSequence(_pairs(1), dim=3)(torch.randn(2, 5, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="Tensor or a dict"):
        net([1.0, 2.0])
    with pytest.raises(TypeError, match="floating point"):
        net(torch.ones(2, 5, D, dtype=torch.long))
    with pytest.raises(ValueError, match="odd size"):
        reversible.ReversibleSequence(_pairs(1), input_mode="split")(torch.randn(2, 5, 7, dtype=torch.float64))
    shrink = reversible.ReversibleSequence([(nn.Linear(D, 2, dtype=torch.float64), Fn(D))])
    with pytest.raises(ValueError, match="preserve the shape"):
        shrink(torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="unknown layer type"):
        reversible.DualModalityReversibleSequence([(Fn(D),) * 4], ["nope"])
    with pytest.raises(ValueError, match="overlap"):
        reversible.Coupling(Fn(D), (0,), (0,))
    with pytest.raises(ValueError, match="refers to half"):
        reversible.run_couplings([torch.randn(2, D)], [reversible.Coupling(Fn(D), (0,), (3,))])


def test_reverse_couplings_checks_its_arguments():
    """The standalone inverse (and so ReversibleBlock.backward_pass) took a tensor's rows as streams, dropped the
    last element of an odd split dim, and failed deep inside (IndexError, autograd's shape error) on a missing or
    mis-shaped gradient or an out-of-range half, where run_couplings names the argument."""
    blk = reversible.ReversibleBlock(Fn(D, p=0.0), Fn(D, p=0.0))  # no dropout: the inverse replays no RNG state
    y = torch.randn(2, 2 * D, dtype=torch.float64)
    with pytest.raises(ValueError, match="odd size 13"):
        blk.backward_pass(torch.randn(2, 2 * D + 1, dtype=torch.float64), torch.randn(2, 2 * D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad 0 must have the shape"):
        blk.backward_pass(y, y[:1])
    with pytest.raises(TypeError, match="outputs must be a sequence"):
        reversible.reverse_couplings(y, y, blk.couplings())
    with pytest.raises(ValueError, match="grads must hold at least one"):
        reversible.reverse_couplings([y], [], blk.couplings())
    with pytest.raises(ValueError, match="refers to half 3"):
        reversible.reverse_couplings([y], [y], [reversible.Coupling(Fn(D), (3,), (0,))])
    x, dx = blk.backward_pass(blk(y), torch.ones_like(y))  # a well-formed call still inverts the block
    assert torch.allclose(x, y, atol=1e-12) and dx.shape == y.shape


def test_input_never_modified_and_nested_stacks(_seed):
    inner = reversible.ReversibleSequence(_pairs(2))
    pairs = [(inner, Fn(D)), (Fn(D), Fn(D))]  # a reversible stack inside f
    net = reversible.ReversibleSequence(pairs)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone()
    inner_pairs = [(blk.f, blk.g) for blk in inner.blocks]
    ref_pairs = [(lambda t: oracle_sequence(inner_pairs, t), pairs[0][1]), pairs[1]]
    assert_matches_oracle(lambda: net(x), lambda: oracle_sequence(ref_pairs, x), [x, *net.parameters()], _seed, TOL)
    assert torch.equal(x.detach(), x0)


def test_reconstruction_error_dual(_seed):
    d, types, blocks = _dual_setup()
    net = reversible.DualModalityReversibleSequence(blocks, types)
    video = torch.randn(2, 5, d, dtype=torch.float64)
    audio = torch.randn(2, 3, d, dtype=torch.float64)
    err = reversible.reconstruction_error(net, (video, audio), context=torch.randn(2, 4, d, dtype=torch.float64))
    assert err < 1e-13


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


class _Scale(nn.Module):
    """Shape-agnostic step: tanh(a * x + b) * c with scalar parameters, plus dropout."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(torch.tanh(self.p[0] * x + self.p[1])) * self.p[2]


if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), dim_pick=st.integers(0, 7),
           merge=st.sampled_from(["mean", "sum", "cat"]), split=st.booleans(), depth=st.integers(1, 4),
           seed=st.integers(0, 2**31 - 1))
    def test_property_any_shape_dim_merge(shape, dim_pick, merge, split, depth, seed):
        ndim = len(shape)
        dim = dim_pick % (2 * ndim) - ndim  # negative or positive
        if split:
            shape = list(shape)
            shape[dim] *= 2
        pairs = [(_Scale(), _Scale()) for _ in range(depth)]
        net = reversible.ReversibleSequence(pairs, dim=dim, merge=merge, input_mode="split" if split else "duplicate")
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert_matches_oracle(lambda: net(x), lambda: oracle_sequence(pairs, x, dim=dim, merge=merge, split=split),
                              [x, *net.parameters()], seed, TOL)


def test_tensors_closed_over_are_an_error_not_lost_grads():
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)

    class Closure(nn.Module):
        def forward(self, x):
            return torch.tanh(x * w)

    net = reversible.ReversibleSequence([(Closure(), Fn(D))])
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="gradients would be lost"):
        net(x).sum().backward()
    # the low-level API takes such tensors explicitly
    c = [reversible.Coupling(lambda t: torch.tanh(t * w), (0,), (1,), params=[w]), reversible.Coupling(Fn(D, p=0.0), (1,), (0,))]
    y = reversible.run_couplings([x], c)[0]
    got = grads_of(y.sum(), [x, w])
    x1 = x + torch.tanh(x * w)
    x2 = x + c[1].fn(x1)
    assert_close_all(got, grads_of(((x1 + x2) / 2).sum(), [x, w]), TOL)
