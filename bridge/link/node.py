"""One controller's bridge at run time: its store, keys, partners, consents and links.

The :class:`Controller` is the place where the pure rooms (mapping, policy, trust,
ledger) meet the network. It is used by ``bridge serve``, by ``bridge push`` (which
only enqueues) and by the demo, which runs two of them.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.compliance.agreements import CrossBorderRefused, check_agreement, check_link
from bridge.compliance.operators import acting_operator
from bridge.config import BridgeConfig, LinkConfig, PartnerConfig
from bridge.errors import (
    BridgeError,
    ConfigError,
    ConflictError,
    MappingError,
    PayloadTooLarge,
    PolicyError,
    ProfileError,
)
from bridge.files import load_or_make_key
from bridge.handoff import routes
from bridge.ledger import open_store
from bridge.ledger.audit import AuditEntry, AuditRecord, pseudonymizer
from bridge.ledger.identity import (
    id_cards_since,
    link_pseudonyms_many,
    links_since,
)
from bridge.link.clearance import Clearance
from bridge.link.store import AsyncStore, GroupCommit
from bridge.logs import event, refusal_event
from bridge.mapping import map_record, patient_identifiers
from bridge.mapping.hl7v2.header import label_key_of, use_label_key
from bridge.messages import collection_of, message_id_for, wrap_message
from bridge.policy.consent import ConsentRegistry, parse_consent
from bridge.policy.consent_rules import LinkConsentView, check_registration, recipients_of
from bridge.policy.engine import (
    Explanation,
    PolicyResult,
    apply_policy,
    explain,
    recheck_collection,
)
from bridge.policy.engine import (
    patient_identifiers as asked_identifiers,  # the payload's, as recheck_collection reads them
)
from bridge.policy.identity import ID_CARD_SYSTEM, IdentityIndex, id_card_pseudonyms
from bridge.policy.profile import LinkProfile, load_link_profile, load_profile
from bridge.policy.transforms import DeidContext, pseudonymise_ids
from bridge.resources import MappingFiles
from bridge.trust.checkpoint import origin_for, sign_checkpoint
from bridge.trust.jws import KeyRing, Signer, payload_digests, sign_bundle_digests
from bridge.trust.pki import load_certificates
from bridge.trust.registry import Partner, PartnerRegistry

log = logging.getLogger("bridge.controller")

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Submitted:
    """What happened to one record handed to :meth:`Controller.submit`."""

    message_id: str
    link: str
    created: bool  # False when the same claim was already in the outbox (duplicate suppressed)
    removed: tuple[str, ...]
    held_back: tuple[str, ...]
    decided_by: str = ""  # "consent-id@provision path" of the permitting rule
    # "element path<-consent-id@provision path(reason)" of each thing held back
    held_by: tuple[str, ...] = ()


def _ca_certificates(path: Path) -> list[x509.Certificate]:
    """The CA certificates of a PEM bundle (certificates without CA rights skipped)."""
    found = []
    for cert in load_certificates(path):
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if ca:
            found.append(cert)
    return found


def _partner_issuers(partner: PartnerConfig, several_cas: bool) -> frozenset[bytes]:
    """DER of the CAs a partner's TLS certificates must come from (``partners.tls_ca``).

    When the trusted bundle holds several CAs, a partner bound to none of them could be
    impersonated by a certificate from another partner's CA: every partner then needs
    ``tls_ca`` (or fingerprint pins)."""
    if partner.tls_ca is None:
        if several_cas and not partner.tls_fingerprints:
            raise ConfigError(
                "[tls] ca holds several CAs: name the CA that issues this partner's"
                " certificates (or pin them with tls_fingerprints)",
                location=f"partners.{partner.id}.tls_ca",
            )
        return frozenset()
    cas = _ca_certificates(partner.tls_ca)
    if not cas:
        raise ConfigError("file holds no CA certificate", location=f"partners.{partner.id}.tls_ca")
    return frozenset(c.public_bytes(serialization.Encoding.DER) for c in cas)


def _load_pseudonym_key(path: Path) -> bytes:
    """The key that turns patient identifiers into audit pseudonyms; made on first use."""
    return load_or_make_key(path, what="audit pseudonym key")


def signers_of(config: BridgeConfig) -> tuple[Signer, dict[str, Signer]]:
    """The [signing] signer and every configured signer by algorithm (``signing.keys``)."""
    default = Signer.from_files(config.signing.key, config.signing.cert)
    signers = {default.algorithm: default}
    for i, extra in enumerate(config.signing.keys):
        signer = Signer.from_files(extra.key, extra.cert)
        if signer.algorithm in signers:
            raise ConfigError(f"a second signing key for {signer.algorithm}",
                              location=f"signing.keys[{i}]")
        signers[signer.algorithm] = signer
    return default, signers


def accept_configured_algorithms(config: BridgeConfig, partner_id: str, keyring: KeyRing,
                                 signers: dict[str, Signer]) -> None:
    """Narrow what ``partner_id``'s signatures are accepted under to its links' algorithms.

    A link that names an algorithm needs a key of it here and a signing certificate of
    it from the partner, or nothing on the link could be signed or verified.
    """
    chosen: set[str] = set()
    for link in config.links:
        alg = link.signature_algorithm
        if link.partner != partner_id or alg is None:
            continue
        location = f"links.{link.id}.signature_algorithm"
        if alg not in signers:
            raise ConfigError(f"no signing key for {alg} in [signing] or [[signing.keys]]",
                              location=location)
        if not any(keyring.get(kid).algorithm == alg  # type: ignore[union-attr]
                   for kid in keyring.kids_for(partner_id)):
            raise ConfigError(f"partner {partner_id} has no {alg} signing certificate",
                              location=location)
        chosen.add(alg)
    if chosen:
        keyring.accept(partner_id, chosen)


def resource_types(bundle: dict[str, Any]) -> list[str]:
    """The resource types a bundle's entries name. An entry without one (a malformed
    message, which FHIR validation refuses) names none: this is asked before that
    validation, of whatever a sender posted."""
    entries = bundle.get("entry")
    return sorted(
        {
            e["resource"]["resourceType"]
            for e in (entries if isinstance(entries, list) else [])
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and isinstance(e["resource"].get("resourceType"), str)
        }
    )


class Controller:
    """A controller's bridge: everything except the sockets."""

    def __init__(self, config: BridgeConfig, *, clock: Any = utcnow) -> None:
        self.config = config
        self.id = config.controller.id
        self.clock = clock
        # Keys and certificates first: a start refused for one of them makes no store.
        self.signer, self.signers = signers_of(config)
        self.keyring = KeyRing()
        partners: list[Partner] = []
        several_cas = any(p.tls_ca is None and not p.tls_fingerprints for p in config.partners) and (
            len(_ca_certificates(config.tls.ca)) > 1)
        for p in config.partners:
            for cert in p.signing_certs:
                self.keyring.add_certificate(p.id, cert)
            accept_configured_algorithms(config, p.id, self.keyring, self.signers)
            partners.append(
                Partner(
                    id=p.id,
                    name=p.name or p.id,
                    base_url=p.base_url or "",
                    tls_fingerprints=frozenset(p.tls_fingerprints),
                    tls_issuers=_partner_issuers(p, several_cas),
                    links=frozenset(link.id for link in config.links if link.partner == p.id),
                )
            )
        self.partners = PartnerRegistry(partners)
        config.store.path.parent.mkdir(parents=True, exist_ok=True)
        self.store = open_store(config.store)
        self.db = AsyncStore(self.store)
        # What a submission reads before its consent decision (see :meth:`submit`):
        # concurrent submissions take it in one trip to the store's thread.
        self._intake = GroupCommit(self.db, functools.partial(_intake_many, self.store))
        self.pseudonym_key = _load_pseudonym_key(config.audit.pseudonym_key_file)
        #: The key sender text from MSH is named under in logs and audit entries (see
        #: :func:`~bridge.mapping.hl7v2.header.id_label`).
        self.label_key = label_key_of(self.pseudonym_key)
        if config.mllp is not None:
            # And the key of what names such text without being given one.
            use_label_key(self.pseudonym_key)
        #: Key of the records store's resource ids (see :meth:`pull_collection`).
        self.pull_id_key = hmac.new(self.pseudonym_key, b"pull-resource-id", hashlib.sha256).digest()
        # The patient pseudonym function, keyed once: the key is fixed for the
        # controller's life (it must stay the same for as long as the audit log is kept).
        self._pseudonym = pseudonymizer(self.pseudonym_key)
        #: Which patient pseudonyms name one person (the hospital's records say so).
        self.identity = IdentityIndex(self._pseudonym)
        self.consents = ConsentRegistry(self.identity)
        self._consent_cursor = 0
        # Read as sync_consents reads, page by page: a store of years holds millions of
        # links, and reading them at once would hold them all as rows beside the index
        # being built from them.
        while True:
            (links, cards), changes = _links_and_consent_changes(
                self.store, self.identity.cursor, self._consent_cursor,
                self.identity.card_cursor, limit=STARTUP_PAGE)
            if not links and not cards and not changes:
                break
            self._take_links(links)
            self._take_id_cards(cards)
            self._apply_consent_changes(changes)
        # The registry lives as long as the process: keep the cyclic collector from
        # rescanning it on every full collection.
        gc.collect()
        gc.freeze()
        self.profiles: dict[str, LinkProfile] = {
            link.id: _profile_for(link.profile_ref()) for link in config.links
        }
        # Links whose profile has keyed transforms (research): the key, from the file
        # or environment variable the configuration names, never from its text. Only
        # the side that de-identifies holds it: on a receiving link (inbound, pull-from)
        # the key would let the recipient reverse the keyed pseudonyms it is sent.
        self.deid_keys: dict[str, bytes] = {
            link.id: load_deid_key(link) for link in config.links
            if self.profiles[link.id].needs_key and link.direction in ("outbound", "pull")
        }
        # Each link counts consents by its own rules on expiry (consent_rules).
        self.link_consents: dict[str, ConsentRegistry] = {
            link.id: LinkConsentView(self.consents, without_end=link.consent_without_end,
                                     cap_days=link.consent_cap_days, partner=link.partner,
                                     partner_purposes=link.partner_consent_purposes)
            for link in config.links
        }
        # The site's overlay of the mapping files (value sets the FHIR mapping reads too).
        site = config.intake.site
        self.mapping_files = MappingFiles(site.resolve() if site is not None else None)
        # Which of this controller's own systems take the claims it receives.
        self.handoff_routes = routes(config.handoff)
        self._biometric: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # The digests of what each message this process signed covers, by its signature
        # (see :meth:`request_digests`); the oldest are forgotten first.
        self._signed_digests: dict[str, frozenset[str]] = {}
        # What each message's consent decision at enqueue rested on, by its signature,
        # so that dispatch need not ask again when none of it changed (see
        # bridge/link/clearance.py); the oldest are forgotten first.
        self._clearances: dict[str, Clearance] = {}
        # The message of each row this process queued, as it signed it, by message id,
        # with the SHA-256 of the bytes the outbox was given (see :meth:`queued_message`);
        # the oldest are forgotten first.
        self._queued_forms: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self._handled = 0

    # --- helpers -------------------------------------------------------------------

    def handled(self) -> None:
        """Count one message queued or accepted. At :data:`WARM_MESSAGES` the process
        holds what it keeps for its lifetime (code, mapping tables, value sets, FHIR
        models and their validators, TLS contexts, loaded on first use), and it is moved
        out of the cyclic collector's reach (``gc.freeze``), as the consent registry is
        at start: every full collection would otherwise rescan it, about a tenth of a
        busy sender's CPU. Objects freed by their reference counts are freed as ever.

        At the same point the youngest generation's threshold is raised to
        :data:`YOUNG_OBJECTS` (never lowered, and left at 0, which turns automatic
        collection off). Each claim makes hundreds of containers
        at every step (its record, bundle, minimised copy, message), nearly all freed by
        their reference counts when the step ends. At the interpreter's default (700) a
        collection ran about once per claim on a busy sender and moved whatever was in
        flight to the older generations, whose collections then rescanned it: about a
        tenth of a busy sender's CPU went to the collector, about a fiftieth after the
        raise. The threshold counts containers allocated less those freed, so what waits
        longer is cyclic garbage alone (what reference counts free goes at once), and it
        is still collected, a little later: a bridge's resident size stays flat over
        100,000 claims (bench/claim_push.py --soak)."""
        self._handled += 1
        if self._handled == WARM_MESSAGES:
            gc.freeze()
            young, *older = gc.get_threshold()
            # 0 turns automatic collection off: whoever set it meant it.
            if 0 < young < YOUNG_OBJECTS:
                gc.set_threshold(YOUNG_OBJECTS, *older)

    def audit(
        self,
        action: str,
        *,
        subject: str,
        outcome: Literal["success", "failure", "denied"] = "success",
        partner: str | None = None,
        patient: str | None = None,
        categories: list[str] | None = None,
        detail: str | None = None,
        digest_value: str | None = None,
        now: datetime | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            time=now or self.clock(),
            actor=self.id,
            action=action,
            subject=subject,
            partner=partner,
            patient=patient,
            categories=categories or [],
            outcome=outcome,
            detail=detail,
            digest=digest_value,
            operator=acting_operator(),
        )

    def receipt_checkpoint(self, entry: AuditEntry, now: datetime) -> dict[str, Any]:
        """A signed checkpoint of the log ending at ``entry``, and the entry's proof in it."""
        if entry.root is None:
            return {}
        cp = sign_checkpoint(self.signer.private_key, self.id, origin_for(self.id), entry.seq,
                             entry.root, now)
        return {"audit_checkpoint": cp.note, "audit_proof": entry.path}

    def protect_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A DE record that arrived as JSON with the elements the site's mappings mark
        biometric replaced by their keyed digest (HL7 v2 messages are digested on intake).

        The shipped mappings mark nothing: without a site overlay there is nothing to do.
        """
        if self.config.intake.site is None:
            return record
        if self._biometric is None:
            from bridge.link.intake import site_reader
            from bridge.mapping.hl7v2.biometric import protect_record

            marked = site_reader(self.config).biometric_elements
            key = load_or_make_key(self.config.intake.biometric_key_file,
                                   what="biometric key") if marked else b""
            self._biometric = lambda r: protect_record(r, marked, key) if marked else r
        return self._biometric(record)

    def signer_for(self, link_id: str | None) -> Signer:
        """The signer of ``link_id``: its ``signature_algorithm``'s key, else [signing]'s."""
        if link_id:
            chosen = self.config.link(link_id).signature_algorithm
            if chosen is not None:
                return self.signers[chosen]
        return self.signer

    def signer_for_partner(self, partner_id: str) -> Signer:
        """The signer of what goes to ``partner_id`` outside any one link (sync answers):
        the algorithm its links name (all of them, or none, name one), else [signing]'s."""
        for link in self.config.links:
            if link.partner == partner_id and link.signature_algorithm is not None:
                return self.signers[link.signature_algorithm]
        return self.signer

    def consents_for(self, link: LinkConfig) -> ConsentRegistry:
        """The consent registry as ``link`` counts it (expiry and marketing rules)."""
        view = self.link_consents.get(link.id)
        if view is None:  # a link built after start: the same rules, never the bare registry
            view = self.link_consents[link.id] = LinkConsentView(
                self.consents, without_end=link.consent_without_end,
                cap_days=link.consent_cap_days, partner=link.partner,
                partner_purposes=link.partner_consent_purposes)
        return view

    def pseudonym(self, identifiers: list[tuple[str, str]]) -> str | None:
        """A keyed pseudonym of the patient's most stable identifier.

        The same person must get the same pseudonym in every audit entry (consent,
        enqueue, delivery), whichever identifiers each step happens to hold, so the
        identifier is chosen by a fixed preference: national ID card, health card,
        other ID document, then the hospital's own numbers.
        """
        if not identifiers:
            return None
        system, value = min(identifiers, key=_identifier_rank)
        return self._pseudonym(system, value)

    def outbound_link(self, link_id: str) -> LinkConfig:
        link = self.config.link(link_id)
        if link.direction != "outbound":
            raise ConfigError("link is not outbound", location=f"links.{link_id}.direction")
        return link

    def inbound_link_for(self, partner_id: str) -> LinkConfig | None:
        for link in self.config.links:
            if link.direction == "inbound" and link.partner == partner_id:
                return link
        return None

    # --- consents ---------------------------------------------------------------------

    def _apply_consent_changes(self, changes: list[tuple[int, bytes]]) -> None:
        # Consents in the store were validated when they were put: load them without
        # repeating the FHIR model validation (every rule is still parsed and checked).
        for number, resource in changes:
            self.consents.put(orjson.loads(resource), now=self.clock(), trusted=True)
            self._consent_cursor = max(self._consent_cursor, number)

    def _take_links(self, links: list[tuple[int, str, str]]) -> None:
        for seq, a, b in links:
            self.identity.link((a, b))
            self.identity.cursor = max(self.identity.cursor, seq)

    def _take_id_cards(self, cards: list[tuple[int, str]]) -> None:
        self.identity.note_id_cards(p for _, p in cards)
        if cards:
            self.identity.card_cursor = max(self.identity.card_cursor, cards[-1][0])

    async def link_patient(self, identifiers: list[tuple[str, str]]) -> None:
        """Record that these identifiers, stated together by one of the hospital's
        records, name one person: durable in the store, then in this process.
        MappingError when they would make one person of two resident ID card holders."""
        await self._link(self._unlinked(identifiers))

    async def _link(self, group: PatientLink | None) -> None:
        """Store these pseudonyms as one person, then link them in this process."""
        if group is None:
            return
        await self.db.call(link_pseudonyms_many, self.store, [(group.pseudonyms, self.clock())],
                           id_cards=group.id_cards)
        self._linked(group)

    def _linked(self, group: PatientLink) -> None:
        self.identity.note_id_cards(group.id_cards)
        self.identity.link(group.pseudonyms)

    def _unlinked(self, identifiers: list[tuple[str, str]]) -> PatientLink | None:
        """The pseudonyms of ``identifiers`` when they are not all linked yet, else None.

        A person holds one resident ID card number for life: identifiers that would
        join holders of two different ones (a medical-record number reused, a record
        keyed to the wrong patient) are refused, naming the identifier system, so that
        no consent of one of them ever covers the other."""
        group = self.identity.of_identifiers(identifiers)
        cards = id_card_pseudonyms(identifiers, group)
        if len(set(group)) < 2:
            return None
        if self.identity.two_id_cards(group, cards):
            raise MappingError(
                f"the record's resident ID card number ({ID_CARD_SYSTEM}) is not the one the"
                " patient its other identifiers name already holds: a record cannot join two"
                " people; correct the patient's identifiers at the source",
                location="Patient.identifier")
        if self.identity.one_person(group):
            return None
        return PatientLink(tuple(group), tuple(dict.fromkeys(cards)))

    def _mapped_and_unlinked(
        self, record: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, PatientLink | None]:
        """:meth:`link_record` without the store: the record mapped (None when it does not
        map) and the pseudonyms its identifiers still need linked (None when none do)."""
        try:
            collection = map_record(record, now=self.clock(), files=self.mapping_files)
            ids = list(patient_identifiers(collection))
        except (BridgeError, ValueError):
            return None, None
        return collection, self._unlinked(ids)

    async def sync_consents(self) -> None:
        """Take in consents put or revoked by any process sharing this store.

        Called before every consent decision that matters (enqueue and dispatch), so a
        revocation through another bridge process, the CLI or the API takes effect at
        once everywhere, not at the next restart.
        """
        while True:
            # One trip to the store's thread for both feeds; links are taken first.
            (links, cards), changes = await self.db.call(
                _links_and_consent_changes, self.store, self.identity.cursor,
                self._consent_cursor, self.identity.card_cursor)
            if not links and not changes and not cards:
                return
            self._take_links(links)
            self._take_id_cards(cards)
            self._apply_consent_changes(changes)

    async def claim_due(self, link_id: str, *, now: datetime, limit: int,
                        lease: timedelta) -> list[Any]:
        """Claim the rows due on ``link_id`` (the store's ``claim_due``) and, when there
        are any, take in what :meth:`sync_consents` would, before anyone decides on them:
        one trip to the store's thread when nothing changed."""
        rows, (links, cards), changes = await self.db.call(
            _claim_and_feeds, self.store, link_id, now, limit, lease, self.identity.cursor,
            self._consent_cursor, self.identity.card_cursor)
        if links or changes or cards:
            self._take_links(links)
            self._take_id_cards(cards)
            self._apply_consent_changes(changes)
            await self.sync_consents()  # any further page
        return list(rows)

    async def put_consent(self, resource: dict[str, Any], *, source: str = "local") -> str:
        """Register, amend or revoke (status ``inactive``) a consent; durable before it counts."""
        now = self.clock()
        record = parse_consent(resource)
        await self.sync_consents()
        held = self.consents.get(record.id)
        if held is not None and held.patient != record.patient:
            # An amendment that named someone else would take the consent from its
            # patient without a word: the patient's consent is withdrawn by revoking it.
            raise MappingError(
                f"consent {record.id} is another patient's: a consent's patient cannot"
                " change (revoke it, status inactive, and register a new consent)",
                location="Consent.patient")
        recipients = recipients_of(record.provision)
        check_registration(record, refusing_links=[
            link.id for link in self.config.links
            if link.partner in recipients and link.consent_without_end == "refuse"
        ])
        patient_keys = ["|".join(record.patient)]
        entry = self.audit(
            "consent.put",
            subject=record.id,
            patient=self.pseudonym([record.patient]),
            detail=f"{source}:{record.status}",
            now=now,
        )
        await self.db.put_consent(
            consent_id=record.id,
            patient_keys=patient_keys,
            status=record.status,
            resource=orjson.dumps(resource),
            now=now,
            audit=entry,
        )
        event("consent_change", controller=self.id, consent_id=record.id, status=record.status, source=source)
        await self.sync_consents()
        return record.id

    # --- sending ----------------------------------------------------------------------

    async def link_record(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Link the identifiers one record states for its patient (see :meth:`link_patient`)
        and return the record mapped (None, linking nothing, for a record that does not
        map: its refusal is reported by :meth:`prepare`)."""
        collection, group = self._mapped_and_unlinked(record)
        await self._link(group)
        return collection

    def claim_collection(
        self, record: dict[str, Any], now: datetime, replaces: str | None = None,
        mapped: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One record mapped as :meth:`prepare` sends it (and :meth:`explain` explains it);
        ``mapped`` is the record already mapped (it is then used, and marked in place; a
        collection given to :meth:`policy` is changed there too, and not to be read again)."""
        collection = mapped if mapped is not None else map_record(
            record, now=now, files=self.mapping_files)
        if replaces is not None:
            mark_replacing(collection, replaces)
        return collection

    def explain(self, record: dict[str, Any], link_id: str) -> Explanation:
        """What :meth:`prepare` would send of ``record`` on ``link_id`` now, element by
        element, and why: the same mapping, registry, profile and policy run."""
        link = self.outbound_link(link_id)
        now = self.clock()
        return explain(
            self.claim_collection(record, now),
            registry=self.consents_for(link),
            profile=self.profiles[link.id],
            recipient=self.config.partner(link.partner).id,
            purpose=link.purpose,
            now=now,
            key=self.deid_keys.get(link.id),
        )

    def policy(
        self, record: dict[str, Any], link_id: str, *, replaces: str | None = None,
        mapped: dict[str, Any] | None = None,
    ) -> PolicyResult:
        """What of ``record`` may go on ``link_id`` now (raises ConsentDenied).

        ``mapped`` is the record already mapped (by :func:`~bridge.mapping.map_record`,
        which validates it), which the caller gives up: the policy works on it in place
        (see :func:`~bridge.policy.engine.apply_policy`, ``owned`` and ``complete``)."""
        link = self.outbound_link(link_id)
        now = self.clock()
        check_link(self.config, link, now)
        return apply_policy(
            self.claim_collection(record, now, replaces, mapped),
            registry=self.consents_for(link),
            profile=self.profiles[link.id],
            recipient=self.config.partner(link.partner).id,
            purpose=link.purpose,
            now=now,
            key=self.deid_keys.get(link.id),
            # The collection is mapped for this decision, or handed over by the caller
            # (``mapped``), who reads nothing of it afterwards.
            owned=True,
            # Mapped, so validated: every resource holds its required elements.
            complete=True,
        )

    def prepare(
        self, record: dict[str, Any], link_id: str, *, replaces: str | None = None,
        mapped: dict[str, Any] | None = None, result: PolicyResult | None = None,
        message_id: str | None = None,
    ) -> tuple[dict[str, Any], Submitted]:
        """Map, authorise, minimise and sign one record (CPU only; nothing stored).

        ``replaces`` is the message identity of a claim this one corrects: the Claim
        then names it in ``Claim.related`` (conformance/PROTOCOL.md, corrected claims).
        ``mapped`` is the record already mapped, which the caller gives up: the policy
        changes it in place (see :meth:`policy`), so the caller must not read it again.
        ``result`` is the record's policy result when the caller already has it (a
        research release, which generalises it across the batch first);
        ``message_id`` the record's message identity on this link, when already derived.
        """
        link = self.outbound_link(link_id)
        partner = self.config.partner(link.partner)
        now = self.clock()
        check_link(self.config, link, now)
        # The clearance names the consents as they are now: only a decision made now
        # rests on them (a caller's result may predate a change).
        decided_here = result is None
        if result is None:
            if self.profiles[link.id].k_anonymity is not None:
                # A research link releases batches made k-anonymous over persons; one record
                # on its own would skip that (and the top-coding of great ages).
                raise ProfileError(
                    "this link releases research batches only (bridge research release)",
                    location=f"links.{link.id}.profile",
                )
            result = self.policy(record, link_id, replaces=replaces, mapped=mapped)
        if not any(
            e.get("resource", {}).get("resourceType") == "Claim" for e in result.bundle["entry"]
        ):
            # A claim link carries claims: a record that yields none (a lab report, a
            # referral) has no business on it, whatever else it holds.
            raise MappingError(
                "this record yields no Claim to send on a claim link", location="$.dataset"
            )
        check_agreement(self.config, link, now, resource_types=resource_types(result.bundle))
        if message_id is None:
            message_id = message_id_for(self.id, link.id, _source_key(record, replaces))
        message = wrap_message(
            result.bundle,
            message_id=message_id,
            event="claim-submit",
            sender=self.id,
            receiver=partner.id,
            source_endpoint=self.config.server.base_url(),
            destination_endpoint=str(partner.base_url),
            now=now,
        )
        signed, digests = sign_bundle_digests(
            message,
            self.signer_for(link.id),
            issuer=self.id,
            audience=partner.id,
            message_id=message_id,
            now=now,
        )
        self._remember_digests(signed, digests)
        if (decided_here and result.decision.override is None
                and self.deid_keys.get(link.id) is None):
            self._remember_clearance(signed, Clearance.at_enqueue(
                registry=self.consents_for(link), profile=self.profiles[link.id],
                identifiers=asked_identifiers(result.bundle),
                decided_at=result.decision.decided_at))
        return signed, Submitted(
            message_id=message_id,
            link=link.id,
            created=True,
            removed=tuple(result.removed),
            held_back=tuple(result.held_back),
            decided_by=f"{result.decision.consent_id}@{result.decision.provision_path}",
            held_by=_held_by(result),
        )

    def _remember_digests(self, signed: dict[str, Any], digests: frozenset[str]) -> None:
        _remember(self._signed_digests, signed["signature"]["data"], digests, _SIGNED_DIGESTS_MAX)

    def _remember_clearance(self, signed: dict[str, Any], clearance: Clearance) -> None:
        _remember(self._clearances, signed["signature"]["data"], clearance, _SIGNED_DIGESTS_MAX)

    def queued_as(self, signed: dict[str, Any], payload: bytes,
                  payload_sha256: bytes | None = None) -> None:
        """``payload`` is how the outbox holds the prepared message ``signed`` (and
        ``payload_sha256`` its SHA-256, when already computed): its consent decision
        (see :meth:`recheck_consent`) holds for those bytes only."""
        signature = signed["signature"]["data"]
        pending = self._clearances.get(signature)
        if pending is not None:
            self._clearances[signature] = pending.queued_as(payload, payload_sha256)

    def queued_message(self, message_id: str, raw: bytes) -> tuple[dict[str, Any], bytes]:
        """The message an outbox row holds (``raw``, its bytes) and the SHA-256 of those bytes.

        When this process queued the row and it still holds the very bytes written then,
        the message is the one signed here, which those bytes were written from (the
        signed message is plain JSON data, read back from its bytes as it was: see
        tests/test_dispatch_clearance.py); any other is read from the bytes. Each is
        taken once: a message is dispatched to be acknowledged once, and a retry reads
        it again."""
        raw_sha256 = hashlib.sha256(raw).digest()
        held = self._queued_forms.pop(message_id, None)
        if held is not None and held[0] == raw_sha256:
            return held[1], raw_sha256
        return orjson.loads(raw), raw_sha256

    def request_digests(self, payload: dict[str, Any]) -> frozenset[str]:
        """:func:`payload_digests` of a stored signed message, the digests its receipt may
        name. A message this process signed is known by its signature, which covers
        exactly that content (any other content under it fails at the receiver), so its
        digests are those computed when it was signed; any other is canonicalised again.
        Each is looked up once: a message is dispatched to be acknowledged once."""
        signature = payload.get("signature")
        data = signature.get("data") if isinstance(signature, dict) else None
        known = self._signed_digests.pop(data, None) if isinstance(data, str) else None
        return known if known is not None else payload_digests(payload)

    async def submit(
        self, record: dict[str, Any], link_id: str, *, replaces: str | None = None
    ) -> Submitted:
        """Enqueue one WS 445 record as a claim on an outbound link.

        Raises ConsentDenied (after auditing the refusal) when no consent permits it,
        and MappingError/ParseError for bad input; nothing is stored in either case.
        ``replaces`` makes it a corrected claim (see :meth:`prepare`); its message
        identity then depends on the claim it replaces as well as on the record.
        """
        link = self.outbound_link(link_id)
        mapped, group = self._mapped_and_unlinked(record)
        if mapped is None:
            # A record that does not map is refused before it is hashed or kept, naming
            # the element: only a record that maps is sure to have a JSON writing.
            map_record(record, now=self.clock(), files=self.mapping_files)
        message_id = message_id_for(self.id, link.id, _source_key(record, replaces))
        await self.keep_for_pull(record, source="push")
        # One trip to the store's thread: the patient links the record states (see
        # link_patient), then the consents changed by any process sharing the store,
        # and whether this claim was queued before.
        changes, queued = await self._intake(group=group, now=self.clock(),
                                             cursor=self._consent_cursor, message_id=message_id)
        if group is not None:
            self._linked(group)
        if changes:
            # Submissions read together share one answer: the first to come back takes
            # the changes in, the others only what it has not. Each still reads any
            # further page itself before it decides: the first may be reading it still.
            self._apply_consent_changes(
                [change for change in changes if change[0] > self._consent_cursor])
            await self.sync_consents()  # any further page of changes
        if queued is not None:
            # The same record was submitted before: one claim, however often a HIS retries.
            return Submitted(
                message_id=message_id, link=link.id, created=False, removed=(), held_back=()
            )
        try:
            signed, submitted = self.prepare(record, link_id, replaces=replaces, mapped=mapped,
                                             message_id=message_id)
            await self.count_abroad(link, submitted.message_id, signed)
        except PolicyError as exc:
            now = self.clock()
            ids = _record_patient_ids(record)
            await self.db.append_audit(
                self.audit(
                    "claim.refused",
                    subject=f"record:{_record_key(record)}",
                    outcome="denied",
                    partner=link.partner,
                    patient=self.pseudonym(ids),
                    detail=_decision_detail(exc),
                    now=now,
                ),
                proof=False,
            )
            refusal_event(self, "enqueue", exc, partner=link.partner, subject=message_id)
            raise
        return await self.enqueue_signed(link, signed, submitted)

    async def enqueue_signed(
        self, link: LinkConfig, signed: dict[str, Any], submitted: Submitted
    ) -> Submitted:
        """Put one prepared, signed message in the outbox with its audit entry."""
        message_id = submitted.message_id
        payload = orjson.dumps(signed)
        if len(payload) > link.max_message_bytes:
            raise PayloadTooLarge(
                f"the signed claim is {len(payload)} bytes, more than this link sends"
                f" ({link.max_message_bytes}, the partner's body limit); nothing was queued",
                location=f"links.{link.id}.max_message_bytes")
        # One hash of the bytes serves the outbox's digest (as :func:`digest` writes it),
        # the consent clearance and the message kept for dispatch.
        payload_sha256 = hashlib.sha256(payload).digest()
        payload_digest = "sha256:" + payload_sha256.hex()
        self.queued_as(signed, payload, payload_sha256)
        _remember(self._queued_forms, message_id, (payload_sha256, signed), _QUEUED_FORMS_MAX)
        self.handled()
        now = self.clock()
        ids = patient_identifiers(signed)
        try:
            await self.db.enqueue(
                message_id=submitted.message_id,
                link=link.id,
                partner=link.partner,
                payload=payload,
                digest=payload_digest,
                audit=self.audit(
                    "claim.enqueue",
                    subject=submitted.message_id,
                    partner=link.partner,
                    patient=self.pseudonym(ids),
                    categories=resource_types(signed),
                    digest_value=payload_digest,
                    detail=(
                        f"permit {submitted.decided_by} removed={len(submitted.removed)}"
                        f" held_back={len(submitted.held_back)}"
                        + (f" held={';'.join(submitted.held_by)}" if submitted.held_by else "")
                    ),
                    now=now,
                ),
                now=now,
            )
        except ConflictError:
            # A concurrent submission of the same record won the race.
            return Submitted(
                message_id=message_id, link=link.id, created=False, removed=(), held_back=()
            )
        return Submitted(
            message_id=submitted.message_id,
            link=link.id,
            created=True,
            removed=submitted.removed,
            held_back=submitted.held_back,
            decided_by=submitted.decided_by,
        )

    def pull_collection(self, record: dict[str, Any]) -> dict[str, Any]:
        """A DE record mapped as the records store keeps it for pull links: resource ids
        (and the references between them) replaced by keyed stand-ins.

        The mapping derives ids from source identifiers (uuid5 of the hospital's code and
        a record number), so an id released to a platform would let anyone holding the
        hospital's code recover a record number the link's level withholds, or confirm a
        guess. The stand-ins are stable (the same record keeps its ids), differ from the
        research links' pseudonyms (another key), and cannot be computed without this
        controller's key. MappingError for a record that does not map."""
        collection = map_record(record, now=self.clock(), files=self.mapping_files)
        pseudonymise_ids(collection, DeidContext(self.pull_id_key, ""))
        return collection

    async def count_abroad(self, link: LinkConfig, subject: str,
                           payload: dict[str, Any] | None = None) -> None:
        """Count one item sent to a partner outside the mainland against its approval's
        cap (audited as ``crossborder.item``); raise CrossBorderRefused at the cap."""
        partner = self.config.partner(link.partner)
        approval = partner.cross_border
        if not partner.abroad or approval is None:
            return
        from bridge.ledger.compliance import count_cross_border

        counted = await self.db.call(
            count_cross_border, self.store, approval=approval.reference, partner=partner.id,
            link=link.id, subject=subject, cap=approval.item_cap,
            audit=self.audit(
                "crossborder.item", subject=subject, partner=partner.id,
                categories=resource_types(payload) if payload else None,
                detail=f"approval={approval.reference} jurisdiction={partner.jurisdiction}",
            ),
        )
        if not counted.allowed:
            raise CrossBorderRefused(
                f"cross-border approval {approval.reference} allows {approval.item_cap} items,"
                " all of them sent",
                location=f"partners.{partner.id}.cross_border.item_cap",
                approval=approval.reference,
            )

    async def keep_for_pull(self, record: dict[str, Any], *, source: str) -> bool:
        """Keep a record in the records store a pull link answers from (only when this
        controller serves record pull). True when it was new; MappingError for a record
        that does not map or names no patient (nothing is kept then)."""
        if not any(link.direction == "pull" for link in self.config.links):
            return False
        from bridge.ledger.records import put_record

        collection = self.pull_collection(record)  # first: what does not map is not written
        raw = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        result = await self.db.call(
            put_record, self.store, record=raw, dataset=str(record.get("dataset", "")),
            source=source, collection=collection, now=self.clock(),
        )
        return result.created

    def recheck_consent(self, payload: dict[str, Any], link: LinkConfig, *,
                        raw: bytes | None = None, raw_sha256: bytes | None = None) -> None:
        """Ask the consent question again at dispatch; raises ConsentDenied.

        ``raw`` is the message as the outbox holds it (``payload`` is read from it), and
        ``raw_sha256`` its SHA-256 when already computed; the question is not asked twice
        only for the very bytes that were queued.

        The question is rebuilt from the signed payload itself (its patient, every
        resource and labelled entry it carries, the span of care it describes), so it
        is the same question whether the message waited a second or a week, and it
        survives a restart. A consent narrowed meanwhile to exclude a special-disease
        class stops a message that carries that class.
        """
        now = self.clock()
        check_link(self.config, link, now, resource_types=resource_types(payload))
        registry, profile = self.consents_for(link), self.profiles[link.id]
        signature = payload.get("signature")
        data = signature.get("data") if isinstance(signature, dict) else None
        cleared = self._clearances.pop(data, None) if isinstance(data, str) else None
        if cleared is not None and cleared.holds(
                registry=registry, profile=profile, now=now,
                payload=_queued_bytes(payload, raw),
                payload_sha256=raw_sha256 if raw is not None else None):
            # Nothing the enqueue answer rested on has changed: the same question gets
            # the same answer. Asked once per message: a retry or resend asks in full.
            return
        recheck_collection(
            collection_of(payload),
            registry=registry,
            profile=profile,
            recipient=link.partner,
            purpose=link.purpose,
            now=now,
        )

    async def hold_dispatch(self, when_alone: Callable[[], T] | None = None) -> T | None:
        """Mark this process as sending from its store, before it leases anything, and
        run ``when_alone`` first when no other process sends from it (the store's
        ``hold_dispatch``, on SQLite); None on a store without the mark (PostgreSQL,
        where each process's session lock tells the others that it is alive: see
        :mod:`bridge.ledger.postgres`) or when the mark was taken already."""
        hold = getattr(self.store, "hold_dispatch", None)
        if hold is None:
            return None
        return await self.db.call(hold, when_alone)

    async def close(self) -> None:
        await self.db.aclose()


#: Rows read at a time when a controller starts: patient links, ID card notes, consents.
STARTUP_PAGE = 50_000
#: Signed messages whose digests are kept for their dispatch (about 200 bytes each).
_SIGNED_DIGESTS_MAX = 20_000
#: Signed messages kept whole for their dispatch (about 60 KiB each for a claim): enough
#: for the backlog of a link that keeps up; a longer one is read from the outbox.
_QUEUED_FORMS_MAX = 512
#: Messages queued or accepted after which the process's heap is frozen (see
#: :meth:`Controller.handled`): the first claims load what later ones reuse.
WARM_MESSAGES = 64
#: The cyclic collector's youngest-generation threshold once the process is warm (see
#: :meth:`Controller.handled`): new containers allowed before a collection.
YOUNG_OBJECTS = 50_000


def _remember(held: dict[Any, Any], key: Any, value: Any, cap: int) -> None:
    """Keep ``value`` under ``key`` in ``held``, forgetting the oldest first beyond ``cap``
    (dicts keep insertion order)."""
    held.pop(key, None)
    if len(held) >= cap:
        del held[next(iter(held))]
    held[key] = value


def _claim_and_feeds(store: Any, link_id: str, now: datetime, limit: int, lease: timedelta,
                     link_cursor: int, consent_cursor: int,
                     card_cursor: int) -> tuple[Any, Any, Any]:
    rows = store.claim_due(link_id, now=now, limit=limit, lease=lease)
    if not rows:
        return rows, ([], []), []
    return (rows, *_links_and_consent_changes(store, link_cursor, consent_cursor, card_cursor))


def _links_and_consent_changes(store: Any, link_cursor: int, consent_cursor: int,
                               card_cursor: int, *, limit: int | None = None
                               ) -> tuple[Any, Any]:
    """``((links, ID card pseudonyms), consent changes)`` after the cursors; ``limit``
    rows of each at most (each feed's own page size without)."""
    if limit is None:
        return ((links_since(store, link_cursor), id_cards_since(store, card_cursor)),
                store.consent_changes(consent_cursor))
    return ((links_since(store, link_cursor, limit=limit),
             id_cards_since(store, card_cursor, limit=limit)),
            store.consent_changes(consent_cursor, limit=limit))


class PatientLink(NamedTuple):
    """Pseudonyms of identifiers one record states for its patient, to be linked, and
    which of them are of a resident ID card number."""

    pseudonyms: tuple[str, ...]
    id_cards: tuple[str, ...]


def _intake_many(store: Any, requests: list[dict[str, Any]]) -> list[Any]:
    """For each submission (``group``, ``now``, ``cursor``, ``message_id``): the patient
    links its record states stored (see :meth:`Controller.link_patient`), then the
    consent changes after ``cursor`` and its outbox row (None when it was never queued).
    Read after every link is stored, in one trip to the store's thread. A read that
    fails (a damaged row) is the answer of its own submission only."""
    linking = [(r["group"].pseudonyms, r["now"]) for r in requests if r["group"] is not None]
    if linking:
        link_pseudonyms_many(store, linking, id_cards=[
            card for r in requests if r["group"] is not None for card in r["group"].id_cards])
    changes: dict[int, Any] = {}
    answers: list[Any] = []
    for r in requests:
        try:
            if r["cursor"] not in changes:
                changes[r["cursor"]] = store.consent_changes(r["cursor"])
            answers.append((changes[r["cursor"]], store.get_outbox(r["message_id"])))
        except Exception as exc:  # noqa: BLE001 - that submission's failure, not its neighbours'
            answers.append(exc)
    return answers


def load_deid_key(link: LinkConfig) -> bytes:
    """A link's de-identification key (hex) from ``deid_key_file`` or ``deid_key_env``;
    ConfigError naming the configuration key when it is missing or unusable."""
    where = f"links.{link.id}"
    if link.deid_key_file is not None:
        where, source = f"{where}.deid_key_file", str(link.deid_key_file)
        try:
            text = link.deid_key_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigError("cannot read the de-identification key file", location=where) from None
    elif link.deid_key_env is not None:
        where, source = f"{where}.deid_key_env", link.deid_key_env
        text = os.environ.get(link.deid_key_env, "").strip()
        if not text:
            raise ConfigError(f"environment variable {link.deid_key_env} is not set",
                              location=where)
    else:
        raise ConfigError(
            "this link's profile de-identifies with a key: name its file (deid_key_file)"
            " or environment variable (deid_key_env)", location=where)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"the key in {source} is not hexadecimal", location=where) from None
    if len(key) < 16:
        raise ConfigError(f"the key in {source} is shorter than 16 bytes", location=where)
    return key


def _held_by(result: PolicyResult) -> tuple[str, ...]:
    """Each held-back element path with the consent and provision that held it back
    (``Condition<-c-1@Consent.provision(uncovered)``); what went only because it
    referred to held-back data says so (``Claim.diagnosis<-(refers to held-back)``).
    Paths, ids and reasons only, never values."""
    decided = result.record.held_back if result.record is not None else ()
    out = [f"{h.element}<-{h.consent_id or '-'}@{h.provision_path or '-'}({h.reason})"
           for h in decided]
    own = {h.path for h in decided}
    out.extend(f"{p}<-(refers to held-back)" for p in result.held_back if p not in own)
    return tuple(dict.fromkeys(out))


def _decision_detail(exc: PolicyError) -> str:
    """The refusal as the audit records it: code, and the consent and rule that decided."""
    consent = exc.detail.get("consent_id") or "-"
    return f"{exc.code} {consent}@{exc.location or '-'}"


def _profile_for(name: str) -> LinkProfile:
    if name.endswith((".yaml", ".yml")):
        return load_profile(Path(name))
    return load_link_profile(name)


_IDENTIFIER_PREFERENCE = (
    ID_CARD_SYSTEM,  # resident ID card
    "urn:oid:2.16.156.10011.1.19",  # health card
    "urn:ws-fhir-bridge:id-document",  # passport and other ID documents
    "urn:oid:2.16.156.10011.1.13",  # medical record number
    "urn:oid:2.16.156.10011.1.12",  # inpatient number
)


def _identifier_rank(identifier: tuple[str, str]) -> tuple[int, str, str]:
    system, value = identifier
    try:
        rank = _IDENTIFIER_PREFERENCE.index(system)
    except ValueError:
        rank = len(_IDENTIFIER_PREFERENCE)
    return (rank, system, value)


def _queued_bytes(payload: dict[str, Any], raw: bytes | None) -> bytes:
    """The outbox's bytes of a message: ``raw`` when given, else ``payload`` written as
    the outbox writes it (empty when it cannot be written: it was never queued)."""
    if raw is not None:
        return raw
    try:
        return orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError):
        return b""


def _record_digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _source_key(record: dict[str, Any], replaces: str | None) -> str:
    # A corrected claim's identity depends on the claim it replaces too: a correction
    # that brings a record back to an earlier content is still a new message.
    digest = _record_digest(record)
    return digest if replaces is None else f"{digest}|replaces={replaces}"


RELATED_CLAIM_SYSTEM = "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship"


def mark_replacing(collection: dict[str, Any], replaces: str) -> None:
    """Make the Claim of a mapped collection a correction of the claim sent as ``replaces``.

    ``Claim.related`` names the replaced claim by the message identity it travelled
    under (``Bundle.identifier``, system ``urn:ietf:rfc:3986``) with relationship
    ``prior`` (conformance/PROTOCOL.md, "Corrected claims").
    """
    for entry in collection.get("entry", []):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Claim":
            resource["related"] = [
                {
                    "claim": {"identifier": {"system": "urn:ietf:rfc:3986", "value": replaces}},
                    "relationship": {
                        "coding": [
                            {"system": RELATED_CLAIM_SYSTEM, "code": "prior", "display": "Prior Claim"}
                        ]
                    },
                }
            ]


def _record_key(record: dict[str, Any]) -> str:
    return _record_digest(record)[:16]


def _record_patient_ids(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Patient identifiers straight from a DE record, for auditing a refusal."""
    elements = record.get("elements") if isinstance(record, dict) else None
    if not isinstance(elements, dict):
        return []
    value = elements.get("HDSD00.11.048")
    return [("urn:oid:2.16.156.10011.1.3", str(value))] if value else []
