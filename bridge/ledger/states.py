"""The outbox state machine, as a table.

Invariants the table enforces (each is relied on by the dispatcher and the store):

1. Every message starts ``queued`` and only a claim moves it to ``sending``; a claim
   is a lease, so a ``sending`` row whose lease has expired (the worker crashed or
   hung) may be claimed again (``sending -> sending``). Nothing is ever lost by a
   crash: at worst a message is sent twice, and the receiver deduplicates on the
   message identity, so it is delivered exactly once in effect (DESIGN §7.4).
2. Only a ``sending`` row can be acknowledged, rejected, retried or dead-lettered:
   those outcomes are answers to an attempt, and a row nobody is sending has none.
3. ``acked`` is final. A receipt is the partner's signed word that it holds the
   message; nothing can make that untrue, so no transition leaves ``acked``.
4. ``rejected`` (a definitive refusal by the partner) is never retried
   automatically; ``dead`` (given up after the link's ``give_up_after``, see
   :func:`should_give_up`) neither. Both leave only through a
   deliberate ``requeue`` by an operator, back to ``queued``.
5. ``refused`` means our own consent check said no at dispatch (the consent was
   revoked while the message waited). It is reachable from ``queued`` (a sweep on
   revocation) and from ``sending`` (the check just before the POST). It is final:
   the payload was minimised under a consent that no longer stands, so a new
   authorisation produces a new message rather than resurrecting this one.

The module is pure: it reads no clock and does no I/O. ``next_attempt`` computes a
deadline from an attempt count, a ``now`` and a random source passed in; sleeping
until that deadline is the async layer's business.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from bridge.ledger.errors import TransitionError


class OutboxState(StrEnum):
    """States of an outbox row. Values are what the store writes in its ``state`` column."""

    QUEUED = "queued"
    SENDING = "sending"
    ACKED = "acked"
    REJECTED = "rejected"
    DEAD = "dead"
    REFUSED = "refused"


Q, S, A, R, D, F = (
    OutboxState.QUEUED,
    OutboxState.SENDING,
    OutboxState.ACKED,
    OutboxState.REJECTED,
    OutboxState.DEAD,
    OutboxState.REFUSED,
)

# (from, to) -> the event that causes it. Anything absent is forbidden.
TRANSITIONS: dict[tuple[OutboxState, OutboxState], str] = {
    (Q, S): "claim",
    (S, S): "reclaim after lease expiry",
    (S, A): "receipt received",
    (S, Q): "transient failure, retry later",
    (S, R): "partner rejected definitively",
    (S, D): "given up: pending longer than give_up_after, fate known",
    (S, F): "consent revoked at dispatch",
    (Q, F): "consent revoked while queued",
    (R, Q): "manual requeue",
    (D, Q): "manual requeue",
}

# States no automatic process leaves; the dispatcher never looks at them again.
TERMINAL: frozenset[OutboxState] = frozenset({A, R, D, F})

# States a ``requeue`` may start from (an operator's resend).
REQUEUEABLE: frozenset[OutboxState] = frozenset({R, D})


def check_transition(from_state: str, to_state: str) -> None:
    """Raise :class:`TransitionError` unless ``from_state -> to_state`` is in the table.

    Accepts plain strings (as read from the store) as well as :class:`OutboxState`.
    """
    try:
        key = (OutboxState(from_state), OutboxState(to_state))
    except ValueError:
        raise TransitionError(
            f"unknown outbox state in transition {from_state!s} -> {to_state!s}",
            location="outbox.state",
        ) from None
    if key not in TRANSITIONS:
        raise TransitionError(
            f"outbox transition {key[0].value} -> {key[1].value} is not allowed",
            location="outbox.state",
        )


class RandomSource(Protocol):
    """What ``next_attempt`` needs from a random generator (``random.Random`` fits)."""

    def random(self) -> float:
        """Return a float in [0.0, 1.0)."""
        ...


def backoff_ceiling(attempts: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Upper bound in seconds of the wait after ``attempts`` failed attempts.

    ``base * 2**(attempts-1)``, capped at ``cap``: 0.5, 1, 2, 4, ... 60, 60, ...
    """
    if attempts < 0:
        raise ValueError("attempts must be >= 0")
    if base <= 0 or cap <= 0:
        raise ValueError("base and cap must be positive")
    exponent = max(attempts - 1, 0)
    # Past 2**64 the cap has long been reached; avoid float overflow on huge counts.
    if exponent >= 64:
        return cap
    return min(cap, base * float(2**exponent))


def next_attempt(
    attempts: int,
    *,
    now: datetime,
    base: float = 0.5,
    cap: float = 60.0,
    rng: RandomSource,
) -> datetime:
    """When to try again after ``attempts`` failed attempts: exponential backoff, full jitter.

    The wait is drawn uniformly from ``[0, min(cap, base * 2**(attempts-1)))`` ("full
    jitter"), which spreads retries of many messages after a partner outage instead
    of sending them in synchronised waves. ``now`` must be timezone-aware.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    ceiling = backoff_ceiling(attempts, base=base, cap=cap)
    return now + timedelta(seconds=rng.random() * ceiling)


def should_give_up(
    *,
    pending_since: datetime,
    now: datetime,
    give_up_after: timedelta,
    fate_unknown: bool,
) -> bool:
    """Whether a claim that just failed again is dead-lettered (``sending -> dead``).

    Only time decides, never a count of attempts: crashes and outages spend attempts
    without saying anything about the claim. And never a claim whose fate is unknown
    (it may have reached the partner without an answer): recording it as dead could
    contradict a receipt the partner has signed, so it is resent, at the link's pace,
    until the partner answers.
    """
    if fate_unknown:
        return False
    return now - pending_since >= give_up_after
