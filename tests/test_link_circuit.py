"""The per-link circuit as pure state logic: when a link may send, and how much."""

from __future__ import annotations

import random
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.link.circuit import TRANSITIONS, Circuit, CircuitState


class Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_closed_sends_freely_and_opens_after_threshold_failures_in_a_row() -> None:
    c = Circuit(base=1.0, cap=8.0, threshold=3)
    assert c.permits(0.0) is None
    assert not c.failed(0.0, Fixed(1.0))
    assert c.succeeded() is False  # a success in between resets the count
    assert not c.failed(0.0, Fixed(1.0))
    assert not c.failed(0.0, Fixed(1.0))
    assert c.failed(0.0, Fixed(1.0))
    assert c.state is CircuitState.OPEN and c.permits(0.5) == 0 and c.wait(0.5) == 0.5


def test_one_probe_at_a_time_with_capped_exponential_backoff() -> None:
    c = Circuit(base=1.0, cap=8.0, threshold=1)
    c.failed(0.0, Fixed(0.999999))
    now, waits = 0.0, []
    for _ in range(7):
        now = c.retry_at
        assert c.permits(now) == 1
        c.probe_started()
        assert c.permits(now) == 0  # the probe is out: nothing else goes
        c.failed(now, Fixed(0.999999), probe=True)
        waits.append(round(c.retry_at - now, 3))
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert c.probes_total == 7 and c.opened_total == 1


def test_probe_success_closes_and_says_so_once() -> None:
    c = Circuit(base=1.0, cap=8.0, threshold=1)
    c.failed(0.0, Fixed(0.5))
    assert c.permits(c.retry_at) == 1
    c.probe_started()
    assert c.succeeded() is True
    assert c.state is CircuitState.CLOSED and c.permits(100.0) is None
    assert c.succeeded() is False
    # After closing, backoff starts again from the base.
    c.failed(200.0, Fixed(0.999999))
    assert round(c.retry_at - 200.0, 3) == 1.0


def test_retry_after_is_never_shortened() -> None:
    c = Circuit(base=0.1, cap=1.0, threshold=5)
    assert c.failed(0.0, Fixed(0.0), retry_after=30.0)  # the partner's word opens at once
    assert c.retry_at == 30.0
    c.failed(1.0, Fixed(0.0))  # a request already in flight fails: no shorter wait
    assert c.retry_at == 30.0
    c.failed(2.0, Fixed(0.0), retry_after=45.0)
    assert c.retry_at == 47.0


events = st.lists(
    st.tuples(
        st.sampled_from(["permit", "fail", "fail-probe", "succeed", "retry-after"]),
        st.floats(min_value=0.0, max_value=5.0),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(min_value=1, max_value=5), st.integers(0, 2**32))
def test_invariants_hold_under_any_sequence_of_events(
    seq: list[tuple[str, float]], threshold: int, seed: int
) -> None:
    rng = random.Random(seed)
    c = Circuit(base=0.2, cap=3.0, threshold=threshold)
    now = 0.0
    for kind, dt in seq:
        now += dt
        before, probe_out = c.state, c.probe_out
        if kind == "permit":
            p = c.permits(now)
            if p == 1:
                c.probe_started()
            # Only a probing circuit lets exactly one request through, and only when
            # no probe is out already.
            assert p is None or p in (0, 1)
            assert (p is None) == (c.state is CircuitState.CLOSED)
            if p == 1:
                assert not probe_out
        elif kind in ("fail", "fail-probe"):
            at = c.retry_at
            c.failed(now, rng, probe=kind == "fail-probe" and probe_out)
            if before is not CircuitState.CLOSED:
                assert c.retry_at >= at  # a failure never shortens a wait
            if c.state is CircuitState.OPEN:
                assert c.retry_at - now <= max(3.0, 0.0) + 1e-9 or c.retry_at == at
        elif kind == "retry-after":
            c.failed(now, rng, retry_after=10.0)
            assert c.state is CircuitState.CLOSED or c.retry_at >= now + 10.0 - 1e-9
        else:
            c.succeeded()
            assert c.state is CircuitState.CLOSED and not c.probe_out
        if c.state is not before:
            assert (before, c.state) in TRANSITIONS or (before, c.state) == (
                CircuitState.CLOSED,
                CircuitState.OPEN,
            )


def test_the_circuit_module_imports_no_io() -> None:
    code = (
        "import sys, bridge.link.circuit, bridge.ledger.states;"
        "bad = [m for m in ('asyncio', 'aiohttp', 'ssl', 'sqlite3', 'psycopg') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
