"""Two controllers from ``bridge init`` in one folder check each other's audit logs both
ways: the side that receives the disclosures also fetches and cosigns the discloser's
checkpoints, so a cut tail of the hospital's log is caught by the insurer. ``bridge audit
verify`` and ``bridge status`` say when a partner's log is not checked. From outside:
the CLI, ``bridge serve`` processes and the store files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from ops_support import Site, bridge, make_site, serve, wait_for

from bridge.config import load_config
from bridge.demo import free_port


def _count(store: Path, sql: str, *params: object) -> int:
    conn = sqlite3.connect(store)
    try:
        return int(conn.execute(sql, params).fetchone()[0] or 0)
    finally:
        conn.close()


def _stores(site: Site) -> dict[str, Path]:
    return {"hospital": site.root / "hospital-a" / "bridge.sqlite",
            "insurer": site.root / "insurer-b" / "bridge.sqlite"}


def _witnessed(store: Path, partner: str) -> int:
    return _count(store, "SELECT max(size) FROM audit_witness WHERE partner=?", partner)


@pytest.mark.parametrize("first", ["insurer", "hospital"])
def test_init_gives_each_controller_the_other_s_address(tmp_path: Path, first: str) -> None:
    ports = {"hospital": free_port(), "insurer": free_port()}
    for role in (first, "hospital" if first == "insurer" else "insurer"):
        run = bridge("init", role, str(tmp_path), "--port", str(ports[role]),
                     "--ops-port", str(free_port()))
        assert run.returncode == 0, run.stderr
    for role, partner, other in (("hospital", "insurer-b", "insurer"),
                                 ("insurer", "hospital-a", "hospital")):
        config = load_config(tmp_path / f"{role}.toml")
        entry = next(p for p in config.partners if p.id == partner)
        assert entry.base_url == f"https://127.0.0.1:{ports[other]}/fhir", (role, first)


# Witness rounds run every 30 s; two of them, and a restart, take longer than the default.
@pytest.mark.battery
@pytest.mark.timeout(300)
def test_init_configures_both_controllers_to_witness_each_other(tmp_path: Path) -> None:
    # The insurer first, then the hospital: the insurer's file learns the hospital's port.
    site = make_site(tmp_path)
    stores = _stores(site)
    insurer, hospital = serve(site.insurer), serve(site.hospital)
    try:
        samples = site.root / "hospital-a" / "samples"
        assert bridge("consent", "add", "--config", str(site.hospital),
                      str(samples / "consent.json")).returncode == 0
        push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                      str(samples / "claim-1.json"))
        assert push.returncode == 0, push.stderr
        wait_for(lambda: _count(stores["hospital"],
                                "SELECT count(*) FROM outbox WHERE state='acked'") == 1,
                 what="the claim acknowledged")
        wait_for(lambda: _witnessed(stores["insurer"], "hospital-a")
                 and _witnessed(stores["hospital"], "insurer-b"),
                 timeout=100, every=1, what="both witness directions")
        witnessed = _witnessed(stores["insurer"], "hospital-a")
    finally:
        hospital.stop()
    for config, other in ((site.hospital, "insurer-b"), (site.insurer, "hospital-a")):
        verify = bridge("audit", "verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "NOT WITNESSED" not in verify.stdout, verify.stdout
        assert f"witness {other}: its audit log is checked here, its checkpoint of" in (
            verify.stdout)
        assert "; it cosigned this log's checkpoint of" in verify.stdout

    # The hospital's tail and its checkpoints are removed while it is stopped: its own
    # verify cannot tell, the insurer, which cosigned a longer log, can.
    conn = sqlite3.connect(stores["hospital"])
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq>=?", (witnessed,))
    conn.execute("DELETE FROM audit_checkpoint")
    conn.execute("DELETE FROM audit_cosigned")
    conn.commit()
    conn.close()
    hospital = serve(site.hospital)
    try:
        wait_for(lambda: _count(stores["insurer"], "SELECT count(*) FROM audit_witness_fault"
                                " WHERE partner='hospital-a'"),
                 timeout=100, every=1, what="the insurer to catch the cut tail")
    finally:
        hospital.stop()
        insurer.stop()


def test_verify_and_status_say_when_a_partner_log_is_not_witnessed(tmp_path: Path) -> None:
    run = bridge("init", "insurer", str(tmp_path))
    assert run.returncode == 0, run.stderr
    config = tmp_path / "insurer.toml"
    text = config.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines(keepends=True)
             if not line.startswith('base_url = "https://127.0.0.1:')]
    config.write_text("".join(lines), encoding="utf-8")
    assert bridge("consent", "add", "--config", str(config),
                  str(tmp_path / "insurer-b" / "samples" / "consent.json")).returncode == 0
    verify = bridge("audit", "verify", "--config", str(config))
    assert "NOT WITNESSED hospital-a: its audit log is not checked here" in verify.stdout, (
        verify.stdout + verify.stderr)
    status = bridge("status", "--config", str(config))
    assert "NOT WITNESSED hospital-a" in status.stdout, status.stdout + status.stderr


def test_a_partner_entry_ending_the_file_is_pointed_here(tmp_path: Path) -> None:
    """A partner's configuration edited by hand so that the entry's id is its last line,
    without a line end: init writes the address there, and says so only when it did."""
    import tomllib

    from bridge.cli_init import _point_partner_here

    config = tmp_path / "insurer.toml"
    for text in ('[controller]\nid = "insurer-b"\n\n[[partners]]\nid = "hospital-a"',
                 '[[partners]]\nid = "hospital-a"\nname = "H"',
                 '[[partners]]\nid = "hospital-a"\n\n[store]\npath = "x"\n'):
        config.write_text(text, encoding="utf-8")
        assert _point_partner_here(config, "hospital-a", 18483)
        written = tomllib.loads(config.read_text(encoding="utf-8"))
        [entry] = written["partners"]
        assert entry["base_url"] == "https://127.0.0.1:18483/fhir", config.read_text()
    # An address the operator wrote elsewhere is left alone, and nothing is claimed.
    config.write_text('[[partners]]\nid = "hospital-a"\nbase_url = "https://his.example/fhir"\n',
                      encoding="utf-8")
    assert not _point_partner_here(config, "hospital-a", 18483)
    assert "his.example" in config.read_text(encoding="utf-8")
