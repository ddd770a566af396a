"""Command line for sync tracking: ``bridge sync status|reconcile``.

``status`` shows, per outbound link, the last sequence number enqueued, sent and
acknowledged, and what the partner confirmed in its last signed summary; per sender
of an inbound link, what arrived and the gaps in its sequence. It exits 1 when a number
is missing or held twice, when receipts name audit entries the partner no longer holds,
or when this side's numbering and the partner's disagree: numbers given to new claims
after the partner was known to hold them, or numbers the partner holds under more than
one message identity (PROTOCOL P-SYNC-7, P-SYNC-8). ``reconcile`` asks the
partner which acknowledged claims it holds and resends the ones it lacks. A restore of
the store (``bridge store restore``) runs it for every outbound link.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from bridge.cli_common import add_json_option
from bridge.cli_common import print_json as _print_json
from bridge.errors import BridgeError, ConfigError, NotFound

_CONFIG_HELP = "the controller's configuration file (TOML)"


def _load(args: argparse.Namespace) -> Any:
    from bridge.config import load_config

    config = load_config(args.config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    return config


def sync_report(config: Any, store: Any) -> dict[str, Any]:
    from bridge.ledger.sync import (
        inbound_streams,
        outbound_progress,
        outbound_summary,
        ranges,
        reused_numbers,
    )

    out: dict[str, Any] = {"outbound": [], "inbound": []}
    for link in config.links:
        if link.direction == "outbound":
            summary = outbound_summary(store, link.id)
            out["outbound"].append(
                {
                    "link": link.id,
                    "partner": link.partner,
                    **outbound_progress(store, link.id),
                    "partner_summary": summary.to_json() if summary is not None else None,
                    # Numbers given again, and numbers the partner holds twice.
                    "reused": ranges(reused_numbers(store, summary)) if summary else [],
                    "collisions": ranges(summary.collisions) if summary else [],
                }
            )
        elif link.direction == "inbound":
            out["inbound"].extend(
                {"link": link.id, **s.to_json()} for s in inbound_streams(store, link.partner)
            )
    return out


def cmd_sync_status(args: argparse.Namespace) -> int:
    from bridge.ledger import open_store
    from bridge.ledger.sync import spans

    config = _load(args)
    with open_store(config.store) as store:
        report = sync_report(config, store)
    attention = (
        any(s["missing"] or s["collisions"] for s in report["inbound"])
        or any(
            (o["partner_summary"] or {}).get("receipts_naming_absent_audit_entries")
            for o in report["outbound"]
        )
        or any(o["reused"] or o["collisions"] for o in report["outbound"])
    )
    if args.json:
        _print_json(report)
        return 1 if attention else 0
    for o in report["outbound"]:
        line = (
            f"{o['link']} → {o['partner']}: enqueued up to seq {o['enqueued']}, sent up to"
            f" {o['sent']}, acknowledged up to {o['acked']} (without a gap up to"
            f" {o['acked_contiguous']})"
        )
        s = o["partner_summary"]
        if s is None:
            line += "; never reconciled (bridge sync reconcile --link " + o["link"] + ")"
        else:
            line += (
                f"; partner confirmed up to seq {s['confirmed_seq']} at {s['checked']}"
                f" (compared {s['compared']}, missing {s['missing']}, resent {s['resent']},"
                f" receipts naming absent audit entries"
                f" {s['receipts_naming_absent_audit_entries']})"
            )
            if s["partner_highest"] > o["enqueued"]:
                line += (
                    f"; the partner holds up to seq {s['partner_highest']}: new claims are"
                    f" numbered after it"
                )
        if o["reused"]:
            line += (
                f"; NUMBERED AGAIN seq {spans(o['reused'])}: given to new claims after the"
                " partner confirmed holding these numbers"
            )
        if o["collisions"]:
            line += (
                f"; the partner holds seq {spans(o['collisions'])} under more than one"
                " message identity"
            )
        sys.stdout.write(line + "\n")
    for i in report["inbound"]:
        gaps = spans(i["gaps"][:20])
        more = f" and {len(i['gaps']) - 20} more" if len(i["gaps"]) > 20 else ""
        sys.stdout.write(
            f"{i['link']} ← {i['sender']} stream {i['stream']}: received {i['received']},"
            f" up to seq {i['highest']}, without a gap up to {i['contiguous']}"
            + (f"; MISSING {i['missing']} (seq {gaps}{more})" if i["missing"] else "")
            + (
                f"; COLLISION seq {', '.join(str(n) for n in i['collisions'][:20])}"
                + (f" and {len(i['collisions']) - 20} more" if len(i["collisions"]) > 20 else "")
                + " received under two message identities or more"
                if i["collisions"]
                else ""
            )
            + "\n"
        )
    if not report["outbound"] and not report["inbound"]:
        sys.stdout.write("no claim links\n")
    return 1 if attention else 0


async def reconcile_link(config: Any, link_id: str, *, full: bool = False) -> dict[str, Any]:
    """Reconcile one outbound link from this process (no running bridge needed)."""
    from bridge.link.dispatcher import Dispatcher
    from bridge.link.node import Controller
    from bridge.link.sync import reconcile

    link = next((lk for lk in config.links if lk.id == link_id), None)
    if link is None or link.direction != "outbound":
        raise ConfigError(
            "no outbound link with this id in the configuration", location=f"--link {link_id}"
        )
    controller = Controller(config)
    try:
        dispatcher = Dispatcher(controller, link)
        await dispatcher.open()
        try:
            report = await reconcile(dispatcher, full=full)
        finally:
            await dispatcher.stop()
    finally:
        await controller.close()
    return report.to_json()


def cmd_sync_reconcile(args: argparse.Namespace) -> int:
    config = _load(args)
    report = asyncio.run(reconcile_link(config, args.link, full=args.full))
    if args.json:
        _print_json(report)
    else:
        sys.stdout.write(
            f"{report['link']}: compared {report['compared']} acknowledged claims; the partner"
            f" lacked {report['missing']}, resent {report['resent']}"
            + (f", {report['failed']} resends failed" if report["failed"] else "")
            + f"; receipts naming audit entries it no longer holds:"
            f" {report['receipts_naming_absent_audit_entries']}; partner holds without a gap"
            f" up to seq {report['confirmed_seq']}\n"
        )
    return 1 if report["failed"] else 0


def reconcile_after_restore(config: Any) -> str:
    """``bridge store restore`` hook: reconcile every outbound link, one line of summary.

    Claims acknowledged after the backup are no longer acknowledged in the restored
    outbox, so they are simply sent again (and deduplicated by the partner); this also
    checks the receipts the restored store holds against what the partner holds.
    """
    from bridge.compliance.operators import acting_operator
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.compliance import mark_reconciled, pending_restores

    links = [lk.id for lk in config.links if lk.direction == "outbound"]
    parts, ok = [], True
    for link in links:
        try:
            r = asyncio.run(reconcile_link(config, link, full=True))
            parts.append(
                f"{link}: compared {r['compared']}, resent {r['resent']},"
                f" receipts naming absent audit entries"
                f" {r['receipts_naming_absent_audit_entries']}, the partner holds up to seq"
                f" {r['partner_highest']} (new claims are numbered after it)"
            )
            ok = ok and not r["failed"]
        except BridgeError as exc:
            ok = False
            parts.append(
                f"{link}: not reconciled ({exc.code}); run bridge sync reconcile"
                f" --link {link} when the partner is reachable"
            )
    # A receiver's losses are resent by its partners' own reconciliation; the restore
    # stays pending here until this side has reconciled links of its own.
    if ok and links:
        now = datetime.now(UTC)
        with open_store(config.store) as store:
            for restore_id, _restored, taken in pending_restores(store):
                mark_reconciled(
                    store,
                    restore_id,
                    now=now,
                    audit=AuditRecord(
                        time=now,
                        actor=config.controller.id,
                        action="sync.reconciled",
                        subject=f"backup:{taken}",
                        operator=acting_operator(),
                        detail=f"after restore; links {', '.join(links) or 'none'}",
                    ),
                )
    if not parts:
        return (
            "reconciliation: no outbound links here; each partner's periodic"
            " reconciliation (bridge sync reconcile) resends what it sent after the backup"
        )
    return "reconciliation: " + "; ".join(parts)


def add_sync_commands(sub: Any) -> None:
    sync = sub.add_parser("sync", help="sync tracking with the partners: status, reconcile")
    ss = sync.add_subparsers(dest="sync_command", required=True, metavar="{status,reconcile}")
    st = ss.add_parser("status", help="per link: sequences sent, acknowledged, confirmed; gaps")
    st.add_argument("--config", required=True, help=_CONFIG_HELP)
    add_json_option(st)
    st.set_defaults(func=cmd_sync_status)
    rc = ss.add_parser("reconcile", help="ask the partner what it holds; resend what it lacks")
    rc.add_argument("--config", required=True, help=_CONFIG_HELP)
    rc.add_argument("--link", required=True, help="the outbound link")
    rc.add_argument(
        "--full",
        action="store_true",
        help="compare every acknowledged claim, not only those past the partner's own summary",
    )
    add_json_option(rc)
    rc.set_defaults(func=cmd_sync_reconcile)


def _register() -> None:
    from bridge.ledger.backup import AFTER_RESTORE

    if reconcile_after_restore not in AFTER_RESTORE:
        AFTER_RESTORE.append(reconcile_after_restore)


_register()

__all__ = ["add_sync_commands", "reconcile_after_restore", "reconcile_link", "sync_report"]
