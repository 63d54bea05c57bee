"""Pieces shared by the compat modules: the seeds' ``Deterministic`` wrapper and block shims."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .. import sequence as _seq
from ..core import run_couplings
from ..routing import check_router, layer_drop, route_args

__all__ = ["Deterministic", "CompatBlock", "CompatFunction", "ResidualSequentialSequence"]


class Deterministic(nn.Module):
    """Wraps ``net`` (kept as ``self.net``, so state-dict keys match the seeds).

    The core records and replays RNG state per call by itself; this wrapper only keeps the seeds'
    standalone API: ``record_rng=True`` stores the RNG state, ``set_rng=True`` runs ``net`` with it.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.cpu_state: Tensor | None = None
        self.cuda_in_fwd: bool | None = None
        self.gpu_devices: list[int] | None = None
        self.gpu_states: list[Tensor] | None = None

    def record_rng(self, *args: Any) -> None:
        from torch.utils.checkpoint import get_device_states

        self.cpu_state = torch.get_rng_state()
        tensors = [a for a in args if isinstance(a, Tensor)]
        if any(t.is_cuda for t in tensors):
            self.cuda_in_fwd = True
            self.gpu_devices, self.gpu_states = get_device_states(*tensors)

    def forward(self, *args: Any, record_rng: bool = False, set_rng: bool = False, **kwargs: Any) -> Any:
        if record_rng:
            self.record_rng(*args)
        if not set_rng:
            return self.net(*args, **kwargs)
        if self.cpu_state is None:
            raise RuntimeError("Deterministic(set_rng=True) needs a previous call with record_rng=True")
        from torch.utils.checkpoint import set_device_states

        devices = self.gpu_devices if self.cuda_in_fwd else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_in_fwd:
                set_device_states(self.gpu_devices, self.gpu_states)
            return self.net(*args, **kwargs)


class CompatBlock(_seq.ReversibleBlock):
    """A core :class:`reversible.ReversibleBlock` with ``f``/``g`` wrapped in :class:`Deterministic`
    and the seeds' ``forward(x, f_args, g_args)`` / ``backward_pass(y, dy, f_args, g_args)``."""

    split_dim = -1

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__(Deterministic(f), Deterministic(g))

    def forward(self, x: Tensor, f_args: Mapping[str, Any] | None = None,  # type: ignore[override]
                g_args: Mapping[str, Any] | None = None) -> Tensor:
        return super().forward(x, f_args, g_args, dim=self.split_dim)

    def backward_pass(self, y: Tensor, dy: Tensor, f_args: Mapping[str, Any] | None = None,  # type: ignore[override]
                      g_args: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        return super().backward_pass(y, dy, f_args, g_args, dim=self.split_dim)


class CompatFunction:
    """Shim for code calling the seeds' ``_ReversibleFunction.apply(x, blocks, args)`` directly:
    ``x`` is ``[x1 | x2]`` along the blocks' split dim, ``args`` one ``{'f_args', 'g_args'}`` per
    block (or one for all). Returns ``[y1 | y2]``."""

    split_dim = -1

    @classmethod
    def apply(cls, x: Tensor, blocks: Any, args: Any) -> Tensor:
        blocks = list(blocks)
        per_block = [args] * len(blocks) if isinstance(args, Mapping) else list(args)
        couplings = [c for b, a in zip(blocks, per_block) for c in b.couplings(a.get("f_args"), a.get("g_args"))]
        return run_couplings([x], couplings, dims=cls.split_dim, merge="cat", input_mode="split")[0]


class ResidualSequentialSequence(nn.Module):
    """The seeds' irreversible ``SequentialSequence``: ``x = x + f(x)``, ``x = x + g(x)`` per layer."""

    def __init__(self, layers: Any, args_route: Mapping[str, Any] | None = None, layer_dropout: float = 0.0) -> None:
        super().__init__()
        args_route = dict(args_route or {})
        check_router(args_route, len(layers))
        if not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1), got {layer_dropout}")
        self.layers = layers
        self.args_route = args_route
        self.layer_dropout = layer_dropout

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        check_router(self.args_route, len(self.layers))  # per call: layers or routes may have changed since __init__
        layers = list(zip(self.layers, route_args(self.args_route, kwargs, len(self.layers))))
        if self.training and self.layer_dropout > 0:
            layers = layer_drop(layers, self.layer_dropout)
        for (f, g), (f_args, g_args) in layers:
            x = x + f(x, **f_args)
            x = x + g(x, **g_args)
        return x
