"""Property: whatever the consent, page size and purpose, no page of a pull carries an
element outside the link's profile at its level, a resource type the consent does not
cover, or special-disease data without a consent naming its class on a link that
carries grade 5.

The hospital is a real ``bridge serve`` process per level, fed by ``bridge records
import``; consents are put through the consent API with the hospital's own client
certificate; pages are fetched and their signatures checked from outside.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pull_support import (
    ALL_CLASSES,
    HOSPITAL,
    PLATFORM,
    id_card,
    person_records,
    pull_consent,
    write_site,
)
from test_e2e_pull import verify_page

from bridge.policy.classify import SENSITIVITY_SYSTEM
from bridge.policy.profile import load_link_profile

pytestmark = pytest.mark.battery

LEVELS = ("default", "notify", "authorise")
TYPES = ("Encounter", "Condition", "Observation", "DiagnosticReport", "Procedure")


def _records() -> list[dict[str, Any]]:
    records = person_records(3, seed=11)
    # One stay with a diagnosis in a special-disease class (mental, F20).
    sensitive = records[2]
    groups = dict(sensitive["groups"])
    groups["diagnoses"] = [dict(groups["diagnoses"][1], **{"HDSD00.11.023": "F20.000"})]
    records[2] = {**sensitive, "groups": groups}
    return records


class Served:
    def __init__(self, root: Path, level: str) -> None:
        self.root = root
        self.level = level
        h, _p, self.port = write_site(root, level=level, rate=10_000, burst=10_000)
        self.records = _records()
        folder = root / "his-export"
        folder.mkdir()
        for n, record in enumerate(self.records):
            (folder / f"record-{n:03d}.json").write_bytes(orjson.dumps(record))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([sys.executable, "-m", "bridge", "records", "import", "--config", str(h),
                        str(folder)], check=True, capture_output=True, env=env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(h)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready"), line

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}/fhir"

    def ssl(self, who: str) -> Any:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.pem"))
        ctx.load_cert_chain(self.root / "pki" / who / "tls.pem", self.root / "pki" / who / "tls.key")
        return ctx

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module", params=LEVELS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp(f"pull-{request.param}"), request.param)
    try:
        yield s
    finally:
        s.stop()


async def _pull(served: Served, consent: dict[str, Any], count: int, purpose: str,
                search: str) -> list[dict[str, Any]]:
    hospital = aiohttp.TCPConnector(ssl=served.ssl(HOSPITAL))
    async with (
        aiohttp.ClientSession(connector=hospital) as own,
        own.put(f"{served.base}/Consent/{consent['id']}", data=orjson.dumps(consent),
                headers={"Content-Type": "application/fhir+json"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
    pages: list[dict[str, Any]] = []
    platform = aiohttp.TCPConnector(ssl=served.ssl(PLATFORM))
    async with aiohttp.ClientSession(connector=platform,
                                     headers={"X-Purpose-Of-Use": purpose}) as session:
        system, value = id_card(served.records[0])
        async with session.get(f"{served.base}/Patient",
                               params={"identifier": f"{system}|{value}"}) as resp:
            found = orjson.loads(await resp.read())
        pages.append(found)
        if not found.get("entry"):
            return pages
        pid = found["entry"][0]["resource"]["id"]
        for url, params in [(f"{served.base}/Patient/{pid}/$everything", {"_count": str(count)}),
                            (f"{served.base}/{search}", {"patient": pid, "_count": str(count)})]:
            next_url: str | None = url
            query: dict[str, str] | None = params
            while next_url:
                async with session.get(next_url, params=query) as resp:
                    body = orjson.loads(await resp.read())
                if resp.status == 400:  # a type the level does not serve
                    assert body["issue"][0]["expression"] == [search]
                    break
                assert resp.status == 200, body
                pages.append(body)
                query = None
                next_url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"),
                                None)
    return pages


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(
    count=st.integers(min_value=1, max_value=25),
    purposes=st.sets(st.sampled_from(["TREAT", "PUBHLTH", "HOPERAT"]), min_size=1),
    asked=st.sampled_from(["TREAT", "PUBHLTH"]),
    classes=st.sets(st.sampled_from(ALL_CLASSES)),
    types=st.one_of(st.none(), st.sets(st.sampled_from(("Patient", *TYPES, "Organization",
                                                        "Practitioner")), min_size=1)),
    search=st.sampled_from(TYPES),
)
def test_no_page_carries_what_the_profile_level_or_consent_withholds(
    served: Served, count: int, purposes: set[str], asked: str, classes: set[str],
    types: set[str] | None, search: str,
) -> None:
    consent = pull_consent(served.records[0], consent_id="prop-1", purposes=tuple(sorted(purposes)),
                           sensitive=tuple(sorted(classes)))
    if types is not None:
        consent["provision"]["class"] = [
            {"system": "http://hl7.org/fhir/resource-types", "code": t} for t in sorted(types)
        ]
    pages = asyncio.run(_pull(served, consent, count, asked, search))
    profile = load_link_profile("regional-interoperability", level=served.level)
    released = [e["resource"] for page in pages for e in page.get("entry", [])]
    for page in pages:
        verify_page(served.root, page)
        resources = [{"resource": e["resource"]} for e in page.get("entry", [])]
        assert profile.check({"resourceType": "Bundle", "type": "collection",
                              "entry": resources}) == []
        assert len(page.get("entry", [])) <= max(count, 1)
    if asked not in purposes:
        assert released == []
    for resource in released:
        if types is not None:
            assert resource["resourceType"] in types
        labels = {(s["system"], s["code"]) for s in resource.get("meta", {}).get("security", [])}
        sensitive = {code for system, code in labels if system == SENSITIVITY_SYSTEM}
        if sensitive:
            assert served.level == "authorise" and sensitive <= classes


def test_special_disease_data_travels_only_at_authorise_with_the_class_named(
    served: Served,
) -> None:
    def sensitive_released(classes: tuple[str, ...]) -> set[str]:
        consent = pull_consent(served.records[0], consent_id="prop-1", sensitive=classes)
        pages = asyncio.run(_pull(served, consent, 50, "TREAT", "Condition"))
        return {s["code"] for page in pages for e in page.get("entry", [])
                for s in e["resource"].get("meta", {}).get("security", [])
                if s["system"] == SENSITIVITY_SYSTEM}

    with_class = sensitive_released(ALL_CLASSES)
    assert with_class == ({"mental"} if served.level == "authorise" else set())
    assert sensitive_released(tuple(c for c in ALL_CLASSES if c != "mental")) == set()
