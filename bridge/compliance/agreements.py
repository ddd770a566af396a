"""When a link may carry data: its data-use agreement, and for a partner abroad, the
approval for transfer across the border.

A link that names an agreement (``links.agreement``) carries nothing outside the
agreement's validity: nothing is queued, sent, answered to a pull, pulled or accepted
before ``valid_from`` or after ``valid_to``, and nothing of a resource type the
agreement does not permit. A link to a partner outside the mainland sends only under
the partner's approval (``partners.cross_border``), until it expires and up to its
item cap. Every refusal names the agreement or approval and the key that decided.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from bridge.errors import PolicyError

if TYPE_CHECKING:
    from bridge.config import AgreementConfig, BridgeConfig, CrossBorderApproval, LinkConfig


class AgreementRefused(PolicyError):
    """Outside the link's data-use agreement (not yet in force, ended, data not permitted)."""

    code = "agreement-refused"


class CrossBorderRefused(PolicyError):
    """A transfer abroad without a valid approval, or beyond its item cap."""

    code = "cross-border-refused"


def check_agreement(
    config: BridgeConfig, link: LinkConfig, now: datetime,
    *, resource_types: Iterable[str] = (),
) -> AgreementConfig | None:
    """The link's agreement if it holds at ``now`` for these resource types, else raise
    :class:`AgreementRefused` naming it; None for a link without an agreement."""
    if link.agreement is None:
        return None
    agreement = config.agreement(link.agreement)
    where = f"agreements.{agreement.id}"
    if now < agreement.starts():
        raise AgreementRefused(f"agreement {agreement.id} is not yet in force",
                               location=f"{where}.valid_from", agreement=agreement.id)
    if now >= agreement.ends():
        raise AgreementRefused(f"agreement {agreement.id} has ended",
                               location=f"{where}.valid_to", agreement=agreement.id)
    # The message envelope is not data the agreement has to permit.
    outside = sorted(set(resource_types) - set(agreement.permitted_data) - {"MessageHeader"})
    if outside:
        raise AgreementRefused(
            f"agreement {agreement.id} does not permit {', '.join(outside)}",
            location=f"{where}.permitted_data", agreement=agreement.id,
        )
    return agreement


def check_cross_border(
    config: BridgeConfig, link: LinkConfig, now: datetime
) -> CrossBorderApproval | None:
    """The approval a link to a partner abroad sends under, if it holds at ``now``;
    None for a partner in the mainland. Raises :class:`CrossBorderRefused`."""
    from bridge.config import day_end

    partner = config.partner(link.partner)
    if not partner.abroad:
        return None
    approval = partner.cross_border
    where = f"partners.{partner.id}.cross_border"
    if approval is None:
        raise CrossBorderRefused(
            f"partner {partner.id} is outside the mainland and no approval is configured",
            location=where,
        )
    if now >= day_end(approval.expires):
        raise CrossBorderRefused(f"cross-border approval {approval.reference} has expired",
                                 location=f"{where}.expires", approval=approval.reference)
    return approval


def check_link(config: BridgeConfig, link: LinkConfig, now: datetime,
               *, resource_types: Iterable[str] = ()) -> None:
    """Both checks, agreement first (what a send, an answer or an acceptance asks)."""
    check_agreement(config, link, now, resource_types=resource_types)
    if link.direction in ("outbound", "pull"):
        check_cross_border(config, link, now)


__all__ = [
    "AgreementRefused",
    "CrossBorderRefused",
    "check_agreement",
    "check_cross_border",
    "check_link",
]
