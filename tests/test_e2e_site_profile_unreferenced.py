"""A site's own link profile that carries surgeons: a surgeon travels only with the
operation that names them.

Two ``bridge serve`` processes (a hospital and an insurer) over mutual TLS with a
development PKI, both configured with a link profile file of the site's own (the shipped
commercial-insurance profile plus ``Procedure.performer.actor`` and ``Practitioner.name``,
as a site agreement might add). Records go in through ``bridge push``, consents through
``bridge consent add``; what arrived is read back with ``bridge inbox show``.

The shipped profiles that name a focus carry no Practitioner, so on them a surgeon never
leaves whatever the policy does; on this one the policy itself must drop the surgeon of
an operation held back by consent, because nothing sent refers to them any more
(GB/T 39725-2020 §7 minimum necessary; the focus rule of conformance/PROTOCOL.md).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ALL_CLASSES, cli, consent_for, make_workdir, serve, text_of
from handoff_support import fast_hospital
from test_e2e_minimum_necessary import (
    dx,
    front_sheet,
    push_and_read,
    resources,
    unreached_from_focus,
)

from bridge.resources import mappings_dir

SHIPPED = "commercial-insurance"
ORDINARY_SURGEON = "欧阳主刀"
HELD_SURGEON = "诸葛心理"


def site_profile(path: Path) -> Path:
    """The shipped commercial-insurance profile, plus the surgeon of each operation."""
    text = (mappings_dir() / "links" / f"{SHIPPED}.yaml").read_text(encoding="utf-8")
    text = text.replace(f"profile: {SHIPPED}", "profile: site-insurer-surgeons", 1)
    anchor = '      - {path: performedPeriod, row: "'
    at = text.index(anchor)
    line_end = text.index("\n", at) + 1
    text = (text[:line_end]
            + '      - {path: performer.actor, row: "site agreement — the surgeon"}\n'
            + text[line_end:])
    text = text.rstrip("\n") + (
        "\n  Practitioner:\n    elements:\n"
        '      - {path: name, row: "site agreement — the surgeon\'s name"}\n')
    path.write_text(text, encoding="utf-8")
    return path


def use_profile(config: Path, profile: Path) -> None:
    text = config.read_text(encoding="utf-8")
    old = f'profile = "{SHIPPED}"'
    assert text.count(old) == 1, config
    config.write_text(text.replace(old, f'profile = "{profile}"'), encoding="utf-8")


@dataclass
class Arrived:
    ordinary: dict[str, Any]  # an ordinary operation, every class consented
    held: dict[str, Any]  # a psychotherapy, the consent not naming the mental class


@pytest.fixture(scope="module")
def arrived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arrived]:
    root = tmp_path_factory.mktemp("site-profile")
    hospital_cfg, insurer_cfg = make_workdir(root)
    fast_hospital(hospital_cfg)
    profile = site_profile(root / "site-insurer-surgeons.yaml")
    for cfg in (hospital_cfg, insurer_cfg):
        use_profile(cfg, profile)
    records = {
        "ordinary": (front_sheet(0, department="普通外科",
                                 diagnoses=[dx("main", "K80.200", "胆囊结石")],
                                 operations=[("51.23", "腹腔镜下胆囊切除术", ORDINARY_SURGEON)]),
                     ALL_CLASSES),
        "held": (front_sheet(1, department="呼吸内科",
                             diagnoses=[dx("main", "J44.100", "慢性阻塞性肺病伴有急性加重")],
                             operations=[("94.31", "精神分析", HELD_SURGEON)]),
                 tuple(c for c in ALL_CLASSES if c != "mental")),
    }
    for name, (record, classes) in records.items():
        (root / f"{name}.json").write_text(json.dumps(record, ensure_ascii=False),
                                           encoding="utf-8")
        consent = consent_for(record, consent_id=f"consent-{name}", sensitive=classes)
        (root / f"consent-{name}.json").write_text(json.dumps(consent, ensure_ascii=False),
                                                   encoding="utf-8")
        added = cli("consent", "add", "--config", str(hospital_cfg),
                    str(root / f"consent-{name}.json"))
        assert added.returncode == 0, added.stderr
    insurer = serve(insurer_cfg, root / "insurer.log")
    hospital = serve(hospital_cfg, root / "hospital.log")
    try:
        pushes, wire = push_and_read(hospital_cfg, insurer_cfg,
                                     {name: root / f"{name}.json" for name in records})
        for push in pushes.values():
            assert push.returncode == 0, push.stderr
        yield Arrived(**{name: wire[push.stdout.split()[0]] for name, push in pushes.items()})
    finally:
        codes = []
        for proc in (hospital, insurer):
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
    assert codes == [0, 0]


def test_the_site_profile_carries_the_surgeon_of_an_operation_sent(arrived: Arrived) -> None:
    """The profile does carry surgeons: an operation that goes names its surgeon."""
    [procedure] = resources(arrived.ordinary, "Procedure")
    [surgeon] = resources(arrived.ordinary, "Practitioner")
    assert procedure["performer"][0]["actor"]["reference"].endswith(surgeon["id"])
    assert ORDINARY_SURGEON in text_of(arrived.ordinary)


def test_the_surgeon_of_a_held_back_operation_does_not_travel(arrived: Arrived) -> None:
    """Psychotherapy held back (the consent does not name the mental class): neither the
    operation nor the surgeon it named arrives, though the profile carries surgeons."""
    assert resources(arrived.held, "Claim"), "the claim itself still goes"
    assert not resources(arrived.held, "Procedure")
    assert not resources(arrived.held, "Practitioner")
    assert HELD_SURGEON not in text_of(arrived.held)


def test_every_resource_that_arrives_is_referred_to_from_the_claim(arrived: Arrived) -> None:
    for name, message in (("ordinary", arrived.ordinary), ("held", arrived.held)):
        unreached = unreached_from_focus(name, message)
        assert not unreached, (name, unreached)
