"""sweeperd.pool against a real PostgreSQL: the bound holds on every path, cancellation included.

Connections are real (psycopg to the test server); the connect callable only adds a pause where a
test needs a window to cancel in. Server-side counts come from pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from sweeperd.pool import Budget, Pool, PoolBusy

AsyncConn = psycopg.AsyncConnection[Any]


def backends(dsn: str, app: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def connector(dsn: str, app: str, pause: float = 0.0) -> Callable[[], Awaitable[AsyncConn]]:
    async def connect() -> AsyncConn:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=app, prepare_threshold=None
        )
        if pause:
            try:
                await asyncio.sleep(pause)
            except BaseException:
                await conn.close()
                raise
        return conn

    return connect


@pytest.fixture
def app() -> str:
    return f"pooltest-{uuid.uuid4().hex[:8]}"


def test_the_bound_holds_over_many_cycles_of_use_warm_and_close(pg_dsn: str, app: str) -> None:
    seen: list[int] = []

    async def main() -> None:
        pool = Pool(connector(pg_dsn, app), 4)

        async def work() -> None:
            conn = await pool.getconn()
            try:
                await conn.execute("SELECT pg_sleep(0.01)")
            finally:
                await pool.putconn(conn)

        for _ in range(20):
            await pool.warm(8)  # asks for more than the bound
            await asyncio.gather(*(work() for _ in range(12)))
            seen.append(await asyncio.to_thread(backends, pg_dsn, app))
            assert pool.size <= 4
            await pool.close_idle()
            seen.append(await asyncio.to_thread(backends, pg_dsn, app))
        await pool.close()

    asyncio.run(main())
    assert max(seen) <= 4
    assert seen[0::2] == [4] * 20  # warmed and used: the bound, every time
    assert seen[1::2] == [0] * 20  # closed idle: nothing left over


def test_cancelling_a_connect_gives_the_room_back(pg_dsn: str, app: str) -> None:
    async def main() -> tuple[int, int]:
        budget = Budget(1)
        pool = Pool(connector(pg_dsn, app, pause=1.0), 1, budget=budget)
        task = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.2)  # connected, pausing: room reserved
        assert budget.used == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pool.size, budget.used

    assert asyncio.run(main()) == (0, 0)
    assert backends(pg_dsn, app) == 0


def test_cancelling_warm_gives_every_room_back(pg_dsn: str, app: str) -> None:
    async def main() -> tuple[int, int, int]:
        budget = Budget(3)
        pool = Pool(connector(pg_dsn, app, pause=1.0), 3, budget=budget)
        task = asyncio.create_task(pool.warm(3))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        size, used = pool.size, budget.used
        # And the pool still works: a connection can be had (no room was leaked).
        fast = Pool(connector(pg_dsn, app), 3, budget=budget)
        conns = [await fast.getconn() for _ in range(3)]
        for conn in conns:
            await fast.putconn(conn)
        await fast.close()
        return size, used, len(conns)

    assert asyncio.run(main()) == (0, 0, 3)


def test_cancelling_putconn_while_it_rolls_back_closes_the_connection(
    pg_dsn: str, app: str
) -> None:
    async def main() -> tuple[int, int]:
        budget = Budget(1)
        pool = Pool(connector(pg_dsn, app), 1, budget=budget)
        conn = await pool.getconn()
        await conn.set_autocommit(False)
        await conn.execute("SELECT 1")  # a transaction left open: putconn must roll it back
        task = asyncio.create_task(pool.putconn(conn))
        await asyncio.sleep(0)  # started: inside the rollback
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pool.size, budget.used

    assert asyncio.run(main()) == (0, 0)
    assert backends(pg_dsn, app) == 0


def test_a_waiter_cancelled_while_backing_off_does_not_take_a_connection(
    pg_dsn: str, app: str
) -> None:
    """Python 3.11's wait_for could swallow a cancel that raced a wake-up: a drained item then
    went on to run its DELETE."""

    # First make a caller that is backing off, then wake and cancel it in the same step.
    async def race() -> tuple[bool, int]:
        calls = 0

        async def connect() -> AsyncConn:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise psycopg.OperationalError("too many clients already")
            return await connector(pg_dsn, app)()

        pool = Pool(connect, 2, retry_for=30, transient=lambda exc: True, first_backoff=5.0)
        other = Pool(connector(pg_dsn, app), 2)
        waiter = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.1)  # first attempt failed: backing off for 5 s
        conn = await other.getconn()
        pool._idle.append(conn)  # a connection becomes available ...
        pool._size += 1
        pool._budget.used += 1
        pool._budget.wake()  # ... and the waiter is woken
        waiter.cancel()  # ... and cancelled in the same step
        cancelled = False
        try:
            got = await waiter
            await pool.putconn(got)
        except asyncio.CancelledError:
            cancelled = True
        await pool.close()
        await other.close()
        return cancelled, len(pool._idle)

    cancelled, _idle = asyncio.run(race())
    assert cancelled


def test_two_pools_of_one_budget_stay_within_it_and_lend_idle_room(pg_dsn: str, app: str) -> None:
    async def main() -> list[int]:
        budget = Budget(3)
        old = Pool(connector(pg_dsn, app), 3, budget=budget)
        new = Pool(connector(pg_dsn, app), 3, budget=budget)
        counts = []
        held = [await old.getconn() for _ in range(2)]
        await old.putconn(held.pop())  # one idle in the old pool, one in use
        # The new pool needs 2: one from the free room, one by closing the old pool's idle one.
        mine = [await new.getconn(), await new.getconn()]
        counts.append(await asyncio.to_thread(backends, pg_dsn, app))
        assert budget.used == 3
        with pytest.raises(PoolBusy):  # full, nothing idle anywhere: no third one
            await new.getconn(room_timeout=0.2)
        for conn in mine:
            await new.putconn(conn)
        await old.putconn(held.pop())
        counts.append(await asyncio.to_thread(backends, pg_dsn, app))
        await old.close()
        await new.close()
        counts.append(await asyncio.to_thread(backends, pg_dsn, app))
        return counts

    assert asyncio.run(main()) == [3, 3, 0]


def test_a_connect_failing_for_good_raises_its_own_error_at_once(pg_dsn: str, app: str) -> None:
    async def main() -> None:
        async def refused() -> AsyncConn:
            raise psycopg.OperationalError('FATAL:  role "nobody" does not exist')

        pool = Pool(refused, 2, retry_for=30, transient=lambda exc: False)
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            await asyncio.wait_for(pool.getconn(), 5)
        assert pool.size == 0

    asyncio.run(main())
