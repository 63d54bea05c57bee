"""Fused kernels for the GateLoop associative scan.

Public API:
    gate_loop_operator(q, k, v, a)          -- drop-in for the seed's operator
    simple_gate_loop_operator(q, kv, a, cache=None) -- the simplified (real-gate) operator
    reference                                -- the pure-PyTorch oracles
"""
from . import reference
from .operator import gate_loop_operator, simple_gate_loop_operator

__all__ = ["gate_loop_operator", "simple_gate_loop_operator", "reference"]
__version__ = "0.1.0"
