"""Command line: ``bridge init|demo|serve|push|map|mappings|intake|store|certs|consent|audit|status|outbox``.

Exit codes: 0 success, 1 the operation ran and found a problem (an audit chain that
does not verify, a message lost in the demo, a store or port that is not available),
2 bad input, usage or configuration (the error names the file, key, element or path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_agreements import add_agreements_commands
from bridge.cli_audit import add_audit_commands, cmd_audit_verify
from bridge.cli_certs import add_certs_lifecycle_commands
from bridge.cli_common import (
    Parser,
    add_json_option,
    folder_argument,
    non_negative_float,
    non_negative_int,
    read_input,
    read_json,
    version_text,
)
from bridge.cli_common import print_json as _print_json
from bridge.cli_compliance import add_compliance_commands
from bridge.cli_conformance import add_conformance_commands
from bridge.cli_inbox import add_inbox_commands, handoff_report, print_handoff_status
from bridge.cli_init import add_init_commands
from bridge.cli_intake import add_intake_commands
from bridge.cli_keys import add_keys_commands
from bridge.cli_mapping import add_mapping_commands
from bridge.cli_operators import add_operators_commands, guard_commands
from bridge.cli_outbox import add_outbox_commands
from bridge.cli_profile import add_profile_commands
from bridge.cli_pull import add_pull_commands, print_pull_status, pull_status_report
from bridge.cli_research import add_research_commands
from bridge.cli_store import add_store_commands
from bridge.cli_sync import add_sync_commands
from bridge.errors import BridgeError, NotFound, ParseError, PayloadTooLarge, UsageError


def _fail(exc: BridgeError) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the message held
    sys.stderr.write(f"error [{exc.code}]: {message}\n")
    return exc.exit_status


# --- certs ------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from bridge.trust.pki import init_dev_pki

    directory = folder_argument(args.directory, option="DIRECTORY")
    pki = init_dev_pki(directory, args.controllers, force=args.force)
    sys.stdout.write(f"development PKI written to {directory}\n")
    sys.stdout.write(f"  CA            {pki.ca_cert} (key {pki.ca_key.name})\n")
    for controller_id, files in pki.controllers.items():
        sys.stdout.write(
            f"  {controller_id:<13} TLS {files.tls_cert.relative_to(directory)}"
            f", signing {files.sign_cert.relative_to(directory)} (keys beside them)\n"
        )
    sys.stdout.write("These keys are unencrypted and for development only.\n")
    return 0


# --- serve / push -------------------------------------------------------------------------


def _controller(config_path: str) -> Any:
    from bridge.config import load_config
    from bridge.link.node import Controller

    return Controller(load_config(config_path))


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge import eventloop
    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.logs import setup_logging

    config = load_config(args.config)
    setup_logging(
        fmt=args.log_format,
        level="debug" if args.verbose else args.log_level,
        static={"controller": config.controller.id},
    )

    # The files the configuration names, then the listener's certificate and key, checked
    # before the store is opened (or made): a start refused for one of them leaves no new
    # store behind, and names the configuration key. (The controller reads its signing
    # keys before its store too.)
    from bridge.config import check_input_files
    from bridge.trust.tls import server_context

    check_input_files(config)
    server_context(config.tls.cert, config.tls.key, config.tls.ca, crl_file=config.tls.crl)

    async def run() -> None:
        service = BridgeService(Controller(config))
        try:
            await service.start()
        except BaseException:
            await service.stop()
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: load the TLS certificate, key, CA bundle, CRL and signing key again.
        loop.add_signal_handler(signal.SIGHUP, service.reload_certificates)
        logging.getLogger("bridge.serve").info("event loop: %s", eventloop.loop_name())
        ready = f"ready {service.controller.id} port={service.port}"
        if service.ops is not None:
            ready += f" operations={service.ops.url}"
        sys.stdout.write(ready + "\n")
        sys.stdout.flush()
        await stop.wait()
        await service.stop()

    eventloop.run(run(), config.server.event_loop)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from bridge.mapping import read_record

    data = read_input(args.file, what="record")

    async def run() -> int:
        controller = _controller(args.config)
        try:
            limit = controller.outbound_link(args.link).max_message_bytes
            if len(data) > 2 * limit:
                # A claim is several times the size of the record it maps (one Condition
                # per diagnosis, and so on): a record file more than twice the bound,
                # white space and escapes allowed for, is refused before it is read.
                raise PayloadTooLarge(
                    f"the record is {len(data)} bytes, more than twice what link"
                    f" {args.link} sends in one claim ({limit},"
                    f" links.{args.link}.max_message_bytes)", location=args.file)
            record = controller.protect_record(read_record(data, source=args.file))
            if args.replaces is not None:
                prior = await controller.db.get_outbox(args.replaces)
                if prior is None or prior.link != args.link:
                    raise UsageError(f"no claim {args.replaces} was queued on link {args.link}",
                                     location="--replaces")
            submitted = await controller.submit(record, args.link, replaces=args.replaces)
            row = None if submitted.created else await controller.db.get_outbox(
                submitted.message_id
            )
        finally:
            await controller.close()
        settled_badly = row is not None and row.state.value in ("dead", "rejected", "refused")
        if submitted.created:
            state = "queued"
        elif row is not None and settled_badly:
            state = (
                f"already in the outbox and {row.state.value} ({row.last_error or '-'});"
                " nothing new queued"
                + (
                    f"; bridge outbox requeue --id {submitted.message_id} puts it back"
                    if row.state.value != "refused"
                    else ""
                )
            )
        elif row is not None and row.state.value == "acked":
            state = "already delivered (duplicate suppressed)"
        else:
            state = "already queued (duplicate suppressed)"
        sys.stdout.write(f"{submitted.message_id} {state} on link {submitted.link}\n")
        if submitted.held_back:
            sys.stdout.write(
                f"held back (not covered by consent): {', '.join(submitted.held_back)}\n"
            )
        return 1 if settled_badly else 0

    return asyncio.run(run())


# --- consent ----------------------------------------------------------------------------


def cmd_consent_add(args: argparse.Namespace) -> int:
    resource = read_json(args.file, what="consent file")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise ParseError("not a FHIR Consent resource", location=f"{args.file}: resourceType")

    async def run() -> int:
        controller = _controller(args.config)
        try:
            consent_id = await controller.put_consent(resource, source="cli")
        finally:
            await controller.close()
        sys.stdout.write(f"consent {consent_id} recorded\n")
        return 0

    return asyncio.run(run())


def cmd_consent_list(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    with open_store(config.store) as store:
        consents = store.list_consents()
    if args.json:
        _print_json([{"id": cid, "status": status} for cid, status, _resource in consents])
        return 0
    for consent_id, status, _resource in consents:
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
    from bridge.mapping import read_record

    data = read_input(args.file, what="record")

    async def run() -> int:
        controller = _controller(args.config)
        try:
            await controller.sync_consents()
            link = controller.outbound_link(args.link)
            record = read_record(data, source=args.file)
            # The same mapping and policy run as a push: what it says is sent, is sent.
            explanation = controller.explain(record, link.id)
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

    return asyncio.run(run())


# --- audit / outbox -----------------------------------------------------------------------


def _open_store(args: argparse.Namespace) -> Any:
    """The store named by ``--store FILE`` (SQLite) or by ``--config`` (any kind)."""
    from bridge.config import StoreConfig, load_config
    from bridge.ledger import open_store

    if args.store is not None:
        if not args.store.strip():
            raise UsageError("--store needs the path of a store file", location="--store")
        path = Path(args.store)
        if not path.exists():
            raise NotFound("no store at this path", location=str(path))
        return open_store(StoreConfig(kind="sqlite", path=path))
    config = load_config(args.config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    return open_store(config.store)


def cmd_audit_disclosures(args: argparse.Namespace) -> int:
    """Who received what about one patient, and when (GB/T 39725 §7 g)."""
    from bridge.cli_audit import balp_event
    from bridge.config import load_config
    from bridge.ledger.audit import patient_pseudonym
    from bridge.ledger.identity import linked_pseudonyms
    from bridge.link.node import _load_pseudonym_key

    system, sep, value = args.patient.partition("|")
    if not sep or not system or not value:
        raise ParseError("--patient takes SYSTEM|VALUE", location="--patient")
    config = load_config(args.config)
    key = _load_pseudonym_key(config.audit.pseudonym_key_file)
    pseudonym = patient_pseudonym(key, system, value)
    with _open_store(args) as store:
        # One person across identifiers: every pseudonym the hospital's records link
        # to this one (identity card, passport, inpatient, record and health-card numbers).
        persons = linked_pseudonyms(store, [pseudonym])
        own = [e for p in persons for e in store.audit_by_patient(p)]
        subjects = {e.record.subject for e in own}
        # Deliveries and resends name the message, not the patient: follow the message.
        related = [e for e in store.audit_entries() if e.record.subject in subjects]
    # Looking up the history is itself audited (disclosures.read), but is not a use or
    # disclosure of the patient's data: it is not listed in the history.
    entries = sorted({e.seq: e for e in [*own, *related]
                      if e.record.action != "disclosures.read"}.values(), key=lambda e: e.seq)
    if args.fhir:
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
        if entries:  # FHIR JSON has no empty array: no history, no entry
            bundle["entry"] = [{"resource": balp_event(e, config.controller.id)}
                               for e in entries]
        _print_json(bundle)
        return 0
    if args.json:
        _print_json(
            {
                "patient": pseudonym,
                "linked": [p for p in persons if p != pseudonym],
                "entries": [
                    {
                        "seq": e.seq,
                        "time": e.record.time.isoformat(),
                        "action": e.record.action,
                        "partner": e.record.partner,
                        "outcome": e.record.outcome,
                        "subject": e.record.subject,
                        "detail": e.record.detail,
                    }
                    for e in entries
                ],
            }
        )
        return 0
    also = f" (and {len(persons) - 1} linked identifiers)" if len(persons) > 1 else ""
    sys.stdout.write(f"patient {pseudonym}{also}: {len(entries)} audit entries\n")
    for e in entries:
        r = e.record
        sys.stdout.write(
            f"{e.seq}\t{r.time.isoformat(timespec='seconds')}\t{r.action}\t{r.partner or '-'}"
            f"\t{r.outcome}\t{r.subject}\t{r.detail or ''}\n"
        )
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    if args.config is None and args.store is None:
        raise UsageError("one of --config or --store is required", location="bridge outbox")
    with _open_store(args) as store:
        counts = store.outbox_counts()
    if args.json:
        _print_json(dict(sorted(counts.items())))
        return 0
    for state, n in sorted(counts.items()):
        sys.stdout.write(f"{state}\t{n}\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per outbound link: claims by state, how far delivery is contiguous, what is stuck."""
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    with open_store(config.store) as store:
        report = _status_report(config, store)
    if args.json:
        _print_json(report)
    else:
        _print_status(report)
    return 1 if report["attention"] else 0


def _status_report(config: Any, store: Any) -> dict[str, Any]:
    """What ``bridge status`` shows, as data (the text and ``--json`` render this)."""
    chain = store.verify_audit()
    report: dict[str, Any] = {
        "controller": config.controller.id,
        "audit": {"ok": chain.ok, "entries": chain.count, "first_bad_seq": chain.first_bad_seq,
                  "reason": chain.reason},
        "inbox": store.inbox_count(),
        "links": [],
        "attention": not chain.ok,
    }
    for link in config.links:
        item: dict[str, Any] = {
            "id": link.id,
            "partner": link.partner,
            "direction": link.direction,
        }
        report["links"].append(item)
        if link.direction != "outbound":
            continue
        counts = store.outbox_counts(link.id)
        pending = [
            r
            for state in ("queued", "sending")
            for r in store.list_outbox(link.id, state=state, limit=1)
        ]
        oldest = min((r.seq for r in pending), default=None)
        item["counts"] = dict(counts)
        item["oldest_waiting_seq"] = oldest
        item["needs_attention"] = _claims_needing_attention(store, link.id)
        if item["needs_attention"]:
            report["attention"] = True
    from bridge.ledger.intake import record_counts

    intake = record_counts(store)
    if intake:
        report["intake"] = dict(sorted(intake.items()))
        # Unrouted records are kept by design (no rule names them); refused and
        # incomplete ones need someone to look (bridge intake list).
        if intake.get("refused") or intake.get("incomplete"):
            report["attention"] = True
    report["handoff"] = handoff_report(config, store)
    if any(d["needs_operator"] for d in report["handoff"]):
        report["attention"] = True
    report["pull"] = pull_status_report(store, config)
    if report["pull"]["reviews"]:
        report["attention"] = True
    from bridge.ops.certs import certificate_report

    report["certificates"] = certificate_report(config)
    if any(not c["ok"] for c in report["certificates"]):
        report["attention"] = True
    from bridge.cli_audit import witness_inconsistent, witness_report

    report["witness"] = witness_report(config, store)
    if witness_inconsistent(report["witness"]):
        report["attention"] = True
    return report


def _claims_needing_attention(store: Any, link: str) -> list[dict[str, Any]]:
    """Every rejected or dead claim of ``link``, and every pending one that keeps failing,
    each with its reason, last answer and age."""

    from bridge.ledger.delivery import list_claims, problem_claims

    now = datetime.now(UTC)
    claims = list_claims(store, link=link, states=("rejected",)) + [
        c for c in problem_claims(store, now=now) if c.link == link
    ]
    return [
        {
            "seq": c.seq,
            "state": c.state,
            "error": c.last_error,
            "last_answer": c.last_answer,
            "fate_unknown": c.fate_unknown,
            "age_seconds": round(c.age_seconds(now), 1),
            "message_id": c.message_id,
        }
        for c in sorted(claims, key=lambda c: c.seq)
    ]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _print_status(report: dict[str, Any]) -> None:
    audit = report["audit"]
    sys.stdout.write(
        f"{report['controller']}: audit chain "
        + ("verified" if audit["ok"]
           else f"BROKEN at entry {audit['first_bad_seq']} ({audit.get('reason')})")
        + f", {audit['entries']} entries; inbox {report['inbox']} messages\n"
    )
    from bridge.cli_audit import witness_lines

    for line in witness_lines(report.get("witness", [])):
        sys.stdout.write(f"  {line}\n")
    if report.get("intake"):
        sys.stdout.write(
            "  intake: " + ", ".join(f"{state} {n}" for state, n in report["intake"].items())
            + "\n"
        )
    for link in report["links"]:
        if link["direction"] in ("pull", "pull-from"):
            continue  # print_pull_status below
        if link["direction"] != "outbound":
            sys.stdout.write(f"  {link['id']} (inbound from {link['partner']})\n")
            continue
        summary = ", ".join(f"{state} {n}" for state, n in link["counts"].items() if n)
        oldest = link["oldest_waiting_seq"]
        progress = (
            f"settled up to seq {oldest - 1}, oldest waiting seq {oldest}"
            if oldest is not None
            else "nothing waiting"
            if link["needs_attention"]
            else "all settled"
        )
        sys.stdout.write(
            f"  {link['id']} → {link['partner']}: {summary or 'empty'}; {progress}\n"
        )
        if link["needs_attention"]:
            sys.stdout.write(
                f"    {len(link['needs_attention'])} claims need an operator"
                " (bridge outbox requeue --id ID puts one back):\n"
            )
        for row in link["needs_attention"]:
            answer = f"; last answer {row['last_answer']}" if row["last_answer"] else ""
            unknown = "; may be held by the partner" if row["fate_unknown"] else ""
            sys.stdout.write(
                f"    seq {row['seq']} {row['state']} ({row['error'] or '-'}{answer}{unknown}),"
                f" {_age(row['age_seconds'])} old: {row['message_id']}\n"
            )
    print_pull_status(report["pull"], sys.stdout)
    print_handoff_status(report["handoff"], sys.stdout)
    for cert in report["certificates"]:
        if not cert["ok"]:
            days = cert.get("days_left")
            state = (f"expires in {int(days)} days, not after {cert['not_after']}"
                     if days is not None and days >= 0 else cert["detail"])
            sys.stdout.write(f"  certificate {cert['certificate']} ({cert['path']}): {state}\n")


# --- demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    workdir = folder_argument(args.workdir, option="--workdir") if args.workdir else None
    return run_demo(
        claims=args.claims,
        workdir=workdir,
        seed=args.seed,
        rate=args.rate,
        quiet=args.quiet,
    )


_CONFIG_HELP = "the controller's configuration file (TOML)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bridge", description="ws-fhir-bridge: health record exchange")
    p.add_argument(
        "--version",
        action="version",
        version=version_text(),
        help="print the package, FHIR and protocol versions and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_init_commands(sub)

    d = sub.add_parser("demo", help="two controllers on loopback exchanging claims over mutual TLS")
    d.add_argument(
        "--claims",
        type=non_negative_int,
        default=200,
        help="number of claims to push (default 200)",
    )
    d.add_argument(
        "--workdir", help="keep PKI, configs and stores here (default: a temporary folder)"
    )
    d.add_argument("--seed", type=int, default=7, help="seed for the sample records")
    d.add_argument(
        "--rate",
        type=non_negative_float,
        default=0.0,
        help="offered claims per second (0 = as fast as possible)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="run one controller")
    s.add_argument("--config", required=True, help=_CONFIG_HELP)
    s.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines as text for a person or JSON for a log shipper (default text)",
    )
    s.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="least severe log lines written (default info)",
    )
    s.add_argument("--verbose", action="store_true", help="same as --log-level debug")
    s.set_defaults(func=cmd_serve)

    pu = sub.add_parser("push", help="enqueue one WS 445 record as a claim")
    pu.add_argument("--config", required=True, help=_CONFIG_HELP)
    pu.add_argument("--link", required=True, help="id of an outbound link in the configuration")
    pu.add_argument("file", help="a WS 445 record (JSON)")
    pu.add_argument("--replaces", metavar="MESSAGE_ID", default=None,
                    help="send the record as a corrected claim of the one queued or sent on"
                         " this link under MESSAGE_ID (Claim.related, prior)")
    pu.set_defaults(func=cmd_push)

    add_mapping_commands(sub)
    add_intake_commands(sub)
    add_store_commands(sub)
    add_keys_commands(sub)
    add_pull_commands(sub)
    add_inbox_commands(sub)

    c = sub.add_parser("certs", help="development PKI")
    csub = c.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    ci = csub.add_parser("init", help="create a CA and certificates for controllers")
    ci.add_argument("directory", metavar="DIRECTORY", help="folder to write the PKI into")
    ci.add_argument(
        "--controllers",
        nargs="+",
        default=["hospital-a", "insurer-b"],
        help="controller ids to issue certificates for (default hospital-a insurer-b)",
    )
    ci.add_argument("--force", action="store_true", help="overwrite an existing CA")
    ci.set_defaults(func=cmd_certs_init)
    add_certs_lifecycle_commands(csub)

    co = sub.add_parser("consent", help="consent registry")
    cosub = co.add_subparsers(dest="consent_command", required=True, metavar="COMMAND")
    ca = cosub.add_parser("add", help="register, amend or revoke a FHIR Consent")
    ca.add_argument("--config", required=True, help=_CONFIG_HELP)
    ca.add_argument("file", help="a FHIR R4 Consent (JSON)")
    ca.set_defaults(func=cmd_consent_add)
    cl = cosub.add_parser("list", help="list consents")
    cl.add_argument("--config", required=True, help=_CONFIG_HELP)
    add_json_option(cl)
    cl.set_defaults(func=cmd_consent_list)
    cr = cosub.add_parser("revoke", help="revoke a consent (status inactive)")
    cr.add_argument("--config", required=True, help=_CONFIG_HELP)
    cr.add_argument("consent_id", help="id of the consent")
    cr.set_defaults(func=cmd_consent_revoke)
    cs = cosub.add_parser("show", help="print a consent and its history")
    cs.add_argument("--config", required=True, help=_CONFIG_HELP)
    cs.add_argument("consent_id", help="id of the consent")
    cs.set_defaults(func=cmd_consent_show)
    ce = cosub.add_parser(
        "explain", help="what a record would disclose on a link today, element by element, and why"
    )
    ce.add_argument("--config", required=True, help=_CONFIG_HELP)
    ce.add_argument("--link", required=True, help="id of an outbound link in the configuration")
    add_json_option(ce)
    ce.add_argument("file", help="a WS 445 record (JSON)")
    ce.set_defaults(func=cmd_consent_explain)

    a = sub.add_parser("audit", help="audit trail")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    av = asub.add_parser("verify", help="check the audit chain, tree, checkpoints and"
                                        " cosignatures")
    g = av.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help=_CONFIG_HELP)
    g.add_argument("--store", help="path of a SQLite store file")
    add_json_option(av)
    av.set_defaults(func=cmd_audit_verify)
    add_audit_commands(asub)
    ad = asub.add_parser(
        "disclosures",
        help="who received what about one patient, and when (table or FHIR AuditEvent)",
    )
    ad.add_argument("--config", required=True, help=_CONFIG_HELP)
    ad.add_argument(
        "--patient", required=True, help="SYSTEM|VALUE of one of the patient's identifiers"
    )
    ad.add_argument("--fhir", action="store_true", help="print a Bundle of FHIR R4 AuditEvent")
    add_json_option(ad)
    ad.set_defaults(func=cmd_audit_disclosures, store=None)

    st = sub.add_parser(
        "status", help="per link: claims by state, contiguous delivery, what needs attention"
    )
    st.add_argument("--config", required=True, help=_CONFIG_HELP)
    add_json_option(st)
    st.set_defaults(func=cmd_status)

    o = sub.add_parser("outbox", help="outbox counts per state; list, requeue claims")
    g2 = o.add_mutually_exclusive_group()
    g2.add_argument("--config", help=_CONFIG_HELP)
    g2.add_argument("--store", help="path of a SQLite store file")
    add_json_option(o)
    o.set_defaults(func=cmd_outbox)
    add_outbox_commands(o)
    add_operators_commands(sub)
    add_compliance_commands(sub)
    add_agreements_commands(sub)
    add_sync_commands(sub)
    add_profile_commands(sub)
    add_research_commands(sub)
    add_conformance_commands(sub)
    guard_commands(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. This is the CLI's one error boundary: whatever a command raises
    becomes one line on stderr and an exit status, never a traceback (set
    ``BRIDGE_DEBUG=1`` to see one)."""
    command = "bridge"
    try:
        args = build_parser().parse_args(argv)
        command = f"bridge {args.command}"
        return int(args.func(args))
    except BridgeError as exc:
        return _fail(exc)
    except SystemExit as exc:  # --help and --version print and stop
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        where = f" (at {exc.filename})" if exc.filename else ""
        sys.stderr.write(
            f"error [os-error]: {exc.strerror or type(exc).__name__}{where} in {command}\n"
        )
        return 1
    except Exception as exc:  # the boundary: report, never dump a traceback
        if os.environ.get("BRIDGE_DEBUG"):
            raise
        sys.stderr.write(
            f"error [internal]: {type(exc).__name__} in {command};"
            " set BRIDGE_DEBUG=1 to see where\n"
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
