"""Configurations for the compliance tests: a pair made with ``bridge init`` (see
ops_support), with agreements, jurisdictions and operators written into their TOML as
an operator would."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ops_support import Site, bridge, make_site

from bridge.config import load_config
from bridge.ledger import open_store

CST = timezone(timedelta(hours=8))


def instant(seconds_from_now: float) -> str:
    """A TOML offset date-time ``seconds_from_now`` seconds from now (China time)."""
    when = datetime.now(CST) + timedelta(seconds=seconds_from_now)
    return when.replace(microsecond=0).isoformat()


def agreement(agreement_id: str, *, valid_from: str = "2020-01-01", valid_to: str = "2099-12-31",
              retention_days: int = 30, parties: tuple[str, ...] = ("hospital-a", "insurer-b"),
              permitted: tuple[str, ...] = ("Claim", "Patient", "Encounter", "Condition",
                                            "Procedure", "Coverage", "Organization",
                                            "Practitioner")) -> str:
    return (
        "\n[[agreements]]\n"
        f'id = "{agreement_id}"\n'
        f'reference = "DUA/{agreement_id}"\n'
        f"parties = {json.dumps(list(parties))}\n"
        'purposes = ["HPAYMT"]\n'
        f"permitted_data = {json.dumps(list(permitted))}\n"
        'duties = ["use for claim settlement only", "no onward disclosure"]\n'
        f"valid_from = {valid_from}\n"
        f"valid_to = {valid_to}\n"
        f"retention_days = {retention_days}\n"
    )


def add_to_link(config: Path, line: str) -> None:
    """Add ``line`` to the (only) [[links]] table of a config made by ``bridge init``."""
    text = config.read_text(encoding="utf-8")
    assert text.count('purpose = "HPAYMT"\n') == 1
    config.write_text(text.replace('purpose = "HPAYMT"\n', f'purpose = "HPAYMT"\n{line}\n'),
                      encoding="utf-8")


def append(config: Path, text: str) -> None:
    with config.open("a", encoding="utf-8") as fh:
        fh.write(text)


def bind_agreement(config: Path, agreement_id: str, **kwargs: Any) -> None:
    add_to_link(config, f'agreement = "{agreement_id}"')
    append(config, agreement(agreement_id, **kwargs))


def samples(site: Site) -> Path:
    return site.root / "hospital-a" / "samples"


def another_claim(site: Site, number: int) -> Path:
    """claim-1.json for another stay of the same (consenting) patient."""
    record = json.loads((samples(site) / "claim-1.json").read_text(encoding="utf-8"))
    record["elements"]["HDSD00.11.140"] = f"ZY2026{number:08d}"
    path = site.root / f"claim-stay-{number}.json"
    path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return path


def audit_entries(config: Path, action: str | None = None) -> list[Any]:
    with open_store(load_config(config).store) as store:
        entries = store.audit_entries()
    return [e for e in entries if action is None or e.record.action == action]


def consenting_site(root: Path) -> Site:
    """A site made with ``bridge init`` in ``root`` whose hospital holds the consent of
    the sample patient."""
    site = make_site(root)
    run = bridge("consent", "add", "--config", str(site.hospital),
                 str(samples(site) / "consent.json"))
    assert run.returncode == 0, run.stderr
    return site


def outbox_states(config: Path) -> dict[str, int]:
    with open_store(load_config(config).store) as store:
        return dict(store.outbox_counts())


def inbox_count(config: Path) -> int:
    with open_store(load_config(config).store) as store:
        return int(store.inbox_count())


__all__ = ["CST", "add_to_link", "agreement", "another_claim", "append", "audit_entries",
           "bind_agreement", "consenting_site", "inbox_count", "instant", "outbox_states", "samples"]
