"""Wall time spent in expert-parallel all-to-alls, forward and backward, stock or LSH.

The dispatchers send through megatron-core's ``tensor_parallel.mappings._AllToAll`` (stock
dispatch, routing probabilities) or megatron-lsh's ``PayloadAllToAll`` (rows in their payload
formats, encoding and decoding included); timing their forwards and backwards covers every
all-to-all of a step, including those autograd runs. On GPUs
the device is synchronised around each one so the time is the collective's own, which removes
any overlap: so it is opt-in, with --timing-log-level 1 or more (Megatron-LM's timing flag).
"""

from __future__ import annotations

import contextlib
import time

import torch
from megatron.core.tensor_parallel import mappings

from megatron_lsh.moe.payload import PayloadAllToAll

# The --timing-log-level from which the all-to-alls are timed.
TIMING_LOG_LEVEL = 1

_seconds = 0.0
_installed = False


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install() -> None:
    """Start timing (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True

    def timed(fn):
        def wrapper(ctx, *args):
            global _seconds
            _sync()
            start = time.perf_counter()
            result = fn(ctx, *args)
            _sync()
            _seconds += time.perf_counter() - start
            return result

        return staticmethod(wrapper)

    for function in (mappings._AllToAll, PayloadAllToAll):
        function.forward, function.backward = timed(function.forward), timed(function.backward)


def take_seconds() -> float:
    """Seconds spent in all-to-alls since the last call."""
    global _seconds
    seconds, _seconds = _seconds, 0.0
    return seconds


@contextlib.contextmanager
def excluded():
    """All-to-alls inside this block (an evaluation) do not count towards the step time share."""
    global _seconds
    kept = _seconds
    try:
        yield
    finally:
        _seconds = kept
