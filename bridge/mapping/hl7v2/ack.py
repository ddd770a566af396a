"""HL7 v2 acknowledgements (ACK) for a received message, in its version and character set.

``AA`` accepts; ``AE`` (application error) and ``AR`` (reject) carry an ERR segment that
says where the problem is and which HL7 table 0357 code applies: 100 segment sequence
error, 101 required field missing, 102 data type error, 103 table value not found,
200 unsupported message type, 203 unsupported version id, 207 application internal error.
From v2.5 on the location is ERR-2 (ERL) and the code ERR-3; v2.4 and earlier carry both in
ERR-1 (ELD). The error text names locations only, never values.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Literal

from bridge.errors import BridgeError, MappingError, ParseError
from bridge.mapping.hl7v2.message import CHARSETS, Delimiters, HL7Message, Loc, parse_hl7

CST = timezone(timedelta(hours=8))

ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "207": "Application internal error",
}


def _error_code(error: BridgeError) -> str:
    code = error.detail.get("hl7_code")
    if isinstance(code, str) and code in ERROR_TEXT:
        return code
    if isinstance(error, ParseError):
        return "100"
    if isinstance(error, MappingError):
        return "102"
    return "207"


def _header_from_bytes(data: bytes | str) -> tuple[list[str], str]:
    """Best-effort MSH fields of a message that could not be parsed, and its codec."""
    text = data.decode("latin-1") if isinstance(data, (bytes, bytearray)) else data
    text = text.lstrip("\x0b\r\n \t")
    first = text.replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return [], "utf-8"
    fsep = first[3]
    fields = ["MSH", fsep] + first[4:].split(fsep)
    charset = fields[18].split("~")[0].strip().upper() if len(fields) > 18 else ""
    codec = CHARSETS.get(charset, "utf-8")
    if isinstance(data, (bytes, bytearray)):
        # Re-read the header in its declared character set (names in MSH-4 may be Chinese).
        try:
            head = bytes(data).lstrip(b"\x0b\r\n \t").split(b"\r")[0].split(b"\n")[0]
            decoded = head.decode(codec)
            fields = ["MSH", fsep] + decoded[4:].split(fsep)
        except (UnicodeDecodeError, LookupError):
            codec = "utf-8"
    return fields, codec


def build_ack(msg_or_bytes: HL7Message | bytes | str,
              code: Literal["AA", "AE", "AR"], *, error: BridgeError | None = None,
              now: datetime) -> bytes:
    """An HL7 ACK answering ``msg_or_bytes``, encoded in the message's character set.

    ``now`` (timezone-aware) becomes MSH-7 in China Standard Time. For ``AE``/``AR`` pass
    the :class:`~bridge.errors.BridgeError` that caused the refusal: its HL7 location and
    table 0357 code go into ERR. Works on bytes that could not be parsed too, using what
    can be read of their MSH.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError("code must be AA, AE or AR")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    d = Delimiters()
    if isinstance(msg_or_bytes, HL7Message):
        msg = msg_or_bytes
        fields = list(msg.msh.raw_fields)
        comp, rep, unescape = (msg.delimiters.component, msg.delimiters.repetition,
                               msg.delimiters.unescape)
        codec = msg.encoding
    else:
        try:
            return build_ack(parse_hl7(msg_or_bytes), code, error=error, now=now)
        except ParseError:
            pass
        fields, codec = _header_from_bytes(msg_or_bytes)
        comp = fields[2][:1] if len(fields) > 2 and fields[2] else "^"
        rep = fields[2][1:2] if len(fields) > 2 and len(fields[2]) > 1 else "~"
        unescape = Delimiters(field=fields[1] if len(fields) > 1 else "|", component=comp).unescape

    def get(n: int, c: int = 1) -> str:
        if n >= len(fields) or n < 3:
            return ""
        parts = fields[n].split(rep)[0].split(comp)
        return unescape(parts[c - 1]) if c <= len(parts) else ""

    charset_field = fields[18].split(rep)[0] if len(fields) > 18 else ""
    version = get(12) or "2.5"
    event = get(9, 2)
    control = get(10)
    esc = d.escape_text

    def hd(n: int) -> str:
        return "^".join(esc(get(n, c)) for c in (1, 2, 3)).rstrip("^")

    stamp = now.astimezone(CST).strftime("%Y%m%d%H%M%S") + "+0800"
    ack_id = ("ACK" + control)[:20] if control else "ACK"
    msh = ["MSH", "^~\\&", hd(5), hd(6), hd(3), hd(4), stamp, "",
           f"ACK^{esc(event)}^ACK" if event else "ACK", esc(ack_id), esc(get(11)) or "P",
           esc(version), "", "", "", "", "", esc(charset_field.split("~")[0])]
    while msh and msh[-1] == "":
        msh.pop()
    segments = ["MSH|" + "|".join(msh[1:])]
    text_message = error.message if error is not None else ""
    msa = ["MSA", code, esc(control)]
    if error is not None and _old_version(version):
        msa.append(esc(text_message))
    segments.append("|".join(msa))
    if error is not None:
        err_code = _error_code(error)
        loc = error.detail.get("hl7_location")
        if not isinstance(loc, Loc):
            loc = _loc_from_text(error.location)
        if _old_version(version):
            where = [esc(loc.segment), str(loc.seg_rep), str(loc.field or "")] if loc else ["", "", ""]
            eld = "^".join(where + [f"{err_code}&{ERROR_TEXT[err_code]}&HL70357"])
            segments.append(f"ERR|{eld}")
        else:
            erl = ""
            if loc is not None:
                erl = "^".join([esc(loc.segment), str(loc.seg_rep), str(loc.field or ""),
                                str(loc.field_rep or (1 if loc.field else "")),
                                str(loc.component or ""), str(loc.subcomponent or "")]).rstrip("^")
            severity = "E"
            segments.append("|".join(["ERR", "", erl, f"{err_code}^{ERROR_TEXT[err_code]}^HL70357",
                                      severity, "", "", "", esc(text_message)]))
    text = "\r".join(segments) + "\r"
    try:
        return text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return text.encode("utf-8")


_LOC_TEXT = re.compile(
    r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\[(\d+)\])?(?:\.(\d+))?(?:\.(\d+))?)?$")


def _loc_from_text(text: str | None) -> Loc | None:
    """A location written as ``PID[1]-5[1].1`` or ``PID-5.1`` (errors raised elsewhere)."""
    m = _LOC_TEXT.match(text.strip()) if text else None
    if m is None:
        return None
    seg, seg_rep, fld, fld_rep, comp, sub = m.groups()
    return Loc(seg, int(seg_rep or 1), int(fld or 0), int(fld_rep or 0), int(comp or 0),
               int(sub or 0))


def _old_version(version: str) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return parts < (2, 5)
