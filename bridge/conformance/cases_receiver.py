"""Cases run against a receiver: the kit plays a sender (a hospital).

Each case sends a handful of requests and judges the answers by PROTOCOL.md; the
resource-exhaustion cases send one oversized or slow request each and measure how the
target ends it (they never flood). Case ids are stable; reports and CI jobs name them.
"""

from __future__ import annotations

import base64
import copy
import functools
import gzip
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import rfc8785

from bridge.conformance import protocol as P
from bridge.conformance.certs import new_ca
from bridge.conformance.envelope import JWSOptions, SigningKey, sign_message, v1_canonical
from bridge.conformance.kit import CaseFailed, Context, Skip, _response_text, case, in_threads
from bridge.conformance.peer import (
    Answer,
    ConnectionClosed,
    PeerConnection,
    TLSRefused,
)

_MH = "Bundle.entry[0].resource"
_SIG = "Bundle.signature.data"


def _header(message: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = message["entry"][0]["resource"]
    return resource


def _resource(message: dict[str, Any], resource_type: str) -> dict[str, Any]:
    for entry in message["entry"]:
        if entry.get("resource", {}).get("resourceType") == resource_type:
            found: dict[str, Any] = entry["resource"]
            return found
    raise CaseFailed(f"the claim content has no {resource_type}")


def _metadata_status(ctx: Context, label: str, **tls: Any) -> str:
    """Connect and GET metadata: ``refused`` (handshake or first read), or the status."""
    conn = ctx.handshake(label, **tls)
    if isinstance(conn, str):
        return "refused"
    with conn:
        try:
            response = ctx.request(label, conn, "GET", P.METADATA, headers={"Accept": P.FHIR_JSON})
        except (TLSRefused, ConnectionClosed):
            return "refused"  # TLS 1.3 reports a refused client certificate on first read
        return str(response.status)


# --- TLS -------------------------------------------------------------------------------


@case("tls-versions", "TLS 1.2 and TLS 1.3 are both served", family="tls",
      requirements=["P-TLS-1"])
def tls_versions(ctx: Context) -> None:
    """Connects once with TLS 1.2 only and once with TLS 1.3 only; each must complete
    the handshake and answer GET metadata."""
    for version in ("1.2", "1.3"):
        status = _metadata_status(ctx, f"TLS {version}", min_version=version, max_version=version)
        ctx.expect(status == "200", f"TLS {version}: metadata answered {status}, expected 200")


@case("tls-old-versions-refused", "TLS 1.1 and earlier are refused", family="tls",
      requirements=["P-TLS-1"])
def tls_old_versions(ctx: Context) -> None:
    """Offers TLS 1.0-1.1 only (with the client's security level lowered so that it can);
    the handshake must fail."""
    status = _metadata_status(
        ctx, "TLS 1.1", min_version="1.1", max_version="1.1",
        ciphers="DEFAULT:@SECLEVEL=0",
    )
    ctx.expect(status == "refused", f"a TLS 1.1 client got {status}")


@case("tls12-suites", "TLS 1.2 suites outside ECDHE with AEAD are refused", family="tls",
      requirements=["P-TLS-3"])
def tls12_suites(ctx: Context) -> None:
    """Offers, one at a time, suites without forward secrecy or without AEAD (RSA key
    transport, CBC); each must be refused. An allowed suite must be accepted."""
    for suite in ("AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA256",
                  "DHE-RSA-AES128-GCM-SHA256"):
        status = _metadata_status(
            ctx, f"TLS 1.2 {suite}", min_version="1.2", max_version="1.2",
            ciphers=f"{suite}:@SECLEVEL=0",
        )
        ctx.expect(status == "refused", f"TLS 1.2 suite {suite} was accepted ({status})")
    status = _metadata_status(ctx, "TLS 1.2 allowed suites", min_version="1.2",
                              max_version="1.2", ciphers=":".join(P.TLS12_SUITES))
    ctx.expect(status == "200", f"the suites of P-TLS-3 got {status}")


@case("tls13-suites", "TLS 1.3 suites outside the three AEAD ones are refused",
      family="tls", requirements=["P-TLS-4"])
def tls13_suites(ctx: Context) -> None:
    """Offers TLS_AES_128_CCM_SHA256 and TLS_AES_128_CCM_8_SHA256 only; the handshake must
    fail."""
    status = _metadata_status(
        ctx, "TLS 1.3 CCM", min_version="1.3", max_version="1.3",
        tls13_suites="TLS_AES_128_CCM_SHA256:TLS_AES_128_CCM_8_SHA256",
    )
    ctx.expect(status == "refused", f"TLS 1.3 CCM suites were accepted ({status})")


_GROUP_NAMES = {
    "X25519": {"x25519", "X25519"},
    "P-256": {"prime256v1", "secp256r1", "P-256"},
    "P-384": {"secp384r1", "P-384"},
}


@case("tls-groups-refused", "Key-exchange groups outside X25519, P-256, P-384 are refused",
      family="tls", requirements=["P-TLS-5"])
def tls_groups_refused(ctx: Context) -> None:
    """Offers only P-521, only X448, only FFDHE (TLS 1.3) and only P-521 (TLS 1.2); every
    handshake must fail."""
    for version, groups in (("1.3", "P-521"), ("1.3", "X448"), ("1.3", "ffdhe2048:ffdhe3072"),
                            ("1.2", "P-521")):
        status = _metadata_status(ctx, f"TLS {version} groups {groups}", min_version=version,
                                  max_version=version, groups=groups)
        ctx.expect(status == "refused", f"TLS {version} with only {groups} got {status}")


@case("tls-groups-chosen", "An allowed group is chosen when others are offered first",
      family="tls", requirements=["P-TLS-5"])
def tls_groups_chosen(ctx: Context) -> None:
    """Offers P-521 and X448 before an allowed group; the allowed one must be negotiated."""
    for version, offered, expected in (("1.3", "P-521:X448:X25519", "X25519"),
                                       ("1.2", "P-521:P-256", "P-256")):
        conn = ctx.handshake(f"TLS {version} groups {offered}", min_version=version,
                             max_version=version, groups=offered)
        ctx.expect(not isinstance(conn, str), f"TLS {version} offering {offered}: {conn}")
        assert not isinstance(conn, str)
        with conn:
            ctx.expect(conn.group in _GROUP_NAMES[expected],
                       f"TLS {version} offering {offered} negotiated {conn.group}")


def _resumed(ctx: Context, version: str) -> bool:
    conn = ctx.handshake(f"TLS {version} first", min_version=version, max_version=version)
    ctx.expect(not isinstance(conn, str), f"TLS {version} handshake failed: {conn}")
    assert not isinstance(conn, str)
    with conn:
        ctx.request("metadata", conn, "GET", P.METADATA)  # TLS 1.3 tickets arrive after this
        session = conn.session
    again = ctx.peer(min_version=version, max_version=version).connect(session=session)
    with again:
        ctx.note(f"TLS {version} offering the stored session", "handshake with session",
                 f"resumed={again.session_reused}", time.monotonic())
        return again.session_reused


@case("tls-no-resumption", "No TLS session is resumed (1.2 session id or ticket, 1.3 ticket)",
      family="tls", requirements=["P-TLS-6"])
def tls_no_resumption(ctx: Context) -> None:
    """Completes a handshake and a request, then offers the stored session on a new
    connection, in TLS 1.2 and in TLS 1.3; the target must run a full handshake."""
    for version in ("1.2", "1.3"):
        ctx.expect(not _resumed(ctx, version), f"the target resumed a TLS {version} session")


@case("tls-renegotiation", "TLS 1.2 renegotiation is refused", family="tls",
      requirements=["P-TLS-10"])
def tls_renegotiation(ctx: Context) -> None:
    """Completes a TLS 1.2 handshake, then asks for a renegotiation; the target must not
    complete one. (TLS compression cannot be offered by current OpenSSL clients, so that
    half of P-TLS-10 is not probed.)"""
    conn = ctx.handshake("TLS 1.2", min_version="1.2", max_version="1.2")
    ctx.expect(not isinstance(conn, str), f"TLS 1.2 handshake failed: {conn}")
    assert not isinstance(conn, str)
    started = time.monotonic()
    with conn:
        renegotiated = conn.renegotiate()
    ctx.note("renegotiation", "ClientHello on the established connection",
             f"renegotiated={renegotiated}", started)
    ctx.expect(not renegotiated, "the target completed a TLS renegotiation")


@case("tls-no-certificate", "A client without a certificate is refused", family="tls",
      requirements=["P-TLS-2"])
def tls_no_certificate(ctx: Context) -> None:
    """Connects without a client certificate (TLS 1.2 and 1.3); nothing must be served."""
    for version in ("1.2", "1.3"):
        status = _metadata_status(ctx, f"no certificate, TLS {version}", cert=None, key=None,
                                  min_version=version, max_version=version)
        ctx.expect(status == "refused", f"TLS {version} without a certificate got {status}")


@case("tls-unknown-ca", "A certificate from an unknown CA is refused", family="tls",
      requirements=["P-TLS-2"])
def tls_unknown_ca(ctx: Context) -> None:
    """Presents a certificate naming the kit's partner id, issued by a CA the kit made."""
    cert, key, _ = ctx.mint("stranger", ctx.partner_id, own_ca=True)
    status = _metadata_status(ctx, "stranger CA", cert=cert, key=key)
    ctx.expect(status == "refused", f"a certificate of an unknown CA got {status}")


@case("tls-expired", "An expired certificate is refused", family="tls",
      requirements=["P-TLS-2"])
def tls_expired(ctx: Context) -> None:
    """Presents a certificate of the kit's partner from the target's CA that expired an
    hour ago (needs --ca-key)."""
    now = datetime.now(UTC)
    cert, key, _ = ctx.mint("expired", ctx.partner_id, not_before=now - timedelta(days=2),
                            not_after=now - timedelta(hours=1))
    status = _metadata_status(ctx, "expired", cert=cert, key=key)
    ctx.expect(status == "refused", f"an expired certificate got {status}")


@case("tls-not-yet-valid", "A certificate not yet valid is refused", family="tls",
      requirements=["P-TLS-2"])
def tls_not_yet_valid(ctx: Context) -> None:
    """Presents a certificate valid from tomorrow (needs --ca-key)."""
    now = datetime.now(UTC)
    cert, key, _ = ctx.mint("early", ctx.partner_id, not_before=now + timedelta(days=1),
                            not_after=now + timedelta(days=3))
    status = _metadata_status(ctx, "not yet valid", cert=cert, key=key)
    ctx.expect(status == "refused", f"a certificate not yet valid got {status}")


@case("tls-revoked", "A revoked certificate is refused", family="tls",
      requirements=["P-TLS-2"], required=False)
def tls_revoked(ctx: Context) -> None:
    """Presents a certificate of the kit's partner that the target's CRL lists
    (--revoked-cert and --revoked-key; only for a target configured with a CRL)."""
    if ctx.config.revoked_cert is None or ctx.config.revoked_key is None:
        raise Skip("needs --revoked-cert and --revoked-key (a certificate the target's CRL "
                   "lists)")
    for version in ("1.2", "1.3"):
        status = _metadata_status(ctx, f"revoked, TLS {version}", cert=ctx.config.revoked_cert,
                                  key=ctx.config.revoked_key, min_version=version,
                                  max_version=version)
        ctx.expect(status == "refused", f"a revoked certificate got {status} (TLS {version})")


@case("tls-unregistered-partner", "A trusted certificate of no registered partner gets 401",
      family="identity", requirements=["P-TLS-8"])
def tls_unregistered(ctx: Context) -> None:
    """Presents certificates of the target's CA naming an unregistered partner, naming
    none, and naming the kit's own partner id beside another (needs --ca-key): a
    certificate naming two partners names none. Metadata and $process-message must
    answer 401 unknown-partner and close the connection."""
    other = f"kit-other-{uuid.uuid4().hex[:8]}"
    for name, partner, also in (
            ("unregistered", f"kit-unregistered-{uuid.uuid4().hex[:8]}", ()),
            ("no-partner", None, ()),
            ("two-partners", ctx.partner_id, (other,))):
        cert, key, _ = ctx.mint(name, partner, also=also)
        for route in ("metadata", "$process-message"):
            conn = ctx.handshake(f"{name}: handshake", cert=cert, key=key)
            ctx.expect(not isinstance(conn, str), f"{name}: handshake failed ({conn}); the "
                       "certificate is valid and from the target's CA")
            assert not isinstance(conn, str)
            with conn:
                if route == "metadata":
                    response = ctx.request(f"{name}: metadata", conn, "GET", P.METADATA)
                else:
                    response = ctx.request(
                        f"{name}: message", conn, "POST", P.PROCESS_MESSAGE,
                        json.dumps(ctx.signed()).encode(), {"Content-Type": P.FHIR_JSON},
                    )
            ctx.expect_refusal(response, 401, "unknown-partner")


def _expiring_connection(ctx: Context) -> dict[str, Any]:
    """A TLS 1.2 connection whose certificate expires a few seconds after it opened,
    and the session it started; shared by the two cases that use it."""
    if "expiring" in ctx.shared:
        found: dict[str, Any] = ctx.shared["expiring"]
        return found
    now = datetime.now(UTC)
    expires = (now + timedelta(seconds=3)).replace(microsecond=0)  # X.509 keeps seconds
    cert, key, _ = ctx.mint("short-lived", ctx.partner_id, not_before=now - timedelta(minutes=5),
                            not_after=expires)
    options = {"cert": cert, "key": key, "min_version": "1.2", "max_version": "1.2"}
    conn = ctx.handshake("short-lived certificate", **options)
    ctx.expect(not isinstance(conn, str), f"short-lived certificate refused at once: {conn}")
    assert not isinstance(conn, str)
    response = ctx.request("while valid", conn, "GET", P.METADATA)
    ctx.expect(response.status == 200, f"metadata while the certificate is valid: "
               f"{response.status}")
    found = {"conn": conn, "session": conn.session, "options": options, "expires": expires}
    ctx.shared["expiring"] = found
    # Keep the connection busy while the certificate is valid (a target may close idle
    # connections after a short header timeout), then let it expire.
    while (expires - datetime.now(UTC)).total_seconds() > 0.6:
        time.sleep(0.4)
        response = ctx.request("while valid", conn, "GET", P.METADATA)
        ctx.expect(response.status == 200, f"metadata while valid: {response.status}")
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.05)
    return found


@case("tls-certificate-per-request", "A connection outliving its certificate is refused",
      family="tls", requirements=["P-TLS-7"])
def tls_per_request(ctx: Context) -> None:
    """Opens a connection with a certificate valid for three more seconds, waits until it
    expired, then sends a claim on the open connection: 401 certificate-rejected,
    connection closed (needs --ca-key)."""
    shared = _expiring_connection(ctx)
    conn: PeerConnection = shared["conn"]
    with conn:
        answer = ctx.post("after expiry, same connection", ctx.signed(), conn=conn)
    ctx.expect_refusal(answer, 401, "certificate-rejected")
    ctx.expect(answer.response.header("Connection") == "close",
               "the connection was not closed after certificate-rejected")


@case("tls-resumption-after-expiry", "A session resumed after the certificate expired "
      "delivers nothing", family="tls", requirements=["P-TLS-6", "P-TLS-7"])
def tls_resume_after_expiry(ctx: Context) -> None:
    """Offers the session of a certificate that has since expired; the target must either
    run a full handshake (and refuse) or refuse the request (needs --ca-key)."""
    shared = _expiring_connection(ctx)
    peer = ctx.peer(**shared["options"])
    message = ctx.signed()
    try:
        with peer.connect(session=shared["session"]) as again:
            ctx.note("resume", "handshake offering the stored session",
                     f"resumed={again.session_reused}", time.monotonic())
            answer = ctx.post("claim on the resumed session", message, conn=again)
    except (TLSRefused, ConnectionClosed, CaseFailed) as exc:
        ctx.note("resume", "handshake offering the stored session", f"refused: {exc}",
                 time.monotonic())
        return
    ctx.expect(answer.status != 200,
               "a claim was accepted over a session resumed after its certificate expired")
    ctx.expect_refusal(answer, 401, "certificate-rejected")


@case("tls-handshake-timeout", "A handshake not completed in time is cut off", family="tls",
      requirements=["P-TLS-12"], required=False)
def tls_handshake_timeout(ctx: Context) -> None:
    """Opens a TCP connection and sends nothing; the target should close it within its
    handshake timeout (--handshake-timeout, 10 s by default) plus a margin."""
    limit = ctx.config.handshake_timeout + 3.0
    started = time.monotonic()
    with socket.create_connection((ctx.host, ctx.port), timeout=limit) as sock:
        sock.settimeout(limit)
        try:
            data = sock.recv(1)
            closed = data == b""
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
    elapsed = time.monotonic() - started
    ctx.measures["closed_after_s"] = round(elapsed, 2)
    ctx.note("silent TCP connection", "TCP connect, then nothing",
             f"closed={closed} after {elapsed:.2f} s", started)
    ctx.expect(closed, f"an idle connection before the handshake was kept {limit:.0f} s")


# --- identity binding ------------------------------------------------------------------------


@case("id-sender-mismatch", "MessageHeader.sender must be the TLS peer", family="identity",
      requirements=["P-MSG-6"])
def id_sender(ctx: Context) -> None:
    """Signs correctly as itself a claim whose MessageHeader.sender names another party:
    one the target does not know, and the target itself (a party it knows); each 403
    sender-mismatch (a target that checks only that the sender is known fails)."""
    for label, other in (("an unknown party", "kit-someone-else"),
                         ("the target itself", ctx.receiver_id)):
        message = ctx.claim()
        _header(message)["sender"]["identifier"]["value"] = other
        answer = ctx.post(f"sender names {label}", ctx.signed(message))
        ctx.expect_refusal(answer, 403, "sender-mismatch", f"{_MH}.sender")


@case("id-wrong-receiver", "MessageHeader.destination[0].receiver must be the target",
      family="identity", requirements=["P-MSG-7"])
def id_receiver(ctx: Context) -> None:
    """A claim addressed to a third party the target does not know, and one addressed to
    the kit itself (a partner the target knows); each 403 wrong-receiver."""
    for label, other in (("a third party", "kit-third-party"),
                         ("the sender itself", ctx.partner_id)):
        message = ctx.claim()
        _header(message)["destination"][0]["receiver"]["identifier"]["value"] = other
        answer = ctx.post(f"addressed to {label}", ctx.signed(message))
        ctx.expect_refusal(answer, 403, "wrong-receiver", f"{_MH}.destination[0].receiver")


@case("id-event", "Only claim-submit is accepted at $process-message", family="identity",
      requirements=["P-MSG-5"])
def id_event(ctx: Context) -> None:
    """Signed messages with the events receipt and claim-cancel; 400 unsupported-event."""
    for event in (P.RECEIPT_EVENT, "claim-cancel"):
        answer = ctx.post(f"event {event}", ctx.signed(ctx.claim(event=event)))
        ctx.expect_refusal(answer, 400, "unsupported-event", f"{_MH}.eventCoding.code")


@case("id-message-identity", "The message identity is a canonical urn:uuid", family="identity",
      requirements=["P-MSG-2", "P-MSG-4"])
def id_identity(ctx: Context) -> None:
    """Signed claims whose identity is not urn:uuid and a canonical RFC 4122 UUID
    (not a uuid, urn:oid, upper case, with a space, version 0); each 400 parse-error at
    Bundle.identifier.value, never 5xx."""
    u = str(uuid.uuid4())
    for identity in (
        f"urn:uuid:not-a-uuid-{u[:8]}",
        f"urn:oid:1.2.156.{uuid.uuid4().int % 10**9}",
        f"urn:uuid:{u.upper()}",
        f"urn:uuid:{u[:8]} {u[9:]}",
        f"urn:uuid:{u[:14]}0{u[15:]}",
    ):
        answer = ctx.post(f"identity {identity}", ctx.signed(ctx.claim(identity=identity)))
        ctx.expect_refusal(answer, 400, "parse-error", "Bundle.identifier.value")


@case("id-signer-is-peer", "The signer must be the TLS peer", family="identity",
      requirements=["P-SIG-5"])
def id_signer(ctx: Context) -> None:
    """A claim signed with the kit's key but iss naming another partner, and one whose
    Signature.who differs from iss; both 403 signature-invalid."""
    answer = ctx.post("iss names another partner", ctx.signed(iss="kit-someone-else"))
    ctx.expect_refusal(answer, 403, "signature-invalid")
    answer = ctx.post("who differs from iss", ctx.signed(who="kit-someone-else"))
    ctx.expect_refusal(answer, 403, "signature-invalid", "Bundle.signature.who")


@case("audit-receipt-checkpoint", "Receipts prove their audit entry under a signed checkpoint",
      family="receipts", requirements=["P-RCP-4", "P-AUD-5", "P-AUD-6"], required=False)
def audit_receipt_checkpoint(ctx: Context) -> None:
    """Sends two claims; each receipt carries the target's signed checkpoint of its log
    ending at the receipt's audit entry, and an inclusion proof of that entry's leaf
    (SHA-256(0x00 || audit-hash)) under it (RFC 9162); the second checkpoint is larger
    (needs --receiver-signing-cert)."""
    from bridge.conformance import auditlog
    from bridge.conformance.envelope import PeerCheckFailed

    if ctx.receiver_signing is None:
        raise Skip("needs --receiver-signing-cert to check the checkpoint")
    trees = []
    for label in ("first claim", "second claim"):
        answer = ctx.post(label, ctx.signed())
        ctx.expect_accepted(answer)
        try:
            trees.append(auditlog.receipt_tree(answer.response.json(), ctx.receiver_id,
                                               ctx.receiver_signing))
        except (PeerCheckFailed, KeyError, IndexError, ValueError, TypeError) as exc:
            raise CaseFailed(f"{label}: {exc}") from None
    ctx.expect(trees[1].size > trees[0].size, "the later receipt's checkpoint is not larger")


# --- signatures ---------------------------------------------------------------------------


@case("sig-valid-claim", "A correct claim is accepted with a signed receipt", family="receipts",
      requirements=["P-MSG-1", "P-SIG-1", "P-SIG-2", "P-SIG-3", "P-RCP-1", "P-RCP-2", "P-RCP-5",
                    "P-RCV-1"])
def sig_valid(ctx: Context) -> None:
    """Sends the sample claim (RFC 8785 signed payload, the six §5.2 header members); the
    target answers 200 with a receipt whose identity, parties, request digest and
    signature verify, and a second claim's receipt names a later audit entry (needs
    --receiver-signing-cert for the receipt)."""
    if ctx.receiver_signing is None:
        raise Skip("needs --receiver-signing-cert to check the receipt")
    answer = ctx.post("valid claim", ctx.signed())
    ctx.expect_accepted(answer)
    later = ctx.post("another claim", ctx.signed())
    ctx.expect_accepted(later)
    assert answer.receipt is not None and later.receipt is not None
    ctx.expect(later.receipt.audit_seq > answer.receipt.audit_seq,
               "a later receipt names an earlier audit entry (audit-seq must grow)")
    ctx.expect(later.receipt.audit_hash != answer.receipt.audit_hash,
               "two receipts name the same audit hash")


@case("sig-version-1-form", "A signature over the version 1 form verifies", family="signatures",
      requirements=["P-SIG-7"])
def sig_v1(ctx: Context) -> None:
    """Signs the sample claim over appendix A's form (which differs from RFC 8785 for
    its integral decimals); the target must accept it."""
    answer = ctx.post("version 1 signed form", ctx.signed(canonical=v1_canonical))
    ctx.expect_accepted(answer)


@case("sig-tampered", "A claim changed after signing is refused", family="signatures",
      requirements=["P-SIG-6", "P-SIG-5"])
def sig_tampered(ctx: Context) -> None:
    """Changes the claim total after signing, and sends a claim without a signature; both
    403 signature-invalid, nothing stored (the identity stays free: the untampered claim
    under it is accepted afterwards)."""
    signed = ctx.signed()
    tampered = copy.deepcopy(signed)
    _resource(tampered, "Claim")["total"]["value"] = 99999.5
    ctx.expect_refusal(ctx.post("tampered", tampered), 403, "signature-invalid", _SIG)
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    ctx.expect_refusal(ctx.post("no signature", unsigned), 403, "signature-invalid",
                       "Bundle.signature")
    ctx.expect_accepted(ctx.post("the original after the refusals", signed))


@case("sig-algorithm-confusion", "alg must be ES256/Ed25519 and that of the key",
      family="signatures", requirements=["P-SIG-5"])
def sig_alg(ctx: Context) -> None:
    """alg none, HS256, and the other allowed algorithm than the key's; each 403
    signature-invalid at #alg."""
    other = "Ed25519" if ctx.signing.algorithm == "ES256" else "ES256"
    for alg in ("none", "HS256", other):
        message = ctx.signed(options=JWSOptions(overrides={"alg": alg}))
        answer = ctx.post(f"alg {alg}", message)
        ctx.expect_refusal(answer, 403, "signature-invalid", f"{_SIG}#alg")


@case("sig-unknown-key", "A signature by a key the target does not hold is refused",
      family="signatures", requirements=["P-SIG-5"])
def sig_unknown(ctx: Context) -> None:
    """Signs with a fresh key and a self-signed certificate naming the kit's partner;
    403 signature-invalid at #kid."""
    cert, key = new_ca(f"kit stray signing key {uuid.uuid4().hex[:6]}")
    stray = SigningKey(key, cert)
    signed = sign_message(ctx.claim(), stray, iss=ctx.partner_id, aud=ctx.receiver_id)
    ctx.expect_refusal(ctx.post("unknown kid", signed), 403, "signature-invalid", f"{_SIG}#kid")


@case("sig-extra-header", "JWS header members beyond §5.2 (crit/b64, typ, x5c) are refused",
      family="signatures", requirements=["P-SIG-4", "P-SIG-3"])
def sig_extra(ctx: Context) -> None:
    """An RFC 7797 JWS (crit [b64], b64 false, payload unencoded), and headers with typ,
    x5c or jku; each 403 signature-invalid naming the first such member."""
    rfc7797 = JWSOptions(extra_headers={"crit": ["b64"], "b64": False}, b64=False)
    ctx.expect_refusal(ctx.post("RFC 7797 crit/b64", ctx.signed(options=rfc7797)), 403,
                       "signature-invalid", f"{_SIG}#b64")
    for name, value in (("typ", "JOSE"), ("x5c", ["MIIB"]), ("jku", "https://example.org/k")):
        answer = ctx.post(f"header {name}",
                          ctx.signed(options=JWSOptions(extra_headers={name: value})))
        ctx.expect_refusal(answer, 403, "signature-invalid", f"{_SIG}#{name}")
    answer = ctx.post("iat as a string",
                      ctx.signed(options=JWSOptions(overrides={"iat": "1700000000"})))
    ctx.expect_refusal(answer, 403, "signature-invalid", f"{_SIG}#iat")


@case("sig-unsigned-content", "Bundle.signature holding more than §5's table is refused",
      family="signatures", requirements=["P-SIG-12", "P-SIG-5"])
def sig_unsigned(ctx: Context) -> None:
    """No signature covers Bundle.signature, so the kit puts in it, after signing, an
    extension, an onBehalfOf, a who with a display, a when an hour before iat and a type
    coding with a display; each 403 signature-invalid at the member (nothing stored: the
    claim as signed is accepted afterwards)."""
    signed = ctx.signed()
    changes: list[tuple[str, str, Any]] = [
        ("an extension", "extension", lambda s: s.update(
            extension=[{"url": "urn:kit:note", "valueString": "not signed"}])),
        ("onBehalfOf", "onBehalfOf", lambda s: s.update(onBehalfOf={"display": "kit"})),
        ("who with a display", "who", lambda s: s["who"].update(display="kit")),
        ("when an hour before iat", "when", lambda s: s.update(when=_earlier(s["when"]))),
        ("type with a display", "type", lambda s: s["type"][0].update(display="kit")),
    ]
    for label, member, change in changes:
        forged = copy.deepcopy(signed)
        change(forged["signature"])
        ctx.expect_refusal(ctx.post(f"signature with {label}", forged), 403,
                           "signature-invalid", f"Bundle.signature.{member}")
    ctx.expect_accepted(ctx.post("the claim as signed, after the refusals", signed))


def _earlier(when: str) -> str:
    instant = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ") - timedelta(hours=1)
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


@case("sig-replay-window", "iat outside ±300 s is replay-rejected", family="signatures",
      requirements=["P-SIG-8"])
def sig_replay(ctx: Context) -> None:
    """iat up to an hour old (within the signing certificate's validity), ten minutes
    ahead, and 15 s beyond either edge of the ±300 s window: 403 replay-rejected at #iat;
    two minutes old, and 15 s inside either edge: accepted (a window wider or narrower
    than the protocol's fails)."""
    now = int(time.time())
    # An old iat must fall in the signing certificate's validity, or step 17 (a
    # certificate not valid then: signature-invalid) rightly comes first.
    born = int(ctx.signing.certificate.not_valid_before_utc.timestamp())
    old = max(now - 3600, born + 1)
    window, margin = P.REPLAY_WINDOW_SECONDS, 15
    if old > now - window - margin - 5:
        raise Skip("the kit's signing certificate is younger than the replay window")
    outside = (("long past", old), ("ten minutes ahead", now + 600),
               (f"{window + margin} s old", now - window - margin),
               (f"{window + margin} s ahead", now + window + margin))
    for label, iat in outside:
        answer = ctx.post(f"iat {label}", ctx.signed(iat=iat))
        ctx.expect_refusal(answer, 403, "replay-rejected", f"{_SIG}#iat")
    inside = (("two minutes old", now - 120), (f"{window - margin} s old", now - window + margin),
              (f"{window - margin} s ahead", now + window - margin))
    for label, iat in inside:
        ctx.expect_accepted(ctx.post(f"iat {label}", ctx.signed(iat=iat)))


@case("sig-audience", "aud must be the target; msgid the message identity",
      family="signatures", requirements=["P-SIG-9", "P-SIG-5"])
def sig_audience(ctx: Context) -> None:
    """aud naming another partner: 403 replay-rejected at #aud; msgid of another message:
    403 signature-invalid at Bundle.identifier.value."""
    answer = ctx.post("aud another partner", ctx.signed(aud="kit-someone-else"))
    ctx.expect_refusal(answer, 403, "replay-rejected", f"{_SIG}#aud")
    answer = ctx.post("msgid another message", ctx.signed(msgid=f"urn:uuid:{uuid.uuid4()}"))
    ctx.expect_refusal(answer, 403, "signature-invalid", "Bundle.identifier.value")


# --- idempotency --------------------------------------------------------------------------


@case("idem-same-content", "The same message again gets the original receipt",
      family="idempotency", requirements=["P-RCV-4"])
def idem_same(ctx: Context) -> None:
    """Sends one claim twice, the second time re-signed (a new iat, same content); both
    answers are 200 and the second carries the first receipt byte for byte. Then the
    same content again unsigned, with its signature damaged, and signed 50 minutes ago:
    a held identity is answered from the inbox only after the signature and its time
    are checked (403 signature-invalid, signature-invalid, replay-rejected)."""
    message = ctx.claim()
    signed = ctx.signed(message)
    first = ctx.post("first", signed)
    ctx.expect_accepted(first)
    again = ctx.post("again, re-signed", ctx.signed(message, iat=int(time.time()) - 5))
    ctx.expect_accepted(again)
    ctx.expect(again.response.body == first.response.body,
               "the repeated message got a receipt other than the original")
    ctx.expect_refusal(ctx.post("again, unsigned", message), 403, "signature-invalid",
                       "Bundle.signature")
    damaged = copy.deepcopy(signed)
    compact = base64.b64decode(damaged["signature"]["data"]).decode("ascii")
    head, _, sig = compact.rpartition(".")
    sig = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BA")
    damaged["signature"]["data"] = base64.b64encode(f"{head}.{sig}".encode()).decode()
    ctx.expect_refusal(ctx.post("again, signature damaged", damaged), 403,
                       "signature-invalid")
    now = int(time.time())
    born = int(ctx.signing.certificate.not_valid_before_utc.timestamp())
    stale = max(now - 3000, born + 1)
    if stale < now - P.REPLAY_WINDOW_SECONDS - 30:
        ctx.expect_refusal(ctx.post("again, signed long ago", ctx.signed(message, iat=stale)),
                           403, "replay-rejected", f"{_SIG}#iat")


@case("idem-different-content", "The same identity with other content gets 422",
      family="idempotency", requirements=["P-RCV-5"])
def idem_conflict(ctx: Context) -> None:
    """Sends a claim, then another claim under the same identity with a different total;
    422 message-id-conflict."""
    message = ctx.claim()
    ctx.expect_accepted(ctx.post("first", ctx.signed(message)))
    changed = copy.deepcopy(message)
    _resource(changed, "Claim")["total"]["value"] = 1234.5
    ctx.expect_refusal(ctx.post("same identity, other content", ctx.signed(changed)), 422,
                       "message-id-conflict")


@case("idem-concurrent", "Concurrent copies: one claim, 409 only after the signature",
      family="idempotency", requirements=["P-RCV-3", "P-RCV-4"])
def idem_concurrent(ctx: Context) -> None:
    """Opens 16 connections, then sends at once 10 copies of one signed claim and 6 forged
    copies (changed after signing) of it. Forged copies must get 403 signature-invalid,
    never 409; valid copies 200 (one receipt) or 409 message-in-progress."""
    signed = ctx.signed()
    forged = copy.deepcopy(signed)
    _resource(forged, "Claim")["total"]["value"] = 99999.5
    bodies = [signed] * 10 + [forged] * 6
    peer = ctx.peer()
    connections = [peer.connect() for _ in bodies]
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> Answer:
        barrier.wait()
        return peer.post_message(connections[i], bodies[i])

    try:
        answers = in_threads([functools.partial(send, i) for i in range(len(bodies))])
    finally:
        for conn in connections:
            conn.close()
    seen = [(a.status, a.code) if isinstance(a, Answer) else (0, type(a).__name__)
            for a in answers]
    ctx.note("16 concurrent posts", "10 valid copies, 6 forged copies",
             "answers: " + ", ".join(f"{s} {c or ''}".strip() for s, c in seen),
             time.monotonic())
    valid, bad = seen[:10], seen[10:]
    ctx.expect(all(s == (403, "signature-invalid") for s in bad),
               f"forged copies got {sorted(set(bad))}; expected only 403 signature-invalid "
               "(409 before the signature tells a forger the message is in flight)")
    ctx.expect(all(s[0] in (200, 409) for s in valid), f"valid copies got {sorted(set(valid))}")
    ctx.expect(all(s == (409, "message-in-progress") for s in valid if s[0] == 409),
               "a 409 without message-in-progress")
    receipts = {a.response.body for a in answers[:10] if isinstance(a, Answer) and a.status == 200}
    ctx.expect(len(receipts) == 1, f"{len(receipts)} different receipts for one message")
    ctx.measures["answers_409"] = sum(1 for s in valid if s[0] == 409)


# --- envelope and I-JSON -------------------------------------------------------------------


def _envelope_steps() -> list[tuple[str, Callable[[dict[str, Any]], Any], str, str]]:
    def set_path(*path: Any, value: Any) -> Callable[[dict[str, Any]], Any]:
        def change(m: dict[str, Any]) -> Any:
            node: Any = m
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
            return m

        return change

    def two_destinations(m: dict[str, Any]) -> Any:
        header = _header(m)
        header["destination"] = header["destination"] * 2
        return m

    return [
        ("a JSON array", lambda m: [m], "parse-error", "Bundle.resourceType"),
        ("type collection", set_path("type", value="collection"), "parse-error", "Bundle.type"),
        ("identifier.system", set_path("identifier", "system", value="urn:kit:other"),
         "parse-error", "Bundle.identifier.system"),
        ("identifier.value", set_path("identifier", "value", value="kit-1"), "parse-error",
         "Bundle.identifier.value"),
        ("no entries", set_path("entry", value=[]), "parse-error", "Bundle.entry"),
        ("first entry a Patient", set_path("entry", 0, "resource",
                                           value={"resourceType": "Patient"}),
         "parse-error", _MH),
        ("eventCoding.system", set_path("entry", 0, "resource", "eventCoding", "system",
                                        value="urn:kit:event"),
         "parse-error", f"{_MH}.eventCoding"),
        ("event receipt", set_path("entry", 0, "resource", "eventCoding", "code",
                                   value="receipt"),
         "unsupported-event", f"{_MH}.eventCoding.code"),
        ("sender system", set_path("entry", 0, "resource", "sender", "identifier", "system",
                                   value="urn:kit:other"),
         "parse-error", f"{_MH}.sender"),
        ("two destinations", two_destinations, "parse-error", f"{_MH}.destination"),
        ("receiver value empty", set_path("entry", 0, "resource", "destination", 0, "receiver",
                                          "identifier", "value", value=""),
         "parse-error", f"{_MH}.destination[0].receiver"),
    ]


@case("env-checks", "The eleven envelope checks, in order, each 400 naming the element",
      family="envelope", requirements=["P-MSG-4", "P-MSG-5"])
def env_checks(ctx: Context) -> None:
    """Eleven claims, each breaking one envelope rule of §4.3 (the body's type, the
    identity, the entries, the MessageHeader, its event, sender and destination); each
    must be 400 with the code and expression of that step."""
    for label, change, code, expression in _envelope_steps():
        message = change(ctx.claim())
        answer = ctx.post(label, json.dumps(message, ensure_ascii=False).encode())
        ctx.expect_refusal(answer, 400, code, expression)


@case("env-ijson", "Bodies that are not I-JSON get 400 parse-error", family="envelope",
      requirements=["P-MSG-3"])
def env_ijson(ctx: Context) -> None:
    """A body with bytes that are not UTF-8, a repeated member name, arrays 65 deep, an
    integer of 2^53 and a lone surrogate; each 400 parse-error."""
    text = json.dumps(ctx.signed(), ensure_ascii=False)
    bodies = {
        "not UTF-8": text.encode()[:-1] + b"\xff}",
        "member twice": text.replace('"type": "message"', '"type": "message", "type": "message"',
                                     1).encode(),
        "nested 65 deep": ('{"kit":' + "[" * 65 + "]" * 65 + "," + text[1:]).encode(),
        "integer 2^53": ('{"kit":9007199254740992,' + text[1:]).encode(),
        "lone surrogate": ('{"kit":"\\ud800",' + text[1:]).encode(),
    }
    for label, body in bodies.items():
        ctx.expect_refusal(ctx.post(label, body), 400, "parse-error")


@case("http-media-type", "Other media types get 415", family="envelope",
      requirements=["P-HTTP-1"])
def http_media(ctx: Context) -> None:
    """A signed claim sent as text/plain and as application/xml: 415; as application/json:
    accepted."""
    for media in ("text/plain", "application/xml"):
        answer = ctx.post(f"Content-Type {media}", ctx.signed(), headers={"Content-Type": media})
        ctx.expect_refusal(answer, 415, "unsupported-media-type")
    answer = ctx.post("Content-Type application/json", ctx.signed(),
                      headers={"Content-Type": "application/json"})
    ctx.expect_accepted(answer)


# --- content ------------------------------------------------------------------------------


@case("content-invalid-fhir", "A claim that is not valid FHIR R4 gets 422 fhir-invalid",
      family="content", requirements=["P-RCV-1", "P-HTTP-1"])
def content_invalid(ctx: Context) -> None:
    """Signed claims with a birth date off the calendar, an element R4 does not have, and
    an entry whose resource has no resourceType; each 422 fhir-invalid."""
    for label, element, value in (
        ("birthDate 1990-13-45", "birthDate", "1990-13-45"),
        ("element R4 lacks", "kitUnknownElement", True),
    ):
        message = ctx.claim()
        _resource(message, "Patient")[element] = value
        ctx.expect_refusal(ctx.post(label, ctx.signed(message)), 422, "fhir-invalid")
    message = ctx.claim()
    message["entry"][-1]["resource"] = {"reference": "#x"}
    ctx.expect_refusal(ctx.post("an entry whose resource has no type", ctx.signed(message)),
                       422, "fhir-invalid")


@case("content-profile", "Elements outside the link profile get 403 profile-denied",
      family="content", requirements=["P-MSG-8"])
def content_profile(ctx: Context) -> None:
    """Claims whose Patient carries, one at a time, what the commercial-insurance profile
    (GB/T 39725 table 9) does not release: a photo, a contact person, a street address
    line, a medical-record number (an identifier of a system not listed), an e-mail
    address (a telecom of a kind not listed) and an extension of a URL not listed; each
    403 profile-denied (a receiver that checks elements but not the selection of their
    entries by system, kind or URL fails)."""
    probes: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("Patient.photo", lambda p: p.__setitem__(
            "photo", [{"contentType": "image/png", "data": "iVBORw0KGgo="}])),
        ("Patient.contact", lambda p: p.__setitem__(
            "contact", [{"name": {"text": "kit contact"}}])),
        ("Patient.address.line", lambda p: p.setdefault(
            "address", [{"country": "CN"}])[0].__setitem__("line", ["kit street 1"])),
        ("Patient.identifier (medical-record number)", lambda p: p.setdefault(
            "identifier", []).append({"system": "urn:oid:2.16.156.10011.1.13",
                                      "value": "KIT-MRN-0001"})),
        ("Patient.telecom (e-mail)", lambda p: p.setdefault("telecom", []).append(
            {"system": "email", "value": "kit@example.invalid"})),
        ("Patient.extension (URL not listed)", lambda p: p.setdefault(
            "extension", []).append({"url": "urn:kit:not-listed", "valueString": "x"})),
    ]
    for label, change in probes:
        message = ctx.claim()
        change(_resource(message, "Patient"))
        ctx.expect_refusal(ctx.post(label, ctx.signed(message)), 403, "profile-denied")


@case("corr-unknown-prior", "A corrected claim whose replaced claim is unknown is accepted",
      family="content", requirements=["P-CORR-5", "P-CORR-1"])
def corr_unknown_prior(ctx: Context) -> None:
    """A claim whose Claim.related names, as prior, a message identity the target never
    received (the original was lost or is in flight); it must be accepted like any
    claim."""
    message = ctx.claim()
    _resource(message, "Claim")["related"] = [{
        "claim": {"identifier": {"system": P.IDENTIFIER_SYSTEM,
                                 "value": f"urn:uuid:{uuid.uuid4()}"}},
        "relationship": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship",
            "code": "prior", "display": "Prior Claim"}]},
    }]
    ctx.expect_accepted(ctx.post("correction of an unknown claim", ctx.signed(message)))


@case("err-no-5xx", "No request the kit can make is answered 5xx", family="content",
      requirements=["P-RCV-6", "P-ERR-1", "P-ERR-2"])
def err_no_5xx(ctx: Context) -> None:
    """Every element of the sample claim in turn (some 650 claims, one change each)
    given a value of another JSON type, then emptied ("" or null), every other one signed
    after the change; every answer is a 4xx OperationOutcome with an error code that
    echoes no value (each claim is unsigned or not valid FHIR R4: FHIR JSON has no
    empty values and no values of another type)."""
    # Each element twice: once with a value of another JSON type, once emptied (a
    # string "", anything else null), the faults a sender's bug produces.
    def wrong_type(value: Any) -> Any:
        if isinstance(value, bool):
            return "true"
        if isinstance(value, (int, float)):
            return "1"
        if isinstance(value, str):
            return 0
        return [] if isinstance(value, dict) else {}

    def emptied(value: Any) -> Any:
        return "" if isinstance(value, str) else None

    peer = ctx.peer()
    conn = peer.connect()
    failures: list[str] = []
    claim = ctx.claim()
    paths: list[tuple[tuple[Any, ...], Any]] = []
    for path in _paths(claim)[1:]:
        node: Any = claim
        for step in path:
            node = node[step]
        paths += [(path, wrong_type(node)), (path, emptied(node))]
    try:
        for i, (path, value) in enumerate(paths):
            message = ctx.claim()
            node = message
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = copy.deepcopy(value)
            try:
                body = ctx.signed(message) if i % 2 else message
            except (rfc8785.CanonicalizationError, ValueError):
                # a value the canonical form cannot hold: sent unsigned
                body = message
            raw = json.dumps(body, ensure_ascii=False).encode()
            response = conn.request("POST", peer.path(P.PROCESS_MESSAGE), raw,
                                    {"Content-Type": P.FHIR_JSON})
            where = "/".join(str(p) for p in path)
            if response.status >= 500:
                failures.append(f"{where}: {response.status}")
            elif response.status == 200:
                failures.append(f"{where}: 200 for a claim "
                                + ("that is not valid FHIR" if body is not message
                                   else "without a signature"))
            elif response.status != 200 and response.outcome is None:
                failures.append(f"{where}: {response.status} without an OperationOutcome")
            elif response.status != 200 and response.outcome is not None \
                    and response.outcome.code is None:
                failures.append(f"{where}: {response.status} without an error code (§7)")
            elif response.status != 200:
                ctx.expect_no_values(response)
            if response.header("Connection") == "close":
                conn.close()
                conn = peer.connect()
    finally:
        conn.close()
    ctx.measures["claims_sent"] = len(paths)
    ctx.note(f"{len(paths)} mutated claims", "one odd value each",
             "; ".join(failures) or "all 4xx", time.monotonic())
    ctx.expect(not failures, "; ".join(failures[:3]))


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*path, i))
    return found


@case("metadata-partner", "metadata answers a registered partner with its capabilities",
      family="identity", requirements=["P-PULL-20", "P-TLS-8"])
def metadata(ctx: Context) -> None:
    """GET metadata with the kit's certificate: a CapabilityStatement carrying the
    protocol version extension."""
    conn = ctx.handshake("metadata")
    ctx.expect(not isinstance(conn, str), f"handshake refused: {conn}")
    assert not isinstance(conn, str)
    with conn:
        response = ctx.request("metadata", conn, "GET", P.METADATA,
                               headers={"Accept": P.FHIR_JSON})
    ctx.expect(response.status == 200, f"metadata answered {response.status}")
    document = response.json()
    ctx.expect(document.get("resourceType") == "CapabilityStatement",
               "metadata is not a CapabilityStatement")
    versions = [e.get("valueString") for e in document.get("extension") or []
                if e.get("url") == "urn:ws-fhir-bridge:ext:protocol-version"]
    ctx.expect(bool(versions), "no protocol-version extension in the CapabilityStatement")
    ctx.measures["protocol_version"] = str(versions[0])


# --- resource exhaustion (measured, one request each) ---------------------------------------


def _timed_answer(
    ctx: Context, label: str, raw: bytes, wait: float, *, watch_close: bool = False
) -> tuple[Any, float, bool]:
    """Send raw bytes on a new connection; (response or None, seconds, closed within
    four seconds after the answer, when ``watch_close``)."""
    conn = ctx.peer().connect()
    started = time.monotonic()
    conn.timeout = wait
    response = None
    try:
        conn.send_raw(raw)
        response = conn.read_response()
    except (TLSRefused, ConnectionClosed, TimeoutError) as exc:
        ctx.note(label, _describe(raw), f"{type(exc).__name__}: {exc}", started)
    elapsed = time.monotonic() - started
    closed = conn.wait_closed(4.0) if response is not None and watch_close else False
    conn.close()
    if response is not None:
        ctx.note(label, _describe(raw), _response_text(response) + f"\n[closed={closed}]",
                 started)
    return response, elapsed, closed


def _describe(raw: bytes) -> str:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode("latin-1") + f"\n[{len(body)} body bytes]"


def _request_head(ctx: Context, headers: dict[str, str]) -> bytes:
    path = ctx.peer().path(P.PROCESS_MESSAGE)
    lines = [f"POST {path} HTTP/1.1", f"Host: {ctx.host}"] + [f"{k}: {v}" for k, v in
                                                              headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@case("exh-body-size", "A body over the limit gets 413 at once, connection closed",
      family="exhaustion", requirements=["P-HTTP-3"])
def exh_body_size(ctx: Context) -> None:
    """Declares a body one byte over --max-body (4 MiB by default) and sends none of it:
    413 payload-too-large must come without waiting for the body, and the connection
    must close within 4 s (the time it took is measured). Then a body sent chunked, no
    length declared, that runs one byte over: 413 payload-too-large as well."""
    raw = _request_head(ctx, {"Content-Type": P.FHIR_JSON,
                              "Content-Length": str(ctx.config.max_body + 1)})
    started = time.monotonic()
    response, elapsed, closed = _timed_answer(ctx, "declared over the limit", raw, 10.0,
                                              watch_close=True)
    ctx.measures["answer_s"] = round(elapsed, 3)
    ctx.measures["closed_after_s"] = round(time.monotonic() - started, 2)
    ctx.expect(response is not None, "no answer to a declared oversized body")
    ctx.expect_refusal(response, 413, "payload-too-large")
    ctx.expect(response.header("Connection") == "close", "413 without Connection: close")
    ctx.expect(closed, "the connection was still open 4 s after 413 (held for the body "
               "the target refused)")
    _chunked_over_the_limit(ctx)


def _chunked_over_the_limit(ctx: Context) -> None:
    """A body sent chunked (no length declared) that runs one byte past --max-body: the
    target must count what arrives, answer 413 payload-too-large and close, not take it
    whole."""
    conn = ctx.peer().connect()
    conn.timeout = 30.0
    started = time.monotonic()
    head = _request_head(ctx, {"Content-Type": P.FHIR_JSON, "Transfer-Encoding": "chunked"})
    body = b"{" + b" " * ctx.config.max_body + b"}"
    response = None
    try:
        conn.send_raw(head)
        step = 256 * 1024
        for at in range(0, len(body), step):
            piece = body[at:at + step]
            conn.send_raw(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send_raw(b"0\r\n\r\n")
    except (TLSRefused, ConnectionClosed):
        pass  # the target stopped reading: its answer is what counts
    try:
        response = conn.read_response()
    except (TLSRefused, ConnectionClosed, TimeoutError) as exc:
        ctx.note("chunked over the limit", f"{len(body)} body bytes, chunked",
                 f"{type(exc).__name__}: {exc}", started)
    finally:
        conn.close()
    ctx.expect(response is not None, "no answer to a chunked body over the limit")
    assert response is not None
    ctx.note("chunked over the limit", f"{len(body)} body bytes, chunked",
             _response_text(response), started)
    ctx.expect_refusal(response, 413, "payload-too-large")


@case("exh-compression", "Compressed bodies (and bombs) get 415 without being inflated",
      family="exhaustion", requirements=["P-HTTP-2"])
def exh_compression(ctx: Context) -> None:
    """A gzip body that inflates to 64 MiB (64 KiB on the wire), and a gzipped valid
    claim; both 415 unsupported-media-type at Content-Encoding, answered about as fast as
    any refusal."""
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    claim = gzip.compress(json.dumps(ctx.signed()).encode())
    for label, body in (("gzip bomb", bomb), ("gzipped claim", claim)):
        raw = _request_head(ctx, {"Content-Type": P.FHIR_JSON, "Content-Encoding": "gzip",
                                  "Content-Length": str(len(body))}) + body
        response, elapsed, _ = _timed_answer(ctx, label, raw, 10.0)
        ctx.measures[f"{label.replace(' ', '_')}_answer_s"] = round(elapsed, 3)
        ctx.expect(response is not None, f"{label}: no answer")
        ctx.expect_refusal(response, 415, "unsupported-media-type", "Content-Encoding")


@case("exh-nesting", "Deep nesting is refused without exhausting the parser",
      family="exhaustion", requirements=["P-MSG-3"])
def exh_nesting(ctx: Context) -> None:
    """A 200 KB body of arrays nested 100 000 deep: 400 parse-error (not a crash, not
    5xx), and the target still serves the next request."""
    depth = 100_000
    body = b'{"kit":' + b"[" * depth + b"]" * depth + b"}"
    raw = _request_head(ctx, {"Content-Type": P.FHIR_JSON, "Content-Length": str(len(body))})
    response, elapsed, _ = _timed_answer(ctx, "nested 100000 deep", raw + body, 10.0)
    ctx.measures["answer_s"] = round(elapsed, 3)
    ctx.expect(response is not None, "no answer to a deeply nested body")
    ctx.expect_refusal(response, 400, "parse-error")
    ctx.expect_accepted(ctx.post("a claim afterwards", ctx.signed()))


@case("exh-slow-headers", "A request head sent byte by byte is cut off", family="exhaustion",
      requirements=["P-HTTP-4"])
def exh_slow_headers(ctx: Context) -> None:
    """Sends a request line, then one header byte every half second, never finishing the
    head; the target must close the connection within its header timeout
    (--header-timeout, at most 60 s by P-HTTP-4) plus 3 s."""
    limit = ctx.config.header_timeout + 3.0
    conn = ctx.peer().connect()
    started = time.monotonic()
    closed = False
    sent = 0
    try:
        conn.send_raw(_request_head(ctx, {"Content-Type": P.FHIR_JSON})[:-4] + b"\r\nX-Kit: ")
        while time.monotonic() - started < limit:
            try:
                conn.send_raw(b"x")
                sent += 1
            except (TLSRefused, ConnectionClosed):
                closed = True
                break
            if conn.wait_closed(0.5):
                closed = True
                break
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    ctx.measures["closed_after_s"] = round(elapsed, 2)
    ctx.measures["bytes_trickled"] = sent
    ctx.note("trickled head", f"request line, then {sent} header bytes, one per 0.5 s",
             f"closed={closed} after {elapsed:.1f} s", started)
    ctx.expect(closed, f"a request head that never completes kept its connection {limit:.0f} s")


@case("exh-slow-body", "A body that does not arrive in time gets 408", family="exhaustion",
      requirements=["P-HTTP-5"])
def exh_slow_body(ctx: Context) -> None:
    """Sends a complete head announcing 2000 bytes and only 10 of them; the target must
    answer 408 request-timeout within its body timeout (--body-timeout) plus 3 s, and
    say it closes the connection."""
    raw = _request_head(ctx, {"Content-Type": P.FHIR_JSON, "Content-Length": "2000"}) + b'{"res'
    response, elapsed, _ = _timed_answer(ctx, "body never completed", raw,
                                         ctx.config.body_timeout + 3.0)
    ctx.measures["answer_s"] = round(elapsed, 2)
    ctx.expect(response is not None, f"no 408 within {ctx.config.body_timeout + 3.0:.0f} s")
    ctx.expect_refusal(response, 408, "request-timeout")
    ctx.expect(response.header("Connection") == "close", "408 without Connection: close")


# --- sync tracking (§8a) -------------------------------------------------------------------


def _new_stream() -> str:
    """A stream the target has not seen: ``kit-`` and twelve random letters (a stream
    with six digits in a row is malformed, P-SYNC-2)."""
    return "kit-" + uuid.uuid4().hex[:12].translate(str.maketrans("0123456789", "ghijklmnop"))


@case("sync-sequence-headers", "Claims with, without and with half the sequence headers",
      family="sync", requirements=["P-SYNC-2"])
def sync_sequence_headers(ctx: Context) -> None:
    """Sends a claim carrying Bridge-Stream and Bridge-Sequence (accepted), one without
    either (a version 1.1 sender: accepted); then claims with a stream but no number, a
    number but no stream, a stream not in the form of a partner id or with six digits in
    a row, and numbers that are not positive integers below 2^62 (-3, 0, abc, 2^62):
    each 400 sync-invalid naming the header at fault."""
    stream = _new_stream()
    ctx.expect_accepted(ctx.post("with stream and number", ctx.signed(),
                                 headers={"Bridge-Stream": stream, "Bridge-Sequence": "1"}))
    ctx.expect_accepted(ctx.post("without sequence headers", ctx.signed()))
    ctx.expect_refusal(ctx.post("stream only", ctx.signed(), headers={"Bridge-Stream": stream}),
                       400, "sync-invalid", "Bridge-Sequence")
    ctx.expect_refusal(ctx.post("number only", ctx.signed(), headers={"Bridge-Sequence": "2"}),
                       400, "sync-invalid", "Bridge-Stream")
    ctx.expect_refusal(
        ctx.post("stream not a partner id", ctx.signed(),
                 headers={"Bridge-Stream": "Kit Stream!", "Bridge-Sequence": "2"}),
        400, "sync-invalid", "Bridge-Stream")
    ctx.expect_refusal(
        ctx.post("stream with six digits in a row", ctx.signed(),
                 headers={"Bridge-Stream": "kit-110101199003074512", "Bridge-Sequence": "2"}),
        400, "sync-invalid", "Bridge-Stream")
    for label, number in (("negative number", "-3"), ("zero", "0"), ("not a number", "abc"),
                          ("2^62", str(2**62))):
        ctx.expect_refusal(
            ctx.post(label, ctx.signed(),
                     headers={"Bridge-Stream": stream, "Bridge-Sequence": number}),
            400, "sync-invalid", "Bridge-Sequence")


def _held_query(stream: str, first: int, last: int, identities: list[str]) -> bytes:
    return json.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "stream", "valueString": stream},
        {"name": "from", "valueInteger": first},
        {"name": "to", "valueInteger": last},
        *({"name": "identity", "valueString": i} for i in identities),
    ]}).encode("utf-8")


def _check_detached(ctx: Context, compact: str | None, body: bytes, msgid: str) -> None:
    """§5 detached JWS over the exact body, by the target, for the kit, for ``msgid``."""
    from bridge.conformance.envelope import (
        b64url,
        b64url_decode,
        certificate_kid,
        verify_jws_signature,
    )

    ctx.expect(bool(compact), "no X-Signature on the answer")
    assert compact is not None
    parts = compact.split(".")
    ctx.expect(len(parts) == 3 and parts[1] == "", "X-Signature is not a detached compact JWS")
    header = json.loads(b64url_decode(parts[0]))
    cert = ctx.receiver_signing
    if cert is None:
        raise Skip("needs --receiver-signing-cert to check the signed answer")
    ctx.expect(header.get("kid") == certificate_kid(cert), "kid is not the target's signing key")
    ctx.expect(header.get("iss") == ctx.receiver_id, "iss is not the target")
    ctx.expect(header.get("aud") == ctx.partner_id, "aud is not the kit")
    ctx.expect(header.get("msgid") == msgid, "msgid is not the request's X-Correlation-Id")
    signing_input = parts[0].encode("ascii") + b"." + b64url(body).encode("ascii")
    ctx.expect(
        verify_jws_signature(cert.public_key(), str(header.get("alg")), signing_input,
                             b64url_decode(parts[2])),
        "X-Signature does not verify over the answer's bytes")


@case("sync-held", "$sync-held names what is held, signed for the question asked",
      family="sync", requirements=["P-SYNC-4", "P-SYNC-5"])
def sync_held(ctx: Context) -> None:
    """Sends one claim as number 1 of a new stream, then asks $sync-held about it and a
    random identity: 200, a Parameters holding the claim only (with its audit-seq), the
    stream's contiguous number 1, and an X-Signature over the body for the kit with the
    correlation id as msgid. A range with from after to is 400 sync-invalid naming
    Parameters.from. A target without the operation (protocol 1.1) is skipped."""
    stream = _new_stream()
    message = ctx.signed()
    identity = str(message["identifier"]["value"])
    ctx.expect_accepted(ctx.post("claim 1 of a new stream", message,
                                 headers={"Bridge-Stream": stream, "Bridge-Sequence": "1"}))
    stranger = f"urn:uuid:{uuid.uuid4()}"
    correlation = f"urn:uuid:{uuid.uuid4()}"
    headers = {"Content-Type": P.FHIR_JSON, "X-Correlation-Id": correlation}
    with ctx.peer().connect() as conn:
        answer = ctx.request("which of these do you hold", conn, "POST", "$sync-held",
                             _held_query(stream, 1, 1, [identity, stranger]), headers)
        if answer.status == 404:
            raise Skip("the target does not offer $sync-held (protocol 1.1)")
        ctx.expect(answer.status == 200, f"expected 200, got {answer.status}")
        _check_detached(ctx, answer.header("X-Signature"), answer.body, correlation)
        params = answer.json().get("parameter", [])
        held = [{q.get("name"): q for q in p.get("part", [])} for p in params
                if p.get("name") == "held"]
        named = [h.get("identity", {}).get("valueString") for h in held]
        ctx.expect(named == [identity], f"held lists {named}, expected only the claim sent")
        ctx.expect(isinstance(held[0].get("audit-seq", {}).get("valueInteger"), int),
                   "held without its audit-seq")
        contiguous = [p.get("valueInteger") for p in params if p.get("name") == "contiguous"]
        ctx.expect(contiguous == [1], f"contiguous is {contiguous}, expected [1]")
        bad = ctx.request("from after to", conn, "POST", "$sync-held",
                          _held_query(stream, 3, 1, []),
                          {**headers, "X-Correlation-Id": f"urn:uuid:{uuid.uuid4()}"})
        ctx.expect_refusal(bad, 400, "sync-invalid", "Parameters.from")


def _sync_answer(ctx: Context, stream: str, identities: list[str]) -> list[dict[str, Any]]:
    """The parameters of the target's signed $sync-held answer about ``identities`` of
    ``stream`` numbers 1-1 (skipped when the target has no $sync-held)."""
    correlation = f"urn:uuid:{uuid.uuid4()}"
    headers = {"Content-Type": P.FHIR_JSON, "X-Correlation-Id": correlation}
    with ctx.peer().connect() as conn:
        answer = ctx.request("which of these do you hold", conn, "POST", "$sync-held",
                             _held_query(stream, 1, 1, identities), headers)
    if answer.status == 404:
        raise Skip("the target does not offer $sync-held (protocol 1.1)")
    ctx.expect(answer.status == 200, f"expected 200, got {answer.status}")
    _check_detached(ctx, answer.header("X-Signature"), answer.body, correlation)
    params: list[dict[str, Any]] = answer.json().get("parameter", [])
    return params


def _two_claims_numbered_1(ctx: Context) -> tuple[str, list[str]]:
    """Two claims of a new stream, both sent as its number 1 (a sender restored from a
    backup numbering again): each must be accepted on its identity (P-SYNC-8)."""
    stream = _new_stream()
    identities = []
    for what in ("claim 1 of a new stream", "another claim as number 1 again"):
        message = ctx.signed()
        identities.append(str(message["identifier"]["value"]))
        ctx.expect_accepted(ctx.post(what, message,
                                     headers={"Bridge-Stream": stream, "Bridge-Sequence": "1"}))
    return stream, identities


@case("sync-collision", "a number received twice: both claims accepted on their identity",
      family="sync", requirements=["P-SYNC-8"])
def sync_collision(ctx: Context) -> None:
    """Sends two claims of a new stream, each as number 1: both are accepted (200 with a
    receipt; a claim is accepted on its identity, not its number), and $sync-held lists
    both identities as held."""
    stream, identities = _two_claims_numbered_1(ctx)
    params = _sync_answer(ctx, stream, identities)
    named = sorted(q.get("valueString") for p in params if p.get("name") == "held"
                   for q in p.get("part", []) if q.get("name") == "identity")
    ctx.expect(named == sorted(identities), "$sync-held does not list both claims as held")


@case("sync-collision-reported", "$sync-held names the highest number and numbers held twice",
      family="sync", requirements=["P-SYNC-9"], required=False)
def sync_collision_reported(ctx: Context) -> None:
    """Sends two claims of a new stream, each as number 1, then asks $sync-held: the
    answer says `highest` 1 and has one `collision` 1 (a SHOULD: a target that does not
    say so is reported, and stays conformant)."""
    stream, identities = _two_claims_numbered_1(ctx)
    params = _sync_answer(ctx, stream, identities)
    highest = [p.get("valueInteger") for p in params if p.get("name") == "highest"]
    collisions = [p.get("valueInteger") for p in params if p.get("name") == "collision"]
    ctx.expect(highest == [1], f"highest is {highest}, expected [1]")
    ctx.expect(collisions == [1], f"collision is {collisions}, expected [1]")


# --- several claims per request (§6b) ------------------------------------------------------


def _batch_offer(meta: Any) -> tuple[int, int] | None:
    """``(maxEntries, maxBytes)`` of a CapabilityStatement's batch offer, or None."""
    for rest in (meta or {}).get("rest") or []:
        if not any(i.get("code") == P.BATCH_INTERACTION for i in rest.get("interaction") or []):
            continue
        for ext in rest.get("extension") or []:
            if ext.get("url") == P.BATCH_EXTENSION:
                bounds = {e.get("url"): e.get("valueUnsignedInt") for e in ext.get("extension", [])}
                return int(bounds["maxEntries"]), int(bounds["maxBytes"])
    return None


def _batch_body(messages: list[dict[str, Any]]) -> bytes:
    return json.dumps({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "POST", "url": P.PROCESS_MESSAGE}, "resource": m}
                  for m in messages],
    }, ensure_ascii=False).encode("utf-8")


@case("batch-entries", "A batch: every entry judged alone, answered in order",
      family="batch", requirements=["P-BAT-1", "P-BAT-2", "P-BAT-3", "P-BAT-4"], required=False)
def batch_entries(ctx: Context) -> None:
    """Reads the CapabilityStatement; when it offers batches (P-BAT-1), POSTs ``[base]`` a
    batch of two good claims around a forged one (changed after signing) and one that
    names another sender. The answer must be a ``batch-response`` of four entries in
    order: the good ones 200 with receipts that verify, the forged one 403
    signature-invalid, the other 403 sender-mismatch. Then a batch one entry over
    ``maxEntries`` must be 413 payload-too-large at ``Bundle.entry``."""
    conn = ctx.handshake("metadata")
    if isinstance(conn, str):
        raise CaseFailed(f"metadata: {conn}")
    with conn:
        response = ctx.request("metadata", conn, "GET", P.METADATA,
                               headers={"Accept": P.FHIR_JSON})
        offer = _batch_offer(response.json()) if response.status == 200 else None
        if offer is None:
            raise Skip("the target offers no batches (optional, P-BAT-1)")
        max_entries, _ = offer
        good = [ctx.signed(), ctx.signed()]
        forged = ctx.signed()
        _resource(forged, "Claim")["total"]["value"] = 4321.5
        stranger = ctx.signed(ctx.claim(sender="kit-stranger"))
        sent = [good[0], forged, stranger, good[1]]
        answer = ctx.request("batch of four", conn, "POST", "", _batch_body(sent),
                             {"Content-Type": P.FHIR_JSON})
        ctx.expect(answer.status == 200, f"batch answered {answer.status}, expected 200")
        bundle = answer.json()
        ctx.expect(isinstance(bundle, dict) and bundle.get("type") == "batch-response",
                   "the answer is not a batch-response Bundle")
        entries = bundle.get("entry") or []
        ctx.expect(len(entries) == len(sent), f"{len(entries)} answer entries for 4 sent")
        statuses = [str(e.get("response", {}).get("status", ""))[:3] for e in entries]
        ctx.expect(statuses == ["200", "403", "403", "200"],
                   f"entry statuses {statuses}, expected 200, 403, 403, 200")
        codes = [(e["response"].get("outcome") or {}).get("issue", [{}])[0]
                 .get("details", {}).get("coding", [{}])[0].get("code") for e in entries[1:3]]
        ctx.expect(codes == ["signature-invalid", "sender-mismatch"],
                   f"refused entries answered {codes}")
        if ctx.config.receiver_signing_cert is not None:
            peer = ctx.peer()
            for i in (0, 3):
                try:
                    peer.check_receipt(sent[i], entries[i].get("resource"))
                except Exception as exc:  # noqa: BLE001 - reported as the case's failure
                    raise CaseFailed(f"receipt of entry {i} does not verify: {exc}") from None
        over = ctx.request("batch over maxEntries", conn, "POST", "",
                           _batch_body([ctx.signed() for _ in range(max_entries + 1)]),
                           {"Content-Type": P.FHIR_JSON})
        ctx.expect_refusal(over, 413, "payload-too-large", "Bundle.entry")
