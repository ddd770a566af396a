"""``bridge audit verify|prove|check-proof|checkpoint``: the audit log as evidence.

``verify`` checks the chain, the tree, every checkpoint signature and cosignature and
names the first entry or checkpoint that fails. ``prove --seq N`` prints entry N with
an inclusion proof under a signed checkpoint; ``check-proof`` checks such a proof with
nothing but the proof file and the controller's signing certificate (PROTOCOL §9.7
gives the same recipe for any other tool).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.cli_common import add_json_option, output_file, print_json, read_input
from bridge.errors import NotFound, ParseError, RuntimeFailure, UsageError
from bridge.uuids import uuid5_text

_CONFIG_HELP = "the controller's configuration file (TOML)"


def _keys_for_config(config: Any) -> Any:
    """``keys_for(name)`` over the controller's own and its partners' signing certificates."""
    from bridge.trust.jws import KeyRing

    ring = KeyRing()
    ring.add_certificate(config.controller.id, Path(config.signing.cert))
    for p in config.partners:
        for cert in p.signing_certs:
            ring.add_certificate(p.id, cert)

    def keys_for(name: str) -> list[Any]:
        return [e.public_key for k in ring.kids_for(name) if (e := ring.get(k)) is not None]

    return keys_for


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(store, config or None)`` from ``--config`` or ``--store``."""
    from bridge.cli import _open_store
    from bridge.config import load_config

    config = load_config(args.config) if getattr(args, "config", None) else None
    return _open_store(args), config


def witness_report(config: Any, store: Any) -> list[dict[str, Any]]:
    """Per linked partner: whether this controller checks the partner's audit log (it
    needs the partner's ``base_url``), the newest of the partner's checkpoints cosigned
    here, and the newest of ours the partner cosigned (sizes in entries, None if none)."""
    from bridge.ledger import tree

    ours: dict[str, int] = {}
    for cosigner, size, _ in tree.cosigned_checkpoints(store):
        ours[cosigner] = max(ours.get(cosigner, 0), size)
    linked = {link.partner for link in config.links}
    rows = []
    for partner in config.partners:
        if partner.id not in linked:
            continue
        theirs = tree.last_witnessed(store, partner.id)
        faults, reason, seen = tree.open_faults(store, partner.id)
        rows.append({"partner": partner.id, "witnessed": partner.base_url is not None,
                     "their_checkpoint": theirs[0] if theirs else None,
                     "cosigned_ours": ours.get(partner.id),
                     "refused_checkpoints": faults, "last_refusal": reason,
                     "last_refused_at": seen})
    return rows


def witness_inconsistent(rows: list[dict[str, Any]] | None) -> list[str]:
    """The partners whose audit log failed its check here since it was last cosigned."""
    return [r["partner"] for r in rows or () if r.get("refused_checkpoints")]


def witness_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What :func:`witness_report` means, one line per partner."""
    lines = []
    for row in rows:
        p = row["partner"]
        ours = (f"it cosigned this log's checkpoint of {row['cosigned_ours']} entries"
                if row["cosigned_ours"] is not None
                else "it has cosigned none of this log's checkpoints")
        if not row["witnessed"]:
            lines.append(f"NOT WITNESSED {p}: its audit log is not checked here (no base_url"
                         f" for {p} in [[partners]]), so a cut or rewritten tail goes"
                         f" unnoticed; {ours}")
            continue
        theirs = (f"its checkpoint of {row['their_checkpoint']} entries cosigned"
                  if row["their_checkpoint"] is not None
                  else "none of its checkpoints cosigned yet")
        lines.append(f"witness {p}: its audit log is checked here, {theirs}; {ours}")
        if row.get("refused_checkpoints"):
            lines.append(
                f"PARTNER LOG INCONSISTENT {p}: {row['refused_checkpoints']} of its checkpoints"
                f" refused since the last one cosigned here (newest at {row['last_refused_at']}:"
                f" {row['last_refusal']}); its log was cut or rewritten, or it was restored"
                f" from a backup: settle it with {p}'s operators")
    return lines


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from bridge.ledger import tree
    from bridge.ledger.audit import read_chain
    from bridge.ledger.logcheck import verify_log

    store, config = _open(args)
    with store:
        entries, damaged = read_chain(store.audit_entries)
        own = [note for _, note in tree.own_checkpoints(store)]
        cosigned = [(c, note) for c, _, note in tree.cosigned_checkpoints(store)]
        name = config.controller.id if config else (entries[0].record.actor if entries else "")
        witness = witness_report(config, store) if config else None
    report = verify_log(entries, own, cosigned, name=name,
                        keys_for=_keys_for_config(config) if config else None,
                        damaged=damaged)
    if args.json:
        print_json({
            "ok": report.ok, "entries": report.entries, "head": report.head_hash,
            "root": base64.b64encode(report.root).decode() if report.root else None,
            "checkpoints": report.checkpoints, "cosignatures": report.cosignatures,
            "signatures_checked": report.signatures_checked,
            "first_bad_seq": report.first_bad_seq, "bad_checkpoint": report.bad_checkpoint,
            "reason": report.reason, "witness": witness,
            "partners_inconsistent": witness_inconsistent(witness),
        })
        return 0 if report.ok and not witness_inconsistent(witness) else 1
    _write_verify(report)
    unknown = ("witness: not shown (give --config to see which partners check this log"
               " and which logs this controller checks)")
    for line in witness_lines(witness) if witness is not None else [unknown]:
        sys.stdout.write(line + "\n")
    # A partner's log that failed its check is audit evidence gone wrong as surely as
    # this log's own chain breaking.
    return 0 if report.ok and not witness_inconsistent(witness) else 1


def _write_verify(report: Any) -> None:
    if report.ok:
        sys.stdout.write(f"audit chain verified: {report.entries} entries, head {report.head_hash}\n")
        sys.stdout.write(
            f"audit tree root {base64.b64encode(report.root).decode()}; {report.checkpoints}"
            f" checkpoints and {report.cosignatures} cosignatures match"
            + ("" if report.signatures_checked else " (signatures not checked: give --config)")
            + "\n")
    elif report.bad_checkpoint is None:
        sys.stdout.write(f"audit chain BROKEN at entry {report.first_bad_seq}: {report.reason} "
                         f"({report.entries} entries checked)\n")
    else:
        where = f" (from entry {report.first_bad_seq})" if report.first_bad_seq else ""
        sys.stdout.write(f"audit checkpoint FAILED: {report.bad_checkpoint}{where}:"
                         f" {report.reason}\n")


def _signer_for(config: Any) -> Any:
    from bridge.trust.checkpoint import origin_for, sign_checkpoint
    from bridge.trust.jws import Signer

    signer = Signer.from_files(config.signing.key, config.signing.cert)
    name = config.controller.id

    def sign(size: int, root: bytes, now: datetime) -> str:
        return sign_checkpoint(signer.private_key, name, origin_for(name), size, root, now).note

    return sign


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store, tree

    config = load_config(args.config)
    with open_store(config.store) as store:
        issued = tree.issue_checkpoint(store, _signer_for(config), datetime.now(UTC))
        latest = tree.latest_checkpoint(store)
    if latest is None:
        raise RuntimeFailure("the audit log is empty: nothing to checkpoint",
                             location=str(args.config))
    if args.json:
        print_json({"issued": issued is not None, "size": latest[0], "checkpoint": latest[3]})
        return 0
    sys.stdout.write(latest[3])
    return 0


def cmd_audit_prove(args: argparse.Namespace) -> int:
    from bridge.ledger import merkle, tree
    from bridge.ledger.audit import canonical_bytes
    from bridge.trust.checkpoint import parse_checkpoint

    store, config = _open(args)
    seq = args.seq
    with store:
        if config is not None:
            latest = tree.latest_checkpoint(store)
            if latest is None or latest[0] < seq:
                tree.issue_checkpoint(store, _signer_for(config), datetime.now(UTC))
        covering = [(size, note) for size, note in tree.own_checkpoints(store) if size >= seq]
        _, _, leaves = tree.cache_of(store).sync(store)
        if seq < 1 or seq > len(leaves):
            raise NotFound(f"no audit entry {seq} (the log holds {len(leaves)})",
                           location="--seq")
        if not covering:
            raise RuntimeFailure(f"entry {seq} is not covered by a checkpoint yet; one is issued"
                                 " within 60 s (or give --config to issue it now)",
                                 location="--seq")
        size, note = covering[-1]
        entry = store.audit_entries(since_seq=seq - 1)[0]
    cp = parse_checkpoint(note)
    if size > len(leaves) or merkle.root(leaves[:size]) != cp.root:
        raise RuntimeFailure(f"checkpoint {cp.name} does not match the log: run bridge audit"
                             " verify", location="--seq")
    proof = merkle.inclusion_proof(seq - 1, leaves[:size])
    print_json({
        "checkpoint": note,
        "seq": seq,
        "entry": canonical_bytes(entry.prev_hash, entry.seq, entry.record).decode(),
        "proof": [base64.b64encode(h).decode() for h in proof],
    })
    return 0


def cmd_audit_check_proof(args: argparse.Namespace) -> int:
    from bridge.ledger import merkle
    from bridge.trust.checkpoint import CheckpointError, parse_checkpoint, verify_checkpoint
    from bridge.trust.pki import load_certificate

    path = Path(args.file)
    data = read_input(path, what="proof file (FILE)")
    try:
        doc = orjson.loads(data)
        note, seq, entry, proof_text = doc["checkpoint"], doc["seq"], doc["entry"], doc["proof"]
        proof = [base64.b64decode(p, validate=True) for p in proof_text]
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error):
        raise ParseError("not an inclusion proof (checkpoint, seq, entry, proof)",
                         location=str(path)) from None
    if not isinstance(seq, int) or not isinstance(entry, str) or not isinstance(note, str):
        raise ParseError("seq must be a number, entry and checkpoint text", location=str(path))
    origin_name = parse_checkpoint(note).origin.rsplit("/", 1)[-1]
    key = load_certificate(Path(args.cert)).public_key()
    try:
        cp = verify_checkpoint(note, origin_name, [key])  # type: ignore[list-item]
    except CheckpointError as exc:
        sys.stdout.write(f"proof FAILED: {exc} ({exc.location})\n")
        return 1
    try:
        stated = orjson.loads(entry).get("seq")
    except (orjson.JSONDecodeError, AttributeError):
        raise ParseError("entry is not an audit entry (a JSON object)",
                         location=f"{path} $.entry") from None
    if stated != seq:
        sys.stdout.write(f"proof FAILED: the entry is not entry {seq}\n")
        return 1
    leaf = merkle.leaf_hash(hashlib.sha256(entry.encode()).digest())
    if not merkle.verify_inclusion(seq - 1, cp.size, leaf, proof, cp.root):
        sys.stdout.write(f"proof FAILED: entry {seq} is not in checkpoint {cp.name}\n")
        return 1
    sys.stdout.write(f"entry {seq} is in checkpoint {cp.name}, signed by {origin_name}\n")
    return 0


_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_EXPORT, _IMPORT = ("110106", "Export"), ("110107", "Import")
_RECORD, _ACTIVITY = ("110110", "Patient Record"), ("110100", "Application Activity")

#: Each audited action as a BALP AuditEvent: (DICOM event type, AuditEvent.action, this
#: controller's role, what the entry records). Disclosures are exports from the source
#: (the signed receipt held is action R, as BALP's export pattern), what arrives from a
#: partner an import at the destination; consent changes and operators' reads are
#: patient-record events. Actions not listed are application activity.
_BALP: dict[str, tuple[tuple[str, str], str, str, str]] = {
    "consent.put": (_RECORD, "U", "source", "consent registered, amended or revoked"),
    "claim.enqueue": (_EXPORT, "C", "source", "claim queued for disclosure"),
    "claim.refused": (_EXPORT, "E", "source", "disclosure refused"),
    "claim.ack": (_EXPORT, "R", "source", "disclosed; the recipient's signed receipt is held"),
    "claim.rejected": (_EXPORT, "E", "source", "the recipient refused the claim"),
    "claim.dead": (_EXPORT, "E", "source", "delivery abandoned"),
    "claim.resend": (_EXPORT, "R", "source", "sent again; the recipient's receipt is held"),
    "claim.correct": (_EXPORT, "C", "source",
                      "corrected claim queued, naming the claim it replaces"),
    "message.receive": (_IMPORT, "C", "destination", "received from a partner"),
    "handoff.delivered": (_EXPORT, "E", "source", "handed to this controller's own system"),
    "handoff.dead": (_EXPORT, "E", "source",
                     "hand-off to this controller's own system abandoned"),
    "handoff.requeue": (_EXPORT, "E", "source", "hand-off requeued by an operator"),
    "inbox.show": (_RECORD, "R", "source", "read by an operator"),
    "inbox.export": (_RECORD, "R", "source", "exported by an operator"),
    "record.pull": (_EXPORT, "R", "source", "records released to (or refused) a partner's pull"),
    "record.pull.receive": (_IMPORT, "C", "destination",
                            "records pulled from a partner; its signed page is held"),
}
_ROLE = {"source": ("110153", "Source Role ID"), "destination": ("110152", "Destination Role ID")}


def balp_event(entry: Any, controller: str) -> dict[str, Any]:
    """One audit entry as an IHE BALP-style FHIR R4 AuditEvent (``bridge audit export
    --fhir`` and ``bridge audit disclosures --fhir`` alike).

    A disclosure at the source (``claim.ack``) is a DICOM *Export* with this controller
    in the source role; its receipt at the recipient (``message.receive``) an *Import*
    with the recipient in the destination role. Both name the message identity as an
    entity (system ``urn:ietf:rfc:3986``), so the two sides' events pair up by it; the
    entry's sequence number and hash ride in ``entity.detail``. The patient is a Person
    entity by keyed pseudonym. Ids, codes and pseudonyms only, never values.
    """
    import uuid

    record = entry.record
    (code, display), action, role, text = _BALP.get(
        record.action, (_ACTIVITY, "E", "source", record.action))
    party = {"system": "urn:ws-fhir-bridge:partner", "value": controller}
    other_role = "destination" if role == "source" else "source"
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": _DCM, "code": _ROLE[role][0],
                             "display": _ROLE[role][1]}]},
        "who": {"identifier": party}, "requestor": record.operator is None,
    }]
    if record.partner:
        agents.append({
            "type": {"coding": [{"system": _DCM, "code": _ROLE[other_role][0],
                                 "display": _ROLE[other_role][1]}]},
            "who": {"identifier": {"system": "urn:ws-fhir-bridge:partner",
                                   "value": record.partner}},
            "requestor": False,
        })
    if record.operator:
        agents.append({"who": {"identifier": {"system": "urn:ws-fhir-bridge:operator",
                                              "value": record.operator}},
                       "requestor": True})
    entities: list[dict[str, Any]] = [{
        "what": {"identifier": {"system": "urn:ietf:rfc:3986" if record.subject.startswith(
            "urn:") else "urn:ws-fhir-bridge:subject", "value": record.subject}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                 "code": "2", "display": "System Object"},
        "detail": [{"type": "audit-seq", "valueString": str(entry.seq)},
                   {"type": "audit-hash", "valueString": entry.hash}]
        + ([{"type": "digest", "valueString": record.digest}] if record.digest else []),
    }]
    if record.patient:
        entities.append({
            "what": {"identifier": {"system": "urn:ws-fhir-bridge:patient-pseudonym",
                                    "value": record.patient}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                     "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "1", "display": "Patient"},
        })
    return {
        "resourceType": "AuditEvent",
        "id": uuid5_text(uuid.NAMESPACE_URL, f"urn:ws-fhir-bridge:audit:{controller}:"
                                             f"{entry.seq}"),
        "type": {"system": _DCM, "code": code, "display": display},
        "subtype": [{"system": "urn:ws-fhir-bridge:audit-action", "code": record.action,
                     "display": text}],
        "action": action,
        "recorded": record.time.isoformat(),
        "outcome": {"success": "0", "failure": "8", "denied": "4"}[record.outcome],
        "outcomeDesc": text + (f" ({record.detail})" if record.detail else ""),
        "agent": agents,
        "source": {"observer": {"identifier": party},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                       "security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": entities,
    }


def cmd_audit_export(args: argparse.Namespace) -> int:
    from bridge.records.fhir import validate_resource

    if not args.fhir:
        raise UsageError("only --fhir export is offered", location="--fhir")
    out = output_file(args.out, option="--out") if args.out else None
    store, config = _open(args)
    with store:
        entries = store.audit_entries(since_seq=args.since)
        controller = config.controller.id if config else (
            entries[0].record.actor if entries else "")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
    if entries:  # FHIR JSON has no empty array: nothing to export, no entry
        bundle["entry"] = [{"fullUrl": f"urn:uuid:{ev['id']}", "resource": ev}
                           for ev in (balp_event(e, controller) for e in entries)]
    validate_resource(bundle)
    data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2) + b"\n"
    if out is not None:
        from bridge.files import write_private

        write_private(out, data)
        sys.stdout.write(f"{len(entries)} AuditEvents written to {args.out}\n")
    else:
        sys.stdout.write(data.decode())
    return 0


def add_audit_commands(asub: Any) -> None:
    """Add ``checkpoint``, ``prove`` and ``check-proof`` to ``bridge audit``."""
    c = asub.add_parser("checkpoint", help="sign a checkpoint of the audit log now and print it")
    c.add_argument("--config", required=True, help=_CONFIG_HELP)
    add_json_option(c)
    c.set_defaults(func=cmd_audit_checkpoint)
    p = asub.add_parser("prove", help="entry N with an inclusion proof under a signed checkpoint")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help=_CONFIG_HELP + " (issues a checkpoint if none covers N)")
    g.add_argument("--store", help="path of a SQLite store file")
    p.add_argument("--seq", type=int, required=True, help="the audit entry number")
    p.set_defaults(func=cmd_audit_prove)
    k = asub.add_parser("check-proof", help="check a proof from 'audit prove' with the"
                                            " controller's signing certificate alone")
    k.add_argument("file", help="the JSON printed by 'bridge audit prove'")
    k.add_argument("--cert", required=True, help="the controller's signing certificate (PEM)")
    k.set_defaults(func=cmd_audit_check_proof)
    e = asub.add_parser("export", help="the audit log as IHE BALP-style FHIR R4 AuditEvents")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help=_CONFIG_HELP)
    g.add_argument("--store", help="path of a SQLite store file")
    e.add_argument("--fhir", action="store_true", help="a Bundle of FHIR R4 AuditEvent")
    e.add_argument("--since", type=int, default=0, help="only entries after this number")
    e.add_argument("--out", help="write to this file (owner-only) instead of standard output")
    e.set_defaults(func=cmd_audit_export)
