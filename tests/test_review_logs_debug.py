"""``bridge serve --log-level debug`` is what an operator turns on to chase a problem; its
log still never carries health data. The libraries under the bridge (the AMQP client,
the HTTP client and server, the PostgreSQL driver) log at debug level what they send
and receive, frames with the claim inside; the bridge's debug level is for its own
lines, not theirs.

A real ``bridge serve`` hands claims to RabbitMQ and to an HTTP endpoint with the
log at debug in both formats; the patient's identifiers and names, and any FHIR
content, are searched for in the log.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import (
    ClaimEndpoint,
    QueueConsumer,
    Serve,
    add_destinations,
    delete_queue,
    fast_hospital,
    unique_queue,
    wait_for,
)

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def patient_values(message: dict[str, Any]) -> set[str]:
    """What identifies the patient in a claim: identifiers, names, phone numbers..."""
    found: set[str] = set()
    for entry in message["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            for key in ("identifier", "name", "telecom", "address"):
                found.update(s for s in _strings(resource.get(key, [])) if len(s) >= 2
                             and not s.startswith(("urn:", "http")) and s not in
                             {"official", "usual", "home", "phone", "work", "mobile"})
    return found


def forms(value: str) -> set[str]:
    """A value as it may appear in a log line: itself, JSON-escaped, Python bytes repr."""
    return {value, json.dumps(value)[1:-1], repr(value.encode())[2:-1]}


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_debug_logs_carry_no_claim_content(
    tmp_path: Path, queue_name: str, log_format: str
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url, amqp_url="amqp://127.0.0.1:5672/",
                     queue=queue_name, timeout=20)
    log = tmp_path / "insurer.log"
    insurer = Serve(insurer_cfg, log, "--log-level", "debug", "--log-format", log_format)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    try:
        ids = []
        for i, record in enumerate(inpatient_records(3, seed=61)):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)
        await wait_for(lambda: consumer.got.ids == set(ids) and endpoint.got.ids == set(ids),
                       30, "the claims at both destinations")
    finally:
        await hospital.stop()
        insurer.stop()
        await consumer.stop()
        await endpoint.stop()

    text = log.read_text(encoding="utf-8")
    assert "listening on" in text  # the log is there
    values = set().union(*(patient_values(env["message"])
                           for env in consumer.got.first.values()))
    assert values, "the claims name their patients"
    leaked = sorted(v for v in values if any(f in text for f in forms(v)))
    assert leaked == [], f"patient data in the debug log: {len(leaked)} values"
    assert "resourceType" not in text
