"""``bridge compliance report``: GB/T 39725 Appendix F, item by item (see
:mod:`bridge.compliance.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli_common import add_json_option, output_file, print_json
from bridge.files import write_private


def cmd_compliance_report(args: argparse.Namespace) -> int:
    from bridge.compliance.report import (
        build_report,
        default_evidence_path,
        load_evidence,
        render_html,
        render_text,
    )
    from bridge.config import load_config

    html = output_file(args.html, option="--html") if args.html else None
    config = load_config(args.config)
    path = Path(args.evidence) if args.evidence else default_evidence_path()
    audit, unread = _audit_log_facts(config)
    report = build_report(config, load_evidence(path), audit=audit, audit_unread=unread)
    if html is not None:
        # The page names the controller's partners, links and operators: owner only.
        write_private(html, render_html(report).encode("utf-8"))
    if args.json:
        print_json(report)
    elif not args.html:
        sys.stdout.write(render_text(report))
    else:
        sys.stdout.write(f"report written to {args.html}\n")
    return 0


def _audit_log_facts(config: Any) -> tuple[Any, str]:
    """``(facts, "")`` from the configured store, or ``(None, why not)``: a store not made
    yet is not created by a report."""
    from bridge.compliance.catalog import NO_STORE_YET
    from bridge.compliance.report import audit_log_facts
    from bridge.errors import BridgeError
    from bridge.ledger import open_store

    if config.store.kind == "sqlite" and not config.store.path.exists():
        return None, NO_STORE_YET
    try:
        with open_store(config.store) as store:
            return audit_log_facts(store), ""
    except BridgeError as exc:
        return None, f"the store could not be read ({exc.code})"


def add_compliance_commands(sub: Any) -> None:
    """Register ``bridge compliance`` on the main parser's subcommands."""
    p = sub.add_parser("compliance", help="GB/T 39725 Appendix F: status, features and tests")
    csub = p.add_subparsers(dest="compliance_command", required=True, metavar="COMMAND")
    r = csub.add_parser("report", help="every Appendix F item for this configuration")
    r.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    r.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    r.add_argument("--evidence", metavar="FILE",
                   help="the test run's control evidence (default .compliance/evidence.json)")
    add_json_option(r)
    r.set_defaults(func=cmd_compliance_report)


__all__ = ["add_compliance_commands"]
