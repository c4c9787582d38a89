"""Health gates and pauses: whether a database may start new work now.

``[databases.<name>.throttle]`` sets limits on what the primary says about its health: replay lag
of its standbys (in time and in bytes), WAL retained by replication slots, WAL segments waiting
for the archiver, active client sessions. While one is over its limit, or the database is paused
(``sweeperd pause``, :mod:`sweeperd.pause`), no new operation and no new retention batch starts on
it; statements already running finish, and every other database keeps going. Work resumes once
every signal has been under its limit for ``resume_after`` (hysteresis: a lag hovering around its
limit must not let a batch through on every dip); a pause ends when it is resumed or expires.

There is one :class:`Throttle` per database per process, and it is sampled on demand: the first
operation that wants to start (or to run its next batch) after ``check_every`` asks the server,
on a connection it holds anyway, and every other one shares the answer. Nothing is asked while
nothing starts, and a sample is one statement (every gate and the pause in one ``SELECT``), so
behind a transaction pooler it is as safe as any other query.

What is measured, and why so:

- *replica lag*: ``replay_lag`` of ``pg_stat_replication``, but only for a standby that has WAL
  left to replay: an idle primary's ``replay_lag`` is NULL, or the last value seen before it went
  idle, and a standby that has replayed everything is not behind whatever that column says;
- *replica lag bytes*: ``pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)``; a replay stall
  shows here even when the time lag does not move (it is computed from replies that stopped);
- *slot lag*: WAL a replication slot retains (``restart_lsn``), logical CDC slots included: an
  inactive slot retains WAL without bound;
- *archive backlog*: ``.ready`` files in ``pg_wal/archive_status`` (``pg_ls_archive_statusdir``);
- *active sessions*: client backends in state ``active`` other than sweeperd's own (by
  ``application_name``) and the sampler's, on the whole server.

Privileges: the slot lag needs none. Replica lag and active sessions need ``pg_read_all_stats``
(other roles' rows in those views are NULL without it, which would read as "no lag"), the archive
backlog EXECUTE on ``pg_ls_archive_statusdir()``; ``pg_monitor`` grants both. A gate that cannot
be read is reported once, shown by ``sweeperd status`` and treated as open; it never blocks work.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import structlog

from .durations import format_duration
from .errors import describe_error, sqlstate_of
from .pause import COLUMNS as PAUSE_COLUMNS
from .pause import EXISTS as PAUSE_EXISTS
from .pause import IN_FORCE as PAUSE_IN_FORCE
from .pause import Pause
from .sizes import format_size

if TYPE_CHECKING:
    from .config import ThrottleConfig

log = structlog.get_logger("sweeperd.throttle")

Connect = Callable[[], AbstractAsyncContextManager["psycopg.AsyncConnection[Any]"]]
# (status, reason) to give up waiting (the daemon stops, a window closes), or None to go on.
Interrupt = Callable[[], Any]

_STATS = "pg_read_all_stats"
SAMPLE_TIMEOUT_S = 10.0  # a sample that takes longer has failed (a hung connection, a lock)
_UNDEFINED_TABLE = "42P01"
_CURRENT_LSN = "pg_catalog.pg_current_wal_lsn()"


def _seconds(value: float) -> str:
    return format_duration(value)


def _count(value: float) -> str:
    return str(int(value))


@dataclass(frozen=True, slots=True)
class Gate:
    """One health signal: its ``[throttle]`` key, its words, and the query that reads it (one row
    of ``value, what``; no row means 0)."""

    key: str
    label: str
    reason: str  # the metric's reason attribute (low cardinality)
    query: str
    render: Callable[[float], str]
    needs: str | None = None  # a privilege, checked before the gate is used
    what: str = ""  # how the row's second column is introduced: "standby", "slot"


GATES: tuple[Gate, ...] = (
    Gate(
        "max_replica_lag",
        "replica lag",
        "replica_lag",
        "SELECT extract(epoch FROM replay_lag)::float8, application_name::text"
        " FROM pg_catalog.pg_stat_replication"
        f" WHERE state <> 'backup' AND pg_catalog.pg_wal_lsn_diff({_CURRENT_LSN}, replay_lsn) > 0"
        " AND replay_lag IS NOT NULL ORDER BY replay_lag DESC LIMIT 1",
        _seconds,
        needs=_STATS,
        what="standby",
    ),
    Gate(
        "max_replica_lag_bytes",
        "replica lag",
        "replica_lag_bytes",
        f"SELECT pg_catalog.pg_wal_lsn_diff({_CURRENT_LSN}, replay_lsn)::float8,"
        " application_name::text FROM pg_catalog.pg_stat_replication"
        " WHERE state <> 'backup' AND replay_lsn IS NOT NULL ORDER BY 1 DESC LIMIT 1",
        format_size,
        needs=_STATS,
        what="standby",
    ),
    Gate(
        "max_slot_lag_bytes",
        "slot lag",
        "slot_lag",
        f"SELECT pg_catalog.pg_wal_lsn_diff({_CURRENT_LSN}, restart_lsn)::float8, slot_name::text"
        " FROM pg_catalog.pg_replication_slots WHERE restart_lsn IS NOT NULL"
        " ORDER BY 1 DESC LIMIT 1",
        format_size,
        what="slot",
    ),
    Gate(
        "max_archive_backlog",
        "archive backlog",
        "archive_backlog",
        "SELECT count(*)::float8, NULL::text FROM pg_catalog.pg_ls_archive_statusdir()"
        " WHERE name LIKE '%.ready'",
        lambda n: f"{int(n)} segment(s)",
        needs="EXECUTE on pg_ls_archive_statusdir()",
    ),
    Gate(
        "max_active_sessions",
        "active sessions",
        "active_sessions",
        "SELECT count(*)::float8, NULL::text FROM pg_catalog.pg_stat_activity"
        " WHERE state = 'active' AND backend_type = 'client backend'"
        " AND pid <> pg_catalog.pg_backend_pid()"
        " AND application_name <> 'sweeperd' AND application_name NOT LIKE 'sweeperd: %'",
        _count,
        needs=_STATS,
    ),
)
_PRIVILEGES = (
    "SELECT pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE'),"
    " pg_catalog.has_function_privilege('pg_catalog.pg_ls_archive_statusdir()', 'EXECUTE'),"
    " current_user"
)


@dataclass(frozen=True, slots=True)
class Signal:
    """One gate's reading against its limit."""

    gate: Gate
    value: float
    limit: float
    what: str | None = None

    @property
    def over(self) -> bool:
        return self.value > self.limit

    def describe(self) -> str:
        """``replica lag 14s > 10s (standby walreceiver)``; ``<=`` when under."""
        sign = ">" if self.over else "<="
        text = f"{self.gate.label} {self.gate.render(self.value)} {sign} "
        text += self.gate.render(self.limit)
        if self.what and self.gate.what:
            text += f" ({self.gate.what} {self.what})"
        return text


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample: every readable gate, and the pause in force."""

    signals: tuple[Signal, ...] = ()
    pause: Pause | None = None

    @property
    def over(self) -> tuple[Signal, ...]:
        return tuple(s for s in self.signals if s.over)


@dataclass(slots=True)
class Wait:
    """What one wait cost: seconds in all, and by reason (the metric's attribute)."""

    seconds: float = 0.0
    by_reason: dict[str, float] = field(default_factory=dict)

    def add(self, reason: str, seconds: float) -> None:
        self.seconds += seconds
        self.by_reason[reason] = self.by_reason.get(reason, 0.0) + seconds


class Throttle:
    """One database's gates and pause, sampled on demand (see the module docstring).

    ``throttled`` and ``reason`` say the state as of the last sample; :meth:`wait` is what work
    calls before it starts.
    """

    def __init__(
        self,
        database: str,
        config: ThrottleConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.database = database
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self.gates = tuple(g for g in GATES if getattr(config, g.key) is not None)
        # Gates that cannot be read here (name → why), reported once; "pause" too.
        self.unavailable: dict[str, str] = {}
        self._usable: tuple[Gate, ...] | None = None  # known after the privilege check
        # sweeperd.pause: True it exists, None not (yet), False it cannot be read (privileges).
        self._pause_table: bool | None = None
        self.sampled_at = -math.inf
        self.reading: Reading | None = None
        self.throttled = False
        self.reason: str | None = None  # why it is throttled, for STATUS and logs
        self.kind = ""  # the metric's reason attribute while throttled
        self._last_over: float | None = None  # when a signal was last over its limit
        self._since: float | None = None  # when it became throttled
        self._sampling: asyncio.Task[None] | None = None
        self._ticket = -math.inf  # when a waiter last went to take its slots and sample
        self._changed = asyncio.Event()  # set (and replaced) at every decision
        self._failure: str | None = None  # the last sample's failure, said once per episode

    def holding_back(self) -> str | None:
        """Why work on the database is held back now (None: it is not, or nothing is waiting
        for it: a state nobody has sampled for a while is no news)."""
        stale = self._clock() - self.sampled_at > 3 * self.config.check_every + 1.0
        return None if not self.throttled or stale else self.reason

    # -- asking ------------------------------------------------------------------------------------
    def due(self) -> bool:
        return self._clock() - self.sampled_at >= self.config.check_every

    def fresh_and_open(self) -> bool:
        """The fast path of every start: nothing to ask, nothing to wait for."""
        return not self.throttled and not self.due()

    async def wait(self, connect: Connect) -> Wait:
        """Wait until the database is open, sampling on the caller's own connection (an
        operation between its steps); what the wait cost."""
        waited = Wait()
        while True:
            if self.due():
                await self.sample(connect)
            if not self.throttled:
                return waited
            kind = self.kind
            started = self._clock()
            await self._sleep(max(0.01, self.sampled_at + self.config.check_every - started))
            waited.add(kind, self._clock() - started)

    async def wait_known(self, interrupt: Interrupt | None = None) -> tuple[Wait, Any]:
        """Wait, holding nothing, while the database is known to be throttled.

        Returns when it is open, when ``interrupt`` returns something (that value), or when a
        new sample is due and nobody else went for it: that caller then takes its slots and
        samples (on a connection its slot makes room for), while the others go on waiting
        for the outcome. Sampling here, without a slot, could wait for a connection that only
        an operation waiting for this very sample would give back.
        """
        waited = Wait()
        every = self.config.check_every
        while self.throttled:
            if interrupt is not None and (verdict := interrupt()) is not None:
                return waited, verdict
            now = self._clock()
            if self.due() and now - self._ticket >= every:
                self._ticket = now
                return waited, None
            kind, changed = self.kind, self._changed
            until = self.sampled_at + every if not self.due() else self._ticket + every
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, until - now)):
                    await changed.wait()
            waited.add(kind, self._clock() - now)
        return waited, None

    async def sample(self, connect: Connect) -> None:
        """Read the gates now, once however many ask at the same time.

        The caller that starts a sample lends it its connection: cancelled, it takes the sample
        down with it (its connection goes back to the pool, no query may still run on it), and
        those who waited for that sample ask again themselves.
        """
        while True:
            task = self._sampling
            if task is None or task.done():
                task = self._sampling = asyncio.ensure_future(self._sample(connect))
                try:
                    await task  # cancelling us cancels it
                finally:
                    if self._sampling is task:
                        self._sampling = None
                return
            try:
                await asyncio.shield(task)
                return
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # The one who started it was cancelled: ask again, on our connection.

    async def _sample(self, connect: Connect) -> None:
        try:
            async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                async with connect() as conn:
                    reading = await self.read(conn)
        except Exception as exc:
            # Cannot read (the database went away, the sample hung, ...): the health gates
            # open, since the operations that need the database fail on their own; a pause
            # that was in force stays in force (until its end) until a sample says otherwise.
            reason = describe_error(exc)
            if self._failure != reason:
                self._failure = reason
                log.warning("cannot read the health gates", database=self.database, error=reason)
            self.sampled_at = self._clock()
            self._decide(Reading(pause=self._pause_still_in_force()))
            return
        self._failure = None
        self.sampled_at = self._clock()
        self._decide(reading)

    def _pause_still_in_force(self) -> Pause | None:
        pause = self.reading.pause if self.reading is not None else None
        if pause is None or (pause.until is not None and pause.until <= dt.datetime.now(dt.UTC)):
            return None
        return pause

    async def read(self, conn: psycopg.AsyncConnection[Any]) -> Reading:
        """One sample on ``conn``: the usable gates and the pause, in one statement."""
        if self._usable is None:
            self._usable = await self._check_privileges(conn)
        while True:
            gates = self._usable
            try:
                cur = await conn.execute(self._statement(gates))
                row = await cur.fetchone()
                break
            except psycopg.Error as exc:
                if sqlstate_of(exc) == _UNDEFINED_TABLE and self._pause_table:
                    self._pause_table = None  # dropped since: ask again
                    continue
                pause_table = self._pause_table
                await self._find_broken(conn, exc)
                if self._usable == gates and self._pause_table == pause_table:
                    raise  # nothing to leave out: the database's failure, not a gate's
        assert row is not None
        signals = []
        for i, gate in enumerate(gates):
            value, what = row[2 * i], row[2 * i + 1]
            signals.append(Signal(gate, float(value or 0.0), self._limit(gate), what))
        pause: Pause | None = None
        rest = row[2 * len(gates) :]
        if self._pause_table:
            pause = Pause.of(tuple(rest))
        elif rest[0]:
            # The table exists now (`sweeperd pause` makes it when first used): read the pause.
            # Until then every sample asks again, so a first pause is seen within check_every.
            self._pause_table = True
            return await self.read(conn)
        return Reading(tuple(signals), pause)

    def _limit(self, gate: Gate) -> float:
        return float(getattr(self.config, gate.key))

    def _statement(self, gates: tuple[Gate, ...]) -> str:
        columns = [f"g{i}.*" for i in range(len(gates))]
        joins = [f" LEFT JOIN LATERAL ({g.query}) AS g{i} ON true" for i, g in enumerate(gates)]
        if self._pause_table:
            columns.append(", ".join(f"p.{c.strip()}" for c in PAUSE_COLUMNS.split(",")))
            joins.append(f" LEFT JOIN sweeperd.pause AS p ON ({PAUSE_IN_FORCE})")
        elif self._pause_table is None:
            columns.append(PAUSE_EXISTS)  # to_regclass would need USAGE on the schema
        else:
            columns.append("NULL")
        return f"SELECT {', '.join(columns)} FROM (SELECT) AS one{''.join(joins)}"

    async def _check_privileges(self, conn: psycopg.AsyncConnection[Any]) -> tuple[Gate, ...]:
        if not self.gates:
            return ()
        cur = await conn.execute(_PRIVILEGES)
        row = await cur.fetchone()
        assert row is not None
        stats, archive, user = bool(row[0]), bool(row[1]), row[2]
        usable = []
        for gate in self.gates:
            lacking = (gate.needs == _STATS and not stats) or (
                gate.needs is not None and gate.needs != _STATS and not archive
            )
            if lacking:
                self._unusable(gate.key, f"needs {gate.needs} (GRANT pg_monitor TO {user})")
            else:
                usable.append(gate)
        return tuple(usable)

    async def _find_broken(self, conn: psycopg.AsyncConnection[Any], exc: psycopg.Error) -> None:
        """The combined statement failed: leave out each part that fails on its own."""
        if conn.closed or isinstance(exc, psycopg.OperationalError):
            return
        usable = []
        for gate in self._usable or ():
            try:
                await conn.execute(gate.query)
                usable.append(gate)
            except psycopg.OperationalError:
                raise
            except psycopg.Error as part:
                self._unusable(gate.key, describe_error(part))
        self._usable = tuple(usable)
        if self._pause_table:
            try:
                await conn.execute(f"SELECT {PAUSE_COLUMNS} FROM sweeperd.pause LIMIT 0")
            except psycopg.OperationalError:
                raise
            except psycopg.Error as part:
                self._pause_table = False
                self._unusable("pause", describe_error(part))

    def _unusable(self, key: str, why: str) -> None:
        if key in self.unavailable:
            return
        self.unavailable[key] = why
        if key == "pause":
            # Somebody may have paused the database and believe it paused: loud.
            log.error(
                "cannot read sweeperd.pause: a pause of this database would not be honoured",
                database=self.database,
                error=why,
                fix="GRANT USAGE ON SCHEMA sweeperd TO <role>; GRANT SELECT ON sweeperd.pause "
                "TO <role>",
            )
            return
        log.warning(
            "health gate unavailable; treated as open",
            database=self.database,
            gate=key,
            error=why,
        )

    # -- deciding ----------------------------------------------------------------------------------
    def _decide(self, reading: Reading) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        now = self._clock()
        self.reading = reading
        over = reading.over
        if over:
            self._last_over = now
        if reading.pause is not None:
            self._throttle("paused", reading.pause.describe())
        elif over:
            self._throttle(over[0].gate.reason, "; ".join(s.describe() for s in over))
        elif (
            self.throttled
            and self._last_over is not None
            and now - self._last_over < self.config.resume_after
        ):
            left = self.config.resume_after - (now - self._last_over)
            base = (self.reason or "").split(" (resuming")[0]
            self.reason = f"{base} (resuming in {format_duration(left)} if it stays under)"
        else:
            self._open()

    def _throttle(self, kind: str, reason: str) -> None:
        if not self.throttled or self.kind != kind:
            log.warning("database throttled", database=self.database, reason=reason)
        if not self.throttled:
            self._since = self._clock()
        self.throttled, self.kind, self.reason = True, kind, reason

    def _open(self) -> None:
        if self.throttled:
            held = self._clock() - (self._since or self._clock())
            log.info("database no longer throttled", database=self.database, after_s=round(held, 3))
        self.throttled, self.kind, self.reason, self._since = False, "", None, None
