"""Scheduling, pure: triggers, misfire grace, maintenance windows, and keeping APScheduler's jobs
in sync with the configuration (inside a running asyncio loop, as the daemon does)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from sweeperd.config import Config, SweepConfig, parse_config
from sweeperd.schedule import (
    DEFAULT_MISFIRE_GRACE,
    JOB_PREFIX,
    SweepScheduler,
    Window,
    build_trigger,
    misfire_grace,
)

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
T = TypeVar("T")


def config(sweeps: Mapping[str, Mapping[str, Any]], timezone: str = "UTC") -> Config:
    return parse_config(
        {"daemon": {"timezone": timezone}, "sweeps": dict(sweeps)}, Path("sweeperd.toml")
    )


def sweep(**keys: Any) -> SweepConfig:
    return config({"s": keys}).sweeps["s"]


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- misfire grace ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "grace"),
    [
        ({"cron": "0 3 * * *"}, DEFAULT_MISFIRE_GRACE),
        ({"cron": "*/5 * * * *"}, DEFAULT_MISFIRE_GRACE),
        ({"interval": "1h"}, DEFAULT_MISFIRE_GRACE),  # capped at 5 min
        ({"interval": "10m"}, 300.0),
        ({"interval": "4m"}, 120.0),  # at most half an interval
        ({"interval": "10s"}, 5.0),
        ({"interval": "1s"}, 1.0),  # never below one second
        ({"interval": "500ms"}, 1.0),
        ({"cron": "0 3 * * *", "misfire_grace_time": "1h"}, 3600.0),  # explicit wins
        ({"interval": "10s", "misfire_grace_time": "1m"}, 60.0),  # even beyond half the interval
        ({"interval": "1h", "misfire_grace_time": "2s"}, 2.0),
    ],
)
def test_misfire_grace(keys: dict[str, str], grace: float) -> None:
    assert misfire_grace(sweep(**keys)) == grace


def test_default_misfire_grace_is_five_minutes() -> None:
    assert DEFAULT_MISFIRE_GRACE == 300.0


# -- triggers -----------------------------------------------------------------------------------


def test_cron_trigger_fires_at_local_time_in_the_time_zone() -> None:
    trigger = build_trigger(sweep(cron="0 3 * * *"), "Europe/Berlin")
    assert isinstance(trigger, CronTrigger)
    assert str(trigger.timezone) == "Europe/Berlin"
    assert trigger.jitter is None
    now = utc(2026, 1, 14, 12, 0)
    fire = trigger.get_next_fire_time(None, now)
    assert fire == dt.datetime(2026, 1, 15, 3, 0, tzinfo=BERLIN)
    assert fire == utc(2026, 1, 15, 2, 0)  # CET is UTC+1
    summer = trigger.get_next_fire_time(None, utc(2026, 7, 14, 12, 0))
    assert summer == utc(2026, 7, 15, 1, 0)  # CEST is UTC+2


def test_cron_trigger_across_the_spring_forward_day() -> None:
    # 2026-03-29: clocks go from 02:00 CET to 03:00 CEST. 04:00 local exists; in UTC it is 02:00.
    trigger = build_trigger(sweep(cron="0 4 * * *"), "Europe/Berlin")
    assert trigger.get_next_fire_time(None, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 2, 0)
    assert trigger.get_next_fire_time(None, utc(2026, 3, 27, 12, 0)) == utc(2026, 3, 28, 3, 0)


def test_cron_trigger_with_jitter_stays_within_it() -> None:
    trigger = build_trigger(sweep(cron="0 3 * * *", jitter="60s"), "UTC")
    assert trigger.jitter == 60
    now = utc(2026, 1, 14, 12, 0)
    base = utc(2026, 1, 15, 3, 0)
    for _ in range(50):
        fire = trigger.get_next_fire_time(None, now)
        assert base <= fire <= base + dt.timedelta(seconds=60)


def test_interval_trigger() -> None:
    trigger = build_trigger(sweep(interval="15m"), "America/New_York")
    assert isinstance(trigger, IntervalTrigger)
    assert trigger.interval == dt.timedelta(minutes=15)
    assert str(trigger.timezone) == "America/New_York"
    assert trigger.jitter is None
    # The first firing is one interval after the trigger was made, not at once.
    now = dt.datetime.now(UTC)
    first = trigger.get_next_fire_time(None, now)
    assert now < first <= now + dt.timedelta(minutes=15)
    assert trigger.get_next_fire_time(first, first) == first + dt.timedelta(minutes=15)


def test_interval_trigger_with_jitter_stays_within_it() -> None:
    trigger = build_trigger(sweep(interval="1h", jitter="2m"), "UTC")
    assert trigger.jitter == 120
    previous = utc(2026, 1, 14, 12, 0)
    for _ in range(50):
        fire = trigger.get_next_fire_time(previous, previous)
        assert utc(2026, 1, 14, 13, 0) <= fire <= utc(2026, 1, 14, 13, 2)


def test_sub_second_interval() -> None:
    trigger = build_trigger(sweep(interval="500ms"), "UTC")
    assert trigger.interval == dt.timedelta(milliseconds=500)


# -- windows ------------------------------------------------------------------------------------


def window(text: str, timezone: str = "UTC") -> Window:
    parsed = config({"s": {"interval": "1h", "window": text}}, timezone).sweeps["s"].window
    assert parsed is not None
    return Window(parsed, timezone)


@pytest.mark.parametrize(
    ("hhmm", "inside"),
    [
        ("00:59", False),
        ("01:00", True),
        ("03:30", True),
        ("04:59", True),
        ("05:00", False),
        ("23:00", False),
    ],
)
def test_window_contains(hhmm: str, inside: bool) -> None:
    h, m = (int(x) for x in hhmm.split(":"))
    assert window("01:00-05:00").contains(utc(2026, 1, 14, h, m)) is inside
    assert window("01:00-05:00").contains(utc(2026, 1, 14, h, m, 59)) is inside


@pytest.mark.parametrize(
    ("hhmm", "inside"),
    [
        ("21:59", False),
        ("22:00", True),
        ("23:59", True),
        ("00:00", True),
        ("01:59", True),
        ("02:00", False),
        ("12:00", False),
    ],
)
def test_window_spanning_midnight_contains(hhmm: str, inside: bool) -> None:
    h, m = (int(x) for x in hhmm.split(":"))
    assert window("22:00-02:00").contains(utc(2026, 1, 14, h, m)) is inside


def test_window_until_midnight() -> None:
    w = window("20:00-24:00")
    assert w.contains(utc(2026, 1, 14, 23, 59))
    assert not w.contains(utc(2026, 1, 14, 0, 0))
    assert w.closes_after(utc(2026, 1, 14, 21, 0)) == utc(2026, 1, 15, 0, 0)
    assert w.describe() == "20:00-24:00"


def test_window_is_in_the_daemon_time_zone() -> None:
    w = window("01:00-05:00", "Europe/Berlin")
    assert w.contains(utc(2026, 1, 14, 0, 30))  # 01:30 CET
    assert not w.contains(utc(2026, 1, 14, 4, 30))  # 05:30 CET
    assert w.contains(utc(2026, 7, 13, 23, 30))  # 01:30 CEST, the next local day
    assert not w.contains(utc(2026, 7, 14, 3, 30))  # 05:30 CEST
    ny = window("22:00-02:00", "America/New_York")
    assert ny.contains(utc(2026, 1, 15, 4, 0))  # 23:00 EST
    assert not ny.contains(utc(2026, 1, 15, 8, 0))  # 03:00 EST
    # Any aware datetime works, whatever its own zone.
    assert w.contains(dt.datetime(2026, 1, 14, 1, 30, tzinfo=BERLIN))
    tokyo = dt.datetime(2026, 1, 14, 9, 30, tzinfo=ZoneInfo("Asia/Tokyo"))  # 01:30 CET
    assert w.contains(tokyo)


def test_window_closes_after() -> None:
    w = window("01:00-05:00")
    assert w.closes_after(utc(2026, 1, 14, 1, 0)) == utc(2026, 1, 14, 5, 0)
    assert w.closes_after(utc(2026, 1, 14, 4, 59, 59)) == utc(2026, 1, 14, 5, 0)
    night = window("22:00-02:00")
    assert night.closes_after(utc(2026, 1, 14, 22, 0)) == utc(2026, 1, 15, 2, 0)
    assert night.closes_after(utc(2026, 1, 14, 23, 30)) == utc(2026, 1, 15, 2, 0)
    assert night.closes_after(utc(2026, 1, 15, 0, 30)) == utc(2026, 1, 15, 2, 0)
    assert night.closes_after(utc(2026, 12, 31, 23, 0)) == utc(2027, 1, 1, 2, 0)


def test_window_closes_after_in_a_time_zone() -> None:
    w = window("01:00-05:00", "Europe/Berlin")
    assert w.closes_after(utc(2026, 1, 14, 0, 30)) == utc(2026, 1, 14, 4, 0)
    assert w.closes_after(utc(2026, 7, 13, 23, 30)) == utc(2026, 7, 14, 3, 0)
    night = window("22:00-02:00", "America/New_York")
    assert night.closes_after(utc(2026, 1, 15, 4, 0)) == utc(2026, 1, 15, 7, 0)  # 02:00 EST
    assert night.closes_after(utc(2026, 1, 15, 6, 30)) == utc(2026, 1, 15, 7, 0)


def test_window_closes_at_local_time_on_dst_days() -> None:
    w = window("01:00-05:00", "Europe/Berlin")
    # Spring forward (2026-03-29 02:00 CET → 03:00 CEST): 05:00 CEST is 03:00 UTC.
    opened = utc(2026, 3, 29, 0, 30)  # 01:30 CET
    assert w.contains(opened)
    assert w.closes_after(opened) == utc(2026, 3, 29, 3, 0)
    # Fall back (2026-10-25 03:00 CEST → 02:00 CET): 05:00 CET is 04:00 UTC.
    opened = utc(2026, 10, 24, 23, 30)  # 01:30 CEST
    assert w.contains(opened)
    assert w.closes_after(opened) == utc(2026, 10, 25, 4, 0)


def test_window_describe() -> None:
    assert window("1:05-5:00").describe() == "01:05-05:00"
    assert window("22:00-02:00").describe() == "22:00-02:00"


# -- SweepScheduler inside a running loop -------------------------------------------------------


class Fired(list[str]):
    """The names the scheduler fired, in order; ``at_least(n)`` waits for n of them."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def add(self, name: str) -> None:
        self.append(name)
        self.event.set()

    async def at_least(self, n: int) -> None:
        while len(self) < n:
            self.event.clear()
            await self.event.wait()


def run(scenario: Callable[[SweepScheduler, Fired], Awaitable[T]]) -> T:
    """Run ``scenario(scheduler, fired)`` in a fresh loop; the scheduler is shut down after."""

    async def main() -> T:
        fired = Fired()

        async def fire(name: str) -> None:
            fired.add(name)

        scheduler = SweepScheduler(fire)
        try:
            return await scenario(scheduler, fired)
        finally:
            scheduler.shutdown()

    return asyncio.run(main())


def jobs(scheduler: SweepScheduler) -> dict[str, Any]:
    return {job.id: job for job in scheduler._require().get_jobs()}


def test_sync_before_start_is_an_error() -> None:
    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> None:
        with pytest.raises(RuntimeError, match="not started"):
            scheduler.sync(config({"a": {"interval": "1h"}}))
        assert scheduler.next_runs() == {}

    run(scenario)


def test_start_adds_one_job_per_sweep_with_stable_ids() -> None:
    cfg = config(
        {
            "nightly": {"cron": "0 3 * * *", "jitter": "30s"},
            "often": {"interval": "15m", "misfire_grace_time": "2m"},
        },
        timezone="Europe/Berlin",
    )

    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> dict[str, Any]:
        scheduler.start(cfg)
        return jobs(scheduler) | {"_next": scheduler.next_runs()}

    found = run(scenario)
    next_runs = found.pop("_next")
    assert set(found) == {JOB_PREFIX + "nightly", JOB_PREFIX + "often"}
    nightly, often = found[JOB_PREFIX + "nightly"], found[JOB_PREFIX + "often"]
    for job in (nightly, often):
        assert job.coalesce is True
        assert job.max_instances == 1
    assert nightly.args == ("nightly",) and often.args == ("often",)
    assert nightly.misfire_grace_time == DEFAULT_MISFIRE_GRACE
    assert often.misfire_grace_time == 120
    assert isinstance(nightly.trigger, CronTrigger) and nightly.trigger.jitter == 30
    assert str(nightly.trigger.timezone) == "Europe/Berlin"
    assert isinstance(often.trigger, IntervalTrigger)
    assert often.trigger.interval == dt.timedelta(minutes=15)
    assert set(next_runs) == {"nightly", "often"}
    local = next_runs["nightly"].astimezone(BERLIN)
    assert (local.hour, local.minute) == (3, 0)


def test_sync_adds_reschedules_and_removes_by_stable_id() -> None:
    first = config({"a": {"interval": "1h"}, "b": {"cron": "0 3 * * *"}})
    changed = config(
        {"a": {"interval": "2h"}, "b": {"cron": "0 3 * * *"}, "c": {"interval": "10m"}}
    )
    removed = config({"a": {"interval": "2h"}, "c": {"interval": "10m"}})

    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> None:
        scheduler.start(first)
        before = jobs(scheduler)
        b_next = scheduler.next_run("b")
        a_next = scheduler.next_run("a")
        assert a_next is not None and b_next is not None

        scheduler.sync(changed)
        after = jobs(scheduler)
        assert set(after) == {"sweep:a", "sweep:b", "sweep:c"}
        assert after["sweep:a"].trigger.interval == dt.timedelta(hours=2)
        # Rescheduled: a new job (interval sweeps sit on an epoch-anchored grid, so the next
        # run of a 1 h and of a 2 h interval can be the same instant).
        assert after["sweep:a"] is not before["sweep:a"]
        assert after["sweep:b"] is before["sweep:b"]  # unchanged: left alone
        assert scheduler.next_run("b") == b_next
        assert set(scheduler.next_runs()) == {"a", "b", "c"}

        scheduler.sync(removed)
        assert set(jobs(scheduler)) == {"sweep:a", "sweep:c"}
        assert scheduler.next_run("b") is None
        assert set(scheduler.next_runs()) == {"a", "c"}

        a_job = jobs(scheduler)["sweep:a"]
        scheduler.sync(removed)  # nothing changed: nothing touched
        assert jobs(scheduler)["sweep:a"] is a_job

    run(scenario)


@pytest.mark.parametrize(
    "change",
    [{"jitter": "10s"}, {"misfire_grace_time": "30s"}, {"interval": "30m"}],
)
def test_sync_reschedules_when_the_trigger_changes(change: dict[str, str]) -> None:
    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> None:
        scheduler.start(config({"a": {"interval": "1h"}}))
        job = jobs(scheduler)["sweep:a"]
        scheduler.sync(config({"a": {"interval": "1h", **change}}))
        assert jobs(scheduler)["sweep:a"] is not job

    run(scenario)


def test_sync_leaves_the_job_alone_when_only_the_work_changes() -> None:
    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> None:
        scheduler.start(config({"a": {"interval": "1h"}}))
        job = jobs(scheduler)["sweep:a"]
        next_run = scheduler.next_run("a")
        scheduler.sync(
            config(
                {
                    "a": {
                        "interval": "1h",
                        "operations": ["vacuum.*"],
                        "overlap": "queue",
                        "timeout": "5m",
                    }
                }
            )
        )
        assert jobs(scheduler)["sweep:a"] is job
        assert scheduler.next_run("a") == next_run

    run(scenario)


def test_sync_reschedules_when_the_time_zone_changes() -> None:
    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> None:
        scheduler.start(config({"a": {"cron": "0 3 * * *"}}, timezone="UTC"))
        scheduler.sync(config({"a": {"cron": "0 3 * * *"}}, timezone="Asia/Tokyo"))
        job = jobs(scheduler)["sweep:a"]
        assert str(job.trigger.timezone) == "Asia/Tokyo"
        when = scheduler.next_run("a")
        assert when is not None
        local = when.astimezone(ZoneInfo("Asia/Tokyo"))
        assert (local.hour, local.minute) == (3, 0)

    run(scenario)


def test_jobs_fire_the_sweep_by_name_in_the_running_loop() -> None:
    async def scenario(scheduler: SweepScheduler, fired: Fired) -> list[str]:
        scheduler.start(config({"fast": {"interval": "200ms"}, "slow": {"interval": "1h"}}))
        async with asyncio.timeout(10):
            await fired.at_least(2)
        return list(fired)

    fired = run(scenario)
    assert set(fired) == {"fast"}


def test_a_removed_sweep_no_longer_fires() -> None:
    async def scenario(scheduler: SweepScheduler, fired: Fired) -> list[str]:
        scheduler.start(config({"fast": {"interval": "200ms"}}))
        async with asyncio.timeout(10):
            await fired.at_least(1)
        scheduler.sync(config({"other": {"interval": "1h"}}))
        fired.clear()
        await asyncio.sleep(0.6)  # three intervals of the removed sweep
        return list(fired)

    assert run(scenario) == []


def test_pause_and_shutdown() -> None:
    async def scenario(scheduler: SweepScheduler, fired: Fired) -> list[str]:
        scheduler.start(config({"fast": {"interval": "200ms"}}))
        scheduler.pause()
        await asyncio.sleep(0.6)
        scheduler.shutdown()
        scheduler.shutdown()  # idempotent
        scheduler.pause()  # harmless once shut down
        return list(fired)

    assert run(scenario) == []


@pytest.mark.parametrize(("configured", "seconds"), [("500ms", 1), ("1500ms", 2), ("2s", 2)])
def test_misfire_grace_time_is_whole_seconds_never_less_than_configured(
    configured: str, seconds: int
) -> None:
    # APScheduler 3 accepts only a positive integer; round(0.5) == 0 used to make add_job raise
    # TypeError, crashing daemon start and reload for a value the config accepts.
    cfg = config({"a": {"interval": "1h", "misfire_grace_time": configured}})

    async def scenario(scheduler: SweepScheduler, _fired: Fired) -> Any:
        scheduler.start(cfg)
        first = jobs(scheduler)["sweep:a"].misfire_grace_time
        scheduler.sync(config({"a": {"interval": "2h", "misfire_grace_time": configured}}))
        return first, jobs(scheduler)["sweep:a"].misfire_grace_time

    assert run(scenario) == (seconds, seconds)
