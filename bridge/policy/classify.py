"""Classification: data category, grade and sensitivity labels for each resource.

GB/T 39725-2020 §6.1 sorts health data into categories, §6.2 into grades 1-5, and
§11.1.2.3 singles out eight special-disease classes whose details are grade 5 (§6.2 e).
:func:`classify` writes these as ``meta.security`` codings on a copy of the bundle:

* ``urn:ws-fhir-bridge:data-category`` — the §6.1 category of the resource type;
* ``http://terminology.hl7.org/CodeSystem/v3-Confidentiality`` — N (grades 1-2),
  R (grades 3-4: identifiable health data), V (grade 5: special diseases);
* ``urn:ws-fhir-bridge:sensitivity`` — the special-disease class(es) of a Condition
  whose ICD-10 code falls in a range of ``mappings/policy/sensitive-icd10.yaml``.

The ICD-10 ranges are data the operator may edit; the category of each resource type
is fixed here because it follows from the FHIR resource, not from local policy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from bridge.policy._yaml import load_located
from bridge.resources import mappings_dir

CATEGORY_SYSTEM = "urn:ws-fhir-bridge:data-category"
SENSITIVITY_SYSTEM = "urn:ws-fhir-bridge:sensitivity"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"

#: §6.1 category and default §6.2 grade of each resource type this bridge exchanges.
#: Identifiable records of one patient are grade 4 (§6.2 d); hospital information that
#: is public is grade 1 (§6.2 a); practitioner details are internal, grade 2.
RESOURCE_CATEGORIES: dict[str, tuple[str, int]] = {
    "Patient": ("personal-attribute", 4),
    "RelatedPerson": ("personal-attribute", 4),
    "Condition": ("health-status", 4),
    "Observation": ("health-status", 4),
    "AllergyIntolerance": ("health-status", 4),
    "Encounter": ("medical-application", 4),
    "Procedure": ("medical-application", 4),
    "MedicationRequest": ("medical-application", 4),
    "DiagnosticReport": ("medical-application", 4),
    "Claim": ("health-payment", 4),
    "Coverage": ("health-payment", 4),
    "ChargeItem": ("health-payment", 4),
    "Invoice": ("health-payment", 4),
    "Organization": ("health-resource", 1),
    "Practitioner": ("health-resource", 2),
    "Location": ("health-resource", 1),
}

SENSITIVE_GRADE = 5


@dataclass(frozen=True)
class SensitiveCodes:
    """Special-disease classes as ICD-10 ranges, loaded from the policy file."""

    systems: frozenset[str]
    # (class code, low bound, high bound), bounds normalised (upper case, no dots).
    ranges: tuple[tuple[str, str, str], ...]
    titles: dict[str, str]

    def classes_of(self, system: str | None, code: str | None) -> frozenset[str]:
        """Special-disease classes an ICD-10 code falls in (empty for other systems)."""
        if not code or system not in self.systems:
            return frozenset()
        norm = _normalise(code)
        found = {
            cls
            for cls, lo, hi in self.ranges
            if lo <= norm[: len(lo)] and norm[: len(hi)] <= hi
        }
        return frozenset(found)

    def classes_of_concept(self, concept: Any) -> frozenset[str]:
        """Union of the classes of every coding of a CodeableConcept."""
        if not isinstance(concept, dict):
            return frozenset()
        found: set[str] = set()
        for coding in concept.get("coding") or []:
            if isinstance(coding, dict):
                found |= self.classes_of(coding.get("system"), coding.get("code"))
        return frozenset(found)


def _normalise(code: str) -> str:
    return code.strip().upper().replace(".", "").replace(" ", "")


def load_sensitive_codes(path: Path | None = None) -> SensitiveCodes:
    """Load the special-disease ranges; a mistake raises LoadError naming file:line key."""
    doc = load_located(path or mappings_dir() / "policy" / "sensitive-icd10.yaml")
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("expected a mapping", ())
    systems = data.get("systems")
    if not isinstance(systems, list) or not systems or not all(isinstance(s, str) for s in systems):
        raise doc.error("systems must be a non-empty list of URIs", ("systems",))
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise doc.error("classes must be a mapping", ("classes",))
    ranges: list[tuple[str, str, str]] = []
    titles: dict[str, str] = {}
    for cls, body in classes.items():
        if not isinstance(body, dict) or not isinstance(body.get("ranges"), list):
            raise doc.error("a class needs a list of ranges", ("classes", cls, "ranges"))
        titles[cls] = str(body.get("title") or cls)
        for i, item in enumerate(body["ranges"]):
            key = ("classes", cls, "ranges", i)
            if not isinstance(item, str) or not item.strip():
                raise doc.error("a range is a code or LOW-HIGH", key)
            lo, _, hi = item.partition("-")
            lo, hi = _normalise(lo), _normalise(hi or lo)
            if not lo or not hi or hi < lo[: len(hi)]:
                raise doc.error("range bounds are empty or reversed", key)
            ranges.append((str(cls), lo, hi))
    return SensitiveCodes(frozenset(systems), tuple(ranges), titles)


@lru_cache(maxsize=1)
def default_sensitive_codes() -> SensitiveCodes:
    """The installed ``mappings/policy/sensitive-icd10.yaml`` (loaded once)."""
    return load_sensitive_codes()


@dataclass(frozen=True)
class ResourceLabel:
    """Classification of one bundle entry."""

    index: int
    resource_type: str
    id: str | None
    category: str | None
    grade: int
    confidentiality: str
    sensitive_classes: frozenset[str]


@dataclass(frozen=True)
class Classification:
    """A labelled copy of the bundle and the labels per entry."""

    bundle: dict[str, Any]
    labels: tuple[ResourceLabel, ...]

    def sensitive(self) -> list[ResourceLabel]:
        """Entries at grade 5 (a special-disease class)."""
        return [label for label in self.labels if label.sensitive_classes]


def _confidentiality(grade: int) -> str:
    if grade >= SENSITIVE_GRADE:
        return "V"
    if grade >= 3:
        return "R"
    return "N"


def classify(bundle: dict[str, Any], *, codes: SensitiveCodes | None = None) -> Classification:
    """Label every resource of a Bundle (a copy; the input is not changed).

    Existing ``meta.security`` codings of the three systems above are replaced, others
    are kept.
    """
    codes = codes or default_sensitive_codes()
    out = copy.deepcopy(bundle)
    labels: list[ResourceLabel] = []
    for index, entry in enumerate(out.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = str(resource.get("resourceType"))
        category, grade = RESOURCE_CATEGORIES.get(rtype, (None, 4))
        sensitive: frozenset[str] = frozenset()
        if rtype == "Condition":
            sensitive = codes.classes_of_concept(resource.get("code"))
        if sensitive:
            grade = SENSITIVE_GRADE
        conf = _confidentiality(grade)
        meta = resource.setdefault("meta", {})
        security = [
            c
            for c in meta.get("security") or []
            if c.get("system") not in (CATEGORY_SYSTEM, SENSITIVITY_SYSTEM, CONFIDENTIALITY_SYSTEM)
        ]
        security.append({"system": CONFIDENTIALITY_SYSTEM, "code": conf})
        if category is not None:
            security.append({"system": CATEGORY_SYSTEM, "code": category})
        security.extend({"system": SENSITIVITY_SYSTEM, "code": c} for c in sorted(sensitive))
        meta["security"] = security
        labels.append(
            ResourceLabel(
                index=index,
                resource_type=rtype,
                id=resource.get("id"),
                category=category,
                grade=grade,
                confidentiality=conf,
                sensitive_classes=sensitive,
            )
        )
    return Classification(out, tuple(labels))
