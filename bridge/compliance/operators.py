"""Operators: the people who run a bridge, their roles, and what each role may do.

Four roles, each with the least it needs (GB/T 39725 §11.7.4.2 a 5 and b 1, Appendix F
"最小权限" and "权限分离"):

==============  ===============================================================
``viewer``      the status page, metrics, ``bridge status``, outbox counts, audit
                verification and the compliance report; nothing that shows a record
``operator``    also imports and sends data (push, records import, pull), requeues
                claims, reads the inbox, takes and restores backups
``consent-admin`` also registers, revokes and reads consents, answers a patient's
                request for the history of disclosures, reviews overrides
``key-admin``   also manages keys and certificates (operator certificates, data keys)
==============  ===============================================================

Every role may view; apart from that the duties do not overlap, so whoever manages
keys cannot import data and whoever imports data cannot change consents. A host user
mapped to two operators with different duties is refused when the configuration loads.

Who is acting is kept in :data:`ACTING_OPERATOR` (a context variable): a command run on
the host sets it to ``os:<user>``, a request on the operations port to
``cert:<name>``; every audit entry made meanwhile records it.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.errors import PolicyError
from bridge.ledger.audit import ACTING_OPERATOR
from bridge.trust.identity import pinned

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

ROLES = ("viewer", "operator", "consent-admin", "key-admin")

#: action -> roles that may do it.
PERMISSIONS: dict[str, frozenset[str]] = {
    "status.read": frozenset(ROLES),
    "compliance.report": frozenset(ROLES),
    "data.import": frozenset({"operator"}),
    "claim.requeue": frozenset({"operator"}),
    "inbox.read": frozenset({"operator"}),
    "store.backup": frozenset({"operator"}),
    "store.restore": frozenset({"operator"}),
    "data.destroy": frozenset({"operator"}),
    "consent.write": frozenset({"consent-admin"}),
    "consent.read": frozenset({"consent-admin"}),
    "disclosures.read": frozenset({"consent-admin"}),
    "records.review": frozenset({"consent-admin"}),
    "keys.manage": frozenset({"key-admin"}),
}


_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


class OperatorForbidden(PolicyError):
    """The operator is unknown, or their role does not allow the action."""

    code = "operator-forbidden"
    http_status = 403


@dataclass(frozen=True)
class Operator:
    """An authenticated person: how they are named in audit entries, and their role
    (None when the configuration names no operators and roles are not enforced)."""

    label: str
    name: str
    role: str | None

    def may(self, action: str) -> bool:
        return self.role is None or self.role in PERMISSIONS[action]


def acting_operator() -> str | None:
    """The operator label of the current task, if any."""
    return ACTING_OPERATOR.get()


@contextmanager
def acting_as(label: str | None) -> Iterator[None]:
    """Record ``label`` in the audit entries made inside the block."""
    token = ACTING_OPERATOR.set(label)
    try:
        yield
    finally:
        ACTING_OPERATOR.reset(token)


def host_user() -> str:
    """The host account running this process (its effective user id, not the
    environment's ``USER``, which the caller can set to anything)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid{os.geteuid()}"
    return user if _USER.match(user) else f"uid{os.geteuid()}"


def host_operator(config: BridgeConfig, user: str | None = None) -> Operator:
    """The operator a host user is, by the ``os_users`` of ``[[operators]]``.

    With no operators configured every host user may do everything (roles are not
    enforced; the compliance report says so) and is recorded as ``os:<user>``.
    """
    user = user or host_user()
    label = f"os:{user}"
    if not config.operators:
        return Operator(label, user, None)
    for op in config.operators:
        if user in op.os_users:
            return Operator(label, op.name, op.role)
    raise OperatorForbidden(
        f"host user {user} is not an operator of {config.controller.id}",
        location=f"{config.source or 'configuration'}: operators",
    )


def certificate_operator(config: BridgeConfig, name: str, role: str,
                         fingerprint: str) -> Operator:
    """The operator an operator certificate names, checked against ``[[operators]]``:
    the name must be listed, with the role the certificate was issued for, and with
    the certificate's fingerprint when the operator pins any."""
    op = config.operator(name)
    if op is None:
        raise OperatorForbidden("certificate names no operator of this bridge",
                                location="operators")
    if op.role != role:
        raise OperatorForbidden("certificate was issued for another role than the operator's",
                                location=f"operators.{name}.role")
    if op.fingerprints and not pinned(fingerprint, op.fingerprints):
        raise OperatorForbidden("certificate is not one pinned for this operator",
                                location=f"operators.{name}.fingerprints")
    return Operator(f"cert:{name}", name, role)


def require(operator: Operator, action: str) -> None:
    """Raise :class:`OperatorForbidden` unless ``operator`` may do ``action``."""
    if not operator.may(action):
        allowed = ", ".join(sorted(PERMISSIONS[action]))
        raise OperatorForbidden(
            f"operator {operator.name} ({operator.role}) may not do {action}; needs {allowed}",
            location="operators",
        )


__all__ = [
    "ACTING_OPERATOR",
    "PERMISSIONS",
    "ROLES",
    "Operator",
    "OperatorForbidden",
    "acting_as",
    "acting_operator",
    "certificate_operator",
    "host_operator",
    "host_user",
    "require",
]
