"""The throttle's decisions from readings (pure logic: readings are made here, no server).

What the readings are on a real server is tests/test_throttle.py's business.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from sweeperd.config import ThrottleConfig
from sweeperd.pause import Pause
from sweeperd.throttle import GATES, Reading, Signal, Throttle

LAG = next(g for g in GATES if g.key == "max_replica_lag")
SLOT = next(g for g in GATES if g.key == "max_slot_lag_bytes")
PAUSE = Pause("ops@host", dt.datetime(2026, 1, 3, 10, 0, tzinfo=dt.UTC), "incident 42", None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **limits: Any) -> Throttle:
    config = ThrottleConfig(**{"max_replica_lag": 10.0, "resume_after": 5.0, **limits})
    return Throttle("main", config, clock=clock)


def lag(seconds: float, limit: float = 10.0) -> Reading:
    return Reading((Signal(LAG, seconds, limit, "standby_b"),))


def test_over_the_limit_throttles_and_says_why() -> None:
    clock = Clock()
    t = throttle(clock)
    t._decide(lag(14))
    assert t.throttled and t.kind == "replica_lag"
    assert t.reason == "replica lag 14s > 10s (standby standby_b)"


def test_resumes_only_after_resume_after_under_the_limit() -> None:
    clock = Clock()
    t = throttle(clock)
    t._decide(lag(14))
    for step in range(4):
        clock.now += 1
        t._decide(lag(1))
        assert t.throttled, step
        assert "resuming in" in (t.reason or "")
    clock.now += 1
    t._decide(lag(1))
    assert not t.throttled and t.reason is None


def test_a_dip_under_the_limit_does_not_let_work_through() -> None:
    clock = Clock()
    t = throttle(clock)
    t._decide(lag(14))
    clock.now += 3
    t._decide(lag(1))
    clock.now += 1
    t._decide(lag(12))  # over again: the hysteresis starts over
    clock.now += 4
    t._decide(lag(1))
    assert t.throttled
    clock.now += 1.5
    t._decide(lag(1))
    assert not t.throttled


def test_a_pause_throttles_whatever_the_signals_and_its_end_resumes_at_once() -> None:
    clock = Clock()
    t = throttle(clock)
    t._decide(Reading(lag(1).signals, PAUSE))
    assert t.throttled and t.kind == "paused"
    assert t.reason is not None and t.reason.startswith("paused by ops@host since 2026-01-03")
    assert t.reason.endswith("(until resumed): incident 42")
    clock.now += 1
    t._decide(lag(1))
    assert not t.throttled  # no signal was over: resume_after does not apply to a pause


def test_every_signal_over_is_named() -> None:
    clock = Clock()
    t = throttle(clock, max_slot_lag_bytes=1 << 30)
    t._decide(Reading((Signal(LAG, 14, 10, "b"), Signal(SLOT, 3 << 30, 1 << 30, "cdc"))))
    assert t.reason == "replica lag 14s > 10s (standby b); slot lag 3GB > 1GB (slot cdc)"


def test_transitions_are_logged_once_each() -> None:
    clock = Clock()
    t = throttle(clock, resume_after=0.0)
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 1
            t._decide(lag(14))
        clock.now += 1
        t._decide(lag(1))
        t._decide(lag(1))
    assert [e["event"] for e in logs] == ["database throttled", "database no longer throttled"]
    assert logs[1]["after_s"] == 3.0


def test_holding_back_is_no_news_once_nobody_samples() -> None:
    clock = Clock()
    t = throttle(clock, check_every=1.0)
    t.sampled_at = clock.now
    t._decide(lag(14))
    assert t.holding_back() == t.reason
    clock.now += 3 * 1.0 + 1.5
    assert t.holding_back() is None


def slow_server() -> tuple[Callable[[], Any], Callable[[], int]]:
    """A connection whose every statement takes 50 ms (no pause table), and how many it ran."""
    count = 0

    class Conn:
        async def execute(self, *_args: Any) -> Any:
            nonlocal count
            count += 1
            await asyncio.sleep(0.05)
            return self

        async def fetchone(self) -> tuple[Any, ...]:
            return (False,)

    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        yield Conn()

    return connect, lambda: count


def test_concurrent_waiters_share_one_sample() -> None:
    """Single flight: twenty operations asking at once cause one query."""
    connect, asked = slow_server()

    async def main() -> None:
        t = Throttle("main", ThrottleConfig(check_every=60.0))
        await asyncio.gather(*(t.wait(connect) for _ in range(20)))

    asyncio.run(main())
    assert asked() == 1


@pytest.mark.parametrize("key", [g.key for g in GATES])
def test_every_gate_is_a_throttle_key(key: str) -> None:
    assert key in ThrottleConfig.__dataclass_fields__


def test_a_sample_whose_caller_was_cancelled_is_asked_again() -> None:
    """Cancelled mid-sample, the starter takes the sample down with it (its connection goes
    back); the next caller asks the server again instead of reusing nothing."""
    connect, asked = slow_server()

    async def main() -> bool:
        t = Throttle("main", ThrottleConfig(check_every=60.0))
        starter = asyncio.ensure_future(t.sample(connect))
        joiner = asyncio.ensure_future(t.sample(connect))
        await asyncio.sleep(0.01)
        starter.cancel()
        await asyncio.gather(starter, return_exceptions=True)
        await asyncio.wait_for(joiner, 1)  # asked again itself, on its own connection
        return t.reading is not None

    assert asyncio.run(main())
    assert asked() == 2


def test_a_failed_sample_keeps_a_pause_in_force() -> None:
    class Broken:
        async def execute(self, *_args: Any) -> Any:
            raise OSError("server closed the connection")

    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        yield Broken()

    async def main() -> Throttle:
        t = Throttle("main", ThrottleConfig(check_every=0.01))
        t._decide(Reading((), PAUSE))
        await t.sample(connect)
        return t

    t = asyncio.run(main())
    assert t.throttled and t.kind == "paused"
