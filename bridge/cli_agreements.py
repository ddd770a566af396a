"""``bridge agreements list|destroy``: the data-use agreements links carry, and
destruction of received data whose retention has ended (see
:mod:`bridge.link.destruction`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from bridge.cli_common import add_json_option, print_json


def cmd_agreements_list(args: argparse.Namespace) -> int:
    from bridge.config import load_config

    config = load_config(args.config)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for a in config.agreements:
        links = [link.id for link in config.links if link.agreement == a.id]
        state = ("in force" if a.starts() <= now < a.ends()
                 else "ended" if now >= a.ends() else "not yet in force")
        rows.append({"id": a.id, "reference": a.reference, "parties": a.parties,
                     "purposes": a.purposes, "permitted_data": a.permitted_data,
                     "duties": a.duties, "valid_from": str(a.valid_from),
                     "valid_to": str(a.valid_to), "retention_days": a.retention_days,
                     "state": state, "links": links})
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        sys.stdout.write(f"{r['id']}\t{r['state']}\t{r['valid_from']} .. {r['valid_to']}"
                         f"\tretention {r['retention_days']} d\tlinks {', '.join(r['links']) or '-'}\n")
    unbound = [link.id for link in config.links if link.agreement is None]
    if unbound:
        sys.stdout.write(f"links without an agreement: {', '.join(unbound)}\n")
    return 0


def cmd_agreements_destroy(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.link.destruction import destroy_expired

    config = load_config(args.config)
    with open_store(config.store) as store:
        done = destroy_expired(store, config, now=datetime.now(UTC), dry_run=args.dry_run)
    if args.json:
        print_json([{"link": d.link, "agreement": d.agreement, "table": d.table,
                     "received_before": d.cutoff.isoformat(), "destroyed": d.items,
                     "dry_run": args.dry_run, "audit_seq": d.audit_seq} for d in done])
        return 0
    if not done:
        sys.stdout.write("no receiving link carries an agreement: nothing to destroy\n")
    verb = "would destroy" if args.dry_run else "destroyed"
    for d in done:
        sys.stdout.write(f"{d.link} ({d.agreement}): {verb} {d.items} payloads received before"
                         f" {d.cutoff.isoformat(timespec='seconds')}\n")
    return 0


def add_agreements_commands(sub: Any) -> None:
    """Register ``bridge agreements`` on the main parser's subcommands."""
    p = sub.add_parser("agreements", help="data-use agreements, and destruction after use")
    asub = p.add_subparsers(dest="agreements_command", required=True, metavar="COMMAND")
    ls = asub.add_parser("list", help="agreements, whether each is in force, and their links")
    ls.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    add_json_option(ls)
    ls.set_defaults(func=cmd_agreements_list)
    d = asub.add_parser("destroy", help="destroy received data whose agreement's retention has"
                                        " passed (digests, receipts and audit stay)")
    d.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    d.add_argument("--dry-run", action="store_true", help="count, destroy nothing")
    add_json_option(d)
    d.set_defaults(func=cmd_agreements_destroy)


__all__ = ["add_agreements_commands"]
