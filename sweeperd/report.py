"""Human-readable rendering of a sweep report (the JSON form is SweepReport.to_json)."""

from __future__ import annotations

from .durations import format_duration
from .runner import SweepReport, summarize

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
    if len(report.results) <= MAX_ITEM_LINES:
        rows = [("WHERE", "OPERATION", "STATUS", "ROWS", "TIME")]
        for r in report.results:
            rows.append(
                (
                    r.tenant or f"[{r.database}]",
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
            where = r.tenant if r.tenant is not None else f"[{r.database}]"
            lines.append(f"  {r.status:<9} {where} {r.operation}: {r.error}")
    return "\n".join(lines)
