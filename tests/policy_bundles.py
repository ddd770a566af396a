"""Hand-built FHIR collections and consents for the policy tests (not collected by pytest)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

from bridge.policy.consent import build_consent

ID_CARD = "urn:oid:2.16.156.10011.1.3"
INPATIENT_NO = "urn:oid:2.16.156.10011.1.12"
ICD10 = "urn:oid:2.16.156.10011.2.3.3.11"
PATIENT_ID = ("urn:oid:2.16.156.10011.1.3", "110101199003071234")
NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
RECIPIENT = "insurer-b"
HOSPITAL = "hospital-a"

_NS = uuid.UUID("6f1c1b4e-5a0b-4d55-9d3e-3f0a2b7c9e11")


def rid(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


def ref(name: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{rid(name)}"}


def _entry(name: str, resource: dict[str, Any]) -> dict[str, Any]:
    resource = {"resourceType": resource.pop("resourceType"), "id": rid(name), **resource}
    return {"fullUrl": f"urn:uuid:{rid(name)}", "resource": resource}


def condition(name: str, code: str, display: str) -> dict[str, Any]:
    return _entry(
        name,
        {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": ICD10, "code": code, "display": display}]},
            "subject": ref("patient"),
            "encounter": ref("encounter"),
            "note": [{"text": "病程记录摘要"}],
        },
    )


def claim_bundle(diagnoses: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A 12-resource inpatient claim collection; diagnoses are (ICD-10 code, display)."""
    diagnoses = diagnoses or [
        ("J18.900", "肺炎"),
        ("B20.000", "HIV病导致的分枝杆菌感染"),
        ("I10.x00", "高血压"),
        ("E11.900", "2型糖尿病"),
    ]
    conditions = [condition(f"condition-{i}", c, d) for i, (c, d) in enumerate(diagnoses)]
    entries: list[dict[str, Any]] = [
        _entry(
            "patient",
            {
                "resourceType": "Patient",
                "identifier": [
                    {"system": PATIENT_ID[0], "value": PATIENT_ID[1]},
                    {"system": INPATIENT_NO, "value": "ZY20260001"},
                ],
                "name": [{"text": "张三", "family": "张", "given": ["三"]}],
                "gender": "male",
                "birthDate": "1990-03-07",
                "telecom": [{"system": "phone", "value": "13800000000"}],
                "address": [
                    {
                        "line": ["朝阳路1号"],
                        "city": "北京市",
                        "district": "东城区",
                        "postalCode": "100010",
                        "text": "北京市东城区朝阳路1号",
                    }
                ],
                "contact": [{"name": {"text": "李四"}}],
                "maritalStatus": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.5", "code": "20"}]},
            },
        ),
        _entry(
            "encounter",
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP",
                },
                "subject": ref("patient"),
                "period": {"start": "2026-03-01T08:30:00+08:00", "end": "2026-03-08T10:00:00+08:00"},
                "diagnosis": [
                    {"condition": ref(f"condition-{i}"), "rank": i + 1}
                    for i in range(len(conditions))
                ],
                "participant": [{"individual": ref("practitioner-1")}],
                "serviceProvider": ref("hospital"),
                "hospitalization": {
                    "admitSource": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.1.270", "code": "1"}]},
                    "dischargeDisposition": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.1.271", "code": "1"}]},
                    "specialArrangement": [{"text": "轮椅"}],
                },
            },
        ),
        *conditions,
        _entry(
            "procedure",
            {
                "resourceType": "Procedure",
                "status": "completed",
                "code": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.12", "code": "33.2400"}]},
                "subject": ref("patient"),
                "encounter": ref("encounter"),
                "performedDateTime": "2026-03-02T09:00:00+08:00",
                "performer": [{"actor": ref("practitioner-1")}],
                "reasonReference": [ref("condition-0")],
            },
        ),
        _entry(
            "coverage",
            {
                "resourceType": "Coverage",
                "status": "active",
                "type": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.1.248", "code": "07"}]},
                "beneficiary": ref("patient"),
                "payor": [{"identifier": {"system": "urn:ws-fhir-bridge:partner", "value": RECIPIENT}}],
            },
        ),
        _entry(
            "claim",
            {
                "resourceType": "Claim",
                "status": "active",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                            "code": "institutional",
                        }
                    ]
                },
                "use": "claim",
                "patient": ref("patient"),
                "billablePeriod": {"start": "2026-03-01", "end": "2026-03-08"},
                "created": "2026-03-08T12:00:00+08:00",
                "provider": ref("hospital"),
                "priority": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                            "code": "normal",
                        }
                    ]
                },
                "careTeam": [{"sequence": 1, "provider": ref("practitioner-1")}],
                "diagnosis": [
                    {"sequence": i + 1, "diagnosisReference": ref(f"condition-{i}")}
                    for i in range(len(conditions))
                ],
                "procedure": [{"sequence": 1, "procedureReference": ref("procedure")}],
                "insurance": [{"sequence": 1, "focal": True, "coverage": ref("coverage")}],
                "item": [
                    {
                        "sequence": 1,
                        "productOrService": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.2.58", "code": "01"}]},
                        "net": {"value": 1250.5, "currency": "CNY"},
                    }
                ],
                "total": {"value": 1250.5, "currency": "CNY"},
            },
        ),
        _entry(
            "hospital",
            {
                "resourceType": "Organization",
                "identifier": [{"system": "urn:oid:2.16.156.10011.1.5", "value": "H11010100001"}],
                "name": "北京市第一医院",
                "telecom": [{"system": "phone", "value": "010-00000000"}],
            },
        ),
        _entry(
            "practitioner-1",
            {
                "resourceType": "Practitioner",
                "name": [{"text": "王医生"}],
                "telecom": [{"system": "phone", "value": "13900000000"}],
            },
        ),
        _entry(
            "practitioner-2",
            {"resourceType": "Practitioner", "name": [{"text": "赵主任"}]},
        ),
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def consent(
    consent_id: str = "consent-1",
    *,
    patient: tuple[str, str] = PATIENT_ID,
    recipient: str = RECIPIENT,
    purposes: tuple[str, ...] = ("HPAYMT", "CLMATTCH"),
    start: date = date(2026, 1, 1),
    end: date = date(2026, 12, 31),
    sensitive_classes: tuple[str, ...] = (),
    resource_types: set[str] | None = None,
) -> dict[str, Any]:
    return build_consent(
        consent_id=consent_id,
        patient_system=patient[0],
        patient_value=patient[1],
        recipient=recipient,
        purposes=list(purposes),
        start=start,
        end=end,
        resource_types=resource_types,
        sensitive_classes=sensitive_classes,
        hospital_partner_id=HOSPITAL,
    )
