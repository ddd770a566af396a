"""The conformance kit: cases, what a run needs, and how a case is judged.

A *case* has a stable id, a title, a description (its docstring) and the ids of the
requirements of ``conformance/requirements.csv`` it checks. It runs against a target
through a :class:`Context`, which holds the kit's identity (TLS certificate, signing
key), talks to the target only over the wire (:mod:`bridge.conformance.peer`) and
records every exchange as evidence for the reports.

A case passes when it returns, fails on :class:`CaseFailed` (the message says what the
target did against what the protocol asks), is skipped on :class:`Skip` (something the
kit was not given, such as the CA key for the certificate matrix) and errs on anything
else. A run is conformant when every required case passed (a skipped required case is
not a pass) and no other case that ran failed on a SHALL requirement.

Like the peer, the kit imports nothing of the bridge outside this folder.
"""

from __future__ import annotations

import csv
import json
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.conformance import protocol as P
from bridge.conformance.envelope import SigningKey
from bridge.conformance.peer import (
    Answer,
    ConnectionClosed,
    HTTPResponse,
    Peer,
    PeerConnection,
    TLSOptions,
    TLSRefused,
)

#: Values of the kit's sample claim that an error answer must never echo (P-ERR-2).
SAMPLE_VALUES = ("110101199001010011", "ZY-CONFORMANCE-0001", "测试患者", "13800000000")

#: Where the requirements table lives in a source checkout and in a wheel.
_PACKAGE = Path(__file__).resolve().parent


def requirements_file() -> Path:
    for candidate in (
        _PACKAGE.parent / "_data" / "conformance" / "requirements.csv",
        _PACKAGE.parent.parent / "conformance" / "requirements.csv",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("conformance/requirements.csv is not installed with the kit")


@dataclass(frozen=True)
class Requirement:
    id: str
    source: str
    text: str
    level: str
    actor: str
    why_not_tested: str


def load_requirements(path: Path | None = None) -> list[Requirement]:
    with (path or requirements_file()).open(encoding="utf-8", newline="") as handle:
        return [
            Requirement(
                row["id"], row["source"], row["text"], row["level"], row["actor"],
                row.get("why_not_tested") or "",
            )
            for row in csv.DictReader(handle)
        ]


# --- cases -----------------------------------------------------------------------------


class CaseFailed(Exception):
    """The target did something the protocol does not allow (the message says what)."""


class Skip(Exception):
    """The case cannot run with what the kit was given (the message says what to add)."""


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    family: str
    requirements: tuple[str, ...]
    run: Callable[[Any], None]  # takes a Context (receiver role) or a SenderContext
    role: str = "receiver"  # the target's role: the kit plays the other one
    required: bool = True  # False for SHOULD-level checks

    @property
    def description(self) -> str:
        return " ".join((self.run.__doc__ or self.title).split())


CASES: list[Case] = []


def case(
    id: str,
    title: str,
    *,
    family: str,
    requirements: Sequence[str],
    required: bool = True,
    role: str = "receiver",
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register a case (the function's docstring is its description)."""

    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        if any(c.id == id for c in CASES):
            raise ValueError(f"case id {id!r} registered twice")
        CASES.append(Case(id, title, family, tuple(requirements), fn, role, required))
        return fn

    return register


# --- what a run needs ---------------------------------------------------------------------


@dataclass
class KitConfig:
    """Everything a run against a receiver needs; paths are PEM files."""

    target: str  # https://host:port/fhir
    cert: Path
    key: Path
    ca: Path
    signing_key: Path
    signing_cert: Path
    partner_id: str | None = None  # default: the URI SAN of ``cert``
    receiver_id: str | None = None  # default: the URI SAN of the target's certificate
    receiver_signing_cert: Path | None = None  # to check receipts (§6.2)
    ca_key: Path | None = None  # to mint the certificate matrix (expired, unregistered...)
    content: Path | None = None  # a collection Bundle to send instead of the sample claim
    revoked_cert: Path | None = None  # a certificate of the kit's partner the target's CRL
    revoked_key: Path | None = None  # lists, with its key
    profile: str = "commercial-insurance"
    server_name: str | None = None  # default: the target's host
    header_timeout: float = 60.0  # the longest the target may wait for a request head
    body_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_body: int = 4 * 1024 * 1024
    timeout: float = 10.0


@dataclass
class Exchange:
    """One thing the kit sent and what came back (evidence in the reports)."""

    label: str
    sent: str
    received: str
    seconds: float


@dataclass
class Result:
    case: Case
    status: str  # pass | fail | skip | error
    detail: str
    seconds: float
    evidence: list[Exchange] = field(default_factory=list)
    measures: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _excerpt(data: bytes, limit: int = 1500) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def _uri_partner(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [
        u[len(P.PARTNER_URI_PREFIX):]
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(P.PARTNER_URI_PREFIX)
    ]
    return ids[0] if len(ids) == 1 else None


class Context:
    """The kit's side of a run: identity, connections, shared material and evidence."""

    def __init__(self, config: KitConfig) -> None:
        self.config = config
        self.evidence: list[Exchange] = []
        self.measures: dict[str, float | int | str] = {}
        self.shared: dict[str, Any] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="bridge-conformance-")
        self.scratch = Path(self._scratch.name)
        url = urlsplit(config.target)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"--target must be an https URL, not {config.target!r}")
        self.host = url.hostname
        self.port = url.port or 443
        cert = x509.load_pem_x509_certificate(config.cert.read_bytes())
        partner = config.partner_id or _uri_partner(cert)
        if partner is None:
            raise ValueError(
                f"{config.cert} names no single partner in its URI SAN; give --partner-id"
            )
        self.partner_id = partner
        self.signing = SigningKey.from_files(config.signing_key, config.signing_cert)
        self.receiver_signing: x509.Certificate | None = (
            x509.load_pem_x509_certificate(config.receiver_signing_cert.read_bytes())
            if config.receiver_signing_cert
            else None
        )
        self.content: dict[str, Any] | None = (
            json.loads(config.content.read_text(encoding="utf-8")) if config.content else None
        )
        self._receiver_id = config.receiver_id

    def close(self) -> None:
        self._scratch.cleanup()

    # --- TLS ------------------------------------------------------------------------

    def tls(self, **changes: Any) -> TLSOptions:
        params: dict[str, Any] = {
            "ca": self.config.ca,
            "cert": self.config.cert,
            "key": self.config.key,
            "server_name": self.config.server_name or self.host,
            "expected_server_partner": self._receiver_id,
            "timeout": self.config.timeout,
        }
        params.update(changes)
        return TLSOptions(**params)

    @property
    def receiver_id(self) -> str:
        """The target's partner id (from its certificate unless given)."""
        if self._receiver_id is None:
            from bridge.conformance.peer import connect

            with connect(self.host, self.port, self.tls(expected_server_partner=None)) as conn:
                cert = conn.server_certificate
            found = _uri_partner(cert) if cert is not None else None
            if found is None:
                raise CaseFailed(
                    "the target's certificate names no partner in its URI SAN (P-TLS-8)"
                )
            self._receiver_id = found
        return self._receiver_id

    def peer(self, **tls: Any) -> Peer:
        peer = Peer(
            base_url=self.config.target.rstrip("/"),
            partner_id=self.partner_id,
            receiver_id=self.receiver_id,
            tls=self.tls(**tls),
            signing_key=self.signing,
            receiver_signing_certificate=self.receiver_signing,
        )
        return peer

    def handshake(self, label: str, **tls: Any) -> PeerConnection | str:
        """Connect with these TLS options; the connection, or why it was refused."""
        options = self.tls(**tls)
        offered = ", ".join(
            f"{k}={v}" for k, v in sorted(tls.items()) if k not in ("cert", "key", "ca")
        )
        who = Path(str(options.cert)).name if options.cert else "no certificate"
        started = time.monotonic()
        try:
            conn = self.peer(**tls).connect()
        except (TLSRefused, ConnectionClosed, OSError) as exc:
            self.note(label, f"handshake ({who}; {offered or 'defaults'})",
                      f"refused: {type(exc).__name__}: {exc}", started)
            return f"{type(exc).__name__}: {exc}"
        self.note(
            label,
            f"handshake ({who}; {offered or 'defaults'})",
            f"{conn.version} {conn.cipher} group={conn.group} resumed={conn.session_reused}",
            started,
        )
        return conn

    # --- HTTP -----------------------------------------------------------------------

    def note(self, label: str, sent: str, received: str, started: float) -> None:
        self.evidence.append(Exchange(label, sent, received, time.monotonic() - started))

    def request(
        self,
        label: str,
        conn: PeerConnection,
        method: str,
        tail: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> HTTPResponse:
        peer = self.peer()
        sent_headers = dict(headers or {})
        started = time.monotonic()
        head = f"{method} {peer.path(tail)}\n" + "".join(
            f"{k}: {v}\n" for k, v in sent_headers.items()
        )
        try:
            response = conn.request(method, peer.path(tail), body, sent_headers)
        except (TLSRefused, ConnectionClosed, TimeoutError) as exc:
            self.note(label, head + _excerpt(body), f"{type(exc).__name__}: {exc}", started)
            raise
        self.note(label, head + _excerpt(body), _response_text(response), started)
        return response

    def post(
        self,
        label: str,
        message: Mapping[str, Any] | bytes,
        *,
        conn: PeerConnection | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """POST a message to ``$process-message`` (on ``conn`` or a new connection)."""
        peer = self.peer()
        own = conn is None
        connection = conn or peer.connect()
        started = time.monotonic()
        body = message if isinstance(message, bytes) else json.dumps(
            message, ensure_ascii=False
        ).encode("utf-8")
        try:
            answer = peer.post_message(connection, message, headers=headers)
        except (TLSRefused, ConnectionClosed, TimeoutError) as exc:
            self.note(label, f"POST {peer.path(P.PROCESS_MESSAGE)}\n" + _excerpt(body),
                      f"{type(exc).__name__}: {exc}", started)
            raise CaseFailed(f"{label}: no HTTP answer ({type(exc).__name__}: {exc})") from None
        finally:
            if own:
                connection.close()
        received = _response_text(answer.response)
        if answer.receipt is not None:
            received += f"\n[receipt verified: seq {answer.receipt.audit_seq}]"
        elif answer.receipt_error:
            received += f"\n[receipt check: {answer.receipt_error}]"
        self.note(label, f"POST {peer.path(P.PROCESS_MESSAGE)}\n" + _excerpt(body), received,
                  started)
        return answer

    # --- messages -------------------------------------------------------------------

    def claim(self, **changes: Any) -> dict[str, Any]:
        if self.content is not None:
            changes.setdefault("content", self.content)
        return self.peer().claim(**changes)

    def signed(self, message: Mapping[str, Any] | None = None, **sign: Any) -> dict[str, Any]:
        return self.peer().sign(message if message is not None else self.claim(), **sign)

    # --- judging --------------------------------------------------------------------

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise CaseFailed(message)

    def expect_refusal(
        self,
        answer: Answer | HTTPResponse,
        status: int,
        code: str,
        expression: str | None = None,
    ) -> None:
        """The answer is ``status`` with an OperationOutcome of ``code`` (§7) naming
        ``expression``, and echoes no value the kit sent (P-ERR-2)."""
        response = answer.response if isinstance(answer, Answer) else answer
        outcome = response.outcome
        got = f"{response.status} {outcome.code if outcome else '(no OperationOutcome)'}"
        if outcome is not None and outcome.expression:
            got += f" at {outcome.expression[0]}"
        wanted = f"{status} {code}" + (f" at {expression}" if expression else "")
        self.expect(response.status < 500, f"answered {got}: a refusal must not be 5xx (P-RCV-6)")
        self.expect(
            response.status == status and outcome is not None and outcome.code == code,
            f"expected {wanted}, got {got}",
        )
        if expression is not None:
            self.expect(
                outcome is not None and outcome.expression[:1] == (expression,),
                f"expected {wanted}, got {got}",
            )
        self.expect_no_values(response)

    def expect_no_values(self, response: HTTPResponse) -> None:
        text = response.body.decode("utf-8", errors="replace")
        echoed = [v for v in SAMPLE_VALUES if v in text]
        self.expect(not echoed, "an error answer carries a value of the claim sent (P-ERR-2)")

    def expect_accepted(self, answer: Answer) -> None:
        outcome = answer.outcome
        self.expect(
            answer.status == 200,
            f"expected 200 with a receipt, got {answer.status}"
            + (f" {outcome.code} at {','.join(outcome.expression)}" if outcome else ""),
        )
        if self.receiver_signing is not None:
            self.expect(answer.receipt is not None, f"receipt: {answer.receipt_error}")
            assert answer.receipt is not None
            self.expect(answer.receipt.outcome == "ok",
                        f"an accepted claim's receipt says {answer.receipt.outcome}, not ok"
                        " (P-RCP-5)")

    def require_ca_key(self) -> tuple[x509.Certificate, Any]:
        if self.config.ca_key is None:
            raise Skip("needs --ca-key (the CA that issues the target's partners' certificates)")
        ca = x509.load_pem_x509_certificate(self.config.ca.read_bytes())
        key = serialization.load_pem_private_key(self.config.ca_key.read_bytes(), password=None)
        return ca, key

    def mint(
        self,
        name: str,
        partner_id: str | None,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        own_ca: bool = False,
        also: Sequence[str] = (),
    ) -> tuple[Path, Path, x509.Certificate]:
        """A TLS certificate for ``partner_id`` (and the partners ``also`` names) from the
        target's CA (or the kit's own)."""
        from bridge.conformance.certs import issue_tls, new_ca

        if own_ca:
            ca, ca_key = self.shared.get("own-ca") or new_ca("conformance kit stranger CA")
            self.shared["own-ca"] = (ca, ca_key)
        else:
            ca, ca_key = self.require_ca_key()
        now = datetime.now(UTC)
        cert, key = issue_tls(
            ca, ca_key, partner_id,
            not_before=not_before or now - timedelta(minutes=5),
            not_after=not_after or now + timedelta(days=1),
            host=self.config.server_name or self.host, also=also,
        )
        cert_file, key_file = self.scratch / f"{name}.pem", self.scratch / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file, cert


def _response_text(response: HTTPResponse) -> str:
    head = f"{response.status} {response.reason}\n" + "".join(
        f"{k}: {v}\n" for k, v in response.headers
    )
    return head + _excerpt(response.body)


# --- running -----------------------------------------------------------------------------


def select_cases(
    only: Iterable[str] = (), *, role: str = "receiver", cases: Sequence[Case] | None = None
) -> list[Case]:
    """The cases of ``role``; ``only`` keeps those whose id or family is listed, or
    whose id starts with an entry ending in ``*``."""
    wanted = list(only)
    chosen = [c for c in (cases if cases is not None else all_cases()) if c.role == role]
    if not wanted:
        return chosen

    unknown = [w for w in wanted if not any(_matches(c, w) for c in chosen)]
    if unknown:
        raise ValueError(f"no case or family named {unknown[0]!r}")
    return [c for c in chosen if any(_matches(c, w) for w in wanted)]


def _matches(c: Case, w: str) -> bool:
    return c.id == w or c.family == w or (w.endswith("*") and c.id.startswith(w[:-1]))


def all_cases() -> list[Case]:
    # Importing the case modules registers their cases.
    from bridge.conformance import cases_receiver, sender_role  # noqa: F401

    return list(CASES)


def run_case(c: Case, ctx: Any) -> Result:
    ctx.evidence, ctx.measures = [], {}
    started = time.monotonic()
    try:
        c.run(ctx)
        status, detail = "pass", ""
    except CaseFailed as exc:
        status, detail = "fail", str(exc)
    except Skip as exc:
        status, detail = "skip", str(exc)
    except Exception as exc:  # noqa: BLE001 (a case that cannot finish is reported)
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        status, detail = "error", f"{type(exc).__name__}: {exc}{where}"
    return Result(c, status, detail, time.monotonic() - started, ctx.evidence, ctx.measures)


def run(
    config: KitConfig,
    cases: Sequence[Case],
    *,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    ctx = Context(config)
    results: list[Result] = []
    try:
        for c in cases:
            result = run_case(c, ctx)
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        ctx.close()
    return results


def run_sender(
    config: Any,
    cases: Sequence[Case],
    *,
    ready: Callable[[int], None] | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Listen as a receiver (``sender_role.ReceiverConfig``), wait for the sender's
    messages, then judge them with the sender-role cases."""
    from bridge.conformance.sender_role import KitReceiver, SenderContext

    receiver = KitReceiver(config)
    receiver.start()
    try:
        if ready is not None:
            ready(receiver.port)
        receiver.wait()
    finally:
        receiver.stop()
    ctx = SenderContext(receiver.observation)
    results = []
    for c in cases:
        result = run_case(c, ctx)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def conformant(results: Sequence[Result],
               requirements: Sequence[Requirement] | None = None) -> bool:
    """Every required case passed, and no case that ran failed (or erred) on a SHALL.

    A case is not required when it checks only what a target may leave out (a SHOULD,
    a capability it does not offer) or needs an option the kit may not be given (the
    revoked certificate): its *skip* is no failure. Once it ran, though, a failure of a
    SHALL requirement it checks is one (a receiver that ignores its CRL is not
    conformant because the case is optional)."""
    levels = {r.id: r.level for r in (
        requirements if requirements is not None else load_requirements())}
    for r in results:
        if r.passed:
            continue
        if r.case.required:
            return False
        if r.status in ("fail", "error") and any(
                levels.get(q) == "SHALL" for q in r.case.requirements):
            return False
    return True


def coverage(
    requirements: Sequence[Requirement], cases: Sequence[Case]
) -> dict[str, list[Case]]:
    """Requirement id -> the cases that check it."""
    covered: dict[str, list[Case]] = {r.id: [] for r in requirements}
    for c in cases:
        for rid in c.requirements:
            covered.setdefault(rid, []).append(c)
    return covered


def in_threads(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once, one thread each; their results in order."""
    results: list[Any] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 (the call's result is its exception)
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
