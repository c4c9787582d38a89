"""The run history (schema ``sweeperd`` in each database) against a real PostgreSQL.

Sweeps go through the real CLI (``python -m sweeperd sweep``) with a drop-in plugin
(``plugins.d/hist.py``) whose operations are deterministic and need no privileges:

- ``hist.ok``: returns the length of the tenant's name as its row count (honours ``--dry-run``);
- ``hist.flaky``: fails with a division by zero in the tenants named by ``[plugins.hist] fail``,
  returns None (rows not meaningful) elsewhere;
- ``hist.db``: scope ``database``, returns 7.

Checked: the schema and tables appear on first use; one ``runs`` row per (sweep run, database) and
one ``results`` row per item, both matching the ``sweep --json`` report; the sweep's name ("*" for
all) and the instance; each database holds only its own items; bulk writing (all of 200 items
land, and ``History.record`` costs the same number of round trips for 5 and 500 items, counted
from libpq's protocol trace); pruning by ``[history] keep`` (with ``ON DELETE CASCADE``) at most
once an hour per History object; ``enabled = false``; a role without CREATE on the database; dry
runs; and the daemon recording each sweep.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import psycopg
import pytest
from histsetup import DIVISION_BY_ZERO, EXIT_FAILED, EXIT_OK, FAILING, TENANTS, write_setup
from psycopg.conninfo import conninfo_to_dict
from support import Role, run_cli, run_sql, throwaway_role

from sweeperd.config import DatabaseConfig, HistoryConfig
from sweeperd.db import Database
from sweeperd.history import History
from sweeperd.model import Result
from sweeperd.report import SweepReport

RUN_COLUMNS = (
    "run_id",
    "sweep",
    "instance",
    "started_at",
    "finished_at",
    "ok",
    "failed",
    "skipped",
    "cancelled",
)
RESULT_COLUMNS = (
    "run_id",
    "tenant",
    "schema_name",
    "operation",
    "status",
    "rows",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
)


# -- helpers ---------------------------------------------------------------------------------------


def sweep(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("sweep", "-c", str(config), *args)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def the_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            f"stdout is not one JSON document: {result.stdout!r}\n{result.stderr}"
        ) from exc
    assert isinstance(doc, dict)
    return doc


def sweep_json(config: Path, *args: str, expect: int) -> dict[str, Any]:
    result = sweep(config, *args, "--json")
    assert result.returncode == expect, result.stderr
    return the_json(result)


def log_records(stderr: str) -> list[dict[str, Any]]:
    records = []
    for line in stderr.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AssertionError(f"not a JSON log line: {line!r}") from exc
    return records


def query(dsn: str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def scalar(dsn: str, statement: str, params: Sequence[Any] = ()) -> Any:
    rows = query(dsn, statement, params)
    assert len(rows) == 1, rows
    return rows[0][0]


def has_history_schema(dsn: str) -> bool:
    return bool(scalar(dsn, "SELECT to_regnamespace('sweeperd') IS NOT NULL"))


def runs(dsn: str) -> list[dict[str, Any]]:
    rows = query(dsn, f"SELECT {', '.join(RUN_COLUMNS)} FROM sweeperd.runs ORDER BY started_at")
    return [dict(zip(RUN_COLUMNS, row, strict=True)) for row in rows]


def results(dsn: str, run_id: Any = None) -> list[dict[str, Any]]:
    rows = query(
        dsn,
        f"SELECT {', '.join(RESULT_COLUMNS)} FROM sweeperd.results"
        " WHERE %(run)s::uuid IS NULL OR run_id = %(run)s::uuid ORDER BY operation, tenant",
        {"run": run_id},  # type: ignore[arg-type]
    )
    return [dict(zip(RESULT_COLUMNS, row, strict=True)) for row in rows]


def ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def by_item(items: Sequence[Mapping[str, Any]]) -> dict[tuple[str | None, str], Mapping[str, Any]]:
    out = {(r["tenant"], r["operation"]): r for r in items}
    assert len(out) == len(items), "duplicate (tenant, operation)"
    return out


def assert_run_matches_report(
    run: Mapping[str, Any], report: Mapping[str, Any], counts: Mapping[str, int] | None = None
) -> None:
    assert run["sweep"] == report["sweep"]
    assert run["started_at"] == ts(report["started_at"])
    assert run["finished_at"] == ts(report["finished_at"])
    expected = dict(counts if counts is not None else report["counts"])
    assert {k: run[k] for k in ("ok", "failed", "skipped", "cancelled")} == expected


def assert_results_match_report(
    rows: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]]
) -> None:
    recorded, reported = by_item(rows), by_item(items)
    assert set(recorded) == set(reported)
    for key, r in reported.items():
        row = recorded[key]
        assert row["schema_name"] == r["schema"], key
        assert row["status"] == r["status"], key
        assert row["rows"] == r["rows"], key
        assert row["error"] == r["error"], key
        assert row["started_at"] == ts(r["started_at"]), key
        assert row["finished_at"] == ts(r["finished_at"]), key
        assert row["duration_s"] == pytest.approx(r["duration_s"], abs=1e-5), key


@pytest.fixture
def limited_role(pg_dsn: str) -> Iterator[Role]:
    """A LOGIN role without CREATE on pg_dsn's database (PUBLIC has only CONNECT and TEMP)."""
    with throwaway_role(pg_dsn) as role:
        yield role


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


# -- schema creation, runs and results -------------------------------------------------------------


def test_first_sweep_creates_the_schema_and_tables(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    assert not has_history_schema(pg_dsn)
    sweep_json(config, "nightly", expect=EXIT_FAILED)
    assert has_history_schema(pg_dsn)
    tables = {
        row[0]
        for row in query(
            pg_dsn,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'sweeperd'",
        )
    }
    assert tables >= {"runs", "results"}
    for table, columns in (("runs", RUN_COLUMNS), ("results", RESULT_COLUMNS)):
        found = {
            row[0]
            for row in query(
                pg_dsn,
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'sweeperd' AND table_name = %s",
                (table,),
            )
        }
        assert found >= set(columns), (table, found)
    # results → runs, ON DELETE CASCADE (pruning a run prunes its results).
    assert (
        scalar(
            pg_dsn,
            "SELECT confdeltype FROM pg_constraint"
            " WHERE conrelid = 'sweeperd.results'::regclass AND contype = 'f'"
            " AND confrelid = 'sweeperd.runs'::regclass",
        )
        == "c"
    )


def test_one_runs_row_per_sweep_run_with_the_reports_counts_and_times(
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    report = sweep_json(config, "nightly", expect=EXIT_FAILED)
    assert report["counts"] == {"ok": 5, "failed": 1, "skipped": 0, "cancelled": 0}
    [run] = runs(pg_dsn)
    assert_run_matches_report(run, report)
    assert isinstance(run["run_id"], uuid.UUID)
    # The instance: host and process id of the sweeping process.
    host, _, pid = run["instance"].rpartition(":")
    assert host == socket.gethostname()
    assert pid.isdigit() and int(pid) != os.getpid()


def test_one_results_row_per_item_with_tenant_schema_status_rows_times_error(
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    report = sweep_json(config, expect=EXIT_FAILED)
    [run] = runs(pg_dsn)
    rows = results(pg_dsn, run["run_id"])
    assert len(rows) == len(report["results"]) == 7  # 3 x hist.ok, 3 x hist.flaky, 1 x hist.db
    assert {r["run_id"] for r in rows} == {run["run_id"]}
    assert_results_match_report(rows, report["results"])
    recorded = by_item(rows)
    for t in TENANTS:
        ok = recorded[(t, "hist.ok")]
        assert (ok["schema_name"], ok["status"], ok["rows"], ok["error"]) == (
            f"tenant_{t}",
            "ok",
            len(t),
            None,
        )
        assert ok["started_at"] <= ok["finished_at"]
        assert ok["duration_s"] >= 0
    failed = recorded[(FAILING, "hist.flaky")]
    assert failed["status"] == "failed"
    assert failed["rows"] is None
    assert failed["error"] == DIVISION_BY_ZERO
    assert recorded[("acme", "hist.flaky")]["rows"] is None  # ok, rows not meaningful
    per_db = recorded[(None, "hist.db")]
    assert (per_db["tenant"], per_db["status"], per_db["rows"]) == (None, "ok", 7)


def test_two_sweeps_make_two_runs(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    nightly = sweep_json(config, "nightly", expect=EXIT_FAILED)
    hourly = sweep_json(config, "hourly", expect=EXIT_OK)
    first, second = runs(pg_dsn)
    assert first["run_id"] != second["run_id"]
    assert_run_matches_report(first, nightly)
    assert_run_matches_report(second, hourly)
    assert_results_match_report(results(pg_dsn, first["run_id"]), nightly["results"])
    assert_results_match_report(results(pg_dsn, second["run_id"]), hourly["results"])
    assert len(results(pg_dsn)) == 6 + 2


def test_a_sweep_of_every_sweep_is_recorded_as_star(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    report = sweep_json(config, expect=EXIT_FAILED)
    assert report["sweep"] == "*"
    [run] = runs(pg_dsn)
    assert run["sweep"] == "*"
    assert_run_matches_report(run, report)


def test_each_database_holds_only_its_own_items(
    tmp_path: Path,
    pg_dsn: str,
    other_dsn: str,
) -> None:
    config = write_setup(
        tmp_path,
        {"main": pg_dsn, "other": other_dsn},
        tenants={"acme": "main", "globex": "main", "initech": "other"},
    )
    report = sweep_json(config, "nightly", expect=EXIT_FAILED)
    items = {
        name: [r for r in report["results"] if r["database"] == name] for name in ("main", "other")
    }
    assert len(items["main"]) == 4 and len(items["other"]) == 2

    [main_run] = runs(pg_dsn)
    [other_run] = runs(other_dsn)
    # One sweep run: the same run id in both databases, each with its own counts.
    assert main_run["run_id"] == other_run["run_id"]
    assert_run_matches_report(
        main_run, report, {"ok": 3, "failed": 1, "skipped": 0, "cancelled": 0}
    )
    assert_run_matches_report(
        other_run, report, {"ok": 2, "failed": 0, "skipped": 0, "cancelled": 0}
    )
    assert_results_match_report(results(pg_dsn), items["main"])
    assert_results_match_report(results(other_dsn), items["other"])
    assert {r["tenant"] for r in results(other_dsn)} == {"initech"}


def test_a_large_sweep_records_every_item(tmp_path: Path, pg_dsn: str) -> None:
    tenants = {f"t{i:03d}": "main" for i in range(100)}
    config = write_setup(tmp_path, {"main": pg_dsn}, tenants=tenants, fail=())
    report = sweep_json(config, "nightly", expect=EXIT_OK)
    assert len(report["results"]) == 200
    [run] = runs(pg_dsn)
    assert (run["ok"], run["failed"]) == (200, 0)
    rows = results(pg_dsn, run["run_id"])
    assert len(rows) == 200
    assert_results_match_report(rows, report["results"])


# -- bulk writing: round trips do not grow with the number of items ------------------------------


class TracedDatabase(Database):
    """A real Database whose connections write libpq's protocol trace (PQtrace) to a file."""

    def __init__(self, config: DatabaseConfig, trace: TextIO) -> None:
        super().__init__(config)
        self.trace = trace

    @asynccontextmanager
    async def connection(self, label: str, **kwargs: Any) -> AsyncIterator[Any]:
        async with super().connection(label, **kwargs) as conn:
            conn.pgconn.trace(self.trace.fileno())
            try:
                yield conn
            finally:
                conn.pgconn.untrace()  # flushes the trace


def make_report(
    n: int,
    sweep_name: str = "bulk",
    *,
    tenant_prefix: str = "t",
    finished_at: datetime | None = None,
) -> SweepReport:
    end = finished_at or datetime.now(UTC)
    start = end - timedelta(seconds=1)
    items = [
        Result(
            tenant=f"{tenant_prefix}{i}",
            database="main",
            schema=f"tenant_{i}",
            operation="hist.ok",
            status="ok" if i % 10 else "failed",
            rows=i,
            started_at=start,
            finished_at=end,
            duration_s=0.5,
            error=None if i % 10 else "Boom (SQLSTATE XX000): boom",
        )
        for i in range(n)
    ]
    return SweepReport(sweep=sweep_name, started_at=start, finished_at=end, results=items)


def round_trips(trace_path: Path) -> int:
    """Completed exchanges with the server: ReadyForQuery messages sent by the backend."""
    return sum(
        1
        for line in trace_path.read_text().splitlines()
        if "\tB\t" in line and "\tReadyForQuery" in line
    )


def test_record_costs_the_same_round_trips_for_5_and_500_items(
    tmp_path: Path,
    pg_dsn: str,
) -> None:
    counts: dict[int, int] = {}

    async def record(n: int) -> None:
        path = tmp_path / f"trace-{n}.txt"
        with path.open("w") as trace:
            db = TracedDatabase(DatabaseConfig(name="main", dsn=pg_dsn, connect_timeout=5.0), trace)
            await db.open()
            try:
                await History(HistoryConfig(), instance="bulk-test").record(
                    make_report(n), {"main": db}
                )
            finally:
                await db.close()
        counts[n] = round_trips(path)

    asyncio.run(record(1))  # the schema exists from here on: both measured calls do the same DDL
    asyncio.run(record(5))
    asyncio.run(record(500))
    assert counts[5] > 0, "the trace recorded nothing"
    assert counts[500] == counts[5], counts
    # A handful, whatever the size: open's check, the label, the DDL and the write and the
    # hourly prune each in a transaction that SET LOCALs its timeouts (safe behind a pooler).
    assert counts[500] <= 16, counts
    sizes = sorted(
        row[0] for row in query(pg_dsn, "SELECT count(*) FROM sweeperd.results GROUP BY run_id")
    )
    assert sizes == [1, 5, 500]
    assert sorted((r["ok"], r["failed"]) for r in runs(pg_dsn)) == [(0, 1), (4, 1), (450, 50)]


# -- pruning ---------------------------------------------------------------------------------------


def insert_run(dsn: str, *, age: str, results_n: int = 2, sweep_name: str = "nightly") -> str:
    """A finished run ``age`` ago (an interval) with ``results_n`` results; returns its id."""
    run_id = str(uuid.uuid4())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sweeperd.runs (run_id, sweep, instance, started_at, finished_at,"
            " ok, failed, skipped, cancelled) VALUES (%(id)s, %(sweep)s, 'old-host:1',"
            " now() - %(age)s::interval - interval '1 minute', now() - %(age)s::interval,"
            " %(n)s, 0, 0, 0)",
            {"id": run_id, "sweep": sweep_name, "age": age, "n": results_n},
        )
        for i in range(results_n):
            conn.execute(
                "INSERT INTO sweeperd.results (run_id, tenant, schema_name, operation, status,"
                " rows, started_at, finished_at, duration_s, error) VALUES (%s, %s, %s,"
                " 'hist.ok', 'ok', 1, now() - %s::interval, now() - %s::interval, 0.1, NULL)",
                (run_id, f"old{i}", f"tenant_old{i}", age, age),
            )
    return run_id


def run_ids(dsn: str) -> set[str]:
    return {str(r["run_id"]) for r in runs(dsn)}


def result_run_ids(dsn: str) -> set[str]:
    return {str(row[0]) for row in query(dsn, "SELECT DISTINCT run_id FROM sweeperd.results")}


def test_runs_older_than_keep_are_pruned_with_their_results(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn}, history={"keep": "30d"})
    sweep_json(config, "hourly", expect=EXIT_OK)  # creates the schema
    [first] = run_ids(pg_dsn)
    old = insert_run(pg_dsn, age="40 days", results_n=3)
    recent = insert_run(pg_dsn, age="20 days", results_n=1)
    assert result_run_ids(pg_dsn) == {first, old, recent}

    sweep_json(config, "hourly", expect=EXIT_OK)
    kept = run_ids(pg_dsn)
    assert old not in kept
    assert {first, recent} < kept and len(kept) == 3  # plus the new run
    assert result_run_ids(pg_dsn) == kept  # the old run's results went with it (CASCADE)
    assert scalar(pg_dsn, "SELECT count(*) FROM sweeperd.results WHERE tenant LIKE 'old%%'") == 1

    # A shorter keep prunes the 20-day-old run too, never the runs that just happened.
    config = write_setup(tmp_path, {"main": pg_dsn}, history={"keep": "10d"})
    sweep_json(config, "hourly", expect=EXIT_OK)
    kept_now = run_ids(pg_dsn)
    assert recent not in kept_now
    assert kept - {recent} < kept_now and len(kept_now) == 3
    assert result_run_ids(pg_dsn) == kept_now


def test_pruning_happens_at_most_once_an_hour_per_history_object(pg_dsn: str) -> None:
    async def main() -> None:
        db = Database(DatabaseConfig(name="main", dsn=pg_dsn, connect_timeout=5.0))
        await db.open()
        try:
            history = History(HistoryConfig(keep=30 * 86400.0), instance="long-lived")
            await history.record(make_report(3), {"main": db})
            await asyncio.to_thread(insert_run, pg_dsn, age="40 days")
            old = await asyncio.to_thread(insert_run, pg_dsn, age="41 days")
            # The same History object within the hour: records, does not prune again.
            await history.record(make_report(3), {"main": db})
            ids = await asyncio.to_thread(run_ids, pg_dsn)
            assert old in ids and len(ids) == 4
            # A new History object (a new process, or an hour later) prunes.
            await History(HistoryConfig(keep=30 * 86400.0)).record(make_report(3), {"main": db})
            ids = await asyncio.to_thread(run_ids, pg_dsn)
            assert len(ids) == 3 and old not in ids
            assert await asyncio.to_thread(result_run_ids, pg_dsn) == ids
        finally:
            await db.close()

    asyncio.run(main())


# -- disabled, missing privileges, dry runs --------------------------------------------------------


def test_disabled_history_creates_nothing_even_without_create_privilege(
    tmp_path: Path,
    pg_dsn: str,
    limited_role: Role,
) -> None:
    dsn = limited_role.dsn(pg_dsn)
    config = write_setup(tmp_path, {"main": dsn}, history={"enabled": False}, fail=())
    result = sweep(config, "nightly", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    assert the_json(result)["counts"]["ok"] == 6
    assert not has_history_schema(pg_dsn)
    assert not [r for r in log_records(result.stderr) if r.get("level") in ("error", "warning")]
    assert "history" not in result.stderr


def test_missing_create_privilege_leaves_the_sweep_alone_and_logs_one_grant_hint(
    tmp_path: Path,
    pg_dsn: str,
    limited_role: Role,
) -> None:
    dsn = limited_role.dsn(pg_dsn)
    config = write_setup(tmp_path, {"main": dsn}, fail=())
    result = sweep(config, "nightly", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = the_json(result)
    assert report["counts"] == {"ok": 6, "failed": 0, "skipped": 0, "cancelled": 0}
    assert not has_history_schema(pg_dsn)

    hint_lines = [line for line in result.stderr.splitlines() if "GRANT CREATE ON DATABASE" in line]
    assert len(hint_lines) == 1, result.stderr
    record = json.loads(hint_lines[0])
    assert record["level"] == "error"
    assert "history" in record["event"]
    assert record.get("database") == "main"
    assert f"GRANT CREATE ON DATABASE {dbname_of(pg_dsn)} TO {limited_role.name}" in hint_lines[0]
    assert "InsufficientPrivilege" in hint_lines[0] or "42501" in hint_lines[0]
    # Only that one line about the history: no traceback, no repeated complaint.
    history_errors = [
        r
        for r in log_records(result.stderr)
        if r.get("level") == "error" and "history" in json.dumps(r)
    ]
    assert len(history_errors) == 1, history_errors


def test_a_schema_created_for_a_role_without_create_privilege_is_used(
    tmp_path: Path,
    pg_dsn: str,
    limited_role: Role,
) -> None:
    # The remedy the privilege error suggests: "(or create schema sweeperd for it, ...)".
    run_sql(pg_dsn, f"CREATE SCHEMA sweeperd AUTHORIZATION {limited_role.name}")
    config = write_setup(tmp_path, {"main": limited_role.dsn(pg_dsn)}, fail=())
    result = sweep(config, "nightly", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    assert "GRANT CREATE" not in result.stderr
    [run] = runs(pg_dsn)
    assert_run_matches_report(run, the_json(result))


def test_a_dry_run_records_nothing(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    report = sweep_json(config, "--dry-run", expect=EXIT_OK)
    assert {r["status"] for r in report["results"]} == {"dry-run"}
    assert not has_history_schema(pg_dsn)
    sweep_json(config, "hourly", expect=EXIT_OK)
    before = runs(pg_dsn)
    sweep_json(config, "hourly", "--dry-run", expect=EXIT_OK)
    assert runs(pg_dsn) == before
    assert len(results(pg_dsn)) == 2


# -- the daemon ------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def history_runs_or_empty(dsn: str) -> list[dict[str, Any]]:
    return (
        runs(dsn)
        if has_history_schema(dsn)
        and scalar(dsn, "SELECT to_regclass('sweeperd.results') IS NOT NULL")
        else []
    )


def test_the_daemon_records_each_sweep_and_status_shows_it(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(
        tmp_path, {"main": pg_dsn}, sweeps={"often": {"interval": "1s", "operations": ["hist.*"]}}
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPERD_CONFIG", "NOTIFY_SOCKET")}
    stderr_path = tmp_path / "daemon.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            text=True,
        )
        try:
            wait_until(
                lambda: len(history_runs_or_empty(pg_dsn)) >= 2, 30, "two recorded runs", proc
            )
            before_stop = runs(pg_dsn)  # complete sweeps (a stop may cancel the next one)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    log = stderr_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log
    assert len(before_stop) >= 2
    recorded = runs(pg_dsn)
    assert len({r["run_id"] for r in recorded}) == len(recorded)
    for run in recorded:
        assert run["sweep"] == "often"
        assert run["instance"] == f"{socket.gethostname()}:{proc.pid}"
        assert sum(run[k] for k in ("ok", "failed", "skipped", "cancelled")) == 7
        assert len(results(pg_dsn, run["run_id"])) == 7
    for run in before_stop:
        assert (run["ok"], run["failed"]) == (6, 1)  # 3 x hist.ok, 3 x hist.flaky, hist.db
        rows = by_item(results(pg_dsn, run["run_id"]))
        assert rows[(FAILING, "hist.flaky")]["error"] == DIVISION_BY_ZERO
    assert not [line for line in log.splitlines() if "cannot write the run history" in line]

    # `sweeperd status` shows the daemon's latest run.
    result = run_cli("status", "-c", str(config), "--json")
    assert result.returncode == EXIT_OK, result.stderr
    [shown] = json.loads(result.stdout)["runs"]
    latest = max(recorded, key=lambda r: r["started_at"])
    assert shown["run_id"] == str(latest["run_id"])
    assert shown["sweep"] == "often"
    assert shown["instance"] == f"{socket.gethostname()}:{proc.pid}"
    assert shown["counts"] == {k: latest[k] for k in ("ok", "failed", "skipped", "cancelled")}


def test_history_tables_are_plain_sql(tmp_path: Path, pg_dsn: str) -> None:
    """Queryable with SQL: e.g. the failures of the last run, joined to the run."""
    config = write_setup(tmp_path, {"main": pg_dsn})
    sweep_json(config, "nightly", expect=EXIT_FAILED)
    rows = query(
        pg_dsn,
        "SELECT u.sweep, r.tenant, r.operation, r.error FROM sweeperd.runs u"
        " JOIN sweeperd.results r USING (run_id) WHERE r.status = 'failed'",
    )
    assert rows == [("nightly", FAILING, "hist.flaky", DIVISION_BY_ZERO)]
    assert re.fullmatch(r"[^\n]+", rows[0][3])


def test_a_manual_partial_run_does_not_hide_the_scheduled_one(pg_dsn: str) -> None:
    """`sweep nightly --tenant acme` by hand must not pass for the night's run in status."""
    import datetime as dt

    from sweeperd.config import DatabaseConfig, HistoryConfig
    from sweeperd.db import Database
    from sweeperd.history import History
    from sweeperd.model import Result
    from sweeperd.report import SweepReport
    from sweeperd.status import latest_runs

    def report(at: dt.datetime, tenants: list[str], status: str) -> SweepReport:
        results = [
            Result(
                tenant=t,
                database="main",
                schema=f"tenant_{t}",
                operation="x.y",
                status=status,
                rows=None,
                started_at=at,
                finished_at=at,  # type: ignore[arg-type]
                duration_s=0.0,
                error=None if status == "ok" else "boom",
            )
            for t in tenants
        ]
        return SweepReport(sweep="nightly", started_at=at, finished_at=at, results=results)

    async def main() -> list[tuple[str, str | None, int]]:
        database = Database(DatabaseConfig(name="main", dsn=pg_dsn))
        await database.open()
        try:
            history = History(HistoryConfig())
            night = dt.datetime(2026, 11, 28, 3, tzinfo=dt.UTC)
            await history.record(report(night, ["acme", "globex"], "failed"), {"main": database})
            await history.record(
                report(night + dt.timedelta(hours=6), ["acme"], "ok"),
                {"main": database},
                trigger="manual",
                selection="--tenant acme",
            )
            runs, _ = await latest_runs(database, sweep=None, tenant_regex=None, failed_only=False)
            return sorted((r.trigger, r.selection, r.counts["failed"]) for r in runs)
        finally:
            await database.close()

    assert asyncio.run(main()) == [("manual", "--tenant acme", 0), ("schedule", None, 2)]


def test_history_and_claims_write_to_every_new_database_object_over_many_reloads(
    pg_server: Any,
) -> None:
    """A reload replaces Database objects; a new one may sit at a freed one's address. Each new
    database (no schema yet) must still get its schema, its run and its claim: nothing about a
    Database may outlive it (id()-keyed memory did, and writes failed until a restart)."""
    from conftest import fresh_database

    from sweeperd.coordination import Claims

    history = History(HistoryConfig(), instance="reloads")
    claims = Claims("reloads")

    async def once(dsn: str) -> None:
        db = Database(DatabaseConfig(name="main", dsn=dsn, connect_timeout=5.0))
        await db.open()
        try:
            await history.record(make_report(2), {"main": db})
            await claims.prepare(db)
            async with db.connection("check") as conn:
                cur = await conn.execute("SELECT to_regclass('sweeperd.claims') IS NOT NULL")
                assert await cur.fetchone() == (True,), "no claims table in the new database"
        finally:
            await db.close()

    for _ in range(12):
        with fresh_database(pg_server) as dsn:
            asyncio.run(once(dsn))
            assert len(runs(dsn)) == 1, "the run was not written to the new database"
