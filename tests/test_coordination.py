"""Several instances against the same database: each (sweep firing, tenant) runs exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from support import install_plugin, run_sql, throwaway_role, toml_str, write_config
from test_runner import SWEEP, make_config

from sweeperd import Context, Operation
from sweeperd.config import SweepConfig
from sweeperd.coordination import Claims
from sweeperd.db import Database
from sweeperd.limits import Bounds, Limits
from sweeperd.model import Tenant
from sweeperd.planner import make_plan
from sweeperd.plugins import new_plugin_manager
from sweeperd.report import SweepReport
from sweeperd.runner import Runner
from sweeperd.schedule import nominal_firing
from sweeperd.stop import Stop

FIRING = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.UTC)


def test_nominal_firing_ignores_jitter_and_lateness_within_grace() -> None:
    nightly = SweepConfig("n", cron="0 3 * * *", jitter=60.0)
    for delay in (0, 1, 59, 200):
        now = FIRING + dt.timedelta(seconds=delay)
        assert nominal_firing(nightly, "UTC", now) == FIRING
    # Hours later (a manual run, say) is a firing of its own.
    late = FIRING + dt.timedelta(hours=2)
    assert nominal_firing(nightly, "UTC", late) == late


def test_nominal_firing_of_intervals_is_on_a_grid_every_instance_shares() -> None:
    every_15m = SweepConfig("i", interval=900.0)
    a = nominal_firing(every_15m, "UTC", FIRING + dt.timedelta(seconds=7))
    b = nominal_firing(every_15m, "UTC", FIRING + dt.timedelta(seconds=250))
    assert a == b == FIRING
    assert nominal_firing(every_15m, "UTC", FIRING + dt.timedelta(seconds=900)) == (
        FIRING + dt.timedelta(minutes=15)
    )


def test_nominal_firing_in_a_time_zone() -> None:
    berlin = SweepConfig("b", cron="30 2 * * *")
    now = dt.datetime(2026, 6, 1, 0, 30, 5, tzinfo=dt.UTC)  # 02:30:05 in Berlin (CEST)
    assert nominal_firing(berlin, "Europe/Berlin", now) == dt.datetime(
        2026, 6, 1, 0, 30, tzinfo=dt.UTC
    )


# -- in-process runs of one firing, each with its own Claims (instance) and Database -----------


def record_op(
    seconds: float = 0.02, *, between: Callable[[Context], Awaitable[None]] | None = None
) -> Operation:
    """Sleeps, then records the tenant in public.runs inside ctx.transaction() (fenced)."""

    async def run(ctx: Context) -> int:
        assert ctx.tenant is not None
        async with ctx.transaction():
            await ctx.conn.execute("SELECT pg_sleep(%s)", (seconds,))
            await ctx.conn.execute(
                "INSERT INTO public.runs (tenant, at) VALUES (%s, clock_timestamp())",
                (ctx.tenant.name,),
            )
        if between is not None:
            await between(ctx)
            async with ctx.transaction():
                await ctx.conn.execute(
                    "INSERT INTO public.runs (tenant, at) VALUES (%s, clock_timestamp())",
                    (ctx.tenant.name + " again",),
                )
        return 1

    return Operation(name="rec.record", run=run, tables=("x",))


def setup_tenants(dsn: str, n: int) -> list[tuple[str, str]]:
    run_sql(dsn, "CREATE TABLE public.runs (tenant text, at timestamptz)")
    return [(f"t{i:02d}", f"s{i:02d}") for i in range(n)]


async def run_firing(
    dsn: str,
    instance: str,
    tenants: list[tuple[str, str]],
    op: Operation,
    *,
    stop: Stop | None = None,
    max_connections: int = 2,
) -> SweepReport:
    config = make_config(dsn, tenants, max_connections=max_connections)
    database = Database(config.databases["main"])
    await database.open()
    try:
        runner = Runner({"main": database}, new_plugin_manager(), {}, Bounds(Limits.of(config)))
        plan = make_plan(
            config,
            {op.name: op},
            [Tenant(name, "main", schema) for name, schema in tenants],
            sweep=SWEEP,
        )
        claims = Claims(instance).firing({"main": database}, SWEEP, FIRING, lease=3.0)
        return await runner.run(plan, stop=stop, claims=claims)
    finally:
        await database.close()


def ran(dsn: str) -> Counter[str]:
    return Counter(row[0] for row in query(dsn, "SELECT tenant FROM public.runs"))


def query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement).fetchall()


def test_two_runs_of_one_firing_split_it_and_a_finished_firing_never_runs_again(
    pg_dsn: str,
) -> None:
    tenants = setup_tenants(pg_dsn, 30)

    async def both() -> tuple[SweepReport, SweepReport]:
        a, b = await asyncio.gather(
            run_firing(pg_dsn, "host-a:1", tenants, record_op()),
            run_firing(pg_dsn, "host-b:2", tenants, record_op()),
        )
        return a, b

    a, b = asyncio.run(both())
    done_a = {r.tenant for r in a.results if r.status == "ok"}
    done_b = {r.tenant for r in b.results if r.status == "ok"}
    assert not done_a & done_b
    assert done_a | done_b == {name for name, _ in tenants}
    assert done_a and done_b
    assert len(a.results) + len(b.results) == 30  # the other one's tenants are not reported
    assert ran(pg_dsn) == Counter({name: 1 for name, _ in tenants})
    # The same firing again (a catch-up, an instance started late): nothing left to do.
    late = asyncio.run(run_firing(pg_dsn, "host-c:3", tenants, record_op()))
    assert late.results == []
    assert sum(ran(pg_dsn).values()) == 30
    rows = query(
        pg_dsn,
        "SELECT count(*), count(finished_at), count(taken_from), max(attempts) "
        "FROM sweeperd.claims WHERE tenant <> ''",
    )
    assert rows == [(30, 30, 0, 1)]


def test_a_stopped_run_gives_its_tenants_back_and_another_run_takes_them_at_once(
    pg_dsn: str,
) -> None:
    tenants = setup_tenants(pg_dsn, 6)
    stop = Stop()
    stop.at(0.5, "maintenance window closed")
    first = asyncio.run(run_firing(pg_dsn, "early:1", tenants, record_op(1.5), stop=stop))
    # Claimed when the stop came: two running (1.5 s each) and a database's worth ahead (two);
    # the ones not claimed yet are reported "cancelled … before it started" by this run too.
    cut = {
        r.tenant
        for r in first.results
        if r.status == "cancelled" and not (r.error or "").endswith("before it started")
    }
    assert len(cut) == 4
    # Released, not left to expire: the next run takes them without waiting for the lease.
    second = asyncio.run(run_firing(pg_dsn, "late:2", tenants, record_op(0.01)))
    assert {r.tenant for r in second.results if r.status == "ok"} >= cut
    assert ran(pg_dsn) == Counter({name: 1 for name, _ in tenants})
    why = dict(
        query(pg_dsn, "SELECT tenant, taken_why FROM sweeperd.claims WHERE taken_from = 'early:1'")
    )
    assert set(why) == cut
    assert set(why.values()) == {"released"}


def test_the_fence_stops_writes_for_a_tenant_another_instance_took(pg_dsn: str) -> None:
    tenants = setup_tenants(pg_dsn, 1)

    async def taken_over(ctx: Context) -> None:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as thief:
            await thief.execute(
                "UPDATE sweeperd.claims SET instance = 'thief:9', taken_from = instance "
                "WHERE tenant = %s",
                (ctx.tenant.name if ctx.tenant else "",),
            )

    report = asyncio.run(run_firing(pg_dsn, "me:1", tenants, record_op(between=taken_over)))
    [result] = report.results
    assert result.status == "cancelled"
    assert result.error is not None and "lease lost" in result.error
    assert ran(pg_dsn) == Counter({"t00": 1})  # the write after the takeover never happened


def test_claims_of_the_first_version_count_as_finished(pg_dsn: str) -> None:
    tenants = setup_tenants(pg_dsn, 3)
    run_sql(
        pg_dsn,
        "CREATE SCHEMA sweeperd",
        "CREATE TABLE sweeperd.claims (sweep text NOT NULL, firing timestamptz NOT NULL, "
        "tenant text NOT NULL, instance text NOT NULL, claimed_at timestamptz NOT NULL "
        "DEFAULT now(), PRIMARY KEY (sweep, firing, tenant))",
        f"INSERT INTO sweeperd.claims (sweep, firing, tenant, instance) "
        f"VALUES ('{SWEEP}', '{FIRING.isoformat()}', 't01', 'old:1')",
    )
    report = asyncio.run(run_firing(pg_dsn, "new:2", tenants, record_op()))
    assert {r.tenant for r in report.results} == {"t00", "t02"}
    assert ran(pg_dsn) == Counter({"t00": 1, "t02": 1})


def test_without_privileges_an_instance_runs_everything(pg_dsn: str) -> None:
    tenants = setup_tenants(pg_dsn, 2)
    run_sql(
        pg_dsn,
        f'REVOKE CREATE ON DATABASE "{psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]}" '
        "FROM PUBLIC",
        "GRANT INSERT ON public.runs TO PUBLIC",
    )
    with throwaway_role(pg_dsn, "noclaim") as role:
        report = asyncio.run(run_firing(role.dsn(pg_dsn), "x:1", tenants, record_op()))
    assert [r.status for r in report.results] == ["ok", "ok"]


def test_two_daemons_never_process_a_firing_twice(pg_dsn: str, tmp_path: Path) -> None:
    """Two real `sweeperd run` processes, one config, an interval sweep of 2 s."""
    run_sql(
        pg_dsn,
        "CREATE TABLE public.runs (tenant text, at timestamptz)",
        *(f"CREATE SCHEMA tenant_{i}" for i in range(6)),
    )
    (tmp_path / "plugins.d").mkdir()
    install_plugin(tmp_path / "plugins.d", "rec.py")
    config = write_config(
        tmp_path,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        drain_timeout = "2s"
        [log]
        format = "json"
        [databases.main]
        dsn = {toml_str(pg_dsn)}
        [[tenant_sources]]
        database = "main"
        schemas = "tenant_%"
        [sweeps.often]
        interval = "2s"
        """,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"daemon{i}.log").open("w"),
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with psycopg.connect(pg_dsn) as conn:
                firings = (
                    conn.execute(
                        "SELECT count(DISTINCT firing) FROM sweeperd.claims WHERE tenant <> ''"
                    ).fetchone()
                    if _has_claims(conn)
                    else (0,)
                )
            if firings and firings[0] >= 4:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=20) == 0
    with psycopg.connect(pg_dsn) as conn:
        per_firing = conn.execute(
            "SELECT firing, count(*), count(DISTINCT tenant), count(DISTINCT instance) "
            "FROM sweeperd.claims WHERE tenant <> '' GROUP BY firing"
        ).fetchall()
        runs = conn.execute("SELECT count(*) FROM public.runs").fetchone()
        claimed = conn.execute("SELECT count(*) FROM sweeperd.claims WHERE tenant <> ''").fetchone()
    assert len(per_firing) >= 4
    for _firing, n, distinct, _instances in per_firing:
        assert n == distinct == 6  # every tenant claimed once per firing
    # Each claimed (firing, tenant) ran exactly once: as many runs as claims (a firing that was
    # cut short by the stop may have claimed without finishing, never the other way round).
    assert runs is not None and claimed is not None
    assert 0 < runs[0] <= claimed[0]
    assert claimed[0] - runs[0] <= 6


def _has_claims(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT to_regclass('sweeperd.claims') IS NOT NULL").fetchone()
    return bool(row and row[0])
