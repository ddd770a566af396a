"""When the consent question asked at dispatch is sure to get the answer it got at enqueue.

Every claim is asked its consent question twice: when it is queued (``apply_policy``
decides what may go) and again when it is dispatched (``recheck_collection`` asks it
from the signed payload), so that a consent revoked, narrowed or expired while the claim
waited stops it. The second answer can only differ from the first when something the
answer depends on has changed in between:

- the consents that concern the patient: any ``put`` (an amendment, a revocation, a new
  consent) replaces a registry record with a new object, and a patient identifier
  linked meanwhile brings in the consents filed under it;
- the instant: a consent or one of its nested provisions starts or ends between the two
  questions (expiry, a deny provision that takes effect later, a link's cap on
  open-ended consents, all of which are periods on the records);
- the registry or the link profile the question is asked against (configuration reload).

A :class:`Clearance` records these at enqueue for the message this process signed, and
:meth:`Clearance.holds` says whether all of them are unchanged at dispatch. When it
does, the dispatch answer is the enqueue answer and the question need not be asked
again; otherwise (or for a message this process did not queue: after a restart, on a
resend) it is asked in full. The period test is conservative: a consent that ends
exactly at dispatch is asked again.

The clearance is found by the message's signature value but holds only for the very
bytes that were queued (their digest): a row changed in the store under that signature
is sent as it is (signed again when it has waited), so it is asked about as it is.
It is recorded only when the records it names are those the decision was made on,
that is when the decision is made as the message is signed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from hashlib import sha256

from bridge.policy.consent import ConsentRecord, ConsentRegistry, Provision
from bridge.policy.profile import LinkProfile


def _provisions(root: Provision) -> Iterable[Provision]:
    stack = [root]
    while stack:
        prov = stack.pop()
        yield prov
        stack.extend(prov.children)


def next_change(records: Iterable[ConsentRecord], after: datetime) -> datetime | None:
    """From when the answer given at ``after`` may differ: the first start after it, or
    the first end at or after it, of any of these consents or of their provisions
    (None: there is none).

    A period contains its end: one ending at ``after`` itself held then and no longer
    holds an instant later, so its end counts (the question is asked again after it)."""
    first: datetime | None = None
    for record in records:
        for prov in _provisions(record.provision):
            if prov.period is None:
                continue
            start, end = prov.period
            for instant in (start if start is not None and start > after else None,
                            end if end is not None and end >= after else None):
                if instant is not None and (first is None or instant < first):
                    first = instant
    return first


@dataclass(frozen=True, slots=True)
class Clearance:
    """What one message's consent decision at enqueue rested on (see the module text)."""

    registry: ConsentRegistry
    profile: LinkProfile
    identifiers: tuple[tuple[str, str], ...]
    records: tuple[ConsentRecord, ...]
    decided_at: datetime
    until: datetime | None
    payload: bytes

    @classmethod
    def at_enqueue(cls, *, registry: ConsentRegistry, profile: LinkProfile,
                   identifiers: Sequence[tuple[str, str]], decided_at: datetime) -> Clearance:
        """``registry.for_patient`` must give what the decision at ``decided_at`` was
        made on (ask at once). The clearance holds for nothing until :meth:`queued_as`
        names the bytes the outbox holds."""
        records = tuple(registry.for_patient(identifiers))
        return cls(registry, profile, tuple(identifiers), records, decided_at,
                   next_change(records, decided_at), b"")

    def queued_as(self, payload: bytes, payload_sha256: bytes | None = None) -> Clearance:
        """This clearance, for the message as it was written to the outbox
        (``payload_sha256``: the SHA-256 of those bytes, when the caller has it already)."""
        return replace(self, payload=payload_sha256 if payload_sha256 is not None
                       else sha256(payload).digest())

    def holds(self, *, registry: ConsentRegistry, profile: LinkProfile, now: datetime,
              payload: bytes, payload_sha256: bytes | None = None) -> bool:
        """Would the consent question asked now of the message ``payload`` (its bytes as
        the outbox holds them) get the enqueue answer? ``payload_sha256`` is the SHA-256
        of those bytes when the caller has computed it already."""
        if registry is not self.registry or profile is not self.profile:
            return False
        if payload_sha256 is None:
            payload_sha256 = sha256(payload).digest()
        if not self.payload or payload_sha256 != self.payload:
            return False
        if now < self.decided_at or (self.until is not None and now >= self.until):
            return False
        current = registry.for_patient(self.identifiers)
        return len(current) == len(self.records) and all(
            a is b for a, b in zip(current, self.records, strict=True))


__all__ = ["Clearance", "next_change"]
