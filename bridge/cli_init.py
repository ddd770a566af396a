"""``bridge init hospital|insurer|platform DIR``: a working controller to start from.

One folder can hold several controllers, as on a developer's machine: they share the
development PKI in ``DIR/pki`` (made on the first ``init``, reused after) and each has
its own configuration (``DIR/hospital.toml``, ``DIR/insurer.toml``,
``DIR/platform.toml``), store and audit key (``DIR/<controller id>/``) and samples
(``DIR/<controller id>/samples/``). A controller initialised after its partner reads
the partner's port from the partner's configuration, and gives the partner's
configuration its own address, so the two find each other both ways: each fetches and
cosigns the other's audit checkpoints (the witness), whichever was initialised first.

Samples, all invented people:

* hospital: ``consent.json``, the patient's consent for insurer-b to receive their
  inpatient claims for payment (``HPAYMT``); ``claim-1.json``, that patient's WS 445.10
  front sheet; ``claim-2.json``, another patient's, with no consent, which the bridge
  refuses;
* insurer: ``consent.json``, an authorisation the insurer collected and may submit to
  the hospital's Consent API (its id in the insurer's own namespace); ``claim-1.fhir.json``,
  the FHIR R4 resources the hospital's claim-1 maps to, before minimisation;
* platform: ``consent.json``, a consent for the regional platform to receive the
  patient's records for treatment (``TREAT``); ``outpatient-1.json``, an outpatient record.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_common import folder_argument
from bridge.errors import ConfigError, UsageError


@dataclass(frozen=True)
class Role:
    name: str  # hospital, insurer, platform
    controller: str
    title: str
    port: int
    ops_port: int


ROLES: dict[str, Role] = {
    "hospital": Role("hospital", "hospital-a", "示范市第一人民医院", 8443, 9464),
    "insurer": Role("insurer", "insurer-b", "示范商业保险股份有限公司", 8444, 9465),
    "platform": Role("platform", "platform-c", "示范市区域全民健康信息平台", 8445, 9466),
}

CLAIMS_LINK = {"insurer": "claims-to-insurer-b", "platform": "records-to-platform-c"}
SAMPLE_SEED = 2024
ID_CARD = "urn:oid:2.16.156.10011.1.3"
ALL_CLASSES = (
    "sexual-reproductive",
    "infectious",
    "mental",
    "malignant",
    "genetic",
    "anal",
    "rare",
    "incurable",
)


def _partner_port(root: Path, role: Role) -> int:
    """The partner's server port: from its configuration in ``root`` if already there."""
    config = root / f"{role.name}.toml"
    if config.is_file():
        try:
            port = tomllib.loads(config.read_text(encoding="utf-8"))["server"]["port"]
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
            raise ConfigError(
                "cannot read the partner's server port", location=f"{config}: server.port"
            ) from None
        if isinstance(port, int):
            return port
    return role.port


def _common(role: Role, port: int, ops_port: int) -> str:
    c = role.controller
    return f"""\
[controller]
id = "{c}"
name = "{role.title}"

[server]
host = "127.0.0.1"
port = {port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{c}/tls.pem"
key = "pki/{c}/tls.key"

[signing]
cert = "pki/{c}/sign.pem"
key = "pki/{c}/sign.key"

[store]
path = "{c}/bridge.sqlite"

[audit]
pseudonym_key_file = "{c}/audit-pseudonym.key"

[operations]                      # /healthz /readyz /metrics and the status page
host = "127.0.0.1"
port = {ops_port}
"""


def _hospital_config(root: Path, port: int, ops_port: int, partners: list[str]) -> str:
    text = "# Hospital A: pushes claims and records to its partners.\n" + _common(
        ROLES["hospital"], port, ops_port
    )
    for name in partners:
        partner = ROLES[name]
        text += f"""
[[partners]]
id = "{partner.controller}"
name = "{partner.title}"
base_url = "https://127.0.0.1:{_partner_port(root, partner)}/fhir"
signing_certs = ["pki/{partner.controller}/sign.pem"]
"""
    for name in partners:
        partner = ROLES[name]
        profile, purpose = (
            ("commercial-insurance", "HPAYMT")
            if name == "insurer"
            else ("regional-interoperability:authorise", "TREAT")
        )
        text += f"""
[[links]]
id = "{CLAIMS_LINK[name]}"
partner = "{partner.controller}"
direction = "outbound"
profile = "{profile}"
purpose = "{purpose}"
"""
    return text


def _receiver_config(root: Path, role: Role, port: int, ops_port: int) -> str:
    hospital = ROLES["hospital"]
    profile, purpose, link = (
        ("commercial-insurance", "HPAYMT", "claims-from-hospital-a")
        if role.name == "insurer"
        else ("regional-interoperability:authorise", "TREAT", "records-from-hospital-a")
    )
    return (
        f"# {role.controller}: receives from Hospital A.\n"
        + _common(role, port, ops_port)
        + f"""
[[partners]]
id = "{hospital.controller}"
name = "{hospital.title}"
base_url = "https://127.0.0.1:{_partner_port(root, hospital)}/fhir"  # to witness its audit log
signing_certs = ["pki/{hospital.controller}/sign.pem"]

[[links]]
id = "{link}"
partner = "{hospital.controller}"
direction = "inbound"
profile = "{profile}"
purpose = "{purpose}"
"""
    )


#: The address ``bridge init`` writes for a partner on this machine.
_LOCAL_BASE_URL = re.compile(r'^base_url = "https://127\.0\.0\.1:[0-9]+/fhir"(.*)$', re.MULTILINE)


def _point_partner_here(config: Path, controller: str, port: int) -> bool:
    """In a partner's configuration made by ``bridge init``, set the ``base_url`` of its
    ``[[partners]]`` entry for ``controller`` to this machine's ``port``. An address the
    operator wrote (not on 127.0.0.1) is left alone. True when the entry now reaches
    ``port``."""
    text = config.read_text(encoding="utf-8")
    # Tables start at a line opening with "["; find the partner entry naming controller.
    starts = [m.start() for m in re.finditer(r"^\[", text, re.MULTILINE)] + [len(text)]
    url = f'base_url = "https://127.0.0.1:{port}/fhir"'
    for begin, end in itertools.pairwise(starts):
        block = text[begin:end]
        if not block.startswith("[[partners]]") or not re.search(
                rf'^id = "{re.escape(controller)}"\s*$', block, re.MULTILINE):
            continue
        if _LOCAL_BASE_URL.search(block):
            new = _LOCAL_BASE_URL.sub(lambda m: url + m.group(1), block, count=1)
        elif re.search(r"^base_url\s*=", block, re.MULTILINE):
            return False
        else:
            # After the id (and a name following it); the id may be the file's last line.
            new = re.sub(r"^(id = [^\n]*(?:\n|\Z)(?:name = [^\n]*(?:\n|\Z))?)",
                         lambda m: m.group(1) + ("" if m.group(1).endswith("\n") else "\n")
                         + url + "\n", block, count=1, flags=re.MULTILINE)
        if new == block and url not in block:
            return False
        if new != block:
            config.write_text(text[:begin] + new + text[end:], encoding="utf-8")
        return True
    return False


def _consent(
    record: dict[str, Any], *, consent_id: str, recipient: str, purpose: str, now: datetime
) -> dict[str, Any]:
    from bridge.mapping import map_record, patient_identifiers
    from bridge.policy.consent import build_consent

    ids = patient_identifiers(map_record(record, now=now))
    system, value = next(((s, v) for s, v in ids if s == ID_CARD), ids[0])
    return build_consent(
        consent_id=consent_id,
        patient_system=system,
        patient_value=value,
        recipient=recipient,
        purposes=[purpose],
        start=(now - timedelta(days=1)).date(),
        end=(now + timedelta(days=365)).date(),
        sensitive_classes=ALL_CLASSES,
        hospital_partner_id=ROLES["hospital"].controller,
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def _samples(role: Role, folder: Path, now: datetime) -> list[Path]:
    from bridge.samples import inpatient_records

    folder.mkdir(parents=True, exist_ok=True)
    records = inpatient_records(2, seed=SAMPLE_SEED)
    written: list[Path] = []
    if role.name == "hospital":
        _write_json(folder / "consent.json", _consent(
            records[0], consent_id="sample-consent-1", recipient="insurer-b",
            purpose="HPAYMT", now=now,
        ))
        _write_json(folder / "claim-1.json", records[0])
        _write_json(folder / "claim-2.json", records[1])
        written = [folder / n for n in ("consent.json", "claim-1.json", "claim-2.json")]
    elif role.name == "insurer":
        from bridge.mapping import map_record

        _write_json(folder / "consent.json", _consent(
            records[0], consent_id="insurer-b.sample-consent-1", recipient="insurer-b",
            purpose="HPAYMT", now=now,
        ))
        _write_json(folder / "claim-1.fhir.json", map_record(records[0], now=now))
        written = [folder / n for n in ("consent.json", "claim-1.fhir.json")]
    else:
        from bridge.samples_outpatient import outpatient_records

        visit = outpatient_records(1, seed=SAMPLE_SEED)[0]
        _write_json(folder / "consent.json", _consent(
            visit, consent_id="sample-consent-platform-1", recipient="platform-c",
            purpose="TREAT", now=now,
        ))
        _write_json(folder / "outpatient-1.json", visit)
        written = [folder / n for n in ("consent.json", "outpatient-1.json")]
    return written


def _pki(root: Path, controller: str) -> str:
    from bridge.trust.pki import add_controller, init_dev_pki

    pki = root / "pki"
    if not (pki / "ca.pem").exists():
        init_dev_pki(pki, [r.controller for r in ROLES.values()])
        return "made"
    if not (pki / controller / "tls.pem").exists():
        add_controller(pki, controller, now=datetime.now(UTC))
    return "reused"


def cmd_init(args: argparse.Namespace) -> int:
    role = ROLES[args.role]
    root = folder_argument(args.directory, option="DIRECTORY")
    config_path = root / f"{role.name}.toml"
    if config_path.exists() and not args.force:
        raise UsageError(
            "a configuration is already here; `--force` writes a new one", location=str(config_path)
        )
    partners = list(dict.fromkeys(args.partners or ["insurer"]))
    if role.name != "hospital" and args.partners:
        raise UsageError("--partners is for the hospital role", location="bridge init --partners")
    port = role.port if args.port is None else args.port
    ops_port = role.ops_port if args.ops_port is None else args.ops_port
    if ops_port and ops_port == port:
        raise UsageError(
            f"--ops-port {ops_port} is the server port as well (--port); the operations"
            " port needs a port of its own", location="bridge init --ops-port",
        )
    root.mkdir(parents=True, exist_ok=True)
    pki = _pki(root, role.controller)
    text = (
        _hospital_config(root, port, ops_port, partners)
        if role.name == "hospital"
        else _receiver_config(root, role, port, ops_port)
    )
    config_path.write_text(text, encoding="utf-8")
    samples = _samples(role, root / role.controller / "samples", datetime.now(UTC))
    from bridge.config import load_config

    load_config(config_path)  # what was written must load; a failure here is a bug
    # The partners initialised here before learn this controller's address, so each side
    # fetches and cosigns the other's checkpoints.
    pointed = []
    for name in (partners if role.name == "hospital" else ["hospital"]):
        other = root / f"{ROLES[name].name}.toml"
        if other.is_file() and _point_partner_here(other, role.controller, port):
            load_config(other)
            pointed.append(other)
    out = sys.stdout
    out.write(f"{role.controller} ({role.name}) initialised in {root}\n")
    out.write(f"  configuration  {config_path}\n")
    out.write(f"  PKI            {root / 'pki'} ({pki}; development only, keys unencrypted)\n")
    out.write(f"  listens on     https://127.0.0.1:{port}/fhir (mutual TLS)\n")
    out.write(f"  operations     http://127.0.0.1:{ops_port}/ (status page, /metrics)\n")
    for path in samples:
        out.write(f"  sample         {path}\n")
    for path in pointed:
        out.write(f"  partner        {path} reaches {role.controller} on port {port}"
                  " (each checks the other's audit log)\n")
    return 0


def add_init_commands(sub: Any) -> None:
    """Register ``bridge init`` on the main parser's subcommands."""
    p = sub.add_parser(
        "init",
        help="write a working configuration, a development PKI and samples for one controller",
    )
    p.add_argument("role", choices=sorted(ROLES), help="which controller to set up")
    p.add_argument(
        "directory", metavar="DIRECTORY", help="folder for the configuration, PKI and samples"
    )
    p.add_argument(
        "--port", type=_port, default=None, help="server port (default by role: 8443/8444/8445)"
    )
    p.add_argument(
        "--ops-port",
        type=_port,
        default=None,
        help="operations port on 127.0.0.1 (default by role: 9464/9465/9466)",
    )
    p.add_argument(
        "--partners",
        nargs="+",
        choices=["insurer", "platform"],
        default=None,
        help="hospital only: which partners to link to (default insurer)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing configuration")
    p.set_defaults(func=cmd_init)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


__all__ = ["ROLES", "add_init_commands"]
