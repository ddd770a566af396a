"""MLLP framing and the few MSH fields a listener needs, as plain code over bytes.

Nothing here does I/O: bytes go in, complete messages (and framing errors) come out,
so the same framer serves a TCP listener, a TLS listener and a test that feeds it
one byte at a time.

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 2) wraps each message as::

    <VT 0x0B> message bytes <FS 0x1C><CR 0x0D>

Framer rules (state table; ``OUTSIDE`` is the start state):

==========  ===================  ==========================================================
state       byte(s)              action
==========  ===================  ==========================================================
OUTSIDE     VT                   start a frame -> INSIDE
OUTSIDE     anything else        discard, count in ``discarded_bytes``
INSIDE      FS CR                emit the frame (empty frames are counted, not emitted)
                                 -> OUTSIDE
INSIDE      FS then not CR       FS is content (a strict peer never sends it) -> INSIDE
INSIDE      VT                   the peer restarted a frame: drop the partial frame,
                                 count it in ``aborted_frames`` -> INSIDE (new frame)
INSIDE      content over limit   emit :class:`FrameTooLarge` once, discard -> OUTSIDE
                                 (resynchronise on the next VT)
==========  ===================  ==========================================================

Invariants: a message is emitted only after its FS CR arrived; the emitted bytes
never contain the VT or the FS CR; the framer never holds more than
``max_message_bytes`` (+1) bytes of a frame; events come out in the order their
frames ended on the wire.

The module also holds a tolerant reader of the MSH segment (:func:`read_msh`) and a
minimal ACK builder (:func:`build_fallback_ack`) used when a message cannot be
parsed by the full HL7 v2 parser, so that even an unreadable message is answered.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from bridge.errors import BridgeError, ConflictError, MappingError, ParseError, PayloadTooLarge

VT = 0x0B  # start block
FS = 0x1C  # end block
CR = 0x0D  # carriage return, closes the end block and separates segments

START_BLOCK = bytes([VT])
END_BLOCK = bytes([FS, CR])

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


class FrameTooLarge(PayloadTooLarge):
    """An MLLP frame grew beyond the configured maximum; it was discarded.

    ``head`` keeps the first bytes of the frame (at most :attr:`MLLPFramer.HEAD_BYTES`)
    so the listener can still name MSH-10 in its AR answer. ``messages`` holds the
    messages that completed before the oversized frame in the same :meth:`MLLPFramer.feed`
    call (see there).
    """

    code = "mllp-frame-too-large"

    def __init__(self, message: str, *, head: bytes = b"", limit: int = 0) -> None:
        super().__init__(message, location="MLLP frame")
        self.head = head
        self.limit = limit
        self.messages: list[bytes] = []


Event = bytes | FrameTooLarge


class MLLPFramer:
    """Turns a byte stream into complete MLLP messages (see the module docstring)."""

    #: How much of an oversized frame is kept for the error's ``head``.
    HEAD_BYTES = 4096

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        """``max_message_bytes`` bounds the content of one frame (VT and FS CR excluded)."""
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self._inside = False
        self._fs_pending = False  # INSIDE and the last byte seen was FS
        self._buf = bytearray()
        self._pending: list[Event] = []
        #: Bytes seen outside any frame (noise, keep-alives, the tail of an oversized frame).
        self.discarded_bytes = 0
        #: Frames cut short by a new VT.
        self.aborted_frames = 0
        #: Frames of zero length (VT FS CR): not emitted.
        self.empty_frames = 0
        #: Frames discarded for exceeding ``max_message_bytes``.
        self.oversized_frames = 0

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended (bytes are being held)."""
        return self._inside

    @property
    def buffered(self) -> int:
        """Bytes of the current, unfinished frame held by the framer."""
        return len(self._buf) + (1 if self._fs_pending else 0)

    # --- decoding ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages completed by them, in wire order.

        An oversized frame raises :class:`FrameTooLarge` at the point where it occurs:
        the messages completed before it in this call are in the exception's
        ``messages``; whatever followed it is kept and returned by the next call
        (``feed(b"")`` collects it). Use :meth:`events` to get messages and errors in
        one list instead.
        """
        events = self._pending + self._decode(data)
        self._pending = []
        messages: list[bytes] = []
        for i, event in enumerate(events):
            if isinstance(event, FrameTooLarge):
                self._pending = events[i + 1 :]
                event.messages = messages
                raise event
            messages.append(event)
        return messages

    def events(self, data: bytes) -> list[Event]:
        """Like :meth:`feed`, but oversized frames appear in the list, in order, instead of raising."""
        events = self._pending + self._decode(data)
        self._pending = []
        return events

    def _decode(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        i, n = 0, len(data)
        if self._fs_pending and n:
            self._fs_pending = False
            if data[0] == CR:
                self._finish(out)
                i = 1
            else:
                self._append(b"\x1c", out)
        while i < n:
            if not self._inside:
                start = data.find(START_BLOCK, i)
                if start < 0:
                    self.discarded_bytes += n - i
                    return out
                self.discarded_bytes += start - i
                self._inside = True
                self._buf.clear()
                i = start + 1
                continue
            end = data.find(b"\x1c", i)
            restart = data.find(START_BLOCK, i, end if end >= 0 else n)
            if restart >= 0:
                # A new frame begins before this one ended: the peer gave up on it.
                self.aborted_frames += 1
                self.discarded_bytes += len(self._buf) + (restart - i)
                self._buf.clear()
                i = restart + 1
                continue
            if end < 0:
                self._append(data[i:], out)
                return out
            self._append(data[i:end], out)
            if not self._inside:  # the frame overflowed and was dropped
                i = end
                continue
            if end + 1 == n:
                self._fs_pending = True
                return out
            if data[end + 1] == CR:
                self._finish(out)
                i = end + 2
            else:
                self._append(b"\x1c", out)
                i = end + 1
        return out

    def _append(self, chunk: bytes, out: list[Event]) -> None:
        if not self._inside:
            self.discarded_bytes += len(chunk)
            return
        if len(self._buf) + len(chunk) > self.max_message_bytes:
            room = self.HEAD_BYTES - len(self._buf)
            head = bytes(self._buf[: self.HEAD_BYTES]) + (chunk[:room] if room > 0 else b"")
            self.discarded_bytes += len(self._buf) + len(chunk)
            self.oversized_frames += 1
            self._buf.clear()
            self._inside = False
            out.append(
                FrameTooLarge(
                    f"MLLP frame larger than {self.max_message_bytes} bytes",
                    head=head,
                    limit=self.max_message_bytes,
                )
            )
            return
        self._buf += chunk

    def _finish(self, out: list[Event]) -> None:
        self._inside = False
        if self._buf:
            out.append(bytes(self._buf))
            self._buf.clear()
        else:
            self.empty_frames += 1

    # --- encoding ------------------------------------------------------------------------

    @staticmethod
    def frame(message: bytes) -> bytes:
        """Wrap one message for the wire. Refuses content that would break the framing."""
        if START_BLOCK in message or END_BLOCK in message:
            raise ValueError("an MLLP message cannot contain VT or FS CR")
        return START_BLOCK + message + END_BLOCK


def frame(message: bytes) -> bytes:
    """Module-level shortcut for :meth:`MLLPFramer.frame`."""
    return MLLPFramer.frame(message)


# --- the MSH segment --------------------------------------------------------------------------

#: HL7 table 0211 character sets -> Python codecs (the ones Chinese feeds use).
CHARSETS: dict[str, str] = {
    "": "utf-8",
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "8859/1": "latin-1",
    "GB 18030-2000": "gb18030",
    "GB 18030": "gb18030",
    "GB18030": "gb18030",
    "GB18030-2000": "gb18030",
    "GBK": "gbk",
    "GB 2312": "gb2312",
    "GB2312": "gb2312",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
}


def codec_for(charset: str) -> str:
    """Python codec for an MSH-18 value; raises ParseError for one we do not know."""
    try:
        return CHARSETS[charset.strip().upper()]
    except KeyError:
        raise ParseError("unsupported character set", location="MSH-18") from None


@dataclass(frozen=True)
class MSHHeader:
    """What a listener needs from MSH before (or without) the full parser.

    Fields are decoded with the MSH-18 character set and kept as sent, components
    included (``"HIS^2.16.156.10011.1.5^ISO"``). ``raw_fields`` holds every MSH field
    by number (``raw_fields[3]`` is MSH-3); MSH-1 is the field separator itself.
    """

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str
    control_id: str
    processing_id: str
    version: str
    charset: str
    raw_fields: tuple[str, ...]

    @property
    def sender(self) -> str:
        """The deduplication key of the sending system: ``MSH-3|MSH-4``."""
        return f"{self.sending_application}|{self.sending_facility}"

    @property
    def facility_id(self) -> str:
        """MSH-4's first component (HD namespace id), e.g. ``HOSP-A`` of ``HOSP-A^1.2.3^ISO``."""
        comp = self.encoding_characters[:1] or "^"
        return self.sending_facility.split(comp, 1)[0]

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``A01``; empty when absent."""
        comp = self.encoding_characters[:1] or "^"
        parts = self.message_type.split(comp)
        return parts[1] if len(parts) > 1 else ""

    @property
    def codec(self) -> str:
        """The Python codec of MSH-18."""
        return codec_for(self.charset)


_SEGMENT_SPLIT = re.compile(rb"\r\n|\r|\n")


def first_segment(message: bytes) -> bytes:
    """The first segment of a message; CR, LF and CRLF all end a segment."""
    return _SEGMENT_SPLIT.split(message, 1)[0]


def read_msh(message: bytes) -> MSHHeader:
    """Read MSH of ``message`` without the full parser.

    Raises :class:`bridge.errors.ParseError` naming the MSH field at fault (never its
    value) when the message does not start with a usable MSH segment or lacks MSH-9
    or MSH-10.
    """
    seg = first_segment(message.lstrip(b"\r\n"))
    if not seg.startswith(b"MSH") or len(seg) < 8:
        raise ParseError("message does not start with an MSH segment", location="MSH")
    sep = seg[3:4]
    if sep.isalnum() or sep in (b"\r", b"\n", b" ") or sep[0] > 0x7F:
        raise ParseError("unusable field separator", location="MSH-1")
    parts = seg.split(sep)
    encoding = parts[1]
    if not 2 <= len(encoding) <= 5 or sep in encoding or not encoding.isascii():
        raise ParseError("unusable encoding characters", location="MSH-2")
    # MSH-18 is read first, as bytes, because it says how to decode the rest.
    # MSH-18 may repeat; the first repetition is the character set of the message.
    rep, comp = encoding[1:2] or b"~", encoding[:1]
    charset_raw = parts[17].split(rep)[0].split(comp)[0] if len(parts) > 17 else b""
    if not charset_raw.isascii():
        raise ParseError("unusable character set", location="MSH-18")
    charset = charset_raw.decode("ascii")
    codec = codec_for(charset)
    fields: list[str] = ["MSH", sep.decode("ascii")]
    for number, raw in enumerate(parts[1:], start=2):
        try:
            fields.append(raw.decode(codec))
        except UnicodeDecodeError:
            raise ParseError(
                "bytes not valid in the declared character set", location=f"MSH-{number}"
            ) from None

    def field(number: int) -> str:
        return fields[number] if number < len(fields) else ""

    header = MSHHeader(
        field_separator=fields[1],
        encoding_characters=fields[2],
        sending_application=field(3),
        sending_facility=field(4),
        receiving_application=field(5),
        receiving_facility=field(6),
        message_type=field(9),
        control_id=field(10),
        processing_id=field(11),
        version=field(12),
        charset=charset,
        raw_fields=tuple(fields),
    )
    if not header.message_type:
        raise ParseError("message type is missing", location="MSH-9")
    if not header.control_id:
        raise ParseError("message control id is missing", location="MSH-10")
    return header


# --- a minimal ACK -----------------------------------------------------------------------------

#: HL7 table 0357 codes used in ERR-3.
HL7_ERROR_TEXT: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "203": "Unsupported version id",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}

CHINA_STANDARD_TIME = timezone(timedelta(hours=8))
# ``PID-5.1``, ``OBX[2]-5`` and the parser's ``PID[1]-5[1].1`` (field repetition in brackets).
_LOCATION = re.compile(
    r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\[(\d+)\])?(?:\.(\d+))?(?:\.(\d+))?)?$"
)


def hl7_error_code(error: BridgeError) -> str:
    """The HL7 table 0357 code for an error (``detail['hl7_code']`` wins when given)."""
    explicit = error.detail.get("hl7_code")
    if isinstance(explicit, str) and explicit:
        return explicit
    if isinstance(error, ConflictError):
        return "205"
    if isinstance(error, MappingError):
        return "102"
    if isinstance(error, ParseError):
        return "100"
    return "207"


def error_location(location: str | None) -> str:
    """An HL7 location (``PID-5.1``, ``OBX[2]-5``, ``PID[1]-5[1].1``) as an ERR-2 (ERL) value.

    ERL is segment ^ segment repetition ^ field ^ field repetition ^ component ^
    subcomponent. Anything that is not an HL7 location (a data element id, a JSON
    path) gives an empty string; it is still named in ERR-8.
    """
    if not location:
        return ""
    m = _LOCATION.match(location.strip())
    if m is None:
        return ""
    seg, seg_rep, fld, fld_rep, comp, sub = m.groups()
    parts = [seg, seg_rep or "1"]
    if fld:
        parts += [fld, fld_rep or "1"]
        if comp:
            parts.append(comp)
            if sub:
                parts.append(sub)
    return "^".join(parts)


def escape(text: str, field_separator: str = "|", encoding: str = "^~\\&") -> str:
    """Escape delimiter characters for use inside an HL7 field (``\\F\\``, ``\\S\\`` ...)."""
    enc = (encoding + "^~\\&"[len(encoding) :])[:4]
    comp, rep, esc, sub = enc[0], enc[1], enc[2], enc[3]
    out = []
    for ch in text:
        if ch == esc:
            out.append(f"{esc}E{esc}")
        elif ch == field_separator:
            out.append(f"{esc}F{esc}")
        elif ch == comp:
            out.append(f"{esc}S{esc}")
        elif ch == rep:
            out.append(f"{esc}R{esc}")
        elif ch == sub:
            out.append(f"{esc}T{esc}")
        elif ch in "\r\n":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def ack_control_id(original_control_id: str, code: str, now: datetime) -> str:
    """A deterministic 20-character MSH-10 for an ACK (same inputs, same id)."""
    seed = f"{original_control_id}\x00{code}\x00{now.isoformat()}".encode()
    return "ACK" + hashlib.sha256(seed).hexdigest()[:17].upper()


def build_fallback_ack(
    header: MSHHeader | None,
    code: str,
    *,
    error: BridgeError | None = None,
    now: datetime,
) -> bytes:
    """A minimal original-mode ACK: MSH, MSA and (for AE/AR) ERR.

    Used when the full parser could not read the message. With ``header`` None (no
    readable MSH at all) the ACK still goes out, with MSA-2 empty. The ERR segment
    names the location of ``error`` (ERR-2 when it is an HL7 location, and in the
    ERR-8 text either way) and its table 0357 code (ERR-3); it never carries a value
    from the message. The ACK is encoded with the message's MSH-18 character set.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError("ACK code must be AA, AE or AR")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    sep = header.field_separator if header else "|"
    enc = header.encoding_characters if header else "^~\\&"
    comp = enc[:1] or "^"
    version = header.version if header and header.version else "2.5"
    charset = header.charset if header else ""
    try:
        codec = codec_for(charset)
    except ParseError:
        codec, charset = "utf-8", ""
    control_id = header.control_id if header else ""
    stamp = now.astimezone(CHINA_STANDARD_TIME).strftime("%Y%m%d%H%M%S") + "+0800"
    trigger = header.trigger_event if header else ""
    msh = [
        "MSH",
        enc,
        header.receiving_application if header else "",
        header.receiving_facility if header else "",
        header.sending_application if header else "",
        header.sending_facility if header else "",
        stamp,
        "",
        comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
        ack_control_id(control_id, code, now),
        header.processing_id if header and header.processing_id else "P",
        version,
    ]
    if charset:
        msh += [""] * 5 + [charset]
    segments = [sep.join(msh), sep.join(["MSA", code, control_id])]
    if error is not None and code != "AA":
        err_code = hl7_error_code(error)
        text = HL7_ERROR_TEXT.get(err_code, "")
        where = f" (at {error.location})" if error.location else ""
        segments.append(
            sep.join(
                [
                    "ERR",
                    "",
                    error_location(error.location).replace("^", comp),
                    comp.join([err_code, escape(text, sep, enc), "HL70357"]),
                    "E",
                    "",
                    "",
                    escape(error.code, sep, enc),
                    escape(error.message + where, sep, enc),
                ]
            )
        )
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")
