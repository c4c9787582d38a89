"""The bundled retention plugin against a real PostgreSQL, driven the way ``sweeperd sweep`` is.

Every test writes a TOML configuration, loads it with :func:`~sweeperd.config.load_config` and
:func:`~sweeperd.plugins.load_plugins` (so the plugin's settings validation runs), and runs
:func:`~sweeperd.sweep.sweep_once`. What was deleted is checked in the database; batches are
observed on the server by a statement-level trigger with a transition table that logs how many
rows each DELETE statement removed and in which transaction. Nothing asserts how long anything
took, except lower bounds (a pause between batches must at least be that pause).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from support import write_config

from sweeperd import Phase
from sweeperd.config import Config, ConfigError, load_config
from sweeperd.model import Result
from sweeperd.plugins import Plugins, load_plugins
from sweeperd.report import SweepReport
from sweeperd.sweep import sweep_once

TABLE = "notifications"
OLD = "100 days"  # comfortably older than every older_than used below
INDEX_WARNING = "no index leads with the retention column"

# -- helpers ---------------------------------------------------------------------------------------


def config_doc(
    dsn: str,
    tenants: Sequence[tuple[str, str]],
    rules: Sequence[Mapping[str, Any]],
    *,
    lock_timeout: str = "5s",
    max_connections: int = 4,
) -> dict[str, Any]:
    """A configuration document: database "main", the (name, schema) tenants, retention rules."""
    return {
        "history": {"enabled": False},
        "databases": {
            "main": {"dsn": dsn, "max_connections": max_connections, "lock_timeout": lock_timeout}
        },
        "tenants": [
            {"name": name, "database": "main", "schema": schema} for name, schema in tenants
        ],
        "plugins": {"retention": {"rules": [dict(r) for r in rules]}},
    }


def rule(**overrides: Any) -> dict[str, Any]:
    """A retention rule on ``notifications.created_at``, older than 30 days, with overrides."""
    return {"name": TABLE, "table": TABLE, "column": "created_at", "older_than": "30d"} | overrides


def load(
    tmp_path: Path, doc: Mapping[str, Any], name: str = "sweeperd.toml"
) -> tuple[Config, Plugins]:
    path = write_config(tmp_path, tomli_w.dumps(doc), name)
    config = load_config(path)
    return config, load_plugins(config, entry_points=False)


def sweep(
    config: Config,
    plugins: Plugins,
    *,
    dry_run: bool = False,
    only: Sequence[str] = ("retention.*",),
) -> SweepReport:
    return asyncio.run(sweep_once(config, plugins, only_globs=list(only), dry_run=dry_run))


def by_tenant(report: SweepReport, operation: str) -> dict[str | None, Result]:
    out: dict[str | None, Result] = {}
    for r in report.results:
        if r.operation == operation:
            assert r.tenant not in out, f"duplicate result for {r.tenant}"
            out[r.tenant] = r
    return out


def only_result(report: SweepReport, operation: str = f"retention.{TABLE}") -> Result:
    [result] = [r for r in report.results if r.operation == operation]
    return result


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def create_table(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str = TABLE,
    *,
    index: bool = True,
    log_batches: bool = True,
) -> sql.Identifier:
    """``schema.table`` with an id, the cutoff column and a few columns to match on."""
    ident = sql.Identifier(schema, table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, created_at timestamptz, status text,"
            " archived bool, priority int)"
        ).format(ident)
    )
    if index:
        conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(ident))
    if log_batches:
        install_batch_log(conn, ident)
    return ident


def install_batch_log(conn: psycopg.Connection[Any], ident: sql.Identifier) -> None:
    """Log every DELETE statement on the table: rows it removed, its transaction, its start."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS public.batch_log (
            seq bigserial PRIMARY KEY, tbl text, n bigint, xid xid8, started timestamptz)
    """)
    conn.execute("""
        CREATE OR REPLACE FUNCTION public.log_batch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.batch_log (tbl, n, xid, started)
            SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, count(*), pg_current_xact_id(),
                   statement_timestamp()
              FROM old_rows;
            RETURN NULL;
        END $$
    """)
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER batch_log AFTER DELETE ON {} REFERENCING OLD TABLE AS old_rows"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.log_batch()"
        ).format(ident)
    )


def batch_log(conn: psycopg.Connection[Any]) -> list[tuple[int, int, Any]]:
    """(rows, xid, statement start) of every DELETE statement on logged tables, in order."""
    rows = conn.execute(
        "SELECT n, xid::text, started FROM public.batch_log ORDER BY seq"
    ).fetchall()
    return [(int(n), int(xid), started) for n, xid, started in rows]


def insert_aged(
    conn: psycopg.Connection[Any],
    ident: sql.Identifier,
    n: int,
    age: str,
    *,
    first_id: int = 1,
    status: str | None = None,
    archived: bool | None = None,
    priority: int | None = None,
) -> None:
    """``n`` rows created ``age`` ago (an interval, e.g. '100 days'; '-1 day' is the future)."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, created_at, status, archived, priority)"
            " SELECT g, now() - %s::interval, %s, %s, %s"
            " FROM generate_series(%s::int, %s::int) AS g"
        ).format(ident),
        (age, status, archived, priority, first_id, first_id + n - 1),
    )


def count(conn: psycopg.Connection[Any], ident: sql.Identifier, where: str = "true") -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(ident, sql.SQL(where))
    ).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def ids(conn: psycopg.Connection[Any], ident: sql.Identifier) -> set[int]:
    return {r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}").format(ident)).fetchall()}


# -- the property: exactly the rows older than the cutoff go ---------------------------------------

# Ages are whole minutes (None: a NULL cutoff column; negative: in the future) and older_than is a
# whole number of minutes plus 30 s, so no row is within 30 s of the cutoff: the few milliseconds
# between inserting the rows and the plugin reading the server clock cannot change the outcome.
AGES = st.lists(st.one_of(st.none(), st.integers(min_value=-120, max_value=600)), max_size=40)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ages=AGES,
    older_than_min=st.integers(min_value=0, max_value=400),
    batch_size=st.integers(min_value=1, max_value=50),
)
def test_deletes_exactly_the_rows_older_than_the_cutoff(
    tmp_path: Path, pg_dsn: str, ages: list[int | None], older_than_min: int, batch_size: int
) -> None:
    # One database for every example (the fixture runs once per test function).
    with connect(pg_dsn) as conn:
        if conn.execute("SELECT to_regclass('tenant_a.notifications')").fetchone() == (None,):
            create_table(conn, "tenant_a")
        ident = sql.Identifier("tenant_a", TABLE)
        conn.execute(sql.SQL("TRUNCATE {}, public.batch_log").format(ident))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, created_at) SELECT i, now() - make_interval(mins => a)"
                " FROM unnest(%s::int[], %s::int[]) AS u(i, a)"
            ).format(ident),
            (list(range(len(ages))), ages),
        )

    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn,
            [("a", "tenant_a")],
            [rule(older_than=f"{older_than_min}m30s", batch_size=batch_size)],
        ),
    )
    report = sweep(config, plugins)

    result = only_result(report)
    assert result.status == "ok", result.error
    expected_kept = {i for i, age in enumerate(ages) if age is None or age <= older_than_min}
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == expected_kept
        log = batch_log(conn)
    deleted = len(ages) - len(expected_kept)
    assert result.rows == deleted
    # Committed batches of at most batch_size rows, each in its own transaction.
    assert all(n <= batch_size for n, _xid, _at in log)
    assert sum(n for n, _xid, _at in log) == deleted
    assert len({xid for _n, xid, _at in log}) == len(log)
    assert result.details["batches"] >= -(-deleted // batch_size)
    assert len(log) <= result.details["batches"]


# -- batches, max_rows, pause ----------------------------------------------------------------------


def test_batches_of_at_most_batch_size_each_committed(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a")
        insert_aged(conn, ident, 10_500, OLD)
        insert_aged(conn, ident, 300, "1 day", first_id=20_001)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=1000)])
    )
    result = only_result(sweep(config, plugins))

    assert result.status == "ok", result.error
    assert result.rows == 10_500
    assert result.details["batches"] == 11
    assert result.details["cutoff"]
    with connect(pg_dsn) as conn:
        log = batch_log(conn)
        assert count(conn, ident) == 300
        assert count(conn, ident, "created_at < now() - interval '2 days'") == 0
    # Ten full batches and a short one, each its own transaction.
    assert [n for n, _xid, _at in log] == [1000] * 10 + [500]
    assert len({xid for _n, xid, _at in log}) == 11


def test_max_rows_caps_a_run_and_pause_separates_batches(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a")
        insert_aged(conn, ident, 3000, OLD)
    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn, [("a", "tenant_a")], [rule(batch_size=1000, max_rows=2500, pause="200ms")]
        ),
    )
    result = only_result(sweep(config, plugins))

    assert result.status == "ok", result.error
    assert result.rows == 2500
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 500
        log = batch_log(conn)
    assert [n for n, _xid, _at in log] == [1000, 1000, 500]
    # The pause is between batches: consecutive DELETE statements start at least that far apart.
    starts = [at for _n, _xid, at in log]
    for earlier, later in itertools.pairwise(starts):
        assert (later - earlier).total_seconds() >= 0.2

    # The next run takes the rest (max_rows is per run, not forever).
    result = only_result(sweep(config, plugins))
    assert result.status == "ok", result.error
    assert result.rows == 500
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 0


def test_max_rows_smaller_than_batch_size(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a")
        insert_aged(conn, ident, 50, OLD)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=1000, max_rows=7)])
    )
    result = only_result(sweep(config, plugins))
    assert result.status == "ok", result.error
    assert result.rows == 7
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 43
        assert [n for n, _xid, _at in batch_log(conn)] == [7]


# -- dry run ---------------------------------------------------------------------------------------


def test_dry_run_deletes_nothing_and_reports_the_count(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        idents = [create_table(conn, schema) for schema in ("tenant_a", "tenant_b")]
        insert_aged(conn, idents[0], 120, OLD)
        insert_aged(conn, idents[0], 30, "1 day", first_id=1000)
        insert_aged(conn, idents[1], 5, OLD)
    doc = config_doc(
        pg_dsn,
        [("a", "tenant_a"), ("b", "tenant_b")],
        [rule(batch_size=10), rule(name="capped", max_rows=100)],
    )
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins, dry_run=True)

    plain = by_tenant(report, f"retention.{TABLE}")
    capped = by_tenant(report, "retention.capped")
    assert {r.status for r in report.results} == {"dry-run"}
    assert (plain["a"].rows, plain["b"].rows) == (120, 5)
    assert (capped["a"].rows, capped["b"].rows) == (100, 5)  # max_rows caps the estimate too
    with connect(pg_dsn) as conn:
        assert count(conn, idents[0]) == 150
        assert count(conn, idents[1]) == 5
        assert batch_log(conn) == []


# -- cancel mid-run --------------------------------------------------------------------------------


def sweeperd_backends(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    return conn.execute(
        "SELECT application_name, state, query FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'sweeperd%%'"
    ).fetchall()


def test_cancel_mid_run_keeps_committed_batches_and_rerun_finishes(
    tmp_path: Path, pg_dsn: str
) -> None:
    old, new = 2000, 40
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a")
        insert_aged(conn, ident, old, OLD)
        insert_aged(conn, ident, new, "1 day", first_id=10_001)
    slow, _ = load(
        tmp_path,
        config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=100, pause="200ms")]),
        "slow.toml",
    )
    slow_plugins = load_plugins(slow, entry_points=False)

    async def start_and_cancel() -> SweepReport | None:
        task = asyncio.create_task(sweep_once(slow, slow_plugins, only_globs=["retention.*"]))
        aconn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
        async with aconn:
            while True:
                cur = await aconn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
                row = await cur.fetchone()
                assert row is not None
                if row[0] <= old + new - 300:
                    break  # at least three batches committed
                assert not task.done(), "the sweep finished before it could be cancelled"
                await asyncio.sleep(0.01)
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return None

    report = asyncio.run(start_and_cancel())
    if report is not None:  # a runner may also report the cancellation instead of raising it
        assert only_result(report).status == "cancelled"

    with connect(pg_dsn) as conn:
        left = count(conn, ident)
        deleted = old + new - left
        assert 300 <= deleted < old
        assert deleted % 100 == 0  # whole batches: a cancelled one rolled back entirely
        assert count(conn, ident, "created_at > now() - interval '2 days'") == new
        log = batch_log(conn)
        assert sum(n for n, _xid, _at in log) == deleted
        assert {n for n, _xid, _at in log} == {100}
        # Nothing of sweeperd is left on the server (the backend exits just after the client).
        backends = sweeperd_backends(conn)
        for _ in range(100):
            if not backends:
                break
            time.sleep(0.05)
            backends = sweeperd_backends(conn)
        assert backends == []

    fast, fast_plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=500)]), "fast.toml"
    )
    result = only_result(sweep(fast, fast_plugins))
    assert result.status == "ok", result.error
    assert result.rows == old - deleted
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == new
        assert count(conn, ident, "created_at < now() - interval '2 days'") == 0


# -- match filters and hostile names ---------------------------------------------------------------


def test_match_filters_on_text_bool_and_int(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a", log_batches=False)
        insert_aged(conn, ident, 10, OLD, first_id=1, status="done", archived=True, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=11, status="open", archived=True, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=21, status="done", archived=False, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=31, status="done", archived=True, priority=2)
        insert_aged(conn, ident, 10, "1 day", first_id=41, status="done", archived=True, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=51)  # NULLs match nothing
    doc = config_doc(
        pg_dsn,
        [("a", "tenant_a")],
        [rule(name="done", match={"status": "done", "archived": True, "priority": 1})],
    )
    config, plugins = load(tmp_path, doc)
    result = only_result(sweep(config, plugins), "retention.done")

    assert result.status == "ok", result.error
    assert result.rows == 10
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == set(range(11, 61))


@pytest.mark.parametrize(
    ("match", "deleted"),
    [
        ({"status": "done"}, set(range(1, 11)) | set(range(21, 31))),
        ({"archived": False}, set(range(21, 31))),
        ({"priority": 2}, set(range(31, 41))),
    ],
)
def test_single_match_filter(
    tmp_path: Path, pg_dsn: str, match: dict[str, Any], deleted: set[int]
) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a", log_batches=False)
        insert_aged(conn, ident, 10, OLD, first_id=1, status="done", archived=True, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=11, status="open", archived=True, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=21, status="done", archived=False, priority=1)
        insert_aged(conn, ident, 10, OLD, first_id=31, status="open", archived=True, priority=2)
        insert_aged(
            conn, ident, 10, "1 day", first_id=41, status="done", archived=False, priority=2
        )
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(match=match, batch_size=3)])
    )
    result = only_result(sweep(config, plugins))
    assert result.status == "ok", result.error
    assert result.rows == len(deleted)
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == set(range(1, 51)) - deleted


HOSTILE_COLUMN = 'status"; DROP TABLE public.canary; --'
HOSTILE_VALUE = "done'; DROP TABLE public.canary; --"


def test_hostile_names_and_values_are_quoted_not_executed(tmp_path: Path, pg_dsn: str) -> None:
    schema, table, column = 'tenant "a"; DROP TABLE public.canary; --', "no'tif", "created at"
    with connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE public.canary (x int)")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        ident = sql.Identifier(schema, table)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int, {} timestamptz, {} text)").format(
                ident, sql.Identifier(column), sql.Identifier(HOSTILE_COLUMN)
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, now() - interval '100 days',"
                " CASE WHEN g <= 5 THEN %s WHEN g <= 10 THEN 'done' END"
                " FROM generate_series(1, 15) AS g"
            ).format(ident),
            (HOSTILE_VALUE,),
        )
    doc = config_doc(
        pg_dsn,
        [("a", schema)],
        [
            {
                "name": "hostile",
                "table": table,
                "column": column,
                "older_than": "1d",
                "match": {HOSTILE_COLUMN: HOSTILE_VALUE},
                "batch_size": 2,
            },
            {
                "name": "done",
                "table": table,
                "column": column,
                "older_than": "1d",
                "match": {HOSTILE_COLUMN: "done"},
            },
        ],
    )
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins, only=["retention.hostile"])
    result = only_result(report, "retention.hostile")
    assert result.status == "ok", result.error
    assert result.rows == 5
    dry = only_result(
        sweep(config, plugins, dry_run=True, only=["retention.done"]), "retention.done"
    )
    assert (dry.status, dry.rows) == ("dry-run", 5)
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == set(range(6, 16))
        assert conn.execute("SELECT to_regclass('public.canary')").fetchone() == ("canary",)


@pytest.mark.parametrize(("schema", "column"), [("tenant_a", "100%b"), ("tenant_50%off", "s")])
def test_percent_sign_in_a_name(tmp_path: Path, pg_dsn: str, schema: str, column: str) -> None:
    with connect(pg_dsn) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        ident = sql.Identifier(schema, TABLE)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int, created_at timestamptz, {} text)").format(
                ident, sql.Identifier(column)
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, now() - interval '100 days',"
                " CASE WHEN g <= 3 THEN 'x' END FROM generate_series(1, 6) g"
            ).format(ident)
        )
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", schema)], [rule(match={column: "x"})])
    )
    result = only_result(sweep(config, plugins))
    assert result.status == "ok", result.error
    assert result.rows == 3


# -- database scope --------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant_count", [0, 3])
def test_database_scope_rule_runs_once_per_database(
    tmp_path: Path, pg_dsn: str, tenant_count: int
) -> None:
    tenants = [(f"t{i}", f"tenant_{i}") for i in range(tenant_count)]
    with connect(pg_dsn) as conn:
        for _name, schema in tenants:
            create_table(conn, schema, log_batches=False)
        conn.execute("CREATE TABLE public.sessions (id int PRIMARY KEY, expires_at timestamptz)")
        conn.execute("CREATE INDEX ON public.sessions (expires_at)")
        conn.execute(
            "INSERT INTO public.sessions SELECT g, now() - interval '1 hour'"
            " FROM generate_series(1, 25) g"
        )
        conn.execute(
            "INSERT INTO public.sessions SELECT g, now() + interval '1 hour'"
            " FROM generate_series(26, 30) g"
        )
    doc = config_doc(
        pg_dsn,
        tenants,
        [
            {
                "name": "sessions",
                "scope": "database",
                "schema": "public",
                "table": "sessions",
                "column": "expires_at",
                "older_than": "0s",
                "batch_size": 10,
            }
        ],
    )
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins)

    [result] = report.results
    assert result.operation == "retention.sessions"
    assert result.tenant is None
    assert result.database == "main"
    assert result.status == "ok", result.error
    assert result.rows == 25
    assert report.to_json()["results"][0]["tenant"] is None
    with connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sessions").fetchone() == (5,)


# -- missing tables --------------------------------------------------------------------------------


def test_missing_table_fails_that_tenant_only(tmp_path: Path, pg_dsn: str) -> None:
    tenants = [("a", "tenant_a"), ("b", "tenant_b"), ("c", "tenant_c")]
    with connect(pg_dsn) as conn:
        for schema in ("tenant_a", "tenant_c"):
            insert_aged(conn, create_table(conn, schema, log_batches=False), 7, OLD)
        conn.execute("CREATE SCHEMA tenant_b")
    config, plugins = load(tmp_path, config_doc(pg_dsn, tenants, [rule()]))
    results = by_tenant(sweep(config, plugins), f"retention.{TABLE}")

    assert results["b"].status == "failed"
    assert results["b"].error is not None and "42P01" in results["b"].error
    for name in ("a", "c"):
        assert (results[name].status, results[name].rows) == ("ok", 7)


def test_missing_table_with_missing_skip_is_skipped(tmp_path: Path, pg_dsn: str) -> None:
    tenants = [("a", "tenant_a"), ("b", "tenant_b")]
    with connect(pg_dsn) as conn:
        insert_aged(conn, create_table(conn, "tenant_a", log_batches=False), 7, OLD)
        conn.execute("CREATE SCHEMA tenant_b")
    config, plugins = load(tmp_path, config_doc(pg_dsn, tenants, [rule(missing="skip")]))
    for dry_run in (True, False):
        results = by_tenant(sweep(config, plugins, dry_run=dry_run), f"retention.{TABLE}")
        assert results["b"].status == "skipped"
        assert results["b"].error is not None
        assert "does not exist" in results["b"].error and TABLE in results["b"].error
        assert results["a"].status == ("dry-run" if dry_run else "ok")
        assert results["a"].rows == 7


# -- the missing-index warning ---------------------------------------------------------------------


def index_warnings(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if INDEX_WARNING in str(e.get("event"))]


def test_missing_index_warns_once_per_rule(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    tenants = [(f"t{i}", f"tenant_{i}") for i in range(4)]
    with connect(pg_dsn) as conn:
        for _name, schema in tenants:
            insert_aged(conn, create_table(conn, schema, index=False, log_batches=False), 3, OLD)
    config, plugins = load(tmp_path, config_doc(pg_dsn, tenants, [rule()]))
    report = sweep(config, plugins)
    assert {r.status for r in report.results} == {"ok"}

    [warning] = index_warnings(logs)
    assert warning["log_level"] == "warning"
    assert warning["fix"].startswith("CREATE INDEX")
    assert '"created_at"' in warning["fix"]
    assert any(f'"{schema}"."{TABLE}"' in warning["fix"] for _n, schema in tenants)

    # Once per rule for the life of the loaded plugins, not once per sweep either.
    logs.clear()
    sweep(config, plugins)
    assert index_warnings(logs) == []


def test_no_index_warning_when_an_index_leads_with_the_column(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    tenants = [("a", "tenant_a"), ("b", "tenant_b")]
    with connect(pg_dsn) as conn:
        for _name, schema in tenants:
            ident = create_table(conn, schema, index=False, log_batches=False)
            conn.execute(sql.SQL("CREATE INDEX ON {} (created_at, status)").format(ident))
    config, plugins = load(tmp_path, config_doc(pg_dsn, tenants, [rule()]))
    report = sweep(config, plugins)
    assert {r.status for r in report.results} == {"ok"}
    assert index_warnings(logs) == []


# -- settings validation ---------------------------------------------------------------------------


GOOD = rule(name="good")


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (rule(olderthan="30d"), "olderthan"),
        ({"name": "x", "table": "t", "column": "c"}, "older_than"),
        (rule(batch_size=0), "batch_size"),
        (rule(batch_size=True), "batch_size"),
        (rule(max_rows=-1), "max_rows"),
        (rule(older_than="ninety days"), "older_than"),
        (rule(pause=5), "pause"),
        (rule(match={"status": ["done", "open"]}), "match.status"),
        (rule(match="status = 'done'"), "match"),
        (rule(scope="database"), "schema"),
        (rule(scope="cluster"), "scope"),
        (rule(schema="public"), "schema"),
        (rule(missing="ignore"), "missing"),
        (rule(name="good"), "name"),
        (rule(name="has space"), "name"),
        (rule(table=""), "table"),
    ],
)
def test_invalid_rule_names_the_key(tmp_path: Path, bad: dict[str, Any], key: str) -> None:
    path = write_config(tmp_path, tomli_w.dumps(config_doc("dbname=x", [], [GOOD, bad])))
    config = load_config(path)
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(config, entry_points=False)
    prefix = f"{path}: plugins.retention.rules[1].{key}: "
    assert any(p.startswith(prefix) for p in excinfo.value.problems), excinfo.value.problems
    # Every problem is one line and about the bad rule, never the good one.
    assert all("\n" not in p and "rules[0]" not in p for p in excinfo.value.problems)


def test_all_rule_problems_are_reported_at_once(tmp_path: Path) -> None:
    rules = [
        rule(batch_size=0),
        rule(name="b", olderthan="1d"),
        rule(name="b"),
        rule(name="c", scope="database"),
    ]
    path = write_config(tmp_path, tomli_w.dumps(config_doc("dbname=x", [], rules)))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    keys = {p.split(": ")[1] for p in excinfo.value.problems}
    assert {
        "plugins.retention.rules[0].batch_size",
        "plugins.retention.rules[1].olderthan",
        "plugins.retention.rules[2].name",
        "plugins.retention.rules[3].schema",
    } <= keys


def test_unknown_retention_key_and_rules_not_an_array(tmp_path: Path) -> None:
    doc = config_doc("dbname=x", [], [])
    doc["plugins"]["retention"] = {"rules": {"name": "x"}, "rule": []}
    path = write_config(tmp_path, tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    keys = {p.split(": ")[1] for p in excinfo.value.problems}
    assert {"plugins.retention.rules", "plugins.retention.rule"} <= keys


def test_valid_rules_become_operations(tmp_path: Path) -> None:
    rules = [
        rule(),
        rule(
            name="sessions",
            scope="database",
            schema="public",
            table="sessions",
            column="expires_at",
            older_than="0s",
            match={"kind": "web"},
            max_rows=10,
            pause="100ms",
            lock_timeout="2s",
            statement_timeout="1min",
            missing="skip",
        ),
    ]
    path = write_config(tmp_path, tomli_w.dumps(config_doc("dbname=x", [], rules)))
    ops = load_plugins(load_config(path), entry_points=False).operations
    tenant_op, db_op = ops[f"retention.{TABLE}"], ops["retention.sessions"]
    assert (tenant_op.scope, tenant_op.tables, tenant_op.plugin) == (
        "tenant",
        (TABLE,),
        "retention",
    )
    assert (db_op.scope, db_op.tables) == ("database", ("public.sessions",))
    assert tenant_op.dry_run and db_op.dry_run
    assert tenant_op.phase == db_op.phase == Phase.PRUNE < Phase.MAINTAIN


# -- locked rows -----------------------------------------------------------------------------------


def test_rows_locked_by_the_application_are_skipped_not_waited_for(
    tmp_path: Path, pg_dsn: str
) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a")
        insert_aged(conn, ident, 50, OLD)
        insert_aged(conn, ident, 5, "1 day", first_id=101)
    # A short lock_timeout: if the plugin waited for the locks it would fail, not hang.
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=4)], lock_timeout="2s")
    )
    locked = {3, 4, 17, 50}
    with psycopg.connect(pg_dsn) as app:  # a transaction stays open while the sweep runs
        app.execute(
            sql.SQL("SELECT id FROM {} WHERE id = ANY(%s) FOR UPDATE").format(ident),
            (sorted(locked),),
        )
        result = only_result(sweep(config, plugins))
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        app.rollback()

    assert result.status == "ok", result.error
    assert result.rows == 50 - len(locked)
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == locked | set(range(101, 106))
        assert all(n <= 4 for n, _xid, _at in batch_log(conn))

    # Once the application lets go, the next run takes them.
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", len(locked))


# -- timeouts and column types ---------------------------------------------------------------------


def test_rule_statement_timeout_applies(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a", log_batches=False)
        insert_aged(conn, ident, 5, OLD)
        # Each DELETE statement sleeps in a trigger: longer than the rule's statement_timeout.
        conn.execute(
            "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$"
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER slow AFTER DELETE ON {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION public.slow()"
            ).format(ident)
        )
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(statement_timeout="300ms")])
    )
    result = only_result(sweep(config, plugins))
    assert result.status == "failed"
    assert result.error is not None and "57014" in result.error
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 5  # the cancelled batch rolled back


@pytest.mark.parametrize("column_type", ["timestamp", "date"])
def test_other_cutoff_column_types(tmp_path: Path, pg_dsn: str, column_type: str) -> None:
    with connect(pg_dsn) as conn:
        conn.execute("CREATE SCHEMA tenant_a")
        ident = sql.Identifier("tenant_a", TABLE)
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int, created_at {})").format(ident, sql.SQL(column_type))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, CASE WHEN g <= 6 THEN now() - interval '100 days'"
                " WHEN g <= 9 THEN now() - interval '5 days' END FROM generate_series(1, 10) g"
            ).format(ident)
        )
    # Without a zone the rule refuses: naive values compared with the server's clock in the
    # session's zone could delete rows that have not expired yet.
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(older_than="30d", batch_size=4)])
    )
    refused = only_result(sweep(config, plugins))
    assert refused.status == "failed"
    assert refused.error is not None and "timezone" in refused.error
    with connect(pg_dsn) as conn:
        assert len(ids(conn, ident)) == 10
        zone = conn.execute("SHOW TimeZone").fetchone()[0]  # type: ignore[index]
    # Told the zone the values were written in (here: the session's), it prunes.
    config, plugins = load(
        tmp_path,
        config_doc(
            pg_dsn, [("a", "tenant_a")], [rule(older_than="30d", batch_size=4, timezone=zone)]
        ),
    )
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 6)
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == {7, 8, 9, 10}


def test_naive_timestamps_are_read_in_the_rules_zone_not_the_servers(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Sessions stored as naive UTC on a server whose TimeZone is Asia/Tokyo (UTC+9)."""
    with connect(pg_dsn) as conn:
        dbname = conn.info.dbname
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET timezone = 'Asia/Tokyo'").format(sql.Identifier(dbname))
        )
        conn.execute("CREATE SCHEMA tenant_a")
        ident = sql.Identifier("tenant_a", TABLE)
        conn.execute(sql.SQL("CREATE TABLE {} (id int, created_at timestamp)").format(ident))
        # Expired an hour ago, and expiring in 1 h, 5 h and 8 h (naive UTC values).
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, (now() AT TIME ZONE 'UTC') + h * interval '1 hour' "
                "FROM unnest(ARRAY[1, 2, 3, 4], ARRAY[-1, 1, 5, 8]) AS t(g, h)"
            ).format(ident)
        )
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(older_than="0s", timezone="UTC")])
    )
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 1)
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == {2, 3, 4}


def test_rule_lock_timeout_overrides_the_database_one(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a", log_batches=False)
        insert_aged(conn, ident, 5, OLD)
    doc = config_doc(pg_dsn, [("a", "tenant_a")], [rule(lock_timeout="200ms")], lock_timeout="1h")
    # Had the rule's lock_timeout not applied, the operation timeout would end the wait instead
    # (a TimeoutError, not PostgreSQL's 55P03).
    doc["sweeps"] = {
        "x": {"interval": "1h", "operations": ["retention.*"], "operation_timeout": "20s"}
    }
    config, plugins = load(tmp_path, doc)
    with psycopg.connect(pg_dsn) as app:
        app.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(ident))
        result = only_result(sweep(config, plugins))
        app.rollback()
    assert result.status == "failed"
    assert result.error is not None and "55P03" in result.error
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 5


def test_rule_timeouts_do_not_leak_into_the_next_operation(tmp_path: Path, pg_dsn: str) -> None:
    """One pooled connection: a rule's statement_timeout must be gone for the next rule."""
    with connect(pg_dsn) as conn:
        ident = create_table(conn, "tenant_a", log_batches=False)
        insert_aged(conn, ident, 5, OLD, status="slow")
        conn.execute(
            "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF EXISTS (SELECT 1 FROM old_rows) THEN PERFORM pg_sleep(1); END IF;"
            " RETURN NULL; END $$"
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER slow AFTER DELETE ON {} REFERENCING OLD TABLE AS"
                " old_rows FOR EACH STATEMENT EXECUTE FUNCTION public.slow()"
            ).format(ident)
        )
    # Same table, so "first" (earlier in the config) finishes before "second" starts, and
    # max_connections = 1 hands "second" the very connection "first" changed.
    doc = config_doc(
        pg_dsn,
        [("a", "tenant_a")],
        [
            rule(
                name="first",
                match={"status": "nothing"},
                statement_timeout="300ms",
                lock_timeout="100ms",
            ),
            rule(name="second"),
        ],
        max_connections=1,
    )
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins)
    first, second = only_result(report, "retention.first"), only_result(report, "retention.second")
    assert (first.status, first.rows) == ("ok", 0)
    assert second.started_at is not None and first.finished_at is not None
    assert first.finished_at <= second.started_at
    assert (second.status, second.rows) == ("ok", 5), second.error


def test_missing_tenant_schema_fails_with_undefined_table(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        insert_aged(conn, create_table(conn, "tenant_a", log_batches=False), 3, OLD)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a"), ("b", "tenant_b")], [rule()])
    )
    results = by_tenant(sweep(config, plugins), f"retention.{TABLE}")
    assert results["b"].status == "failed"
    assert results["b"].error is not None and "42P01" in results["b"].error
    assert (results["a"].status, results["a"].rows) == ("ok", 3)


def make_partitioned(conn: psycopg.Connection[Any]) -> sql.Identifier:
    """A range-partitioned table whose two partitions hold rows at the same ctids."""
    conn.execute("CREATE SCHEMA tenant_a")
    ident = sql.Identifier("tenant_a", TABLE)
    conn.execute(
        sql.SQL("CREATE TABLE {} (id int, created_at timestamptz) PARTITION BY RANGE (id)").format(
            ident
        )
    )
    for i, (low, high) in enumerate([(0, 1000), (1000, 2000)]):
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier("tenant_a", f"part{i}"), ident, low, high
            )
        )
    conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(ident))
    conn.execute(
        sql.SQL(
            "INSERT INTO {} SELECT g, now() - interval '100 days' FROM generate_series(1, 20) g"
        ).format(ident)
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} SELECT g, now() - interval '100 days'"
            " FROM generate_series(1001, 1020) g"
        ).format(ident)
    )
    install_batch_log(conn, ident)
    return ident


def test_partitioned_table_batches_respect_batch_size(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = make_partitioned(conn)
    config, plugins = load(tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=10)]))
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 40), result.error
    with connect(pg_dsn) as conn:
        assert count(conn, ident) == 0
        sizes = [n for n, _xid, _at in batch_log(conn)]
    assert all(n <= 10 for n in sizes), sizes


def test_partitioned_table_skips_locked_rows(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = make_partitioned(conn)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, [("a", "tenant_a")], [rule(batch_size=10)], lock_timeout="1s")
    )
    with psycopg.connect(pg_dsn) as app:
        app.execute(sql.SQL("SELECT id FROM {} WHERE id > 1000 FOR UPDATE").format(ident))
        result = only_result(sweep(config, plugins))
        app.rollback()
    assert (result.status, result.rows) == ("ok", 20), result.error
