"""The insurer's side of a hand-off, as its integration team would build it.

A claim-system HTTP endpoint (aiohttp) and a RabbitMQ consumer (aio-pika), both
written from the README's description of the envelope with standard libraries only,
both deduplicating on (sender, message identity) and counting raw deliveries too;
and a TCP fault proxy that cuts and refuses connections to the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import rfc8785
from aiohttp import web

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Received:
    """What one consumer saw: every raw delivery, and each identity once."""

    raw: list[tuple[str, str, int]] = field(default_factory=list)  # (sender, id, sequence)
    first: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    order: list[tuple[str, str, int]] = field(default_factory=list)  # first arrivals

    def take(self, sender: str, message_id: str, envelope: dict[str, Any]) -> None:
        seq = int(envelope["sequence"])
        self.raw.append((sender, message_id, seq))
        if (sender, message_id) not in self.first:
            self.first[(sender, message_id)] = envelope
            self.order.append((sender, message_id, seq))

    @property
    def ids(self) -> set[str]:
        return {m for _, m in self.first}

    def in_order_per_sender(self) -> bool:
        """First arrivals of each sender come in increasing sequence."""
        last: dict[str, int] = {}
        for sender, _mid, seq in self.order:
            if seq <= last.get(sender, 0):
                return False
            last[sender] = seq
        return True


def canonical_payload(message: dict[str, Any]) -> bytes:
    """PROTOCOL §5: the RFC 8785 form of the bundle without ``signature``."""
    return rfc8785.dumps({k: v for k, v in message.items() if k != "signature"})


def canonical_digest(message: dict[str, Any]) -> str:
    """PROTOCOL §5: SHA-256 of the signed payload."""
    return "sha256:" + hashlib.sha256(canonical_payload(message)).hexdigest()


def verify_signature(message: dict[str, Any], signing_cert: Path) -> None:
    """PROTOCOL §5 with standard tools only: the detached ES256 JWS in
    ``Bundle.signature.data`` over the canonical payload; raises if it does not verify."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    def b64url(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    compact = base64.b64decode(message["signature"]["data"]).decode()
    header_b64, empty, sig_b64 = compact.split(".")
    assert empty == "", "the payload must be detached"
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    assert header["alg"] == "ES256"
    payload = canonical_payload(message)
    raw = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
    signature = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    key = x509.load_pem_x509_certificate(signing_cert.read_bytes()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, header_b64.encode() + b"." + b64url(payload),
               ec.ECDSA(hashes.SHA256()))


def receipt_extension(receipt: dict[str, Any], url: str) -> Any:
    header = receipt["entry"][0]["resource"]
    for ext in header.get("extension", []):
        if ext["url"] == url:
            return next(v for k, v in ext.items() if k.startswith("value"))
    return None


class ClaimEndpoint:
    """The insurer's claim system over HTTP: answers 200, or ``fail_with`` while set."""

    def __init__(self, port: int, *, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.fail_with: int | None = None
        self.got = Received()
        self.headers_seen: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/claims"

    async def _post(self, request: web.Request) -> web.Response:
        if self.fail_with is not None:
            return web.Response(status=self.fail_with, text="claim system not taking claims")
        if self.delay:
            await asyncio.sleep(self.delay)
        envelope = json.loads(await request.read())
        self.headers_seen.append(dict(request.headers))
        self.got.take(request.headers["X-Bridge-Sender"], request.headers["X-Bridge-Message-Id"],
                      envelope)
        return web.Response(status=202, text="taken")

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/claims", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class QueueConsumer:
    """The insurer's claim system reading a RabbitMQ queue (acks after recording)."""

    def __init__(self, queue: str, got: Received | None = None) -> None:
        self.queue = queue
        self.got = got if got is not None else Received()
        self.properties: list[aio_pika.abc.AbstractIncomingMessage] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect(AMQP_URL)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(self.queue, durable=True)
        await queue.consume(self._on_message)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        envelope = json.loads(message.body)
        headers = message.headers
        self.properties.append(message)
        self.got.take(str(headers["x-bridge-sender"]), str(message.message_id), envelope)
        await message.ack()

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


async def delete_queue(name: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(name)
    finally:
        await connection.close()


def unique_queue(prefix: str = "test-handoff") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class FaultProxy:
    """A TCP proxy to ``target``: ``cut()`` drops every open connection; ``stop()`` then
    leaves the port closed (connection refused) until ``start()`` again."""

    def __init__(self, port: int, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.port = port
        self.target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update({writer, up_writer})

    def cut(self) -> None:
        for w in list(self._writers):
            transport = w.transport
            transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()


def add_destinations(config: Path, *, http_url: str | None = None,
                     amqp_url: str | None = None, queue: str | None = None,
                     extra: str = "", timeout: float = 2) -> None:
    """Append hand-off destinations to a controller's TOML file (fast retries)."""
    text = config.read_text(encoding="utf-8")
    fast = (f"retry_base_seconds = 0.05\nretry_cap_seconds = 0.3\ntimeout_seconds = {timeout}\n"
            + extra)
    if http_url is not None:
        text += f'\n[[handoff]]\nid = "claims-http"\nkind = "http"\nurl = "{http_url}"\n{fast}'
    if amqp_url is not None:
        text += (f'\n[[handoff]]\nid = "claims-amqp"\nkind = "amqp"\nurl = "{amqp_url}"\n'
                 f'queue = "{queue}"\n{fast}')
    config.write_text(text, encoding="utf-8")


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    async def waiter() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    return waiter()


class Serve:
    """``bridge serve --config FILE`` in its own process, its log kept in a file."""

    def __init__(self, config: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: list[str] = []

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--config", str(self.config),
                 *self.args],
                stdout=subprocess.PIPE, stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(b"ready "), self.log.read_text()
        self.ready = line.decode().split()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def fast_hospital(config: Path) -> None:
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace(
        'purpose = "HPAYMT"\n',
        'purpose = "HPAYMT"\nretry_base_seconds = 0.05\nretry_cap_seconds = 0.3\n'
        "max_attempts = 1000\nrequest_timeout_seconds = 2\n", 1), encoding="utf-8")
