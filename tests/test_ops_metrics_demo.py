"""``/metrics`` during a demo run, scraped and parsed with prometheus-client's parser."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append((sample.labels, sample.value))
    return families


def _total(families: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in families.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def test_metrics_are_scraped_and_parsed_while_the_demo_runs(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "bridge", "demo", "--claims", "40", "--rate", "15",
         "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    scrapes: list[dict[str, list[tuple[dict[str, str], float]]]] = []
    port: int | None = None
    deadline = time.monotonic() + 240
    while demo.poll() is None and time.monotonic() < deadline:
        config = tmp_path / "hospital.toml"
        if port is None and config.exists():
            try:
                port = tomllib.loads(config.read_text(encoding="utf-8"))["operations"]["port"]
            except (tomllib.TOMLDecodeError, KeyError):
                pass
        if port is not None:
            families = _scrape(port)
            if families is not None:
                scrapes.append(families)
        time.sleep(0.25)
    out, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, out

    assert len(scrapes) >= 3, "the operations port was not scraped during the run"
    link = "claims-to-insurer-b"
    last = scrapes[-1]
    # Build information names the versions.
    (info,) = last["bridge_build_info"]
    assert info[0]["fhir_version"] == "4.0.1" and info[0]["controller"] == "hospital-a"
    assert _total(last, "bridge_store_up") == 1
    # Claims by state come from the store, deliveries and latency from this process's
    # events: they agree, up to the deliveries committed but not yet reported when the
    # scrape read the store (at most the link's 16 in flight).
    acked = _total(last, "bridge_claims", link=link, state="acked")
    delivered_events = _total(last, "bridge_deliveries_total", link=link)
    assert acked > 0
    assert 0 <= acked - delivered_events <= 16
    count = _total(last, "bridge_receipt_latency_seconds_count", link=link)
    assert abs(count - delivered_events) <= 1
    assert _total(last, "bridge_receipt_latency_seconds_bucket", link=link, le="+Inf") == count
    assert _total(last, "bridge_receipt_latency_seconds_sum", link=link) > 0
    # Acknowledged claims only ever grow between scrapes.
    series = [_total(s, "bridge_claims", link=link, state="acked") for s in scrapes]
    assert series == sorted(series)
    assert _total(last, "bridge_audit_entries") > acked
    assert _total(last, "bridge_dead_letters", link=link) == 0
    assert {labels["certificate"] for labels, _v in last[
        "bridge_certificate_expiry_timestamp_seconds"]} >= {"tls", "signing", "ca"}

    # The progress line and the summary count the same records.
    progress = re.findall(r"(\d+)/(\d+)", out.split("ws-fhir-bridge demo")[0])
    done, total = progress[-1]
    submitted = re.search(r"records submitted\s*│\s*(\d+)", out)
    assert submitted is not None
    assert done == total == submitted.group(1)
    delivered = re.search(r"delivered, with signed receipt\s*│\s*(\d+)", out)
    assert delivered is not None and int(delivered.group(1)) >= acked
