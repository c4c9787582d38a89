"""``sweeperd status``: the latest run per sweep, its failures, each operation's last success,
read from the run history that :mod:`sweeperd.history` writes."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .config import Config
from .databases import open_databases
from .db import AsyncConn, Database
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
    pause could not be read (name → why; their run history still could)."""

    runs: list[StatusRow]
    last_ok: list[dict[str, Any]]
    unreachable: dict[str, str]
    paused: dict[str, Pause] = field(default_factory=dict)
    pause_unknown: dict[str, str] = field(default_factory=dict)
    # The health gates of the databases that set any, as read now.
    gates: dict[str, Gates] = field(default_factory=dict)


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
    config: Config, *, sweep: str | None, tenant: str | None, failed_only: bool
) -> Collected:
    databases, unreachable = await open_databases(config, list(config.databases))
    try:
        # As sweep --tenant: the glob, or a tenant's exact name (glob characters and all).
        pattern = f"^{re.escape(tenant)}$|{glob_to_regex(tenant)}" if tenant else None
        outcomes = await asyncio.gather(
            *(
                _database_status(db, sweep=sweep, tenant_regex=pattern, failed_only=failed_only)
                for db in databases.values()
            ),
            return_exceptions=True,
        )
        found = []
        paused: dict[str, Pause] = {}
        pause_unknown: dict[str, str] = {}
        gates: dict[str, Gates] = {}
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
                rows, ops, pause, read_gates = outcome
                found.append((rows, ops))
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
    return Collected(runs, last_ok, unreachable, paused, pause_unknown, gates)


def to_json(
    runs: list[StatusRow],
    last_ok: list[dict[str, Any]],
    unreachable: dict[str, str],
    paused: dict[str, Pause] | None = None,
    pause_unknown: dict[str, str] | None = None,
    gates: dict[str, Gates] | None = None,
) -> dict[str, Any]:
    """The ``status --json`` document; ``paused`` (database → its pause), ``pause_unknown``
    (database → why its pause could not be read) and ``gates`` (database → its health gates now)
    only when there is one."""

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
) -> str:
    """The text ``sweeperd status`` prints; ``databases`` is how many are configured, ``paused``
    the pause in force per database, ``pause_unknown`` why a database's pause could not be read."""
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
        has_runs, _has_pause = await _tables(conn)
        if not has_runs:
            return [], []
        return await _runs_on(
            conn, database.name, sweep=sweep, tenant_regex=tenant_regex, failed_only=failed_only
        )


async def _database_status(
    database: Database, *, sweep: str | None, tenant_regex: str | None, failed_only: bool
) -> tuple[list[StatusRow], list[dict[str, Any]], Pause | str | None, Gates | None]:
    """:func:`latest_runs` and the pause in force (or why it could not be read), on one
    connection: one query more than the runs' where a pause table exists, none elsewhere."""
    async with database.housekeeping("status") as conn:
        has_runs, has_pause = await _tables(conn)
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
        return *runs, pause, await _gates(database, conn)


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


async def _tables(conn: AsyncConn) -> tuple[bool, bool]:
    """Whether sweeperd.runs and sweeperd.pause exist (one query).

    The runs by ``to_regclass``, which fails without USAGE on the schema (status then says which
    GRANT it needs); the pause from the catalogs, which need no privilege.
    """
    cur = await conn.execute(
        f"SELECT pg_catalog.to_regclass('sweeperd.runs') IS NOT NULL, {EXISTS}"
    )
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


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
