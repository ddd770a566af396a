"""Requests the HTTP parser cannot read, answered like every other refusal.

aiohttp answers a request it cannot parse (a request line or header longer than it
takes, a body both chunked and with a length, bytes that are not a method) itself,
before any middleware runs: with a ``text/plain`` body that quotes the offending bytes,
and an ERROR log line whose traceback quotes them too. Those bytes are whatever the
client sent, a patient's identifier in a query string among them.

:func:`answering_malformed_requests` wraps the listener's protocol factory so that such
a request gets ``400 parse-error`` as a FHIR OperationOutcome (PROTOCOL P-ERR-1) naming
no value, the connection is closed, and the log line names the exception's type only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bridge.errors import BridgeError, InternalError, ParseError

__all__ = ["answering_malformed_requests"]

log = logging.getLogger("bridge.server")

FHIR_JSON = "application/fhir+json"


class _Handler(RequestHandler):
    """aiohttp's request handler, answering what it cannot read as the bridge answers."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What aiohttp calls for a request it could not parse or serve (see the module)."""
        kind = type(exc).__name__ if exc is not None else "-"
        if status == 400:
            log.info("unreadable HTTP request from %s refused (%s)", request.remote, kind)
            error: BridgeError = ParseError("the HTTP request could not be read",
                                            location="request")
        else:
            log.error("request from %s failed in the HTTP layer (%s, %d)", request.remote, kind,
                      status)
            error = InternalError("internal error; nothing was stored", location="request")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; the connection is dropped")
        response = web.Response(
            status=status, body=orjson.dumps(error.to_operation_outcome()),
            content_type=FHIR_JSON,
        )
        response.force_close()
        return response


def answering_malformed_requests(
    factory: Callable[[], RequestHandler],
) -> Callable[[], RequestHandler]:
    """``factory`` (an aiohttp server), its handlers answering unreadable requests with an
    OperationOutcome and logging no byte of them."""

    def make() -> RequestHandler:
        handler = factory()
        # Same slots, one method more: the handler aiohttp made, answering as the bridge.
        handler.__class__ = _Handler
        return handler

    return make

