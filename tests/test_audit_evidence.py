"""The audit log as evidence from the command line: checkpoints, verify, prove, tampering."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from e2e_support import make_workdir

from bridge.cli import main
from bridge.config import StoreConfig, load_config
from bridge.ledger import open_store
from bridge.ledger.audit import GENESIS_HASH, AuditRecord, chain_entry

T0 = datetime(2026, 12, 5, tzinfo=UTC)


def fill(cfg: Path, n: int, start: int = 0) -> None:
    with open_store(load_config(cfg).store) as store:
        for i in range(start, start + n):
            store.append_audit(AuditRecord(time=T0 + timedelta(seconds=i), actor="hospital-a",
                                           action="claim.enqueue", subject=f"urn:uuid:{i:08d}",
                                           partner="insurer-b", digest=f"sha256:{i:064x}"))


@pytest.fixture
def hospital(tmp_path: Path) -> Path:
    cfg, _ = make_workdir(tmp_path)
    return cfg


def rewrite_chain_from(db: Path, seq: int, outcome: str) -> None:
    """What someone with write access to the file can do: edit an entry and rehash after."""
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER IF EXISTS audit_no_update")
    con.execute("UPDATE audit SET outcome=? WHERE seq=?", (outcome, seq))
    con.commit()
    con.close()
    with open_store(StoreConfig(kind="sqlite", path=db)) as store:
        entries = store.audit_entries()
    prev = GENESIS_HASH
    con = sqlite3.connect(db)
    for e in entries:
        fixed = chain_entry(prev, e.seq, e.record)
        con.execute("UPDATE audit SET prev_hash=?, hash=? WHERE seq=?",
                    (fixed.prev_hash, fixed.hash, e.seq))
        prev = fixed.hash
    con.commit()
    con.close()


def test_checkpoint_verify_prove_and_check_proof(hospital: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fill(hospital, 30)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    note = capsys.readouterr().out
    assert note.startswith("ws-fhir-bridge/audit/hospital-a\n30\n")
    fill(hospital, 5, start=30)
    assert main(["audit", "verify", "--config", str(hospital)]) == 0
    out = capsys.readouterr().out
    assert "35 entries" in out and "1 checkpoints and 0 cosignatures match" in out
    assert main(["audit", "prove", "--config", str(hospital), "--seq", "33"]) == 0
    proof = orjson.loads(capsys.readouterr().out)
    assert proof["seq"] == 33 and proof["checkpoint"].split("\n")[1] == "35"
    path = tmp_path / "proof.json"
    path.write_bytes(orjson.dumps(proof))
    cert = str(load_config(hospital).signing.cert)
    assert main(["audit", "check-proof", str(path), "--cert", cert]) == 0
    assert "entry 33 is in checkpoint ws-fhir-bridge/audit/hospital-a@35" in capsys.readouterr().out
    # The entry shown differs by one byte: the proof fails.
    forged = dict(proof, entry=proof["entry"].replace("urn:uuid:00000032", "urn:uuid:00000031"))
    path.write_bytes(orjson.dumps(forged))
    assert main(["audit", "check-proof", str(path), "--cert", cert]) == 1
    assert "entry 33 is not in checkpoint" in capsys.readouterr().out
    # Another controller's certificate does not vouch for the checkpoint.
    other = str(Path(cert).parents[1] / "insurer-b" / "sign.pem")
    path.write_bytes(orjson.dumps(proof))
    assert main(["audit", "check-proof", str(path), "--cert", other]) == 1


def test_rewritten_history_is_named_by_the_checkpoint(hospital: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    fill(hospital, 20)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    fill(hospital, 20, start=20)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    capsys.readouterr()
    db = load_config(hospital).store.path
    # Entry 25 edited and every later hash recomputed: the chain is whole again, but
    # the second checkpoint no longer matches; the first still does.
    rewrite_chain_from(db, 25, "denied")
    assert main(["audit", "verify", "--config", str(hospital)]) == 1
    out = capsys.readouterr().out
    assert "checkpoint FAILED: ws-fhir-bridge/audit/hospital-a@40 (from entry 21)" in out


def test_truncated_tail_is_named_by_the_checkpoint(hospital: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    fill(hospital, 12)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    capsys.readouterr()
    con = sqlite3.connect(load_config(hospital).store.path)
    con.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    con.execute("DELETE FROM audit WHERE seq > 9")
    con.commit()
    con.close()
    assert main(["audit", "verify", "--config", str(hospital)]) == 1
    out = capsys.readouterr().out
    assert "hospital-a@12" in out and "entries 10 to 12 are gone" in out


def test_a_forged_checkpoint_signature_is_named(hospital: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fill(hospital, 3)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    capsys.readouterr()
    con = sqlite3.connect(load_config(hospital).store.path)
    note = con.execute("SELECT note FROM audit_checkpoint").fetchone()[0]
    con.execute("UPDATE audit_checkpoint SET note=?", (note.replace("\n3\n", "\n2\n", 1),))
    con.commit()
    con.close()
    assert main(["audit", "verify", "--config", str(hospital)]) == 1
    assert "FAILED: checkpoint ws-fhir-bridge/audit/hospital-a@2" in capsys.readouterr().out


def test_an_entry_deleted_in_the_middle_is_named(hospital: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fill(hospital, 10)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    capsys.readouterr()
    con = sqlite3.connect(load_config(hospital).store.path)
    con.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    con.execute("DELETE FROM audit WHERE seq = 6")
    con.commit()
    con.close()
    assert main(["audit", "verify", "--config", str(hospital)]) == 1
    assert "BROKEN at entry 6: entry 6 missing" in capsys.readouterr().out


def test_a_fork_is_named_by_the_partners_cosignature(hospital: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The log holds a partner's cosignature on a checkpoint of one continuation while the
    entries now form another (history rewritten after entry 4 and rehashed)."""
    from bridge.ledger import tree
    from bridge.trust.checkpoint import cosign, parse_checkpoint
    from bridge.trust.jws import Signer

    fill(hospital, 8)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    note = capsys.readouterr().out
    pki = Path(load_config(hospital).signing.cert).parents[1]
    insurer = Signer.from_files(pki / "insurer-b" / "sign.key", pki / "insurer-b" / "sign.pem")
    cosigned = cosign(parse_checkpoint(note), insurer.private_key, "insurer-b", T0)
    with open_store(load_config(hospital).store) as store:
        tree.keep_cosigned(store, "insurer-b", 8, cosigned, T0)
    assert main(["audit", "verify", "--config", str(hospital)]) == 0
    assert "1 cosignatures match" in capsys.readouterr().out
    db = load_config(hospital).store.path
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER IF EXISTS audit_no_update")
    con.commit()
    con.close()
    rewrite_chain_from(db, 5, "failure")
    # Also drop the own checkpoint, as someone covering tracks would: the partner's
    # cosignature still names the continuation it saw.
    con = sqlite3.connect(db)
    con.execute("DELETE FROM audit_checkpoint")
    con.commit()
    con.close()
    assert main(["audit", "verify", "--config", str(hospital)]) == 1
    out = capsys.readouterr().out
    assert "hospital-a@8" in out and "cosigned by insurer-b does not match the log" in out


def test_evidence_still_verifies_after_payloads_are_destroyed(
        hospital: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.ledger.compliance import destroy_received

    config = load_config(hospital)
    with open_store(config.store) as store:
        for i in range(3):
            store.inbox_accept(sender="insurer-b", message_id=f"urn:uuid:{i}",
                               digest=f"sha256:{i:064x}", payload=b'{"resourceType":"Bundle"}',
                               audit=AuditRecord(time=T0, actor="hospital-a",
                                                 action="message.receive",
                                                 subject=f"urn:uuid:{i}", partner="insurer-b",
                                                 digest=f"sha256:{i:064x}"),
                               make_receipt=lambda e: b"{}", now=T0)
    assert main(["audit", "checkpoint", "--config", str(hospital)]) == 0
    with open_store(config.store) as store:
        done = destroy_received(store, link="in", partner="insurer-b", direction="inbound",
                                agreement="a1", retention_days=30, now=T0 + timedelta(days=31),
                                audit=AuditRecord(time=T0 + timedelta(days=31),
                                                  actor="hospital-a", action="data.destroy",
                                                  subject="link:in"))
        assert done.items == 3
        row = store.inbox_lookup("insurer-b", "urn:uuid:1")
        assert row is not None and row.payload == b"" and row.digest == f"sha256:{1:064x}"
    capsys.readouterr()
    # The audit entries (with the digests) and the checkpoint still verify.
    assert main(["audit", "verify", "--config", str(hospital)]) == 0
    assert "4 entries" in capsys.readouterr().out  # three receipts and the destruction
