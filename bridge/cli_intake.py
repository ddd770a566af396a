"""Command line for HL7 v2 intake: ``bridge intake list|visits|show|retry``.

What the HIS sent and what became of it: every record intake keeps (a message's own
record, or a visit assembled from several), its routing state and where it went, and
the visits with their parts. Health data is shown only by ``show --record``. ``retry``
puts refused or unrouted records back to be routed again, under the consents and
routing rules in effect now.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.cli_common import add_json_option
from bridge.cli_common import print_json as _print_json
from bridge.errors import NotFound, UsageError


def _store(args: argparse.Namespace) -> Any:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    return open_store(config.store)


def cmd_intake_list(args: argparse.Namespace) -> int:
    """Records by routing state: routed, unrouted (no rule matches), refused, incomplete."""
    from bridge.ledger import intake as intake_db

    with _store(args) as store:
        rows = intake_db.list_records(store, state=args.state, limit=args.limit)
        sent = {r.id: intake_db.deliveries(store, r.id) for r in rows}
        counts = intake_db.record_counts(store)
    items: list[dict[str, Any]] = [{"id": r.id, "source": r.source, "kind": r.kind, "message_type": r.message_type,
              "dataset": r.dataset, "facility": r.facility, "state": r.state,
              "detail": r.detail, "updated": r.updated,
              "deliveries": [{"link": d.link, "revision": d.revision, "state": d.state,
                              "message_id": d.message_id, "replaces": d.replaces,
                              "detail": d.detail} for d in sent[r.id]]} for r in rows]
    if args.json:
        _print_json({"counts": counts, "records": items})
        return 0
    sys.stdout.write(", ".join(f"{state} {n}" for state, n in sorted(counts.items()))
                     or "no records")
    sys.stdout.write("\n")
    for item in items:
        links = ", ".join(f"{d['link']}#{d['revision']} {d['state']}" for d in item["deliveries"])
        sys.stdout.write(f"{item['id']}\t{item['state']}\t{item['message_type']}\t"
                         f"{item['dataset']}\t{item['facility']}\t{item['source']}\t"
                         f"{links or '-'}\t{item['detail'] or ''}\n")
    return 0


def cmd_intake_visits(args: argparse.Namespace) -> int:
    """Visits with their parts, whether complete, and the state of their record."""
    from bridge.ledger import intake as intake_db

    with _store(args) as store:
        visits = intake_db.list_visits(store, limit=args.limit)
        states = {r.source: r for r in intake_db.list_records(store, limit=100_000)
                  if r.kind == "visit"}
    items = []
    for v in visits:
        row = states.get(f"visit:{v.id}")
        items.append({"id": v.id, "kind": v.kind, "facility": v.facility,
                      "number": v.summary.number, "parts": v.parts, "completed": v.completed,
                      "admitted": v.summary.admitted, "discharged": v.summary.discharged,
                      "state": row.state if row else "held",
                      "detail": row.detail if row else None})
    if args.json:
        _print_json(items)
        return 0
    for item in items:
        sys.stdout.write(f"{item['id']}\t{item['kind']}\t{item['facility']}\t{item['number']}\t"
                         f"parts {item['parts']}\t{'complete' if item['completed'] else 'open'}"
                         f"\t{item['state']}\t{item['detail'] or ''}\n")
    return 0


def cmd_intake_show(args: argparse.Namespace) -> int:
    """One record: where it came from, where it went (and, with --record, its content)."""
    from bridge.ledger import intake as intake_db

    with _store(args) as store:
        rows = [r for r in intake_db.list_records(store, limit=1_000_000)
                if str(r.id) == args.record or r.source == args.record]
        if not rows:
            raise NotFound("no such intake record", location=args.record)
        row = rows[0]
        sent = intake_db.deliveries(store, row.id)
        body = intake_db.record_of(store, row.id) if args.record_content else None
    item: dict[str, Any] = {
        "id": row.id, "source": row.source, "kind": row.kind,
        "message_type": row.message_type, "dataset": row.dataset, "facility": row.facility,
        "state": row.state, "detail": row.detail, "created": row.created,
        "updated": row.updated,
        "deliveries": [d.__dict__ for d in sent]}
    if body:
        item["record"] = orjson.loads(body)
    _print_json(item)
    return 0


def cmd_intake_retry(args: argparse.Namespace) -> int:
    """Put refused or unrouted records back to be routed again (audited, one by one)."""
    from bridge.compliance.operators import acting_operator
    from bridge.config import load_config
    from bridge.ledger import intake as intake_db
    from bridge.ledger.audit import AuditRecord

    states = tuple(s for s, chosen in (("refused", args.all_refused),
                                       ("unrouted", args.all_unrouted)) if chosen)
    if not args.records and not states:
        raise UsageError("name records, or give --all-refused or --all-unrouted",
                         location="bridge intake retry")
    config = load_config(args.config)
    now = datetime.now(UTC)
    operator = acting_operator()

    key = b""  # the bridge's label key, read once the store is found

    def audit(row: intake_db.RecordRow) -> AuditRecord:
        return AuditRecord(time=now, actor=config.controller.id, action="intake.retry",
                           subject=row.label(key), categories=[row.dataset],
                           outcome="success", detail=f"from {row.state}", operator=operator)

    with _store(args) as store:
        # Records are named in the audit trail under the bridge's key (there is a store,
        # so the bridge has run and made it).
        key = _label_key(config)
        rows = intake_db.retry(store, records=list(args.records), states=states, now=now,
                               audit=audit)
    if args.json:
        _print_json({"retried": [{"id": r.id, "source": r.source, "was": r.state}
                                 for r in rows]})
        return 0
    for r in rows:
        sys.stdout.write(f"{r.id}\t{r.source}\twas {r.state}\n")
    sys.stdout.write(f"{len(rows)} record(s) put back to be routed; a running bridge serve "
                     "routes them now (bridge intake list shows the outcome)\n")
    return 0


def _label_key(config: Any) -> bytes:
    """The key this bridge's logs and audit entries name sender text under."""
    from bridge.link.node import _load_pseudonym_key
    from bridge.mapping.hl7v2.header import label_key_of

    return label_key_of(_load_pseudonym_key(config.audit.pseudonym_key_file))


def cmd_intake_label(args: argparse.Namespace) -> int:
    """How this bridge's logs and audit entries name an HIS's MSH field (MSH-3, MSH-4,
    MSH-10): as sent when it is a plain id, else ``#`` and a digest keyed with the
    bridge's own key, which only this command can work out from the text."""
    from bridge.config import load_config
    from bridge.mapping.hl7v2.header import id_label

    config = load_config(args.config)
    if not config.audit.pseudonym_key_file.exists():
        # A key made here would name nothing the bridge wrote.
        raise NotFound("no audit pseudonym key yet: the bridge makes it when it first starts",
                       location="audit.pseudonym_key_file")
    key = _label_key(config)
    labels = [id_label(text, key) for text in args.texts]
    if args.json:
        _print_json([{"label": label} for label in labels])
        return 0
    for label in labels:
        sys.stdout.write(f"{label}\n")
    return 0


def add_intake_commands(sub: Any) -> None:
    """Register ``bridge intake`` on the main parser's subcommands."""
    p = sub.add_parser("intake", help="HL7 v2 intake: records, visits and where they went")
    isub = p.add_subparsers(dest="intake_command", required=True)
    ls = isub.add_parser("list", help="records by routing state (routed, unrouted, refused, "
                         "incomplete, held, pending)")
    ls.add_argument("--config", required=True, help="the controller's configuration file")
    ls.add_argument("--state", choices=["held", "pending", "routed", "unrouted", "refused",
                                        "incomplete"], help="only records in this state")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (newest first)")
    add_json_option(ls)
    ls.set_defaults(func=cmd_intake_list)
    vs = isub.add_parser("visits", help="visits being assembled, and their records")
    vs.add_argument("--config", required=True, help="the controller's configuration file")
    vs.add_argument("--limit", type=int, default=100, help="at most this many (newest first)")
    add_json_option(vs)
    vs.set_defaults(func=cmd_intake_visits)
    sh = isub.add_parser("show", help="one record and its deliveries (JSON)")
    sh.add_argument("--config", required=True, help="the controller's configuration file")
    sh.add_argument("--record", dest="record_content", action="store_true",
                    help="include the record itself (health data)")
    sh.add_argument("record", help="the record's id or source (visit:12, hl7:SENDER/ID)")
    sh.set_defaults(func=cmd_intake_show)
    rt = isub.add_parser("retry", help="route refused or unrouted records again, under the "
                         "consents and routing rules in effect now (audited)")
    rt.add_argument("--config", required=True, help="the controller's configuration file")
    rt.add_argument("records", nargs="*", metavar="RECORD",
                    help="a record's id or source (visit:12, hl7:SENDER/ID)")
    rt.add_argument("--all-refused", action="store_true", help="every refused record")
    rt.add_argument("--all-unrouted", action="store_true", help="every unrouted record")
    add_json_option(rt)
    rt.set_defaults(func=cmd_intake_retry)
    lb = isub.add_parser("label", help="how logs and audit entries name an HIS's MSH-3, "
                         "MSH-4 or MSH-10 (a keyed digest unless it is a plain id)")
    lb.add_argument("--config", required=True, help="the controller's configuration file")
    lb.add_argument("texts", nargs="+", metavar="TEXT",
                    help="a field as the HIS sent it (MSH-10: MSG00001)")
    add_json_option(lb)
    lb.set_defaults(func=cmd_intake_label)


__all__ = ["add_intake_commands"]
