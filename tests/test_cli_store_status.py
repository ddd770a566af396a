"""``bridge store status`` reads a store's schema steps without applying any: after an
upgrade, an operator sees what the new version would do while older processes still run
on the store; ``bridge store migrate`` then does it. On both stores."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import make_workdir
from pg_support import PGSchema, fresh_schema

from bridge.cli import main
from bridge.ledger.migrations import MIGRATIONS

LAST = MIGRATIONS[-1].name


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    hospital, _ = make_workdir(tmp_path)
    if request.param == "postgresql":
        schema: PGSchema = request.getfixturevalue("pg_schema")
        text, n = re.subn(r"\[store\]\npath = \"[^\"]*\"\n",
                          f'[store]\nkind = "postgresql"\ndsn = "{schema.dsn}"\n'
                          f'schema = "{schema.schema}"\n', hospital.read_text())
        assert n == 1
        hospital.write_text(text)
    return hospital


def _forget_last_step(config: Path) -> None:
    """Make the store look written by the version before the last step: its record of
    that step removed (the step's own change is then found done when it runs again)."""
    text = config.read_text()
    if 'kind = "postgresql"' in text:
        import psycopg

        dsn = re.search(r'dsn = "([^"]*)"', text)
        schema = re.search(r'schema = "([^"]*)"', text)
        assert dsn and schema
        with psycopg.connect(dsn.group(1), autocommit=True) as conn:
            conn.execute(f'DELETE FROM "{schema.group(1)}".schema_migrations WHERE name = %s',
                         (LAST,))
        return
    path = re.search(r'\[store\]\npath = "([^"]*)"', text)
    assert path
    raw = sqlite3.connect(config.parent / path.group(1))
    raw.execute("DELETE FROM schema_migrations WHERE name = ?", (LAST,))
    raw.commit()
    raw.close()


def _status(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["store", "status", "--config", str(config), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_shows_a_pending_step_without_applying_it(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["store", "migrate", "--config", str(config)]) == 0
    capsys.readouterr()
    _forget_last_step(config)
    for _ in range(2):  # reading twice: the first read applied nothing
        report = _status(config, capsys)
        assert report["up_to_date"] is False
        assert report["applied"] == [m.name for m in MIGRATIONS[:-1]]
    assert main(["store", "status", "--config", str(config)]) == 0
    assert f"pending  {LAST}" in capsys.readouterr().out
    assert main(["store", "migrate", "--config", str(config)]) == 0
    assert "(up to date)" in capsys.readouterr().out
    assert _status(config, capsys)["up_to_date"] is True


def test_status_of_a_store_from_a_newer_bridge_names_the_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hospital, _ = make_workdir(tmp_path)
    assert main(["store", "migrate", "--config", str(hospital)]) == 0
    path = re.search(r'\[store\]\npath = "([^"]*)"', hospital.read_text())
    assert path
    raw = sqlite3.connect(hospital.parent / path.group(1))
    raw.execute("INSERT INTO schema_migrations (name, applied) VALUES ('9999-future', 'x')")
    raw.commit()
    raw.close()
    capsys.readouterr()
    assert main(["store", "status", "--config", str(hospital)]) != 0
    err = capsys.readouterr().err
    assert "9999-future" in err and "newer bridge" in err and "Traceback" not in err


def test_status_of_a_postgresql_store_that_does_not_answer_names_it_without_the_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hospital, _ = make_workdir(tmp_path)
    text, n = re.subn(r"\[store\]\npath = \"[^\"]*\"\n",
                      '[store]\nkind = "postgresql"\n'
                      'dsn = "host=127.0.0.1 port=1 user=postgres password=secret-pw dbname=test"\n'
                      'schema = "nowhere"\n', hospital.read_text())
    assert n == 1
    hospital.write_text(text)
    assert main(["store", "status", "--config", str(hospital)]) != 0
    err = capsys.readouterr().err
    assert "postgresql schema nowhere" in err and "schema steps" in err
    assert "secret-pw" not in err and "Traceback" not in err
