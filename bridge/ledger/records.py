"""The records store: the hospital's mapped records, indexed for record pull.

A pull source answers from here (``bridge.link.pull``). Records come in as DE records
(over MLLP, via ``bridge push``, or ``bridge records import``); each is mapped to FHIR
once, by the same mapping as a pushed claim, and its resources are kept per patient:

``pull_record``
    each source record once (by digest), sealed, with where it came from.
``pull_person_key``
    patient identifier (``system|value``) → the person the records belong to. A record
    joins the person that already holds one of its Patient's identifiers (the most
    stable one by the bridge's identifier preference), so records from different data
    sets, whose Patient ids differ, make one patient; the person id is the first
    record's Patient id. A record whose identifiers are held by two persons joins them
    (the other person's identifiers, records and resources move to the chosen one, as
    new versions), so the order records arrive in does not decide who is one patient;
    two persons with different resident ID card numbers are never joined.
``pull_resource``
    versions of each resource of a person, keyed by ``(person, type, id)``. References
    between the resources of a record (``urn:uuid:…``) become ``Type/id``, the Patient
    takes the person id, and a resource whose content is unchanged is not stored again.
    Every new version gets the next number of ``pull_head``; the version it replaces
    records that number in ``superseded``.

Snapshots: a reader takes ``pull_head.seq`` once and reads every page of one traversal
*as of* that number (``seq <= S`` and not superseded at or before ``S``), in ``seq``
order. Writers take the head row for update, so versions become visible in number
order on both engines, and a traversal neither repeats nor skips a resource while
records keep arriving; what arrives later is found by the next pull (``_since``).

Health data (records and resources) is stored through ``tx.seal``. Times are
:func:`~bridge.ledger.audit.format_time` text. Review items (emergency overrides and
bulk-query alarms) and pages received by a pulling platform live here too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from bridge.errors import MappingError
from bridge.ledger.audit import AuditEntry, AuditRecord, format_time
from bridge.records.search import DateFilter, resource_date_range

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx

log = logging.getLogger(__name__)

__all__ = [
    "PatientView",
    "PutResult",
    "ReviewItem",
    "StoredResource",
    "add_review",
    "append_audits",
    "find_person",
    "hl7_pending",
    "mark_reviewed",
    "open_patient",
    "page",
    "put_record",
    "read_refs",
    "received_pages",
    "record_received",
    "review_items",
    "snapshot",
]

_KEY_CTX = "pull_person_key.sealed_key"
_RESOURCE_CTX = "pull_resource.body"
_RECORD_CTX = "pull_record.record"
_REVIEW_CTX = "pull_review.reason"
_RECEIVED_CTX = "pull_received.body"
_HL7_CTX = "hl7_inbox.record"

# The same preference as the audit pseudonym: the most stable identifier decides which
# person a record joins.
IDENTIFIER_PREFERENCE: tuple[str, ...] = (
    "urn:oid:2.16.156.10011.1.3",  # resident ID card
    "urn:oid:2.16.156.10011.1.19",  # health card
    "urn:ws-fhir-bridge:id-document",  # passport and other ID documents
    "urn:oid:2.16.156.10011.1.13",  # medical record number
    "urn:oid:2.16.156.10011.1.12",  # inpatient number
)


def _rank(key: str) -> tuple[int, str]:
    system = key.partition("|")[0]
    try:
        return (IDENTIFIER_PREFERENCE.index(system), key)
    except ValueError:
        return (len(IDENTIFIER_PREFERENCE), key)


@dataclass(frozen=True)
class PutResult:
    """What :func:`put_record` did: the person, whether the record was new, and how many
    resource versions it added (0 when everything was already held)."""

    person: str
    created: bool
    versions: int
    patient_keys: tuple[str, ...]


@dataclass(frozen=True)
class StoredResource:
    """One resource version as a page reads it."""

    seq: int
    rtype: str
    rid: str
    resource: dict[str, Any]


@dataclass(frozen=True)
class ReviewItem:
    """An emergency override or a bulk-query alarm waiting for an operator's review."""

    id: int
    time: str
    link: str
    partner: str
    kind: str
    actor: str | None
    reason: str | None
    audit_seq: int
    reviewed: str | None


# --- preparing a record's resources (pure) -----------------------------------------------


def _patient_of(collection: dict[str, Any]) -> dict[str, Any]:
    patients: list[dict[str, Any]] = [
        e["resource"]
        for e in collection.get("entry") or ()
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Patient"
    ]
    if len(patients) != 1:
        raise MappingError("a record for pull concerns exactly one patient",
                           location="Bundle.entry.resource")
    return patients[0]


def patient_keys(collection: dict[str, Any]) -> list[str]:
    """``system|value`` of every identifier of the collection's one Patient."""
    patient = _patient_of(collection)
    keys = sorted(
        {
            f"{i['system']}|{i['value']}"
            for i in patient.get("identifier") or ()
            if isinstance(i, dict) and i.get("system") and i.get("value")
        },
        key=_rank,
    )
    if not keys:
        raise MappingError("the patient has no identifier to index", location="Patient.identifier")
    return keys


def _rewrite(value: Any, refs: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, refs) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in refs:
            out["reference"] = refs[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, refs) for v in value]
    return value


def compartment_resources(collection: dict[str, Any], person: str) -> list[dict[str, Any]]:
    """The collection's resources as the store keeps them for ``person``: the Patient's
    id is the person id, and references by ``fullUrl`` or ``Type/id`` point at ``Type/id``."""
    patient = _patient_of(collection)
    refs: dict[str, str] = {}
    for entry in collection.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("id"):
            continue
        rtype = str(resource["resourceType"])
        rid = person if resource is patient else str(resource["id"])
        target = f"{rtype}/{rid}"
        if entry.get("fullUrl"):
            refs[str(entry["fullUrl"])] = target
        refs[f"{rtype}/{resource['id']}"] = target
    out: list[dict[str, Any]] = []
    for entry in collection.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not resource.get("id"):
            continue
        body = _rewrite(resource, refs)
        if resource is patient:
            body["id"] = person
        out.append(body)
    return out


def _content_digest(resource: dict[str, Any]) -> str:
    meta = {k: v for k, v in (resource.get("meta") or {}).items()
            if k not in ("lastUpdated", "versionId")}
    body = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        body["meta"] = meta
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _merge_patient(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The person's Patient as records add to it: a newer record's elements replace the
    older ones it carries, elements it lacks are kept (a lab report names the patient
    but not the address), and every identifier the person was known by stays."""
    merged = {k: v for k, v in old.items() if k != "meta"}
    merged.update(new)
    seen = {(i.get("system"), i.get("value")) for i in new.get("identifier") or ()}
    extra = [i for i in old.get("identifier") or ()
             if (i.get("system"), i.get("value")) not in seen]
    if extra:
        merged["identifier"] = [*(new.get("identifier") or []), *extra]
    return merged


# --- writing -------------------------------------------------------------------------------


def _held_persons(tx: Tx, keys: Sequence[str]) -> dict[str, str]:
    """``system|value`` → person, for those of ``keys`` some person holds."""
    marks = ",".join("?" * len(keys))
    stored = {tx.blind(k): k for k in keys}
    held = tx.all(f"SELECT patient_key, person FROM pull_person_key WHERE patient_key IN ({marks})",
                  list(stored))
    return {stored[str(row[0])]: str(row[1]) for row in held}


def _best_person(held: dict[str, str], fallback: str) -> str:
    """The person holding the most stable of these identifiers (by the preference)."""
    return held[min(held, key=_rank)] if held else fallback


def _choose_person(tx: Tx, keys: Sequence[str], fallback: str) -> str:
    return _best_person(_held_persons(tx, keys) if keys else {}, fallback)


_ID_CARD = IDENTIFIER_PREFERENCE[0]


def _person_keys(tx: Tx, person: str) -> list[str]:
    rows = tx.all("SELECT sealed_key FROM pull_person_key WHERE person=?", (person,))
    return [(tx.unseal(r[0], context=_KEY_CTX) or b"").decode() for r in rows if r[0] is not None]


def _may_join(tx: Tx, a: str, b: str) -> bool:
    """False when the two persons hold different resident ID card numbers: a record that
    names both is a conflict for the hospital to resolve, not a reason to join them."""
    cards_a = {k for k in _person_keys(tx, a) if k.partition("|")[0] == _ID_CARD}
    cards_b = {k for k in _person_keys(tx, b) if k.partition("|")[0] == _ID_CARD}
    return not (cards_a and cards_b and cards_a.isdisjoint(cards_b))


def _current(tx: Tx, person: str, rtype: str, rid: str) -> tuple[int, str, bytes] | None:
    row = tx.one(
        "SELECT seq, digest, body FROM pull_resource WHERE person=? AND rtype=? AND rid=?"
        " AND superseded IS NULL" + tx.for_update,
        (person, rtype, rid),
    )
    return None if row is None else (int(row[0]), str(row[1]), row[2])


def _write_version(
    tx: Tx, *, head: int, person: str, resource: dict[str, Any], stamp: str, record_id: int,
    version: int | None = None,
) -> int:
    """Keep ``resource`` as the person's new version of it unless its content is already
    the current one; returns the new head (unchanged when nothing was written).
    ``version`` overrides the version number (a resource moved from another person
    continues its own numbering)."""
    rtype, rid = str(resource["resourceType"]), str(resource["id"])
    current = _current(tx, person, rtype, rid)
    if current is not None and rtype == "Patient":
        old = orjson.loads(tx.unseal(current[2], context=_RESOURCE_CTX) or b"{}")
        resource = _merge_patient(resource, old)
    content = _content_digest(resource)
    if current is not None and current[1] == content:
        return head
    head += 1
    meta = dict(resource.get("meta") or {})
    # The resource's own version number, never the store-wide position: a version
    # released to a partner must not count what the store keeps about others.
    if version is None:
        version = 1
        if current is not None:
            version += int(tx.one("SELECT COUNT(*) FROM pull_resource WHERE person=? AND rtype=?"
                                  " AND rid=?", (person, rtype, rid))[0])
    meta["versionId"] = str(version)
    meta["lastUpdated"] = stamp
    stored = {**resource, "meta": meta}
    span = resource_date_range(stored)
    if current is not None:
        tx.execute("UPDATE pull_resource SET superseded=? WHERE seq=?", (head, current[0]))
    tx.execute(
        "INSERT INTO pull_resource (seq, person, rtype, rid, date_lo, date_hi, last_updated,"
        " digest, body, record_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (head, person, rtype, rid, span[0] if span else None, span[1] if span else None,
         stamp, content, tx.seal(orjson.dumps(stored), context=_RESOURCE_CTX), record_id),
    )
    return head


def _join(tx: Tx, *, head: int, source: str, into: str, stamp: str) -> int:
    """Move person ``source``'s identifiers, records and current resources to ``into``:
    each resource as a new version under ``into`` whose Patient reference names
    ``into``, the old version superseded at the same number. Older snapshots still
    read both persons as they were. Returns the new head."""
    tx.execute("UPDATE pull_person_key SET person=? WHERE person=?", (into, source))
    tx.execute("UPDATE pull_record SET person=? WHERE person=?", (into, source))
    rows = tx.all(
        "SELECT seq, rtype, rid, body, record_id FROM pull_resource WHERE person=?"
        " AND superseded IS NULL ORDER BY seq" + tx.for_update,
        (source,),
    )
    refs = {f"Patient/{source}": f"Patient/{into}"}
    for seq, rtype, rid, body, record_id in rows:
        resource = orjson.loads(tx.unseal(body, context=_RESOURCE_CTX) or b"{}")
        old_version = int((resource.get("meta") or {}).get("versionId") or 1)
        moved = _rewrite({k: v for k, v in resource.items() if k != "meta"}, refs)
        version: int | None = old_version + 1
        if rtype == "Patient":
            # The joined person's Patient: the chosen one's elements win, every
            # identifier either was known by stays.
            moved["id"] = into
            current = _current(tx, into, "Patient", into)
            if current is not None:
                kept = orjson.loads(tx.unseal(current[2], context=_RESOURCE_CTX) or b"{}")
                moved = _merge_patient({k: v for k, v in kept.items() if k != "meta"}, moved)
            version = None
        written = _write_version(tx, head=head, person=into, resource=moved, stamp=stamp,
                                 record_id=int(record_id), version=version)
        # The old version ends at a number of its own even when the chosen person
        # already held the same content (a snapshot never loses what it could read).
        head = written if written > head else head + 1
        tx.execute("UPDATE pull_resource SET superseded=? WHERE seq=?", (head, int(seq)))
    return head


def _put(
    tx: Tx, *, record: bytes, dataset: str, source: str, collection: dict[str, Any], now: datetime
) -> PutResult:
    digest = hashlib.sha256(record).hexdigest()
    keys = patient_keys(collection)
    # The head row is the writers' lock: versions are numbered and committed in order.
    head = int(tx.one("SELECT seq FROM pull_head WHERE id=1" + tx.for_update)[0])
    known = tx.one("SELECT person FROM pull_record WHERE digest=?", (digest,))
    if known is not None:
        return PutResult(str(known[0]), False, 0, tuple(keys))
    stamp = format_time(now)
    start = head
    held = _held_persons(tx, keys)
    person = _best_person(held, str(_patient_of(collection)["id"]))
    for other in sorted(set(held.values()) - {person}):
        if _may_join(tx, person, other):
            head = _join(tx, head=head, source=other, into=person, stamp=stamp)
        else:
            log.warning("a record names two patients with different resident ID cards;"
                        " they are kept apart (source %s)", source.partition(":")[0])
    tx.executemany(
        "INSERT INTO pull_person_key (patient_key, person, sealed_key) VALUES (?,?,?)"
        " ON CONFLICT (patient_key) DO NOTHING",
        [(tx.blind(k), person, tx.seal(k.encode(), context=_KEY_CTX)) for k in keys],
    )
    row = tx.one(
        "INSERT INTO pull_record (digest, source, dataset, person, record, received)"
        " VALUES (?,?,?,?,?,?) RETURNING id",
        (digest, source, dataset, person, tx.seal(record, context=_RECORD_CTX), stamp),
    )
    record_id = int(row[0])
    for resource in compartment_resources(collection, person):
        head = _write_version(tx, head=head, person=person, resource=resource, stamp=stamp,
                              record_id=record_id)
    tx.execute("UPDATE pull_head SET seq=? WHERE id=1", (head,))
    return PutResult(person, True, head - start, tuple(keys))


def put_record(
    store: Store,
    *,
    record: bytes,
    dataset: str,
    source: str,
    collection: dict[str, Any],
    now: datetime,
    audit: AuditRecord | None = None,
) -> PutResult:
    """Keep one source record and its mapped ``collection`` (from ``map_record``), once.

    ``record`` is the source record's bytes (its digest makes a re-delivery a no-op);
    ``source`` says where it came from (``mllp:<sender>/<control id>``, ``push``,
    ``import:<file>``). Raises MappingError for a collection without exactly one
    Patient with an identifier; nothing is written then.
    """
    with store.transaction("put_record") as tx:
        result = _put(tx, record=record, dataset=dataset, source=source,
                      collection=collection, now=now)
        if audit is not None and result.created:
            tx.append_audit(audit)
        return result


def put_records(
    store: Store,
    items: Iterable[tuple[bytes, str, str, dict[str, Any]]],
    *,
    now: datetime,
) -> list[PutResult]:
    """Several ``(record, dataset, source, collection)`` in one transaction (bulk import)."""
    with store.transaction("put_records") as tx:
        return [
            _put(tx, record=r, dataset=d, source=s, collection=c, now=now)
            for r, d, s, c in items
        ]


def hl7_pending(store: Store, *, limit: int = 100) -> list[tuple[int, str, str, bytes]]:
    """HL7 inbox rows with a DE record not yet indexed: ``(id, sender, control id, record)``."""
    with store.read("hl7_pending") as tx:
        row = tx.one("SELECT position FROM pull_cursor WHERE name='hl7_inbox'")
        after = int(row[0]) if row else 0
        rows = tx.all(
            "SELECT id, sender, control_id, record FROM hl7_inbox WHERE id>? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [
            (int(r[0]), str(r[1]), str(r[2]), tx.unseal(r[3], context=_HL7_CTX) or b"")
            for r in rows
        ]


def index_hl7(
    store: Store,
    items: Sequence[tuple[int, bytes, str, dict[str, Any] | None]],
    *,
    now: datetime,
) -> int:
    """Keep mapped HL7 records ``(inbox id, record, source, collection or None)`` and move
    the inbox cursor past them, in one transaction. ``None`` skips a row (no record, or
    one that concerns no single identified patient). Returns how many were kept."""
    if not items:
        return 0
    kept = 0
    with store.transaction("index_hl7") as tx:
        for _inbox_id, record, source, collection in items:
            if collection is None:
                continue
            dataset = str(orjson.loads(record).get("dataset", "")) if record else ""
            if _put(tx, record=record, dataset=dataset, source=source,
                    collection=collection, now=now).created:
                kept += 1
        last = max(i for i, _, _, _ in items)
        tx.execute(
            "INSERT INTO pull_cursor (name, position) VALUES ('hl7_inbox', ?)"
            " ON CONFLICT (name) DO UPDATE SET position=CASE WHEN excluded.position>"
            "pull_cursor.position THEN excluded.position ELSE pull_cursor.position END",
            (last,),
        )
    return kept


# --- reading -------------------------------------------------------------------------------


def snapshot(store: Store) -> int:
    """The current head: every version numbered up to it is committed and visible."""
    with store.read("pull_head") as tx:
        return int(tx.one("SELECT seq FROM pull_head WHERE id=1")[0])


def find_person(store: Store, keys: Sequence[str]) -> str | None:
    """The person holding any of these ``system|value`` identifiers, or None."""
    if not keys:
        return None
    with store.read("find_person") as tx:
        return _choose_person(tx, keys, "") or None


_VISIBLE = "seq<=? AND (superseded IS NULL OR superseded>?)"


def _range_sql(f: DateFilter, lo: str, hi: str) -> tuple[str, list[str]]:
    """SQL for one R4 date comparison on a stored range ``[lo, hi)`` (see DateFilter)."""
    inside = f"({lo}>=? AND {hi}<=?)"
    match f.prefix:
        case "eq":
            return inside, [f.lo, f.hi]
        case "ne":
            return f"NOT {inside}", [f.lo, f.hi]
        case "gt":
            return f"{hi}>?", [f.hi]
        case "lt":
            return f"{lo}<?", [f.lo]
        case "ge":
            return f"({hi}>? OR {inside})", [f.hi, f.lo, f.hi]
        case "le":
            return f"({lo}<? OR {inside})", [f.lo, f.lo, f.hi]
        case "sa":
            return f"{lo}>=?", [f.hi]
        case "eb":
            return f"{hi}<=?", [f.lo]
    raise AssertionError(f.prefix)  # pragma: no cover


def _instant_sql(f: DateFilter, col: str) -> tuple[str, list[str]]:
    """SQL for one comparison on a stored instant (a range of one microsecond)."""
    match f.prefix:
        case "eq":
            return f"({col}>=? AND {col}<?)", [f.lo, f.hi]
        case "ne":
            return f"NOT ({col}>=? AND {col}<?)", [f.lo, f.hi]
        case "gt" | "sa":
            return f"{col}>=?", [f.hi]
        case "lt" | "eb":
            return f"{col}<?", [f.lo]
        case "ge":
            return f"{col}>=?", [f.lo]
        case "le":
            return f"{col}<?", [f.hi]
    raise AssertionError(f.prefix)  # pragma: no cover


def page(
    store: Store,
    *,
    person: str,
    types: Sequence[str],
    snapshot_seq: int,
    after: int,
    limit: int,
    dates: Sequence[DateFilter] = (),
    last_updated: Sequence[DateFilter] = (),
    ids: Sequence[str] = (),
) -> list[StoredResource]:
    """Up to ``limit`` resources of ``person`` of ``types`` visible at ``snapshot_seq``,
    numbered after ``after``, in number order, filtered by date and lastUpdated."""
    if not types:
        return []
    where = [f"person=? AND seq>? AND {_VISIBLE}"]
    params: list[Any] = [person, after, snapshot_seq, snapshot_seq]
    where.append(f"rtype IN ({','.join('?' * len(types))})")
    params.extend(types)
    if ids:
        where.append(f"rid IN ({','.join('?' * len(ids))})")
        params.extend(ids)
    for f in dates:
        sql, args = _range_sql(f, "date_lo", "date_hi")
        where.append(f"date_lo IS NOT NULL AND {sql}")
        params.extend(args)
    for f in last_updated:
        sql, args = _instant_sql(f, "last_updated")
        where.append(sql)
        params.extend(args)
    statement = (
        "SELECT seq, rtype, rid, body FROM pull_resource WHERE "
        + " AND ".join(where)
        + " ORDER BY seq LIMIT ?"
    )
    params.append(limit)
    with store.read("pull_page") as tx:
        return [
            StoredResource(int(r[0]), str(r[1]), str(r[2]),
                           orjson.loads(tx.unseal(r[3], context=_RESOURCE_CTX) or b"{}"))
            for r in tx.all(statement, params)
        ]


def read_refs(
    store: Store, *, person: str, refs: Iterable[tuple[str, str]], snapshot_seq: int
) -> list[StoredResource]:
    """The resources ``(type, id)`` of ``person`` as they were at ``snapshot_seq``."""
    wanted = sorted(set(refs))
    if not wanted:
        return []
    out: list[StoredResource] = []
    with store.read("pull_refs") as tx:
        for i in range(0, len(wanted), 200):
            chunk = wanted[i : i + 200]
            cond = " OR ".join("(rtype=? AND rid=?)" for _ in chunk)
            args: list[Any] = [person, snapshot_seq, snapshot_seq]
            for rtype, rid in chunk:
                args.extend((rtype, rid))
            rows = tx.all(
                f"SELECT seq, rtype, rid, body FROM pull_resource WHERE person=? AND {_VISIBLE}"
                f" AND ({cond})",
                args,
            )
            out.extend(
                StoredResource(int(r[0]), str(r[1]), str(r[2]),
                               orjson.loads(tx.unseal(r[3], context=_RESOURCE_CTX) or b"{}"))
                for r in rows
            )
    return sorted(out, key=lambda r: r.seq)


@dataclass(frozen=True)
class PatientView:
    """A patient as one traversal sees it: the snapshot, the person id, the Patient
    resource at that snapshot and every identifier the person is indexed under."""

    snapshot: int
    person: str
    patient: StoredResource
    identifiers: tuple[tuple[str, str], ...]


def open_patient(
    store: Store, *, key: str | None = None, person: str | None = None,
    snapshot_seq: int | None = None,
) -> tuple[int, PatientView | None]:
    """In one read: the snapshot (the current head unless given) and the patient found by
    identifier ``key`` (``system|value``) or by ``person`` id, or None when there is no
    such patient or no Patient at that snapshot. Also says whether HL7 inbox rows wait
    to be indexed, so a caller can catch up first: ``(-1, None)`` then."""
    with store.read("open_patient") as tx:
        if snapshot_seq is None:
            cursor = tx.one("SELECT position FROM pull_cursor WHERE name='hl7_inbox'")
            after = int(cursor[0]) if cursor else 0
            if tx.one("SELECT 1 FROM hl7_inbox WHERE id>? LIMIT 1", (after,)) is not None:
                return -1, None
            snapshot_seq = int(tx.one("SELECT seq FROM pull_head WHERE id=1")[0])
        if key is not None:
            person = _choose_person(tx, [key], "") or None
        if person is None:
            return snapshot_seq, None
        rows = tx.all("SELECT patient_key, sealed_key FROM pull_person_key WHERE person=?",
                      (person,))
        keys = sorted(((tx.unseal(r[1], context=_KEY_CTX) or b"").decode() if r[1] is not None
                       else str(r[0]) for r in rows), key=_rank)
        if not keys:
            return snapshot_seq, None
        row = tx.one(
            f"SELECT seq, rtype, rid, body FROM pull_resource WHERE person=? AND {_VISIBLE}"
            " AND rtype='Patient' AND rid=?",
            (person, snapshot_seq, snapshot_seq, person),
        )
        if row is None:
            return snapshot_seq, None
        patient = StoredResource(int(row[0]), str(row[1]), str(row[2]),
                                 orjson.loads(tx.unseal(row[3], context=_RESOURCE_CTX) or b"{}"))
        identifiers = tuple((k.partition("|")[0], k.partition("|")[2]) for k in keys)
        return snapshot_seq, PatientView(snapshot_seq, person, patient, identifiers)


def append_audits(store: Store, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """Several audit entries in one durable transaction (group commit)."""
    with store.transaction("pull_audit") as tx:
        return [tx.append_audit(r) for r in records]


# --- review items and received pages ------------------------------------------------------


def add_review(
    store: Store,
    *,
    link: str,
    partner: str,
    kind: str,
    actor: str | None,
    reason: str | None,
    audit: AuditRecord,
    coalesce_since: str | None = None,
) -> AuditEntry:
    """Record an override or an alarm for review, with its audit entry, in one transaction.

    With ``coalesce_since`` (a :func:`format_time`), an item of the same link, partner,
    kind and actor still pending since then covers this one: only the audit entry is
    written (one emergency is one review, however many requests it takes)."""
    with store.transaction("pull_review") as tx:
        entry = tx.append_audit(audit)
        if coalesce_since is not None and tx.one(
            "SELECT 1 FROM pull_review WHERE link=? AND partner=? AND kind=?"
            " AND COALESCE(actor, '')=? AND reviewed IS NULL AND time>=?",
            (link, partner, kind, actor or "", coalesce_since),
        ) is not None:
            return entry
        tx.execute(
            "INSERT INTO pull_review (time, link, partner, kind, actor, reason, audit_seq)"
            " VALUES (?,?,?,?,?,?,?)",
            (format_time(audit.time), link, partner, kind, actor,
             tx.seal(reason.encode(), context=_REVIEW_CTX) if reason is not None else None,
             entry.seq),
        )
        return entry


def review_items(store: Store, *, pending_only: bool = True, limit: int = 100) -> list[ReviewItem]:
    """Overrides and alarms, newest first (only those not yet reviewed by default)."""
    cond = " WHERE reviewed IS NULL" if pending_only else ""
    with store.read("pull_review_list") as tx:
        rows = tx.all(
            "SELECT id, time, link, partner, kind, actor, reason, audit_seq, reviewed"
            f" FROM pull_review{cond} ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            ReviewItem(
                int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                r[5], (tx.unseal(r[6], context=_REVIEW_CTX) or b"").decode() if r[6] else None,
                int(r[7]), r[8],
            )
            for r in rows
        ]


def mark_reviewed(store: Store, item_id: int, *, audit: AuditRecord) -> bool:
    """Mark one review item as reviewed (audited); False when there is no such pending item."""
    with store.transaction("pull_review_done") as tx:
        cur = tx.execute(
            "UPDATE pull_review SET reviewed=? WHERE id=? AND reviewed IS NULL",
            (format_time(audit.time), item_id),
        )
        if cur.rowcount != 1:
            return False
        tx.append_audit(audit)
        return True


def record_received(
    store: Store,
    *,
    link: str,
    partner: str,
    page_id: str,
    digest: str,
    body: bytes,
    audit: AuditRecord,
    now: datetime,
) -> tuple[AuditEntry | None, bool]:
    """Keep one signed page a partner answered, with its audit entry; a page already held
    (same partner and identity) is not stored again: ``(None, False)``."""
    with store.transaction("pull_received") as tx:
        if tx.one("SELECT 1 FROM pull_received WHERE partner=? AND page_id=?",
                  (partner, page_id)) is not None:
            return None, False
        entry = tx.append_audit(audit)
        tx.execute(
            "INSERT INTO pull_received (link, partner, page_id, digest, body, received,"
            " audit_seq) VALUES (?,?,?,?,?,?,?)",
            (link, partner, page_id, digest, tx.seal(body, context=_RECEIVED_CTX),
             format_time(now), entry.seq),
        )
        return entry, True


def received_pages(store: Store, *, partner: str | None = None) -> list[tuple[str, str, bytes]]:
    """``(page id, digest, body)`` of pages received, in arrival order."""
    cond, args = ("WHERE partner=?", [partner]) if partner else ("", [])
    with store.read("pull_received_list") as tx:
        rows = tx.all(f"SELECT page_id, digest, body FROM pull_received {cond} ORDER BY id", args)
        return [(str(r[0]), str(r[1]), tx.unseal(r[2], context=_RECEIVED_CTX) or b"")
                for r in rows]

