"""Instants at the edges of the calendar.

FHIR dates run from year 1 to year 9999, and so do Python's. A date near either end,
read in a time zone or widened to the end of its day, can fall outside that range
when it is converted to UTC (``0001-01-01`` in China Standard Time begins in year 0).
Such a date is still a valid one: the conversions here saturate at the first or last
representable instant instead of raising ``OverflowError``, so a value a partner is
entitled to send never becomes a failure inside the bridge.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["EARLIEST", "LATEST", "shifted", "utc"]

#: The first and last instants a ``datetime`` can hold, in UTC.
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


def utc(moment: datetime) -> datetime:
    """``moment`` (timezone-aware) in UTC, or the nearest end of the calendar."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return EARLIEST if moment.year == 1 else LATEST


def shifted(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta`` in UTC, or the nearest end of the calendar."""
    try:
        return utc(moment + delta)
    except OverflowError:
        return EARLIEST if delta < timedelta(0) else LATEST
