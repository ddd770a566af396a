"""Reading HL7 v2 (ER7) messages: framing, character sets and lazy field access.

The tokenizer is deliberately small: a message is split into segments and fields when it
is read, and into repetitions, components and subcomponents only when a field is asked
for. Knowledge of what each field may hold (data types, lengths, required fields and
segments) comes from hl7apy's reference tables and is applied by
:mod:`bridge.mapping.hl7v2.schema`; hl7apy's own element tree is not built, because
building it costs two orders of magnitude more than everything else the bridge does with
a message.

Character sets: MSH-18 names the encoding of the bytes (``UNICODE UTF-8``,
``GB 18030-2000``, ``GBK`` as Chinese HIS send them); bytes that do not decode as declared
raise :class:`~bridge.errors.ParseError` naming MSH-18 and the segment and field where
decoding failed. Segments may be separated by CR, LF or CRLF.

Values are unescaped when read (:meth:`Delimiters.unescape` lists every HL7 v2.5 escape
sequence and what becomes of it); an escape the bridge cannot read is refused naming the
field, never passed on as text.

Locations use the form ``PID[1]-5[1].1``: segment and its repetition, field, the field's
repetition (shown for repeating fields), component and subcomponent. Errors never carry
the values found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from bridge.errors import MappingError, ParseError
from bridge.mapping.hl7v2.header import CHARSETS, msh_charset

# Without MSH-18, HL7 assumes ASCII; Chinese feeds that omit it send UTF-8, which is a
# superset of ASCII, so UTF-8 accepts both without guessing at GBK.
DEFAULT_CHARSET = "UNICODE UTF-8"

_ESCAPE_RE_CACHE: dict[tuple[str, ...], re.Pattern[str]] = {}
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
# Formatting commands (FT data type): a name, then an optional signed number.
_FORMATTING = re.compile(r"\.(br|sp|sk|ce|fi|nf|in|ti) ?([+-]?\d{1,4})?")
_MAX_FORMAT_REPEAT = 100


class Loc(NamedTuple):
    """Where in a message: segment id, segment repetition, field, field repetition,
    component and subcomponent (1-based; 0 = not narrowed to that level)."""

    segment: str
    seg_rep: int = 1
    field: int = 0
    field_rep: int = 0
    component: int = 0
    subcomponent: int = 0

    def __str__(self) -> str:
        text = f"{self.segment}[{self.seg_rep}]"
        if self.field:
            text += f"-{self.field}"
            if self.field_rep:
                text += f"[{self.field_rep}]"
            if self.component:
                text += f".{self.component}"
                if self.subcomponent:
                    text += f".{self.subcomponent}"
        return text


def hl7_error(cls: type[ParseError | MappingError], message: str, loc: Loc | str,
              code: str) -> ParseError | MappingError:
    """An error naming an HL7 location, with the table 0357 code an ACK should carry."""
    if isinstance(loc, Loc):
        return cls(message, location=str(loc), hl7_location=loc, hl7_code=code)
    return cls(message, location=loc, hl7_code=code)


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators declared in MSH-1 and MSH-2, and the codec of MSH-18.

    The codec is what hexadecimal escapes (``\\Xhh..\\``) are decoded with: their bytes
    are in the message's own character set.
    """

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    codec: str = "utf-8"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent

    def unescape(self, text: str, where: Loc | str | None = None) -> str:
        """``text`` with its HL7 escape sequences (v2.5 section 2.7) read.

        ====================  ==============================================================
        sequence              read as
        ====================  ==============================================================
        ``F S T R E``         the field, component, subcomponent, repetition and escape
                              characters
        ``Xhh..``             the bytes ``hh..`` decoded in the message's character set;
                              refused when they make a control character other than a
                              tab or a line break
        ``H``, ``N``          dropped (highlighting on, normal text: display only)
        ``.br``, ``.ce``      a line break (centring is display only)
        ``.sp n``             ``n`` line breaks (one when ``n`` is absent)
        ``.sk n``             ``n`` spaces (one when ``n`` is absent)
        ``.fi .nf .in .ti``   dropped (fill mode and indents are display only)
        ``Cxxyy``, ``Mxxyyzz``  refused: ISO 2022 character set switches; the bridge reads
                              the one character set MSH-18 names
        ``Zxx..``             refused: a locally defined escape means nothing here
        anything else         refused, as is an escape character with no closing one
        ====================  ==============================================================

        A refusal raises :class:`~bridge.errors.MappingError` (HL7 code 102) naming
        ``where`` (the segment and field), never the text.
        """
        e = self.escape
        if not e or e not in text:
            return text
        key = (e,)
        pattern = _ESCAPE_RE_CACHE.get(key)
        if pattern is None:
            pattern = re.compile(re.escape(e) + "([^" + re.escape(e) + "]*)" + re.escape(e))
            _ESCAPE_RE_CACHE[key] = pattern
        table = {"F": self.field, "S": self.component, "T": self.subcomponent,
                 "R": self.repetition, "E": e, "H": "", "N": ""}

        def read(m: re.Match[str]) -> str:
            body = m.group(1)
            plain = table.get(body)
            if plain is not None:
                return plain
            if body[:1] == "X" and _HEX.fullmatch(body[1:]):
                try:
                    decoded = bytes.fromhex(body[1:]).decode(self.codec)
                except UnicodeDecodeError:
                    raise self._unreadable("hexadecimal escape not valid in the message's "
                                           "character set", where) from None
                if _CONTROL.search(decoded):
                    # NUL, the MLLP framing bytes and the like are no text: FHIR strings
                    # may not hold them (a tab and line breaks they may).
                    raise self._unreadable("hexadecimal escape of a control character",
                                           where)
                return decoded
            command = _FORMATTING.fullmatch(body)
            if command is not None:
                name, number = command.group(1), command.group(2)
                count = int(number) if number else 1
                if name in ("br", "ce"):
                    return "\n"
                if name == "sp" and count <= _MAX_FORMAT_REPEAT:
                    return "\n" * count
                if name == "sk" and count <= _MAX_FORMAT_REPEAT:
                    return " " * count
                if name in ("fi", "nf", "in", "ti"):
                    return ""
            raise self._unreadable("an escape sequence the bridge does not read", where)

        if e in pattern.sub("", text):
            raise self._unreadable("an escape character without its closing one", where)
        return pattern.sub(read, text)

    @staticmethod
    def _unreadable(message: str, where: Loc | str | None) -> MappingError:
        if where is None:
            return MappingError(message, hl7_code="102")
        return hl7_error(MappingError, message, where, "102")  # type: ignore[return-value]

    def escape_text(self, text: str) -> str:
        """Escape delimiters in a value written into a message."""
        e = self.escape
        out = text.replace(e, f"{e}E{e}")
        for char, code in ((self.field, "F"), (self.component, "S"),
                           (self.subcomponent, "T"), (self.repetition, "R")):
            out = out.replace(char, f"{e}{code}{e}")
        return out


class Segment:
    """One segment: its id, its repetition number among segments of that id, its fields.

    Fields are kept as raw (escaped) text; :meth:`field` splits one field into
    repetitions, components and subcomponents on demand.
    """

    __slots__ = ("_delims", "_split", "index", "line", "name", "raw_fields", "rep")

    def __init__(self, name: str, rep: int, index: int, raw_fields: list[str],
                 delims: Delimiters, line: str = "") -> None:
        self.name = name
        self.rep = rep
        self.index = index  # position in the message, 0-based
        self.raw_fields = raw_fields  # raw_fields[n] is field n (MSH: shifted, see below)
        self._delims = delims
        self.line = line  # the segment as received (for the validation cache)
        # Field number -> (the raw text split, its repetitions). Rules and conditions read
        # a repeating field one repetition at a time; splitting the field again for each
        # would make a field of n repetitions cost n^2. The raw text is kept beside its
        # split so a field rewritten in place (biometric digests) is split afresh.
        self._split: dict[int, tuple[str, list[str]]] | None = None

    def __repr__(self) -> str:  # never shows values
        return f"<Segment {self.name}[{self.rep}] with {len(self.raw_fields) - 1} fields>"

    @property
    def field_count(self) -> int:
        return len(self.raw_fields) - 1

    def raw(self, n: int) -> str:
        """The raw text of field ``n`` (all repetitions), or ``""`` when absent."""
        fields = self.raw_fields
        return fields[n] if n < len(fields) else ""

    def repetitions(self, n: int) -> list[str]:
        """Field ``n`` split into its repetitions (MSH-1 and MSH-2 never split)."""
        text = self.raw(n)
        if not text:
            return []
        if self.name == "MSH" and n <= 2:
            return [text]
        return list(self._repetitions(n, text))

    def _repetitions(self, n: int, text: str) -> list[str]:
        """Field ``n`` (whose raw text is ``text``) split into repetitions, split once."""
        split = self._split
        if split is None:
            split = self._split = {}
        cached = split.get(n)
        if cached is not None and cached[0] is text:
            return cached[1]
        reps = text.split(self._delims.repetition)
        split[n] = (text, reps)
        return reps

    def value(self, n: int, rep: int = 1, component: int = 1, subcomponent: int = 1) -> str:
        """The unescaped value at ``n[rep].component.subcomponent`` or ``""``."""
        text = self.raw(n)
        if not text:
            return ""
        d = self._delims
        if self.name == "MSH" and n <= 2:
            return text
        if d.repetition in text:
            reps = self._repetitions(n, text)
            if rep > len(reps):
                return ""
            text = reps[rep - 1]
        elif rep != 1:
            return ""
        if d.component in text:
            comps = text.split(d.component)
            if component > len(comps):
                return ""
            text = comps[component - 1]
        elif component != 1:
            return ""
        if d.subcomponent in text:
            subs = text.split(d.subcomponent)
            if subcomponent > len(subs):
                return ""
            text = subs[subcomponent - 1]
        elif subcomponent != 1:
            return ""
        if d.escape not in text:
            return text
        return d.unescape(text, Loc(self.name, self.rep, n, rep, component, subcomponent))


class HL7Message:
    """A decoded HL7 v2 message with lazy access to its fields.

    Attributes: ``message_type`` (``"ADT^A01"``), ``structure`` (MSH-9.3 or ``None``),
    ``version`` (MSH-12.1), ``control_id`` (MSH-10), ``sending_application`` (MSH-3.1),
    ``sending_facility`` (MSH-4.1), ``charset`` (MSH-18 as declared, or the default
    ``UNICODE UTF-8``), ``encoding`` (the Python codec used), ``delimiters``,
    ``segments`` (in message order) and :meth:`segment_list` / :meth:`get` for access.
    """

    __slots__ = ("_validated", "by_name", "charset", "delimiters", "encoding", "segments")

    def __init__(self, segments: list[Segment], delimiters: Delimiters, charset: str,
                 encoding: str) -> None:
        self.segments = segments
        self.delimiters = delimiters
        self.charset = charset
        self.encoding = encoding
        self.by_name: dict[str, list[Segment]] = {}
        for seg in segments:
            self.by_name.setdefault(seg.name, []).append(seg)
        self._validated: str | None = None

    def __repr__(self) -> str:
        return f"<HL7Message {self.message_type} v{self.version} ({len(self.segments)} segments)>"

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_type(self) -> str:
        msh = self.msh
        return f"{msh.value(9, 1, 1)}^{msh.value(9, 1, 2)}"

    @property
    def structure(self) -> str | None:
        return self.msh.value(9, 1, 3) or None

    @property
    def version(self) -> str:
        return self.msh.value(12, 1, 1)

    @property
    def control_id(self) -> str:
        return self.msh.value(10)

    @property
    def sending_application(self) -> str:
        return self.msh.value(3)

    @property
    def sending_facility(self) -> str:
        return self.msh.value(4)

    def segment_list(self, name: str) -> list[Segment]:
        """All segments with this id, in message order (empty when none)."""
        return self.by_name.get(name, [])

    def get(self, path: str) -> str:
        """The value at a simple path such as ``"PID-5.1"`` (first repetitions), or ``""``."""
        seg_name, _, rest = path.partition("-")
        segs = self.by_name.get(seg_name)
        if not segs or not rest:
            return ""
        parts = [int(p) for p in rest.split(".")]
        parts += [1] * (3 - len(parts))
        return segs[0].value(parts[0], 1, parts[1], parts[2])


def _split_segments(text: str) -> list[str]:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [s for s in text.split("\r") if s.strip()]


def _strip_frame(data: bytes) -> bytes:
    # Tolerate MLLP start/end bytes and surrounding blank lines, not other leading bytes.
    return data.strip(b"\x0b\x1c\r\n \t")


def _delimiters(first: str) -> Delimiters:
    if not first.startswith("MSH") or len(first) < 8:
        raise hl7_error(ParseError, "message does not start with an MSH segment", "MSH", "100")
    fsep = first[3]
    enc = first[4:].split(fsep, 1)[0]
    if fsep.isalnum() or fsep.isspace() or len(enc) < 4 or len(set(enc[:4] + fsep)) != 5 \
            or any(c.isalnum() or c.isspace() for c in enc[:4]):
        raise hl7_error(ParseError, "MSH-1/MSH-2 do not declare valid delimiters",
                        Loc("MSH", 1, 2), "102")
    return Delimiters(field=fsep, component=enc[0], repetition=enc[1], escape=enc[2],
                      subcomponent=enc[3])


def _charset_field(msh: str, fsep: str) -> str:
    fields = msh.split(fsep)
    # fields[0] is "MSH", fields[1] is MSH-2: MSH-n is fields[n - 1].
    return fields[17].strip() if len(fields) > 17 else ""


def _codec(charset: str) -> str:
    # MSH-18 repeats in v2.5 (first repetition is the default character set).
    name = charset.split("~", 1)[0].strip().upper() if charset else DEFAULT_CHARSET
    codec = CHARSETS.get(name or DEFAULT_CHARSET)
    if codec is None:
        raise hl7_error(ParseError, "MSH-18 names a character set the bridge does not read",
                        Loc("MSH", 1, 18), "103")
    return codec


def _decode_failure(data: bytes, offset: int, fsep: bytes, charset: str) -> ParseError:
    """A ParseError naming MSH-18 and the segment and field where decoding failed."""
    before = data[:offset].replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    lines = [s for s in before.split(b"\r")]
    current = lines[-1] if lines else b""
    seg_name = current[:3].decode("ascii", "replace") if len(current) >= 3 else "?"
    if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", seg_name):
        seg_name = "?"
    seg_rep = sum(1 for s in lines if s[:3] == current[:3] and s.strip())
    field = current.count(fsep)
    if seg_name == "MSH":
        field += 1
    declared = charset or f"nothing (read as {DEFAULT_CHARSET})"
    return hl7_error(
        ParseError,
        f"bytes are not valid in the character set MSH-18 declares ({declared})",
        Loc(seg_name, max(seg_rep, 1), field), "102")  # type: ignore[return-value]


def parse_hl7(data: bytes | str) -> HL7Message:
    """Read one HL7 v2 message (ER7) from bytes or text.

    Bytes are decoded per MSH-18 (UTF-8 when it is empty); segments may be separated by
    CR, LF or CRLF; MLLP framing bytes around the message are tolerated. Raises
    :class:`~bridge.errors.ParseError` when the message cannot be read at all: no MSH
    first, invalid delimiters, an unknown character set, or bytes that do not decode as
    declared (naming MSH-18 and the segment/field). Field contents are checked later by
    :meth:`HL7Message` validation in :func:`~bridge.mapping.hl7v2.hl7_to_record`.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = _strip_frame(bytes(data))
        # Delimiters (MSH-1, MSH-2) come before any text field: ASCII in every
        # character set we read. The fields are split only after the whole message is
        # decoded, because a GBK or GB 18030 trail byte may equal a delimiter.
        end = min((i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0), default=len(raw))
        delims = _delimiters(raw[:end].decode("latin-1"))
        try:
            codec = msh_charset(raw[:end])[1]
        except ParseError:
            raise hl7_error(ParseError, "MSH-18 names a character set the bridge does not read",
                            Loc("MSH", 1, 18), "103") from None
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as exc:
            raise _decode_failure(raw, exc.start, delims.field.encode("latin-1"),
                                  _charset_field(raw[:end].decode("latin-1"),
                                                 delims.field)) from None
        first = text.split("\r", 1)[0].split("\n", 1)[0]
        charset = _charset_field(first, delims.field)
        delims = replace(delims, codec=codec)
    elif isinstance(data, str):
        text = data.strip("\x0b\x1c\r\n \t")
        end = min((i for i in (text.find("\r"), text.find("\n")) if i >= 0), default=len(text))
        delims = _delimiters(text[:end])
        charset = _charset_field(text[:end], delims.field)
        codec = _codec(charset)
        delims = replace(delims, codec=codec)
    else:
        raise TypeError("parse_hl7 takes bytes or str")

    fsep = delims.field
    segments: list[Segment] = []
    counts: dict[str, int] = {}
    for index, line in enumerate(_split_segments(text)):
        name = line[:3]
        if len(line) > 3 and line[3] != fsep or not _SEGMENT_ID.match(name):
            raise hl7_error(ParseError, "segment does not start with a segment id",
                            Loc(f"#{index + 1}"), "100")
        if name == "MSH":
            if index != 0:
                raise hl7_error(ParseError, "a second MSH segment in one message",
                                Loc("MSH", 2), "100")
            # MSH-1 is the field separator itself: keep numbering so raw_fields[n] = MSH-n.
            fields = ["MSH", fsep] + line[4:].split(fsep)
        else:
            fields = line.split(fsep)
        rep = counts.get(name, 0) + 1
        counts[name] = rep
        segments.append(Segment(name, rep, index, fields, delims, line))
    if not segments:
        raise hl7_error(ParseError, "empty message", "MSH", "100")
    return HL7Message(segments, delims, charset or DEFAULT_CHARSET, codec)


_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}\Z")


def describe(msg: HL7Message) -> dict[str, Any]:
    """Header facts of a message (no patient data): type, version, ids, charset."""
    return {"message_type": msg.message_type, "structure": msg.structure,
            "version": msg.version, "control_id": msg.control_id,
            "sending_application": msg.sending_application,
            "sending_facility": msg.sending_facility, "charset": msg.charset}
