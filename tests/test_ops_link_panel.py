"""Circuit state, sync progress and audit checkpoints on the operations port, from
outside: two ``bridge serve`` processes, ``/metrics`` parsed with prometheus-client's
parser and the status page read over HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from e2e_support import make_workdir
from ops_support import Site, bridge, http, make_site, serve, wait_for
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_config
from bridge.errors import StoreError
from bridge.ledger import open_store, tree
from bridge.link.circuit import Circuit, CircuitState
from bridge.ops import linkstate  # noqa: F401 - registers the link metric source
from bridge.ops.metrics import BridgeMetrics

LINK = "claims-to-insurer-b"


def _scrape(site: Site, who: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http(site.ops(who) + "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _circuit(site: Site) -> str:
    samples = _scrape(site, "hospital")
    on = [s for s in ("closed", "open", "probing")
          if _value(samples, "bridge_link_circuit_state", link=LINK, state=s) == 1]
    assert len(on) == 1, on  # exactly one state at a time
    return on[0]


def _push(site: Site, n: int) -> str:
    """Push the sample claim as admission number ``n`` of the same consenting patient."""
    samples = site.root / "hospital-a" / "samples"
    record = json.loads((samples / "claim-1.json").read_text(encoding="utf-8"))
    record["elements"]["HDSD00.11.140"] = f"ZY2026240000{n:02d}"  # admission number
    path = site.root / f"admission-{n}.json"
    path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    run = bridge("push", "--config", str(site.hospital), "--link", LINK, str(path))
    assert run.returncode == 0 and "queued on link" in run.stdout, run.stdout + run.stderr
    return run.stdout.split()[0]


def _acked(site: Site) -> int:
    run = bridge("outbox", "--config", str(site.hospital), "--json")
    return int(json.loads(run.stdout).get("acked", 0))


def test_sync_progress_and_closed_circuit_after_claims_and_a_reconcile(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    consent = site.root / "hospital-a" / "samples" / "consent.json"
    assert bridge("consent", "add", "--config", str(site.hospital), str(consent)).returncode == 0
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        for n in range(1, 4):
            _push(site, n)
        wait_for(lambda: _acked(site) == 3, what="three acknowledged claims")
        reconcile = bridge("sync", "reconcile", "--config", str(site.hospital), "--link", LINK)
        assert reconcile.returncode == 0, reconcile.stderr

        samples = _scrape(site, "hospital")
        assert _circuit(site) == "closed"
        stages = {stage: _value(samples, "bridge_sync_seq", link=LINK, stage=stage)
                  for stage in ("enqueued", "sent", "acknowledged", "acknowledged_contiguous",
                                "confirmed")}
        assert stages == dict.fromkeys(stages, 3.0), stages
        when = _value(samples, "bridge_sync_last_reconcile_timestamp_seconds", link=LINK)
        assert when is not None and abs(when - datetime.now(UTC).timestamp()) < 60
        assert _value(samples, "bridge_link_circuit_openings_total", link=LINK) == 0

        # The insurer sees the hospital's stream complete: highest 3, nothing missing.
        received = _scrape(site, "insurer")
        assert _value(received, "bridge_sync_inbound_highest_seq",
                      partner="hospital-a", stream=LINK) == 3
        assert _value(received, "bridge_sync_inbound_missing",
                      partner="hospital-a", stream=LINK) == 0

        # The status pages say the same in words.
        status, page = http(site.ops("hospital") + "/")
        assert status == 200
        assert "circuit closed" in page
        assert "<td class='n' data-field='seq-sent'>3</td>" in page
        assert "<td class='n' data-field='confirmed'>3</td>" in page
        assert "missing 0, resent 0" in page
        row = page.split("<tr data-partner='insurer-b'>")[1].split("</tr>")[0]
        # No witnessing round has run yet (the first comes after 30 s): nothing refused.
        assert "none yet" in row and "none refused" in row
        # An operator signs a checkpoint of the insurer's audit log; its panel shows it.
        signed = bridge("audit", "checkpoint", "--config", str(site.insurer))
        assert signed.returncode == 0, signed.stderr
        status, page = http(site.ops("insurer") + "/")
        assert status == 200
        assert "<tr data-stream='hospital-a/claims-to-insurer-b'>" in page
        assert "<td class='n' data-field='missing'>0</td>" in page
        assert "Own newest checkpoint covers <b>" in page and "not yet covered" in page

        # A partner checkpoint refused here (kept as evidence in the store) is shown
        # with its reason.
        with open_store(load_config(site.hospital).store) as store:
            tree.keep_fault(store, "insurer-b", "note", "consistency proof does not verify",
                            datetime.now(UTC))
        _status, page = http(site.ops("hospital") + "/")
        row = page.split("<tr data-partner='insurer-b'>")[1].split("</tr>")[0]
        assert "1 refused, last" in row and "consistency proof does not verify" in row

        # Ids and counts only: nothing of the patient on either page or in the metrics.
        record = json.loads((consent.parent / "claim-1.json").read_text(encoding="utf-8"))
        values = [record["elements"]["HDSD00.11.110"], record["elements"]["HDSD00.11.048"]]
        for who in ("hospital", "insurer"):
            for path in ("/", "/metrics"):
                text = http(site.ops(who) + path)[1]
                assert not [v for v in values if v in text], (who, path)
    finally:
        hospital.stop()
        insurer.stop()


def test_circuit_opens_when_the_insurer_stops(tmp_path: Path) -> None:
    site = make_site(tmp_path, fast_retries=True)
    consent = site.root / "hospital-a" / "samples" / "consent.json"
    assert bridge("consent", "add", "--config", str(site.hospital), str(consent)).returncode == 0
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        _push(site, 1)
        wait_for(lambda: _acked(site) == 1, what="a delivery")
        assert _circuit(site) == "closed"
        insurer.stop()

        _push(site, 2)
        _push(site, 3)
        wait_for(lambda: _circuit(site) == "open", what="the circuit to open")
        samples = _scrape(site, "hospital")
        assert _value(samples, "bridge_link_circuit_openings_total", link=LINK) == 1
        assert _value(samples, "bridge_sync_seq", link=LINK, stage="enqueued") == 3
        assert _value(samples, "bridge_sync_seq", link=LINK, stage="acknowledged") == 1
        assert _value(samples, "bridge_sync_seq", link=LINK, stage="confirmed") == 0

        status, page = http(site.ops("hospital") + "/")
        assert status == 200
        assert "<td class='bad' data-field='circuit'>circuit open</td>" in page
        assert "never reconciled" in page
    finally:
        hospital.stop()
        insurer.stop()


class _StoreDown:
    """A store whose every call fails, as when the database does not answer."""

    def __getattr__(self, name: str) -> object:
        def fail(*_args: object, **_kwargs: object) -> object:
            raise StoreError("connection lost", location="store")

        return fail


def test_circuit_is_reported_when_the_store_fails_during_a_scrape(tmp_path: Path) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    config = load_config(hospital_cfg)
    link = next(lk.id for lk in config.links if lk.direction == "outbound")
    service = SimpleNamespace(
        dispatchers={link: SimpleNamespace(circuit=Circuit(state=CircuitState.OPEN))}
    )
    metrics = BridgeMetrics(config, _StoreDown(), service=service)
    try:
        text = metrics.render().decode()
    finally:
        metrics.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert _value(samples, "bridge_store_up") == 0
    assert _value(samples, "bridge_link_circuit_state", link=link, state="open") == 1
    assert _value(samples, "bridge_link_circuit_state", link=link, state="closed") == 0
    # The sync figures are left out rather than reported as zeros, and the source
    # itself does not count as failed.
    assert not [k for k in samples if k[0] == "bridge_sync_seq"]
    assert _value(samples, "bridge_metrics_source_errors_total", source="link_sync") is None
