"""Log lines an operator can use: one structured line per thing that happened.

Code reports what happened with :func:`event` (or :func:`claim_event` for a claim on a
link)::

    event("consent_change", controller="hospital-a", consent_id="c-1", status="inactive")

and :func:`setup_logging` decides how it is written: ``json`` (one JSON object per line,
for a log shipper) or ``text`` (``time level event key=value ...``, for a person).
Ordinary ``logging`` calls elsewhere in the bridge go through the same formatter. The
level chosen applies to the bridge's own loggers (``bridge.*``); other libraries' lines
are written only from WARNING up, because at debug they dump what they carry.

What may appear in a line is a closed vocabulary, :data:`FIELDS`: identities (message,
consent, link, partner, controller), codes, element paths, counts and durations, never
a value taken from a record. :func:`event` refuses any other field name and any value
that is not a plain scalar, so a record cannot slip into a log by accident; a new field
is added to :data:`FIELDS` with a line saying what it holds. Exceptions are written as
their type and the frames they passed through, without their message, because a
third-party message may quote the data it choked on.

Listeners (:func:`subscribe`) receive every event whatever the log level; the metrics of
the operations port count deliveries, retries and dead letters this way, so one line at
the place where something happens serves the log and the metrics.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TextIO

import orjson

EVENT_LOGGER = "bridge.events"

#: Every field an event line may carry, and what it holds.
FIELDS: dict[str, str] = {
    "controller": "id of the controller whose bridge wrote the line",
    "link": "link id",
    "partner": "partner id",
    "message_id": "message identity (Bundle.identifier), or the subject of a refusal",
    "seq": "outbox sequence number on the link, or a hand-off's sequence per sender",
    "destination": "hand-off destination id ([[handoff]]): one of this controller's systems",
    "attempt": "delivery attempts made so far",
    "state": "outbox state",
    "code": "error code (bridge.errors) or the partner's OperationOutcome code",
    "path": "where: element path, HL7 segment and field, JSON path or configuration key",
    "stage": "where in the path a refusal happened: enqueue, dispatch, receive, consent-api",
    "seconds": "duration in seconds (delivery: from enqueue to the signed receipt)",
    "retry_in_seconds": "delay before the next attempt",
    "consent_id": "consent resource id",
    "status": "consent status (active, inactive, ...)",
    "source": "who made a change: cli, api, partner id, hl7, operator",
    "peer": "network address of a peer",
    "reason": "a fixed diagnostic such as an OpenSSL reason code, never data",
    "operator": "address of the local operator who acted on the status page",
}

Level = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
Listener = Callable[[str, dict[str, Any]], None]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Events that an operator must act on are written at WARNING; the rest at INFO.
_WARNING_EVENTS = frozenset(
    {"dead_letter", "rejected", "refusal", "certificate_refusal", "link_paused",
     "handoff_failing", "handoff_dead_letter"}
)

_listeners: list[Listener] = []
_listeners_lock = threading.Lock()
_log = logging.getLogger(EVENT_LOGGER)
# A library's convention: without setup_logging (every command but serve), lines go
# nowhere rather than to Python's last-resort handler on stderr.
logging.getLogger("bridge").addHandler(logging.NullHandler())


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(name, fields)`` for every event from now on; returns an unsubscribe."""
    with _listeners_lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def event(name: str, /, **fields: Any) -> None:
    """Report one thing that happened (see the module docstring for what may be said)."""
    for key, value in fields.items():
        if key not in FIELDS:
            raise ValueError(f"log field {key!r} is not in bridge.logs.FIELDS")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(f"log field {key!r} must be a plain scalar")
    clean = {k: v for k, v in fields.items() if v is not None}
    level = logging.WARNING if name in _WARNING_EVENTS else logging.INFO
    if _log.isEnabledFor(level):
        _log.log(level, name, extra={"bridge_event": name, "bridge_fields": clean})
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(name, clean)
        except Exception:
            logging.getLogger("bridge.logs").exception("event listener failed on %s", name)


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


class _Link(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def partner(self) -> str: ...


def claim_event(
    name: str,
    controller: _Identified,
    link: _Link,
    row: Any,
    *,
    now: datetime | None = None,
    code: str | None = None,
    path: str | None = None,
    retry_at: datetime | None = None,
    stage: str | None = None,
) -> None:
    """An event about one outbox row on one link: delivery, retry, dead letter, refusal.

    With ``now``, ``seconds`` is the time from enqueue (``row.created``) to ``now``;
    with ``retry_at``, ``retry_in_seconds`` is the delay until the next attempt.
    """
    created = getattr(row, "created", None)
    event(
        name,
        controller=controller.id,
        link=link.id,
        partner=link.partner,
        message_id=getattr(row, "message_id", None),
        seq=getattr(row, "seq", None),
        attempt=getattr(row, "attempts", None),
        code=code,
        path=path,
        stage=stage,
        seconds=round((now - created).total_seconds(), 6) if now and created else None,
        retry_in_seconds=(
            round((retry_at - now).total_seconds(), 3) if retry_at and now else None
        ),
    )


def refusal_event(
    controller: _Identified,
    stage: str,
    exc: Any,
    *,
    partner: str | None = None,
    subject: str | None = None,
) -> None:
    """A refusal at ``stage`` (enqueue, dispatch, receive, consent-api): the error's code
    and location, the partner and the message identity or subject, nothing more."""
    event(
        "refusal",
        controller=controller.id,
        stage=stage,
        partner=partner,
        message_id=subject,
        code=getattr(exc, "code", type(exc).__name__),
        path=getattr(exc, "location", None),
    )


# --- formatting --------------------------------------------------------------------------


def _frames(exc_info: Any) -> list[str]:
    """Where an exception went, without its message: ``file:line in function`` per frame."""
    _type, _value, tb = exc_info
    return [
        f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"
        for frame in traceback.extract_tb(tb)
    ]


def _short(filename: str) -> str:
    marker = "/bridge/"
    i = filename.rfind(marker)
    return filename[i + 1 :] if i >= 0 else filename.rsplit("/", 1)[-1]


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


# Characters that would end a text line early, move the cursor, recolour a terminal
# (ESC) or reorder what a reader sees (bidirectional controls): C0, DEL, C1, the
# Unicode line and paragraph separators and the bidi embeddings, overrides and isolates.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
           *range(0x2066, 0x206A)]
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}
# The same in a JSON line, as JSON escapes (the value read back is unchanged): orjson
# escapes C0 itself and writes the others as they are.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x20}


def escape_line(text: str) -> str:
    """``text`` with every character that could start a new line, move the cursor or
    send a terminal escape written as a ``\\xNN`` or ``\\uNNNN`` escape: whatever a field
    holds, one record is one line and a reader sees it as written."""
    return text.translate(_ESCAPES)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event or message, then the fields.

    Line and paragraph separators, C1 and bidirectional controls are written as JSON
    escapes, as orjson writes C0: a reader splitting on any line break, or a terminal
    showing the line, sees one line as written."""

    def __init__(self, static: dict[str, str] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, "bridge_event", None)
        if name is not None:
            line["event"] = name
            line.update(self.static)
            line.update(getattr(record, "bridge_fields", {}))
        else:
            line.update(self.static)
            line["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
            line["stack"] = _frames(record.exc_info)
        return orjson.dumps(line).decode().translate(_JSON_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time LEVEL event key=value ...`` for events; ``time LEVEL logger: message`` else.

    Each record is one line: a control character in any field or message (a sender's
    text that slipped into an error, say) is escaped (:func:`escape_line`), so it can
    neither forge a line nor drive the terminal the log is read on.
    """

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_time(record)} {record.levelname:<7}"
        name = getattr(record, "bridge_event", None)
        if name is not None:
            fields = getattr(record, "bridge_fields", {})
            text = f"{head} {name} " + " ".join(f"{k}={v}" for k, v in fields.items())
        else:
            text = f"{head} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            text += f" [{record.exc_info[0].__name__} at " + " < ".join(
                reversed(_frames(record.exc_info))
            ) + "]"
        return escape_line(text.rstrip())


_HANDLER_NAME = "bridge-log"


def setup_logging(
    *,
    fmt: LogFormat = "text",
    level: Level = "info",
    stream: TextIO | None = None,
    static: dict[str, str] | None = None,
) -> logging.Handler:
    """Send the bridge's log lines to ``stream`` (stderr) in ``fmt`` at ``level``.

    Replaces a handler installed by an earlier call, so calling it twice is harmless.
    ``static`` fields (the JSON format's ``controller``) are added to every JSON line.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JSONFormatter(static) if fmt == "json" else TextFormatter())
    handler.addFilter(_own_lines_or_warnings)
    root.addHandler(handler)
    # ``level`` is the bridge's own lines; the libraries under it (AMQP and HTTP clients,
    # the database driver) say only warnings and errors, whatever ``level`` is: at debug
    # they write the frames and bodies they carry, claims included.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    logging.getLogger("bridge").setLevel(_LEVELS[level])
    return handler


def _own_lines_or_warnings(record: logging.LogRecord) -> bool:
    """A library's logger set to a lower level by hand still says nothing below WARNING."""
    return record.levelno >= logging.WARNING or record.name == "bridge" \
        or record.name.startswith("bridge.")


__all__ = [
    "EVENT_LOGGER",
    "FIELDS",
    "JSONFormatter",
    "TextFormatter",
    "claim_event",
    "escape_line",
    "event",
    "refusal_event",
    "setup_logging",
    "subscribe",
]
