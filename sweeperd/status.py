"""``sweeperd status``: the latest run per sweep, its failures, each operation's last success."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from .config import Config
from .databases import open_databases
from .errors import describe_error, is_insufficient_privilege
from .history import StatusRow, latest_runs


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


async def collect(
    config: Config, *, sweep: str | None, tenant: str | None, failed_only: bool
) -> tuple[list[StatusRow], list[dict[str, Any]], dict[str, str]]:
    databases, unreachable = await open_databases(config, list(config.databases))
    try:
        pattern = glob_to_regex(tenant) if tenant else None
        outcomes = await asyncio.gather(
            *(
                latest_runs(db, sweep=sweep, tenant_regex=pattern, failed_only=failed_only)
                for db in databases.values()
            ),
            return_exceptions=True,
        )
        found = []
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
                found.append(outcome)
    finally:
        await asyncio.gather(*(db.close() for db in databases.values()), return_exceptions=True)
    runs = [r for rows, _ in found for r in rows]
    last_ok = [o for _, ops in found for o in ops]
    return runs, last_ok, unreachable


def to_json(
    runs: list[StatusRow], last_ok: list[dict[str, Any]], unreachable: dict[str, str]
) -> dict[str, Any]:
    def iso(value: Any) -> Any:
        return value.isoformat() if isinstance(value, dt.datetime) else value

    return {
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


def render(
    runs: list[StatusRow],
    last_ok: list[dict[str, Any]],
    unreachable: dict[str, str],
    enabled: bool,
    failed_only: bool = False,
    databases: int | None = None,
) -> str:
    """The text ``sweeperd status`` prints; ``databases`` is how many are configured."""
    lines: list[str] = []
    if not enabled:
        lines.append("note: [history] enabled = false: nothing new is recorded")
    for name, reason in sorted(unreachable.items()):
        lines.append(f"database {name} unreachable: {reason}")
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
