"""``sweeperd run``: the long-running daemon that systemd starts (``Type=notify``).

Signal handlers only set events; the main loop acts on them (Patroni's pattern):
* SIGHUP: ``RELOADING=1``, re-read the config, swap it in (sweeps rescheduled by stable id, pools
  reopened where their database settings changed: :mod:`sweeperd.reload`), ``READY=1``. A bad
  config keeps the old one running, logs every problem once, and still sends ``READY=1`` with a
  STATUS saying so.
* SIGTERM/SIGINT: ``STOPPING=1``, no new operations, wait ``drain_timeout`` for the running ones,
  cancel the rest on the server, close the pools, exit 0. A second signal cancels at once.
* SIGQUIT: the same stop without the drain: running operations are cancelled on the server at
  once. A second ``systemctl stop`` joins the pending stop job and sends nothing, so "stop now"
  must be a signal of its own: ``systemctl kill -s SIGQUIT sweeperd``.

STATUS= (:mod:`sweeperd.status_line`) is recomputed every second and sent when it changes: idle or
running which sweeps, the databases being retried, the next firing (to the second) and the last
result.

Databases fail alone: one that cannot be reached at start (or after a reload, or at the start of
a sweep) is reported in STATUS and the log, its items fail with the reason, and it is retried in
the background (:mod:`sweeperd.reconnect`); when it answers, the firings it missed run for it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from .config import Config, ConfigError
from .controller import Snapshot, SweepController
from .coordination import Claims
from .databases import open_databases
from .db import Database
from .errors import describe_error
from .history import History
from .limits import Bounds, Limits
from .logs import setup_logging
from .plugins import PluginError, Plugins
from .pool import Budget
from .problems import ExitCode
from .reconnect import Reconnector
from .reload import diff_databases
from .report import SweepReport
from .runner import Runner
from .schedule import SweepScheduler
from .sdnotify import Notifier
from .startup import prepare
from .status_line import status_line
from .telemetry import telemetry

log = structlog.get_logger("sweeperd.daemon")


def load(path: Path) -> tuple[Config, Plugins]:
    """Config and plugins, or ConfigError/PluginError with every problem (as check-config)."""
    prepared = prepare(path)
    return prepared.config, prepared.plugins


class Daemon:
    def __init__(
        self, path: Path, config: Config, plugins: Plugins, notifier: Notifier | None = None
    ) -> None:
        self.path = path
        self._initial = (config, plugins)
        self.notifier = notifier or Notifier()
        self.scheduler = SweepScheduler(self._fire)
        self.controllers: dict[str, SweepController] = {}
        self._snapshot: Snapshot | None = None
        self._bounds: Bounds | None = None
        self._reload_requested = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._force_reason = "daemon stopping: second stop signal"
        self._reload_problems = 0  # of the last reload, if it failed: STATUS says so until fixed
        self._stopping = False
        self._retiring: set[asyncio.Task[None]] = set()
        self.history = History(config.history)
        self._claims = Claims(self.history.instance)
        self.reconnector = Reconnector(self._database_up)
        # Per database name, across reloads: old and new pools together stay within the limit.
        self._budgets: dict[str, Budget] = {}

    # -- Host protocol (used by the controllers) -------------------------------------------------
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def stopping(self) -> bool:
        return self._stopping

    def state_changed(self) -> None:
        self._update_status()

    @property
    def claims(self) -> Claims:
        return self._claims

    def _pool_stats(self) -> dict[str, dict[str, int]]:
        return {name: db.pool_stats() for name, db in self.snapshot().runner.databases.items()}

    async def record(self, report: SweepReport, databases: Mapping[str, Database]) -> None:
        await self.history.record(report, databases)

    def database_unreachable(self, name: str) -> None:
        database = self.snapshot().runner.databases.get(name)
        if database is not None and not self._stopping:
            self.reconnector.watch(database)
            self._update_status()

    def _database_up(self, database: Database) -> None:
        if self._snapshot is None or self._stopping:
            return
        if self.snapshot().runner.databases.get(database.name) is not database:
            return  # replaced by a reload meanwhile
        self._update_status()
        for controller in self.controllers.values():
            controller.catch_up(database.name)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        for signo in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signo, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGQUIT, self._on_stop_now)
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="sweeperd watchdog")
        ticker: asyncio.Task[None] | None = None
        try:
            config, plugins = self._initial
            databases, unreachable = await open_databases(
                config,
                list(config.databases),
                keep_unreachable=True,
                budgets=self._budgets_for(config),
            )
            self._install(config, plugins, databases)
            for name in unreachable:
                self.reconnector.watch(databases[name])
            self.scheduler.start(config)
            self.notifier.ready(self._status())
            ticker = asyncio.create_task(self._status_ticker(), name="sweeperd status")
            log.info(
                "sweeperd ready",
                sweeps=sorted(config.sweeps),
                databases=sorted(set(databases) - set(unreachable)),
                unreachable=sorted(unreachable),
                operations=len(plugins.operations),
            )
            await self._main_loop()
            await self._shutdown()
            return ExitCode.OK
        finally:
            watchdog.cancel()
            if ticker is not None:
                ticker.cancel()
            for signo in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                loop.remove_signal_handler(signo)
            self.notifier.close()

    def _on_stop_signal(self) -> None:
        if self._stop_requested.is_set():
            self._force_stop.set()  # the second SIGTERM: no more waiting
        self._stop_requested.set()

    def _on_stop_now(self) -> None:
        self._force_reason = "daemon stopping: stop now (SIGQUIT)"
        self._force_stop.set()
        self._stop_requested.set()

    async def _main_loop(self) -> None:
        while not self._stop_requested.is_set():
            reload = asyncio.ensure_future(self._reload_requested.wait())
            stop = asyncio.ensure_future(self._stop_requested.wait())
            await asyncio.wait((reload, stop), return_when=asyncio.FIRST_COMPLETED)
            reload.cancel()
            stop.cancel()
            if self._stop_requested.is_set():
                return
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception as exc:
                # Whatever went wrong, a reload must never take the running daemon down.
                log.exception("reload failed unexpectedly; keeping the previous configuration")
                self._reload_failed([describe_error(exc)])

    def _install(self, config: Config, plugins: Plugins, databases: dict[str, Database]) -> None:
        self._bounds = Bounds(Limits.of(config), previous=self._bounds)
        runner = Runner(databases, plugins.pm, config.plugins, self._bounds)
        self._snapshot = Snapshot(config=config, plugins=plugins, runner=runner)
        self.history.config = config.history
        telemetry().watch_pools(self._pool_stats)
        for name in config.sweeps:
            self.controllers.setdefault(name, SweepController(name, self))
        for name in [n for n in self.controllers if n not in config.sweeps]:
            if not self.controllers[name].running:
                del self.controllers[name]

    async def _fire(self, name: str) -> None:
        controller = self.controllers.get(name)
        if controller is not None:
            await controller.fire()

    async def reload(self) -> bool:
        """Re-read the config; swap it in, or keep the old one. True if the new one is in use."""
        self.notifier.reloading()
        old = self.snapshot()
        log.info("reloading configuration", path=str(self.path))
        try:
            config, plugins = load(self.path)
        except (ConfigError, PluginError) as exc:
            return self._reload_failed(exc.problems)
        changes = diff_databases(old.runner.databases, config.databases)
        # A database that is down is no reason to refuse a config: it is retried like at start.
        # The pools being replaced hand their connections back as operations finish, so the
        # new ones find room in the database's budget (never more than max_connections).
        await asyncio.gather(*(db.retire() for db in changes.retire))
        opened, unreachable = await open_databases(
            config, changes.open, keep_unreachable=True, budgets=self._budgets_for(config)
        )
        setup_logging(config.log)
        current = {**changes.keep, **opened}
        self._install(config, plugins, current)
        self.scheduler.sync(config)
        self.reconnector.forget_all_but({id(db) for db in current.values()})
        for name in unreachable:
            self.reconnector.watch(opened[name])
        if changes.retire:
            self._retire(list(changes.retire))
        log.info(
            "configuration reloaded",
            sweeps=sorted(config.sweeps),
            reopened=sorted(set(opened) - set(unreachable)),
            unreachable=sorted(unreachable),
            operations=len(plugins.operations),
        )
        self._reload_problems = 0
        self.notifier.ready(self._status())
        return True

    def _budgets_for(self, config: Config) -> dict[str, Budget]:
        for name, database in config.databases.items():
            budget = self._budgets.setdefault(name, Budget(database.max_connections))
            budget.limit = database.max_connections
        return self._budgets

    def _reload_failed(self, problems: Iterable[str]) -> bool:
        problems = list(problems)
        for problem in problems:
            log.error("reload failed; keeping the previous configuration", problem=problem)
        self._reload_problems = max(1, len(problems))
        self.notifier.ready(self._status())
        return False

    def _retire(self, databases: list[Database]) -> None:
        """Close pools replaced by a reload once the sweeps that may still use them are done."""
        running = [c for c in self.controllers.values() if c.running]

        async def close_when_idle() -> None:
            await asyncio.gather(*(c.wait() for c in running))
            await _close(databases)

        task = asyncio.create_task(close_when_idle(), name="sweeperd retire pools")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _shutdown(self) -> None:
        self._stopping = True  # the runner's gate: no operation starts from now on
        self.scheduler.pause()
        running = [c for c in self.controllers.values() if c.running]
        drain = self.snapshot().config.daemon.drain_timeout
        self.notifier.stopping(f"stopping: draining {len(running)} running sweep(s)")
        log.info("stopping", running=[c.name for c in running], drain_timeout_s=drain)
        if running:
            drained = asyncio.ensure_future(asyncio.gather(*(c.wait() for c in running)))
            forced = asyncio.ensure_future(self._force_stop.wait())
            await asyncio.wait(
                (drained, forced), timeout=drain, return_when=asyncio.FIRST_COMPLETED
            )
            forced.cancel()
            if not drained.done():
                reason = (
                    self._force_reason
                    if self._force_stop.is_set()
                    else "daemon stopping: drain timeout expired"
                )
                log.warning("cancelling running operations", reason=reason)
                await asyncio.gather(*(c.abort(reason) for c in running))
            await drained
        self.scheduler.shutdown()
        await self.reconnector.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await _close(self.snapshot().runner.databases.values())
        # SIGTERM runs no atexit handlers: flush spans and metrics ourselves.
        await asyncio.to_thread(telemetry().shutdown)
        log.info("sweeperd stopped")

    # -- STATUS= --------------------------------------------------------------------------------
    def _status(self) -> str:
        databases = self._snapshot.runner.databases if self._snapshot is not None else {}
        throttles = self._snapshot.runner.bounds.throttles if self._snapshot is not None else {}
        return status_line(
            running=[c.name for c in self.controllers.values() if c.running],
            unreachable=[n for n, db in databases.items() if not db.is_open or db.down is not None],
            next_firings=self.scheduler.next_runs(),
            last_reports={
                c.name: c.last_report
                for c in self.controllers.values()
                if c.last_report is not None
            },
            reload_problems=self._reload_problems,
            throttled={
                name: why
                for name, throttle in throttles.items()
                if (why := throttle.holding_back()) is not None
            },
        )

    def _update_status(self) -> None:
        if not self._stopping:
            self.notifier.status(self._status())  # sent only if it differs from the last one

    async def _status_ticker(self) -> None:
        # Events update STATUS at once; the tick keeps what time alone changes true (the next
        # firing once it has passed, a firing skipped while a sweep runs).
        while True:
            await asyncio.sleep(1.0)
            try:
                self._update_status()
            except Exception:
                # STATUS must not freeze silently (and the daemon must not die of it).
                log.exception("could not update STATUS")


async def _close(databases: Iterable[Database]) -> None:
    await asyncio.gather(*(db.close() for db in databases), return_exceptions=True)


def run_daemon(path: Path, config: Config, plugins: Plugins) -> int:
    return asyncio.run(Daemon(path, config, plugins).run())
