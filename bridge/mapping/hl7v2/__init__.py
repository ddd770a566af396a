"""HL7 v2 ingest: read a message, check it, map it to a WS 445 DE record, acknowledge it.

Public API (pure functions, no I/O, no asyncio):

- :func:`parse_hl7` reads bytes or text into an :class:`HL7Message` (framing, MSH-18
  character set, CR/LF/CRLF); unreadable input raises :class:`~bridge.errors.ParseError`.
- :func:`hl7_to_record` checks the message against its HL7 version's definitions and maps
  it, driven by ``mappings/hl7v2/messages/<TYPE>.yaml``, to a DE record
  ``{"dataset", "elements", "groups"}``; readable but unmappable input raises
  :class:`~bridge.errors.MappingError`.
- :func:`read_hl7` does both.
- :func:`build_ack` answers with an HL7 ACK (MSA, and ERR naming the location and the
  HL7 table 0357 code) in the message's version and character set.

Errors name HL7 locations (``PID[1]-5[1].1``, ``DG1[2]-3.1``), never values; their
``detail`` carries ``hl7_location`` and ``hl7_code`` for the ACK.
"""

from __future__ import annotations

from typing import Any

from bridge.errors import MappingError
from bridge.mapping.hl7v2.ack import build_ack
from bridge.mapping.hl7v2.engine import map_message
from bridge.mapping.hl7v2.message import HL7Message, Loc, hl7_error, parse_hl7
from bridge.mapping.hl7v2.schema import check_version, validate
from bridge.mapping.hl7v2.spec import MessageMapping, shipped_mappings

__all__ = ["HL7Message", "build_ack", "hl7_to_record", "mapping_for_message", "parse_hl7",
           "read_hl7"]


def mapping_for_message(msg: HL7Message) -> MessageMapping:
    """The shipped mapping file for the message's type (``ADT^A01`` -> ``ADT_A01.yaml``)."""
    spec = shipped_mappings().get(msg.message_type)
    if spec is None:
        raise hl7_error(MappingError, "no mapping for this message type",
                        Loc("MSH", 1, 9), "200")
    return spec


def hl7_to_record(msg: HL7Message) -> dict[str, Any]:
    """Check ``msg`` and map it to a DE record.

    Checks, in order: a mapping exists for the message type (HL7 error 200) and version
    (203); the message against its version's definitions (required segments and fields,
    lengths, dates, numbers — see :mod:`bridge.mapping.hl7v2.schema`); the segments the
    mapping requires; then each rule (required values, codes through their value sets,
    target formats). Raises :class:`~bridge.errors.MappingError` naming the HL7 location.
    """
    spec = mapping_for_message(msg)
    check_version(msg.version)
    if msg.version not in spec.versions:
        raise hl7_error(MappingError, "HL7 version not covered by the mapping",
                        Loc("MSH", 1, 12), "203")
    validate(msg, msg.structure or spec.structure)
    if spec.dispatch is not None:
        path, cases = spec.dispatch
        segs = msg.segment_list(path.segment)
        code = segs[0].value(path.field, 1, path.component or 1) if segs else ""
        where = Loc(path.segment, 1, path.field)
        if not code:
            raise hl7_error(MappingError, "required to choose the data set but missing", where,
                            "101")
        target_id = cases.get(code)
        if target_id is None:
            raise hl7_error(MappingError, "code has no data set in this mapping", where, "103")
        spec = next(s for s in shipped_mappings().values() if s.id == target_id)
    for name in spec.required_segments:
        if name not in msg.by_name:
            raise hl7_error(MappingError, "required segment missing", Loc(name), "100")
    return map_message(spec, msg)


def read_hl7(data: bytes | str) -> dict[str, Any]:
    """Parse and map in one step: :func:`parse_hl7` then :func:`hl7_to_record`."""
    return hl7_to_record(parse_hl7(data))
