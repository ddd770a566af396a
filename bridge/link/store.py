"""Async facade over the synchronous ledger store.

The ledger is plain synchronous code (SQLite or PostgreSQL). All calls go through
one worker thread, so the connection is only ever used by that thread and the event
loop never blocks on a disk flush.

Concurrent enqueues, accepts of received messages and recorded receipts are committed
together (group commit): while one transaction is being flushed, the calls that arrive
queue up and go into the next one. Durability
costs one flush per group instead of one per claim, an idle bridge adds no delay, and
each caller still gets its own answer.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class _GroupCommit:
    """Gather concurrent calls of one store method into one ``<method>_many`` call."""

    def __init__(
        self, owner: AsyncStore, many: Callable[[list[dict[str, Any]]], list[Any]],
        single: Callable[..., Any] | None = None,
    ) -> None:
        self._owner = owner
        self._many = many
        # Positional arguments are named after the single-call method's signature.
        self._signature = inspect.signature(single) if single is not None else None
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._running = False

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if self._signature is None:
                raise TypeError("grouped store calls take keyword arguments")
            kwargs = dict(self._signature.bind(*args, **kwargs).arguments)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((kwargs, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    answers = await self._owner.call(self._many, [kw for kw, _ in group])
                except Exception as exc:  # noqa: BLE001 - the group failed; every caller hears why
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), answer in zip(group, answers, strict=True):
                    if future.done():
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._running = False


#: For callers that batch a store function of their own (``fn_many(store, requests)``).
GroupCommit = _GroupCommit


class AsyncStore:
    """Every store method, awaitable; ``enqueue`` with group commit when offered."""

    #: Methods whose concurrent calls are committed together when the store has ``<name>_many``.
    GROUPED = ("enqueue", "inbox_accept", "mark_acked")

    def __init__(self, store: Any) -> None:
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._groups: dict[str, _GroupCommit] = {
            name: _GroupCommit(self, getattr(store, f"{name}_many"), getattr(store, name))
            for name in self.GROUPED
            if hasattr(store, f"{name}_many")
        }

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        groups = self.__dict__.get("_groups", {})
        if name in groups:
            return groups[name]  # type: ignore[no-any-return]
        attr = getattr(self.sync, name)
        if not callable(attr):
            return attr  # type: ignore[no-any-return]

        async def bound(*args: Any, **kwargs: Any) -> Any:
            return await self.call(attr, *args, **kwargs)

        return bound

    async def aclose(self) -> None:
        """Close the store on its own thread without blocking the event loop."""
        await self.call(self.sync.close)
        self._executor.shutdown(wait=False)

    def close(self) -> None:
        """Close from synchronous code (outside a running event loop)."""
        self._executor.submit(self.sync.close).result()
        self._executor.shutdown(wait=True)
