"""Command line for the claims waiting to be sent: ``bridge outbox list|requeue``.

``list`` shows identities, sequence numbers, states, reasons and the partner's last
answer: no payload, no receipt, no health data. ``requeue`` puts dead-lettered (or
rejected) claims back in the queue with the same identity, so a partner that did
hold one answers with its original receipt; each requeue is audited with the
operator's name. A running bridge picks requeued claims up on its next poll.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from bridge.cli_common import add_json_option, non_negative_int
from bridge.cli_common import print_json as _print_json
from bridge.errors import ConfigError, NotFound, UsageError

_STATES = ("queued", "sending", "acked", "rejected", "dead", "refused")
_REQUEUEABLE = ("dead", "rejected")
_CONFIG_HELP = "the controller's configuration file (TOML)"


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    link = getattr(args, "link", None)
    if link is not None and link not in {
        lk.id for lk in config.links if lk.direction == "outbound"
    }:
        raise ConfigError(
            "no outbound link with this id in the configuration", location=f"--link {link}"
        )
    if config.store.kind == "sqlite" and not config.store.path.exists():
        raise NotFound("no store at this path yet", location=str(config.store.path))
    return config, open_store(config.store)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from bridge.ledger.delivery import list_claims

    _config, store = _open(args)
    with store:
        claims = list_claims(
            store, link=args.link, states=tuple(args.state or ()) or None, limit=args.limit or None
        )
    now = datetime.now(UTC)
    if args.json:
        _print_json([c.to_json(now) for c in claims])
        return 0
    for c in claims:
        sys.stdout.write(
            f"{c.link}\t{c.seq}\t{c.state}\t{_age(c.age_seconds(now))}\tattempts {c.attempts}"
            f"\t{c.last_error or '-'}\t{c.last_answer or '-'}"
            f"{chr(9) + 'fate-unknown' if c.fate_unknown else ''}\t{c.message_id}\n"
        )
    if not claims:
        sys.stderr.write("no claims match\n")
    return 0


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    from bridge.cli_inbox import _when

    return _when(text, "--since")


def cmd_outbox_requeue(args: argparse.Namespace) -> int:
    from bridge.compliance.operators import acting_operator
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.delivery import list_claims

    if not args.id and args.state is None:
        raise UsageError(
            "name the claims: --id ID (repeatable) or --state dead|rejected",
            location="bridge outbox requeue",
        )
    since = _since(args.since)
    config, store = _open(args)
    now = datetime.now(UTC)
    done: list[dict[str, Any]] = []
    with store:
        if args.id:
            chosen = []
            for mid in args.id:
                row = store.get_outbox(mid)
                if row is None:
                    raise NotFound("no such claim in the outbox", location=f"--id {mid}")
                if row.state.value not in _REQUEUEABLE:
                    raise UsageError(
                        f"only dead or rejected claims are requeued; this one is {row.state.value}",
                        location=f"--id {mid}",
                    )
                chosen.append((row.message_id, row.link, row.partner, row.seq))
        else:
            claims = list_claims(store, link=args.link, states=(args.state,))
            chosen = [
                (c.message_id, c.link, c.partner, c.seq)
                for c in claims
                if since is None or c.updated >= since
            ]
        operator = acting_operator()
        for mid, link, partner, seq in chosen:
            store.requeue(
                mid,
                now=now,
                audit=AuditRecord(
                    time=now,
                    actor=config.controller.id,
                    action="claim.requeue",
                    subject=mid,
                    partner=partner,
                    outcome="success",
                    operator=operator,
                    detail=f"cli; link {link} seq {seq}",
                ),
            )
            done.append({"message_id": mid, "link": link, "seq": seq})
    if args.json:
        _print_json({"requeued": done, "operator": operator})
        return 0
    for item in done:
        sys.stdout.write(f"requeued {item['link']} seq {item['seq']}: {item['message_id']}\n")
    sys.stderr.write(
        f"{len(done)} claims requeued"
        + (f" by {operator}" if operator else "")
        + "; a running bridge sends them on its next poll\n"
    )
    return 0


def add_outbox_commands(outbox: argparse.ArgumentParser) -> None:
    """``list`` and ``requeue`` under the existing ``bridge outbox`` command."""
    sub = outbox.add_subparsers(dest="outbox_command", metavar="{list,requeue}")
    ls = sub.add_parser("list", help="claims by link and state, with reason, last answer, age")
    ls.add_argument("--config", required=True, help=_CONFIG_HELP)
    ls.add_argument("--link", help="only this outbound link")
    ls.add_argument(
        "--state", action="append", choices=_STATES, help="only claims in this state (repeatable)"
    )
    ls.add_argument("--limit", type=non_negative_int, default=0, help="at most this many")
    add_json_option(ls)
    ls.set_defaults(func=cmd_outbox_list)

    rq = sub.add_parser("requeue", help="put dead or rejected claims back in the queue")
    rq.add_argument("--config", required=True, help=_CONFIG_HELP)
    rq.add_argument("--id", action="append", help="the claim's message id (repeatable)")
    rq.add_argument(
        "--state",
        choices=_REQUEUEABLE,
        help="every claim in this state (with --link, --since to narrow)",
    )
    rq.add_argument("--link", help="only this outbound link")
    rq.add_argument(
        "--since",
        help="only claims that reached the state at or after this"
        " ISO 8601 date or date-time (UTC unless a zone is given)",
    )
    add_json_option(rq)
    rq.set_defaults(func=cmd_outbox_requeue)


__all__ = ["add_outbox_commands"]
