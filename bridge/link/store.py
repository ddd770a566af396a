"""Async facade over the synchronous ledger store.

The ledger is plain synchronous code (SQLite). All calls go through one worker
thread, so the connection is only ever used by that thread and the event loop never
blocks on a disk flush.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class AsyncStore:
    def __init__(self, store: Any) -> None:
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self.sync, name)
        if not callable(attr):
            return attr  # type: ignore[no-any-return]

        async def bound(*args: Any, **kwargs: Any) -> Any:
            return await self.call(attr, *args, **kwargs)

        return bound

    def close(self) -> None:
        self._executor.submit(self.sync.close).result()
        self._executor.shutdown(wait=True)
