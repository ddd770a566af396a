"""Link profiles: load-time checks that name file:line key, and minimize's guarantees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_bundles import claim_bundle, rid

from bridge.errors import LoadError
from bridge.policy.profile import ALWAYS_KEPT, LinkProfile, load_link_profile, load_profile
from bridge.records.fhir import element_names, validate_resource

GOOD = """\
profile: test-link
title: test
resources:
  Patient:
    elements:
      - identifier
      - address.city
  Condition:
    elements: [subject, code]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "link.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def insurer() -> LinkProfile:
    return load_link_profile("commercial-insurance")


def test_good_profile_loads(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD))
    assert profile.allowed_paths("Patient") == {"identifier", "address.city"}
    assert profile.allows_type("Condition") and not profile.allows_type("Claim")


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        (GOOD.replace("  Condition:", "  Conditon:"), 8, "resources.Conditon"),
        (GOOD.replace("address.city", "address.town"), 7, "resources.Patient.elements.1"),
        (GOOD.replace("- identifier", "- identifer"), 6, "resources.Patient.elements.0"),
        (GOOD.replace("- identifier", "- gender.text"), 6, "resources.Patient.elements.0"),
        (GOOD.replace("[subject, code]", "[code]"), 9, "resources.Condition.elements"),
        (GOOD.replace("title: test", "titel: test"), 2, "titel"),
        (GOOD.replace("  Condition:", "  Address:"), 8, "resources.Address"),
    ],
)
def test_profile_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LoadError) as info:
        load_profile(path)
    assert info.value.location == f"{path}:{line} {key}"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  Claim: [unclosed\n")
    with pytest.raises(LoadError) as info:
        load_profile(path)
    assert info.value.location is not None and info.value.location.startswith(f"{path}:")


def test_nested_required_children_must_be_allowed(tmp_path: Path) -> None:
    text = GOOD + "  Claim:\n    elements: [status, type, use, patient, created, provider, priority, insurance, item.net]\n"
    path = write(tmp_path, text)
    with pytest.raises(LoadError) as info:
        load_profile(path)
    assert "Claim.item" in info.value.message


def test_minimize_removes_disallowed_elements_and_lists_paths(insurer: LinkProfile) -> None:
    bundle = claim_bundle()
    result = insurer.minimize(bundle)
    patient = result.bundle["entry"][0]["resource"]
    assert patient["address"] == [{"city": "北京市", "district": "东城区"}]
    assert "contact" not in patient
    for path in ("Patient.address.line", "Patient.address.postalCode", "Patient.contact",
                 "Condition.note", "Practitioner", "Claim.careTeam"):
        assert path in result.removed
    # Paths only: no value of the input appears in the removal list.
    assert "朝阳路1号" not in json.dumps(result.removed, ensure_ascii=False)
    # The input is untouched and the output is valid FHIR with every reference resolving.
    assert bundle["entry"][0]["resource"]["address"][0]["line"] == ["朝阳路1号"]
    validate_resource(result.bundle)
    assert_references_resolve(result.bundle)


def test_resource_type_outside_profile_is_dropped_with_its_references(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD + """\
  Claim:
    elements: [status, type, use, patient, created, provider, priority, insurance, diagnosis]
  Coverage:
    elements: [status, beneficiary, payor]
  Organization:
    elements: [name]
"""))
    result = profile.minimize(claim_bundle())
    types = [e["resource"]["resourceType"] for e in result.bundle["entry"]]
    # Practitioner, Encounter and Procedure are not in this profile.
    assert set(types) == {"Patient", "Condition", "Claim", "Coverage", "Organization"}
    assert {"Practitioner", "Encounter", "Procedure"} <= set(result.removed)
    # Condition.encounter pointed to the dropped Encounter and is removed with it.
    assert "Condition.encounter" in result.removed
    validate_resource(result.bundle)
    assert_references_resolve(result.bundle)


def test_resource_missing_a_required_element_is_omitted_whole(insurer: LinkProfile) -> None:
    bundle = claim_bundle()
    coverage = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Coverage")
    del coverage["resource"]["beneficiary"]
    result = insurer.minimize(bundle)
    types = [e["resource"]["resourceType"] for e in result.bundle["entry"]]
    # Without its Coverage the Claim loses its required insurance and cannot be sent either.
    assert "Coverage" not in types and "Claim" not in types
    assert {"Coverage", "Claim", "Claim.insurance"} <= set(result.removed)
    validate_resource(result.bundle)
    assert_references_resolve(result.bundle)


def test_an_incomplete_entry_goes_and_the_rest_of_the_resource_stays(
    insurer: LinkProfile,
) -> None:
    # Nothing refers to anything removed here: only completeness decides.
    bundle = claim_bundle()
    claim = next(e["resource"] for e in bundle["entry"]
                 if e["resource"]["resourceType"] == "Claim")
    del claim["diagnosis"][1]["sequence"]
    claim["procedure"] = []
    result = insurer.minimize(bundle)
    sent = next(e["resource"] for e in result.bundle["entry"]
                if e["resource"]["resourceType"] == "Claim")
    assert [d["sequence"] for d in sent["diagnosis"]] == [1, 3, 4]
    assert "procedure" not in sent  # an empty list is not sent
    assert "Claim.diagnosis" in result.removed
    assert sent["item"] == claim["item"]
    whole = insurer.minimize(claim_bundle())
    assert "Claim.diagnosis" not in whole.removed
    validate_resource(result.bundle)
    assert_references_resolve(result.bundle)


@pytest.mark.parametrize("value", [None, "", [], {}])
def test_a_required_element_that_is_empty_counts_as_missing(
    insurer: LinkProfile, value: Any
) -> None:
    # Null, an empty string, an empty list or an empty object holds nothing: the
    # Coverage lacks its required status, goes, and takes the Claim that needs it along.
    bundle = claim_bundle()
    coverage = next(e["resource"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == "Coverage")
    coverage["status"] = value
    result = insurer.minimize(bundle)
    types = {e["resource"]["resourceType"] for e in result.bundle["entry"]}
    assert "Coverage" not in types and "Claim" not in types
    assert "Coverage" in result.removed


@pytest.mark.parametrize("value", [0, False, 0.0])
def test_a_required_element_holding_zero_or_false_is_present(
    insurer: LinkProfile, value: Any
) -> None:
    # Zero and false are values (a completeness check is not a truth test): the entry
    # stays as it is, whatever its type's own rules make of it elsewhere.
    bundle = claim_bundle()
    claim = next(e["resource"] for e in bundle["entry"]
                 if e["resource"]["resourceType"] == "Claim")
    claim["diagnosis"][0]["sequence"] = value
    result = insurer.minimize(bundle)
    sent = next(e["resource"] for e in result.bundle["entry"]
                if e["resource"]["resourceType"] == "Claim")
    assert sent["diagnosis"][0]["sequence"] == value
    assert type(sent["diagnosis"][0]["sequence"]) is type(value)
    assert "Claim.diagnosis" not in result.removed


def assert_references_resolve(bundle: dict[str, Any]) -> None:
    urls = {e["fullUrl"] for e in bundle["entry"]}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                assert ref in urls, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(bundle)


# --- property: output holds only allowed paths --------------------------------------


def leaf_paths(node: Any, prefix: str) -> set[str]:
    """Dotted element paths (list indices dropped) of every leaf below ``node``."""
    if isinstance(node, dict):
        out: set[str] = set()
        for key, value in node.items():
            out |= leaf_paths(value, f"{prefix}.{key}" if prefix else key)
        return out or {prefix}
    if isinstance(node, list):
        out = set()
        for value in node:
            out |= leaf_paths(value, prefix)
        return out or {prefix}
    return {prefix}


def allowed(path: str, allowed_paths: frozenset[str]) -> bool:
    head = path.split(".")[0]
    if head in ALWAYS_KEPT:
        return True
    return any(
        path in (p, "_" + p) or path.startswith((p + ".", "_" + p + "."))
        for p in allowed_paths
    )


_PROFILE = load_link_profile("commercial-insurance")
_TYPES = sorted(_PROFILE.allowed)

scalars = st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none())


def key_strategy(rtype: str) -> st.SearchStrategy[str]:
    names = sorted(element_names(rtype))
    return st.one_of(
        st.sampled_from(names),
        st.sampled_from(["city", "line", "district", "text", "admitSource", "reference"]),
        st.text(min_size=1, max_size=6),
    )


def nested(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(keys, children, max_size=4),
        ),
        max_leaves=12,
    )


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    rtype = draw(st.sampled_from(_TYPES))
    keys = key_strategy(rtype)
    body = draw(st.dictionaries(keys, nested(keys), max_size=8))
    body.pop("resourceType", None)
    return {**body, "resourceType": rtype, "id": rid(draw(st.text(max_size=4)))}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resources(), min_size=1, max_size=4))
def test_minimize_output_contains_only_allowed_paths(items: list[dict[str, Any]]) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in items],
    }
    result = _PROFILE.minimize(bundle)
    assert set(result.bundle) <= {"resourceType", "type", "entry"}
    for entry in result.bundle["entry"]:
        assert set(entry) <= {"fullUrl", "resource"}
        resource = entry["resource"]
        paths = _PROFILE.allowed_paths(resource["resourceType"])
        for path in leaf_paths(resource, ""):
            assert allowed(path, paths), (resource["resourceType"], path)
