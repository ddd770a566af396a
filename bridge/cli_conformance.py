"""``bridge conformance run|requirements``: the conformance kit from the command line.

``run`` tests a bridge from outside (any implementation of conformance/PROTOCOL.md),
prints a table and writes JUnit and HTML reports; exit 0 only if every required case
passed, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli_common import non_negative_float
from bridge.errors import UsageError


def _file(value: str, option: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise UsageError("file not found", location=f"{option} {value}")
    return path


def _config(args: argparse.Namespace) -> Any:
    from bridge.conformance.kit import KitConfig

    signing_key = _file(args.signing_key, "--signing-key")
    signing_cert = args.signing_cert or str(signing_key.with_suffix(".pem"))
    return KitConfig(
        target=args.target,
        cert=_file(args.cert, "--cert"),
        key=_file(args.key, "--key"),
        ca=_file(args.ca, "--ca"),
        signing_key=signing_key,
        signing_cert=_file(signing_cert, "--signing-cert"),
        partner_id=args.partner_id,
        receiver_id=args.receiver_id,
        receiver_signing_cert=(
            _file(args.receiver_signing_cert, "--receiver-signing-cert")
            if args.receiver_signing_cert else None
        ),
        ca_key=_file(args.ca_key, "--ca-key") if args.ca_key else None,
        content=_file(args.content, "--content") if args.content else None,
        revoked_cert=_file(args.revoked_cert, "--revoked-cert") if args.revoked_cert else None,
        revoked_key=_file(args.revoked_key, "--revoked-key") if args.revoked_key else None,
        profile=args.profile,
        server_name=args.server_name,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        handshake_timeout=args.handshake_timeout,
        max_body=args.max_body,
    )


def cmd_conformance_run(args: argparse.Namespace) -> int:
    from bridge.conformance import kit
    from bridge.conformance.report import write_html, write_junit, write_table

    if not args.target.startswith("https://"):
        raise UsageError("the target is an https URL", location=f"--target {args.target}")
    try:
        cases = kit.select_cases(args.case or ())
    except ValueError as exc:
        raise UsageError(str(exc), location="--case") from None
    try:
        config = _config(args)
    except ValueError as exc:
        raise UsageError(str(exc), location="--cert") from None

    def progress(result: kit.Result) -> None:
        if not args.quiet:
            sys.stderr.write(f"{result.status:<5} {result.case.id}\n")

    try:
        results = kit.run(config, cases, progress=progress)
    except ValueError as exc:
        raise UsageError(str(exc), location="--target") from None
    write_table(results, sys.stdout, target=args.target)
    if args.junit:
        write_junit(results, Path(args.junit), target=args.target)
    if args.html:
        write_html(results, kit.load_requirements(), Path(args.html), target=args.target)
    return 0 if kit.conformant(results) else 1


def cmd_conformance_listen(args: argparse.Namespace) -> int:
    from bridge.conformance import kit
    from bridge.conformance.report import write_html, write_junit, write_table
    from bridge.conformance.sender_role import ReceiverConfig

    signing_key = _file(args.signing_key, "--signing-key")
    config = ReceiverConfig(
        cert=_file(args.cert, "--cert"), key=_file(args.key, "--key"), ca=_file(args.ca, "--ca"),
        signing_key=signing_key,
        signing_cert=_file(args.signing_cert or str(signing_key.with_suffix(".pem")),
                           "--signing-cert"),
        sender_signing_cert=_file(args.sender_signing_cert, "--sender-signing-cert"),
        receiver_id=args.partner_id, host=args.host, port=args.port, stall=args.stall,
        wait=args.wait,
    )

    def ready(port: int) -> None:
        sys.stderr.write(f"listening on https://{args.host}:{port}/fhir: point the sender's "
                         "link here and send two claims\n")
        sys.stderr.flush()

    try:
        results = kit.run_sender(config, kit.select_cases(role="sender"), ready=ready)
    except ValueError as exc:
        raise UsageError(str(exc), location="--cert") from None
    where = f"sender at {args.host}:{args.port}"
    write_table(results, sys.stdout, target=where)
    if args.junit:
        write_junit(results, Path(args.junit), target=where)
    if args.html:
        write_html(results, kit.load_requirements(), Path(args.html), target=where)
    return 0 if kit.conformant(results) else 1


def cmd_conformance_requirements(args: argparse.Namespace) -> int:
    from bridge.conformance import kit
    from bridge.conformance.report import write_requirements

    write_requirements(kit.load_requirements(), kit.all_cases(), sys.stdout)
    return 0


def cmd_conformance_cases(args: argparse.Namespace) -> int:
    from bridge.conformance import kit

    for c in kit.all_cases():
        required = "" if c.required else " (SHOULD)"
        sys.stdout.write(f"{c.id:<30} {c.role:<8} {c.family:<12} {','.join(c.requirements)}"
                         f"{required}\n    {c.title}\n")
    return 0


def add_conformance_commands(sub: Any) -> None:
    c = sub.add_parser(
        "conformance", help="test a bridge from outside against conformance/PROTOCOL.md"
    )
    csub = c.add_subparsers(dest="conformance_command", required=True, metavar="COMMAND")
    r = csub.add_parser("run", help="run the cases against a receiver (the kit sends)")
    r.add_argument("--target", required=True, help="the receiver's base URL, https://host:port/fhir")
    r.add_argument("--cert", required=True, help="the kit's TLS client certificate (PEM)")
    r.add_argument("--key", required=True, help="its private key (PEM)")
    r.add_argument("--ca", required=True, help="CA bundle the target's certificate chains to")
    r.add_argument("--signing-key", required=True, help="the kit's signing key (PEM)")
    r.add_argument("--signing-cert",
                   help="the signing certificate (default: --signing-key with .pem)")
    r.add_argument("--partner-id", help="the partner id the kit sends as (default: from --cert)")
    r.add_argument("--receiver-id", help="the target's partner id (default: from its certificate)")
    r.add_argument("--receiver-signing-cert",
                   help="the target's signing certificate, to verify receipts")
    r.add_argument("--ca-key",
                   help="the CA's key, to mint the certificate matrix (expired, unregistered...)")
    r.add_argument("--revoked-cert", help="a certificate of the kit's partner that the "
                   "target's CRL lists (for the revocation case)")
    r.add_argument("--revoked-key", help="its private key")
    r.add_argument("--profile", default="commercial-insurance", choices=["commercial-insurance"],
                   help="the link profile the sample claim is built for")
    r.add_argument("--content", help="a FHIR collection Bundle to send as claim content")
    r.add_argument("--server-name", help="host name to check the target's certificate against")
    r.add_argument("--header-timeout", type=non_negative_float, default=60.0,
                   help="the target's request-head timeout in seconds (default 60, the maximum)")
    r.add_argument("--body-timeout", type=non_negative_float, default=30.0,
                   help="the target's body timeout in seconds (default 30)")
    r.add_argument("--handshake-timeout", type=non_negative_float, default=10.0,
                   help="the target's handshake timeout in seconds (default 10)")
    r.add_argument("--max-body", type=int, default=4 * 1024 * 1024,
                   help="the largest body the target accepts (default 4 MiB)")
    r.add_argument("--case", action="append",
                   help="run only this case or family (repeatable; PREFIX* selects by id)")
    r.add_argument("--junit", help="write a JUnit XML report here")
    r.add_argument("--html", help="write a self-contained HTML report here")
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    r.set_defaults(func=cmd_conformance_run)
    li = csub.add_parser("listen", help="play the receiver: check what a sender sends and "
                         "how it retries")
    li.add_argument("--cert", required=True, help="the kit's TLS certificate (PEM), naming the "
                    "partner the sender delivers to")
    li.add_argument("--key", required=True, help="its private key (PEM)")
    li.add_argument("--ca", required=True, help="CA bundle the sender's certificate chains to")
    li.add_argument("--signing-key", required=True, help="the kit's signing key, for receipts")
    li.add_argument("--signing-cert", help="its certificate (default: --signing-key with .pem)")
    li.add_argument("--sender-signing-cert", required=True,
                    help="the sender's signing certificate, to verify its claims")
    li.add_argument("--partner-id", help="the kit's partner id (default: from --cert)")
    li.add_argument("--host", default="127.0.0.1", help="address to listen on")
    li.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443)")
    li.add_argument("--stall", type=non_negative_float, default=35.0,
                    help="seconds to hold one answer, past the sender's timeout (default 35)")
    li.add_argument("--wait", type=non_negative_float, default=180.0,
                    help="seconds to wait for the sender (default 180)")
    li.add_argument("--junit", help="write a JUnit XML report here")
    li.add_argument("--html", help="write a self-contained HTML report here")
    li.set_defaults(func=cmd_conformance_listen)
    q = csub.add_parser("requirements", help="list requirements and the cases covering each")
    q.set_defaults(func=cmd_conformance_requirements)
    k = csub.add_parser("cases", help="list the cases")
    k.set_defaults(func=cmd_conformance_cases)
