"""Command line for record pull.

- ``bridge pull --config C --link L --patient SYSTEM|VALUE [--since …] [--out DIR]``: a
  platform pulls one patient's released records from a hospital (``pull-from`` link);
- ``bridge records import --config C DIR``: a hospital keeps a folder of WS 445 DE
  records (JSON) in the records store its pull links answer from;
- ``bridge records review --config C [--done ID]``: emergency overrides and bulk-query
  alarms waiting for an operator, and marking one reviewed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_common import MAX_INPUT_BYTES, output_folder
from bridge.errors import BridgeError, NotFound, ParseError, UsageError
from bridge.files import read_bounded


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _identifier(raw: str, option: str) -> tuple[str, str]:
    system, sep, value = raw.partition("|")
    if not sep or not system or not value:
        raise ParseError("takes SYSTEM|VALUE", location=option)
    return system, value


def _controller(config_path: str) -> Any:
    from bridge.config import load_config
    from bridge.link.node import Controller

    return Controller(load_config(config_path))


# --- bridge pull -----------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    from bridge.link.pull_client import pull_patient
    from bridge.policy.consent import EmergencyOverride

    identifier = _identifier(args.patient, "--patient")
    emergency = None
    if args.emergency_actor or args.emergency_reason:
        if not (args.emergency_actor and args.emergency_reason):
            raise ParseError("an emergency override needs both an actor and a reason",
                             location="--emergency-actor/--emergency-reason")
        emergency = EmergencyOverride(actor=args.emergency_actor, reason=args.emergency_reason)

    out = output_folder(args.out, option="--out") if args.out else None

    async def run() -> Any:
        controller = _controller(args.config)
        try:
            return await pull_patient(
                controller, args.link, identifier, since=args.since,
                out=out, count=args.count,
                purpose=args.purpose, emergency=emergency,
            )
        finally:
            await controller.close()

    try:
        report = asyncio.run(run())
    except BridgeError as exc:
        if exc.fault != "peer":
            raise
        # What the partner sent (a refusal, a page that fails verification) is a problem
        # the pull found, not bad input to this command.
        sys.stderr.write(f"error [{exc.code}]: {' '.join(str(exc).split())}\n")
        return 1
    if args.json:
        _print_json({
            "link": report.link, "partner": report.partner, "patients": report.patient_ids,
            "pages": report.pages, "page_ids": report.page_ids, "resources": report.counts(),
            "override": report.override, "written": len(report.written),
        })
    else:
        sys.stdout.write(
            f"{report.partner}: {report.pages} signed pages verified, "
            f"{len(report.resources)} resources"
            + (f" ({', '.join(f'{t} {n}' for t, n in report.counts().items())})"
               if report.resources else "")
            + ("; emergency override" if report.override else "") + "\n"
        )
        if not report.patient_ids:
            sys.stdout.write("nothing was released for this patient\n")
        if args.out:
            sys.stdout.write(f"written to {args.out} ({len(report.written)} resources, "
                             f"{report.pages} pages)\n")
    return 0


# --- bridge records ---------------------------------------------------------------------------


def cmd_records_import(args: argparse.Namespace) -> int:
    from bridge.mapping import patient_identifiers, read_record

    folder = Path(args.directory)
    if not folder.is_dir():
        raise NotFound("no such folder", location=str(folder))
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise NotFound("no .json records in this folder", location=str(folder))

    async def run() -> tuple[int, int, list[str]]:
        from bridge.ledger.records import put_records

        controller = _controller(args.config)
        if not any(link.direction == "pull" for link in controller.config.links):
            await controller.close()
            raise BridgeError("this controller has no pull link to answer from the records",
                              location=f"{args.config}: links")
        kept = held = 0
        failed: list[str] = []
        batch: list[tuple[bytes, str, str, dict[str, Any]]] = []

        async def flush() -> None:
            nonlocal kept, held
            if not batch:
                return
            results = await controller.db.call(put_records, controller.store, list(batch),
                                               now=controller.clock())
            kept += sum(1 for r in results if r.created)
            held += sum(1 for r in results if not r.created)
            batch.clear()

        try:
            for path in files:
                name = str(path.relative_to(folder))
                try:
                    try:
                        data = read_bounded(path, MAX_INPUT_BYTES)
                    except OSError as exc:
                        raise UsageError(f"cannot read: {exc.strerror}", location=name) from None
                    record = controller.protect_record(read_record(data, source=name))
                    collection = controller.pull_collection(record)
                    from bridge.ledger.records import patient_keys

                    patient_keys(collection)
                    # The record states these identifiers together: one patient.
                    await controller.link_patient(list(patient_identifiers(collection)))
                except BridgeError as exc:
                    failed.append(f"{name}: [{exc.code}] {exc}")
                    continue
                raw = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
                batch.append((raw, str(record["dataset"]), f"import:{name}", collection))
                if len(batch) >= 100:
                    await flush()
            await flush()
            await controller.db.append_audit(controller.audit(
                "records.import", subject=f"folder:{folder.name}",
                detail=f"kept={kept} held={held} failed={len(failed)}",
            ))
        finally:
            await controller.close()
        return kept, held, failed

    kept, held, failed = asyncio.run(run())
    if args.json:
        _print_json({"kept": kept, "already_held": held, "failed": failed})
    else:
        sys.stdout.write(f"{kept} records kept, {held} already held, {len(failed)} refused\n")
        for line in failed:
            sys.stderr.write(f"refused {line}\n")
    return 2 if failed else 0


def cmd_records_review(args: argparse.Namespace) -> int:
    from bridge.compliance.operators import acting_operator
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.records import mark_reviewed, review_items
    from bridge.link.node import utcnow

    config = load_config(args.config)
    with open_store(config.store) as store:
        if args.done is not None:
            done = mark_reviewed(store, args.done, audit=AuditRecord(
                time=utcnow(), actor=config.controller.id, action="pull.reviewed",
                subject=f"review:{args.done}", operator=acting_operator(),
            ))
            if not done:
                raise NotFound("no pending review item with this id", location="--done")
            sys.stdout.write(f"review item {args.done} marked reviewed\n")
            return 0
        items = review_items(store, pending_only=not args.all)
    if args.json:
        _print_json([item.__dict__ for item in items])
        return 0
    for item in items:
        sys.stdout.write(
            f"{item.id}\t{item.time[:19]}\t{item.kind}\t{item.link}\t{item.partner}"
            f"\t{item.actor or '-'}\t{item.reason or ''}"
            f"\t{'reviewed ' + item.reviewed[:19] if item.reviewed else 'pending'}\n"
        )
    return 0


def pull_status_report(store: Any, config: Any) -> dict[str, Any]:
    """The pull part of ``bridge status`` as data: pull links and pending review items."""
    from bridge.ledger.records import review_items

    links = [
        {
            "id": link.id, "partner": link.partner, "direction": link.direction,
            "profile": link.profile_ref(), "purposes": link.pull_purposes(),
            "override_allowed": link.pull.override_allowed,
        }
        for link in config.links if link.direction in ("pull", "pull-from")
    ]
    reviews = [item.__dict__ for item in review_items(store, pending_only=True)] if links else []
    for item in reviews:
        item.pop("reason", None)  # free text stays in the store; `bridge records review` shows it
    return {"links": links, "reviews": reviews}


def print_pull_status(report: dict[str, Any], out: Any) -> None:
    """Lines of ``bridge status`` for pull links and what waits for review."""
    for link in report["links"]:
        if link["direction"] == "pull":
            out.write(f"  {link['id']} ← pulled by {link['partner']} (profile {link['profile']}, "
                      f"purposes {', '.join(link['purposes'])}"
                      f"{', override allowed' if link['override_allowed'] else ''})\n")
        else:
            out.write(f"  {link['id']} → pulls from {link['partner']}\n")
    for item in report["reviews"]:
        out.write(f"    review {item['id']}: {item['kind']} on {item['link']} by {item['partner']}"
                  f"{' actor ' + item['actor'] if item['actor'] else ''} at {item['time'][:19]}"
                  f" (bridge records review --done {item['id']})\n")


def add_pull_commands(sub: Any) -> None:
    p = sub.add_parser("pull", help="pull one patient's released records from a partner")
    p.add_argument("--config", required=True, help="this controller's configuration file")
    p.add_argument("--link", required=True, help="a link with direction pull-from")
    p.add_argument("--patient", required=True, help="SYSTEM|VALUE of one of the patient's identifiers")
    p.add_argument("--since", help="only what changed at or after this instant (with time zone)")
    p.add_argument("--out", help="write the resources and the signed pages to this folder")
    p.add_argument("--count", type=int, help="page size to ask for (the partner bounds it)")
    p.add_argument("--purpose", help="purpose of use to state (default: the link's first)")
    p.add_argument("--emergency-actor", help="emergency override: who invokes it (with a reason)")
    p.add_argument("--emergency-reason", help="emergency override: why")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_pull)

    r = sub.add_parser("records", help="the records store that pull links answer from")
    rsub = r.add_subparsers(dest="records_command", required=True)
    ri = rsub.add_parser("import", help="keep a folder of WS 445 DE records (JSON) for pull")
    ri.add_argument("--config", required=True, help="this controller's configuration file")
    ri.add_argument("--json", action="store_true", help="machine-readable summary")
    ri.add_argument("directory", help="folder of DE records (*.json, searched recursively)")
    ri.set_defaults(func=cmd_records_import)
    rr = rsub.add_parser("review", help="emergency overrides and bulk-query alarms to review")
    rr.add_argument("--config", required=True, help="this controller's configuration file")
    rr.add_argument("--done", type=int, help="mark this review item reviewed")
    rr.add_argument("--all", action="store_true", help="list reviewed items too")
    rr.add_argument("--json", action="store_true", help="machine-readable output")
    rr.set_defaults(func=cmd_records_review)
