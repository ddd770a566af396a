"""HL7 v2 acknowledgements (original mode): one builder for every answer the bridge gives.

``AA`` accepts; ``AE`` (application error) and ``AR`` (reject) carry an ERR segment that
says where the problem is and which HL7 table 0357 code applies. The same builder
answers a parsed message, a message whose MSH alone could be read, and bytes that are
not HL7 at all (then MSA-2 is empty), so every listener path answers the same way.

ERR layout: from v2.5 on, ERR-2 (ERL) is the location
``segment^segment repetition^field^field repetition^component^subcomponent``, ERR-3 the
table 0357 code, ERR-4 the severity, ERR-7 the bridge's own error code and ERR-8 the
text, which names the location and the data element the field was needed for. Up to
v2.4 the location and code share ERR-1 (ELD) and MSA-3 carries the text. The ACK is
written with the message's own delimiters and encoded in its MSH-18 character set. No
ACK ever carries a value from the message other than MSH's own routing fields, and an
echoed field never carries an MLLP framing byte (VT, FS): one is written as its HL7
hexadecimal escape (``\\X1C\\``), and delimiters that are control bytes are replaced by
HL7's defaults, so every ACK can be framed.

Which code answers an error (:func:`ack_code_for`): AR when the message as such cannot
be taken here (unreadable, unsupported type, event, processing id or version: table
0357 codes 200-203, or an error class whose ``ack_code`` is AR), AE otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from typing import TYPE_CHECKING, Literal

from bridge.errors import BridgeError, ConflictError, MappingError, ParseError
from bridge.mapping.hl7v2.header import (
    FRAMING_BYTES,
    MSHHeader,
    codec_for,
    header_from_fields,
    read_msh,
    text_digest,
    usable_delimiter,
)

if TYPE_CHECKING:
    from bridge.mapping.hl7v2.message import HL7Message

CHINA_STANDARD_TIME = timezone(timedelta(hours=8))

#: HL7 table 0357 (message error condition codes).
ERROR_TEXT: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

#: Codes that mean "this kind of message is not taken here": answered AR.
UNSUPPORTED = frozenset({"200", "201", "202", "203"})

_LOCATION = re.compile(
    r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\[(\d+)\])?(?:\.(\d+))?(?:\.(\d+))?)?\Z"
)


def error_code(error: BridgeError) -> str:
    """The table 0357 code for an error (``detail['hl7_code']`` wins when given)."""
    explicit = error.detail.get("hl7_code")
    if isinstance(explicit, str) and explicit in ERROR_TEXT:
        return explicit
    if isinstance(error, ConflictError):
        return "205"
    if isinstance(error, MappingError):
        return "102"
    if isinstance(error, ParseError):
        return "100"
    return "207"


def ack_code_for(error: BridgeError) -> Literal["AE", "AR"]:
    """AE or AR for a refusal (see the module docstring)."""
    if error.detail.get("hl7_code") in UNSUPPORTED:
        return "AR"
    return "AR" if error.ack_code == "AR" else "AE"


def _location_parts(location: str | None) -> tuple[str, str, str, str, str, str] | None:
    if not location:
        return None
    m = _LOCATION.match(location.strip())
    if m is None:
        return None
    seg, seg_rep, fld, fld_rep, comp, sub = m.groups()
    return (seg, seg_rep or "1", fld or "", (fld_rep or "1") if fld else "",
            comp or "", sub or "")


def error_location(location: str | None) -> str:
    """An HL7 location (``PID-5.1``, ``OBX[2]-5``, ``PID[1]-5[1].1``) as an ERR-2 (ERL) value.

    Anything that is not an HL7 location (a data element id, a JSON path) gives an
    empty string; the ERR-8 text still names it.
    """
    parts = _location_parts(location)
    if parts is None:
        return ""
    return "^".join(parts).rstrip("^")


def escape(text: str, field_separator: str = "|", encoding: str = "^~\\&") -> str:
    """Escape delimiter characters for use inside an HL7 field (``\\F\\``, ``\\S\\`` ...)."""
    enc = (encoding + "^~\\&"[len(encoding):])[:4]
    comp, rep, esc, sub = enc[0], enc[1], enc[2], enc[3]
    table = {esc: f"{esc}E{esc}", field_separator: f"{esc}F{esc}", comp: f"{esc}S{esc}",
             rep: f"{esc}R{esc}", sub: f"{esc}T{esc}", "\r": " ", "\n": " ",
             "\x0b": f"{esc}X0B{esc}", "\x1c": f"{esc}X1C{esc}"}
    return "".join(table.get(ch, ch) for ch in text)


_FRAMING_TEXT = re.compile(FRAMING_BYTES.pattern.decode("ascii"))


def _echo(text: str, escape_char: str) -> str:
    """A field of the original MSH, already in its escaped form, made safe to write back.

    The field is echoed as sent, except that an MLLP framing byte (VT, FS) becomes the
    HL7 hexadecimal escape of that byte, so no echoed field can end the ACK's frame.
    """
    if not _FRAMING_TEXT.search(text):
        return text
    return _FRAMING_TEXT.sub(lambda m: f"{escape_char}X{ord(m.group()):02X}{escape_char}"
                             if escape_char else "", text)


def ack_control_id(original_control_id: str) -> str:
    """MSH-10 of the ACK: ``ACK`` + the original id, or a digest of it when too long."""
    if len(original_control_id) <= 17:
        return "ACK" + original_control_id
    return "ACK" + text_digest(original_control_id)


def tolerant_header(data: bytes | str) -> MSHHeader | None:
    """MSH of bytes the full reader may refuse: what can be read safely, or None.

    When MSH itself does not decode in its declared character set, the fields that are
    plain ASCII are kept (MSH-9, MSH-10, MSH-12 usually are) and the others left empty,
    so the answer names the message without echoing bytes it could not read. Fields
    after a separator that may be the trail byte of a multi-byte character are left
    empty too: their numbering cannot be trusted.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        return read_msh(raw)
    except ParseError:
        pass
    first = raw.lstrip(b"\x0b\r\n \t").replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    first = first.split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 8 or not usable_delimiter(first[3]):
        return None
    sep = first[3:4]
    parts = first.split(sep)
    fields = ["MSH", sep.decode("ascii")]
    shifted = False
    for before, raw_field in pairwise(parts):
        # A separator right after a byte >= 0x81 may be a GBK trail byte: from there on
        # the field count is uncertain, so nothing further is echoed.
        shifted = shifted or (bool(before) and before[-1] >= 0x81)
        fields.append(raw_field.decode("ascii") if raw_field.isascii() and not shifted else "")
    if len(fields) < 3 or not 2 <= len(fields[2]) <= 5 \
            or not all(usable_delimiter(ord(c)) for c in fields[2]):
        return None
    return header_from_fields(fields, "")


def _old_version(version: str) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return parts < (2, 5)


# ``location code: text`` (a field no mapping reads), or ``location code application-code:
# text`` (another warning, such as a transaction already counted); ERR-7 says which.
_WARNING = re.compile(r"^(\S+) (\d{3})(?: ([a-z][a-z-]*))?: (.*)\Z")


def build_ack(source: HL7Message | MSHHeader | bytes | str | None,
              code: Literal["AA", "AE", "AR"] | str, *, error: BridgeError | None = None,
              now: datetime, warnings: Sequence[str] = ()) -> bytes:
    """The ACK answering ``source``, in its version, delimiters and character set.

    ``now`` (timezone-aware) becomes MSH-7 in China Standard Time. For AE/AR pass the
    :class:`~bridge.errors.BridgeError` that caused the refusal: its HL7 location and
    table 0357 code go into ERR. ``source`` may be a parsed message, an MSH read on its
    own, raw bytes (whatever of MSH can be read is used) or None (nothing readable).
    ``warnings`` (``location code: text``, problems in fields no mapping reads, ERR-7
    ``field-not-read``; or ``location code application-code: text``, ERR-7 the
    application code) go into an AA as ERR segments of severity W, from v2.5 on, where
    ERR can say so.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError("ACK code must be AA, AE or AR")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    header: MSHHeader | None
    if source is None or isinstance(source, MSHHeader):
        header = source
    elif isinstance(source, (bytes, bytearray, str)):
        header = tolerant_header(source)
    else:
        header = header_from_fields(list(source.msh.raw_fields), source.charset)
    sep = header.field_separator if header else "|"
    enc = header.encoding_characters if header else "^~\\&"
    if not all(len(c.encode("utf-8")) == 1 and usable_delimiter(ord(c)) for c in sep + enc):
        # Delimiters no ACK can be framed with: answer with HL7's defaults.
        sep, enc = "|", "^~\\&"
    comp = enc[:1] or "^"
    sub = enc[3:4] or "&"
    esc = enc[2:3]
    version = _echo((header.version_id if header else "") or "2.5", esc)
    charset = header.charset if header else ""
    try:
        codec = codec_for(charset)
    except ParseError:
        codec, charset = "utf-8", ""
    control_id = _echo(header.control_id, esc) if header else ""
    stamp = now.astimezone(CHINA_STANDARD_TIME).strftime("%Y%m%d%H%M%S") + "+0800"
    trigger = _echo(header.trigger_event, esc) if header else ""
    msh = ["MSH", enc,
           _echo(header.receiving_application, esc) if header else "",
           _echo(header.receiving_facility, esc) if header else "",
           _echo(header.sending_application, esc) if header else "",
           _echo(header.sending_facility, esc) if header else "",
           stamp, "",
           comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
           escape(ack_control_id(header.control_id if header else ""), sep, enc),
           _echo((header.processing_id if header else "") or "P", esc),
           version]
    if charset:
        msh += [""] * 5 + [charset]
    segments = [sep.join(msh)]
    old = _old_version(version)
    msa = ["MSA", code, control_id]
    if error is not None and code != "AA" and old:
        msa.append(escape(_text(error), sep, enc))
    segments.append(sep.join(msa))
    if error is not None and code != "AA":
        err_code = error_code(error)
        parts = _location_parts(_location_of(error))
        if old:
            where = [escape(p, sep, enc) for p in parts[:3]] if parts else ["", "", ""]
            eld = comp.join(where + [sub.join([err_code, ERROR_TEXT[err_code], "HL70357"])])
            segments.append(sep.join(["ERR", eld]))
        else:
            erl = comp.join(escape(p, sep, enc) for p in parts).rstrip(comp) if parts else ""
            segments.append(sep.join([
                "ERR", "", erl,
                comp.join([err_code, escape(ERROR_TEXT[err_code], sep, enc), "HL70357"]),
                "E", "", "", escape(error.code, sep, enc), escape(_text(error), sep, enc)]))
    if code == "AA" and not old:
        for warning in warnings:
            m = _WARNING.match(warning)
            if m is None or m.group(2) not in ERROR_TEXT:
                continue
            parts = _location_parts(m.group(1))
            erl = comp.join(escape(p, sep, enc) for p in parts).rstrip(comp) if parts else ""
            segments.append(sep.join([
                "ERR", "", erl,
                comp.join([m.group(2), escape(ERROR_TEXT[m.group(2)], sep, enc), "HL70357"]),
                "W", "", "", m.group(3) or "field-not-read", escape(m.group(4), sep, enc)]))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def _location_of(error: BridgeError) -> str | None:
    loc = error.detail.get("hl7_location")
    return str(loc) if loc is not None else error.location


def _text(error: BridgeError) -> str:
    where = f" (at {error.location})" if error.location else ""
    return error.message + where
