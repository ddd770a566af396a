"""A hospital that serves record pull and a regional platform that pulls, on loopback.

The hospital runs in the test's event loop with its own SQLite store and mutual-TLS
listener; both are configured by real TOML files over a real development PKI. An
insurer (registered with a claim link only) and an unregistered clinic hold
certificates from the same CA.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.mapping import map_record
from bridge.policy.engine import build_consent
from bridge.samples import inpatient_records
from bridge.samples_outpatient import lab_records
from bridge.trust.pki import init_dev_pki

HOSPITAL = "hospital-a"
PLATFORM = "platform-r"
INSURER = "insurer-b"
STRANGER = "clinic-x"
PULL_LINK = "records-to-platform"
FROM_LINK = "records-from-hospital-a"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
ALL_CLASSES = ("sexual-reproductive", "infectious", "mental", "malignant", "genetic", "anal",
               "rare", "incurable")

# Elements of a WS 445.10 front sheet that describe the person, not the stay.
_PERSON = ("HDSD00.11.118", "HDSD00.11.119", "HDSD00.11.006", "HDSD00.11.110", "HDSD00.11.109",
           "HDSD00.11.014", "HDSD00.11.036", "HDSD00.11.077", "HDSD00.11.049", "HDSD00.11.048",
           "HDSD00.11.050", "HDSD00.11.125", "HDSD00.11.026", "HDSD00.11.102", "HDSD00.11.103",
           "HDSD00.11.104", "HDSD00.11.105", "HDSD00.11.100", "HDSD00.11.101", "HDSD00.11.106")


def hospital_toml(port: int, *, level: str = "notify", no_consent: str = "empty",
                  rate: float = 200.0, burst: int = 400, alarm: int = 200,
                  max_count: int = 200, override: bool = True) -> str:
    return f"""\
[controller]
id = "{HOSPITAL}"
name = "示范市第一人民医院"

[server]
host = "127.0.0.1"
port = {port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{HOSPITAL}/tls.pem"
key = "pki/{HOSPITAL}/tls.key"

[signing]
cert = "pki/{HOSPITAL}/sign.pem"
key = "pki/{HOSPITAL}/sign.key"

[store]
path = "{HOSPITAL}/bridge.sqlite"

[audit]
pseudonym_key_file = "{HOSPITAL}/audit-pseudonym.key"

[[partners]]
id = "{PLATFORM}"
signing_certs = ["pki/{PLATFORM}/sign.pem"]

[[partners]]
id = "{INSURER}"
base_url = "https://127.0.0.1:9/fhir"
signing_certs = ["pki/{INSURER}/sign.pem"]

[[links]]
id = "claims-to-insurer-b"
partner = "{INSURER}"
direction = "outbound"
profile = "commercial-insurance"
purpose = "HPAYMT"

[[links]]
id = "{PULL_LINK}"
partner = "{PLATFORM}"
direction = "pull"
profile = "regional-interoperability"
purpose = "TREAT"

[links.pull]
purposes = ["TREAT", "PUBHLTH"]
level = "{level}"
override_allowed = {"true" if override else "false"}
no_consent = "{no_consent}"
max_count = {max_count}
default_count = {min(50, max_count)}
rate_per_second = {rate}
rate_burst = {burst}
bulk_alarm_patients = {alarm}
"""


def platform_toml(port: int, hospital_port: int) -> str:
    return f"""\
[controller]
id = "{PLATFORM}"
name = "示范市区域全民健康信息平台"

[server]
host = "127.0.0.1"
port = {port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{PLATFORM}/tls.pem"
key = "pki/{PLATFORM}/tls.key"

[signing]
cert = "pki/{PLATFORM}/sign.pem"
key = "pki/{PLATFORM}/sign.key"

[store]
path = "{PLATFORM}/bridge.sqlite"

[audit]
pseudonym_key_file = "{PLATFORM}/audit-pseudonym.key"

[[partners]]
id = "{HOSPITAL}"
base_url = "https://127.0.0.1:{hospital_port}/fhir"
signing_certs = ["pki/{HOSPITAL}/sign.pem"]

[[links]]
id = "{FROM_LINK}"
partner = "{HOSPITAL}"
direction = "pull-from"
profile = "regional-interoperability"
purpose = "TREAT"

[links.pull]
level = "notify"
"""


@dataclass
class PullSite:
    root: Path
    hospital_cfg: Path
    platform_cfg: Path
    hospital: BridgeService

    @property
    def port(self) -> int:
        assert self.hospital.port is not None
        return self.hospital.port

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}/fhir"

    @property
    def controller(self) -> Controller:
        return self.hospital.controller

    def ssl(self, who: str | None = PLATFORM) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.pem"))
        if who is not None:
            ctx.load_cert_chain(self.root / "pki" / who / "tls.pem",
                                self.root / "pki" / who / "tls.key")
        return ctx

    def platform(self) -> Controller:
        return Controller(load_config(self.platform_cfg))

    async def stop(self) -> None:
        await self.hospital.stop()


def write_site(root: Path, **hospital_options: Any) -> tuple[Path, Path, int]:
    init_dev_pki(root / "pki", [HOSPITAL, PLATFORM, INSURER, STRANGER],
                 now=datetime.now(UTC) - timedelta(days=1))
    port = free_port()
    h = root / "hospital.toml"
    p = root / "platform.toml"
    h.write_text(hospital_toml(port, **hospital_options), encoding="utf-8")
    p.write_text(platform_toml(free_port(), port), encoding="utf-8")
    return h, p, port


async def start_site(root: Path, **hospital_options: Any) -> PullSite:
    h, p, _port = write_site(root, **hospital_options)
    service = BridgeService(Controller(load_config(h)), poll_interval=0.05)
    await service.start()
    return PullSite(root, h, p, service)


def person_records(n: int, *, seed: int = 3, labs: bool = True) -> list[dict[str, Any]]:
    """``n`` inpatient stays of one person (front sheets), each with a lab report when
    ``labs``: records from different data sets whose Patient ids differ, joined by the
    person's identifiers."""
    stays = inpatient_records(n, seed=seed)
    person = {k: stays[0]["elements"][k] for k in _PERSON if k in stays[0]["elements"]}
    out: list[dict[str, Any]] = []
    reports = lab_records(n, seed=seed) if labs else []
    for i, stay in enumerate(stays):
        elements = dict(stay["elements"], **person)
        elements["HDSD00.11.140"] = f"ZY{seed:04d}{i:06d}"
        elements.pop("HDSD00.11.079", None)  # age at admission differs per stay
        record = {**stay, "elements": elements}
        out.append(record)
        if labs:
            lab = reports[i]
            le = dict(lab["elements"])
            le["HDSD00.05.078"] = elements["HDSD00.11.140"]
            le["HDSD00.05.018"] = elements["HDSD00.11.110"]
            le.pop("HDSD00.05.064", None)
            out.append({**lab, "elements": le})
    return out


def id_card(record: dict[str, Any]) -> tuple[str, str]:
    return ID_CARD, str(record["elements"]["HDSD00.11.048"])


def pull_consent(
    record: dict[str, Any], *, consent_id: str = "pull-1", purposes: tuple[str, ...] = ("TREAT",),
    sensitive: tuple[str, ...] = ALL_CLASSES, status: str = "active",
    recipient: str = PLATFORM,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    system, value = id_card(record)
    consent = build_consent(
        consent_id=consent_id, patient_system=system, patient_value=value, recipient=recipient,
        purposes=list(purposes), start=now - timedelta(days=1), end=now + timedelta(days=30),
        sensitive_classes=sensitive, hospital_partner_id=HOSPITAL,
    )
    consent["status"] = status
    return consent


async def keep(site: PullSite, records: list[dict[str, Any]]) -> None:
    for record in records:
        await site.controller.keep_for_pull(record, source="test")


def mapped_types(records: list[dict[str, Any]]) -> set[str]:
    return {e["resource"]["resourceType"] for r in records for e in map_record(r)["entry"]}
