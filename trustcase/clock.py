"""The one clock of every deadline of the attack engine and the verifiers: `now()`, wall time by default.

A benchmark on a machine shared with other jobs measures in CPU seconds of its own process instead
(`use(time.process_time)`), so that a budget means what a dedicated core would give. Only the deadlines read it:
no other timer of the process (libraries, logging) changes. Process time counts every thread of the process: run
such a benchmark single-threaded (OMP_NUM_THREADS=1), or a budget buys a fraction of its CPU seconds."""

from __future__ import annotations

import time
from collections.abc import Callable

_clock: Callable[[], float] = time.perf_counter


def now() -> float:
    """The deadline clock's current reading in seconds (only differences mean anything)."""
    return _clock()


def use(clock: Callable[[], float]) -> Callable[[], float]:
    """Every deadline reads `clock` from now on; returns the clock it replaces."""
    global _clock
    before, _clock = _clock, clock
    return before
