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
serves. Every HTTP error aiohttp raises outside the middlewares is answered here naming
where (``Expect``, or the route), never what was sent: handed to the application's
:data:`REFUSAL` hook, which audits and logs it as the refusal it is (the partner port's
OperationOutcome), or, on a port without one, logged and answered in the port's own form
(:meth:`~MalformedRequests.refusal`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

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


class _RefusedBeforeRouting(BridgeError):
    """Another HTTP error aiohttp raised outside the middlewares; its status is kept."""

    code = "request-refused"
    http_status = 400
    fault = "peer"
    issue_type = "processing"


def _error_for(status: int) -> BridgeError:
    if status == 417:
        return ExpectationFailed("only 'Expect: 100-continue' is understood", location="Expect")
    return _RefusedBeforeRouting("request refused", location="request")


async def _answer_http_error(
    request: web.BaseRequest, exc: web.HTTPException,
    own: Callable[[int, BridgeError], web.Response],
) -> web.StreamResponse:
    """The bridge's answer to an HTTP error aiohttp raised before the middlewares: the
    application's :data:`REFUSAL` hook's, else the port's own form (``own``)."""
    error = _error_for(exc.status)
    refuse = request.app.get(REFUSAL) if isinstance(request, web.Request) else None
    response: web.StreamResponse
    if refuse is not None and isinstance(request, web.Request):
        response = await refuse(request, error)
    else:
        log.info("request from %s refused (%s, %d)", request.remote, error.code, exc.status)
        response = own(exc.status, error)
    response.set_status(exc.status)
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
        """aiohttp's request handling, with an HTTP error raised outside the middlewares
        (the ``Expect`` check) answered as the bridge answers (see the module)."""

        async def answering(req: web.BaseRequest) -> web.StreamResponse:
            try:
                return await request_handler(req)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return await _answer_http_error(req, exc, self.refusal)

        return await super()._handle_request(request, start_time, answering)

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

