"""The CapabilityStatement a controller serves at ``GET [base]/metadata``.

Generated from what this controller actually answers for the caller, not kept as a
static file: the claim message it receives when the caller has an inbound link, the
resources, search parameters, includes and ``$everything`` of the caller's pull link
(the types its profile and level carry, and only the date parameters whose elements
that profile releases), and the consent API. The controller's own systems see every
link's features. The protocol version is in an extension.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from bridge.batch import batch_capability
from bridge.messages import PROTOCOL_VERSION
from bridge.records.search import DATE_ELEMENTS, INCLUDES, SEARCH_PARAMS

if TYPE_CHECKING:
    from bridge.config import LinkConfig
    from bridge.link.node import Controller

PROTOCOL_VERSION_EXTENSION = "urn:ws-fhir-bridge:ext:protocol-version"

_SEARCH_TYPES = {
    "token": "token",
    "reference": "reference",
    "date": "date",
    "number": "number",
    "string": "string",
}
_DEFINITIONS = {
    ("Patient", "identifier"): "http://hl7.org/fhir/SearchParameter/Patient-identifier",
    ("Condition", "onset-date"): "http://hl7.org/fhir/SearchParameter/Condition-onset-date",
    ("MedicationRequest", "authoredon"):
        "http://hl7.org/fhir/SearchParameter/MedicationRequest-authoredon",
}
_DOCS = {
    "identifier": "SYSTEM|VALUE, both parts; one patient per request",
    "_id": "the Patient id",
    "patient": "Patient/ID; required: every search concerns one patient",
    "_lastUpdated": "date prefixes eq ne gt lt ge le sa eb on meta.lastUpdated",
    "_count": "page size, 1 to the link's maximum",
    "_cursor": "opaque; only as given in Bundle.link next",
}


def _software_version() -> str:
    try:
        return version("ws-fhir-bridge")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _pull_resources(controller: Controller, link: LinkConfig) -> list[dict[str, Any]]:
    from bridge.link.pull import offered_params, served_types

    profile = controller.profiles[link.id]
    out: list[dict[str, Any]] = []
    for rtype in served_types(profile):
        params = offered_params(profile, rtype)
        kinds = SEARCH_PARAMS[rtype]
        entry: dict[str, Any] = {
            "type": rtype,
            "documentation": (
                f"Released within consent for purposes {', '.join(link.pull_purposes())} and "
                f"the profile {profile.qualified_name}; withheld data is absent."
            ),
            "interaction": [{"code": "search-type"}],
            "searchParam": [],
        }
        if rtype == "Patient":
            entry["interaction"].insert(0, {"code": "read"})
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "GET only; parameters _since (instant), _type, _count",
                }
            ]
        for name in params:
            kind = kinds[name]
            if kind == "special":
                continue
            param: dict[str, Any] = {"name": name, "type": _SEARCH_TYPES[kind]}
            definition = _DEFINITIONS.get((rtype, name))
            if definition is None and name == DATE_ELEMENTS.get(rtype, ("",))[0]:
                definition = f"http://hl7.org/fhir/SearchParameter/clinical-{name}"
            if definition is None and name == "patient":
                definition = "http://hl7.org/fhir/SearchParameter/clinical-patient"
            if definition:
                param["definition"] = definition
            if name in _DOCS:
                param["documentation"] = _DOCS[name]
            entry["searchParam"].append(param)
        includes = [f"{s}:{p}" for (s, p), t in INCLUDES.items()
                    if s == rtype and profile.allows_type(t)]
        if includes and "_include" in params:
            entry["searchInclude"] = includes
        out.append(entry)
    return out


def capability_statement(controller: Controller, caller: str | None) -> dict[str, Any]:
    """The CapabilityStatement for ``caller`` (a partner id, or None for own systems)."""
    links = [
        link for link in controller.config.links
        if caller is None or link.partner == caller
    ]
    software = _software_version()
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            f"Exchange protocol version {PROTOCOL_VERSION} (PROTOCOL.md). Mutual TLS 1.2 or "
            "1.3 with a client certificate issued to a registered partner is required on "
            "every connection and checked again on every request, this endpoint included; "
            "no session resumption; key-exchange groups X25519, P-256 and P-384."
        ),
        "security": {
            "cors": False,
            "description": (
                "Mutual TLS; partner identity from the certificate's URI SAN "
                "urn:ws-fhir-bridge:partner:<id> (and optionally its SHA-256 fingerprint); "
                "messages and pull answers signed with a detached JWS (ES256 or Ed25519) over "
                "the RFC 8785 canonical form in Bundle.signature (X-Signature on a read), "
                "protected header alg, kid, iss, aud, iat and msgid only."
            ),
        },
        "resource": [],
    }
    if any(link.direction == "inbound" for link in links):
        rest["operation"] = [
            {
                "name": "process-message",
                "definition": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
                "documentation": "POST a Bundle of type message; answered with a signed receipt.",
            }
        ]
        server = controller.config.server
        if server.max_batch_entries > 1:
            # Several messages per request (PROTOCOL §6b), within these bounds.
            rest["interaction"] = [{
                "code": "batch",
                "documentation": (
                    "POST [base] a Bundle of type batch whose entries are signed claim "
                    "messages, each POST $process-message; answered with a batch-response "
                    "holding each message's own receipt or OperationOutcome, in order."
                ),
            }]
            rest["extension"] = [batch_capability(server.max_batch_entries, server.max_batch_bytes)]
    pulls = [link for link in links if link.direction == "pull"]
    merged: dict[str, dict[str, Any]] = {}
    for link in pulls:
        for entry in _pull_resources(controller, link):
            merged.setdefault(entry["type"], entry)
    rest["resource"].extend(merged.values())
    rest["resource"].append(
        {
            "type": "Consent",
            "documentation": (
                "The controller's own systems create, update and read consents; a registered "
                "partner may create or update a consent it collected when the request is "
                "signed (X-Signature) and the consent names that partner as its only recipient."
            ),
            "interaction": [{"code": "create"}, {"code": "update"}, {"code": "read"}],
        }
    )
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "id": f"ws-fhir-bridge-{controller.id}",
        "extension": [{"url": PROTOCOL_VERSION_EXTENSION, "valueString": PROTOCOL_VERSION}],
        "url": f"{controller.config.server.base_url()}/metadata",
        "version": software,
        "name": "WsFhirBridge",
        "title": f"ws-fhir-bridge endpoint of {controller.config.controller.name}",
        "status": "active",
        "date": controller.clock().date().isoformat(),
        "publisher": controller.config.controller.name,
        "description": (
            "What this controller serves to the caller: generated from its links. "
            "See conformance/PROTOCOL.md for the normative description."
        ),
        "kind": "instance",
        "software": {"name": "ws-fhir-bridge", "version": software},
        "implementation": {
            "description": controller.config.controller.name,
            "url": controller.config.server.base_url(),
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [rest],
    }
    if any(link.direction == "inbound" for link in links):
        statement["messaging"] = [
            {
                "documentation": (
                    "Claim push (GB/T 39725-2020 11.7): event urn:ws-fhir-bridge:event#"
                    "claim-submit, answered with event receipt."
                ),
                "reliableCache": 0,
                "supportedMessage": [
                    {"mode": "receiver",
                     "definition": "urn:ws-fhir-bridge:MessageDefinition:claim-submit"}
                ],
            }
        ]
    return statement
