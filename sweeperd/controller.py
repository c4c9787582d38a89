"""One controller per sweep: the overlap policy, the sweep's timeout and its maintenance window.

When a firing arrives while the previous run is still going (:func:`sweeperd.firing.on_firing`):
* ``skip``: log it and count it;
* ``queue``: run once more right after the current run (several firings meanwhile still make one);
* ``replace``: cancel the current run (its queries are cancelled on the server), then start.

A database that could not be reached during a firing is remembered with that firing; when it
comes back (:meth:`SweepController.catch_up`), the firing runs again for that database alone, so
a nightly sweep does not wait a day for a database that was down for five minutes (claims keep
another instance from doing it twice, and the tenants finished then from running again).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from .config import Config
from .coordination import Claims
from .databases import refresh_databases
from .db import Database
from .durations import format_duration
from .errors import describe_error
from .firing import item_verdict, on_firing, window_of, window_stop_in
from .gates import Gate
from .model import Status
from .planner import make_plan
from .plugins import Plugins
from .report import SweepReport
from .runner import Runner
from .schedule import Window, nominal_firing
from .stop import Stop
from .tenants import resolve_tenants

log = structlog.get_logger("sweeperd.controller")

# Beyond the sweep's own timeout (enforced per item by the runner), the whole run, tenant
# discovery included, gets this much longer before it is cancelled as hung.
HUNG_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a sweep run uses from start to end; a reload makes a new one, runs keep theirs."""

    config: Config
    plugins: Plugins
    runner: Runner


class Host(Protocol):
    """What a controller needs from the daemon that runs it."""

    def snapshot(self) -> Snapshot:
        """The configuration, plugins and runner a run starting now uses."""

    def stopping(self) -> bool:
        """No run or item starts any more."""

    def state_changed(self) -> None:
        """A run began its items, or a run's task ended: ``running`` and ``last_report`` may
        read differently now."""

    def database_unreachable(self, name: str) -> None:
        """``name`` could not be reached during a run: retry it, and call :meth:`catch_up`
        when it answers."""

    async def record(self, report: SweepReport, databases: Mapping[str, Database]) -> None:
        """Keep a run's report (the run history, written to ``databases``)."""

    @property
    def claims(self) -> Claims:
        """Who does which tenant's work of a firing, among the instances sharing databases."""


class SweepController:
    def __init__(self, name: str, host: Host) -> None:
        self.name = name
        self.host = host
        self.current: asyncio.Task[None] | None = None
        self.queued: dt.datetime | None = None  # the firing to run when the current run ends
        self.skipped_firings = 0
        self.last_report: SweepReport | None = None
        self._stop: Stop | None = None  # the current run's
        # Databases unreachable during a firing → that firing, to run for them when they are up.
        self.missed: dict[str, dt.datetime] = {}
        self._catch_up: set[str] = set()  # came back while a run was going: run after it
        self._catching_up = False
        self._in_runner = False  # the runner honours Stop; elsewhere abort() cancels the task

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.done()

    async def fire(self) -> None:
        """A firing from the scheduler (or a test): start, or apply the overlap policy."""
        if self.host.stopping():
            return
        snapshot = self.host.snapshot()
        sweep = snapshot.config.sweeps.get(self.name)
        if sweep is None:
            return  # removed by a reload between the firing and now
        firing = nominal_firing(sweep, snapshot.config.daemon.timezone, dt.datetime.now(dt.UTC))
        match on_firing(
            sweep.overlap,
            running=self.running,
            queued=self.queued is not None,
            catching_up=self._catching_up,
        ):
            case "start":
                self._start(firing)
            case "after catch-up":
                self.queued = firing
                log.info("catch-up run going; firing queued to run after it", sweep=self.name)
            case "queue":
                self.queued = firing
                log.info("sweep still running; queued to run again when it ends", sweep=self.name)
            case "fold":
                self.skipped_firings += 1
                log.info("sweep already queued; firing folded into it", sweep=self.name)
            case "replace":
                log.warning("sweep still running; replacing it", sweep=self.name)
                await self.abort("replaced by a newer firing")
                if not self.host.stopping():
                    self._start(firing)
            case "skip":
                self.skipped_firings += 1
                log.warning(
                    "sweep still running; firing skipped",
                    sweep=self.name,
                    skipped_firings=self.skipped_firings,
                )

    async def abort(self, reason: str) -> None:
        """Stop the running sweep now and wait for it: unfinished operations are cancelled (their
        queries too, on the server) and reported ``cancelled`` with ``reason``."""
        self.queued = None
        self._catch_up.clear()
        if self._stop is not None:
            self._stop.now(reason)
        task = self.current
        if task is not None and not task.done() and not self._in_runner:
            # Before (or after) the runner nothing watches the stop: discovery, claims or a
            # refresh waiting connect_retry for a database must not hold a stop up.
            task.cancel()
        await self.wait()

    async def wait(self) -> None:
        task = self.current
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def catch_up(self, database: str) -> None:
        """``database`` is reachable again: run the firing it missed, for it alone."""
        if database not in self.missed or self.host.stopping():
            return
        if self.running:
            self._catch_up.add(database)  # after the current run, by _loop
            return
        self._catch_up.add(database)
        self._track(
            asyncio.create_task(self._loop(None), name=f"sweeperd sweep {self.name} (catch-up)")
        )

    def _start(self, firing: dt.datetime) -> None:
        self._track(asyncio.create_task(self._loop(firing), name=f"sweeperd sweep {self.name}"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self.current = task
        # Once the task is done, not when the runner returns: history is still being written
        # then, and the host's STATUS would say "running" until the next event.
        task.add_done_callback(lambda _task: self.host.state_changed())

    async def _loop(self, firing: dt.datetime | None) -> None:
        next_firing: dt.datetime | None = firing
        while True:
            if next_firing is not None:
                self.queued = None
                await self._run_once(next_firing)
            while self._catch_up and not self.host.stopping():
                database = self._catch_up.pop()
                missed = self.missed.get(database)
                if missed is not None:
                    log.info(
                        "database reachable again; running the firing it missed",
                        sweep=self.name,
                        database=database,
                        firing=missed.isoformat(),
                    )
                    self._catching_up = True
                    try:
                        await self._run_once(missed, only={database})
                    finally:
                        self._catching_up = False
            next_firing = None if self.host.stopping() else self.queued
            if next_firing is None:
                return

    async def _run_once(self, firing: dt.datetime, only: Collection[str] | None = None) -> None:
        snapshot = self.host.snapshot()
        config = snapshot.config
        sweep = config.sweeps.get(self.name)
        if sweep is None:
            return
        window = window_of(sweep, config.daemon.timezone)
        now = dt.datetime.now(dt.UTC)
        if window is not None and not window.contains(now):
            log.info(
                "outside the maintenance window; not started",
                sweep=self.name,
                window=window.describe(),
            )
            return
        report: SweepReport | None = None
        self._stop = stop = Stop()
        if (stop_in := window_stop_in(sweep, window, now)) is not None:
            stop.at(stop_in, "maintenance window closed")
        runner = snapshot.runner
        databases = {n: db for n, db in runner.databases.items() if only is None or n in only}
        # The whole run, history included, uses the databases: their idle connections close
        # when it (and any other sweep using them) is done, so none are held between firings.
        async with contextlib.AsyncExitStack() as using:
            for database in databases.values():
                await using.enter_async_context(database.use())
            try:
                guard = (sweep.timeout + HUNG_GRACE_S) if sweep.timeout is not None else None
                async with asyncio.timeout(guard):
                    report = await self._sweep(snapshot, firing, databases, window, stop)
            except TimeoutError:
                log.error(
                    "sweep hung and was cancelled",
                    sweep=self.name,
                    timeout=format_duration((sweep.timeout or 0) + HUNG_GRACE_S),
                )
            except asyncio.CancelledError:
                log.warning("sweep cancelled", sweep=self.name)
                raise
            except Exception as exc:
                # Tenant discovery failing (database down), a plan error: this run fails, the
                # schedule and the other sweeps go on.
                log.error("sweep failed before running", sweep=self.name, error=describe_error(exc))
            finally:
                self._stop = None
            self.last_report = report
            if report is not None:
                await self.host.record(report, runner.databases)

    async def _sweep(
        self,
        snapshot: Snapshot,
        firing: dt.datetime,
        databases: dict[str, Database],
        window: Window | None,
        stop: Stop,
    ) -> SweepReport:
        """Refresh the databases, find the tenants, plan and run, claiming tenants as it goes:
        the part of a run that talks to the servers."""
        config = snapshot.config
        down = await refresh_databases(databases)
        self._remember(firing, databases, down)
        reachable = {n: db for n, db in databases.items() if n not in down}
        tenants, failed = await resolve_tenants(config, reachable)
        tenants = [t for t in tenants if t.database in databases]
        failed = {**down, **failed}
        plan = make_plan(
            config,
            snapshot.plugins.operations,
            tenants,
            sweep=self.name,
            database_scope_in=set(databases),
        )
        claims = self.host.claims.firing(
            reachable, self.name, firing, lease=config.daemon.claim_lease
        )
        self.host.state_changed()
        self._in_runner = True
        try:
            report = await snapshot.runner.run(
                plan, gate=self._gate(window), stop=stop, unreachable=failed, claims=claims
            )
        finally:
            self._in_runner = False
        # Gone during the run (its items failed waiting for it): catch up later.
        self._remember(
            firing,
            [n for n in databases if n not in down],
            [n for n, db in databases.items() if db.down is not None],
            keep=True,
        )
        return report

    def _remember(
        self,
        firing: dt.datetime,
        databases: Collection[str],
        down: Collection[str],
        *,
        keep: bool = False,
    ) -> None:
        """Which databases missed this firing (for catch_up), which ones did not (unless
        ``keep``: then only new misses are added)."""
        for name in databases:
            if name in down:
                self.missed[name] = firing
                self.host.database_unreachable(name)
            elif not keep:
                self.missed.pop(name, None)

    def _gate(self, window: Window | None) -> Gate:
        def gate(expected_s: float | None) -> tuple[Status, str] | None:
            return item_verdict(
                window,
                dt.datetime.now(dt.UTC),
                stopping=self.host.stopping(),
                expected_s=expected_s,
            )

        return gate
