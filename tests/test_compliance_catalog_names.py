"""The compliance catalog decides items from what exists: every module, attribute,
configuration key and command it names is real, so a rename cannot silently make an item
unmeetable; T19 follows the store's data-key settings and T10 the partners' cosignatures
the store holds."""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import json
import re
import sqlite3
import typing
from pathlib import Path
from typing import Any

from e2e_support import LINK_OUT, cli, consent_for, start_pair

from bridge.cli import build_parser
from bridge.compliance import catalog
from bridge.config import BridgeConfig
from bridge.samples import inpatient_records

SOURCE = Path(catalog.__file__).read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
DOCSTRINGS = {id(n.body[0].value) for n in ast.walk(TREE)
              if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef) and n.body
              and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
#: What the catalog says to an operator or auditor (docstrings left out).
STRINGS = [n.value for n in ast.walk(TREE) if isinstance(n, ast.Constant)
           and isinstance(n.value, str) and id(n) not in DOCSTRINGS]


def _model_of(annotation: Any) -> Any:
    """The pydantic model a configuration field holds (through ``X | None`` and lists)."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _keys(model: Any) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)


def test_the_catalog_looks_nothing_up_by_a_name_in_a_string() -> None:
    calls = [n for n in ast.walk(TREE) if isinstance(n, ast.Call)]
    by_name = [ast.unparse(c) for c in calls
               if ast.unparse(c.func).split(".")[-1] in (
                   "getattr", "hasattr", "find_spec", "import_module", "__import__", "has_module")
               and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                       for a in c.args)]
    assert by_name == [], "look up in code, not by a name in a string"


def test_every_module_the_catalog_names_exists() -> None:
    named = {m for text in STRINGS for m in re.findall(r"\bbridge(?:\.\w+)+", text)}
    named |= {n.module for n in ast.walk(TREE) if isinstance(n, ast.ImportFrom) and n.module}
    named |= {a.name for n in ast.walk(TREE) if isinstance(n, ast.Import) for a in n.names}
    missing = sorted(m for m in named if m.startswith("bridge")
                     and importlib.util.find_spec(m) is None)
    assert missing == []


def test_every_configuration_key_the_catalog_names_exists() -> None:
    named = {(t, k) for text in STRINGS
             for t, k in re.findall(r"(?<![\w.])([a-z_]+)\.([a-z_]+)\b", text)
             if t in BridgeConfig.model_fields}
    assert ("store", "data_key_file") in named  # the scan sees what T19 names
    unknown = sorted(f"{t}.{k}" for t, k in named
                     if k not in _keys(_model_of(BridgeConfig.model_fields[t].annotation)))
    assert unknown == []


def test_every_command_the_catalog_names_exists() -> None:
    parser = build_parser()

    def sub(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    # A command is "bridge store backup"; "the bridge never ..." is prose.
    named = [m.split() for text in STRINGS
             for m in re.findall(r"(?<!the )(?<!this )\bbridge(?: [a-z][a-z-]*)+", text)]
    assert ["bridge", "audit", "disclosures"] in named
    for words in named:
        level = sub(parser)
        assert words[1] in level, " ".join(words)
        following = sub(level[words[1]])
        if following and len(words) > 2:
            assert words[2] in following, " ".join(words)


def _report(config: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    run = cli("compliance", "report", "--config", str(config), "--json", env=env)
    assert run.returncode == 0, run.stderr
    return {row["id"]: row for row in json.loads(run.stdout)["items"]}


def test_t19_follows_the_store_data_key(tmp_path: Path) -> None:
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    plain = config.read_text(encoding="utf-8")
    t19 = _report(config)["T19"]
    assert t19["status"] == "partial" and "not encrypted" in t19["why"]
    kek = "ab" * 32
    (tmp_path / "hospital-a" / "kek.hex").write_text(kek, encoding="ascii")
    for key in ('data_key_file = "hospital-a/kek.hex"', 'data_key_env = "BRIDGE_KEK"'):
        config.write_text(plain.replace("[store]\n", f"[store]\n{key}\n", 1), encoding="utf-8")
        t19 = _report(config, {"BRIDGE_KEK": kek})["T19"]
        assert t19["status"] == "met", (key, t19)
        assert key.split(" =")[0] in t19["why"]
    # The key named but not at hand: what a store holds cannot be checked.
    made = cli("keys", "rotate-data-key", "--config", str(config), env={"BRIDGE_KEK": kek})
    assert made.returncode == 0, made.stderr
    t19 = _report(config, {"BRIDGE_KEK": ""})["T19"]
    assert t19["status"] == "partial" and "not checked" in t19["why"], t19


async def test_t10_is_met_once_a_partner_cosigned_a_checkpoint(tmp_path: Path) -> None:
    pair = await start_pair(tmp_path)
    try:
        before = await asyncio.to_thread(_report, pair.insurer_cfg)
        assert before["T10"]["status"] == "partial", before["T10"]
        record = inpatient_records(1, seed=3)[0]
        await pair.hospital.controller.put_consent(consent_for(record, consent_id="t10"))
        mid = (await pair.hospital.submit(record, LINK_OUT)).message_id
        for _ in range(200):
            row = await pair.hospital.controller.db.get_outbox(mid)
            if row is not None and row.state == "acked":
                break
            await asyncio.sleep(0.05)
        # The hospital checks the insurer's log and cosigns its checkpoint.
        results = await pair.hospital.witness.run_once()
        assert [(r.partner, r.cosigned) for r in results] == [("insurer-b", True)]
    finally:
        await pair.stop()
    after = await asyncio.to_thread(_report, pair.insurer_cfg)
    assert after["T10"]["status"] == "met", after["T10"]
    assert "hospital-a" in after["T10"]["why"]
    verify = cli("audit", "verify", "--config", str(pair.insurer_cfg))
    assert "1 cosignatures match" in verify.stdout, verify.stdout

    # The same store, its append-only triggers dropped: not met, naming them.
    store = pair.root / "insurer-b" / "bridge.sqlite"
    raw = sqlite3.connect(store)
    raw.execute("DROP TRIGGER audit_no_delete")
    raw.commit()
    t10 = (await asyncio.to_thread(_report, pair.insurer_cfg))["T10"]
    assert t10["status"] == "not met" and "audit_no_delete" in t10["why"], t10
    # ... and an entry edited: not met, whatever cosignatures the store holds.
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute("""UPDATE audit SET categories='{"Claim":1}' WHERE seq=1""")
    raw.commit()
    raw.close()
    t10 = (await asyncio.to_thread(_report, pair.insurer_cfg))["T10"]
    assert t10["status"] == "not met" and "does not verify" in t10["why"], t10
    assert "entry 1" in t10["why"]
