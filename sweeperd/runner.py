"""Runs a plan's work items concurrently, bounded, ordered, and isolated from each other.

Every item is one asyncio task that
1. waits for the items it depends on (same table, earlier phase), holding nothing meanwhile;
2. takes its tables (shared with every other sweep of the process), then its bounds narrowest
   first: the tenant's slot, the database's, the global one (a task never holds a global slot
   while it waits for a busy database, so other databases keep going), and only then a pooled
   connection, which is therefore free (sweeperd's own bookkeeping queries take the database's
   slot too, see Database.housekeeping);
3. runs the operation under its timeout; any exception becomes a ``failed`` result with a
   one-line reason (SQLSTATE included), like ``Promise.allSettled`` in the origin story.
Cancelling a task while its query runs makes psycopg cancel the query on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pluggy
import structlog
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span

from .db import STANDBY, Database
from .durations import format_duration
from .errors import describe_error, sqlstate_of
from .gates import Gate
from .limits import Bounds, Limits
from .model import Context, Result, Skip, Status
from .planner import Plan, WorkItem
from .report import SweepReport
from .stop import Stop
from .telemetry import telemetry
from .tracing import SweepTrace

log = structlog.get_logger("sweeperd.runner")


class Runner:
    """Executes plans against open databases; one instance may run many plans."""

    def __init__(
        self,
        databases: Mapping[str, Database],
        pm: pluggy.PluginManager,
        settings: Mapping[str, Mapping[str, Any]],
        bounds: Bounds | Limits,
    ) -> None:
        self.databases = databases
        self.pm = pm
        self.settings = settings
        self.bounds = bounds if isinstance(bounds, Bounds) else Bounds(bounds)
        for name, database in databases.items():
            # Bookkeeping (discovery, claims, history) counts against the same per-database cap.
            database.cap_housekeeping(self.bounds.per_database.get(name))

    async def run(
        self,
        plan: Plan,
        *,
        dry_run: bool = False,
        unreachable: Mapping[str, str] | None = None,
        gate: Gate | None = None,
        stop: Stop | None = None,
    ) -> SweepReport:
        """Run every item of ``plan``; never raises for an item's failure.

        ``unreachable`` maps database names that could not be opened to the reason; their items
        are reported ``failed`` with it, everything else still runs. ``gate`` is asked before
        each item starts (see :data:`Gate`). ``stop`` ends the run early, still with a report:
        unfinished items are cancelled (on the server too) and reported with the stop's reason.
        The plan's ``timeout`` is such a stop.
        """
        started = datetime.now(UTC)
        stop = stop or Stop()
        if plan.timeout is not None:
            stop.at(plan.timeout, "sweep timed out")
        run = _SweepRun(self, plan, dry_run, dict(unreachable or {}), gate)
        _notify(self.pm.hook.sweeperd_sweep_started, sweep=plan.sweep, items=len(plan.items))
        # Tasks copy the context they are created in: every item inherits the sweep's span and
        # log fields from here.
        with (
            trace.use_span(run.trace.span, end_on_exit=False),
            structlog.contextvars.bound_contextvars(sweep=plan.sweep),
        ):
            log.info("sweep started", items=len(plan.items), dry_run=dry_run)
            async with contextlib.AsyncExitStack() as using:
                # Idle connections close when the last sweep using a database ends: nothing an
                # operation left on a session outlives the sweep, and none are held between.
                for name in sorted({item.database for item in plan.items}):
                    if (database := self.databases.get(name)) is not None:
                        await using.enter_async_context(database.use())
                await self._warm(plan)
                await run.execute(stop)
            if run.stop_reason is not None:
                log.warning(
                    "sweep stopped early; unfinished operations cancelled", reason=run.stop_reason
                )
            report = SweepReport(
                sweep=plan.sweep,
                started_at=started,
                finished_at=datetime.now(UTC),
                results=run.results_in_plan_order(),
                unreachable=dict(unreachable or {}),
            )
            log.info("sweep finished", duration_s=round(report.duration_s, 3), **report.counts())
        run.trace.close(report.counts(), report.duration_s)
        _notify(self.pm.hook.sweeperd_sweep_finished, sweep=plan.sweep, results=report.results)
        return report

    async def _warm(self, plan: Plan) -> None:
        """Open the connections the plan will use at once, before it starts (concurrently)."""
        per_db = Counter(item.database for item in plan.items)
        await asyncio.gather(
            *(
                database.warm(min(items, self.bounds.limits.max_concurrency))
                for name, items in per_db.items()
                if (database := self.databases.get(name)) is not None
                and database.is_open
                and not database.in_recovery
            )
        )


class _SweepRun:
    """The state of one plan's execution."""

    def __init__(
        self,
        runner: Runner,
        plan: Plan,
        dry_run: bool,
        unreachable: dict[str, str],
        gate: Gate | None,
    ) -> None:
        self.runner = runner
        self.gate = gate
        self.plan = plan
        self.dry_run = dry_run
        self.unreachable = unreachable
        self.stop_reason: str | None = None
        # For items cancelled while running: what they had done so far (rows, details).
        self.partial: dict[int, Callable[[str], Result]] = {}
        self.trace = SweepTrace(telemetry(), plan)
        self.spans: dict[int, Span] = {}
        self.done = [asyncio.Event() for _ in plan.items]
        self.results: dict[int, Result] = {}
        # Calling a hook nobody implements still costs; ask once per sweep, not once per item.
        hook = runner.pm.hook
        self.has_veto = bool(hook.sweeperd_skip_operation.get_hookimpls())
        self.has_observers = bool(hook.sweeperd_operation_finished.get_hookimpls())

    async def execute(self, stop: Stop) -> None:
        """Run all items until they are done or ``stop`` fires; then cancel the rest, once.

        Each cancelled task records itself as cancelled and psycopg cancels its query on the
        server. A task is cancelled once only: a second cancel landing while psycopg is sending
        the server-side cancel would make it drop the connection instead.
        """
        tasks = [
            asyncio.create_task(self.run_item(item), name=f"sweeperd {item.label}")
            for item in self.plan.items
        ]
        if not tasks:
            return
        everything = asyncio.ensure_future(asyncio.wait(tasks))
        stopped = asyncio.ensure_future(stop.event.wait())
        try:
            await asyncio.wait(
                (everything, stopped), timeout=stop.remaining(), return_when=FIRST_COMPLETED
            )
            if not everything.done():
                # Before cancelling: the tasks read it for their reason.
                self.stop_reason = stop.why()
                await _cancel_and_wait(tasks)
        except asyncio.CancelledError:
            self.stop_reason = "cancelled"
            await _cancel_and_wait(tasks)
            raise
        finally:
            stopped.cancel()
            everything.cancel()

    def results_in_plan_order(self) -> list[Result]:
        out = []
        for item in self.plan.items:
            result = self.results.get(item.index)
            if result is None:
                reason = f"{self.stop_reason or 'cancelled'} before it started"
                result = _result(item, "cancelled", error=reason)
            out.append(result)
        return out

    async def run_item(self, item: WorkItem) -> None:
        # Task-local: every log line of this item carries its tenant and operation.
        structlog.contextvars.bind_contextvars(
            tenant=item.tenant.name if item.tenant else None, operation=item.operation.name
        )
        try:
            for dep in item.deps:
                await self.done[dep].wait()
            result = await self.bounded(item)
        except asyncio.CancelledError:
            reason = self.stop_reason or "cancelled"
            partial = self.partial.pop(item.index, None)
            self.finish(
                item, partial(reason) if partial else _result(item, "cancelled", error=reason)
            )
            raise
        except Exception as exc:
            # Outside the operation itself (a veto hook raised, ...): still this item's failure
            # only, and its dependents must not wait forever for it.
            result = _result(item, "failed", error=describe_error(exc))
        self.finish(item, result)

    def finish(self, item: WorkItem, result: Result) -> None:
        if item.index in self.results:
            return
        self.results[item.index] = result
        self.done[item.index].set()
        if self.has_observers:
            _notify(
                self.runner.pm.hook.sweeperd_operation_finished,
                result=result,
                sweep=self.plan.sweep,
            )
        span = self.spans.pop(item.index, None)
        if result.status == "failed":
            with trace.use_span(span or INVALID_SPAN, end_on_exit=False):
                log.warning("operation failed", database=result.database, error=result.error)
        self.trace.finish(item, span, result)

    async def bounded(self, item: WorkItem) -> Result:
        runner = self.runner
        if item.database in self.unreachable:
            return _result(
                item, "failed", error=f"database unreachable: {self.unreachable[item.database]}"
            )
        database = runner.databases[item.database]
        if database.in_recovery:
            return _result(item, "skipped", error=STANDBY)
        veto = self.has_veto and runner.pm.hook.sweeperd_skip_operation(
            operation=item.operation, tenant=item.tenant, sweep=self.plan.sweep
        )
        if veto:
            return _result(item, "skipped", error=str(veto))
        if self.dry_run and not item.operation.dry_run:
            # An operation that does not promise to honour ctx.dry_run is not run at all: a
            # third-party DELETE must never run because someone asked for a dry run.
            return _result(item, "dry-run", error=None)
        bounds = runner.bounds
        # Tables first (all of an item's at once), then the tenant's, the database's and the
        # global slot, narrowest first: waiting for a busy table holds no slot anybody needs.
        async with bounds.tables.hold((item.database, item.schema), item.operation.tables):
            if item.tenant is None:
                async with bounds.per_database[item.database], bounds.global_slots:
                    return await self.gated(item, database)
            tenant = (item.database, item.tenant.name)
            async with (
                bounds.tenants.hold(tenant, self.plan.per_tenant_concurrency),
                bounds.per_database[item.database],
                bounds.global_slots,
            ):
                return await self.gated(item, database)

    async def gated(self, item: WorkItem, database: Database) -> Result:
        # Asked after the wait for slots, which can be long: the answer may have changed.
        verdict = self.gate() if self.gate is not None else None
        if verdict is not None:
            status, reason = verdict
            return _result(item, status, error=reason)
        return await self.execute_item(item, database)

    async def execute_item(self, item: WorkItem, database: Database) -> Result:
        op = item.operation
        timeout = item.timeout
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        ctx: Context | None = None
        status: Status = "ok"
        rows: int | None = None
        error: str | None = None
        failure: BaseException | None = None
        span = self.spans[item.index] = self.trace.start(item, database)
        try:
            async with asyncio.timeout(timeout) as deadline:
                async with database.connection(item.label) as conn:
                    ctx = Context(
                        conn=conn,
                        operation=op,
                        tenant=item.tenant,
                        database=item.database,
                        dry_run=self.dry_run,
                        settings=self.runner.settings.get(op.plugin, {}),
                        log=log,  # tenant and operation come from the task's contextvars
                        sweep=self.plan.sweep,
                        server_version=database.server_version,
                        lock_timeout=database.config.lock_timeout,
                        statement_timeout=database.config.statement_timeout,
                    )
                    self.partial[item.index] = lambda reason: _result(
                        item,
                        "cancelled",
                        error=reason,
                        rows=_rows_so_far(ctx),
                        ctx=ctx,
                        since=(started_at, t0),
                    )
                    # Outcomes are recorded by tracing.SweepTrace (skips are not errors) and
                    # with redacted messages: no raw exception text (it may hold a DSN) on spans.
                    with trace.use_span(
                        span,
                        end_on_exit=False,
                        record_exception=False,
                        set_status_on_exception=False,
                    ):
                        rows = await op.run(ctx)
            if rows is not None and not isinstance(rows, int):
                raise TypeError(f"run() returned {type(rows).__name__}, expected int or None")
            status = "dry-run" if self.dry_run else "ok"
        except Skip as exc:
            status, error = "skipped", str(exc) or "skipped by the operation"
        except TimeoutError as exc:
            status, failure = "failed", exc
            if deadline.expired():
                error = (
                    f"TimeoutError: exceeded the operation timeout of "
                    f"{format_duration(timeout or 0)} (query cancelled on the server)"
                )
            else:
                error = describe_error(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, error, failure = "failed", describe_error(exc), exc
        self.partial.pop(item.index, None)
        if status == "failed" and rows is None and ctx is not None:
            rows = _rows_so_far(ctx)  # committed before it failed (retention's batches)
        return _result(
            item, status, error=error, rows=rows, ctx=ctx, since=(started_at, t0), failure=failure
        )


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        if not task.done() and not task.cancelling():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _details(ctx: Context) -> dict[str, Any]:
    # "rows" is the running count an operation keeps for partial results; the report has it.
    return {k: v for k, v in ctx.details.items() if k != "rows"}


def _rows_so_far(ctx: Context) -> int | None:
    rows = ctx.details.get("rows")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else None


def _result(
    item: WorkItem,
    status: Status,
    *,
    error: str | None,
    rows: int | None = None,
    ctx: Context | None = None,
    since: tuple[datetime, float] | None = None,
    failure: BaseException | None = None,
) -> Result:
    """An item's result; ``since`` is (started_at, perf_counter at start) if it ran at all."""
    started_at, t0 = since if since is not None else (None, None)
    return Result(
        tenant=item.tenant.name if item.tenant else None,
        database=item.database,
        schema=item.schema,
        operation=item.operation.name,
        status=status,
        rows=rows,
        started_at=started_at,
        finished_at=datetime.now(UTC) if since is not None else None,
        duration_s=time.perf_counter() - t0 if t0 is not None else None,
        error=error,
        details=_details(ctx) if ctx is not None else {},
        error_type=type(failure).__name__ if failure is not None else None,
        sqlstate=sqlstate_of(failure) if failure is not None else None,
    )


def _notify(hook: Any, **kwargs: Any) -> None:
    """Call an observer hook; an observer's exception is logged, never fatal to the sweep."""
    try:
        hook(**kwargs)
    except Exception as exc:
        log.error("plugin observer hook failed", hook=hook.name, error=describe_error(exc))
