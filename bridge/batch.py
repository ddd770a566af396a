"""Several claim messages in one request: the batch form of PROTOCOL §6b.

A batch request is a FHIR Bundle of type ``batch`` POSTed to ``[base]``; each entry
carries ``request: {method: POST, url: "$process-message"}`` and, as its resource, a
signed message exactly as it would be POSTed alone. The claim's place in the link's
sequence, which a single request carries in the ``Bridge-Stream`` and
``Bridge-Sequence`` headers, travels in two entry extensions with the same values.
The answer is a ``batch-response`` with one entry per request entry, in order: its
``response.status`` and the signed receipt as its resource, or an OperationOutcome in
``response.outcome``.

A receiver offers batches in its CapabilityStatement (``rest.interaction`` ``batch``
and the :data:`BATCH_EXTENSION` extension with its bounds); a sender that does not
find the offer sends one message per request.

Plain data in, plain data out: no sockets, no event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from bridge.errors import ParseError, PayloadTooLarge

PROCESS_MESSAGE = "$process-message"
STREAM_EXTENSION = "urn:ws-fhir-bridge:ext:bridge-stream"
SEQUENCE_EXTENSION = "urn:ws-fhir-bridge:ext:bridge-sequence"
#: On ``CapabilityStatement.rest``: the batch offer and its bounds.
BATCH_EXTENSION = "urn:ws-fhir-bridge:ext:message-batch"
MAX_ENTRIES = "maxEntries"
MAX_BYTES = "maxBytes"
# The byte cost of the batch wrapper around each message, with room for its extensions.
ENTRY_OVERHEAD = 512
#: Nesting levels the batch adds above each message (the Bundle, its entry list, the
#: entry): a batch body may be nested this much deeper than a message alone.
ENTRY_DEPTH = 3


@dataclass(frozen=True)
class BatchEntry:
    """One entry of a batch request: the message, or why the entry is not one."""

    index: int
    message: Any
    #: ``Bridge-Stream`` / ``Bridge-Sequence`` as a single request would carry them.
    headers: dict[str, str]
    error: ParseError | None = None


@dataclass(frozen=True)
class BatchOffer:
    """What a receiver's CapabilityStatement says it takes in one batch request."""

    max_entries: int
    max_bytes: int


def read_batch(value: Any, *, max_entries: int) -> list[BatchEntry]:
    """The entries of a parsed batch request.

    Raises :class:`ParseError` (400) when the body is not a batch Bundle and
    :class:`PayloadTooLarge` (413) when it has more than ``max_entries`` entries. An
    entry that is not a ``$process-message`` POST of a resource gets its own
    ``error``; it never fails the others.
    """
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        raise ParseError("body is not a FHIR Bundle", location="Bundle.resourceType")
    if value.get("type") != "batch":
        raise ParseError("a batch request is a Bundle of type batch", location="Bundle.type")
    entries = value.get("entry")
    if not isinstance(entries, list) or not entries:
        raise ParseError("batch has no entries", location="Bundle.entry")
    if len(entries) > max_entries:
        raise PayloadTooLarge(
            f"batch has more than {max_entries} entries (maxEntries)", location="Bundle.entry"
        )
    return [_entry(i, entry) for i, entry in enumerate(entries)]


def _entry(index: int, entry: Any) -> BatchEntry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict):
        return BatchEntry(index, None, {}, ParseError("entry is not an object", location=where))
    request = entry.get("request")
    if (
        not isinstance(request, dict)
        or request.get("method") != "POST"
        or request.get("url") != PROCESS_MESSAGE
    ):
        return BatchEntry(index, None, {}, ParseError(
            f"entry request must be POST {PROCESS_MESSAGE}", location=f"{where}.request"))
    message = entry.get("resource")
    if not isinstance(message, dict):
        return BatchEntry(index, None, {}, ParseError(
            "entry has no message", location=f"{where}.resource"))
    headers: dict[str, str] = {}
    extensions = entry.get("extension", [])
    if not isinstance(extensions, list):
        return BatchEntry(index, None, {}, ParseError(
            "entry extension is not a list", location=f"{where}.extension"))
    for ext in extensions:
        if not isinstance(ext, dict):
            continue
        name = {STREAM_EXTENSION: "Bridge-Stream", SEQUENCE_EXTENSION: "Bridge-Sequence"}.get(
            ext.get("url"))  # type: ignore[arg-type]
        if name is None:
            continue
        text = ext.get("valueString")
        if not isinstance(text, str) or name in headers:
            return BatchEntry(index, None, {}, ParseError(
                "stream and sequence are one valueString each", location=f"{where}.extension"))
        headers[name] = text
    return BatchEntry(index, message, headers)


def encode_batch(messages: Iterable[tuple[bytes, str | None, int | None]]) -> bytes:
    """A batch request from ``(message bytes, stream, sequence)``; each message is
    embedded byte for byte as it would be POSTed alone."""
    parts = []
    for body, stream, seq in messages:
        ext = b""
        if stream is not None and seq is not None:
            ext = (b'"extension":[{"url":"' + STREAM_EXTENSION.encode() + b'","valueString":"'
                   + stream.encode() + b'"},{"url":"' + SEQUENCE_EXTENSION.encode()
                   + b'","valueString":"' + str(seq).encode() + b'"}],')
        parts.append(b'{' + ext + b'"request":{"method":"POST","url":"' + PROCESS_MESSAGE.encode()
                     + b'"},"resource":' + body + b'}')
    return b'{"resourceType":"Bundle","type":"batch","entry":[' + b",".join(parts) + b"]}"


def status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def encode_batch_response(answers: Sequence[tuple[int, bytes]]) -> bytes:
    """The ``batch-response`` for ``(status, body)`` per entry, in order: a 200's body
    (the signed receipt) is the entry's resource, any other is its
    ``response.outcome``. Bodies are embedded byte for byte."""
    parts = []
    for status, body in answers:
        head = b'{"response":{"status":"' + status_text(status).encode() + b'"'
        if status == 200:
            parts.append(head + b'},"resource":' + body + b"}")
        else:
            parts.append(head + b',"outcome":' + body + b"}}")
    return (b'{"resourceType":"Bundle","type":"batch-response","entry":['
            + b",".join(parts) + b"]}")


def read_batch_response(value: Any, count: int) -> list[tuple[int, Any]]:
    """``(status, resource or outcome)`` per entry of a ``batch-response`` answering
    ``count`` entries; :class:`ParseError` when it is not one."""
    if (
        not isinstance(value, dict)
        or value.get("resourceType") != "Bundle"
        or value.get("type") != "batch-response"
    ):
        raise ParseError("answer is not a batch-response Bundle", location="Bundle.type")
    entries = value.get("entry")
    if not isinstance(entries, list) or len(entries) != count:
        raise ParseError("batch-response does not answer every entry", location="Bundle.entry")
    out: list[tuple[int, Any]] = []
    for i, entry in enumerate(entries):
        response = entry.get("response") if isinstance(entry, dict) else None
        status = response.get("status") if isinstance(response, dict) else None
        if not isinstance(status, str) or not status[:3].isdigit():
            raise ParseError("entry has no status", location=f"Bundle.entry[{i}].response.status")
        code = int(status[:3])
        assert isinstance(response, dict)
        out.append((code, entry.get("resource") if code == 200 else response.get("outcome")))
    return out


def batch_offer(capability: Any) -> BatchOffer | None:
    """The batch offer of a CapabilityStatement, None when it makes none (or a
    malformed one: the sender then sends one message per request)."""
    if not isinstance(capability, dict) or capability.get("resourceType") != "CapabilityStatement":
        return None
    for rest in capability.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode") != "server":
            continue
        interactions = rest.get("interaction") or []
        if not any(isinstance(i, dict) and i.get("code") == "batch" for i in interactions):
            continue
        for ext in rest.get("extension") or []:
            if not isinstance(ext, dict) or ext.get("url") != BATCH_EXTENSION:
                continue
            bounds = {
                sub.get("url"): sub.get("valueUnsignedInt")
                for sub in ext.get("extension") or [] if isinstance(sub, dict)
            }
            entries, size = bounds.get(MAX_ENTRIES), bounds.get(MAX_BYTES)
            if (isinstance(entries, int) and isinstance(size, int)
                    and not isinstance(entries, bool) and entries > 1 and size > 0):
                return BatchOffer(entries, size)
    return None


def batch_capability(max_entries: int, max_bytes: int) -> dict[str, Any]:
    """The :data:`BATCH_EXTENSION` extension for a CapabilityStatement's ``rest``."""
    return {
        "url": BATCH_EXTENSION,
        "extension": [
            {"url": MAX_ENTRIES, "valueUnsignedInt": max_entries},
            {"url": MAX_BYTES, "valueUnsignedInt": max_bytes},
        ],
    }


__all__ = [
    "BATCH_EXTENSION",
    "BatchEntry",
    "BatchOffer",
    "batch_capability",
    "batch_offer",
    "encode_batch",
    "encode_batch_response",
    "read_batch",
    "read_batch_response",
]
