"""Controllers made with ``bridge init`` and run as ``bridge serve`` subprocesses, as an
operator runs them, for the operations port tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bridge.demo import free_port


def bridge(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def init_site(root: Path, role: str = "hospital") -> Path:
    """``bridge init ROLE site`` in ``root`` on ports chosen by the system (``root`` is
    returned: commands run there name ``site/hospital.toml``)."""
    made = bridge("init", role, "site", "--port", "0", "--ops-port", "0", cwd=root)
    assert made.returncode == 0, made.stderr
    return root


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    ready: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines()


def serve(config: Path, *extra: str, timeout: float = 60) -> Serve:
    """Start ``bridge serve`` and wait for its ``ready`` line (stderr goes to a file).

    The configured port was free when the test chose it; between a process stopping and
    the next starting on it, any outgoing connection on the host may hold the same
    number as its local port for a moment. A start refused as port-in-use is tried again
    for up to ten seconds (the bridge itself refuses at once, as an operator wants)."""
    for _ in range(20):
        try:
            return _serve_once(config, *extra, timeout=timeout)
        except _PortBusy:
            time.sleep(0.5)
    return _serve_once(config, *extra, timeout=timeout)


class _PortBusy(AssertionError):
    pass


def _serve_once(config: Path, *extra: str, timeout: float) -> Serve:
    log = config.with_suffix(f".{len(list(config.parent.glob(config.stem + '.*.log')))}.log")
    err = log.open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=dict(os.environ),
    )
    err.close()
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready") or time.monotonic() > deadline:
        proc.kill()
        proc.wait()
        said = log.read_text()
        if "[port-in-use]" in said:
            raise _PortBusy(f"bridge serve did not start: {said}")
        raise AssertionError(f"bridge serve did not start: {line!r} {said}")
    return Serve(proc, line.strip(), log)


@dataclass
class Site:
    root: Path
    hospital: Path
    insurer: Path
    ports: dict[str, int] = field(default_factory=dict)

    def ops(self, who: str) -> str:
        return f"http://127.0.0.1:{self.ports[who + '-ops']}"


def make_site(root: Path, *, fast_retries: bool = False) -> Site:
    """An insurer and a hospital initialised in ``root`` on free ports."""
    ports = {
        "insurer": free_port(),
        "insurer-ops": free_port(),
        "hospital": free_port(),
        "hospital-ops": free_port(),
    }
    for role in ("insurer", "hospital"):
        run = bridge(
            "init", role, str(root), "--port", str(ports[role]),
            "--ops-port", str(ports[f"{role}-ops"]),
        )
        assert run.returncode == 0, run.stderr
    hospital = root / "hospital.toml"
    if fast_retries:
        text = hospital.read_text(encoding="utf-8")
        text = text.replace(
            'purpose = "HPAYMT"\n',
            'purpose = "HPAYMT"\ngive_up_after = "4s"\nretry_base_seconds = 0.05\n'
            "retry_cap_seconds = 0.1\nrequest_timeout_seconds = 2\n",
        )
        hospital.write_text(text, encoding="utf-8")
    return Site(root, hospital, root / "insurer.toml", ports)


def http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def wait_for(predicate, *, timeout: float = 30, every: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def form_token(page: str) -> str:
    found = re.search(r"name='operator-token' content='([^']+)'", page)
    assert found, "no operator token on the page"
    return found.group(1)


__all__ = ["Serve", "Site", "bridge", "form_token", "http", "init_site", "make_site", "serve",
           "wait_for"]
