"""Retention: delete rows older than a cutoff, in small committed batches.

Each ``[[plugins.retention.rules]]`` entry becomes the operation ``retention.<name>``::

    [[plugins.retention.rules]]
    name = "notifications"        # operation retention.notifications
    table = "notifications"       # in each tenant's schema (scope "tenant", the default)
    column = "created_at"         # timestamp (or date) column compared with the cutoff
    older_than = "90d"
    batch_size = 5000             # rows per committed batch (default 5000)
    match = { status = "done" }   # optional equality filters, values bound as parameters
    max_rows = 1000000            # optional cap per run
    pause = "100ms"               # optional pause between batches (lets replicas keep up)
    lock_timeout = "2s"           # optional per-rule overrides of the database's timeouts
    statement_timeout = "1min"
    missing = "fail"              # or "skip": a tenant without the table is skipped, not failed
    timezone = "UTC"              # required when the column is timestamp WITHOUT time zone or
                                  # date: the zone its values are written in
    scope = "database"            # once per database instead; then `schema` is required

How a batch works: ``SELECT ctid … WHERE column < cutoff … ORDER BY column LIMIT n FOR UPDATE
SKIP LOCKED`` feeds a ``DELETE … WHERE ctid = ANY(…) AND column < cutoff`` in one statement, in a
transaction of its own whose ``lock_timeout``/``statement_timeout`` (the rule's, else the
database's) are ``SET LOCAL``: they hold behind any connection pooler and never outlive the batch.
Each batch takes the oldest expired rows (by the cutoff column; among rows with the same value, any
of them), so ``max_rows`` and a cancelled run remove the oldest. A btree index leading with the
column lets each batch read just the rows it deletes; without one every batch scans the table and
sorts all its expired rows (sweeperd warns once, with the ``CREATE INDEX`` that fixes it). A
partitioned or inherited table is ordered across all its partitions: a batch locks the oldest
rows of the whole table, then deletes them partition by partition in the same transaction. A crash
or cancel keeps the batches already committed, rows locked by the application are skipped rather
than waited for, and the cutoff is re-checked at delete time. Before every batch after the first
the operation yields to the database's health gates and pauses (``ctx.throttle()``): no batch
starts while a standby lags or the database is paused, and no transaction is held open meanwhile.
The
cutoff is computed once per run from the server's clock, so rows ageing past it during the run are
not chased. There is no free-form ``where``: raw SQL in a config file would be an injection hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple

import sweeperd
from sweeperd import sql
from sweeperd.durations import EXPECTATION, format_duration, parse_duration
from sweeperd.settings import (
    At,
    Invalid,
    Problem,
    Reader,
    array,
    choice,
    integer,
    reader,
    rules,
    table,
    text,
    zone,
)
from sweeperd.validation import MAX_PG_TIMEOUT_MS

# Cutoff column types that carry no time zone: their values mean nothing without one.
_NAIVE_TYPES = ("timestamp without time zone", "date")
DEFAULT_BATCH_SIZE = 5000
MAX_BATCH_SIZE = 1_000_000
PROGRESS_EVERY_S = 5.0
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SCALARS = (str, int, float, bool, dt.datetime, dt.date, dt.time)


# -- settings: each rule is a Rule, read by sweeperd.settings (keys, defaults, the readers below) --


@reader(EXPECTATION)
def _duration(value: Any, at: At) -> float:
    if not isinstance(value, str):
        raise Invalid(f"expected {EXPECTATION}, got {value!r}")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None  # the form, or the range (durations.MAX_SECONDS)


@reader(EXPECTATION)
def _timeout(value: Any, at: At) -> float:
    seconds = _duration(value, at)
    if seconds * 1000 > MAX_PG_TIMEOUT_MS:
        raise Invalid("expected at most 24d20h31m23s (PostgreSQL's limit)")
    return seconds


@reader("a table of column = value")
def _match(value: Any, at: At) -> tuple[tuple[str, Any], ...]:
    """Equality filters, values bound as parameters."""
    if not isinstance(value, dict):
        raise Invalid('expected a table of column = value, e.g. { status = "done" }')
    for column, wanted in value.items():
        if not isinstance(wanted, _SCALARS):
            at.at(column).problem("expected a string, number, boolean or date")
    return tuple(sorted(value.items()))


def _said(expected: str) -> Callable[[Any], str]:
    return lambda value: f"expected {expected}, got {value!r}"


# The kinds of values a rule has, in this plugin's words.
Text = Annotated[str, text(message="required: a non-empty string")]
Duration = Annotated[float, _duration]
Timeout = Annotated[float, _timeout]
BatchSize = Annotated[
    int,
    integer(
        minimum=1,
        maximum=MAX_BATCH_SIZE,
        message=_said(f"a positive integer up to {MAX_BATCH_SIZE}"),
    ),
]
Count = Annotated[int, integer(minimum=1, message=_said("a positive integer"))]
Missing = Annotated[str, choice("fail", "skip", message=_said('"fail" or "skip"'))]
Zone = Annotated[str, zone(message=_said('an IANA time zone such as "UTC"'))]
Scope = Annotated[
    Literal["tenant", "database"],
    choice("tenant", "database", message=_said('"tenant" or "database"')),
]
# Taken as written: _schema_goes_with_scope says what it must be.
Schema = Annotated[str, Reader(lambda value, at: value, "the schema holding the table")]


def _operation_name(rule: Mapping[str, Any], at: At) -> None:
    """A rule (sweeperd.settings.rules): the name becomes the operation retention.<name>."""
    if "name" in rule and not _NAME.fullmatch(rule["name"]):
        at.at("name").problem("expected letters, digits, '_' or '-' (it becomes retention.<name>)")


def _schema_goes_with_scope(rule: Mapping[str, Any], at: At) -> None:
    """A rule: a database-scope rule names its schema; a tenant rule uses the tenant's."""
    schema = rule.get("schema")
    if rule.get("scope") == "database" and not (isinstance(schema, str) and schema):
        at.at("schema").problem('required with scope = "database": the schema holding the table')
    elif rule.get("scope") == "tenant" and "schema" in at.raw:
        at.at("schema").problem(
            'only allowed with scope = "database" (tenant rules use the tenant schema)'
        )


@rules(_operation_name, _schema_goes_with_scope)
@dataclass(frozen=True, slots=True)
class Rule:
    name: Text
    table: Text
    column: Text
    older_than: Duration
    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    match: Annotated[tuple[tuple[str, Any], ...], _match] = ()
    max_rows: Count | None = None
    pause: Duration = 0.0
    lock_timeout: Timeout | None = None
    statement_timeout: Timeout | None = None
    missing: Missing = "fail"
    timezone: Zone | None = None
    scope: Scope = "tenant"
    schema: Schema | None = None
    # Tables already warned about (no index leading with the cutoff column): once per run of
    # the daemon per rule, not once per tenant.
    warned: set[str] = field(default_factory=set, init=False, compare=False, repr=False)


def _unique_names() -> Callable[[int, Mapping[str, Any], At], None]:
    seen: set[str] = set()

    def check(i: int, rule: Mapping[str, Any], at: At) -> None:
        name = rule.get("name")
        if name is not None:
            if name in seen:
                at.at(i).at("name").problem(f"expected a unique rule name, {name!r} is used twice")
            seen.add(name)

    return check


_RULES = array(
    table(Rule, message="expected a table"),
    message="expected an array of tables [[plugins.retention.rules]]",
    each=_unique_names,
)


def _read(settings: Mapping[str, Any]) -> tuple[tuple[Rule, ...], list[Problem]]:
    """``[plugins.retention]``: its rules, and every problem with them."""
    at = At(raw=settings)
    for key in settings:
        if key != "rules":
            at.at(key).problem("unknown key (expected: rules)")
    return at.get("rules", _RULES) or (), at.problems


@sweeperd.hookimpl
def sweeperd_validate_settings(settings: Mapping[str, Any]) -> list[Problem]:
    return _read(settings)[1]


@sweeperd.hookimpl
def sweeperd_operations(settings: Mapping[str, Any]) -> list[sweeperd.Operation]:
    return [_operation(rule) for rule in _read(settings)[0]]


def _operation(rule: Rule) -> sweeperd.Operation:
    table = f"{rule.schema}.{rule.table}" if rule.scope == "database" else rule.table

    async def run(ctx: sweeperd.Context) -> int:
        return await _run(ctx, rule)

    return sweeperd.Operation(
        name=f"retention.{rule.name}",
        run=run,
        tables=(table,),
        scope=rule.scope,
        phase=sweeperd.Phase.PRUNE,
        db_operation="DELETE",
        dry_run=True,
        description=f"delete rows of {table} whose {rule.column} is older than "
        f"{format_duration(rule.older_than)}",
    )


def _target(ctx: sweeperd.Context, rule: Rule) -> tuple[str, str]:
    schema = ctx.tenant.schema if ctx.tenant is not None else rule.schema
    assert schema is not None  # validated: database-scope rules name their schema
    return schema, rule.table


async def _run(ctx: sweeperd.Context, rule: Rule) -> int:
    schema, table = _target(ctx, rule)
    found = await _members(ctx, rule, schema, table)
    if found is None:
        raise sweeperd.Skip(f'table "{schema}"."{table}" does not exist (missing = "skip")')
    members, column_type = found
    age = dt.timedelta(seconds=rule.older_than)
    if column_type in _NAIVE_TYPES:
        if rule.timezone is None:
            raise ValueError(
                f'column {rule.column} of "{schema}"."{table}" is {column_type} (no time zone): '
                f'set timezone = "<zone its values are in>" (e.g. "UTC") on rule {rule.name!r}; '
                "comparing it with the server's clock in the session's zone could delete rows "
                "that have not expired yet"
            )
        # The cutoff in the column's own terms: wall-clock time in the zone its values use.
        cur = await ctx.conn.execute(
            "SELECT (now() AT TIME ZONE %s) - %s::interval", (rule.timezone, age)
        )
    else:
        cur = await ctx.conn.execute("SELECT now() - %s::interval", (age,))
    row = await cur.fetchone()
    assert row is not None
    cutoff = row[0]
    ctx.details["cutoff"] = cutoff.isoformat()
    conn = ctx.conn
    filters = _conditions(conn, rule)
    params: dict[str, Any] = {"cutoff": cutoff} | _match_params(rule)

    if ctx.dry_run:
        count = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            param_safe(conn, sql.Identifier(schema, table)), filters
        )
        async with _transaction(ctx, rule):
            cur = await ctx.conn.execute(count, params)
            row = await cur.fetchone()
        would = int(row[0]) if row else 0
        return min(would, rule.max_rows) if rule.max_rows else would

    progress = _Progress(ctx, rule)
    try:
        if len(members) == 1:
            await _prune(ctx, rule, members[0], params, progress)
        elif members:
            await _prune_across(ctx, rule, (schema, table), members, params, progress)
    finally:
        if ctx.server_version >= 150000 and progress.deleted:
            # PostgreSQL flushes table statistics up to a second after a transaction; without
            # this the VACUUM that follows may not see the dead tuples it is about to remove.
            await ctx.conn.execute("SELECT pg_catalog.pg_stat_force_next_flush()")
    return progress.deleted


def _conditions(conn: Any, rule: Rule) -> sql.Composable:
    """What makes a row expired: ``column < %(cutoff)s`` and the rule's ``match`` equalities.

    Rendered for a query with parameters (``%`` in names doubled); the values are bound as
    ``%(cutoff)s`` and ``%(m0)s``, ``%(m1)s``… (:func:`_match_params`).
    """
    return sql.SQL(" AND ").join(
        [sql.SQL("{} < %(cutoff)s").format(param_safe(conn, sql.Identifier(rule.column)))]
        + [
            sql.SQL("{} = %({})s").format(param_safe(conn, sql.Identifier(col)), sql.SQL(f"m{i}"))
            for i, (col, _value) in enumerate(rule.match)
        ]
    )


def _match_params(rule: Rule) -> dict[str, Any]:
    return {f"m{i}": value for i, (_col, value) in enumerate(rule.match)}


def _oldest_first(conn: Any, rule: Rule) -> sql.Composable:
    """``ORDER BY column``: a batch takes the oldest expired rows.

    Ascending with PostgreSQL's default NULLS LAST, which a plain btree index on the column
    yields read forwards (and a ``DESC`` one read backwards), so the scan stops after ``limit``
    rows instead of sorting every expired one. NULLs never satisfy ``column < cutoff``, so where
    they sort changes nothing else. No tie-breaker: rows with the same value are equally old, and
    a second key (ctid, say) would make PostgreSQL sort every run of equal values, the one a bulk
    import wrote with a single timestamp included.
    """
    return sql.SQL("ORDER BY {}").format(param_safe(conn, sql.Identifier(rule.column)))


def batch_statement(conn: Any, rule: Rule, table: sql.Identifier) -> sql.Composed:
    """One batch on one plain table, in one statement (parameters ``cutoff``, ``m<i>``, ``limit``).

    ONLY: a ctid identifies a row within one table. The inner SELECT locks the rows it takes
    (SKIP LOCKED: the application's locked rows are left for a later run) and the DELETE re-checks
    the conditions on the rows it finds there.
    """
    return sql.SQL(
        "DELETE FROM ONLY {t} WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM ONLY {t} WHERE {f} {o} LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) AND {f}"
    ).format(t=param_safe(conn, table), f=_conditions(conn, rule), o=_oldest_first(conn, rule))


def pick_statement(conn: Any, rule: Rule, root: sql.Identifier) -> sql.Composed:
    """A batch's rows of a partitioned or inherited table: the oldest of all its tables, locked.

    Parameters ``cutoff``, ``m<i>``, ``limit`` and ``members`` (the oids of the plain tables to
    prune: a foreign partition's rows, which no DELETE here would remove, are never taken). With an
    index on every partition PostgreSQL merges their index scans in order (Merge Append).
    """
    return sql.SQL(
        "SELECT tableoid, ctid FROM {t} WHERE {f} AND tableoid = ANY(%(members)s::oid[]) {o}"
        " LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    ).format(t=param_safe(conn, root), f=_conditions(conn, rule), o=_oldest_first(conn, rule))


class _Progress:
    """Rows and batches so far, across the members of a partitioned or inherited table."""

    def __init__(self, ctx: sweeperd.Context, rule: Rule) -> None:
        self.ctx, self.rule = ctx, rule
        self.deleted = self.batches = 0
        self.last_log = time.monotonic()

    @property
    def exhausted(self) -> bool:
        return self.rule.max_rows is not None and self.deleted >= self.rule.max_rows

    def next_limit(self) -> int:
        if self.rule.max_rows is None:
            return self.rule.batch_size
        return min(self.rule.batch_size, self.rule.max_rows - self.deleted)

    def add(self, rows: int) -> None:
        self.deleted += rows
        self.batches += 1
        self.ctx.details["batches"] = self.batches
        # Committed so far: reported even if the operation is cancelled or times out later.
        self.ctx.details["rows"] = self.deleted
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_EVERY_S:
            self.ctx.log.info("retention progress", rows=self.deleted, batches=self.batches)
            self.last_log = now


async def _prune(
    ctx: sweeperd.Context,
    rule: Rule,
    member: _Member,
    params: dict[str, Any],
    progress: _Progress,
) -> None:
    """Delete in batches from a plain table (or the only partition of a partitioned one)."""
    delete = batch_statement(ctx.conn, rule, sql.Identifier(member.schema, member.name))
    while True:
        limit = progress.next_limit()
        if limit <= 0:
            return
        async with _transaction(ctx, rule):
            cur = await ctx.conn.execute(delete, params | {"limit": limit})
        progress.add(cur.rowcount)
        if cur.rowcount < limit or progress.exhausted:
            return  # a short batch: nothing older than the cutoff is left (or it is all locked)
        if rule.pause:
            await asyncio.sleep(rule.pause)
        await ctx.throttle()  # no next batch while the database is throttled or paused


async def _prune_across(
    ctx: sweeperd.Context,
    rule: Rule,
    root: tuple[str, str],
    members: list[_Member],
    params: dict[str, Any],
    progress: _Progress,
) -> None:
    """Delete in batches from a partitioned or inherited table, oldest first across its tables.

    Pruning one table after the other would take the oldest rows of whichever came first; so
    each batch locks the oldest rows of the whole table, then deletes them table by table (ONLY:
    a ctid identifies a row within one table), all in the batch's one transaction.
    """
    pick = pick_statement(ctx.conn, rule, sql.Identifier(*root))
    deletes = {
        m.oid: sql.SQL("DELETE FROM ONLY {} WHERE ctid = ANY(%(ctids)s::tid[]) AND {}").format(
            param_safe(ctx.conn, sql.Identifier(m.schema, m.name)), _conditions(ctx.conn, rule)
        )
        for m in members
    }
    oids = [m.oid for m in members]
    while True:
        limit = progress.next_limit()
        if limit <= 0:
            return
        deleted = 0
        async with _transaction(ctx, rule):
            cur = await ctx.conn.execute(pick, params | {"limit": limit, "members": oids})
            picked = await cur.fetchall()
            by_table: dict[int, list[str]] = {}
            for oid, ctid in picked:
                by_table.setdefault(oid, []).append(ctid)
            for oid, ctids in by_table.items():
                cur = await ctx.conn.execute(deletes[oid], params | {"ctids": ctids})
                deleted += cur.rowcount
        progress.add(deleted)
        if len(picked) < limit or progress.exhausted:
            return  # a short batch: nothing older than the cutoff is left (or it is all locked)
        if rule.pause:
            await asyncio.sleep(rule.pause)
        await ctx.throttle()  # no next batch while the database is throttled or paused


def param_safe(conn: Any, composable: sql.Composable) -> sql.Composable:
    """``composable`` rendered with any ``%`` doubled, for queries that also carry parameters.

    psycopg reads ``%`` inside quoted names as the start of a placeholder, so a legitimate
    schema such as ``tenant_50%off`` would break the query (never inject: it fails).
    """
    return sql.SQL(composable.as_string(conn).replace("%", "%%"))


def _transaction(ctx: sweeperd.Context, rule: Rule) -> contextlib.AbstractAsyncContextManager[Any]:
    """One batch's transaction, under the rule's timeouts where it sets them."""
    return ctx.transaction(lock_timeout=rule.lock_timeout, statement_timeout=rule.statement_timeout)


class _Member(NamedTuple):
    """A plain table holding rows of the rule's table (the table itself, a partition, a child)."""

    oid: int
    schema: str
    name: str


# Per plain table of the tree: whether an index can hand a batch its oldest rows in order, so that
# the scan stops after `limit` rows. That takes a btree (the only kind with an order PostgreSQL
# can scan) that is valid (not a failed or unfinished CREATE INDEX CONCURRENTLY), not partial (a
# batch's rows need not satisfy its predicate), leading with the column itself (not an expression
# of it), in an order whose forward or backward scan is ascending with NULLs last (indoption 0:
# ASC NULLS LAST, 3: DESC NULLS FIRST). Key columns before it must be columns of the rule's
# `match` (fixed values in every batch): (tenant_id, created_at) orders a batch of one tenant_id.
_MEMBERS = """
    WITH RECURSIVE root AS (
        SELECT c.oid, c.relkind FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND c.relkind IN ('r', 'p')
    ), tree AS (
        SELECT oid FROM root
        UNION ALL
        SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid
    )
    SELECT (SELECT relkind FROM root), c.oid, n.nspname, c.relname,
           EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                     JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                     JOIN pg_catalog.pg_am am ON am.oid = ic.relam
                     CROSS JOIN LATERAL generate_series(0, i.indnkeyatts - 1) AS k
                     JOIN pg_catalog.pg_attribute a
                       ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k]
                    WHERE i.indrelid = c.oid AND a.attname = %(column)s
                      AND am.amname = 'btree' AND i.indisvalid AND i.indpred IS NULL
                      AND i.indoption[k] IN (0, 3)
                      AND k = (SELECT count(*) FROM generate_series(0, k - 1) AS j
                                 JOIN pg_catalog.pg_attribute b
                                   ON b.attrelid = i.indrelid AND b.attnum = i.indkey[j]
                                WHERE b.attname = ANY (%(match)s::text[]))),
           (SELECT pg_catalog.format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = (SELECT oid FROM root) AND a.attname = %(column)s
               AND NOT a.attisdropped)
      FROM (SELECT 1) AS one
      LEFT JOIN (tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid AND c.relkind = 'r'
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace) ON true
     ORDER BY n.nspname, c.relname
"""


async def _members(
    ctx: sweeperd.Context, rule: Rule, schema: str, table: str
) -> tuple[list[_Member], str | None] | None:
    """The plain tables holding the rows (the table itself, or its partitions/children) and the
    cutoff column's type.

    None if the table is missing and the rule says skip; warns once about a missing index.
    """
    match = [column for column, _value in rule.match]
    cur = await ctx.conn.execute(
        _MEMBERS, {"schema": schema, "table": table, "column": rule.column, "match": match}
    )
    rows = await cur.fetchall()
    relkind = rows[0][0] if rows else None
    if relkind is None:
        if rule.missing == "skip":
            return None
        # "fail": let PostgreSQL report UndefinedTable (42P01) in its own words.
        return [_Member(0, schema, table)], None
    column_type = rows[0][5]
    members = [_Member(r[1], r[2], r[3]) for r in rows if r[1] is not None]
    unindexed = [m for m, r in zip(members, rows, strict=False) if not r[4]]
    if unindexed and rule.table not in rule.warned:
        rule.warned.add(rule.table)
        # The match columns first: a multi-tenant table wants (tenant_id, created_at).
        column = sql.SQL(", ").join(sql.Identifier(c) for c in [*match, rule.column])
        if relkind == "p":
            # A plain CREATE INDEX on a partitioned table cascades to every partition (and
            # CONCURRENTLY is refused there).
            fixes = [
                sql.SQL("CREATE INDEX ON {} ({})").format(sql.Identifier(schema, table), column)
            ]
        else:
            # On an inheritance parent an index covers the parent only: one per table lacking it.
            fixes = [
                sql.SQL("CREATE INDEX CONCURRENTLY ON {} ({})").format(
                    sql.Identifier(m.schema, m.name), column
                )
                for m in unindexed
            ]
        ctx.log.warning(
            # Without an ordered index, LIMIT cannot stop a scan early: to find the oldest rows
            # PostgreSQL must read and sort every expired one, in every batch.
            "no index leads with the retention column: every batch scans the table and sorts all"
            " its expired rows to take the oldest",
            table=f"{schema}.{table}",
            column=rule.column,
            fix="; ".join(f.as_string(ctx.conn) for f in fixes),
        )
    return members, column_type
