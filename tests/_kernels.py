"""Where this test session can run the Triton kernels: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                   reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
