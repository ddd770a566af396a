"""A bridge that runs for months keeps a bounded record of delivery latencies."""

from __future__ import annotations

from bridge.link.dispatcher import LATENCIES_KEPT, LinkStats


def test_latencies_keep_only_the_latest_deliveries() -> None:
    stats = LinkStats()
    for n in range(LATENCIES_KEPT * 3 + 7):
        stats.latencies.append(float(n))
    assert len(stats.latencies) == LATENCIES_KEPT
    # The newest are the ones kept, in order: a p99 read off them is the recent one.
    assert stats.latencies[-1] == float(LATENCIES_KEPT * 3 + 6)
    assert stats.latencies[0] == float(LATENCIES_KEPT * 2 + 7)


def test_each_link_keeps_its_own_latencies() -> None:
    a, b = LinkStats(), LinkStats()
    a.latencies.append(0.5)
    assert list(b.latencies) == []
