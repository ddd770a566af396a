"""The operations port answers only requests that name it: every route refuses a ``Host``
that is not a loopback name or its listen address with its port (a page from elsewhere
reaching 127.0.0.1 through a DNS name of its own), unless ``host_names`` lets a reverse
proxy's name in. From outside: ``bridge init`` and ``bridge serve``, raw HTTP requests."""

from __future__ import annotations

import http.client
from pathlib import Path

from ops_support import bridge, serve

from bridge.demo import free_port

ROUTES = ("/", "/metrics", "/healthz", "/readyz")


def get(port: int, path: str, host: str | None) -> int:
    """``GET path`` on 127.0.0.1:port with exactly this ``Host`` header (None: none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _init(root: Path) -> tuple[Path, int]:
    ops = free_port()
    run = bridge("init", "hospital", str(root), "--port", str(free_port()),
                 "--ops-port", str(ops))
    assert run.returncode == 0, run.stderr
    return root / "hospital.toml", ops


def test_every_route_refuses_a_host_that_does_not_name_the_port(tmp_path: Path) -> None:
    config, port = _init(tmp_path)
    hospital = serve(config)
    try:
        for path in ROUTES:
            for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{port + 1}",
                         f"localhost.attacker.example:{port}"):
                assert get(port, path, host) == 403, (path, host)
            assert get(port, path, None) in (400, 403), path  # HTTP/1.1 requires a Host
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                         f"LOCALHOST:{port}"):
                # /readyz may say 503 (no partner answers), never that the name is wrong.
                assert get(port, path, host) in (200, 503), (path, host)
    finally:
        hospital.stop()


def test_host_names_let_a_proxy_name_in_only_with_allow_remote(tmp_path: Path) -> None:
    config, port = _init(tmp_path)
    text = config.read_text(encoding="utf-8")
    named = text.replace('[operations]', '[operations]\nhost_names = ["ops.example.internal"]', 1)
    config.write_text(named, encoding="utf-8")
    run = bridge("serve", "--config", str(config))
    assert run.returncode == 2 and "host_names" in run.stderr and "allow_remote" in run.stderr
    config.write_text(named.replace('[operations]', '[operations]\nallow_remote = true', 1),
                      encoding="utf-8")
    hospital = serve(config)
    try:
        for path in ROUTES:
            for host in ("ops.example.internal", f"ops.example.internal:{port}",
                         f"127.0.0.1:{port}"):
                assert get(port, path, host) in (200, 503), (path, host)
            assert get(port, path, f"attacker.example:{port}") == 403, path
            assert get(port, path, "ops.example.internal:1") == 403, path
    finally:
        hospital.stop()
