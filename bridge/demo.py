"""``bridge demo``: a hospital and an insurer on loopback, exchanging real claims.

The demo builds a throwaway development PKI, writes one configuration per controller,
starts the insurer's bridge as a separate process and the hospital's bridge in this
one, registers consents for most sample patients (some deliberately get none, a few
get a consent that does not cover sensitive diagnoses), and pushes claims built from
sample WS 445.10 inpatient front sheets. Some records are submitted twice and some
delivered claims are resent, to show that neither creates a second claim at the
insurer. At the end both audit chains are verified and every claim is accounted for;
the exit status is non-zero if anything was lost.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bridge.errors import BridgeError, ConsentDenied, UsageError

HOSPITAL = "hospital-a"
INSURER = "insurer-b"
LINK_OUT = "claims-to-insurer-b"
LINK_IN = "claims-from-hospital-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_configs(
    workdir: Path,
    hospital_port: int,
    insurer_port: int,
    *,
    ops_ports: tuple[int, int] | None = None,
) -> tuple[Path, Path]:
    """Write the two controllers' configuration files next to the PKI in ``workdir``.

    With ``ops_ports`` (hospital, insurer) each also opens its operations port.
    """
    ops_h, ops_i = (
        (f"\n[operations]\nport = {ops_ports[0]}\nsample_seconds = 1\n",
         f"\n[operations]\nport = {ops_ports[1]}\nsample_seconds = 1\n")
        if ops_ports
        else ("", "")
    )
    hospital = f"""\
# Hospital A: pushes inpatient claims to Insurer B.
[controller]
id = "{HOSPITAL}"
name = "示范市第一人民医院"

[server]
host = "127.0.0.1"
port = {hospital_port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{HOSPITAL}/tls.pem"
key = "pki/{HOSPITAL}/tls.key"

[signing]
cert = "pki/{HOSPITAL}/sign.pem"
key = "pki/{HOSPITAL}/sign.key"

[store]
path = "{HOSPITAL}/bridge.sqlite"

[audit]
pseudonym_key_file = "{HOSPITAL}/audit-pseudonym.key"
{ops_h}
[[partners]]
id = "{INSURER}"
name = "示范商业保险股份有限公司"
base_url = "https://127.0.0.1:{insurer_port}/fhir"
signing_certs = ["pki/{INSURER}/sign.pem"]

[[links]]
id = "{LINK_OUT}"
partner = "{INSURER}"
direction = "outbound"
profile = "commercial-insurance"
purpose = "HPAYMT"
# The insurer collects patients' payment authorisations and submits them (consent API).
partner_consent_purposes = ["HPAYMT"]
"""
    insurer = f"""\
# Insurer B: receives claims from Hospital A.
[controller]
id = "{INSURER}"
name = "示范商业保险股份有限公司"

[server]
host = "127.0.0.1"
port = {insurer_port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{INSURER}/tls.pem"
key = "pki/{INSURER}/tls.key"

[signing]
cert = "pki/{INSURER}/sign.pem"
key = "pki/{INSURER}/sign.key"

[store]
path = "{INSURER}/bridge.sqlite"

[audit]
pseudonym_key_file = "{INSURER}/audit-pseudonym.key"
{ops_i}
[[partners]]
id = "{HOSPITAL}"
name = "示范市第一人民医院"
signing_certs = ["pki/{HOSPITAL}/sign.pem"]

[[links]]
id = "{LINK_IN}"
partner = "{HOSPITAL}"
direction = "inbound"
profile = "commercial-insurance"
purpose = "HPAYMT"
"""
    h = workdir / "hospital.toml"
    i = workdir / "insurer.toml"
    h.write_text(hospital, encoding="utf-8")
    i.write_text(insurer, encoding="utf-8")
    return h, i


@dataclass
class DemoResult:
    submitted: int = 0
    enqueued: int = 0
    refused_no_consent: int = 0
    duplicates_suppressed_sender: int = 0
    duplicates_suppressed_receiver: int = 0
    held_back_sensitive: int = 0
    delivered: int = 0
    rejected: int = 0
    refused_at_dispatch: int = 0
    dead: int = 0
    signature_failures: int = 0
    lost: int = 0
    insurer_inbox: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    hospital_chain: str = ""
    insurer_chain: str = ""
    chains_ok: bool = False


def _consent_plan(records: list[dict[str, Any]], rng: random.Random) -> list[str]:
    """Decide per record: 'full' consent, 'basic' (sensitive classes not covered) or 'none'."""
    plan = []
    for _ in records:
        roll = rng.random()
        plan.append("none" if roll < 0.08 else "basic" if roll < 0.20 else "full")
    return plan


REVOKING = 3
ALL_CLASSES = (
    "sexual-reproductive",
    "infectious",
    "mental",
    "malignant",
    "genetic",
    "anal",
    "rare",
    "incurable",
)


def _full_consent(
    record: dict[str, Any], consent_id: str, now: datetime, *, sensitive: bool = True
) -> dict[str, Any]:
    """A consent for the insurer to receive this patient's claims for payment.

    Consents name the patient by ID card number where there is one, otherwise by the
    first identifier the hospital holds (passport, inpatient number, ...).
    """
    from bridge.mapping import map_record, patient_identifiers
    from bridge.policy.engine import build_consent

    ids = patient_identifiers(map_record(record, now=now))
    system, value = next(((s, v) for s, v in ids if s == "urn:oid:2.16.156.10011.1.3"), ids[0])
    return build_consent(
        consent_id=consent_id,
        patient_system=system,
        patient_value=value,
        recipient=INSURER,
        purposes=["HPAYMT"],
        start=now - timedelta(days=30),
        end=now + timedelta(days=365),
        sensitive_classes=ALL_CLASSES if sensitive else (),
        hospital_partner_id=HOSPITAL,
    )


async def _wait_ready(
    url_host: str, port: int, proc: asyncio.subprocess.Process, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise BridgeError(
                "the insurer's bridge exited during start-up", location="bridge serve"
            )
        try:
            _r, w = await asyncio.open_connection(url_host, port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise BridgeError("the insurer's bridge did not start in time", location="bridge serve")


async def _run(
    claims: int, workdir: Path, seed: int, rate: float, console: Console, quiet: bool
) -> DemoResult:
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.samples import inpatient_records
    from bridge.trust.pki import init_dev_pki

    result = DemoResult()
    init_dev_pki(workdir / "pki", [HOSPITAL, INSURER], force=True)
    hospital_cfg, insurer_cfg = write_configs(
        workdir, free_port(), free_port(), ops_ports=(free_port(), free_port())
    )
    insurer_port = load_config(insurer_cfg).server.port

    env = dict(os.environ)
    # The insurer runs in its own process, as it would on its own premises; its log
    # goes to insurer.log in the work folder.
    log_fd = os.open(workdir / "insurer.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--config",
            str(insurer_cfg),
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env=env,
        )
    finally:
        os.close(log_fd)
    service: BridgeService | None = None
    try:
        await _wait_ready("127.0.0.1", insurer_port, proc, timeout=60)
        controller = Controller(load_config(hospital_cfg))
        service = BridgeService(controller, poll_interval=0.2)

        rng = random.Random(seed)
        # Three more patients than claims: they consent, their claims are queued, and
        # they revoke before the bridge sends anything (below).
        records = inpatient_records(claims + REVOKING, seed=seed)
        revoking = records[claims:]
        records = records[:claims]
        plan = _consent_plan(records, rng)
        now = datetime.now(UTC)
        for n, (record, kind) in enumerate(zip(records, plan, strict=True)):
            if kind == "none":
                continue
            consent = _full_consent(record, f"demo-consent-{n:05d}", now, sensitive=kind == "full")
            await controller.put_consent(consent, source="demo")

        # Revocation takes effect for claims already queued: these are enqueued while the
        # dispatcher is not yet running, their consents are revoked, and the dispatcher
        # refuses them when it gets to them.
        for n, record in enumerate(revoking):
            consent_id = f"demo-revoked-{n}"
            consent = _full_consent(record, consent_id, now)
            await controller.put_consent(consent, source="demo")
            await controller.submit(record, LINK_OUT)
            result.submitted += 1
            result.enqueued += 1
            await controller.put_consent({**consent, "status": "inactive"}, source="demo")
        await service.start()
        if service.ops is not None and not quiet:
            console.print(f"status page and /metrics of {HOSPITAL}: {service.ops.url}/")

        # A few records are submitted twice, as a HIS does after a timeout.
        resubmit = set(rng.sample(range(claims), k=max(1, claims // 20))) if claims else set()
        order: list[int] = list(range(claims)) + sorted(resubmit)
        interval = 1.0 / rate if rate > 0 else 0.0
        message_ids: set[str] = set()
        started = time.perf_counter()
        progress = Progress(
            TextColumn("[bold]pushing claims"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("delivered {task.fields[delivered]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        dispatcher = service.dispatchers[LINK_OUT]
        with progress:
            # The records queued before the push (for the patients who then revoke) count
            # as submitted, here as in the summary.
            task = progress.add_task(
                "push",
                total=len(order) + len(revoking),
                completed=len(revoking),
                delivered=0,
            )
            # A HIS pushes from several interface threads at once: submissions overlap,
            # and the outbox's sequence numbers still order them.
            in_flight = asyncio.Semaphore(8)
            pending_tasks: set[asyncio.Task[None]] = set()

            async def push(idx: int) -> None:
                try:
                    sub = await service.submit(records[idx], LINK_OUT)
                except ConsentDenied:
                    result.refused_no_consent += 1
                else:
                    if not sub.created:
                        result.duplicates_suppressed_sender += 1
                    else:
                        message_ids.add(sub.message_id)
                        result.enqueued += 1
                        if sub.held_back:
                            result.held_back_sensitive += 1
                finally:
                    in_flight.release()
                    progress.update(task, advance=1, delivered=dispatcher.stats.acked)

            for k, idx in enumerate(order):
                if interval:
                    target = started + k * interval
                    delay = target - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await in_flight.acquire()
                result.submitted += 1
                t = asyncio.create_task(push(idx))
                pending_tasks.add(t)
                t.add_done_callback(pending_tasks.discard)
            if pending_tasks:
                await asyncio.gather(*pending_tasks)
            # Wait for the outbox to drain.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                counts = await controller.db.outbox_counts(LINK_OUT)
                pending = counts.get("queued", 0) + counts.get("sending", 0)
                progress.update(task, delivered=dispatcher.stats.acked)
                if pending == 0:
                    break
                await asyncio.sleep(0.05)
        result.elapsed = time.perf_counter() - started
        result.latencies = list(dispatcher.stats.latencies)

        # Resend a few delivered claims: the insurer must answer with its original receipt.
        for mid in sorted(message_ids)[: max(1, len(message_ids) // 20)]:
            row = await controller.db.get_outbox(mid)
            if row is not None and row.state == "acked":
                receipt = await dispatcher.resend(mid)
                if receipt == row.receipt:
                    result.duplicates_suppressed_receiver += 1
                else:
                    result.lost += 1  # a second, different receipt means a second claim

        counts = await controller.db.outbox_counts(LINK_OUT)
        result.delivered = counts.get("acked", 0)
        result.rejected = counts.get("rejected", 0)
        result.refused_at_dispatch = counts.get("refused", 0)
        result.dead = counts.get("dead", 0)
        result.signature_failures = dispatcher.stats.signature_failures
    finally:
        if service is not None:
            await service.stop()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    with (
        open_store(load_config(hospital_cfg).store) as hs,
        open_store(load_config(insurer_cfg).store) as ins,
    ):
        h_report = hs.verify_audit()
        i_report = ins.verify_audit()
        result.insurer_inbox = ins.inbox_count(HOSPITAL)
    result.hospital_chain = f"{h_report.count} entries" + (
        "" if h_report.ok else f", BROKEN at {h_report.first_bad_seq}"
    )
    result.insurer_chain = f"{i_report.count} entries" + (
        "" if i_report.ok else f", BROKEN at {i_report.first_bad_seq}"
    )
    result.chains_ok = h_report.ok and i_report.ok
    accounted = result.delivered + result.rejected + result.refused_at_dispatch + result.dead
    result.lost += (result.enqueued - accounted) + abs(result.insurer_inbox - result.delivered)
    return result


def render(result: DemoResult, console: Console) -> None:
    table = Table(
        title="ws-fhir-bridge demo: hospital-a → insurer-b over mutual TLS", show_header=False
    )
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    rate = result.delivered / result.elapsed if result.elapsed else 0.0
    median = statistics.median(result.latencies) * 1000 if result.latencies else 0.0
    p99 = (
        sorted(result.latencies)[max(0, int(len(result.latencies) * 0.99) - 1)] * 1000
        if result.latencies
        else 0.0
    )
    rows = [
        ("records submitted", result.submitted),
        ("claims enqueued (signed, minimised)", result.enqueued),
        ("delivered, with signed receipt", result.delivered),
        ("refused: no consent", result.refused_no_consent),
        ("sensitive diagnoses held back", result.held_back_sensitive),
        ("duplicates suppressed by the sender", result.duplicates_suppressed_sender),
        ("resends answered with the original receipt", result.duplicates_suppressed_receiver),
        ("rejected by the insurer", result.rejected),
        ("refused at dispatch (consent revoked)", result.refused_at_dispatch),
        ("dead-lettered", result.dead),
        ("signature failures", result.signature_failures),
        ("claims in the insurer's inbox", result.insurer_inbox),
        (
            "hospital audit chain",
            ("verified, " if result.chains_ok else "") + result.hospital_chain,
        ),
        ("insurer audit chain", ("verified, " if result.chains_ok else "") + result.insurer_chain),
        ("claims per second", f"{rate:.0f}"),
        ("median latency (enqueue → receipt)", f"{median:.1f} ms"),
        ("p99 latency", f"{p99:.1f} ms"),
        ("lost", result.lost),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def run_demo(
    *,
    claims: int = 200,
    workdir: Path | None = None,
    seed: int = 7,
    rate: float = 0.0,
    quiet: bool = False,
) -> int:
    console = Console(stderr=False)
    temp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="bridge-demo-")) if workdir is None else workdir
    if not temp and root.is_dir() and any(root.iterdir()):
        # Stores left by an earlier run would be counted as this run's claims.
        raise UsageError("the demo starts from an empty folder and this one holds an"
                         " earlier run's files: give another folder, or remove it",
                         location="--workdir")
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(_run(claims, root, seed, rate, console, quiet))
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    render(result, console)
    if not temp:
        console.print(f"PKI, configurations, stores and the insurer's log are in {root}")
    ok = result.lost == 0 and result.chains_ok and result.signature_failures == 0
    if not ok:
        console.print("[bold red]FAILED:[/] a claim was lost or an audit chain did not verify")
    return 0 if ok else 1
