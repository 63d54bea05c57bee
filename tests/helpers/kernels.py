"""Where this test session can run the Triton kernels: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                   reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEV = "cuda" if HAS_CUDA else "cpu"
