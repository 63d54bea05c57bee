"""The head-dim-1 kernels' reused look-back workspaces (``elementwise/workspace.py``): launches of every size in any
order get the oracle's results from buffers they never zero-fill, each launch leaves the other buffer zeroed, and
capture, oversize launches and failed launches take fresh buffers."""
import pytest
import torch

from gateloop_kernels import elementwise as ew
from gateloop_kernels.elementwise import workspace
from helpers.elementwise_check import assert_grads, make, oracle, rel
from helpers.kernels import DEV, needs_kernels

#: (B, n, C) in an order where each launch needs more, then fewer words than the one before
SIZES = [(2, 40, 3), (1, 70, 33), (3, 17, 1), (1, 48, 20), (1, 5, 2)]


def _key():
    return workspace._stream_key(torch.device(DEV))


def _check_call(B, n, C, complex_gate=True):
    args = make(B, n, C, torch.float32, complex_gate, False, True)
    do = torch.randn(B, n, C, device=DEV)
    g_re = torch.randn(B, C, device=DEV)
    o, hr, hi, carries = ew.scan_forward(*args)
    grads = ew.scan_backward(do, g_re, None, *args, carries)
    ro, rh, rgrads = oracle(*args, do, g_re, None)
    assert rel(o, ro) < 1e-5 and rel(hr, rh.real) < 1e-5
    assert_grads(grads, rgrads, 1e-5)


@needs_kernels
@pytest.mark.parametrize("per_program", [workspace.CLEAR_PER_PROGRAM, 1])
def test_launches_of_changing_sizes_reuse_and_clear_the_buffers(monkeypatch, per_program):
    """Growing and shrinking launches match the float64 loop; after each launch the buffer whose turn is next is
    zero everywhere (cleared by the launch's programs, or by a memset where its dirty words exceed
    ``per_program`` a program: ``per_program = 1`` takes that path on every launch after the first)."""
    monkeypatch.setattr(workspace, "CLEAR_PER_PROGRAM", per_program)
    workspace._pairs.pop(_key(), None)
    for B, n, C in SIZES:
        _check_call(B, n, C)
        bufs, dirty, turn = workspace._pairs[_key()]
        assert dirty[turn] == 0 and torch.count_nonzero(bufs[turn]) == 0
        assert dirty[1 - turn] > 0 and torch.count_nonzero(bufs[1 - turn]) > 0  # the words the last launch wrote


@needs_kernels
def test_steady_state_launches_take_no_new_workspace():
    """Once both buffers exist, forward+backward pairs reuse them (the same tensors: nothing allocated or zero-filled
    for the workspace; the aten calls of a whole eager call, zero fills included, are counted in
    ``tests/bench/test_bench_op_count.py``)."""
    workspace._pairs.pop(_key(), None)
    args = make(2, 64, 4, torch.float32, True, False, False)
    do = torch.randn(2, 64, 4, device=DEV)
    for _ in range(2):
        o, _, _, carries = ew.scan_forward(*args)
        ew.scan_backward(do, None, None, *args, carries)
    bufs = list(workspace._pairs[_key()][0])
    for _ in range(2):
        o, _, _, carries = ew.scan_forward(*args)
        ew.scan_backward(do, None, None, *args, carries)
    assert all(b is c for b, c in zip(workspace._pairs[_key()][0], bufs))


@needs_kernels
def test_oversize_launches_take_fresh_words(monkeypatch):
    """Above ``MAX_WORDS`` a launch gets fresh zeroed words and leaves the reused buffers as they were."""
    monkeypatch.setattr(workspace, "MAX_WORDS", 64)
    workspace._pairs.pop(_key(), None)
    _check_call(1, 70, 33)
    assert _key() not in workspace._pairs
    _check_call(1, 5, 2)  # small enough: reused buffers
    assert _key() in workspace._pairs


@needs_kernels
def test_a_failed_launch_drops_the_buffers():
    """An exception inside the launch (here before it reaches the device) drops the (device, stream)'s buffers, whose
    state is then unknown; the next launches start from fresh ones and are right."""
    _check_call(2, 40, 3)

    def fail(ws, clear, clear_n):
        raise RuntimeError("launch failed")
    with pytest.raises(RuntimeError, match="launch failed"):
        workspace.launch_with_workspace(16, 1, torch.device(DEV), fail)
    assert _key() not in workspace._pairs
    _check_call(1, 70, 33)
    _check_call(2, 40, 3)


@pytest.mark.gpu
def test_gpu_graph_capture_and_two_streams():
    """Captured launches take fresh words per launch (a replay repeats them in one turn): replays with new inputs
    match the oracle; launches alternating between two streams, each with its own buffers, match it too."""
    B, n, C = 2, 3000, 96
    static = [t.clone() if t is not None else None for t in make(B, n, C, torch.float32, True, False, True, "cuda")]
    do = torch.randn(B, n, C, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) off the capture
        ew.scan_backward(do, None, None, *static, ew.scan_forward(*static)[3])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, hr, hi, carries = ew.scan_forward(*static)
        grads = ew.scan_backward(do, None, None, *static, carries)
    for _ in range(3):
        fresh = make(B, n, C, torch.float32, True, False, True, "cuda")
        for s, f in zip(static, fresh):
            if s is not None:
                s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        ro, _, rgrads = oracle(*static, do, torch.zeros(B, C, device="cuda"), None)
        assert rel(o, ro) < 1e-5
        assert_grads(grads, rgrads, 1e-5)
    streams = [torch.cuda.current_stream(), torch.cuda.Stream()]
    for i, (B, n, C) in enumerate([(1, 2048, 512), (2, 300, 40), (1, 1024, 64), (3, 64, 7)] * 2):
        s = streams[i % 2]
        s.wait_stream(streams[1 - i % 2])
        with torch.cuda.stream(s):
            _check_call(B, n, C)
    torch.cuda.synchronize()
