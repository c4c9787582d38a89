"""``sweeperd status``: the latest run per sweep, its failures, each operation's last success,
read from the run history that :mod:`sweeperd.history` writes; and, from ``sweeperd.claims``
(:mod:`sweeperd.claimer`), who did which tenants of each sweep's latest firing."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .claimer import DATABASE_SCOPE
from .config import Config
from .databases import open_databases
from .db import AsyncConn, Database
from .durations import format_duration
from .errors import describe_error, is_insufficient_privilege
from .pause import EXISTS, Pause
from .pause import read as read_pause
from .throttle import Signal, Throttle


def glob_to_regex(glob: str) -> str:
    """A shell glob as an anchored PostgreSQL regular expression, meaning what ``fnmatch`` does.

    ``sweep --tenant`` matches with fnmatch; ``status --tenant`` filters in SQL, so the same
    glob (``*``, ``?``, ``[ab]``, ``[!ab]``) is translated rather than approximated with LIKE.
    """
    out = ["^"]
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        i += 1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")  # no closing bracket: a literal "["
                continue
            body = glob[i:j].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
            i = j + 1
        elif ch.isalnum() or ch == "_":
            out.append(ch)
        else:
            out.append("\\" + ch)
    out.append("$")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Collected:
    """What ``sweeperd status`` read: the runs, each operation's last success, the databases that
    could not be read (name → why), the pauses in force (name → pause) and the databases whose
    pause could not be read (name → why; their run history still could), and the claims of
    each sweep's latest firing."""

    runs: list[StatusRow]
    last_ok: list[dict[str, Any]]
    unreachable: dict[str, str]
    paused: dict[str, Pause] = field(default_factory=dict)
    pause_unknown: dict[str, str] = field(default_factory=dict)
    # The health gates of the databases that set any, as read now.
    gates: dict[str, Gates] = field(default_factory=dict)
    claims: ClaimsStatus = field(default_factory=lambda: ClaimsStatus())


@dataclass(frozen=True, slots=True)
class Gates:
    """One database's ``[throttle]`` gates as ``status`` read them: each readable signal against
    its limit, and the gates that could not be read (key → why; sweeps treat them as open)."""

    signals: tuple[Signal, ...]
    unavailable: dict[str, str]

    def describe(self) -> str:
        parts = []
        if self.signals:
            parts.append(", ".join(s.describe() for s in self.signals))
        if self.unavailable:
            parts.append(
                "not read (treated as open): "
                + ", ".join(f"{key} ({why})" for key, why in sorted(self.unavailable.items()))
            )
        over = any(s.over for s in self.signals)
        return ("over a limit: " if over else "") + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "signals": [
                {
                    "key": s.gate.key,
                    "value": s.value,
                    "limit": s.limit,
                    "over": s.over,
                    "what": s.what,
                }
                for s in self.signals
            ],
            "unavailable": dict(sorted(self.unavailable.items())),
        }


async def collect(
    config: Config,
    *,
    sweep: str | None,
    tenant: str | None,
    failed_only: bool,
    full: bool = False,
) -> Collected:
    """Read every database at once. ``full``: the claims' tenant lists in full (for JSON);
    otherwise only as many names as the text shows are fetched."""
    databases, unreachable = await open_databases(config, list(config.databases))
    try:
        # As sweep --tenant: the glob, or a tenant's exact name (glob characters and all).
        pattern = f"^{re.escape(tenant)}$|{glob_to_regex(tenant)}" if tenant else None
        outcomes = await asyncio.gather(
            *(
                _database_status(
                    db, sweep=sweep, tenant_regex=pattern, failed_only=failed_only, full=full
                )
                for db in databases.values()
            ),
            return_exceptions=True,
        )
        found = []
        paused: dict[str, Pause] = {}
        pause_unknown: dict[str, str] = {}
        gates: dict[str, Gates] = {}
        claims = ClaimsStatus()
        for name, outcome in zip(databases, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                # e.g. no USAGE on schema sweeperd: say so, per database, not as a traceback.
                hint = (
                    " (GRANT USAGE ON SCHEMA sweeperd and SELECT ON ALL TABLES IN SCHEMA "
                    "sweeperd to this role)"
                    if is_insufficient_privilege(outcome)
                    else ""
                )
                unreachable[name] = f"cannot read the run history: {describe_error(outcome)}{hint}"
            else:
                rows, ops, pause, read_gates, read_claims = outcome
                found.append((rows, ops))
                if read_claims is None:
                    claims.missing.append(name)
                elif isinstance(read_claims, str):
                    claims.unknown[name] = read_claims
                elif read_claims:
                    claims.firings.extend(read_claims)
                else:
                    claims.empty.append(name)
                if read_gates is not None:
                    gates[name] = read_gates
                if isinstance(pause, Pause):
                    paused[name] = pause
                elif pause is not None:
                    pause_unknown[name] = pause
    finally:
        await asyncio.gather(*(db.close() for db in databases.values()), return_exceptions=True)
    runs = [r for rows, _ in found for r in rows]
    last_ok = [o for _, ops in found for o in ops]
    return Collected(runs, last_ok, unreachable, paused, pause_unknown, gates, claims)


def to_json(
    runs: list[StatusRow],
    last_ok: list[dict[str, Any]],
    unreachable: dict[str, str],
    paused: dict[str, Pause] | None = None,
    pause_unknown: dict[str, str] | None = None,
    gates: dict[str, Gates] | None = None,
    claims: ClaimsStatus | None = None,
) -> dict[str, Any]:
    """The ``status --json`` document; ``paused`` (database → its pause), ``pause_unknown``
    (database → why its pause could not be read), ``gates`` (database → its health gates now),
    ``claims`` (each sweep's latest firing per database) and ``claims_unknown`` (database → why
    its claims could not be read) only when there is one."""

    def iso(value: Any) -> Any:
        return value.isoformat() if isinstance(value, dt.datetime) else value

    doc: dict[str, Any] = {
        "runs": [
            {
                "database": r.database,
                "sweep": r.sweep,
                "run_id": r.run_id,
                "instance": r.instance,
                "started_at": iso(r.started_at),
                "finished_at": iso(r.finished_at),
                "trigger": r.trigger,
                "selection": r.selection,
                "counts": r.counts,
                "failures": r.failures,
            }
            for r in runs
        ],
        "last_success": [{**o, "last_success": iso(o["last_success"])} for o in last_ok],
        "unreachable": unreachable,
    }
    if paused:
        doc["paused"] = {name: p.to_json() for name, p in sorted(paused.items())}
    if pause_unknown:
        doc["pause_unknown"] = dict(sorted(pause_unknown.items()))
    if gates:
        doc["gates"] = {name: g.to_json() for name, g in sorted(gates.items())}
    if claims is not None and claims.firings:
        doc["claims"] = [
            f.to_json() for f in sorted(claims.firings, key=lambda f: (f.sweep, f.database))
        ]
    if claims is not None and claims.unknown:
        doc["claims_unknown"] = dict(sorted(claims.unknown.items()))
    return doc


def render(
    runs: list[StatusRow],
    last_ok: list[dict[str, Any]],
    unreachable: dict[str, str],
    enabled: bool,
    failed_only: bool = False,
    databases: int | None = None,
    paused: dict[str, Pause] | None = None,
    pause_unknown: dict[str, str] | None = None,
    gates: dict[str, Gates] | None = None,
    claims: ClaimsStatus | None = None,
) -> str:
    """The text ``sweeperd status`` prints; ``databases`` is how many are configured, ``paused``
    the pause in force per database, ``pause_unknown`` why a database's pause could not be read,
    ``claims`` who did which tenants of the latest firings."""
    lines: list[str] = []
    if not enabled:
        lines.append("note: [history] enabled = false: nothing new is recorded")
    for name, reason in sorted(unreachable.items()):
        lines.append(f"database {name} unreachable: {reason}")
    for name, pause in sorted((paused or {}).items()):
        lines.append(f"database {name} {pause.describe()}")
    for name, reason in sorted((pause_unknown or {}).items()):
        lines.append(f"database {name}: cannot read its pause: {reason}")
    for name, read in sorted((gates or {}).items()):
        lines.append(f"database {name} gates: {read.describe()}")
    if not runs:
        if failed_only and last_ok:
            lines.append("no runs with failures")
        elif unreachable and databases is not None and len(unreachable) >= databases:
            lines.append("no run history could be read (no database answered)")
        elif unreachable:
            lines.append("no runs recorded yet in the databases that answered")
        else:
            lines.append("no runs recorded yet")
    for r in sorted(runs, key=lambda r: (r.sweep, r.database, r.trigger != "schedule")):
        c = r.counts
        took = (r.finished_at - r.started_at).total_seconds()
        how = ""
        if r.trigger != "schedule":
            how = f" (manual{': ' + r.selection if r.selection else ''})"
        lines.append(
            f"{r.sweep}{how} [{r.database}] {_when(r.finished_at)} ({took:.1f}s, {r.instance}): "
            f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped, "
            f"{c['cancelled']} cancelled"
        )
        for f in r.failures:
            lines.append(
                f"    {f['status']:<9} {f['tenant'] or '-'} {f['operation']}: {f['error']}"
            )
    if last_ok:
        lines += ["", "last success per operation:"]
        width = max(len(o["operation"]) for o in last_ok)
        for o in last_ok:
            lines.append(
                f"    {o['operation']:<{width}}  {_when(o['last_success'])}"
                f"  [{o['database']}, {o['tenants']} tenant(s)]"
            )
    if claims is not None:
        described = claims.describe()
        if described:
            lines += ["", *described]
    return "\n".join(lines)


def _when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


@dataclass(frozen=True, slots=True)
class StatusRow:
    database: str
    sweep: str
    run_id: str
    instance: str
    started_at: Any
    finished_at: Any
    counts: dict[str, int]
    failures: list[dict[str, Any]]
    trigger: str = "schedule"
    selection: str | None = None


async def latest_runs(
    database: Database, *, sweep: str | None, tenant_regex: str | None, failed_only: bool
) -> tuple[list[StatusRow], list[dict[str, Any]]]:
    """The latest run per sweep with its failures, and each operation's last success."""
    async with database.housekeeping("status") as conn:
        has_runs, _has_pause, _claims = await _tables(conn)
        if not has_runs:
            return [], []
        return await _runs_on(
            conn, database.name, sweep=sweep, tenant_regex=tenant_regex, failed_only=failed_only
        )


ClaimsRead = list["FiringClaimsStatus"] | str | None  # None: no table; str: why not read


async def _database_status(
    database: Database,
    *,
    sweep: str | None,
    tenant_regex: str | None,
    failed_only: bool,
    full: bool = False,
) -> tuple[list[StatusRow], list[dict[str, Any]], Pause | str | None, Gates | None, ClaimsRead]:
    """:func:`latest_runs`, the pause in force (or why it could not be read) and the claims of
    the latest firings, on one connection: one query more than the runs' where a pause table
    exists, one where a claims table does, none elsewhere."""
    async with database.housekeeping("status") as conn:
        has_runs, has_pause, claims_version = await _tables(conn)
        runs: tuple[list[StatusRow], list[dict[str, Any]]] = ([], [])
        if has_runs:
            runs = await _runs_on(
                conn,
                database.name,
                sweep=sweep,
                tenant_regex=tenant_regex,
                failed_only=failed_only,
            )
        pause: Pause | str | None = None
        if has_pause:
            try:
                pause = await read_pause(conn)
            except psycopg.errors.UndefinedTable:
                pause = None  # dropped since we looked
            except psycopg.errors.InsufficientPrivilege as exc:
                # The run history stays readable: a role that may read it (GRANT ... ON ALL
                # TABLES, before the first pause created the table) is not locked out of status.
                role = database.user or "this role"
                pause = (
                    f"{describe_error(exc)} (GRANT USAGE ON SCHEMA sweeperd and SELECT ON "
                    f"sweeperd.pause to {role})"
                )
        gates = await _gates(database, conn)
        claims: ClaimsRead = None
        if claims_version:
            try:
                claims = await _claims_on(
                    conn,
                    database.name,
                    claims_version,
                    sweep=sweep,
                    tenant_regex=tenant_regex,
                    full=full,
                )
            except psycopg.errors.UndefinedTable:
                claims = None  # dropped since we looked
            except psycopg.Error as exc:
                # As for the pause: the runs stay readable whatever became of the claims.
                hint = ""
                if is_insufficient_privilege(exc):
                    role = database.user or "this role"
                    hint = f" (GRANT SELECT ON sweeperd.claims to {role})"
                claims = describe_error(exc) + hint
        return *runs, pause, gates, claims


async def _gates(database: Database, conn: AsyncConn) -> Gates | None:
    """The database's health gates read now, as a sweep's sampler reads them (None: it sets
    none). A gate that cannot be read is in ``unavailable``, as it is for a sweep."""
    throttle = Throttle(database.name, database.config.throttle)
    if not throttle.gates:
        return None
    try:
        reading = await throttle.read(conn)
    except Exception as exc:
        return Gates((), {"*": describe_error(exc)})
    unavailable = {k: v for k, v in throttle.unavailable.items() if k != "pause"}
    return Gates(reading.signals, unavailable)


async def _tables(conn: AsyncConn) -> tuple[bool, bool, int]:
    """Whether sweeperd.runs and sweeperd.pause exist, and which sweeperd.claims (one query):
    0 none, 1 the first version's (no leases), 2 the current one.

    The runs by ``to_regclass``, which fails without USAGE on the schema (status then says which
    GRANT it needs); the pause and the claims from the catalogs, which need no privilege.
    """
    cur = await conn.execute(
        f"SELECT pg_catalog.to_regclass('sweeperd.runs') IS NOT NULL, {EXISTS}, {_CLAIMS_VERSION}"
    )
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1]), int(row[2])


# The first version's table has "tenant", the current one "lease_until" too.
_CLAIMS_VERSION = """(SELECT count(*) FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = 'sweeperd' AND c.relname = 'claims'
         AND a.attname IN ('tenant', 'lease_until') AND NOT a.attisdropped)"""


async def _runs_on(
    conn: AsyncConn,
    database: str,
    *,
    sweep: str | None,
    tenant_regex: str | None,
    failed_only: bool,
) -> tuple[list[StatusRow], list[dict[str, Any]]]:
    cur = await conn.execute(
        """
        SELECT DISTINCT ON (sweep, trigger) run_id, sweep, instance, started_at,
               finished_at, ok, failed, skipped, cancelled, trigger, selection
          FROM sweeperd.runs WHERE %(sweep)s::text IS NULL OR sweep = %(sweep)s
         ORDER BY sweep, trigger DESC, started_at DESC
        """,
        {"sweep": sweep},
    )
    runs = await cur.fetchall()
    out: list[StatusRow] = []
    for (
        run_id,
        name,
        instance,
        started,
        finished,
        ok,
        failed,
        skipped,
        cancelled,
        trigger,
        selection,
    ) in runs:
        if failed_only and not (failed or cancelled):
            continue
        cur = await conn.execute(
            """
            SELECT tenant, operation, status, error FROM sweeperd.results
             WHERE run_id = %(run)s AND status IN ('failed', 'cancelled')
               AND (%(tenant)s::text IS NULL OR tenant ~ %(tenant)s)
             ORDER BY operation, tenant
            """,
            {"run": run_id, "tenant": tenant_regex},
        )
        failures = [
            dict(zip(("tenant", "operation", "status", "error"), r, strict=True))
            for r in await cur.fetchall()
        ]
        out.append(
            StatusRow(
                database,
                name,
                str(run_id),
                instance,
                started,
                finished,
                {"ok": ok, "failed": failed, "skipped": skipped, "cancelled": cancelled},
                failures,
                trigger,
                selection,
            )
        )
    cur = await conn.execute(
        """
        SELECT r.operation, max(r.finished_at), count(DISTINCT r.tenant)
          FROM sweeperd.results r JOIN sweeperd.runs u USING (run_id)
         WHERE r.status = 'ok' AND (%(sweep)s::text IS NULL OR u.sweep = %(sweep)s)
           AND (%(tenant)s::text IS NULL OR r.tenant ~ %(tenant)s)
         GROUP BY r.operation ORDER BY r.operation
        """,
        {"sweep": sweep, "tenant": tenant_regex},
    )
    last_ok = [
        {"database": database, "operation": op, "last_success": when, "tenants": n}
        for op, when, n in await cur.fetchall()
    ]
    return out, last_ok


# -- claims: who did which tenants of each sweep's latest firing ----------------------------------

DATABASE_SCOPE_TEXT = "(database scope)"
TEXT_NAMES = 5  # tenant names per list in text (then "… (+N)"); JSON lists them all
TEXT_TAKEOVERS = 10  # takeover lines per firing in text
# Claim states, in the order text and JSON show them. "released": given back by its holder (a
# stop), takeable at once; "stalled": the lease ran out without a release (the holder died or
# hangs), taken over within a lease and a poll by any instance still running the firing.
OPEN_STATES = ("in_progress", "released", "stalled")
STATES = ("finished", *OPEN_STATES, "unclaimed")
INSTANCE_STATES = ("finished", *OPEN_STATES)  # the states a row with an instance can be in

# Rows of the first version (no lease columns) read as finished claims, as the DDL migrates them.
_CLAIM_COLUMNS = """
    SELECT sweep, firing, tenant, instance, lease_until, started_at, finished_at, released_at,
           taken_from, taken_why, attempts FROM sweeperd.claims"""
_CLAIM_COLUMNS_V1 = """
    SELECT sweep, firing, tenant, instance, NULL::timestamptz AS lease_until,
           claimed_at AS started_at, claimed_at AS finished_at, NULL::timestamptz AS released_at,
           NULL::text AS taken_from, NULL::text AS taken_why, 1 AS attempts FROM sweeperd.claims"""
# Every sweep's latest firing by the primary key (sweep, firing, tenant): a skip scan over the
# sweeps and one backward index probe each, so a week of hourly firings of 50 000 tenants is not
# read to find the last one. Then that firing's rows in one pass, grouped by instance (NULL: not
# claimed yet): counts per state, and the tenants as far as they are shown (``names``,
# ``takeovers``: all for JSON). Why this shape, measured at 50 000 tenants: no aggregate sorts
# (Python sorts the lists), and the state is not a grouping key (an expression's groups are
# guessed so many that the planner sorted every row of the firing, spilling to disk, instead of
# hashing a few groups). The text's first finished names come from the primary key in order
# (the database's collation), a few index entries per instance.
_CLAIMS = """
WITH RECURSIVE c AS NOT MATERIALIZED ({columns}),
sweeps(sweep) AS ({sweeps}),
latest AS (
    SELECT s.sweep, (SELECT max(c.firing) FROM c WHERE c.sweep = s.sweep) AS firing
    FROM sweeps s WHERE s.sweep IS NOT NULL
),
firing_rows AS (
    SELECT c.*, CASE
        WHEN c.finished_at IS NOT NULL THEN 'finished'
        WHEN c.instance IS NULL THEN 'unclaimed'
        WHEN c.released_at IS NOT NULL THEN 'released'
        WHEN c.lease_until > now() THEN 'in_progress'
        ELSE 'stalled' END AS state
    FROM latest l JOIN c ON c.sweep = l.sweep AND c.firing = l.firing
    WHERE %(tenant)s::text IS NULL OR c.tenant ~ %(tenant)s
),
counted AS (
    SELECT sweep, firing, instance,
        count(*) FILTER (WHERE state = 'finished') AS finished,
        count(*) FILTER (WHERE state = 'in_progress') AS in_progress,
        count(*) FILTER (WHERE state = 'released') AS released,
        count(*) FILTER (WHERE state = 'stalled') AS stalled,
        count(*) FILTER (WHERE state = 'unclaimed') AS unclaimed,
        {all_names} AS names,
        (array_agg({held}) FILTER (WHERE state = 'in_progress'))[1:%(names)s] AS held_in_progress,
        (array_agg({held}) FILTER (WHERE state = 'released'))[1:%(names)s] AS held_released,
        (array_agg({held}) FILTER (WHERE state = 'stalled'))[1:%(names)s] AS held_stalled,
        count(taken_from) AS taken,
        (array_agg(jsonb_build_object(
            'tenant', tenant, 'from', taken_from, 'why', taken_why, 'attempts', attempts,
            'state', state))
            FILTER (WHERE taken_from IS NOT NULL))[1:%(takeovers)s] AS takeovers
    FROM firing_rows GROUP BY sweep, firing, instance
)
SELECT g.sweep, g.firing, g.instance, g.finished, g.in_progress, g.released, g.stalled,
    g.unclaimed, {names}, g.held_in_progress, g.held_released, g.held_stalled, g.taken,
    g.takeovers, now()
FROM counted g
"""
# A held tenant, built only for the rows an aggregate's FILTER lets through.
_HELD = """jsonb_build_object('tenant', tenant, 'lease_until', lease_until,
    'started_at', started_at, 'released_at', released_at, 'attempts', attempts)"""
# JSON: every finished tenant. Text: the first few by the primary key's order.
_ALL_NAMES = "array_agg(tenant) FILTER (WHERE state = 'finished')"
_FIRST_NAMES = """ARRAY(
    SELECT c.tenant FROM c
    WHERE c.sweep = g.sweep AND c.firing = g.firing AND c.instance = g.instance
        AND c.finished_at IS NOT NULL AND (%(tenant)s::text IS NULL OR c.tenant ~ %(tenant)s)
    ORDER BY c.tenant LIMIT %(names)s)"""
_ALL_SWEEPS = """
    SELECT min(sweep) FROM c
    UNION ALL
    SELECT (SELECT min(c.sweep) FROM c WHERE c.sweep > s.sweep) FROM sweeps s
    WHERE s.sweep IS NOT NULL"""
_ONE_SWEEP = "SELECT %(sweep)s::text"
_NO_LIMIT = 2**31 - 1  # an array slice's upper bound that keeps every element


@dataclass(frozen=True, slots=True)
class Held:
    """A tenant claimed and not finished: in progress, released, or stalled."""

    tenant: str
    lease_until: dt.datetime | None
    started_at: dt.datetime | None
    released_at: dt.datetime | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Takeover:
    """A tenant that changed hands: from whom, by whom (its holder now), why, how many times it
    was taken in all, and where it is now (a state of :data:`STATES`)."""

    tenant: str
    taken_from: str
    by: str
    why: str | None
    attempts: int
    state: str


@dataclass(slots=True)
class InstanceShare:
    """One instance's part of a firing: counts by state; the finished tenants' names and the
    held ones, all of them or (text) the first few."""

    instance: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTANCE_STATES, 0))
    finished: tuple[str, ...] = ()
    held: dict[str, tuple[Held, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FiringClaimsStatus:
    """One sweep's latest firing in one database, as its claims say."""

    database: str
    sweep: str
    firing: dt.datetime
    now: dt.datetime  # the server's, for the leases' "left" and "ago"
    counts: dict[str, int]  # by state, plus "tenants" and "taken_over"
    instances: tuple[InstanceShare, ...]
    taken_over: tuple[Takeover, ...]  # all, or (text) the first few; counts["taken_over"]: all

    def verdict(self) -> str:
        """``200 tenants: 197 finished (host-a:11 120, host-b:12 77), 2 in progress, …``."""
        c = self.counts
        by = ", ".join(
            f"{i.instance} {i.counts['finished']}" for i in self.instances if i.counts["finished"]
        )
        parts = [f"{c['finished']} finished" + (f" ({by})" if by else "")]
        parts.append(f"{c['in_progress']} in progress")
        # The rest only when there are some: the common line stays short.
        if c["unclaimed"]:
            parts.append(f"{c['unclaimed']} not yet claimed")
        if c["released"]:
            parts.append(f"{c['released']} released (waiting for another instance)")
        if c["stalled"]:
            parts.append(f"{c['stalled']} stalled (lease expired, waiting for takeover)")
        parts.append(f"{c['taken_over']} taken over")
        return f"{c['tenants']} tenants: " + ", ".join(parts)

    def describe(self) -> list[str]:
        """The text lines: the verdict, then per instance its lists, then the takeovers."""
        lines = [
            f"claims of {self.sweep} on {self.database}, firing {_when(self.firing)}: "
            + self.verdict()
        ]
        for share in self.instances:
            if share.counts["finished"]:
                names = _abbreviate(
                    [_tenant_text(t) for t in share.finished], share.counts["finished"]
                )
                lines.append(f"    {share.instance}: finished {share.counts['finished']}: {names}")
            for state in OPEN_STATES:
                if share.counts[state]:
                    held = _abbreviate(
                        [self._held_text(state, h) for h in share.held.get(state, ())],
                        share.counts[state],
                    )
                    label = state.replace("_", " ")
                    lines.append(f"    {share.instance}: {label} {share.counts[state]}: {held}")
        for t in self.taken_over:
            why = t.why or "unknown"
            lines.append(
                f"    taken over: {_tenant_text(t.tenant)} from {t.taken_from} by {t.by} "
                f"({why}, attempt {t.attempts}, {t.state.replace('_', ' ')} now)"
            )
        hidden = self.counts["taken_over"] - len(self.taken_over)
        if hidden > 0:
            lines.append(f"    … and {hidden} more taken over (--json lists them all)")
        return lines

    def _held_text(self, state: str, held: Held) -> str:
        name = _tenant_text(held.tenant)
        if state == "in_progress" and held.lease_until is not None:
            return f"{name} (lease {_seconds(held.lease_until - self.now)} left)"
        if state == "released" and held.released_at is not None:
            return f"{name} (released {_seconds(self.now - held.released_at)} ago)"
        if state == "stalled" and held.lease_until is not None:
            return f"{name} (lease expired {_seconds(self.now - held.lease_until)} ago)"
        return name

    def to_json(self) -> dict[str, Any]:
        def held(h: Held) -> dict[str, Any]:
            return {
                "tenant": _tenant_json(h.tenant),
                "lease_until": _iso(h.lease_until),
                "started_at": _iso(h.started_at),
                "released_at": _iso(h.released_at),
                "attempts": h.attempts,
            }

        return {
            "database": self.database,
            "sweep": self.sweep,
            "firing": self.firing.isoformat(),
            "counts": dict(self.counts),
            "verdict": self.verdict(),
            "instances": [
                {
                    "instance": s.instance,
                    "counts": dict(s.counts),
                    "finished": [_tenant_json(t) for t in s.finished],
                    **{state: [held(h) for h in s.held.get(state, ())] for state in OPEN_STATES},
                }
                for s in self.instances
            ],
            "taken_over": [
                {
                    "tenant": _tenant_json(t.tenant),
                    "from": t.taken_from,
                    "by": t.by,
                    "why": t.why,
                    "attempts": t.attempts,
                    "state": t.state,
                }
                for t in self.taken_over
            ],
        }


@dataclass(frozen=True, slots=True)
class ClaimsStatus:
    """What ``status`` read of ``sweeperd.claims``: the latest firings, the databases without
    the table (``missing``) or without any firing that matched (``empty``), and those whose
    claims could not be read (name → why)."""

    firings: list[FiringClaimsStatus] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)

    def describe(self) -> list[str]:
        lines: list[str] = []
        for name, why in sorted(self.unknown.items()):
            lines.append(f"database {name}: cannot read its claims: {why}")
        if self.missing:
            lines.append(
                f"claims: none recorded yet in {', '.join(sorted(self.missing))} (no table "
                "sweeperd.claims: `sweeperd run` creates it at its first firing; `sweeperd "
                "sweep` claims nothing)"
            )
        if self.empty:
            lines.append(f"claims: none recorded in {', '.join(sorted(self.empty))}")
        for firing in sorted(self.firings, key=lambda f: (f.sweep, f.database)):
            lines += firing.describe()
        return lines


def _tenant_text(tenant: str) -> str:
    return DATABASE_SCOPE_TEXT if tenant == DATABASE_SCOPE else tenant


def _tenant_json(tenant: str) -> str | None:
    # As in the reports, where database-scope work has "tenant": null.
    return None if tenant == DATABASE_SCOPE else tenant


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _abbreviate(items: list[str], total: int) -> str:
    """``t001, t002, … (+47)``: the first :data:`TEXT_NAMES` of ``total``."""
    shown = items[:TEXT_NAMES]
    more = total - len(shown)
    return ", ".join(shown) + (f", … (+{more})" if more > 0 else "")


def _seconds(delta: dt.timedelta) -> str:
    return format_duration(max(0.0, round(delta.total_seconds())))


def _timestamp(value: Any) -> dt.datetime | None:
    # jsonb renders a timestamptz as ISO 8601 with the session's offset.
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else None


async def _claims_on(
    conn: AsyncConn,
    database: str,
    version: int,
    *,
    sweep: str | None,
    tenant_regex: str | None,
    full: bool,
) -> list[FiringClaimsStatus]:
    """The latest firing of each sweep (or of ``sweep``) in this database: one query.
    ``version``: 1 a table of the first version, 2 the current one. ``full``: every name (JSON),
    else as many as text shows."""
    query = sql.SQL(_CLAIMS).format(
        columns=sql.SQL(_CLAIM_COLUMNS if version >= 2 else _CLAIM_COLUMNS_V1),
        sweeps=sql.SQL(_ONE_SWEEP if sweep is not None else _ALL_SWEEPS),
        all_names=sql.SQL(_ALL_NAMES if full else "NULL::text[]"),
        held=sql.SQL(_HELD),
        names=sql.SQL("g.names" if full else _FIRST_NAMES),
    )
    cur = await conn.execute(
        query,
        {
            "sweep": sweep,
            "tenant": tenant_regex,
            "names": _NO_LIMIT if full else TEXT_NAMES,
            "takeovers": _NO_LIMIT if full else TEXT_TAKEOVERS,
        },
    )
    grouped: dict[tuple[str, dt.datetime], list[tuple[Any, ...]]] = {}
    for row in await cur.fetchall():
        grouped.setdefault((row[0], row[1]), []).append(row)
    out = []
    for (name, firing), rows in grouped.items():
        counts = dict.fromkeys(STATES, 0)
        shares: dict[str, InstanceShare] = {}
        takeovers: list[Takeover] = []
        taken = 0
        now = rows[0][-1]
        for row in rows:
            instance, numbers = row[2], row[3:8]
            finished, held, n_taken, taken_rows = row[8], row[9:12], row[12], row[13]
            for state, n in zip(STATES, numbers, strict=True):
                counts[state] += n
            taken += n_taken
            if instance is None:
                continue  # unclaimed: counted only (at the start that is the whole firing)
            share = shares[instance] = InstanceShare(
                instance,
                # Not strict: the last number, not yet claimed, is 0 where there is an instance.
                dict(zip(INSTANCE_STATES, numbers, strict=False)),
                # The text's names come in the key's order (the database's collation); JSON's
                # unordered, sorted here (by code point).
                tuple(finished or ()) if not full else tuple(sorted(finished or ())),
            )
            for state, rows_held in zip(OPEN_STATES, held, strict=True):
                share.held[state] = tuple(
                    sorted(
                        (
                            Held(
                                h["tenant"],
                                _timestamp(h["lease_until"]),
                                _timestamp(h["started_at"]),
                                _timestamp(h["released_at"]),
                                int(h["attempts"]),
                            )
                            for h in rows_held or ()
                        ),
                        key=lambda h: h.tenant,
                    )
                )
            takeovers += (
                Takeover(t["tenant"], t["from"], instance, t["why"], int(t["attempts"]), t["state"])
                for t in taken_rows or ()
            )
        counts = {"tenants": sum(counts.values()), **counts, "taken_over": taken}
        takeovers.sort(key=lambda t: t.tenant)
        out.append(
            FiringClaimsStatus(
                database,
                name,
                firing,
                now,
                counts,
                tuple(shares[i] for i in sorted(shares)),
                tuple(takeovers if full else takeovers[:TEXT_TAKEOVERS]),
            )
        )
    return out
