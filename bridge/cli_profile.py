"""``bridge profile show|list``: a link profile as a reviewer reads it — every allowed
element path, the entries it selects (identifiers by system, telecom by kind), its
transform, and the row of the source table that justifies it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli_common import add_json_option, print_json


def cmd_profile_show(args: argparse.Namespace) -> int:
    from bridge.policy.profile import load_link_profile, load_profile

    name: str = args.name
    profile = (
        load_profile(Path(name)) if name.endswith((".yaml", ".yml")) else load_link_profile(name)
    )
    rows = profile.table()
    if args.json:
        print_json({
            "profile": profile.qualified_name,
            "title": profile.title,
            "source": profile.source,
            "cites": profile.cites,
            "focus": list(profile.focus),
            "grades": sorted(profile.grades),
            "elements": [
                {"path": p, "selects": s or None, "transform": t or None, "row": r or None}
                for p, s, t, r in rows
            ],
        })
        return 0
    out = sys.stdout
    out.write(f"{profile.qualified_name}: {profile.title}\n")
    if profile.source:
        out.write(f"source: {profile.source}\n")
    if profile.focus:
        out.write(f"sent only when reachable from: {', '.join(profile.focus)}\n")
    out.write(f"grades: {', '.join(map(str, sorted(profile.grades)))}\n\n")
    head = ("element", "selects", "transform", f"row of {profile.cites}" if profile.cites else "row")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:3])]
    out.write("  ".join(h.ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3] + "\n")
    for r in rows:
        cells: list[Any] = [c.ljust(w) for c, w in zip(r[:3], widths)]
        out.write("  ".join(cells) + "  " + (r[3] or "-") + "\n")
    return 0


def cmd_profile_list(args: argparse.Namespace) -> int:
    from bridge.resources import installed_link_profiles

    names = installed_link_profiles()
    if args.json:
        print_json(names)
        return 0
    for n in names:
        sys.stdout.write(n + "\n")
    return 0


def add_profile_commands(sub: Any) -> None:
    """Register ``bridge profile`` on the main parser's subcommands."""
    p = sub.add_parser("profile", help="link profiles: what each kind of link may carry, and why")
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")
    ls = psub.add_parser("list", help="the installed link profiles")
    add_json_option(ls)
    ls.set_defaults(func=cmd_profile_list)
    sh = psub.add_parser(
        "show", help="every allowed element path, its selection and transform, and the table row it cites"
    )
    sh.add_argument("name", help="an installed profile (commercial-insurance, name:level) or a YAML file")
    add_json_option(sh)
    sh.set_defaults(func=cmd_profile_show)


__all__ = ["add_profile_commands"]
