"""The status page against a page from elsewhere that the operator's browser shows.

The requeue form carries a token another origin cannot read, so a page from elsewhere
cannot post it; but it could show the status page inside a frame of its own, dressed
so that the operator clicks "requeue" without knowing (clickjacking). The operations
port forbids being framed, and its pages load nothing from anywhere: Debian's
Chromium, headless, loads such a page from another origin and finds the frame empty.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ops_support import http, make_site, serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from bridge.demo import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "the status page tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def elsewhere(body: str) -> tuple[ThreadingHTTPServer, str]:
    """A web page served from another origin (another port)."""
    page = body.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}/"


def test_the_status_page_cannot_be_framed_by_another_origin(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    site = make_site(tmp_path)
    hospital = serve(site.hospital)
    ops = site.ops("hospital")
    server, url = elsewhere(
        f"<!doctype html><title>prize</title><iframe id='f' src='{ops}/' width='900'"
        " height='600'></iframe>")
    try:
        # The page itself loads in the browser as before.
        browser.get(ops + "/")
        assert browser.find_elements(By.CSS_SELECTOR, "table#links")
        # Framed by another origin, nothing of it is shown.
        browser.get(url)
        frame = browser.find_element(By.ID, "f")
        browser.switch_to.frame(frame)
        assert browser.find_elements(By.CSS_SELECTOR, "table#links") == []
        browser.switch_to.default_content()
        status, _ = http(ops + "/")
        assert status == 200
    finally:
        server.shutdown()
        hospital.stop()


@pytest.mark.battery  # two bridge serve processes and a browser: about 25 s
def test_the_insurer_page_shows_where_received_claims_are_going(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    """The insurer's operator sees on the page whether received claims reach the claim
    system: per destination, waiting, delivered, dead and the failure going on now."""
    from ops_support import bridge, wait_for

    site = make_site(tmp_path)
    with site.insurer.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[[handoff]]\nid = "claims-system"\nkind = "http"\n'
                 f'url = "http://127.0.0.1:{free_port()}/intake"\n'
                 "retry_base_seconds = 0.05\nretry_cap_seconds = 0.3\ntimeout_seconds = 2\n")
    samples = site.root / "hospital-a" / "samples"
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples / "consent.json")).returncode == 0
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        assert bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                      str(samples / "claim-1.json")).returncode == 0

        def failing_row() -> bool:
            browser.get(site.ops("insurer") + "/")
            rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-destination='claims-system']")
            return bool(rows) and "failing" in rows[0].text

        wait_for(failing_row, what="the hand-off failing on the insurer's page")
        row = browser.find_element(By.CSS_SELECTOR, "tr[data-destination='claims-system']")
        state = row.find_element(By.CSS_SELECTOR, "[data-field='state']").text
        assert state == "failing: http-unreachable"
        assert row.find_element(By.CSS_SELECTOR, "[data-field='waiting']").text == "1"
        assert row.find_element(By.CSS_SELECTOR, "[data-field='delivered']").text == "0"
    finally:
        hospital.stop()
        insurer.stop()
