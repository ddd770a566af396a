"""Deterministic, realistic WS 445.2 / 445.3 / 445.4 records for tests, demos and benches.

* :func:`outpatient_records` — 门急诊病历 (WS445.2): a visit with one to three preliminary
  diagnoses (ICD-10, sometimes a TCM disease and syndrome of GB/T 15657), the physical
  examination as a hospital writes it (体温, 脉搏, 呼吸, 血压 inside the text), and the
  narrative sections a clinician fills in.
* :func:`prescription_records` — 西药处方 (WS445.3): one prescription of one to four drugs
  with strength, form, dose and unit, total quantity and a route for the prescription.
* :func:`lab_records` — 检验记录 (WS445.4): one report of a common panel (血常规, 肝功能,
  肾功能, 血糖, 尿常规 …) with quantitative results and units, and qualitative ones as text.

Records are sparse the way real ones are: optional elements are left out at random. The
same ``seed`` always gives the same records. Every record comes from the sample hospital
of :mod:`bridge.samples`; all people are invented.
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from bridge.samples import HOSPITAL_NAME, HOSPITAL_ORG_CODE

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余杜叶程魏苏吕丁沈姚卢"
_GIVEN = ["伟", "强", "磊", "军", "洋", "勇", "杰", "涛", "明", "超", "建华", "志强", "芳", "娜",
          "秀英", "敏", "静", "丽", "艳", "娟", "桂英", "海燕", "晓东", "丽华", "子涵", "浩然"]
_DOCTORS = ["周文博", "吴海涛", "孙慧敏", "林志远", "何佳怡", "郑丽", "钱卫东", "冯晓燕"]
_DEPARTMENTS = ["心血管内科", "呼吸内科", "消化内科", "内分泌科", "急诊科", "中医内科", "儿科",
                "普通外科", "神经内科"]

# (ICD-10, name, physical findings, narrative of the present illness)
_DIAGNOSES = [
    ("I10.x00", "高血压", "神清，精神可，双肺呼吸音清，心律齐，各瓣膜区未闻及病理性杂音。",
     "反复头晕2年，加重3天，自测血压最高170/100mmHg。"),
    ("J06.900", "急性上呼吸道感染", "咽部充血，扁桃体无肿大，双肺呼吸音粗，未闻及干湿啰音。",
     "咽痛、流涕伴发热1天，最高体温38.5℃。"),
    ("E11.900", "2型糖尿病", "神清，双肺呼吸音清，腹软无压痛，双下肢无水肿。",
     "口干、多饮、多尿3月，空腹血糖9.8mmol/L。"),
    ("K29.700", "胃炎", "腹平软，上腹部轻压痛，无反跳痛，肝脾肋下未及。",
     "上腹部隐痛1周，进食后加重，伴反酸嗳气。"),
    ("J20.900", "急性支气管炎", "双肺呼吸音粗，可闻及散在干啰音。", "咳嗽、咳痰5天，痰白黏。"),
    ("R50.900", "发热", "咽部稍红，双肺呼吸音清，腹软。", "发热2天，伴全身乏力。"),
    ("M54.500", "腰痛", "腰椎生理曲度存在，L4-5棘突旁压痛，直腿抬高试验阴性。", "腰痛3天，弯腰时加重。"),
]
_SECONDARY = [("E78.500", "高脂血症"), ("K21.900", "胃食管反流病"), ("I25.103", "冠状动脉粥样硬化性心脏病")]
_TCM = [(("BNG060", "眩晕"), ("ZBMG10", "肝阳上亢证")),
        (("BNF010", "感冒"), ("ZBFR00", "风热犯表证")),
        (("BNP070", "胃脘痛"), ("ZZPD10", "脾胃虚弱证"))]
_PAST = ["否认肝炎、结核等传染病史，否认手术外伤史。", "高血压病史5年，规律服用降压药。",
         "2型糖尿病史3年，口服二甲双胍治疗。"]
_ALLERGIES = ["青霉素过敏，表现为皮疹。", "对磺胺类药物过敏。"]

# (name, strength, form code CV08.50.002, dose, unit, route CV06.00.102, total)
_DRUGS = [
    ("阿莫西林胶囊", "0.25g", "19", "0.5", "g", "1", "24"),
    ("硝苯地平控释片", "30mg", "05", "30", "mg", "1", "14"),
    ("阿司匹林肠溶片", "100mg", "04", "100", "mg", "1", "30"),
    ("二甲双胍片", "0.5g", "01", "0.5", "g", "1", "60"),
    ("奥美拉唑肠溶胶囊", "20mg", "21", "20", "mg", "1", "14"),
    ("布洛芬缓释胶囊", "0.3g", "22", "0.3", "g", "1", "20"),
    ("氨溴索口服溶液", "100ml:0.6g", "31", "10", "ml", "1", "1"),
    ("注射用头孢曲松钠", "1g", "15", "2", "g", "404", "6"),
    ("0.9%氯化钠注射液", "250ml", "18", "250", "ml", "405", "3"),
]
_RX_NOTES = ["饭后服用", "皮试阴性", "如有不适及时复诊"]

# (category, specimen, [(code, quantitative value range or None, unit or text results)])
_PANELS: list[tuple[str, str, list[tuple[str, tuple[float, float, int] | None, Any]]]] = [
    ("血常规", "静脉血", [("WBC", (3.5, 12.0, 2), "10*9/L"), ("RBC", (3.8, 5.8, 2), "10*12/L"),
                       ("HGB", (95, 165, 0), "g/L"), ("PLT", (100, 350, 0), "10*9/L"),
                       ("NEUT%", (40, 80, 1), "%")]),
    ("肝功能", "血清", [("ALT", (8, 90, 0), "U/L"), ("AST", (10, 60, 0), "U/L"),
                     ("TBIL", (4.0, 30.0, 1), "umol/L"), ("ALB", (32, 52, 1), "g/L"),
                     ("HBSAG", None, ["阴性", "阳性"])]),
    ("肾功能", "血清", [("UREA", (2.5, 9.0, 2), "mmol/L"), ("CREA", (45, 130, 0), "umol/L"),
                     ("UA", (180, 520, 0), "umol/L")]),
    ("血糖", "血浆", [("GLU", (3.9, 14.0, 1), "mmol/L")]),
    ("尿常规", "尿液", [("PRO", None, ["阴性", "弱阳性", "+"]), ("GLU-U", None, ["阴性", "++"]),
                     ("SG", (1.005, 1.030, 3), ""), ("PH", (5.0, 8.0, 1), "")]),
]
_METHODS = {"血常规": "全自动血细胞分析法", "肝功能": "速率法", "肾功能": "酶法", "血糖": "己糖激酶法",
            "尿常规": "干化学法"}


def _name(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + rng.choice(_GIVEN)


def _age(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _visit(rng: random.Random) -> tuple[datetime, date, str, str]:
    when = datetime(2026, 1, 5, 8, 0) + timedelta(days=rng.randrange(80),
                                                   minutes=rng.randrange(10 * 60))
    birth = date(1940, 1, 1) + timedelta(days=rng.randrange(80 * 365))
    return when, birth, rng.choice("12"), f"MZ{when:%Y}{rng.randrange(10**6):06d}"


def _outpatient(rng: random.Random) -> dict[str, Any]:
    when, birth, sex, mz = _visit(rng)
    main = rng.choice(_DIAGNOSES)
    el: dict[str, Any] = {
        "HDSD00.03.040": HOSPITAL_ORG_CODE,
        "HDSD00.03.025": mz,
        "HDSD00.03.017": _name(rng),
        "HDSD00.03.039": sex,
        "HDSD00.03.023": when.strftime("%Y%m%dT%H%M%S"),
        "HDSD00.03.024": rng.choice(_DEPARTMENTS),
    }
    if _maybe(rng, 0.9):
        el["HDSD00.03.003"] = birth.strftime("%Y%m%d")
        el["HDSD00.03.026"] = str(_age(birth, when.date()))
    if _maybe(rng, 0.9):
        el["HDSD00.03.041"] = rng.choice(_DOCTORS)
    if _maybe(rng, 0.8):
        t, p, r = rng.choice(["36.5", "36.8", "37.2", "38.4"]), rng.randrange(62, 108), rng.randrange(14, 24)
        sbp, dbp = rng.randrange(105, 175), rng.randrange(62, 105)
        el["HDSD00.03.037"] = f"T {t}℃，P {p}次/分，R {r}次/分，BP {sbp}/{dbp}mmHg。{main[2]}"
    if _maybe(rng, 0.7):
        el["HDSD00.03.038"] = main[3]
    if _maybe(rng, 0.5):
        el["HDSD00.03.021"] = rng.choice(_PAST)
    allergic = _maybe(rng, 0.15)
    if _maybe(rng, 0.6):
        el["HDSD00.03.015"] = "T" if allergic else "F"
        if allergic:
            el["HDSD00.03.014"] = rng.choice(_ALLERGIES)
    if _maybe(rng, 0.3):
        el["HDSD00.03.010"] = rng.choice("12")
    diagnoses: list[dict[str, str]] = [{"HDSD00.03.004": main[0], "HDSD00.03.005": main[1]}]
    for code, name in rng.sample(_SECONDARY, rng.randrange(3)):
        item = {"HDSD00.03.004": code}
        if _maybe(rng, 0.8):
            item["HDSD00.03.005"] = name
        diagnoses.append(item)
    if el["HDSD00.03.024"] == "中医内科" or _maybe(rng, 0.1):
        (dcode, dname), (scode, sname) = rng.choice(_TCM)
        diagnoses.append({"HDSD00.03.006": dcode, "HDSD00.03.007": dname})
        diagnoses.append({"HDSD00.03.008": scode, "HDSD00.03.009": sname})
    groups: dict[str, Any] = {}
    # A visit may end before a diagnosis is written (a registration, a referral).
    if _maybe(rng, 0.95):
        groups["diagnoses"] = diagnoses
    return {"dataset": "WS445.2", "elements": el, "groups": groups}


def _prescription(rng: random.Random, n: int) -> dict[str, Any]:
    when, birth, sex, mz = _visit(rng)
    drugs = rng.sample(_DRUGS, rng.randrange(1, 5))
    el: dict[str, Any] = {
        "HDSD00.04.029": HOSPITAL_ORG_CODE,
        "HDSD00.04.016": mz,
        "HDSD00.04.014": _name(rng),
        "HDSD00.04.020": sex,
        "HDSD00.04.002": f"{when:%Y%m%d}{n:04d}",
        "HDSD00.04.006": when.strftime("%Y%m%d"),
        "HDSD00.04.005": rng.choice(_DEPARTMENTS),
        # One route for the prescription: the first drug's.
        "HDSD00.04.027": drugs[0][5],
    }
    if _maybe(rng, 0.9):
        el["HDSD00.04.007"] = rng.choice(_DOCTORS)
    if _maybe(rng, 0.8):
        el["HDSD00.04.017"] = str(_age(birth, when.date()))
    if _maybe(rng, 0.6):
        el["HDSD00.04.015"] = rng.choice(_DIAGNOSES)[0]
    if _maybe(rng, 0.3):
        el["HDSD00.04.001"] = rng.choice(_RX_NOTES)
    if _maybe(rng, 0.5):
        el["HDSD00.04.009"] = rng.choice(["马丽娟", "黄伟"])
        el["HDSD00.04.003"] = rng.choice(["马丽娟", "黄伟"])
    if _maybe(rng, 0.4):
        el["HDSD00.04.013"] = rng.choice(["1", "3", "7"])
    if _maybe(rng, 0.5):
        el["HDSD00.04.011"] = f"{Decimal(rng.randrange(500, 60000)) / 100:.2f}"
    items: list[dict[str, str]] = []
    for name, strength, form, dose, unit, _route, total in drugs:
        item = {"HDSD00.04.023": name}
        if _maybe(rng, 0.9):
            item["HDSD00.04.021"] = strength
        if _maybe(rng, 0.6):
            item["HDSD00.04.022"] = form
        if _maybe(rng, 0.9):
            item["HDSD00.04.024"] = dose
            item["HDSD00.04.025"] = unit
        if _maybe(rng, 0.8):
            item["HDSD00.04.028"] = total
        items.append(item)
    return {"dataset": "WS445.3", "elements": el, "groups": {"items": items}}


def _value(rng: random.Random, spec: tuple[float, float, int]) -> str:
    lo, hi, places = spec
    value = Decimal(str(rng.uniform(lo, hi))).quantize(Decimal(1).scaleb(-places))
    return format(value, "f")


def _lab(rng: random.Random, n: int) -> dict[str, Any]:
    when, _birth, sex, mz = _visit(rng)
    category, specimen, tests = rng.choice(_PANELS)
    inpatient = _maybe(rng, 0.3)
    collected = when.replace(hour=7, minute=rng.randrange(0, 50))
    received = collected + timedelta(minutes=rng.randrange(10, 60))
    reported = received.date() + timedelta(days=rng.randrange(2))
    el: dict[str, Any] = {
        "HDSD00.05.070": HOSPITAL_ORG_CODE,
        "HDSD00.05.018": _name(rng),
        "HDSD00.05.069": sex,
        "HDSD00.05.040": f"BG{when:%Y%m%d}{n:04d}",
        "HDSD00.05.051": category,
        "HDSD00.05.052": received.strftime("%Y%m%d"),
        "HDSD00.05.044": reported.strftime("%Y%m%d"),
        "HDSD00.05.017": "3" if inpatient else rng.choice("12"),
    }
    if inpatient:
        el["HDSD00.05.078"] = f"ZY{when:%Y}{rng.randrange(10**6):06d}"
        el["HDSD00.05.008"] = rng.choice(["心内科一病区", "呼吸科二病区", "普外科病区"])
        if _maybe(rng, 0.8):
            el["HDSD00.05.007"] = f"0{rng.randrange(1, 9)}{rng.randrange(1, 30):02d}"
            el["HDSD00.05.006"] = str(rng.randrange(1, 40))
    else:
        el["HDSD00.05.064"] = mz
    optional = {
        "HDSD00.05.016": f"SQ{when:%Y%m%d}{n:04d}",
        "HDSD00.05.045": f"{when:%y%m%d}{rng.randrange(10**4):04d}",
        "HDSD00.05.004": specimen,
        "HDSD00.05.005": rng.choice(["合格", "轻度溶血", "脂血"]),
        "HDSD00.05.002": collected.strftime("%Y%m%dT%H%M%S"),
        "HDSD00.05.057": received.strftime("%Y%m%dT%H%M%S"),
        "HDSD00.05.001": rng.choice(_DOCTORS),
        "HDSD00.05.059": rng.choice(_DEPARTMENTS),
        "HDSD00.05.041": HOSPITAL_NAME,
        "HDSD00.05.053": HOSPITAL_NAME,
        "HDSD00.05.019": rng.choice(_DIAGNOSES)[0],
        "HDSD00.05.015": f"1{rng.choice('3589')}{rng.randrange(10**9):09d}",
        "HDSD00.05.039": rng.choice(["请结合临床", "标本轻度溶血，结果仅供参考"]),
        "HDSD00.05.049": rng.choice(["陈晓", "刘倩"]),
        "HDSD00.05.065": str(rng.randrange(1, 90)),
    }
    for eid, value in optional.items():
        if _maybe(rng, 0.7):
            el[eid] = value
    results: list[dict[str, str]] = []
    for code, quantitative, unit in tests:
        item = {"HDSD00.05.055": code}
        if quantitative is not None:
            item["HDSD00.05.046"] = _value(rng, quantitative)
            if unit:
                item["HDSD00.05.047"] = unit
            if _maybe(rng, 0.1):
                item["HDSD00.05.042"] = "结果已复查"
        else:
            item["HDSD00.05.042"] = rng.choice(unit)
        if _maybe(rng, 0.7):
            item["HDSD00.05.048"] = _METHODS[category]
        results.append(item)
    return {"dataset": "WS445.4", "elements": el, "groups": {"results": results}}


def outpatient_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` WS 445.2 门急诊病历 records (deterministic for a seed)."""
    rng = random.Random(f"ws445.2:{seed}")
    return [_outpatient(rng) for _ in range(n)]


def prescription_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` WS 445.3 西药处方 records (deterministic for a seed)."""
    rng = random.Random(f"ws445.3:{seed}")
    return [_prescription(rng, i + 1) for i in range(n)]


def lab_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` WS 445.4 检验记录 records (deterministic for a seed)."""
    rng = random.Random(f"ws445.4:{seed}")
    return [_lab(rng, i + 1) for i in range(n)]
