"""The GB/T 39725-2020 Appendix F items a bridge between two controllers can evidence.

Each :class:`Item` quotes the checklist question of table F.1 (with its line in the
Chinese text shipped with the project's reference material), says in English what it
asks, names the bridge feature that answers it, and assesses it for one configuration:
``met``, ``partial``, ``not met`` or ``not applicable``, always with the reason. The
tests that prove an item are not listed here: they are read from the test run's
evidence (``@pytest.mark.control``), see :mod:`bridge.compliance.report`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, LinkConfig

Status = Literal["met", "partial", "not met", "not applicable"]
Assessment = tuple[Status, str]

RESEARCH_PROFILES = frozenset({"research-limited-data-set"})
SENDING = ("outbound", "pull")
RECEIVING = ("inbound", "pull-from")


@dataclass(frozen=True)
class AuditLogFacts:
    """What the store holds of its audit log's protection: this controller's signed
    checkpoints and the partners that cosigned one."""

    checkpoints: int
    cosignatures: int
    cosigners: tuple[str, ...]
    # The chain verified from genesis (None: it does not; the text says where it breaks),
    # and the append-only triggers the audit table still has.
    chain_broken: str | None = None
    guards: frozenset[str] = frozenset({"audit_no_update", "audit_no_delete"})
    # Values the store holds plain, and patient lookup keys in clear, per table.column:
    # written before encryption at rest was turned on (bridge.ledger.sealing).
    plain_values: tuple[tuple[str, int], ...] = ()


#: ``Facts.audit_unread`` for a store not made yet (it holds nothing, plain or sealed).
NO_STORE_YET = "the store does not exist yet"


@dataclass(frozen=True)
class Facts:
    """What an assessment may read: the live configuration, the host it runs on and, when
    it could be read, the store's audit log (``audit``; None with the reason in
    ``audit_unread``).

    Assessments read fields and call functions by name in code, never a module,
    attribute or configuration key named in a string: a rename is then a type error,
    not an item that silently can no longer be met.
    """

    config: BridgeConfig
    audit: AuditLogFacts | None = None
    audit_unread: str = "the store was not read"

    def links(self, *directions: str) -> list[LinkConfig]:
        return [link for link in self.config.links if link.direction in directions]

    def research_links(self) -> list[LinkConfig]:
        return [link for link in self.config.links if link.profile in RESEARCH_PROFILES]

    def without_agreement(self, *directions: str) -> list[str]:
        return [link.id for link in self.links(*directions) if link.agreement is None]

    def certificate_auth(self) -> bool:
        ops = self.config.operations
        return ops is not None and ops.auth == "certificate"


@dataclass(frozen=True)
class Item:
    id: str
    line: int  # line of the question in gbt39725-2020-zh-full.txt
    text: str  # the question as table F.1 asks it
    asks: str  # what it asks, in English
    feature: str  # the bridge feature that answers it
    assess: Callable[[Facts], Assessment]


def _always(status: Status, why: str) -> Callable[[Facts], Assessment]:
    return lambda _facts: (status, why)


def _links_with_agreements(f: Facts, directions: tuple[str, ...], what: str) -> Assessment:
    links = f.links(*directions)
    if not links:
        return "not applicable", f"no {what} link is configured"
    missing = f.without_agreement(*directions)
    if missing:
        return "not met", f"links without a data-use agreement: {', '.join(missing)}"
    return "met", f"every {what} link carries an agreement: " + ", ".join(
        f"{link.id} ({link.agreement})" for link in links)


def _u2(f: Facts) -> Assessment:
    caps = [f"{link.id}: {link.consent_without_end}" + (
        f" {link.consent_cap_days} d" if link.consent_without_end == "cap" else "")
        for link in f.links(*SENDING)]
    return "partial", ("purpose and recipient are required when a consent is registered;"
                       " a consent without an expiry is refused or capped per link ("
                       + ("; ".join(caps) or "no sending link") + "); the legal rights and"
                       " safeguards are stated in the consent form, which the bridge does"
                       " not read")


def _u5(f: Facts) -> Assessment:
    research = f.research_links()
    if not research:
        return "met", "no link releases data without the subject's consent"
    bad = [link.id for link in research if link.purpose not in ("HRESCH", "PUBHLTH", "HOPERAT")]
    if bad:
        return "not met", f"research links with another purpose: {', '.join(bad)}"
    return "met", "limited data sets leave only on research links: " + ", ".join(
        link.id for link in research)


def _u9(f: Facts) -> Assessment:
    return _links_with_agreements(f, SENDING, "sending")


def _u10(f: Facts) -> Assessment:
    links = f.links(*RECEIVING)
    if not links:
        return "not applicable", "this controller receives no data from partners"
    missing = f.without_agreement(*RECEIVING)
    if missing:
        return "not met", ("received data is kept without an agreement's retention on "
                           + ", ".join(missing))
    return "met", "received data is destroyed after each agreement's retention: " + ", ".join(
        f"{link.id} {f.config.agreement(str(link.agreement)).retention_days} d" for link in links)


def _u11(f: Facts) -> Assessment:
    abroad = [p for p in f.config.partners if p.abroad]
    if not abroad:
        return "not applicable", "every partner is in the mainland (jurisdiction CN)"
    parts = []
    for p in abroad:
        a = p.cross_border
        parts.append(f"{p.id} ({p.jurisdiction}): " + (
            f"approval {a.reference} by {a.authority}, cap {a.item_cap}, expires {a.expires}"
            if a else "no approval; nothing is sent to it"))
    return "met", "; ".join(parts)


def _u12(f: Facts) -> Assessment:
    abroad = [p.id for p in f.config.partners if p.abroad and any(
        link.partner == p.id for link in f.links(*SENDING))]
    where = ("partners abroad receive data only under an approval: " + ", ".join(abroad)
             if abroad else "no sending link leads abroad")
    return "partial", (f"{where}; where this bridge's own store runs is the operator's to"
                       " ensure (the bridge cannot tell)")


def _t3(f: Facts) -> Assessment:
    if f.certificate_auth() and f.config.operators:
        return "met", (f"partners by certificate; {len(f.config.operators)} operators, each"
                       " by certificate on the operations port and by host account for commands")
    if f.config.operators:
        return "partial", ("operators are named for commands, but the operations port takes"
                           " no certificate (operations.auth = loopback)")
    return "not met", "no [[operators]] configured: people are not identified"


def _t4(f: Facts) -> Assessment:
    if f.certificate_auth():
        ops = f.config.operations
        assert ops is not None
        return "met", (f"{ops.max_failed_attempts} refusals in {ops.failure_window_seconds:.0f} s"
                       f" lock an address out for {ops.lockout_seconds:.0f} s (audited); idle"
                       f" connections close after {ops.idle_timeout_seconds:.0f} s")
    if f.config.operations is None:
        return "not applicable", "no operations port is configured"
    return "not met", "the operations port takes no login (operations.auth = loopback)"


def _t5(f: Facts) -> Assessment:
    ops = f.config.operations
    if ops is None:
        return "not applicable", "no operations port is configured"
    if ops.auth == "certificate":
        return "met", "the operations port speaks HTTPS with operator certificates"
    if not ops.allow_remote:
        return "partial", "the operations port is plain HTTP on loopback only"
    return "not met", "plain HTTP on a remote address; TLS is left to a proxy"


def _t6(f: Facts) -> Assessment:
    if not f.config.operators:
        return "not met", "no [[operators]]: every host user may do everything"
    roles = sorted({o.role for o in f.config.operators})
    return "met", (f"roles {', '.join(roles)}; no host user holds two duties (key management,"
                   " data import and consents are separated)")


def _t8(f: Facts) -> Assessment:
    if f.config.operators:
        return "met", "every exchange, refusal and admin action is audited, naming the operator"
    return "partial", "every exchange and refusal is audited; people are named by host account"


#: The triggers that keep the audit table append-only (both stores' schemas).
AUDIT_GUARDS = frozenset({"audit_no_update", "audit_no_delete"})


def _t10(f: Facts) -> Assessment:
    kept = "hash chain, append-only triggers and bridge store backup"
    audit = f.audit
    if audit is None:
        return "partial", f"{kept}; checkpoints and cosignatures unknown: {f.audit_unread}"
    if audit.chain_broken is not None:
        return "not met", f"the audit chain does not verify: {audit.chain_broken}"
    missing = sorted(AUDIT_GUARDS - audit.guards)
    if missing:
        return "not met", ("the audit table's append-only triggers are gone ("
                           + ", ".join(missing) + ")")
    if audit.cosignatures:
        return "met", (f"{kept}; Merkle tree with {audit.checkpoints} signed checkpoints,"
                       f" {audit.cosignatures} cosigned by partners ("
                       + ", ".join(audit.cosigners) + ")")
    if audit.checkpoints:
        return "partial", (f"{kept}; {audit.checkpoints} signed checkpoints, none cosigned by"
                           " a partner yet (a partner cosigns when its configuration gives"
                           " this controller's base_url)")
    return "partial", f"{kept}; no checkpoint signed yet"


def _t12(f: Facts) -> Assessment:
    ops = f.config.operations
    if ops is None:
        return "not applicable", "no operations port is configured"
    if ops.allow_remote and ops.auth != "certificate":
        return "partial", "remote management is left to an authenticating proxy"
    return "met", f"operations port on {ops.host}" + (
        " with operator certificates" if ops.auth == "certificate" else " (loopback)")


def _t17(f: Facts) -> Assessment:
    status, why = _u10(f)
    if status == "not met":
        return "partial", "profiles are checked on receipt; " + why
    return "met", "profiles are checked on receipt; " + why


def _u13(f: Facts) -> Assessment:
    from bridge.errors import BridgeError
    from bridge.link.intake import site_reader

    try:
        paths = site_reader(f.config).biometric_paths
    except BridgeError as exc:
        return "not met", f"the mapping files in effect do not load: {exc.location}"
    if not paths:
        return "not applicable", ("no mapping in effect marks a biometric element (WS 445"
                                  " defines none); a site overlay marks one biometric: true")
    return "met", ("replaced by HMAC-SHA-256 digests (intake.biometric_key_file) before any"
                   " store or link sees them: " + ", ".join(p.text for p in paths))


def _t19(f: Facts) -> Assessment:
    store = f.config.store
    where = ("store.data_key_file" if store.data_key_file is not None
             else "store.data_key_env" if store.data_key_env is not None else None)
    if where is not None:
        if f.audit is None and f.audit_unread != NO_STORE_YET:
            return "partial", (f"mutual TLS in transit; AES-256-GCM at rest (key in {where});"
                               f" what the store holds from before was not checked:"
                               f" {f.audit_unread}")
        if f.audit is not None and f.audit.plain_values:
            held = ", ".join(f"{n} in {column}" for column, n in f.audit.plain_values)
            return "partial", (f"mutual TLS in transit; AES-256-GCM at rest (key in {where}),"
                               f" but values written before it are stored plain ({held}):"
                               f" bridge keys seal-stored seals them")
        return "met", f"mutual TLS in transit; AES-256-GCM at rest (key in {where})"
    return "partial", ("mutual TLS in transit; the store is not encrypted (no"
                       " store.data_key_file or store.data_key_env)")


def _t20(f: Facts) -> Assessment:
    chosen = [f"{link.id}: {link.signature_algorithm}" for link in f.config.links
              if link.signature_algorithm is not None]
    missing = "no SM2 signer or TLCP (GB/T 38636) suite is available to the stack; "
    if not chosen:
        return "not met", missing + ("every link signs with the algorithm of [signing]'s key and"
                                     " accepts any partner key's; a link names its algorithm"
                                     " (signature_algorithm), so an SM2 signer plugs in by name")
    return "not met", missing + ("links sign with, and accept only, the algorithm they name ("
                                 + "; ".join(chosen) + "), so an SM2 signer plugs in by name")


def _research(what: str) -> Callable[[Facts], Assessment]:
    def assess(f: Facts) -> Assessment:
        links = f.research_links()
        if not links:
            return "not applicable", "no research link is configured"
        return "met", f"{what}: " + ", ".join(link.id for link in links)
    return assess


def _d2(f: Facts) -> Assessment:
    links = f.research_links()
    if not links:
        return "not applicable", "no research link is configured"
    missing = [link.id for link in links if link.agreement is None]
    if missing:
        return "not met", f"research links without an agreement: {', '.join(missing)}"
    return "met", "research links carry agreements with purpose and period"


def _d8(f: Facts) -> Assessment:
    path = f.config.audit.pseudonym_key_file
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "partial", f"the pseudonym key is made on first start ({path})"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return "not met", f"the pseudonym key file is readable by others ({path})"
    return "met", "keys and offsets stay in the controller, readable by its account only"


ITEMS: tuple[Item, ...] = (
    Item("U1", 4068, "非医疗目的使用数据，是否获得主体同意？",
         "non-medical use only with the subject's consent",
         "consent registry, deny by default, asked at enqueue, at dispatch and for every pull page",
         _always("met", "no consent, no disclosure, on every link")),
    Item("U2", 4070, "非医疗目的使用，获取主体授权，是否明确了用途、使用的方式、到期日期、法定权利、以及控制者采取的保护措施等具体信息？",
         "the authorisation states purpose, manner, expiry, rights and safeguards",
         "Consent validation on registration; per-link rule for consents without an expiry", _u2),
    Item("U3", 4076, "非医疗目的使用数据是否限定在与个人授权的用途具有直接或合理关联的范围内？",
         "use limited to what the authorisation covers",
         "purpose of use and recipient checked against the consent", _always("met", "purpose and recipient must match a permit")),
    Item("U4", 4078, "超出授权范围使用数据，是否再次征得主体同意？",
         "use beyond the authorisation needs a new consent",
         "refusal outside the consent's scope, audited", _always("met", "a disclosure outside the consent is refused and audited")),
    Item("U5", 4080, "未经个人主体授权的受限制数据是否仅限于科学研究、医学/健康教育、公共卫生或医疗保健操作目的？",
         "limited data sets without consent only for research, education, public health or operations",
         "research link profile with de-identification", _u5),
    Item("U6", 4094, "是否将市场目的的数据使用授权独立，未作为主体获得任何公共服务、医疗服务或者捆绑于其他的服务条款之中？",
         "marketing use only under an authorisation of its own, never bundled",
         "a consent naming marketing with any other purpose is refused and never counted",
         _always("met", "marketing consents must stand alone")),
    Item("U7", 4110, "是否支持主体最少回溯 6 年查询其数据使用披露情况？",
         "the subject can see the history of uses and disclosures for at least 6 years",
         "bridge audit disclosures; audit entries are never deleted",
         _always("met", "the audit log keeps every entry; disclosures are listed per patient")),
    Item("U8", 4112, "和个人主体关于数据访问使用另有约定的，是否按照约定执行？除非法律法规要求以及医疗紧急情况。",
         "agreed restrictions honoured, except by law and in emergencies",
         "deny provisions override permits; emergency override only with actor and reason, audited",
         _always("met", "a deny provision wins over every permit")),
    Item("U9", 4140, "数据交付第三方使用是否通过协议约定了目的、安全责任和安全要求？",
         "delivery to a third party bound by an agreement on purpose and duties",
         "links carry a data-use agreement; nothing is sent, pulled or accepted outside it", _u9),
    Item("U10", 4143, "数据使用结束后是否确认数据已彻底销毁？",
         "data destroyed after use",
         "received payloads destroyed after the agreement's retention; digests and audit kept", _u10),
    Item("U11", 4151, "境外传送数据是否限定在 250 条以内？",
         "transfer abroad only with approval, at most 250 items on a committee's approval",
         "partner jurisdiction; approval with reference, item cap and expiry; items counted and audited",
         _u11),
    Item("U12", 4159, "是否确定数据没有存储在境外的服务器上？",
         "no data kept on servers abroad",
         "partner jurisdiction declared; sending abroad refused without an approval", _u12),
    Item("U13", 4163, "生物识别信息的存储是否经过了处理，例如只存储了摘要？",
         "biometric data stored only as digests",
         "elements a mapping marks biometric: true are replaced by a keyed digest before"
         " the message is stored, mapped or sent", _u13),
    Item("U14", 4165, "健康医疗数据的传输是否进行了加密处理？",
         "transmission encrypted",
         "mutual TLS on every listener that carries health data",
         _always("met", "mutual TLS 1.2+; MLLP without TLS only on loopback")),
    Item("U15", 4167, "使用介质进行健康医疗数据传输的，是否对介质使用进行了管控？",
         "transfer on media controlled",
         "none: the bridge never exports data to media",
         _always("not applicable", "the bridge transfers over the network only")),
    Item("T1", 4175, "是否对健康医疗数据进行分类分级管理？",
         "data classified and graded",
         "§6.1 categories and §6.2 grades on every resource", _always("met", "every resource is labelled")),
    Item("T2", 4179, "是否制定并实施了合理的策略和流程，将使用和披露限制在最低限度？",
         "use and disclosure limited to the minimum",
         "link profiles (minimum necessary), property-tested", _always("met", "only what a link's profile allows leaves")),
    Item("T3", 4185, "是否对登录的用户进行身份标识和鉴别，身份标识具有唯一性，鉴别信息具有复杂度要求并定期更换？",
         "unique identities, strong authentication, renewed credentials",
         "partner certificates; operator certificates (expiring) and host accounts", _t3),
    Item("T4", 4191, "是否具有登录失败处理功能，应配置并启用结束会话、限制非法登录次数和当登录连接超时自动退出等相关措施？",
         "login failure handling, attempt limits, session timeout",
         "operations port: refused attempts audited and locked out; idle connections closed", _t4),
    Item("T5", 4197, "当进行远程管理时，是否采取了必要措施，防止鉴别信息在网络传输过程中被窃听？",
         "remote management cannot be eavesdropped",
         "operations port over HTTPS with operator certificates", _t5),
    Item("T6", 4205, "是否授予管理用户所需的最小权限，实现管理用户的权限分离？",
         "accounts with least privilege and separation of duties",
         "operator roles viewer, operator, consent-admin, key-admin (§11.7.4.2 a 5)", _t6),
    Item("T7", 4201, "是否重命名或删除默认账户，修改默认账户的默认口令？",
         "no default accounts or passwords",
         "no passwords; keys made on first run; operators only as configured",
         _always("met", "the bridge has no accounts or passwords of its own")),
    Item("T8", 4207, "是否启用安全审计功能，并覆盖到每个用户，对重要的用户行为和重要安全事件进行审计？",
         "audit covers every user and important event",
         "audit of every exchange, refusal, admin action and personal-data read, naming the operator", _t8),
    Item("T9", 4213, "审计记录是否包括事件的日期和时间、用户、事件类型、事件是否成功及其他与审计相关的信息？",
         "audit records hold time, user, event type and outcome",
         "audit entry: time, actor, operator, action, subject, outcome, detail", _t8),
    Item("T10", 4219, "是否对审计记录进行保护，定期备份，避免受到未预期的删除、修改或覆盖等？",
         "audit records protected from deletion or change, backed up",
         "hash chain, append-only triggers, checkpoints; bridge store backup", _t10),
    Item("T11", 4229, "是否关闭了不需要的系统服务、默认共享和高危端口？",
         "unneeded services and ports closed",
         "one mutual-TLS listener; MLLP and operations port only when configured",
         _always("met", "nothing listens that the configuration does not ask for")),
    Item("T12", 4231, "是否通过设定终端接入方式或网络地址范围对通过网络进行管理的管理终端进行限制？",
         "management terminals restricted by access method or address",
         "operations port on loopback unless allowed; operator certificates", _t12),
    Item("T13", 4234, "是否提供数据有效性检验功能，保证通过人机接口输入或通过通信接口输入的内容符合系统设定要求？",
         "input validity checked",
         "validation of HL7 v2, WS 445 records, FHIR R4 and Consent, errors naming where",
         _always("met", "every input is validated before it is stored")),
    Item("T14", 4240, "是否能发现可能存在的已知漏洞，并在经过充分测试评估后，及时修补漏洞？",
         "known vulnerabilities found and patched",
         "dependency audit (pip-audit, npm audit) in CI",
         _always("partial", "CI audits dependencies; where the vulnerability databases cannot be"
                 " reached the audit says so instead of failing")),
    Item("T15", 4248, "是否采用校验技术保证重要数据在传输过程中的完整性？",
         "integrity of important data in transit",
         "signature on every payload, signed receipts", _always("met", "every message and receipt is signed")),
    Item("T16", 4250, "是否提供重要数据的本地数据备份与恢复功能？",
         "local backup and recovery",
         "bridge store backup DIR / bridge store restore DIR (both stores, while serving)",
         _always("met", "consistent snapshots and a tested restore")),
    Item("T17", 4256, "是否仅采集和保存业务必需的用户个人信息？",
         "only necessary personal data collected and kept",
         "profiles checked on receipt; received data destroyed after retention", _t17),
    Item("T18", 4258, "是否禁止未授权访问和非法使用用户个人信息？",
         "unauthorised access to personal data prevented",
         "partner binding on every request; consent on pull; operator roles for reads",
         _always("met", "every request is tied to a certificate and a link")),
    Item("T19", 4270, "是否采用密码技术保证数据在传输和存储过程中的保密性？",
         "cryptography for confidentiality in transit and at rest",
         "mutual TLS; AES-256-GCM encryption at rest", _t19),
    Item("T20", 4272, "密码技术使用是否符合国家密码管理相关要求？",
         "cryptography meets national requirements",
         "signature algorithms registered by JWS alg, chosen per link, verified against the"
         " link's choice; SM2 and TLCP not offered (README: National cryptography)", _t20),
    Item("D1", 4280, "去标识化数据是否只应用于受控公开共享或领地公开共享？",
         "de-identified data only in controlled or enclave sharing",
         "research profile on a mutual-TLS link bound to an agreement", _d2),
    Item("D2", 4284, "是否通过数据使用协议约定数据使用目的、期限等？",
         "purpose and period of use set by agreement",
         "link agreement with purposes and validity", _d2),
    Item("D3", 4288, "是否去除可以唯一识别到个人的信息或披露后会给患者造成重大影响的信息？",
         "unique identifiers removed",
         "Appendix G direct identifiers removed by the research profile",
         _research("direct identifiers removed on")),
    Item("D4", 4290, "模糊化后仍有医学意义的数据是否进行了模糊化处理，例如泛化？",
         "generalisation where still medically meaningful",
         "years of birth, county-level addresses, date shifts", _research("generalised on")),
    Item("D5", 4292, "是否删除医护人员姓名以及其他身份标识信息？",
         "health workers' names removed",
         "practitioner names removed by the research profile", _research("practitioners removed on")),
    Item("D6", 4294, "数据集中所有属性值相同的人数是否最低在 5 人以上？",
         "every combination of attributes shared by at least 5 people",
         "k-anonymity (k = 5) refuses the batch", _research("k = 5 enforced on")),
    Item("D7", 4296, "对需要追溯到患者的情况，是否由控制者内部建立患者代码索引？",
         "the patient code index stays inside the controller",
         "keyed pseudonyms; the key never leaves", _research("keyed pseudonyms on")),
    Item("D8", 4298, "去标识化过程中使用的各种参数配置，例如时间漂移范围、患者代码索引、各种个人代码生成规则等是否严格保密，仅限于控制者内部专人管理？",
         "de-identification parameters kept secret",
         "keys and offsets in the controller's key file (mode 0600)", _d8),
    Item("D9", 4304, "在需要进行重标识确定主体时，是否只能由控制者内部专人处理，处理过程严格保密？",
         "re-identification only by the controller's own staff",
         "none: the bridge offers no re-identification",
         _always("not applicable", "the bridge cannot re-identify; only the controller holds the key")),
    Item("D10", 4308, "在受控公开共享模式下，数据接收者是否具备数据使用情况审计的能力，并接受控制者审计？",
         "recipients' use auditable by the controller",
         "both sides audit every exchange; disclosures exported as FHIR AuditEvent",
         _always("partial", "each side audits what it received and released; what a recipient"
                 " does afterwards is outside the bridge")),
)

BY_ID = {item.id: item for item in ITEMS}
assert len(ITEMS) == 45 and len(BY_ID) == 45

__all__ = ["BY_ID", "ITEMS", "Assessment", "AuditLogFacts", "Facts", "Item", "Status"]
