"""The daemon's STATUS= line, rendered from plain facts.

``systemctl status`` shows it, and operators and monitoring match it (tests/system/debian.sh
does): ``[reload failed (N problem(s)); running the previous configuration; ]idle | running
<sweeps>[; throttled: <database> (<why>)[, …]][; unreachable: <databases> (retrying)][; next <sweep>
<YYYY-MM-DD HH:MM:SS TZ>][; last <sweep>: <n> ok, <m> failed]``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence

from .report import SweepReport


def status_line(
    *,
    running: Sequence[str],
    unreachable: Iterable[str],
    next_firings: Mapping[str, dt.datetime],
    last_reports: Mapping[str, SweepReport],
    reload_problems: int = 0,
    throttled: Mapping[str, str] | None = None,
) -> str:
    """The STATUS line.

    ``running``: the sweeps running now, in the order shown. ``unreachable``: the databases
    being retried. ``next_firings``: each scheduled sweep's next firing; the earliest is shown
    (the first one given among equals). ``last_reports``: each sweep's latest report; the one
    that finished last is shown. ``reload_problems``: the last reload's problems if it failed
    (0 when it did not), shown first because the running configuration is not the file's.
    ``throttled``: the databases whose work is held back now, and why (``replica lag 14s >
    10s``, ``paused by …``).
    """
    parts = []
    if reload_problems:
        parts.append(
            f"reload failed ({reload_problems} problem(s)); running the previous configuration"
        )
    parts.append(f"running {', '.join(running)}" if running else "idle")
    if throttled:
        held = ", ".join(f"{name} ({why})" for name, why in sorted(throttled.items()))
        parts.append(f"throttled: {held}")
    down = sorted(unreachable)
    if down:
        parts.append(f"unreachable: {', '.join(down)} (retrying)")
    if next_firings:
        name, when = min(next_firings.items(), key=lambda kv: kv[1])
        parts.append(f"next {name} {short_time(when)}")
    if last_reports:
        name, report = max(last_reports.items(), key=lambda kv: kv[1].finished_at)
        counts = report.counts()
        parts.append(f"last {name}: {counts['ok']} ok, {counts['failed']} failed")
    return "; ".join(parts)


def short_time(when: dt.datetime) -> str:
    """To the second, with the zone's abbreviation: ``2026-01-03 03:00:00 UTC``."""
    return when.strftime("%Y-%m-%d %H:%M:%S %Z")
