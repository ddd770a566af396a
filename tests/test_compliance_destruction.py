"""Destruction after use: a claim received over real sockets under an agreement is
destroyed once the agreement's retention has passed; its identity, digest, receipt and
audit entries stay and still verify."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from compliance_support import audit_entries, bind_agreement, inbox_count, samples
from ops_support import bridge, make_site, serve, wait_for

from bridge.config import load_config
from bridge.ledger import open_store
from bridge.link.destruction import destroy_expired


@pytest.mark.control("U10", "T17")
def test_received_data_is_destroyed_after_the_agreements_retention(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    bind_agreement(site.hospital, "dua-claims")
    bind_agreement(site.insurer, "dua-claims", retention_days=7)
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                      str(samples(site) / "claim-1.json"))
        assert push.returncode == 0, push.stderr
        wait_for(lambda: inbox_count(site.insurer) == 1, what="claim received")
    finally:
        hospital.stop()
        insurer.stop()
    message_id = push.stdout.split()[0]
    # Within the retention nothing goes.
    run = bridge("agreements", "destroy", "--config", str(site.insurer), "--json")
    assert run.returncode == 0, run.stderr
    assert [d["destroyed"] for d in orjson.loads(run.stdout)] == [0]

    config = load_config(site.insurer)
    with open_store(config.store) as store:
        before = store.inbox_lookup("hospital-a", message_id)
        assert before is not None and before.payload
        done = destroy_expired(store, config, now=datetime.now(UTC) + timedelta(days=8))
        after = store.inbox_lookup("hospital-a", message_id)
        assert store.verify_audit().ok
    assert [(d.link, d.agreement, d.items) for d in done] == [
        ("claims-from-hospital-a", "dua-claims", 1)]
    assert after is not None and after.payload == b""
    assert (after.digest, after.receipt) == (before.digest, before.receipt)
    destroyed = audit_entries(site.insurer, "data.destroy")
    assert len(destroyed) == 1 and "agreement=dua-claims inbox=1" in str(destroyed[0].record.detail)
    received = audit_entries(site.insurer, "message.receive")
    assert received[0].record.digest == before.digest
