"""Two sweeps at once in one process: no table shared at the same time, tenant caps hold."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from support import run_sql

from sweeperd import ALL_TABLES, Context, Operation
from sweeperd.config import parse_config
from sweeperd.db import Database
from sweeperd.gates import TableGate, TenantGate
from sweeperd.limits import Bounds, Limits
from sweeperd.model import Tenant
from sweeperd.planner import make_plan
from sweeperd.plugins import new_plugin_manager
from sweeperd.runner import Runner


def test_table_gate_excludes_shared_tables_and_any_table() -> None:
    async def main() -> list[str]:
        gate = TableGate()
        order: list[str] = []

        async def use(name: str, tables: tuple[str, ...], hold: float) -> None:
            async with gate.hold(("db", "s"), tables):
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        a = asyncio.create_task(use("a", ("t1",), 0.05))
        await asyncio.sleep(0)
        b = asyncio.create_task(use("b", ("t1", "t2"), 0.01))  # shares t1: waits for a
        c = asyncio.create_task(use("c", ("t3",), 0.01))  # disjoint: runs at once
        await asyncio.gather(a, b, c)
        d = asyncio.create_task(use("d", ("t9",), 0.05))
        await asyncio.sleep(0)
        e = asyncio.create_task(use("e", (ALL_TABLES,), 0.01))  # any table: waits for d
        await asyncio.gather(d, e)
        return order

    order = asyncio.run(main())
    assert order.index("a-") < order.index("b+")
    assert order.index("c+") < order.index("a-")
    assert order.index("d-") < order.index("e+")


def test_tenant_gate_counts_across_callers_with_their_own_limits() -> None:
    async def main() -> int:
        gate = TenantGate()
        active = peak = 0

        async def use(limit: int) -> None:
            nonlocal active, peak
            async with gate.hold(("db", "acme"), limit):
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.02)
                active -= 1

        await asyncio.gather(*(use(2) for _ in range(6)), *(use(3) for _ in range(6)))
        return peak

    assert asyncio.run(main()) == 3


def test_two_sweeps_never_touch_the_same_table_of_a_tenant_at_once(pg_dsn: str) -> None:
    """The nightly and the hourly sweep both prune `cache` of the same tenant."""
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_a",
        "CREATE TABLE public.log (sweep text, started timestamptz, ended timestamptz)",
    )
    spans: list[tuple[str, float, float]] = []

    def make(label: str) -> Operation:
        async def run(ctx: Context) -> None:
            start = time.monotonic()
            await ctx.conn.execute("SELECT pg_sleep(0.3)")
            spans.append((label, start, time.monotonic()))

        return Operation(name=f"x.{label}", run=run, tables=("cache",))

    doc: dict[str, Any] = {
        "databases": {"main": {"dsn": pg_dsn, "max_connections": 4}},
        "history": {"enabled": False},
        "sweeps": {
            "nightly": {"interval": "1h", "operations": ["x.nightly"]},
            "hourly": {"interval": "1h", "operations": ["x.hourly"]},
        },
    }
    config = parse_config(doc, Path("t.toml"))
    operations = {op.name: op for op in (make("nightly"), make("hourly"))}
    tenants = [Tenant("a", "main", "tenant_a")]

    async def main() -> list[str]:
        database = Database(config.databases["main"])
        await database.open()
        try:
            bounds = Bounds(Limits.of(config))
            runner = Runner({"main": database}, new_plugin_manager(), {}, bounds)
            plans = [
                make_plan(config, operations, tenants, sweep=name) for name in ("nightly", "hourly")
            ]
            reports = await asyncio.gather(*(runner.run(plan) for plan in plans))
            return [r.status for report in reports for r in report.results]
        finally:
            await database.close()

    statuses = asyncio.run(main())
    assert statuses == ["ok", "ok"]
    (_, _, first_end), (_, second_start, _) = sorted(spans, key=lambda s: s[1])
    assert first_end <= second_start, "the two sweeps' operations on tenant_a.cache overlapped"
