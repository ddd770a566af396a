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
