"""Whether a partner is reachable: the per-link circuit, as pure state logic.

A partner is up or down as a whole; what fails during an outage is the link, not each
claim. The circuit keeps that knowledge in one place so that connection attempts
during an outage are bounded by the circuit, not by the size of the backlog:

``closed``
    Normal operation: the dispatcher sends at the link's full concurrency. Transient
    failures of the link (no connection, no answer, 5xx, 429, 408) are counted; a
    success resets the count. ``threshold`` failures in a row open the circuit.
``open``
    Nothing is sent until ``retry_at``. The wait grows exponentially from ``base``
    to ``cap`` with each failed probe (jittered between half and all of it, so that
    many senders do not probe in step), and is never shorter than a ``Retry-After``
    the partner asked for.
``probing``
    ``retry_at`` has passed: exactly one request (the probe) may go. Its success
    closes the circuit, and the whole backlog is due at once; its failure opens the
    circuit again with the next, longer wait.

Invariants: at most one probe is outstanding; a success in any state closes the
circuit (a request that was already in flight proves the partner is back as well as a
probe does); a failure never shortens a wait already set.

The module reads no clock and does no I/O: times are plain seconds on a monotonic
scale passed in by the caller, which does the sleeping and the sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class RandomSource(Protocol):
    def random(self) -> float: ...


#: (from, to) -> the event that causes it; anything absent does not happen.
TRANSITIONS: dict[tuple[CircuitState, CircuitState], str] = {
    (CircuitState.CLOSED, CircuitState.OPEN): "threshold transient failures in a row",
    (CircuitState.OPEN, CircuitState.PROBING): "retry_at reached: one probe may go",
    (CircuitState.PROBING, CircuitState.OPEN): "the probe failed: wait longer",
    (CircuitState.PROBING, CircuitState.CLOSED): "the probe succeeded",
    (CircuitState.OPEN, CircuitState.CLOSED): "a request in flight succeeded",
}


@dataclass
class Circuit:
    """The state of one link (see the module docstring)."""

    base: float = 0.5
    cap: float = 10.0
    threshold: int = 3
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    #: Failed probes since the circuit opened; sets the next wait.
    openings: int = 0
    retry_at: float = 0.0
    probe_out: bool = False
    #: How many times the circuit has opened, and probes sent (for metrics).
    opened_total: int = 0
    probes_total: int = 0

    def permits(self, now: float) -> int | None:
        """How many requests may start now: None for no limit (closed), else 0 or 1."""
        if self.state is CircuitState.CLOSED:
            return None
        if self.state is CircuitState.OPEN:
            if now < self.retry_at:
                return 0
            self.state = CircuitState.PROBING
        return 0 if self.probe_out else 1

    def probe_started(self) -> None:
        """The one request :meth:`permits` allowed has gone out."""
        if self.state is CircuitState.PROBING:
            self.probe_out = True
            self.probes_total += 1

    def wait(self, now: float) -> float:
        """Seconds until something may be sent (0 when it may now)."""
        if self.state is CircuitState.OPEN:
            return max(0.0, self.retry_at - now)
        return 0.0

    def succeeded(self) -> bool:
        """A request got an answer that shows the partner works.

        Returns True when this closes an open circuit: the caller then makes the
        backlog due at once.
        """
        reopened = self.state is not CircuitState.CLOSED
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.openings = 0
        self.probe_out = False
        return reopened

    def failed(
        self,
        now: float,
        rng: RandomSource,
        *,
        retry_after: float | None = None,
        probe: bool = False,
    ) -> bool:
        """A transient failure of the link. Returns True when the circuit opens now.

        ``probe`` says the failed request was the probe; ``retry_after`` is the wait
        the partner asked for, in seconds.
        """
        if self.state is CircuitState.CLOSED:
            self.failures += 1
            if self.failures < self.threshold and retry_after is None:
                return False
            self._open(now, rng, retry_after)
            self.opened_total += 1
            return True
        if probe or self.state is CircuitState.PROBING:
            self.probe_out = False
            self._open(now, rng, retry_after)
            return False
        # A request that was already in flight when the circuit opened: it says
        # nothing new, except a longer wait the partner asked for.
        if retry_after is not None:
            self.retry_at = max(self.retry_at, now + retry_after)
        return False

    def _open(self, now: float, rng: RandomSource, retry_after: float | None) -> None:
        ceiling = min(self.cap, self.base * float(2 ** min(self.openings, 32)))
        self.openings += 1
        wait = ceiling * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        self.state = CircuitState.OPEN
        self.retry_at = max(self.retry_at, now + wait)


__all__ = ["TRANSITIONS", "Circuit", "CircuitState"]
