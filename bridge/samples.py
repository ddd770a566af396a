"""Deterministic, realistic WS 445.10 住院病案首页 records for tests, demos and benches.

Records look as a Chinese hospital fills them: names, current addresses in real provinces
and cities, 18-character resident ID numbers with a correct check digit, 住院号 and 病案号,
one to four ICD-10 diagnoses (about one record in ten carries a sensitive one such as HIV
disease, a depressive episode or lung cancer), up to two ICD-9-CM-3 operations where the
main diagnosis calls for one, and fee rows that add up to the total. Every record comes
from the same hospital. All people are invented.
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from typing import Any

HOSPITAL_NAME = "杭州市滨江区第一人民医院"
HOSPITAL_ORG_CODE = "47011235-7"
DATASET = "WS445.10"


def hospital_org_code() -> str:
    """The 组织机构代码 (HDSD00.11.119) of the sample hospital."""
    return HOSPITAL_ORG_CODE


def hospital_name() -> str:
    """The name (HDSD00.11.118) of the sample hospital."""
    return HOSPITAL_NAME


_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
_GIVEN_MALE = ["伟", "强", "磊", "军", "洋", "勇", "杰", "涛", "明", "超", "刚", "平", "建华", "志强",
               "晓东", "国平", "文博", "浩然", "思远", "俊杰", "宇轩", "建国", "海涛", "子豪"]
_GIVEN_FEMALE = ["芳", "娜", "秀英", "敏", "静", "丽", "艳", "娟", "秀兰", "霞", "桂英", "海燕",
                 "红梅", "玉兰", "子涵", "雨萱", "欣怡", "佳怡", "梓萱", "婷", "慧敏", "晓燕"]

# (province, city, district, postcode, administrative division code used in ID numbers)
_PLACES = [
    ("浙江省", "杭州市", "西湖区", "310013", "330106"),
    ("浙江省", "杭州市", "滨江区", "310051", "330108"),
    ("浙江省", "宁波市", "鄞州区", "315100", "330212"),
    ("江苏省", "南京市", "鼓楼区", "210009", "320106"),
    ("江苏省", "苏州市", "姑苏区", "215008", "320508"),
    ("上海市", "上海市", "浦东新区", "200120", "310115"),
    ("北京市", "北京市", "海淀区", "100080", "110108"),
    ("广东省", "广州市", "天河区", "510630", "440106"),
    ("四川省", "成都市", "武侯区", "610041", "510107"),
    ("湖北省", "武汉市", "武昌区", "430061", "420106"),
    ("山东省", "济南市", "历下区", "250011", "370102"),
    ("河南省", "郑州市", "金水区", "450003", "410105"),
    ("安徽省", "合肥市", "蜀山区", "230031", "340104"),
    ("江西省", "南昌市", "东湖区", "330006", "360102"),
    ("福建省", "福州市", "鼓楼区", "350001", "350102"),
]
_TOWNS = ["西溪街道", "长河街道", "浦沿街道", "文新街道", "城关镇", "古荡街道", "南湖街道", "龙泉镇"]
_STREETS = ["文三路", "解放路", "中山北路", "人民路", "建设路", "江南大道", "学院路", "新华路",
            "滨盛路", "长江路"]

# (ICD-10 clinical-edition code, name, department, operations [(ICD-9-CM-3, name, level)])
_COMMON = [
    ("J18.900", "肺炎", "呼吸内科", []),
    ("J44.100", "慢性阻塞性肺病伴有急性加重", "呼吸内科", []),
    ("I63.900", "脑梗死", "神经内科", []),
    ("I25.103", "冠状动脉粥样硬化性心脏病", "心血管内科",
     [("00.66", "经皮冠状动脉腔内血管成形术", "3"), ("36.07", "药物洗脱冠状动脉支架置入", "4")]),
    ("K80.200", "胆囊结石", "普通外科", [("51.23", "腹腔镜下胆囊切除术", "3")]),
    ("K35.800", "急性阑尾炎", "普通外科", [("47.01", "腹腔镜下阑尾切除术", "2")]),
    ("S72.000", "股骨颈骨折", "骨科", [("81.52", "部分髋关节置换", "3")]),
    ("E11.900", "2型糖尿病", "内分泌科", []),
    ("K29.500", "慢性胃炎", "消化内科", []),
    ("N20.000", "肾结石", "泌尿外科", [("55.04", "经皮肾镜取石术", "3")]),
]
_SENSITIVE = [
    ("B20.900", "HIV病", "感染科", []),
    ("F32.900", "抑郁发作", "精神科", []),
    ("C34.900", "支气管或肺恶性肿瘤", "胸外科", [("32.41", "胸腔镜下肺叶切除术", "4")]),
]
_SECONDARY = [
    ("I10.x00", "高血压"), ("E11.900", "2型糖尿病"), ("E78.500", "高脂血症"),
    ("K76.000", "脂肪肝"), ("J18.900", "肺炎"), ("N18.900", "慢性肾脏病"), ("D64.900", "贫血"),
]
_OCCUPATIONS = ["11", "13", "17", "21", "24", "27", "31", "51", "54", "70", "80", "90"]
_ETHNICITIES = ["01"] * 18 + ["03", "08", "15", "11"]
_PAYMENTS = ["01"] * 5 + ["02"] * 2 + ["03"] * 2 + ["07", "05", "08", "99"]
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def id_check_digit(first17: str) -> str:
    """GB 11643 check character of a resident ID number (ISO 7064 MOD 11-2)."""
    total = sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def _name(rng: random.Random, sex: str | None = None) -> str:
    if sex is None:
        sex = rng.choice("12")
    return rng.choice(_SURNAMES) + rng.choice(_GIVEN_MALE if sex == "1" else _GIVEN_FEMALE)


def _marital(rng: random.Random, age: int) -> str:
    if age < 25 and rng.random() < 0.8:
        return "10"
    if age >= 60 and rng.random() < 0.2:
        return "30"
    return rng.choice(["20", "20", "20", "20", "10", "40"])


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    cuts = sorted(rng.randint(0, total) for _ in range(parts - 1))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _fees(rng: random.Random, surgical: bool) -> dict[str, str]:
    """Fee rows in cents that add up to the total; "of which" rows stay within their parent."""
    total = rng.randint(3_000_00, 30_000_00) + (rng.randint(15_000_00, 60_000_00) if surgical else 0)
    rows = ["HDSD00.11.147", "HDSD00.11.148", "HDSD00.11.145", "HDSD00.11.123",
            "HDSD00.11.124", "HDSD00.11.122", "HDSD00.11.129", "HDSD00.11.098",
            "HDSD00.11.135", "HDSD00.11.040", "HDSD00.11.081"]
    if surgical:
        rows += ["HDSD00.11.131", "HDSD00.11.039", "HDSD00.11.121"]
    if rng.random() < 0.2:
        rows += ["HDSD00.11.134", "HDSD00.11.136"]
    if rng.random() < 0.15:
        rows += ["HDSD00.11.115", "HDSD00.11.111"]
    amounts = dict(zip(rows, _split(rng, total, len(rows)), strict=True))
    out = {k: _money(v) for k, v in amounts.items()}
    # 抗菌药物费用 is a part of 西药费; 麻醉费 and 手术费 are parts of 手术治疗费.
    out["HDSD00.11.099"] = _money(amounts["HDSD00.11.098"] * rng.randint(5, 40) // 100)
    if surgical:
        op = amounts["HDSD00.11.131"]
        anaesthesia = op * rng.randint(10, 25) // 100
        out["HDSD00.11.132"] = _money(anaesthesia)
        out["HDSD00.11.133"] = _money(op * rng.randint(50, 70) // 100)
    else:
        out["HDSD00.11.131"] = "0.00"
    out["HDSD00.11.142"] = _money(total)
    return out


def _record(seed: int, i: int) -> dict[str, Any]:
    rng = random.Random(f"ws445.10:{seed}:{i}")
    sex = rng.choice(["1", "2"])
    province, city, district, postcode, division = rng.choice(_PLACES)
    age = rng.randint(18, 88)
    admitted = datetime(2025, 1, 1, 7, 0) + timedelta(
        days=rng.randint(0, 600), hours=rng.randint(0, 14), minutes=rng.randint(0, 59),
        seconds=rng.randint(0, 59))
    birth = date(admitted.year - age, 1, 1) + timedelta(days=rng.randint(0, 364))
    order = rng.randint(1, 499) * 2 + (1 if sex == "1" else 0)  # odd order number for men
    first17 = f"{division}{birth:%Y%m%d}{order % 1000:03d}"
    id_number = first17 + id_check_digit(first17)

    sensitive = rng.random() < 0.10
    main = rng.choice(_SENSITIVE if sensitive else _COMMON)
    code, name, department, operations = main
    stay = rng.randint(2, 6) + (rng.randint(2, 10) if operations else 0) + (5 if sensitive else 0)
    discharged = admitted + timedelta(days=stay, hours=rng.randint(-3, 5))
    if discharged <= admitted:
        discharged = admitted + timedelta(hours=20)
    los = max((discharged.date() - admitted.date()).days, 1)

    inpatient_no = f"ZY{admitted:%Y}{seed % 100:02d}{i:06d}"
    record_no = f"{seed % 100:02d}{i + 100000:07d}"
    ward = f"{rng.randint(3, 18)}F-{rng.randint(1, 4)}病区"
    payment = rng.choice(_PAYMENTS)
    elements: dict[str, Any] = {
        "HDSD00.11.118": HOSPITAL_NAME,
        "HDSD00.11.119": HOSPITAL_ORG_CODE,
        "HDSD00.11.117": payment,
        "HDSD00.11.053": f"3301{rng.randint(10**11, 10**12 - 1)}" if rng.random() < 0.4 else "",
        "HDSD00.11.139": str(rng.randint(1, 3)),
        "HDSD00.11.140": inpatient_no,
        "HDSD00.11.006": record_no,
        "HDSD00.11.110": _name(rng, sex),
        "HDSD00.11.109": sex,
        "HDSD00.11.014": f"{birth:%Y%m%d}",
        "HDSD00.11.079": age - (1 if (admitted.month, admitted.day) < (birth.month, birth.day) else 0),
        "HDSD00.11.036": "156",
        "HDSD00.11.077": rng.choice(_ETHNICITIES),
        "HDSD00.11.049": "01",
        "HDSD00.11.048": id_number,
        "HDSD00.11.050": _marital(rng, age),
        "HDSD00.11.125": "80" if age >= 62 else rng.choice(_OCCUPATIONS),
        "HDSD00.11.026": f"1{rng.choice('3578')}{rng.randint(0, 9)}{rng.randint(10**7, 10**8 - 1)}",
        "HDSD00.11.102": province,
        "HDSD00.11.103": city,
        "HDSD00.11.104": district,
        "HDSD00.11.105": rng.choice(_TOWNS),
        "HDSD00.11.100": rng.choice(_STREETS),
        "HDSD00.11.101": f"{rng.randint(1, 999)}号{rng.randint(1, 30)}幢{rng.randint(101, 2402)}室",
        "HDSD00.11.106": postcode,
        "HDSD00.11.086": rng.choice(["1", "1", "1", "2", "2", "3"]),
        "HDSD00.11.085": f"{admitted:%Y%m%dT%H%M%S}",
        "HDSD00.11.084": department,
        "HDSD00.11.083": ward,
        "HDSD00.11.019": f"{discharged:%Y%m%dT%H%M%S}",
        "HDSD00.11.018": department,
        "HDSD00.11.017": ward,
        "HDSD00.11.087": str(los),
        "HDSD00.11.057": rng.choice(["1"] * 12 + ["2", "4"]),
        "HDSD00.11.116": rng.choice(["T", "F", "F", "F"]),
        "HDSD00.11.141": _name(rng),
        "HDSD00.11.138": _name(rng),
        "HDSD00.11.137": _name(rng),
        "HDSD00.11.005": _name(rng),
        "HDSD00.11.127": f"{discharged + timedelta(days=3):%Y%m%d}",
    }
    if rng.random() < 0.03:  # a few foreign patients with a passport
        elements["HDSD00.11.049"] = "03"
        elements["HDSD00.11.048"] = f"E{rng.randint(10**7, 10**8 - 1)}"
        elements["HDSD00.11.036"] = rng.choice(["840", "392", "410"])
        elements["HDSD00.11.077"] = "99"

    diagnoses: list[dict[str, Any]] = [
        {"HDSD00.11.075": code, "HDSD00.11.076": name},
        {"HDSD00.11.023": code, "HDSD00.11.024": name, "HDSD00.11.025": rng.choice("1112")},
    ]
    others = [d for d in _SECONDARY if d[0] != code]
    for other_code, other_name in rng.sample(others, rng.randint(0, 2)):
        diagnoses.append({"HDSD00.11.020": other_code, "HDSD00.11.021": other_name,
                          "HDSD00.11.022": rng.choice("1114")})
    if rng.random() < 0.3:
        diagnoses = diagnoses[1:]  # some front sheets leave the outpatient diagnosis blank

    ops: list[dict[str, Any]] = []
    for n, (op_code, op_name, level) in enumerate(operations[: rng.randint(1, 2)]):
        when = admitted + timedelta(days=1 + n, hours=rng.randint(1, 6))
        when = min(when, discharged - timedelta(hours=2))
        ops.append({
            "HDSD00.11.089": op_code,
            "HDSD00.11.090": op_name,
            "HDSD00.11.091": f"{when:%Y%m%dT%H%M%S}",
            "HDSD00.11.092": level,
            "HDSD00.11.093": "1" if op_code.startswith(("36", "00")) else rng.choice("122"),
            "HDSD00.11.094": _name(rng),
            "HDSD00.11.001": _name(rng),
            "HDSD00.11.073": "1" if level in ("3", "4") else rng.choice(["1", "2", "22"]),
            "HDSD00.11.074": _name(rng),
        })

    fees = _fees(rng, surgical=bool(ops))
    elements.update(fees)
    if payment != "07":
        total = int(fees["HDSD00.11.142"].replace(".", ""))
        elements["HDSD00.11.143"] = _money(total * rng.randint(10, 45) // 100)
    record: dict[str, Any] = {
        "dataset": DATASET,
        "elements": {k: v for k, v in elements.items() if v != ""},
        "groups": {"diagnoses": diagnoses},
    }
    if ops:
        record["groups"]["operations"] = ops
    return record


def inpatient_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` WS 445.10 DE records; the same ``seed`` always gives the same records."""
    return [_record(seed, i) for i in range(n)]
