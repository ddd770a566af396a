"""The status page as a person sees it: Debian's Chromium, headless, through chromedriver."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import bridge, make_site, serve, wait_for
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from bridge.config import load_config
from bridge.ledger import open_store

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "the status page tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _field(driver: webdriver.Chrome, link: str, name: str) -> str:
    row = driver.find_element(By.CSS_SELECTOR, f"tr[data-link='{link}']")
    return str(row.find_element(By.CSS_SELECTOR, f"[data-field='{name}']").text)


def _outbox(config: Path) -> dict[str, int]:
    return json.loads(bridge("outbox", "--config", str(config), "--json").stdout)  # type: ignore[no-any-return]


def test_status_page_shows_the_store_and_requeues_a_dead_letter(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    site = make_site(tmp_path, fast_retries=True)
    samples = site.root / "hospital-a" / "samples"
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples / "consent.json")).returncode == 0
    link = "claims-to-insurer-b"
    hospital = serve(site.hospital)
    insurer = None
    try:
        push = bridge("push", "--config", str(site.hospital), "--link", link,
                      str(samples / "claim-1.json"))
        message_id = push.stdout.split()[0]
        wait_for(lambda: _outbox(site.hospital)["dead"] == 1, what="dead letter")

        browser.get(site.ops("hospital") + "/")
        assert "hospital-a" in browser.title
        counts = _outbox(site.hospital)
        assert _field(browser, link, "enqueued") == str(sum(counts.values()))
        assert _field(browser, link, "dead") == str(counts["dead"]) == "1"
        assert _field(browser, link, "acked") == str(counts["acked"]) == "0"
        assert _field(browser, link, "state") == "running"
        chart = browser.find_element(By.CSS_SELECTOR, f"svg.depth[data-link='{link}']")
        assert int(chart.get_attribute("data-samples") or 0) >= 1
        dead_row = browser.find_element(By.CSS_SELECTOR, f"tr[data-message-id='{message_id}']")
        assert "transport-error" in dead_row.text
        certs = browser.find_element(By.ID, "certificates").text
        assert "tls" in certs and "valid" in certs
        # The page fetched nothing more, from here or elsewhere: everything is inline.
        assert browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        ) == []

        insurer = serve(site.insurer)
        dead_row.find_element(By.CSS_SELECTOR, "button[name='requeue']").click()
        notice = wait_for(
            lambda: browser.find_elements(By.ID, "notice"), what="notice after requeue"
        )
        assert "requeued" in notice[0].text
        wait_for(lambda: _outbox(site.hospital)["acked"] == 1, what="delivery after requeue")
        browser.get(site.ops("hospital") + "/")
        assert _field(browser, link, "acked") == "1"
        assert _field(browser, link, "dead") == "0"
        assert "No dead or rejected claims" in browser.find_element(By.ID, "dead-letters").text
    finally:
        hospital.stop()
        if insurer is not None:
            insurer.stop()
    with open_store(load_config(site.hospital).store) as store:
        actions = [e.record.action for e in store.audit_entries()]
    assert "claim.requeue" in actions and actions[-1] == "claim.ack"
