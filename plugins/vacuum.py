r'''Vacuum: ``VACUUM (ANALYZE, SKIP_LOCKED, …)`` of tenant tables, one operation per table.

    [plugins.vacuum]
    tables = ["notifications", "sessions"]   # operations vacuum.notifications, vacuum.sessions
    # tables = ['Events "x"', "a.b"]          # any PostgreSQL name, in the tenant's schema (a
    #                                         # dot is part of the name): vacuum."Events ""x""",
    #                                         # vacuum."a.b" (see sweeperd.model.quote_name)
    # tables = "auto"                         # vacuum.auto: every table of the tenant schemas
    #                                         # scored at plan time (sweeperd.urgency), one item
    #                                         # per table that needs work, most urgent first
    analyze = true
    skip_locked = true                        # a locked table is reported "skipped", not waited for
    buffer_usage_limit = "256MB"              # PostgreSQL 16+: ring buffer size for the vacuum
    min_dead_tuples = 1000                    # "auto" only, when written: the dead-tuple
    min_dead_ratio = 0.05                     # threshold is max(min_dead_tuples,
                                              # min_dead_ratio * tuples) instead of autovacuum's
    weights = { xid_age = 2 }                 # "auto" only: per score component (default 1)
    freeze_max_age = 150000000                # "auto" only: instead of autovacuum's thresholds
    multixact_freeze_max_age = 300000000
    estimate_mb_per_s = 50                    # "auto" only: duration estimate without history
    truncate = false                          # true: VACUUM may cut empty pages off the end of
                                              # a table, under ACCESS EXCLUSIVE (stalls the app,
                                              # cancels queries on hot standbys)
    skip_when_horizon_older_than = "10m"      # optional: skip while a transaction, slot or
                                              # prepared transaction held the xmin horizon longer

Options are gated by server version: SKIP_LOCKED and TRUNCATE need 12, BUFFER_USAGE_LIMIT and
SKIP_DATABASE_STATS need 16. Like ``vacuumdb``, per-table vacuums skip the database-wide
``datfrozenxid`` update (it scans pg_class and costs more than vacuuming a small table) and the
database-scope operation ``vacuum.database_stats`` runs ``VACUUM (ONLY_DATABASE_STATS)`` once per
database after every vacuum of the sweep. Retention (phase PRUNE) on a table finishes before its
vacuum (phase MAINTAIN): the core orders operations that share a table.

A table's operation is ``vacuum.<table>`` with the table spelled by
:func:`sweeperd.model.quote_name`: plain when it is letters, digits, ``_`` and ``-``, otherwise
double-quoted like a PostgreSQL identifier. Tables named ``auto`` or ``database_stats`` are
always quoted (``vacuum."auto"``), so they never collide with this plugin's own operations.

**Truncation.** A VACUUM that finds empty pages at the end of a table cuts them off, under an
ACCESS EXCLUSIVE lock: every query on the table waits meanwhile, and on hot standbys the replayed
lock cancels queries. Retention (a mass DELETE of the oldest rows) followed by a vacuum makes
exactly that layout. So table vacuums say ``TRUNCATE false`` unless ``truncate = true``: the space
stays the table's (new rows reuse it) instead of going back to the operating system. With
``truncate = true`` no TRUNCATE option is given at all, so a table's own ``vacuum_truncate``
reloption (``ALTER TABLE … SET (vacuum_truncate = false)``) still holds.

**The xmin horizon** (:mod:`sweeperd.horizon`). VACUUM cannot remove a row deleted after the
oldest snapshot still running: a long or ``idle in transaction`` session, a replication slot's
xmin, a prepared transaction, a standby's feedback. When a table vacuum leaves such tuples
("dead but not yet removable" in VACUUM VERBOSE's report: PostgreSQL 15+, and only where the
server's messages are in English; on 14 or with a localized ``lc_messages`` there is no horizon
report), its result carries ``details["horizon"]`` (``held_by``, ``age_s``, ``xmin_age``) and a
warning names the holder (each ``vacuum.auto`` item in its own result). With
``skip_when_horizon_older_than`` a vacuum is ``skipped`` (``details["horizon"]`` too; in a dry
run as well) while the oldest holder has held the horizon longer than that: it could not
remove what the holder still sees, and would only read the table for nothing. A holder whose age
is unknown (a replication slot in use, a standby's feedback, a backend whose details the role
may not see: ``GRANT pg_monitor``) never makes a vacuum skip. The holder is looked up once per
database and sweep (on the connection of the operation that needs it first; the others wait for
that answer), again when the answer is more than 60 s old; a failed lookup is logged once and the
vacuums go on without it.
'''

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import sweeperd
from sweeperd import sql
from sweeperd.durations import format_duration
from sweeperd.errors import describe_error
from sweeperd.history import last_durations
from sweeperd.horizon import Horizon, find_holder
from sweeperd.model import operation_name, quote_name
from sweeperd.settings import (
    NAMEDATALEN,
    At,
    Invalid,
    PositiveDuration,
    Problem,
    flag,
    integer,
    number,
    read,
    reader,
    text,
)
from sweeperd.urgency import COMPONENTS, PAGE, Knobs, score_tables, server_settings, table_rows

LOCK_NOT_AVAILABLE = "55P03"
# This plugin's own operations: a table of the same name gets a quoted operation name.
_OWN_OPERATIONS = {"auto", "database_stats"}
# The statistics functions on the table's oid, not the pg_stat_user_tables view: the view
# computes some twenty columns for every table of the database on each call.
_STATS_QUERY = """
    SELECT pg_catalog.pg_stat_get_dead_tuples(c.oid), pg_catalog.pg_stat_get_live_tuples(c.oid)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'm', 'p')
"""


class VacuumRefused(Exception):
    """VACUUM skipped the table for a reason other than a lock (typically privileges)."""


# -- settings: [plugins.vacuum] is a Settings, read by sweeperd.settings ---------------------------


@reader('a list of table names or "auto"')
def _tables(value: Any, at: At) -> tuple[str, ...] | None:
    if value == "auto":
        return None
    if not isinstance(value, list):
        raise Invalid('expected a list of table names or "auto"')
    seen: dict[str, int] = {}
    for i, table in enumerate(value):
        problem = _table_problem(table)
        if problem is not None:
            at.at(i).problem(problem)
        elif table in seen:
            at.at(i).problem(f"expected each table once, {table!r} is also tables[{seen[table]}]")
        else:
            seen[table] = i
    return tuple(value)


@reader("a table of weights such as { xid_age = 2, dead = 1 }")
def _weights(value: Any, at: At) -> Mapping[str, float]:
    if not isinstance(value, dict):
        raise Invalid(
            "expected a table of weights such as { xid_age = 2, dead = 1 } "
            f"(components: {', '.join(COMPONENTS)})"
        )
    out: dict[str, float] = {}
    for key, weight in value.items():
        if key not in COMPONENTS:
            at.at(key).problem(f"unknown component (expected one of: {', '.join(COMPONENTS)})")
        elif (
            not isinstance(weight, int | float) or isinstance(weight, bool) or not weight >= 0
        ) or weight == float("inf"):
            at.at(key).problem("expected a non-negative number")
        else:
            out[key] = float(weight)
    return out


# The kinds of values [plugins.vacuum] has, in this plugin's words.
Tables = Annotated[tuple[str, ...] | None, _tables]
Flag = Annotated[bool, flag(message="expected true or false")]
Size = Annotated[str, text(empty=True, message='expected a size string such as "256MB"')]
Count = Annotated[int, integer(minimum=0, message="expected a non-negative integer")]
Ratio = Annotated[float, number(minimum=0, maximum=1, message="expected a number between 0 and 1")]
Weights = Annotated[Mapping[str, float], _weights]
Age = Annotated[
    int,
    integer(
        minimum=1,
        maximum=2_000_000_000,
        message="expected a transaction age between 1 and 2000000000",
    ),
]


@dataclass(frozen=True, slots=True)
class Settings:
    tables: Tables = ()  # None: "auto"
    analyze: Flag = True
    skip_locked: Flag = True
    buffer_usage_limit: Size | None = None  # PostgreSQL 16+
    min_dead_tuples: Count = 1000  # "auto" only
    min_dead_ratio: Ratio = 0.05  # "auto" only: of the table's tuples (reltuples)
    truncate: Flag = False  # False: TRUNCATE false (no ACCESS EXCLUSIVE at the end of a vacuum)
    skip_when_horizon_older_than: PositiveDuration | None = None  # seconds
    # "auto" only: the urgency score (sweeperd.urgency). Weights per component, and thresholds
    # replacing the tables' and the server's autovacuum_(multixact_)freeze_max_age.
    weights: Weights = field(default_factory=dict)
    freeze_max_age: Age | None = None
    multixact_freeze_max_age: Age | None = None
    # A table with no vacuum in the run history is expected to take 50 ms plus its size at this
    # rate (for the maintenance window's fit).
    estimate_mb_per_s: Annotated[
        float, number(minimum=0.001, message="expected a positive number")
    ] = 50.0


# Settings of the urgency score: with a list of tables they would do nothing, silently.
_AUTO_ONLY = ("weights", "freeze_max_age", "multixact_freeze_max_age", "estimate_mb_per_s")


@sweeperd.hookimpl
def sweeperd_validate_settings(settings: Mapping[str, Any]) -> list[Problem]:
    s, problems = read(Settings, settings)
    if s is not None and s.tables is not None:
        problems = [
            (key, 'only with tables = "auto" (the urgency score); here it would do nothing')
            for key in _AUTO_ONLY
            if key in settings
        ]
    return problems


@sweeperd.hookimpl
def sweeperd_operations(settings: Mapping[str, Any]) -> list[sweeperd.Operation]:
    s, _problems = read(Settings, settings)
    if s is None or "tables" not in settings:
        return []
    ops = []
    if s.tables is None:
        ops.append(
            sweeperd.Operation(
                name="vacuum.auto",
                run=lambda ctx: _run_target(ctx, s),
                tables=(sweeperd.ALL_TABLES,),
                phase=sweeperd.Phase.MAINTAIN,
                db_operation="VACUUM",
                dry_run=True,
                description="VACUUM every tenant table past an autovacuum threshold, "
                "most urgent first across the fleet",
                expand=lambda plan: _expand_auto(plan, s),
            )
        )
    else:
        for table in s.tables:
            ops.append(_table_operation(table, s))
    ops.append(
        sweeperd.Operation(
            name="vacuum.database_stats",
            run=_run_database_stats,
            scope="database",
            phase=sweeperd.Phase.MAINTAIN,
            db_operation="VACUUM",
            after=("vacuum.*",),
            dry_run=True,
            description="VACUUM (ONLY_DATABASE_STATS) after the table vacuums (PG 16+)",
        )
    )
    return ops


def _table_problem(table: Any) -> str | None:
    """What is wrong with one entry of ``tables`` (None: it names a table PostgreSQL can hold).

    Any name PostgreSQL accepts is fine — spaces, quotes, dots, upper case, non-ASCII — since it
    only ever reaches SQL as an identifier; but the server cannot store a NUL, and it cuts a
    longer name to its first bytes, which would vacuum (or miss) a different table.
    """
    if not isinstance(table, str) or not table:
        return "expected a table name (a non-empty string)"
    if "\0" in table:
        return "expected a table name without NUL characters (PostgreSQL names cannot hold them)"
    try:
        size = len(table.encode("utf-8"))
    except UnicodeEncodeError:
        return f"expected a table name in valid Unicode, got {table!r}"
    if size > NAMEDATALEN:
        return (
            f"expected a table name of at most {NAMEDATALEN} bytes, got {size} "
            f"(PostgreSQL would cut it short and vacuum another table): {table!r}"
        )
    return None


def _table_operation(table: str, s: Settings) -> sweeperd.Operation:
    async def run(ctx: sweeperd.Context) -> int | None:
        assert ctx.tenant is not None
        await _skip_if_horizon_held(ctx, s)
        started = time.monotonic()
        removed, not_removable = await _vacuum(ctx, s, ctx.tenant.schema, table)
        await _report_horizon(ctx, not_removable, started)
        return removed

    return sweeperd.Operation(
        name=table_operation_name(table),
        run=run,
        tables=(table,),
        phase=sweeperd.Phase.MAINTAIN,
        db_operation="VACUUM",
        dry_run=True,
        description=f"VACUUM{' (ANALYZE)' if s.analyze else ''} {quote_name(table)}",
    )


def table_operation_name(table: str) -> str:
    '''``vacuum.<table>``: ``vacuum.events``, ``vacuum."Events ""x"""``, ``vacuum."auto"``.'''
    if table in _OWN_OPERATIONS:
        return f"vacuum.{quote_name(table, always=True)}"
    return operation_name("vacuum", table)


def vacuum_options(s: Settings, server_version: int) -> list[sql.Composable]:
    """The option list for this server; options it does not know are left out.

    TRUNCATE is :func:`truncate_option`'s (table vacuums only, never ONLY_DATABASE_STATS).
    """
    options: list[sql.Composable] = []
    if s.analyze:
        options.append(sql.SQL("ANALYZE"))
    if s.skip_locked and server_version >= 120000:
        options.append(sql.SQL("SKIP_LOCKED"))
    if server_version >= 160000:
        options.append(sql.SQL("SKIP_DATABASE_STATS"))
        if s.buffer_usage_limit:
            options.append(
                sql.SQL("BUFFER_USAGE_LIMIT {}").format(sql.Literal(s.buffer_usage_limit))
            )
    return options


def truncate_option(s: Settings, server_version: int) -> sql.Composable | None:
    """``TRUNCATE false`` unless ``truncate = true`` (PostgreSQL 12+); None: no option at all.

    Never ``TRUNCATE true``: with ``truncate = true`` the server decides, and a table's own
    ``vacuum_truncate = false`` reloption still holds.
    """
    if not s.truncate and server_version >= 120000:
        return sql.SQL("TRUNCATE false")
    return None


async def _dead_tuples(ctx: sweeperd.Context, schema: str, table: str) -> tuple[int, int] | None:
    cur = await ctx.conn.execute(_STATS_QUERY, (schema, table))
    row = await cur.fetchone()
    return (int(row[0]), int(row[1])) if row else None


# "tuples: 1000 removed, 4000 remain, 0 are dead but not yet removable" (VACUUM VERBOSE, 15+).
_TUPLES = re.compile(r"tuples: (\d+) removed, (\d+) remain, (\d+) are dead but not yet removable")
# Databases whose server messages are not in English (lc_messages): VERBOSE cannot be read
# there, so dead tuples come from the statistics instead (two more queries per table).
_UNREADABLE: set[str] = set()


async def _vacuum(
    ctx: sweeperd.Context, s: Settings, schema: str, table: str, *, freeze: bool = False
) -> tuple[int | None, int]:
    """Vacuum one table: (rows = dead tuples removed, dead tuples it could not remove yet).

    The counts come from VACUUM VERBOSE's own report (one round trip: as cheap as vacuumdb),
    or, where the server's messages cannot be read, from the statistics before and after; the
    tuples not yet removable are only known from the report (0 otherwise, and in a dry run).
    """
    verbose = ctx.server_version >= 150000 and ctx.database not in _UNREADABLE
    before: tuple[int, int] | None = None
    if ctx.dry_run or not verbose:
        # No statistics row means the table does not exist (or is not a plain table): VACUUM
        # below then reports it in PostgreSQL's own words (42P01).
        before = await _dead_tuples(ctx, schema, table)
        ctx.details["dead_tuples_before"] = before[0] if before else None
        if ctx.dry_run:
            return (before[0] if before else None), 0
    options = vacuum_options(s, ctx.server_version)
    if freeze:
        options.insert(0, sql.SQL("FREEZE"))  # past a freeze threshold: as anti-wraparound
    truncate = truncate_option(s, ctx.server_version)
    if truncate is not None:
        options.append(truncate)
    if verbose:
        options.insert(0, sql.SQL("VERBOSE"))
    statement = sql.SQL("VACUUM {}{}").format(
        sql.SQL("({}) ").format(sql.SQL(", ").join(options)) if options else sql.SQL(""),
        sql.Identifier(schema, table),
    )
    skipped: list[str] = []
    refused: list[str] = []
    counts: list[tuple[int, int, int]] = []

    def on_notice(diag: Any) -> None:
        # VACUUM does not raise for a table it will not touch: it emits a WARNING and moves on.
        # SKIP_LOCKED's "lock not available" (55P03) is a skip by policy; anything else it
        # skips (e.g. "permission denied to vacuum ..., skipping it") is a failure, or the table
        # would silently never be vacuumed while every report says ok.
        message = diag.message_primary or ""
        if diag.sqlstate == LOCK_NOT_AVAILABLE:
            skipped.append(message or "lock not available")
        elif diag.severity_nonlocalized == "WARNING" and "skipping" in message:
            refused.append(message or "VACUUM skipped the table")
        # The message quotes the table's name, which may itself read like a "tuples:" line
        # (a name is anything up to 63 bytes): it is left out before the counts are read.
        elif verbose and (found := _TUPLES.search(message.replace(f"{schema}.{table}", ""))):
            counts.append((int(found[1]), int(found[2]), int(found[3])))

    ctx.conn.add_notice_handler(on_notice)
    try:
        await ctx.conn.execute(statement)
    finally:
        ctx.conn.remove_notice_handler(on_notice)
    if refused:
        raise VacuumRefused(refused[0])
    if skipped:
        raise sweeperd.Skip(skipped[0])
    if verbose and counts:
        removed, _remain, not_removable = counts[0]  # the table's own heap comes first
        ctx.details["dead_tuples_before"] = removed + not_removable
        ctx.details["dead_tuples_after"] = not_removable
        return removed, not_removable
    if verbose:
        _UNREADABLE.add(ctx.database)  # localized messages: use the statistics from now on
        ctx.log.info("VACUUM VERBOSE output not readable (lc_messages?); using statistics")
    after = await _dead_tuples(ctx, schema, table)
    ctx.details["dead_tuples_after"] = after[0] if after else None
    if before is None or after is None:
        return None, 0
    return max(0, before[0] - after[0]), 0


# -- the xmin horizon: asked once per database and sweep, shared through ctx.shared ---------------

HORIZON_KEY: Final = "vacuum.horizon"
HORIZON_FRESH_S: Final = 60.0  # an older answer is asked again (long sweeps)


class _Answer:
    """What a horizon lookup that did not end in a holder (or None) resolves to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_FAILED: Final = _Answer("failed")  # the query failed: logged once, no horizon for this run
_ASK_AGAIN: Final = _Answer("ask again")  # the asking operation was cancelled mid-query


@dataclass(slots=True)
class _Lookup:
    """One lookup of the horizon (the value of ``ctx.shared["vacuum.horizon"]``).

    ``answer`` is resolved by the operation that asked, with the query on its own connection;
    the others await it (single flight). ``explains``: asked because a vacuum left dead tuples
    behind, so a "nothing holds it" answer stands for those that follow too.
    """

    answer: asyncio.Future[Horizon | _Answer | None]
    asked_at: float  # time.monotonic()
    explains: bool

    def fresh(self, now: float) -> bool:
        failed = self.answer.done() and self.answer.result() is _FAILED
        return failed or now - self.asked_at < HORIZON_FRESH_S


async def _horizon(ctx: sweeperd.Context, *, since: float | None = None) -> Horizon | None:
    """The database's oldest holder of the xmin horizon (None: none, or the lookup failed).

    ``since``: when the vacuum started whose leftover dead tuples are to be explained; an
    answer of "nothing holds it" given before then may be out of date and is asked again.
    """
    while True:
        now = time.monotonic()
        lookup = ctx.shared.get(HORIZON_KEY)
        if isinstance(lookup, _Lookup) and lookup.fresh(now):
            # shield: a waiter's cancellation must not cancel the answer the others wait for.
            answer = await asyncio.shield(lookup.answer)
            if answer is _ASK_AGAIN:
                continue
            asked_before = since is not None and lookup.asked_at < since
            if answer is None and asked_before and not lookup.explains:
                # Nothing held it before this vacuum began, yet it left dead tuples: ask anew.
                if ctx.shared.get(HORIZON_KEY) is lookup:
                    del ctx.shared[HORIZON_KEY]
                continue
            return answer if isinstance(answer, Horizon) else None
        mine = _Lookup(asyncio.get_running_loop().create_future(), now, explains=since is not None)
        ctx.shared[HORIZON_KEY] = mine
        try:
            holder = await find_holder(ctx.conn)
        except Exception as exc:
            # Never this vacuum's failure: it goes on without the horizon, and so do the
            # others of this run (the answer stays "failed"; asked once, logged once).
            ctx.log.warning("could not look up the xmin horizon", error=describe_error(exc))
            mine.answer.set_result(_FAILED)
            return None
        except BaseException:
            # Cancelled mid-query (its operation timed out, the sweep stops): whoever waits
            # for this answer asks again on its own connection.
            if ctx.shared.get(HORIZON_KEY) is mine:
                del ctx.shared[HORIZON_KEY]
            mine.answer.set_result(_ASK_AGAIN)
            raise
        mine.answer.set_result(holder)
        return holder


async def _skip_if_horizon_held(ctx: sweeperd.Context, s: Settings) -> None:
    """Raise Skip when ``skip_when_horizon_older_than`` is set and the holder is older."""
    limit = s.skip_when_horizon_older_than
    if limit is None:
        return
    horizon = await _horizon(ctx)
    if horizon is None or horizon.age_s is None or horizon.age_s <= limit:
        return
    ctx.details["horizon"] = horizon.to_json()  # the runner keeps details of a skip
    raise sweeperd.Skip(
        f"xmin horizon held by {horizon.held_by} for {format_duration(horizon.age_s)} "
        f'(skip_when_horizon_older_than = "{format_duration(limit)}"): '
        "VACUUM could not remove the newest dead tuples"
    )


async def _report_horizon(ctx: sweeperd.Context, not_removable: int, since: float) -> None:
    """Name the holder of the horizon when a vacuum left dead tuples it could not remove."""
    if not_removable <= 0:
        return
    horizon = await _horizon(ctx, since=since)
    if horizon is None:
        return
    ctx.details["horizon"] = horizon.to_json()
    ctx.log.warning(
        "dead tuples not removable: the xmin horizon is held",
        held_by=horizon.held_by,
        age_s=horizon.to_json()["age_s"],
        not_removable=not_removable,
    )


def _knobs(s: Settings, settings_given: Mapping[str, Any]) -> Knobs:
    return Knobs(
        weights=s.weights,
        xid_age=s.freeze_max_age,
        mxid_age=s.multixact_freeze_max_age,
        # Written in the configuration: they replace autovacuum's dead-tuple threshold.
        dead_min=s.min_dead_tuples if "min_dead_tuples" in settings_given else None,
        dead_ratio=s.min_dead_ratio if "min_dead_ratio" in settings_given else None,
        analyze=s.analyze,
    )


async def _expand_auto(plan: sweeperd.PlanContext, s: Settings) -> list[sweeperd.Target]:
    """Every table of every selected tenant of this database, scored (two catalog queries and
    one on the run history, whatever the number of tenants); one target per table that needs
    work, the rest counted as not needed."""
    by_schema = {t.schema: t for t in plan.tenants}
    schemas = sorted(by_schema)
    if not schemas:
        return []
    server = await server_settings(plan.conn)
    rows = await table_rows(plan.conn, schemas)
    scored = score_tables(rows, server, _knobs(s, plan.settings), needed_only=True)
    plan.not_needed += len(rows) - len(scored)
    took = await last_durations(
        plan.conn, plan.operation.name, [(t.schema, t.table) for t in scored]
    )
    pages_per_s = s.estimate_mb_per_s * 1024 * 1024 / PAGE
    targets = []
    for t in scored:
        targets.append(
            sweeperd.Target(
                tenant=by_schema[t.schema],
                name=t.table,
                tables=(t.table,),
                score=t.score,
                details={
                    "table": t.table,
                    "score": round(t.score, 4),
                    "reasons": t.reasons(),
                    "freeze": t.freeze,
                    **({"failsafe": True} if t.failsafe else {}),
                },
                params={"freeze": t.freeze},
                # Past the failsafe age nothing is too long for the window: wraparound is.
                expected_s=None
                if t.failsafe
                else took.get((t.schema, t.table)) or t.estimate_s(pages_per_s),
            )
        )
    return targets


async def _run_target(ctx: sweeperd.Context, s: Settings) -> int | None:
    """One table vacuum.auto chose at plan time (``ctx.target``), with FREEZE where it is due."""
    assert ctx.tenant is not None
    if ctx.target is None:
        # Not expanded (the plan could not ask this database): nothing is known to need work.
        raise sweeperd.Skip("no table was chosen for this tenant when the sweep was planned")
    await _skip_if_horizon_held(ctx, s)
    started = time.monotonic()
    freeze = bool(ctx.target.params.get("freeze"))
    removed, not_removable = await _vacuum(
        ctx, s, ctx.tenant.schema, ctx.target.name, freeze=freeze
    )
    await _report_horizon(ctx, not_removable, started)
    return removed


async def _run_database_stats(ctx: sweeperd.Context) -> None:
    if ctx.server_version < 160000:
        raise sweeperd.Skip("VACUUM (ONLY_DATABASE_STATS) needs PostgreSQL 16 or newer")
    if ctx.dry_run:
        return None
    await ctx.conn.execute("VACUUM (ONLY_DATABASE_STATS)")
    return None
