"""Fused kernels for the GateLoop associative scan.

Public API:
    gate_loop_operator(q, k, v, a)          -- drop-in for the seed's operator
    simple_gate_loop_operator(q, kv, a, cache=None) -- the simplified (real-gate) operator
    gate_loop_heads(q, k, v, z=... | log_magnitude=..., phase=...) -- head layout (B, n, H, d), real gate parameters
        (both scans take precision= and chunk_size=; every entry point checks its inputs once and runs
        through gateloop_kernels.dispatch.scan, the one place that picks the path)
        cu_seqlens= on the three, the layers and Transformer.forward: packed variable-length sequences in a
        (1, T, ...) batch, each scanned alone (gateloop_kernels.varlen)
    reference                                -- the pure-PyTorch oracles
    GateLoopedAttention, SimpleGateLoopLayer, Transformer, CausalFullAttention -- drop-in layers
        (with inference caches; Transformer.generate)
    gate_loop_decode_step(q, k, v, state, z=...) -- one recurrent step for all heads, state updated in place
    patch_gateloop_transformer()             -- make an installed upstream package use all of the above
"""
from . import reference
from .heads import gate_from_log_polar, gate_from_preactivation, gate_loop_heads
from .operator import gate_loop_operator, simple_gate_loop_operator
from .decode import gate_loop_decode_step
from .layers import (CausalFullAttention, GateLoopedAttention, KVCache, SimpleGateLoopLayer, Transformer,
                     TransformerCache)
from .patch import patch_gateloop_transformer

__all__ = ["gate_loop_operator", "simple_gate_loop_operator", "gate_loop_heads", "gate_from_preactivation",
           "gate_from_log_polar", "reference", "CausalFullAttention", "GateLoopedAttention", "SimpleGateLoopLayer",
           "Transformer", "TransformerCache", "KVCache", "gate_loop_decode_step", "patch_gateloop_transformer"]
__version__ = "0.1.0"
