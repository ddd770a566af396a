"""Requests the HTTP parser cannot read, answered like every other refusal.

aiohttp answers a request it cannot parse (a request line or header longer than it
takes, a body both chunked and with a length, bytes that are not a method) itself,
before any middleware runs: with a ``text/plain`` body that quotes the offending bytes,
and an ERROR log line whose traceback quotes them too. Those bytes are whatever the
client sent, a patient's identifier in a query string among them.

:func:`answering_malformed_requests` wraps the listener's protocol factory so that such
a request gets ``400 parse-error`` as a FHIR OperationOutcome (PROTOCOL P-ERR-1) naming
no value, the connection is closed, and the log line names the exception's type only.
Another port answers in its own form by passing a subclass of :class:`MalformedRequests`
that overrides :meth:`~MalformedRequests.refusal` (the operations port answers plain text).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bridge.errors import BridgeError, InternalError, ParseError

__all__ = ["MalformedRequests", "answering_malformed_requests"]

log = logging.getLogger("bridge.server")

FHIR_JSON = "application/fhir+json"


class MalformedRequests(RequestHandler):
    """aiohttp's request handler, answering what it cannot read as the bridge answers."""

    __slots__ = ()

    def refusal(self, status: int, error: BridgeError) -> web.Response:
        """The answer (the partner port's: a FHIR OperationOutcome); ``error`` is the
        bridge's own, naming no byte of the request."""
        return web.Response(status=status, body=orjson.dumps(error.to_operation_outcome()),
                            content_type=FHIR_JSON)

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
        response = self.refusal(status, error)
        response.force_close()
        return response


def answering_malformed_requests(
    factory: Callable[[], RequestHandler],
    handler_class: type[MalformedRequests] = MalformedRequests,
) -> Callable[[], RequestHandler]:
    """``factory`` (an aiohttp server), its handlers answering unreadable requests with
    ``handler_class``'s :meth:`~MalformedRequests.refusal` (an OperationOutcome unless
    told otherwise) and logging no byte of them."""

    def make() -> RequestHandler:
        handler = factory()
        # Same slots, methods of its own: the handler aiohttp made, answering as the bridge.
        handler.__class__ = handler_class
        return handler

    return make

