"""The report of a sweep: its results, the contract JSON, and a rendering for people."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .durations import format_duration
from .model import STATUSES, Result
from .problems import ExitCode


@dataclass(slots=True)
class SweepReport:
    sweep: str
    started_at: datetime
    finished_at: datetime
    results: list[Result] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    # Per expanding operation (vacuum.auto): how many it looked at and found no work for.
    not_needed: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def counts(self) -> dict[str, int]:
        return status_counts(self.results)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "sweep": self.sweep,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "duration_s": round(self.duration_s, 6),
            "counts": self.counts(),
            "results": [r.to_json() for r in self.results],
        }
        if self.not_needed:
            doc["not_needed"] = dict(sorted(self.not_needed.items()))
        return doc

    def exit_code(self) -> ExitCode:
        """OK all succeeded or were skipped by policy; FAILED a failure; UNREACHABLE no database
        could be reached at all (one unreachable among reachable ones is a failure)."""
        if self.unreachable and all(r.database in self.unreachable for r in self.results):
            return ExitCode.UNREACHABLE
        if any(r.status in ("failed", "cancelled") for r in self.results):
            return ExitCode.FAILED
        return ExitCode.OK


def status_counts(results: Sequence[Result], *, dry_run_as_ok: bool = False) -> dict[str, int]:
    """How many results ended in each status (ok, failed, skipped, cancelled always present;
    dry-run too if any, unless counted as ok, as the run history stores it)."""
    counts = {"ok": 0, "failed": 0, "skipped": 0, "cancelled": 0}
    for r in results:
        key = "ok" if dry_run_as_ok and r.status == "dry-run" else r.status
        counts[key] = counts.get(key, 0) + 1
    return counts


def summarize(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    """Per operation: how many items ended in each status, and rows in total."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        row = out.setdefault(r.operation, {s: 0 for s in STATUSES} | {"rows": 0})
        row[r.status] += 1
        row["rows"] += r.rows or 0
    return out


# Beyond this many items a per-item table is a wall of text; show aggregates and failures.
MAX_ITEM_LINES = 60


def render_text(report: SweepReport) -> str:
    rows: list[tuple[str, ...]]
    counts = report.counts()
    lines = [
        f"sweep {report.sweep}: "
        + ", ".join(
            f"{n} {status}" for status, n in counts.items() if n or status in ("ok", "failed")
        )
        + f" in {format_duration(report.duration_s)}"
    ]
    for name, reason in sorted(report.unreachable.items()):
        lines.append(f"  database {name} unreachable: {reason}")
    for name, n in sorted(report.not_needed.items()):
        lines.append(f"  {name}: {n} not needed (under every threshold)")
    # Tenants are (database, name): a name found in two databases is shown with its database.
    dbs_of: dict[str, set[str]] = {}
    for r in report.results:
        if r.tenant is not None:
            dbs_of.setdefault(r.tenant, set()).add(r.database)

    def where(r: Result) -> str:
        if r.tenant is None:
            return f"[{r.database}]"
        return f"{r.tenant} [{r.database}]" if len(dbs_of[r.tenant]) > 1 else r.tenant

    if len(report.results) <= MAX_ITEM_LINES:
        rows = [("WHERE", "OPERATION", "STATUS", "ROWS", "TIME")]
        for r in report.results:
            rows.append(
                (
                    where(r),
                    r.operation,
                    r.status,
                    "" if r.rows is None else str(r.rows),
                    "" if r.duration_s is None else format_duration(r.duration_s),
                )
            )
    else:
        rows = [("OPERATION", "OK", "FAILED", "SKIPPED", "CANCELLED", "ROWS")]
        for op, s in sorted(summarize(report.results).items()):
            rows.append(
                (
                    op,
                    str(s["ok"] + s["dry-run"]),
                    str(s["failed"]),
                    str(s["skipped"]),
                    str(s["cancelled"]),
                    str(s["rows"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines.extend(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    problems = [
        r for r in report.results if r.status in ("failed", "cancelled", "skipped") and r.error
    ]
    if problems:
        lines.append("")
        lines.append("problems:")
        for r in problems:
            lines.append(f"  {r.status:<9} {where(r)} {r.operation}: {r.error}")
    return "\n".join(lines)
