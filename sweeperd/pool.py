"""A small, strictly bounded pool of asyncio psycopg connections.

Why not psycopg_pool: its ``resize()`` grows by the difference of ``min_size`` values, not by
what is missing, so warming a pool up again after shrinking it opened connections on top of those
still open (1 → 8 → 15 → 22 → 29 backends over four daemon firings with ``max_connections = 8``);
a failed connect surfaces as a bare ``PoolTimeout`` without libpq's reason; and it grows one
connection at a time. This pool has one invariant that everything else rests on: connections
open plus connections being opened never exceed ``max_size``, nor, summed over all pools of one
database, that database's :class:`Budget`.

The accounting never awaits: room is taken and given back in plain statements, and waiters are
woken by resolving futures, so no cancellation (a timeout, a drain, a second SIGTERM) can land
between a connection going away and its room coming back. Connections are closed with libpq's
synchronous ``PQfinish`` for the same reason.

A connect that fails for a reason that may pass (``transient``) is retried with capped
exponential back-off for ``retry_for`` seconds; while it backs off, the caller takes any
connection another caller gives back, so a spike of "too many connections" costs a wait, not a
failure. How a connection is made and what happens at checkout is the caller's
(:mod:`sweeperd.db`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import pq

AsyncConn = psycopg.AsyncConnection[Any]
Connect = Callable[[], Awaitable[AsyncConn]]


class PoolClosed(Exception):
    """The pool was closed while a caller waited for a connection."""


class PoolBusy(TimeoutError):
    """No connection and no room for one within the time the caller would wait."""


class Budget:
    """The server connections one database may have, shared by every pool made for it.

    A reload that changes a database's settings opens a new pool while sweeps still finish on
    the old one; sharing one budget keeps the two together within the newest limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._waiters: list[asyncio.Future[None]] = []

    def idle_elsewhere(self, pool: Pool) -> Pool | None:
        """Another pool of this budget holding an idle connection.

        Its idle connection is worth less than the room it takes: a caller of ``pool`` may be
        waiting for room while holding what the other pool's next user waits for.
        """
        return next((p for p in self.pools if p is not pool and p._idle), None)

    def wake(self) -> None:
        """Something changed (room, an idle connection): every waiter looks again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self, within: float | None) -> None:
        """Wait for :meth:`wake` (or ``within`` seconds); cancellation propagates as is."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class Pool:
    def __init__(
        self,
        connect: Connect,
        max_size: int,
        *,
        retry_for: float = 0.0,
        transient: Callable[[BaseException], bool] = lambda exc: False,
        on_retry: Callable[[BaseException], None] = lambda exc: None,
        first_backoff: float = 0.1,
        max_backoff: float = 2.0,
        budget: Budget | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._budget = budget or Budget(max_size)
        self._budget.pools.add(self)
        self._connect = connect
        self.max_size = max_size
        self.retry_for = retry_for
        self._transient = transient
        self._on_retry = on_retry
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._idle: deque[AsyncConn] = deque()
        self._size = 0  # open (idle or in use) plus being opened: never above max_size
        self._in_use = 0
        self._waiting = 0
        self._closed = False
        self._retiring = False  # connections coming back are closed, not kept

    @property
    def size(self) -> int:
        return self._size

    def stats(self) -> dict[str, int]:
        return {
            "pool_max": self.max_size,
            "pool_size": self._size,
            "pool_available": len(self._idle),
            "pool_in_use": self._in_use,
            "requests_waiting": self._waiting,
        }

    async def getconn(
        self, retry_for: float | None = None, *, room_timeout: float | None = None
    ) -> AsyncConn:
        """An idle connection, else a new one if there is room, else wait for one.

        A connect that fails for good, or still fails after ``retry_for`` (default: the pool's),
        gives the room back and raises its own error (with libpq's reason). ``room_timeout``:
        raise :class:`PoolBusy` instead of waiting longer for a connection or room; otherwise
        the caller's own timeout bounds the wait.
        """
        retry_for = self.retry_for if retry_for is None else retry_for
        give_up = None if room_timeout is None else time.monotonic() + room_timeout
        retry_at = 0.0  # before this (monotonic) time this caller only takes idle connections
        deadline: float | None = None
        backoff = self._first_backoff
        while True:
            conn = await self._take_or_reserve(retry_at, give_up)
            if conn is not None:
                return conn
            try:
                conn = await self._connect()
            except Exception as exc:
                self._release()
                now = time.monotonic()
                deadline = now + retry_for if deadline is None else deadline
                if not self._transient(exc) or now >= deadline:
                    raise
                self._on_retry(exc)
                retry_at = min(now + backoff, deadline)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            except BaseException:
                self._release()
                raise
            if self._closed:
                self._drop(conn)
                raise PoolClosed("the pool is closed")
            self._in_use += 1
            return conn

    async def _take_or_reserve(self, retry_at: float, give_up: float | None) -> AsyncConn | None:
        """An idle connection, or None after reserving room for a new one (from ``retry_at``)."""
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise PoolClosed("the pool is closed")
                if self._idle:
                    self._in_use += 1
                    return self._idle.pop()  # most recently used: least likely stale
                now = time.monotonic()
                if now >= retry_at and self._size < self.max_size:
                    if self._budget.used < self._budget.limit:
                        self._reserve(1)
                        return None
                    other = self._budget.idle_elsewhere(self)
                    if other is not None:
                        other._drop(other._idle.popleft())  # its least recently used
                        self._reserve(1)
                        return None
                if give_up is not None and now >= give_up:
                    raise PoolBusy("no connection and no room for one")
                until = [t for t in (retry_at, give_up) if t is not None and t > now]
                await self._budget.changed(min(until) - now if until else None)
        finally:
            self._waiting -= 1

    async def putconn(self, conn: AsyncConn) -> None:
        """Take a connection back; a broken one, or one still busy, is closed instead.

        An open transaction is rolled back and autocommit restored, so what an operation left
        unfinished never reaches the next one.
        """
        self._in_use -= 1
        try:
            keep = not (self._closed or self._retiring) and await _reusable(conn)
        except BaseException:
            self._drop(conn)  # cancelled while rolling back: never half-returned
            raise
        if not keep or self._closed or self._retiring:
            self._drop(conn)
            return
        self._idle.append(conn)
        self._budget.wake()

    async def discard(self, conn: AsyncConn) -> None:
        """Close a checked-out connection for good (its room is given back)."""
        self._in_use -= 1
        self._drop(conn)

    async def warm(self, n: int) -> None:
        """Open connections concurrently until ``n`` are open (at most ``max_size``).

        One attempt each: a failure only means fewer are ready; getconn() waits it out.
        """
        budget = self._budget
        grow = max(0, min(n, self.max_size) - self._size)
        grow = min(grow, max(0, budget.limit - budget.used))
        self._reserve(grow)

        async def one() -> None:
            try:
                conn = await self._connect()
            except BaseException:
                self._release()
                return
            if self._closed or self._retiring:
                self._drop(conn)
                return
            self._idle.append(conn)
            budget.wake()

        results = await asyncio.gather(*(one() for _ in range(grow)), return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result

    async def close_idle(self) -> None:
        """Close every idle connection (those in use are closed or kept when they come back)."""
        while self._idle:
            self._drop(self._idle.popleft())

    async def retire(self) -> None:
        """Keep serving, but hold no idle connection: its budget goes to a newer pool."""
        self._retiring = True
        await self.close_idle()

    async def close(self) -> None:
        """Close idle connections now; connections in use are closed when they are put back."""
        self._closed = True
        await self.close_idle()
        self._budget.wake()

    def _reserve(self, n: int) -> None:
        self._size += n
        self._budget.used += n

    def _release(self) -> None:
        """Give back the room of a connection that is gone (or never came)."""
        self._reserve(-1)
        self._budget.wake()

    def _drop(self, conn: AsyncConn) -> None:
        _finish(conn)
        self._release()


def _finish(conn: AsyncConn) -> None:
    """Close at once, without awaiting (libpq's PQfinish sends Terminate and closes)."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


async def _reusable(conn: AsyncConn) -> bool:
    if conn.closed or conn.broken:
        return False
    status = conn.pgconn.transaction_status
    if status in (pq.TransactionStatus.ACTIVE, pq.TransactionStatus.UNKNOWN):
        return False  # a query still running (cancelled mid-COPY, ...): not worth saving
    try:
        if status != pq.TransactionStatus.IDLE:
            await conn.rollback()
        if not conn.autocommit:
            await conn.set_autocommit(True)
    except psycopg.Error:
        return False
    return True
