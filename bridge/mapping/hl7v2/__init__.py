"""HL7 v2 ingest: read a message, check it, map it, acknowledge it (pure code, no I/O).

Public API:

- :func:`parse_hl7` reads bytes or text into an :class:`HL7Message` (framing, MSH-18
  character set, CR/LF/CRLF); unreadable input raises :class:`~bridge.errors.ParseError`.
- :class:`HL7Reader` holds what a site has configured (its overlay of the mapping
  files, its organisation and facility table) and does the rest:
  :meth:`~HL7Reader.to_record` maps a message to its DE record, :meth:`~HL7Reader.to_fhir`
  on to FHIR R4 (a failure after mapping is named back in HL7 terms), and
  :meth:`~HL7Reader.intake` reads a message as the MLLP listener takes it: its own
  record, its part of a visit (:mod:`bridge.mapping.hl7v2.visit`) and the warnings about
  fields no mapping reads.
- :func:`hl7_to_record` and :func:`read_hl7` do the same with the shipped files.
- :func:`build_ack` answers with an HL7 ACK (MSA, and ERR naming the location and the
  HL7 table 0357 code) in the message's version and character set;
  :func:`~bridge.mapping.hl7v2.header.read_msh` reads MSH alone.

"Liberal in what it accepts, exact in what it says": fields a mapping reads are checked
strictly against their HL7 data types; problems in fields no mapping reads are kept as
warnings (``location code: text``) and do not refuse the message. Every refusal names
the HL7 location (``PID[1]-5[1].1``, ``DG1[2]-3.1``) and, where a data element needed
it, the element (``HDSD00.11.140 住院号``), never a value and never a FHIR path; errors
carry ``detail["hl7_code"]`` for the ACK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.errors import BridgeError, MappingError
from bridge.mapping.hl7v2.ack import ack_code_for, build_ack
from bridge.mapping.hl7v2.engine import element_label, map_message
from bridge.mapping.hl7v2.header import MSHHeader, read_msh
from bridge.mapping.hl7v2.message import HL7Message, Loc, hl7_error, parse_hl7
from bridge.mapping.hl7v2.schema import check_version, validate
from bridge.mapping.hl7v2.site import SiteContext, load_facilities
from bridge.mapping.hl7v2.spec import (
    MessageMapping,
    Path_,
    field_elements,
    read_fields,
    shipped_mappings,
)
from bridge.mapping.hl7v2.visit import VisitPart, VisitSpec, load_visits, make_part, member_of
from bridge.resources import SHIPPED, MappingFiles

__all__ = ["HL7Message", "HL7Reader", "Intake", "MSHHeader", "SiteContext", "ack_code_for",
           "build_ack", "hl7_to_record", "parse_hl7", "read_hl7", "read_msh"]

# MSH fields every answer and every visit uses, checked strictly whatever the mapping.
_ALWAYS_READ = frozenset({("MSH", 3), ("MSH", 4), ("MSH", 7), ("MSH", 9), ("MSH", 10),
                          ("MSH", 11), ("MSH", 12), ("MSH", 18)})
_ELEMENT = re.compile(r"HDSD\d{2}\.\d{2}\.\d{3}")
#: MSH-11.1 (HL7 table 0103) of the messages intake takes: production data only.
PRODUCTION = "P"


@dataclass
class Intake:
    """One message as the listener takes it (see :meth:`HL7Reader.intake`)."""

    message: HL7Message | None  # None when only MSH was read (a listener storing as is)
    message_type: str  # MSH-9.1^MSH-9.2
    record: dict[str, Any] | None  # its own record; None when it is only part of a visit
    visit: VisitSpec | None
    part: VisitPart | None
    facility: str  # the sending organisation's code, else MSH-4.1
    warnings: list[str] = field(default_factory=list)

    @property
    def dataset(self) -> str | None:
        return str(self.record["dataset"]) if self.record is not None else None


class HL7Reader:
    """Reads HL7 v2 for one site: its mapping files and what it says about itself."""

    def __init__(self, files: MappingFiles = SHIPPED, site: SiteContext | None = None) -> None:
        self.files = files
        self.mappings = shipped_mappings(files)
        self._by_id = {spec.id: spec for spec in self.mappings.values()}
        self.visits = load_visits(files)
        base = site or SiteContext()
        self.site = SiteContext(base.organization_code, base.organization_name,
                                load_facilities(files))
        self._read: dict[tuple[str, str], frozenset[tuple[str, int]]] = {}
        self.biometric_paths = self._biometric_paths()
        #: Data set code -> element ids marked biometric (for records that arrive as JSON).
        self.biometric_elements = self._biometric_elements()

    def _biometric_elements(self) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        specs = list(self.mappings.values()) + [
            part for visit in self.visits.values() for part in visit.parts.values()]
        for spec in specs:
            for element in list(spec.elements) + [e for g in spec.groups for e in g.elements]:
                if element.biometric and spec.dataset is not None:
                    found.setdefault(spec.dataset, set()).add(element.element)
        return {dataset: frozenset(ids) for dataset, ids in found.items()}

    def _biometric_paths(self) -> tuple[Path_, ...]:
        """The paths of every element any mapping marks biometric (message files, those
        they dispatch to among them, visit parts).

        They apply to every message the listener takes, whatever its type: a segment's
        field means the same in every message (PID-11 is the patient's address in an
        ADT^A01 and in a DFT^P03 alike), and a message type that does not read the field
        still carries it into the stored message.
        """
        specs = list(self.mappings.values()) + [
            part for visit in self.visits.values() for part in visit.parts.values()]
        paths: list[Path_] = []
        for spec in specs:
            paths += [p for p in spec.biometric_paths() if p not in paths]
        return tuple(paths)

    # --- which mapping ----------------------------------------------------------------------

    def mapping_for(self, msg: HL7Message) -> MessageMapping:
        """The mapping for the message's type, dispatch followed (error 200 when none)."""
        spec = self.mappings.get(msg.message_type)
        if spec is None:
            raise hl7_error(MappingError, "no mapping for this message type",
                            Loc("MSH", 1, 9), "200")
        check_version(msg.version)
        if msg.version not in spec.versions:
            raise hl7_error(MappingError, "HL7 version not covered by the mapping",
                            Loc("MSH", 1, 12), "203")
        if spec.dispatch is not None:
            path, cases = spec.dispatch
            segs = msg.segment_list(path.segment)
            code = segs[0].value(path.field, 1, path.component or 1) if segs else ""
            where = Loc(path.segment, 1, path.field)
            if not code:
                raise hl7_error(MappingError, "required to choose the data set but missing",
                                where, "101")
            target_id = cases.get(code)
            if target_id is None:
                raise hl7_error(MappingError, "code has no data set in this mapping", where,
                                "103")
            spec = self._by_id[target_id]
        return spec

    def context(self, msg: HL7Message) -> dict[str, str]:
        """Values of ``{context: ...}`` rules for this message's sending facility."""
        return self.site.values_for(msg.msh.value(4, 1, 1), msg.msh.value(4, 1, 2))

    def facility(self, msg: HL7Message) -> str:
        return self.site.facility_key(msg.msh.value(4, 1, 1), msg.msh.value(4, 1, 2))

    def _read_set(self, msg: HL7Message, own: MessageMapping,
                  visit: VisitSpec | None) -> frozenset[tuple[str, int]]:
        key = (msg.message_type + "|" + own.id, visit.kind if visit else "")
        found = self._read.get(key)
        if found is None:
            fields = set(_ALWAYS_READ) | read_fields(own)
            top = self.mappings.get(msg.message_type)
            if top is not None and top.dispatch is not None:
                fields.add((top.dispatch[0].segment, top.dispatch[0].field))
            if visit is not None:
                fields |= read_fields(visit.parts[msg.message_type]) | {("EVN", 2)}
                if visit.member_when is not None:
                    fields.add((visit.member_when.path.segment, visit.member_when.path.field))
            found = self._read[key] = frozenset(fields)
        return found

    def check(self, msg: HL7Message, own: MessageMapping, visit: VisitSpec | None,
              warnings: list[str] | None) -> None:
        """The message against its version's definitions (strict where it is read); a
        refusal of a field names the data elements the field is read for."""
        try:
            validate(msg, msg.structure or own.structure,
                     read=self._read_set(msg, own, visit) if warnings is not None else None,
                     warnings=warnings)
        except MappingError as exc:
            raise self._needed_for(exc, msg, own, visit) from None
        needed = list(own.required_segments)
        if visit is not None:
            needed += visit.parts[msg.message_type].required_segments
        for name in needed:
            if name not in msg.by_name:
                raise hl7_error(MappingError, "required segment missing", Loc(name), "100")

    def _needed_for(self, exc: MappingError, msg: HL7Message, own: MessageMapping,
                    visit: VisitSpec | None) -> MappingError:
        m = re.match(r"^([A-Z][A-Z0-9]{2})(?:\[\d+\])?-(\d+)", exc.location or "")
        if m is None:
            return exc
        key = (m.group(1), int(m.group(2)))
        specs = [own] + ([visit.parts[msg.message_type]] if visit is not None else [])
        labels: list[str] = []
        for spec in specs:
            assert spec.catalog is not None
            for element in field_elements(spec).get(key, []):
                label = element_label(spec.catalog, element)
                if label not in labels:
                    labels.append(label)
        if not labels:
            return exc
        return type(exc)(f"{exc.message}: needed for {', '.join(labels[:4])}",
                         location=exc.location, **exc.detail)

    # --- mapping ------------------------------------------------------------------------------

    def to_record(self, msg: HL7Message, *, warnings: list[str] | None = None,
                  trace: dict[str, str] | None = None) -> dict[str, Any]:
        """Check ``msg`` and map it to its DE record with its own mapping file.

        With ``warnings`` (a list), problems in fields no mapping reads are appended to it
        instead of refusing the message.
        """
        own = self.mapping_for(msg)
        self.check(msg, own, None, warnings)
        return map_message(own, msg, context=self.context(msg), trace=trace)

    def to_fhir(self, msg: HL7Message, *, now: datetime | None = None,
                warnings: list[str] | None = None) -> dict[str, Any]:
        """Map ``msg`` to FHIR R4 through its DE record; a refusal after the HL7 step
        (a data element the FHIR mapping requires, an invalid resource) is named at the
        HL7 field it comes from and the data element it was needed for."""
        from bridge.mapping import map_record

        trace: dict[str, str] = {}
        record = self.to_record(msg, warnings=warnings, trace=trace)
        try:
            return map_record(record, now=now, files=self.files)
        except MappingError as exc:
            raise self.translate(exc, record, trace) from None

    def translate(self, exc: BridgeError, record: dict[str, Any],
                  trace: dict[str, str]) -> MappingError:
        """A refusal about a DE record (element id) or its FHIR resources (FHIR path),
        named again at the HL7 location the element comes from."""
        from bridge.mapping import mapping_for

        try:
            spec = mapping_for(str(record.get("dataset")), self.files)
        except MappingError:
            return MappingError(exc.message, location="MSH-9", hl7_code="207")
        location = exc.location or ""
        elements = _ELEMENT.findall(location)
        fhir_element = ""
        if not elements and exc.detail.get("resource_type"):
            fhir_element = _fhir_element(str(exc.detail["resource_type"]), location)
            elements = _sources_of(spec, fhir_element)
        if not elements:
            return MappingError(f"{exc.message} in the {record.get('dataset')} record built "
                                "from this message", location="MSH-9", hl7_code="207")
        places = [(e, trace.get(location) or trace.get(e)) for e in elements]
        first = next((p for _, p in places if p), "MSH-9")
        labels = ", ".join(f"{element_label(spec.catalog, e)}" + (f" ({p})" if p else "")
                           for e, p in places)
        code = "101" if "missing" in exc.message or fhir_element else "102"
        what = (f"{spec.dataset} needs {labels}" if fhir_element
                else f"{exc.message}: {labels}")
        return MappingError(what, location=first.split(" ")[-1], hl7_code=code)

    # --- intake ---------------------------------------------------------------------------

    def intake(self, data: bytes | HL7Message, *, sender: str | None = None) -> Intake:
        """Read a message as the MLLP listener takes it.

        Its own record comes from its message mapping; a message that belongs to a visit
        (``visits/``) also gets its part of the visit's record, and when its own mapping
        targets the visit's data set (DFT^P03, an outpatient ADT^A04) the part is all
        there is (its own record would be incomplete). Fields no mapping reads are
        checked for structure only: problems there become ``warnings``, as does a
        charge transaction repeated within the message (counted once).
        """
        msg = data if isinstance(data, HL7Message) else parse_hl7(data)
        if msg.msh.value(11, 1, 1) != PRODUCTION:
            # A training or debugging message (an HIS test system pointed here) must
            # never become a claim: refused as a message this listener does not take.
            raise hl7_error(MappingError, "processing id is not P (production)",
                            Loc("MSH", 1, 11), "202")
        message_type = msg.message_type
        own = self.mapping_for(msg)
        visit = member_of(self.visits, message_type, msg)
        warnings: list[str] = []
        self.check(msg, own, visit, warnings)
        context = self.context(msg)
        facility = self.facility(msg)
        record: dict[str, Any] | None = None
        if visit is None or own.dataset != visit.dataset:
            record = map_message(own, msg, context=context)
        part = None
        if visit is not None:
            part = make_part(visit, msg, message_type,
                             sender=sender or f"{msg.msh.raw(3)}|{msg.msh.raw(4)}",
                             facility=facility, context=context, warnings=warnings)
        return Intake(msg, message_type, record, visit, part, facility, warnings)


def _fhir_element(resource_type: str, location: str) -> str:
    """``Composition.author`` of ``Bundle.entry[0].resource.author[0].reference``."""
    rest = location.split(".resource.", 1)[1] if ".resource." in location else ""
    name = re.split(r"[.\[]", rest, maxsplit=1)[0] if rest else ""
    return f"{resource_type}.{name}" if name else resource_type


def _sources_of(spec: Any, fhir_element: str) -> list[str]:
    """Data elements whose rules fill (or decide) ``fhir_element`` in a WS 445 mapping."""
    found: list[str] = []

    def add(element: str | None) -> None:
        if element and element not in found:
            found.append(element)

    def condition(cond: Any) -> None:
        if cond is None:
            return
        add(cond.source)
        for e in (*cond.any_present, *cond.none_present):
            add(e)
        for inner in cond.all_of:
            condition(inner)

    def rulesets(items: Any) -> None:
        for rs in items:
            if rs.key.split("[", 1)[0] != fhir_element and not rs.key.startswith(
                    fhir_element + "."):
                continue
            for rule in rs.rules:
                add(rule.source)
                condition(rule.when)

    for resource in spec.resources:
        rulesets(resource.rules)
    for group in spec.groups.values():
        for resource in group.resources:
            rulesets(resource.rules)
    return found


_DEFAULT: HL7Reader | None = None


def default_reader() -> HL7Reader:
    """The reader of the shipped files with no site configuration (cached)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = HL7Reader()
    return _DEFAULT


def mapping_for_message(msg: HL7Message) -> MessageMapping:
    """The shipped mapping file for the message's type (``ADT^A01`` -> ``ADT_A01.yaml``)."""
    return default_reader().mapping_for(msg)


def hl7_to_record(msg: HL7Message, reader: HL7Reader | None = None) -> dict[str, Any]:
    """Check ``msg`` strictly (every field) and map it to a DE record.

    Checks, in order: a mapping exists for the message type (HL7 error 200) and version
    (203); the message against its version's definitions (required segments and fields,
    lengths, dates, numbers — see :mod:`bridge.mapping.hl7v2.schema`); the segments the
    mapping requires; then each rule (required values, codes through their value sets,
    target formats). Raises :class:`~bridge.errors.MappingError` naming the HL7 location.
    """
    return (reader or default_reader()).to_record(msg)


def read_hl7(data: bytes | str, reader: HL7Reader | None = None) -> dict[str, Any]:
    """Parse and map in one step: :func:`parse_hl7` then :func:`hl7_to_record`."""
    return hl7_to_record(parse_hl7(data), reader)
