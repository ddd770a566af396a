"""The two small APIs other parts of the bridge call: log events and metric sources."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import make_workdir
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_config
from bridge.ledger import open_store
from bridge.logs import event, setup_logging, subscribe
from bridge.ops import metrics as ops_metrics
from bridge.ops.metrics import BridgeMetrics, ScrapeContext, metric_source


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = setup_logging(fmt="json", level="info", stream=stream, static={"controller": "x"})
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def test_an_event_is_one_json_line_with_its_fields(json_log: io.StringIO) -> None:
    event("consent_change", controller="hospital-a", consent_id="c-1", status="inactive")
    (line,) = json_log.getvalue().splitlines()
    data = json.loads(line)
    assert data["event"] == "consent_change" and data["consent_id"] == "c-1"
    assert data["level"] == "info" and data["time"].endswith("Z")


def test_an_event_refuses_fields_outside_the_vocabulary_and_non_scalars() -> None:
    with pytest.raises(ValueError, match="patient_name"):
        event("delivery", patient_name="张三")
    with pytest.raises(TypeError, match="path"):
        event("refusal", path={"HDSD00.11.110": "张三"})


def test_an_exception_is_logged_without_its_message(json_log: io.StringIO) -> None:
    try:
        raise ValueError("王小明 110101199003074512")
    except ValueError:
        logging.getLogger("bridge.test").exception("mapping failed")
    data = json.loads(json_log.getvalue().splitlines()[-1])
    assert data["error_type"] == "ValueError" and data["stack"]
    assert "王小明" not in json_log.getvalue() and "110101199003074512" not in json_log.getvalue()


def test_listeners_hear_events_even_when_the_log_is_quiet() -> None:
    heard: list[str] = []
    unsubscribe = subscribe(lambda name, fields: heard.append(name))
    try:
        event("retry", controller="a", link="l")
    finally:
        unsubscribe()
    event("retry", controller="a", link="l")
    assert heard == ["retry"]


def test_a_registered_source_is_scraped_and_a_broken_one_is_counted(tmp_path: Path) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    config = load_config(hospital_cfg)

    def queue_depth(ctx: ScrapeContext) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("bridge_test_handoff_pending", "pending hand-offs", labels=["to"])
        g.add_metric(["claims-system"], len(ctx.config.links) + 2)
        yield g

    def broken(ctx: ScrapeContext) -> Iterator[GaugeMetricFamily]:
        raise RuntimeError("boom")
        yield  # pragma: no cover

    metric_source(queue_depth)
    metric_source(broken)
    try:
        with open_store(config.store) as store:
            metrics = BridgeMetrics(config, store)
            try:
                event("delivery", controller="hospital-a", link="claims-to-insurer-b",
                      seconds=0.2)
                event("delivery", controller="someone-else", link="claims-to-insurer-b",
                      seconds=9.0)
                text = metrics.render().decode()
            finally:
                metrics.close()
    finally:
        ops_metrics._SOURCES.remove(queue_depth)
        ops_metrics._SOURCES.remove(broken)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("bridge_test_handoff_pending", (("to", "claims-system"),))] == 3
    assert samples[("bridge_metrics_source_errors_total", (("source", "broken"),))] == 1
    # Only this controller's events count.
    assert samples[("bridge_deliveries_total", (("link", "claims-to-insurer-b"),))] == 1
    assert samples[("bridge_store_up", ())] == 1


# A line break, a carriage return, a terminal escape (C0), the C1 next line and control
# sequence introducer, the line and paragraph separators, a bidirectional override and
# an isolate; the Chinese text is text and stays as it is.
FORGED = ("x\n2026-12-07T00:00:00.000Z WARNING forged line\r\x1b[2J\u2028\u202eend"
          "\x85\x9b2J\u2029\u2066张三\u2069")
UNSAFE = "\n\r\x1b\x85\x9b\u2028\u2029\u202e\u2066\u2069"


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = setup_logging(fmt="text", level="info", stream=stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def test_a_text_line_stays_one_line_whatever_a_field_holds(text_log: io.StringIO) -> None:
    """A control character that slipped into a field, a message or an argument never
    starts a line, moves the cursor or reaches the terminal: it is written escaped."""
    event("refusal", controller="insurer-b", path=f"X-Signature#{FORGED}", code="c")
    logging.getLogger("bridge.server").info("refused %s: %s", "request", FORGED)
    try:
        raise ValueError(FORGED)
    except ValueError:
        logging.getLogger("bridge.server").exception("failed at %s", FORGED)
    written = text_log.getvalue()
    lines = written.splitlines()
    assert len(lines) == 3, written
    assert written.count("\n") == 3
    for line in lines:
        assert not any(c in line for c in UNSAFE), repr(line)
        assert ("\\x0a2026-12-07T00:00:00.000Z WARNING forged line\\x0d\\x1b[2J\\u2028\\u202eend"
                "\\x85\\x9b2J\\u2029\\u2066张三\\u2069") in line, line
    assert "ValueError at" in lines[2]


def test_a_json_line_stays_one_line_whatever_a_field_holds(json_log: io.StringIO) -> None:
    event("refusal", controller="insurer-b", path=f"X-Signature#{FORGED}", code="c")
    logging.getLogger("bridge.server").info("refused %s", FORGED)
    lines = json_log.getvalue().splitlines()
    assert len(lines) == 2
    assert not any(c in line for line in lines for c in UNSAFE), lines
    assert "张三" in lines[0]  # text is written as it is, not escaped
    assert json.loads(lines[0])["path"] == f"X-Signature#{FORGED}"
    assert json.loads(lines[1])["message"] == f"refused {FORGED}"
