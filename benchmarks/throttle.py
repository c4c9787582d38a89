"""Health gates: what they cost, and how fast they react.

    python benchmarks/throttle.py          # embedded PostgreSQL binaries (needs sweeperd[test])

1. Overhead on a fan-out (1 000 tenants x 4 trivial operations at 32 connections, the runner's
   worst case: the work is nothing, so whatever the gates cost shows): gates off (no sampler at
   all), pause check only (the default), all five gates configured (never over their limits).
   Rounds are interleaved and the median is shown; look at the ratios to "off".
2. The sampler's own cost per database: one sample (every gate and the pause in one statement)
   against a trivial ``SELECT 1`` on the same connection, median and p99 of 2 000 each.
3. Reaction to a lag spike: a primary with a real standby (``pg_basebackup -R``) deletes in
   batches of 100 while the standby's replay is paused; from the moment an outside poller (every
   10 ms) sees the byte lag pass the limit to the last row deleted: at check_every 1 s (the
   default) and 250 ms, three trials each.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ScratchServer, standby_of

import sweeperd
import sweeperd.limits
from sweeperd.config import LogConfig, parse_config
from sweeperd.logs import setup_logging
from sweeperd.plugins import Plugins, load_plugins, new_plugin_manager
from sweeperd.sweep import sweep_once
from sweeperd.throttle import Throttle

ALL_GATES = {
    "max_replica_lag": "1h",
    "max_replica_lag_bytes": "1TB",
    "max_slot_lag_bytes": "1TB",
    "max_archive_backlog": 100000,
    "max_active_sessions": 100000,
}
samples_taken = 0
_read = Throttle.read


async def _counting_read(self: Throttle, conn: Any) -> Any:
    global samples_taken
    samples_taken += 1
    return await _read(self, conn)


Throttle.read = _counting_read  # type: ignore[method-assign]


def ops(n: int) -> dict[str, sweeperd.Operation]:
    async def run(ctx: sweeperd.Context) -> None:
        await ctx.conn.execute("SELECT 1")

    return {
        f"bench.op{i}": sweeperd.Operation(name=f"bench.op{i}", run=run, tables=(f"t{i}",))
        for i in range(n)
    }


def fanout(dsn: str, mode: str) -> tuple[float, float, int]:
    global samples_taken
    throttle = ALL_GATES if mode == "all gates" else {}
    doc: dict[str, Any] = {
        "daemon": {"max_concurrency": 32},
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": 32, "throttle": throttle}},
        "tenants": [
            {"name": f"t{i}", "database": "main", "schema": f"tenant_{i}"} for i in range(1000)
        ],
        "sweeps": {"bench": {"interval": "1h", "per_tenant_concurrency": 4}},
    }
    config = parse_config(doc, Path("bench.toml"))
    plugins = Plugins(pm=new_plugin_manager(), infos=(), operations=ops(4))
    original = sweeperd.limits.Limits.of
    if mode == "off":

        def without(cfg: Any) -> sweeperd.limits.Limits:
            limits = original(cfg)
            return sweeperd.limits.Limits(limits.max_concurrency, limits.per_database, {})

        sweeperd.limits.Limits.of = without  # type: ignore[method-assign,assignment]
    samples_taken = 0
    try:
        cpu0 = time.process_time()
        report = asyncio.run(sweep_once(config, plugins, sweep="bench"))
        cpu = time.process_time() - cpu0
    finally:
        sweeperd.limits.Limits.of = original  # type: ignore[method-assign]
    assert all(r.status == "ok" for r in report.results), report.counts()
    return report.duration_s, cpu / len(report.results), samples_taken


def overhead(dsn: str) -> None:
    print("\n## 1. overhead: 1000 tenants x 4 x SELECT 1 at 32 connections (median of 5 rounds)")
    modes = ["off", "pause only", "all gates"]
    got: dict[str, list[tuple[float, float, int]]] = {m: [] for m in modes}
    for _ in range(5):
        for mode in modes:
            got[mode].append(fanout(dsn, mode))
    base_wall = statistics.median(w for w, _c, _s in got["off"])
    base_cpu = statistics.median(c for _w, c, _s in got["off"])
    print(f"{'gates':<12}{'makespan':>10}{'/off':>7}{'cpu/op':>10}{'/off':>7}{'samples':>9}")
    for mode in modes:
        wall = statistics.median(w for w, _c, _s in got[mode])
        cpu = statistics.median(c for _w, c, _s in got[mode])
        samples = statistics.median(s for _w, _c, s in got[mode])
        print(
            f"{mode:<12}{wall:>9.3f}s{wall / base_wall:>7.3f}{cpu * 1e3:>8.3f}ms"
            f"{cpu / base_cpu:>7.3f}{samples:>9.0f}"
        )


async def sample_cost(dsn: str) -> None:
    print("\n## 2. one sample on one connection (2000 each)")
    from sweeperd.config import ThrottleConfig

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=None)
    await conn.execute("CREATE SCHEMA IF NOT EXISTS sweeperd")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS sweeperd.pause (only_one boolean PRIMARY KEY DEFAULT true,"
        " paused_by text NOT NULL, paused_at timestamptz NOT NULL DEFAULT now(), reason text,"
        " until timestamptz)"
    )
    limits = {k: (v if isinstance(v, int) else 1e18) for k, v in ALL_GATES.items()}
    cases: list[tuple[str, Callable[[], Any]]] = [("SELECT 1", lambda: conn.execute("SELECT 1"))]
    for label, config in (
        ("pause only", ThrottleConfig()),
        ("all five gates + pause", ThrottleConfig(**limits)),  # type: ignore[arg-type]
    ):
        t = Throttle("bench", config)
        cases.append((label, lambda t=t: _read(t, conn)))
    print(f"{'statement':<24}{'median':>10}{'p99':>10}")
    base = None
    for label, call in cases:
        times = []
        for _ in range(2000):
            t0 = time.perf_counter()
            await call()
            times.append(time.perf_counter() - t0)
        times.sort()
        median, p99 = statistics.median(times), times[int(len(times) * 0.99)]
        base = base or median
        print(f"{label:<24}{median * 1e3:>8.3f}ms{p99 * 1e3:>8.3f}ms  ({median / base:.2f}x)")
    await conn.close()


def reaction(primary: ScratchServer, standby: Any, check_every: float) -> tuple[float, float]:
    """(seconds from the lag passing the limit to the last delete, seconds throttled)."""
    limit = 1 << 20
    primary.execute("DROP SCHEMA IF EXISTS tenant_a CASCADE")
    primary.execute("CREATE SCHEMA tenant_a")
    primary.execute(
        "CREATE TABLE tenant_a.events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL,"
        " pad text) WITH (autovacuum_enabled = false)"
    )
    primary.execute(
        "INSERT INTO tenant_a.events (created_at, pad) SELECT now() - interval '100 days',"
        " repeat('x', 200) FROM generate_series(1, 100000)"
    )
    primary.execute("CREATE INDEX ON tenant_a.events (created_at)")
    standby.wait_caught_up()
    standby.pause_replay()
    doc = {
        "history": {"enabled": False},
        "databases": {
            "main": {
                "dsn": primary.dsn(),
                "throttle": {
                    "max_replica_lag_bytes": limit,
                    "check_every": f"{check_every}s",
                    "resume_after": "1s",
                },
            }
        },
        "tenants": [{"name": "a", "database": "main", "schema": "tenant_a"}],
        "sweeps": {"s": {"interval": "1h"}},
        "plugins": {
            "retention": {
                "rules": [
                    {
                        "name": "events",
                        "table": "events",
                        "column": "created_at",
                        "older_than": "30d",
                        "batch_size": 100,
                    }
                ]
            }
        },
    }
    config = parse_config(doc, Path("bench.toml"))
    plugins = load_plugins(config)
    seen: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(primary.dsn(), autocommit=True) as c:
            while not stop.is_set():
                row = c.execute(
                    "SELECT coalesce((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(),"
                    " replay_lsn)) FROM pg_stat_replication), 0),"
                    " (SELECT count(*) FROM tenant_a.events)"
                ).fetchone()
                assert row is not None
                seen.append((time.monotonic(), float(row[0]), int(row[1])))
                time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result: list[Any] = []
    sweeper = threading.Thread(
        target=lambda: result.append(asyncio.run(sweep_once(config, plugins))), daemon=True
    )
    sweeper.start()
    while not any(lag > limit for _t, lag, _n in seen):
        time.sleep(0.01)
    over = next(t for t, lag, _n in seen if lag > limit)
    time.sleep(check_every + 2.0)
    rows_now = seen[-1][2]
    last_change = max(
        t for (t, _l, n), (_t0, _l0, n0) in zip(seen[1:], seen, strict=False) if n != n0
    )
    standby.resume_replay()
    sweeper.join()
    stop.set()
    poller.join()
    assert rows_now > 0
    return last_change - over, result[0].results[0].details.get("throttled_s", 0.0)


def main() -> int:
    setup_logging(LogConfig(format="json", level="warning"), stream=io.StringIO())
    with ScratchServer() as primary:
        version = primary.scalar("SELECT version()")
        print(f"# {version}")
        standby = standby_of(primary)
        standby.wait_caught_up()
        primary.execute("SELECT pg_create_physical_replication_slot('bench_slot', true)")
        dsn = primary.dsn()
        for i in range(1000):
            primary.execute(f"CREATE SCHEMA IF NOT EXISTS tenant_{i}")
        overhead(dsn)
        asyncio.run(sample_cost(dsn))
        print("\n## 3. reaction to a replay stall (byte lag limit 1MB, batches of 100)")
        print(f"{'check_every':<13}{'reaction (3 trials)':<32}{'throttled_s':>12}")
        for check_every in (1.0, 0.25):
            trials = [reaction(primary, standby, check_every) for _ in range(3)]
            reactions = ", ".join(f"{r:.3f}s" for r, _ in trials)
            throttled = ", ".join(f"{s:.1f}" for _, s in trials)
            print(f"{check_every:<13}{reactions:<32}{throttled:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
