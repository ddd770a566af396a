"""Encryption at rest: what a copied store file (WAL included) or a database dump shows."""

from __future__ import annotations

import base64
import os
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pg_support import PGSchema, fresh_schema

from bridge.config import StoreConfig
from bridge.errors import ConfigError, StoreError
from bridge.ledger import open_store
from bridge.ledger.audit import AuditRecord
from bridge.ledger.seal import AESGCMSealer, PlainSealer

T0 = datetime(2026, 12, 5, tzinfo=UTC)
CLAIM = b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","name":"ZHANG-SAN-UNIQUE"}}]}'
CONSENT = b'{"resourceType":"Consent","patient":"110101199003071234"}'
PATIENT_KEY = "urn:oid:2.16.156.10011.1.3|110101199003071234"
HL7 = b"MSH|^~\\&|HIS|H|BR|B|20261205||ADT^A01|C1|P|2.5\rPID|1||MRN-UNIQUE-42||LI^SI"
NEEDLES = (b"ZHANG-SAN-UNIQUE", b"110101199003071234", b"MRN-UNIQUE-42", b"resourceType",
           b"LI^SI")


def rec(action: str, subject: str) -> AuditRecord:
    return AuditRecord(time=T0, actor="insurer-b", action=action, subject=subject)


@pytest.fixture
def kek_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("BRIDGE_TEST_KEK", base64.b64encode(secrets.token_bytes(32)).decode())
    return "BRIDGE_TEST_KEK"


def fill(config: StoreConfig) -> None:
    with open_store(config) as store:
        assert isinstance(store.sealer, AESGCMSealer)
        store.enqueue(message_id="urn:uuid:1", link="a-to-b", partner="insurer-b", payload=CLAIM,
                      digest="sha256:1", audit=rec("claim.enqueue", "urn:uuid:1"), now=T0)
        assert [r.message_id for r in store.claim_due("a-to-b", now=T0)] == ["urn:uuid:1"]
        store.mark_acked("urn:uuid:1", receipt=b'{"resourceType":"Bundle","n":0}', now=T0,
                         audit=rec("claim.ack", "urn:uuid:1"))
        store.inbox_accept(sender="hospital-a", message_id="urn:uuid:2", digest="sha256:2",
                           payload=CLAIM, audit=rec("message.receive", "urn:uuid:2"),
                           make_receipt=lambda e: b'{"resourceType":"Bundle","n":1}', now=T0)
        store.put_consent(consent_id="c1", patient_keys=[PATIENT_KEY], status="active",
                          resource=CONSENT, now=T0, audit=rec("consent.put", "c1"))
        store.hl7_accept(sender="his", control_id="C1", digest="sha256:3", message=HL7,
                         record=CLAIM, audit=rec("hl7.receive", "C1"),
                         make_ack=lambda e: b"MSA|AA|C1", now=T0)


def read_back(config: StoreConfig) -> None:
    with open_store(config) as store:
        out = store.get_outbox("urn:uuid:1")
        assert out is not None and out.payload == CLAIM
        assert out.receipt == b'{"resourceType":"Bundle","n":0}'
        inbox = store.inbox_lookup("hospital-a", "urn:uuid:2")
        assert inbox is not None and inbox.payload == CLAIM
        assert inbox.receipt == b'{"resourceType":"Bundle","n":1}'
        assert [c.consent_id for c in store.consents_for_patient(PATIENT_KEY)] == ["c1"]
        assert store.list_consents() == [("c1", "active", CONSENT)]
        assert store.consent_changes(0)[0][1] == CONSENT
        hl7 = store.hl7_lookup("his", "C1")
        assert hl7 is not None and hl7.message == HL7 and hl7.record == CLAIM


def test_sqlite_file_and_wal_hold_no_health_data(tmp_path: Path, kek_env: str) -> None:
    config = StoreConfig(path=tmp_path / "s.sqlite", data_key_env=kek_env)
    open_store(config).close()
    # Keep the WAL on disk as a copy taken while the bridge runs would find it: another
    # connection holds the file open, so closing the store does not fold the WAL back.
    keep = sqlite3.connect(tmp_path / "s.sqlite")
    keep.execute("SELECT COUNT(*) FROM audit").fetchone()
    try:
        fill(config)
        read_back(config)
        files = sorted(tmp_path.glob("s.sqlite*"))
        assert any(f.name.endswith("-wal") for f in files)
        for f in files:
            data = f.read_bytes()
            for needle in NEEDLES:
                assert needle not in data, (f.name, needle)
    finally:
        keep.close()


@pytest.fixture
def pg() -> Iterator[PGSchema]:
    yield from fresh_schema()


def test_postgresql_columns_hold_no_health_data(pg: PGSchema, kek_env: str) -> None:
    config = StoreConfig(kind="postgresql", dsn=pg.dsn, db_schema=pg.schema, data_key_env=kek_env)
    fill(config)
    read_back(config)
    conn = pg.connect()
    try:
        dump = b""
        for table in ("outbox", "inbox", "consent", "consent_history", "consent_patient",
                      "hl7_inbox", "audit"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                dump += repr(row).encode() + b"".join(
                    bytes(v) for v in row if isinstance(v, (bytes, memoryview)))
    finally:
        conn.close()
    for needle in NEEDLES:
        assert needle not in dump, needle


def test_wrong_or_missing_key_is_refused_by_name(tmp_path: Path, kek_env: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = StoreConfig(path=tmp_path / "s.sqlite", data_key_env=kek_env)
    fill(config)
    monkeypatch.setenv(kek_env, base64.b64encode(secrets.token_bytes(32)).decode())
    with pytest.raises(StoreError, match="another key-encryption key"):
        open_store(config)
    monkeypatch.delenv(kek_env)
    with pytest.raises(ConfigError, match="BRIDGE_TEST_KEK is not set"):
        open_store(config)
    bad = tmp_path / "kek"
    bad.write_bytes(b"short")
    with pytest.raises(ConfigError, match="32 bytes") as err:
        open_store(StoreConfig(path=tmp_path / "t.sqlite", data_key_file=bad))
    assert err.value.location == str(bad)


def test_a_value_moved_to_another_column_or_altered_does_not_open(kek_env: str) -> None:
    sealer = AESGCMSealer(base64.b64decode(os.environ[kek_env]))

    class KeyTx:
        def __init__(self) -> None:
            self.rows: list[tuple[int, bytes, str]] = []

        def all(self, _sql: str) -> list[tuple[int, bytes, str]]:
            return list(self.rows)

        def one(self, _sql: str) -> tuple[int | None]:
            return (max((r[0] for r in self.rows), default=None),)

        def execute(self, _sql: str, params: tuple[object, ...]) -> None:
            self.rows.append((int(params[0]), bytes(params[1]), str(params[2])))  # type: ignore[call-overload,arg-type]

    sealer.load(KeyTx())
    sealed = sealer.seal(CLAIM, context="inbox.payload")
    assert CLAIM not in sealed and sealer.unseal(sealed, context="inbox.payload") == CLAIM
    with pytest.raises(StoreError, match="moved from another column"):
        sealer.unseal(sealed, context="outbox.payload")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(StoreError, match="altered"):
        sealer.unseal(flipped, context="inbox.payload")
    # Written before encryption was turned on: read as it is.
    assert sealer.unseal(CLAIM, context="inbox.payload") == CLAIM
    assert PlainSealer().seal(CLAIM, context="x") == CLAIM


def test_rotated_data_key_is_picked_up_by_a_running_store(tmp_path: Path, kek_env: str) -> None:
    config = StoreConfig(path=tmp_path / "s.sqlite", data_key_env=kek_env)
    fill(config)
    with open_store(config) as running, open_store(config) as rotating:
        assert isinstance(rotating.sealer, AESGCMSealer)
        with rotating.transaction("rotate") as tx:
            rotating.sealer.add_key(tx)
            rotating.sealer.load(tx, create=False)
        assert rotating.sealer.active_key == 2
        rotating.put_consent(consent_id="c2", patient_keys=[PATIENT_KEY], status="active",
                             resource=CONSENT, now=T0, audit=rec("consent.put", "c2"))
        # The running store meets a value sealed under key 2 and loads it; the lookup
        # key of the patient did not change with the rotation.
        assert [c.consent_id for c in running.consents_for_patient(PATIENT_KEY)] == ["c1", "c2"]
        assert running.get_consent("c2").resource == CONSENT  # type: ignore[union-attr]


def test_records_kept_for_pull_show_no_identifier(tmp_path: Path, kek_env: str) -> None:
    import orjson
    from pull_support import id_card, person_records

    from bridge.ledger import records as rec
    from bridge.mapping import map_record

    config = StoreConfig(path=tmp_path / "r.sqlite", data_key_env=kek_env)
    (stay,) = person_records(1, labs=False)
    system, value = id_card(stay)
    with open_store(config) as store:
        put = rec.put_record(store, record=orjson.dumps(stay), dataset=stay["dataset"],
                             source="test", collection=map_record(stay, now=T0), now=T0)
        assert rec.find_person(store, [f"{system}|{value}"]) == put.person
    data = b"".join(f.read_bytes() for f in tmp_path.glob("r.sqlite*"))
    assert value.encode() not in data and b"resourceType" not in data


def test_rotate_data_key_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from e2e_support import make_workdir, set_toml_keys

    from bridge.cli import main
    from bridge.config import load_config

    hospital, _ = make_workdir(tmp_path)
    # Without a key-encryption key named there is nothing to rotate: said with the place.
    assert main(["keys", "rotate-data-key", "--config", str(hospital)]) == 2
    assert "data_key_file" in capsys.readouterr().err
    kek = tmp_path / "kek"
    kek.write_text(secrets.token_hex(32))
    set_toml_keys(hospital, "store", {"data_key_file": str(kek)})
    config = load_config(hospital)
    with open_store(config.store) as store:
        store.put_consent(consent_id="c1", patient_keys=[PATIENT_KEY], status="active",
                          resource=CONSENT, now=T0, audit=rec("consent.put", "c1"))
    assert main(["keys", "rotate-data-key", "--config", str(hospital), "--json"]) == 0
    assert '"data_key": 2' in capsys.readouterr().out
    with open_store(config.store) as store:
        assert isinstance(store.sealer, AESGCMSealer) and store.sealer.active_key == 2
        store.put_consent(consent_id="c2", patient_keys=[PATIENT_KEY], status="active",
                          resource=CONSENT, now=T0, audit=rec("consent.put", "c2"))
        # Values sealed under either key open; the key of each is the one it names.
        assert [c.resource for c in store.consents_for_patient(PATIENT_KEY)] == [CONSENT] * 2
        raw = sqlite3.connect(config.store.path).execute(
            "SELECT resource FROM consent ORDER BY consent_id").fetchall()
        assert [bytes(r[0])[5:9] for r in raw] == [b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"]
