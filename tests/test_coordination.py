"""Several instances against the same database: each (sweep firing, tenant) runs exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from support import install_plugin, run_sql, throwaway_role, toml_str, write_config

from sweeperd.config import DatabaseConfig, SweepConfig
from sweeperd.coordination import DATABASE_SCOPE, Claims
from sweeperd.db import Database
from sweeperd.schedule import nominal_firing

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


def test_two_instances_split_a_firing_without_overlap(pg_dsn: str) -> None:
    async def body() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
        db_a = Database(DatabaseConfig(name="main", dsn=pg_dsn))
        db_b = Database(DatabaseConfig(name="main", dsn=pg_dsn))
        await db_a.open()
        await db_b.open()
        try:
            a, b = Claims("host-a:1"), Claims("host-b:2")
            tenants = [DATABASE_SCOPE, *(f"t{i}" for i in range(50))]
            (got_a, fail_a), (got_b, fail_b) = await asyncio.gather(
                a.claim({"main": db_a}, "nightly", FIRING, {"main": tenants}),
                b.claim({"main": db_b}, "nightly", FIRING, {"main": tenants}),
            )
            assert fail_a == fail_b == {}
            # The next firing is new work again.
            later, _ = await b.claim(
                {"main": db_b}, "nightly", FIRING + dt.timedelta(days=1), {"main": tenants}
            )
            return got_a, got_b, later
        finally:
            await db_a.close()
            await db_b.close()

    got_a, got_b, later = asyncio.run(body())
    everything = {DATABASE_SCOPE, *(f"t{i}" for i in range(50))}
    assert got_a["main"].isdisjoint(got_b["main"])
    assert got_a["main"] | got_b["main"] == everything
    assert later["main"] == everything
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT instance) FROM sweeperd.claims WHERE firing = %s",
            (FIRING,),
        ).fetchone()
    assert rows is not None and rows[0] == 51


def test_without_privileges_an_instance_runs_everything(pg_dsn: str) -> None:
    run_sql(
        pg_dsn,
        f'REVOKE CREATE ON DATABASE "{psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]}" '
        "FROM PUBLIC",
    )

    async def body(dsn: str) -> dict[str, set[str]]:
        db = Database(DatabaseConfig(name="main", dsn=dsn))
        await db.open()
        try:
            owned, failed = await Claims("x:1").claim(
                {"main": db}, "s", FIRING, {"main": ["a", "b"]}
            )
            assert failed == {}
            return owned
        finally:
            await db.close()

    with throwaway_role(pg_dsn, "noclaim") as role:
        assert asyncio.run(body(role.dsn(pg_dsn))) == {"main": {"a", "b"}}


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
