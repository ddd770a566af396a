"""Turning encryption at rest on for a store that already serves.

A hospital runs its bridge with a plain store, then names a key-encryption key. What
was written before stays plain on disk, and its patient lookup keys stay in clear, so a
person's records kept for pull before the change are no longer found by the person's
identifiers. ``bridge compliance report`` says T19 is partial, naming where plain values
remain; ``bridge keys seal-stored``, run as its own process, seals them and keys the
lookup keys; afterwards the store files hold no health data, every value reads back,
the person is found again, T19 is met and the audit chain verifies. On SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e_support import cli
from pg_support import PGSchema, fresh_schema
from pull_support import id_card, person_records

from bridge.config import load_config
from bridge.ledger import open_store
from bridge.ledger import records as rec
from bridge.ledger.audit import AuditRecord
from bridge.mapping import map_record

T0 = datetime(2026, 12, 5, tzinfo=UTC)
CLAIM = b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","name":"WANG-UNIQUE-77"}}]}'
CONSENT = b'{"resourceType":"Consent","patient":"110101199003071234"}'
PATIENT_KEY = "urn:oid:2.16.156.10011.1.3|110101199003071234"
HL7 = b"MSH|^~\\&|HIS|H|BR|B|20261205||ADT^A01|C1|P|2.5\rPID|1||MRN-UNIQUE-99||ZHAO^LIU"
NEEDLES = [b"WANG-UNIQUE-77", b"110101199003071234", b"MRN-UNIQUE-99", b"ZHAO^LIU"]


def _rec(action: str, subject: str) -> AuditRecord:
    return AuditRecord(time=T0, actor="hospital-a", action=action, subject=subject)


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A hospital configuration (``bridge init``) on a plain store of the given kind."""
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    if request.param == "postgresql":
        schemas = fresh_schema()
        pg: PGSchema = next(schemas)
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace(
            "[store]\n", f'[store]\nkind = "postgresql"\ndsn = "{pg.dsn}"\nschema = "{pg.schema}"\n',
            1), encoding="utf-8")
        try:
            yield config
        finally:
            schemas.close()
    else:
        yield config


def _fill(config: Path, record: dict[str, Any]) -> None:
    with open_store(load_config(config).store) as store:
        store.enqueue(message_id="urn:uuid:1", link="a-to-b", partner="insurer-b",
                      payload=CLAIM, digest="sha256:1", audit=_rec("claim.enqueue", "urn:uuid:1"),
                      now=T0)
        store.inbox_accept(sender="insurer-b", message_id="urn:uuid:2", digest="sha256:2",
                           payload=CLAIM, audit=_rec("message.receive", "urn:uuid:2"),
                           make_receipt=lambda e: b'{"resourceType":"Bundle","n":1}', now=T0)
        store.put_consent(consent_id="c1", patient_keys=[PATIENT_KEY], status="active",
                          resource=CONSENT, now=T0, audit=_rec("consent.put", "c1"))
        store.hl7_accept(sender="his", control_id="C1", digest="sha256:3", message=HL7,
                         record=CLAIM, audit=_rec("hl7.receive", "C1"),
                         make_ack=lambda e: b"MSA|AA|C1", now=T0)
        rec.put_record(store, record=orjson.dumps(record), dataset=record["dataset"],
                       source="test", collection=map_record(record, now=T0), now=T0)


def _stored_bytes(config: Path) -> bytes:
    """Everything the store holds, as bytes: the SQLite files, or every PostgreSQL row."""
    store = load_config(config).store
    if store.kind == "sqlite":
        conn = sqlite3.connect(store.path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return b"".join(p.read_bytes() for p in store.path.parent.glob(store.path.name + "*"))
    import psycopg

    dump = b""
    assert store.dsn is not None
    with psycopg.connect(store.dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (store.db_schema,))]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{store.db_schema}"."{table}"'):
                dump += repr(row).encode() + b"".join(
                    bytes(v) for v in row if isinstance(v, bytes | memoryview))
    return dump


def _report(config: Path, env: dict[str, str]) -> dict[str, Any]:
    run = cli("compliance", "report", "--config", str(config), "--json", env=env)
    assert run.returncode == 0, run.stderr
    return {row["id"]: row for row in json.loads(run.stdout)["items"]}


def _with_key(config: Path) -> dict[str, str]:
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[store]\n", '[store]\ndata_key_env = "BRIDGE_SEAL_KEK"\n', 1),
                      encoding="utf-8")
    return {"BRIDGE_SEAL_KEK": secrets.token_hex(32)}


def test_a_store_turned_encrypted_is_sealed_while_its_data_stays_readable(site: Path) -> None:
    record = person_records(1, labs=False, seed=71)[0]
    _fill(site, record)
    assert all(needle in _stored_bytes(site) for needle in NEEDLES)
    env = _with_key(site)
    os.environ.update(env)  # the store opened in this process reads the key too
    try:
        system, value = id_card(record)
        with open_store(load_config(site).store) as store:
            # The lookup asks for the keyed form: the person kept before is not found.
            assert rec.find_person(store, [f"{system}|{value}"]) is None
        t19 = _report(site, env)["T19"]
        assert t19["status"] == "partial", t19
        assert "outbox.payload" in t19["why"] and "pull_person_key.patient_key" in t19["why"]
        assert "bridge keys seal-stored" in t19["why"]

        sealed = cli("keys", "seal-stored", "--config", str(site), "--json", env=env)
        assert sealed.returncode == 0, sealed.stderr
        out = json.loads(sealed.stdout)
        assert out["sealed"]["outbox.payload"] == 1 and out["sealed"]["hl7_inbox.message"] == 1
        assert out["keyed"]["consent_patient.patient_key"] == 1
        assert out["keyed"]["pull_person_key.patient_key"] >= 1
        assert out["plain_left"] == {}

        dump = _stored_bytes(site)
        for needle in NEEDLES:
            assert needle not in dump, needle
        with open_store(load_config(site).store) as store:
            assert rec.find_person(store, [f"{system}|{value}"]) is not None
            out_row = store.get_outbox("urn:uuid:1")
            assert out_row is not None and out_row.payload == CLAIM
            inbox = store.inbox_lookup("insurer-b", "urn:uuid:2")
            assert inbox is not None and inbox.payload == CLAIM
            assert [c.consent_id for c in store.consents_for_patient(PATIENT_KEY)] == ["c1"]
            assert store.list_consents() == [("c1", "active", CONSENT)]
            hl7 = store.hl7_lookup("his", "C1")
            assert hl7 is not None and hl7.message == HL7 and hl7.record == CLAIM
            actions = [e.record.action for e in store.audit_entries()]
            assert actions[-1] == "store.seal"
        assert _report(site, env)["T19"]["status"] == "met"
        verify = cli("audit", "verify", "--config", str(site), env=env)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        again = cli("keys", "seal-stored", "--config", str(site), env=env)
        assert again.returncode == 0 and "nothing to seal" in again.stdout, again.stdout
    finally:
        for name in env:
            os.environ.pop(name, None)


def test_sealing_needs_the_key_named_and_says_which_setting(tmp_path: Path) -> None:
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    run = cli("keys", "seal-stored", "--config", str(config))
    assert run.returncode != 0
    assert "data_key_file" in run.stderr and str(config) in run.stderr
    assert "Traceback" not in run.stderr


def test_every_column_the_store_seals_is_one_seal_stored_knows() -> None:
    # Every context a value is sealed under in the ledger (a literal, or a module
    # constant naming one) is a column bridge keys seal-stored seals, and T19 counts.
    import ast

    from bridge.ledger import sealing

    known = {f"{t}.{c}" for t, c in sealing.SEALED_COLUMNS}
    found: set[str] = set()
    for path in Path(sealing.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                     for t in n.targets if isinstance(t, ast.Name)}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = getattr(call.func, "attr", getattr(call.func, "id", ""))
            if name not in ("seal", "_seal"):
                continue
            args = [k.value for k in call.keywords if k.arg == "context"] + call.args[1:2]
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
                elif isinstance(arg, ast.Name) and arg.id in constants:
                    found.add(constants[arg.id])
    assert len(found) > 10, found
    assert found <= known, sorted(found - known)
