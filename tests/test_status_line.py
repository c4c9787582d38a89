"""The STATUS= line from plain inputs, in-process: its exact format, what it picks and in which
order, and the patterns tests/system/debian.sh matches against ``systemctl show -p StatusText``."""

from __future__ import annotations

import datetime as dt
import re
from typing import cast
from zoneinfo import ZoneInfo

import pytest

from sweeperd.model import Result, Status
from sweeperd.report import SweepReport
from sweeperd.status_line import status_line

UTC = ZoneInfo("UTC")  # what the scheduler's next fire times carry with timezone = "UTC"
T0 = dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.UTC)


def result(status: Status) -> Result:
    return Result(
        tenant="acme",
        database="main",
        schema="tenant_acme",
        operation="nap.sleep",
        status=status,
        rows=None,
        started_at=None,
        finished_at=None,
        duration_s=None,
        error=None if status == "ok" else "why",
    )


def report(sweep: str, finished: dt.datetime, **counts: int) -> SweepReport:
    results = [result(cast(Status, status)) for status, n in counts.items() for _ in range(n)]
    return SweepReport(sweep, finished - dt.timedelta(minutes=5), finished, results)


def test_idle_with_the_next_firing_and_the_last_result() -> None:
    line = status_line(
        running=[],
        unreachable=[],
        next_firings={"nightly": dt.datetime(2026, 1, 3, 3, 0, tzinfo=UTC)},
        last_reports={"nightly": report("nightly", T0, ok=398, failed=2)},
    )
    assert line == "idle; next nightly 2026-01-03 03:00:00 UTC; last nightly: 398 ok, 2 failed"


def test_nothing_scheduled_nothing_run_yet() -> None:
    assert status_line(running=[], unreachable=[], next_firings={}, last_reports={}) == "idle"


def test_running_sweeps_in_the_order_given_and_unreachable_databases_sorted() -> None:
    line = status_line(
        running=["s", "hourly"],
        unreachable=["other", "archive"],
        next_firings={"hourly": dt.datetime(2026, 1, 2, 4, 0, 0, 999_999, tzinfo=UTC)},
        last_reports={},
    )
    assert line == (
        "running s, hourly; unreachable: archive, other (retrying); "
        "next hourly 2026-01-02 04:00:00 UTC"
    )


def test_throttled_databases_come_after_the_running_sweeps_sorted_with_their_reasons() -> None:
    line = status_line(
        running=["nightly"],
        unreachable=["archive"],
        next_firings={},
        last_reports={},
        throttled={"main": "replica lag 14s > 10s (standby b)", "billing": "paused by ops@h"},
    )
    assert line == (
        "running nightly; throttled: billing (paused by ops@h), main (replica lag 14s > 10s "
        "(standby b)); unreachable: archive (retrying)"
    )


def test_a_failed_reload_comes_first() -> None:
    line = status_line(
        running=["s"],
        unreachable=["other"],
        next_firings={},
        last_reports={},
        reload_problems=3,
    )
    assert line == (
        "reload failed (3 problem(s)); running the previous configuration; "
        "running s; unreachable: other (retrying)"
    )


def test_the_earliest_next_firing_is_shown_the_first_given_among_equals() -> None:
    soon = dt.datetime(2026, 1, 2, 3, 0, 5, tzinfo=UTC)
    firings = {
        "late": soon + dt.timedelta(hours=1),
        "b": soon,
        "a": soon,
    }
    line = status_line(running=[], unreachable=[], next_firings=firings, last_reports={})
    assert line == "idle; next b 2026-01-02 03:00:05 UTC"


def test_the_zone_abbreviation_is_the_firings() -> None:
    berlin = dt.datetime(2026, 7, 1, 3, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    line = status_line(running=[], unreachable=[], next_firings={"n": berlin}, last_reports={})
    assert line == "idle; next n 2026-07-01 03:00:00 CEST"


def test_the_last_result_is_the_run_that_finished_last() -> None:
    reports = {
        "hourly": report("hourly", T0 + dt.timedelta(minutes=30), ok=5),
        "nightly": report("nightly", T0, ok=398, failed=2),
    }
    line = status_line(running=["nightly"], unreachable=[], next_firings={}, last_reports=reports)
    assert line == "running nightly; last hourly: 5 ok, 0 failed"


def test_the_last_result_counts_ok_and_failed_only() -> None:
    line = status_line(
        running=[],
        unreachable=[],
        next_firings={},
        last_reports={"s": report("s", T0, ok=1, skipped=4, cancelled=2, **{"dry-run": 3})},
    )
    assert line == "idle; last s: 1 ok, 0 failed"


NEXT = {"often": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}


# The patterns tests/system/debian.sh waits for (bash =~, POSIX ERE; these mean the same in re).
@pytest.mark.parametrize(
    ("pattern", "line"),
    [
        (
            r"^idle; next often [0-9-]+ [0-9]{2}:[0-9]{2}:[0-9]{2} UTC",
            status_line(running=[], unreachable=[], next_firings=NEXT, last_reports={}),
        ),
        (
            r"^idle; next often .*; last often: 2 ok, 0 failed$",
            status_line(
                running=[],
                unreachable=[],
                next_firings=NEXT,
                last_reports={"often": report("often", T0, ok=2)},
            ),
        ),
        (
            r"^reload failed \(1 problem\(s\)\); running the previous configuration",
            status_line(
                running=[], unreachable=[], next_firings=NEXT, last_reports={}, reload_problems=1
            ),
        ),
    ],
    ids=["idle and next", "last result", "broken reload"],
)
def test_the_system_tests_patterns_match(pattern: str, line: str) -> None:
    assert re.search(pattern, line), line
