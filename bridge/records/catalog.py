"""Data-set element catalogs (WS 445) and the checks their declared formats imply.

A WS 445 data set names each of its elements with an internal identifier
(``HDSD00.11.110``) that points at a WS 363 data element (``DE02.01.039.00``) with a data
type and a format such as ``AN..18``, ``N2``, ``D8``, ``DT15`` or ``N..10,2``. The WS 363
identifier is not unique inside a data set (the front sheet uses ``DE07.00.010.00`` for 29
fee rows), so records are keyed by the internal identifier and so is this catalog.

:meth:`DataElement.check` normalises a value as the source system sent it and raises
:class:`~bridge.errors.MappingError` naming the element when it breaks the declared
format. The value itself is never part of the message.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from bridge.errors import LoadError, MappingError
from bridge.messages import MAX_SAFE_INTEGER
from bridge.resources import mappings_dir

# A (alphabetic), AN (alphanumeric) or N (numeric), optional minimum, ``..`` and maximum,
# optional decimal scale: ``A..50``, ``AN10``, ``N1..3``, ``N..10,2``.
_FORMAT = re.compile(r"^(?P<kind>AN|A|N)(?P<min>[0-9]+)?(?:\.\.(?P<max>[0-9]+))?(?:,(?P<scale>[0-9]+))?\Z")
_DIGITS = re.compile(r"^[0-9]+\Z")
_DECIMAL = re.compile(r"^[0-9]+(?:\.[0-9]+)?\Z")


@dataclass(frozen=True, slots=True)
class DataElement:
    """One element of a data set: internal id, WS 363 id, name, type and format."""

    id: str
    de_id: str
    name: str
    data_type: str
    format: str

    @property
    def is_code(self) -> bool:
        """Coded elements (WS 363 type S3) take their values from a code table."""
        return self.data_type == "S3"

    def check(self, value: object, *, location: str | None = None) -> str:
        """Return the value as a normalised string, or raise naming this element.

        Numeric codes with a fixed width (``N2``) are zero-padded: source systems often
        drop the padding (``1`` for ``01``), and the code tables store the padded form.
        An integer beyond ±(2^53 - 1) is refused even where the format is wide enough
        (``N..30``): JSON readers round it (I-JSON, RFC 7493), so the record would not
        read back as it was sent; such a number is given as text.
        """
        text = self._checked(value, location)
        if type(value) is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise MappingError("integer beyond ±(2^53 - 1): give it as text",
                               location=location or self.id)
        return text

    def _checked(self, value: object, location: str | None) -> str:
        if type(value) is str:
            text = value.strip()
        else:
            text = self._text(value, location or self.id)
        fmt = self.format
        if fmt == "D8":
            _parse_d8(text, location or self.id)
            return text
        if fmt == "DT15":
            _parse_dt15(text, location or self.id)
            return text
        if fmt == "T/F":
            if text not in ("T", "F"):
                raise MappingError("boolean data element must be T or F",
                                   location=location or self.id)
            return text
        rule = _format_rule(fmt)
        if rule is None:  # pragma: no cover - the catalog is checked on load
            raise MappingError("data element has an unknown format", location=location or self.id)
        kind, lo, hi, scale, lo_n, hi_n, scale_n, digits_n = rule
        if kind == "N":
            if scale is not None:
                where = location or self.id
                if not _DECIMAL.match(text):
                    raise MappingError("not a decimal number", location=where)
                whole, _, frac = text.partition(".")
                if len(frac) > scale_n:
                    raise MappingError(f"more than {scale} decimal places", location=where)
                if len(whole) + len(frac) > digits_n:
                    raise MappingError("number longer than the declared format", location=where)
                return text
            if not _DIGITS.match(text):
                raise MappingError("not a whole number", location=location or self.id)
            if hi is None and lo is not None and self.data_type == "S3" and len(text) < lo_n:
                text = text.zfill(lo_n)
        n = len(text)
        if hi is None:
            if lo is not None and n != lo_n:
                raise MappingError(f"length must be exactly {lo}", location=location or self.id)
        elif n > hi_n:
            raise MappingError(f"longer than the declared maximum of {hi}",
                               location=location or self.id)
        elif lo is not None and n < lo_n:
            raise MappingError(f"shorter than the declared minimum of {lo}",
                               location=location or self.id)
        return text

    def _text(self, value: object, where: str) -> str:
        """A value that is not a plain string, as the text :meth:`check` goes on with."""
        if isinstance(value, bool):
            if self.format != "T/F":
                raise MappingError("boolean given for a non-boolean data element", location=where)
            return "T" if value else "F"
        if isinstance(value, (int, float)):
            if not self.format.startswith("N"):
                raise MappingError("number given for a text data element", location=where)
            try:
                written = str(value)
            except ValueError:  # more digits than Python writes: longer than any format
                raise MappingError("number longer than the declared format",
                                   location=where) from None
            return format(Decimal(written), "f")
        if isinstance(value, str):
            return value.strip()
        raise MappingError("data element value must be a string or number", location=where)


_Rule = tuple[str, str | None, str | None, str | None, int, int, int, int]


@lru_cache(maxsize=256)
def _format_rule(fmt: str) -> _Rule | None:
    """A format's kind, minimum, maximum and scale as written and as numbers (0 when
    absent), and the most digits a decimal may have; None for a format :data:`_FORMAT`
    does not describe."""
    match = _FORMAT.match(fmt)
    if match is None:
        return None
    lo, hi, scale = match["min"], match["max"], match["scale"]
    return (match["kind"], lo, hi, scale,
            int(lo) if lo else 0, int(hi) if hi else 0, int(scale) if scale else 0,
            int(hi or lo or 0))


def _parse_d8(text: str, where: str) -> date:
    if len(text) != 8 or not text.isdigit():
        raise MappingError("date must be YYYYMMDD (D8)", location=where)
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise MappingError("impossible calendar date", location=where) from None


def _parse_dt15(text: str, where: str) -> datetime:
    if len(text) != 15 or text[8] != "T" or not (text[:8] + text[9:]).isdigit():
        raise MappingError("date-time must be YYYYMMDDThhmmss (DT15)", location=where)
    try:
        return datetime(
            int(text[:4]), int(text[4:6]), int(text[6:8]),
            int(text[9:11]), int(text[11:13]), int(text[13:15]),
        )
    except ValueError:
        raise MappingError("impossible calendar date or time", location=where) from None


def parse_d8(text: str, where: str) -> date:
    """Parse a checked D8 value (``YYYYMMDD``)."""
    return _parse_d8(text, where)


def parse_dt15(text: str, where: str) -> datetime:
    """Parse a checked DT15 value (``YYYYMMDDThhmmss``) as a naive local time."""
    return _parse_dt15(text, where)


@dataclass(frozen=True, slots=True)
class DatasetCatalog:
    """All elements of one data set, keyed by internal identifier."""

    dataset: str
    elements: dict[str, DataElement]

    def get(self, element_id: str) -> DataElement:
        """Return the element or raise :class:`MappingError` naming the unknown id."""
        try:
            return self.elements[element_id]
        except KeyError:
            raise MappingError(
                f"data element is not part of data set {self.dataset}", location=element_id
            ) from None


@lru_cache(maxsize=1)
def format_deviations() -> dict[str, dict[str, str]]:
    """``mappings/catalog-deviations.yaml``: per data set, element -> the format accepted.

    WS 445 (2014) declares some formats that newer national code editions outgrow (the
    ICD-9-CM-3 operation code is ``AN..5``); the file widens them, each with its reason,
    while the catalogs stay as the standard prints them.
    """
    import yaml

    path = mappings_dir() / "catalog-deviations.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError):
        raise LoadError("catalog deviations cannot be read", location=str(path)) from None
    out: dict[str, dict[str, str]] = {}
    if not isinstance(data, dict):
        raise LoadError("must be a mapping of data sets", location=str(path))
    for dataset, elements in data.items():
        if not isinstance(elements, dict):
            raise LoadError("must map element ids", location=f"{path} {dataset}")
        for element, entry in elements.items():
            fmt = entry.get("format") if isinstance(entry, dict) else None
            if not isinstance(fmt, str) or not _FORMAT.match(fmt) \
                    or not isinstance(entry.get("why"), str):
                raise LoadError("each entry needs a format and why",
                                location=f"{path} {dataset}.{element}")
            out.setdefault(str(dataset), {})[str(element)] = fmt
    return out


def load_catalog(path: Path, dataset: str) -> DatasetCatalog:
    """Read a catalog CSV (``internal_id,data_element_id,name_zh,data_type,format,...``).

    Formats listed for the data set in ``mappings/catalog-deviations.yaml`` replace the
    declared ones.
    """
    deviations = format_deviations().get(dataset, {})
    elements: dict[str, DataElement] = {}
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for lineno, row in enumerate(reader, start=2):
                try:
                    element = DataElement(
                        id=row["internal_id"], de_id=row["data_element_id"], name=row["name_zh"],
                        data_type=row["data_type"],
                        format=deviations.get(row["internal_id"], row["format"]),
                    )
                except KeyError as exc:
                    raise LoadError(f"catalog column {exc.args[0]} missing",
                                    location=f"{path}:{lineno}") from None
                if element.format not in ("D8", "DT15", "T/F") and not _FORMAT.match(element.format):
                    raise LoadError("unknown data element format", location=f"{path}:{lineno} format")
                if element.id in elements:
                    raise LoadError("duplicate internal id", location=f"{path}:{lineno} internal_id")
                elements[element.id] = element
    except OSError as exc:
        raise LoadError(f"catalog cannot be read: {exc.strerror}", location=str(path)) from None
    return DatasetCatalog(dataset=dataset, elements=elements)


@lru_cache(maxsize=8)
def ws445_catalog(dataset: str = "WS445.10") -> DatasetCatalog:
    """The catalog shipped in ``mappings/ws445/`` for a WS 445 part (only WS445.10 today)."""
    part = dataset.removeprefix("WS")
    path = mappings_dir() / "ws445" / f"ws{part}-elements.csv"
    if not path.is_file():
        raise LoadError("no catalog for this data set", location=dataset)
    return load_catalog(path, dataset)
