"""What the tests share: where the kernels can run (``kernels``), float64 oracles and checks per op
(``chunked_check``, ``elementwise_check``, ``oracle``), the multi-process harness (``distributed``), the CPU
memory tally (``live_bytes``), the op log (``op_log``) and the seeds' reversible stack with its plain-autograd
oracles (``seed_reversible``, ``seed_reversible_oracle``). Importable as ``helpers`` because ``tests/conftest.py``
puts ``tests/`` on ``sys.path`` (pytest's default prepend import mode). ``live_bytes`` and
``seed_reversible`` import nothing from here: ``bench.peers`` loads them by path."""
from pathlib import Path

#: the checkout's root
ROOT = Path(__file__).resolve().parents[2]
