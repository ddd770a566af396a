"""The MSH segment, read without the full parser, and the character sets HL7 v2 names.

A listener must answer every message, even one the parser cannot read: MSH says who
sent it (MSH-3, MSH-4), what it is (MSH-9), its control id (MSH-10), its version
(MSH-12) and how its bytes are encoded (MSH-18). :func:`read_msh` reads exactly that,
decoding each field with the declared character set, and raises
:class:`~bridge.errors.ParseError` naming the MSH field at fault, never its value.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from bridge.errors import ParseError, has_digit_run

#: HL7 table 0211 character sets -> Python codecs (with the spellings Chinese HIS use).
#: Without MSH-18, HL7 assumes ASCII; Chinese feeds that omit it send UTF-8, which is a
#: superset of ASCII, so UTF-8 reads both without guessing at GBK.
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
    """Python codec for an MSH-18 value; raises ParseError for one the bridge does not read."""
    try:
        return CHARSETS[charset.strip().upper()]
    except KeyError:
        raise ParseError("MSH-18 names a character set the bridge does not read",
                         location="MSH-18", hl7_code="103") from None


# An application or facility code (HD, components included: ``HIS``,
# ``HOSP-A^2.16.156.10011.1.5^ISO``), a message type (``ADT^A01``) or a control id
# (``MSG00001``) as interfaces write them: no spaces, no control characters, no letters
# beyond ASCII.
_PLAIN_ID = re.compile(r"[A-Za-z0-9._\-^&:]{1,64}")


def text_digest(text: str) -> str:
    """17 upper-case hex digits of the SHA-256 of ``text``: how an ACK's MSH-10 names a
    control id too long to repeat (the ACK goes back to the system that sent the id)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:17].upper()


# The key of the digests that name sender text in logs and the audit trail. An unkeyed
# digest of an ID number gives the number back to anyone who tries every number (a
# resident ID card number has well under 2**40 plausible values), so each is keyed: by
# the bridge's own key (use_label_key), until then by one made for this process alone.
_label_key: list[bytes] = [secrets.token_bytes(32)]

#: What the label key is derived from the audit pseudonym key with (HMAC-SHA256).
LABEL_KEY_INFO = b"hl7-sender-text-label"


def label_key_of(pseudonym_key: bytes) -> bytes:
    """The label key of a bridge whose audit pseudonym key is ``pseudonym_key``."""
    return hmac.new(pseudonym_key, LABEL_KEY_INFO, hashlib.sha256).digest()


def use_label_key(pseudonym_key: bytes) -> None:
    """Name sender text under this installation's key, derived from its audit pseudonym
    key (``audit.pseudonym_key_file``), wherever no key is given: the same text gets
    the same label in every log line and audit entry, across restarts, and nobody
    without the key can tell which text a label names. The HL7 v2 listener and the
    intake router give their own bridge's key (:func:`label_key_of`) to every label
    they make, so two bridges in one process each name text under their own; this is
    the key of what names text without one (a visit's log line in the intake ledger)."""
    _label_key[0] = label_key_of(pseudonym_key)


def label_digest(text: str, key: bytes | None = None) -> str:
    """17 upper-case hex digits of the HMAC-SHA256 of ``text`` under ``key`` (a
    bridge's :func:`label_key_of`; without it, the key :func:`use_label_key` set):
    how logs and the audit trail name sender text that is not a plain id."""
    return hmac.new(key if key is not None else _label_key[0], text.encode("utf-8"),
                    hashlib.sha256).hexdigest()[:17].upper()


def id_label(text: str, key: bytes | None = None) -> str:
    """How logs and the audit trail name a sender's identifier (MSH-3, MSH-4, MSH-9,
    MSH-10): as sent when it reads as a plain code or control id, else ``#`` and its
    :func:`label_digest` under ``key``. The field is the sender's text: an HIS that puts
    a patient's name, an ID number (any run of six digits or more) or terminal control
    sequences there must not have them copied into a log line or an audit entry, nor a
    digest that trying every ID number would undo."""
    if not text or (_PLAIN_ID.fullmatch(text) and not has_digit_run(text)):
        return text
    return "#" + label_digest(text, key)


def message_label(sender: str, control_id: str, key: bytes | None = None) -> str:
    """``MSH-3|MSH-4/MSH-10`` of a stored message (``sender`` is ``MSH-3|MSH-4``), each
    part named by :func:`id_label` under ``key``."""
    application, _, facility = sender.partition("|")
    return (f"{id_label(application, key)}|{id_label(facility, key)}"
            f"/{id_label(control_id, key)}")


@dataclass(frozen=True)
class MSHHeader:
    """What an answer needs from MSH, before (or without) the full parser.

    Fields are decoded with the MSH-18 character set and kept as sent, components
    included (``"HIS^2.16.156.10011.1.5^ISO"``). ``raw_fields`` holds every MSH field by
    number (``raw_fields[3]`` is MSH-3); MSH-1 is the field separator itself.
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
    def component_separator(self) -> str:
        return self.encoding_characters[:1] or "^"

    @property
    def sender(self) -> str:
        """The deduplication key of the sending system: ``MSH-3|MSH-4``."""
        return f"{self.sending_application}|{self.sending_facility}"

    def label(self, key: bytes | None = None) -> str:
        """``MSH-3|MSH-4/MSH-10`` as logs and the audit trail may name the message
        (see :func:`id_label`; ``key``: the bridge's label key)."""
        return message_label(self.sender, self.control_id, key)

    @property
    def facility_id(self) -> str:
        """MSH-4's first component (HD namespace id), e.g. ``HOSP-A`` of ``HOSP-A^1.2.3^ISO``."""
        return self.sending_facility.split(self.component_separator, 1)[0]

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``A01``; empty when absent."""
        parts = self.message_type.split(self.component_separator)
        return parts[1] if len(parts) > 1 else ""

    @property
    def type_and_event(self) -> str:
        """MSH-9.1^MSH-9.2, e.g. ``ADT^A01`` (what mappings and routing rules name)."""
        parts = self.message_type.split(self.component_separator)
        return "^".join(parts[:2]) if len(parts) > 1 else parts[0]

    @property
    def version_id(self) -> str:
        """MSH-12.1 (MSH-12 may carry components after the version)."""
        return self.version.split(self.component_separator, 1)[0]

    @property
    def codec(self) -> str:
        """The Python codec of MSH-18."""
        return codec_for(self.charset)


_SEGMENT_SPLIT = re.compile(rb"\r\n|\r|\n")

#: The MLLP start and end block bytes (VT, FS): never data in a field the bridge echoes.
FRAMING_BYTES = re.compile(rb"[\x0b\x1c]")
_FRAMING_TEXT = re.compile("[\x0b\x1c]")

#: Each codec the bridge reads, once, in the order a self-consistent MSH-18 is looked for.
_CODECS = tuple(dict.fromkeys(CHARSETS.values()))


def _declared(text: str, sep: str) -> str:
    """MSH-18's first repetition's first component in a decoded (or naively read) MSH."""
    fields = text.split(sep)
    if len(fields) < 18:
        return ""
    encoding = fields[1]
    rep, comp = encoding[1:2] or "~", encoding[:1] or "^"
    return fields[17].split(rep)[0].split(comp)[0].strip()


def msh_charset(segment: bytes) -> tuple[str, str]:
    """The character set MSH-18 of ``segment`` (a raw MSH segment) declares, and its codec.

    MSH-18 says how to decode the bytes, but the fields can only be counted after
    decoding: in GBK and GB 18030 a character's trail byte may be ``|``, ``^``, ``~`` or
    ``\\`` (``東`` is ``96 7C``), so splitting the bytes first shifts every later field.
    The reading taken is the one that agrees with itself: decoded with codec C, MSH-18
    names C. The plain byte reading is tried first (it is right whenever no multi-byte
    character holds a delimiter byte), then every codec the bridge reads. When no
    reading agrees, a reading that names a character set the bridge does not read
    raises :class:`ParseError` (103) naming MSH-18; otherwise the plain reading's name
    is returned with its codec, so decoding fails where the bytes are wrong.
    """
    sep = segment[3:4].decode("latin-1")
    naive = _declared(segment.decode("latin-1"), sep)
    first = CHARSETS.get(naive.upper())
    readings: list[str] = []
    for codec in ((first,) if first else ()) + _CODECS:
        try:
            text = segment.decode(codec)
        except UnicodeDecodeError:
            continue
        declared = _declared(text, sep)
        if CHARSETS.get(declared.upper()) == codec:
            return declared, codec
        readings.append(declared)
    for declared in readings:
        codec_for(declared)  # a reading naming a character set the bridge does not read
    return naive, codec_for(naive)


def usable_delimiter(byte: int) -> bool:
    """May ``byte`` be an HL7 delimiter (MSH-1, MSH-2)? Printable ASCII, not a letter or digit.

    Control bytes are refused: a VT or FS delimiter would end the MLLP frame of every
    answer written with it, CR and LF end segments.
    """
    return 0x21 <= byte <= 0x7E and not chr(byte).isalnum()


def first_segment(message: bytes) -> bytes:
    """The first segment of a message; CR, LF and CRLF all end a segment."""
    return _SEGMENT_SPLIT.split(message, 1)[0]


def read_msh(message: bytes) -> MSHHeader:
    """Read MSH of ``message`` without the full parser.

    Raises :class:`bridge.errors.ParseError` naming the MSH field at fault (never its
    value) when the message does not start with a usable MSH segment, lacks MSH-9
    or MSH-10, or holds an MLLP framing byte (VT, FS) in an MSH field: the ACK echoes
    MSH, and such a message is refused before anything of it is stored.
    """
    seg = first_segment(message.lstrip(b"\x0b\r\n \t"))
    if not seg.startswith(b"MSH") or len(seg) < 8:
        raise ParseError("message does not start with an MSH segment", location="MSH",
                         hl7_code="100")
    sep = seg[3:4]
    if not usable_delimiter(sep[0]):
        raise ParseError("unusable field separator", location="MSH-1", hl7_code="102")
    # MSH-2 comes before any text field, so it is ASCII and splits safely as bytes.
    encoding = seg[4:].split(sep, 1)[0]
    if not 2 <= len(encoding) <= 5 or sep in encoding \
            or not all(usable_delimiter(b) for b in encoding):
        raise ParseError("unusable encoding characters", location="MSH-2", hl7_code="102")
    charset, codec = msh_charset(seg)
    try:
        text = seg.decode(codec)
    except UnicodeDecodeError as exc:
        raise ParseError("bytes not valid in the declared character set",
                         location=f"MSH-{seg[:exc.start].count(sep) + 1}",
                         hl7_code="102") from None
    # Split only after decoding: a GBK or GB 18030 trail byte may equal a delimiter.
    fields: list[str] = ["MSH", sep.decode("ascii"), *text[4:].split(sep.decode("ascii"))]
    for number, value in enumerate(fields[2:], start=2):
        if _FRAMING_TEXT.search(value):
            # An ACK echoes MSH fields: one holding VT or FS could not be framed back.
            raise ParseError("an MLLP framing byte (VT or FS) inside the field",
                             location=f"MSH-{number}", hl7_code="102")

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
        raise ParseError("message type is missing", location="MSH-9", hl7_code="101")
    if not header.control_id:
        raise ParseError("message control id is missing", location="MSH-10", hl7_code="101")
    return header


def header_from_fields(fields: list[str] | tuple[str, ...], charset: str) -> MSHHeader:
    """An :class:`MSHHeader` from MSH fields already split (``fields[n]`` is MSH-n)."""

    def field(number: int) -> str:
        return fields[number] if number < len(fields) else ""

    return MSHHeader(
        field_separator=field(1) or "|", encoding_characters=field(2) or "^~\\&",
        sending_application=field(3), sending_facility=field(4),
        receiving_application=field(5), receiving_facility=field(6),
        message_type=field(9), control_id=field(10), processing_id=field(11),
        version=field(12), charset=charset, raw_fields=tuple(fields))
