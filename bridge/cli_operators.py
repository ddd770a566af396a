"""``bridge operators issue|list``, and the operator check of every command.

Commands run on the host act as the host user's operator (``[[operators]] os_users``):
:func:`guard_commands` wraps every command that takes ``--config`` so that it runs only
when that operator's role allows it, records the operator in every audit entry it
makes, and audits reads of personal data (consents, the history of disclosures, the
inbox) before anything is shown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.cli_common import add_json_option, output_folder, print_json, validity_days
from bridge.errors import ConfigError, NotFound, UsageError

#: (command, subcommand) -> the action it needs (bridge.compliance.operators.PERMISSIONS).
#: A subcommand of "*" stands for every subcommand of the command.
COMMAND_ACTIONS: dict[tuple[str, str], str] = {
    ("push", ""): "data.import",
    ("pull", ""): "data.import",
    ("records", "import"): "data.import",
    ("records", "review"): "records.review",
    ("consent", "add"): "consent.write",
    ("consent", "revoke"): "consent.write",
    ("consent", "list"): "consent.read",
    ("consent", "show"): "consent.read",
    ("consent", "explain"): "consent.read",
    ("audit", "disclosures"): "disclosures.read",
    ("audit", "*"): "status.read",
    ("status", ""): "status.read",
    ("outbox", ""): "status.read",
    ("outbox", "list"): "status.read",
    ("outbox", "requeue"): "claim.requeue",
    ("inbox", "*"): "inbox.read",
    ("store", "status"): "status.read",
    ("store", "migrate"): "store.restore",
    ("store", "backup"): "store.backup",
    ("store", "restore"): "store.restore",
    ("store", "purge"): "data.destroy",
    ("agreements", "destroy"): "data.destroy",
    ("agreements", "list"): "status.read",
    ("keys", "*"): "keys.manage",
    ("certs", "*"): "keys.manage",
    ("operators", "issue"): "keys.manage",
    ("operators", "list"): "status.read",
    ("compliance", "*"): "compliance.report",
    ("sync", "status"): "status.read",
    ("sync", "*"): "data.import",
}
#: Commands not listed need the operator role: a command that changes data must be
#: listed here to be open to anyone else.
DEFAULT_ACTION = "data.import"
#: Reads of personal data, audited before anything is shown: (command, sub) -> action.
AUDITED_READS: dict[tuple[str, str], str] = {
    ("consent", "list"): "consent.list",
    ("consent", "show"): "consent.read",
    ("consent", "explain"): "consent.explain",
    ("audit", "disclosures"): "disclosures.read",
}
#: Commands that never need an operator (they read no store, or start the service).
UNGUARDED = frozenset({"init", "demo", "serve", "map", "mappings"})


def action_for(command: str, sub: str) -> str:
    return COMMAND_ACTIONS.get((command, sub)) or COMMAND_ACTIONS.get(
        (command, "*"), DEFAULT_ACTION)


def _read_subject(command: str, sub: str, args: argparse.Namespace, config: Any) -> tuple[
        str, str | None]:
    """The audit subject of a read, and the patient pseudonym when one is named."""
    if (command, sub) == ("audit", "disclosures"):
        from bridge.ledger.audit import patient_pseudonym
        from bridge.link.node import _load_pseudonym_key

        system, sep, value = str(args.patient).partition("|")
        if sep and system and value:
            key = _load_pseudonym_key(config.audit.pseudonym_key_file)
            return "disclosures", patient_pseudonym(key, system, value)
        return "disclosures", None
    for name in ("consent_id", "message_id", "id"):
        named = getattr(args, name, None)
        if isinstance(named, str) and named:
            return f"{command}:{named}"[:200], None
    return f"{command}:{sub or 'all'}", None


def _audit_read(command: str, sub: str, args: argparse.Namespace, config: Any,
                label: str) -> None:
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord

    if config.store.kind == "sqlite" and not config.store.path.exists():
        return  # the command itself reports the missing store
    subject, patient = _read_subject(command, sub, args, config)
    with open_store(config.store) as store:
        store.append_audit(AuditRecord(
            time=datetime.now(UTC), actor=config.controller.id, action=AUDITED_READS[
                (command, sub)], subject=subject, patient=patient, operator=label,
            detail="cli",
        ))


def _guarded(command: str, sub: str, func: Callable[[argparse.Namespace], int]) -> Callable[
        [argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        config_path = getattr(args, "config", None)
        if not config_path:
            return func(args)
        from bridge.compliance.operators import acting_as, host_operator, require
        from bridge.config import load_config

        config = load_config(config_path)
        operator = host_operator(config)
        require(operator, action_for(command, sub))
        if (command, sub) in AUDITED_READS:
            _audit_read(command, sub, args, config, operator.label)
        with acting_as(operator.label):
            return func(args)

    run.__wrapped__ = func  # type: ignore[attr-defined]
    return run


def guard_commands(parser: argparse.ArgumentParser) -> None:
    """Wrap every command of ``parser`` that takes ``--config`` (see the module)."""
    for command, cparser in _choices(parser).items():
        if command in UNGUARDED:
            continue
        subs = _choices(cparser)
        targets = list(subs.items())
        if not subs or cparser.get_default("func") is not None:
            targets.append(("", cparser))  # the command alone does something too
        for sub, sparser in targets:
            func = sparser.get_default("func")
            if func is not None:
                sparser.set_defaults(func=_guarded(command, sub, func))


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# --- bridge operators ---------------------------------------------------------------------


def cmd_operators_issue(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric import ec

    from bridge.config import load_config
    from bridge.trust.identity import fingerprint_sha256
    from bridge.trust.operators import issue_operator_certificate
    from bridge.trust.pki import (
        _write_public,
        _write_secret,
        certificate_pem,
        load_certificate,
        load_private_key,
        private_key_pem,
    )

    config = load_config(args.config)
    op = config.operator(args.name)
    if op is None:
        raise ConfigError("no operator with this name; add it to [[operators]] first",
                          location=f"{config.source}: operators")
    if args.role != op.role:
        raise UsageError(f"operator {op.name} holds the role {op.role}", location="--role")
    ca_path = (config.operations.operator_ca if config.operations and
               config.operations.operator_ca else config.tls.ca)
    ca_key_path = Path(args.ca_key) if args.ca_key else ca_path.with_suffix(".key")
    if not ca_key_path.exists():
        raise NotFound("no CA key to issue with (give --ca-key)", location=str(ca_key_path))
    ca_cert = load_certificate(ca_path)
    ca_key = load_private_key(ca_key_path)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key must be EC P-256", location=str(ca_key_path))
    cert, key = issue_operator_certificate(
        ca_cert, ca_key, controller=config.controller.id, name=op.name, role=op.role,
        now=datetime.now(UTC), days=args.days,
    )
    out = output_folder(args.out, option="--out") if args.out else ca_path.parent / "operators"
    out.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = out / f"{op.name}.pem", out / f"{op.name}.key"
    _write_public(cert_file, certificate_pem(cert))
    _write_secret(key_file, private_key_pem(key))
    fingerprint = fingerprint_sha256(cert.public_bytes(encoding=_der()))
    from bridge.compliance.operators import acting_operator
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord

    with open_store(config.store) as store:
        store.append_audit(AuditRecord(
            time=datetime.now(UTC), actor=config.controller.id, action="operator.issue",
            subject=f"operator:{op.name}", detail=f"role={op.role} days={args.days}",
            digest=f"sha256:{fingerprint}", operator=acting_operator(),
        ))
    if args.json:
        print_json({"operator": op.name, "role": op.role, "certificate": str(cert_file),
                    "key": str(key_file), "fingerprint": fingerprint,
                    "expires": (datetime.now(UTC) + timedelta(days=args.days)).isoformat()})
        return 0
    sys.stdout.write(f"operator certificate for {op.name} ({op.role}) written to {cert_file}\n"
                     f"  key          {key_file} (unencrypted; keep it with the person)\n"
                     f"  fingerprint  {fingerprint}\n")
    return 0


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def cmd_operators_list(args: argparse.Namespace) -> int:
    from bridge.compliance.operators import host_user
    from bridge.config import load_config

    config = load_config(args.config)
    me = host_user()
    rows: list[dict[str, Any]] = [{"name": o.name, "role": o.role, "os_users": list(o.os_users),
             "pinned_certificates": len(o.fingerprints), "you": me in o.os_users}
            for o in config.operators]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        sys.stdout.write("no operators configured: roles are not enforced\n")
    for r in rows:
        users = ", ".join(r["os_users"]) or "-"
        sys.stdout.write(f"{r['name']}\t{r['role']}\thost users {users}"
                         + ("\t(you)" if r["you"] else "") + "\n")
    return 0


def add_operators_commands(sub: Any) -> None:
    """Register ``bridge operators`` on the main parser's subcommands."""
    p = sub.add_parser("operators", help="the people who run this bridge, and their certificates")
    osub = p.add_subparsers(dest="operators_command", required=True, metavar="COMMAND")
    i = osub.add_parser("issue", help="issue an operator certificate for the operations port")
    i.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    i.add_argument("name", help="the operator's name, as listed in [[operators]]")
    i.add_argument("--role", required=True,
                   choices=["viewer", "operator", "consent-admin", "key-admin"],
                   help="the role the certificate is for (must be the operator's role)")
    i.add_argument("--out", help="folder for NAME.pem and NAME.key (default: operators/ beside"
                                 " the CA)")
    i.add_argument("--ca-key", help="the CA's private key (default: the CA file with .key)")
    i.add_argument("--days", type=validity_days, default=365,
                   help="validity in days (default 365)")
    add_json_option(i)
    i.set_defaults(func=cmd_operators_issue)
    ls = osub.add_parser("list", help="configured operators and roles (and which one you are)")
    ls.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    add_json_option(ls)
    ls.set_defaults(func=cmd_operators_list)


__all__ = ["COMMAND_ACTIONS", "action_for", "add_operators_commands", "guard_commands"]
