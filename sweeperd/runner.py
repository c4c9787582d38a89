"""Runs a plan's work items concurrently, bounded, ordered, and isolated from each other.

Every item is one asyncio task that goes through these stages, in order:
1. its dependencies: it waits for the items it depends on (same table, earlier phase), holding
   nothing meanwhile;
2. refusals, which hold no slot: an unreachable or standby database, a plugin's veto, a dry run
   the operation does not promise to honour;
3. its slots: its tables (shared with every other sweep of the process), then its bounds
   narrowest first: the tenant's slot, the database's, the global one (a task never holds a
   global slot while it waits for a busy database, so other databases keep going);
4. the start check (the caller's :data:`~sweeperd.gates.Gate`), asked once it has its slots;
5. the attempt: a pooled connection, which its slots make sure is free (sweeperd's own
   bookkeeping queries take the database's slot too, see Database.cap_housekeeping), and the
   operation under its timeout; any exception becomes a ``failed`` result with a one-line reason
   (SQLSTATE included): one item's failure never stops the others.
Cancelling a task while its query runs makes psycopg cancel the query on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from asyncio import FIRST_COMPLETED
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pluggy
import structlog
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span

from .claimer import FiringClaims
from .db import STANDBY, AsyncConn, Database
from .durations import format_duration
from .errors import describe_error, sqlstate_of
from .expansion import expand
from .gates import Gate
from .limits import Bounds
from .model import Context, LeaseLost, Result, Skip, Status
from .planner import Plan, WorkItem
from .report import SweepReport
from .stop import Stop
from .telemetry import telemetry
from .throttle import Wait
from .tracing import SweepTrace

log = structlog.get_logger("sweeperd.runner")


class Runner:
    """Executes plans against open databases; one instance may run many plans."""

    def __init__(
        self,
        databases: Mapping[str, Database],
        pm: pluggy.PluginManager,
        settings: Mapping[str, Mapping[str, Any]],
        bounds: Bounds,
    ) -> None:
        self.databases = databases
        self.pm = pm
        self.settings = settings
        self.bounds = bounds
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
        claims: FiringClaims | None = None,
    ) -> SweepReport:
        """Run every item of ``plan``; never raises for an item's failure.

        ``unreachable`` maps database names that could not be opened to the reason; their items
        are reported ``failed`` with it, everything else still runs. ``gate`` is asked before
        each item starts (see :data:`~sweeperd.gates.Gate`). ``stop`` ends the run early, still
        with a report: unfinished items are cancelled (on the server too) and reported with the
        stop's reason. The plan's ``timeout`` is such a stop. ``claims``: the firing is shared
        with other instances; this run does the tenants it claims as it goes
        (:mod:`sweeperd.claimer`), and reports only those.
        """
        started = datetime.now(UTC)
        stop = stop or Stop()
        if plan.timeout is not None:
            stop.at(plan.timeout, "sweep timed out")
        async with contextlib.AsyncExitStack() as using:
            # Idle connections close when the last sweep using a database ends: nothing an
            # operation left on a session outlives the sweep, and none are held between.
            for name in sorted({item.database for item in plan.items}):
                if (database := self.databases.get(name)) is not None:
                    await using.enter_async_context(database.use())
            # Operations whose items are found now (Operation.expand): one query per database.
            plan = await expand(plan, self.databases, self.settings, dry_run=dry_run)
            run = _SweepRun(self, plan, dry_run, dict(unreachable or {}), gate, claims)
            _notify(self.pm.hook.sweeperd_sweep_started, sweep=plan.sweep, items=len(plan.items))
            # Tasks copy the context they are created in: every item inherits the sweep's span
            # and log fields from here.
            with (
                trace.use_span(run.trace.span, end_on_exit=False),
                structlog.contextvars.bound_contextvars(sweep=plan.sweep),
            ):
                log.info("sweep started", items=len(plan.items), dry_run=dry_run)
                if claims is not None:
                    await claims.begin(plan, self._capacity())
                try:
                    await self._warm(plan)
                    await run.execute(stop)
                finally:
                    if claims is not None:
                        await claims.end()
        with (
            trace.use_span(run.trace.span, end_on_exit=False),
            structlog.contextvars.bound_contextvars(sweep=plan.sweep),
        ):
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
                not_needed=dict(plan.not_needed),
            )
            log.info("sweep finished", duration_s=round(report.duration_s, 3), **report.counts())
        run.trace.close(report.counts(), report.duration_s)
        _notify(self.pm.hook.sweeperd_sweep_finished, sweep=plan.sweep, results=report.results)
        return report

    def _capacity(self) -> dict[str, int]:
        """Per database, how many operations can run there at once: how many tenants a run
        claims ahead (at least one operation each)."""
        limits = self.bounds.limits
        return {name: min(n, limits.max_concurrency) for name, n in limits.per_database.items()}

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
    """The state of one plan's execution, and the stages each of its items goes through."""

    def __init__(
        self,
        runner: Runner,
        plan: Plan,
        dry_run: bool,
        unreachable: dict[str, str],
        gate: Gate | None,
        claims: FiringClaims | None = None,
    ) -> None:
        self.runner = runner
        self.gate = gate
        self.claims = claims
        # Items of tenants another instance did (claims): not this run's, not in its report.
        self.foreign: set[int] = set()
        self.plan = plan
        self.dry_run = dry_run
        self.unreachable = unreachable
        self.stop_reason: str | None = None
        self.trace = SweepTrace(telemetry(), plan)
        # Items whose operation started and that have no result yet.
        self.attempts: dict[int, _Attempt] = {}
        self.done = [asyncio.Event() for _ in plan.items]
        self.results: dict[int, Result] = {}
        # Items holding a global slot now (pace() gives it back while an operation waits).
        self.holding_global: set[int] = set()
        # Throttled waits of items before their operation started (item index → the wait).
        self.waits: dict[int, Wait] = {}
        # Context.shared: one dict per database for every operation of this run.
        self.shared: defaultdict[str, dict[str, Any]] = defaultdict(dict)
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
            if item.index in self.foreign:
                continue
            result = self.results.get(item.index)
            if result is None:
                reason = f"{self.stop_reason or 'cancelled'} before it started"
                result = _not_run(item, "cancelled", reason)
            out.append(result)
        return out

    async def run_item(self, item: WorkItem) -> None:
        """An item's task: the stages in order; whatever happens, the item gets a result."""
        # Task-local: every log line of this item carries its tenant and operation.
        structlog.contextvars.bind_contextvars(
            tenant=item.tenant.name if item.tenant else None, operation=item.operation.name
        )
        try:
            if self.claims is not None:
                try:
                    decision = await self.claims.decide(item)
                except asyncio.CancelledError:
                    # Stopped before its tenant was claimed: nothing of it began.
                    reason = f"{self.stop_reason or 'cancelled'} before it started"
                    self.finish(item, _not_run(item, "cancelled", reason))
                    raise
                if decision is False:
                    self.foreign.add(item.index)
                    self.done[item.index].set()
                    return
                if isinstance(decision, str):
                    self.finish(item, _not_run(item, "failed", decision))
                    return
            for dep in item.deps:
                await self.done[dep].wait()
            result = self.refusal(item) or await self.in_slots(item)
        except asyncio.CancelledError:
            self.finish(item, self.cancelled(item))
            raise
        except Exception as exc:
            # Outside the operation itself (a veto hook raised, ...): still this item's failure
            # only, and its dependents must not wait forever for it.
            result = _not_run(item, "failed", describe_error(exc))
        self.finish(item, result)

    def refusal(self, item: WorkItem) -> Result | None:
        """Why the item does not run at all, known before it takes anything; None: it may."""
        if item.failure is not None:
            return _not_run(item, "failed", item.failure)
        if item.database in self.unreachable:
            reason = f"database unreachable: {self.unreachable[item.database]}"
            return _not_run(item, "failed", reason)
        if self.runner.databases[item.database].in_recovery:
            return _not_run(item, "skipped", STANDBY)
        veto = self.has_veto and self.runner.pm.hook.sweeperd_skip_operation(
            operation=item.operation, tenant=item.tenant, sweep=self.plan.sweep
        )
        if veto:
            return _not_run(item, "skipped", str(veto))
        if self.dry_run and not item.operation.dry_run:
            # An operation that does not promise to honour ctx.dry_run is not run at all: a
            # third-party DELETE must never run because someone asked for a dry run.
            return _not_run(item, "dry-run", None)
        return None

    async def in_slots(self, item: WorkItem) -> Result:
        """Take the item's tables, then tenant, database and global slot; check; attempt."""
        bounds = self.runner.bounds
        # Tables first (all of an item's at once), then the slots narrowest first: waiting for
        # a busy table holds no slot anybody needs, waiting for a busy database no global one.
        async with (
            bounds.tables.hold((item.database, item.schema), item.tables),
            self.tenant_slot(item),
        ):
            while True:
                # A throttled database holds back its own items only: they wait here, before
                # any slot, so every other database keeps all of max_concurrency.
                verdict = await self.until_open(item)
                if verdict is not None:
                    return verdict
                database_slot = bounds.per_database[item.database]
                # Nothing is awaited between the two slots but the slots themselves: see below.
                await database_slot.acquire(item.priority)
                released = False
                try:
                    await bounds.global_slots.acquire(item.priority)
                    self.holding_global.add(item.index)
                    try:
                        if not await self.still_open(item):
                            continue  # throttled meanwhile: give the slots back and wait
                        return (
                            self.start_check(item)
                            or self.lease_check(item)
                            or await self.attempt(item)
                        )
                    finally:
                        # The database's slot goes first, and its next item gets one turn of
                        # the loop to queue for the global slot (it awaits nothing in between):
                        # released the other way round, the global slot would go to whatever
                        # already waited for it, another database's less urgent item.
                        database_slot.release()
                        released = True
                        try:
                            await asyncio.sleep(0)
                        finally:
                            if item.index in self.holding_global:  # pace() may have lent it
                                self.holding_global.discard(item.index)
                                bounds.global_slots.release()
                finally:
                    if not released:
                        database_slot.release()

    async def until_open(self, item: WorkItem) -> Result | None:
        """Wait, holding no slot, while the item's database is known to be throttled or paused
        (Throttle.wait_known); the gate's result if it closed meanwhile."""
        throttle = self.runner.bounds.throttles.get(item.database)
        if throttle is None or self.dry_run or not throttle.throttled:
            return None
        waited, verdict = await throttle.wait_known(lambda: self.start_check(item))
        if waited.seconds:
            previous = self.waits.get(item.index)
            if previous is not None:
                for reason, seconds in waited.by_reason.items():
                    previous.add(reason, seconds)
            else:
                self.waits[item.index] = waited
        return verdict if isinstance(verdict, Result) else None

    async def still_open(self, item: WorkItem) -> bool:
        """With its slots: is the database still open? Sampled now on a connection the item's
        database slot makes room for, if the last sample is older than ``check_every``."""
        throttle = self.runner.bounds.throttles.get(item.database)
        if throttle is None or self.dry_run:
            return True
        if throttle.due():
            database = self.runner.databases[item.database]
            await throttle.sample(lambda: database.connection("throttle"))
        return not throttle.throttled

    def tenant_slot(self, item: WorkItem) -> contextlib.AbstractAsyncContextManager[None]:
        if item.tenant is None:
            return contextlib.nullcontext()
        tenant = (item.database, item.tenant.name)
        return self.runner.bounds.tenants.hold(tenant, self.plan.per_tenant_concurrency)

    def start_check(self, item: WorkItem) -> Result | None:
        """The caller's gate: None to go on, else the item's result without running it."""
        # Asked after the wait for slots, which can be long: the answer may have changed.
        expected = item.target.expected_s if item.target is not None else None
        verdict = self.gate(expected) if self.gate is not None else None
        if verdict is None:
            return None
        status, reason = verdict
        return _not_run(item, status, reason)

    def lease_check(self, item: WorkItem) -> Result | None:
        """Fencing: an instance whose lease on the tenant ran out (it was stopped, say) starts
        nothing more there; the instance that took the tenant over does it."""
        lost = self.claims.lost(item) if self.claims is not None else None
        return _not_run(item, "cancelled", lost) if lost is not None else None

    async def attempt(self, item: WorkItem) -> Result:
        """Run the operation on a pooled connection under its timeout; any error is its result
        (``failed``, or ``skipped`` for :class:`Skip`)."""
        database = self.runner.databases[item.database]
        attempt = self.attempts[item.index] = _Attempt(item, database, self.trace)
        rows: int | None = None
        try:
            async with asyncio.timeout(item.timeout) as deadline:
                async with database.connection(item.label) as conn:
                    attempt.ctx = self.context(item, database, conn)
                    throttle = self.runner.bounds.throttles.get(item.database)
                    if throttle is not None and throttle.gates and not self.dry_run:
                        # Where limits are set every result says how long it waited, 0 too.
                        attempt.ctx.details["throttled_s"] = 0.0
                    if (waited := self.waits.pop(item.index, None)) is not None:
                        _record_wait(attempt.ctx, waited, attempt.span, before_start=True)
                    # Outcomes are recorded by tracing.SweepTrace (skips are not errors) and
                    # with redacted messages: no raw exception text (it may hold a DSN) on spans.
                    with trace.use_span(
                        attempt.span,
                        end_on_exit=False,
                        record_exception=False,
                        set_status_on_exception=False,
                    ):
                        returned = await item.operation.run(attempt.ctx)
                    if self.claims is not None:
                        await self.claims.finished_on(item, conn)
            # Checked before it becomes the result's rows: a str there would fail the history.
            if returned is not None and not isinstance(returned, int):
                raise TypeError(f"run() returned {type(returned).__name__}, expected int or None")
            rows = returned
        except Skip as exc:
            return attempt.end("skipped", str(exc) or "skipped by the operation")
        except LeaseLost as exc:
            return attempt.end("cancelled", str(exc) or "lease lost", rows=rows)
        except TimeoutError as exc:
            if not deadline.expired():
                return attempt.end("failed", describe_error(exc), rows=rows, failure=exc)
            reason = (
                f"TimeoutError: exceeded the operation timeout of "
                f"{format_duration(item.timeout or 0)} (query cancelled on the server)"
            )
            return attempt.end("failed", reason, rows=rows, failure=exc)
        except Exception as exc:
            lost = self.claims.lost(item) if self.claims is not None else None
            if lost is not None:
                # Its session ended by the server (idle in transaction past the lease while
                # this process was stopped), say: the tenant is another instance's now.
                return attempt.end("cancelled", f"{lost} ({describe_error(exc)})", rows=rows)
            return attempt.end("failed", describe_error(exc), rows=rows, failure=exc)
        return attempt.end("dry-run" if self.dry_run else "ok", None, rows=rows)

    def context(self, item: WorkItem, database: Database, conn: AsyncConn) -> Context:
        op = item.operation
        return Context(
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
            shared=self.shared[item.database],
            target=item.target,
            details=dict(item.target.details) if item.target is not None else {},
            pacer=(
                functools.partial(self.pace, item)
                if item.database in self.runner.bounds.throttles
                else None
            ),
            fence=self.claims.fence(item) if self.claims is not None else None,
        )

    async def pace(self, item: WorkItem, ctx: Context) -> float:
        """Context.throttle(): sample on the operation's own connection; while throttled, wait
        with the global slot given back (other databases keep all of max_concurrency), then
        take it again; record what the wait cost."""
        throttle = self.runner.bounds.throttles[ctx.database]
        if throttle.fresh_and_open():
            return 0.0
        conn = ctx.conn

        @contextlib.asynccontextmanager
        async def own() -> AsyncIterator[AsyncConn]:
            yield conn

        if throttle.due():
            await throttle.sample(own)
        if not throttle.throttled:
            return 0.0
        slots = self.runner.bounds.global_slots
        self.holding_global.discard(item.index)
        slots.release()
        # Cancelled while waiting, it holds no global slot: in_slots knows (holding_global).
        waited = await throttle.wait(own)
        await slots.acquire(item.priority)
        self.holding_global.add(item.index)
        if not waited.seconds:
            return 0.0
        _record_wait(ctx, waited, trace.get_current_span(), before_start=False)
        return waited.seconds

    def cancelled(self, item: WorkItem) -> Result:
        """An item's result when its task is cancelled: what it had done so far if it ran."""
        reason = self.stop_reason or "cancelled"
        attempt = self.attempts.get(item.index)
        partial = attempt.cut_short(reason) if attempt is not None else None
        return partial or _not_run(item, "cancelled", reason)

    def finish(self, item: WorkItem, result: Result) -> None:
        if item.index in self.results:
            return
        self.results[item.index] = result
        self.done[item.index].set()
        if self.claims is not None:
            self.claims.item_done(item, result)
        if self.has_observers:
            _notify(
                self.runner.pm.hook.sweeperd_operation_finished,
                result=result,
                sweep=self.plan.sweep,
            )
        attempt = self.attempts.pop(item.index, None)
        span = attempt.span if attempt is not None else None
        if result.status == "failed":
            with trace.use_span(span or INVALID_SPAN, end_on_exit=False):
                log.warning("operation failed", database=result.database, error=result.error)
        self.trace.finish(item, span, result)


class _Attempt:
    """One item's attempt at its operation: when it began, its span and, once it has a
    connection, its context, which holds what it did so far (``details``, the ``rows`` count)."""

    def __init__(self, item: WorkItem, database: Database, sweep_trace: SweepTrace) -> None:
        self.item = item
        self.started_at = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.span = sweep_trace.start(item, database)
        self.ctx: Context | None = None
        self.ended = False

    def end(
        self,
        status: Status,
        error: str | None,
        *,
        rows: int | None = None,
        failure: BaseException | None = None,
    ) -> Result:
        """Its result; failed, it still reports the rows it committed before (retention's
        batches)."""
        self.ended = True
        if status in ("failed", "cancelled") and rows is None and self.ctx is not None:
            rows = _rows_so_far(self.ctx)
        return self._result(status, error, rows, failure)

    def cut_short(self, reason: str) -> Result | None:
        """Its result when cancelled while the operation ran (None: it was not running)."""
        if self.ctx is None or self.ended:
            return None
        return self._result("cancelled", reason, _rows_so_far(self.ctx), None)

    def _result(
        self, status: Status, error: str | None, rows: int | None, failure: BaseException | None
    ) -> Result:
        return replace(
            _not_run(self.item, status, error),
            rows=rows,
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            duration_s=time.perf_counter() - self.t0,
            details=_details(self.ctx) if self.ctx is not None else {},
            error_type=type(failure).__name__ if failure is not None else None,
            sqlstate=sqlstate_of(failure) if failure is not None else None,
        )


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        if not task.done() and not task.cancelling():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _not_run(item: WorkItem, status: Status, error: str | None) -> Result:
    """The result of an item whose operation did not start (no times or rows; the details its
    plan-time target came with, which say what it was for)."""
    return Result(
        tenant=item.tenant.name if item.tenant else None,
        database=item.database,
        schema=item.schema,
        operation=item.operation.name,
        status=status,
        rows=None,
        started_at=None,
        finished_at=None,
        duration_s=None,
        error=error,
        details=dict(item.target.details) if item.target is not None else {},
        target=item.target.name if item.target is not None else None,
    )


def _record_wait(ctx: Context, waited: Wait, span: Span, *, before_start: bool) -> None:
    """A throttled wait in the result's details, the metric and the operation's span."""
    details = ctx.details
    details["throttled_s"] = round(details.get("throttled_s", 0.0) + waited.seconds, 3)
    by = details.setdefault("throttled_by", {})
    for reason, seconds in waited.by_reason.items():
        by[reason] = round(by.get(reason, 0.0) + seconds, 3)
        telemetry().throttled.add(
            seconds, {"sweeperd.database": ctx.database, "sweeperd.reason": reason}
        )
    span.add_event(
        "throttled",
        {
            "sweeperd.throttled_s": waited.seconds,
            "sweeperd.throttle.reasons": sorted(waited.by_reason),
            "sweeperd.throttle.before_start": before_start,
        },
    )


def _details(ctx: Context) -> dict[str, Any]:
    # "rows" is the running count an operation keeps for partial results; the report has it.
    return {k: v for k, v in ctx.details.items() if k != "rows"}


def _rows_so_far(ctx: Context) -> int | None:
    rows = ctx.details.get("rows")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else None


def _notify(hook: Any, **kwargs: Any) -> None:
    """Call an observer hook; an observer's exception is logged, never fatal to the sweep."""
    try:
        hook(**kwargs)
    except Exception as exc:
        log.error("plugin observer hook failed", hook=hook.name, error=describe_error(exc))
