"""What the tests share: where the kernels can run (``kernels``), float64 oracles and checks per op
(``chunked_check``, ``elementwise_check``, ``oracle``), the multi-process harness (``distributed``), the CPU
memory tally (``live_bytes``), the op log (``op_log``) and the seeds' reversible stack with its plain-autograd
oracles (``seed_reversible``, ``seed_reversible_oracle``). Importable as ``helpers`` because ``tests/conftest.py``
puts ``tests/`` on ``sys.path`` (pytest's default prepend import mode). ``live_bytes`` and
``seed_reversible`` import nothing from here: ``bench.peers`` loads them by path."""
from pathlib import Path

import torch

#: the checkout's root
ROOT = Path(__file__).resolve().parents[2]


def strided_1d(t: torch.Tensor) -> torch.Tensor:
    """1-D ``t``'s values as a view of stride 2: every other entry of a buffer whose others are garbage (-7),
    so that code reading it by offset instead of by its strides reads the garbage."""
    return torch.stack([t, torch.full_like(t, -7)], 1).flatten()[::2]
