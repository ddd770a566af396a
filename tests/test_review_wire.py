"""The listener under attack from outside: values at the edges of what a partner may send,
requests that are not HTTP the router knows, certificates that name too much, and what
of all that reaches the audit trail, the answers and the logs.

Requests go over real sockets with real certificates (aiohttp, or raw TLS where the
request itself is malformed); the bridge runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pull_support import (
    HOSPITAL,
    INSURER,
    PLATFORM,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
)
from test_mllp_listener import PLAIN, exchange, seg, start_bridge

from bridge.link.mllp import default_handler
from bridge.link.mllp_framer import frame


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await start_site(tmp_path)
    try:
        yield s
    finally:
        await s.stop()


def audit(site: PullSite, *actions: str) -> list[Any]:
    return [e.record for e in site.controller.store.audit_entries()
            if not actions or e.record.action in actions]


# --- values at the edges of the calendar ---------------------------------------------------


async def test_a_consent_from_the_beginning_of_time_is_recorded_not_failed(
    site: PullSite,
) -> None:
    records = person_records(1)
    consent = pull_consent(records[0], consent_id="always")
    consent["provision"]["period"] = {"start": "0001-01-01", "end": "9999-12-31"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(HOSPITAL))) as own,
        own.post(f"{site.base}/Consent", data=orjson.dumps(consent),
                 headers={"Content-Type": "application/fhir+json"}) as resp,
    ):
        assert resp.status == 201, await resp.text()
    assert audit(site, "request.failed") == []
    # And it permits: the platform reads the patient under it.
    await keep(site, records)
    system, value = id_card(records[0])
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(f"{site.base}/Patient", params={"identifier": f"{system}|{value}"}) as resp,
    ):
        page = orjson.loads(await resp.read())
    assert resp.status == 200 and page["total"] == 1


async def test_an_hl7_time_off_the_calendar_is_ae_naming_the_field(tmp_path: Path) -> None:
    bridge = await start_bridge(tmp_path, PLAIN)
    try:
        assert bridge.service.mllp is not None
        bridge.service.mllp.handler = default_handler()
        golden = (Path(__file__).parent / "golden" / "hl7v2" / "adt_a01-01.hl7").read_bytes()
        segments = golden.decode().split("\r")
        pid = next(i for i, s in enumerate(segments) if s.startswith("PID|"))
        pv1 = next(i for i, s in enumerate(segments) if s.startswith("PV1|"))
        fields = segments[pid].split("|")
        fields[7] = "99000101"
        segments[pid] = "|".join(fields)
        fields = segments[pv1].split("|")
        fields[44] = "99991231235900-1200"  # in China Standard Time: year 10000
        segments[pv1] = "|".join(fields)
        [ack] = await exchange(bridge.port, [frame("\r".join(segments).encode())], 1)
        assert seg(ack, "MSA")[1] == "AE"
        err = seg(ack, "ERR")
        assert err[2].startswith("PV1^1^44") and err[3].startswith("102^"), err
        assert bridge.store.hl7_count() == 0
    finally:
        await bridge.service.stop()


# --- what is echoed, audited and logged ----------------------------------------------------


def raw_exchange(site: PullSite, who: str, data: bytes, *, first: bool = False) -> bytes:
    """Send ``data`` as it is over a mutual-TLS connection; everything the bridge answers
    until it closes (``first``: until the first complete response)."""
    ctx = site.ssl(who)
    with (
        socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(data)
        out = b""
        while not (first and _complete(out)):
            try:
                chunk = tls.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


VALUE = "110101199003071234"  # shaped like a resident identity card number


@pytest.mark.parametrize(
    ("who", "request_line", "status"),
    [
        (PLATFORM, f"GET /fhir/{VALUE} HTTP/1.1", 404),
        (PLATFORM, f"DELETE /fhir/Patient/{VALUE} HTTP/1.1", 405),
        (PLATFORM, f"GET /fhir/Patient/{VALUE}/zz HTTP/1.1", 404),
        ("clinic-x", f"GET /fhir/{VALUE} HTTP/1.1", 401),
        ("clinic-x", f"GET /elsewhere/{VALUE}?identifier=x HTTP/1.1", 401),
    ],
)
async def test_requests_outside_the_routes_echo_and_audit_no_part_of_the_path(
    site: PullSite, who: str, request_line: str, status: int, caplog: pytest.LogCaptureFixture,
) -> None:
    data = f"{request_line}\r\nHost: bridge\r\nConnection: close\r\n\r\n".encode()
    got, headers, body = split(await asyncio.to_thread(raw_exchange, site, who, data))
    assert got == status
    assert headers["content-type"].startswith("application/fhir+json")
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert VALUE not in body.decode()
    trail = orjson.dumps([e.__dict__ for e in audit(site)], default=str).decode()
    assert VALUE not in trail
    assert VALUE not in caplog.text


@pytest.mark.parametrize(
    "data",
    [
        # A request line longer than the parser takes, the patient's identifier first.
        (f"GET /fhir/Patient?identifier=urn:oid:2.16.156.10011.1.3%7C{VALUE}&x={'a' * 9000}"
         " HTTP/1.1\r\nHost: bridge\r\n\r\n"),
        # A header longer than the parser takes.
        (f"GET /fhir/metadata HTTP/1.1\r\nHost: bridge\r\nX-Emergency-Reason: {VALUE}"
         f"{'a' * 9000}\r\n\r\n"),
        # Both a length and a chunked body: request smuggling shapes are refused.
        ("POST /fhir/Consent HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/fhir+json\r\n"
         f"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nX-Patient: {VALUE}\r\n\r\n0\r\n\r\n"),
        # Not a method.
        f"G\x01T /fhir/{VALUE} HTTP/1.1\r\nHost: bridge\r\n\r\n",
    ],
)
async def test_malformed_http_gets_an_outcome_and_no_value_in_the_logs(
    site: PullSite, data: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    got, headers, body = split(await asyncio.to_thread(raw_exchange, site, PLATFORM,
                                                       data.encode("latin-1")))
    assert got == 400
    assert headers["content-type"].startswith("application/fhir+json")
    outcome = orjson.loads(body)
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "parse-error"
    assert VALUE not in body.decode()
    assert VALUE not in caplog.text
    assert audit(site, "request.failed") == []


# --- whom a certificate names ---------------------------------------------------------------


def _client_certificate(site: PullSite, folder: Path, uris: list[str]) -> ssl.SSLContext:
    """A TLS client certificate from the site's CA with exactly these URI SANs."""
    pki = site.root / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "two-names")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "c.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(folder / "c.pem", folder / "c.key")
    return ctx


@pytest.mark.parametrize(
    "uris",
    [
        # Two partners in one certificate: it is neither.
        ["urn:ws-fhir-bridge:partner:platform-r", "urn:ws-fhir-bridge:partner:insurer-b"],
        # This controller and a partner: neither its own systems nor the partner.
        ["urn:ws-fhir-bridge:partner:hospital-a", "urn:ws-fhir-bridge:partner:platform-r"],
        # Partner ids are lower case; another spelling names nobody.
        ["urn:ws-fhir-bridge:partner:Platform-R"],
        ["urn:ws-fhir-bridge:partner:HOSPITAL-A"],
    ],
)
async def test_a_certificate_naming_no_one_partner_is_401_unknown_partner(
    site: PullSite, tmp_path: Path, uris: list[str]
) -> None:
    ctx = _client_certificate(site, tmp_path / "client", uris)
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    system, value = id_card(records[0])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        for method, path in [("GET", "metadata"), ("GET", f"Patient?identifier={system}|{value}"),
                             ("GET", "Consent/pull-1"), ("POST", "Consent"),
                             ("POST", "$process-message")]:
            async with session.request(method, f"{site.base}/{path}", data=b"{}",
                                       headers={"Content-Type": "application/fhir+json"}) as resp:
                body = orjson.loads(await resp.read())
            assert resp.status == 401, (path, body)
            assert body["issue"][0]["details"]["coding"][0]["code"] == "unknown-partner"


# --- bounded audit on requests from certificates that name no partner ------------------------


@pytest.mark.parametrize(
    ("who", "sent"),
    [
        # A certificate of the trusted CA that names no registered partner.
        ("clinic-x", b"GET /fhir/metadata HTTP/1.1\r\nHost: bridge\r\n\r\n"),
        # A registered partner pulling without a pull link.
        (INSURER, b"GET /fhir/Patient?identifier=a%7Cb HTTP/1.1\r\nHost: bridge\r\n\r\n"),
        # A pull partner posting claims without an inbound link.
        (PLATFORM, (b"POST /fhir/$process-message HTTP/1.1\r\nHost: bridge\r\n"
                   b"Content-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}")),
    ],
)
async def test_repeated_401_refusals_write_bounded_audit_rows(
    tmp_path: Path, who: str, sent: bytes
) -> None:
    """A certificate refused for whom it names (nobody, or a partner without a link for
    this route) is refused on every request; repeating it must not write one durable
    audit row per request (each a synchronous commit), only a count."""
    site = await start_site(tmp_path)
    stopped = False
    try:
        requests = 60

        def hammer() -> list[int]:
            statuses = []
            ctx = site.ssl(who)

            def connect() -> ssl.SSLSocket:
                return ctx.wrap_socket(socket.create_connection(("127.0.0.1", site.port)),
                                       server_hostname="127.0.0.1")

            sock = connect()
            try:
                for _ in range(requests):
                    try:
                        sock.sendall(sent)
                        head = sock.recv(65536)
                    except (ssl.SSLError, OSError):
                        head = b""
                    if not head:  # the bridge closed the connection: open another
                        sock.close()
                        sock = connect()
                        sock.sendall(sent)
                        head = sock.recv(65536)
                    statuses.append(int(head.split(b" ")[1]))
            finally:
                sock.close()
            return statuses

        statuses = await asyncio.to_thread(hammer)
        assert statuses == [401] * requests
        rows = [r for r in audit(site) if (r.detail or "").startswith("unknown-partner")]
        assert 1 <= len(rows) <= 2, len(rows)
        assert rows[0].digest is not None and rows[0].digest.startswith("sha256:")
        assert rows[0].partner == (None if who == "clinic-x" else who)
        await site.stop()
        stopped = True
        # Every refusal is still counted in the trail when the window closes.
        from bridge.ledger.sqlite import SQLiteStore

        with SQLiteStore(site.root / HOSPITAL / "bridge.sqlite") as store:
            details = [e.record.detail or "" for e in store.audit_entries()
                       if (e.record.detail or "").startswith("unknown-partner")]
        counted = 1 + sum(int(d.split("repeated=")[1]) for d in details if "repeated=" in d)
        assert counted == requests, details
    finally:
        if not stopped:
            await site.stop()


async def test_a_partner_reading_a_consent_is_refused_and_named_in_the_audit(
    site: PullSite,
) -> None:
    records = person_records(1)
    await site.controller.put_consent(pull_consent(records[0]))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(f"{site.base}/Consent/pull-1") as resp,
    ):
        body = orjson.loads(await resp.read())
    assert resp.status == 403 and body["resourceType"] == "OperationOutcome"
    assert "provision" not in orjson.dumps(body).decode()
    refused = [r for r in audit(site, "message.reject") if r.subject == "Consent"]
    assert refused and refused[-1].partner == PLATFORM


# --- bodies that never come ---------------------------------------------------------------


async def test_a_declared_body_over_the_limit_is_413_at_once(site: PullSite) -> None:
    data = (b"POST /fhir/Consent HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/fhir+json"
            b"\r\nContent-Length: 99999999999\r\n\r\n{")
    loop = asyncio.get_running_loop()
    started = loop.time()
    got, headers, body = split(await asyncio.to_thread(raw_exchange, site, HOSPITAL, data,
                                                       first=True))
    assert got == 413 and loop.time() - started < 5
    assert orjson.loads(body)["issue"][0]["details"]["coding"][0]["code"] == "payload-too-large"
    assert headers.get("connection", "").lower() == "close"


async def test_clients_that_go_away_mid_body_are_no_failure_of_the_receiver(
    site: PullSite,
) -> None:
    """A client that hangs up before its body is complete has failed, not the bridge:
    no ``request.failed`` entry (one each would be an audit row per dropped connection)."""

    def hang_up() -> None:
        ctx = site.ssl(PLATFORM)
        with (
            socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock,
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"POST /fhir/Consent HTTP/1.1\r\nHost: bridge\r\n"
                        b"Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{")

    for _ in range(20):
        await asyncio.to_thread(hang_up)
    await asyncio.sleep(0.5)
    assert audit(site, "request.failed") == []
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(f"{site.base}/metadata") as resp,
    ):
        assert resp.status == 200
