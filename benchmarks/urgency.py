"""Planning vacuum.auto for 50 000 tables across 10 000 tenants: time and memory (issue 12).

    python benchmarks/urgency.py [--tenants 10000] [--rounds 5] [--history-runs 30]
    SWEEPERD_BENCH_DSN=postgresql:///x python benchmarks/urgency.py --keep   # build it there

Target (DESIGN.md, "Performance targets"): the statistics queries and the scoring of 50 000
tables take <= 2 s and <= 100 MB.

Setup: a scratch server (tests/servers.py; autovacuum off, so the statistics stay as built for
every round) gets ``--tenants`` schemas ``tenant_00000``... of five tables each (identity keys,
primary keys, TOAST: about 23 relations per tenant in pg_class), in transactions of
``--batch`` tenants (one DO block each) on ``--jobs`` connections. About one table in five gets
enough dead tuples, inserts or changes since its last analyze to pass autovacuum's thresholds;
one ``report_executions`` in a hundred carries a reloption. The run history (schema
``sweeperd``) holds ``--history-runs`` nightly runs of vacuum.auto results for those tables,
so ``last_durations`` reads a history as big as ``[history] keep = "30d"`` leaves behind.

Measured in the same run, rounds interleaved, median of ``--rounds``:
  a) sweeperd's two catalog queries (``server_settings`` + ``table_rows``) on one of its
     pooled connections, over every tenant schema: wall time and client CPU;
  b) ``score_tables`` over those rows: wall time, and the tracemalloc peak (its own round:
     tracing slows Python down several times);
  c) the whole plan expansion as ``Runner.run`` does it: a Config with every tenant in
     [[tenants]] and ``[plugins.vacuum] tables = "auto"``, load_plugins, make_plan,
     open_databases, then ``sweeperd.expansion.expand`` (two catalog queries, the history
     query, the scoring, one item per table that needs work, the sort and the dependency
     links): items, not_needed, wall, CPU, tracemalloc peak, and the process's RSS growth
     (VmHWM minus VmRSS before, in a fresh child process so earlier rounds' arenas do not
     hide it);
  d) the baseline: the same two queries on a plain psycopg connection, fetchall, no scoring:
     what reading the catalog costs at all. Ratios are to it.
Machines here are shared and noisy: look at the ratios, and at client CPU against wall time
(the rest is the server and the socket). The server's own execution time of each query
(EXPLAIN ANALYZE) is printed too. If the expansion is over target, a cProfile of one
expansion follows (``--profile`` always).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sweeperd.config import Config, LogConfig, parse_config
from sweeperd.databases import open_databases
from sweeperd.db import Database
from sweeperd.expansion import expand
from sweeperd.history import _DDL as HISTORY_DDL
from sweeperd.history import _DURATIONS, last_durations
from sweeperd.limits import Bounds, Limits
from sweeperd.logs import setup_logging
from sweeperd.planner import Plan, make_plan
from sweeperd.plugins import Plugins, load_plugins
from sweeperd.runner import Runner
from sweeperd.tenants import resolve_tenants
from sweeperd.urgency import (
    _SERVER_KEYS,
    _SETTINGS,
    _TABLES,
    Knobs,
    score_tables,
    server_settings,
    table_rows,
)

TARGET_S = 2.0
TARGET_MB = 100.0
MB = 1024 * 1024
T = TypeVar("T")

# -- the fleet ---------------------------------------------------------------------------------

# Per tenant i (schema s), in one DO block per batch. About one table in five needs work:
#   i % 5 = 0  notifications: 300 inserted, 200 deleted  -> dead tuples (and analyze)
#   i % 5 = 1  events: 1 100 inserted                    -> inserts since vacuum (and analyze)
#   i % 5 = 2  sessions: 100 inserted                    -> changes since analyze
#   i % 4 = 3  analytics_cache: 60 inserted and updated  -> dead tuples (and analyze)
#   otherwise  notifications: 30 inserted                -> under every threshold
_BUILD = """
DO $build$
DECLARE
  s text;
  opts text;
BEGIN
  FOR i IN %(lo)s..%(hi)s LOOP
    s := 'tenant_' || lpad(i::text, 5, '0');
    opts := CASE WHEN i %% 100 = 7 THEN ' WITH (autovacuum_vacuum_scale_factor = 0.01)'
                 ELSE '' END;
    EXECUTE format('CREATE SCHEMA %%I', s);
    EXECUTE format('CREATE TABLE %%I.notifications (id bigint GENERATED ALWAYS AS IDENTITY'
                   ' PRIMARY KEY, user_id bigint NOT NULL, created_at timestamptz NOT NULL'
                   ' DEFAULT now(), body text)', s);
    EXECUTE format('CREATE TABLE %%I.sessions (id text PRIMARY KEY, user_id bigint,'
                   ' expires_at timestamptz NOT NULL, data jsonb)', s);
    EXECUTE format('CREATE TABLE %%I.analytics_cache (key text PRIMARY KEY, value jsonb,'
                   ' updated_at timestamptz NOT NULL DEFAULT now())', s);
    EXECUTE format('CREATE TABLE %%I.report_executions (id bigint GENERATED ALWAYS AS'
                   ' IDENTITY PRIMARY KEY, report text NOT NULL, started_at timestamptz,'
                   ' finished_at timestamptz, output text)' || opts, s);
    EXECUTE format('CREATE TABLE %%I.events (id bigint GENERATED ALWAYS AS IDENTITY'
                   ' PRIMARY KEY, kind text, at timestamptz NOT NULL DEFAULT now(),'
                   ' payload jsonb)', s);
    IF i %% 5 = 0 THEN
      EXECUTE format('INSERT INTO %%I.notifications (user_id, body)'
                     ' SELECT g, ''hello'' FROM generate_series(1, 300) g', s);
      EXECUTE format('DELETE FROM %%I.notifications WHERE user_id <= 200', s);
    ELSE
      EXECUTE format('INSERT INTO %%I.notifications (user_id, body)'
                     ' SELECT g, ''hello'' FROM generate_series(1, 30) g', s);
    END IF;
    IF i %% 5 = 1 THEN
      EXECUTE format('INSERT INTO %%I.events (kind) SELECT ''click'''
                     ' FROM generate_series(1, 1100)', s);
    END IF;
    IF i %% 5 = 2 THEN
      EXECUTE format('INSERT INTO %%I.sessions (id, expires_at)'
                     ' SELECT g::text, now() FROM generate_series(1, 100) g', s);
    END IF;
    IF i %% 4 = 3 THEN
      EXECUTE format('INSERT INTO %%I.analytics_cache (key, value)'
                     ' SELECT g::text, ''{}'' FROM generate_series(1, 60) g', s);
      EXECUTE format('UPDATE %%I.analytics_cache SET value = ''{"n": 1}''', s);
    END IF;
  END LOOP;
END
$build$
"""

# Nightly runs of vacuum.auto, each with a result for every table of the first 1 000 000
# that is expected to need work (the same ones every night: the steady state).
_HISTORY = """
INSERT INTO sweeperd.runs (run_id, sweep, instance, started_at, finished_at,
                           ok, failed, skipped, cancelled)
SELECT gen_random_uuid(), 'nightly', 'bench', d, d + interval '20 min', 0, 0, 0, 0
  FROM generate_series(now() - (%(runs)s || ' days')::interval, now() - interval '1 day',
                       interval '1 day') d;
INSERT INTO sweeperd.results (run_id, tenant, schema_name, operation, status, rows,
                              started_at, finished_at, duration_s, target)
SELECT r.run_id, substr(n.nspname, 8), n.nspname, 'vacuum.auto', 'ok', 100,
       r.started_at, r.started_at + interval '1 s', 0.02 + random() * 0.5, c.relname
  FROM sweeperd.runs r
 CROSS JOIN pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname LIKE 'tenant\\_%%' AND c.relkind = 'r'
   AND CASE c.relname
         WHEN 'notifications' THEN substr(n.nspname, 8)::int %% 5 = 0
         WHEN 'events' THEN substr(n.nspname, 8)::int %% 5 = 1
         WHEN 'sessions' THEN substr(n.nspname, 8)::int %% 5 = 2
         WHEN 'analytics_cache' THEN substr(n.nspname, 8)::int %% 4 = 3
         ELSE false END;
ANALYZE sweeperd.runs;
ANALYZE sweeperd.results;
"""


def schema_names(tenants: int) -> list[str]:
    return [f"tenant_{i:05d}" for i in range(tenants)]


def build(dsn: str, tenants: int, batch: int, jobs: int, history_runs: int) -> dict[str, float]:
    """The fleet and its history; seconds per step."""
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    ranges = [(lo, min(lo + batch, tenants) - 1) for lo in range(0, tenants, batch)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                with lock:
                    if not ranges or errors:
                        break
                    lo, hi = ranges.pop(0)
                try:
                    conn.execute(_BUILD % {"lo": lo, "hi": hi})
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    raise
            conn.execute("SELECT pg_catalog.pg_stat_force_next_flush()")

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    took["tenants"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS sweeperd")
        conn.execute(HISTORY_DDL)
        if history_runs > 0:
            conn.execute(_HISTORY % {"runs": history_runs})
        conn.execute("VACUUM ANALYZE pg_catalog.pg_class")  # as a live catalog would be
        conn.execute("ANALYZE pg_catalog.pg_namespace")
    took["history"] = time.perf_counter() - t0
    return took


def fleet_summary(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname LIKE"
            " 'tenant\\_%'), (SELECT count(*) FROM pg_catalog.pg_class),"
            " (SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
            "  ON n.oid = c.relnamespace WHERE n.nspname LIKE 'tenant\\_%' AND c.relkind = 'r'),"
            " (SELECT count(*) FROM sweeperd.results)"
        ).fetchone()
    assert row is not None
    return {"schemas": row[0], "pg_class": row[1], "tables": row[2], "history_rows": row[3]}


# -- sweeperd as the runner drives it ------------------------------------------------------------


def make_config(dsn: str, tenants: int) -> Config:
    doc: dict[str, Any] = {
        "daemon": {"max_concurrency": 16},
        "history": {"enabled": True, "keep": "30d"},
        "databases": {"main": {"dsn": dsn, "max_connections": 8}},
        "tenants": [
            {"name": s[len("tenant_") :], "database": "main", "schema": s}
            for s in schema_names(tenants)
        ],
        "sweeps": {"nightly": {"cron": "0 3 * * *", "operations": ["vacuum.*"]}},
        "plugins": {"vacuum": {"tables": "auto"}},
    }
    return parse_config(doc, Path("bench.toml"))


class Planner:
    """Config, plugins, tenants and open databases, as ``sweeperd sweep`` has them when
    ``Runner.run`` starts; :meth:`plan` makes a fresh plan (expand replaces its items)."""

    def __init__(self, dsn: str, tenants: int) -> None:
        self.config = make_config(dsn, tenants)
        self.plugins: Plugins = load_plugins(self.config, entry_points=False)
        self.databases: dict[str, Database] = {}
        self.tenants: list[Any] = []

    async def open(self) -> None:
        self.databases, unreachable = await open_databases(self.config, ["main"])
        assert not unreachable, unreachable
        self.tenants, failed = await resolve_tenants(self.config, self.databases)
        assert not failed, failed
        # As the runner does: sweeperd's own queries take a per-database slot.
        Runner(self.databases, self.plugins.pm, self.config.plugins, Bounds(Limits.of(self.config)))

    def plan(self) -> Plan:
        return make_plan(self.config, self.plugins.operations, self.tenants, sweep="nightly")

    async def expand(self, plan: Plan) -> Plan:
        async with self.databases["main"].use():
            return await expand(plan, self.databases, self.config.plugins)

    async def close(self) -> None:
        await asyncio.gather(*(db.close() for db in self.databases.values()))


# -- measuring -----------------------------------------------------------------------------------


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: ``5`` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, float, float]:
    """(result, wall seconds, client CPU seconds)."""
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = await call()
    return result, time.perf_counter() - t0, time.process_time() - cpu0


async def traced_peak(call: Callable[[], Awaitable[Any]]) -> float:
    """tracemalloc's peak (MB) above what was allocated when ``call`` started."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = await call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return (peak - base) / MB


class Baseline:
    """The two catalog queries on a plain psycopg connection, fetchall."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        # Never prepared, as sweeperd's connections (psycopg would prepare from the 5th run).
        self.conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, prepare_threshold=None
        )

    async def run(self, schemas: list[str]) -> tuple[list[Any], list[Any]]:
        assert self.conn is not None
        cur = await self.conn.execute(_SETTINGS, (list(_SERVER_KEYS),))
        settings = await cur.fetchall()
        cur = await self.conn.execute(_TABLES, (schemas,))
        return settings, await cur.fetchall()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def sweeperd_queries(
    database: Database, schemas: list[str]
) -> tuple[dict[str, float], list[tuple[Any, ...]]]:
    async with database.housekeeping("bench") as conn:
        return await server_settings(conn), await table_rows(conn, schemas)


async def checkout(database: Database) -> None:
    async with database.housekeeping("bench"):
        pass


async def history_query(database: Database, pairs: list[tuple[str, str]]) -> int:
    async with database.housekeeping("bench") as conn:
        return len(await last_durations(conn, "vacuum.auto", pairs))


async def server_times(
    dsn: str, schemas: list[str], pairs: list[tuple[str, str]]
) -> dict[str, float]:
    """Execution time on the server (EXPLAIN ANALYZE, ms) of the tables and history queries."""
    out: dict[str, float] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for label, query, params in (
            ("table_rows", _TABLES, (schemas,)),
            (
                "last_durations",
                _DURATIONS,
                ([s for s, _ in pairs], [t for _, t in pairs], "vacuum.auto"),
            ),
        ):
            cur = await conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + query,
                params,
            )
            row = await cur.fetchone()
            assert row is not None
            doc = row[0] if isinstance(row[0], list) else json.loads(row[0])
            out[label] = float(doc[0]["Execution Time"]) + float(doc[0]["Planning Time"])
    return out


# -- the RSS child: a fresh process per measurement ------------------------------------------------


async def child(kind: str, dsn: str, tenants: int) -> dict[str, Any]:
    schemas = schema_names(tenants)
    if kind == "baseline":
        base = Baseline(dsn)
        await base.open()
        await base.run(schemas[:1])  # the connection's first use, not counted
        gc.collect()
        rss0, reset = proc_status_kb("VmRSS"), reset_peak_rss()
        hwm0 = proc_status_kb("VmHWM")
        settings, rows = await base.run(schemas)
        hwm = proc_status_kb("VmHWM")
        rss1 = proc_status_kb("VmRSS")
        count = len(rows)
        del settings, rows
        await base.close()
    else:
        planner = Planner(dsn, tenants)
        await planner.open()
        plan = planner.plan()
        await history_query(planner.databases["main"], [(schemas[0], "t0")])  # warm it
        gc.collect()
        rss0, reset = proc_status_kb("VmRSS"), reset_peak_rss()
        hwm0 = proc_status_kb("VmHWM")
        plan = await planner.expand(plan)
        hwm = proc_status_kb("VmHWM")
        rss1 = proc_status_kb("VmRSS")
        count = len(plan.items)
        await planner.close()
    return {
        "growth_mb": (hwm - rss0) / 1024,
        "retained_mb": (rss1 - rss0) / 1024,
        "hwm_reset": reset,
        "hwm_before_mb": hwm0 / 1024,
        "rss_before_mb": rss0 / 1024,
        "count": count,
    }


def rss_in_child(kind: str, dsn: str, tenants: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--dsn", dsn, "--tenants", str(tenants)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- the run -------------------------------------------------------------------------------------


@contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    dsn = os.environ.get("SWEEPERD_BENCH_DSN")
    if dsn:
        yield dsn
        return
    # tests/servers.py (on sys.path above), imported by name so that mypy need not find it.
    ScratchServer = importlib.import_module("servers").ScratchServer

    with ScratchServer(
        settings={
            "autovacuum": False,  # the statistics stay as built, round after round
            "max_locks_per_transaction": 1024,  # a batch of tenants is one transaction
            "shared_buffers": "256MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
        }
    ) as scratch:
        yield scratch.dsn()


def median(values: list[float]) -> float:
    return statistics.median(values)


def mb(x: float) -> str:
    return f"{x:.1f} MB"


async def measure(dsn: str, args: argparse.Namespace) -> int:
    schemas = schema_names(args.tenants)
    planner = Planner(dsn, args.tenants)
    t0 = time.perf_counter()
    await planner.open()
    database = planner.databases["main"]
    base = Baseline(dsn)
    await base.open()
    setup_s = time.perf_counter() - t0
    print(f"# config ({args.tenants} tenants), plugins, open: {setup_s:.2f} s (not timed below)")

    # Warm-up: the first pass reads the catalog into the server's buffers for everyone.
    await base.run(schemas)
    await planner.expand(planner.plan())

    runs: dict[str, list[float]] = {
        k: []
        for k in (
            "d.wall",
            "d.cpu",
            "a.wall",
            "a.cpu",
            "b.wall",
            "b.cpu",
            "h.wall",
            "c.wall",
            "c.cpu",
            "plan.wall",
            "connect.wall",
        )
    }
    items = not_needed = rows_n = durations_n = 0
    needed = 0
    for _ in range(args.rounds):
        (_settings, base_rows), wall, cpu = await timed(lambda: base.run(schemas))
        runs["d.wall"].append(wall)
        runs["d.cpu"].append(cpu)
        del base_rows
        # A cold pool's first checkout, as at each sweep (use() closes idle connections after).
        async with database.use():
            _none, wall, _cpu = await timed(lambda: checkout(database))
            runs["connect.wall"].append(wall)
            # a), b) and the history query on the connection that checkout left warm.
            (server, rows), wall, cpu = await timed(lambda: sweeperd_queries(database, schemas))
            runs["a.wall"].append(wall)
            runs["a.cpu"].append(cpu)
            rows_n = len(rows)
            gc.collect()
            cpu0, t0 = time.process_time(), time.perf_counter()
            scored = score_tables(rows, server, Knobs(), needed_only=True)  # as expansion does
            runs["b.wall"].append(time.perf_counter() - t0)
            runs["b.cpu"].append(time.process_time() - cpu0)
            needed = len(scored)
            pairs = [(t.schema, t.table) for t in scored]
            del scored, rows
            durations_n, wall, _cpu = await timed(
                lambda pairs=pairs: history_query(database, pairs)  # type: ignore[misc]
            )
            runs["h.wall"].append(wall)
        t0 = time.perf_counter()
        plan = planner.plan()
        runs["plan.wall"].append(time.perf_counter() - t0)
        # c) as Runner.run: use(), then expand on a cold pool.
        expanded, wall, cpu = await timed(lambda plan=plan: planner.expand(plan))  # type: ignore[misc]
        runs["c.wall"].append(wall)
        runs["c.cpu"].append(cpu)
        items = len(expanded.items)
        not_needed = expanded.not_needed.get("vacuum.auto", 0)
        del expanded, plan

    # Memory: tracemalloc in rounds of their own (tracing is slow), RSS in fresh processes.
    peak_d = await traced_peak(lambda: base.run(schemas))
    server, rows = await sweeperd_queries(database, schemas)
    peak_a = await traced_peak(lambda: sweeperd_queries(database, schemas))

    async def score() -> Any:
        return score_tables(rows, server, Knobs(), needed_only=True)

    peak_b = await traced_peak(score)
    rows.clear()
    fresh = planner.plan()
    peak_c = await traced_peak(lambda: planner.expand(fresh))
    rtimes = await server_times(dsn, schemas, pairs)
    await base.close()
    await planner.close()
    rss_c = rss_in_child("expand", dsn, args.tenants)
    rss_d = rss_in_child("baseline", dsn, args.tenants)

    m = {k: median(v) for k, v in runs.items()}
    d = m["d.wall"]
    print(
        f"# {rows_n} tables in {args.tenants} schemas; {needed} need work"
        f" ({needed / max(rows_n, 1):.0%}); {durations_n} (schema, table) durations in the"
        f" history; median of {args.rounds} rounds"
    )
    print(
        f"# server execution (EXPLAIN ANALYZE): table_rows {rtimes['table_rows']:.0f} ms,"
        f" last_durations {rtimes['last_durations']:.0f} ms"
    )
    print()
    print(f"{'step':<44}{'wall':>9}{'/base':>7}{'cpu':>9}{'py peak':>10}{'RSS +':>10}")

    def line(
        label: str, wall: float, cpu: float | None, peak: float | None, rss: float | None
    ) -> None:
        cells = [
            f"{label:<44}",
            f"{wall:>8.3f}s",
            f"{wall / d:>7.2f}",
            f"{cpu:>8.3f}s" if cpu is not None else f"{'':>9}",
            f"{peak:>7.1f}MB" if peak is not None else f"{'':>10}",
            f"{rss:>7.1f}MB" if rss is not None else f"{'':>10}",
        ]
        print("".join(cells))

    line("d) baseline: 2 queries, psycopg fetchall", d, m["d.cpu"], peak_d, rss_d["growth_mb"])
    line("a) server_settings + table_rows", m["a.wall"], m["a.cpu"], peak_a, None)
    line("b) score_tables", m["b.wall"], m["b.cpu"], peak_b, None)
    line("   a + b", m["a.wall"] + m["b.wall"], None, None, None)
    line("   last_durations (history query)", m["h.wall"], None, None, None)
    line("   first checkout of a cold pool (connect)", m["connect.wall"], None, None, None)
    line(
        "c) expand(): the whole plan-time expansion",
        m["c.wall"],
        m["c.cpu"],
        peak_c,
        rss_c["growth_mb"],
    )
    print()
    print(
        f"expansion: {items} items in the plan (vacuum.auto targets + vacuum.database_stats),"
        f" not_needed {not_needed}; make_plan alone {m['plan.wall']:.3f} s (not counted);"
        f" c / (a + b) = {m['c.wall'] / (m['a.wall'] + m['b.wall']):.2f}"
    )
    print(
        f"rounds, c) wall: {', '.join(f'{w:.3f}' for w in runs['c.wall'])} s;"
        f" d) wall: {', '.join(f'{w:.3f}' for w in runs['d.wall'])} s"
    )
    print(
        f"RSS child (expand): {mb(rss_c['rss_before_mb'])} before, peak +{mb(rss_c['growth_mb'])},"
        f" still held after +{mb(rss_c['retained_mb'])}"
        + ("" if rss_c["hwm_reset"] else " (VmHWM could not be reset: growth is a lower bound)")
    )
    memory = max(peak_c, rss_c["growth_mb"])
    ok_time, ok_mem = m["c.wall"] <= TARGET_S, memory <= TARGET_MB
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"target: expansion {m['c.wall']:.3f} s <= {TARGET_S:.0f} s: {verdict[ok_time]};"
        f" memory max(py peak, RSS growth) {memory:.1f} MB <= {TARGET_MB:.0f} MB:"
        f" {verdict[ok_mem]}"
    )
    if args.profile or not ok_time:
        await profile(dsn, args.tenants)
    return 0 if ok_time and ok_mem else 1


async def profile(dsn: str, tenants: int) -> None:
    planner = Planner(dsn, tenants)
    await planner.open()
    plan = planner.plan()
    await planner.expand(planner.plan())  # warm
    prof = cProfile.Profile()
    prof.enable()
    await planner.expand(plan)
    prof.disable()
    await planner.close()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(25)
    print("\n## cProfile of one expansion\n" + out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="tenants per setup transaction")
    parser.add_argument("--jobs", type=int, default=2, help="setup connections")
    parser.add_argument("--history-runs", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="cProfile one expansion")
    parser.add_argument("--keep", action="store_true", help="with SWEEPERD_BENCH_DSN: reuse")
    parser.add_argument("--child", choices=("expand", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_logging(LogConfig(format="json", level="warning"), stream=io.StringIO())
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.dsn, args.tenants))))
        return 0
    with server(args) as dsn:
        with psycopg.connect(dsn) as conn:
            print(f"# {conn.execute('SELECT version()').fetchone()[0]}")  # type: ignore[index]
            built = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname LIKE 'tenant\\_%'"
            ).fetchone()
        if args.keep and built and built[0] == args.tenants:
            print("# fleet already there (--keep)")
        else:
            took = build(dsn, args.tenants, args.batch, args.jobs, args.history_runs)
            print(
                f"# setup: {took['tenants']:.1f} s for the tenants ({args.jobs} connections,"
                f" {args.batch} tenants per transaction), {took['history']:.1f} s for the history"
            )
        print(f"# fleet: {fleet_summary(dsn)}")
        return asyncio.run(measure(dsn, args))


if __name__ == "__main__":
    sys.exit(main())
