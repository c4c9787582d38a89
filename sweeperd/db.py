"""The only module that talks to the database driver (psycopg 3 and psycopg_pool).

One :class:`Database` per ``[databases.<name>]``: an explicitly opened ``AsyncConnectionPool`` whose
connections are autocommit, carry ``lock_timeout``/``statement_timeout`` as session defaults (set in
the startup packet, so they cost no round trip and survive ``RESET ALL``), and get one statement
when they are handed out: it resets the session (whatever the previous operation changed),
labels it with ``application_name`` for the work item, and doubles as the liveness check (stale
connections after a server restart are replaced, not handed to an operation). That is one round
trip per operation instead of three (check, label, reset-on-return); measured, it cut the
runner's client CPU by a third. Connections left idle at the end of a sweep are reset then
(:meth:`Database.scrub_idle`), so no operation's state outlives its sweep; an open transaction
never survives a return to the pool (the pool rolls it back).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .config import DatabaseConfig
from .telemetry import telemetry

__all__ = [
    "Database",
    "DatabaseUnreachable",
    "check_dsn",
    "describe_error",
    "is_insufficient_privilege",
    "qualified",
    "sql",
    "sqlstate_of",
]

APPLICATION_NAME = "sweeperd"
_APP_NAME_BYTES = 63  # NAMEDATALEN - 1: the server truncates beyond this

AsyncConn = psycopg.AsyncConnection[Any]
_RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; UNLISTEN *; "
    "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP"
)
_DDL_LOCK_KEY = 0x5357_4545_5045_5244  # "SWEEPERD": serializes sweeperd's own schema DDL


class DatabaseUnreachable(Exception):
    """A database could not be connected to at all (``sweeperd sweep`` exits 3)."""

    def __init__(self, database: str, reason: str) -> None:
        super().__init__(f"database {database!r} unreachable: {reason}")
        self.database = database
        self.reason = reason


def qualified(schema: str, table: str) -> sql.Identifier:
    """A schema-qualified, safely quoted table name; the only way names reach SQL."""
    return sql.Identifier(schema, table)


def check_dsn(dsn: str) -> str | None:
    """Return why ``dsn`` is not a valid libpq URI/conninfo, or None (never connects)."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the fragment it choked on, which may be part of a password: keep its
        # words, drop every quoted fragment.
        message = re.sub(r'"[^"]*"', '"…"', str(exc).splitlines()[0])
        return redact(message)
    return None


def redact_dsn(dsn: str) -> str:
    """The DSN with any password removed, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable dsn>"
    params.pop("password", None)
    return make_conninfo("", **params) or "<defaults from PG* environment>"


_PASSWORD_IN_TEXT = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)|(://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE
)


def redact(text: str) -> str:
    """Blank out anything that looks like a password in free text (error messages)."""

    def repl(m: re.Match[str]) -> str:
        if m.group(1):
            return f"{m.group(1)}***"
        return f"{m.group(3)}***{m.group(5)}"

    return _PASSWORD_IN_TEXT.sub(repl, text)


def is_insufficient_privilege(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.InsufficientPrivilege)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE PostgreSQL reported for ``exc``, if it is a database error that has one."""
    return exc.sqlstate if isinstance(exc, psycopg.Error) else None


def describe_error(exc: BaseException) -> str:
    """One line for the report: the class, the SQLSTATE where PostgreSQL gave one, the message."""
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        primary = exc.diag.message_primary if state else None
        message = primary or str(exc) or type(exc).__name__
        message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        name = type(exc).__name__
        return redact(f"{name} (SQLSTATE {state}): {message}" if state else f"{name}: {message}")
    if isinstance(exc, PoolTimeout):
        return f"PoolTimeout: no connection available: {exc}"
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def application_name(label: str) -> str:
    """``sweeperd: <label>`` cut to what the server keeps (non-ASCII becomes '?' there anyway)."""
    name = f"{APPLICATION_NAME}: {label}".encode("ascii", "replace")[:_APP_NAME_BYTES]
    return name.decode("ascii")


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class Database:
    """A pool for one configured database."""

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self.name = config.name
        self.server_version = 0
        self.server_address: str | None = None  # host name, address or unix socket directory
        self.server_port: int | None = None
        self.slot: asyncio.Semaphore | None = None  # the runner's per-database slot
        self.dbname: str | None = None
        self.user: str | None = None
        self._pool: AsyncConnectionPool[AsyncConn] | None = None

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "application_name": APPLICATION_NAME,
            "connect_timeout": max(1, round(self.config.connect_timeout)),
        }

    def _options(self, effective: str) -> str:
        """libpq's options plus our timeouts, as startup parameters.

        Startup parameters are the session's defaults: they cost no round trip and survive
        RESET ALL (ours or an operation's). ``effective`` is what libpq itself used (the DSN,
        PGOPTIONS or a service file): passing options= replaces it, so it is carried over.
        """
        cfg = self.config
        ours = (
            f"-c lock_timeout={_ms(cfg.lock_timeout)} "
            f"-c statement_timeout={_ms(cfg.statement_timeout)}"
        )
        return f"{effective} {ours}".strip()

    async def open(self) -> None:
        """Connect once to fail fast with the real reason, then open the pool.

        The pool's own open() reports only a timeout; a direct first connection reports
        "password authentication failed" or "no such database", which is what a user needs.
        """
        kwargs = self._connect_kwargs()
        try:
            probe = await psycopg.AsyncConnection.connect(self.config.dsn, **kwargs)
        except psycopg.Error as exc:
            raise DatabaseUnreachable(self.name, describe_error(exc)) from None
        except OSError as exc:
            raise DatabaseUnreachable(self.name, describe_error(exc)) from None
        async with probe:
            self.server_version = probe.info.server_version
            self.server_address = probe.info.host or None
            self.server_port = probe.info.port or None
            self.dbname, self.user = probe.info.dbname, probe.info.user
            effective = next((o.val for o in probe.pgconn.info if o.keyword == b"options"), None)
        kwargs["options"] = self._options(effective.decode() if effective else "")
        self._pool = AsyncConnectionPool(
            self.config.dsn,
            kwargs=kwargs,
            min_size=1,
            max_size=self.config.max_connections,
            open=False,
            name=f"sweeperd-{self.name}",
            # Neither check= nor reset=: the statement at checkout does both (see _checkout).
            timeout=self.config.connect_timeout + 5.0,
        )
        try:
            await self._pool.open(wait=True, timeout=self.config.connect_timeout + 5.0)
        except PoolTimeout as exc:
            await self._pool.close()
            self._pool = None
            raise DatabaseUnreachable(self.name, describe_error(exc)) from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def connection(self, label: str) -> AsyncIterator[AsyncConn]:
        """A pooled connection labelled ``sweeperd: <label>`` in ``pg_stat_activity``."""
        if self._pool is None:
            raise RuntimeError(f"database {self.name!r} is not open")
        pool = self._pool
        t0 = time.perf_counter()
        conn = await self._checkout(pool, application_name(label))
        telemetry().connection_wait.record(
            time.perf_counter() - t0, {"db.client.connection.pool.name": self.name}
        )
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    async def _checkout(self, pool: AsyncConnectionPool[AsyncConn], name: str) -> AsyncConn:
        """Get a live connection, reset and labelled, in one round trip.

        A connection the server dropped while it sat in the pool (restart, failover,
        pg_terminate_backend) fails the statement; it is handed back (the pool discards closed
        connections and opens replacements) and the next one is tried.
        """
        prelude = sql.SQL(_RESET_SESSION + "; SET application_name = {}").format(sql.Literal(name))
        attempts = self.config.max_connections + 1
        for attempt in range(attempts):
            conn = await pool.getconn()
            try:
                if not conn.autocommit:  # an operation switched it off; the pool rolled back
                    await conn.set_autocommit(True)
                await conn.execute(prelude)
                return conn
            except psycopg.OperationalError:
                await pool.putconn(conn)
                if not conn.closed or attempt == attempts - 1:
                    raise
            except BaseException:
                await pool.putconn(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def housekeeping(self, label: str) -> AsyncIterator[AsyncConn]:
        """A connection for sweeperd's own queries, inside the database's concurrency cap.

        Without the cap, discovery or a history write could find the pool exhausted by running
        operations and fail a whole sweep on a pool timeout.
        """
        async with self.slot or contextlib.nullcontext(), self.connection(label) as conn:
            yield conn

    async def find_schemas(self, like: str) -> list[str]:
        """Schemas whose name matches the LIKE pattern, in name order."""
        async with self.housekeeping("discover") as conn:
            cur = await conn.execute(
                "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname LIKE %s ORDER BY 1",
                (like,),
            )
            return [row[0] for row in await cur.fetchall()]

    async def scrub_idle(self) -> None:
        """Reset the connections idle in the pool (at the end of a sweep).

        Resetting happens when a connection is handed out; this makes sure nothing an operation
        left behind (an advisory lock, a role, a setting) stays on an idle connection until the
        next sweep. Connections in use by another sweep are not touched.
        """
        pool = self._pool
        if pool is None:
            return
        idle = pool.get_stats().get("pool_available", 0)
        taken: list[AsyncConn] = []
        try:
            for _ in range(idle):
                try:
                    conn = await pool.getconn(timeout=0.1)
                except PoolTimeout:
                    break  # another sweep took the rest meanwhile
                taken.append(conn)
                with contextlib.suppress(psycopg.Error):
                    if not conn.autocommit:
                        await conn.set_autocommit(True)
                    await conn.execute(_RESET_SESSION)
        finally:
            for conn in taken:
                await pool.putconn(conn)

    async def ensure_schema(self, conn: AsyncConn, ddl: str) -> None:
        """Create schema ``sweeperd`` if missing, then run idempotent DDL in it.

        CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists, so
        it is only issued when the schema is missing: a DBA can create the schema for a role that
        may not create schemas. Two sessions creating at once can still collide in the catalog; a
        transaction-scoped advisory lock serializes sweeperd's instances.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
            cur = await conn.execute("SELECT pg_catalog.to_regnamespace('sweeperd') IS NULL")
            row = await cur.fetchone()
            if row is not None and row[0]:
                await conn.execute("CREATE SCHEMA sweeperd")
            await conn.execute(ddl)

    async def warm(self, connections: int) -> None:
        """Open up to ``connections`` now, concurrently, instead of one at a time on demand.

        psycopg_pool grows by one connection at a time while clients wait; a sweep about to run
        32 operations at once would spend its first hundreds of milliseconds ramping up.
        """
        if self._pool is not None:
            wanted = max(1, min(connections, self.config.max_connections))
            if wanted > self._pool.min_size:
                await self._pool.resize(wanted, self.config.max_connections)

    async def cool(self) -> None:
        """Let the pool shrink back (idle connections close after the pool's max_idle)."""
        if self._pool is not None and self._pool.min_size > 1:
            await self._pool.resize(1, self.config.max_connections)

    def pool_stats(self) -> dict[str, int]:
        return self._pool.get_stats() if self._pool is not None else {}
