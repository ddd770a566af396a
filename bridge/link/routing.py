"""Routing as data: which links a record goes to, from the ``[[routes]]`` of the config.

A rule names a source — the MLLP message type (for a visit record: the message that
completes the visit, e.g. ADT^A03), the data set, the sending organisation — and the
links records from it go to. An empty list in a rule matches anything. Every rule that
matches contributes its links, so one record may feed several links (a claim to an
insurer, an admission record to a regional platform). Pure code over plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.config import RouteConfig


@dataclass(frozen=True)
class Source:
    """Where a record comes from, in the terms routing rules use."""

    message_type: str  # MSH-9.1^MSH-9.2
    dataset: str  # WS445.10
    facility: str  # organisation code, else MSH-4.1 as sent


def _matches(rule: RouteConfig, source: Source) -> bool:
    return ((not rule.message or source.message_type in rule.message)
            and (not rule.dataset or source.dataset in rule.dataset)
            and (not rule.facility or source.facility in rule.facility))


def links_for(routes: Sequence[RouteConfig], source: Source) -> list[str]:
    """The links a record from ``source`` goes to, in rule order, each once."""
    out: list[str] = []
    for rule in routes:
        if _matches(rule, source):
            out += [link for link in rule.links if link not in out]
    return out


def could_route(routes: Sequence[RouteConfig], source: Source) -> bool:
    """Whether any rule matches (a record no rule matches is kept as unrouted)."""
    return any(_matches(rule, source) for rule in routes)
