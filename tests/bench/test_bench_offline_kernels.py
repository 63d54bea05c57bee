"""``bench.tools.offline_kernels``: the head-dim-1 kernels compiled for sm_90 without a GPU.

Guards the layout those kernels depend on: with 32 channels or more, a thread holds one channel's steps of a
tile, so the tile scans, flips and shifts use no shared memory and no shuffles (only the look-back's channel
checks do, a handful of instructions). Compiled in a subprocess without ``TRITON_INTERPRET``.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench.tools import offline_kernels as ok
from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import backward, forward

from helpers import ROOT


def test_records_one_forward_and_one_backward_launch():
    calls = ok.record_elementwise(2, 100, 40, torch.float32)
    assert [fn.__name__ for fn, _, _ in calls] == ["_fwd_kernel", "_bwd_kernel"]
    (_, _, fwd_kw), (_, _, bwd_kw) = calls
    assert (fwd_kw["BLOCK_T"], fwd_kw["BLOCK_C"], fwd_kw["num_warps"]) == ew.tile_config(100, 40)
    assert (bwd_kw["BLOCK_T"], bwd_kw["BLOCK_C"], bwd_kw["num_warps"]) == ew.tile_config(100, 40, backward=True)
    assert fwd_kw["CARRY_T"] == bwd_kw["BLOCK_T"]
    assert forward._fwd_kernel.fn is calls[0][0] and backward._bwd_kernel.fn is calls[1][0]  # the kernels are put back


def test_records_the_chunked_launches():
    from gateloop_kernels.chunked import gradients, outputs, states
    before = {m: dict(vars(m)) for m in (states, outputs, gradients)}
    names = [fn.__name__ for fn, _, _ in ok.record_chunked(1, 100, 2, 32, 32, torch.float32)]
    assert "_fwd_o" in names and names[-3:] == ["_bwd_dqk", "_bwd_dv", "_bwd_gate"]
    assert all(vars(m)[k] is v for m, saved in before.items() for k, v in saved.items())  # the kernels are put back


@pytest.mark.parametrize("precision, state_kernels", [("ieee", ["_chunk_local", "_state_scan"]),
                                                      ("tf32", ["_chunk_states"])])
def test_backward_runs_both_state_directions_in_one_launch(precision, state_kernels):
    """The forward launches each state kernel once for the states; the backward once for the states and their
    adjoints together (grid over both directions), not once per direction."""
    calls = ok.record_chunked(1, 100, 2, 32, 32, torch.float32, precision)
    names = [fn.__name__ for fn, _, _ in calls]
    fwd, bwd = names[:names.index("_fwd_o") + 1], names[names.index("_fwd_o") + 1:]
    assert fwd == state_kernels + ["_fwd_o"]
    assert bwd == state_kernels + ["_bwd_dqk", "_bwd_dv", "_bwd_gate"]
    for i, (fn, _, kw) in enumerate(calls):
        if fn.__name__ in state_kernels:
            assert kw["FWD"] and kw["BWD"] == (i > names.index("_fwd_o"))


@pytest.mark.parametrize("precision, dtype, transposed", [("ieee", torch.float32, True),
                                                         ("tf32", torch.float32, True),
                                                         ("ieee", torch.bfloat16, False)])
def test_float32_forward_states_are_transposed(precision, dtype, transposed):
    """The float32 forward writes its states as (e, d) planes and _fwd_o reads them so (its state dots then stage
    a K-major tile without bank conflicts); the backward, whose dots contract the states over e, keeps (d, e)."""
    calls = ok.record_chunked(1, 100, 2, 32, 64, dtype, precision)
    flags = [(fn.__name__, kw.get("TRANS_F", kw.get("HT"))) for fn, _, kw in calls
             if fn.__name__ in ("_chunk_local", "_chunk_states", "_fwd_o")]
    state = "_chunk_local" if precision == "ieee" and dtype == torch.float32 else "_chunk_states"
    assert flags == [(state, transposed), ("_fwd_o", transposed), (state, False)]


def _compiled(*args: str) -> list:
    """The per-launch rows of ``python -m bench.tools.offline_kernels *args --json`` (a subprocess without
    ``TRITON_INTERPRET``; skips where this Triton build cannot compile for sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "bench.tools.offline_kernels", *args, "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr or "cuda" in r.stderr.lower()):
        pytest.skip(f"no sm_90 toolchain in this Triton build: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", ["2,100,64", "1,100,32"])  # 32 channels: one warp, none along time
def test_wide_tiles_keep_steps_in_threads(shape):
    rows = _compiled("--shape", shape)
    assert [row["kernel"] for row in rows] == ["_fwd_kernel", "_bwd_kernel"]
    for row in rows:
        tiles = [lay for lay in row["layouts"] if re.match(r"sizePerThread = \[\d+, \d+\]", lay)]  # 2-D
        assert tiles and all("threadsPerWarp = [1, 32]" in lay for lay in tiles), row["layouts"]
        assert row["shfl"] <= 8 and row["shared st/ld"][0] <= 8, row
        assert row["registers"] is None or 0 < row["registers"] <= 255


def test_packed_state_walk_keeps_its_loads_in_flight():
    """The one-kernel state pass walks a packed batch with its chunk loads as far ahead as an unpacked one: the
    pipelined loop's waits leave copies in flight (a wait for 0 in the loop serialises every chunk's loads, which
    reading each slot's table entries in the chunk they address caused: 1.21-1.26x unpacked on the H100)."""
    shape = ("--op", "chunked", "--shape", "1,400,2,64,64", "--dtype", "bfloat16")
    waits = {packed: [row["async waits"] for row in _compiled(*shape, *(("--lengths", "150,250") if packed else ()))
                      if row["kernel"] == "_chunk_states"] for packed in (False, True)}
    assert len(waits[True]) == 2 and all(w and max(w) > 0 for w in waits[True]), waits
    assert waits[True] == waits[False], waits
