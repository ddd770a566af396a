"""Command line for the mapping room: ``bridge map`` (and, as they grow, coverage reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from bridge.errors import BridgeError


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _fail(exc: BridgeError) -> int:
    sys.stderr.write(f"error [{exc.code}]: {exc}\n")
    return 2


# --- map ------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> int:
    from bridge.mapping import map_record, read_record

    if args.source != "ws445":
        sys.stderr.write(f"error: --from {args.source} is not supported yet (supported: ws445)\n")
        return 2
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        sys.stderr.write(f"error: cannot read {path}: {exc.strerror}\n")
        return 2
    try:
        record = read_record(data, source=str(path))
        bundle = map_record(record)
    except BridgeError as exc:
        return _fail(exc)
    if not args.check:
        _print_json(bundle)
    return 0


def add_mapping_commands(sub: Any) -> None:
    """Register the mapping commands on the main parser's subcommands."""
    m = sub.add_parser("map", help="map one record to FHIR and print it")
    m.add_argument("--from", dest="source", choices=["ws445", "hl7v2"], required=True)
    m.add_argument("--check", action="store_true", help="validate only, print nothing")
    m.add_argument("file")
    m.set_defaults(func=cmd_map)


__all__ = ["add_mapping_commands"]
