"""A live-storage tally for memory measurements on the CPU (no allocator statistics there): the memory tests,
and the reversible benchmark's CPU rows (``bench.peers`` loads this file from the checkout)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Tallies the bytes of every storage an op creates while the mode is active, until it is freed;
    ``peak`` is the largest total seen. Subclasses narrow what counts with :meth:`counts`. An output on
    the storage of one of the op's tensor arguments (an in-place op, a view) creates nothing."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def counts(self, func, t) -> bool:
        """Whether output ``t`` of ``func`` is tallied (every tensor here)."""
        return isinstance(t, torch.Tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if self.counts(func, t):
                s = t.untyped_storage()
                key, n = s.data_ptr(), s.nbytes()
                if n and key not in self.live and key not in ins:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(s, self._free, key)
        return out

    def reset_peak(self):
        self.peak = self.current
