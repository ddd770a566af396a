"""``bridge store backup DIR`` and ``bridge store restore DIR`` (see
:mod:`bridge.ledger.backup`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli_common import add_json_option, folder_argument, print_json


def cmd_store_backup(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger.backup import backup_store

    config = load_config(args.config)
    done = backup_store(config, folder_argument(args.directory, option="DIRECTORY"))
    if args.json:
        print_json({"directory": str(done.directory), "kind": done.kind, "taken": done.taken,
                    "audit_seq": done.audit_seq, "audit_hash": done.audit_hash,
                    "sha256": done.sha256})
        return 0
    sys.stdout.write(f"backup of {config.controller.id} written to {done.directory}"
                     f" (audit chain at entry {done.audit_seq}, sha256 {done.sha256[:16]}…)\n")
    return 0


def cmd_store_restore(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger.backup import restore_store

    config = load_config(args.config)
    done = restore_store(config, Path(args.directory))
    pending = not done.hooks
    if args.json:
        print_json({"taken": done.taken, "audit_entries": done.audit_entries,
                    "reconciliation": done.hooks or "pending"})
        return 0
    sys.stdout.write(f"{config.controller.id} restored from the backup taken {done.taken};"
                     f" audit chain verified, {done.audit_entries} entries\n")
    for line in done.hooks:
        sys.stdout.write(f"  {line}\n")
    if pending:
        sys.stdout.write("  reconciliation with the partners is pending: what was exchanged"
                         " after the backup is theirs to resend\n")
    return 0


def add_backup_commands(ssub: Any) -> None:
    """Add ``backup`` and ``restore`` to ``bridge store``."""
    b = ssub.add_parser("backup", help="a consistent snapshot of the store, taken while serving")
    b.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    b.add_argument("directory", metavar="DIRECTORY", help="an empty folder for the backup")
    add_json_option(b)
    b.set_defaults(func=cmd_store_backup)
    r = ssub.add_parser("restore", help="put a backup in place of the store (refused while a"
                                        " bridge process serves it), then reconcile with the"
                                        " partners")
    r.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    r.add_argument("directory", metavar="DIRECTORY", help="a folder written by store backup")
    add_json_option(r)
    r.set_defaults(func=cmd_store_restore)


__all__ = ["add_backup_commands"]
