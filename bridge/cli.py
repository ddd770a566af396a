"""Command line: ``bridge demo|serve|push|map|mappings|intake|certs|consent|audit|outbox``.

Exit codes: 0 success, 1 the operation ran and found a problem (an audit chain that
does not verify, a message lost in the demo), 2 bad input or configuration (the error
names the file, key, element or path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_intake import add_intake_commands
from bridge.cli_mapping import add_mapping_commands
from bridge.errors import BridgeError, NotFound


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _fail(exc: BridgeError) -> int:
    sys.stderr.write(f"error [{exc.code}]: {exc}\n")
    return 2


# --- certs ------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from bridge.trust.pki import init_dev_pki

    try:
        pki = init_dev_pki(Path(args.directory), args.controllers, force=args.force)
    except BridgeError as exc:
        return _fail(exc)
    sys.stdout.write(f"development PKI written to {args.directory}\n")
    sys.stdout.write(f"{pki}\n")
    sys.stdout.write("These keys are unencrypted and for development only.\n")
    return 0


# --- serve / push -------------------------------------------------------------------------


def _controller(config_path: str) -> Any:
    from bridge.config import load_config
    from bridge.link.node import Controller

    return Controller(load_config(config_path))


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.link.service import BridgeService

    logging.basicConfig(
        level=logging.INFO if not args.verbose else logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def run() -> None:
        service = BridgeService(_controller(args.config))
        await service.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(f"ready {service.controller.id} port={service.port}\n")
        sys.stdout.flush()
        await stop.wait()
        await service.stop()

    try:
        asyncio.run(run())
    except BridgeError as exc:
        return _fail(exc)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from bridge.mapping import read_record

    async def run() -> int:
        controller = _controller(args.config)
        try:
            record = read_record(Path(args.file).read_bytes(), source=args.file)
            submitted = await controller.submit(record, args.link)
        finally:
            await controller.close()
        state = "queued" if submitted.created else "already queued (duplicate suppressed)"
        sys.stdout.write(f"{submitted.message_id} {state} on link {submitted.link}\n")
        if submitted.held_back:
            sys.stdout.write(
                f"held back (not covered by consent): {', '.join(submitted.held_back)}\n"
            )
        return 0

    try:
        return asyncio.run(run())
    except BridgeError as exc:
        return _fail(exc)
    except OSError as exc:
        sys.stderr.write(f"error: cannot read {args.file}: {exc.strerror}\n")
        return 2


# --- consent ----------------------------------------------------------------------------


def cmd_consent_add(args: argparse.Namespace) -> int:
    async def run() -> int:
        controller = _controller(args.config)
        try:
            try:
                resource = orjson.loads(Path(args.file).read_bytes())
            except orjson.JSONDecodeError as exc:
                sys.stderr.write(
                    f"error [parse-error]: malformed JSON at byte {exc.pos} of {args.file}\n"
                )
                return 2
            consent_id = await controller.put_consent(resource, source="cli")
        finally:
            await controller.close()
        sys.stdout.write(f"consent {consent_id} recorded\n")
        return 0

    try:
        return asyncio.run(run())
    except BridgeError as exc:
        return _fail(exc)


def cmd_consent_list(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    with open_store(config.store) as store:
        for consent_id, status, _resource in store.list_consents():
            sys.stdout.write(f"{consent_id}\t{status}\n")
    return 0


def cmd_consent_revoke(args: argparse.Namespace) -> int:
    """Revoke a consent: the stored resource with status ``inactive``, effective at once."""

    async def run() -> int:
        controller = _controller(args.config)
        try:
            row = await controller.db.get_consent(args.consent_id)
            if row is None:
                sys.stderr.write(f"error [not-found]: no consent {args.consent_id}\n")
                return 2
            resource = orjson.loads(row.resource)
            resource["status"] = "inactive"
            await controller.put_consent(resource, source="cli-revoke")
        finally:
            await controller.close()
        sys.stdout.write(
            f"consent {args.consent_id} revoked; queued claims it covered are refused at dispatch\n"
        )
        return 0

    return asyncio.run(run())


def cmd_consent_show(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    with open_store(config.store) as store:
        row = store.get_consent(args.consent_id)
        history = store.consent_history(args.consent_id) if row is not None else []
    if row is None:
        sys.stderr.write(f"error [not-found]: no consent {args.consent_id}\n")
        return 2
    _print_json(orjson.loads(row.resource))
    for status, _resource, changed, audit_seq in history:
        sys.stderr.write(f"{changed}\t{status}\taudit entry {audit_seq}\n")
    return 0


def cmd_consent_explain(args: argparse.Namespace) -> int:
    """What would be sent on a link today for this record, and why, element by element."""
    from bridge.mapping import map_record, read_record
    from bridge.policy.engine import explain

    async def run() -> int:
        controller = _controller(args.config)
        try:
            await controller.sync_consents()
            link = controller.outbound_link(args.link)
            record = read_record(Path(args.file).read_bytes(), source=args.file)
            now = controller.clock()
            explanation = explain(
                map_record(record, now=now),
                registry=controller.consents,
                profile=controller.profiles[link.id],
                recipient=link.partner,
                purpose=link.purpose,
                now=now,
            )
        finally:
            await controller.close()
        if args.json:
            _print_json(
                {
                    "permitted": explanation.permitted,
                    "decision": explanation.decision.to_dict() if explanation.decision else None,
                    "elements": [
                        {
                            "path": e.path,
                            "outcome": e.outcome,
                            "consent": e.consent_id,
                            "provision": e.provision_path,
                            "detail": e.detail,
                        }
                        for e in explanation.elements
                    ],
                }
            )
        else:
            sys.stdout.write(f"link {link.id} → {link.partner}, purpose {link.purpose}\n")
            for line in explanation.lines():
                sys.stdout.write(line + "\n")
        return 0 if explanation.permitted else 1

    try:
        return asyncio.run(run())
    except OSError as exc:
        sys.stderr.write(f"error: cannot read {args.file}: {exc.strerror}\n")
        return 2


# --- audit / outbox -----------------------------------------------------------------------


def _open_store(args: argparse.Namespace) -> Any:
    """The store named by ``--store FILE`` (SQLite) or by ``--config`` (any kind)."""
    from bridge.config import StoreConfig, load_config
    from bridge.ledger import open_store

    if args.store:
        path = Path(args.store)
        if not path.exists():
            raise NotFound("no store at this path", location=str(path))
        return open_store(StoreConfig(kind="sqlite", path=path))
    config = load_config(args.config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    return open_store(config.store)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args)
    except BridgeError as exc:
        return _fail(exc)
    with store:
        report = store.verify_audit()
    if report.ok:
        sys.stdout.write(f"audit chain verified: {report.count} entries, head {report.head_hash}\n")
        return 0
    sys.stdout.write(
        f"audit chain BROKEN at entry {report.first_bad_seq}: {report.reason} "
        f"({report.count} entries checked)\n"
    )
    return 1


_DISCLOSURE_ACTIONS = {
    # action -> (FHIR AuditEvent.action, what it records)
    "consent.put": ("U", "consent registered, amended or revoked"),
    "claim.enqueue": ("C", "claim queued for disclosure"),
    "claim.refused": ("E", "disclosure refused"),
    "claim.ack": ("E", "disclosed; the recipient's signed receipt is held"),
    "claim.rejected": ("E", "the recipient refused the claim"),
    "claim.dead": ("E", "delivery abandoned after retries"),
    "claim.resend": ("E", "sent again; the recipient's receipt is held"),
    "claim.correct": ("C", "corrected claim queued, naming the claim it replaces"),
    "message.receive": ("C", "received from a partner"),
}


def _audit_event(entry: Any, controller: str) -> dict[str, Any]:
    """One audit entry as a FHIR R4 AuditEvent (ids, codes and pseudonyms only)."""
    record = entry.record
    action, text = _DISCLOSURE_ACTIONS.get(record.action, ("E", record.action))
    outcome = {"success": "0", "failure": "8", "denied": "4"}[record.outcome]
    party = {"system": "urn:ws-fhir-bridge:partner", "value": controller}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{entry.seq}",
        "type": {"system": "urn:ws-fhir-bridge:audit-action", "code": record.action},
        "action": action,
        "recorded": record.time.isoformat(),
        "outcome": outcome,
        "outcomeDesc": text + (f" ({record.detail})" if record.detail else ""),
        "agent": [{"who": {"identifier": party}, "requestor": True}],
        "source": {"observer": {"identifier": party}},
        "entity": [{"what": {"identifier": {"value": record.subject}}}],
    }
    if record.partner:
        event["agent"].append(
            {
                "who": {
                    "identifier": {"system": "urn:ws-fhir-bridge:partner", "value": record.partner}
                },
                "requestor": False,
            }
        )
    if record.patient:
        event["entity"].append(
            {
                "what": {
                    "identifier": {
                        "system": "urn:ws-fhir-bridge:patient-pseudonym",
                        "value": record.patient,
                    }
                }
            }
        )
    return event


def cmd_audit_disclosures(args: argparse.Namespace) -> int:
    """Who received what about one patient, and when (GB/T 39725 §7 g)."""
    from bridge.config import load_config
    from bridge.ledger.audit import patient_pseudonym
    from bridge.link.node import _load_pseudonym_key

    system, sep, value = args.patient.partition("|")
    if not sep or not system or not value:
        sys.stderr.write("error [parse-error]: --patient takes SYSTEM|VALUE (at --patient)\n")
        return 2
    try:
        config = load_config(args.config)
        store = _open_store(args)
    except BridgeError as exc:
        return _fail(exc)
    key = _load_pseudonym_key(config.audit.pseudonym_key_file)
    pseudonym = patient_pseudonym(key, system, value)
    with store:
        own = store.audit_by_patient(pseudonym)
        subjects = {e.record.subject for e in own}
        # Deliveries and resends name the message, not the patient: follow the message.
        related = [e for e in store.audit_entries() if e.record.subject in subjects]
    entries = sorted({e.seq: e for e in [*own, *related]}.values(), key=lambda e: e.seq)
    if args.fhir:
        _print_json(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": _audit_event(e, config.controller.id)} for e in entries],
            }
        )
        return 0
    sys.stdout.write(f"patient {pseudonym}: {len(entries)} audit entries\n")
    for e in entries:
        r = e.record
        sys.stdout.write(
            f"{e.seq}\t{r.time.isoformat(timespec='seconds')}\t{r.action}\t{r.partner or '-'}"
            f"\t{r.outcome}\t{r.subject}\t{r.detail or ''}\n"
        )
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args)
    except BridgeError as exc:
        return _fail(exc)
    with store:
        counts = store.outbox_counts()
    for state, n in sorted(counts.items()):
        sys.stdout.write(f"{state}\t{n}\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per outbound link: claims by state, how far delivery is contiguous, what is stuck."""
    from bridge.config import load_config
    from bridge.ledger import open_store

    try:
        config = load_config(args.config)
    except BridgeError as exc:
        return _fail(exc)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        sys.stderr.write(f"error [not-found]: no store at {config.store.path} yet\n")
        return 2
    attention = False
    with open_store(config.store) as store:
        report = store.verify_audit()
        sys.stdout.write(
            f"{config.controller.id}: audit chain "
            + ("verified" if report.ok else f"BROKEN at entry {report.first_bad_seq}")
            + f", {report.count} entries; inbox {store.inbox_count()} messages\n"
        )
        attention = not report.ok
        from bridge.ledger.intake import record_counts

        intake = record_counts(store)
        if intake:
            sys.stdout.write(
                "  intake: " + ", ".join(f"{state} {n}" for state, n in sorted(intake.items()))
                + "\n"
            )
            # Unrouted records are kept by design (no rule names them); refused and
            # incomplete ones need someone to look (bridge intake list).
            attention = attention or bool(intake.get("refused") or intake.get("incomplete"))
        for link in config.links:
            if link.direction != "outbound":
                sys.stdout.write(f"  {link.id} (inbound from {link.partner})\n")
                continue
            counts = store.outbox_counts(link.id)
            stuck = [
                r
                for state in ("rejected", "dead")
                for r in store.list_outbox(link.id, state=state, limit=5)
            ]
            pending = [
                r
                for state in ("queued", "sending")
                for r in store.list_outbox(link.id, state=state, limit=1)
            ]
            summary = ", ".join(f"{state} {n}" for state, n in counts.items() if n)
            oldest = min((r.seq for r in pending), default=None)
            progress = (
                f"settled up to seq {oldest - 1}, oldest waiting seq {oldest}"
                if oldest is not None
                else "all settled"
            )
            sys.stdout.write(f"  {link.id} → {link.partner}: {summary or 'empty'}; {progress}\n")
            for row in stuck:
                attention = True
                sys.stdout.write(
                    f"    seq {row.seq} {row.state} ({row.last_error or '-'}): {row.message_id}\n"
                )
    return 1 if attention else 0


# --- demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    try:
        return run_demo(
            claims=args.claims,
            workdir=Path(args.workdir) if args.workdir else None,
            seed=args.seed,
            rate=args.rate,
            quiet=args.quiet,
        )
    except BridgeError as exc:
        return _fail(exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridge", description="ws-fhir-bridge: health record exchange")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="two controllers on loopback exchanging claims over mutual TLS")
    d.add_argument("--claims", type=int, default=200, help="number of claims to push (default 200)")
    d.add_argument(
        "--workdir", help="keep PKI, configs and stores here (default: a temporary folder)"
    )
    d.add_argument("--seed", type=int, default=7, help="seed for the sample records")
    d.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered claims per second (0 = as fast as possible)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="run one controller")
    s.add_argument("--config", required=True)
    s.add_argument("--verbose", action="store_true")
    s.set_defaults(func=cmd_serve)

    pu = sub.add_parser("push", help="enqueue one WS 445 record as a claim")
    pu.add_argument("--config", required=True)
    pu.add_argument("--link", required=True)
    pu.add_argument("file")
    pu.set_defaults(func=cmd_push)

    add_mapping_commands(sub)
    add_intake_commands(sub)

    c = sub.add_parser("certs", help="development PKI")
    csub = c.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="create a CA and certificates for controllers")
    ci.add_argument("directory")
    ci.add_argument("--controllers", nargs="+", default=["hospital-a", "insurer-b"])
    ci.add_argument("--force", action="store_true", help="overwrite an existing CA")
    ci.set_defaults(func=cmd_certs_init)

    co = sub.add_parser("consent", help="consent registry")
    cosub = co.add_subparsers(dest="consent_command", required=True)
    ca = cosub.add_parser("add", help="register, amend or revoke a FHIR Consent")
    ca.add_argument("--config", required=True)
    ca.add_argument("file")
    ca.set_defaults(func=cmd_consent_add)
    cl = cosub.add_parser("list", help="list consents")
    cl.add_argument("--config", required=True)
    cl.set_defaults(func=cmd_consent_list)
    cr = cosub.add_parser("revoke", help="revoke a consent (status inactive)")
    cr.add_argument("--config", required=True)
    cr.add_argument("consent_id")
    cr.set_defaults(func=cmd_consent_revoke)
    cs = cosub.add_parser("show", help="print a consent and its history")
    cs.add_argument("--config", required=True)
    cs.add_argument("consent_id")
    cs.set_defaults(func=cmd_consent_show)
    ce = cosub.add_parser(
        "explain", help="what a record would disclose on a link today, element by element, and why"
    )
    ce.add_argument("--config", required=True)
    ce.add_argument("--link", required=True)
    ce.add_argument("--json", action="store_true", help="machine-readable output")
    ce.add_argument("file", help="a WS 445 record (JSON)")
    ce.set_defaults(func=cmd_consent_explain)

    a = sub.add_parser("audit", help="audit trail")
    asub = a.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check the audit hash chain")
    g = av.add_mutually_exclusive_group(required=True)
    g.add_argument("--config")
    g.add_argument("--store", help="path of a store file")
    av.set_defaults(func=cmd_audit_verify)
    ad = asub.add_parser(
        "disclosures",
        help="who received what about one patient, and when (table or FHIR AuditEvent)",
    )
    ad.add_argument("--config", required=True)
    ad.add_argument(
        "--patient", required=True, help="SYSTEM|VALUE of one of the patient's identifiers"
    )
    ad.add_argument("--fhir", action="store_true", help="print a Bundle of FHIR R4 AuditEvent")
    ad.set_defaults(func=cmd_audit_disclosures, store=None)

    st = sub.add_parser(
        "status", help="per link: claims by state, contiguous delivery, what needs attention"
    )
    st.add_argument("--config", required=True)
    st.set_defaults(func=cmd_status)

    o = sub.add_parser("outbox", help="outbox counts per state")
    g2 = o.add_mutually_exclusive_group(required=True)
    g2.add_argument("--config")
    g2.add_argument("--store")
    o.set_defaults(func=cmd_outbox)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. This is the CLI's one error boundary: whatever a command raises
    becomes one line on stderr and an exit status, never a traceback (set
    ``BRIDGE_DEBUG=1`` to see one)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BridgeError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        where = f" (at {exc.filename})" if exc.filename else ""
        sys.stderr.write(f"error [os-error]: {exc.strerror or type(exc).__name__}{where}\n")
        return 1
    except Exception as exc:  # the boundary: report, never dump a traceback
        if os.environ.get("BRIDGE_DEBUG"):
            raise
        sys.stderr.write(
            f"error [internal]: {type(exc).__name__} in bridge {args.command};"
            " set BRIDGE_DEBUG=1 to see where\n"
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
