"""A hospital bridge taking HL7 v2 over MLLP, routing to an insurer bridge: both real.

The hospital listens for MLLP (over mutual TLS unless told otherwise) with routing
rules in its configuration; the insurer is the demo's. HL7 messages are sent by a
plain asyncio client with the HIS's own certificate, as an HIS would.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from delivery_support import link_settings
from e2e_support import client_ssl, make_workdir

from bridge.config import load_config
from bridge.demo import HOSPITAL, INSURER, LINK_OUT
from bridge.link.mllp_framer import MLLPFramer, frame
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.policy.engine import build_consent

ID_CARD = "urn:oid:2.16.156.10011.1.3"
CLAIMS_ROUTE = f'''
[[routes]]
id = "inpatient-claims"
message = ["ADT^A03"]
dataset = ["WS445.10"]
links = ["{LINK_OUT}"]
'''


@dataclass
class IntakePair:
    root: Path
    hospital: BridgeService
    insurer: BridgeService
    tls: bool

    @property
    def mllp_port(self) -> int:
        assert self.hospital.mllp_port is not None
        return self.hospital.mllp_port

    def his_ssl(self) -> ssl.SSLContext | None:
        return client_ssl(self.root, HOSPITAL) if self.tls else None

    async def send(self, messages: list[bytes]) -> list[bytes]:
        return await mllp_exchange(self.mllp_port, messages, self.his_ssl())

    async def stop(self) -> None:
        await self.hospital.stop()
        await self.insurer.stop()


async def start_intake_pair(root: Path, *, routes: str = CLAIMS_ROUTE, tls: bool = True,
                            intake: str = "", start_insurer: bool = True,
                            link: dict[str, Any] | None = None) -> IntakePair:
    """``link``: keys added to the hospital's outbound link."""
    hospital_cfg, insurer_cfg = make_workdir(root)
    if link:
        link_settings(hospital_cfg, **link)
    mllp = 'host = "127.0.0.1"\nport = 0\n' + ("tls = true\n" if tls else "tls = false\n")
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write(f"\n[mllp]\n{mllp}\n[intake]\n{intake}\n{routes}")
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    if start_insurer:
        await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    return IntakePair(root, hospital, insurer, tls)


async def mllp_exchange(port: int, messages: list[bytes],
                        ssl_context: ssl.SSLContext | None) -> list[bytes]:
    """Send each message and wait for its ACK before the next (original mode)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    framer = MLLPFramer()
    acks: list[bytes] = []
    try:
        for message in messages:
            writer.write(frame(message))
            await writer.drain()
            got: list[bytes] = []
            while not got:
                data = await asyncio.wait_for(reader.read(65536), timeout=10)
                if not data:
                    raise ConnectionError("the bridge closed the connection")
                got = framer.feed(data)
            acks += got
        return acks
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def msa(ack: bytes) -> list[str]:
    for segment in ack.decode("utf-8", "replace").split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")
    raise AssertionError("no MSA segment")


def after_header(ack: bytes) -> str:
    """The ACK without its MSH: what it says about the message, not its own time and id."""
    return "\r".join(segment for segment in ack.decode("utf-8", "replace").split("\r")
                     if not segment.startswith("MSH|"))


def err(ack: bytes) -> list[str]:
    for segment in ack.decode("utf-8", "replace").split("\r"):
        if segment.startswith("ERR|"):
            return segment.split("|")
    raise AssertionError("no ERR segment")


def consent(id_card: str, *, consent_id: str = "c-1") -> dict[str, Any]:
    now = datetime.now(UTC)
    return build_consent(consent_id=consent_id, patient_system=ID_CARD, patient_value=id_card,
                         recipient=INSURER, purposes=["HPAYMT"],
                         start=now - timedelta(days=1), end=now + timedelta(days=30),
                         sensitive_classes=(), hospital_partner_id=HOSPITAL)


async def eventually(check: Callable[[], Awaitable[bool] | bool], *,
                     timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
