"""APScheduler 3 (AsyncIOScheduler) wiring: one job per ``[sweeps.<name>]``, kept in sync on reload.

APScheduler only decides *when* a sweep fires. Each job is a coroutine that hands the firing to the
sweep's controller, which starts the sweep as its own task: APScheduler never waits for a sweep.
Overlap (skip/queue/replace), timeouts and windows live in the sweep layer, which can do all
three. (With ``replace`` the job does wait for the old run to be cancelled, a matter of moments.)
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .config import Config, SweepConfig

log = structlog.get_logger("sweeperd.schedule")

JOB_PREFIX = "sweep:"
# APScheduler's default grace of 1 s drops a firing whenever the loop is busy for a second (a big
# plan being built, a slow reload). A nightly sweep that starts four minutes late is still
# wanted; one that is an hour late probably is not (and coalesce folds repeats into one).
DEFAULT_MISFIRE_GRACE = 300.0


def misfire_grace(sweep: SweepConfig) -> float:
    """Explicit ``misfire_grace_time``, else 5 min, but never more than half an interval."""
    if sweep.misfire_grace_time is not None:
        return sweep.misfire_grace_time
    if sweep.interval is not None:
        return max(1.0, min(DEFAULT_MISFIRE_GRACE, sweep.interval / 2))
    return DEFAULT_MISFIRE_GRACE


# Interval sweeps fire on a grid anchored here, not at whenever the daemon started: every instance
# (and every restart) then agrees on which firing is which.
INTERVAL_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def build_trigger(
    sweep: SweepConfig, timezone: str, *, with_jitter: bool = True
) -> CronTrigger | IntervalTrigger:
    tz = ZoneInfo(timezone)
    # APScheduler draws the delay with random.uniform: sub-second jitter works as a float.
    jitter = sweep.jitter if sweep.jitter and with_jitter else None
    if sweep.cron is not None:
        trigger = CronTrigger.from_crontab(sweep.cron, timezone=tz)
        trigger.jitter = jitter
        return trigger
    assert sweep.interval is not None  # validated: cron or interval
    return IntervalTrigger(
        seconds=sweep.interval, timezone=tz, jitter=jitter, start_date=INTERVAL_EPOCH
    )


def nominal_firing(sweep: SweepConfig, timezone: str, now: dt.datetime) -> dt.datetime:
    """The firing a run starting at ``now`` belongs to: the latest un-jittered fire time ≤ now.

    Jitter and a late start (within the misfire grace) delay a run, they do not change its
    firing; a run started by hand (no fire time that recent) is its own firing, ``now``.
    """
    candidate: dt.datetime | None = None
    if sweep.interval is not None:
        steps = (now - INTERVAL_EPOCH).total_seconds() // sweep.interval
        candidate = INTERVAL_EPOCH + dt.timedelta(seconds=steps * sweep.interval)
    else:
        trigger = build_trigger(sweep, timezone, with_jitter=False)
        window = dt.timedelta(seconds=sweep.jitter + misfire_grace(sweep) + 1)
        # The latest fire time <= now, looking back twice as far each time: a minutely cron
        # with a grace of days must not walk through every minute of those days.
        back = dt.timedelta(minutes=1)
        while True:
            start = now - min(back, window)
            probe = trigger.get_next_fire_time(None, start)
            if (probe is not None and probe <= now) or back >= window:
                break
            back *= 2
        while probe is not None and probe <= now:
            candidate = probe
            probe = trigger.get_next_fire_time(probe, probe + dt.timedelta(seconds=1))
    if candidate is None:
        return now
    lateness = (now - candidate).total_seconds()
    return candidate if lateness <= sweep.jitter + misfire_grace(sweep) + 1 else now


def job_signature(sweep: SweepConfig, timezone: str) -> tuple[object, ...]:
    """What, if changed by a reload, requires rescheduling the job."""
    return (sweep.cron, sweep.interval, sweep.jitter, sweep.misfire_grace_time, timezone)


class SweepScheduler:
    """The AsyncIOScheduler and the sweeps' jobs, with stable ids ``sweep:<name>``."""

    def __init__(self, fire: Callable[[str], Awaitable[None]]) -> None:
        self._fire = fire
        self._signatures: dict[str, tuple[object, ...]] = {}
        self._scheduler: AsyncIOScheduler | None = None

    def start(self, config: Config) -> None:
        """Start inside the running loop (AsyncIOScheduler binds to it) with the config's jobs."""
        self._scheduler = AsyncIOScheduler(timezone=ZoneInfo(config.daemon.timezone))
        self._scheduler.start()
        self.sync(config)

    def sync(self, config: Config) -> None:
        """Add, replace or remove jobs so that they match ``config.sweeps``."""
        scheduler = self._require()
        tz = config.daemon.timezone
        for name in list(self._signatures):
            if name not in config.sweeps:
                scheduler.remove_job(JOB_PREFIX + name)
                del self._signatures[name]
                log.info("sweep unscheduled", sweep=name)
        for name, sweep in config.sweeps.items():
            signature = job_signature(sweep, tz)
            if self._signatures.get(name) == signature:
                continue
            scheduler.add_job(
                self._fire,
                trigger=build_trigger(sweep, tz),
                args=(name,),
                id=JOB_PREFIX + name,
                name=f"sweep {name}",
                replace_existing=True,
                coalesce=True,
                max_instances=1,
                # APScheduler wants whole seconds > 0; never round a grace down to nothing.
                misfire_grace_time=max(1, math.ceil(misfire_grace(sweep))),
            )
            action = "rescheduled" if name in self._signatures else "scheduled"
            self._signatures[name] = signature
            log.info(f"sweep {action}", sweep=name, next_run=_iso(self.next_run(name)))

    def next_run(self, name: str) -> dt.datetime | None:
        job = self._require().get_job(JOB_PREFIX + name)
        # A job added before the scheduler starts has no next_run_time attribute yet.
        return getattr(job, "next_run_time", None) if job is not None else None

    def next_runs(self) -> dict[str, dt.datetime]:
        out = {}
        for name in self._signatures:
            when = self.next_run(name)
            if when is not None:
                out[name] = when
        return out

    def pause(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.pause()

    def shutdown(self) -> None:
        # Only after the drain: AsyncIOScheduler's shutdown cancels running jobs at once. Our
        # jobs return immediately, so there is nothing of ours for it to cancel anyway.
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _require(self) -> AsyncIOScheduler:
        if self._scheduler is None:
            raise RuntimeError("scheduler not started")
        return self._scheduler


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


class Window:
    """A daily maintenance window in a time zone: ``(start, end)`` minutes after midnight."""

    def __init__(self, minutes: tuple[int, int], timezone: str) -> None:
        self.start, self.end = minutes
        self.tz = ZoneInfo(timezone)

    def contains(self, when: dt.datetime) -> bool:
        local = when.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # spans midnight

    def closes_after(self, when: dt.datetime) -> dt.datetime:
        """The next end of the window after ``when`` (aware datetime)."""
        local = when.astimezone(self.tz)
        end = local.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(
            minutes=self.end
        )
        if end <= local:
            end += dt.timedelta(days=1)
        return end

    def describe(self) -> str:
        def hhmm(minutes: int) -> str:
            return f"{minutes // 60:02d}:{minutes % 60:02d}"

        return f"{hhmm(self.start)}-{hhmm(self.end)}"
