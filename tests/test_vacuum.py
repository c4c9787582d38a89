"""The bundled vacuum plugin against a real PostgreSQL, driven the way ``sweeperd sweep`` is.

Dead tuples come from the cumulative statistics (``pg_stat_user_tables``), which a backend
publishes shortly after its transactions end: set-up code forces the flush and then polls until
the expected counts are visible, so nothing depends on timing. Tables are created with
``autovacuum_enabled = false`` so that only sweeperd vacuums them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from psycopg import sql
from support import (
    DATABASE_STATS_SKIP_REASON,
    PgServer,
    database_stats_status,
    run_cli,
    throwaway_role,
    vacuum_refusal_words,
    write_config,
)
from sweeperd.bundled.vacuum import Settings, sweeperd_validate_settings, vacuum_options

from sweeperd.config import Config, ConfigError, load_config
from sweeperd.model import Result
from sweeperd.plugins import Plugins, load_plugins
from sweeperd.report import SweepReport
from sweeperd.sweep import sweep_once

# -- helpers ---------------------------------------------------------------------------------------


def config_doc(
    dsn: str,
    tenants: Sequence[tuple[str, str]],
    *,
    vacuum: Mapping[str, Any] | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
    lock_timeout: str = "5s",
) -> dict[str, Any]:
    plugins: dict[str, Any] = {}
    if vacuum is not None:
        plugins["vacuum"] = dict(vacuum)
    if rules:
        plugins["retention"] = {"rules": [dict(r) for r in rules]}
    return {
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": 4, "lock_timeout": lock_timeout}},
        "tenants": [
            {"name": name, "database": "main", "schema": schema} for name, schema in tenants
        ],
        "plugins": plugins,
    }


def load(tmp_path: Path, doc: Mapping[str, Any]) -> tuple[Config, Plugins]:
    path = write_config(tmp_path, tomli_w.dumps(doc))
    config = load_config(path)
    return config, load_plugins(config, entry_points=False)


def sweep(
    config: Config, plugins: Plugins, *, dry_run: bool = False, only: Sequence[str] = ("vacuum.*",)
) -> SweepReport:
    return asyncio.run(sweep_once(config, plugins, only_globs=list(only), dry_run=dry_run))


def result_of(report: SweepReport, operation: str, tenant: str | None) -> Result:
    [result] = [r for r in report.results if r.operation == operation and r.tenant == tenant]
    return result


def auto_results(report: SweepReport, tenant: str) -> dict[str, Result]:
    """vacuum.auto's results for one tenant, by table (``details["table"]``): one per table."""
    out: dict[str, Result] = {}
    for r in report.results:
        if r.operation == "vacuum.auto" and r.tenant == tenant:
            table = r.details["table"]
            assert table not in out, f"two vacuum.auto results for {table!r}: {report.results}"
            out[table] = r
    return out


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def make_table(
    dsn: str, schema: str, table: str, *, rows: int, delete: int = 0, update: int = 0
) -> None:
    """A table of ``rows`` rows of which ``delete`` were deleted and ``update`` updated.

    The numbers are literals, not parameters: psycopg would read a ``%`` in a quoted name as a
    placeholder in a statement that has parameters (tests/test_hostile_vacuum.py has such names).
    """
    ident = sql.Identifier(schema, table)
    n, deleted, updated_from = sql.Literal(rows), sql.Literal(delete), sql.Literal(rows - update)
    with connect(dsn) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, v text) WITH (autovacuum_enabled = false)"
            ).format(ident)
        )
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'x' FROM generate_series(1, {}) g").format(ident, n)
        )
        if delete:
            conn.execute(sql.SQL("DELETE FROM {} WHERE id <= {}").format(ident, deleted))
        if update:
            conn.execute(
                sql.SQL("UPDATE {} SET v = 'y' WHERE id > {} AND id <= {}").format(
                    ident, updated_from, n
                )
            )
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")  # the flush happens when the backend goes idle


def stats(dsn: str, schema: str, table: str) -> tuple[int, int, int]:
    """(n_dead_tup, n_live_tup, vacuum_count) as the statistics see them now."""
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT n_dead_tup, n_live_tup, vacuum_count FROM pg_stat_user_tables"
            " WHERE schemaname = %s AND relname = %s",
            (schema, table),
        ).fetchone()
    assert row is not None, f"no statistics for {schema}.{table}"
    return int(row[0]), int(row[1]), int(row[2])


def make_settled_table(dsn: str, schema: str, table: str, *, rows: int, delete: int = 0) -> None:
    """A table whose dead tuples are all that can make it need a vacuum: ``rows`` inserted and
    vacuumed (nothing inserted since its last vacuum), then ``delete`` rows deleted and the
    table analyzed (nothing changed since its last analyze, ``reltuples`` the live rows, the
    statistics' dead tuples exactly ``delete``). Each step waits for the statistics of the one
    before, so that no count arrives after the VACUUM or ANALYZE that should have reset it."""
    make_table(dsn, schema, table, rows=rows)
    ident = sql.Identifier(schema, table)
    wait_for_table_stats(dsn, schema, table, (0, rows, rows))
    with connect(dsn) as conn:
        conn.execute(sql.SQL("VACUUM {}").format(ident))
        if delete:
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE id <= {}").format(ident, sql.Literal(delete))
            )
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT 1")
    wait_for_table_stats(dsn, schema, table, (delete, 0, rows + delete))  # VACUUM: no analyze
    with connect(dsn) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
    wait_for_table_stats(dsn, schema, table, (delete, 0, 0))


def wait_for_table_stats(dsn: str, schema: str, table: str, expected: tuple[int, int, int]) -> None:
    """Poll until (n_dead_tup, n_ins_since_vacuum, n_mod_since_analyze) are ``expected``."""
    deadline = time.monotonic() + 15
    with connect(dsn) as conn:
        while True:
            row = conn.execute(
                "SELECT n_dead_tup, n_ins_since_vacuum, n_mod_since_analyze"
                " FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
                (schema, table),
            ).fetchone()
            if row is not None and tuple(row) == expected:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"statistics of {schema}.{table}: {row}, expected {expected}")
            time.sleep(0.05)


def wait_for_dead_tuples(dsn: str, schema: str, table: str, at_least: int) -> int:
    """Poll until the statistics show the dead tuples (they are published asynchronously)."""
    deadline = time.monotonic() + 15
    with connect(dsn) as conn:
        while True:
            row = conn.execute(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
                (schema, table),
            ).fetchone()
            if row is not None and row[0] >= at_least:
                return int(row[0])
            if time.monotonic() > deadline:
                pytest.fail(
                    f"statistics never showed {at_least} dead tuples in {schema}.{table}"
                    f" (last: {row})"
                )
            time.sleep(0.05)


# -- dead tuples ---------------------------------------------------------------------------------


def test_vacuum_removes_dead_tuples(tmp_path: Path, pg_dsn: str) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=2000, delete=600, update=400)
    before = wait_for_dead_tuples(pg_dsn, "tenant_a", "events", 1000)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], vacuum={"tables": ["events"]})
    )
    report = sweep(config, plugins)

    result = result_of(report, "vacuum.events", "a")
    assert result.status == "ok", result.error
    assert result.schema == "tenant_a"
    assert result.details["dead_tuples_before"] >= before > 0
    assert result.details["dead_tuples_after"] < result.details["dead_tuples_before"]
    assert result.rows == (
        result.details["dead_tuples_before"] - result.details["dead_tuples_after"]
    )
    dead, live, vacuums = stats(pg_dsn, "tenant_a", "events")
    assert vacuums == 1
    assert dead < before
    assert live == 1400


def test_vacuum_without_analyze_and_skip_locked(tmp_path: Path, pg_dsn: str) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=100, delete=50)
    wait_for_dead_tuples(pg_dsn, "tenant_a", "events", 50)
    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn,
            [("a", "tenant_a")],
            vacuum={
                "tables": ["events"],
                "analyze": False,
                "skip_locked": False,
                "buffer_usage_limit": "1MB",
            },
        ),
    )
    result = result_of(sweep(config, plugins), "vacuum.events", "a")
    assert result.status == "ok", result.error
    with connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = 'events'"
        ).fetchone()
    assert row == (1, 0)


# -- SKIP_LOCKED ----------------------------------------------------------------------------------


def test_locked_table_is_skipped_not_waited_for(tmp_path: Path, pg_dsn: str) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=100, delete=50)
    make_table(pg_dsn, "tenant_a", "other", rows=100, delete=50)
    # A short lock_timeout: had the vacuum waited for the lock it would fail, not hang.
    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn, [("a", "tenant_a")], vacuum={"tables": ["events", "other"]}, lock_timeout="2s"
        ),
    )
    with psycopg.connect(pg_dsn) as app:
        app.execute("LOCK TABLE tenant_a.events IN ACCESS EXCLUSIVE MODE")
        report = sweep(config, plugins)
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        app.rollback()

    locked = result_of(report, "vacuum.events", "a")
    assert locked.status == "skipped"
    assert locked.error is not None and "lock" in locked.error
    assert "events" in locked.error
    other = result_of(report, "vacuum.other", "a")
    assert other.status == "ok", other.error
    assert stats(pg_dsn, "tenant_a", "events")[2] == 0
    assert stats(pg_dsn, "tenant_a", "other")[2] == 1


def test_without_skip_locked_a_locked_table_fails_on_lock_timeout(
    tmp_path: Path, pg_dsn: str
) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=100, delete=50)
    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn,
            [("a", "tenant_a")],
            vacuum={"tables": ["events"], "skip_locked": False},
            lock_timeout="300ms",
        ),
    )
    with psycopg.connect(pg_dsn) as app:
        app.execute("LOCK TABLE tenant_a.events IN ACCESS EXCLUSIVE MODE")
        report = sweep(config, plugins)
        app.rollback()
    result = result_of(report, "vacuum.events", "a")
    assert result.status == "failed"
    assert result.error is not None and "55P03" in result.error


def test_auto_skips_locked_tables_and_vacuums_the_rest(tmp_path: Path, pg_dsn: str) -> None:
    for name in ("locked", "free"):
        make_table(pg_dsn, "tenant_a", name, rows=2000, delete=1500)
        wait_for_dead_tuples(pg_dsn, "tenant_a", name, 1500)
    config, plugins = load(
        tmp_path,
        config_doc(pg_dsn, [("a", "tenant_a")], vacuum={"tables": "auto"}, lock_timeout="2s"),
    )
    with psycopg.connect(pg_dsn) as app:
        app.execute("LOCK TABLE tenant_a.locked IN ACCESS EXCLUSIVE MODE")
        report = sweep(config, plugins)
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        app.rollback()
    results = auto_results(report, "a")
    assert sorted(results) == ["free", "locked"]  # both planned: each its own item
    locked, free = results["locked"], results["free"]
    # SKIP_LOCKED: the locked table is skipped at once (not waited for until lock_timeout),
    # in its own result, which still says why it was chosen.
    assert locked.status == "skipped", locked
    assert locked.error is not None and "lock" in locked.error and "locked" in locked.error
    assert locked.details["table"] == "locked" and locked.details["score"] > 1
    assert locked.schema == "tenant_a"
    assert free.status == "ok", free.error
    assert free.rows == 1500
    assert report.exit_code() == 0
    assert stats(pg_dsn, "tenant_a", "locked")[2] == 0
    assert stats(pg_dsn, "tenant_a", "free")[2] == 1


# -- tables = "auto" -----------------------------------------------------------------------------


def test_auto_vacuums_only_tables_past_the_thresholds(tmp_path: Path, pg_dsn: str) -> None:
    """min_dead_tuples/min_dead_ratio, written in the configuration, are the dead-tuple
    threshold: max(min_dead_tuples, min_dead_ratio * live tuples). Each table is vacuumed and
    analyzed before its rows are deleted, so its dead tuples are its only reason."""
    tables = {  # name: (rows, deleted) → threshold max(100, 0.3 * live)
        "many_dead": (1000, 600),  # 600 dead, threshold 120: ratio 5
        "half_dead": (1000, 500),  # 500 dead, threshold 150: ratio 3.33
        "few_dead": (1000, 10),  # 10 dead, threshold 297
        "low_ratio": (1000, 200),  # 200 dead, threshold 240
        "small": (100, 90),  # 90 dead, threshold 100 (min_dead_tuples)
        "clean": (1000, 0),
    }
    for name, (rows, deleted) in tables.items():
        make_settled_table(pg_dsn, "tenant_a", name, rows=rows, delete=deleted)
    make_settled_table(pg_dsn, "tenant_b", "many_dead", rows=1000, delete=100)  # threshold 270
    before = {name: stats(pg_dsn, "tenant_a", name)[2] for name in tables}

    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn,
            [("a", "tenant_a"), ("b", "tenant_b")],
            vacuum={"tables": "auto", "min_dead_tuples": 100, "min_dead_ratio": 0.3},
        ),
    )
    assert "vacuum.auto" in plugins.operations
    report = sweep(config, plugins)

    a, b = auto_results(report, "a"), auto_results(report, "b")
    assert b == {}
    assert list(a) == ["many_dead", "half_dead"]  # most urgent first
    assert [r.status for r in a.values()] == ["ok", "ok"], [r.error for r in a.values()]
    assert a["many_dead"].rows == 600 and a["half_dead"].rows == 500
    assert a["many_dead"].details["score"] == 5.0
    assert a["many_dead"].details["reasons"]["dead"] == {
        "value": 600,
        "threshold": 120,
        "ratio": 5.0,
    }
    assert next(iter(a["half_dead"].details["reasons"])) == "dead"  # the most pressing first
    assert a["half_dead"].details["freeze"] is False
    assert report.not_needed == {"vacuum.auto": 5}  # 4 of tenant a, 1 of tenant b
    assert report.to_json()["not_needed"] == {"vacuum.auto": 5}
    for name in tables:
        vacuumed = name in ("many_dead", "half_dead")
        assert stats(pg_dsn, "tenant_a", name)[2] == before[name] + vacuumed, name
    assert stats(pg_dsn, "tenant_b", "many_dead")[2] == 1  # the settling vacuum only


def test_auto_without_min_dead_settings_uses_autovacuums_threshold(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Unwritten, min_dead_tuples and min_dead_ratio leave the threshold to the server:
    autovacuum_vacuum_threshold (50) + autovacuum_vacuum_scale_factor (0.2) * live tuples."""
    make_settled_table(pg_dsn, "tenant_a", "over", rows=1000, delete=300)  # 300 ≥ 50 + 140
    make_settled_table(pg_dsn, "tenant_a", "under", rows=1000, delete=150)  # 150 < 50 + 170
    with connect(pg_dsn) as conn:
        server = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('autovacuum_vacuum_threshold', 'autovacuum_vacuum_scale_factor')"
            ).fetchall()
        )
    assert server == {"autovacuum_vacuum_threshold": "50", "autovacuum_vacuum_scale_factor": "0.2"}
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], vacuum={"tables": "auto"})
    )
    report = sweep(config, plugins, dry_run=True)
    results = auto_results(report, "a")
    assert list(results) == ["over"]
    assert results["over"].details["reasons"]["dead"] == {
        "value": 300,
        "threshold": 190,
        "ratio": round(300 / 190, 4),
    }
    assert report.not_needed == {"vacuum.auto": 1}


def test_auto_dry_run_vacuums_nothing(tmp_path: Path, pg_dsn: str) -> None:
    make_settled_table(pg_dsn, "tenant_a", "bloated", rows=2000, delete=1200)
    make_settled_table(pg_dsn, "tenant_a", "fine", rows=2000, delete=10)
    before = {t: stats(pg_dsn, "tenant_a", t) for t in ("bloated", "fine")}
    assert before["bloated"] == (1200, 800, 1)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], vacuum={"tables": "auto"})
    )  # autovacuum's thresholds
    report = sweep(config, plugins, dry_run=True)
    results = auto_results(report, "a")
    assert list(results) == ["bloated"]
    result = results["bloated"]
    assert result.status == "dry-run"
    assert result.rows == 1200  # what a vacuum would remove
    assert result.details["dead_tuples_before"] == 1200
    assert result.details["score"] > 1
    assert report.not_needed == {"vacuum.auto": 1}
    assert {t: stats(pg_dsn, "tenant_a", t) for t in before} == before


# -- version gating ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "version", "expected"),
    [
        (Settings(tables=()), 110000, "ANALYZE"),
        (Settings(tables=()), 120000, "ANALYZE, SKIP_LOCKED"),
        (Settings(tables=()), 150000, "ANALYZE, SKIP_LOCKED"),
        (Settings(tables=()), 160000, "ANALYZE, SKIP_LOCKED, SKIP_DATABASE_STATS"),
        (Settings(tables=(), buffer_usage_limit="256MB"), 150000, "ANALYZE, SKIP_LOCKED"),
        (
            Settings(tables=(), buffer_usage_limit="256MB"),
            160000,
            "ANALYZE, SKIP_LOCKED, SKIP_DATABASE_STATS, BUFFER_USAGE_LIMIT '256MB'",
        ),
        (Settings(tables=(), analyze=False, skip_locked=False), 110000, ""),
        (Settings(tables=(), analyze=False, skip_locked=False), 180000, "SKIP_DATABASE_STATS"),
        (Settings(tables=(), analyze=False), 120000, "SKIP_LOCKED"),
    ],
)
def test_vacuum_options_by_server_version(
    pg_server: PgServer, settings: Settings, version: int, expected: str
) -> None:
    with connect(pg_server.admin_dsn) as conn:
        rendered = sql.SQL(", ").join(vacuum_options(settings, version)).as_string(conn)
    assert rendered == expected


def test_vacuum_options_for_this_server_are_accepted(pg_dsn: str) -> None:
    make_table(pg_dsn, "public", "t", rows=10, delete=5)
    settings = Settings(tables=("t",), buffer_usage_limit="256MB")
    with connect(pg_dsn) as conn:
        options = vacuum_options(settings, conn.info.server_version)
        conn.execute(sql.SQL("VACUUM ({}) public.t").format(sql.SQL(", ").join(options)))


# -- vacuum.database_stats -----------------------------------------------------------------------


def test_database_stats_runs_after_every_table_vacuum(
    tmp_path: Path, pg_dsn: str, server_version_num: int
) -> None:
    """On 16+ it vacuums; before 16 it is skipped (ONLY_DATABASE_STATS needs 16), and either way
    only once every table vacuum of the sweep has finished."""
    tenants = [(f"t{i}", f"tenant_{i}") for i in range(3)]
    for _name, schema in tenants:
        for table in ("events", "logs"):
            make_table(pg_dsn, schema, table, rows=200, delete=100)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, tenants, vacuum={"tables": ["events", "logs"]})
    )
    report = sweep(config, plugins)

    stats_result = result_of(report, "vacuum.database_stats", None)
    if server_version_num >= 160000:
        assert stats_result.status == "ok", stats_result.error
        assert stats_result.error is None
    else:
        assert stats_result.status == "skipped"
        assert stats_result.error == DATABASE_STATS_SKIP_REASON
    assert stats_result.database == "main"
    table_vacuums = [r for r in report.results if r.operation != "vacuum.database_stats"]
    assert len(table_vacuums) == 6
    assert {r.status for r in table_vacuums} == {"ok"}
    assert stats_result.started_at is not None
    for r in table_vacuums:
        assert r.finished_at is not None
        assert r.finished_at <= stats_result.started_at, r.operation


def test_no_vacuum_operations_without_tables(tmp_path: Path) -> None:
    _config, plugins = load(tmp_path, config_doc("dbname=x", [], vacuum={"analyze": True}))
    assert not any(name.startswith("vacuum.") for name in plugins.operations)


# -- ordering with retention ---------------------------------------------------------------------


def test_retention_finishes_before_the_vacuum_of_its_table(
    tmp_path: Path, pg_dsn: str, server_version_num: int
) -> None:
    tenants = [("a", "tenant_a"), ("b", "tenant_b")]
    for _name, schema in tenants:
        make_table(pg_dsn, schema, "notifications", rows=10, delete=0)
        with connect(pg_dsn) as conn:
            ident = sql.Identifier(schema, "notifications")
            conn.execute(sql.SQL("ALTER TABLE {} ADD created_at timestamptz").format(ident))
            conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(ident))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, 'x', now() - interval '100 days'"
                    " FROM generate_series(11, 510) g"
                ).format(ident)
            )
    doc = config_doc(
        pg_dsn,
        tenants,
        vacuum={"tables": ["notifications"]},
        rules=[
            {
                "name": "notifications",
                "table": "notifications",
                "column": "created_at",
                "older_than": "30d",
                "batch_size": 100,
                "pause": "50ms",
            }
        ],
    )
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins, only=["retention.*", "vacuum.*"])

    statuses = {(r.operation, r.tenant): r.status for r in report.results}
    expected = {
        (op, name): "ok"
        for name, _schema in tenants
        for op in ("retention.notifications", "vacuum.notifications")
    }
    expected[("vacuum.database_stats", None)] = database_stats_status(server_version_num)
    assert statuses == expected, [r.error for r in report.results]
    for name, schema in tenants:
        retention = result_of(report, "retention.notifications", name)
        vacuum = result_of(report, "vacuum.notifications", name)
        assert retention.rows == 500
        assert retention.finished_at is not None and vacuum.started_at is not None
        assert retention.finished_at <= vacuum.started_at
        with connect(pg_dsn) as conn:
            assert conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "notifications"))
            ).fetchone() == (10,)


# -- failures, dry run ---------------------------------------------------------------------------


def test_missing_table_fails_with_undefined_table(tmp_path: Path, pg_dsn: str) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=10, delete=5)
    make_table(pg_dsn, "tenant_b", "other", rows=10, delete=5)
    config, plugins = load(
        tmp_path,
        config_doc(pg_dsn, [("a", "tenant_a"), ("b", "tenant_b")], vacuum={"tables": ["events"]}),
    )
    report = sweep(config, plugins)
    missing = result_of(report, "vacuum.events", "b")
    assert missing.status == "failed"
    assert missing.error is not None and "42P01" in missing.error
    assert result_of(report, "vacuum.events", "a").status == "ok"


def test_vacuum_refused_for_lack_of_privileges_is_a_failure(
    tmp_path: Path, pg_dsn: str, server_version_num: int
) -> None:
    """PostgreSQL only warns ("permission denied to vacuum ..., skipping it" on 16+, "skipping
    ... --- only table or database owner can vacuum it" before): not an ok."""
    make_table(pg_dsn, "tenant_a", "events", rows=10, delete=5)
    with throwaway_role(pg_dsn, "vacuum_lowly") as role:
        with connect(pg_dsn) as conn:
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA tenant_a TO {}").format(sql.Identifier(role.name))
            )
            conn.execute(
                sql.SQL("GRANT SELECT, DELETE ON tenant_a.events TO {}").format(
                    sql.Identifier(role.name)
                )
            )
        config, plugins = load(
            tmp_path,
            config_doc(role.dsn(pg_dsn), [("a", "tenant_a")], vacuum={"tables": ["events"]}),
        )
        result = result_of(sweep(config, plugins, only=["vacuum.events"]), "vacuum.events", "a")
    assert result.status == "failed", result.error
    assert result.error is not None
    assert vacuum_refusal_words(server_version_num) in result.error
    assert '"events"' in result.error


def test_dry_run_vacuums_nothing_and_reports_dead_tuples(
    tmp_path: Path, pg_dsn: str, server_version_num: int
) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=500, delete=300)
    wait_for_dead_tuples(pg_dsn, "tenant_a", "events", 300)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], vacuum={"tables": ["events"]})
    )
    report = sweep(config, plugins, dry_run=True)

    result = result_of(report, "vacuum.events", "a")
    assert result.status == "dry-run"
    assert result.details["dead_tuples_before"] == 300
    assert result.rows == 300
    assert "dead_tuples_after" not in result.details
    stats_result = result_of(report, "vacuum.database_stats", None)
    assert stats_result.status == database_stats_status(server_version_num, "dry-run")
    if server_version_num < 160000:
        assert stats_result.error == DATABASE_STATS_SKIP_REASON
    assert stats(pg_dsn, "tenant_a", "events") == (300, 200, 0)
    with connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT last_vacuum, last_analyze FROM pg_stat_user_tables WHERE relname = 'events'"
        ).fetchone()
    assert row == (None, None)


# -- settings validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vacuum", "key"),
    [
        ({"tables": "events"}, "tables"),
        ({"tables": 5}, "tables"),
        ({"tables": ["events", 3]}, "tables[1]"),
        ({"tables": ["events", ""]}, "tables[1]"),
        ({"tables": ["events", "events"]}, "tables[1]"),
        ({"tables": ["events", "ok", "x" * 64]}, "tables[2]"),
        ({"tables": ["é" * 32]}, "tables[0]"),  # 32 characters, but 64 bytes
        ({"tables": ["nul\0byte"]}, "tables[0]"),
        ({"tables": ["events"], "min_dead_ratio": 2}, "min_dead_ratio"),
        ({"tables": ["events"], "min_dead_ratio": -0.1}, "min_dead_ratio"),
        ({"tables": "auto", "min_dead_tuples": -1}, "min_dead_tuples"),
        ({"tables": "auto", "min_dead_tuples": True}, "min_dead_tuples"),
        ({"tables": ["events"], "tabels": ["x"]}, "tabels"),
        ({"tables": ["events"], "analyze": "yes"}, "analyze"),
        ({"tables": ["events"], "skip_locked": 1}, "skip_locked"),
        ({"tables": ["events"], "buffer_usage_limit": 256}, "buffer_usage_limit"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, vacuum: dict[str, Any], key: str) -> None:
    path = write_config(tmp_path, tomli_w.dumps(config_doc("dbname=x", [], vacuum=vacuum)))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    prefix = f"{path}: plugins.vacuum.{key}: "
    assert any(p.startswith(prefix) for p in excinfo.value.problems), excinfo.value.problems
    assert all("\n" not in p for p in excinfo.value.problems)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (3, "expected a table name (a non-empty string)"),
        ("", "expected a table name (a non-empty string)"),
        ("nul\0byte", "expected a table name without NUL characters"),
        ("x" * 64, "expected a table name of at most 63 bytes, got 64 (PostgreSQL would cut it"),
        ("events", "expected each table once, 'events' is also tables[0]"),
    ],
)
def test_invalid_table_name_is_a_problem_at_its_index(
    tmp_path: Path, table: Any, expected: str
) -> None:
    """Not a traceback, nor Operation's complaint from sweeperd/model.py: the key and its index."""
    doc = config_doc("dbname=x", [], vacuum={"tables": ["events", 'Events "x"', table]})
    path = write_config(tmp_path, tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    [problem] = excinfo.value.problems
    assert problem.startswith(f"{path}: plugins.vacuum.tables[2]: {expected}"), problem
    assert "model.py" not in problem


def test_table_name_that_is_not_valid_unicode_is_a_problem() -> None:
    # TOML cannot carry a lone surrogate, but a plugin API caller can: no UnicodeEncodeError.
    [(key, problem)] = sweeperd_validate_settings({"tables": ["ok", "bad\ud800"]})
    assert key == "tables[1]"
    assert problem.startswith("expected a table name in valid Unicode")


def test_cli_with_an_invalid_table_name_exits_2_one_line_per_problem(tmp_path: Path) -> None:
    doc = config_doc("dbname=x", [], vacuum={"tables": ["events", "ÜBER tab", "x" * 64, ""]})
    path = write_config(tmp_path, tomli_w.dumps(doc))
    proc = run_cli("plugins", "-c", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "plugins.vacuum.tables[2]",
        "plugins.vacuum.tables[3]",
    ], lines
    assert all(line.startswith(f"sweeperd: {path}: plugins.vacuum.tables[") for line in lines)
    assert proc.stdout == ""


def test_any_table_name_gives_its_own_operation(tmp_path: Path) -> None:
    tables = {  # table: its operation
        "events": "vacuum.events",
        "Events": "vacuum.Events",
        'Events "x"': 'vacuum."Events ""x"""',
        "ÜBER tab": 'vacuum."ÜBER tab"',
        "a.b": 'vacuum."a.b"',
        "back\\": 'vacuum."back\\"',
        "50%_off": 'vacuum."50%_off"',
        "a*b?[c]": 'vacuum."a*b?[c]"',
        "with\ttab": 'vacuum.U&"with\\0009tab"',
        'x"; DROP TABLE canary; --': 'vacuum."x""; DROP TABLE canary; --"',
        "é" * 31 + "z": f'vacuum."{"é" * 31}z"',  # 63 bytes: the longest name PostgreSQL keeps
        # The plugin's own operation names stay its own: the tables get quoted names.
        "auto": 'vacuum."auto"',
        "database_stats": 'vacuum."database_stats"',
    }
    _config, plugins = load(tmp_path, config_doc("dbname=x", [], vacuum={"tables": list(tables)}))
    by_table = {op.tables: op.name for op in plugins.by_plugin()["vacuum"] if op.scope == "tenant"}
    assert by_table == {(table,): name for table, name in tables.items()}
    assert plugins.operations["vacuum.database_stats"].scope == "database"
    assert len(plugins.operations) == len(tables) + 1 + len(plugins.by_plugin()["retention"])
    assert plugins.operations['vacuum."Events ""x"""'].description == (
        'VACUUM (ANALYZE) "Events ""x"""'
    )


def test_all_vacuum_problems_at_once(tmp_path: Path) -> None:
    vacuum = {"tables": 5, "min_dead_ratio": 2, "unknown": True}
    path = write_config(tmp_path, tomli_w.dumps(config_doc("dbname=x", [], vacuum=vacuum)))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    keys = {p.split(": ")[1] for p in excinfo.value.problems}
    assert keys == {
        "plugins.vacuum.tables",
        "plugins.vacuum.min_dead_ratio",
        "plugins.vacuum.unknown",
    }
