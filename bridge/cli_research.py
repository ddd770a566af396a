"""``bridge research report|release``: a research release over a configured link, with
the report of k achieved, the generalisation used, and the records suppressed and why
(see :mod:`bridge.link.research`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bridge.cli_common import add_json_option, print_json, read_input


def _records(files: list[str]) -> list[dict[str, Any]]:
    from bridge.mapping import read_records

    out: list[dict[str, Any]] = []
    for name in files:
        out += read_records(read_input(name, what="records file"), source=name)
    return out


def cmd_research(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.research import release

    records = _records(args.files)

    async def run() -> Any:
        controller = Controller(load_config(args.config))
        try:
            return await release(controller, records, args.link, send=args.send)
        finally:
            await controller.close()

    report = asyncio.run(run())
    if args.json:
        print_json({"link": args.link, "sent": args.send, **report.to_dict()})
    else:
        verb = "released on" if args.send else "would be released on (nothing sent)"
        sys.stdout.write(f"research batch {verb} {args.link}\n")
        for line in report.lines():
            sys.stdout.write(line + "\n")
    if report.records_in and not report.records_released:
        # A batch none of which can be released is a problem to look at, not a release.
        sys.stderr.write("nothing in the batch can be released (see the report)\n")
        return 1
    return 0


def add_research_commands(sub: Any) -> None:
    """Register ``bridge research`` on the main parser's subcommands."""
    p = sub.add_parser("research", help="de-identified, k-anonymous releases on a research link")
    rsub = p.add_subparsers(dest="research_command", required=True, metavar="COMMAND")
    for name, send, text in (
        ("report", False, "what a batch would release: k achieved, generalisation, suppressions"),
        ("release", True, "release a batch: queue what is k-anonymous, report the rest"),
    ):
        c = rsub.add_parser(name, help=text)
        c.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
        c.add_argument("--link", required=True, help="id of an outbound research link")
        add_json_option(c)
        c.add_argument("files", nargs="+", help="WS 445 records (a JSON record or a JSON list)")
        c.set_defaults(func=cmd_research, send=send)


__all__ = ["add_research_commands"]
