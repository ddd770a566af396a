"""The cyclic garbage collector's CPU time, for the benchmarks that report it."""

from __future__ import annotations

import time
from typing import Any


class CollectorClock:
    """A ``gc.callbacks`` entry adding up the CPU time of the collector's passes, in all
    and by generation. Each pass is timed on its own thread's clock: another thread (the
    store's) may be working meanwhile."""

    def __init__(self) -> None:
        self.total = 0.0
        self.passes = [0, 0, 0]
        self.by_generation = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.thread_time()
        else:
            spent = time.thread_time() - self._start
            self.total += spent
            self.passes[info["generation"]] += 1
            self.by_generation[info["generation"]] += spent
