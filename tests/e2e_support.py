"""Two real bridges on loopback for end-to-end tests: a hospital and an insurer.

Both run in the test's event loop, each with its own SQLite store and its own
mutual-TLS listener, configured through real TOML files and a real development PKI.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.config import load_config
from bridge.demo import HOSPITAL, INSURER, LINK_OUT, free_port, write_configs
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.mapping import map_record, patient_identifiers
from bridge.policy.engine import build_consent
from bridge.trust.pki import init_dev_pki

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


@dataclass
class Pair:
    root: Path
    hospital_cfg: Path
    insurer_cfg: Path
    hospital: BridgeService
    insurer: BridgeService

    @property
    def insurer_url(self) -> str:
        return f"https://127.0.0.1:{self.insurer.port}/fhir"

    async def stop(self) -> None:
        await self.hospital.stop()
        await self.insurer.stop()


def make_workdir(root: Path) -> tuple[Path, Path]:
    # The PKI was made a day ago, as in real life: signatures from half an hour ago
    # are then made with a valid key and fail only on freshness.
    init_dev_pki(
        root / "pki", [HOSPITAL, INSURER, "clinic-x"], now=datetime.now(UTC) - timedelta(days=1)
    )
    return write_configs(root, free_port(), free_port())


def set_toml_keys(path: Path, table: str, values: dict[str, Any]) -> None:
    """Add ``key = value`` lines to ``[table]`` of a configuration file written above."""
    lines = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    text = path.read_text(encoding="utf-8")
    header = f"[{table}]\n"
    if header not in text:
        raise ValueError(f"no [{table}] table in {path}")
    path.write_text(text.replace(header, header + lines, 1), encoding="utf-8")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


async def start_pair(
    root: Path,
    *,
    start_dispatch: bool = True,
    insurer_config: dict[str, dict[str, Any]] | None = None,
) -> Pair:
    """Start the two bridges; ``insurer_config`` adds keys to tables of the insurer's file
    (``{"server": {"header_timeout_seconds": 1}}``)."""
    hospital_cfg, insurer_cfg = make_workdir(root)
    for table, values in (insurer_config or {}).items():
        set_toml_keys(insurer_cfg, table, values)
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    if start_dispatch:
        await hospital.start()
    return Pair(root, hospital_cfg, insurer_cfg, hospital, insurer)


def patient_id(record: dict[str, Any]) -> tuple[str, str]:
    ids = patient_identifiers(map_record(record, now=datetime.now(UTC)))
    return next(((s, v) for s, v in ids if s == ID_CARD), ids[0])


def consent_for(
    record: dict[str, Any],
    *,
    consent_id: str = "c-1",
    recipient: str = INSURER,
    purposes: tuple[str, ...] = ("HPAYMT",),
    sensitive: tuple[str, ...] = ALL_CLASSES,
    status: str = "active",
) -> dict[str, Any]:
    now = datetime.now(UTC)
    system, value = patient_id(record)
    consent = build_consent(
        consent_id=consent_id,
        patient_system=system,
        patient_value=value,
        recipient=recipient,
        purposes=list(purposes),
        start=now - timedelta(days=1),
        end=now + timedelta(days=30),
        sensitive_classes=sensitive,
        hospital_partner_id=HOSPITAL,
    )
    consent["status"] = status
    return consent


def client_ssl(root: Path, who: str | None, *, ca: Path | None = None) -> ssl.SSLContext:
    """A client context presenting ``who``'s TLS certificate (or none at all)."""
    ctx = ssl.create_default_context(cafile=str(ca or root / "pki" / "ca.pem"))
    if who is not None:
        ctx.load_cert_chain(root / "pki" / who / "tls.pem", root / "pki" / who / "tls.key")
    return ctx


def text_of(message: dict[str, Any]) -> str:
    """A message that arrived, as text to search for values that must not arrive: without
    its signature's base64 (a detached JWS of the sender's header, which holds no record
    value; its random letters would match a short code such as Z21 now and then)."""
    return json.dumps({k: v for k, v in message.items() if k != "signature"},
                      ensure_ascii=False)


__all__ = ["LINK_OUT", "Pair", "client_ssl", "consent_for", "start_pair"]


ICD10 = "urn:oid:2.16.156.10011.2.3.3.11"


def special_as_secondary(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a WS 445.10 record whose special-disease principal diagnosis becomes
    another discharge diagnosis beside an ordinary principal one (胆囊结石), so that
    consent without the class holds back some diagnoses and the claim still goes
    (PROTOCOL P-MSG-10 refuses a claim whose principal diagnosis is held back)."""
    import copy

    from bridge.policy.classify import default_sensitive_codes

    codes = default_sensitive_codes()
    out = copy.deepcopy(record)
    for d in out["groups"]["diagnoses"]:
        if "HDSD00.11.023" in d and codes.classes_of(ICD10, d["HDSD00.11.023"]):
            d["HDSD00.11.020"] = d.pop("HDSD00.11.023")
            d["HDSD00.11.021"] = d.pop("HDSD00.11.024")
            d["HDSD00.11.022"] = d.pop("HDSD00.11.025", "1")
    out["groups"]["diagnoses"].insert(
        0, {"HDSD00.11.023": "K80.200", "HDSD00.11.024": "胆囊结石", "HDSD00.11.025": "1"})
    return out


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``bridge ARGS`` as its own process, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, **(env or {})})


def queued_count(config: Path) -> int:
    """How many claims ``bridge outbox list`` shows for this configuration."""
    listed = cli("outbox", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    return len(json.loads(listed.stdout))


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``bridge serve`` as its own process, its log appended to ``log``; returns once it
    says ``ready``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=out,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"ready "), log.read_text(encoding="utf-8")
    return proc
