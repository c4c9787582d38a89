"""A small, strictly bounded pool of asyncio psycopg connections.

Why not psycopg_pool: its ``resize()`` grows by the difference of ``min_size`` values, not by
what is missing, so warming a pool up again after shrinking it opened connections on top of those
still open (1 → 8 → 15 → 22 → 29 backends over four daemon firings with ``max_connections = 8``);
a failed connect surfaces as a bare ``PoolTimeout`` without libpq's reason; and it grows one
connection at a time. This pool has one invariant that everything else rests on: connections
open plus connections being opened never exceed ``max_size``.

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
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import pq

AsyncConn = psycopg.AsyncConnection[Any]
Connect = Callable[[], Awaitable[AsyncConn]]


class PoolClosed(Exception):
    """The pool was closed while a caller waited for a connection."""


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
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
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
        self._changed = asyncio.Condition()
        self._closed = False

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

    async def getconn(self, retry_for: float | None = None) -> AsyncConn:
        """An idle connection, else a new one if there is room, else wait for one.

        A connect that fails for good, or still fails after ``retry_for`` (default: the pool's),
        gives the room back and raises its own error (with libpq's reason); the caller's timeout
        bounds the wait.
        """
        retry_for = self.retry_for if retry_for is None else retry_for
        retry_at = 0.0  # before this (monotonic) time this caller only takes idle connections
        deadline: float | None = None
        backoff = self._first_backoff
        while True:
            conn = await self._take_or_reserve(retry_at)
            if conn is not None:
                return conn
            try:
                conn = await self._connect()
            except Exception as exc:
                await self._forget()
                now = time.monotonic()
                deadline = now + retry_for if deadline is None else deadline
                if not self._transient(exc) or now >= deadline:
                    raise
                self._on_retry(exc)
                retry_at = min(now + backoff, deadline)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            except BaseException:
                await self._forget()
                raise
            if self._closed:
                await self._discard(conn)
                raise PoolClosed("the pool is closed")
            self._in_use += 1
            return conn

    async def _take_or_reserve(self, retry_at: float) -> AsyncConn | None:
        """An idle connection, or None after reserving room for a new one (from ``retry_at``)."""
        async with self._changed:
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise PoolClosed("the pool is closed")
                    if self._idle:
                        self._in_use += 1
                        return self._idle.pop()  # most recently used: least likely stale
                    now = time.monotonic()
                    if self._size < self.max_size and now >= retry_at:
                        self._size += 1
                        return None
                    wait = retry_at - now if retry_at > now else None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait)
            finally:
                self._waiting -= 1

    async def putconn(self, conn: AsyncConn) -> None:
        """Take a connection back; a broken one, or one still busy, is closed instead.

        An open transaction is rolled back and autocommit restored, so what an operation left
        unfinished never reaches the next one.
        """
        self._in_use -= 1
        if self._closed or not await _reusable(conn):
            await self._discard(conn)
            return
        async with self._changed:
            self._idle.append(conn)
            self._changed.notify()

    async def discard(self, conn: AsyncConn) -> None:
        """Close a checked-out connection for good (its room is given back)."""
        self._in_use -= 1
        await self._discard(conn)

    async def warm(self, n: int) -> None:
        """Open connections concurrently until ``n`` are open (at most ``max_size``).

        One attempt each: a failure only means fewer are ready; getconn() waits it out.
        """
        async with self._changed:
            grow = max(0, min(n, self.max_size) - self._size)
            self._size += grow

        async def one() -> None:
            try:
                conn = await self._connect()
            except Exception:
                await self._forget()
                return
            if self._closed:
                await self._discard(conn)
                return
            async with self._changed:
                self._idle.append(conn)
                self._changed.notify()

        await asyncio.gather(*(one() for _ in range(grow)))

    async def close_idle(self) -> None:
        """Close every idle connection (those in use are closed or kept when they come back)."""
        async with self._changed:
            idle = list(self._idle)
            self._idle.clear()
        for conn in idle:
            await self._discard(conn)

    async def close(self) -> None:
        """Close idle connections now; connections in use are closed when they are put back."""
        self._closed = True
        await self.close_idle()
        async with self._changed:
            self._changed.notify_all()

    async def _discard(self, conn: AsyncConn) -> None:
        with contextlib.suppress(Exception):
            await conn.close()
        await self._forget()

    async def _forget(self) -> None:
        async with self._changed:
            self._size -= 1
            self._changed.notify()


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
