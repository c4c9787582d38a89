"""What a sweep's firing does, as pure decisions: the overlap policy and the maintenance window.

:class:`~sweeperd.controller.SweepController` acts on them; here they depend on nothing but
their arguments (the clock included), so each case is a plain call.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from .config import Overlap, SweepConfig
from .durations import format_duration
from .model import Status
from .schedule import Window

# What a firing does:
# * "start": nothing is running: start now;
# * "queue": run once more right after the current run;
# * "fold": a run is queued already: this firing folds into it (counted as skipped);
# * "replace": cancel the current run, then start;
# * "skip": drop it (counted);
# * "after catch-up": a catch-up run is going: queue it (a newer firing replaces a queued one).
Action = Literal["start", "queue", "fold", "replace", "skip", "after catch-up"]


def on_firing(overlap: Overlap, *, running: bool, queued: bool, catching_up: bool) -> Action:
    """The action for a firing, given the sweep's policy and the run in progress, if any.

    A catch-up (the firing one database missed, run for it alone when it came back) is no
    reason to drop a firing, whatever the policy.
    """
    if not running:
        return "start"
    if catching_up:
        return "after catch-up"
    if overlap == "queue":
        return "fold" if queued else "queue"
    if overlap == "replace":
        return "replace"
    return "skip"


def window_of(sweep: SweepConfig, timezone: str) -> Window | None:
    return Window(sweep.window, timezone) if sweep.window else None


def window_stop_in(sweep: SweepConfig, window: Window | None, now: dt.datetime) -> float | None:
    """Seconds from ``now`` until the window's end stops a run starting now; None if it does
    not (no window, or ``window_end = "finish"``)."""
    if window is None or sweep.window_end != "cancel":
        return None
    return (window.closes_after(now) - now).total_seconds()


def item_verdict(
    window: Window | None, now: dt.datetime, *, stopping: bool, expected_s: float | None = None
) -> tuple[Status, str] | None:
    """Asked before each item starts: None to run it, or the status and reason to report.

    ``expected_s``: how long the item is expected to take; one that would still be running when
    the window closes is not started (a vacuum cut off at the window's end wasted its I/O).
    """
    if stopping:
        return "cancelled", "daemon stopping"
    if window is None:
        return None
    if not window.contains(now):
        return "skipped", f"outside the maintenance window {window.describe()}"
    if expected_s is not None:
        left = (window.closes_after(now) - now).total_seconds()
        if expected_s > left:
            return "skipped", (
                f"would not finish before the window closes (≈ {format_duration(expected_s)} "
                f"needed, {format_duration(max(left, 0.0))} left)"
            )
    return None
