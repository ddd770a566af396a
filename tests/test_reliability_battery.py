"""Reliability battery: real ``bridge serve`` processes, a byte-level fault proxy, and
the outcome read from both stores with SQL (sizes kept small for CI; the benchmark
``bench/reliability.py`` runs the same scenarios large and prints the figures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_support import (
    crash_consistency,
    lost_responses,
    partner_outage,
    receiver_restored,
)


@pytest.mark.battery
async def test_partner_outage_loses_nothing_dead_letters_nothing_and_bounds_attempts(
    tmp_path: Path,
) -> None:
    result = await partner_outage(tmp_path, claims=200, refuse_seconds=6, blackhole_seconds=10)
    print(
        f"\noutage: {result.claims} claims, lost {result.lost}, duplicated {result.duplicated},"
        f" dead {result.dead}, {result.attempts_per_second:.2f} connection attempts/s while"
        f" black-holed, drained in {result.drain_seconds:.1f} s"
    )
    assert (result.lost, result.duplicated, result.dead) == (0, 0, 0)
    # One probe at a time, each waiting out its request timeout (3 s) and then a backoff
    # capped at 2 s: a handful of connections in 10 s, whatever the backlog (the
    # per-claim retries this replaces opened dozens per second).
    assert result.attempts_during_blackhole <= 10


@pytest.mark.battery
async def test_a_receiver_restored_from_backup_is_refilled_by_periodic_reconciliation(
    tmp_path: Path,
) -> None:
    result = await receiver_restored(tmp_path, before=30, after=40, periodic=2.0)
    print(
        f"\nrestore: {result.lost_after_restore} claims lost by the restore, found"
        f" {result.missing_found}, resent {result.resent}, receipts naming absent audit"
        f" entries {result.mismatched_receipts}, lost at the end {result.lost_at_end}"
    )
    assert result.lost_after_restore == 40
    assert result.missing_found == 40 and result.resent == 40
    assert result.mismatched_receipts == 40
    assert (result.lost_at_end, result.duplicated) == (0, 0)


@pytest.mark.battery
async def test_kills_of_either_side_lose_nothing_and_duplicate_nothing(tmp_path: Path) -> None:
    result = await crash_consistency(tmp_path, claims=200, kills_each=2)
    print(
        f"\ncrashes: {result.claims} claims, {result.kills} kill -9, lost {result.lost},"
        f" duplicated {result.duplicated}, dead {result.dead}, settled"
        f" {result.settle_seconds:.1f} s after the last kill"
    )
    assert (result.lost, result.duplicated, result.dead) == (0, 0, 0)
    assert result.chains_verify


@pytest.mark.battery
async def test_two_senders_on_one_postgresql_outbox_under_kills(tmp_path: Path) -> None:
    """Two hospital processes share one PostgreSQL outbox; each and the insurer are
    killed in turn. Before, reclaimed leases spent the attempt budget and this
    dead-lettered claims; now nothing is lost, duplicated or dead-lettered."""
    from pg_support import fresh_schema

    for pg in fresh_schema():
        result = await crash_consistency(tmp_path, claims=200, kills_each=2, pg=pg)
    print(
        f"\npostgresql, two senders: {result.claims} claims, {result.kills} kill -9, lost"
        f" {result.lost}, duplicated {result.duplicated}, dead {result.dead}"
    )
    assert (result.lost, result.duplicated, result.dead) == (0, 0, 0)
    assert result.chains_verify


@pytest.mark.battery
async def test_lost_answers_duplicate_nothing_and_keep_the_first_receipt(tmp_path: Path) -> None:
    result = await lost_responses(tmp_path, claims=150, ratio=0.1)
    print(
        f"\nlost answers: {result.claims} claims, {result.cuts} answers cut, lost"
        f" {result.lost}, duplicated {result.duplicated}, receipts differing"
        f" {result.receipts_differing}"
    )
    assert result.cuts > 0
    assert (result.lost, result.duplicated, result.dead, result.receipts_differing) == (0, 0, 0, 0)
