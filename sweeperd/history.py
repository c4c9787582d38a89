"""Run history in each database (schema ``sweeperd``): what every sweep did, queryable with SQL.

``sweeperd.runs`` has one row per (sweep run, database); ``sweeperd.results`` one row per (run,
tenant, operation). Both are written in bulk when a sweep ends (one transaction and one COPY per
database, never a round trip per operation), and pruned by ``[history] keep`` at most once an
hour per database, so the history cannot grow without bound the way pg_cron's does.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta

import structlog
from psycopg import sql

from .config import HistoryConfig
from .db import AsyncConn, Database
from .errors import describe_error, is_insufficient_privilege
from .model import Result
from .report import SweepReport, status_counts

log = structlog.get_logger("sweeperd.history")

SCHEMA = "sweeperd"
PRUNE_EVERY_S = 3600.0

_DDL = """
CREATE TABLE IF NOT EXISTS sweeperd.runs (
    run_id      uuid PRIMARY KEY,
    sweep       text NOT NULL,
    instance    text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    ok          integer NOT NULL,
    failed      integer NOT NULL,
    skipped     integer NOT NULL,
    cancelled   integer NOT NULL
);
-- "schedule" (the daemon) or "manual" (sweeperd sweep, with its selection): a partial manual
-- run must not pass for the night's run in `sweeperd status`.
ALTER TABLE sweeperd.runs ADD COLUMN IF NOT EXISTS trigger text NOT NULL DEFAULT 'schedule';
ALTER TABLE sweeperd.runs ADD COLUMN IF NOT EXISTS selection text;
CREATE INDEX IF NOT EXISTS runs_sweep_started ON sweeperd.runs (sweep, started_at DESC);
CREATE INDEX IF NOT EXISTS runs_finished ON sweeperd.runs (finished_at);
CREATE TABLE IF NOT EXISTS sweeperd.results (
    run_id      uuid NOT NULL REFERENCES sweeperd.runs ON DELETE CASCADE,
    tenant      text,
    schema_name text,
    operation   text NOT NULL,
    status      text NOT NULL,
    rows        bigint,
    started_at  timestamptz,
    finished_at timestamptz,
    duration_s  double precision,
    error       text
);
-- The plan-time target (a table of vacuum.auto): what an expanding operation's item worked on.
ALTER TABLE sweeperd.results ADD COLUMN IF NOT EXISTS target text;
-- A target's last durations by index, not by sorting the whole history (last_durations).
CREATE INDEX IF NOT EXISTS results_target
    ON sweeperd.results (operation, schema_name, target, finished_at DESC)
 WHERE target IS NOT NULL;
CREATE INDEX IF NOT EXISTS results_run ON sweeperd.results (run_id);
CREATE INDEX IF NOT EXISTS results_operation ON sweeperd.results (operation, tenant, finished_at)
"""

_COLUMNS = (
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
    "target",
)


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class History:
    """Writes sweep reports to the databases they ran against; never fails a sweep."""

    def __init__(self, config: HistoryConfig, instance: str | None = None) -> None:
        self.config = config
        self.instance = instance or instance_name()
        # Databases whose schema exists. Weak: a Database a reload replaced is forgotten with it
        # (remembering id()s let a new object at a freed address skip creating the schema).
        self._ready: weakref.WeakSet[Database] = weakref.WeakSet()
        self._pruned_at: dict[str, float] = {}
        self._broken: set[str] = set()  # databases already reported (once) as unwritable

    async def record(
        self,
        report: SweepReport,
        databases: Mapping[str, Database],
        *,
        trigger: str = "schedule",
        selection: str | None = None,
    ) -> None:
        """Write ``report``; ``trigger`` is "schedule" or "manual" (with its ``selection``)."""
        if not self.config.enabled:
            return
        by_db: dict[str, list[Result]] = defaultdict(list)
        for result in report.results:
            by_db[result.database].append(result)
        run_id = uuid.uuid4()
        for name, results in by_db.items():
            database = databases.get(name)
            if database is None or not database.is_open or database.in_recovery:
                continue  # unreachable, or a standby: nothing to write to
            try:
                await self._write(database, report, run_id, results, (trigger, selection))
            except Exception as exc:
                self._report_failure(database, exc)

    async def _write(
        self,
        database: Database,
        report: SweepReport,
        run_id: uuid.UUID,
        results: Sequence[Result],
        how: tuple[str, str | None],
    ) -> None:
        async with database.housekeeping("history") as conn:
            if database not in self._ready:
                await database.ensure_schema(conn, _DDL)
                self._ready.add(database)
            counts = status_counts(results, dry_run_as_ok=True)
            async with database.transaction(conn):
                await conn.execute(
                    "INSERT INTO sweeperd.runs (run_id, sweep, instance, started_at, finished_at,"
                    " ok, failed, skipped, cancelled, trigger, selection)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        run_id,
                        report.sweep,
                        self.instance,
                        report.started_at,
                        report.finished_at,
                        counts["ok"],
                        counts["failed"],
                        counts["skipped"],
                        counts["cancelled"],
                        *how,
                    ),
                )
                copy_sql = sql.SQL("COPY sweeperd.results ({}) FROM STDIN").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
                )
                async with conn.cursor().copy(copy_sql) as copy:
                    for r in results:
                        await copy.write_row(
                            (
                                run_id,
                                r.tenant,
                                r.schema,
                                r.operation,
                                r.status,
                                r.rows,
                                r.started_at,
                                r.finished_at,
                                r.duration_s,
                                r.error,
                                r.target,
                            )
                        )
            now = time.monotonic()
            if now - self._pruned_at.get(database.name, -PRUNE_EVERY_S) >= PRUNE_EVERY_S:
                async with database.transaction(conn):
                    cur = await conn.execute(
                        "DELETE FROM sweeperd.runs WHERE finished_at < now() - %s::interval",
                        (timedelta(seconds=self.config.keep),),
                    )
                self._pruned_at[database.name] = now
                if cur.rowcount:
                    log.info("history pruned", database=database.name, runs=cur.rowcount)
        self._broken.discard(database.name)

    def _report_failure(self, database: Database, exc: Exception) -> None:
        if database.name in self._broken:
            return
        self._broken.add(database.name)
        if is_insufficient_privilege(exc):
            log.error(
                "cannot write the run history: missing privileges",
                database=database.name,
                error=describe_error(exc),
                fix=f"GRANT CREATE ON DATABASE {database.dbname or '<database>'} TO "
                f"{database.user or '<sweeperd role>'}; (or create schema sweeperd for it, "
                "or set [history] enabled = false)",
            )
        else:
            log.error(
                "cannot write the run history", database=database.name, error=describe_error(exc)
            )


_DURATIONS = """
SELECT t.schema_name, t.target, last.duration_s
  FROM unnest(%s::text[], %s::text[]) AS t (schema_name, target)
 CROSS JOIN LATERAL (
       SELECT r.duration_s FROM sweeperd.results r
        WHERE r.operation = %s AND r.schema_name = t.schema_name AND r.target = t.target
          AND r.target IS NOT NULL AND r.status = 'ok' AND r.duration_s IS NOT NULL
        ORDER BY r.finished_at DESC
        LIMIT 1) AS last
"""


async def last_durations(
    conn: AsyncConn, operation: str, targets: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], float]:
    """How long each (schema, target) of ``operation`` took the last time it succeeded, from the
    run history (empty without one, or without the right to read it): what an expanding
    operation's ``Target.expected_s`` can be based on. One statement, an index lookup per
    target (``results_target``), however long the history."""
    if not targets:
        return {}
    cur = await conn.execute(
        "SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE')"
        " AND pg_catalog.has_table_privilege(c.oid, 'SELECT')"
        "  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'sweeperd' AND c.relname = 'results'"
    )
    row = await cur.fetchone()
    if not (row and row[0]):
        return {}
    schemas, names = [s for s, _ in targets], [t for _, t in targets]
    cur = await conn.execute(_DURATIONS, (schemas, names, operation))
    return {(schema, target): float(d) for schema, target, d in await cur.fetchall()}
