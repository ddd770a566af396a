"""Refusals of identity do not tell, by the work they do, what they refused.

A signature whose key id is unknown, or belongs to another partner, is refused after
the same signature verification that a known key with a bad signature gets (so the
refusal takes as long); certificate pins are compared in constant time and in full.
Counted here by the work done, never timed (bench/refusal_timing.py prints times).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.errors import SignatureError
from bridge.trust import algorithms
from bridge.trust.identity import pinned
from bridge.trust.jws import (
    KeyRing,
    Signer,
    sign_bundle,
    sign_detached_bytes,
    verify_bundle,
    verify_detached_bytes,
)
from bridge.trust.pki import DevPKI, init_dev_pki

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
MSG = "urn:uuid:5d1c0f4e-8a8b-5c44-9a57-1f3c7f5d2b10"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(tmp_path_factory.mktemp("pki"),
                        ["hospital-a", "insurer-b", "platform-c", "clinic-x"], now=NOW)


def _signer(pki: DevPKI, who: str) -> Signer:
    files = pki.controllers[who]
    return Signer.from_files(files.sign_key, files.sign_cert)


@pytest.fixture(scope="module")
def ring(pki: DevPKI) -> KeyRing:
    ring = KeyRing()
    for who in ("hospital-a", "insurer-b", "platform-c"):  # clinic-x is not registered
        ring.add_certificate(who, pki.controllers[who].sign_cert)
    return ring


def _verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count signature verifications, whatever the algorithm."""
    calls = [0]
    for name in algorithms.names():
        impl = algorithms.get(name)
        assert impl is not None
        real = impl.verify

        def counted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            calls[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(impl, "verify", counted)
    return calls


def _refusal_work(monkeypatch: pytest.MonkeyPatch, attempt: Callable[[], object]) -> tuple[str, int]:
    calls = _verifications(monkeypatch)
    with pytest.raises(SignatureError) as caught:
        attempt()
    return str(caught.value.location), calls[0]


def test_detached_refusals_verify_once_whatever_the_key(
    pki: DevPKI, ring: KeyRing, monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = b'{"resourceType":"Consent","id":"insurer-b.c-1"}'

    def signed_by(who: str, payload: bytes = body) -> str:
        return sign_detached_bytes(payload, _signer(pki, who), issuer=who, audience="hospital-a",
                                   message_id="Consent/insurer-b.c-1", now=NOW)

    def verify(signature: str) -> Callable[[], object]:
        return lambda: verify_detached_bytes(signature, body, ring, expected_issuer="insurer-b",
                                             expected_audience="hospital-a", now=NOW)

    bad = _refusal_work(monkeypatch, verify(signed_by("insurer-b", b"other bytes")))
    unknown = _refusal_work(monkeypatch, verify(signed_by("clinic-x")))
    foreign = _refusal_work(monkeypatch, verify(signed_by("platform-c")))
    assert bad == ("X-Signature", 1)
    assert unknown == ("X-Signature#kid", 1)
    assert foreign == ("X-Signature#kid", 1)


def test_bundle_refusals_verify_as_often_whatever_the_key(
    pki: DevPKI, ring: KeyRing, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = {"resourceType": "Bundle", "type": "message", "timestamp": "2026-03-01T08:30:00+08:00",
              "identifier": {"system": "urn:ietf:rfc:3986", "value": MSG}, "entry": []}

    def signed_by(who: str) -> dict[str, Any]:
        return sign_bundle(dict(bundle), _signer(pki, who), issuer=who, audience="hospital-a",
                           message_id=MSG, now=NOW)

    def verify(signed: dict[str, Any]) -> Callable[[], object]:
        return lambda: verify_bundle(signed, ring, expected_issuer="insurer-b",
                                     expected_audience="hospital-a", now=NOW)

    tampered = signed_by("insurer-b")
    tampered["timestamp"] = "2026-03-01T08:31:00+08:00"
    bad = _refusal_work(monkeypatch, verify(tampered))
    unknown = _refusal_work(monkeypatch, verify(signed_by("clinic-x")))
    foreign = _refusal_work(monkeypatch, verify(signed_by("platform-c")))
    assert bad[1] >= 1 and unknown[1] == bad[1] and foreign[1] == bad[1]
    assert unknown[0].endswith("#kid") and foreign[0].endswith("#kid")


def test_pins_are_compared_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    pins = [f"{i:064x}" for i in range(5)]
    calls = [0]
    real = hmac.compare_digest

    def counted(a: Any, b: Any) -> bool:
        calls[0] += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    for candidate, expected in ((pins[0], True), (pins[4], True), ("f" * 64, False)):
        calls[0] = 0
        assert pinned(candidate, pins) is expected
        assert calls[0] == len(pins)  # no early exit on a match


