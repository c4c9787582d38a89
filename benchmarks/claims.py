"""What claiming as you go costs: one firing of N tenants with and without sweeperd.claims.

    python benchmarks/claims.py [--tenants 10000] [--instances 2]   # embedded PostgreSQL

Every tenant has one operation that does nothing (no query), so what is measured is sweeperd's
own work: planning, slots, results and, with claims, the seeding, the rounds (finish, renew,
take) and the fences. The baseline is the same run without claims, in the same process and on
the same server, measured right before. Target (issue 13): claiming overhead per tenant <= 1 ms
of client CPU. With ``--instances 2`` two runs share the firing in one process (the CPU then
counts both: per tenant it is still one claim each).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fanout import server_dsn

import sweeperd
from sweeperd.config import Config, parse_config
from sweeperd.coordination import Claims
from sweeperd.db import Database
from sweeperd.limits import Bounds, Limits
from sweeperd.model import Tenant
from sweeperd.planner import make_plan
from sweeperd.plugins import new_plugin_manager
from sweeperd.report import SweepReport
from sweeperd.runner import Runner


async def nothing(ctx: sweeperd.Context) -> int:
    return 0


OP = sweeperd.Operation(name="bench.nothing", run=nothing, tables=("t",))


def make_config(dsn: str, tenants: int) -> Config:
    doc = {
        "log": {"level": "warning"},
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": 8}},
        "tenants": [
            {"name": f"t{i:05d}", "database": "main", "schema": f"s{i:05d}"} for i in range(tenants)
        ],
        "sweeps": {"b": {"cron": "0 3 * * *", "operations": ["bench.*"]}},
    }
    return parse_config(doc, Path("bench.toml"))


async def one_firing(
    config: Config, firing: dt.datetime | None, instances: int
) -> tuple[float, float, list[SweepReport]]:
    """Wall and client CPU seconds of one firing (claims when ``firing`` is given)."""
    tenants = [Tenant(t.name, t.database, t.schema) for t in config.tenants]
    databases = []
    for _ in range(instances):
        database = Database(config.databases["main"])
        await database.open()
        databases.append(database)
    try:
        runners = [
            Runner({"main": db}, new_plugin_manager(), {}, Bounds(Limits.of(config)))
            for db in databases
        ]
        wall, cpu = time.perf_counter(), time.process_time()

        async def run(i: int) -> SweepReport:
            plan = make_plan(config, {OP.name: OP}, tenants, sweep="b")
            claims = (
                Claims(f"bench:{i}").firing({"main": databases[i]}, "b", firing, lease=30.0)
                if firing is not None
                else None
            )
            return await runners[i].run(plan, claims=claims)

        reports = await asyncio.gather(*(run(i) for i in range(instances)))
        return time.perf_counter() - wall, time.process_time() - cpu, reports
    finally:
        for database in databases:
            await database.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args()
    with server_dsn() as dsn:
        config = make_config(dsn, args.tenants)
        firing = dt.datetime.now(dt.UTC).replace(microsecond=0)
        base_wall, base_cpu, base = asyncio.run(one_firing(config, None, 1))
        wall, cpu, reports = asyncio.run(one_firing(config, firing, args.instances))
        done = sum(len(r.results) for r in reports)
        if done != args.tenants or sum(len(r.results) for r in base) != args.tenants:
            print(f"unexpected result counts: {done} / {args.tenants}")
            return 1
        share = ", ".join(str(len(r.results)) for r in reports)
        print(f"tenants                        {args.tenants}")
        print(f"without claims: wall           {base_wall:8.3f} s   client CPU {base_cpu:8.3f} s")
        print(
            f"with claims, {args.instances} run(s): wall  {wall:8.3f} s   client CPU {cpu:8.3f} s"
        )
        print(f"tenants per run                {share}")
        per_tenant_ms = (cpu - base_cpu) / args.tenants * 1000
        print(f"claiming overhead per tenant   {per_tenant_ms:8.3f} ms of client CPU (target <= 1)")
        print(f"CPU ratio with/without         {cpu / base_cpu:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
