"""FHIR message envelopes for the claim push (pure functions, no I/O).

A claim travels as a Bundle of type ``message``: ``MessageHeader`` first, then the
resources of the minimised collection. The bundle's ``identifier`` is the message
identity, which is also the idempotency key at the receiver.

The receiver's first checks of a message are here, in the order PROTOCOL §4.3 gives
them: :func:`read_json` (I-JSON, 400), :func:`check_envelope` (the message's shape,
400) and :func:`check_addressing` (sender and receiver bound to the TLS peer and to
this bridge, 403).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from bridge.errors import (
    MappingError,
    ParseError,
    SenderMismatch,
    UnsupportedEvent,
    WrongReceiver,
    bounded_path,
    member_label,
)
from bridge.uuids import uuid5_text

#: The version of the exchange protocol (``conformance/PROTOCOL.md``) this bridge
#: speaks, as its CapabilityStatement, ``bridge --version`` and the build-info metric
#: state it. The conformance kit keeps a copy of its own (``bridge.conformance.protocol``),
#: taken from the document rather than from the code it tests.
PROTOCOL_VERSION = "1.3"

EVENT_SYSTEM = "urn:ws-fhir-bridge:event"
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
MESSAGE_NAMESPACE = uuid.UUID("4d0c7a0e-6b53-5d1f-9a57-2b1e1f0e6a10")
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"

#: ``urn:uuid:`` and a UUID of RFC 4122 (versions 1-5, variant 10xx) in its canonical
#: lower-case hyphenated form: the only message identity PROTOCOL §4.2 allows.
MESSAGE_ID_PATTERN = re.compile(
    r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
#: Deepest nesting of arrays and objects a received document may have (§4.3).
MAX_NESTING = 64
#: Integers beyond this magnitude have no exact IEEE 754 form (I-JSON, RFC 7493 §2.2).
MAX_SAFE_INTEGER = 2**53 - 1

_MH = "Bundle.entry[0].resource"


def message_id_for(sender: str, link: str, source_key: str) -> str:
    """Deterministic message identity: the same claim from the same link keeps its id.

    Re-submitting a record therefore cannot create a second claim at the receiver.
    """
    return "urn:uuid:" + uuid5_text(MESSAGE_NAMESPACE, f"{sender}\x1f{link}\x1f{source_key}")


def wrap_message(
    collection: dict[str, Any],
    *,
    message_id: str,
    event: str,
    sender: str,
    receiver: str,
    source_endpoint: str,
    destination_endpoint: str,
    now: datetime,
    focus_type: str = "Claim",
) -> dict[str, Any]:
    """Wrap the resources of a collection bundle into a message bundle."""
    entries = list(collection.get("entry") or [])
    focus = [
        {"reference": e["fullUrl"]}
        for e in entries
        if e.get("resource", {}).get("resourceType") == focus_type and "fullUrl" in e
    ]
    header_id = uuid5_text(MESSAGE_NAMESPACE, message_id + "#header")
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": EVENT_SYSTEM, "code": event},
        "destination": [
            {
                "endpoint": destination_endpoint,
                "receiver": {"identifier": {"system": PARTNER_SYSTEM, "value": receiver}},
            }
        ],
        "sender": {"identifier": {"system": PARTNER_SYSTEM, "value": sender}},
        "source": {"endpoint": source_endpoint, "software": "ws-fhir-bridge"},
    }
    if focus:
        header["focus"] = focus
    return {
        "resourceType": "Bundle",
        "id": message_id.removeprefix("urn:uuid:"),
        "identifier": {"system": "urn:ietf:rfc:3986", "value": message_id},
        "type": "message",
        "timestamp": now.isoformat(timespec="seconds"),
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                # Named only when written as an element name is (see member_label).
                raise ParseError(
                    "a member name appears twice in one object",
                    location=f"body#{member_label(name)}",
                )
            seen.add(name)
    return result


def read_json(body: bytes, *, nesting: int = MAX_NESTING) -> Any:
    """Parse a request body as I-JSON (RFC 7493), or raise :class:`ParseError` (400).

    UTF-8 without lone surrogates, no member name twice in one object, nesting at most
    :data:`MAX_NESTING` (``nesting``: another bound, for a body that wraps messages),
    integers within ±(2^53 - 1), no number beyond a double. These are exactly the
    documents RFC 8785 canonicalises, so a message that passes here has one signed form.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"malformed JSON at byte {exc.pos}", location=f"body[{exc.pos}]") from None
    keys, text, exponent = _shape_keys_text(value, nesting)
    # A body that is the compact writing of what was parsed names every member once (a
    # lost member would be missing from the writing): only other bodies are counted.
    if b'"' in body and (keys is None or (text != body and _member_names(body) != keys)):
        # Some object lost a member to a repeated name (orjson keeps the last): read
        # again, slowly, to name it.
        try:
            json.loads(body, object_pairs_hook=_refuse_duplicates)
        except RecursionError:
            pass  # the depth check names it
        except ValueError as exc:  # only duplicates: orjson accepted the syntax
            if isinstance(exc, ParseError):
                raise
            raise ParseError("malformed JSON", location="body") from None
    if keys is None:
        _check_shape(value, nesting)  # names where the shape fails
    # orjson reads an integer beyond 64 bits as a double: written back, it is a number
    # with an exponent of 18 or more. Whether the body wrote it as an integer is read again.
    if isinstance(value, (dict, list)):
        writing = text if text is not None else orjson.dumps(value)
        # Only a writing with an exponent outside its strings is searched (the search
        # took about a third of reading a 12 KB claim).
        if exponent and _WIDE_DOUBLE.search(writing):
            _refuse_wide_integers(body)
    elif isinstance(value, float) and abs(value) >= 2.0**63:
        _refuse_wide_integers(body)
    return value


# A number with a decimal exponent of 18 or more, standing where orjson's writing puts
# numbers (after ":", "," or "[", before ",", "]" or "}"). A string that merely contains
# such text costs a second reading, nothing else.
_WIDE_DOUBLE = re.compile(rb"[:,\[]-?\d+(?:\.\d+)?e\+?(?:1[89]|[2-9]\d|\d{3,})[,\]}]")


def _bounded_int(text: str) -> int:
    number = int(text)
    if abs(number) > MAX_SAFE_INTEGER:
        raise ParseError("integer beyond ±(2^53 - 1)", location="body")
    return number


def _refuse_wide_integers(body: bytes) -> None:
    """ParseError when ``body`` writes an integer beyond ±(2^53 - 1)."""
    try:
        json.loads(body, parse_int=_bounded_int)
    except ParseError:
        raise
    except (ValueError, RecursionError):
        pass  # what orjson accepted parses; anything else was judged above


_MEMBER_NAME = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\r\n]*:)?')
_SPACED_NAME = re.compile(rb'"[ \t\r\n]+:')


def _member_names(body: bytes) -> int:
    """How many member names the JSON text ``body`` writes (over all its objects).

    Without a backslash every ``"`` delimits a string, so a name is a ``"`` followed by
    ``:``; otherwise the strings are tokenised. Compared with the keys the parsed
    document holds, this says whether any name was repeated within one object.
    """
    if b"\\" not in body and _SPACED_NAME.search(body) is None:
        return body.count(b'":')
    return sum(1 for colon in _MEMBER_NAME.findall(body) if colon)


# Brackets as one kind ("[" "]" become "{" "}"); everything else is deleted.
_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")
# Structure between strings becomes blanks: what is left are numbers and literals.
_STRUCTURE = bytes.maketrans(b"{}[]:,", b"      ")
# Digits become "0", everything else a blank: only an integer written with 16 digits or
# more can lie beyond ±(2^53 - 1).
_DIGITS_ONLY = bytes(b"0"[0] if b in b"0123456789" else b" "[0] for b in range(256))
_SIXTEEN_DIGITS = b"0" * 16


def _shape_keys(value: Any, limit: int = MAX_NESTING) -> int | None:
    """The number of member names in ``value`` if its shape is within I-JSON's limits
    (nesting, integers), else None (then :func:`_check_shape` names the place).

    Read from orjson's compact writing of ``value`` when no string in it has an escape:
    every ``"`` then delimits a string, so a member name is a string followed by ``:``;
    between the strings are the brackets, whose nesting is peeled one level at a time
    (each pass removes every innermost pair), and the numbers. Otherwise the value is
    walked (:func:`_walk_shape_keys`); both give the same answer.
    """
    return _shape_keys_text(value, limit)[0]


def _shape_keys_text(
    value: Any, limit: int = MAX_NESTING
) -> tuple[int | None, bytes | None, bool]:
    """:func:`_shape_keys`, the compact text it was read from (None when walked), and
    whether that text may hold a number written with an exponent (True when unknown)."""
    if not isinstance(value, (dict, list)):
        return _walk_shape_keys(value, limit), None, True
    try:
        out = orjson.dumps(value)
    except TypeError:
        return _walk_shape_keys(value, limit), None, True
    if b"\\" in out:
        return _walk_shape_keys(value, limit), None, True
    parts = out.split(b'"')
    # What lies between the strings; in ``marked`` each run that follows a string starts
    # with a NUL (which compact JSON never writes outside a string).
    marked = b"\0".join(parts[::2])
    nesting = marked.translate(_AS_BRACES, _NOT_BRACKETS)
    for _ in range(limit):
        nesting = nesting.replace(b"{}", b"")
        if not nesting:
            break
    else:
        return None, out, True
    if _SIXTEEN_DIGITS in marked.translate(_DIGITS_ONLY):
        for token in b"".join(parts[::2]).translate(_STRUCTURE).split():
            if (len(token) > 15 and token[-1:].isdigit() and b"." not in token
                    and b"e" not in token and b"E" not in token
                    and abs(int(token)) > MAX_SAFE_INTEGER):
                return None, out, True
    # Outside strings, an "e" is in true, false or a number's exponent (orjson writes it
    # lower case).
    exponent = b"e" in marked.replace(b"true", b"").replace(b"false", b"")
    # A member name is a string followed by ":" (a string value may begin with ":" too).
    return marked.count(b"\0:"), out, exponent


def _walk_shape_keys(value: Any, limit: int = MAX_NESTING) -> int | None:
    """:func:`_shape_keys` by walking the value."""
    keys = 0
    if not isinstance(value, (dict, list)):
        return None if isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER else 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return None
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict):
            keys += len(node)
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif (isinstance(child, int) and not isinstance(child, bool)
                  and abs(child) > MAX_SAFE_INTEGER):
                return None
    return keys


def _check_shape(value: Any, limit: int = MAX_NESTING) -> None:
    # Iterative: a document nested deeper than Python's recursion limit is refused here
    # with a 400, not failed later with a RecursionError.
    stack: list[tuple[Any, str, int]] = [(value, "$", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            if depth > limit:
                raise ParseError(f"nested deeper than {limit} levels",
                                 location=bounded_path(path))
            stack.extend((v, f"{path}.{member_label(k)}", depth + 1) for k, v in node.items()
                         if isinstance(v, (dict, list, int)))
        elif isinstance(node, list):
            if depth > limit:
                raise ParseError(f"nested deeper than {limit} levels",
                                 location=bounded_path(path))
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)
                         if isinstance(v, (dict, list, int)))
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_SAFE_INTEGER:
            raise ParseError("integer beyond ±(2^53 - 1)", location=bounded_path(path))


@dataclass(frozen=True)
class Envelope:
    """What the envelope of a received message says (checked by :func:`check_envelope`)."""

    message_id: str
    header: dict[str, Any]
    event: str
    sender: str
    receiver: str


def _partner_of(reference: Any) -> str | None:
    identifier = reference.get("identifier") if isinstance(reference, dict) else None
    if not isinstance(identifier, dict) or identifier.get("system") != PARTNER_SYSTEM:
        return None
    value = identifier.get("value")
    return value if isinstance(value, str) and value else None


def check_envelope(bundle: Any, *, accepted_events: frozenset[str]) -> Envelope:
    """PROTOCOL §4.3: the checks a receiver makes of a message's shape, in order.

    Raises :class:`ParseError` (400) naming the first element at fault, or
    :class:`UnsupportedEvent` (400) for an event this endpoint does not accept.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ParseError("body is not a FHIR Bundle", location="Bundle.resourceType")
    if bundle.get("type") != "message":
        raise ParseError("Bundle.type must be 'message'", location="Bundle.type")
    ident = bundle.get("identifier")
    if not isinstance(ident, dict) or ident.get("system") != IDENTIFIER_SYSTEM:
        raise ParseError(
            f"Bundle.identifier.system must be {IDENTIFIER_SYSTEM}",
            location="Bundle.identifier.system",
        )
    msg_id = ident.get("value")
    if not isinstance(msg_id, str) or not MESSAGE_ID_PATTERN.fullmatch(msg_id):
        raise ParseError(
            "message identity must be urn:uuid: and a canonical RFC 4122 UUID",
            location="Bundle.identifier.value",
        )
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise ParseError("message has no entries", location="Bundle.entry")
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "MessageHeader":
        raise ParseError("first entry must be a MessageHeader", location=_MH)
    coding = first.get("eventCoding")
    if (
        not isinstance(coding, dict)
        or coding.get("system") != EVENT_SYSTEM
        or not isinstance(coding.get("code"), str)
    ):
        raise ParseError(
            f"MessageHeader.eventCoding must be a code of {EVENT_SYSTEM}",
            location=f"{_MH}.eventCoding",
        )
    event = str(coding["code"])
    if event not in accepted_events:
        raise UnsupportedEvent(
            "this endpoint does not accept that message event", location=f"{_MH}.eventCoding.code"
        )
    sender = _partner_of(first.get("sender"))
    if sender is None:
        raise ParseError(
            f"MessageHeader.sender must be an identifier of {PARTNER_SYSTEM}",
            location=f"{_MH}.sender",
        )
    destinations = first.get("destination")
    if not isinstance(destinations, list) or len(destinations) != 1:
        raise ParseError(
            "a message has exactly one destination", location=f"{_MH}.destination"
        )
    destination = destinations[0] if isinstance(destinations[0], dict) else {}
    receiver = _partner_of(destination.get("receiver"))
    if receiver is None:
        raise ParseError(
            f"MessageHeader.destination[0].receiver must be an identifier of {PARTNER_SYSTEM}",
            location=f"{_MH}.destination[0].receiver",
        )
    return Envelope(msg_id, first, event, sender, receiver)


def check_addressing(envelope: Envelope, *, peer: str, receiver: str) -> None:
    """PROTOCOL §4.4: the message names the TLS peer as sender and this bridge as receiver."""
    if envelope.sender != peer:
        raise SenderMismatch(
            "MessageHeader.sender is not the partner this connection authenticated",
            location=f"{_MH}.sender",
        )
    if envelope.receiver != receiver:
        raise WrongReceiver(
            "the message is addressed to another receiver",
            location=f"{_MH}.destination[0].receiver",
        )


def message_identity(bundle: Any) -> tuple[str, dict[str, Any]]:
    """Check the envelope shape of a received message; return its id and header.

    Raises ParseError for a shape that is not a FHIR message at all.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ParseError("body is not a FHIR Bundle", location="Bundle.resourceType")
    if bundle.get("type") != "message":
        raise ParseError("Bundle.type must be 'message'", location="Bundle.type")
    ident = bundle.get("identifier")
    msg_id = ident.get("value") if isinstance(ident, dict) else None
    if not isinstance(msg_id, str) or not msg_id:
        raise ParseError("message has no identity", location="Bundle.identifier.value")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise ParseError("message has no entries", location="Bundle.entry")
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "MessageHeader":
        raise ParseError("first entry must be a MessageHeader", location="Bundle.entry[0].resource")
    return msg_id, first


def header_event(header: dict[str, Any]) -> str:
    coding = header.get("eventCoding")
    if not isinstance(coding, dict) or coding.get("system") != EVENT_SYSTEM:
        raise MappingError("unsupported message event", location="MessageHeader.eventCoding")
    return str(coding.get("code"))


def collection_of(message: dict[str, Any]) -> dict[str, Any]:
    """The message's resources without the header, as a collection bundle."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [e for e in message.get("entry", [])[1:]],
    }
