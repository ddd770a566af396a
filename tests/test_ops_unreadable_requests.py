"""The operations port answers what it cannot read, and what it did not say, without
repeating it: a request the HTTP parser refuses, a requeue body that is not a readable
form, and a status page address naming a notice the bridge did not give each get a
fixed answer of the bridge's own, and neither the answer nor the log holds a byte of
what was sent. From outside: ``bridge init`` and ``bridge serve``, raw bytes on a socket.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.parse
from collections.abc import Iterator

import pytest
from ops_support import Serve, bridge, form_token, http, serve

from bridge.demo import free_port

#: What a sender may put where it does not belong: a resident ID number and a name.
ID_NUMBER = "110101199003074512"
NAME = "张三"
SENT = (ID_NUMBER, NAME, urllib.parse.quote(NAME), NAME.encode().decode("latin-1"))


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, int]]:
    root = tmp_path_factory.mktemp("ops-unreadable")
    port = free_port()
    made = bridge("init", "hospital", str(root), "--port", str(free_port()),
                  "--ops-port", str(port))
    assert made.returncode == 0, made.stderr
    hospital = serve(root / "hospital.toml", "--log-format", "json", "--log-level", "info")
    try:
        yield hospital, port
    finally:
        hospital.stop()


def exchange(port: int, data: bytes, *more: bytes) -> tuple[int, bytes, bytes]:
    """Send ``data`` as it is on a new connection, then each of ``more`` a moment apart
    (the server has begun on the request); the status, head and body answered."""

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for piece in (data, *more):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.2)
            return await asyncio.wait_for(reader.read(1 << 20), timeout=15)
        finally:
            writer.close()

    answer = asyncio.run(run())
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, head, body


def request(port: int, method: str, target: bytes, body: bytes = b"",
            **headers: str) -> bytes:
    """One request with a loopback ``Host`` and ``Connection: close``."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1",
             f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}".encode() for name, value in headers.items()]
    if body and "Transfer_Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_nothing_repeated(hospital: Serve, *answers: bytes) -> None:
    """No answer and no log line holds a sent value; the log has no traceback and no
    error line."""
    for answer in answers:
        for value in SENT:
            assert value.encode("utf-8", "surrogateescape") not in answer, answer
    lines = hospital.log_lines()
    text = "\n".join(lines)
    for value in SENT:
        assert value not in text, [line for line in lines if value in line]
    assert "Traceback" not in text and "Error handling request" not in text, text
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert not [e for e in events if e.get("level") in ("error", "critical")], events


def test_a_request_the_parser_cannot_read_gets_a_fixed_400(ops: tuple[Serve, int]) -> None:
    hospital, port = ops
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    unreadable = [
        # Bytes that are not ASCII in the query (an identifier and a name).
        f"GET /metrics?id={ID_NUMBER}&n={NAME} HTTP/1.1\r\n".encode() + host + b"\r\n",
        f"GET /?refused={NAME} HTTP/1.1\r\n".encode() + host + b"\r\n",
        # A request line longer than the parser takes.
        f"GET /?id={ID_NUMBER}{'0' * 9000} HTTP/1.1\r\n".encode() + host + b"\r\n",
        # A header that is not a header, a header name with a space, a bad method.
        b"GET / HTTP/1.1\r\n" + host + f"{ID_NUMBER}\r\n\r\n".encode(),
        b"GET / HTTP/1.1\r\n" + host + f"X {ID_NUMBER}: 1\r\n\r\n".encode(),
        f"G{ID_NUMBER}( / HTTP/1.1\r\n".encode() + host + b"\r\n",
        # A body both chunked and with a length.
        b"POST /requeue HTTP/1.1\r\n" + host + b"Content-Length: 18\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + ID_NUMBER.encode(),
    ]
    answers = []
    for data in unreadable:
        status, head, body = exchange(port, data)
        assert status == 400, (data[:60], head, body)
        assert body == b"the HTTP request could not be read\n", body
        assert b"text/plain" in head.lower()
        answers.append(head + body)
    # The port still answers a request it can read.
    assert http(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert_nothing_repeated(hospital, *answers)


def test_an_unknown_expect_gets_a_fixed_417(ops: tuple[Serve, int]) -> None:
    """An Expect the port does not understand is refused in the port's own words, on
    any path and method, never quoting the header."""
    hospital, port = ops
    expect = f"{ID_NUMBER} {NAME}".encode().decode("latin-1")
    answers = []
    for method, target in (("GET", b"/healthz"), ("GET", b"/nowhere"),
                           ("POST", b"/requeue")):
        status, head, body = exchange(port, request(port, method, target, b"x=1",
                                                    Expect=expect))
        assert status == 417, (target, head, body)
        assert b"text/plain" in head.lower()
        assert body == b"only 'Expect: 100-continue' is understood\n", body
        answers.append(head + body)
    # Other refusals are aiohttp's own, unchanged: a 405 names the methods allowed.
    status, head, _ = exchange(port, request(port, "POST", b"/metrics", b"x=1"))
    assert status == 405 and b"allow: get,head" in head.lower(), head
    assert http(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert_nothing_repeated(hospital, *answers)


def test_a_requeue_body_that_cannot_be_read_gets_400_naming_the_form(
    ops: tuple[Serve, int],
) -> None:
    hospital, port = ops
    _status, page = http(f"http://127.0.0.1:{port}/")
    token = form_token(page)
    good = f"token={token}&message_id={ID_NUMBER}".encode()
    part = (f'--x\r\nContent-Disposition: form-data; name="message_id"\r\n'
            f"Content-Type: text/plain; charset={ID_NUMBER}\r\n\r\n{ID_NUMBER}\r\n--x--\r\n")
    bodies: list[tuple[bytes, dict[str, str]]] = [
        # A multipart body that ends inside a part's head.
        (b"--x\r\nfoo", {"Content_Type": "multipart/form-data; boundary=x"}),
        (f"--x\r\n{ID_NUMBER}\r\n\r\n".encode(),
         {"Content_Type": "multipart/form-data; boundary=x"}),
        # A part in a character set that does not exist; a form in one.
        (part.encode(), {"Content_Type": "multipart/form-data; boundary=x"}),
        (good, {"Content_Type": f"application/x-www-form-urlencoded; charset={ID_NUMBER}"}),
        # A compressed form that is not UTF-8.
        (gzip.compress(good + NAME.encode("gb18030")),
         {"Content_Type": "application/x-www-form-urlencoded", "Content_Encoding": "gzip"}),
        # A percent escape that is not UTF-8; a field given twice.
        (good + b"&note=%b2%c8", {"Content_Type": "application/x-www-form-urlencoded"}),
        (good + f"&message_id={ID_NUMBER}".encode(),
         {"Content_Type": "application/x-www-form-urlencoded"}),
        # Another kind of body altogether.
        (good, {"Content_Type": "text/plain"}),
    ]
    answers = []
    for body, headers in bodies:
        status, head, answer = exchange(port, request(port, "POST", b"/requeue", body, **headers))
        assert status == 400, (body[:40], headers, head, answer)
        assert answer.startswith(b"the requeue form is not read"), answer
        answers.append(head + answer)
    # Bytes the HTTP parser fails on while the form is read: a chunk size that is not a
    # number (sent after the head), compressed bytes that do not decompress.
    form = "application/x-www-form-urlencoded"
    chunked = (request(port, "POST", b"/requeue", Transfer_Encoding="chunked",
                       Content_Type=form), f"{ID_NUMBER}zz\r\n".encode())
    compressed = (request(port, "POST", b"/requeue", ID_NUMBER.encode() * 3,
                          Content_Type=form, Content_Encoding="gzip"),)
    for pieces in (chunked, compressed):
        status, head, answer = exchange(port, *pieces)
        assert status == 400, (pieces[0][:60], head, answer)
        assert answer == b"the request body could not be read\n", answer
        answers.append(head + answer)
    # A form that can be read still is.
    readable = urllib.parse.urlencode({"message_id": "urn:uuid:x", "token": token}).encode()
    status, page = http(f"http://127.0.0.1:{port}/requeue", data=readable)
    assert status == 200 and "Requeue refused: unknown-message" in page
    assert_nothing_repeated(hospital, *answers)


def test_the_status_page_shows_only_notices_of_its_own(ops: tuple[Serve, int]) -> None:
    hospital, port = ops
    base = f"http://127.0.0.1:{port}/"
    answers = []
    for query in (f"refused={ID_NUMBER}", f"requeued={ID_NUMBER}", f"notice={ID_NUMBER}",
                  f"notice={urllib.parse.quote(NAME)}", f"refused={urllib.parse.quote(NAME)}",
                  "notice=%ff%fe", "refused=%ff", "notice=requeued%00"):
        status, page = http(base + "?" + query)
        assert status == 200, (query, page)
        assert "id='notice'" not in page, query
        answers.append(page.encode())
    # A path no route serves and a method a route does not take are not repeated either.
    for method, target in (("GET", f"/{ID_NUMBER}?n={urllib.parse.quote(NAME)}"),
                           ("DELETE", f"/?id={ID_NUMBER}"), ("PUT", f"/requeue/{ID_NUMBER}")):
        status, head, body = exchange(port, request(port, method, target.encode()))
        assert status in (404, 405), (method, target, head, body)
        answers.append(head + body)
    # The bridge's own notices, by their names.
    status, page = http(base + "?notice=unknown-message")
    assert status == 200 and "Requeue refused: unknown-message" in page
    status, page = http(base + "?notice=requeued")
    assert status == 200 and "Claim requeued" in page
    assert_nothing_repeated(hospital, *answers)
