"""The elementwise gate loop (head dim ``d = e = 1``, and the simplified operator) on Triton: a decoupled
look-back scan, one pass over the data.

Per channel ``c`` of a ``(B, n, C)`` tensor (any strides; channels contiguous is the fast case):

    forward   h_t = a_t h_{t-1} + x_t,  o_t = q_t Re(h_t),  x_t = k_t v_t (or ``kv_t`` given)
    backward  lam_t = conj(a_{t+1}) lam_{t+1} + q_t do_t  (lam_{n-1} also gets dL/dh_{n-1})
              dq_t = Re(h_t) do_t, dk_t = Re(lam_t) v_t, dv_t = Re(lam_t) k_t (dkv_t = Re(lam_t)),
              da_t = lam_t conj(h_{t-1}),  dh_{-1} = conj(a_0) lam_0

with a complex gate ``a = a_re + i a_im`` (``a_im = None``: a real gate), an optional initial state ``h_{-1}`` and
optional packed sequences (``cu_seqlens``); state and arithmetic are float32 whatever the input dtype.
docs/design.md section 5 has the tile scans, the look-back protocol (tickets, packed words, determinism mode) and
the packed sequences' resets; docs/kernels.md section 2 each kernel's grid, tiles, layout and bound. By stage:

* ``config``      the tile table (``WIDE_FWD``, ``WIDE_BWD``, ``NARROW``, :func:`tile_config`), segments,
  ``carries_numel``, the inputs' and outputs' strides and the launchers' shape checks;
* ``workspace``   the look-back words: two buffers per (device, stream) used in turns, each launch clearing the
  other (no zero fill per launch);
* ``scans``       device helpers: the tile scans over complex affine maps (``_combine``, ``_combine_reset``,
  ``_scan_reverse``) and the carry's application (``_apply_carry``);
* ``tiles``       device helpers: a program's tile offsets, its rows' packed sequences (``_sequences``) and row
  moves in registers (``_row``, ``_shift``);
* ``lookback``    device helpers of the look-back: word packing (``_pack``, ``_unpack``, ``_written``),
  ``_publish``, the walk ``_lookback`` and ``_clear`` (a program's share of the other workspace);
* ``forward``     ``_fwd_kernel`` and its launcher :func:`scan_forward`;
* ``backward``    ``_bwd_kernel`` and its launcher :func:`scan_backward`;
* ``torch_path``  the same scan in PyTorch (``_torch_forward``, ``_torch_backward``, ``_segmented_scan``): the op's
  implementation off the kernel devices;
* ``op``          the custom-op registration (``elementwise_scan_op``, ``KERNEL_DEVICES``) and
  :func:`elementwise_scan`, the dispatch's call.
"""
from .backward import scan_backward
from .config import carries_numel, tile_config
from .forward import scan_forward
from .op import elementwise_scan, elementwise_scan_op

__all__ = ["elementwise_scan", "elementwise_scan_op", "scan_forward", "scan_backward", "tile_config", "carries_numel"]
