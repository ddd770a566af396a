"""Partner registry: who a TLS peer is, which keys sign for it, which links it may use.

The TLS handshake has already checked the peer's chain, validity and (optionally)
revocation against the bridge's CA bundle; the registry answers the next question:
*which registered partner is this, and may it use this link?*

Identity modes:

``"san"`` (default)
    The certificate's URI SAN ``urn:ws-fhir-bridge:partner:<id>`` must name a
    registered partner; if that partner lists TLS fingerprints, the certificate's
    SHA-256 fingerprint must be one of them as well (pinning).
``"fingerprint"``
    The SHA-256 fingerprint alone selects the partner, for operator CAs that cannot
    issue the URI SAN. A URI SAN naming a *different* partner is still refused.

Each partner is bound to the CAs that issue its certificates (``tls_issuers``, from
``partners.tls_ca``): a certificate any other trusted CA issued is nobody's, even if it
names the partner. Without that binding, a partner running its own CA could issue a
certificate naming another partner and be taken for it. The bundle of trusted CAs only
decides whether a handshake succeeds; which partner a certificate may speak for is
decided here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from bridge.errors import ConfigError, UnknownPartner
from bridge.trust.identity import peer_identity, pinned
from bridge.trust.jws import KeyRing

IdentityMode = Literal["san", "fingerprint"]
_LOC = "tls.peer_certificate"


def _normalise_fingerprint(value: str) -> str:
    # Accept the common "AB:CD:…" notation in configuration files.
    hexed = value.replace(":", "").strip().lower()
    if len(hexed) != 64 or any(ch not in "0123456789abcdef" for ch in hexed):
        raise ConfigError(
            "TLS fingerprint must be 64 hex digits (SHA-256)", location="partners.tls_fingerprints"
        )
    return hexed


@dataclass(frozen=True)
class Partner:
    """A registered partner controller."""

    id: str
    name: str
    base_url: str
    tls_fingerprints: frozenset[str] = field(default_factory=frozenset)
    signing_certificates: tuple[str | os.PathLike[str] | bytes, ...] = ()
    links: frozenset[str] = field(default_factory=frozenset)
    #: JWS algorithms its signatures are accepted under (its links' choice); empty: the
    #: algorithm of whichever of its signing certificates made the signature.
    signature_algorithms: frozenset[str] = field(default_factory=frozenset)
    #: DER of the CA certificates that issue this partner's TLS certificates; empty:
    #: any CA of the bundle (allowed only when the bundle holds one CA, or with pins).
    tls_issuers: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "tls_fingerprints",
            frozenset(_normalise_fingerprint(f) for f in self.tls_fingerprints),
        )
        object.__setattr__(self, "links", frozenset(self.links))
        object.__setattr__(self, "signing_certificates", tuple(self.signing_certificates))
        object.__setattr__(self, "signature_algorithms", frozenset(self.signature_algorithms))
        object.__setattr__(self, "tls_issuers", frozenset(self.tls_issuers))


@functools.lru_cache(maxsize=1024)
def issued_by(leaf_der: bytes, ca_der: bytes) -> bool:
    """True when the CA certificate ``ca_der`` signed the certificate ``leaf_der`` (its
    issuer name is the CA's subject and the CA's key verifies the signature)."""
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        ca = x509.load_der_x509_certificate(ca_der)
        leaf.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means "not issued by this CA"
        return False
    return True


class PartnerRegistry:
    """Registered partners, looked up by peer certificate."""

    def __init__(self, partners: Iterable[Partner], *, identity: IdentityMode = "san") -> None:
        if identity not in ("san", "fingerprint"):
            raise ConfigError(
                "identity mode must be 'san' or 'fingerprint'", location="registry.identity"
            )
        self.identity: IdentityMode = identity
        self._partners: dict[str, Partner] = {}
        self._by_fingerprint: dict[str, Partner] = {}
        for partner in partners:
            if partner.id in self._partners:
                raise ConfigError("partner id registered twice", location=f"partners.{partner.id}")
            self._partners[partner.id] = partner
            for fp in partner.tls_fingerprints:
                if fp in self._by_fingerprint:
                    raise ConfigError(
                        "TLS fingerprint registered for two partners",
                        location=f"partners.{partner.id}",
                    )
                self._by_fingerprint[fp] = partner
        if identity == "fingerprint":
            unpinned = [p.id for p in self._partners.values() if not p.tls_fingerprints]
            if unpinned:
                raise ConfigError(
                    "fingerprint identity needs tls_fingerprints for every partner",
                    location=f"partners.{unpinned[0]}.tls_fingerprints",
                )

    def get(self, partner_id: str) -> Partner:
        """The partner with ``partner_id``; raises :class:`UnknownPartner`."""
        partner = self._partners.get(partner_id)
        if partner is None:
            raise UnknownPartner("partner is not registered", location="partner_id")
        return partner

    def __iter__(self) -> Iterator[Partner]:
        return iter(self._partners.values())

    def identify(self, peer_cert_der: bytes, *, link: str | None = None) -> Partner:
        """The partner a verified peer certificate belongs to, or raise :class:`UnknownPartner`.

        With ``link`` the partner must also be configured for that link.
        """
        ident = peer_identity(peer_cert_der)
        if self.identity == "fingerprint":
            partner = self._by_fingerprint.get(ident.fingerprint_sha256)
            if partner is None:
                raise UnknownPartner("certificate fingerprint matches no partner", location=_LOC)
            if ident.partner_id is not None and ident.partner_id != partner.id:
                raise UnknownPartner(
                    "certificate names another partner than its fingerprint", location=f"{_LOC}.SAN"
                )
        else:
            if ident.partner_id is None:
                raise UnknownPartner(
                    "certificate carries no partner URI SAN", location=f"{_LOC}.SAN"
                )
            found = self._partners.get(ident.partner_id)
            if found is None:
                raise UnknownPartner(
                    "certificate names no registered partner", location=f"{_LOC}.SAN"
                )
            if found.tls_fingerprints and not pinned(ident.fingerprint_sha256,
                                                     found.tls_fingerprints):
                raise UnknownPartner(
                    "certificate is not one pinned for this partner", location=_LOC
                )
            partner = found
        if partner.tls_issuers and not any(
            issued_by(peer_cert_der, ca) for ca in sorted(partner.tls_issuers)
        ):
            raise UnknownPartner(
                "certificate was not issued by a CA configured for this partner",
                location=f"{_LOC}.issuer",
            )
        if link is not None and link not in partner.links:
            raise UnknownPartner("partner is not configured for this link", location="link")
        return partner

    def keyring(self) -> KeyRing:
        """A key ring holding every partner's signing certificates (current and next),
        each partner accepted under its ``signature_algorithms`` when it names any."""
        ring = KeyRing()
        for partner in self._partners.values():
            for cert in partner.signing_certificates:
                ring.add_certificate(partner.id, cert)
            if partner.signature_algorithms:
                ring.accept(partner.id, partner.signature_algorithms)
        return ring
