"""The records store record pull answers from, on SQLite and PostgreSQL.

Records of one person from different data sets join one patient; a record delivered
twice is kept once; a traversal reads one snapshot, so versions written after it stay
invisible to it (and what they replace stays visible); SQL date filters give exactly
the R4 comparisons of the pure search module.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pg_support import PGSchema, fresh_schema
from pull_support import id_card, person_records

from bridge.config import StoreConfig
from bridge.errors import MappingError
from bridge.ledger import Store, open_store
from bridge.ledger import records as rec
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore
from bridge.ledger.sqlite import SQLiteStore
from bridge.mapping import map_record
from bridge.records.search import DateFilter

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
ALL_TYPES = ["Patient", "Encounter", "Condition", "Observation", "DiagnosticReport",
             "Organization", "Coverage", "Claim", "Practitioner", "Specimen", "ServiceRequest",
             "Procedure"]


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgresql", "sqlite-encrypted"])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if request.param == "sqlite-encrypted":
        # The same behaviour with everything sealed and person keys stored keyed.
        monkeypatch.setenv("BRIDGE_TEST_RECORDS_KEK", "ab" * 32)
        s: Store = open_store(StoreConfig(path=tmp_path / "r.db",
                                          data_key_env="BRIDGE_TEST_RECORDS_KEK"))
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "r.db")
    else:
        schema: PGSchema = request.getfixturevalue("pg_schema")
        s = PostgresStore(schema.dsn, schema=schema.schema)
    try:
        yield s
    finally:
        s.close()


def _put(store: Store, record: dict[str, Any], when: datetime = NOW) -> rec.PutResult:
    return rec.put_record(
        store, record=orjson.dumps(record, option=orjson.OPT_SORT_KEYS),
        dataset=record["dataset"], source="test", collection=map_record(record, now=when),
        now=when,
    )


def _all(store: Store, person: str, snap: int) -> list[rec.StoredResource]:
    return rec.page(store, person=person, types=ALL_TYPES, snapshot_seq=snap, after=0,
                    limit=10_000)


def test_records_of_one_person_from_two_data_sets_join_one_patient(store: Store) -> None:
    stay, lab = person_records(1)
    first = _put(store, stay)
    second = _put(store, lab)
    assert first.created and second.created
    assert second.person == first.person
    system, value = id_card(stay)
    assert rec.find_person(store, [f"{system}|{value}"]) == first.person
    resources = _all(store, first.person, rec.snapshot(store))
    patients = [r for r in resources if r.rtype == "Patient"]
    assert len(patients) == 1 and patients[0].rid == first.person
    # References inside the compartment point at Type/id, the Patient at the person id.
    for r in resources:
        text = orjson.dumps(r.resource).decode()
        assert "urn:uuid:" not in text
        if "subject" in r.resource:
            assert r.resource["subject"]["reference"] == f"Patient/{first.person}"
    # The Patient keeps every identifier the person was known by.
    keys = {f"{i['system']}|{i['value']}" for i in patients[0].resource["identifier"]}
    assert set(first.patient_keys) | set(second.patient_keys) <= keys


def _compartment(store: Store, records: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a pull by ID card reads after ``records`` were kept in this order: the
    resources other than the Patient by (type, id, content), and the Patient's
    identifiers. Organizations and practitioners are compared by id only: records name
    them with more or fewer details, and the latest record's version is the current one."""
    person = rec.find_person(store, ["|".join(id_card(records[0]))])
    assert person is not None
    view = _all(store, person, rec.snapshot(store))
    others = sorted(
        (r.rtype, r.rid, b"" if r.rtype in ("Organization", "Practitioner") else
         orjson.dumps({k: v for k, v in r.resource.items() if k != "meta"},
                      option=orjson.OPT_SORT_KEYS).replace(person.encode(), b"P"))
        for r in view if r.rtype != "Patient"
    )
    (patient,) = [r for r in view if r.rtype == "Patient"]
    for r in view:
        for ref in orjson.dumps(r.resource).decode().split('"Patient/')[1:]:
            assert ref.startswith(f'{person}"'), (r.rtype, "references another patient")
    return tuple(others), frozenset((i["system"], i["value"]) for i in patient.resource["identifier"])


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 3, 0, 2), (3, 1, 2, 0), (1, 0, 3, 2)])
def test_the_order_records_arrive_in_does_not_decide_who_is_one_patient(
    store: Store, tmp_path: Path, order: tuple[int, ...]
) -> None:
    # Lab reports name the patient by inpatient number only; the stay that carries both
    # the number and the ID card may arrive after them (an import before the MLLP feed
    # was indexed). Every order gives the one patient the arrival order 0-1-2-3 gives.
    records = person_records(2)
    reference = SQLiteStore(tmp_path / "reference.db")
    try:
        for record in records:
            _put(reference, record)
        expected = _compartment(reference, records)
    finally:
        reference.close()
    for i in order:
        _put(store, records[i])
    assert _compartment(store, records) == expected
    assert sum(1 for t, _, _ in expected[0] if t == "Encounter") == 4
    assert sum(1 for t, _, _ in expected[0] if t == "DiagnosticReport") == 2


def test_a_join_leaves_earlier_snapshots_as_they_were(store: Store) -> None:
    stay, lab, second, _ = person_records(2)
    first = _put(store, second)
    apart = _put(store, lab)  # names the first stay's inpatient number only: apart
    assert apart.person != first.person
    snap = rec.snapshot(store)
    before = {(r.rtype, r.rid, r.seq) for r in _all(store, apart.person, snap)}
    joined = _put(store, stay)
    assert joined.person == first.person
    # The old snapshot still reads the lab report's person as it was; the new one reads
    # its resources under the joined patient, and nothing under the old person.
    assert {(r.rtype, r.rid, r.seq) for r in _all(store, apart.person, snap)} == before
    assert _all(store, apart.person, rec.snapshot(store)) == []
    now_types = {(r.rtype, r.rid) for r in _all(store, joined.person, rec.snapshot(store))}
    assert {(t, i) for t, i, _ in before if t != "Patient"} <= now_types
    assert rec.find_person(store, list(apart.patient_keys)) == joined.person


def test_two_patients_with_different_id_cards_are_never_joined(store: Store) -> None:
    stay, _lab = person_records(1)
    other = person_records(1, seed=11, labs=False)[0]
    a = _put(store, stay)
    b = _put(store, other)
    assert a.person != b.person
    # A record naming the first patient's inpatient number with the second patient's
    # ID card is a conflict: both persons stay apart with their own resources.
    elements = dict(other["elements"])
    elements["HDSD00.11.140"] = stay["elements"]["HDSD00.11.140"]
    _put(store, {**other, "elements": elements})
    assert rec.find_person(store, ["|".join(id_card(stay))]) == a.person
    assert rec.find_person(store, ["|".join(id_card(other))]) == b.person
    assert _all(store, a.person, rec.snapshot(store))


def test_a_record_delivered_twice_is_kept_once(store: Store) -> None:
    (stay,) = person_records(1, labs=False)
    _put(store, stay)
    head = rec.snapshot(store)
    again = _put(store, stay, NOW + timedelta(hours=1))
    assert not again.created and again.versions == 0
    assert rec.snapshot(store) == head


def test_a_snapshot_hides_later_versions_and_keeps_what_they_replaced(store: Store) -> None:
    stays = person_records(3, labs=False)
    first = _put(store, stays[0])
    snap = rec.snapshot(store)
    before = {(r.rtype, r.rid): r.seq for r in _all(store, first.person, snap)}
    for stay in stays[1:]:
        _put(store, stay, NOW + timedelta(minutes=5))
    # The Patient was re-versioned by the later stays; the old snapshot still sees the
    # version it had, once, and none of the new resources.
    old_view = _all(store, first.person, snap)
    assert {(r.rtype, r.rid): r.seq for r in old_view} == before
    new_view = _all(store, first.person, rec.snapshot(store))
    keys = [(r.rtype, r.rid) for r in new_view]
    assert len(keys) == len(set(keys)) and set(before) <= set(keys) and len(keys) > len(before)


def test_paging_by_position_neither_repeats_nor_skips(store: Store) -> None:
    records = person_records(4)
    person = ""
    for r in records:
        person = _put(store, r).person
    snap = rec.snapshot(store)
    whole = [(r.rtype, r.rid) for r in _all(store, person, snap)]
    seen: list[tuple[str, str]] = []
    after = 0
    while True:
        chunk = rec.page(store, person=person, types=ALL_TYPES, snapshot_seq=snap, after=after,
                         limit=3)
        if not chunk:
            break
        seen.extend((r.rtype, r.rid) for r in chunk)
        after = chunk[-1].seq
    assert seen == whole


def test_a_record_without_an_identified_patient_is_refused_and_nothing_is_kept(
    store: Store,
) -> None:
    (stay,) = person_records(1, labs=False)
    collection = map_record(stay, now=NOW)
    for entry in collection["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"].pop("identifier")
    head = rec.snapshot(store)
    with pytest.raises(MappingError) as info:
        rec.put_record(store, record=b"{}", dataset="WS445.10", source="test",
                       collection=collection, now=NOW)
    assert info.value.location == "Patient.identifier"
    assert rec.snapshot(store) == head


def test_review_items_and_received_pages_are_kept_with_their_audit_entries(store: Store) -> None:
    audit = AuditRecord(time=NOW, actor="hospital-a", action="pull.alarm", subject="link:x")
    entry = rec.add_review(store, link="x", partner="platform-r", kind="override",
                           actor="dr-wang", reason="unconscious on arrival", audit=audit)
    (item,) = rec.review_items(store)
    assert (item.kind, item.actor, item.reason, item.audit_seq) == (
        "override", "dr-wang", "unconscious on arrival", entry.seq)
    done = AuditRecord(time=NOW, actor="hospital-a", action="pull.reviewed", subject="review:1")
    assert rec.mark_reviewed(store, item.id, audit=done)
    assert not rec.mark_reviewed(store, item.id, audit=done)
    assert rec.review_items(store) == []
    got = AuditRecord(time=NOW, actor="platform-r", action="record.pull.receive", subject="p-1")
    first = rec.record_received(store, link="l", partner="hospital-a", page_id="p-1",
                                digest="sha256:00", body=b"{}", audit=got, now=NOW)
    again = rec.record_received(store, link="l", partner="hospital-a", page_id="p-1",
                                digest="sha256:00", body=b"{}", audit=got, now=NOW)
    assert first[1] and not again[1]
    assert rec.received_pages(store) == [("p-1", "sha256:00", b"{}")]


# --- SQL date filters agree with the pure R4 comparisons ------------------------------------

_DAYS = st.integers(min_value=0, max_value=40)
_PREFIXES = st.sampled_from(["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
_BASE = datetime(2025, 1, 1, tzinfo=UTC)


def _t(day: int) -> str:
    return (_BASE + timedelta(days=day)).isoformat(timespec="microseconds")


@pytest.fixture(scope="module")
def range_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = SQLiteStore(tmp_path_factory.mktemp("ranges") / "d.db")
    with s.transaction("make") as tx:
        for i, (lo, span) in enumerate((a, b) for a in range(0, 40, 3) for b in (0, 1, 5)):
            tx.execute(
                "INSERT INTO pull_resource (seq, person, rtype, rid, date_lo, date_hi,"
                " last_updated, digest, body, record_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (i + 1, "p", "Encounter", f"e{i}", _t(lo), _t(lo + span) if span else
                 (_BASE + timedelta(days=lo, microseconds=1)).isoformat(timespec="microseconds"),
                 _t(lo), "d", b"{}", 1),
            )
        tx.execute("UPDATE pull_head SET seq=? WHERE id=1", (1000,))
    yield s
    s.close()


@given(prefix=_PREFIXES, lo=_DAYS, width=st.integers(min_value=1, max_value=7))
def test_sql_date_filters_match_the_r4_comparisons(
    range_store: Store, prefix: str, lo: int, width: int
) -> None:
    f = DateFilter("date", prefix, _t(lo), _t(lo + width))  # type: ignore[arg-type]
    with range_store.read("all") as tx:
        rows = tx.all("SELECT rid, date_lo, date_hi FROM pull_resource")
    expected = {str(r[0]) for r in rows if f.matches((str(r[1]), str(r[2])))}
    got = {r.rid for r in rec.page(range_store, person="p", types=["Encounter"],
                                   snapshot_seq=1000, after=0, limit=1000, dates=[f])}
    assert got == expected
