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

aiohttp also answers one request it did parse before any middleware runs: a request
whose ``Expect`` header is not ``100-continue`` gets ``417`` with a ``text/plain`` body
quoting the header (``Unknown Expect: ...``), on every route and on paths no route
serves. That refusal is answered here naming ``Expect``, never what was sent: handed to
the application's :data:`REFUSAL` hook, which audits and logs it as the refusal it is (the
partner port's OperationOutcome), or, on a port without one, logged and answered in the
port's own form (:meth:`~MalformedRequests.refusal`). Every other HTTP error a request
meets is raised inside the application, where its middlewares answer it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from bridge.errors import BridgeError, InternalError, ParseError

__all__ = ["REFUSAL", "ExpectationFailed", "MalformedRequests", "answering_malformed_requests"]

log = logging.getLogger("bridge.server")

FHIR_JSON = "application/fhir+json"

#: ``refuse(request, error) -> response``: how the application answers, audits and logs
#: a refusal made before its middlewares ran (an ``Expect`` it does not understand).
Refuse = Callable[[web.Request, BridgeError], Awaitable[web.StreamResponse]]
REFUSAL: web.AppKey[Refuse] = web.AppKey("bridge.refusal")


class ExpectationFailed(BridgeError):
    """An ``Expect`` header other than ``100-continue`` (RFC 9110 §10.1.1)."""

    code = "expectation-failed"
    http_status = 417
    fault = "peer"
    issue_type = "not-supported"


async def _answer_expectation(
    request: web.BaseRequest, own: Callable[[int, BridgeError], web.Response],
) -> web.StreamResponse:
    """The bridge's answer to an ``Expect`` aiohttp refused before the middlewares: the
    application's :data:`REFUSAL` hook's (with the status of what it decided: a
    certificate that is no partner's is still 401), else the port's own form (``own``)."""
    error = ExpectationFailed("only 'Expect: 100-continue' is understood", location="Expect")
    refuse = request.app.get(REFUSAL) if isinstance(request, web.Request) else None
    response: web.StreamResponse
    if refuse is not None and isinstance(request, web.Request):
        response = await refuse(request, error)
    else:
        log.info("request from %s refused (%s)", request.remote, error.code)
        response = own(error.http_status, error)
    # The body the client announced may follow regardless: the connection is not reused.
    response.force_close()
    return response


class MalformedRequests(RequestHandler):
    """aiohttp's request handler, answering what it cannot read as the bridge answers."""

    __slots__ = ()

    def refusal(self, status: int, error: BridgeError) -> web.Response:
        """The answer (the partner port's: a FHIR OperationOutcome); ``error`` is the
        bridge's own, naming no byte of the request."""
        return web.Response(status=status, body=orjson.dumps(error.to_operation_outcome()),
                            content_type=FHIR_JSON)

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's request handling, with the ``Expect`` refusal it raises outside the
        middlewares answered as the bridge answers (see the module)."""

        async def answering(req: web.BaseRequest) -> web.StreamResponse:
            try:
                return await request_handler(req)
            except web.HTTPExpectationFailed:
                return await _answer_expectation(req, self.refusal)

        return await super()._handle_request(request, start_time, answering)

    #: How log lines name the port, and the logger they go to.
    port_name = "the partner port"
    port_log = log

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """What aiohttp logs with a traceback (a body that breaks off while the handler
        is done with it and its rest is read away, say), logged by the exception's type
        only: the message of a parser's exception quotes the bytes it failed on."""
        exc = kw.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else "-"
        what = str(args[0]) if args else "failure"
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            self.port_log.info("unreadable request on %s (%s: %s)", self.port_name, what, kind)
        else:
            self.port_log.error("%s failed in the HTTP layer (%s: %s)", self.port_name, what,
                                kind)

    def data_received(self, data: bytes) -> None:
        """As aiohttp's, and when the parser fails inside a body (a chunk size that is not
        a number), that body's reader fails too: aiohttp's compiled parser queues its
        refusal behind the request it was reading, whose handler would otherwise wait for
        the rest of the body until the client gives up."""
        super().data_received(data)
        if not any(isinstance(msg, _ErrInfo) for msg, _payload in self._messages):
            return
        bodies = [payload for msg, payload in self._messages if not isinstance(msg, _ErrInfo)]
        if self._current_request is not None:
            bodies.append(self._current_request.content)
        for body in bodies:
            if not body.is_eof() and body.exception() is None:
                body.set_exception(RequestPayloadError("the request body could not be read"))

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

