"""A counting semaphore that hands free slots to the most urgent waiter first.

The global and per-database bounds are these: when a slot frees up, the waiting work item with the
highest priority takes it (among equals, the one that asked first), so the most urgent table of
the whole fleet starts next whichever database or tenant it is in. ``async with slots:`` (and
:meth:`acquire`) asks with the highest priority of all: sweeperd's own short bookkeeping queries
(discovery, claims, history) never wait behind a queue of operations.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType


class PrioritySlots:
    """``n`` slots; waiters are served by descending priority, then in the order they came."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def locked(self) -> bool:
        return self._free == 0

    async def acquire(self, priority: float = math.inf) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the slot passes straight to it
                return
        self._free += 1

    @asynccontextmanager
    async def take(self, priority: float) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
