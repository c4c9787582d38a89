"""The xmin horizon: who keeps VACUUM from removing dead tuples, reported and acted upon.

Every holder here is real: a session left idle in transaction (a transaction id, or a REPEATABLE
READ snapshot), a prepared transaction, a physical replication slot fed by a standby with
``hot_standby_feedback``, a standby's feedback without a slot. Rows are deleted *after* the
holder began, so VACUUM VERBOSE reports them "dead but not yet removable" (PostgreSQL 15+: the
suite needs 15 anyway). Ages are only ever waited for (a sleep just over the threshold), never
timed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from psycopg import sql
from servers import ScratchServer, scratch_server_fixture, standby_of  # noqa: F401
from support import PgServer, throwaway_role, write_config
from test_vacuum import (
    auto_results,
    config_doc,
    connect,
    load,
    make_table,
    result_of,
    stats,
    sweep,
    wait_for_dead_tuples,
)

from sweeperd.config import ConfigError, load_config
from sweeperd.horizon import Horizon, find_holder, holder_query
from sweeperd.model import Result
from sweeperd.plugins import load_plugins
from sweeperd.report import SweepReport

NOT_REMOVABLE = "dead tuples not removable: the xmin horizon is held"
LOOKUP_FAILED = "could not look up the xmin horizon"
ROWS, DELETED = 2000, 700


def events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


def holder_of(dsn: str) -> Horizon | None:
    """find_holder on a connection of its own (autocommit, like the pool's)."""

    async def ask() -> Horizon | None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await find_holder(conn)

    return asyncio.run(ask())


def idle_in_transaction(
    dsn: str, application: str = "billing", *, snapshot: bool = False
) -> psycopg.Connection[Any]:
    """A session that pins the xmin horizon and then idles in its transaction: with a transaction
    id (``txid_current()``), or with a REPEATABLE READ snapshot only (``snapshot``)."""
    conn = psycopg.connect(dsn, application_name=application)
    if snapshot:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SELECT 1")
    else:
        conn.execute("SELECT txid_current()")
    return conn


def delete_rows(dsn: str, table: str = "events", schema: str = "tenant_a") -> None:
    with connect(dsn) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE id <= {}").format(
                sql.Identifier(schema, table), sql.Literal(DELETED)
            )
        )


def vacuum_sweep(
    tmp_path: Path,
    dsn: str,
    vacuum: Mapping[str, Any],
    *,
    tenants: tuple[tuple[str, str], ...] = (("a", "tenant_a"),),
    dry_run: bool = False,
) -> SweepReport:
    config, plugins = load(tmp_path, config_doc(dsn, list(tenants), vacuum=dict(vacuum)))
    return sweep(config, plugins, dry_run=dry_run)


def events_result(report: SweepReport) -> Result:
    return result_of(report, "vacuum.events", "a")


# -- a session idle in transaction -----------------------------------------------------------------


def test_an_idle_in_transaction_holder_is_named_and_warned_about(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=ROWS)
    holder = idle_in_transaction(pg_dsn)
    try:
        pid = holder.info.backend_pid
        delete_rows(pg_dsn)
        result = events_result(vacuum_sweep(tmp_path, pg_dsn, {"tables": ["events"]}))
    finally:
        holder.close()

    assert result.status == "ok", result.error
    assert result.rows == 0
    assert result.details["dead_tuples_after"] == DELETED
    horizon = result.details["horizon"]
    assert horizon["held_by"].startswith(f"pid {pid} (idle in transaction "), horizon
    assert horizon["held_by"].endswith(", application billing)"), horizon
    assert horizon["age_s"] >= 0
    assert horizon["xmin_age"] >= 1
    [warning] = events(logs, NOT_REMOVABLE)
    assert warning["log_level"] == "warning"
    assert warning["held_by"] == horizon["held_by"]
    assert warning["age_s"] == horizon["age_s"]
    assert warning["not_removable"] == DELETED


def test_without_a_holder_there_is_no_horizon(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=ROWS, delete=DELETED)
    report = vacuum_sweep(
        tmp_path, pg_dsn, {"tables": ["events"], "skip_when_horizon_older_than": "1ms"}
    )
    result = events_result(report)
    assert result.status == "ok", result.error
    assert result.rows == DELETED
    assert "horizon" not in result.details
    assert events(logs, NOT_REMOVABLE) == []
    assert holder_of(pg_dsn) is None


def test_skip_when_the_horizon_is_held_longer_than_the_threshold(
    tmp_path: Path, pg_dsn: str
) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=ROWS)
    holder = idle_in_transaction(pg_dsn, "reporting", snapshot=True)
    try:
        pid = holder.info.backend_pid
        delete_rows(pg_dsn)
        time.sleep(1.2)  # the holder's age passes the threshold
        vacuum = {"tables": ["events"], "skip_when_horizon_older_than": "1s"}
        report = vacuum_sweep(tmp_path, pg_dsn, vacuum)
        dry = vacuum_sweep(tmp_path, pg_dsn, vacuum, dry_run=True)
    finally:
        holder.close()

    for result in (events_result(report), events_result(dry)):
        assert result.status == "skipped", result
        assert result.error is not None
        assert result.error.startswith(f"xmin horizon held by pid {pid} (idle in transaction "), (
            result.error
        )
        assert "application reporting) for " in result.error
        assert result.error.endswith(
            '(skip_when_horizon_older_than = "1s"): VACUUM could not remove the newest dead tuples'
        ), result.error
        # The runner keeps what the operation put in details before it skipped.
        assert result.details["horizon"]["held_by"].startswith(f"pid {pid} (idle in transaction")
        assert result.details["horizon"]["age_s"] > 1
    assert stats(pg_dsn, "tenant_a", "events")[2] == 0  # not vacuumed


def test_a_holder_younger_than_the_threshold_does_not_skip(tmp_path: Path, pg_dsn: str) -> None:
    make_table(pg_dsn, "tenant_a", "events", rows=ROWS)
    holder = idle_in_transaction(pg_dsn)
    try:
        pid = holder.info.backend_pid
        delete_rows(pg_dsn)
        report = vacuum_sweep(
            tmp_path, pg_dsn, {"tables": ["events"], "skip_when_horizon_older_than": "1h"}
        )
    finally:
        holder.close()
    result = events_result(report)
    assert result.status == "ok", result.error
    assert result.details["dead_tuples_after"] == DELETED
    assert result.details["horizon"]["held_by"].startswith(f"pid {pid} (idle in transaction")


def test_auto_reports_the_horizon_in_each_tables_result(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    """Each table vacuum.auto chose is its own item: each result that left dead tuples behind
    names the holder, and each warns with its own count."""
    for table in ("events", "sessions"):
        make_table(pg_dsn, "tenant_a", table, rows=ROWS)
    holder = idle_in_transaction(pg_dsn)
    try:
        pid = holder.info.backend_pid
        for table in ("events", "sessions"):
            delete_rows(pg_dsn, table)
        with connect(pg_dsn) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
        for table in ("events", "sessions"):
            wait_for_dead_tuples(pg_dsn, "tenant_a", table, DELETED)
        report = vacuum_sweep(
            tmp_path, pg_dsn, {"tables": "auto", "min_dead_tuples": 100, "min_dead_ratio": 0.1}
        )
    finally:
        holder.close()
    results = auto_results(report, "a")
    assert sorted(results) == ["events", "sessions"]
    for table, result in results.items():
        assert result.status == "ok", result.error
        assert result.rows == 0, table
        assert result.details["dead_tuples_after"] == DELETED, table
        assert result.details["horizon"]["held_by"].startswith(f"pid {pid} (idle in transaction")
    warnings = events(logs, NOT_REMOVABLE)
    assert [w["not_removable"] for w in warnings] == [DELETED, DELETED]
    assert {w["held_by"] for w in warnings} == {results["events"].details["horizon"]["held_by"]}


def test_auto_skips_every_table_while_the_horizon_is_too_old(tmp_path: Path, pg_dsn: str) -> None:
    for table in ("events", "sessions"):
        make_table(pg_dsn, "tenant_a", table, rows=ROWS, delete=DELETED)
        wait_for_dead_tuples(pg_dsn, "tenant_a", table, DELETED)
    holder = idle_in_transaction(pg_dsn)
    try:
        pid = holder.info.backend_pid
        time.sleep(1.2)
        vacuum = {"tables": "auto", "min_dead_tuples": 100, "skip_when_horizon_older_than": "1s"}
        report = vacuum_sweep(tmp_path, pg_dsn, vacuum)
        dry = vacuum_sweep(tmp_path, pg_dsn, vacuum, dry_run=True)
    finally:
        holder.close()
    for run in (report, dry):
        results = auto_results(run, "a")
        assert sorted(results) == ["events", "sessions"]
        for table, result in results.items():
            assert result.status == "skipped", result
            assert result.error is not None
            assert result.error.startswith(f"xmin horizon held by pid {pid} "), result.error
            # Why it was chosen and what held it back, both kept in the skip's details.
            assert result.details["table"] == table
            assert result.details["score"] > 1
            assert result.details["horizon"]["held_by"].startswith(f"pid {pid} ")
    for table in ("events", "sessions"):
        assert stats(pg_dsn, "tenant_a", table)[2] == 0


# -- which backends hold it, and what a role may see -----------------------------------------------


@pytest.mark.parametrize(
    ("statement", "holds"),
    [
        ("VACUUM tenant_a.events", False),
        ("  vacuum (analyze)\n tenant_a.events", False),
        ("VACUUM (ANALYZE, FULL) tenant_a.events", True),  # FULL is no lazy vacuum
        ("ANALYZE tenant_a.events", True),
    ],
)
def test_a_running_vacuum_holds_no_horizon(pg_dsn: str, statement: str, holds: bool) -> None:
    """PostgreSQL ignores a lazy VACUUM's xmin (PROC_IN_VACUUM): so does find_holder. Each
    statement waits for a lock (SHARE UPDATE EXCLUSIVE: no transaction id) with its snapshot."""
    make_table(pg_dsn, "tenant_a", "events", rows=10)
    locker = psycopg.connect(pg_dsn)
    waiter = psycopg.connect(pg_dsn, autocommit=True)
    pid = waiter.info.backend_pid
    try:
        locker.execute("LOCK TABLE tenant_a.events IN SHARE UPDATE EXCLUSIVE MODE")
        thread = threading.Thread(target=waiter.execute, args=(statement,))
        thread.start()
        with connect(pg_dsn) as conn:
            deadline = time.monotonic() + 15
            while conn.execute(
                "SELECT wait_event_type = 'Lock' AND backend_xmin IS NOT NULL"
                " FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            ).fetchone() != (True,):
                assert time.monotonic() < deadline, "the statement never waited for the lock"
                time.sleep(0.02)
        holder = holder_of(pg_dsn)
        locker.rollback()
        thread.join(timeout=30)
    finally:
        locker.close()
        waiter.close()
    if holds:
        assert holder is not None
        assert holder.held_by.startswith(f"pid {pid} (active "), holder
    else:
        assert holder is None


def test_what_a_role_without_pg_monitor_sees(
    tmp_path: Path, pg_server: PgServer, pg_dsn: str
) -> None:
    """Without pg_read_all_stats a holder of another role is found (pid, application) but not
    described, and its unknown age never makes a vacuum skip; with pg_monitor it is described."""
    pg_server.require_superuser("GRANT pg_monitor to a throw-away role")
    holder = idle_in_transaction(pg_dsn, "billing")  # the suite's role, not the throw-away one
    try:
        pid = holder.info.backend_pid
        with throwaway_role(pg_dsn, "horizon_lowly") as role:
            ident = sql.Identifier(role.name)
            with connect(pg_dsn) as conn:
                conn.execute(sql.SQL("CREATE SCHEMA tenant_a AUTHORIZATION {}").format(ident))
            lowly_dsn = role.dsn(pg_dsn)
            with connect(lowly_dsn) as conn:
                conn.execute(
                    "CREATE TABLE tenant_a.events (id int PRIMARY KEY, v text)"
                    " WITH (autovacuum_enabled = false)"
                )
                conn.execute(
                    "INSERT INTO tenant_a.events SELECT g, 'x' FROM generate_series(1, 100) g"
                )
                conn.execute("DELETE FROM tenant_a.events WHERE id <= 40")

            unseen = holder_of(lowly_dsn)
            assert unseen is not None
            assert unseen.held_by == (
                f"pid {pid} (details need pg_read_all_stats, application billing)"
            )
            assert unseen.age_s is None
            report = vacuum_sweep(
                tmp_path, lowly_dsn, {"tables": ["events"], "skip_when_horizon_older_than": "1ms"}
            )
            result = events_result(report)
            assert result.status == "ok", result.error  # an unknown age never skips
            assert result.details["dead_tuples_after"] == 40
            assert result.details["horizon"]["held_by"] == unseen.held_by
            assert result.details["horizon"]["age_s"] is None

            with connect(pg_dsn) as conn:
                conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(ident))
            seen = holder_of(lowly_dsn)
            assert seen is not None
            assert seen.held_by.startswith(f"pid {pid} (idle in transaction "), seen
            assert seen.age_s is not None
    finally:
        holder.close()


# -- prepared transactions, replication slots, standby feedback (servers of their own) -------------


def scratch_table(server: ScratchServer) -> None:
    """tenant_a.events of ROWS rows in the scratch server's postgres database (autovacuum off)."""
    make_table(server.dsn(), "tenant_a", "events", rows=ROWS)


def test_a_prepared_transaction_holds_the_horizon(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    server = scratch_server(settings={"max_prepared_transactions": 2})
    scratch_table(server)
    dsn = server.dsn()
    with connect(dsn) as conn:
        conn.execute("CREATE TABLE public.outbox (id int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO public.outbox VALUES (1)")  # a transaction id
        conn.execute("PREPARE TRANSACTION 'billing-42'")
    try:
        delete_rows(dsn)
        report = vacuum_sweep(tmp_path, dsn, {"tables": ["events"]})
        result = events_result(report)
        assert result.status == "ok", result.error
        assert result.details["dead_tuples_after"] == DELETED
        assert result.details["horizon"]["held_by"] == "prepared transaction billing-42"
        assert result.details["horizon"]["age_s"] >= 0

        time.sleep(1.2)
        report = vacuum_sweep(
            tmp_path, dsn, {"tables": ["events"], "skip_when_horizon_older_than": "1s"}
        )
        result = events_result(report)
        assert result.status == "skipped", result
        assert result.error is not None
        assert result.error.startswith("xmin horizon held by prepared transaction billing-42 for ")
    finally:
        server.execute("ROLLBACK PREPARED 'billing-42'")
    assert holder_of(dsn) is None


def test_a_slot_fed_by_a_standby_and_a_standbys_feedback_hold_the_horizon(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    """A standby with hot_standby_feedback and a physical slot: the slot's xmin holds the horizon
    (its age is unknown while the standby uses it: never a skip). Without a slot, the feedback
    is the walsender's own xmin."""
    primary = scratch_server(settings={"hot_standby_feedback": True, "primary_slot_name": "cdc"})
    primary.execute("SELECT pg_create_physical_replication_slot('cdc', true)")
    assert holder_of(primary.dsn()) is None  # reserves WAL, holds no xmin yet
    scratch_table(primary)
    standby = standby_of(primary)
    deadline = time.monotonic() + 30
    while primary.scalar("SELECT xmin FROM pg_replication_slots WHERE slot_name = 'cdc'") is None:
        assert time.monotonic() < deadline, "the standby's feedback never reached the slot"
        time.sleep(0.05)
    standby.wait_caught_up()
    # A snapshot on the standby pins the xmin its feedback reports, whatever the timing.
    with psycopg.connect(standby.dsn()) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reader.execute("SELECT count(*) FROM tenant_a.events")
        delete_rows(primary.dsn())
        report = vacuum_sweep(
            tmp_path, primary.dsn(), {"tables": ["events"], "skip_when_horizon_older_than": "1ms"}
        )
    result = events_result(report)
    assert result.status == "ok", result.error
    assert result.details["dead_tuples_after"] == DELETED
    assert result.details["horizon"]["held_by"] == "replication slot cdc"
    assert result.details["horizon"]["age_s"] is None

    standby.cleanup()
    primary.execute("SELECT pg_drop_replication_slot('cdc')")
    del primary.settings["primary_slot_name"]  # the next standby streams without a slot
    standby = standby_of(primary)
    deadline = time.monotonic() + 30
    while (holder := holder_of(primary.dsn())) is None:
        assert time.monotonic() < deadline, "the standby's feedback never reached the walsender"
        time.sleep(0.05)
    [(walsender, application)] = primary.execute(
        "SELECT pid, application_name FROM pg_stat_replication"
    )
    assert holder == Horizon(
        held_by=f"standby feedback (walsender pid {walsender}, application {application})",
        age_s=None,
        xmin_age=holder.xmin_age,
        kind="standby feedback",
    )


def test_a_logical_slot_holds_only_the_catalogs(
    scratch_server: Callable[..., ScratchServer],
) -> None:
    """A logical slot's catalog_xmin holds back the system catalogs, not a tenant's tables."""
    server = scratch_server(settings={"wal_level": "logical"})
    server.execute("SELECT pg_create_logical_replication_slot('cdc', 'test_decoding')")
    [(xmin, catalog_xmin)] = server.execute(
        "SELECT xmin, catalog_xmin FROM pg_replication_slots WHERE slot_name = 'cdc'"
    )
    assert xmin is None and catalog_xmin is not None
    assert holder_of(server.dsn()) is None


# -- one lookup per database and sweep; a failed lookup fails nothing ------------------------------


def test_concurrent_vacuums_share_one_lookup(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    """Every vacuum of the sweep asks (skip_when_horizon_older_than) and every one leaves dead
    tuples behind, yet the server ran the horizon query once (its statement log says so)."""
    server = scratch_server(settings={"log_statement": "all"})
    dsn = server.dsn()
    tables = [f"t{i}" for i in range(4)]
    tenants = (("a", "tenant_a"), ("b", "tenant_b"))
    for _name, schema in tenants:
        for table in tables:
            make_table(dsn, schema, table, rows=ROWS)
    holder = idle_in_transaction(dsn)
    pid = holder.info.backend_pid
    try:
        for _name, schema in tenants:
            for table in tables:
                delete_rows(dsn, table, schema)
        report = vacuum_sweep(
            tmp_path,
            dsn,
            {"tables": tables, "skip_when_horizon_older_than": "1h"},
            tenants=tenants,
        )
    finally:
        holder.close()
    vacuums = [r for r in report.results if r.operation != "vacuum.database_stats"]
    assert len(vacuums) == 8
    for result in vacuums:
        assert result.status == "ok", result.error
        assert result.details["horizon"]["held_by"].startswith(f"pid {pid} (idle in transaction")
    log = server.log.read_text(encoding="utf-8", errors="replace")
    assert log.count("FROM pg_catalog.pg_prepared_xacts") == 1


def test_a_failed_lookup_is_logged_once_and_fails_no_vacuum(
    tmp_path: Path, pg_server: PgServer, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    """The horizon query fails for real: this database's pg_prepared_xacts is not readable by
    the sweep's role. Every vacuum still runs."""
    pg_server.require_superuser("REVOKE on a pg_catalog view")
    with throwaway_role(pg_dsn, "horizon_blind") as role:
        with connect(pg_dsn) as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA tenant_a AUTHORIZATION {}").format(sql.Identifier(role.name))
            )
            conn.execute("REVOKE SELECT ON pg_catalog.pg_prepared_xacts FROM PUBLIC")
        dsn = role.dsn(pg_dsn)
        with connect(dsn) as conn:
            for table in ("events", "sessions"):
                conn.execute(
                    f"CREATE TABLE tenant_a.{table} (id int PRIMARY KEY, v text)"
                    " WITH (autovacuum_enabled = false)"
                )
                conn.execute(
                    f"INSERT INTO tenant_a.{table} SELECT g, 'x' FROM generate_series(1, 100) g"
                )
                conn.execute(f"DELETE FROM tenant_a.{table} WHERE id <= 40")
        report = vacuum_sweep(
            tmp_path,
            dsn,
            {"tables": ["events", "sessions"], "skip_when_horizon_older_than": "1ms"},
        )
    for table in ("events", "sessions"):
        result = result_of(report, f"vacuum.{table}", "a")
        assert result.status == "ok", result.error
        assert result.rows == 40
        assert "horizon" not in result.details
    [warning] = events(logs, LOOKUP_FAILED)
    assert warning["log_level"] == "warning"
    assert "permission denied" in warning["error"]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0s", "soon", 10, True])
def test_skip_when_horizon_older_than_must_be_a_positive_duration(
    tmp_path: Path, value: Any
) -> None:
    doc = config_doc(
        "dbname=x", [], vacuum={"tables": ["events"], "skip_when_horizon_older_than": value}
    )
    path = write_config(tmp_path, tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    [problem] = excinfo.value.problems
    assert problem.startswith(f"{path}: plugins.vacuum.skip_when_horizon_older_than: expected")


def test_holder_query_by_server_version() -> None:
    assert "inactive_since" in holder_query(170000)
    assert "inactive_since" not in holder_query(160000)
    assert "%" not in holder_query(180000)  # sent without parameters, as it is
