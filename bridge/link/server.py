"""The receiving side: an aiohttp application behind a mutual-TLS listener.

Request path for ``POST [base]/$process-message``:

1. the TLS handshake already proved a certificate from our CA (``tlsgate``);
2. the certificate must map to a registered partner with an inbound link (401/403);
3. media type, size and JSON shape are checked (415, 413, 400);
4. the signature must verify, be made by that same partner and be addressed to us,
   inside the replay window (403);
5. a message identity seen before gets the original receipt back, or 422 if the
   content differs; one still being processed gets 409;
6. the content must be valid FHIR and hold only what the link's profile allows (422/403);
7. the inbox row, the audit entry and the signed receipt are committed together,
   and only then is the receipt returned.

Every refusal is audited. No health data appears in an error or a log line.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from bridge.errors import (
    BridgeError,
    ConflictError,
    InFlightError,
    NotFound,
    ParseError,
    PayloadTooLarge,
    PolicyError,
    ProfileError,
    SignatureError,
    StoreError,
    TrustError,
    UnknownPartner,
    UnsupportedMediaType,
)
from bridge.link.capability import capability_statement
from bridge.link.node import Controller, resource_types
from bridge.link.pull import PullAPI
from bridge.logs import refusal_event
from bridge.mapping import patient_identifiers
from bridge.messages import collection_of, header_event, message_identity
from bridge.policy.consent import parse_consent
from bridge.records.fhir import ValidationCache, validation_cache
from bridge.trust.identity import certificate_identity
from bridge.trust.jws import verify_bundle, verify_detached_bytes
from bridge.trust.receipts import make_receipt
from bridge.trust.registry import Partner

log = logging.getLogger("bridge.server")

FHIR_JSON = "application/fhir+json"
_ACCEPTED_TYPES = {FHIR_JSON, "application/json"}


def outcome_response(exc: BridgeError) -> web.Response:
    return web.Response(
        status=exc.http_status,
        body=orjson.dumps(exc.to_operation_outcome()),
        content_type=FHIR_JSON,
    )


class ReceiverApp:
    """HTTP handlers of one controller."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self._in_flight: set[tuple[str, str]] = set()
        self.stats: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0}

    def build(self) -> web.Application:
        app = web.Application(
            client_max_size=self.c.config.server.max_body_bytes, middlewares=[_outcome_on_failure]
        )
        base = self.c.config.server.base_path.rstrip("/")
        app.router.add_post(f"{base}/$process-message", self.process_message)
        app.router.add_get(f"{base}/metadata", self.metadata)
        consents = ConsentAPI(self)
        app.router.add_post(f"{base}/Consent", consents.create)
        app.router.add_put(f"{base}/Consent/{{id}}", consents.update)
        app.router.add_get(f"{base}/Consent/{{id}}", consents.read)
        self.pull = PullAPI(self)
        self.pull.register(app, base)
        return app

    # --- helpers ----------------------------------------------------------------------

    def _peer_partner(self, request: web.Request) -> Partner:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise UnknownPartner("no client certificate on this connection", location="TLS")
        return self.c.partners.identify(der)

    async def _refuse(
        self, exc: BridgeError, *, partner: str | None, subject: str, patient: str | None = None
    ) -> web.Response:
        self.stats["rejected"] += 1
        await self.c.db.append_audit(
            self.c.audit(
                "message.reject",
                subject=subject,
                outcome="denied" if isinstance(exc, (TrustError, PolicyError)) else "failure",
                partner=partner,
                patient=patient,
                detail=f"{exc.code}@{exc.location or '-'}",
            )
        )
        log.info("refused %s from %s: %s", subject, partner or "unknown partner", exc)
        refusal_event(self.c, "receive", exc, partner=partner, subject=subject)
        return outcome_response(exc)

    def _caller(self, request: web.Request) -> str | None:
        """``None`` for this controller's own systems, else the partner id of the peer.

        The controller's own systems (its HIS, its patient app back end) connect with a
        client certificate issued to the controller itself; anything else must be a
        registered partner.
        """
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise UnknownPartner("no client certificate on this connection", location="TLS")
        identity = certificate_identity(der)
        if identity.partner_id == self.c.id:
            pins = self.c.config.server.local_client_fingerprints
            if pins and identity.fingerprint_sha256 not in pins:
                raise UnknownPartner(
                    "certificate names this controller but is not a pinned local client",
                    location="TLS.client-certificate",
                )
            return None
        return self.c.partners.identify(der).id

    # --- handlers ---------------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            caller = self._caller(request)
        except TrustError as exc:
            return await self._refuse(exc, partner=None, subject="metadata")
        return web.Response(
            body=orjson.dumps(capability_statement(self.c, caller)), content_type=FHIR_JSON
        )

    async def process_message(self, request: web.Request) -> web.Response:
        try:
            partner = self._peer_partner(request)
        except TrustError as exc:  # no certificate, no partner, or an ambiguous one
            return await self._refuse(exc, partner=None, subject="connection")
        link = self.c.inbound_link_for(partner.id)
        if link is None:
            return await self._refuse(
                UnknownPartner("partner has no inbound link here", location="links"),
                partner=partner.id,
                subject="connection",
            )
        if request.content_type not in _ACCEPTED_TYPES:
            return await self._refuse(
                UnsupportedMediaType(
                    "media type must be application/fhir+json", location="Content-Type"
                ),
                partner=partner.id,
                subject="request",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return await self._refuse(
                PayloadTooLarge("message larger than this bridge accepts", location="body"),
                partner=partner.id,
                subject="request",
            )
        try:
            bundle = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return await self._refuse(
                ParseError(f"malformed JSON at byte {exc.pos}", location=f"body[{exc.pos}]"),
                partner=partner.id,
                subject="request",
            )
        try:
            message_id, header = message_identity(bundle)
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject="request")

        key = (partner.id, message_id)
        if key in self._in_flight:
            return outcome_response(
                InFlightError("message is still being processed", location="Bundle.identifier")
            )
        self._in_flight.add(key)
        try:
            return await self._accept(bundle, body, message_id, header, partner, link.profile)
        finally:
            self._in_flight.discard(key)

    async def _accept(
        self,
        bundle: dict[str, Any],
        body: bytes,
        message_id: str,
        header: dict[str, Any],
        partner: Partner,
        profile_name: str,
    ) -> web.Response:
        c = self.c
        now = c.clock()
        # The signer must be the partner the TLS handshake authenticated.
        try:
            claims = verify_bundle(
                bundle, c.keyring, expected_issuer=partner.id, expected_audience=c.id, now=now
            )
        except TrustError as exc:
            return await self._refuse(exc, partner=partner.id, subject=message_id)
        existing = await c.db.inbox_lookup(partner.id, message_id)
        if existing is not None:
            if existing.digest != claims.payload_digest:
                return await self._refuse(
                    ConflictError(
                        "message identity reused with different content",
                        location="Bundle.identifier",
                    ),
                    partner=partner.id,
                    subject=message_id,
                )
            self.stats["duplicates"] += 1
            await c.db.append_audit(
                c.audit(
                    "message.duplicate",
                    subject=message_id,
                    partner=partner.id,
                    digest_value=claims.payload_digest,
                )
            )
            return web.Response(body=existing.receipt, content_type=FHIR_JSON)

        patient: str | None = None
        try:
            header_event(header)
            validate_message(bundle)
            # Only a validated bundle is read for its patient: a malformed one is refused
            # (and audited) as invalid FHIR, and one without a Patient as unmappable.
            patient = c.pseudonym(patient_identifiers(bundle))
            profile = c.profiles.get(_inbound_link_id(c, partner.id))
            if profile is not None:
                outside = profile.check(collection_of(bundle))
                if outside:
                    raise ProfileError(
                        "message carries elements outside the link profile",
                        location=outside[0],
                    )
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject=message_id, patient=patient)

        def build_receipt(entry: Any) -> bytes:
            receipt = make_receipt(
                request_message_id=message_id,
                request_digest=claims.payload_digest,
                outcome="ok",
                receiver=c.id,
                sender=partner.id,
                audit_seq=entry.seq,
                audit_hash=entry.hash,
                signer=c.signer,
                now=now,
            )
            return orjson.dumps(receipt)

        try:
            row, created = await c.db.inbox_accept(
                sender=partner.id,
                message_id=message_id,
                digest=claims.payload_digest,
                payload=body,
                audit=c.audit(
                    "message.receive",
                    subject=message_id,
                    partner=partner.id,
                    patient=patient,
                    categories=resource_types(bundle),
                    digest_value=claims.payload_digest,
                    now=now,
                ),
                make_receipt=build_receipt,
                now=now,
            )
        except ConflictError as exc:
            # Another process of this receiver stored the same identity meanwhile.
            return await self._refuse(exc, partner=partner.id, subject=message_id, patient=patient)
        except StoreError as exc:
            # Nothing was stored and nothing is acknowledged: the sender retries.
            log.error("store failed while accepting %s: %s", message_id, exc)
            return outcome_response(exc)
        if created:
            self.stats["accepted"] += 1
        else:
            self.stats["duplicates"] += 1
        return web.Response(body=row.receipt, content_type=FHIR_JSON)


@web.middleware
async def _outcome_on_failure(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer every failure as a FHIR OperationOutcome, never as aiohttp's plain text.

    Routing errors (404, 405) keep their status; an unexpected exception is logged
    here with its traceback and answered 500 without any detail that could carry data.
    """
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = BridgeError(exc.reason or "request refused", location=request.path)
        return web.Response(
            status=exc.status, body=orjson.dumps(err.to_operation_outcome()), content_type=FHIR_JSON
        )
    except BridgeError as exc:  # e.g. the store failing: 503, the sender retries later
        log.error("%s %s failed: %s", request.method, request.path, exc)
        return outcome_response(exc)
    except Exception:
        log.exception("unexpected failure handling %s %s", request.method, request.path)
        err = BridgeError("internal error; nothing was stored", location=request.path)
        return outcome_response(err)


def validate_message(bundle: dict[str, Any], *, cache: ValidationCache | None = None) -> None:
    """Validate a received message bundle as FHIR R4, envelope and entries.

    The validation cache gives exactly the verdict of full validation (and on refusal
    full validation's own error, naming ``Bundle.entry[i].resource...``), but checks a
    structure it has accepted before only through the primitive validators.
    """
    if not isinstance(bundle.get("entry"), list):
        raise ParseError("message has no entries", location="Bundle.entry")
    (cache or validation_cache()).validate(bundle)


def _inbound_link_id(c: Controller, partner_id: str) -> str:
    link = c.inbound_link_for(partner_id)
    return link.id if link else ""


# --- consents ----------------------------------------------------------------------------


class ConsentAPI:
    """``POST/PUT/GET [base]/Consent``: register, amend, revoke and read consents.

    The controller's own systems may write any consent. A partner may submit a consent
    it collected (GB/T 39725 §11.7.4.1 b 2) only when it is signed by that partner
    (``X-Signature``: a detached JWS over the exact body, ``msgid`` = ``Consent/<id>``)
    and names that partner, and no one else, as recipient; it is recorded as
    partner-submitted. Every write and every refusal is audited.
    """

    def __init__(self, receiver: ReceiverApp) -> None:
        self.r = receiver
        self.c = receiver.c

    async def _read_consent(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        if request.content_type not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                "media type must be application/fhir+json", location="Content-Type"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                "consent larger than this bridge accepts", location="body"
            ) from None
        try:
            resource = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ParseError(
                f"malformed JSON at byte {exc.pos}", location=f"body[{exc.pos}]"
            ) from None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
            raise ParseError("body is not a FHIR Consent", location="Consent.resourceType")
        return body, resource

    def _check_partner_submission(
        self, request: web.Request, partner: str, body: bytes, resource: dict[str, Any]
    ) -> str:
        signature = request.headers.get("X-Signature")
        if not signature:
            raise SignatureError(
                "a partner-submitted consent must be signed", location="X-Signature"
            )
        claims = verify_detached_bytes(
            signature,
            body,
            self.c.keyring,
            expected_issuer=partner,
            expected_audience=self.c.id,
            now=self.c.clock(),
        )
        if claims.message_id != f"Consent/{resource.get('id')}":
            raise SignatureError("signature is for another consent", location="X-Signature#msgid")
        # Partner-submitted consents live in the partner's own id namespace, so a
        # partner can never create or amend a consent this controller's systems wrote
        # (such as one the patient revoked at the hospital).
        if not str(resource.get("id", "")).startswith(f"{partner}."):
            raise PolicyError(
                "a partner-submitted consent's id starts with the partner id and a dot",
                location="Consent.id",
            )
        record = parse_consent(resource)
        recipients = _permit_recipients(record.provision)
        if recipients != {partner}:
            raise PolicyError(
                "a partner may only submit consents that name itself as the only recipient",
                location="Consent.provision.actor",
            )
        return signature

    async def _write(self, request: web.Request, *, consent_id: str | None) -> web.Response:
        c = self.c
        try:
            caller = self.r._caller(request)
        except TrustError as exc:  # no certificate, no partner, or an ambiguous one
            return await self.r._refuse(exc, partner=None, subject="consent")
        subject = f"Consent/{consent_id}" if consent_id else "Consent"
        try:
            body, resource = await self._read_consent(request)
            if consent_id is None:
                resource.setdefault("id", uuid.uuid4().hex)
            elif resource.get("id") != consent_id:
                raise ParseError("Consent.id differs from the id in the URL", location="Consent.id")
            subject = f"Consent/{resource['id']}"
            source = "local"
            if caller is not None:
                signature = self._check_partner_submission(request, caller, body, resource)
                # Reusing an id must not let a partner replace a consent given to
                # someone else (or to several recipients, itself among them).
                existing = await c.db.get_consent(resource["id"])
                if existing is not None:
                    held = parse_consent(orjson.loads(existing.resource))
                    if _permit_recipients(held.provision) != {caller}:
                        raise PolicyError(
                            "a partner may only amend consents that name itself as the only"
                            " recipient",
                            location="Consent.id",
                        )
                source = f"partner:{caller} jws:{signature}"
            stored_id = await c.put_consent(resource, source=source)
        except BridgeError as exc:
            return await self.r._refuse(exc, partner=caller, subject=subject)
        status = 201 if consent_id is None else 200
        location = f"{c.config.server.base_path.rstrip('/')}/Consent/{stored_id}"
        return web.Response(
            status=status,
            body=orjson.dumps(resource),
            content_type=FHIR_JSON,
            headers={"Location": location},
        )

    async def create(self, request: web.Request) -> web.Response:
        return await self._write(request, consent_id=None)

    async def update(self, request: web.Request) -> web.Response:
        return await self._write(request, consent_id=request.match_info["id"])

    async def read(self, request: web.Request) -> web.Response:
        try:
            caller = self.r._caller(request)
            if caller is not None:
                raise PolicyError(
                    "consents are readable by this controller only", location="Consent"
                )
        except BridgeError as exc:
            return await self.r._refuse(exc, partner=None, subject="Consent")
        row = await self.c.db.get_consent(request.match_info["id"])
        if row is None:
            return outcome_response(NotFound("no such consent", location="Consent.id"))
        return web.Response(body=row.resource, content_type=FHIR_JSON)


def _permit_recipients(provision: Any) -> set[str]:
    found: set[str] = set(provision.recipients) if provision.type == "permit" else set()
    for child in provision.children:
        found |= _permit_recipients(child)
    return found
