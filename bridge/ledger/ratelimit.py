"""Token buckets kept in the store, so every process sharing it counts one limit.

A limit kept in each process's memory multiplies with the number of processes: a
partner spreading its requests over four bridge processes behind a load balancer gets
four times its rate. :func:`take_token` keeps the bucket in a row of ``rate_bucket``
and updates it under a row lock (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite's write
transaction excludes other writers), so concurrent requests through any process take
tokens from the same bucket.

Times are POSIX seconds from the callers' wall clocks: processes on several hosts need
synchronised clocks (NTP); a clock that steps back adds no tokens.
"""

from __future__ import annotations

from bridge.ledger import Store


def take_token(store: Store, *, bucket: str, rate: float, burst: float, now: float) -> float:
    """Take one token from ``bucket`` (refilled at ``rate`` per second up to ``burst``):
    0.0 when the request may go now, else the seconds until a token is there (nothing
    is taken then)."""
    with store.transaction("take_token", durable=False) as tx:
        tx.execute(
            "INSERT INTO rate_bucket (bucket, tokens, stamp) VALUES (?, ?, ?)"
            " ON CONFLICT (bucket) DO NOTHING",
            (bucket, float(burst), now),
        )
        row = tx.one("SELECT tokens, stamp FROM rate_bucket WHERE bucket = ?" + tx.for_update,
                     (bucket,))
        tokens, stamp = float(row[0]), float(row[1])
        tokens = min(float(burst), tokens + max(0.0, now - stamp) * rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rate
        tx.execute("UPDATE rate_bucket SET tokens = ?, stamp = ? WHERE bucket = ?",
                   (tokens, max(stamp, now), bucket))
        return wait
