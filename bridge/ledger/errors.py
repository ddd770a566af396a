"""Errors raised by the ledger room.

They subclass the bridge's single exception root so the link layer can answer them
uniformly. Messages name the message or consent identity and the states involved,
never payload content.
"""

from __future__ import annotations

from bridge.errors import BridgeError


class TransitionError(BridgeError):
    """An outbox row was asked to move along a transition the state table forbids.

    This is our own fault (a dispatcher bug or two workers racing on one row), so it
    is ``local`` and never answered to a partner as if they had erred.
    """

    code = "outbox-illegal-transition"
    http_status = 500
    fault = "local"


class UnknownMessage(BridgeError):
    """An outbox operation named a message identity the store does not hold."""

    code = "outbox-unknown-message"
    http_status = 404
    fault = "local"
    issue_type = "not-found"
