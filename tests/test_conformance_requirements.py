"""PROTOCOL.md numbers every requirement, and requirements.csv lists exactly those."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "conformance"
TEXT = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
ROWS = list(csv.DictReader((ROOT / "requirements.csv").open(encoding="utf-8")))


def test_every_requirement_is_defined_once_and_listed() -> None:
    defined = Counter(re.findall(r"\*\*\[(P-[A-Z]+-\d+)\]\*\*", TEXT))
    assert defined and all(n == 1 for n in defined.values()), defined
    listed = Counter(row["id"] for row in ROWS)
    assert all(n == 1 for n in listed.values())
    assert set(defined) == set(listed)
    # Every identifier mentioned anywhere is one that is defined.
    assert set(re.findall(r"\bP-[A-Z]+-\d+\b", TEXT)) == set(defined)


def test_every_normative_statement_carries_an_identifier() -> None:
    body = TEXT.split("## 1. Parties", 1)[1]
    blocks = re.split(r"\n(?=- |\d+\. |\n)", body)
    bare = [b[:120] for b in blocks if re.search(r"\b(MUST|SHOULD|MAY)\b", b) and "[P-" not in b]
    assert bare == []


def test_requirement_rows_are_complete() -> None:
    assert list(ROWS[0]) == ["id", "source", "text", "level", "actor", "why_not_tested"]
    for row in ROWS:
        assert row["level"] in {"SHALL", "SHOULD", "MAY"}, row["id"]
        assert row["actor"] in {"receiver", "sender", "signer", "verifier", "both"}, row["id"]
        assert row["source"].startswith("PROTOCOL §"), row["id"]
        assert row["text"], row["id"]
        # The level matches the document's key word in the requirement's own block.
        block = TEXT.split(f"[{row['id']}]**", 1)[1].split("\n\n", 1)[0]
        if row["level"] == "SHOULD":
            assert "SHOULD" in block, row["id"]
        if row["level"] == "MAY":
            assert "MAY" in block, row["id"]
