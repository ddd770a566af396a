"""Controller configuration: one TOML file per controller, parsed into typed models.

Relative paths in the file are resolved against the file's own folder, so a
configuration and its PKI can be moved together. An error names the file and the
key that is wrong.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.errors import BridgeError, ConfigError, has_digit_run
from bridge.files import read_bounded

_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*\Z")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> object:
    """``"72h"``, ``"30m"``, ``"3d"``, ``"90s"`` as seconds; numbers pass unchanged."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError('a duration is seconds or a number with s, m, h or d ("72h")')
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return value


def https_url(value: str) -> str:
    """A URL the exchange reaches over mutual TLS: scheme https, a host, a valid port."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "https" or not parts.hostname or port == -1:
        raise ValueError("must be an https URL with a host (https://host:port/fhir):"
                         " partners talk mutual TLS")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password")
    return value


def known_purpose(value: str) -> str:
    """A purpose of use (v3 PurposeOfUse) this bridge understands, or an error listing them."""
    from bridge.policy.consent import SUPPORTED_PURPOSES

    if value not in SUPPORTED_PURPOSES:
        raise ValueError(f"{value!r} is not a purpose of use this bridge knows (one of"
                         f" {', '.join(sorted(SUPPORTED_PURPOSES))})")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControllerConfig(_Strict):
    """Who this bridge speaks for."""

    id: str = Field(pattern=_ID_PATTERN, description="short controller id, e.g. hospital-a")
    name: str = Field(min_length=1, description="organisation name for humans")
    organization_code: str | None = Field(
        default=None, description="organisation code (WS/T 500 OID 2.16.156.10011.1.5)"
    )


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    base_path: str = "/fhir"
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=1024)
    public_url: str | None = Field(
        default=None, description="base URL partners use; defaults to https://host:port/base_path"
    )
    local_client_fingerprints: list[str] = Field(
        default_factory=list,
        description=(
            "SHA-256 fingerprints of the client certificates this controller's own systems "
            "use (HIS, patient app back end); when set, a certificate naming this controller "
            "is accepted only if pinned here"
        ),
    )

    handshake_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="a TLS handshake not finished this long after the connection opened is cut off",
    )
    header_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        le=60,
        description=(
            "a connection that has not sent a complete request head this long after its "
            "handshake or its previous response is closed (slow or idle clients)"
        ),
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a request body not received within this long is answered 408",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="asyncio",
        description=(
            "event loop of bridge serve: the standard library's (default), uvloop, or auto"
            " (uvloop when installed); the BRIDGE_EVENT_LOOP environment variable overrides it"
        ),
    )
    max_streams_per_partner: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description=(
            "most sync streams (a partner's outbound links to this controller, PROTOCOL"
            " P-SYNC-10) taken from one partner; a claim naming a new one past it is 400"
            " sync-invalid. Each is a row of bridge sync status and a series of the metrics;"
            " a conformance kit run names four new ones"
        ),
    )
    max_batch_entries: int = Field(
        default=64,
        ge=0,
        le=1000,
        description=(
            "most messages one batch request (POST [base], PROTOCOL §6b) may carry; 0 turns"
            " the batch capability off (partners then send one message per request)"
        ),
    )
    max_batch_bytes: int = Field(
        default=16 * 1024 * 1024,
        gt=1024,
        description="largest batch request body accepted; each message in it is still bounded by max_body_bytes",
    )

    @field_validator("local_client_fingerprints")
    @classmethod
    def _normalise(cls, value: list[str]) -> list[str]:
        return [v.lower().replace(":", "") for v in value]

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else https_url(value)

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"https://{self.host}:{self.port}{self.base_path}"


class TLSConfig(_Strict):
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


class SigningKeyConfig(_Strict):
    """A further signing key, for links that choose its algorithm."""

    cert: Path
    key: Path


class SigningConfig(_Strict):
    """The signing key and certificate; the algorithm follows the key (EC P-256 gives
    ES256, Ed25519 gives the fully specified JOSE algorithm ``Ed25519``). ``keys`` adds
    keys of other algorithms, one per algorithm, for links whose
    ``signature_algorithm`` names them."""

    cert: Path
    key: Path
    keys: list[SigningKeyConfig] = Field(
        default_factory=list, description="further signing keys (cert, key), one per algorithm"
    )


class StoreConfig(_Strict):
    """Where the ledger lives.

    ``kind = "sqlite"`` (default): one embedded file at ``path``, for one bridge process.
    ``kind = "postgresql"``: a PostgreSQL database at ``dsn`` (a libpq connection string
    or URI; keep any password in ``PGPASSWORD`` or ``~/.pgpass`` rather than here), shared
    by several bridge processes of this controller; the tables live in ``schema``, so
    several controllers may share one database in separate schemas. ``path`` is
    ignored for PostgreSQL.
    """

    # The TOML key is ``schema``; the attribute is ``db_schema`` because pydantic's
    # BaseModel already has a ``schema`` attribute.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True,
                              validate_by_alias=True)

    kind: Literal["sqlite", "postgresql"] = "sqlite"
    path: Path = Path("bridge.sqlite")
    dsn: str | None = Field(default=None, validate_default=True, repr=False,
                            description="PostgreSQL connection string; required for postgresql")
    db_schema: str = Field(default="bridge", alias="schema",
                           pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                           description="PostgreSQL schema holding this controller's tables")
    # Encryption at rest (bridge.ledger.seal): the key-encryption key is read from a file
    # or an environment variable named here, never written in this file.
    data_key_file: Path | None = Field(
        default=None, description="file holding the 32-byte key-encryption key (raw, hex or base64)")
    data_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="environment variable holding the key-encryption key (hex or base64)")

    # The configuration file this section came from, so a store that cannot be opened
    # is reported against the file and key (set by BridgeConfig; not a TOML key).
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @field_validator("dsn")
    @classmethod
    def _dsn_for_postgresql(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") == "postgresql" and not (value and value.strip()):
            raise ValueError("required when kind is postgresql")
        return value


class AuditConfig(_Strict):
    pseudonym_key_file: Path = Path("audit-pseudonym.key")


#: Mainland China. A partner elsewhere (Hong Kong, Macao and Taiwan included) is across
#: the border for data export (GB/T 39725 §7 o-q).
MAINLAND = "CN"
#: Items a data security committee may approve for transfer abroad; more needs the
#: relevant authority (GB/T 39725 §7 o and p).
COMMITTEE_ITEM_CAP = 250
# Dates in the configuration are calendar days in China (UTC+8).
_CST = timezone(timedelta(hours=8))


def day_start(value: date | datetime) -> datetime:
    """The instant a configured date or date-time begins (a date: 00:00 China time)."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=_CST)
    return datetime.combine(value, time(0), tzinfo=_CST)


def day_end(value: date | datetime) -> datetime:
    """The instant a configured date or date-time ends (a date: the following midnight)."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=_CST)
    return datetime.combine(value, time(0), tzinfo=_CST) + timedelta(days=1)


class CrossBorderApproval(_Strict):
    """The approval under which data may go to a partner outside the mainland.

    A data security committee may approve at most 250 items in all (GB/T 39725 §7 o,
    p); a larger cap needs the approval of the relevant authority (``regulator``).
    """

    reference: str = Field(min_length=1, description="the approval document's reference")
    authority: Literal["committee", "regulator"] = Field(
        description="who approved: the data security committee, or the relevant authority"
    )
    item_cap: int = Field(ge=1, description="items that may be sent under it, in all")
    expires: date | datetime = Field(description="last day (or instant) the approval holds")

    @model_validator(mode="after")
    def _committee_cap(self) -> CrossBorderApproval:
        if self.authority == "committee" and self.item_cap > COMMITTEE_ITEM_CAP:
            raise ValueError(
                f"item_cap: a committee approval covers at most {COMMITTEE_ITEM_CAP} items"
                " (GB/T 39725 §7 p); more needs authority = \"regulator\""
            )
        return self


class PartnerConfig(_Strict):
    id: str = Field(pattern=_ID_PATTERN)
    name: str = ""
    base_url: str | None = Field(default=None, description="required for outbound links")
    signing_certs: list[Path] = Field(min_length=1)
    tls_fingerprints: list[str] = Field(
        default_factory=list, description="SHA-256 hex fingerprints; empty = trust the URI SAN"
    )
    tls_ca: Path | None = Field(
        default=None,
        description=(
            "PEM file of the CA certificate(s) that issue this partner's TLS certificates;"
            " required when [tls] ca holds more than one CA (unless tls_fingerprints pin"
            " the partner's certificates)"
        ),
    )

    jurisdiction: str = Field(
        default=MAINLAND, pattern=r"^[A-Z]{2}$",
        description="ISO 3166 code of where the partner keeps data; CN = mainland China",
    )
    cross_border: CrossBorderApproval | None = Field(
        default=None, description="approval for sending to a partner outside the mainland"
    )

    @field_validator("tls_fingerprints")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.lower().replace(":", "") for v in value]

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        # A mistyped address would otherwise be found only by a claim retried until it
        # is given up, as a transport error.
        return None if value is None else https_url(value)

    @property
    def abroad(self) -> bool:
        return self.jurisdiction != MAINLAND


class AgreementConfig(_Strict):
    """A data-use agreement between this controller and a partner (GB/T 39725 §7 m,
    §11.7.4.1 a 2 and a 4, Appendix F): what a link may carry, for what, until when,
    and how long the recipient keeps it."""

    id: str = Field(pattern=_ID_PATTERN, description="the agreement's id (named in refusals)")
    reference: str = Field(default="", description="where the signed agreement is filed")
    parties: list[str] = Field(min_length=2, description="controller ids bound by it")
    purposes: list[str] = Field(min_length=1, description="purposes of use (v3 PurposeOfUse)")
    permitted_data: list[str] = Field(
        min_length=1, description="FHIR resource types the agreement lets the link carry"
    )
    duties: list[str] = Field(default_factory=list, description="the recipient's duties")
    valid_from: date | datetime = Field(description="first day (or instant) it holds")
    valid_to: date | datetime = Field(description="last day (or instant) it holds")
    retention_days: int = Field(
        ge=1, le=36500,
        description="days the recipient keeps received data before it is destroyed",
    )

    @field_validator("purposes")
    @classmethod
    def _known_purposes(cls, value: list[str]) -> list[str]:
        return [known_purpose(p) for p in value]

    @model_validator(mode="after")
    def _span(self) -> AgreementConfig:
        if day_end(self.valid_to) <= day_start(self.valid_from):
            raise ValueError("valid_to: ends before valid_from")
        return self

    def starts(self) -> datetime:
        return day_start(self.valid_from)

    def ends(self) -> datetime:
        return day_end(self.valid_to)


#: Operator roles, least privilege first (see :mod:`bridge.compliance.operators`).
ROLES = ("viewer", "operator", "consent-admin", "key-admin")


class OperatorConfig(_Strict):
    """A person who runs this bridge: a name, one role, and how they are recognised.

    ``name`` is what the operator certificate names (``bridge operators issue``) and
    what audit entries record (``cert:<name>``); ``os_users`` are the host accounts that
    act as this operator when they run ``bridge`` commands on the host.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="operator name")
    role: Literal["viewer", "operator", "consent-admin", "key-admin"] = Field(
        description="viewer, operator (data import and requeue), consent-admin or key-admin"
    )
    os_users: list[str] = Field(
        default_factory=list, description="host user names that act as this operator"
    )
    fingerprints: list[str] = Field(
        default_factory=list,
        description="SHA-256 pins of this operator's certificates; empty = any issued to the name",
    )

    @field_validator("fingerprints")
    @classmethod
    def _pins(cls, value: list[str]) -> list[str]:
        return [v.lower().replace(":", "") for v in value]


#: Purposes a platform may state on a pull link (GB/T 39725 §11.1): treatment, healthcare
#: operations, public health. Emergency treatment (ETREAT) is the override, not a purpose
#: a link lists.
PULL_PURPOSES = frozenset({"TREAT", "HOPERAT", "PUBHLTH"})


class PullConfig(_Strict):
    """How a pull link answers (``[links.pull]`` of a link with ``direction = "pull"``),
    or how a ``pull-from`` link asks."""

    purposes: list[str] = Field(
        default_factory=list,
        description=(
            "purposes of use (TREAT, HOPERAT, PUBHLTH) the partner may state; the link's "
            "purpose when empty. On a pull-from link: the first is the one requests state"
        ),
    )
    level: Literal["default", "notify", "authorise"] | None = Field(
        default=None,
        description="level of a profile with levels (regional-interoperability); default: default",
    )
    override_allowed: bool = Field(
        default=False,
        description="grant emergency override requests (purpose ETREAT with actor and reason)",
    )
    no_consent: Literal["empty", "forbidden"] = Field(
        default="empty",
        description=(
            "answer to a request for a patient without a permitting consent: an empty "
            "searchset, or 403 (both are given for unknown patients too)"
        ),
    )
    max_count: int = Field(default=200, ge=1, le=1000, description="largest _count accepted")
    default_count: int = Field(default=50, ge=1, le=1000, description="page size without _count")
    rate_per_second: float = Field(
        default=20.0, gt=0, description="requests per second per partner (token bucket)"
    )
    rate_burst: int = Field(default=40, ge=1, description="requests a partner may send at once")
    bulk_alarm_patients: int = Field(
        default=200, ge=1, description="distinct patients asked about in the window that alarm"
    )
    bulk_alarm_window_seconds: int = Field(default=3600, ge=1, description="alarm window")
    cursor_ttl_seconds: int = Field(
        default=3600, ge=1, le=86400,
        description="life of a page cursor; a later next link gets 410 cursor-expired",
    )

    @field_validator("purposes")
    @classmethod
    def _known_purposes(cls, value: list[str]) -> list[str]:
        for purpose in value:
            if purpose not in PULL_PURPOSES:
                raise ValueError(f"{purpose!r} is not a pull purpose (TREAT, HOPERAT, PUBHLTH)")
        return value

    @model_validator(mode="after")
    def _pages(self) -> PullConfig:
        if self.default_count > self.max_count:
            raise ValueError("default_count: larger than max_count")
        return self


class LinkConfig(_Strict):
    id: str = Field(pattern=_ID_PATTERN)
    partner: str = Field(pattern=_ID_PATTERN)
    direction: Literal["outbound", "inbound", "pull", "pull-from"] = Field(
        description=(
            "outbound/inbound: claim push; pull: the partner pulls records from this "
            "controller; pull-from: this controller pulls records from the partner"
        )
    )
    profile: str = Field(
        default="commercial-insurance",
        description="a shipped profile name (mappings/links/<name>.yaml) or a path to a .yaml file",
    )
    purpose: str = "HPAYMT"
    max_attempts: int | None = Field(
        default=None,
        ge=1,
        description="no longer used: a claim is given up by give_up_after, never by a count",
    )
    give_up_after: float = Field(
        default=72 * 3600.0,
        gt=0,
        description=(
            "how long a claim is retried before it is dead-lettered: seconds, or a"
            ' duration such as "72h", "30m", "3d"; a claim the partner may hold is never'
            " given up"
        ),
    )
    probe_cap_seconds: float = Field(
        default=10.0,
        gt=0,
        description="longest wait between two probes of a partner that is down",
    )
    reconcile_interval_seconds: float = Field(
        default=3600.0,
        ge=0,
        description=(
            "how often a running bridge asks the partner which acknowledged claims it holds"
            " and resends what it lacks; 0 turns it off"
        ),
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=16 * 1024,
        le=64 * 1024 * 1024,
        description=(
            "largest signed claim queued on this link (the partner's body limit: 4 MiB by"
            " default, PROTOCOL P-HTTP-3); a record that maps to more, or whose file is more"
            " than twice as large, is refused when it is pushed, naming this key"
        ),
    )
    concurrency: int = Field(default=16, ge=1, le=256)
    batch: int = Field(default=64, ge=1, le=1000)
    max_batch_entries: int = Field(
        default=32,
        ge=0,
        le=1000,
        description=(
            "most claims sent in one batch request to a partner that offers batches"
            " (PROTOCOL §6b); 0 sends one message per request"
        ),
    )
    capability_ttl_seconds: float = Field(
        default=300.0,
        gt=0,
        description="how long the partner's CapabilityStatement (batch offer) is trusted before it is read again",
    )
    retry_base_seconds: float = Field(default=0.5, gt=0)
    retry_cap_seconds: float = Field(default=300.0, gt=0)
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    pull: PullConfig = Field(default_factory=PullConfig, description="record pull settings")
    agreement: str | None = Field(
        default=None, description="id of the data-use agreement ([[agreements]]) the link carries"
    )
    consent_without_end: Literal["refuse", "cap"] = Field(
        default="cap",
        description=(
            "a consent whose period has no end: refused on this link, or counted as ending"
            " consent_cap_days after its start (or its dateTime)"
        ),
    )
    consent_cap_days: int = Field(
        default=365, ge=1, le=3650, description="life of a consent without an end, on this link"
    )
    deid_key_file: Path | None = Field(
        default=None,
        description="file holding this link's de-identification key (hex, at least 16 bytes)"
        " for profiles with keyed transforms; the key is never written in the configuration",
    )
    deid_key_env: str | None = Field(
        default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,63}$",
        description="environment variable holding this link's de-identification key (hex)",
    )
    partner_consent_purposes: list[str] = Field(
        default_factory=list,
        description=(
            "purposes for which the link's partner may itself submit consents naming it as"
            " recipient (consent API); empty: its consents authorise nothing on this link"
        ),
    )
    signature_algorithm: str | None = Field(
        default=None,
        description=(
            "JWS alg this controller signs with on the link and the only one (with those of"
            " its other links with the partner) it accepts from the partner; default: the"
            " algorithm of [signing]'s key, accepting any of the partner's signing keys"
        ),
    )

    @field_validator("signature_algorithm")
    @classmethod
    def _registered_algorithm(cls, value: str | None) -> str | None:
        from bridge.trust import algorithms

        if value is not None and algorithms.get(value) is None:
            raise ValueError(
                f"{value!r} is not a signature algorithm (one of {', '.join(algorithms.names())})"
            )
        return value

    @field_validator("purpose")
    @classmethod
    def _known_purpose(cls, value: str) -> str:
        # A misspelt purpose would otherwise refuse every record as not permitted by
        # the patient's consent.
        return known_purpose(value)

    @field_validator("partner_consent_purposes")
    @classmethod
    def _known_purposes(cls, value: list[str]) -> list[str]:
        return [known_purpose(p) for p in value]

    @field_validator("give_up_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    def pull_purposes(self) -> list[str]:
        """Purposes a request on this pull link may state."""
        return list(self.pull.purposes) or [self.purpose]

    def profile_ref(self) -> str:
        """The profile as :func:`bridge.policy.profile.load_link_profile` takes it
        (``name:level`` for a pull link of a profile with levels)."""
        if self.pull.level and ":" not in self.profile and not self.profile.endswith(
            (".yaml", ".yml")
        ):
            return f"{self.profile}:{self.pull.level}"
        return self.profile


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
#: A Host header's value: a DNS name, an IPv4 address or a bracketed IPv6 one, and a port.
_HOST_NAME = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(:[0-9]{1,5})?")


class MLLPConfig(_Strict):
    """The HL7 v2 listener (MLLP). Absent section: no listener.

    With ``tls = true`` (the default) the listener uses this controller's ``[tls]``
    files and requires a client certificate from its CA, like the HTTP listener.
    ``tls = false`` is allowed only on a loopback address (a local integration
    engine or a TLS terminator on the same host): no plaintext port faces the network.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=2575, ge=0, le=65535, description="0 picks a free port")
    tls: bool = True
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    frame_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description=(
            "a frame whose start block arrived this long ago without its end block is"
            " dropped and the connection closed (a peer that stalls or trickles a message)"
        ),
    )
    idle_timeout_seconds: float = Field(
        default=0.0,
        ge=0,
        le=7 * 24 * 3600,
        description=(
            "a connection with no frame in progress that has received nothing and been"
            " answered nothing this long is closed; 0 (the default) keeps it open, as HIS"
            " interfaces hold one connection open between messages"
        ),
    )
    allowed_facilities: list[str] = Field(
        default_factory=list,
        description="MSH-4 values (whole field or its first component) accepted; empty = any",
    )
    allowed_client_fingerprints: list[str] = Field(
        default_factory=list,
        description=(
            "SHA-256 fingerprints of further client certificates allowed to send HL7 over TLS "
            "(an integration engine with a certificate of its own); certificates issued to "
            "this controller are allowed as for [server] local_client_fingerprints"
        ),
    )

    @field_validator("allowed_client_fingerprints")
    @classmethod
    def _normalise_pins(cls, value: list[str]) -> list[str]:
        return [v.lower().replace(":", "") for v in value]

    @model_validator(mode="after")
    def _no_public_plaintext(self) -> MLLPConfig:
        if not self.tls and self.host not in _LOOPBACK_HOSTS:
            raise ValueError("tls = false is allowed only on a loopback host")
        return self


_MESSAGE_TYPE = r"^[A-Z]{3}\^[A-Z0-9]{3}$"
_DATASET = r"^WS445\.[0-9]{1,2}$"


class IntakeConfig(_Strict):
    """How HL7 v2 from the HIS becomes records: the site's overlay, visit assembly."""

    site: Path | None = Field(
        default=None,
        description=(
            "a site directory overlaying the shipped mappings/ files one by one (value sets, "
            "identifier type codes, HL7 message mappings, visit files, charge items, "
            "facilities); relative to the configuration file"
        ),
    )
    correction_days: int = Field(
        default=30, ge=0, le=3650,
        description=(
            "days after a visit's discharge during which corrections (ADT^A08, DFT^P03) "
            "still produce a corrected claim; later messages for the visit are refused"
        ),
    )
    biometric_key_file: Path = Field(
        default=Path("biometric.key"),
        description=(
            "key (64 hex digits) of the digests that replace elements a mapping marks"
            " biometric; made (mode 600) when first needed; relative to the configuration file"
        ),
    )


class RouteConfig(_Strict):
    """One routing rule: records from a source go to links. Empty lists match anything."""

    id: str = Field(default="", description="a name shown by bridge intake list")
    message: list[str] = Field(
        default_factory=list,
        description="MSH-9 types (ADT^A03); for a visit record, the message that completes it",
    )
    dataset: list[str] = Field(default_factory=list, description="data sets (WS445.10)")
    facility: list[str] = Field(
        default_factory=list,
        description="sending organisations: organisation code, or MSH-4.1 as sent",
    )
    links: list[str] = Field(min_length=1, description="outbound links the record goes to")

    @field_validator("message")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        import re

        for item in value:
            if not re.fullmatch(_MESSAGE_TYPE, item):
                raise ValueError("message types look like ADT^A03")
        return value

    @field_validator("dataset")
    @classmethod
    def _datasets(cls, value: list[str]) -> list[str]:
        import re

        for item in value:
            if not re.fullmatch(_DATASET, item):
                raise ValueError("data sets look like WS445.10")
        return value


class HandoffConfig(_Strict):
    """One destination in this controller's own systems that received claims are handed to.

    Every claim accepted from a partner (and acknowledged with a signed receipt) is
    queued, in the same transaction as the inbox row, for each destination whose
    ``senders`` and ``links`` take it, and handed over at least once, in the order it
    was accepted per sender: ``kind = "http"`` POSTs to ``url`` until it answers 2xx;
    ``kind = "amqp"`` publishes a persistent message to RabbitMQ with publisher
    confirms. Secrets stay out of this file: a password or token is read from the
    environment variable or file named here, never written in the URL.
    """

    id: str = Field(pattern=_ID_PATTERN, description="destination id, shown by status and inbox")
    kind: Literal["http", "amqp"] = Field(description="http (POST) or amqp (RabbitMQ)")
    url: str = Field(
        description="http(s)://... endpoint, or amqp(s)://host:port/vhost (no password in it)"
    )
    senders: list[str] = Field(
        default_factory=list, description="partner ids whose claims it takes; empty = every sender"
    )
    links: list[str] = Field(
        default_factory=list, description="inbound link ids it takes; empty = every inbound link"
    )
    retry_base_seconds: float = Field(default=0.5, gt=0, description="first backoff ceiling")
    retry_cap_seconds: float = Field(default=60.0, gt=0, description="largest backoff ceiling")
    give_up_after_seconds: float = Field(
        default=86400.0, gt=0,
        description="a claim not taken within this long of being queued (or requeued) is dead",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600,
                                   description="one POST or publish-and-confirm")
    batch: int = Field(default=32, ge=1, le=1000, description="hand-offs taken per round")
    # HTTP
    ca: Path | None = Field(default=None, description="CA bundle for an https endpoint")
    client_cert: Path | None = Field(default=None, description="client certificate (PEM)")
    client_key: Path | None = Field(default=None, description="its private key (PEM)")
    token_env: str | None = Field(
        default=None, description="environment variable holding a bearer token"
    )
    token_file: Path | None = Field(default=None, description="file holding a bearer token")
    # AMQP
    username: str | None = Field(default=None, description="AMQP user (default: from the URL)")
    password_env: str | None = Field(
        default=None, description="environment variable holding the AMQP password"
    )
    password_file: Path | None = Field(default=None, description="file holding the AMQP password")
    exchange: str = Field(default="", description='exchange to publish to; "" = default exchange')
    exchange_type: Literal["direct", "fanout", "topic", "headers"] = "direct"
    queue: str | None = Field(default=None, description="durable queue declared and bound")
    routing_key: str | None = Field(default=None, description="default: the queue name")
    queue_arguments: dict[str, str | int] = Field(
        default_factory=dict, description='queue arguments, e.g. {"x-queue-type" = "quorum"}'
    )
    declare: bool = Field(
        default=True, description="declare the exchange and queue (durable) on connect"
    )

    @field_validator("url")
    @classmethod
    def _url_fits_kind(cls, value: str, info: ValidationInfo) -> str:
        from urllib.parse import urlsplit

        kind = info.data.get("kind")
        parts = urlsplit(value)
        schemes = {"http": ("http", "https"), "amqp": ("amqp", "amqps")}.get(str(kind), ())
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {' or '.join(schemes)} URL with a host for kind {kind}")
        if parts.password is not None:
            raise ValueError(
                "must not hold a password; name it with password_env, password_file,"
                " token_env or token_file"
            )
        return value

    @model_validator(mode="after")
    def _kind_options(self) -> HandoffConfig:
        if self.kind == "amqp" and not self.queue and not self.exchange:
            raise ValueError("queue: an amqp destination needs a queue or an exchange")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_key: client_cert and client_key go together")
        if self.token_env and self.token_file:
            raise ValueError("token_file: give token_env or token_file, not both")
        if self.password_env and self.password_file:
            raise ValueError("password_file: give password_env or password_file, not both")
        return self


class OperationsConfig(_Strict):
    """The operations port: ``/healthz``, ``/readyz``, ``/metrics`` and the status page.

    Plain HTTP without authentication, so it listens on a loopback address only: the
    status page can requeue dead letters and the metrics describe the traffic. Binding
    it elsewhere needs ``allow_remote = true``, for a host whose own reverse proxy
    authenticates operators and terminates TLS in front of it. Requeueing is accepted
    from a loopback peer only, whatever the binding.
    """

    # allow_remote comes first so that the check of host can see it.
    allow_remote: bool = Field(
        default=False, description="allow a non-loopback host (behind an authenticating proxy)"
    )
    host: str = Field(default="127.0.0.1", description="listen address; loopback unless allow_remote")
    port: int = Field(default=9464, ge=0, le=65535, description="0 picks a free port")
    host_names: list[str] = Field(
        default_factory=list,
        description=(
            "with auth = loopback, the Host names the port also answers to (a reverse"
            " proxy's name, NAME or NAME:PORT) besides loopback names and the listen address"
        ),
    )
    sample_seconds: float = Field(
        default=15.0, ge=0.05, le=600, description="how often queue depth is sampled for the chart"
    )
    certificate_warning_days: int = Field(
        default=30, ge=1, le=3650, description="/readyz fails when a certificate expires sooner"
    )
    partner_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="how long /readyz waits for each partner"
    )
    auth: Literal["loopback", "certificate"] = Field(
        default="loopback",
        description=(
            "loopback: plain HTTP, no login (requeue from loopback with the form token);"
            " certificate: HTTPS with an operator certificate and the role each page needs"
        ),
    )
    operator_ca: Path | None = Field(
        default=None, description="CA bundle operator certificates chain to; default [tls] ca"
    )
    max_failed_attempts: int = Field(
        default=5, ge=1, le=1000,
        description="refused requests from one address within failure_window_seconds that lock it out",
    )
    failure_window_seconds: float = Field(default=300.0, gt=0, description="window for failures")
    lockout_seconds: float = Field(
        default=900.0, gt=0, description="how long a locked-out address is refused"
    )
    idle_timeout_seconds: float = Field(
        default=300.0, gt=0, le=3600, description="an idle operator connection is closed after this"
    )

    @field_validator("host_names")
    @classmethod
    def _host_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for name in value:
            if not _HOST_NAME.fullmatch(name):
                raise ValueError("each entry is a host name or address, optionally with :PORT")
        if value and not info.data.get("allow_remote"):
            raise ValueError("names other than loopback are for a port behind a proxy:"
                             " set allow_remote = true as well")
        return [name.lower() for name in value]

    @field_validator("host")
    @classmethod
    def _loopback_unless_allowed(cls, value: str, info: ValidationInfo) -> str:
        if value not in _LOOPBACK_HOSTS and not info.data.get("allow_remote"):
            raise ValueError(
                "the operations port has no authentication and listens on loopback only;"
                " set allow_remote = true to put it behind an authenticating proxy"
            )
        return value


class BridgeConfig(_Strict):
    controller: ControllerConfig
    server: ServerConfig = ServerConfig()
    tls: TLSConfig
    signing: SigningConfig
    store: StoreConfig = StoreConfig()
    audit: AuditConfig = AuditConfig()
    partners: list[PartnerConfig] = Field(default_factory=list)
    links: list[LinkConfig] = Field(default_factory=list)
    mllp: MLLPConfig | None = None
    intake: IntakeConfig = IntakeConfig()
    routes: list[RouteConfig] = Field(default_factory=list)
    handoff: list[HandoffConfig] = Field(default_factory=list)
    operations: OperationsConfig | None = None
    agreements: list[AgreementConfig] = Field(
        default_factory=list, description="data-use agreements links carry"
    )
    operators: list[OperatorConfig] = Field(
        default_factory=list, description="the people who run this bridge, with their roles"
    )
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _cross_check(self) -> BridgeConfig:
        self.store._source = self.source
        self._check_ports()
        partner_ids = [p.id for p in self.partners]
        if len(set(partner_ids)) != len(partner_ids):
            raise ValueError("partners: duplicate partner id")
        seen_links: set[str] = set()
        for i, link in enumerate(self.links):
            if link.id in seen_links:
                raise ValueError(f"links[{i}].id: duplicate link id")
            seen_links.add(link.id)
            if link.direction == "outbound" and has_digit_run(link.id):
                # The id travels as the claims' stream (PROTOCOL P-SYNC-1), which a receiver
                # refuses with six digits in a row (the form of a record or ID number).
                raise ValueError(f"links[{i}].id: an outbound link id has no six digits in a row")
            if link.partner not in partner_ids:
                raise ValueError(f"links[{i}].partner: no partner with that id")
            partner = next(p for p in self.partners if p.id == link.partner)
            if link.direction in ("outbound", "pull-from") and not partner.base_url:
                raise ValueError(f"partners.{partner.id}.base_url: needed by {link.direction} link")
            if link.direction == "pull" and link.purpose not in PULL_PURPOSES and not (
                link.pull.purposes
            ):
                raise ValueError(f"links[{i}].purpose: a pull link's purpose is TREAT, HOPERAT"
                                 " or PUBHLTH (or list them in pull.purposes)")
            if link.direction in ("outbound", "pull") and partner.abroad and not (
                partner.cross_border
            ):
                raise ValueError(
                    f"partners.{partner.id}.cross_border: the partner is outside the mainland"
                    f" (jurisdiction {partner.jurisdiction}); link {link.id} sends to it only"
                    " under an approval (reference, authority, item_cap, expires)"
                )
            if link.agreement is not None:
                self._check_agreement(i, link)
            _check_profile(i, link)
            if any(other.partner == link.partner and (other.signature_algorithm is None) != (
                    link.signature_algorithm is None) for other in self.links):
                # What the partner's signatures are accepted under is one list.
                raise ValueError(
                    f"links[{i}].signature_algorithm: name one on every link with partner"
                    f" {link.partner}, or on none"
                )
        self._check_operators()
        inbound = {link.id for link in self.links if link.direction == "inbound"}
        seen_destinations: set[str] = set()
        for i, dest in enumerate(self.handoff):
            if dest.id in seen_destinations:
                raise ValueError(f"handoff[{i}].id: duplicate destination id")
            seen_destinations.add(dest.id)
            for j, sender in enumerate(dest.senders):
                if sender not in partner_ids:
                    raise ValueError(f"handoff[{i}].senders[{j}]: no partner with that id")
            for j, link_id in enumerate(dest.links):
                if link_id not in inbound:
                    raise ValueError(f"handoff[{i}].links[{j}]: no inbound link with that id")
        outbound = {link.id for link in self.links if link.direction == "outbound"}
        for i, route in enumerate(self.routes):
            for j, link_id in enumerate(route.links):
                if link_id not in outbound:
                    raise ValueError(f"routes[{i}].links[{j}]: no outbound link with that id")
        return self

    def _check_ports(self) -> None:
        """Each listener has a port of its own (0 asks for a free one, so never clashes):
        two on one port would leave the second unable to start, blaming another process."""
        listeners = [("server.port", self.server.port)]
        if self.operations is not None:
            listeners.append(("operations.port", self.operations.port))
        if self.mllp is not None:
            listeners.append(("mllp.port", self.mllp.port))
        for n, (key, port) in enumerate(listeners):
            for other, other_port in listeners[n + 1:]:
                if port and port == other_port:
                    raise ValueError(f"{key}: {port} is also {other}; each listener needs a"
                                     " port of its own")

    def _check_agreement(self, i: int, link: LinkConfig) -> None:
        agreement = next((a for a in self.agreements if a.id == link.agreement), None)
        if agreement is None:
            raise ValueError(f"links[{i}].agreement: no agreement with that id")
        for party in (self.controller.id, link.partner):
            if party not in agreement.parties:
                raise ValueError(f"agreements.{agreement.id}.parties: does not name {party},"
                                 f" a party of link {link.id}")
        purposes = link.pull_purposes() if link.direction == "pull" else [link.purpose]
        for purpose in purposes:
            if purpose not in agreement.purposes:
                raise ValueError(f"agreements.{agreement.id}.purposes: does not cover {purpose},"
                                 f" the purpose of link {link.id}")

    def _check_operators(self) -> None:
        ids = [a.id for a in self.agreements]
        if len(set(ids)) != len(ids):
            raise ValueError("agreements: duplicate agreement id")
        names = [o.name for o in self.operators]
        if len(set(names)) != len(names):
            raise ValueError("operators: duplicate operator name")
        roles: dict[str, set[str]] = {}
        for op in self.operators:
            for user in op.os_users:
                roles.setdefault(user, set()).add(op.role)
        for user, held in roles.items():
            duties = held - {"viewer"}
            if len(duties) > 1:
                # §11.7.4.2 a 5: access control, key management and data import are
                # held by different people.
                raise ValueError(
                    f"operators: host user {user} would hold {' and '.join(sorted(duties))};"
                    " these duties are separated (GB/T 39725 §11.7.4.2 a 5)"
                )

    def agreement(self, agreement_id: str) -> AgreementConfig:
        for a in self.agreements:
            if a.id == agreement_id:
                return a
        raise ConfigError("no such agreement", location=f"agreements.{agreement_id}")

    def operator(self, name: str) -> OperatorConfig | None:
        return next((o for o in self.operators if o.name == name), None)

    def partner(self, partner_id: str) -> PartnerConfig:
        for p in self.partners:
            if p.id == partner_id:
                return p
        raise ConfigError("no such partner", location=f"partners.{partner_id}")

    def link(self, link_id: str) -> LinkConfig:
        for link in self.links:
            if link.id == link_id:
                return link
        raise ConfigError("no such link", location=f"links.{link_id}")

    def store_path(self) -> Path:
        return self.store.path


def _check_profile(i: int, link: LinkConfig) -> None:
    """Load the profile of ``links[i]`` as the controller will, so that a misspelt name,
    a level the profile lacks or a profile file with a mistake is reported against this
    file and key (and stops every command that reads the file), not by a bridge that
    cannot start."""
    from bridge.errors import LoadError
    from bridge.policy.profile import load_link_profile, load_profile
    from bridge.resources import installed_link_profiles

    ref = link.profile_ref()
    try:
        if ref.endswith((".yaml", ".yml")):
            if not Path(ref).is_file():
                raise ValueError(f"links[{i}].profile: no profile file at {ref}")
            load_profile(Path(ref))
            return
        installed = installed_link_profiles()
        if ref.split(":", 1)[0] not in installed:
            raise ValueError(
                f"links[{i}].profile: no installed link profile {link.profile!r} (installed:"
                f" {', '.join(installed)}; or the path of a .yaml file)"
            )
        load_link_profile(ref)
    except LoadError as exc:
        raise ValueError(f"links[{i}].profile: {exc.message}; see {exc.location}") from None


def _resolve(data: dict[str, object], base: Path) -> None:
    """Make the file paths of a parsed config absolute relative to its folder."""

    def fix(section: object, keys: tuple[str, ...]) -> None:
        if not isinstance(section, dict):
            return
        for key in keys:
            value = section.get(key)
            if isinstance(value, str):
                section[key] = (
                    str((base / value).resolve()) if not Path(value).is_absolute() else value
                )
            elif isinstance(value, list):
                section[key] = [
                    str((base / v).resolve())
                    if isinstance(v, str) and not Path(v).is_absolute()
                    else v
                    for v in value
                ]

    fix(data.get("tls"), ("ca", "cert", "key", "crl"))
    signing = data.get("signing")
    fix(signing, ("cert", "key"))
    if isinstance(signing, dict) and isinstance(signing.get("keys"), list):
        for extra in signing["keys"]:
            fix(extra, ("cert", "key"))
    store = data.setdefault("store", {})
    if isinstance(store, dict):
        store.setdefault("path", "bridge.sqlite")
    fix(store, ("path", "data_key_file"))
    audit = data.setdefault("audit", {})
    if isinstance(audit, dict):
        audit.setdefault("pseudonym_key_file", "audit-pseudonym.key")
    fix(audit, ("pseudonym_key_file",))
    intake = data.setdefault("intake", {})
    if isinstance(intake, dict):
        intake.setdefault("biometric_key_file", "biometric.key")
    fix(intake, ("site", "biometric_key_file"))
    links = data.get("links")
    if isinstance(links, list):
        for link in links:
            # A profile is a shipped name (commercial-insurance) or an operator's own file.
            if isinstance(link, dict) and str(link.get("profile", "")).endswith((".yaml", ".yml")):
                fix(link, ("profile",))
            fix(link, ("deid_key_file",))
    partners = data.get("partners")
    if isinstance(partners, list):
        for partner in partners:
            fix(partner, ("signing_certs", "tls_ca"))
    fix(data.get("operations"), ("operator_ca",))
    handoff = data.get("handoff")
    if isinstance(handoff, list):
        for dest in handoff:
            fix(dest, ("ca", "client_cert", "client_key", "token_file", "password_file"))


#: A configuration is a few kilobytes; a file far larger is the wrong file.
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def input_files(config: BridgeConfig) -> list[tuple[str, Path]]:
    """Every file the configuration names that a running bridge reads and never makes:
    ``(key, path)``, the key as the file spells it (``tls.cert``, ``partners[0].tls_ca``)."""
    out: list[tuple[str, Path]] = [
        ("tls.ca", config.tls.ca), ("tls.cert", config.tls.cert), ("tls.key", config.tls.key),
        ("signing.cert", config.signing.cert), ("signing.key", config.signing.key),
    ]
    if config.tls.crl is not None:
        out.append(("tls.crl", config.tls.crl))
    for i, extra in enumerate(config.signing.keys):
        out += [(f"signing.keys[{i}].cert", extra.cert), (f"signing.keys[{i}].key", extra.key)]
    for i, partner in enumerate(config.partners):
        out += [(f"partners[{i}].signing_certs[{j}]", cert)
                for j, cert in enumerate(partner.signing_certs)]
        if partner.tls_ca is not None:
            out.append((f"partners[{i}].tls_ca", partner.tls_ca))
    return out


def check_input_files(config: BridgeConfig) -> None:
    """Refuse a configuration naming a file that is not there (or not a file), naming
    the configuration file and key, and the path (see :func:`input_files`)."""
    for key, path in input_files(config):
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"{key} names {path}, which {what}",
                              location=f"{config.source or 'configuration'}: {key}")


def load_config(path: str | Path) -> BridgeConfig:
    """Read and validate a controller configuration file."""
    file = Path(path)
    try:
        raw = read_bounded(file, _MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(
            f"cannot read configuration file: {exc.strerror}", location=str(file)
        ) from None
    except BridgeError as exc:  # a device, a pipe, a file far larger than any configuration
        raise ConfigError(f"configuration file: {exc.message}", location=str(file)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("configuration file is not UTF-8", location=str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", location=str(file)) from None
    _resolve(data, file.resolve().parent)
    data["source"] = str(file.resolve())
    try:
        return BridgeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ()))
        key = key.lstrip(".")
        msg = first.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            # A model-level check names the key it is about as "key: message".
            head, sep, rest = msg.removeprefix("Value error, ").partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
                key, msg = (f"{key}.{head}" if key else head), rest
        raise ConfigError(msg.removeprefix("Value error, "), location=f"{file}: {key}") from None
