"""User inputs a reversible stack must handle like plain autograd (or refuse clearly): closures that change
between calls, stride-0 / non-contiguous inputs, empty batches, dtype mixes, inputs or parameters that do
not need grad, non-finite values; a property test against plain autograd over shapes and dtypes."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import reversible

from helpers.seed_reversible_oracle import Fn, assert_close_all, grads_of

TOL = 1e-10
D = 6


class Late(nn.Module):
    """A step function that starts closing over ``extra`` (a tensor, maybe needing grad) once it is set."""

    def __init__(self, d=D):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)
        self.extra = None

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h if self.extra is None else h * self.extra


def test_closure_check_holds_on_every_call():
    """The check that f / g close over no tensor needing grad ran once per module: a module that starts
    closing over one after its first backward gave that tensor no gradient and raised nothing."""
    f = Late()
    net = reversible.ReversibleSequence([(f, Fn(D, p=0.0))])
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    net(x).sum().backward()  # nothing closed over yet: fine
    f.extra = torch.randn(D, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="gradients would be lost"):
        net(x).sum().backward()
    assert f.extra.grad is None
    # a tensor that needs no grad is fine to close over, and a parameter gets its gradient
    f.extra = torch.randn(D, dtype=torch.float64)
    net(x).sum().backward()
    f.extra = nn.Parameter(torch.randn(D, dtype=torch.float64))
    got = grads_of(net(x).square().sum(), [x, f.extra, *f.lin.parameters()])
    ref = reversible.SequentialSequence(list(zip([f], [net.blocks[0].g])))
    want = grads_of(ref(x).square().sum(), [x, f.extra, *f.lin.parameters()])
    assert_close_all(got, want, TOL)


class WhereSqrt(nn.Module):
    """``tanh(lin(x)) + where(c > 0, sqrt(c), 0)``: finite, but its vjp is NaN wherever ``c < 0`` even for a
    zero output gradient (the unselected branch's derivative times zero), like many masked functions."""

    def __init__(self, d=D):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x, c, **ignored):
        return torch.tanh(self.lin(x)) + torch.where(c > 0, c.sqrt(), torch.zeros_like(c))


def test_unused_output_takes_no_vjp_like_plain_autograd():
    """With the audio output unused, plain autograd takes no vjp of the audio steps: the audio parameters get
    no gradient (None: an optimizer skips them) and a NaN vjp of an audio step that reads the video stream
    does not reach it. The reversible backward started every stream's gradient buffer at zero and took those
    vjps: zeros instead of None, and NaN in the video input's and f's gradients."""
    from helpers.seed_reversible_oracle import CrossFn

    torch.manual_seed(0)
    types = ["intra_modality_self_attn", "inter_modality_cross_attn"]
    blocks = [(Fn(D, p=0.0), Fn(D, p=0.0), Fn(D, p=0.0), Fn(D, p=0.0)),
              (CrossFn(D, p=0.0), Fn(D, p=0.0), WhereSqrt(), Fn(D, p=0.0))]  # f, g, j, k
    net = reversible.DualModalityReversibleSequence(blocks, types)
    video = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    audio = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    tensors = [video, audio, *net.parameters()]
    got = torch.autograd.grad(net(video, audio)[0].square().sum(), tensors, allow_unused=True)
    want = torch.autograd.grad(net(video, audio, reverse=False)[0].square().sum(), tensors, allow_unused=True)
    assert [g is None for g in got] == [w is None for w in want]
    assert any(w is None for w in want) and all(w is None or torch.isfinite(w).all() for w in want)
    assert_close_all([g for g in got if g is not None], [w for w in want if w is not None], TOL)


class Wide(nn.Module):
    """A step whose output is wider (float64) than the float32 stream it is added to."""

    def __init__(self, d=D):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.lin(x.double()))


@pytest.mark.parametrize("x_dtype, step, stream_dtype", [(torch.float32, Wide, None),  # a float32 stream
                                                      (torch.float64, Fn, torch.float32)])  # float32 buffers
def test_stream_keeps_its_dtype_with_and_without_grad(x_dtype, step, stream_dtype):
    """A float64 output added to a float32 stream is rounded to float32 by the reversible forward's in-place
    add; the functional path (no grad, eval, SequentialSequence) promoted the stream to float64 from there on,
    so one model gave outputs differing by float32 rounding with and without grad. Now bitwise equal."""
    pairs = [(step(D), step(D)) for _ in range(3)]
    for m in (m for pair in pairs for m in pair):
        m.eval()  # no dropout
    x = torch.randn(2, 5, D, dtype=x_dtype)
    net = reversible.ReversibleSequence(pairs, stream_dtype=stream_dtype)
    with_grad = net(x.clone().requires_grad_())
    with torch.no_grad():
        without = net(x)
    plain = reversible.SequentialSequence(pairs, stream_dtype=stream_dtype)(x.clone().requires_grad_())
    assert with_grad.dtype == without.dtype == plain.dtype == x_dtype
    assert torch.equal(with_grad, without) and torch.equal(with_grad, plain)


# ----------------------------------------------------------------------------- property test

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


class _Elementwise(nn.Module):
    """Shape-agnostic step ``tanh(a * x + b) * c`` with scalar parameters (a NaN stays in its element),
    returned in one of several layouts: ``kind`` "dense", "transposed" (a non-contiguous output),
    "identity" (the input itself), "expanded" (``c`` expanded to the half: stride 0, no input), or of
    the last dim's sum, "reduced" (the input's gradient is then expanded: stride 0)."""

    def __init__(self, dtype, kind="dense"):
        super().__init__()
        self.p = nn.Parameter(torch.randn(3, dtype=dtype))
        self.kind = kind

    def forward(self, x):
        if self.kind == "identity":
            return x
        if self.kind == "expanded":
            return self.p[2].expand_as(x)
        if self.kind == "transposed":
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        if self.kind == "reduced":
            x = x.sum(-1, keepdim=True).expand_as(x)
        return torch.tanh(self.p[0] * x + self.p[1]) * self.p[2]


def _layout(x, kind, dim):
    """``x`` (values kept) laid out as ``kind``; returns (the tensor to pass, the leaf that needs grad)."""
    if kind == "expanded":  # stride 0 on dim 0: a leaf of size 1 there, expanded
        leaf = x[:1].clone()
        return leaf.expand_as(x), leaf
    if kind == "transposed":
        leaf = x.transpose(0, -1).contiguous()
        return leaf.transpose(0, -1), leaf
    if kind == "sliced":  # every other element of the last dim of a wider leaf
        leaf = torch.repeat_interleave(x, 2, dim=-1)
        return leaf[..., ::2], leaf
    return x, x


_DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

if given is not None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(shape=st.lists(st.integers(0, 3), min_size=1, max_size=3), dim_pick=st.integers(0, 5),
           layout=st.sampled_from(["contiguous", "expanded", "transposed", "sliced"]),
           kinds=st.lists(st.sampled_from(["dense", "transposed", "identity", "expanded", "reduced"]),
                          min_size=6, max_size=6),
           dtype=st.sampled_from(list(_DTYPE_TOL)), merge=st.sampled_from(["mean", "sum", "cat"]),
           split=st.booleans(), depth=st.integers(1, 3), x_grad=st.booleans(), existing=st.booleans(),
           bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), seed=st.integers(0, 2**31 - 1))
    def test_property_layouts_dtypes_against_plain_autograd(shape, dim_pick, layout, kinds, dtype, merge, split,
                                                            depth, x_grad, existing, bad, seed):
        """ReversibleSequence against SequentialSequence (plain autograd) on the same steps: outputs, the
        input's gradient and the parameters' accumulated ``.grad``, for shapes with empty dims, inputs
        expanded / transposed / sliced, step outputs dense / transposed / the input itself / expanded / of
        a sum (a stride-0 input gradient), float64 and float32, inputs needing grad or not, ``.grad`` None
        or filled, with or without one NaN or infinity in the input. Finite inputs: the same elements finite, and close. A non-finite input:
        non-finite wherever plain autograd is, the elements finite in both close (a non-finite activation
        that a step carries into the other half cannot be reconstructed, NaN - NaN, so the stack's
        gradients can be NaN where plain autograd's are not; see test_non_finite_token_stays_in_its_token).
        Tolerance: relative max error 1e-10 (float64), 1e-4 (float32)."""
        torch.manual_seed(seed)
        ndim = len(shape)
        dim = dim_pick % (2 * ndim) - ndim
        if split:
            shape = list(shape)
            shape[dim] *= 2
        base = torch.randn(shape, dtype=dtype)
        if bad is not None and base.numel():
            base.view(-1)[seed % base.numel()] = bad
        x, leaf = _layout(base, layout, dim)
        leaf.requires_grad_(x_grad)
        pairs = [(_Elementwise(dtype, kinds[2 * i]), _Elementwise(dtype, kinds[2 * i + 1])) for i in range(depth)]
        params = [p for pair in pairs for m in pair for p in m.parameters()]
        init = [torch.randn_like(p) if existing else None for p in params]
        results = []
        for klass in (reversible.ReversibleSequence, reversible.SequentialSequence):
            net = klass(pairs, dim=dim, merge=merge, input_mode="split" if split else "duplicate")
            for p, g in zip(params, init):
                p.grad = None if g is None else g.clone()
            leaf.grad = None
            y = net(x)
            # plain autograd's output needs no grad when nothing it depends on does (identity steps, an input
            # that needs none); the stack's output needs grad whenever a step's module has parameters that do
            if y.requires_grad:
                (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)).sum().backward()
            results.append([y.detach(), leaf.grad, *(p.grad for p in params)])
        for got, want in zip(*results):
            assert (got is None) == (want is None)
            if want is None:
                continue
            if bad is None:
                assert torch.equal(torch.isfinite(got), torch.isfinite(want))
            else:  # a non-finite activation is not reconstructed (NaN - NaN, inf - inf): more NaN, never fewer
                assert not (torch.isfinite(got) & ~torch.isfinite(want)).any()
            fin = torch.isfinite(want) & torch.isfinite(got)
            if fin.any():
                assert_close_all([got[fin]], [want[fin]], _DTYPE_TOL[dtype])


def test_routes_are_checked_on_every_call():
    """``args_route`` was checked against the depth once, in ``__init__``: a block appended afterwards got
    none of the routed keyword arguments, silently (the routes were zipped with the blocks)."""
    from reversible.compat import nuwa

    scale = torch.randn(D, dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    net = reversible.ReversibleSequence([(Fn(D), Fn(D))] * 2, args_route={"scale": [(True, True)] * 2})
    net(x, scale=scale)
    net.blocks.append(reversible.ReversibleBlock(Fn(D), Fn(D)))
    with pytest.raises(ValueError, match=r"args_route\['scale'\] has 2 entries but there are 3 layers"):
        net(x, scale=scale)
    seq = nuwa.SequentialSequence(nn.ModuleList([nn.ModuleList([Fn(D), Fn(D)])]), args_route={"scale": [(True, True)]})
    seq(x, scale=scale)
    seq.layers.append(nn.ModuleList([Fn(D), Fn(D)]))
    with pytest.raises(ValueError, match="has 1 entries but there are 2 layers"):
        seq(x, scale=scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_token_stays_in_its_token(bad):
    """A NaN or infinity in one token of one sequence, per-token steps (Linear over features): every other
    token's input gradient, in that sequence and the other, is finite and equals plain autograd's, and
    so are the outputs (the reconstruction's NaN - NaN stays in the token the value came from)."""
    pairs = [(Fn(D, p=0.0), Fn(D, p=0.0)) for _ in range(3)]
    x = torch.randn(2, 5, D, dtype=torch.float64)
    x[0, 2, 1] = bad
    x.requires_grad_()
    w = torch.randn(2, 5, D, dtype=torch.float64)
    got_y = reversible.ReversibleSequence(pairs)(x)
    got, = torch.autograd.grad((got_y * w).sum(), [x])
    want_y = reversible.SequentialSequence(pairs)(x)
    want, = torch.autograd.grad((want_y * w).sum(), [x])
    assert torch.equal(torch.isfinite(got_y), torch.isfinite(want_y))
    others = torch.ones(2, 5, dtype=torch.bool)
    others[0, 2] = False
    assert torch.isfinite(got[others]).all()
    assert_close_all([got_y.detach()[others], got[others]], [want_y.detach()[others], want[others]], TOL)


def test_reconstruction_error_of_an_empty_batch_is_zero():
    """``reconstruction_error`` took ``max()`` of an empty tensor: a RuntimeError for a batch of 0."""
    net = reversible.ReversibleSequence([(Fn(D), Fn(D))])
    assert reversible.reconstruction_error(net, torch.randn(0, 5, D, dtype=torch.float64)) == 0.0
    types = ["intra_modality_self_attn"]
    dual = reversible.DualModalityReversibleSequence([(Fn(D), Fn(D), Fn(D), Fn(D))], types)
    video, audio = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 0, D, dtype=torch.float64)
    assert 0.0 <= reversible.reconstruction_error(dual, (video, audio)) < 1e-13


@pytest.mark.parametrize("index", [0, 3, 5, 7, -2])
def test_nuwa_split_at_index_slices_as_the_seed(index):
    """The seed's ``split_at_index`` slices (``t[:, :index]``, ``t[:, index:]``): an index past the end gives
    an empty second part, a negative one counts from the end. The compat module used ``narrow``, which
    raised for both."""
    from reversible.compat import nuwa

    t = torch.randn(2, 5, 3)
    a, b = nuwa.split_at_index(1, index, t)
    assert torch.equal(a, t[:, :index]) and torch.equal(b, t[:, index:])


def _stack(dropout: bool = False) -> reversible.ReversibleSequence:
    def blk():
        return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3) if dropout else nn.Identity())
    return reversible.ReversibleSequence([(blk(), blk()) for _ in range(2)]).double()


@pytest.mark.parametrize("frozen_at_forward", [False, True])
def test_requires_grad_switched_between_forward_and_backward_is_named(frozen_at_forward):
    """A layer frozen (or unfrozen) between the forward and the backward: a RuntimeError naming requires_grad (it
    raised autograd's 'One of the differentiated Tensors does not require grad', or, unfrozen, said the module's own
    parameters were 'neither parameters of the function's module nor ...'). Switched back before the backward,
    the gradients are plain autograd's."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    net = _stack().requires_grad_(not frozen_at_forward)
    y = net(x)
    net.blocks[1].g.requires_grad_(frozen_at_forward)
    with pytest.raises(RuntimeError, match=r"coupling function Sequential changed .* requires_grad was switched"):
        y.sum().backward()
    x.grad = None
    net.blocks[1].g.requires_grad_(not frozen_at_forward)
    y = net(x)
    net.blocks[1].g.requires_grad_(frozen_at_forward)
    net.blocks[1].g.requires_grad_(not frozen_at_forward)
    y.square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    seq = reversible.SequentialSequence(list(net.blocks))
    seq(x).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-12)


def test_state_changed_between_forward_and_backward_raises():
    """The backward recomputes every step with the module's state of that time: parameters swapped
    (``torch.func.functional_call``, as MAML does), a parameter changed in place, a module switched to eval (dropout)
    after the forward raise a RuntimeError naming the cause. Before: gradients silently wrong (44% off for
    functional_call's input gradient, its fast weights got none; 84% with dropout switched off)."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    net = _stack().requires_grad_(False)
    fast = {k: (v * 1.5).requires_grad_() for k, v in net.named_parameters()}
    with pytest.raises(RuntimeError, match="parameters are other tensors than in the forward"):
        torch.func.functional_call(net, fast, (x,)).square().sum().backward()
    net = _stack()
    y = net(x)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()
    net = _stack(dropout=True)
    y = net(x)
    net.eval()
    with pytest.raises(RuntimeError, match=r"train\(\) and eval\(\)"):
        y.sum().backward()
    lin_f, lin_g = nn.Linear(8, 8).double(), nn.Linear(8, 8).double()
    mask = torch.ones(3, 8, dtype=torch.float64)

    def masked(lin):
        def fn(t, mask):
            return lin(t) * mask
        return fn
    couplings = [reversible.Coupling(masked(lin_f), (1,), (0,), kwargs={"mask": mask}, params=list(lin_f.parameters())),
                 reversible.Coupling(masked(lin_g), (0,), (1,), kwargs={"mask": mask}, params=list(lin_g.parameters()))]
    out, = reversible.run_couplings([x], couplings)
    mask.zero_()
    with pytest.raises(RuntimeError, match="keyword argument was modified in place"):
        out.sum().backward()
    # the state left alone: plain autograd's gradients
    mask.fill_(1.0)
    x.grad = None
    out, = reversible.run_couplings([x], couplings)
    out.square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    ref, = reversible.run_couplings([x], couplings, reversible=False)
    ref.square().sum().backward()
    assert torch.allclose(got, x.grad, rtol=1e-12, atol=1e-12)


def test_create_graph_through_the_stack_raises():
    """A gradient penalty (``create_graph=True``) through a reversible stack: a RuntimeError saying so. Before: the
    gradient came back without a graph (``requires_grad`` False), silently."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(_stack()(x).sum(), x, create_graph=True)


def test_namedtuple_kwarg_gets_its_gradient_and_a_bare_tensor_is_refused():
    """A tensor needing grad inside a namedtuple keyword argument gets the gradient plain autograd gives it (was:
    the closure check's error), and ``run_couplings`` refuses a bare tensor for its list of streams (was: each row
    taken as a stream)."""
    import collections
    Ctx = collections.namedtuple("Ctx", "scale")

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, t, ctx):
            return self.lin(t) * ctx.scale

    f, g = Scaled().double(), Scaled().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    c = torch.randn(8, dtype=torch.float64, requires_grad=True)
    couplings = [reversible.Coupling(f, (1,), (0,), kwargs={"ctx": Ctx(c)}),
                 reversible.Coupling(g, (0,), (1,), kwargs={"ctx": Ctx(c)})]
    out, = reversible.run_couplings([x], couplings)
    got, = torch.autograd.grad(out.square().sum(), c)
    ref, = reversible.run_couplings([x], couplings, reversible=False)
    want, = torch.autograd.grad(ref.square().sum(), c)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="one per stream"):
        reversible.run_couplings(x, couplings)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dim="x"), TypeError, "dim must be an int"), (dict(layer_dropout="0.1"), ValueError, "layer_dropout"),
    (dict(layer_dropout=None), ValueError, "layer_dropout"), (dict(default_route=True), ValueError, "default_route"),
    (dict(stream_dtype="float32"), TypeError, "stream_dtype"),
    # a non-floating dtype: rejected only at the first call before
    (dict(stream_dtype=torch.int32), ValueError, "stream_dtype must be a floating dtype, got torch.int32")])
def test_constructor_arguments_of_the_wrong_type_name_themselves(kwargs, err, match):
    """Was Python's own error from deep inside (``'<=' not supported``, ``'bool' object is not iterable``)."""
    with pytest.raises(err, match=match):
        reversible.ReversibleSequence([(nn.Linear(4, 4), nn.Linear(4, 4))], **kwargs)
    with pytest.raises(err, match=match):
        reversible.SequentialSequence([(nn.Linear(4, 4), nn.Linear(4, 4))], **kwargs)
    if "stream_dtype" in kwargs:
        with pytest.raises(err, match=match):
            reversible.DualModalityReversibleSequence([[nn.Identity()] * 4], ["intra_modality_self_attn"], **kwargs)


def test_blocks_and_block_types_of_the_wrong_form_name_themselves():
    """One module for blocks was "'Linear' object is not iterable"; a string for block_types was iterated by
    character ('got 1 blocks but 24 block types'). The list forms still build."""
    lin = nn.Linear(4, 4)
    for blocks in (lin, None, reversible.ReversibleBlock(lin, lin)):
        for cls in (reversible.ReversibleSequence, reversible.SequentialSequence):
            with pytest.raises(TypeError, match=f"blocks must be a list of ReversibleBlocks or \\(f, g\\) pairs, "
                                                f"one per layer, got {type(blocks).__name__}"):
                cls(blocks)
    fns = [nn.Linear(4, 4) for _ in range(4)]
    with pytest.raises(TypeError, match="input_blocks must be a list of \\(f, g, j, k\\) per layer, got Linear"):
        reversible.DualModalityReversibleSequence(lin, ["intra_modality_self_attn"])
    with pytest.raises(TypeError, match="block_types must be a list of layer type names, .* got str"):
        reversible.DualModalityReversibleSequence([fns], "intra_modality_self_attn")
    assert len(reversible.DualModalityReversibleSequence([fns], ("intra_modality_self_attn",)).blocks) == 1
    assert len(reversible.ReversibleSequence(nn.ModuleList([nn.ModuleList([lin, lin])])).blocks) == 1


def test_reconstruction_error_names_a_wrong_input():
    """A list where the model takes a tensor: a TypeError naming ``x`` (was ``'list' object has no attribute
    'dim'``)."""
    net = reversible.ReversibleSequence([(nn.Linear(4, 4), nn.Linear(4, 4))])
    x = torch.randn(2, 4)
    assert reversible.reconstruction_error(net, x) < 1e-5
    with pytest.raises(TypeError, match="x must be the model's input"):
        reversible.reconstruction_error(net, [x])


def test_reconstruction_error_checks_streams_as_the_call():
    """Inputs the model's call refuses: an odd split dim in split mode was measured on a silently truncated input
    (a number came back), an integer input failed inside f with a dtype mismatch of matmul, an empty dict stream
    raised about Coupling halves."""
    split = reversible.ReversibleSequence([(nn.Linear(4, 4), nn.Linear(4, 4))], input_mode="split")
    with pytest.raises(ValueError, match="odd size 9"):
        reversible.reconstruction_error(split, torch.randn(3, 9))
    net = reversible.ReversibleSequence([(nn.Linear(4, 4), nn.Linear(4, 4))])
    with pytest.raises(TypeError, match="stream input 0 must be floating point"):
        reversible.reconstruction_error(net, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x must hold at least one stream"):
        reversible.reconstruction_error(net, {})
    dual = reversible.DualModalityReversibleSequence([(nn.Linear(4, 4),) * 4], ["intra_modality_self_attn"])
    with pytest.raises(TypeError, match="stream input 1 must be floating point"):
        reversible.reconstruction_error(dual, (torch.randn(2, 3, 4), torch.ones(2, 5, 4, dtype=torch.long)))


def test_reconstruction_error_names_a_model_without_couplings():
    """A plain module (no couplings to run): a TypeError naming ``model`` and its type (was ``'Linear' object has
    no attribute 'couplings'``; found by a new user's probe)."""
    with pytest.raises(TypeError, match="model must be a reversible.ReversibleSequence .*got Linear"):
        reversible.reconstruction_error(nn.Linear(4, 4), torch.randn(2, 4))


def test_malformed_args_route_names_it():
    """An args_route entry that is not a pair (a bare bool, None) or a route list that is not a sequence raises the
    library's error naming args_route (was Python's 'bool' object is not iterable: found by a new user's probe)."""
    blocks = [(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)]
    for route in ([True, False], [(True, False), None]):
        with pytest.raises(ValueError, match=r"args_route\['mask'\] entries must be \(route_to_f, route_to_g\) pairs"):
            reversible.ReversibleSequence(blocks, args_route={"mask": route})
    with pytest.raises(TypeError, match=r"args_route\['mask'\] must be a sequence"):
        reversible.ReversibleSequence(blocks, args_route={"mask": True})


def test_torch_func_transforms_run_the_same_function():
    """``torch.func.grad`` / ``vmap`` over a reversible stack (or a model holding one) raised PyTorch's "autograd.Function
    ... must override the setup_context staticmethod", naming nothing of the user's. Under the transforms the steps
    now run in plain autograd: gradients and outputs are those of eager autograd through the same stack."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    net = _stack()
    x = torch.randn(3, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    got = grad(lambda p, x: functional_call(net, p, (x,)).square().sum(), argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_()
    ref = torch.autograd.grad(net(xr).square().sum(), [*net.parameters(), xr])
    for a, b in zip([*got[0].values(), got[1]], ref):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    xs = torch.randn(2, 3, 8, dtype=torch.float64)
    assert (vmap(net)(xs) - torch.stack([net(t) for t in xs])).abs().max() <= 1e-12


def test_torch_compile_of_a_stack():
    """``torch.compile(fullgraph=True)`` of a ``ReversibleSequence`` failed in dynamo with "HOP: Unsafe side effect"
    (a ``SequentialSequence`` with "invalid call to builtin op handler ... max"), naming nothing of the user's. The plain
    stack now compiles whole; the reversible one runs eagerly between the graphs (same outputs and gradients as eager),
    and with ``fullgraph=True`` dynamo's error says why."""
    torch._dynamo.reset()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for cls, fullgraph in ((reversible.SequentialSequence, True), (reversible.ReversibleSequence, False)):
        net = cls([(nn.Linear(8, 8), nn.Linear(8, 8))]).double()
        ref = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
        got = torch.autograd.grad(torch.compile(net, fullgraph=fullgraph, backend="aot_eager")(x).square().sum(),
                                  [x, *net.parameters()])
        for a, b in zip(got, ref):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    torch._dynamo.reset()  # else the graph-broken frames compiled above are reused
    with pytest.raises(Exception, match="compile without fullgraph=True"):
        torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


def test_own_generator_is_not_replayed_and_the_diagnostic_says_so():
    """Random ops on the default generator (dropout, randn_like) are replayed exactly; a step drawing from a
    ``torch.Generator`` of its own is not (documented: its recomputation draws anew), and ``reconstruction_error``
    reports that. It returned 0.0 for every float64 input: its reference was ``buffer.double()``, the buffer itself,
    rebuilt in place along with it."""
    class Noisy(nn.Module):
        def __init__(self, gen=None):
            super().__init__()
            self.lin, self.gen = nn.Linear(8, 8, dtype=torch.float64), gen

        def forward(self, x):
            y = self.lin(x)
            noise = torch.randn(y.shape, dtype=y.dtype, generator=self.gen) if self.gen else torch.randn_like(y)
            return y + noise
    x = torch.randn(3, 8, dtype=torch.float64)
    for gen, exact in ((None, True), (torch.Generator().manual_seed(0), False)):
        net = reversible.ReversibleSequence([(Noisy(gen), Noisy(gen))])
        err = reversible.reconstruction_error(net, x)
        assert (err < 1e-14) if exact else (err > 1e-3)


def test_non_leaf_coupling_params_get_their_gradients():
    """A tensor computed from a parameter (w = 2 * w0), closed over by fn and listed in Coupling(params=...): its
    gradient reaches w0 as with plain autograd (the closure check said to list it in params=, which it was), in
    run_couplings and in reverse_couplings."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, 4, dtype=torch.float64)

    def couplings():
        w = w0 * 2
        return [reversible.Coupling(lambda h: torch.tanh(h @ w), (0,), (1,), params=[w]),
                reversible.Coupling(lambda h: torch.sin(h @ w.T), (1,), (0,), params=[w])]

    def grads(rev):
        w0.grad = x.grad = None
        (reversible.run_couplings([x], couplings(), reversible=rev)[0] * cot).sum().backward()
        return w0.grad, x.grad

    (w_ref, x_ref), (w_got, x_got) = grads(False), grads(True)
    torch.testing.assert_close(w_got, w_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_got, x_ref, rtol=0, atol=1e-12)
    # the standalone inverse from the un-merged outputs: the same w0 gradient, accumulated into w0.grad
    xs = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(3, 8, dtype=torch.float64)
    y_ref = reversible.run_couplings([xs], couplings(), merge="cat", input_mode="split", reversible=False)[0]
    ref = torch.autograd.grad(y_ref, [xs, w0], cot)
    w0.grad = None
    (xr,), (dx,) = reversible.reverse_couplings([y_ref.detach()], [cot], couplings())
    torch.testing.assert_close(xr, xs.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(dx, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(w0.grad, ref[1], rtol=0, atol=1e-12)


def test_import_leaves_dynamo_unloaded():
    """``import reversible`` imported torch._dynamo (~1 s) since the reversible chain was wrapped in
    ``torch.compiler.disable`` at import; the graph break is now made where torch.compile traces it."""
    code = "import sys, reversible; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
