"""Biometric elements: replaced by a keyed digest before a message is stored or mapped.

A message mapping marks a data element ``biometric: true`` (``mappings/hl7v2/README.md``).
Before the listener stores a message of that type, computes its digest for duplicate
detection, or maps it, every HL7 path the element's rules read is replaced, in every
repetition of its segment and field, by :func:`biometric_digest` of the value found
there. What follows (the stored message, the DE record, the visit, the FHIR claim, the
receiver's copy) only ever holds the digest.

The digest is HMAC-SHA-256 under the controller's biometric key (``[intake]
biometric_key_file``), so it cannot be found by hashing every possible template or
every fingerprint minutia set of a small space; the same value under the same key
always gives the same digest, so a resent message is still recognised as a duplicate
and two records of one person still agree. It is written as base64url without padding:
43 characters, no HL7 delimiter, valid in any WS 445 text format of at least that length.

Plain synchronous code over bytes and text; the key is read at the edge and passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bridge.mapping.hl7v2.message import Delimiters, HL7Message, parse_hl7

if TYPE_CHECKING:
    from bridge.mapping.hl7v2.spec import Path_

#: Length of :func:`biometric_digest`'s result (base64url of 32 bytes, no padding).
DIGEST_CHARS = 43
_DOMAIN = b"ws-fhir-bridge biometric v1\x00"


def biometric_digest(key: bytes, value: str) -> str:
    """The keyed digest that stands for a biometric ``value`` (see the module docstring)."""
    mac = hmac.new(key, _DOMAIN + value.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def _digested(text: str, key: bytes, delims: Delimiters) -> str:
    # Absent stays absent, and HL7's explicit null ("") is not a value.
    if not text or text == '""':
        return text
    value = delims.unescape(text) if delims.escape in text else text
    return delims.escape_text(biometric_digest(key, value))


def _replace(repetition: str, component: int, subcomponent: int, key: bytes,
             delims: Delimiters) -> str:
    """``repetition`` with the piece a path names replaced by its digest."""
    if component == 0:
        return _digested(repetition, key, delims)
    comps = repetition.split(delims.component)
    if component > len(comps):
        return repetition
    if subcomponent == 0:
        comps[component - 1] = _digested(comps[component - 1], key, delims)
    else:
        subs = comps[component - 1].split(delims.subcomponent)
        if subcomponent <= len(subs):
            subs[subcomponent - 1] = _digested(subs[subcomponent - 1], key, delims)
        comps[component - 1] = delims.subcomponent.join(subs)
    return delims.component.join(comps)


def protect(data: bytes, paths: Sequence[Path_], key: bytes) -> bytes:
    """``data`` (one ER7 message) with every value at ``paths`` replaced by its digest.

    ``paths`` are the parsed HL7 paths of the biometric elements
    (segment, field, component, subcomponent; a path that stops at the field digests
    each whole repetition of the field). The
    result is the message re-encoded in its own character set with segments ended by
    CR. Raises :class:`~bridge.errors.ParseError` for a message that cannot be read.
    """
    msg = parse_hl7(data)
    delims = msg.delimiters
    for path in paths:
        for segment in msg.segment_list(path.segment):
            raw = segment.raw(path.field)
            if not raw:
                continue
            segment.raw_fields[path.field] = delims.repetition.join(
                _replace(rep, path.component, path.subcomponent, key, delims)
                for rep in raw.split(delims.repetition))
    return _encode(msg)


def _encode(msg: HL7Message) -> bytes:
    fsep = msg.delimiters.field
    lines = []
    for segment in msg.segments:
        if segment.name == "MSH":
            # raw_fields[1] is MSH-1, the separator itself; MSH-2 follows it directly.
            lines.append("MSH" + fsep + fsep.join(segment.raw_fields[2:]))
        else:
            lines.append(fsep.join(segment.raw_fields))
    return ("\r".join(lines) + "\r").encode(msg.encoding)


def protect_record(record: dict[str, Any], elements: Mapping[str, frozenset[str]],
                   key: bytes) -> dict[str, Any]:
    """A WS 445 DE record (JSON, not from HL7) with its biometric elements digested.

    ``elements`` maps a data set code to the element ids marked biometric for it (by the
    HL7 rules that fill them: the same data element is biometric however it arrives).
    Record-level elements and group items alike; other values are left as they are.
    """
    marked = elements.get(str(record.get("dataset")), frozenset())
    if not marked:
        return record

    def digested(values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {eid: biometric_digest(key, str(value))
                if eid in marked and value not in (None, "") else value
                for eid, value in values.items()}

    out = dict(record)
    out["elements"] = digested(record.get("elements"))
    groups = record.get("groups")
    if isinstance(groups, dict):
        out["groups"] = {name: [digested(item) for item in items]
                         if isinstance(items, list) else items
                         for name, items in groups.items()}
    return out


__all__ = ["DIGEST_CHARS", "biometric_digest", "protect", "protect_record"]
