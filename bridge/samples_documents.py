"""Deterministic, realistic WS 445 clinical-document records for tests and demos.

Generators for 445.1 病历概要, 445.12 入院记录, 445.15 出院小结, 445.16 转诊(院)记录 and
445.17 医疗机构信息, filled as a Chinese hospital fills them: free text in the clinicians'
usual phrasing (including the negative statements such as "否认药物过敏史" that make
free-text histories unsafe to read as coded facts), several diagnoses and operations,
and sparse records where only the mandatory elements are present. All people are invented.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from bridge.samples import HOSPITAL_NAME, HOSPITAL_ORG_CODE, _name, id_check_digit

_PLACES = [
    ("浙江省", "杭州市", "西湖区", "转塘街道", "文三路", "310013", "330106"),
    ("浙江省", "杭州市", "滨江区", "长河街道", "江南大道", "310051", "330108"),
    ("浙江省", "宁波市", "鄞州区", "南湖街道", "中山北路", "315100", "330212"),
    ("江苏省", "苏州市", "姑苏区", "城关镇", "人民路", "215008", "320508"),
    ("上海市", "上海市", "浦东新区", "浦沿街道", "学院路", "200120", "310115"),
]
# (ICD-10, name, department, ward, chief complaint, operation or None)
_CASES = [
    ("I21.000", "急性前壁心肌梗死", "心血管内科", "心内科一病区", "胸痛3小时",
     ("36.06", "冠状动脉药物洗脱支架置入术")),
    ("K80.200", "胆囊结石伴慢性胆囊炎", "普通外科", "普外科二病区", "反复右上腹痛2年，加重1天",
     ("51.23", "腹腔镜下胆囊切除术")),
    ("J18.900", "肺炎", "呼吸内科", "呼吸科病区", "发热、咳嗽5天", None),
    ("S72.000", "股骨颈骨折", "骨科", "骨科一病区", "跌倒致左髋部疼痛、活动受限6小时",
     ("81.52", "部分髋关节置换")),
    ("I63.900", "脑梗死", "神经内科", "神经内科病区", "突发左侧肢体无力1天", None),
    ("K35.800", "急性阑尾炎", "普通外科", "普外科一病区", "转移性右下腹痛12小时",
     ("47.01", "腹腔镜下阑尾切除术")),
]
_SECONDARY = [("I10.x00", "高血压"), ("E11.900", "2型糖尿病"), ("E78.500", "高脂血症"),
              ("K76.000", "脂肪肝")]
_ALLERGY = ["否认食物、药物过敏史", "青霉素过敏，表现为皮疹", "磺胺类药物过敏", "否认药物过敏史"]
_ILLNESS = ["既往体健", "高血压病史10年，口服氨氯地平5mg qd，血压控制可",
            "2型糖尿病史5年，二甲双胍0.5g bid", "慢性胃炎病史3年"]
_HOSPITALS = [("浙江大学医学院附属第二医院", "47000596-1"), ("浙江省人民医院", "47000612-3"),
              ("杭州市第一人民医院", "47011001-2")]


def _dt(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S")


def _person(rng: random.Random) -> dict[str, Any]:
    sex = rng.choice("12")
    born = datetime(1940, 1, 1) + timedelta(days=rng.randrange(0, 365 * 60))
    place = rng.choice(_PLACES)
    first17 = place[6] + born.strftime("%Y%m%d") + f"{rng.randrange(0, 100):02d}" + \
        str(rng.choice([1, 3, 5, 7, 9]) if sex == "1" else rng.choice([0, 2, 4, 6, 8]))
    return {"sex": sex, "born": born, "place": place, "name": _name(rng, sex),
            "id_no": first17 + id_check_digit(first17), "phone": f"139{rng.randrange(10**8):08d}",
            "house": f"{rng.randrange(1, 300)}号", "health_card": f"H3301{rng.randrange(10**10):010d}"}


def _admitted(rng: random.Random) -> datetime:
    return datetime(2026, 1, 5, 8) + timedelta(days=rng.randrange(0, 50), minutes=rng.randrange(0, 600))


def _drop(rng: random.Random, elements: dict[str, str], keep: set[str], share: float) -> None:
    """Sparse records: leave out a share of the optional elements."""
    for eid in list(elements):
        if eid not in keep and rng.random() < share:
            del elements[eid]


def summary_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """WS 445.1 病历概要 records (患者基本信息 + 基本健康信息)."""
    out = []
    for i in range(n):
        rng = random.Random(f"ws445.1:{seed}:{i}")
        p = _person(rng)
        prov, city, county, town, street, post, _ = p["place"]
        doc_type = rng.choice(["01"] * 6 + ["03", "99"])
        el = {
            "HDSD00.02.003": f"3301060{rng.randrange(10**10):010d}",
            "HDSD00.02.004": p["born"].strftime("%Y%m%d"),
            "HDSD00.02.007": street, "HDSD00.02.008": rng.choice(["01", "09"]),
            "HDSD00.02.009": p["house"], "HDSD00.02.010": prov, "HDSD00.02.011": city,
            "HDSD00.02.012": county, "HDSD00.02.013": town, "HDSD00.02.056": post,
            "HDSD00.02.018": "0571-8888" + f"{rng.randrange(10**4):04d}",
            "HDSD00.02.019": rng.choice(["杭州某科技有限公司", "西湖区某小学", "个体经营"]),
            "HDSD00.02.023": p["phone"],
            "HDSD00.02.025": p["id_no"] if doc_type == "01" else f"E{rng.randrange(10**8):08d}",
            "HDSD00.02.026": doc_type, "HDSD00.02.027": p["name"],
            "HDSD00.02.028": rng.choice(["10", "20", "20", "30"]),
            "HDSD00.02.032": _dt(datetime(2019, 3, 1, 9) + timedelta(days=rng.randrange(2000))),
            "HDSD00.02.033": HOSPITAL_ORG_CODE, "HDSD00.02.034": _name(rng),
            "HDSD00.02.035": p["health_card"], "HDSD00.02.038": f"138{rng.randrange(10**8):08d}",
            "HDSD00.02.039": _name(rng), "HDSD00.02.042": rng.choice(["01"] * 5 + ["03"]),
            "HDSD00.02.050": p["sex"], "HDSD00.02.052": rng.choice(["01", "02", "03", "07"]),
            "HDSD00.02.060": rng.choice(["11", "17", "27", "80", "90"]),
            "HDSD00.02.001": rng.choice("12349"), "HDSD00.02.002": rng.choice("1224"),
            "HDSD00.02.006": rng.choice(["否认肝炎、结核等传染病史", "乙肝病史20年"]),
            "HDSD00.02.016": rng.choice(["吸烟20年，每日10支；偶饮酒", "无烟酒嗜好"]),
            "HDSD00.02.022": rng.choice(_ALLERGY), "HDSD00.02.029": "已婚，育有1子",
            "HDSD00.02.030": rng.choice(_ILLNESS), "HDSD00.02.031": "父亲患高血压，母亲体健",
            "HDSD00.02.047": rng.choice(["2015年行阑尾切除术", "否认手术史"]),
            "HDSD00.02.048": "否认输血史", "HDSD00.02.057": "预防接种史随当地进行",
        }
        if p["sex"] == "2":
            el["HDSD00.02.058"] = "14岁初潮，5/28天，量中，无痛经"
        if i % 3 == 2:
            _drop(rng, el, {"HDSD00.02.027", "HDSD00.02.025", "HDSD00.02.026", "HDSD00.02.007"}, 0.6)
        out.append({"dataset": "WS445.1", "elements": el})
    return out


def admission_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """WS 445.12 入院记录 records, one to four admission diagnoses of several kinds."""
    out = []
    for i in range(n):
        rng = random.Random(f"ws445.12:{seed}:{i}")
        p = _person(rng)
        prov, city, county, town, street, _post, _ = p["place"]
        code, dname, dept, ward, complaint, _op = rng.choice(_CASES)
        adm = _admitted(rng)
        age = 2026 - p["born"].year
        el = {
            "HDSD00.13.116": f"ZY{adm:%Y}{rng.randrange(10**6):06d}", "HDSD00.13.039": p["name"],
            "HDSD00.13.096": p["sex"], "HDSD00.13.047": str(age), "HDSD00.13.040": "20",
            "HDSD00.13.046": "01", "HDSD00.13.110": rng.choice(["17", "27", "80"]),
            "HDSD00.13.031": prov, "HDSD00.13.032": city, "HDSD00.13.033": county,
            "HDSD00.13.034": town, "HDSD00.13.029": street, "HDSD00.13.030": p["house"],
            "HDSD00.13.003": ward, "HDSD00.13.002": f"{rng.randrange(1, 30):02d}",
            "HDSD00.13.001": str(rng.randrange(1, 60)), "HDSD00.13.045": dept,
            "HDSD00.13.057": _dt(adm), "HDSD00.13.114": complaint,
            "HDSD00.13.095": f"患者{complaint}，于当地医院就诊，为进一步诊治收入我院。\n"
                             "病程中精神、食欲可，大小便无殊。",
            "HDSD00.13.042": rng.choice(_ILLNESS), "HDSD00.13.028": "否认肝炎、结核等传染病史",
            "HDSD00.13.065": "否认手术史", "HDSD00.13.066": "否认输血史",
            "HDSD00.13.105": "预防接种史随当地进行", "HDSD00.13.037": rng.choice(_ALLERGY),
            "HDSD00.13.036": "生于原籍，无疫区旅居史；吸烟20年，每日10支", "HDSD00.13.041": "适龄结婚，育有1子",
            "HDSD00.13.043": "父母体健，否认家族遗传病史",
            "HDSD00.13.088": rng.choice(["36.5", "37.8", "38.6"]), "HDSD00.13.080": str(rng.randrange(60, 110)),
            "HDSD00.13.077": str(rng.randrange(14, 24)), "HDSD00.13.085": str(rng.randrange(100, 170)),
            "HDSD00.13.086": str(rng.randrange(60, 100)), "HDSD00.13.083": "168.5",
            "HDSD00.13.089": "65.20",
            "HDSD00.13.094": "神志清，精神可，发育正常，营养中等，自主体位，查体合作",
            "HDSD00.13.081": "皮肤黏膜无黄染，无出血点", "HDSD00.13.082": "全身浅表淋巴结未触及肿大",
            "HDSD00.13.091": "头颅无畸形，双侧瞳孔等大等圆，对光反射灵敏", "HDSD00.13.079": "颈软，气管居中",
            "HDSD00.13.093": "双肺呼吸音清，未闻及干湿啰音；心律齐，各瓣膜听诊区未闻及病理性杂音",
            "HDSD00.13.075": "腹平软，无压痛及反跳痛，肝脾肋下未触及", "HDSD00.13.084": "生理反射存在，病理反射未引出",
            "HDSD00.13.087": "四肢活动自如，双下肢无水肿", "HDSD00.13.078": "脊柱无畸形",
            "HDSD00.13.035": "血常规：WBC 12.3×10^9/L，N 85%；心电图：窦性心律",
            "HDSD00.13.118": f"{dept}专科检查：见现病史及体格检查",
            "HDSD00.13.117": _name(rng), "HDSD00.13.115": _name(rng), "HDSD00.13.044": _name(rng),
        }
        if p["sex"] == "2":
            el["HDSD00.13.106"] = "14岁初潮，5/28天，已绝经"
        if i % 4 == 1:
            el["HDSD00.13.113"] = _name(rng)
        day = adm.strftime("%Y%m%d")
        later = (adm + timedelta(days=2)).strftime("%Y%m%d")
        diagnoses = [{"HDSD00.13.022": code, "HDSD00.13.023": dname, "HDSD00.13.021": day}]
        for scode, sname in rng.sample(_SECONDARY, rng.randrange(0, 3)):
            diagnoses.append({"HDSD00.13.022": scode, "HDSD00.13.023": sname, "HDSD00.13.021": day})
        if i % 2 == 0:
            diagnoses.append({"HDSD00.13.050": code, "HDSD00.13.051": dname, "HDSD00.13.049": later})
        if i % 5 == 3:
            diagnoses.append({"HDSD00.13.098": "J18.900", "HDSD00.13.099": "肺炎", "HDSD00.13.097": later})
            diagnoses.append({"HDSD00.13.005": "D64.900", "HDSD00.13.006": "贫血", "HDSD00.13.007": later})
        if i % 3 == 2:
            _drop(rng, el, {"HDSD00.13.116", "HDSD00.13.057", "HDSD00.13.039", "HDSD00.13.117",
                            "HDSD00.13.029"}, 0.6)
            diagnoses = diagnoses[:1]
        out.append({"dataset": "WS445.12", "elements": el, "groups": {"diagnoses": diagnoses}})
    return out


def discharge_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """WS 445.15 出院小结 records with admission/discharge diagnoses and operations."""
    out = []
    for i in range(n):
        rng = random.Random(f"ws445.15:{seed}:{i}")
        p = _person(rng)
        prov, city, county, town, street, post, _ = p["place"]
        code, _dname, dept, ward, complaint, op = rng.choice(_CASES)
        adm = _admitted(rng)
        stay = rng.randrange(3, 15)
        dis = adm + timedelta(days=stay, hours=2)
        el = {
            "HDSD00.16.052": f"ZY{adm:%Y}{rng.randrange(10**6):06d}", "HDSD00.16.021": p["health_card"],
            "HDSD00.16.019": p["name"], "HDSD00.16.041": p["sex"], "HDSD00.16.026": str(2026 - p["born"].year),
            "HDSD00.16.020": "20", "HDSD00.16.046": "17", "HDSD00.16.018": p["phone"],
            "HDSD00.16.012": "09", "HDSD00.16.014": prov, "HDSD00.16.015": city, "HDSD00.16.016": county,
            "HDSD00.16.017": town, "HDSD00.16.011": street, "HDSD00.16.013": p["house"],
            "HDSD00.16.044": post, "HDSD00.16.024": _name(rng), "HDSD00.16.023": f"137{rng.randrange(10**8):08d}",
            "HDSD00.16.003": ward, "HDSD00.16.002": f"{rng.randrange(1, 30):02d}",
            "HDSD00.16.001": str(rng.randrange(1, 60)), "HDSD00.16.022": dept,
            "HDSD00.16.043": HOSPITAL_ORG_CODE, "HDSD00.16.031": _dt(adm), "HDSD00.16.005": _dt(dis),
            "HDSD00.16.036": str(stay + 1), "HDSD00.16.030": f"患者因“{complaint}”入院。",
            "HDSD00.16.045": "入院后完善相关检查，予抗感染、对症支持治疗，病情好转。",
            "HDSD00.16.004": "患者一般情况可，无发热，切口愈合良好。",
            "HDSD00.16.006": "神志清，生命体征平稳，心肺听诊无殊",
            "HDSD00.16.042": "入院血常规：WBC 12.3×10^9/L；出院复查正常",
            "HDSD00.16.007": "1.低盐低脂饮食；\n2.按时服药；\n3.2周后门诊复诊，不适随诊。",
            "HDSD00.16.053": _name(rng), "HDSD00.16.035": _name(rng), "HDSD00.16.028": _dt(dis + timedelta(hours=1)),
        }
        diagnoses = [{"HDSD00.16.032": code}]
        diagnoses += [{"HDSD00.16.008": code}]
        for scode, _ in rng.sample(_SECONDARY, rng.randrange(0, 3)):
            diagnoses.append({"HDSD00.16.008": scode})
        groups: dict[str, Any] = {"diagnoses": diagnoses}
        if op is not None:
            el["HDSD00.16.037"] = f"于{(adm + timedelta(days=1)):%Y-%m-%d}在全麻下行{op[1]}，术程顺利。"
            ops = [{"HDSD00.16.038": op[0], "HDSD00.16.039": _dt(adm + timedelta(days=1, hours=2)),
                    "HDSD00.16.040": "1", "HDSD00.16.025": "1"}]
            if i % 2 == 1:
                ops.append({"HDSD00.16.038": "99.04", "HDSD00.16.039": _dt(adm + timedelta(days=1, hours=4))})
            groups["operations"] = ops
        if i % 3 == 2:
            _drop(rng, el, {"HDSD00.16.052", "HDSD00.16.031", "HDSD00.16.005", "HDSD00.16.053",
                            "HDSD00.16.011"}, 0.6)
        out.append({"dataset": "WS445.15", "elements": el, "groups": groups})
    return out


def referral_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """WS 445.16 转诊(院)记录 records, from the sample hospital to a tertiary hospital."""
    out = []
    for i in range(n):
        rng = random.Random(f"ws445.16:{seed}:{i}")
        p = _person(rng)
        prov, city, county, town, street, _post, _ = p["place"]
        code, dname, dept, _ward, _complaint, op = rng.choice(_CASES)
        when = _admitted(rng)
        target, target_code = rng.choice(_HOSPITALS)
        el = {
            "HDSD00.01.001": f"3301060{rng.randrange(10**10):010d}", "HDSD00.01.002": p["name"],
            "HDSD00.01.003": p["sex"], "HDSD00.01.004": p["born"].strftime("%Y%m%d"),
            "HDSD00.01.571": f"BA{rng.randrange(10**7):07d}",
            "HDSD00.01.599": prov, "HDSD00.01.600": city, "HDSD00.01.601": county,
            "HDSD00.01.602": town, "HDSD00.01.603": street, "HDSD00.01.604": p["house"],
            "HDSD00.01.282": HOSPITAL_NAME, "HDSD00.01.283": dept, "HDSD00.01.562": HOSPITAL_ORG_CODE,
            "HDSD00.01.606": _name(rng), "HDSD00.01.605": "0571-8666" + f"{rng.randrange(10**4):04d}",
            "HDSD00.01.559": target, "HDSD00.01.560": target_code,
            "HDSD00.01.607": _name(rng), "HDSD00.01.608": "0571-8778" + f"{rng.randrange(10**4):04d}",
            "HDSD00.01.564": when.strftime("%Y%m%d"),
            "HDSD00.01.284": rng.choice(["病情复杂，需上级医院进一步诊治", "需行介入治疗，本院条件不足"]),
            "HDSD00.01.306": rng.choice(_ILLNESS), "HDSD00.01.611": code, "HDSD00.01.610": dname,
            "HDSD00.01.565": "转上级医院继续治疗，病情稳定后转回社区康复",
            "HDSD00.01.609": "01",
        }
        groups: dict[str, Any] = {}
        if op is not None and i % 2 == 0:
            groups["operations"] = [{"HDSD00.01.557": op[0], "HDSD00.01.556": op[1],
                                     "HDSD00.01.026": _dt(when - timedelta(days=3)),
                                     "HDSD00.01.590": "1", "HDSD00.01.589": "全身麻醉"}]
        if i % 3 == 2:
            _drop(rng, el, {"HDSD00.01.002", "HDSD00.01.562", "HDSD00.01.571", "HDSD00.01.564",
                            "HDSD00.01.603", "HDSD00.01.559"}, 0.6)
        record: dict[str, Any] = {"dataset": "WS445.16", "elements": el}
        if groups:
            record["groups"] = groups
        out.append(record)
    return out


def organization_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """WS 445.17 医疗机构信息 records."""
    names = [(HOSPITAL_NAME, HOSPITAL_ORG_CODE), *_HOSPITALS,
             ("西湖区转塘街道社区卫生服务中心", "47011320-9")]
    out = []
    for i in range(n):
        rng = random.Random(f"ws445.17:{seed}:{i}")
        name, code = names[i % len(names)] if seed == 0 else rng.choice(names)
        prov, city, county, town, street, post, _ = rng.choice(_PLACES)
        el = {"HDSD00.18.011": code, "HDSD00.18.010": name, "HDSD00.18.003": prov,
              "HDSD00.18.004": city, "HDSD00.18.005": county, "HDSD00.18.006": town,
              "HDSD00.18.001": street, "HDSD00.18.002": f"{rng.randrange(1, 2000)}号",
              "HDSD00.18.012": post, "HDSD00.18.009": "0571-8" + f"{rng.randrange(10**7):07d}",
              "HDSD00.18.007": _name(rng), "HDSD00.18.008": f"139{rng.randrange(10**8):08d}"}
        if i % 3 == 2:
            _drop(rng, el, {"HDSD00.18.011", "HDSD00.18.010", "HDSD00.18.001"}, 0.9)
        out.append({"dataset": "WS445.17", "elements": el})
    return out


GENERATORS = {
    "summary": summary_records,
    "admission": admission_records,
    "discharge": discharge_records,
    "referral": referral_records,
    "organization": organization_records,
}
