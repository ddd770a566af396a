"""``bridge store status|migrate``: which schema steps a store has, and bringing it up to date.

Opening a store applies the steps it lacks (``bridge serve`` does so at start); these
commands let an operator see and do it before starting, for example after an upgrade.
``status`` only reads (the store is not changed, and no data key is needed), so it shows
what an upgrade would apply while older processes still run; ``migrate`` applies it.
A store written by a newer bridge is refused, naming the step this version does not know.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bridge.cli_common import add_json_option, print_json
from bridge.errors import NotFound, StoreError


def _report(args: argparse.Namespace, *, migrate: bool) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store, recorded_migrations
    from bridge.ledger.migrations import MIGRATIONS

    config = load_config(args.config)
    if not migrate and config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    known = [m.name for m in MIGRATIONS]
    if migrate:
        with open_store(config.store) as store:
            applied = store.applied_migrations()
    else:
        applied = recorded_migrations(config.store)
        newer = sorted(set(applied) - set(known))
        if newer:
            raise StoreError(f"store was upgraded by a newer bridge (migration {newer[-1]});"
                             " run that version or restore a backup",
                             location=_where(config.store))
    where = _where(config.store)
    if args.json:
        print_json({"store": where, "kind": config.store.kind, "applied": applied,
                    "known": known, "up_to_date": applied == known})
        return 0
    sys.stdout.write(f"{where}: {len(applied)} of {len(known)} schema steps applied"
                     + (" (up to date)\n" if applied == known else "\n"))
    for name in known:
        sys.stdout.write(f"  {'applied' if name in applied else 'pending'}  {name}\n")
    return 0


def _where(store: Any) -> str:
    return str(store.path) if store.kind == "sqlite" else f"postgresql schema {store.db_schema}"


def cmd_store_status(args: argparse.Namespace) -> int:
    return _report(args, migrate=False)


def cmd_store_migrate(args: argparse.Namespace) -> int:
    return _report(args, migrate=True)


def add_store_commands(sub: Any) -> None:
    """Register ``bridge store`` on the main parser's subcommands."""
    p = sub.add_parser("store", help="the store's schema steps (migrations)")
    ssub = p.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    for name, func, text in (
        ("status", cmd_store_status, "list the schema steps applied and pending"),
        ("migrate", cmd_store_migrate, "apply pending schema steps (creates the store if new)"),
    ):
        c = ssub.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
        add_json_option(c)
        c.set_defaults(func=func)
    from bridge.cli_backup import add_backup_commands

    add_backup_commands(ssub)


__all__ = ["add_store_commands"]
