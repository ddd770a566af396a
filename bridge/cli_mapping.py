"""Command line for the mapping room: ``bridge map`` (and, as they grow, coverage reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_common import MAX_INPUT_BYTES, add_json_option, read_input
from bridge.cli_common import print_json as _print_json
from bridge.errors import BridgeError, UsageError
from bridge.files import read_bounded
from bridge.resources import SHIPPED

# --- map ------------------------------------------------------------------------------


def _reader(args: argparse.Namespace) -> Any:
    """The HL7 v2 reader for ``--config`` (its site and organisation) and ``--site``."""
    from bridge.link.intake import site_reader

    config = None
    if getattr(args, "config", None):
        from bridge.config import load_config

        config = load_config(args.config)
    site = Path(args.site) if getattr(args, "site", None) else None
    return site_reader(config, site=site)


def _convert(source: str, target: str, data: bytes, name: str,
             reader: Any = None) -> dict[str, Any]:
    """Read one input file and map it; raises BridgeError naming the location."""
    from bridge.errors import ParseError
    from bridge.mapping import map_record, read_record, unmap_bundle

    if source == "ws445":
        record = read_record(data, source=name)
    elif source == "hl7v2":
        from bridge.mapping.hl7v2 import default_reader, parse_hl7

        reader = reader or default_reader()
        msg = parse_hl7(data)
        warnings: list[str] = []
        result: dict[str, Any] = (reader.to_record(msg, warnings=warnings) if target == "ws445"
                                  else reader.to_fhir(msg, warnings=warnings))
        for warning in warnings:
            sys.stderr.write(f"warning: {name}: {warning}\n")
        return result
    else:
        try:
            bundle = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ParseError("malformed JSON", location=name) from None
        record = unmap_bundle(bundle)
        if target == "ws445":
            return record
    if target == "ws445":
        return record
    return map_record(record, files=reader.files if reader is not None else SHIPPED)


def _targets(source: str, target: str | None) -> str:
    if target is not None:
        return target
    return "ws445" if source == "fhir" else "fhir"


def cmd_map(args: argparse.Namespace) -> int:
    target = _targets(args.source, args.target)
    if args.source == "fhir" and target == "fhir":
        raise UsageError("--from fhir maps only --to ws445", location="bridge map --to")
    path = Path(args.file)
    reader = _reader(args)
    if path.is_dir():
        return _map_folder(args.source, target, path, check=args.check, reader=reader)
    result = _convert(args.source, target, read_input(path, what="record"), str(path), reader)
    if not args.check:
        _print_json(result)
    return 0


def _map_folder(source: str, target: str, folder: Path, *, check: bool,
                reader: Any = None) -> int:
    """Map every file of a folder; print a summary (and the errors, never values)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    console = Console(stderr=True)
    failures: list[tuple[str, BridgeError]] = []
    ok = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"mapping {source} -> {target}", total=len(files))
        for path in files:
            try:
                result = _convert(source, target, read_bounded(path, MAX_INPUT_BYTES), path.name,
                                  reader)
            except BridgeError as exc:
                failures.append((path.name, exc))
            except OSError as exc:
                failures.append((path.name, BridgeError(f"cannot read: {exc.strerror}")))
            else:
                ok += 1
                if not check:
                    sys.stdout.write(orjson.dumps(result).decode() + "\n")
            progress.advance(task)
    for name, failure in failures:
        console.print(escape(f"{name}: [{failure.code}] {failure}"), highlight=False)
    console.print(f"{len(files)} files: {ok} mapped, {len(failures)} refused", highlight=False)
    return 0 if not failures else 1


# --- mappings coverage ------------------------------------------------------------------


def cmd_mappings_coverage(args: argparse.Namespace) -> int:
    """Per data set: how many elements are mapped, which are not, and why."""
    from bridge.mapping import shipped_mappings

    report: list[dict[str, Any]] = []
    for spec in shipped_mappings().values():
        cov = spec.coverage()
        total = len(cov["mapped"]) + len(cov["unmapped"])
        report.append({"dataset": spec.dataset, "mapping": spec.id, "elements": total,
                       "mapped": len(cov["mapped"]), "one_way": spec.one_way(),
                       "unmapped": [{"id": eid, "name": spec.catalog.elements[eid].name,
                                     "reason": reason} for eid, reason in cov["unmapped"]]})
    if args.json:
        _print_json(report)
        return 0
    for item in report:
        sys.stdout.write(f"{item['dataset']} ({item['mapping']}): {item['mapped']} of "
                         f"{item['elements']} data elements mapped\n")
        if item["one_way"]:
            sys.stdout.write(f"  one-way (FHIR cannot give them back): {', '.join(item['one_way'])}\n")
        for row in item["unmapped"]:
            sys.stdout.write(f"  {row['id']} {row['name']}: {row['reason']}\n")
    return 0


def cmd_mappings_check(args: argparse.Namespace) -> int:
    """Validate a site directory against the shipped files and list what it overrides."""
    from bridge.link.intake import site_reader
    from bridge.resources import MappingFiles

    site = Path(args.site)
    files = MappingFiles(site.resolve())
    reader = site_reader(None, site=site)  # raises ConfigError naming the file and key
    overlays = files.overlays()
    report = {"site": str(site), "valid": True,
              "files": [{"file": o.relative, "action": o.action} for o in overlays],
              "visits": sorted(reader.visits), "message_types": sorted(reader.mappings),
              "facilities": sorted(reader.site.facilities),
              "biometric": [p.text for p in reader.biometric_paths]}
    if args.json:
        _print_json(report)
        return 0
    sys.stdout.write(f"site {site}: valid, {len(overlays)} file(s)\n")
    for o in overlays:
        sys.stdout.write(f"  {o.action:9} {o.relative}\n")
    for path in reader.biometric_paths:
        sys.stdout.write(f"  biometric {path.text}: kept and sent as a keyed digest only\n")
    return 0


def add_mapping_commands(sub: Any) -> None:
    """Register the mapping commands on the main parser's subcommands."""
    m = sub.add_parser("map", help="map a record or message (or a folder of them) and print it")
    m.add_argument("--from", dest="source", choices=["ws445", "hl7v2", "fhir"], required=True,
                   help="what the input is: a WS 445 record (JSON), an HL7 v2 message, or a"
                   " FHIR Bundle")
    m.add_argument("--to", dest="target", choices=["fhir", "ws445"], default=None,
                   help="fhir (default for ws445 and hl7v2) or ws445 (default for fhir)")
    m.add_argument("--check", action="store_true", help="validate only, print nothing")
    m.add_argument("--config", help="a controller configuration: its [intake] site and its "
                   "organisation code (the default when MSH-4 does not carry one)")
    m.add_argument("--site", help="a site directory overlaying the shipped mapping files "
                   "(wins over the configuration's)")
    m.add_argument("file", help="a file, or a folder whose every file is mapped")
    m.set_defaults(func=cmd_map)
    mp = sub.add_parser("mappings", help="inspect the shipped mapping files")
    msub = mp.add_subparsers(dest="mappings_command", required=True)
    cov = msub.add_parser("coverage", help="mapped and unmapped data elements per data set")
    add_json_option(cov)
    cov.set_defaults(func=cmd_mappings_coverage)
    chk = msub.add_parser("check", help="validate a site overlay and print what it overrides")
    chk.add_argument("--site", required=True, help="the site directory")
    add_json_option(chk)
    chk.set_defaults(func=cmd_mappings_check)


__all__ = ["add_mapping_commands"]
