"""The only module that talks to the database driver (psycopg 3).

One :class:`Database` per ``[databases.<name>]``: a strictly bounded pool (:mod:`sweeperd.pool`)
of autocommit connections that never use server-side prepared statements (behind a transaction
pooler another client's Bind could reach them), and a checkout statement chosen by what sits
between us and the server (``pooler``):

* ``"none"`` (a direct connection): ``lock_timeout``/``statement_timeout`` travel in the startup
  packet (no round trip, and they survive ``RESET ALL``); at checkout one statement resets the
  session, labels it with ``application_name`` and doubles as the liveness check.
* ``"session"``: PgBouncer refuses the ``options`` startup parameter, so the checkout statement
  sets the timeouts after its reset; the server session is ours for as long as the connection.
* ``"transaction"``: every transaction may run on another server session, so nothing is ever set
  or reset on a session: the checkout statement is an empty query (liveness only), timeouts that
  matter are ``SET LOCAL`` in the transaction that needs them
  (:func:`~sweeperd.model.timed_transaction`), and statements that cannot run in a transaction
  (VACUUM) get the role's defaults, which :meth:`Database.refresh` compares with the
  configuration once, logging the ``ALTER ROLE … IN DATABASE … SET`` that fixes a difference.

Connection failures that pass (too many connections, a server starting up or shutting down,
refused or reset connections) are waited out for ``connect_retry``; a caller waiting meanwhile
also takes any connection another one gives back. Idle connections are closed when the last sweep
using the database ends, so the daemon holds none between firings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .config import DatabaseConfig
from .errors import DatabaseUnreachable, describe_error
from .model import timed_transaction
from .pool import Budget, Pool, PoolBusy, PoolClosed
from .preflight import peer_hint
from .telemetry import telemetry

log = structlog.get_logger("sweeperd.db")

APPLICATION_NAME = "sweeperd"
_APP_NAME_BYTES = 63  # NAMEDATALEN - 1: the server truncates beyond this

AsyncConn = psycopg.AsyncConnection[Any]
_RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; UNLISTEN *; "
    "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP"
)
_DDL_LOCK_KEY = 0x5357_4545_5045_5244  # "SWEEPERD": serializes sweeperd's own schema DDL
_CHECK = """
SELECT pg_catalog.pg_is_in_recovery(),
       (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'lock_timeout'),
       (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'statement_timeout'),
       current_user, current_database()
"""
STANDBY = "database is in recovery (standby): sweeperd works on the primary only"
# Set while open()/refresh() connect: they try even a database known to be down (per task).
_PROBING: ContextVar[bool] = ContextVar("sweeperd_db_probing", default=False)
_ROOM_WAIT_S = 1.0  # open(retry=False): how long to wait for room in the budget
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0
# Connection failures that pass on their own: too many connections, admin shutdown, the server
# starting up or shutting down, and connection exceptions (class 08) other than a protocol
# violation (08P01, which is also how PgBouncer reports most of its own errors: decided by text).
_TRANSIENT_STATES = {
    "53300",
    "57P01",
    "57P02",
    "57P03",
    "08000",
    "08001",
    "08003",
    "08004",
    "08006",
}
# Failures that waiting does not fix; libpq gives connection errors no SQLSTATE, so by text.
_PERMANENT_TEXT = (
    "authentication failed",
    "pg_hba.conf",
    "no password supplied",
    "does not exist",
    "no such database",
    "no such user",
    "not currently accepting connections",  # ALTER DATABASE ... ALLOW_CONNECTIONS false
    "unsupported startup parameter",
    "name or service not known",  # an unknown host (not "temporary failure in name resolution")
    "invalid connection option",
    "invalid port",
    "permission denied",
    "certificate",
    "server does not support ssl",
    "sslmode value",
)


def application_name(label: str) -> str:
    """``sweeperd: <label>`` cut to what the server keeps (non-ASCII becomes '?' there anyway)."""
    name = f"{APPLICATION_NAME}: {label}".encode("ascii", "replace")[:_APP_NAME_BYTES]
    return name.decode("ascii")


def is_transient(exc: BaseException) -> bool:
    """Whether a failure to connect (or of the checkout statement) may pass if we wait."""
    if isinstance(exc, DatabaseUnreachable):
        return False  # already waited out
    state = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    if state in _TRANSIENT_STATES:
        return True
    if state is not None and (state.startswith("28") or state in ("3D000", "42501")):
        return False
    if not isinstance(exc, psycopg.OperationalError | OSError):
        return False
    text = str(exc).lower()
    return not any(words in text for words in _PERMANENT_TEXT)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class Database:
    """A bounded pool for one configured database, and what sweeperd knows about the server."""

    def __init__(self, config: DatabaseConfig, budget: Budget | None = None) -> None:
        self.config = config
        # Shared with the Database objects a reload makes for the same name.
        self.budget = budget or Budget(config.max_connections)
        self.name = config.name
        self.server_version = 0
        self.server_address: str | None = None  # host name, address or unix socket directory
        self.server_port: int | None = None
        self._housekeeping_slot: AbstractAsyncContextManager[Any] | None = (
            None  # see cap_housekeeping()
        )
        self.dbname: str | None = None
        self.user: str | None = None
        self.in_recovery = False  # as of the last refresh()
        # Why connecting failed after connect_retry. Until open() or refresh() succeed again,
        # other connects fail at once with it instead of each waiting connect_retry again.
        self.down: str | None = None
        self._pool: Pool | None = None
        self._startup_options: str | None = None  # pooler "none": libpq's options + timeouts
        self._checked_timeouts = False
        self._users = 0  # sweeps using the database now (idle connections close at zero)
        self._retrying_since: float | None = None
        self._quiet = False  # the reconnector logs its own attempts

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    # -- connecting -------------------------------------------------------------------------------
    def _kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            # Server-side prepared statements do not follow the client through a transaction
            # pooler (another client's Bind can reach ours): never prepare, in any mode.
            "prepare_threshold": None,
            "application_name": APPLICATION_NAME,
            "connect_timeout": max(1, round(self.config.connect_timeout)),
        }

    async def _connect(self) -> AsyncConn:
        """One connection attempt (the pool retries transient failures)."""
        if self.down is not None and not _PROBING.get():
            raise DatabaseUnreachable(self.name, self.down)
        kwargs = self._kwargs()
        if self.config.pooler == "none":
            if self._startup_options is None:
                await self._learn_options(kwargs)
            kwargs["options"] = self._startup_options
        conn = await psycopg.AsyncConnection.connect(self.config.dsn, **kwargs)
        self._recovered()
        return conn

    def _transient(self, exc: BaseException) -> bool:
        # A socket directory that does not exist is a typo, not a server that is down (whose
        # directory exists without the socket file): no point in waiting for it.
        if "no such file or directory" in str(exc).lower() and self._socket_dirs_missing():
            return False
        return is_transient(exc)

    def _socket_dirs_missing(self) -> bool:
        try:
            hosts = str(conninfo_to_dict(self.config.dsn).get("host") or "").split(",")
        except psycopg.Error:
            return False
        dirs = [h for h in hosts if h.startswith("/")]
        return bool(dirs) and len(dirs) == len(hosts) and not any(os.path.isdir(d) for d in dirs)

    def _new_pool(self, connect: Any, size: int) -> Pool:
        return Pool(
            connect,
            size,
            retry_for=self.config.connect_retry,
            transient=self._transient,
            on_retry=self._retrying,
            first_backoff=_FIRST_BACKOFF_S,
            max_backoff=_MAX_BACKOFF_S,
            budget=self.budget,
        )

    def _retrying(self, exc: BaseException) -> None:
        """A transient failure: said once per episode (every retry would flood the log)."""
        if self._retrying_since is None:
            self._retrying_since = time.monotonic()
            if self._quiet:
                return
            log.warning(
                "cannot connect yet; waiting it out",
                database=self.name,
                error=self.connect_error(exc),
                connect_retry_s=self.config.connect_retry,
            )

    def _recovered(self) -> None:
        if self._retrying_since is not None:
            waited = time.monotonic() - self._retrying_since
            self._retrying_since = None
            if not self._quiet:
                log.info("connected after waiting", database=self.name, waited_s=round(waited, 2))

    def connect_error(self, exc: BaseException) -> str:
        """describe_error, plus what to do when a pooler refused our startup parameters."""
        text = describe_error(exc)
        if "unsupported startup parameter" in text.lower():
            text += (
                f" (a connection pooler refused it: set [databases.{self.name}] pooler = "
                '"transaction" or "session" to match its pool_mode)'
            )
        hint = peer_hint(text)
        return f"{text} ({hint})" if hint else text

    async def _learn_options(self, kwargs: dict[str, Any]) -> None:
        """pooler "none": libpq's own options (DSN, PGOPTIONS or a service file), since passing
        ``options=`` replaces them, with our timeouts added.

        Asked of the server once, by a connection made (and closed) in the room reserved for the
        first real one: it never counts twice against the database's budget.
        """
        probe = await psycopg.AsyncConnection.connect(self.config.dsn, **kwargs)
        try:
            effective = next((o.val for o in probe.pgconn.info if o.keyword == b"options"), None)
        finally:
            probe.pgconn.finish()
        cfg = self.config
        ours = (
            f"-c lock_timeout={_ms(cfg.lock_timeout)} "
            f"-c statement_timeout={_ms(cfg.statement_timeout)}"
        )
        self._startup_options = f"{effective.decode() if effective else ''} {ours}".strip()

    def _unreachable(self, exc: BaseException) -> DatabaseUnreachable:
        if isinstance(exc, DatabaseUnreachable):
            return exc
        reason = self.connect_error(exc)
        self.down = reason
        self._retrying_since = None
        return DatabaseUnreachable(self.name, reason)

    async def open(self, *, quiet: bool = False, retry: bool = True) -> None:
        """Connect (waiting out transient failures for ``connect_retry``) and :meth:`refresh`.

        Raises :class:`DatabaseUnreachable` with libpq's reason. Calling it again on an open
        database only refreshes it (how the daemon retries a database that went away).
        ``quiet``: the caller reports the outcome itself; ``retry=False``: one attempt only, and
        no long wait for room in the database's budget (the daemon's start and reloads, which
        retry in the background instead of delaying READY; a reload's new pool whose old one
        still holds every connection is checked at its first sweep instead).
        """
        self._quiet = quiet
        fresh = self._pool is None
        if self._pool is None:
            self._pool = self._new_pool(self._connect, self.config.max_connections)
        try:
            async with self.use():  # the connection it takes is not kept idle afterwards
                await self.refresh(retry=retry, room_timeout=None if retry else _ROOM_WAIT_S)
        except PoolBusy:
            log.info(
                "database's connections all in use by the pool it replaces; checked at the "
                "next sweep",
                database=self.name,
            )
        except BaseException:
            if fresh:
                await self.close()  # never opened: nothing half-open is left behind
            raise
        finally:
            self._quiet = False

    async def refresh(self, *, retry: bool = True, room_timeout: float | None = None) -> None:
        """At open and at the start of every sweep: is the server a standby now? (one query)

        The first time, also compare the timeouts the server applies with the configuration.
        Tries even when the database is known to be down; success clears that. Any failure is
        :class:`DatabaseUnreachable` (this database's problem, never the sweep's).
        """
        token = _PROBING.set(True)
        try:
            async with self.housekeeping("check", retry=retry, room_timeout=room_timeout) as conn:
                info = conn.info
                self.server_version = info.server_version
                self.server_address = info.host or None
                self.server_port = info.port or None
                cur = await conn.execute(_CHECK)
                row = await cur.fetchone()
        except (DatabaseUnreachable, PoolBusy):
            raise
        except Exception as exc:  # the server went away mid-query (shutdown, failover, ...)
            raise self._unreachable(exc) from None
        finally:
            _PROBING.reset(token)
        self.down = None
        assert row is not None
        in_recovery, lock_ms, statement_ms, user, dbname = row
        if bool(in_recovery) != self.in_recovery and self._checked_timeouts:
            log.warning(
                "database is now a standby; its work is skipped"
                if in_recovery
                else "database is no longer a standby; its work runs again",
                database=self.name,
            )
        self.in_recovery = bool(in_recovery)
        self.user, self.dbname = user, dbname
        if not self._checked_timeouts:
            self._checked_timeouts = True
            self._check_timeouts(int(lock_ms), int(statement_ms))

    def _check_timeouts(self, lock_ms: int, statement_ms: int) -> None:
        cfg = self.config
        wanted = {
            "lock_timeout": _ms(cfg.lock_timeout),
            "statement_timeout": _ms(cfg.statement_timeout),
        }
        actual = {"lock_timeout": lock_ms, "statement_timeout": statement_ms}
        wrong = [name for name in wanted if wanted[name] != actual[name]]
        if not wrong:
            return
        found = ", ".join(f"{n} = {actual[n]}ms" for n in wrong)
        if cfg.pooler == "transaction":
            fix = "; ".join(
                sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}")
                .format(
                    sql.Identifier(self.user or "sweeperd"),
                    sql.Identifier(self.dbname or "postgres"),
                    sql.Identifier(n),
                    sql.Literal(f"{wanted[n]}ms"),
                )
                .as_string(None)
                for n in wrong
            )
            log.warning(
                "behind a transaction pooler, statements outside a transaction (VACUUM) run "
                "under the role's defaults, which differ from the configuration",
                database=self.name,
                found=found,
                fix=fix + ";",
            )
        else:
            log.warning(
                "the timeouts sent at connect did not reach the server: a connection pooler "
                "that ignores startup parameters?",
                database=self.name,
                found=found,
                fix=f'set [databases.{self.name}] pooler = "transaction" or "session"',
            )

    async def retire(self) -> None:
        """A reload replaced this database: connections close as they come back, so the new
        pool gets the budget as soon as operations on this one finish."""
        if self._pool is not None:
            await self._pool.retire()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # -- handing out connections -----------------------------------------------------------------
    @asynccontextmanager
    async def connection(
        self, label: str, *, retry: bool = True, room_timeout: float | None = None
    ) -> AsyncIterator[AsyncConn]:
        """A pooled connection (labelled ``sweeperd: <label>`` where the pooler keeps sessions).

        Raises :class:`DatabaseUnreachable` when none could be had within ``connect_retry``.
        """
        pool = self._pool
        if pool is None:
            raise DatabaseUnreachable(self.name, self.down or "not open")
        t0 = time.perf_counter()
        conn = await self._checkout(pool, application_name(label), retry, room_timeout)
        telemetry().connection_wait.record(
            time.perf_counter() - t0, {"db.client.connection.pool.name": self.name}
        )
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    def _prelude(self, name: str) -> sql.SQL | sql.Composed:
        cfg = self.config
        if cfg.pooler == "transaction":
            return sql.SQL("")  # liveness only: no session state on a shared server session
        label = sql.SQL("SET application_name = {}").format(sql.Literal(name))
        if cfg.pooler == "session":
            timeouts = sql.SQL("SET lock_timeout = {}; SET statement_timeout = {}").format(
                sql.Literal(f"{_ms(cfg.lock_timeout)}ms"),
                sql.Literal(f"{_ms(cfg.statement_timeout)}ms"),
            )
            return sql.SQL("; ").join([sql.SQL(_RESET_SESSION), timeouts, label])
        return sql.SQL("; ").join([sql.SQL(_RESET_SESSION), label])

    async def _checkout(
        self, pool: Pool, name: str, retry: bool, room_timeout: float | None
    ) -> AsyncConn:
        """A live connection, reset and labelled where that is safe, in one round trip.

        A connection the server dropped while it sat in the pool (restart, failover,
        pg_terminate_backend) fails the statement; it is closed and the next one tried, waiting
        out transient failures for ``connect_retry``.
        """
        prelude = self._prelude(name)
        retry_for = self.config.connect_retry if retry else 0.0
        deadline = time.monotonic() + retry_for
        failures = 0
        while True:
            try:
                conn = await pool.getconn(retry_for, room_timeout=room_timeout)
            except (PoolBusy, PoolClosed):
                raise  # not the database's fault: no reason to call it down
            except Exception as exc:
                raise self._unreachable(exc) from None
            try:
                await conn.execute(prelude)
                return conn
            except psycopg.OperationalError as exc:
                await pool.discard(conn)
                failures += 1
                if not self._transient(exc) or time.monotonic() >= deadline:
                    raise self._unreachable(exc) from None
                if failures > pool.max_size:  # not just stale idle ones: the server is busy
                    self._retrying(exc)
                    delay = _FIRST_BACKOFF_S * 2 ** min(failures - pool.max_size, 5)
                    await asyncio.sleep(min(delay, _MAX_BACKOFF_S))
            except BaseException:
                await pool.putconn(conn)
                raise

    def cap_housekeeping(self, slot: AbstractAsyncContextManager[Any] | None) -> None:
        """Make :meth:`housekeeping` take a slot of ``slot`` first: the per-database slot that
        the operations a runner runs here take, so that together they stay within the cap.

        Until then it takes none: nothing runs on a database no runner was given (while it
        opens, say), so there is nothing to stay within the cap with.
        """
        self._housekeeping_slot = slot

    @asynccontextmanager
    async def housekeeping(
        self, label: str, *, retry: bool = True, room_timeout: float | None = None
    ) -> AsyncIterator[AsyncConn]:
        """A connection for sweeperd's own queries, inside the database's concurrency cap
        (:meth:`cap_housekeeping`).

        Without the cap, discovery or a history write could find the pool exhausted by running
        operations and fail a whole sweep on a pool timeout.
        """
        async with (
            self._housekeeping_slot or contextlib.nullcontext(),
            self.connection(label, retry=retry, room_timeout=room_timeout) as conn,
        ):
            yield conn

    def transaction(self, conn: AsyncConn) -> AbstractAsyncContextManager[AsyncConn]:
        """A transaction under the configured timeouts (``SET LOCAL``: safe behind any pooler)."""
        return timed_transaction(
            conn,
            lock_timeout=self.config.lock_timeout,
            statement_timeout=self.config.statement_timeout,
        )

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Database]:
        """Mark a sweep using the database; when the last one ends, idle connections close.

        So the daemon holds no connection between firings, and nothing a sweep left on a
        session (pooler "none"/"session") survives it.
        """
        self._users += 1
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0 and self._pool is not None:
                await self._pool.close_idle()

    async def warm(self, connections: int) -> None:
        """Open up to ``connections`` now, concurrently, instead of one at a time on demand."""
        if self._pool is not None and self.down is None:
            await self._pool.warm(connections)

    async def find_schemas(self, like: str) -> list[str]:
        """Schemas whose name matches the LIKE pattern, in name order."""
        async with self.housekeeping("discover") as conn:
            cur = await conn.execute(
                "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname LIKE %s ORDER BY 1",
                (like,),
            )
            return [row[0] for row in await cur.fetchall()]

    async def ensure_schema(self, conn: AsyncConn, ddl: str) -> None:
        """Create schema ``sweeperd`` if missing, then run idempotent DDL in it.

        CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists, so
        it is only issued when the schema is missing: a DBA can create the schema for a role that
        may not create schemas. Two sessions creating at once can still collide in the catalog; a
        transaction-scoped advisory lock (the only kind a transaction pooler keeps) serializes
        sweeperd's instances.
        """
        async with self.transaction(conn):
            await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
            cur = await conn.execute("SELECT pg_catalog.to_regnamespace('sweeperd') IS NULL")
            row = await cur.fetchone()
            if row is not None and row[0]:
                await conn.execute("CREATE SCHEMA sweeperd")
            await conn.execute(ddl)

    def pool_stats(self) -> dict[str, int]:
        return self._pool.stats() if self._pool is not None else {}
