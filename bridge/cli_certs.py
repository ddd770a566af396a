"""``bridge certs issue|revoke|crl|rotate|inspect``: certificate lifecycle for operators
(``bridge certs init`` makes the CA; see :mod:`bridge.trust.lifecycle`)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.cli_common import add_json_option, dns_name, ip_address, validity_days
from bridge.cli_common import print_json as _print_json


def _now() -> datetime:
    return datetime.now(UTC)


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from bridge.trust.lifecycle import issue

    what = ("tls",) if args.tls_only else ("signing",) if args.signing_only else ("tls", "signing")
    issued = issue(Path(args.directory), args.controller, now=_now(), what=what,
                   days=args.days, dns_names=args.dns or ["localhost"],
                   ip_addresses=args.ip or ["127.0.0.1"], force=args.force)
    for item in issued:
        sys.stdout.write(f"{item.what:<8} {item.cert} (key {item.key.name}), serial "
                         f"{item.certificate.serial_number:x}, valid until "
                         f"{item.certificate.not_valid_after_utc:%Y-%m-%d}\n")
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    from bridge.trust.lifecycle import revoke

    crl = revoke(Path(args.directory), Path(args.certificate), now=_now(),
                 crl_days=args.crl_days)
    sys.stdout.write(f"revoked; CRL written to {crl}. Bridges whose [tls] crl names it "
                     "reload it on SIGHUP.\n")
    return 0


def cmd_certs_crl(args: argparse.Namespace) -> int:
    from bridge.trust.lifecycle import write_crl

    crl = write_crl(Path(args.directory), now=_now(), days=args.crl_days)
    sys.stdout.write(f"CRL renewed: {crl}\n")
    return 0


def cmd_certs_rotate(args: argparse.Namespace) -> int:
    from bridge.trust.lifecycle import rotate

    done = rotate(Path(args.directory), args.controller, args.what, now=_now(), days=args.days,
                  dns_names=args.dns or ["localhost"], ip_addresses=args.ip or ["127.0.0.1"])
    sys.stdout.write(
        f"new {done.what} certificate {done.new.cert}, serial "
        f"{done.new.certificate.serial_number:x}\n"
        f"previous kept as {done.previous_cert} (valid until "
        f"{done.previous_valid_until:%Y-%m-%d})\n"
    )
    if done.what == "signing":
        sys.stdout.write(
            "Overlap: partners add the new certificate to this controller's signing_certs "
            "beside the previous one (both verify), then remove the previous one.\n"
        )
    sys.stdout.write("Send SIGHUP to a running bridge serve to load the new files.\n")
    return 0


def cmd_certs_inspect(args: argparse.Namespace) -> int:
    from bridge.trust.lifecycle import inspect

    found = inspect(Path(args.file), now=_now())
    if args.json:
        _print_json(found)
        return 0
    for item in found:
        for key, value in item.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            sys.stdout.write(f"{key:<13} {shown}\n")
        sys.stdout.write("\n")
    return 1 if any(i.get("expired") or i.get("out_of_date") for i in found) else 0


def add_certs_lifecycle_commands(csub: Any) -> None:
    """Add the lifecycle commands to the ``bridge certs`` parser's subcommands."""

    def san(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dns", action="append", type=dns_name, help="DNS name in the TLS certificate "
                       "(repeatable; default localhost)")
        p.add_argument("--ip", action="append", type=ip_address, help="IP address in the TLS certificate "
                       "(repeatable; default 127.0.0.1)")
        p.add_argument("--days", type=validity_days, default=825,
                       help="validity in days (default 825)")

    i = csub.add_parser("issue", help="issue TLS and signing certificates for a controller "
                        "(this one or a partner), with subject alternative names")
    i.add_argument("directory", metavar="DIRECTORY", help="the PKI folder holding the CA")
    i.add_argument("controller", metavar="ID", help="the controller's partner id")
    san(i)
    g = i.add_mutually_exclusive_group()
    g.add_argument("--tls-only", action="store_true", help="only the TLS certificate")
    g.add_argument("--signing-only", action="store_true", help="only the signing certificate")
    i.add_argument("--force", action="store_true", help="replace existing files")
    i.set_defaults(func=cmd_certs_issue)

    r = csub.add_parser("revoke", help="revoke a certificate and re-sign the CRL")
    r.add_argument("directory", metavar="DIRECTORY", help="the PKI folder holding the CA")
    r.add_argument("certificate", metavar="CERT", help="the certificate to revoke (PEM)")
    r.add_argument("--crl-days", type=validity_days, default=7,
                   help="days until the CRL's nextUpdate (default 7)")
    r.set_defaults(func=cmd_certs_revoke)

    c = csub.add_parser("crl", help="re-sign the CRL (before its nextUpdate passes)")
    c.add_argument("directory", metavar="DIRECTORY", help="the PKI folder holding the CA")
    c.add_argument("--crl-days", type=validity_days, default=7,
                   help="days until the CRL's nextUpdate (default 7)")
    c.set_defaults(func=cmd_certs_crl)

    o = csub.add_parser("rotate", help="replace a TLS or signing certificate and key, "
                        "keeping the previous ones beside them")
    o.add_argument("directory", metavar="DIRECTORY", help="the PKI folder holding the CA")
    o.add_argument("controller", metavar="ID", help="the controller's partner id")
    o.add_argument("what", choices=["tls", "signing"], help="which certificate")
    san(o)
    o.set_defaults(func=cmd_certs_rotate)

    n = csub.add_parser("inspect", help="what a certificate or CRL file holds, and when it "
                        "expires (exit 1 when expired or out of date)")
    n.add_argument("file", metavar="FILE", help="a PEM certificate, bundle or CRL")
    add_json_option(n)
    n.set_defaults(func=cmd_certs_inspect)
