"""The operations port while the PostgreSQL store stops answering (a network that drops
packets, a server stuck on a lock): ``/healthz`` answers, ``/readyz`` says 503 naming
the store, and neither the status page nor ``/metrics`` hangs: the page says the store
does not answer, the scrape fails at once. When the store answers again, so do they.

The store is reached through a proxy that stops forwarding without closing anything,
which is how such an outage looks to the bridge.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from e2e_support import make_workdir
from handoff_support import Serve
from pg_support import PGSchema, fresh_schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bridge.demo import free_port


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding while keeping connections open."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.frozen = False
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    while self.frozen:
                        await asyncio.sleep(0.05)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


async def fetch(url: str) -> tuple[int | str, float, str]:
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session, \
                session.get(url) as resp:
            return resp.status, time.monotonic() - started, await resp.text()
    except TimeoutError:
        return "no answer", time.monotonic() - started, ""


async def test_the_operations_port_answers_while_the_store_hangs(
    tmp_path: Path, pg_schema: PGSchema
) -> None:
    _, insurer_cfg = make_workdir(tmp_path)
    info = conninfo_to_dict(pg_schema.dsn)
    proxy = FreezingProxy((str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))))
    await proxy.start()
    dsn = make_conninfo(pg_schema.dsn, host="127.0.0.1", port=str(proxy.port))
    text = insurer_cfg.read_text(encoding="utf-8").replace(
        "[store]\n", f'[store]\nkind = "postgresql"\ndsn = "{dsn}"\n'
        f'schema = "{pg_schema.schema}"\n', 1)
    insurer_cfg.write_text(text + "\n[operations]\nport = 0\n", encoding="utf-8")
    serve = Serve(insurer_cfg, tmp_path / f"insurer-{uuid.uuid4().hex[:6]}.log")
    await serve.start()
    ops = next(w.removeprefix("operations=") for w in serve.ready if w.startswith("operations="))
    try:
        status, _, _ = await fetch(ops + "/readyz")
        assert status == 200
        proxy.frozen = True
        ready, metrics, page, health = await asyncio.gather(
            fetch(ops + "/readyz"), fetch(ops + "/metrics"), fetch(ops + "/"),
            fetch(ops + "/healthz"))
        assert health[0] == 200
        assert ready[0] == 503 and "store not reachable" in ready[2]
        assert metrics[0] == 503 and metrics[1] < 10, metrics[:2]
        assert page[0] == 200 and page[1] < 10, page[:2]
        assert "store not reachable" in page[2]
        proxy.frozen = False
        status, _, body = await fetch(ops + "/metrics")
        assert status == 200 and "bridge_store_up 1.0" in body
    finally:
        proxy.frozen = False
        serve.stop()
        await proxy.stop()
