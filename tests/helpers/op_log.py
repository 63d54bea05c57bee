"""A dispatch-mode log of the ops a block of code runs (which kernels a path takes, which it avoids)."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Inside ``with log:``, appends each op that runs to ``log.ops`` as ``namespace::name.overload``
    (``aten::sub_.Tensor``; a default overload without a suffix: ``aten::cat``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))

    def packets(self) -> set:
        """The ops that ran, overloads dropped (``aten::cat`` for ``aten::cat.out`` too)."""
        return {name.split(".")[0] for name in self.ops}
