"""Queue depth over the last hour, sampled in memory for the status page's chart."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class DepthHistory:
    """Samples of ``{link: claims waiting}`` taken at times in seconds (any clock).

    Only the last ``window`` seconds are kept. The history lives in memory: after a
    restart the chart starts again from the first sample.
    """

    window: float = 3600.0
    _samples: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)

    def add(self, at: float, depths: dict[str, int]) -> None:
        self._samples.append((at, dict(depths)))
        while self._samples and self._samples[0][0] < at - self.window:
            self._samples.popleft()

    def series(self, link: str) -> list[tuple[float, int]]:
        return [(at, depths.get(link, 0)) for at, depths in self._samples]

    def __len__(self) -> int:
        return len(self._samples)


__all__ = ["DepthHistory"]
