"""Detached JWS in Bundle.signature: what a receiver accepts and what it refuses."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import ConfigError, ReplayError, SignatureError
from bridge.trust.jws import (
    KeyRing,
    Signer,
    SigningError,
    canonical_json,
    digest,
    sign_bundle,
    verify_bundle,
)
from bridge.trust.pki import DevPKI, generate_ca, init_dev_pki, issue_certificate

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
MSG = "urn:uuid:5d1c0f4e-8a8b-5c44-9a57-1f3c7f5d2b10"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(
        tmp_path_factory.mktemp("pki"), ["hospital-a", "insurer-b", "platform-c"], now=NOW
    )


def signer(pki: DevPKI, who: str) -> Signer:
    files = pki.controllers[who]
    return Signer.from_files(files.sign_key, files.sign_cert)


@pytest.fixture(scope="module")
def keyring(pki: DevPKI) -> KeyRing:
    ring = KeyRing()
    for who in ("hospital-a", "insurer-b", "platform-c"):
        ring.add_certificate(who, pki.controllers[who].sign_cert)
    return ring


def message() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": MSG},
        "type": "message",
        "timestamp": "2026-03-01T08:30:00+08:00",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b6f7a8e-0000-5000-8000-000000000001",
                "resource": {
                    "resourceType": "Patient",
                    "id": "0b6f7a8e-0000-5000-8000-000000000001",
                    "name": [{"text": "张三"}],
                    "birthDate": "1980-05-17",
                },
            },
            {
                "fullUrl": "urn:uuid:0b6f7a8e-0000-5000-8000-000000000002",
                "resource": {
                    "resourceType": "Claim",
                    "id": "0b6f7a8e-0000-5000-8000-000000000002",
                    "total": {"value": 250.10, "currency": "CNY"},
                },
            },
        ],
    }


def signed(pki: DevPKI, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "issuer": "hospital-a",
        "audience": "insurer-b",
        "message_id": MSG,
        "now": NOW,
    }
    args.update(kw)
    return sign_bundle(message(), signer(pki, args.pop("signer", "hospital-a")), **args)


def verify(bundle: dict[str, Any], keyring: KeyRing, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "expected_issuer": "hospital-a",
        "expected_audience": "insurer-b",
        "now": NOW,
    }
    args.update(kw)
    return verify_bundle(bundle, keyring, **args)


def wire(bundle: dict[str, Any]) -> dict[str, Any]:
    """What the receiver parses: the bundle sent as indented, key-shuffled JSON."""
    text = json.dumps(dict(reversed(list(bundle.items()))), ensure_ascii=True, indent=2)
    return json.loads(text)  # type: ignore[no-any-return]


def test_round_trip_over_reencoded_json(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = signed(pki)
    claims = verify(wire(bundle), keyring, now=NOW + timedelta(minutes=4))
    assert claims.issuer == "hospital-a"
    assert claims.audience == "insurer-b"
    assert claims.message_id == MSG
    assert claims.issued_at == NOW
    assert claims.kid == signer(pki, "hospital-a").kid
    without = {k: v for k, v in bundle.items() if k != "signature"}
    assert claims.payload_digest == digest(canonical_json(without))
    sig = bundle["signature"]
    assert sig["sigFormat"] == "application/jose"
    assert sig["type"][0] == {
        "system": "urn:iso-astm:E1762-95:2013",
        "code": "1.2.840.10065.1.12.1.5",
    }
    assert sig["who"]["identifier"] == {
        "system": "urn:ws-fhir-bridge:partner",
        "value": "hospital-a",
    }
    header_b64, payload_b64, _ = base64.b64decode(sig["data"]).split(b".")
    assert payload_b64 == b""  # detached
    header = json.loads(base64.urlsafe_b64decode(header_b64 + b"=" * (-len(header_b64) % 4)))
    assert header == {
        "alg": "ES256",
        "kid": claims.kid,
        "iss": "hospital-a",
        "aud": "insurer-b",
        "iat": int(NOW.timestamp()),
        "msgid": MSG,
    }


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, 2.5], "a": "张"}) == '{"a":"张","b":[1,2.5]}'.encode()
    assert canonical_json(orjson.loads(b'{"v": 250.10}')) == canonical_json(
        json.loads('{"v":250.1}')
    )
    assert canonical_json({"a": None}) == b'{"a":null}'
    with pytest.raises(SignatureError) as err:
        canonical_json({"a": None, "v": [float("nan")]})
    assert err.value.location == "$.v[0]"


def test_tampered_name_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = wire(signed(pki))
    bundle["entry"][0]["resource"]["name"][0]["text"] = "张四"
    with pytest.raises(SignatureError) as err:
        verify(bundle, keyring)
    assert err.value.location == "Bundle.signature.data"
    assert "张" not in str(err.value)


def test_tampered_signature_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = signed(pki)
    header, _, sig = base64.b64decode(bundle["signature"]["data"]).split(b".")
    flipped = sig[:10] + (b"A" if sig[10:11] != b"A" else b"B") + sig[11:]
    bundle["signature"]["data"] = base64.b64encode(header + b".." + flipped).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify(bundle, keyring)


def test_missing_and_malformed_signatures(pki: DevPKI, keyring: KeyRing) -> None:
    with pytest.raises(SignatureError) as err:
        verify(message(), keyring)
    assert err.value.location == "Bundle.signature"
    for data in (
        "not base64!",
        base64.b64encode(b"a.b").decode(),
        base64.b64encode(b"e30.payload.sig").decode(),
    ):
        bundle = signed(pki)
        bundle["signature"]["data"] = data
        with pytest.raises(SignatureError) as err:
            verify(bundle, keyring)
        assert err.value.location == "Bundle.signature.data"


def test_unknown_kid_is_refused(pki: DevPKI) -> None:
    ring = KeyRing()
    ring.add_certificate("insurer-b", pki.controllers["insurer-b"].sign_cert)
    with pytest.raises(SignatureError, match="not in the key ring"):
        verify(signed(pki), ring)


def test_key_of_another_partner_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    # platform-c signs honestly as itself, but the TLS peer was hospital-a.
    bundle = signed(pki, signer="platform-c", issuer="platform-c")
    with pytest.raises(SignatureError, match="another partner"):
        verify(bundle, keyring)
    # platform-c claims to be hospital-a: the key still betrays it.
    forged = signed(pki, signer="platform-c", issuer="hospital-a")
    with pytest.raises(SignatureError, match="another partner"):
        verify(forged, keyring)


def test_replayed_outside_window_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = signed(pki)
    with pytest.raises(ReplayError) as err:
        verify(bundle, keyring, now=NOW + timedelta(minutes=5, seconds=1))
    assert err.value.location == "Bundle.signature.data#iat"
    with pytest.raises(ReplayError):
        verify(bundle, keyring, now=NOW - timedelta(minutes=6))
    verify(bundle, keyring, now=NOW + timedelta(days=30), check_time=False)


def test_wrong_audience_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = signed(pki, audience="platform-c")
    with pytest.raises(ReplayError, match="another partner"):
        verify(bundle, keyring)


def test_sender_cannot_sign_a_message_id_other_than_the_identifier(pki: DevPKI) -> None:
    with pytest.raises(SigningError) as err:
        sign_bundle(
            message(),
            signer(pki, "hospital-a"),
            issuer="hospital-a",
            audience="insurer-b",
            message_id="urn:uuid:other",
            now=NOW,
        )
    assert err.value.location == "Bundle.identifier.value"


def test_signed_msgid_differing_from_identifier_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    # A signer that put another msgid in the header than the bundle identifier.
    s = signer(pki, "hospital-a")
    bundle = message()
    from bridge.trust.jws import signed_payload

    data = s.sign_detached(
        {
            "iss": "hospital-a",
            "aud": "insurer-b",
            "iat": int(NOW.timestamp()),
            "msgid": "urn:uuid:x",
        },
        signed_payload(bundle),
    )
    bundle["signature"] = {
        "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
        "when": NOW.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sigFormat": "application/jose",
        "who": {"identifier": {"system": "urn:ws-fhir-bridge:partner", "value": "hospital-a"}},
        "data": base64.b64encode(data.encode()).decode(),
    }
    with pytest.raises(SignatureError) as err:
        verify(bundle, keyring)
    assert err.value.location == "Bundle.identifier.value"


def test_key_rotation_keeps_old_and_new_keys(tmp_path: Path, pki: DevPKI, keyring: KeyRing) -> None:
    ring = KeyRing()
    ring.add_certificate("hospital-a", pki.controllers["hospital-a"].sign_cert)
    ca, ca_key = generate_ca("rotation CA", now=NOW)
    cert, key = issue_certificate(
        ca, ca_key, "hospital-a next", purpose="signing", now=NOW, partner_id="hospital-a"
    )
    ring.add_certificate("hospital-a", cert)
    assert len(ring.kids_for("hospital-a")) == 2
    new = Signer.from_certificate(key, cert)
    bundle = sign_bundle(
        message(), new, issuer="hospital-a", audience="insurer-b", message_id=MSG, now=NOW
    )
    verify(bundle, ring)
    verify(signed(pki), ring)
    with pytest.raises(ConfigError):
        ring.add_certificate("platform-c", cert)


def test_ed25519_signatures(pki: DevPKI) -> None:
    ca, ca_key = generate_ca("ed CA", now=NOW)
    cert, key = issue_certificate(
        ca,
        ca_key,
        "ed",
        purpose="signing",
        now=NOW,
        partner_id="hospital-a",
        key_algorithm="Ed25519",
    )
    ring = KeyRing()
    ring.add_certificate("hospital-a", cert)
    bundle = sign_bundle(
        message(),
        Signer.from_certificate(key, cert),
        issuer="hospital-a",
        audience="insurer-b",
        message_id=MSG,
        now=NOW,
    )
    assert verify(wire(bundle), ring).algorithm == "Ed25519"


def test_signature_after_signing_certificate_expired_is_refused(pki: DevPKI) -> None:
    ca, ca_key = generate_ca("short CA", now=NOW - timedelta(days=20))
    cert, key = issue_certificate(
        ca,
        ca_key,
        "short",
        purpose="signing",
        now=NOW - timedelta(days=20),
        days=10,
        partner_id="hospital-a",
    )
    ring = KeyRing()
    ring.add_certificate("hospital-a", cert)
    bundle = sign_bundle(
        message(),
        Signer.from_certificate(key, cert),
        issuer="hospital-a",
        audience="insurer-b",
        message_id=MSG,
        now=NOW,
    )
    with pytest.raises(SignatureError, match="not valid at the signing time"):
        verify(bundle, ring)


def test_signer_rejects_mismatched_key_and_certificate(pki: DevPKI) -> None:
    a, b = pki.controllers["hospital-a"], pki.controllers["insurer-b"]
    with pytest.raises(ConfigError):
        Signer.from_files(a.sign_key, b.sign_cert)


def test_large_bundle_signs_and_verifies(pki: DevPKI, keyring: KeyRing) -> None:
    bundle = message()
    bundle["entry"].extend(copy.deepcopy(bundle["entry"][0]) for _ in range(3000))
    big = sign_bundle(
        bundle,
        signer(pki, "hospital-a"),
        issuer="hospital-a",
        audience="insurer-b",
        message_id=MSG,
        now=NOW,
    )
    assert len(orjson.dumps(big)) > 300_000
    verify(wire(big), keyring)


_JSON_SCALARS = (
    st.none() | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.integers(min_value=2**53, max_value=2**64) | st.integers(max_value=-(2**53))
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 6600.0, 1e-5, 9.99e-6, 1e15, 1e16, 1e21, 1e-7, 250.1, 5e-324])
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
    | st.sampled_from(["\ue000", "\U0001f600", "a\u0007\"\\/", "\x7f", "张三"])
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=4)
        | st.sampled_from(["\ue000", "\U0001f600", "z", "\uffff", "resourceType"]),
        inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400)
@given(_JSON_VALUES)
def test_canonical_json_is_rfc8785_for_any_json_value(value: Any) -> None:
    """The fast path (orjson) and RFC 8785 itself agree on every value: the same bytes,
    or both refuse it."""
    import rfc8785

    try:
        expected: bytes | None = bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        expected = None
    if expected is None:
        with pytest.raises(SignatureError):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"text": "6600.0 and 1e16, -0.0: written in strings, not numbers", "n": 250.1},
        {"a": [1, 2.5, {"b": -3, "c": 0.00001}], "d": True, "e": False},
        {"quoted": 'he said "6600.0"', "n": 6600.0},
        {"null-text": "null", "n": 1.5},
        {"amount": 6600.0},
        {"tiny": 1e-7, "huge": 1e16, "zero": -0.0},
        {"big": 2**53, "ok": 2**53 - 1, "neg": -(2**53) + 1},
        {"\ue000": 1, "\U0001f600": 2, "z": "张三"},
        {"value": "\ue000 in a value only"},
        {"line": "one\ntwo", "n": 1.25},
        [{"}": "{", "[": "]", ":": ","}, 3.75],
        "just a string",
        12,
    ],
)
def test_canonical_json_read_from_orjson_output_matches_rfc8785(value: Any) -> None:
    """Numbers, literals and member names are judged from orjson's bytes: text that looks
    like a number or a bracket inside a string changes nothing, and every value outside
    the shared ground (integral doubles, exponents, big integers, late member names)
    still comes out as RFC 8785 writes it, or is refused as it refuses it."""
    import rfc8785

    try:
        expected: bytes | None = bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        expected = None
    if expected is None:
        with pytest.raises(SignatureError):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected


# --- PROTOCOL §5.4 step 15: Bundle.signature holds the table's members and nothing else ---
# No signature covers Bundle.signature (§5.1 signs the bundle without it): whatever else
# it carried would be stored and kept as evidence as if the signer had said it.


def _signed_for_step_15(pki: DevPKI) -> dict[str, Any]:
    return sign_bundle(message(), signer(pki, "hospital-a"), issuer="hospital-a",
                       audience="insurer-b", message_id=MSG, now=NOW)


@pytest.mark.parametrize(("change", "where"), [
    (lambda s: s.update(extension=[{"url": "urn:x", "valueString": "note"}]),
     "Bundle.signature.extension"),
    (lambda s: s.update(onBehalfOf={"display": "someone"}), "Bundle.signature.onBehalfOf"),
    (lambda s: s.update(targetFormat="application/fhir+json"), "Bundle.signature.targetFormat"),
    (lambda s: s.update(id="s1", zz=1), "Bundle.signature.id"),  # the first in code-point order
    (lambda s: s.update(type=[*s["type"], {"system": "urn:x", "code": "y"}]),
     "Bundle.signature.type"),
    (lambda s: s["type"][0].update(display="Verification Signature"), "Bundle.signature.type"),
    (lambda s: s["type"][0].update(code="1.2.840.10065.1.12.1.7"), "Bundle.signature.type"),
    (lambda s: s.pop("type"), "Bundle.signature.type"),
    (lambda s: s.update(when="2026-03-01T00:29:59Z"), "Bundle.signature.when"),
    (lambda s: s.update(when="2026-03-01T08:30:00+08:00"), "Bundle.signature.when"),
    (lambda s: s.pop("when"), "Bundle.signature.when"),
    (lambda s: s["who"].update(display="Hospital A"), "Bundle.signature.who"),
    (lambda s: s["who"]["identifier"].update(period={"start": "2020"}), "Bundle.signature.who"),
    (lambda s: s["who"]["identifier"].update(system="urn:other"), "Bundle.signature.who"),
    (lambda s: s["who"]["identifier"].update(value="insurer-b"), "Bundle.signature.who"),
])
def test_anything_in_the_signature_beyond_the_table_is_refused(
        pki: DevPKI, keyring: KeyRing, change: Any, where: str) -> None:
    bundle = _signed_for_step_15(pki)
    verify(bundle, keyring)  # as signed: it verifies
    change(bundle["signature"])
    with pytest.raises(SignatureError) as err:
        verify(bundle, keyring)
    assert err.value.location == where
    # Evidence checked long after the fact is held to the same rule.
    with pytest.raises(SignatureError):
        verify(bundle, keyring, check_time=False, now=NOW + timedelta(days=400))


def test_the_author_type_and_the_table_members_in_any_order_verify(
        pki: DevPKI, keyring: KeyRing) -> None:
    bundle = sign_bundle(message(), signer(pki, "hospital-a"), issuer="hospital-a",
                         audience="insurer-b", message_id=MSG, now=NOW, role="author")
    bundle["signature"] = dict(reversed(list(bundle["signature"].items())))
    assert verify(bundle, keyring).issuer == "hospital-a"


def test_a_signing_time_before_the_year_1000_is_judged_at_step_17(
        pki: DevPKI, keyring: KeyRing) -> None:
    # Signature.when has a four-digit year (0068-...), so such a signature passes step 15
    # and is refused where PROTOCOL §5.4 says: no certificate was valid then (#kid).
    early = datetime(68, 9, 3, 13, 20, tzinfo=UTC)
    bundle = sign_bundle(message(), signer(pki, "hospital-a"), issuer="hospital-a",
                         audience="insurer-b", message_id=MSG, now=early)
    assert bundle["signature"]["when"] == "0068-09-03T13:20:00Z"
    with pytest.raises(SignatureError) as err:
        verify(bundle, keyring, check_time=False)
    assert err.value.location == "Bundle.signature.data#kid"
