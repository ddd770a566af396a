"""Operator access to the operations port (``[operations] auth = "certificate"``).

The port speaks HTTPS with this controller's TLS certificate and asks every client for
an operator certificate (``bridge operators issue``). Each request is checked again:
the certificate must still be valid (and not revoked, with ``[tls] crl``), must name
this controller and an operator listed in ``[[operators]]`` with the role it was issued
for, and that role must allow what the request does:

==============================  =================
``GET /healthz``                anyone (liveness)
``GET /readyz``, ``/metrics``,  ``status.read`` (every role)
``GET /``
``POST /requeue``               ``claim.requeue`` (operator)
==============================  =================

A refused request is answered 401 (no or unknown certificate) or 403 (role), audited
as ``operator.denied`` with the reason and the certificate's fingerprint, and counted
against the client's address: ``max_failed_attempts`` refusals within
``failure_window_seconds`` lock the address out for ``lockout_seconds`` (429, audited
once as ``operator.lockout``). Handshakes that fail (a certificate from another CA,
an expired one) are audited by the TLS listener as ``tls.refused``. Idle connections
are closed after ``idle_timeout_seconds``; there is no login session to outlive it,
since every request carries its certificate.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.compliance.operators import (
    ACTING_OPERATOR,
    Operator,
    OperatorForbidden,
    acting_as,
    certificate_operator,
    require,
)
from bridge.errors import BridgeError, TrustError
from bridge.trust.identity import fingerprint_sha256
from bridge.trust.operators import operator_identity
from bridge.trust.peercheck import PeerCertificateCheck
from bridge.trust.tls import server_context

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, OperationsConfig

#: path -> the action it needs; None: open to anyone.
ROUTE_ACTIONS: dict[tuple[str, str], str | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): "status.read",
    ("GET", "/metrics"): "status.read",
    ("GET", "/"): "status.read",
    ("POST", "/requeue"): "claim.requeue",
}

OPERATOR = web.RequestKey("bridge.operator", Operator)


def operator_context(config: BridgeConfig, ops: OperationsConfig) -> ssl.SSLContext:
    """HTTPS with this controller's certificate; a client certificate is asked for and,
    when presented, must chain to the operator CA. A client without one reaches HTTP
    and is refused there (so the refusal is audited and counted)."""
    ca = ops.operator_ca or config.tls.ca
    ctx = server_context(config.tls.cert, config.tls.key, ca, crl_file=config.tls.crl)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class OperatorGate:
    """Authenticates and authorises each request (see the module docstring)."""

    def __init__(self, controller: Any, ops: OperationsConfig, *, clock: Any = time.monotonic):
        self.c = controller
        self.ops = ops
        self.check = PeerCertificateCheck.from_crl_file(controller.config.tls.crl)
        self._clock = clock
        self._failures: dict[str, _Failures] = {}

    def _identify(self, request: web.Request) -> tuple[Operator, str]:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise OperatorForbidden("an operator certificate is required",
                                    location="TLS.client-certificate", status=401)
        fingerprint = fingerprint_sha256(der)
        try:
            self.check.check(der, self.c.clock())
            who = operator_identity(der)
        except TrustError as exc:
            raise OperatorForbidden(exc.message, location=exc.location, status=401,
                                    fingerprint=fingerprint) from None
        if who.controller != self.c.id:
            raise OperatorForbidden("certificate is for another bridge",
                                    location="TLS.client-certificate", status=401,
                                    fingerprint=fingerprint)
        try:
            return certificate_operator(self.c.config, who.name, who.role, fingerprint), fingerprint
        except OperatorForbidden as exc:
            exc.detail.update(status=401, fingerprint=fingerprint)
            raise

    async def _refused(self, request: web.Request, exc: BridgeError) -> web.Response:
        address = request.remote or "-"
        now = self._clock()
        state = self._failures.setdefault(address, _Failures())
        window = self.ops.failure_window_seconds
        state.times.append(now)
        while state.times and now - state.times[0] > window:
            state.times.popleft()
        fingerprint = exc.detail.get("fingerprint")
        await self.c.db.append_audit(self.c.audit(
            "operator.denied", subject=f"ops:{request.method} {_route(request)}",
            outcome="denied", detail=f"{exc.code}@{exc.location or '-'} from {address}",
            digest_value=f"sha256:{fingerprint}" if fingerprint else None,
        ))
        if len(state.times) >= self.ops.max_failed_attempts:
            state.locked_until = now + self.ops.lockout_seconds
            state.times.clear()
            await self.c.db.append_audit(self.c.audit(
                "operator.lockout", subject=f"ops:{address}", outcome="denied",
                detail=f"{self.ops.max_failed_attempts} refusals within {window:.0f} s;"
                       f" locked for {self.ops.lockout_seconds:.0f} s",
            ))
        status = int(exc.detail.get("status", exc.http_status))
        return web.Response(status=status, text=f"{exc.message}\n")

    def middleware(self) -> Any:
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.transport is None:
                # The connection ended between the request's head and this handler
                # (see bridge.link.server.peer_gate): nobody to answer, and no refused
                # attempt to audit or count towards a lockout.
                gone = web.Response(status=400)
                gone.force_close()
                return gone
            key = (request.method, request.path)
            if key in ROUTE_ACTIONS and ROUTE_ACTIONS[key] is None:
                return await handler(request)  # type: ignore[no-any-return]
            address = request.remote or "-"
            state = self._failures.get(address)
            if state is not None and self._clock() < state.locked_until:
                return web.Response(status=429, text="too many refused attempts; try later\n",
                                    headers={"Retry-After": str(int(self.ops.lockout_seconds))})
            try:
                operator, fingerprint = self._identify(request)
            except OperatorForbidden as exc:
                return await self._refused(request, exc)
            try:
                require(operator, ROUTE_ACTIONS.get(key) or "claim.requeue")
            except OperatorForbidden as exc:
                exc.detail["fingerprint"] = fingerprint
                with acting_as(operator.label):
                    return await self._refused(request, exc)
            request[OPERATOR] = operator
            token = ACTING_OPERATOR.set(operator.label)
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                ACTING_OPERATOR.reset(token)

        return gate


def _route(request: web.Request) -> str:
    return request.path if (request.method, request.path) in ROUTE_ACTIONS else "other"


__all__ = ["OPERATOR", "ROUTE_ACTIONS", "OperatorGate", "operator_context"]
