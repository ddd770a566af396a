"""Code tables as ConceptMap-like data files (``mappings/valuesets/*.yaml``).

Each file names the source code system (URI), an optional target system, one entry per
source code (display, target code, equivalence) and an explicit policy for codes it does
not list: ``error`` (the code is refused) or ``pattern`` (large external code systems such
as ICD-10 whose lists are not shipped: the code is accepted if it has the right shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from bridge.errors import LoadError, MappingError
from bridge.mapping.yamlsrc import SourceList, SourceMap, load_yaml
from bridge.resources import MappingFiles, mappings_dir

EQUIVALENCES = frozenset(
    {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes",
     "inexact", "unmatched", "disjoint"}
)
_TOP_KEYS = frozenset(
    {"id", "title", "source", "target", "unmapped", "pattern", "concepts", "concepts_note"}
)
_CONCEPT_KEYS = frozenset(
    {"code", "display", "target", "target_display", "target_system", "equivalence"}
)


@dataclass(frozen=True, slots=True)
class Concept:
    """One source code and, when the map has a target system, its target."""

    code: str
    display: str
    target: str | None = None
    target_display: str | None = None
    target_system: str | None = None
    equivalence: str | None = None


@dataclass(frozen=True, slots=True)
class ValueSetMap:
    """A loaded code table (a ConceptMap with one group)."""

    id: str
    title: str
    system: str
    target_system: str | None
    unmapped: str
    pattern: re.Pattern[str] | None
    concepts: dict[str, Concept] = field(default_factory=dict)
    # Where it was read from (a site's overlay or the shipped file), and each code's line:
    # a mistake found by a file that uses the table is named here.
    file: str = field(default="", compare=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, code: str | None = None, key: str = "code") -> str:
        """``file:line key`` of a concept for errors found by its users; without a code,
        the file's ``concepts`` list (with ``key="concepts"``) or the file itself."""
        if code is None and key == "concepts" and self.lines.get("") and self.file:
            return f"{self.file}:{self.lines['']} concepts"
        if code is None or code not in self.lines:
            return self.file or self.id
        return f"{self.file}:{self.lines[code]} {key}"

    def lookup(self, code: str, *, location: str) -> Concept:
        """Return the concept for ``code`` or raise naming ``location`` (never the code)."""
        concept = self.concepts.get(code)
        if concept is not None:
            return concept
        if self.unmapped == "pattern" and self.pattern is not None and self.pattern.match(code):
            return Concept(code=code, display="")
        raise MappingError(f"code not in value set {self.id}", location=location)

    def original_coding(self, concept: Concept, display: str | None = None) -> dict[str, Any]:
        """The coding in the source system, as the record carried it."""
        coding: dict[str, Any] = {"system": self.system, "code": concept.code}
        shown = display or concept.display
        if shown:
            coding["display"] = shown
        return coding

    def target_coding(self, concept: Concept) -> dict[str, Any] | None:
        """The mapped coding, or ``None`` when this map has no target for the code."""
        if concept.target is None:
            return None
        system = concept.target_system or self.target_system
        coding: dict[str, Any] = {"system": system, "code": concept.target}
        if concept.target_display:
            coding["display"] = concept.target_display
        return coding


def _text(data: SourceMap, key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise LoadError("required key missing", location=data.where(key) if key in data
                            else f"{data.where()} {key}")
        return None
    if not isinstance(value, str) or not value:
        raise LoadError("must be a non-empty string", location=data.where(key))
    return value


def load_valueset(path: Path) -> ValueSetMap:
    """Load and check one value-set file; mistakes raise :class:`LoadError` with file:line key."""
    data = load_yaml(path)
    if not isinstance(data, SourceMap):
        raise LoadError("value-set file must be a mapping", location=str(path))
    for key in data:
        if key not in _TOP_KEYS:
            raise LoadError("unknown key", location=data.where(key))
    vs_id = _text(data, "id")
    assert vs_id is not None
    if vs_id != path.stem:
        raise LoadError("id must equal the file name", location=data.where("id"))
    source = data.get("source")
    if not isinstance(source, SourceMap):
        raise LoadError("source must be a mapping", location=data.where("source"))
    system = _text(source, "system")
    assert system is not None
    target = data.get("target")
    target_system: str | None = None
    if target is not None:
        if not isinstance(target, SourceMap):
            raise LoadError("target must be a mapping or null", location=data.where("target"))
        target_system = _text(target, "system")
    unmapped = data.get("unmapped")
    if unmapped not in ("error", "pattern"):
        raise LoadError("unmapped must be 'error' or 'pattern'", location=data.where("unmapped"))
    pattern: re.Pattern[str] | None = None
    if unmapped == "pattern":
        raw = _text(data, "pattern")
        assert raw is not None
        try:
            pattern = re.compile(raw)
        except re.error:
            raise LoadError("pattern is not a valid regular expression",
                            location=data.where("pattern")) from None
    concepts: dict[str, Concept] = {}
    lines: dict[str, int] = {}
    raw_concepts = data.get("concepts", SourceList())
    if "concepts" in data:
        # The line of the list itself, for a mistake about the table as a whole (no code
        # has the target a mapping selects by), under the key "" (no code is empty).
        lines[""] = data.key_lines.get("concepts", data.line)
    if not isinstance(raw_concepts, list):
        raise LoadError("concepts must be a list", location=data.where("concepts"))
    if unmapped == "error" and not raw_concepts:
        raise LoadError("a closed value set needs concepts", location=data.where("unmapped"))
    for item in raw_concepts:
        if not isinstance(item, SourceMap):
            raise LoadError("concept must be a mapping", location=data.where("concepts"))
        for key in item:
            if key not in _CONCEPT_KEYS:
                raise LoadError("unknown key", location=item.where(key))
        code = _text(item, "code")
        display = _text(item, "display")
        assert code is not None and display is not None
        if code in concepts:
            raise LoadError("duplicate code", location=item.where("code"))
        tgt = _text(item, "target", required=False)
        equivalence = _text(item, "equivalence", required=tgt is not None)
        if equivalence is not None and equivalence not in EQUIVALENCES:
            raise LoadError("unknown equivalence", location=item.where("equivalence"))
        if tgt is not None and target_system is None and "target_system" not in item:
            raise LoadError("target given but the map has no target system",
                            location=item.where("target"))
        lines[code] = item.line
        concepts[code] = Concept(
            code=code, display=display, target=tgt,
            target_display=_text(item, "target_display", required=False),
            target_system=_text(item, "target_system", required=False),
            equivalence=equivalence,
        )
    title = _text(data, "title")
    assert title is not None
    return ValueSetMap(id=vs_id, title=title, system=system, target_system=target_system,
                       unmapped=unmapped, pattern=pattern, concepts=concepts, file=str(path),
                       lines=lines)


def load_valuesets(folder: Path | list[Path]) -> dict[str, ValueSetMap]:
    """Load every ``*.yaml`` in ``folder`` (or the files listed), keyed by id."""
    paths = sorted(folder.glob("*.yaml")) if isinstance(folder, Path) else folder
    return {vs.id: vs for vs in (load_valueset(p) for p in paths)}


@lru_cache(maxsize=4)
def shipped_valuesets(folder: str | None = None) -> dict[str, ValueSetMap]:
    """The value sets in ``mappings/valuesets`` (cached)."""
    return load_valuesets(Path(folder) if folder else mappings_dir() / "valuesets")


@lru_cache(maxsize=8)
def valuesets_for(files: MappingFiles) -> dict[str, ValueSetMap]:
    """The value sets in ``valuesets/`` with a site's overlay on top (cached per overlay)."""
    if files.site is None:
        return shipped_valuesets()
    return load_valuesets(files.folder("valuesets"))
