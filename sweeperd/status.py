"""``sweeperd status``: the latest run per sweep, its failures, each operation's last success."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from .config import Config
from .history import StatusRow, latest_runs
from .sweep import open_databases


def glob_to_like(glob: str) -> str:
    """``acme*`` → ``acme%`` (LIKE's own wildcards in the glob are matched literally)."""
    out = []
    for ch in glob:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


async def collect(
    config: Config, *, sweep: str | None, tenant: str | None, failed_only: bool
) -> tuple[list[StatusRow], list[dict[str, Any]], dict[str, str]]:
    databases, unreachable = await open_databases(config, list(config.databases))
    try:
        like = glob_to_like(tenant) if tenant else None
        found = await asyncio.gather(
            *(
                latest_runs(db, sweep=sweep, tenant_like=like, failed_only=failed_only)
                for db in databases.values()
            )
        )
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
                "counts": r.counts,
                "failures": r.failures,
            }
            for r in runs
        ],
        "last_success": [{**o, "last_success": iso(o["last_success"])} for o in last_ok],
        "unreachable": unreachable,
    }


def render(
    runs: list[StatusRow], last_ok: list[dict[str, Any]], unreachable: dict[str, str], enabled: bool
) -> str:
    lines: list[str] = []
    if not enabled:
        lines.append("note: [history] enabled = false: nothing new is recorded")
    for name, reason in sorted(unreachable.items()):
        lines.append(f"database {name} unreachable: {reason}")
    if not runs:
        lines.append("no runs recorded yet")
    for r in sorted(runs, key=lambda r: (r.sweep, r.database)):
        c = r.counts
        took = (r.finished_at - r.started_at).total_seconds()
        lines.append(
            f"{r.sweep} [{r.database}] {_when(r.finished_at)} ({took:.1f}s, {r.instance}): "
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
