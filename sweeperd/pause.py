"""``sweeperd pause`` / ``resume``: a pause kept in the database itself, honoured by every instance.

The state is one row of ``sweeperd.pause`` in the paused database: whoever runs sweeps there, on
whatever host and under whatever name its config gives the database, reads it with its health
gates (:mod:`sweeperd.throttle`) within ``check_every``. A pause ``--for`` a duration ends by
itself (``until``, by the server's clock); pausing again replaces the pause (its reason and end),
resuming deletes it.

The table is created on the first pause (schema ``sweeperd`` too, if missing). Once it exists,
pausing and resuming need no more than ``SELECT, INSERT, UPDATE, DELETE`` on it (and ``USAGE`` on
the schema): a DBA can create it for an operator role that may not create anything.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from .db import AsyncConn, Database
from .errors import describe_error, is_insufficient_privilege
from .problems import printable

TABLE = "sweeperd.pause"
DDL = """
CREATE TABLE IF NOT EXISTS sweeperd.pause (
    only_one  boolean PRIMARY KEY DEFAULT true CHECK (only_one),
    paused_by text NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason    text,
    until     timestamptz
)
"""
# The pause in force (an expired one is none), as columns a sampler can join to its own query.
COLUMNS = "paused_by, paused_at, reason, until"
IN_FORCE = "until IS NULL OR until > now()"
_SELECT = f"SELECT {COLUMNS} FROM sweeperd.pause WHERE {IN_FORCE}"
# The new pause, and the one in force that it replaces (NULLs: none). The CTE reads the table as
# the statement began, before the upsert.
_UPSERT = f"""
WITH old AS ({_SELECT}),
new AS (
    INSERT INTO sweeperd.pause (paused_by, reason, until)
    VALUES (%(by)s, %(reason)s, now() + %(for)s::interval)
    ON CONFLICT (only_one) DO UPDATE
       SET paused_by = excluded.paused_by, paused_at = now(), reason = excluded.reason,
           until = excluded.until
    RETURNING {COLUMNS}
)
SELECT new.*, old.* FROM new LEFT JOIN old ON true
"""
# Whether schema sweeperd and the table exist, from the catalogs: unlike to_regclass() this needs
# no USAGE on the schema, so a role without it learns which GRANT it lacks rather than failing.
EXISTS = """EXISTS (SELECT FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'sweeperd' AND c.relname = 'pause')"""
_STATE = f"""
SELECT pg_catalog.to_regnamespace('sweeperd') IS NOT NULL,
       {EXISTS}
"""


@dataclass(frozen=True, slots=True)
class Pause:
    """A pause in force: who set it (``user@host``), when, why, and until when (None: resumed by
    hand)."""

    by: str
    at: dt.datetime
    reason: str | None
    until: dt.datetime | None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> Pause | None:
        """From the :data:`COLUMNS` of a row (None when they are NULL: no pause)."""
        by, at, reason, until = row
        return None if by is None else cls(by, at, reason, until)

    def describe(self, *, open_end: bool = True) -> str:
        """``paused by alice@ops1 since 2026-01-03 10:00:00+00:00 until …: reason``, one line
        (times in UTC; whatever the row holds is escaped: anyone may write the table with SQL).

        A pause without an end says ``(until resumed)``, unless ``open_end`` is false (where it
        has just been resumed or replaced)."""
        text = f"paused by {printable(self.by)} since {_short(self.at)}"
        if self.until is not None:
            text += f" until {_short(self.until)}"
        elif open_end:
            text += " (until resumed)"
        return f"{text}: {printable(self.reason)}" if self.reason else text

    def to_json(self) -> dict[str, Any]:
        """The pause as ``sweeperd status --json`` shows it (ISO 8601 times, UTC)."""
        return {
            "paused_by": self.by,
            "paused_at": self.at.astimezone(dt.UTC).isoformat(),
            "until": self.until.astimezone(dt.UTC).isoformat() if self.until else None,
            "reason": self.reason,
        }


def _short(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(sep=" ", timespec="seconds")


def who() -> str:
    """``user@host`` of whoever runs the command (the uid where the user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def one_line(reason: str) -> str | None:
    """A ``--reason`` as stored: line breaks and other whitespace runs folded into one space
    (None when nothing is left). Raises ValueError for other control characters (NUL, ESC, …),
    which no reason needs and a terminal showing it would obey."""
    folded = " ".join(reason.split())
    bad = sorted({ch for ch in folded if ch < " " or "\x7f" <= ch <= "\x9f"})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        raise ValueError(f"expected one line of text, without control characters ({shown})")
    return folded or None


class NoPrivilege(Exception):
    """The role may not create or change the pause table: ``error`` what PostgreSQL said,
    ``fix`` the GRANT that helps."""

    def __init__(self, error: str, fix: str) -> None:
        super().__init__(f"{error} (fix: {fix})")
        self.error = error
        self.fix = fix


async def pause(
    database: Database, *, by: str, reason: str | None, duration: float | None
) -> tuple[Pause, Pause | None]:
    """Pause ``database`` (for ``duration`` seconds, or until resumed): the pause in force now,
    and the one in force before that it replaced (None: it was not paused).

    Raises :class:`NoPrivilege` when the role may not create or write the table.
    """
    async with database.housekeeping("pause") as conn:
        schema, table = await _state(conn)
        try:
            if not table:  # CREATE TABLE IF NOT EXISTS needs CREATE on the schema even then
                await database.ensure_schema(conn, DDL)
            async with database.transaction(conn):
                cur = await conn.execute(
                    _UPSERT,
                    {
                        "by": by,
                        "reason": reason,
                        "for": dt.timedelta(seconds=duration) if duration is not None else None,
                    },
                )
                row = await cur.fetchone()
        except Exception as exc:
            if is_insufficient_privilege(exc):
                raise NoPrivilege(describe_error(exc), _fix(database, schema, table)) from exc
            raise
    assert row is not None
    paused = Pause.of(row[:4])
    assert paused is not None
    return paused, Pause.of(row[4:])


async def resume(database: Database) -> Pause | None:
    """End the pause of ``database``; the pause that was in force, if any.

    Raises :class:`NoPrivilege` when the role may not read or change the table.
    """
    async with database.housekeeping("resume") as conn:
        schema, table = await _state(conn)
        if not table:
            return None
        try:
            async with database.transaction(conn):
                cur = await conn.execute(
                    f"DELETE FROM sweeperd.pause RETURNING {COLUMNS}, {IN_FORCE}"
                )
                row = await cur.fetchone()
        except Exception as exc:
            if is_insufficient_privilege(exc):
                raise NoPrivilege(describe_error(exc), _fix(database, schema, table)) from exc
            raise
    if row is None or not row[4]:
        return None  # none, or it had ended by itself (by the server's clock)
    return Pause.of(row[:4])


async def current(conn: AsyncConn) -> Pause | None:
    """The pause in force on the database of ``conn`` (None: none, or no pause table yet)."""
    if not await exists(conn):
        return None
    return await read(conn)


async def exists(conn: AsyncConn) -> bool:
    """Whether the pause table exists (asks the catalogs: needs no privilege on it)."""
    return (await _state(conn))[1]


async def read(conn: AsyncConn) -> Pause | None:
    """The pause in force, from a table known to exist (one query)."""
    cur = await conn.execute(_SELECT)
    row = await cur.fetchone()
    return Pause.of(row) if row is not None else None


async def _state(conn: AsyncConn) -> tuple[bool, bool]:
    cur = await conn.execute(_STATE)
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


def _fix(database: Database, schema: bool, table: bool) -> str:
    """The GRANT a DBA runs for this role, for what exists of the pause table now."""
    role = _ident(database.user) if database.user else "<sweeperd role>"
    if table:
        return (
            f"GRANT USAGE ON SCHEMA sweeperd TO {role}; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON sweeperd.pause TO {role};"
        )
    if schema:
        return f"GRANT USAGE, CREATE ON SCHEMA sweeperd TO {role};"
    dbname = _ident(database.dbname) if database.dbname else "<database>"
    return (
        f"GRANT CREATE ON DATABASE {dbname} TO {role}; or create schema sweeperd and "
        f"GRANT USAGE, CREATE ON SCHEMA sweeperd TO {role};"
    )


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)
