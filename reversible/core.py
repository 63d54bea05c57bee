"""The one additive-coupling core that every container in :mod:`reversible` runs on.

A reversible stack is described as a flat list of :class:`Coupling` steps over a set of
*streams*. Every stream is held as one activation buffer whose two halves (along the stream's
split dim) are addressed by *half indices*: stream ``i`` owns halves ``2 * i`` (first) and
``2 * i + 1`` (second). A coupling step does, in place,

    ``state[target] += fn(*state[sources], **kwargs)``

and because ``sources`` and ``target`` are disjoint, the step is undone exactly by
``state[target] -= fn(*state[sources], **kwargs)``. The usual RevNet block
(``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``) is two such steps; the dual-modality blocks of
NUWA are four; dict-valued streams (SE3) are steps whose ``fn`` maps a dict of halves to a dict.

The backward pass walks the steps in reverse: recompute ``out = fn(sources)`` with grad
(under the forward's autocast state and with the forward's RNG state of *this call*), take the
vector-Jacobian product with the target's gradient half, then, in one fused in-place launch
(:func:`reversible._inplace.reconstruct_`), ``target -= out`` and ``d_source += vjp``.
The whole stack therefore keeps exactly one activation buffer and one gradient buffer per
stream; no ``torch.cat`` and no new full-size tensor per block. Steps that touch disjoint halves
(the video and audio steps of a dual-modality block) are inverted as one group, so their
in-place updates go out in one multi-tensor call (:func:`reversible._inplace.reconstruct_multi_`),
as do the per-key updates of dict-valued streams.

The stack is a chain of autograd nodes over the same buffers: one per *segment* of steps (a
step, or steps inverted together), each updating the buffers in place. Parameters of the step
functions (and tensors passed as keyword arguments that require grad) are explicit inputs of
their segment's node, and their gradients are *returned* from its backward instead of being
accumulated behind autograd's back. That is what makes parameters get gradients when the stream
input does not require grad, what makes ``DistributedDataParallel`` (including
``find_unused_parameters=True``) and ``torch.autograd.grad`` behave as with plain autograd, and,
since the engine accumulates a node's parameter gradients into ``.grad`` before it runs the next
node, what keeps the backward's memory flat in depth when ``.grad`` already holds values.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _inplace

__all__ = ["Coupling", "run_couplings", "reverse_couplings", "MERGES", "INPUT_MODES"]

MERGES = ("mean", "sum", "cat")
INPUT_MODES = ("duplicate", "split")

_TWICE = ("the backward of a reversible stack was run twice (e.g. retain_graph=True followed by a "
          "second backward). Its activation buffer is reconstructed in place during the first "
          "backward, so a second one is not possible; run the forward again instead.")
_CREATE_GRAPH = ("the backward of a reversible stack cannot build a graph of itself (create_graph=True: double "
                 "backward, a gradient penalty through the stack): its gradients would carry no history. Run the "
                 "stack with reversible=False (plain autograd) for higher-order gradients.")


@dataclass(eq=False)
class Coupling:
    """One additive coupling step: ``state[targets] += fn(*state[sources], **kwargs)``.

    Args:
        fn: the function (usually an ``nn.Module``). With ``keys=None`` it is called as
            ``fn(*source_halves, **kwargs)`` and must return one tensor shaped like the target
            half. With ``keys`` it is called as ``fn({key: source_half}, **kwargs)`` and must
            return a dict holding (at least) those keys, each shaped like its target half.
        targets: half indices that receive the output (one per key with ``keys``, else one).
        sources: half indices fed to ``fn`` (one per key with ``keys``); disjoint from targets.
        kwargs: keyword arguments for ``fn``. Tensors in them that require grad get gradients.
        keys: the dict keys of a dict-valued stream, or ``None``.
        params: extra tensors ``fn`` closes over that need gradients (the parameters of ``fn``
            itself are found automatically when it is an ``nn.Module`` or a bound method of one); a tensor
            computed from parameters (``w = 2 * weight``) passes its gradient on to them.
    """

    fn: Callable[..., Any]
    targets: tuple[int, ...]
    sources: tuple[int, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] | None = None
    params: Sequence[Tensor] = ()

    def __post_init__(self) -> None:
        self.targets = tuple(int(t) for t in self.targets)
        self.sources = tuple(int(s) for s in self.sources)
        if not callable(self.fn):
            raise TypeError(f"Coupling.fn must be callable, got {type(self.fn).__name__}")
        if not self.targets or not self.sources:
            raise ValueError("Coupling needs at least one target and one source half")
        if set(self.targets) & set(self.sources):
            raise ValueError(f"Coupling targets {self.targets} and sources {self.sources} overlap: "
                             "a half cannot be both updated and read by the same step")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"Coupling targets {self.targets} repeat a half")
        if self.keys is None:
            if len(self.targets) != 1:
                raise ValueError("a Coupling without keys has exactly one target")
        else:
            self.keys = tuple(self.keys)
            if not (len(self.keys) == len(self.targets) == len(self.sources)):
                raise ValueError("a dict Coupling needs one target and one source half per key")
        if self.kwargs is None:
            self.kwargs = {}

    @property
    def name(self) -> str:
        return type(self.fn).__name__ if isinstance(self.fn, nn.Module) else getattr(self.fn, "__name__", repr(self.fn))

    def call(self, sources: Sequence[Tensor], kwargs: Mapping[str, Any]) -> list[Tensor]:
        """Run ``fn`` on the given source halves; returns one output per target."""
        if self.keys is None:
            out = self.fn(*sources, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"coupling function {self.name} must return a Tensor, got {type(out).__name__}")
            return [out]
        out = self.fn(dict(zip(self.keys, sources)), **kwargs)
        if not isinstance(out, Mapping):
            raise TypeError(f"coupling function {self.name} on a dict stream must return a dict, "
                            f"got {type(out).__name__}")
        missing = [k for k in self.keys if k not in out]
        if missing:
            raise KeyError(f"coupling function {self.name} returned no value for stream key(s) {missing}")
        return [out[k] for k in self.keys]


# ----------------------------------------------------------------------------- state capture

def _autocast_state(device_type: str) -> dict[str, dict[str, Any]]:
    """Autocast settings of the device and of the CPU, as torch.utils.checkpoint records them."""
    state = {}
    for dev in dict.fromkeys((device_type, "cpu")):
        try:
            enabled = torch.is_autocast_enabled(dev)
            dtype = torch.get_autocast_dtype(dev)
        except (TypeError, RuntimeError, AttributeError):  # device without autocast support
            continue
        state[dev] = {"enabled": enabled, "dtype": dtype, "cache_enabled": torch.is_autocast_cache_enabled()}
    return state


def _autocast_replay(state: Mapping[str, Mapping[str, Any]]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for dev, kw in state.items():
        stack.enter_context(torch.autocast(dev, **kw))
    return stack


def _rng_state(tensors: Sequence[Tensor]) -> tuple[Tensor, list[int], list[Tensor]]:
    from torch.utils.checkpoint import get_device_states

    devices, states = get_device_states(*tensors) if any(t.is_cuda for t in tensors) else ([], [])
    return torch.get_rng_state(), devices, states


@contextlib.contextmanager
def _rng_replay(state: tuple[Tensor, list[int], list[Tensor]] | None) -> Iterator[None]:
    if state is None:
        yield
        return
    from torch.utils.checkpoint import set_device_states

    cpu, devices, states = state
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(cpu)
        if devices:
            set_device_states(devices, states)
        yield


# ----------------------------------------------------------------------------- helpers

def _fn_owner(fn: Callable[..., Any]) -> nn.Module | None:
    """The module ``fn`` is, or whose bound method it is (None: a plain function)."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _fn_params(fn: Callable[..., Any]) -> list[Tensor]:
    owner = _fn_owner(fn)
    return [] if owner is None else list(owner.parameters())


def _map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: built from its fields
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _iter_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_tensors(o)


def _snapshot(c: Coupling) -> tuple:
    """What a step's recomputation reads besides its inputs: which tensors are its parameters and their in-place
    versions, its keyword tensors' versions, its modules' train/eval modes, and which parameters need grad (the
    forward's are its node's inputs). The backward recomputes with the values of its own time, so these must not
    change after the forward (:func:`_check_snapshot`)."""
    owner = _fn_owner(c.fn)
    params = [p for p in (*_fn_params(c.fn), *c.params) if isinstance(p, Tensor)]
    return (tuple(id(p) for p in params), tuple(p._version for p in params),
            tuple(t._version for t in _iter_tensors(dict(c.kwargs))),
            tuple(m.training for m in (() if owner is None else owner.modules())),
            tuple(p.requires_grad for p in params))


def _check_snapshot(c: Coupling, then: tuple) -> None:
    """RuntimeError where the forward's :func:`_snapshot` of ``c`` no longer holds: the recomputed step would
    differ from the forward's and its gradients would be silently wrong (plain autograd raises for the first two
    cases too, and computes the third with what it saved)."""
    now = _snapshot(c)
    if now == then:
        return
    what = ("its parameters are other tensors than in the forward (e.g. torch.func.functional_call, or a "
            "parameter reassigned), which the recomputation would use" if now[0] != then[0] else
            "a parameter was modified in place (e.g. an optimizer step or a copy_ under no_grad)" if now[1] != then[1]
            else "a tensor passed to it as a keyword argument was modified in place" if now[2] != then[2] else
            "a module was switched between train() and eval() (dropout, batch norm)" if now[3] != then[3] else
            "a parameter's requires_grad was switched (a layer frozen or unfrozen; do it before the forward)")
    raise RuntimeError(f"coupling function {c.name} changed between the forward and the backward of a reversible "
                       f"stack: {what}. The backward recomputes each step, so it needs the forward's state; run the "
                       "backward first, or the forward again.")


def _foreign_leaves(outs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors needing grad that ``outs`` depend on other than through ``inputs``: their gradients would be
    lost (they are not inputs of the autograd nodes). A non-leaf input (a ``Coupling(params=...)`` tensor computed
    from parameters) takes its gradient for its whole history, so the walk stops at its autograd edge."""
    known = {id(t) for t in inputs if t.grad_fn is None}
    stops = {(id(t.grad_fn), t.output_nr) for t in inputs if t.grad_fn is not None}
    seen: set[int] = set()
    # edges (node, output number): one output of a multi-output node may be an input, another not
    stack = [(o.grad_fn, o.output_nr) for o in outs if o.grad_fn is not None]
    found = []
    while stack:
        node, nr = stack.pop()
        if node is None or (id(node), nr) in stops or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # an AccumulateGrad node
        if var is not None:
            if id(var) not in known:
                found.append(var)
            continue
        stack.extend((nxt, n) for nxt, n in node.next_functions if nxt is not None)
    return found


def _check_closure(c: Coupling, outs: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """Raise if the recomputed ``outs`` depend on a tensor needing grad that is not in ``inputs``.

    Checked on every recomputation, not once per module: what ``fn`` closes over can change between
    calls. The walk covers the recomputed step's own graph (it stops at ``inputs``, which are leaves),
    a few microseconds per autograd node."""
    foreign = _foreign_leaves(outs, inputs)
    if foreign:
        shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:4])
        raise RuntimeError(
            f"coupling function {c.name} uses {len(foreign)} tensor(s) that need grad (shapes {shapes}) but are "
            "neither parameters of the function's module nor tensors passed as keyword arguments, so their "
            "gradients would be lost. Register them as nn.Parameter of the module, pass them as keyword "
            "arguments, or list them in Coupling(params=...).")


def _same_storage(a: Tensor, bufs: Sequence[Tensor | None]) -> bool:
    ptr = a.untyped_storage().data_ptr()
    return any(b is not None and ptr == b.untyped_storage().data_ptr() for b in bufs)


def _reconstruct(steps: Sequence[tuple[list[Tensor], list[Tensor], list[Tensor | None], Sequence[Tensor | None]]]
                 ) -> None:
    """For every step ``(targets, outs, dsources, grads)``: ``targets -= outs`` and
    ``dsources += grads``, all steps (independent ones) in one call of the fused helpers.

    Targets are paired with source gradients of the same step (same shape for the usual blocks);
    what does not pair up (a step with more sources than targets, or an unused source) is done
    with ``coupling_add_``.
    """
    ys, fys, dys, gs = [], [], [], []
    rest_t, rest_d = [], []
    for targets, outs, dsources, grads in steps:
        pairs = [(d, g) for d, g in zip(dsources, grads) if g is not None]
        n = min(len(targets), len(pairs))
        ys += targets[:n]
        fys += outs[:n]
        dys += [d for d, _ in pairs[:n]]
        gs += [g for _, g in pairs[:n]]
        rest_t += zip(targets[n:], outs[n:])
        rest_d += pairs[n:]
    if len(ys) == 1:
        _inplace.reconstruct_(ys[0], fys[0], dys[0], gs[0])
    elif ys:
        _inplace.reconstruct_multi_(ys, fys, dys, gs)
    with torch.no_grad():
        for t, o in rest_t:  # targets without a source gradient to pair with
            _inplace.coupling_add_(t, torch.neg(o))
        for d, g in rest_d:  # more sources than targets (e.g. f(x2, m2))
            _inplace.coupling_add_(d, g)


# ----------------------------------------------------------------------------- per-call plan

@dataclass
class _Stream:
    dim: int           # split dim, non-negative
    dtype: torch.dtype  # dtype of the user's tensor (and of what fn sees)
    buf_dtype: torch.dtype  # dtype of the activation / gradient buffer


class _Run:
    """Everything one call of a reversible stack needs in backward (kept per call, never on a module)."""

    def __init__(self, couplings: Sequence[Coupling], streams: list[_Stream], merge: str, input_mode: str,
                 preserve_rng_state: bool) -> None:
        self.couplings = list(couplings)
        self.streams = streams
        self.merge = merge
        self.input_mode = input_mode
        self.preserve_rng_state = preserve_rng_state
        # parameters (deduplicated, needing grad) and the ones each coupling uses
        self.params: list[Tensor] = []
        self.param_idx: list[list[int]] = []
        index: dict[int, int] = {}
        for c in self.couplings:
            mine = []
            for p in [*_fn_params(c.fn), *c.params]:
                if not (isinstance(p, Tensor) and p.requires_grad):
                    continue
                if id(p) not in index:
                    index[id(p)] = len(self.params)
                    self.params.append(p)
                j = index[id(p)]
                if j not in mine:
                    mine.append(j)
            self.param_idx.append(mine)
        # tensors in kwargs that need grad
        self.kw_tensors: list[Tensor] = []
        self.kw_index: dict[int, int] = {}
        self.kw_idx: list[list[int]] = []
        for c in self.couplings:
            mine = []
            for t in _iter_tensors(dict(c.kwargs)):
                if not t.requires_grad:
                    continue
                if id(t) not in self.kw_index:
                    self.kw_index[id(t)] = len(self.kw_tensors)
                    self.kw_tensors.append(t)
                j = self.kw_index[id(t)]
                if j not in mine:
                    mine.append(j)
            self.kw_idx.append(mine)
        self.rng: list[Any] = [None] * len(self.couplings)  # per step: the RNG state to replay (None: none)
        self.snapshots: list[tuple] = []  # per step, at the end of the forward (_Merge)
        self.autocast: dict[str, dict[str, Any]] = {}
        self.bufs: list[Tensor] | None = None
        self._plan_segments()

    # --- buffers and halves
    # A stream's activation (and gradient) buffer is laid out (2, *half_shape): its two halves are
    # contiguous tensors whatever the split dim, so f and g get contiguous inputs and the fused
    # in-place steps run on contiguous memory (a split along the last dim would otherwise give
    # every half a row stride of twice its width).
    def halves(self, bufs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Both halves of every buffer (``None`` twice for a stream without a gradient buffer)."""
        return [h for buf in bufs for h in ((None, None) if buf is None else (buf[0], buf[1]))]

    def to_buffer(self, i: int, x: Tensor) -> Tensor:
        """``x`` holding both halves along the split dim -> a new (2, *half_shape) buffer."""
        s = self.streams[i]
        n = x.shape[s.dim] // 2
        buf = x.new_empty((2, *x.narrow(s.dim, 0, n).shape), dtype=s.buf_dtype)
        buf[0].copy_(x.narrow(s.dim, 0, n))
        buf[1].copy_(x.narrow(s.dim, n, n))
        return buf

    def from_buffer(self, i: int, buf: Tensor) -> Tensor:
        """The inverse of :meth:`to_buffer`: the halves concatenated along the split dim (a new tensor)."""
        return torch.cat((buf[0], buf[1]), dim=self.streams[i].dim)

    def make_buffer(self, i: int, x: Tensor) -> Tensor:
        if self.input_mode == "split":
            return self.to_buffer(i, x)
        buf = x.new_empty((2, *x.shape), dtype=self.streams[i].buf_dtype)
        buf[0].copy_(x)
        buf[1].copy_(x)
        return buf

    def make_grad_buffer(self, i: int, g: Tensor, shape: Sequence[int]) -> Tensor:
        """The gradient buffer (laid out like the activation buffer, ``shape``) for output gradient ``g``."""
        if self.merge == "cat":
            return self.to_buffer(i, g)
        gbuf = g.new_empty(shape, dtype=self.streams[i].buf_dtype)
        gbuf[0].copy_(g)
        if self.merge == "mean":
            gbuf[0].mul_(0.5)
        gbuf[1].copy_(gbuf[0])
        return gbuf

    def merged(self, halves: Sequence[Tensor]) -> list[Tensor]:
        outs = []
        for i, s in enumerate(self.streams):
            a, b = halves[2 * i], halves[2 * i + 1]
            if self.merge == "mean":
                o = (a + b).mul_(0.5)
            elif self.merge == "sum":
                o = a + b
            else:
                o = torch.cat((a, b), dim=s.dim)
            outs.append(o.to(s.dtype))
        return outs

    def to_compute(self, half_idx: int, t: Tensor) -> Tensor:
        dtype = self.streams[half_idx // 2].dtype
        return t if t.dtype == dtype else t.to(dtype)

    def backward_kwargs(self, ci: int, leaves: Sequence[Tensor]) -> Mapping[str, Any]:
        """Step ``ci``'s kwargs with its tensors that need grad replaced by ``leaves`` (``kw_idx[ci]`` order)."""
        if not self.kw_idx[ci]:
            return self.couplings[ci].kwargs
        leaf = {id(self.kw_tensors[j]): t for j, t in zip(self.kw_idx[ci], leaves)}
        return _map_tensors(dict(self.couplings[ci].kwargs), lambda t: leaf.get(id(t), t))

    # --- one step forward (no grad) / irreversibly (with grad)
    def step_forward(self, ci: int, halves: list[Tensor], inplace: bool) -> None:
        c = self.couplings[ci]
        srcs = [self.to_compute(s, halves[s]) for s in c.sources]
        outs = c.call(srcs, c.kwargs)
        for t, o in zip(c.targets, outs):
            if o.shape != halves[t].shape:
                raise ValueError(f"coupling function {c.name} returned shape {tuple(o.shape)} for a half "
                                 f"of shape {tuple(halves[t].shape)}; f and g must preserve the shape of "
                                 "the stream half they are given")
            if inplace:
                _inplace.coupling_add_(halves[t], o)
            else:  # the stream keeps its dtype, as the in-place add does (a wider output is rounded to it)
                halves[t] = (halves[t] + o).to(halves[t].dtype)

    # --- backward: recompute, vjp, then reconstruct in place
    def _plan_segments(self) -> None:
        """Split the steps into *segments*, the units of the backward's autograd nodes.

        Inverses run by *level* (a step's inverse runs after those of all later steps it shares a half
        with; steps of one level touch disjoint halves, e.g. a video and an audio step, and their in-place
        updates go out in one multi-tensor call). A segment is a run of consecutive steps whose levels are
        all above those of every later step, so that no level straddles two segments; each segment is one
        autograd node, which returns its parameters' gradients as soon as it is inverted (the engine
        accumulates them before it runs the next node), so a backward holds one segment's parameter
        gradients at a time, not the whole stack's."""
        n = len(self.couplings)
        level: list[int] = [0] * n
        last: dict[int, int] = {}
        for i in reversed(range(n)):
            c = self.couplings[i]
            halves = (*c.targets, *c.sources)
            level[i] = max([last[h] + 1 for h in halves if h in last] + [0])
            for h in halves:
                last[h] = max(last.get(h, -1), level[i])
        later_max = [-1] * (n + 1)
        for i in reversed(range(n)):
            later_max[i] = max(level[i], later_max[i + 1])
        self.seg_steps: list[range] = []            # per segment: its step indices
        self.segments: list[list[list[int]]] = []  # per segment: groups of step indices, in inverse order
        self.seg_params: list[list[int]] = []       # per segment: indices into self.params
        self.seg_kws: list[list[int]] = []          # per segment: indices into self.kw_tensors
        start, low = 0, n
        for i in range(n):
            low = min(low, level[i])
            if low <= later_max[i + 1]:
                continue
            groups: dict[int, list[int]] = {}
            for ci in reversed(range(start, i + 1)):
                groups.setdefault(level[ci], []).append(ci)
            self.segments.append([groups[lv] for lv in sorted(groups)])
            steps = range(start, i + 1)
            self.seg_steps.append(steps)
            self.seg_params.append(list(dict.fromkeys(j for ci in steps for j in self.param_idx[ci])))
            self.seg_kws.append(list(dict.fromkeys(j for ci in steps for j in self.kw_idx[ci])))
            start, low = i + 1, n

    def step_recompute(self, ci: int, halves: list[Tensor], ghalves: list[Tensor | None], pgrads: dict[int, Tensor],
                       kgrads: dict[int, Tensor], gbufs: Sequence[Tensor | None]
                       ) -> tuple[list[Tensor], Sequence[Tensor | None]]:
        """Recompute step ``ci`` with grad and take its vjp from the targets that have a gradient (``ghalves``
        not None); accumulates parameter / kwarg gradients (by index into ``self.params`` /
        ``self.kw_tensors``). Returns the recomputed outputs (detached) and the sources' gradients."""
        c = self.couplings[ci]
        _check_snapshot(c, self.snapshots[ci])
        srcs = [halves[s].detach().requires_grad_() for s in c.sources]
        params = [self.params[j] for j in self.param_idx[ci]]
        kws = [self.kw_tensors[j].detach().requires_grad_() for j in self.kw_idx[ci]]
        kwargs = self.backward_kwargs(ci, kws)
        rng = self.rng[ci]
        roots: list[Any] = []  # (output or its autograd edge, its gradient) per output needing grad
        check: list[Tensor] = []
        with torch.enable_grad(), _autocast_replay(self.autocast), _rng_replay(rng):
            outs = c.call([self.to_compute(s, x) for s, x in zip(c.sources, srcs)], kwargs)
            for i, (o, t) in enumerate(zip(outs, c.targets)):
                if o.shape != halves[t].shape:
                    raise ValueError(f"coupling function {c.name} returned shape {tuple(o.shape)} in recomputation "
                                     f"for a half of shape {tuple(halves[t].shape)}")
                if torch.promote_types(o.dtype, halves[t].dtype) == halves[t].dtype:
                    # the half's dtype, or an exact widening (bf16/fp16 -> fp32), which the forward's in-place
                    # add did: no wide copy is made. The vjp starts from the output with the half's gradient,
                    # which the autograd engine casts to the output's dtype as it enters the graph (what the
                    # cast's backward did, bit for bit, and freed as soon as used); the reconstruction
                    # subtracts the output itself (the same result as a wide copy).
                    if o.requires_grad:
                        check.append(o)
                        if ghalves[t] is not None:
                            roots.append((o, ghalves[t]))
                    outs[i] = o.detach()
                    continue
                wide = o.to(halves[t].dtype)  # a narrowing (e.g. float64 output, float32 stream): as in the forward
                if wide.requires_grad:
                    check.append(wide)
                    if ghalves[t] is not None:
                        # the vjp starts from the cast's autograd edge, so the wide copy itself is not held
                        roots.append((torch.autograd.graph.get_gradient_edge(wide), ghalves[t]))
                outs[i] = wide.detach()
        inputs = [*srcs, *params, *kws]
        _check_closure(c, check, inputs)
        o = wide = check = None  # no local reference keeps a wide copy alive through the vjp
        if roots:
            grads = torch.autograd.grad([r for r, _ in roots], inputs, grad_outputs=[g for _, g in roots],
                                        allow_unused=True)
            roots = None
        else:
            grads = (None,) * len(inputs)
        ns, npar = len(srcs), len(params)
        for acc, idx, gs in ((pgrads, self.param_idx[ci], grads[ns:ns + npar]), (kgrads, self.kw_idx[ci], grads[ns + npar:])):
            for j, g in zip(idx, gs):
                if g is None:
                    continue
                if j not in acc:
                    # a gradient aliasing the gradient buffer (an fn that passes a source through) would
                    # change with the buffer's later in-place updates
                    acc[j] = g.clone() if _same_storage(g, gbufs) else g
                else:
                    acc[j] = acc[j] + g
        return outs, grads[:ns]

    def backward_segment(self, s: int, bufs: Sequence[Tensor], gbufs: list[Tensor | None]
                         ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Invert segment ``s`` in place: ``bufs`` reconstructed, ``gbufs`` updated. A stream's gradient
        buffer is ``None`` while no gradient has reached it (an output the loss does not use): its steps
        take no vjp, as plain autograd takes none, and the buffer is made (zeros) when a gradient first
        reaches it. Returns the gradients of the segment's parameters and keyword-argument tensors, by
        index into ``self.params`` / ``self.kw_tensors`` (absent: no gradient)."""
        halves, ghalves = self.halves(bufs), self.halves(gbufs)
        pgrads: dict[int, Tensor] = {}
        kgrads: dict[int, Tensor] = {}
        for group in self.segments[s]:
            done = [(ci, *self.step_recompute(ci, halves, ghalves, pgrads, kgrads, gbufs)) for ci in group]
            for ci, _, grads in done:
                for h, g in zip(self.couplings[ci].sources, grads):
                    if g is not None and ghalves[h] is None:
                        i = h // 2
                        gbufs[i] = torch.zeros_like(bufs[i])
                        ghalves[2 * i], ghalves[2 * i + 1] = gbufs[i][0], gbufs[i][1]
            _reconstruct([([halves[t] for t in self.couplings[ci].targets], outs,
                           [ghalves[h] for h in self.couplings[ci].sources], grads) for ci, outs, grads in done])
        return pgrads, kgrads


def _check_twice(ctx: Any) -> _Run:
    run = ctx.run
    if run is None or run.bufs is None:
        raise RuntimeError(_TWICE)
    ctx.run = None
    return run


class _Start(torch.autograd.Function):
    """Stream inputs -> the streams' activation buffers, laid out ``(2, *half)``; backward: the
    gradient buffers -> the inputs' gradients.

    The stack is a chain of autograd nodes ``_Start -> _Steps (one per segment) -> _Merge``, all over
    the same buffers (each ``_Steps`` updates them in place). The buffers never reach the user:
    :class:`_Merge` turns them into the outputs and its backward builds the gradient buffers, which
    each ``_Steps`` backward then updates in place and passes on. So the gradient of the merged
    outputs is released by autograd before the stack's backward runs.
    """

    @staticmethod
    def forward(ctx: Any, run: _Run, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        bufs = [run.make_buffer(i, x) for i, x in enumerate(inputs)]
        run.autocast = _autocast_state(bufs[0].device.type)
        # aliases without autograd history for the in-place steps: the run (held by the nodes' ctx)
        # must not hold the outputs back (a reference cycle through the graph)
        run.bufs = [b.detach() for b in bufs]
        ctx.run = run
        return tuple(bufs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *gbufs: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        run = _check_twice(ctx)
        run.bufs = None
        needs = ctx.needs_input_grad
        dxs = []
        for i, (s, g) in enumerate(zip(run.streams, gbufs)):
            if not needs[1 + i] or g is None:
                dxs.append(None)
            elif run.input_mode == "duplicate":
                dxs.append((g[0] + g[1]).to(s.dtype))
            else:
                dxs.append(run.from_buffer(i, g).to(s.dtype))
        return (None, *dxs)


class _Steps(torch.autograd.Function):
    """One segment of the stack's steps, in place on the buffers: inputs ``(run, s, *bufs, *params,
    *kwarg_tensors)`` of segment ``s``; outputs the same buffers (marked dirty). Parameters (and
    keyword-argument tensors that require grad) are inputs, so their gradients are returned from
    the backward, through autograd: ``.grad`` accumulation, DDP's hooks and ``torch.autograd.grad``
    all behave as with plain autograd, one segment at a time."""

    @staticmethod
    def forward(ctx: Any, run: _Run, s: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        bufs = tensors[:len(run.streams)]
        halves = run.halves(run.bufs)
        for ci in run.seg_steps[s]:
            if run.preserve_rng_state:
                run.rng[ci] = _rng_state([halves[h] for h in run.couplings[ci].sources])
            run.step_forward(ci, halves, inplace=True)
        ctx.mark_dirty(*bufs)
        ctx.run, ctx.segment = run, s
        return tuple(bufs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *gouts: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        run = _check_twice(ctx)
        s = ctx.segment
        bufs = run.bufs
        gbufs = list(gouts)  # the gradient buffers; None: no gradient has reached the stream yet
        del gouts
        pgrads, kgrads = run.backward_segment(s, bufs, gbufs)
        needs = ctx.needs_input_grad[2:2 + len(bufs)]
        if not any(needs):  # the earliest node of the stack that runs: the buffers are done with
            run.bufs = None
        dbufs = [g if need else None for g, need in zip(gbufs, needs)]
        pg = [None if j not in pgrads else pgrads[j].to(run.params[j].dtype) for j in run.seg_params[s]]
        kg = [kgrads.get(j) for j in run.seg_kws[s]]
        return (None, None, *dbufs, *pg, *kg)


class _Merge(torch.autograd.Function):
    """The streams' activation buffers -> the outputs (``merge``); backward: the outputs'
    gradients -> fresh gradient buffers (the only tensors the stack's backward gets)."""

    @staticmethod
    def forward(ctx: Any, run: _Run, *bufs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.run = run
        ctx.shapes = [b.shape for b in bufs]
        run.snapshots = [_snapshot(c) for c in run.couplings]
        return tuple(run.merged(run.halves(bufs)))

    @staticmethod
    def backward(ctx: Any, *gouts: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # the engine's grad mode in a backward is create_graph
            raise RuntimeError(_CREATE_GRAPH)
        return _Merge._backward(ctx, *gouts)

    @staticmethod
    @once_differentiable
    def _backward(ctx: Any, *gouts: Tensor | None) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        gbufs = [None if g is None else run.make_grad_buffer(i, g, shape)
                 for i, (g, shape) in enumerate(zip(gouts, ctx.shapes))]
        return (None, *gbufs)


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"split dim {dim} is out of range for a tensor with {ndim} dims")
    return dim % ndim


def _check_stream_dtype(stream_dtype: Any) -> None:
    """``stream_dtype``: ``None`` or a floating ``torch.dtype``; TypeError for a non-dtype, ValueError for another
    dtype (the sequences check it at construction, not only at their first call)."""
    if stream_dtype is not None and not isinstance(stream_dtype, torch.dtype):
        raise TypeError(f"stream_dtype must be a torch.dtype or None, got {stream_dtype!r}")
    if stream_dtype is not None and not stream_dtype.is_floating_point:
        raise ValueError(f"stream_dtype must be a floating dtype, got {stream_dtype}")


def _check_streams(arg: str, what: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors``: a non-empty sequence of floating tensors of at least one dim on one device (``arg`` names the
    argument, ``what`` one of its entries)."""
    if isinstance(tensors, Tensor):  # iterable too: its rows would pass as streams
        raise TypeError(f"{arg} must be a sequence of tensors, one per stream (e.g. [x]), got a Tensor")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{arg} must hold at least one stream")
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} {i} must be a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{what} {i} must be floating point, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{what} {i} is a scalar; it needs a dim to split")
        if x.device != tensors[0].device:
            raise ValueError(f"all of {arg} must be on one device; got {tensors[0].device} and {x.device}")
    return tensors


def _split_dims(tensors: Sequence[Tensor], dims: int | Sequence[int], what: str, halves: bool) -> list[int]:
    """Each stream's split dim, non-negative; ``halves``: the tensors hold both halves along it (an even size)."""
    dims = [dims] * len(tensors) if isinstance(dims, int) else list(dims)
    if len(dims) != len(tensors):
        raise ValueError(f"got {len(dims)} split dims for {len(tensors)} streams")
    out = []
    for i, (x, d) in enumerate(zip(tensors, dims)):
        d = _normalize_dim(d, x.dim())
        if halves and x.shape[d] % 2:
            raise ValueError(f"{what} {i} has odd size {x.shape[d]} on split dim {d}; it must hold two equal halves")
        out.append(d)
    return out


def _check_couplings(couplings: Sequence[Coupling], streams: int) -> list[Coupling]:
    couplings = list(couplings)
    for c in couplings:
        if not isinstance(c, Coupling):
            raise TypeError(f"couplings must be Coupling objects, got {type(c).__name__}")
        bad = [h for h in (*c.targets, *c.sources) if not 0 <= h < 2 * streams]
        if bad:
            raise ValueError(f"coupling {c.name} refers to half {bad[0]}, but {streams} stream(s) "
                             f"have halves 0..{2 * streams - 1}")
    return couplings


_NO_TRACE = ("a reversible stack's autograd nodes update its buffers in place, which torch.compile cannot trace: "
             "compile without fullgraph=True (the stack then runs eagerly between the compiled graphs)")


def _no_trace(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly under torch.compile: a graph break, whose message with ``fullgraph=True`` is
    :data:`_NO_TRACE`. Not ``torch.compiler.disable`` at import: that imports torch._dynamo (~1 s) with this
    package, and dynamo cannot trace the call that makes it."""
    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break(msg=_NO_TRACE)
            return torch._dynamo.disable(fn)(*args)  # runs after the break, eagerly: no tracing inside fn
        return fn(*args)
    return call


@_no_trace
def _run_reversible(run: _Run, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The stack's chain of autograd nodes ``_Start -> _Steps (per segment) -> _Merge``; its merged outputs."""
    bufs = _Start.apply(run, *inputs)
    for s in range(len(run.segments)):
        bufs = _Steps.apply(run, s, *bufs, *(run.params[j] for j in run.seg_params[s]),
                            *(run.kw_tensors[j] for j in run.seg_kws[s]))
    return list(_Merge.apply(run, *bufs))


def run_couplings(inputs: Sequence[Tensor], couplings: Sequence[Coupling], *, dims: int | Sequence[int] = -1,
                  merge: str = "mean", input_mode: str = "duplicate", stream_dtype: torch.dtype | None = None,
                  preserve_rng_state: bool = True, reversible: bool = True) -> list[Tensor]:
    """Run a stack of coupling steps over streams; the general entry point of the library.

    Args:
        inputs: one tensor per stream (floating point, all on one device).
        couplings: the steps, in forward order; half ``2*i`` / ``2*i+1`` is the first / second
            half of stream ``i``.
        dims: the split dim of each stream (one int for all).
        merge: how each stream's two output halves become the output: ``"mean"``, ``"sum"``
            or ``"cat"`` (the two halves concatenated along the split dim).
        input_mode: ``"duplicate"``: the input is copied into both halves (the seeds'
            ``cat([x, x])``; the input gradient is the sum of both halves' gradients);
            ``"split"``: the input already holds both halves along the split dim.
        stream_dtype: dtype of the activation and gradient buffers (e.g. ``torch.float32``
            for bf16/fp16 inputs, which makes reconstruction exact to float32 rounding);
            ``fn`` still sees halves in the input's dtype. Default: the input's dtype.
        preserve_rng_state: record the RNG state before every step of this call and replay
            it during recomputation (needed for dropout inside the step functions). Only the default CPU and
            CUDA generators are replayed: a ``torch.Generator`` that a step passes to its random ops draws anew,
            and its input is then silently rebuilt wrong (:func:`reversible.reconstruction_error` shows it).
        reversible: ``False`` runs the same steps with plain autograd (activations kept). Under ``torch.func``
            transforms (``grad``, ``vmap``, ``jacrev``, ``functional_call`` inside them) the steps always run so,
            as the same function: the transforms cannot go through the in-place backward's autograd nodes.

    Returns:
        one output tensor per stream (new tensors, never modified by the backward pass).

    The backward rebuilds each step's input from its output, so it needs finite activations: a NaN
    or infinity that a step carries into the other half (``y2 = x2 + g(y1)`` with ``y1`` non-finite)
    cannot be subtracted out again, and the gradients of earlier steps become NaN there, where plain
    autograd's may be finite (the loss is non-finite either way). It stays in the elements it reached.
    """
    inputs = _check_streams("inputs", "stream input", inputs)
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    _check_stream_dtype(stream_dtype)
    split_dims = _split_dims(inputs, dims, "stream input", input_mode == "split")
    streams = [_Stream(d, x.dtype, stream_dtype or x.dtype) for x, d in zip(inputs, split_dims)]
    couplings = _check_couplings(couplings, len(inputs))

    run = _Run(couplings, streams, merge, input_mode, preserve_rng_state)
    needs_graph = torch.is_grad_enabled() and (
        any(x.requires_grad for x in inputs) or bool(run.params) or bool(run.kw_tensors))
    # torch.func transforms cannot run the in-place autograd nodes: the same steps in plain autograd instead
    if reversible and needs_graph and not torch._C._are_functorch_transforms_active():
        return _run_reversible(run, inputs)
    # irreversible (plain autograd) or no graph at all: the same steps, functionally
    halves = []
    for x, s in zip(inputs, streams):
        x = x.to(s.buf_dtype)
        if input_mode == "duplicate":
            halves += [x, x]
        else:
            n = x.shape[s.dim] // 2
            halves += [x.narrow(s.dim, 0, n), x.narrow(s.dim, n, n)]
    for ci in range(len(couplings)):
        run.step_forward(ci, halves, inplace=False)
    return run.merged(halves)


def reverse_couplings(outputs: Sequence[Tensor], grads: Sequence[Tensor], couplings: Sequence[Coupling], *,
                      dims: int | Sequence[int] = -1) -> tuple[list[Tensor], list[Tensor]]:
    """Undo a stack of couplings from its (un-merged) outputs, as the seeds' ``backward_pass``.

    ``outputs`` and ``grads`` hold both halves of each stream along its split dim. Returns the
    reconstructed inputs and their gradients (new tensors; the arguments are not modified);
    parameter gradients are accumulated into ``.grad`` like ``Tensor.backward`` does (through the history of a
    non-leaf ``Coupling(params=...)`` tensor and of keyword-argument tensors, to their leaves). RNG
    state is not replayed (this is a standalone inverse, not part of a recorded call).

    Raises TypeError / ValueError naming the argument, as :func:`run_couplings` does for its inputs: ``outputs`` or
    ``grads`` not a sequence of floating tensors, an odd size on a split dim, a gradient shaped or placed unlike its
    output, a coupling referring to a half that no stream has.
    """
    outputs = _check_streams("outputs", "output", outputs)
    grads = _check_streams("grads", "grad", grads)
    if len(grads) != len(outputs):
        raise ValueError(f"grads must hold one gradient per output stream: {len(outputs)}, got {len(grads)}")
    for i, (y, g) in enumerate(zip(outputs, grads)):
        if g.shape != y.shape or g.device != y.device:
            raise ValueError(f"grad {i} must have the shape and device of output {i}, {tuple(y.shape)} on {y.device}; "
                             f"got {tuple(g.shape)} on {g.device}")
    split_dims = _split_dims(outputs, dims, "output", halves=True)
    streams = [_Stream(d, y.dtype, y.dtype) for y, d in zip(outputs, split_dims)]
    run = _Run(_check_couplings(couplings, len(outputs)), streams, "cat", "split", preserve_rng_state=False)
    run.autocast = {}
    run.snapshots = [_snapshot(c) for c in run.couplings]  # no recorded forward: the state now
    bufs = [run.to_buffer(i, y.detach()) for i, y in enumerate(outputs)]
    gbufs = [run.to_buffer(i, g.detach()) for i, g in enumerate(grads)]
    kgrads: dict[int, Tensor] = {}
    nonleaf: dict[int, Tensor] = {}  # Coupling(params=...) tensors computed from others: by index into run.params
    for s in reversed(range(len(run.segments))):
        pgrads, kg = run.backward_segment(s, bufs, gbufs)
        with torch.no_grad():  # each segment's parameter gradients go to .grad as soon as they exist
            for j, g in pgrads.items():
                p = run.params[j]
                if p.grad_fn is not None:
                    nonleaf[j] = g if j not in nonleaf else nonleaf[j] + g
                    continue
                p.grad = g.to(p.dtype).clone() if p.grad is None else p.grad.add_(g.to(p.dtype))
        for j, g in kg.items():
            kgrads[j] = g if j not in kgrads else kgrads[j] + g
    pending = [(run.kw_tensors[j], g) for j, g in kgrads.items()] + [(run.params[j], g) for j, g in nonleaf.items()]
    if pending:  # keyword-argument tensors and non-leaf params: let their own graph take the gradient
        torch.autograd.backward([t for t, _ in pending], [g for _, g in pending])
    return [run.from_buffer(i, b) for i, b in enumerate(bufs)], [run.from_buffer(i, g) for i, g in enumerate(gbufs)]
