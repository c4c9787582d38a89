"""The overlap policy and the maintenance window, in-process.

First as the pure decisions of :mod:`sweeperd.firing`; then through a real
:class:`~sweeperd.controller.SweepController` on a host that is a plain object, with the part of
a run that talks to servers (``_sweep``: refresh, discovery, claims, plan, runner) replaced by a
run that waits until the test ends it. No PostgreSQL, no subprocess: tests/test_daemon.py covers
the same policies end to end against a real daemon.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pluggy
import pytest
from structlog.testing import capture_logs

from sweeperd.config import Config, DaemonConfig, DatabaseConfig, Overlap, SweepConfig
from sweeperd.controller import Snapshot, SweepController
from sweeperd.coordination import Claims
from sweeperd.db import Database
from sweeperd.firing import item_verdict, on_firing, window_of, window_stop_in
from sweeperd.limits import Bounds, Limits
from sweeperd.plugins import Plugins
from sweeperd.report import SweepReport
from sweeperd.runner import Runner
from sweeperd.schedule import Window
from sweeperd.stop import Stop

# -- what a firing does -------------------------------------------------------------------------

POLICIES: tuple[Overlap, ...] = ("skip", "queue", "replace")


@pytest.mark.parametrize("overlap", POLICIES)
def test_a_firing_with_nothing_running_starts_whatever_the_policy(overlap: Overlap) -> None:
    assert on_firing(overlap, running=False, queued=False, catching_up=False) == "start"


@pytest.mark.parametrize(
    ("overlap", "queued", "action"),
    [
        ("skip", False, "skip"),
        ("skip", True, "skip"),
        ("queue", False, "queue"),
        ("queue", True, "fold"),  # several firings meanwhile still make one more run
        ("replace", False, "replace"),
        ("replace", True, "replace"),
    ],
)
def test_a_firing_while_a_run_is_going(overlap: Overlap, queued: bool, action: str) -> None:
    assert on_firing(overlap, running=True, queued=queued, catching_up=False) == action


@pytest.mark.parametrize("overlap", POLICIES)
@pytest.mark.parametrize("queued", [False, True])
def test_a_firing_behind_a_catch_up_is_queued_whatever_the_policy(
    overlap: Overlap, queued: bool
) -> None:
    assert on_firing(overlap, running=True, queued=queued, catching_up=True) == "after catch-up"


# -- the maintenance window ---------------------------------------------------------------------


def minutes(hhmm: str) -> int:
    hours, mins = hhmm.split(":")
    return int(hours) * 60 + int(mins)


def sweep_with(window: str | None = None, **changes: Any) -> SweepConfig:
    spans = tuple(minutes(t) for t in window.split("-")) if window else None
    return SweepConfig(name="s", interval=3600.0, window=spans, **changes)  # type: ignore[arg-type]


def utc(hour: int, minute: int, second: int = 0) -> dt.datetime:
    return dt.datetime(2026, 1, 2, hour, minute, second, tzinfo=dt.UTC)


def test_no_window_no_window_check() -> None:
    sweep = sweep_with()
    assert window_of(sweep, "UTC") is None
    assert window_stop_in(sweep, None, utc(3, 0)) is None
    assert item_verdict(None, utc(3, 0), stopping=False) is None


@pytest.mark.parametrize(
    ("window", "timezone", "now", "seconds"),
    [
        ("02:00-04:00", "UTC", utc(3, 30), 1800.0),
        ("02:00-04:00", "UTC", utc(2, 0), 7200.0),
        ("23:00-01:00", "UTC", utc(23, 30, 15), 5385.0),  # spans midnight
        ("23:00-01:00", "UTC", utc(0, 59, 59), 1.0),
        ("02:00-04:00", "Europe/Berlin", utc(1, 30), 5400.0),  # 02:30 CET; closes 03:00 UTC
    ],
)
def test_window_end_cancel_stops_a_run_when_the_window_closes(
    window: str, timezone: str, now: dt.datetime, seconds: float
) -> None:
    sweep = sweep_with(window)
    assert window_stop_in(sweep, window_of(sweep, timezone), now) == seconds


def test_window_end_finish_lets_a_run_finish() -> None:
    sweep = sweep_with("02:00-04:00", window_end="finish")
    assert window_stop_in(sweep, window_of(sweep, "UTC"), utc(3, 59)) is None


@pytest.mark.parametrize(
    ("now", "verdict"),
    [
        (utc(1, 59), ("skipped", "outside the maintenance window 02:00-04:00")),
        (utc(2, 0), None),
        (utc(3, 59, 59), None),
        (utc(4, 0), ("skipped", "outside the maintenance window 02:00-04:00")),  # end exclusive
    ],
)
def test_an_item_starts_only_inside_the_window(
    now: dt.datetime, verdict: tuple[str, str] | None
) -> None:
    window = Window((minutes("02:00"), minutes("04:00")), "UTC")
    assert item_verdict(window, now, stopping=False) == verdict


@pytest.mark.parametrize(
    ("expected_s", "verdict"),
    [
        (None, None),
        (5 * 60.0, None),
        (6 * 60.0, None),  # ends exactly as the window closes
        (
            14 * 60.0,
            ("skipped", "would not finish before the window closes (≈ 14m needed, 6m left)"),
        ),
    ],
    ids=["unknown", "fits", "just fits", "too long"],
)
def test_an_item_that_would_outlast_the_window_is_not_started(
    expected_s: float | None, verdict: tuple[str, str] | None
) -> None:
    window = Window((minutes("02:00"), minutes("04:00")), "UTC")
    assert item_verdict(window, utc(3, 54), stopping=False, expected_s=expected_s) == verdict
    # Without a window nothing is too long.
    assert item_verdict(None, utc(3, 54), stopping=False, expected_s=1e9) is None


@pytest.mark.parametrize("now", [utc(3, 0), utc(5, 0)], ids=["inside", "outside"])
def test_an_item_does_not_start_once_the_daemon_stops(now: dt.datetime) -> None:
    window = Window((minutes("02:00"), minutes("04:00")), "UTC")
    assert item_verdict(window, now, stopping=True) == ("cancelled", "daemon stopping")
    assert item_verdict(None, now, stopping=True) == ("cancelled", "daemon stopping")


# -- a real controller, its runs scripted ---------------------------------------------------------


class Host:
    """A :class:`sweeperd.controller.Host` that records what the controller tells it."""

    def __init__(self, *sweeps: SweepConfig, databases: Collection[str] = ("main",)) -> None:
        pm = pluggy.PluginManager("sweeperd")
        self.config = Config(
            path=Path("sweeperd.toml"),
            daemon=DaemonConfig(timezone="UTC"),
            databases={n: DatabaseConfig(name=n, dsn=f"dbname={n}") for n in databases},
            sweeps={s.name: s for s in sweeps},
        )
        runner = Runner(
            {n: Database(c) for n, c in self.config.databases.items()},
            pm,
            {},
            Bounds(Limits.of(self.config)),
        )
        self._snapshot = Snapshot(
            config=self.config, plugins=Plugins(pm=pm, infos=(), operations={}), runner=runner
        )
        self.is_stopping = False
        self.changes: list[bool] = []  # controller.running at each state_changed()
        self.recorded: list[tuple[SweepReport, Mapping[str, Database]]] = []
        self.unreachable: list[str] = []
        self.controller: SweepController | None = None
        self._claims = Claims("test")

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def reload(self, *sweeps: SweepConfig) -> None:
        config = replace(self.config, sweeps={s.name: s for s in sweeps})
        self._snapshot = replace(self._snapshot, config=config)

    def stopping(self) -> bool:
        return self.is_stopping

    def state_changed(self) -> None:
        assert self.controller is not None
        self.changes.append(self.controller.running)

    def database_unreachable(self, name: str) -> None:
        self.unreachable.append(name)

    async def record(self, report: SweepReport, databases: Mapping[str, Database]) -> None:
        self.recorded.append((report, databases))

    @property
    def claims(self) -> Claims:
        return self._claims


@dataclass
class Run:
    firing: dt.datetime
    databases: list[str]
    stop: Stop
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class Scripted(SweepController):
    """Each run records what it was given and waits for the test's ``release`` (or a cancel)."""

    def __init__(self, name: str, host: Host) -> None:
        super().__init__(name, host)
        host.controller = self
        self.runs: list[Run] = []

    async def _sweep(
        self,
        snapshot: Snapshot,
        firing: dt.datetime,
        databases: dict[str, Database],
        window: Window | None,
        stop: Stop,
    ) -> SweepReport:
        run = Run(firing, sorted(databases), stop)
        self.runs.append(run)
        self.host.state_changed()  # as the real one does when the items start
        try:
            await run.release.wait()
        except asyncio.CancelledError:
            run.cancelled = True
            raise
        now = dt.datetime.now(dt.UTC)
        return SweepReport(self.name, now, now)


def scenario(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await test()

    asyncio.run(bounded())


async def until(predicate: Callable[[], object], what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def events(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_skip_never_runs_twice_at_once_and_counts_what_it_drops() -> None:
    host = Host(sweep_with(overlap="skip"))
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the first run")
        await controller.fire()
        await controller.fire()
        assert len(controller.runs) == 1
        assert controller.skipped_firings == 2 and controller.queued is None
        controller.runs[0].release.set()
        await controller.wait()
        await asyncio.sleep(0.01)  # a run that was (wrongly) queued would start now
        assert len(controller.runs) == 1 and not controller.running

    with capture_logs() as logs:
        scenario(test)
    skipped = events(logs, "sweep still running; firing skipped")
    assert [e["skipped_firings"] for e in skipped] == [1, 2]
    assert len(host.recorded) == 1 and controller.last_report is host.recorded[0][0]
    assert host.recorded[0][1] is host.snapshot().runner.databases


def test_queue_runs_once_more_right_after_however_many_firings_arrived() -> None:
    host = Host(sweep_with(overlap="queue"))
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the first run")
        task = controller.current
        for _ in range(3):
            await controller.fire()
        queued = controller.queued
        assert queued is not None and controller.skipped_firings == 2
        controller.runs[0].release.set()
        await until(lambda: len(controller.runs) == 2, "the queued run")
        assert controller.current is task  # back to back, in the same task
        assert controller.runs[1].firing == queued and controller.queued is None
        controller.runs[1].release.set()
        await controller.wait()
        await asyncio.sleep(0.01)
        assert len(controller.runs) == 2 and not controller.running

    with capture_logs() as logs:
        scenario(test)
    assert len(events(logs, "sweep still running; queued to run again when it ends")) == 1
    assert len(events(logs, "sweep already queued; firing folded into it")) == 2
    assert len(host.recorded) == 2


def test_replace_cancels_the_running_one_then_starts() -> None:
    host = Host(sweep_with(overlap="replace"))
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the first run")
        await controller.fire()  # returns once the first run is gone
        first = controller.runs[0]
        assert first.cancelled and first.stop.reason == "replaced by a newer firing"
        await until(lambda: len(controller.runs) == 2, "the replacing run")
        assert controller.running and not controller.runs[1].cancelled
        assert controller.last_report is None and host.recorded == []  # no report: cancelled
        controller.runs[1].release.set()
        await controller.wait()

    with capture_logs() as logs:
        scenario(test)
    assert len(events(logs, "sweep still running; replacing it")) == 1
    assert len(events(logs, "sweep cancelled")) == 1
    assert len(host.recorded) == 1 and controller.skipped_firings == 0


def test_replace_does_not_start_again_once_the_daemon_is_stopping() -> None:
    host = Host(sweep_with(overlap="replace"))
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the first run")
        original_abort = controller.abort

        async def abort_while_stopping(reason: str) -> None:
            host.is_stopping = True  # SIGTERM arrives while the replaced run winds down
            await original_abort(reason)

        controller.abort = abort_while_stopping  # type: ignore[method-assign]
        await controller.fire()
        await asyncio.sleep(0.01)
        assert len(controller.runs) == 1 and not controller.running

    scenario(test)


def test_a_firing_behind_a_catch_up_runs_after_it_even_with_skip() -> None:
    host = Host(sweep_with(overlap="skip"), databases=("main", "other"))
    controller = Scripted("s", host)
    missed = dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.UTC)

    async def test() -> None:
        controller.missed["other"] = missed
        controller.catch_up("other")
        await until(lambda: controller.runs, "the catch-up run")
        catch_up = controller.runs[0]
        assert (catch_up.firing, catch_up.databases) == (missed, ["other"])
        await controller.fire()
        assert controller.queued is not None and controller.skipped_firings == 0
        catch_up.release.set()
        await until(lambda: len(controller.runs) == 2, "the firing queued behind it")
        assert controller.runs[1].databases == ["main", "other"]
        controller.runs[1].release.set()
        await controller.wait()

    with capture_logs() as logs:
        scenario(test)
    assert len(events(logs, "catch-up run going; firing queued to run after it")) == 1
    assert len(events(logs, "database reachable again; running the firing it missed")) == 1


def test_a_catch_up_for_a_database_that_missed_nothing_runs_nothing() -> None:
    host = Host(sweep_with(), databases=("main", "other"))
    controller = Scripted("s", host)

    async def test() -> None:
        controller.catch_up("other")
        await asyncio.sleep(0.01)
        assert controller.runs == [] and not controller.running

    scenario(test)


def test_nothing_starts_once_the_daemon_is_stopping_or_the_sweep_is_gone() -> None:
    host = Host(sweep_with())
    controller = Scripted("s", host)

    async def test() -> None:
        host.is_stopping = True
        await controller.fire()
        host.is_stopping = False
        host.reload(replace(sweep_with(), name="renamed"))
        await controller.fire()
        await asyncio.sleep(0.01)
        assert controller.runs == [] and not controller.running

    scenario(test)


def around_now(before_min: int, after_min: int) -> str:
    """A window from ``before_min`` minutes before now (UTC) to ``after_min`` after."""
    now = dt.datetime.now(dt.UTC)

    def hhmm(offset: int) -> str:
        return (now + dt.timedelta(minutes=offset)).strftime("%H:%M")

    return f"{hhmm(-before_min)}-{hhmm(after_min)}"


def test_outside_the_window_the_run_does_not_start() -> None:
    host = Host(sweep_with(around_now(-120, 180)))  # opens in two hours
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await controller.wait()
        assert controller.runs == [] and not controller.running

    with capture_logs() as logs:
        scenario(test)
    (not_started,) = events(logs, "outside the maintenance window; not started")
    assert not_started["window"] == around_now(-120, 180)
    assert host.recorded == [] and controller.last_report is None
    assert host.changes == [False]  # only the task's end; no items started


@pytest.mark.parametrize("window_end", ["cancel", "finish"])
def test_inside_the_window_a_run_starts_and_window_end_decides_its_deadline(
    window_end: str,
) -> None:
    host = Host(sweep_with(around_now(60, 120), window_end=window_end))
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the run")
        remaining = controller.runs[0].stop.remaining()
        if window_end == "cancel":
            assert remaining is not None and 118 * 60 < remaining <= 120 * 60, remaining
            assert controller.runs[0].stop.why() == "maintenance window closed"
        else:
            assert remaining is None
        controller.runs[0].release.set()
        await controller.wait()

    scenario(test)
    assert len(host.recorded) == 1


def test_the_host_hears_when_items_start_and_once_the_task_is_done() -> None:
    host = Host(sweep_with())
    controller = Scripted("s", host)

    async def test() -> None:
        await controller.fire()
        await until(lambda: controller.runs, "the run")
        controller.runs[0].release.set()
        await controller.wait()
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop

    scenario(test)
    # Running while the items start; no longer running when told the task ended (so STATUS
    # says "idle" at once), and the report recorded before that.
    assert host.changes == [True, False]
    assert len(host.recorded) == 1
