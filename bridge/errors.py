"""One exception root for the whole bridge.

Every error carries a stable ``code``, the HTTP status and HL7 ACK code to answer
with, a ``location`` (data element identifier, HL7 segment/field, JSON path, TOML
key) and a ``fault`` that says who broke the contract: ``"peer"`` errors are the
sender's to fix and are never retried, ``"local"`` errors are ours, and
``"transient"`` errors may succeed when tried again.

Messages name *where* something is wrong, never the value found there: errors are
logged and sent to partners, and must not carry health data.
"""

from __future__ import annotations

import errno
import re
from typing import Any, ClassVar, Literal

Fault = Literal["peer", "local", "transient"]


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""

    code: ClassVar[str] = "bridge-error"
    http_status: ClassVar[int] = 500
    ack_code: ClassVar[str] = "AE"
    fault: ClassVar[Fault] = "local"
    # FHIR OperationOutcome.issue.code (http://hl7.org/fhir/issue-type).
    issue_type: ClassVar[str] = "exception"
    # The command line's exit status: 2 for bad input or configuration (the user must
    # change what they typed or wrote), 1 for a runtime failure (something outside the
    # command did not work: a store, a partner, a port someone else holds).
    exit_status: ClassVar[int] = 2
    # The location is this machine's own (a file, a store, a configuration key): it goes
    # to the operator (logs, the command line) and never into an OperationOutcome, which
    # a partner reads.
    local_location: ClassVar[bool] = False

    def __init__(self, message: str, *, location: str | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.detail = detail

    def __str__(self) -> str:
        if self.location:
            return f"{self.message} (at {self.location})"
        return self.message

    def to_operation_outcome(self) -> dict[str, Any]:
        """Render as a FHIR R4 OperationOutcome (no health data, only locations)."""
        issue: dict[str, Any] = {
            "severity": "error",
            "code": self.issue_type,
            "details": {
                "coding": [{"system": "urn:ws-fhir-bridge:error", "code": self.code}],
                "text": self.message,
            },
        }
        if self.location and not self.local_location:
            issue["expression"] = [self.location]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


# --- configuration and data files -------------------------------------------------


class ConfigError(BridgeError):
    """A configuration file is missing, unreadable or names something wrong."""

    code = "config-invalid"
    local_location = True


class UsageError(BridgeError):
    """A command line that does not say what to do: a missing, unknown or malformed
    option or argument."""

    code = "usage"


class RuntimeFailure(BridgeError):
    """The command was well formed but could not be carried out (exit status 1)."""

    code = "runtime-failure"
    local_location = True
    exit_status = 1


class PortInUse(RuntimeFailure):
    """A listening port is already held by another process."""

    code = "port-in-use"


def listen_error(exc: OSError, host: str, port: int, where: str) -> BridgeError:
    """Why a listener could not open ``host:port``, naming the configuration key ``where``."""
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(f"{host}:{port} is already in use by another process", location=where)
    if exc.errno == errno.EACCES:
        return RuntimeFailure(f"no permission to listen on {host}:{port}", location=where)
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return ConfigError(f"{host} is not an address of this machine", location=where)
    return RuntimeFailure(
        f"cannot listen on {host}:{port}: {exc.strerror or type(exc).__name__}", location=where
    )


class LoadError(BridgeError):
    """A mapping, value-set, profile or catalog file in ``mappings/`` is invalid."""

    code = "mapping-file-invalid"
    local_location = True


# --- input --------------------------------------------------------------------------


class ParseError(BridgeError):
    """Input could not be read at all (malformed JSON, broken HL7 framing, encoding)."""

    code = "parse-error"
    http_status = 400
    ack_code = "AR"
    fault = "peer"
    issue_type = "structure"


class UnsupportedMediaType(ParseError):
    """The request body is not declared as FHIR JSON."""

    code = "unsupported-media-type"
    http_status = 415


class UnsupportedEvent(ParseError):
    """The message carries an event this endpoint does not process."""

    code = "unsupported-event"


class PayloadTooLarge(ParseError):
    """The request body is larger than the bridge accepts."""

    code = "payload-too-large"
    http_status = 413
    issue_type = "too-costly"


class NotFound(BridgeError):
    """The requested resource does not exist here."""

    code = "not-found"
    http_status = 404
    fault = "peer"
    issue_type = "not-found"


class MappingError(BridgeError):
    """Input was readable but cannot be mapped: unknown element, bad code, missing required."""

    code = "mapping-error"
    http_status = 422
    ack_code = "AE"
    fault = "peer"
    issue_type = "invalid"


class ValidationError(MappingError):
    """A FHIR resource does not validate as FHIR R4."""

    code = "fhir-invalid"


# --- policy -------------------------------------------------------------------------


class PolicyError(BridgeError):
    """Disclosure is not permitted."""

    code = "policy-denied"
    http_status = 403
    ack_code = "AR"
    fault = "peer"
    issue_type = "forbidden"


class ConsentDenied(PolicyError):
    """No active consent permits this disclosure (deny by default)."""

    code = "consent-denied"

    def __str__(self) -> str:
        # PROTOCOL P-MSG-10: a refusal names the consent as well as the provision that
        # held the data back (the location), so the operator can find what to change.
        consent = self.detail.get("consent_id")
        text = super().__str__()
        return f"{text}; consent {consent}" if consent else text


class ProfileError(PolicyError):
    """The link's minimum-necessary profile does not allow this message."""

    code = "profile-denied"


# --- trust --------------------------------------------------------------------------


class TrustError(BridgeError):
    """Authentication, signature or replay failure."""

    code = "trust-failure"
    http_status = 403
    ack_code = "AR"
    fault = "peer"
    issue_type = "security"


class UnknownPartner(TrustError):
    """A valid certificate that maps to no registered partner (or not to this link)."""

    code = "unknown-partner"
    http_status = 401


class CertificateRejected(TrustError):
    """The connection's client certificate is no longer acceptable (expired, revoked...).

    The handshake checked it; a connection can outlive its certificate, so every
    request checks it again.
    """

    code = "certificate-rejected"
    http_status = 401


class SenderMismatch(TrustError):
    """``MessageHeader.sender`` names someone other than the authenticated partner."""

    code = "sender-mismatch"


class WrongReceiver(TrustError):
    """The message is addressed to another receiver than this bridge."""

    code = "wrong-receiver"


class SignatureError(TrustError):
    """A signature is missing, malformed, made with an unknown key, or does not verify."""

    code = "signature-invalid"


class ReplayError(TrustError):
    """A signed message outside the time window, or addressed to someone else."""

    code = "replay-rejected"


# --- exchange -----------------------------------------------------------------------


class ConflictError(BridgeError):
    """A message identity reused with different content."""

    code = "message-id-conflict"
    http_status = 422
    fault = "peer"
    issue_type = "conflict"


class InFlightError(BridgeError):
    """The same message identity is being processed right now; try again shortly."""

    code = "message-in-progress"
    http_status = 409
    fault = "transient"
    issue_type = "conflict"
    exit_status = 1


class RequestTimeout(BridgeError):
    """The request body did not arrive in time; the sender may send again."""

    code = "request-timeout"
    http_status = 408
    fault = "transient"
    issue_type = "timeout"


class InternalError(BridgeError):
    """An unexpected failure inside the bridge; nothing was stored."""

    code = "internal-error"
    http_status = 500
    fault = "local"


class TransportError(BridgeError):
    """The partner could not be reached or answered with a transient failure."""

    code = "transport-error"
    http_status = 503
    fault = "transient"
    issue_type = "transient"
    exit_status = 1


class PartnerRejected(BridgeError):
    """The partner answered with a definitive rejection; retrying will not help."""

    code = "partner-rejected"
    http_status = 502
    fault = "peer"
    exit_status = 1


class StoreError(BridgeError):
    """The durable store failed; nothing was acknowledged."""

    code = "store-error"
    local_location = True
    http_status = 503
    fault = "transient"
    issue_type = "transient"
    exit_status = 1


# --- naming where in a client's JSON ----------------------------------------------------

# How FHIR writes an element's name (``birthDate``, ``valueQuantity``) and a primitive's
# extension sibling (``_birthDate``): ASCII letters and digits, a letter first.
_ELEMENT_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")
#: The longest JSON path an error names; a deeper one is cut, marked with "...".
MAX_PATH = 200


def member_label(name: str) -> str:
    """How an error names a member of a client's JSON object: its name when it is written
    as FHIR element names are, else ``*``. The name is the client's text: a member named
    after a patient (``"张三 330108…": 1``) is a value, not a place, and so is one that
    spells a number in element-name form (``id110101199003074512``): no element name
    holds six digits in a row."""
    return name if _ELEMENT_NAME.fullmatch(name) and not has_digit_run(name) else "*"


def bounded_path(path: str) -> str:
    """``path`` cut to :data:`MAX_PATH` characters (deep nesting makes long paths, and
    an error's location goes into the audit trail)."""
    return path if len(path) <= MAX_PATH else path[: MAX_PATH - 3] + "..."


# A system URI or a code as a profile selects by it (``urn:oid:2.16.156.10011.1.13``,
# ``mobile``): no spaces, no run of six digits or more (which a record number or an ID
# number has, and an OID's arcs do not).
_SELECTOR = re.compile(r"[A-Za-z0-9:._/\-]{1,100}")
_DIGIT_RUN = re.compile(r"[0-9]{6}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def has_digit_run(text: str) -> bool:
    """Does ``text`` hold six digits in a row, as a record number, an ID number or a
    telephone number does (and an OID's arcs, a FHIR path or an offset do not)? Text
    that does is not repeated in an error, a log or a refusal."""
    return _DIGIT_RUN.search(text) is not None


def is_fhir_id(value: object) -> bool:
    """Is ``value`` a FHIR id (R4 ``id``: 1-64 of ``A-Z a-z 0-9 - .``), the whole text?"""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None


# Texts value_label names as they are (systems and codes, never a value): the same few
# recur on every record a profile selects from. Bounded; what is named ``*`` is not kept.
_SELECTORS_SEEN: set[str] = set()
_SELECTORS_SEEN_MAX = 4096


def value_label(value: Any) -> str:
    """How an error or a removed path names the value a selection was made by (the
    system of an identifier left out): as it is when it reads as a system or a code,
    else ``*``: the value is the sender's text."""
    text = str(value)
    if text in _SELECTORS_SEEN:
        return text
    if _SELECTOR.fullmatch(text) and not has_digit_run(text):
        if len(_SELECTORS_SEEN) >= _SELECTORS_SEEN_MAX:
            _SELECTORS_SEEN.clear()
        _SELECTORS_SEEN.add(text)
        return text
    return "*"
