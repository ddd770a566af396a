"""Reliability scenarios with real ``bridge serve`` processes and a byte-level fault proxy.

The hospital and the insurer each run as ``bridge serve`` in their own process; the
hospital's claims go through :class:`delivery_support.FaultProxy` running in this
process. Claims are enqueued by a controller in this process on the hospital's store
(as ``bridge push`` does), and the outcome is read from both stores with SQL, so what
is measured is what the two processes did. Used by the battery tests (small sizes)
and by ``bench/reliability.py`` (large ones).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delivery_support import FaultProxy, link_settings, point_partner_at
from e2e_support import LINK_OUT, consent_for, make_workdir
from ops_support import Serve, serve

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.samples import inpatient_records


def _rows(store: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return list(con.execute(sql, params))
    finally:
        con.close()


def outbox_states(store: Path) -> dict[str, str]:
    return dict(_rows(store, "SELECT message_id, state FROM outbox"))  # type: ignore[arg-type]


def inbox_ids(store: Path) -> list[str]:
    return [r[0] for r in _rows(store, "SELECT message_id FROM inbox")]


def receptions(store: Path) -> dict[str, int]:
    """Audited receptions per claim: more than one would be a claim processed twice."""
    return dict(
        _rows(  # type: ignore[arg-type]
            store,
            "SELECT subject, count(*) FROM audit WHERE action='message.receive' GROUP BY subject",
        )
    )


async def enqueue(config: Path, count: int, *, seed: int, first: int = 0) -> list[str]:
    """Enqueue ``count`` claims on the hospital's store from this process; their ids."""
    controller = Controller(load_config(config))
    try:
        ids = []
        for i, record in enumerate(inpatient_records(count, seed=seed)):
            await controller.put_consent(consent_for(record, consent_id=f"r-{first + i}"))
            ids.append((await controller.submit(record, LINK_OUT)).message_id)
        return ids
    finally:
        await controller.close()


def pg_outbox_states(pg: Any) -> dict[str, str]:
    """The outbox of a hospital whose store is the PostgreSQL schema ``pg``."""
    with pg.connect() as conn:
        return dict(conn.execute("SELECT message_id, state FROM outbox").fetchall())


async def wait_settled(store: Path | Any, ids: list[str], *, timeout: float) -> float:
    """Wait until every claim is in a final state; the time it took. ``store`` is an
    SQLite file or a PostgreSQL schema (``pg_support.PGSchema``)."""
    started = time.monotonic()
    wanted = set(ids)
    read = outbox_states if isinstance(store, Path) else pg_outbox_states
    while time.monotonic() - started < timeout:
        states = read(store)
        if all(states.get(m) in ("acked", "dead", "rejected", "refused") for m in wanted):
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


@dataclass
class Site:
    root: Path
    hospital_cfg: Path
    insurer_cfg: Path
    hospital_store: Path
    insurer_store: Path
    proxy: FaultProxy


async def make_site(root: Path, **link: Any) -> Site:
    hospital_cfg, insurer_cfg = make_workdir(root)
    insurer_port = load_config(insurer_cfg).server.port
    proxy = FaultProxy(insurer_port)
    await proxy.start()
    point_partner_at(hospital_cfg, proxy.port)
    link_settings(hospital_cfg, **link)
    return Site(
        root,
        hospital_cfg,
        insurer_cfg,
        load_config(hospital_cfg).store.path,
        load_config(insurer_cfg).store.path,
        proxy,
    )


async def start(config: Path) -> Serve:
    return await asyncio.to_thread(serve, config)


async def stop(process: Serve) -> None:
    await asyncio.to_thread(process.stop)


@dataclass
class OutageResult:
    claims: int
    lost: int
    duplicated: int
    dead: int
    refuse_seconds: float
    blackhole_seconds: float
    attempts_during_blackhole: int
    drain_seconds: float

    @property
    def attempts_per_second(self) -> float:
        return self.attempts_during_blackhole / self.blackhole_seconds


async def partner_outage(
    root: Path, *, claims: int, refuse_seconds: float, blackhole_seconds: float, seed: int = 5
) -> OutageResult:
    """The insurer unreachable (port refusing, then accepting and never answering)
    while claims keep coming; then back. Half the claims are enqueued before the
    outage, half during it."""
    site = await make_site(
        root, probe_cap_seconds=2.0, request_timeout_seconds=3.0, retry_base_seconds=0.2
    )
    insurer = await start(site.insurer_cfg)
    hospital = await start(site.hospital_cfg)
    try:
        ids = await enqueue(site.hospital_cfg, claims // 2, seed=seed)
        await site.proxy.set_mode("refuse")
        outage = time.monotonic()
        ids += await enqueue(site.hospital_cfg, claims - claims // 2, seed=seed + 1, first=claims)
        await asyncio.sleep(max(0.0, refuse_seconds - (time.monotonic() - outage)))
        await site.proxy.set_mode("blackhole")
        hole = time.monotonic()
        await asyncio.sleep(blackhole_seconds)
        attempts = site.proxy.attempts_between(hole, time.monotonic())
        await site.proxy.set_mode("pass")
        drain = await wait_settled(site.hospital_store, ids, timeout=600)
        states = outbox_states(site.hospital_store)
        held = set(inbox_ids(site.insurer_store))
        return OutageResult(
            claims=len(ids),
            lost=sum(1 for m in ids if m not in held),
            duplicated=sum(n - 1 for n in receptions(site.insurer_store).values() if n > 1),
            dead=sum(1 for m in ids if states.get(m) == "dead"),
            refuse_seconds=refuse_seconds,
            blackhole_seconds=blackhole_seconds,
            attempts_during_blackhole=attempts,
            drain_seconds=drain,
        )
    finally:
        await stop(hospital)
        await stop(insurer)
        await site.proxy.stop()


@dataclass
class RestoreResult:
    claims: int
    lost_after_restore: int
    missing_found: int
    resent: int
    mismatched_receipts: int
    lost_at_end: int
    duplicated: int
    reconcile_seconds: float


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )


async def receiver_restored(
    root: Path, *, before: int, after: int, periodic: float = 0.0, seed: int = 9
) -> RestoreResult:
    """The insurer is backed up after ``before`` claims, receives ``after`` more, and is
    restored from the backup. Reconciliation (``bridge sync reconcile``, or the running
    hospital's periodic one when ``periodic`` > 0) refills the gap."""
    import json

    site = await make_site(root, reconcile_interval_seconds=periodic, request_timeout_seconds=30.0)
    insurer = await start(site.insurer_cfg)
    hospital = await start(site.hospital_cfg)
    try:
        ids = await enqueue(site.hospital_cfg, before, seed=seed)
        await wait_settled(site.hospital_store, ids, timeout=600)
        await stop(insurer)
        backup = root / "insurer-backup"
        run = _cli("store", "backup", "--config", str(site.insurer_cfg), str(backup))
        assert run.returncode == 0, run.stderr
        insurer = await start(site.insurer_cfg)
        ids += await enqueue(site.hospital_cfg, after, seed=seed + 1, first=before)
        await wait_settled(site.hospital_store, ids, timeout=1800)
        await stop(insurer)
        run = _cli("store", "restore", "--config", str(site.insurer_cfg), str(backup))
        assert run.returncode == 0, run.stderr
        lost_after_restore = sum(1 for m in ids if m not in set(inbox_ids(site.insurer_store)))
        insurer = await start(site.insurer_cfg)
        started = time.monotonic()
        if periodic > 0:
            while time.monotonic() - started < 600:
                if len(set(inbox_ids(site.insurer_store)) & set(ids)) == len(ids):
                    break
                await asyncio.sleep(0.5)
            # The pass that refilled the gap has recorded what it found.
            while time.monotonic() - started < 600:
                if _rows(site.hospital_store, "SELECT 1 FROM sync_outbound WHERE resent > 0"):
                    break
                await asyncio.sleep(0.2)
            seconds = time.monotonic() - started
            missing, resent, mismatched = _rows(
                site.hospital_store, "SELECT missing, resent, mismatched FROM sync_outbound"
            )[0]
        else:
            # In a thread: the fault proxy runs on this event loop and must keep relaying.
            run = await asyncio.to_thread(
                _cli,
                "sync",
                "reconcile",
                "--config",
                str(site.hospital_cfg),
                "--link",
                LINK_OUT,
                "--json",
            )
            seconds = time.monotonic() - started
            assert run.returncode == 0, run.stderr
            report = json.loads(run.stdout)
            missing, resent = report["missing"], report["resent"]
            mismatched = report["receipts_naming_absent_audit_entries"]
        held = set(inbox_ids(site.insurer_store))
        return RestoreResult(
            claims=len(ids),
            lost_after_restore=lost_after_restore,
            missing_found=int(missing),
            resent=int(resent),
            mismatched_receipts=int(mismatched),
            lost_at_end=sum(1 for m in ids if m not in held),
            duplicated=sum(n - 1 for n in receptions(site.insurer_store).values() if n > 1),
            reconcile_seconds=seconds,
        )
    finally:
        await stop(hospital)
        await stop(insurer)
        await site.proxy.stop()


@dataclass
class CrashResult:
    claims: int
    kills: int
    lost: int
    duplicated: int
    dead: int
    chains_verify: bool
    settle_seconds: float


def _on_postgres(config: Path, pg: Any) -> None:
    text = config.read_text(encoding="utf-8")
    old = next(
        line for line in text.splitlines() if line.startswith("path = ") and "sqlite" in line
    )
    config.write_text(
        text.replace(old, f'kind = "postgresql"\ndsn = "{pg.dsn}"\nschema = "{pg.schema}"', 1),
        encoding="utf-8",
    )


def _second_sender(config: Path) -> Path:
    """Another hospital process on the same store: the same file but its own port."""
    from bridge.demo import free_port

    second = config.with_name("hospital-2.toml")
    text = config.read_text(encoding="utf-8")
    port_line = next(line for line in text.splitlines() if line.startswith("port = "))
    second.write_text(text.replace(port_line, f"port = {free_port()}", 1), encoding="utf-8")
    return second


async def crash_consistency(
    root: Path,
    *,
    claims: int,
    kills_each: int,
    every: float = 1.5,
    seed: int = 13,
    pg: Any = None,
) -> CrashResult:
    """``kill -9`` of the hospital and of the insurer, in turn, while claims are being
    delivered; each is restarted at once. Every claim acknowledged at enqueue must end
    in the insurer's inbox exactly once, with nothing dead-lettered, and both audit
    chains must verify. With ``pg`` (a ``pg_support.PGSchema``) the hospital's store is
    PostgreSQL and two hospital processes send from the one outbox."""
    site = await make_site(
        root, request_timeout_seconds=2.0, retry_base_seconds=0.1, probe_cap_seconds=1.0
    )
    if pg is not None:
        _on_postgres(site.hospital_cfg, pg)
    senders = [site.hospital_cfg] + ([_second_sender(site.hospital_cfg)] if pg else [])
    insurer = await start(site.insurer_cfg)
    hospitals = [await start(cfg) for cfg in senders]
    kills = 0
    try:
        # Claims keep coming while the two sides are killed (as a HIS keeps sending).
        enqueuing = asyncio.create_task(enqueue(site.hospital_cfg, claims, seed=seed))
        for i in range(kills_each * 2):
            await asyncio.sleep(every)
            if i % 2 == 0:
                which = (i // 2) % len(hospitals)
                hospitals[which].proc.kill()
                hospitals[which].proc.wait()
                hospitals[which] = await start(senders[which])
            else:
                insurer.proc.kill()
                insurer.proc.wait()
                insurer = await start(site.insurer_cfg)
            kills += 1
        ids = await enqueuing
        hospital_store = site.hospital_store if pg is None else pg
        settle = await wait_settled(hospital_store, ids, timeout=600)
        states = outbox_states(site.hospital_store) if pg is None else pg_outbox_states(pg)
        held = set(inbox_ids(site.insurer_store))
        chains = all(
            _cli("audit", "verify", "--config", str(cfg)).returncode == 0
            for cfg in (site.hospital_cfg, site.insurer_cfg)
        )
        return CrashResult(
            claims=len(ids),
            kills=kills,
            lost=sum(1 for m in ids if m not in held),
            duplicated=sum(n - 1 for n in receptions(site.insurer_store).values() if n > 1),
            dead=sum(1 for m in ids if states.get(m) == "dead"),
            chains_verify=chains,
            settle_seconds=settle,
        )
    finally:
        for process in hospitals:
            await stop(process)
        await stop(insurer)
        await site.proxy.stop()


@dataclass
class LostResponsesResult:
    claims: int
    cuts: int
    lost: int
    duplicated: int
    dead: int
    receipts_differing: int


def _receipts(store: Path, table: str) -> dict[str, bytes]:
    return {
        m: bytes(r)
        for m, r in _rows(store, f"SELECT message_id, receipt FROM {table}")
        if r is not None
    }


async def lost_responses(
    root: Path, *, claims: int, ratio: float = 0.1, seed: int = 17
) -> LostResponsesResult:
    """The insurer answers but a share of the answers never arrive (the connection is cut
    after the request went through): every claim must be stored once, and the receipt
    the hospital ends up with must be the one the insurer signed first."""
    site = await make_site(
        root, request_timeout_seconds=3.0, retry_base_seconds=0.1, probe_cap_seconds=1.0
    )
    site.proxy.cut_ratio = ratio
    await site.proxy.set_mode("cut_responses")
    insurer = await start(site.insurer_cfg)
    hospital = await start(site.hospital_cfg)
    try:
        ids = await enqueue(site.hospital_cfg, claims, seed=seed)
        await wait_settled(site.hospital_store, ids, timeout=600)
        states = outbox_states(site.hospital_store)
        held = set(inbox_ids(site.insurer_store))
        sent = _receipts(site.hospital_store, "outbox")
        signed = _receipts(site.insurer_store, "inbox")
        return LostResponsesResult(
            claims=len(ids),
            cuts=site.proxy.cuts,
            lost=sum(1 for m in ids if m not in held),
            duplicated=sum(n - 1 for n in receptions(site.insurer_store).values() if n > 1),
            dead=sum(1 for m in ids if states.get(m) == "dead"),
            receipts_differing=sum(1 for m in ids if sent.get(m) != signed.get(m)),
        )
    finally:
        await stop(hospital)
        await stop(insurer)
        await site.proxy.stop()
