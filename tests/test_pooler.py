"""sweeperd behind a real PgBouncer (Debian's), in transaction and in session pooling mode.

What broke in production: psycopg prepares a statement after five executions; behind a
transaction pooler another client's Bind reached it with its own parameters, and one rule's
cutoff deleted another tenant's rows inside their retention window. PgBouncer also refuses the
``options`` startup parameter (where a direct connection carries the timeouts), and session
``SET``s and resets land on other clients' server sessions. Every test here runs the real CLI or
the real Database class through a real PgBouncer in front of the test server.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
from servers import PgBouncer
from support import install_plugin, run_cli, run_sql, toml_str, write_config

from sweeperd.config import DatabaseConfig
from sweeperd.db import Database

MODES = ["transaction", "session"]
TENANTS = [f"t{i:02d}" for i in range(20)]
# (rule, table, older_than in days, batch size): small batches, so every run is many batches
# and every statement is executed far more often than psycopg's prepare threshold (5).
RULES = [
    ("d7", "ev7", 7, 7),
    ("d30", "ev30", 30, 11),
    ("d90", "ev90", 90, 13),
    ("d365", "ev365", 365, 17),
]
# Row ages in days: half a day off every cutoff, so no row is near enough to one to be ambiguous.
PER_TENANT = len(RULES) + 2  # the rules, the timeout probe, vacuum.ev7
AGES = [a + 0.5 for a in (0, 1, 3, 6, 8, 12, 20, 29, 31, 45, 60, 88, 91, 120, 200, 364, 366, 400)]


def make_tenants(dsn: str) -> None:
    statements = [
        "CREATE TABLE public.seen (tenant text, lock_timeout text, statement_timeout text)"
    ]
    for tenant in TENANTS:
        statements.append(f"CREATE SCHEMA tenant_{tenant}")
        for _rule, table, _days, _batch in RULES:
            statements.append(
                f"CREATE TABLE tenant_{tenant}.{table} (id bigserial PRIMARY KEY, "
                "created_at timestamptz NOT NULL, age_days float8 NOT NULL)"
            )
            statements.append(f"CREATE INDEX ON tenant_{tenant}.{table} (created_at)")
    run_sql(dsn, *statements)


def add_rows(dsn: str) -> None:
    """One row per age in every table (a new batch of expired and in-window rows)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant in TENANTS:
            for _rule, table, _days, _batch in RULES:
                conn.execute(
                    f"INSERT INTO tenant_{tenant}.{table} (created_at, age_days) "  # type: ignore[arg-type]
                    "SELECT now() - make_interval(secs => a * 86400), a"
                    " FROM unnest(%s::float8[]) a",
                    (AGES,),
                )


def census(dsn: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(tenant, table) → (rows inside the retention window, expired rows)."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant in TENANTS:
            for _rule, table, days, _batch in RULES:
                row = conn.execute(
                    f"SELECT count(*) FILTER (WHERE age_days < %s), "  # type: ignore[arg-type]
                    f"count(*) FILTER (WHERE age_days >= %s) FROM tenant_{tenant}.{table}",
                    (days, days),
                ).fetchone()
                assert row is not None
                out[(tenant, table)] = (int(row[0]), int(row[1]))
    return out


def config_for(
    directory: Path,
    dsn: str,
    pooler: str,
    *,
    extra: str = "",
    history: bool = True,
    lock_timeout: str = "5s",
) -> Path:
    plugins_d = directory / "plugins.d"
    plugins_d.mkdir(exist_ok=True)
    install_plugin(plugins_d, "pooler_probe.py", as_name="probe.py")
    rules = "".join(
        f"""
        [[plugins.retention.rules]]
        name = "{name}"
        table = "{table}"
        column = "created_at"
        older_than = "{days}d"
        batch_size = {batch}
        """
        for name, table, days, batch in RULES
    )
    return write_config(
        directory,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        max_concurrency = 8

        [log]
        format = "json"

        [history]
        enabled = {str(history).lower()}

        [databases.main]
        dsn = {toml_str(dsn)}
        pooler = "{pooler}"
        max_connections = 4
        lock_timeout = "{lock_timeout}"
        statement_timeout = "7min"
        connect_timeout = "5s"

        [[tenant_sources]]
        database = "main"
        schemas = "tenant_%"

        [sweeps.nightly]
        interval = "1h"
        per_tenant_concurrency = 2
        {extra}
        [plugins.vacuum]
        tables = ["ev7"]
        {rules}
        """,
    )


def sweep_json(config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli("sweep", "-c", str(config), "nightly", "--json", *args)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def logs(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("mode", MODES)
def test_retention_through_pgbouncer_keeps_every_row_inside_its_window(
    tmp_path: Path, pg_dsn: str, mode: str
) -> None:
    make_tenants(pg_dsn)
    version = int(run_sql_rows(pg_dsn, "SHOW server_version_num")[0][0])
    # A session pool smaller than max_connections would make our last connections wait for a
    # server (query_wait_timeout); a transaction pool may be smaller: it is shared.
    pool_size = 4 if mode == "session" else 2
    with PgBouncer(pg_dsn, pool_mode=mode, default_pool_size=pool_size) as bouncer:
        config = config_for(tmp_path, bouncer.through(pg_dsn), mode)
        for sweep_no in range(5):
            add_rows(pg_dsn)
            before = census(pg_dsn)
            code, report, stderr = sweep_json(config)
            tenant_items = [r for r in report["results"] if r["tenant"] is not None]
            failures = [r for r in tenant_items if r["status"] != "ok"]
            assert failures == [], failures
            (stats,) = [r for r in report["results"] if r["tenant"] is None]
            # VACUUM (ONLY_DATABASE_STATS) exists from PostgreSQL 16 on.
            assert stats["status"] == ("ok" if version >= 160000 else "skipped"), stats
            assert code == 0, stderr
            after = census(pg_dsn)
            for key, (inside, _expired) in before.items():
                # Not one row newer than its rule's cutoff deleted, every expired row gone.
                assert after[key] == (inside, 0), (sweep_no, key, before[key], after[key])
            deleted = sum(
                r["rows"] for r in report["results"] if r["operation"].startswith("retention.")
            )
            assert deleted == sum(expired for _inside, expired in before.values())
            assert len(tenant_items) == len(TENANTS) * PER_TENANT
        # The timeouts an operation runs under are the configured ones, in every mode.
        seen = run_sql_rows(pg_dsn, "SELECT DISTINCT lock_timeout, statement_timeout FROM seen")
        assert seen == [("5s", "7min")]
        # The run history was written through the pooler too (5 sweeps, one row each).
        runs = run_sql_rows(pg_dsn, "SELECT count(*), sum(ok) FROM sweeperd.runs")
        ok_per_sweep = len(TENANTS) * PER_TENANT + (1 if version >= 160000 else 0)
        assert runs == [(5, 5 * ok_per_sweep)]


def run_sql_rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_a_delete_behind_an_access_exclusive_lock_fails_within_lock_timeout(
    tmp_path: Path, pg_dsn: str, mode: str
) -> None:
    make_tenants(pg_dsn)
    add_rows(pg_dsn)
    with PgBouncer(pg_dsn, pool_mode=mode, default_pool_size=3) as bouncer:
        config = config_for(
            tmp_path, bouncer.through(pg_dsn), mode, lock_timeout="1s", history=False
        )
        with psycopg.connect(pg_dsn) as holder:  # a transaction: the lock is held until rollback
            holder.execute("LOCK TABLE tenant_t03.ev30 IN ACCESS EXCLUSIVE MODE")
            code, report, _stderr = sweep_json(config, "--tenant", "t03", "--only", "retention.*")
            holder.rollback()
    results = {r["operation"]: r for r in report["results"]}
    blocked = results["retention.d30"]
    assert blocked["status"] == "failed"
    assert "55P03" in blocked["error"], blocked
    assert blocked["duration_s"] < 1.0 + 1.0, blocked  # lock_timeout + 1 s
    for name in ("retention.d7", "retention.d90", "retention.d365"):
        assert results[name]["status"] == "ok", results[name]
    assert code == 1


def test_pooler_none_behind_pgbouncer_says_to_set_pooler(tmp_path: Path, pg_dsn: str) -> None:
    make_tenants(pg_dsn)
    with PgBouncer(pg_dsn, pool_mode="transaction") as bouncer:
        # A static tenant: its items carry the reason (discovery cannot run at all).
        static = '[[tenants]]\nname = "t00"\ndatabase = "main"\nschema = "tenant_t00"\n'
        config = config_for(
            tmp_path, bouncer.through(pg_dsn), "none", history=False, extra="\n" + static
        )
        code, report, stderr = sweep_json(config)
    assert code == 3, stderr
    errors = {r["error"] for r in report["results"]}
    assert len(errors) == 1, errors
    (error,) = errors
    assert "unsupported startup parameter" in error
    assert "pooler" in error and "[databases.main]" in error


def test_ignored_startup_options_are_detected_and_retention_still_times_out(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The common workaround (ignore_startup_parameters = options) silently drops the
    timeouts a direct connection carries: sweeperd notices, and retention's batches are
    still bounded because they set their timeouts in their own transaction."""
    make_tenants(pg_dsn)
    add_rows(pg_dsn)
    with PgBouncer(pg_dsn, pool_mode="transaction", ignore_startup_parameters="options") as b:
        config = config_for(tmp_path, b.through(pg_dsn), "none", lock_timeout="1s", history=False)
        with psycopg.connect(pg_dsn) as holder:
            holder.execute("LOCK TABLE tenant_t05.ev7 IN ACCESS EXCLUSIVE MODE")
            code, report, stderr = sweep_json(config, "--tenant", "t05", "--only", "retention.d7")
            holder.rollback()
    (result,) = report["results"]
    assert result["status"] == "failed" and "55P03" in result["error"], result
    assert result["duration_s"] < 2.0, result
    warnings = [e for e in logs(stderr) if "did not reach the server" in e["event"]]
    assert len(warnings) == 1, stderr
    assert "pooler" in warnings[0]["fix"]
    assert code == 1


def test_transaction_mode_reports_role_defaults_that_differ_with_the_fix(
    tmp_path: Path, pg_dsn: str
) -> None:
    make_tenants(pg_dsn)
    role, dbname = run_sql_rows(pg_dsn, "SELECT current_user, current_database()")[0]
    with PgBouncer(pg_dsn, pool_mode="transaction") as bouncer:
        config = config_for(tmp_path, bouncer.through(pg_dsn), "transaction", history=False)
        _code, _report, stderr = sweep_json(config, "--only", "probe.*")
        warnings = [e for e in logs(stderr) if "role's defaults" in e["event"]]
        assert len(warnings) == 1, stderr
        fix = warnings[0]["fix"]
        assert fix == (
            f'ALTER ROLE "{role}" IN DATABASE "{dbname}" SET "lock_timeout" = \'5000ms\'; '
            f'ALTER ROLE "{role}" IN DATABASE "{dbname}" SET "statement_timeout" = \'420000ms\';'
        )
        try:
            run_sql(pg_dsn, fix)
            # New server sessions pick the role's settings up: PgBouncer's pool must reconnect.
            bouncer.admin("RECONNECT")
            _code, _report, stderr = sweep_json(config, "--only", "probe.*")
            assert not [e for e in logs(stderr) if "role's defaults" in e["event"]], stderr
        finally:
            run_sql(pg_dsn, f'ALTER ROLE "{role}" IN DATABASE "{dbname}" RESET ALL')


@pytest.mark.parametrize("pooler", ["none", "session", "transaction"])
def test_a_rules_own_lock_timeout_never_reaches_other_operations(
    tmp_path: Path, pg_dsn: str, pooler: str
) -> None:
    make_tenants(pg_dsn)
    add_rows(pg_dsn)
    run_sql(pg_dsn, "CREATE TABLE public.outside (lock_timeout text)")
    plugin = textwrap.dedent("""\
        import sweeperd

        async def look(ctx):
            # Outside any transaction: the session's (or, behind a transaction pooler, the
            # server session's) lock_timeout.
            cur = await ctx.conn.execute("SELECT current_setting('lock_timeout')")
            (value,) = await cur.fetchone()
            await ctx.conn.execute("INSERT INTO public.outside VALUES (%s)", (value,))

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            return [sweeperd.Operation(name="look.outside", run=look, tables=("ev7",),
                                       after=("retention.*",))]
        """)
    plugins_d = tmp_path / "plugins.d"
    plugins_d.mkdir()
    (plugins_d / "look.py").write_text(plugin, encoding="utf-8")
    rule = """
        [[plugins.retention.rules]]
        name = "strict"
        table = "ev7"
        column = "created_at"
        older_than = "7d"
        batch_size = 3
        lock_timeout = "123ms"
        """

    def config(dsn: str) -> Path:
        return write_config(
            tmp_path,
            f"""
            [daemon]
            plugin_dirs = ["plugins.d"]
            [log]
            format = "json"
            [history]
            enabled = false
            [databases.main]
            dsn = {toml_str(dsn)}
            pooler = "{pooler}"
            max_connections = 1
            lock_timeout = "4s"
            [[tenant_sources]]
            database = "main"
            schemas = "tenant_%"
            {rule}
            """,
        )

    def sweep(dsn: str) -> None:
        result = run_cli("sweep", "-c", str(config(dsn)), "--json")
        assert result.returncode == 0, result.stderr + result.stdout

    if pooler == "none":
        sweep(pg_dsn)
        expected = "4s"
    else:
        with PgBouncer(pg_dsn, pool_mode=pooler, default_pool_size=1) as bouncer:
            sweep(bouncer.through(pg_dsn))
        # Behind a transaction pooler outside a transaction: the role's default (none set).
        expected = "4s" if pooler == "session" else "0"
    seen = run_sql_rows(pg_dsn, "SELECT DISTINCT lock_timeout FROM public.outside")
    assert seen == [(expected,)]


def test_no_server_side_prepared_statement_is_ever_made(pg_dsn: str) -> None:
    """Many executions of the same statements on one direct connection: nothing prepared."""
    seen: list[int] = []

    async def main() -> None:
        database = Database(DatabaseConfig(name="main", dsn=pg_dsn, max_connections=1))
        await database.open()
        try:
            for _ in range(20):
                async with database.connection("x") as conn:
                    async with database.transaction(conn):
                        await conn.execute("SELECT %s::int", (1,))
                    cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
                    row = await cur.fetchone()
                    assert row is not None
                    seen.append(int(row[0]))
        finally:
            await database.close()

    asyncio.run(main())
    assert seen == [0] * 20
