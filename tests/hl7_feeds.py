"""HL7 v2.5 messages of one hospital stay, written the way Chinese HIS interfaces write them.

``InpatientVisit`` builds the admission (ADT^A01), charges (DFT^P03 with FT1-6 as HL7
table 0017 defines it and the charge item in FT1-7), the discharge (ADT^A03) and
updates (ADT^A08) of one stay; ``OutpatientVisit`` a registration (ADT^A04) and the
message that ends the visit. Every value is made up; identifiers carry valid check
digits where the bridge checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FACILITY = "杭州市滨江区第一人民医院^47011235-7^L"
MSH = ("MSH|^~\\&|HIS|{facility}|FHIRBRIDGE|BRIDGE|{ts}||{type}|{cid}|P|2.5|||AL|NE|CHN|"
       "UNICODE UTF-8")


def _join(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("utf-8")


@dataclass
class Charge:
    """One FT1: transaction type (table 0017), charge item (FT1-7), amount."""

    item: str
    amount: str
    kind: str = "CG"
    name: str = "收费项目"
    date: str = "20260305"


@dataclass
class InpatientVisit:
    visit: str = "ZY2026000101"
    mrn: str = "BA0001203"
    id_card: str = "330106198503124512"
    facility: str = FACILITY
    admitted: str = "20260301083000"
    discharged: str = "20260309100000"
    financial_class: str = "01"
    attending: str = "D0012^周^文博"
    pid3_visit_code: str = "IPN"
    family: str = "王"
    given: str = "建国"
    prefix: str = "V1"
    charges: list[Charge] = field(default_factory=list)

    def _pid(self) -> str:
        return (f"PID|1||{self.id_card}^^^公安部^NNCHN~{self.visit}^^^滨江一院^"
                f"{self.pid3_visit_code}~{self.mrn}^^^滨江一院^MR||{self.family}^{self.given}||"
                "19850312|M|||文三路138号^3幢201室^杭州市^浙江省^310013^CHN^H^转塘街道^西湖区||"
                "13905710001^PRN^PH|||M||||||01")

    def _pv1(self, *, discharged: bool, attending: str | None = None) -> str:
        doctor = self.attending if attending is None else attending
        end = self.discharged if discharged else ""
        fields = ["PV1", "1", "I", "心内科一病区^0501^12", "", "", "", doctor, "", "",
                  "心血管内科", "", "", "", "2", "", "", "D0107^吴^海涛", "",
                  self.visit, self.financial_class]
        fields += [""] * (44 - len(fields)) + [self.admitted, end]
        if discharged:
            fields[36] = "1"
        return "|".join(fields)

    def _msh(self, type_: str, cid: str, ts: str) -> str:
        return MSH.format(facility=self.facility, ts=ts, type=type_, cid=cid)

    def a01(self, cid: str | None = None, *, attending: str | None = None) -> bytes:
        return _join(self._msh("ADT^A01^ADT_A01", cid or f"{self.prefix}-A01", self.admitted),
                     f"EVN|A01|{self.admitted}", self._pid(),
                     self._pv1(discharged=False, attending=attending),
                     "DG1|1||I21.000^急性前壁心肌梗死^ICD10||20260301|A")

    def a08(self, cid: str, ts: str, *, family: str | None = None,
            discharged: bool = False) -> bytes:
        saved = self.family
        if family is not None:
            self.family = family
        try:
            return _join(self._msh("ADT^A08^ADT_A01", cid, ts), f"EVN|A08|{ts}", self._pid(),
                         self._pv1(discharged=discharged))
        finally:
            self.family = saved

    def dft(self, cid: str, charges: list[Charge], ts: str = "20260305120000", *,
            transactions: str | None = None) -> bytes:
        """FT1-2 is ``<transactions>-<n>`` (by default the message's control id)."""
        ids = transactions or cid
        ft1 = [f"FT1|{i}|{ids}-{i}||{c.date}|{c.date}|{c.kind}|{c.item}^{c.name}^L|||1|{c.amount}"
               for i, c in enumerate(charges, start=1)]
        return _join(self._msh("DFT^P03^DFT_P03", cid, ts), f"EVN|P03|{ts}", self._pid(),
                     self._pv1(discharged=False), *ft1)

    def a03(self, cid: str | None = None, *, attending: str | None = None,
            operation: str = "36.06") -> bytes:
        return _join(self._msh("ADT^A03^ADT_A03", cid or f"{self.prefix}-A03", self.discharged),
                     f"EVN|A03|{self.discharged}", self._pid(),
                     self._pv1(discharged=True, attending=attending),
                     "DG1|1||I21.000^急性前壁心肌梗死^ICD10||20260301|A",
                     "DG1|2||I21.000^急性前壁心肌梗死^ICD10||20260309|F|||||||||1",
                     "DG1|3||I10.x00^高血压^ICD10||20260309|F|||||||||2",
                     f"PR1|1||{operation}^冠状动脉药物洗脱支架置入术^ICD9CM3||20260302103000")


@dataclass
class OutpatientVisit:
    visit: str = "MZ2026000101"
    facility: str = FACILITY
    registered: str = "20260302090500"
    ended: str = "20260302093500"
    prefix: str = "O1"

    def _msg(self, type_: str, cid: str, ts: str, end: str) -> bytes:
        pv1 = ["PV1", "1", "O", "^^", "", "", "", "D0012^周^文博", "", "", "心血管内科"]
        pv1 += [""] * (19 - len(pv1)) + [self.visit]
        pv1 += [""] * (44 - len(pv1)) + [self.registered, end]
        return _join(
            MSH.format(facility=self.facility, ts=ts, type=type_, cid=cid),
            f"EVN|{type_.split('^')[1]}|{ts}",
            f"PID|1||330106198503124512^^^公安部^NNCHN~{self.visit}^^^滨江一院^OPN||王^建国||"
            "19850312|M|||文三路138号^3幢201室^杭州市^浙江省^310013^CHN^H^转塘街道^西湖区||"
            "13905710001^PRN^PH|||M||||||01",
            "|".join(pv1),
            "DG1|1||I10.x00^高血压^ICD10||20260302|W")

    def registration(self, cid: str | None = None) -> bytes:
        return self._msg("ADT^A04^ADT_A01", cid or f"{self.prefix}-A04", self.registered, "")

    def end(self, cid: str | None = None) -> bytes:
        return self._msg("ADT^A08^ADT_A01", cid or f"{self.prefix}-A08", self.ended, self.ended)


def standard_charges() -> list[Charge]:
    """Charges of a stay in the shipped charge-item codes, one per common fee row."""
    return [Charge("01", "300.00", name="床位费"), Charge("02", "240.00", name="静脉输液"),
            Charge("03", "270.00", name="一级护理"), Charge("06", "50.00", name="血常规"),
            Charge("13", "1860.50", name="西药"), Charge("1301", "420.00", name="头孢曲松"),
            Charge("1002", "8600.00", name="PCI手术"), Charge("23", "9800.00", name="冠脉支架")]
