"""The runner against a real PostgreSQL: bounds, ordering, isolation, cancellation, safe names.

Operations are built here (``sweeperd.Operation`` with async ``run`` functions using ``ctx.conn``)
and run through :func:`sweeperd.sweep.sweep_once`, exactly as ``sweeperd sweep`` runs them.
Concurrency is measured on the server (``pg_stat_activity``), never inferred from wall-clock time;
nothing here asserts how long something took.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as psql
from support import Role, run_sql, throwaway_role

import sweeperd
from sweeperd import Context, Operation, Phase
from sweeperd.config import Config, parse_config
from sweeperd.db import Database
from sweeperd.limits import Bounds, Limits
from sweeperd.model import Result, Tenant
from sweeperd.planner import make_plan
from sweeperd.plugins import Plugins, new_plugin_manager
from sweeperd.report import SweepReport
from sweeperd.runner import Runner
from sweeperd.sweep import sweep_once

SWEEP = "x"
UNREACHABLE_DSN = "host=/nonexistent dbname=x connect_timeout=1"

# -- helpers ---------------------------------------------------------------------------------------


def make_config(
    dsn: str,
    tenants: Iterable[tuple[str, str] | tuple[str, str, str]],
    *,
    max_concurrency: int = 16,
    max_connections: int = 8,
    per_tenant_concurrency: int = 4,
    sweep_timeout: str | None = None,
    lock_timeout: str | None = None,
    databases: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """A config with database "main" (= dsn), the given tenants and one sweep "x" of everything.

    ``tenants`` are (name, schema) on "main", or (name, schema, database).
    """
    main: dict[str, Any] = {"dsn": dsn, "max_connections": max_connections}
    if lock_timeout is not None:
        main["lock_timeout"] = lock_timeout
    sweep: dict[str, Any] = {
        "cron": "0 3 * * *",
        "operations": ["*"],
        "tenants": ["*"],
        "per_tenant_concurrency": per_tenant_concurrency,
    }
    if sweep_timeout is not None:
        sweep["timeout"] = sweep_timeout
    doc = {
        "daemon": {"max_concurrency": max_concurrency},
        "history": {"enabled": False},
        "databases": {"main": main, **{k: dict(v) for k, v in (databases or {}).items()}},
        "tenants": [
            {"name": t[0], "schema": t[1], "database": t[2] if len(t) > 2 else "main"}
            for t in tenants
        ],
        "sweeps": {SWEEP: sweep},
    }
    return parse_config(doc, Path("t.toml"))


def make_plugins(operations: Iterable[Operation], *hook_objects: object) -> Plugins:
    pm = new_plugin_manager()
    for i, obj in enumerate(hook_objects):
        pm.register(obj, name=f"test_hooks_{i}")
    return Plugins(pm=pm, infos=(), operations={o.name: o for o in operations})


def sweep(
    config: Config, operations: Iterable[Operation], *hook_objects: object, dry_run: bool = False
) -> SweepReport:
    return asyncio.run(
        sweep_once(config, make_plugins(operations, *hook_objects), sweep=SWEEP, dry_run=dry_run)
    )


def results_by(report: SweepReport) -> dict[tuple[str | None, str], Result]:
    """(tenant, operation) → result; database-scope items are keyed by the database name."""
    out = {}
    for r in report.results:
        key = (r.tenant if r.tenant is not None else r.database, r.operation)
        assert key not in out, f"duplicate result {key}"
        out[key] = r
    return out


def create_tenants(dsn: str, schemas: Iterable[str], tables: Iterable[str] = ()) -> None:
    stmts: list[Any] = []
    for schema in schemas:
        stmts.append(psql.SQL("CREATE SCHEMA {}").format(psql.Identifier(schema)))
        for table in tables:
            stmts.append(
                psql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(
                    psql.Identifier(schema, table)
                )
            )
    run_sql(dsn, *stmts)


def sleeper(seconds: float) -> Callable[[Context], Awaitable[int | None]]:
    async def run(ctx: Context) -> int | None:
        await ctx.conn.execute("SELECT pg_sleep(%s)", (seconds,))
        return None

    return run


def sleep_op(name: str, table: str, seconds: float = 0.2, **kw: Any) -> Operation:
    return Operation(name=name, run=sleeper(seconds), tables=(table,), **kw)


class ActivitySampler:
    """Polls pg_stat_activity from a thread; records the sweeperd queries running at each sample.

    A sample is the list of ``application_name`` values ("sweeperd: <operation> <tenant>") of
    backends actively running a ``pg_sleep``.
    """

    QUERY = """
        SELECT application_name FROM pg_catalog.pg_stat_activity
        WHERE application_name LIKE 'sweeperd:%' AND state = 'active'
          AND query LIKE '%pg_sleep%' AND pid <> pg_catalog.pg_backend_pid()
    """

    def __init__(self, dsn: str, interval: float = 0.005) -> None:
        self.dsn = dsn
        self.interval = interval
        self.samples: list[list[str]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self._ready.set()
                while not self._stop.is_set():
                    rows = conn.execute(self.QUERY).fetchall()
                    self.samples.append([r[0] for r in rows])
                    self._stop.wait(self.interval)
        except BaseException as exc:  # surfaced in __exit__
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ActivitySampler:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def max_overall(self) -> int:
        return max((len(s) for s in self.samples), default=0)

    def max_by(self, key: Callable[[str], str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for sample in self.samples:
            for k, n in Counter(key(name) for name in sample).items():
                out[k] = max(out.get(k, 0), n)
        return out


def tenant_of(application_name: str) -> str:
    return application_name.rsplit(" ", 1)[1]


def active_sweeperd_queries(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, query FROM pg_catalog.pg_stat_activity "
            "WHERE application_name LIKE 'sweeperd%' AND state <> 'idle' "
            "AND pid <> pg_catalog.pg_backend_pid()"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def wait_until_no_sweeperd_queries(dsn: str, within: float = 10.0) -> list[tuple[str, str]]:
    """Poll until no sweeperd backend is busy; return what was still busy at the deadline.

    The deadline is generous on purpose: a query that was not cancelled on the server keeps
    running for a minute, far beyond it.
    """
    deadline = time.monotonic() + within
    while True:
        busy = active_sweeperd_queries(dsn)
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.05)


ERROR_ONE_LINE = "\n"

# -- Guarantee 1: bounded --------------------------------------------------------------------------


def test_global_max_concurrency_is_never_exceeded_and_is_reached(pg_dsn: str) -> None:
    tenants = [(f"t{i}", f"tenant_t{i}") for i in range(4)]
    create_tenants(pg_dsn, (s for _, s in tenants))
    config = make_config(
        pg_dsn, tenants, max_concurrency=3, max_connections=8, per_tenant_concurrency=4
    )
    operations = [sleep_op("nap.a", "a"), sleep_op("nap.b", "b")]  # 8 items, all independent
    with ActivitySampler(pg_dsn) as sampler:
        report = sweep(config, operations)
    assert report.counts()["ok"] == 8, report.to_json()
    print("global: max concurrent operations seen", sampler.max_overall())
    assert sampler.max_overall() == 3


def test_per_database_max_connections_is_never_exceeded_and_is_reached(pg_dsn: str) -> None:
    # Two configured databases (the same physical database, told apart by tenant names).
    tenants = [("m1", "s_m1"), ("m2", "s_m2"), ("o1", "s_o1", "second"), ("o2", "s_o2", "second")]
    create_tenants(pg_dsn, (t[1] for t in tenants))
    config = make_config(
        pg_dsn,
        tenants,
        max_concurrency=16,
        max_connections=2,
        per_tenant_concurrency=4,
        databases={"second": {"dsn": pg_dsn, "max_connections": 3}},
    )
    operations = [sleep_op(f"nap.{t}", t) for t in "abc"]  # 6 items per database
    with ActivitySampler(pg_dsn) as sampler:
        report = sweep(config, operations)
    assert report.counts()["ok"] == 12, report.to_json()
    per_db = sampler.max_by(lambda name: "main" if tenant_of(name).startswith("m") else "second")
    print("per database: max concurrent operations seen", per_db)
    assert per_db == {"main": 2, "second": 3}


def test_per_tenant_concurrency_is_never_exceeded_and_is_reached(pg_dsn: str) -> None:
    tenants = [(f"t{i}", f"tenant_t{i}") for i in range(3)]
    create_tenants(pg_dsn, (s for _, s in tenants))
    config = make_config(
        pg_dsn, tenants, max_concurrency=16, max_connections=16, per_tenant_concurrency=2
    )
    operations = [sleep_op(f"nap.{t}", t) for t in "abcde"]  # 5 independent items per tenant
    with ActivitySampler(pg_dsn) as sampler:
        report = sweep(config, operations)
    assert report.counts()["ok"] == 15, report.to_json()
    per_tenant = sampler.max_by(tenant_of)
    print(
        "per tenant: max concurrent operations seen", per_tenant, "overall", sampler.max_overall()
    )
    assert per_tenant == {"t0": 2, "t1": 2, "t2": 2}
    assert sampler.max_overall() == 6


def test_bookkeeping_takes_the_database_slot_once_a_runner_runs_the_database(pg_dsn: str) -> None:
    """Discovery, claims and history (Database.housekeeping) count against the slots the runner's
    operations take; a database no runner was given yet (being opened) takes none."""
    config = make_config(pg_dsn, [], max_connections=2)

    async def main() -> tuple[bool, bool]:
        database = Database(config.databases["main"])
        await database.open()
        try:
            bounds = Bounds(Limits.of(config))
            slot = bounds.per_database["main"]
            for _ in range(2):
                await slot.acquire()  # as if two operations were running

            async def bookkeeping() -> None:
                async with database.housekeeping("test") as conn:
                    await conn.execute("SELECT 1")

            await asyncio.wait_for(bookkeeping(), 10)  # no runner yet: no slot taken
            Runner({"main": database}, new_plugin_manager(), {}, bounds)
            waiting = asyncio.ensure_future(bookkeeping())
            await asyncio.sleep(0.2)
            waited = not waiting.done()
            slot.release()  # an operation finished
            await asyncio.wait_for(waiting, 10)
            return waited, not slot.locked()
        finally:
            await database.close()

    waited, given_back = asyncio.run(main())
    assert waited, "housekeeping ran while every slot of the database was taken"
    assert given_back, "housekeeping did not give its slot back"


# -- ordering: same table serialized, prune before vacuum, different tables concurrent -------------


def test_same_table_serialized_prune_before_vacuum_other_tables_concurrent(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme", "tenant_globex"])
    running_on_t: dict[str, int] = {"acme": 0, "globex": 0}
    max_on_t: dict[str, int] = {"acme": 0, "globex": 0}
    barrier: dict[str, asyncio.Event] = {}

    def on_t(seconds: float) -> Callable[[Context], Awaitable[int | None]]:
        async def run(ctx: Context) -> int | None:
            assert ctx.tenant is not None
            name = ctx.tenant.name
            running_on_t[name] += 1
            max_on_t[name] = max(max_on_t[name], running_on_t[name])
            try:
                await ctx.conn.execute("SELECT pg_sleep(%s)", (seconds,))
            finally:
                running_on_t[name] -= 1
            return None

        return run

    def meet(mine: str, other: str) -> Callable[[Context], Awaitable[int | None]]:
        # Each of the two operations waits until the other has started: they can only both
        # finish if they run at the same time.
        async def run(ctx: Context) -> int | None:
            assert ctx.tenant is not None
            await ctx.conn.execute("SELECT 1")
            barrier.setdefault(f"{ctx.tenant.name} {mine}", asyncio.Event()).set()
            ev = barrier.setdefault(f"{ctx.tenant.name} {other}", asyncio.Event())
            await asyncio.wait_for(ev.wait(), 10)
            await ctx.conn.execute("SELECT pg_sleep(0.05)")
            return None

        return run

    operations = [
        # Declared vacuum first, prune last: the phase decides, not the declaration.
        Operation(name="vacuum.t", run=on_t(0.15), tables=("t",), phase=Phase.MAINTAIN),
        Operation(name="app.t", run=on_t(0.15), tables=("t",)),
        Operation(name="retention.t", run=on_t(0.15), tables=("t",), phase=Phase.PRUNE),
        Operation(name="app.u", run=meet("u", "w"), tables=("u",)),
        Operation(name="app.w", run=meet("w", "u"), tables=("w",)),
    ]
    report = sweep(
        make_config(pg_dsn, [("acme", "tenant_acme"), ("globex", "tenant_globex")]), operations
    )
    assert report.counts()["ok"] == 10, report.to_json()
    assert max_on_t == {"acme": 1, "globex": 1}
    res = results_by(report)
    for tenant in ("acme", "globex"):
        prune, app, vacuum = (res[(tenant, n)] for n in ("retention.t", "app.t", "vacuum.t"))
        assert prune.finished_at is not None and app.started_at is not None
        assert prune.finished_at <= app.started_at
        assert app.finished_at is not None and vacuum.started_at is not None
        assert app.finished_at <= vacuum.started_at
        u, w = res[(tenant, "app.u")], res[(tenant, "app.w")]
        assert u.started_at and u.finished_at and w.started_at and w.finished_at
        assert u.started_at < w.finished_at and w.started_at < u.finished_at


# -- Guarantee 2: isolated -------------------------------------------------------------------------


@pytest.fixture
def nopriv_role(pg_dsn: str) -> Iterator[Role]:
    """A throw-away LOGIN role with no privileges of its own (dropped after the test)."""
    with throwaway_role(pg_dsn, "sweeperd_r") as made:
        yield made


def test_failures_are_isolated_and_reported_with_their_reason(
    pg_dsn: str, nopriv_role: Role
) -> None:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_acme",
        "CREATE SCHEMA tenant_globex",
        "CREATE TABLE tenant_acme.good (id int)",
        "CREATE TABLE tenant_globex.good (id int)",
        "CREATE TABLE tenant_acme.locked_t (id int)",
        "CREATE TABLE tenant_acme.secret (id int)",
    )
    limited_dsn = nopriv_role.dsn(pg_dsn)
    config = make_config(
        pg_dsn,
        [
            ("acme", "tenant_acme"),
            ("globex", "tenant_globex"),
            ("acme_limited", "tenant_acme", "limited"),
        ],
        lock_timeout="200ms",
        databases={"limited": {"dsn": limited_dsn, "lock_timeout": "200ms"}},
    )

    def only(tenant: str, fn: Callable[[Context], Awaitable[int | None]]) -> Any:
        """The failure happens for one tenant; everywhere else the operation is a no-op."""

        async def run(ctx: Context) -> int | None:
            if ctx.tenant is None or ctx.tenant.name != tenant:
                await ctx.conn.execute("SELECT 1")
                return None
            return await fn(ctx)

        return run

    async def raises(ctx: Context) -> int | None:
        raise ValueError("boom: a plugin bug")

    async def slow(ctx: Context) -> int | None:
        await ctx.conn.execute("SELECT pg_sleep(30)")
        return None

    async def locked(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(psql.SQL("DELETE FROM {}").format(ctx.table("locked_t")))
        return cur.rowcount

    async def denied(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(
            psql.SQL("SELECT count(*) FROM {}").format(ctx.table("secret"))
        )
        row = await cur.fetchone()
        return row[0] if row else None

    async def missing(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(psql.SQL("DELETE FROM {}").format(ctx.table("no_such_table")))
        return cur.rowcount

    async def good(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(
            psql.SQL("INSERT INTO {} VALUES (1)").format(ctx.table("good"))
        )
        return cur.rowcount

    operations = [
        Operation(name="bad.raises", run=only("acme", raises), tables=("r",)),
        Operation(name="bad.timeout", run=only("acme", slow), tables=("s",), timeout=0.5),
        Operation(name="bad.locked", run=only("acme", locked), tables=("locked_t",)),
        Operation(name="bad.denied", run=only("acme_limited", denied), tables=("secret",)),
        Operation(name="bad.missing", run=only("acme", missing), tables=("no_such_table",)),
        Operation(name="good.insert", run=only("globex", good), tables=("good",)),
        Operation(name="good.insert_acme", run=only("acme", good), tables=("good",)),
        Operation(name="good.select", run=sleeper(0.01), tables=("other",)),
    ]
    with psycopg.connect(pg_dsn) as holder:  # not autocommit: the lock is held until rollback
        holder.execute("LOCK TABLE tenant_acme.locked_t IN ACCESS EXCLUSIVE MODE")
        report = sweep(config, operations)
        holder.rollback()

    res = results_by(report)
    expected_failures = {
        ("acme", "bad.raises"): ("ValueError", "boom: a plugin bug"),
        ("acme", "bad.timeout"): ("timeout",),
        ("acme", "bad.locked"): ("55P03",),
        ("acme_limited", "bad.denied"): ("42501",),
        ("acme", "bad.missing"): ("42P01",),
    }
    for key, r in res.items():
        if key in expected_failures:
            assert r.status == "failed", (key, r)
            assert r.error, key
            assert ERROR_ONE_LINE not in r.error, (key, r.error)
            for fragment in expected_failures[key]:
                assert fragment.lower() in r.error.lower(), (key, r.error)
        else:
            assert r.status == "ok", (key, r)
            assert r.error is None
    assert set(expected_failures) <= set(res)
    assert len(res) == 8 * 3
    assert res[("acme", "good.insert_acme")].rows == 1
    assert res[("globex", "good.insert")].rows == 1
    assert report.exit_code() == 1
    assert report.counts()["failed"] == 5
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM tenant_acme.good").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM tenant_globex.good").fetchone() == (1,)
    assert wait_until_no_sweeperd_queries(pg_dsn) == []


def test_operation_timeout_cancels_the_query_on_the_server(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme"])

    async def probe(ctx: Context) -> int | None:
        # Runs right after the timed-out operation (same table, later phase): its query must be
        # gone from the server already, not merely abandoned by the client.
        cur = await ctx.conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%pg_sleep(60)%' AND pid <> pg_catalog.pg_backend_pid()"
        )
        row = await cur.fetchone()
        return row[0] if row else None

    async def slow(ctx: Context) -> int | None:
        await ctx.conn.execute("SELECT pg_sleep(60)")
        return None

    operations = [
        Operation(name="slow.t", run=slow, tables=("t",), timeout=0.5),
        Operation(name="probe.t", run=probe, tables=("t",), phase=Phase.MAINTAIN),
    ]
    report = sweep(make_config(pg_dsn, [("acme", "tenant_acme")]), operations)
    res = results_by(report)
    assert res[("acme", "slow.t")].status == "failed"
    assert "timeout" in (res[("acme", "slow.t")].error or "").lower()
    assert res[("acme", "probe.t")].status == "ok"
    assert res[("acme", "probe.t")].rows == 0
    assert wait_until_no_sweeperd_queries(pg_dsn) == []


def test_sweep_timeout_cancels_everything_on_the_server(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme", "tenant_globex"])
    operations = [
        sleep_op("slow.a", "a", 60),
        sleep_op("slow.b", "b", 60),
        sleep_op("slow.c", "c", 60),  # waits for a per-tenant slot
        sleep_op("slow.a_later", "a", 60, phase=Phase.MAINTAIN),  # waits for slow.a
    ]
    config = make_config(
        pg_dsn,
        [("acme", "tenant_acme"), ("globex", "tenant_globex")],
        per_tenant_concurrency=2,
        sweep_timeout="1s",
    )
    with ActivitySampler(pg_dsn) as sampler:
        report = sweep(config, operations)
    assert sampler.max_overall() == 4, "the sleeps were running when the sweep timed out"
    assert len(report.results) == 8
    assert [r.status for r in report.results] == ["cancelled"] * 8, report.to_json()
    assert report.counts()["cancelled"] == 8
    assert report.exit_code() == 1
    # The cancel happens on the server: nothing of ours is still sleeping there.
    assert wait_until_no_sweeperd_queries(pg_dsn) == []
    # And every item says why (the sweep's timeout), in one line.
    for r in report.results:
        assert r.error and ERROR_ONE_LINE not in r.error
        assert "timed out" in r.error, r


# -- Guarantee 3: safe names -----------------------------------------------------------------------

HOSTILE_SCHEMAS = [
    'Tenant "Quoted" Name',
    "semi;colon'; DROP TABLE public.victim; --",
    "Ünïcödé スキーマ",
    "L" * 61 + "é",  # exactly 63 bytes: the longest name PostgreSQL keeps untruncated
]
HOSTILE_TABLES = [
    'x"; DROP TABLE victim; --',
    "Robert'); DROP TABLE public.victim;--",
    "Mixed Case Täble",
]
HOSTILE_COLUMN = 'when"; DELETE FROM public.victim; --'


def test_hostile_schema_table_and_column_names_are_quoted(pg_dsn: str) -> None:
    assert len(HOSTILE_SCHEMAS[3].encode()) == 63
    stmts: list[Any] = [
        "CREATE TABLE public.victim (id int)",
        "INSERT INTO public.victim VALUES (1)",
    ]
    for schema in HOSTILE_SCHEMAS:
        stmts.append(psql.SQL("CREATE SCHEMA {}").format(psql.Identifier(schema)))
        for table in HOSTILE_TABLES:
            ident = psql.Identifier(schema, table)
            stmts.append(
                psql.SQL("CREATE TABLE {} (id int, {} int)").format(
                    ident, psql.Identifier(HOSTILE_COLUMN)
                )
            )
            stmts.append(
                psql.SQL("INSERT INTO {} SELECT g, g FROM generate_series(1, 10) g").format(ident)
            )
    run_sql(pg_dsn, *stmts)
    tenants = [(f'tenant "{i}"; --', schema) for i, schema in enumerate(HOSTILE_SCHEMAS)]
    config = make_config(pg_dsn, tenants)

    def deleter(table: str) -> Callable[[Context], Awaitable[int | None]]:
        async def run(ctx: Context) -> int | None:
            cur = await ctx.conn.execute(
                sweeperd.sql.SQL("DELETE FROM {} WHERE {} <= %s").format(
                    ctx.table(table), sweeperd.sql.Identifier(HOSTILE_COLUMN)
                ),
                (4,),
            )
            return cur.rowcount

        return run

    operations = [
        Operation(name=f"hostile.t{i}", run=deleter(t), tables=(t,))
        for i, t in enumerate(HOSTILE_TABLES)
    ]
    report = sweep(config, operations)
    assert report.counts()["ok"] == len(HOSTILE_SCHEMAS) * len(HOSTILE_TABLES), report.to_json()
    assert all(r.rows == 4 for r in report.results), report.to_json()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM public.victim").fetchone() == (1,)
        for schema in HOSTILE_SCHEMAS:
            for table in HOSTILE_TABLES:
                q = psql.SQL("SELECT min(id), count(*) FROM {}").format(
                    psql.Identifier(schema, table)
                )
                assert conn.execute(q).fetchone() == (5, 6), (schema, table)
        # Nothing created or dropped behind our back.
        names = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    expected = {("public", "victim")} | {(s, t) for s in HOSTILE_SCHEMAS for t in HOSTILE_TABLES}
    assert set(names) == expected


# -- dry run, hooks --------------------------------------------------------------------------------


def test_dry_run_runs_only_operations_that_promise_to_honour_it(pg_dsn: str) -> None:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_acme",
        "CREATE TABLE tenant_acme.t (id int)",
        "INSERT INTO tenant_acme.t SELECT generate_series(1, 7)",
    )
    calls: list[tuple[str, bool]] = []

    async def unsafe(ctx: Context) -> int | None:
        calls.append(("unsafe", ctx.dry_run))
        cur = await ctx.conn.execute(psql.SQL("DELETE FROM {}").format(ctx.table("t")))
        return cur.rowcount

    async def honest(ctx: Context) -> int | None:
        calls.append(("honest", ctx.dry_run))
        if ctx.dry_run:
            cur = await ctx.conn.execute(psql.SQL("SELECT count(*) FROM {}").format(ctx.table("t")))
            row = await cur.fetchone()
            return row[0] if row else None
        cur = await ctx.conn.execute(psql.SQL("DELETE FROM {}").format(ctx.table("t")))
        return cur.rowcount

    operations = [
        Operation(name="dry.unsafe", run=unsafe, tables=("t",)),
        Operation(name="dry.honest", run=honest, tables=("t",), dry_run=True),
    ]
    report = sweep(make_config(pg_dsn, [("acme", "tenant_acme")]), operations, dry_run=True)
    res = results_by(report)
    assert res[("acme", "dry.unsafe")].status == "dry-run"
    assert res[("acme", "dry.unsafe")].rows is None
    assert res[("acme", "dry.honest")].status == "dry-run"
    assert res[("acme", "dry.honest")].rows == 7
    assert calls == [("honest", True)]
    assert report.exit_code() == 0
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM tenant_acme.t").fetchone() == (7,)


def test_skip_hook_vetoes_and_a_raising_observer_does_not_fail_the_sweep(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme", "tenant_globex"])
    ran: list[tuple[str, str]] = []
    observed: list[tuple[str | None, str, str]] = []

    class Hooks:
        @sweeperd.hookimpl
        def sweeperd_skip_operation(
            self, operation: Operation, tenant: sweeperd.Tenant | None, sweep: str
        ) -> str | None:
            if operation.name == "hook.vetoed" and tenant is not None and tenant.name == "acme":
                return "tenant acme is on legal hold"
            return None

        @sweeperd.hookimpl
        def sweeperd_operation_finished(self, result: Result, sweep: str) -> None:
            observed.append((result.tenant, result.operation, result.status))
            raise RuntimeError("observer bug")

        @sweeperd.hookimpl
        def sweeperd_sweep_finished(self, sweep: str, results: Sequence[Result]) -> None:
            raise RuntimeError("observer bug at the end")

    def recorder(name: str) -> Callable[[Context], Awaitable[int | None]]:
        async def run(ctx: Context) -> int | None:
            assert ctx.tenant is not None
            await ctx.conn.execute("SELECT 1")
            ran.append((ctx.tenant.name, name))
            return None

        return run

    operations = [
        Operation(name="hook.vetoed", run=recorder("hook.vetoed"), tables=("a",)),
        Operation(name="hook.other", run=recorder("hook.other"), tables=("b",)),
    ]
    report = sweep(
        make_config(pg_dsn, [("acme", "tenant_acme"), ("globex", "tenant_globex")]),
        operations,
        Hooks(),
    )
    res = results_by(report)
    vetoed = res[("acme", "hook.vetoed")]
    assert vetoed.status == "skipped"
    assert vetoed.error == "tenant acme is on legal hold"
    assert ("acme", "hook.vetoed") not in ran
    for key in [("globex", "hook.vetoed"), ("acme", "hook.other"), ("globex", "hook.other")]:
        assert res[key].status == "ok", res[key]
    assert sorted(ran) == [
        ("acme", "hook.other"),
        ("globex", "hook.other"),
        ("globex", "hook.vetoed"),
    ]
    assert sorted(observed) == sorted((r.tenant, r.operation, r.status) for r in report.results)
    assert report.exit_code() == 0


# -- unreachable database --------------------------------------------------------------------------


def test_unreachable_database_fails_its_items_and_the_rest_still_runs(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme"])
    config = make_config(
        pg_dsn,
        [("acme", "tenant_acme"), ("lost", "tenant_lost", "gone")],
        databases={"gone": {"dsn": UNREACHABLE_DSN, "connect_timeout": "1s"}},
    )

    async def per_db(ctx: Context) -> int | None:
        await ctx.conn.execute("SELECT 1")
        return None

    operations = [
        sleep_op("app.work", "t", 0.01),
        Operation(name="app.db_wide", run=per_db, tables=("public.sessions",), scope="database"),
    ]
    report = sweep(config, operations)
    res = results_by(report)
    assert res[("acme", "app.work")].status == "ok"
    assert res[("main", "app.db_wide")].status == "ok"
    for key in [("lost", "app.work"), ("gone", "app.db_wide")]:
        assert res[key].status == "failed", res[key]
        assert res[key].error and "unreachable" in res[key].error
        assert ERROR_ONE_LINE not in res[key].error
    assert res[("main", "app.db_wide")].tenant is None
    # One database reachable: failures (1), not "no database could be reached" (3).
    assert report.exit_code() == 1
    assert "gone" in report.unreachable


# -- connection hygiene ----------------------------------------------------------------------------


def test_application_name_labels_each_operation_and_is_reset_after_the_sweep(
    pg_dsn: str,
) -> None:
    create_tenants(pg_dsn, ["tenant_acme"])
    seen: dict[str, Any] = {}

    async def first(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(
            "SELECT current_setting('application_name'), pg_catalog.pg_backend_pid()"
        )
        seen["first"] = await cur.fetchone()
        await asyncio.sleep(0.2)  # overlap with the other one: two distinct connections
        return None

    async def second(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(
            "SELECT current_setting('application_name'), pg_catalog.pg_backend_pid()"
        )
        seen["second"] = await cur.fetchone()
        await asyncio.sleep(0.2)
        return None

    async def main() -> tuple[SweepReport, list[tuple[Any, ...]]]:
        config = make_config(pg_dsn, [("acme", "tenant_acme")], max_connections=2)
        operations = {
            o.name: o
            for o in (
                Operation(name="label.first", run=first, tables=("a",)),
                Operation(name="label.second", run=second, tables=("b",)),
            )
        }
        database = Database(config.databases["main"])
        await database.open()
        try:
            tenants = [Tenant("acme", "main", "tenant_acme")]
            plan = make_plan(config, operations, tenants, sweep=SWEEP)
            runner = Runner({"main": database}, new_plugin_manager(), {}, Bounds(Limits.of(config)))
            report = await runner.run(plan)
            # The sweep is over, the pool still open: its connections are gone (closed when
            # the last sweep using the database ended), labels and all.
            with psycopg.connect(pg_dsn) as other:
                rows = other.execute(
                    "SELECT application_name, state FROM pg_catalog.pg_stat_activity "
                    "WHERE pid = ANY(%s)",
                    ([seen["first"][1], seen["second"][1]],),
                ).fetchall()
            return report, rows
        finally:
            await database.close()

    report, rows = asyncio.run(main())
    assert report.counts()["ok"] == 2, report.to_json()
    assert seen["first"][0] == "sweeperd: label.first acme"
    assert seen["second"][0] == "sweeperd: label.second acme"
    assert seen["first"][1] != seen["second"][1]
    assert rows == []


def _defaults(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("search_path", "work_mem", "TimeZone")
        }


def test_session_settings_do_not_leak_to_the_next_operation(pg_dsn: str) -> None:
    create_tenants(pg_dsn, ["tenant_acme"])
    defaults = _defaults(pg_dsn)
    seen: dict[str, Any] = {}

    async def dirty(ctx: Context) -> int | None:
        cur = await ctx.conn.execute("SELECT pg_catalog.pg_backend_pid()")
        seen["dirty_pid"] = (await cur.fetchone() or (None,))[0]
        await ctx.conn.execute("SET search_path TO pg_catalog")
        await ctx.conn.execute("SET work_mem = '77MB'")
        await ctx.conn.execute("SET TimeZone = 'Asia/Kathmandu'")
        await ctx.conn.execute("SET lock_timeout = 0")
        await ctx.conn.execute("SET statement_timeout = '1h'")
        await ctx.conn.execute("SET application_name = 'hijacked'")
        await ctx.conn.execute("SELECT pg_catalog.pg_advisory_lock(4242)")
        return None

    async def check(ctx: Context) -> int | None:
        cur = await ctx.conn.execute(
            "SELECT pg_catalog.pg_backend_pid(), current_setting('search_path'), "
            "current_setting('work_mem'), current_setting('TimeZone'), "
            "current_setting('lock_timeout'), current_setting('statement_timeout'), "
            "current_setting('application_name'), "
            "(SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
            " AND pid = pg_catalog.pg_backend_pid())"
        )
        seen["check"] = await cur.fetchone()
        return None

    operations = [
        Operation(name="leak.dirty", run=dirty, tables=("t",), phase=Phase.PRUNE),
        Operation(name="leak.check", run=check, tables=("t",), phase=Phase.MAINTAIN),
    ]
    config = make_config(pg_dsn, [("acme", "tenant_acme")], max_connections=1, lock_timeout="3s")
    report = sweep(config, operations)
    assert report.counts()["ok"] == 2, report.to_json()
    pid, search_path, work_mem, tz, lock_timeout, statement_timeout, app, advisory = seen["check"]
    assert pid == seen["dirty_pid"], "max_connections = 1: the same connection is reused"
    assert search_path == defaults["search_path"]
    assert work_mem == defaults["work_mem"]
    assert tz == defaults["TimeZone"]
    assert lock_timeout == "3s"  # the configured value, not the operation's SET
    assert statement_timeout == "30min"
    assert app == "sweeperd: leak.check acme"
    assert advisory == 0


def test_set_role_does_not_leak_to_the_next_operation(pg_dsn: str) -> None:
    run_sql(pg_dsn, "CREATE SCHEMA tenant_acme", "CREATE TABLE tenant_acme.t (id int)")
    seen: dict[str, Any] = {}
    role = ""

    async def become(ctx: Context) -> int | None:
        cur = await ctx.conn.execute("SELECT current_user, pg_catalog.pg_backend_pid()")
        seen["before"] = await cur.fetchone()
        await ctx.conn.execute(psql.SQL("SET ROLE {}").format(psql.Identifier(role)))
        cur = await ctx.conn.execute("SELECT current_user")
        seen["during"] = await cur.fetchone()
        return None

    async def check(ctx: Context) -> int | None:
        cur = await ctx.conn.execute("SELECT current_user, pg_catalog.pg_backend_pid()")
        seen["after"] = await cur.fetchone()
        cur = await ctx.conn.execute(psql.SQL("SELECT count(*) FROM {}").format(ctx.table("t")))
        return (await cur.fetchone() or (None,))[0]

    operations = [
        Operation(name="role.become", run=become, tables=("t",), phase=Phase.PRUNE),
        Operation(name="role.check", run=check, tables=("t",), phase=Phase.MAINTAIN),
    ]
    # The suite's role is a member of it (throwaway_role), so it may SET ROLE to it.
    with throwaway_role(pg_dsn, "sweeperd_leak", login=False) as made:
        role = made.name
        report = sweep(
            make_config(pg_dsn, [("acme", "tenant_acme")], max_connections=1), operations
        )
    assert results_by(report)[("acme", "role.become")].status == "ok", report.to_json()
    assert seen["during"] == (role,), "the SET ROLE took effect"
    assert seen["after"][1] == seen["before"][1], "max_connections = 1: the same connection"
    assert seen["after"][0] == seen["before"][0], "SET ROLE leaked into the next operation"
    assert results_by(report)[("acme", "role.check")].status == "ok"


def test_run_returning_something_other_than_rows_fails_without_it_in_the_result(
    pg_dsn: str,
) -> None:
    """``run()`` returns an int or None; anything else fails the item with TypeError, and the
    result's ``rows`` stays an int or None (the history's column is an integer)."""
    run_sql(pg_dsn, "CREATE SCHEMA tenant_acme")

    async def wrong(_ctx: Context) -> Any:
        return "abc"

    config = make_config(pg_dsn, [("acme", "tenant_acme")])
    report = sweep(config, [Operation(name="t.wrong", run=wrong, tables=("x",))])
    (result,) = report.results
    assert result.status == "failed", result
    assert result.error is not None and result.error.startswith("TypeError: run() returned str")
    assert result.rows is None
    json.dumps(report.to_json())  # the report still serializes
