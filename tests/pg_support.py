"""The local PostgreSQL server for tests: one fresh schema per test, dropped afterwards.

The server is a requirement of the suite, like the filesystem: if it cannot be
reached the tests that need it FAIL (never skip) and say how to fix it. The DSN is
``BRIDGE_TEST_PG_DSN`` when set, else the local trust-auth server as user postgres
(then root) on database ``test``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import psycopg
import pytest
from psycopg import sql

CANDIDATE_DSNS = (
    "host=127.0.0.1 port=5432 user=postgres dbname=test",
    "host=127.0.0.1 port=5432 user=root dbname=test",
)


@cache
def pg_dsn() -> str:
    """A DSN that connects, or ``pytest.fail`` with the reason for each one tried."""
    env = os.environ.get("BRIDGE_TEST_PG_DSN")
    candidates = (env,) if env else CANDIDATE_DSNS
    reasons: list[str] = []
    for dsn in candidates:
        try:
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return dsn
        except psycopg.Error as exc:
            reasons.append(f"  {dsn!r}: {type(exc).__name__}: {str(exc).strip()}")
    pytest.fail(
        "PostgreSQL is required by the ledger tests and could not be reached.\n"
        + "\n".join(reasons)
        + "\nStart the local server (127.0.0.1:5432, trust auth, database 'test') or set "
        "BRIDGE_TEST_PG_DSN.",
        pytrace=False,
    )


@dataclass(frozen=True)
class PGSchema:
    """A schema created for one test: pass ``dsn`` and ``schema`` to ``PostgresStore``."""

    dsn: str
    schema: str

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        """A raw autocommit connection whose search path is this schema (for tampering)."""
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn


def fresh_schema() -> Iterator[PGSchema]:
    """Generator behind the ``pg`` fixtures: a unique schema name, dropped after the test.

    The schema itself is created by the store on first open, which is part of what the
    tests exercise.
    """
    dsn = pg_dsn()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield PGSchema(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # With what a restore may have set aside (bridge.ledger.postgres.aside_schema).
            for name in (schema, f"{schema}-before-restore"):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(name)))

