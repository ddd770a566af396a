"""Policy room: classification, consent evaluation and minimum-necessary link profiles.

Plain synchronous code over plain data; it never imports asyncio, aiohttp, ssl or a
database driver.
"""

from __future__ import annotations

from bridge.policy.classify import Classification, ResourceLabel, classify
from bridge.policy.consent import (
    ConsentDecision,
    ConsentRecord,
    ConsentRegistry,
    build_consent,
    parse_consent,
)
from bridge.policy.engine import PolicyResult, apply_policy, recheck
from bridge.policy.profile import LinkProfile, MinimizeResult, load_link_profile, load_profile

__all__ = [
    "Classification",
    "ConsentDecision",
    "ConsentRecord",
    "ConsentRegistry",
    "LinkProfile",
    "MinimizeResult",
    "PolicyResult",
    "ResourceLabel",
    "apply_policy",
    "build_consent",
    "classify",
    "load_link_profile",
    "load_profile",
    "parse_consent",
    "recheck",
]
