"""The look-back kernels' workspaces without a zero fill per launch: two buffers per (device, stream), used in
turns, each launch clearing the other one (docs/kernels.md section 2, "Workspaces").

A launch of ``_fwd_kernel`` / ``_bwd_kernel`` needs its look-back words and ticket zeroed. A fresh ``torch.zeros``
per launch is an allocation, a memset launch and its host dispatch, twice per forward+backward. Instead each
(device, stream) keeps two buffers and their dirty extents (the words the last launch on each could have written):
a launch takes the buffer whose turn it is, which is clean, and its programs zero the other buffer's dirty words as
they finish (``lookback._clear``). That is safe because launches on one stream run in order: the other buffer's
last user has finished before this launch starts, and the next launch, which takes it, starts after this one has
finished clearing it. The turn, the extents and the launch are taken under one lock, so launches from two threads
(autograd's device thread) reach the stream in the order the extents assume.

Fresh zeroed words instead (the former cost, correct everywhere): during CUDA-graph capture (a replay would run the
captured launches with the same buffers again, in one turn), for a launch needing more than :data:`MAX_WORDS`
words (its fill is then small beside its scan), and where an exception leaves a launch's fate unknown (the
(device, stream)'s buffers are dropped; :func:`reset` drops all of them, for callers that skipped launches on purpose,
e.g. stubbed ones). A dirty extent larger than the launch's grid can clear in a few blocks a
program (a small launch after a large one) is zeroed by a memset on the stream instead.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import Tensor

#: words (int64) per reused buffer, at most: 16 MB, two buffers per (device, stream) held for the process's life
MAX_WORDS = 1 << 21
#: dirty words a program may clear at the end of a launch (beyond that the buffer is memset instead)
CLEAR_PER_PROGRAM = 1 << 14

_lock = threading.Lock()
#: (device type, index, stream) -> [buffers, dirty extents, turn]
_pairs: dict = {}


def _stream_key(device: torch.device) -> tuple:
    if device.type != "cuda":  # the interpreter: launches run one after another on the host
        return (device.type, device.index, 0)
    return ("cuda", device.index, torch._C._cuda_getCurrentRawStream(device.index))


def launch_with_workspace(words: int, programs: int, device: torch.device,
                          launch: Callable[[Tensor, Tensor, int], None]) -> None:
    """Run ``launch(ws, clear, clear_n)`` with ``ws`` at least ``words`` zeroed int64 words on ``device``, whose
    ``programs`` programs must zero ``clear[:clear_n]`` (``lookback._clear``) and write nothing of ``ws`` past
    ``words``."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if words > MAX_WORDS or capturing:
        ws = torch.zeros(words, dtype=torch.int64, device=device)
        launch(ws, ws, 0)
        return
    with _lock:
        key = _stream_key(device)
        pair = _pairs.get(key)
        if pair is None:
            pair = _pairs[key] = [[None, None], [0, 0], 0]
        bufs, dirty, turn = pair
        other = 1 - turn
        ws = bufs[turn]
        if ws is None or ws.numel() < words:
            ws = bufs[turn] = torch.zeros(max(words, 1 << 12), dtype=torch.int64, device=device)
        clear, clear_n = bufs[other], dirty[other]
        if clear is None or clear_n == 0:
            clear, clear_n = ws, 0
        elif clear_n > programs * CLEAR_PER_PROGRAM:
            clear[:clear_n].zero_()
            clear, clear_n = ws, 0
        try:
            launch(ws, clear, clear_n)
        except BaseException:
            del _pairs[key]  # whether the launch ran (and cleared) is unknown: start over from fresh buffers
            raise
        dirty[turn], dirty[other], pair[2] = words, 0, other


def reset() -> None:
    """Forget every reused buffer: the next launches start from fresh zeroed ones. For code that made launches skip
    the device (a stubbed ``Launcher.run``), after which the buffers' bookkeeping no longer holds."""
    with _lock:
        _pairs.clear()
