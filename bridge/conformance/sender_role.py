"""The kit as a receiver: it listens where a sender (a hospital's bridge) delivers
claims, answers by a script, and checks what arrives.

The operator points the sender's link at the kit (the partner's base URL) and has it
send two claims. The first message identity is answered ``503``, then ``409``, then
``429``, then held past the sender's request timeout, then accepted with a signed
receipt; the second is refused for good (``422 fhir-invalid``). The cases then judge
every arrival: TLS identity, media type and coding, the message envelope and its
addressing, the signature (RFC 8785 payload, the six header members, fresh), the
security labels, that each transient answer was retried with the same content and
that the refusal was not retried.

Standard library TLS and HTTP only (``ssl``, ``http.server``); nothing of the bridge.
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import json
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from bridge.conformance import protocol as P
from bridge.conformance.envelope import (
    PeerCheckFailed,
    SigningKey,
    jcs,
    sha256_digest,
    sign_message,
    signed_payload,
    verify_signed_bundle,
)
from bridge.conformance.kit import CaseFailed, Exchange, Skip, case

#: What the kit answers to the n-th arrival (from 0) of the first and second identity.
FIRST_SCRIPT = ("503", "409", "429", "stall", "200")
SECOND_SCRIPT = ("422",)


@dataclass
class Arrival:
    at: float
    identity: str | None
    peer_partner: str | None
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    answer: str = ""
    fingerprint: str = ""  # SHA-256 of the client certificate the connection presented


@dataclass
class ReceiverConfig:
    cert: Path
    key: Path
    ca: Path
    signing_key: Path
    signing_cert: Path
    sender_signing_cert: Path
    receiver_id: str | None = None  # default: the URI SAN of ``cert``
    sender_id: str | None = None  # default: whoever connects first
    host: str = "127.0.0.1"
    port: int = 0
    stall: float = 35.0  # longer than the sender's request timeout
    wait: float = 120.0  # how long to wait for both scripts to finish
    quiet_period: float = 3.0  # how long a refused message must stay unrepeated


@dataclass
class Observation:
    config: ReceiverConfig
    receiver_id: str
    arrivals: list[Arrival] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)

    def of(self, identity: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.identity == identity]


def _uri_partner(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = [u[len(P.PARTNER_URI_PREFIX):] for u in
             san.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(P.PARTNER_URI_PREFIX)]
    return found[0] if len(found) == 1 else None


def _outcome(status: int, code: str, text: str) -> bytes:
    return json.dumps({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "details": {
            "coding": [{"system": P.ERROR_SYSTEM, "code": code}], "text": text}}],
    }).encode()


def make_receipt(
    request: dict[str, Any], *, receiver: str, sender: str, key: SigningKey,
    outcome: str = "ok",
) -> dict[str, Any]:
    """A signed §6.2 receipt answering ``request`` (``outcome``: its response.code)."""
    request_id = str(request["identifier"]["value"])
    identity = P.receipt_identity(request_id, receiver)
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {"system": P.EVENT_SYSTEM, "code": P.RECEIPT_EVENT},
        "sender": {"identifier": {"system": P.PARTNER_SYSTEM, "value": receiver}},
        "destination": [{"endpoint": P.PARTNER_URI_PREFIX + sender,
                         "receiver": {"identifier": {"system": P.PARTNER_SYSTEM,
                                                     "value": sender}}}],
        "source": {"endpoint": P.PARTNER_URI_PREFIX + receiver},
        "response": {"identifier": request_id.removeprefix("urn:uuid:"), "code": outcome},
        "extension": [
            {"url": P.EXT_REQUEST_MESSAGE_ID, "valueString": request_id},
            {"url": P.EXT_REQUEST_DIGEST,
             "valueString": sha256_digest(signed_payload(request))},
            {"url": P.EXT_AUDIT_SEQ, "valueInteger": 1},
            {"url": P.EXT_AUDIT_HASH, "valueString": hashlib.sha256(
                jcs(request_id)).hexdigest()},
        ],
    }
    bundle = {
        "resourceType": "Bundle",
        "identifier": {"system": P.IDENTIFIER_SYSTEM, "value": identity},
        "type": "message",
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "entry": [{"fullUrl": f"urn:uuid:{header['id']}", "resource": header}],
    }
    return sign_message(bundle, key, iss=receiver, aud=sender)


class KitReceiver:
    """A mutual-TLS HTTP/1.1 listener answering ``$process-message`` by the scripts."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.signing = SigningKey.from_files(config.signing_key, config.signing_cert)
        own = x509.load_pem_x509_certificate(config.cert.read_bytes())
        receiver = config.receiver_id or _uri_partner(own)
        if receiver is None:
            raise ValueError(f"{config.cert} names no partner; give the receiver id")
        self.observation = Observation(config, receiver)
        self._lock = threading.Lock()
        self._server: http.server.HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.stalled = threading.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _answer(self, arrival: Arrival) -> tuple[int, bytes, dict[str, str]]:
        obs = self.observation
        with self._lock:
            obs.arrivals.append(arrival)
            if arrival.identity is None:
                return 400, _outcome(400, "parse-error", "not a message"), {}
            if arrival.identity not in obs.identities:
                obs.identities.append(arrival.identity)
            index = obs.identities.index(arrival.identity)
            nth = len(obs.of(arrival.identity)) - 1
        script = FIRST_SCRIPT if index == 0 else SECOND_SCRIPT
        step = script[min(nth, len(script) - 1)]
        arrival.answer = step
        if step == "503":
            return 503, _outcome(503, "store-error", "temporarily unavailable"), {}
        if step == "409":
            return 409, _outcome(409, "message-in-progress", "in progress"), {}
        if step == "429":
            return 429, _outcome(429, "rate-limited", "slow down"), {"Retry-After": "1"}
        if step == "stall":
            self.stalled.wait(self.config.stall)
            return 503, _outcome(503, "store-error", "late"), {}
        if step == "422":
            return 422, _outcome(422, "fhir-invalid", "refused for good"), {}
        request = json.loads(arrival.body)
        receipt = make_receipt(request, receiver=obs.receiver_id,
                               sender=arrival.peer_partner or "", key=self.signing)
        return 200, json.dumps(receipt).encode(), {}

    def start(self) -> None:
        kit = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                der = self.request.getpeercert(binary_form=True)
                partner = _uri_partner(x509.load_der_x509_certificate(der)) if der else None
                try:
                    identity = json.loads(body)["identifier"]["value"]
                    identity = identity if isinstance(identity, str) else None
                except (ValueError, KeyError, TypeError):
                    identity = None
                arrival = Arrival(time.monotonic(), identity, partner, "POST", self.path,
                                  {k.lower(): v for k, v in self.headers.items()}, body,
                                  fingerprint=hashlib.sha256(der or b"").hexdigest())
                status, answer, extra = kit._answer(arrival)
                self.send_response(status)
                self.send_header("Content-Type", P.FHIR_JSON)
                self.send_header("Content-Length", str(len(answer)))
                for k, v in extra.items():
                    self.send_header(k, v)
                # One request per connection: every retry shows a new handshake.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                try:
                    self.wfile.write(answer)
                except OSError:
                    pass  # a sender that gave up waiting

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.cert, self.config.key)
        ctx.load_verify_locations(self.config.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # failed handshakes and dropped connections are the sender's to show

        server = Server((self.config.host, self.config.port), Handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        """Both scripts ran to their end and the quiet period after the refusal passed."""
        obs = self.observation
        with self._lock:
            if len(obs.identities) < 2:
                return False
            first = obs.of(obs.identities[0])
            second = obs.of(obs.identities[1])
        finished = len(first) >= len(FIRST_SCRIPT) and bool(second)
        return finished and time.monotonic() - second[-1].at >= self.config.quiet_period

    def wait(self, *, should_stop: Callable[[], bool] = lambda: False) -> bool:
        deadline = time.monotonic() + self.config.wait
        while time.monotonic() < deadline and not should_stop():
            if self.done():
                return True
            time.sleep(0.1)
        return self.done()

    def stop(self) -> None:
        self.stalled.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- the cases -----------------------------------------------------------------------------


class SenderContext:
    """What a sender-role case reads: the observation, and where its evidence goes."""

    def __init__(self, observation: Observation) -> None:
        self.observation = observation
        self.evidence: list[Exchange] = []
        self.measures: dict[str, float | int | str] = {}
        self.shared: dict[str, Any] = {}
        self.sender_signing = x509.load_pem_x509_certificate(
            observation.config.sender_signing_cert.read_bytes()
        )

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise CaseFailed(message)

    def arrivals(self) -> list[Arrival]:
        found = [a for a in self.observation.arrivals if a.identity is not None]
        if not found:
            raise Skip("no message arrived: point the sender's link at the kit and send two")
        return found

    def show(self, label: str, arrival: Arrival) -> None:
        head = f"{arrival.method} {arrival.path}\n" + "".join(
            f"{k}: {v}\n" for k, v in arrival.headers.items()
        )
        body = arrival.body[:1500].decode("utf-8", errors="replace")
        self.evidence.append(Exchange(label, head + body, f"answered {arrival.answer}", 0.0))


def _messages(ctx: SenderContext) -> list[tuple[Arrival, dict[str, Any]]]:
    out = []
    for arrival in ctx.arrivals():
        try:
            document = json.loads(arrival.body)
        except ValueError as exc:
            raise CaseFailed(f"a body is not JSON ({exc})") from None
        out.append((arrival, document))
    return out


@case("snd-tls-identity", "The sender's certificate names the partner the messages come from",
      family="sender", requirements=["P-TLS-8", "P-ID-1"], role="sender")
def snd_tls(ctx: SenderContext) -> None:
    """Every connection presented a certificate of the kit's CA naming one partner id, a
    valid one (P-ID-1), and it is the MessageHeader.sender of what it carried."""
    import re

    for arrival, message in _messages(ctx):
        ctx.show("arrival", arrival)
        partner = arrival.peer_partner
        ctx.expect(partner is not None, "a connection's certificate names no single partner")
        ctx.expect(bool(re.fullmatch(r"[a-z0-9._-]{1,63}", partner or "")),
                   f"partner id {partner!r} is not a P-ID-1 id")
        sender = (((message.get("entry") or [{}])[0].get("resource") or {}).get("sender") or {})
        ctx.expect((sender.get("identifier") or {}).get("value") == partner,
                   "MessageHeader.sender is not the partner the certificate names")


@case("snd-http", "Claims are FHIR JSON, uncompressed, at $process-message", family="sender",
      requirements=["P-HTTP-1", "P-HTTP-2"], role="sender")
def snd_http(ctx: SenderContext) -> None:
    """Every request is a POST to [base]/$process-message typed application/fhir+json with
    no Content-Encoding."""
    for arrival in ctx.arrivals():
        ctx.expect(arrival.path.endswith("/" + P.PROCESS_MESSAGE),
                   f"posted to {arrival.path}, not $process-message")
        media = arrival.headers.get("content-type", "").split(";")[0].strip()
        ctx.expect(media in (P.FHIR_JSON, "application/json"), f"Content-Type {media!r}")
        coding = arrival.headers.get("content-encoding", "identity").strip().lower()
        ctx.expect(coding in ("", "identity"), f"the sender compressed ({coding})")


@case("snd-envelope", "Each claim is a well-formed message addressed to the receiver",
      family="sender", requirements=["P-MSG-1", "P-MSG-2", "P-ID-2", "P-HTTP-1"], role="sender")
def snd_envelope(ctx: SenderContext) -> None:
    """A message Bundle with a canonical urn:uuid identity, a timestamp, a MessageHeader
    first with event claim-submit, one destination naming the kit, focus on the Claim,
    urn:uuid fullUrls."""
    import re

    pattern = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}"
                         r"-[0-9a-f]{12}")
    for _, m in _messages(ctx):
        ctx.expect(m.get("resourceType") == "Bundle" and m.get("type") == "message",
                   "not a message Bundle")
        ident = m.get("identifier") or {}
        ctx.expect(ident.get("system") == P.IDENTIFIER_SYSTEM, "Bundle.identifier.system")
        ctx.expect(bool(pattern.fullmatch(str(ident.get("value")))),
                   "the identity is not a canonical urn:uuid (P-MSG-2)")
        ctx.expect(isinstance(m.get("timestamp"), str), "no Bundle.timestamp")
        entries = m.get("entry") or []
        header = (entries[0].get("resource") or {}) if entries else {}
        ctx.expect(header.get("resourceType") == "MessageHeader", "entry[0] is not a MessageHeader")
        ctx.expect(header.get("eventCoding") == {"system": P.EVENT_SYSTEM,
                                                 "code": P.CLAIM_EVENT},
                   "event is not claim-submit")
        destinations = header.get("destination") or []
        ctx.expect(len(destinations) == 1, "not exactly one destination")
        receiver = ((destinations[0].get("receiver") or {}).get("identifier") or {})
        ctx.expect(receiver == {"system": P.PARTNER_SYSTEM,
                                "value": ctx.observation.receiver_id},
                   "destination[0].receiver is not the kit's partner id")
        claims = [e["fullUrl"] for e in entries[1:]
                  if (e.get("resource") or {}).get("resourceType") == "Claim"]
        ctx.expect(len(claims) == 1, "not exactly one Claim")
        ctx.expect([f.get("reference") for f in header.get("focus") or []] == claims,
                   "MessageHeader.focus does not refer to the Claim")
        ctx.expect(all(str(e.get("fullUrl", "")).startswith("urn:uuid:") for e in entries),
                   "an entry's fullUrl is not urn:uuid")


@case("snd-signature", "Each claim carries a §5 signature over its RFC 8785 form",
      family="sender", requirements=["P-SIG-1", "P-SIG-2", "P-SIG-3", "P-SIG-12", "P-KEY-1"],
      role="sender")
def snd_signature(ctx: SenderContext) -> None:
    """The signature verifies with the sender's signing certificate over the RFC 8785
    payload only (signers never produce the version 1 form), with exactly the six header
    members, Bundle.signature exactly §5's table (nothing unsigned in it, when = iat), iss
    the sender, aud the kit, msgid the identity and iat within 300 s of arrival; the
    signing certificate is not the TLS certificate."""
    for arrival, m in _messages(ctx):
        try:
            header, _ = verify_signed_bundle(
                m, ctx.sender_signing, issuer=str(arrival.peer_partner),
                audience=ctx.observation.receiver_id, accept_v1=False,
            )
        except PeerCheckFailed as exc:
            raise CaseFailed(f"signature: {exc}") from None
        skew = abs(time.time() - (time.monotonic() - arrival.at) - int(header["iat"]))
        ctx.expect(skew <= P.REPLAY_WINDOW_SECONDS, f"iat {skew:.0f} s from the arrival")
    usage = ctx.sender_signing.extensions.get_extension_for_class(x509.KeyUsage).value
    ctx.expect(usage.digital_signature and usage.content_commitment,
               "the signing certificate lacks digitalSignature or contentCommitment")


@case("snd-labels", "Every resource sent carries security labels", family="sender",
      requirements=["P-MSG-9"], role="sender")
def snd_labels(ctx: SenderContext) -> None:
    """Each resource of each claim carries meta.security with a confidentiality code
    (v3-Confidentiality), so special-disease data is marked as such."""
    confidentiality = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    for _, m in _messages(ctx):
        for entry in (m.get("entry") or [])[1:]:
            resource = entry.get("resource") or {}
            labels = (resource.get("meta") or {}).get("security") or []
            ctx.expect(any(lab.get("system") == confidentiality for lab in labels),
                       f"{resource.get('resourceType')} carries no confidentiality label")


@case("snd-retry-transient", "503, 409, 429 and a timeout are retried with the same content",
      family="sender", requirements=["P-ERR-3", "P-SND-3", "P-RCP-3"], role="sender")
def snd_retry(ctx: SenderContext) -> None:
    """The first message is answered 503, 409, 429, then held past the sender's timeout,
    then accepted: it must arrive five times, under one identity, with the same signed
    payload each time. Delays between attempts are reported."""
    obs = ctx.observation
    ctx.arrivals()
    first = obs.of(obs.identities[0])
    for a in first:
        ctx.show("attempt", a)
    answered = [a.answer for a in first]
    ctx.expect(len(first) >= len(FIRST_SCRIPT),
               f"the first message arrived {len(first)} times (answers {answered}); "
               f"transient answers must be retried until {FIRST_SCRIPT[-1]}")
    payloads = {sha256_digest(signed_payload(json.loads(a.body))) for a in first}
    ctx.expect(len(payloads) == 1, "a retry carried different content")
    ctx.expect(answered[-1] == "200", f"answers {answered}")
    for before, after in itertools.pairwise(first):
        ctx.measures[f"after_{before.answer}_s"] = round(after.at - before.at, 2)


@case("snd-no-retry-definitive", "A definitive refusal (422) is not retried", family="sender",
      requirements=["P-ERR-3", "P-SND-3"], role="sender")
def snd_no_retry(ctx: SenderContext) -> None:
    """The second message is answered 422 fhir-invalid; it must not arrive again."""
    obs = ctx.observation
    ctx.arrivals()
    if len(obs.identities) < 2:
        raise CaseFailed("a second message never arrived; send two claims to the kit")
    second = obs.of(obs.identities[1])
    for a in second:
        ctx.show("arrival", a)
    ctx.expect(len(second) == 1, f"the refused message arrived {len(second)} times")
