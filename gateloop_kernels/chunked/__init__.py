"""Chunked gate-loop scan on tensor cores (Triton): a complex gate per head, head dims 16..256.

``S_t = a_t S_{t-1} + k_t v_t^T`` (complex ``d x e`` state, complex scalar gate per head and step),
``o_t = Re(S_t)^T q_t``, computed chunk by chunk (``BT = 64`` steps by default). docs/design.md (sections 3, 4,
6, 7, 9) has the chunk algebra, the division-free gate gradient, the float32 exactness and the non-finite
rules; docs/kernels.md (section 1) each kernel's grid, tiles, launch table and hazards. By stage:

* ``config``     the launch table (``_SEARCHED``, ``_CFG``, ``_IRREGULAR``, ``_cfg``) and tile widths;
* ``tiles``      device helpers: head offsets, chunk spans (packed batches), tile loads and stores;
* ``dots``       device helpers: the tensor-core products (``_dot``, ``_split_dot``, ``_wide_dot``, ``_time_dot``);
* ``gates``      device helpers: chunk-local gate prefixes, spans and decay tiles (nothing divides by a gate);
* ``states``     the state passes (``_chunk_states``, or ``_chunk_local`` + ``_state_scan``), the packed batch's
  chunk table (``_chunk_table``) and their launcher ``_carried``;
* ``outputs``    ``_fwd_o`` and the forward launcher ``_forward``;
* ``gradients``  ``_bwd_dqk``, ``_bwd_dv``, ``_bwd_gate`` and the backward launcher ``_backward``;
* ``op``         the custom-op registration (``_chunk_op``) and the entries ``chunk_gate_loop`` (public, checks its
  arguments) and ``_chunk_gate_loop`` (the dispatch's call on checked arguments, also for packed batches).

All kernels accumulate in float32; nothing divides by a gate (zero gates are exact resets), and non-finite
values stay causal at the cost of one sum per time contraction (``dots._time_dot``, ``gates._span``).

Per-key-dim gates ``a: (B, n, d, 1)`` have no kernel here: ``gateloop_kernels.dispatch`` sends them to
the reference (``reference.chunked_reference``, which runs the sequential loop for that layout) with a
one-time warning.
"""
from ..dtypes import PRECISIONS
from .op import _chunk_gate_loop, chunk_gate_loop

__all__ = ["chunk_gate_loop", "PRECISIONS"]
