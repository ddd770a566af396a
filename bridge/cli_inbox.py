"""Command line for received claims: ``bridge inbox list|show|export|requeue``.

``list`` shows identities, senders, times and hand-off states only. Health data (the
signed message, the receipt, a destination's answer) is printed only by ``show`` and
written only by ``export``, each read recorded in the audit trail.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, time
from typing import IO, Any

import orjson

from bridge.cli_common import add_json_option, non_negative_int, output_folder
from bridge.cli_common import print_json as _print_json
from bridge.errors import ConfigError, NotFound, ParseError, UsageError
from bridge.files import private_folder, write_private

_STATES = ("queued", "sending", "delivered", "dead")
_CONFIG_HELP = "the controller's configuration file (TOML)"


def _when(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 date or date-time; without a zone it is UTC."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
        # In UTC here, where an instant beyond year 1 or 9999 in UTC is still an input
        # error (the store compares UTC times).
        return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
                ).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ParseError("not an ISO 8601 date or date-time between years 1 and 9999 UTC",
                         location=option) from None


def _open(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The configuration, the store and the command's filter (checked before the store
    is opened: bad input is named as such whatever state the store is in)."""
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    f = _filter(args, config)
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    store = open_store(config.store)
    if f.destination is not None and f.destination not in {d.id for d in config.handoff}:
        # A destination since removed from the configuration may still hold claims.
        from bridge.ledger.handoff import destinations_held

        try:
            held = destinations_held(store)
        except BaseException:
            store.close()
            raise
        if f.destination not in held:
            store.close()
            raise ConfigError("no hand-off destination with that id, configured or"
                              " holding claims in the store",
                              location=f"{config.source}: handoff")
    return config, store, f


def _filter(args: argparse.Namespace, config: Any) -> Any:
    from bridge.ledger.handoff import Filter

    return Filter(
        sender=getattr(args, "sender", None),
        message_id=getattr(args, "message_id", None),
        destination=getattr(args, "destination", None),
        state=getattr(args, "state", None),
        since=_when(getattr(args, "since", None), "--since"),
        until=_when(getattr(args, "until", None), "--until"),
    )


def _handoff_json(row: Any) -> dict[str, Any]:
    return {
        "destination": row.destination,
        "state": row.state.value,
        "sequence": row.seq,
        "attempts": row.attempts,
        "lastError": row.last_error,
        "nextAttempt": row.next_attempt.isoformat() if row.state == "queued" else None,
        "delivered": row.delivered.isoformat() if row.delivered else None,
    }


def _entry_json(entry: Any) -> dict[str, Any]:
    return {
        "sender": entry.sender,
        "messageId": entry.message_id,
        "received": entry.received.isoformat(),
        "auditSeq": entry.audit_seq,
        "digest": entry.digest,
        "handoffs": [_handoff_json(h) for h in entry.handoffs],
    }


# --- list -------------------------------------------------------------------------------


def cmd_inbox_list(args: argparse.Namespace) -> int:
    from bridge.ledger.handoff import list_inbox

    _config, store, f = _open(args)
    with store:
        entries = list_inbox(store, f, limit=args.limit)
    if args.json:
        _print_json([_entry_json(e) for e in entries])
        return 0
    for e in entries:
        states = " ".join(
            f"{h.destination}={h.state.value}" + (f"({h.last_error})" if h.last_error else "")
            for h in e.handoffs
        )
        sys.stdout.write(
            f"{e.received.isoformat(timespec='seconds')}\t{e.sender}\t{e.message_id}"
            f"\t{states or 'no hand-off'}\n"
        )
    return 0


# --- show / export: the only ways health data leaves the store by hand ---------------------


def _pseudonym(config: Any, payload: bytes) -> str | None:
    from bridge.ledger.audit import patient_pseudonym
    from bridge.link.node import _identifier_rank, _load_pseudonym_key
    from bridge.mapping import patient_identifiers

    try:
        ids = patient_identifiers(orjson.loads(payload))
    except Exception:  # noqa: BLE001 - the audit entry then names no patient
        return None
    if not ids:
        return None
    system, value = min(ids, key=_identifier_rank)
    return patient_pseudonym(_load_pseudonym_key(config.audit.pseudonym_key_file), system, value)


def _audit_read(store: Any, config: Any, action: str, rows: list[Any], detail: str) -> None:
    """Record that an operator read these claims' content (one entry per claim)."""
    from bridge.ledger.audit import AuditRecord

    now = datetime.now(UTC)
    with store.transaction(action) as tx:
        for row in rows:
            tx.append_audit(AuditRecord(
                time=now, actor=config.controller.id, action=action, subject=row.message_id,
                partner=row.sender, patient=_pseudonym(config, row.payload), detail=detail,
                digest=row.digest,
            ))


def _find_one(store: Any, args: argparse.Namespace) -> Any:
    from bridge.ledger.handoff import Filter, list_inbox

    entries = list_inbox(store, Filter(sender=args.sender, message_id=args.message_id), limit=2)
    if not entries:
        raise NotFound("no such message in the inbox", location=args.message_id)
    if len(entries) > 1:
        raise UsageError("several senders used this message identity; name one with --sender",
                         location="--sender")
    return entries[0]


def cmd_inbox_show(args: argparse.Namespace) -> int:
    from bridge.ledger.handoff import last_answer

    config, store, _f = _open(args)
    with store:
        entry = _find_one(store, args)
        row = store.inbox_lookup(entry.sender, entry.message_id)
        answers = {h.destination: last_answer(store, h.id) for h in entry.handoffs}
        _audit_read(store, config, "inbox.show", [row], "cli show")
    message, receipt = orjson.loads(row.payload), orjson.loads(row.receipt)
    if args.json:
        doc = _entry_json(entry)
        for h in doc["handoffs"]:
            answer = answers.get(h["destination"])
            h["lastAnswer"] = answer.decode("utf-8", "replace") if answer else None
        _print_json({**doc, "message": message, "receipt": receipt})
        return 0
    out = sys.stdout
    out.write(f"message {entry.message_id} from {entry.sender}\n")
    out.write(f"received {entry.received.isoformat()}, audit entry {entry.audit_seq},"
              f" digest {entry.digest}\n")
    for h in entry.handoffs:
        out.write(f"hand-off {h.destination}: {h.state.value}, sequence {h.seq},"
                  f" attempts {h.attempts}" + (f", {h.last_error}" if h.last_error else "")
                  + "\n")
        answer = answers.get(h.destination)
        if answer:
            out.write("  last answer: " + answer.decode("utf-8", "replace").replace(
                "\n", "\n  ") + "\n")
    out.write("--- message\n")
    _print_json(message)
    out.write("--- receipt\n")
    _print_json(receipt)
    return 0


def cmd_inbox_export(args: argparse.Namespace) -> int:
    from bridge.handoff import EnvelopeFacts, build_envelope, receipt_digest
    from bridge.ledger.audit import format_time
    from bridge.ledger.handoff import list_inbox

    target = output_folder(args.to, option="--to") if args.to else None
    config, store, f = _open(args)
    if target is not None:
        private_folder(target)
    count = 0
    with store:
        entries = list_inbox(store, f, limit=args.limit)
        rows = [store.inbox_lookup(e.sender, e.message_id) for e in entries]
        rows = [r for r in rows if r is not None]
        _audit_read(store, config, "inbox.export", rows,
                    f"cli export to {'folder' if target else 'stdout'}")
    inbound = {link.partner: link.id for link in reversed(config.links)
               if link.direction == "inbound"}
    for entry, row in zip(entries, rows, strict=True):
        facts = EnvelopeFacts(
            destination="export", receiver=config.controller.id, sender=row.sender,
            link=next((h.link for h in entry.handoffs), inbound.get(row.sender, "")),
            message_id=row.message_id,
            sequence=0, received=format_time(row.received), audit_seq=row.audit_seq,
            message_digest=row.digest, receipt_digest=receipt_digest(row.receipt),
        )
        body = build_envelope(facts, row.payload, row.receipt)
        if target is None:
            sys.stdout.buffer.write(body + b"\n")
        else:
            name = f"{row.sender}_{row.message_id.removeprefix('urn:uuid:')}.json"
            write_private(target / _safe(name), body)
        count += 1
    if target is not None:
        sys.stderr.write(f"{count} messages written to {target}\n")
    else:
        sys.stdout.flush()
    return 0


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


# --- requeue ----------------------------------------------------------------------------------


def cmd_inbox_requeue(args: argparse.Namespace) -> int:
    from bridge.handoff import HandoffState, Route
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.handoff import queue_missing, requeue

    config, store, f = _open(args)
    now = datetime.now(UTC)
    me = config.controller.id
    states = [HandoffState.DEAD] + ([HandoffState.DELIVERED] if args.delivered else [])
    inbound = {link.partner: link.id for link in reversed(config.links)
               if link.direction == "inbound"}
    with store:
        rows = requeue(
            store, f, now=now, states=states,
            audit=lambda r: AuditRecord(time=now, actor=me, action="handoff.requeue",
                                        subject=r.message_id, partner=r.sender,
                                        detail=f"{r.destination} seq {r.seq} from {r.state}"),
        )
        added = 0
        if args.missing:
            for dest in config.handoff:
                if f.destination is not None and dest.id != f.destination:
                    continue
                def queued(sender: str, mid: str, d: str = dest.id) -> AuditRecord:
                    return AuditRecord(time=now, actor=me, action="handoff.queue", subject=mid,
                                       partner=sender, detail=f"{d} queued by operator")

                added += queue_missing(
                    store, Route(dest.id, frozenset(dest.senders), frozenset(dest.links)), f,
                    now=now, link_for=lambda sender: inbound.get(sender, ""), audit=queued,
                )
    if args.json:
        # Each hand-off as it is now (queued, due at once), with the state it was taken
        # from; ``queued`` counts those queued by --missing, ``requeuedCount`` the others.
        _print_json({"requeued": [_handoff_json(r) | {
                         "sender": r.sender, "messageId": r.message_id,
                         "state": "queued", "requeuedFrom": r.state.value,
                         "nextAttempt": now.isoformat()} for r in rows],
                     "requeuedCount": len(rows), "queued": added})
    else:
        for r in rows:
            sys.stdout.write(f"requeued {r.destination} seq {r.seq} from {r.sender}"
                             f" ({r.state.value}): {r.message_id}\n")
        sys.stdout.write(f"{len(rows)} hand-offs requeued"
                         + (f", {added} claims queued that had none" if args.missing else "")
                         + "; a running bridge serve hands them over now\n")
    return 0


# --- status -----------------------------------------------------------------------------------


def handoff_report(config: Any, store: Any) -> list[dict[str, Any]]:
    """Per destination: depth, delivered, dead hand-offs (a few named), whether it is
    failing right now, and whether an operator is needed (something dead or failing)."""
    from bridge.ledger.handoff import destination_status, destinations_held

    report: list[dict[str, Any]] = []
    configured = {dest.id: dest.kind for dest in config.handoff}
    stranded = [d for d in destinations_held(store) if d not in configured]
    for dest_id, kind in [*configured.items(), *((d, None) for d in stranded)]:
        s = destination_status(store, dest_id)
        failing = s.failing
        waiting = s.counts["queued"] + s.counts["sending"]
        report.append({
            "id": dest_id,
            "kind": kind,
            # Not configured (renamed or removed): its claims are handed to no one.
            "configured": kind is not None,
            "counts": dict(s.counts),
            "waiting": waiting,
            "oldest_waiting_since": (s.oldest_waiting.created.isoformat()
                                     if s.oldest_waiting is not None else None),
            "failing": None if failing is None else {
                "error": failing.last_error, "attempts": failing.attempts,
                "seq": failing.seq, "sender": failing.sender,
                "message_id": failing.message_id,
            },
            "dead": [{"seq": r.seq, "sender": r.sender, "error": r.last_error,
                      "message_id": r.message_id} for r in s.dead],
            "needs_operator": failing is not None or s.counts["dead"] > 0
            or (kind is None and waiting > 0),
        })
    return report


def print_handoff_status(report: list[dict[str, Any]], out: IO[str]) -> None:
    """The text form of :func:`handoff_report` for ``bridge status``."""
    for d in report:
        counts = d["counts"]
        kind = d["kind"] if d["configured"] else "no longer configured"
        line = (f"  hand-off {d['id']} ({kind}): waiting {d['waiting']},"
                f" delivered {counts['delivered']}, dead {counts['dead']}")
        if d["oldest_waiting_since"] is not None:
            line += f"; oldest waiting since {d['oldest_waiting_since'][:19]}"
        out.write(line + "\n")
        if not d["configured"] and d["waiting"]:
            out.write("    NOT HANDED OVER: no [[handoff]] has this id any more; configure it"
                      " again, or give its claims to another destination with"
                      " bridge inbox requeue --missing --destination ID\n")
        f = d["failing"]
        if f is not None:
            out.write(f"    FAILING: {f['error']} after {f['attempts']} attempts"
                      f" (seq {f['seq']} from {f['sender']}); retrying with backoff\n")
        for row in d["dead"]:
            out.write(f"    dead seq {row['seq']} from {row['sender']} ({row['error'] or '-'}):"
                      f" {row['message_id']}\n")
        if counts["dead"] > len(d["dead"]):
            out.write(f"    ... and {counts['dead'] - len(d['dead'])} more dead;"
                      " bridge inbox list --state dead\n")


def add_inbox_commands(sub: Any) -> None:
    """Register ``bridge inbox ...`` on the top-level subparsers."""
    p = sub.add_parser("inbox", help="received claims and their hand-off to this controller's"
                       " own systems")
    isub = p.add_subparsers(dest="inbox_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser, *, state: bool = True) -> None:
        q.add_argument("--config", required=True, help=_CONFIG_HELP)
        q.add_argument("--sender", help="only claims from this partner id")
        q.add_argument("--destination", help="only hand-offs to this destination id")
        if state:
            q.add_argument("--state", choices=_STATES, help="only claims with a hand-off in"
                           " this state")
        q.add_argument("--since", help="received at or after (ISO 8601; UTC without a zone)")
        q.add_argument("--until", help="received before (ISO 8601; UTC without a zone)")

    ls = isub.add_parser("list", help="received claims with their hand-off states (no content)")
    common(ls)
    ls.add_argument("--limit", type=non_negative_int, default=100,
                    help="at most this many (default 100)")
    add_json_option(ls)
    ls.set_defaults(func=cmd_inbox_list)

    sh = isub.add_parser("show", help="print one stored message and its receipt (audited)")
    sh.add_argument("--config", required=True, help=_CONFIG_HELP)
    sh.add_argument("--sender", help="the sender, when several used this message identity")
    sh.add_argument("message_id", help="the message identity (urn:uuid:...)")
    add_json_option(sh)
    sh.set_defaults(func=cmd_inbox_show)

    ex = isub.add_parser("export", help="write stored messages with their receipts as hand-off"
                         " envelopes to a folder or stdout (audited)")
    common(ex)
    ex.add_argument("--message-id", help="only this message identity")
    ex.add_argument("--to", help="folder to write one file per claim (default: stdout, one"
                    " envelope per line)")
    ex.add_argument("--limit", type=non_negative_int, default=1000,
                    help="at most this many (default 1000)")
    ex.set_defaults(func=cmd_inbox_export)

    rq = isub.add_parser("requeue", help="hand dead (or, with --delivered, delivered) claims"
                         " over again")
    common(rq, state=False)
    rq.add_argument("--message-id", help="only this message identity")
    rq.add_argument("--delivered", action="store_true",
                    help="also hand over again claims the destination already took")
    rq.add_argument("--missing", action="store_true",
                    help="also queue stored claims that have no hand-off to a destination yet"
                    " (received before it was configured)")
    add_json_option(rq)
    rq.set_defaults(func=cmd_inbox_requeue, state=None)


__all__ = ["add_inbox_commands", "handoff_report", "print_handoff_status"]
