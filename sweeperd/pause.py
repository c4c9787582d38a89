"""``sweeperd pause`` / ``resume``: a pause kept in the database itself, honoured by every instance.

The state is one row of ``sweeperd.pause`` in the paused database: whoever runs sweeps there, on
whatever host and under whatever name its config gives the database, reads it with its health
gates (:mod:`sweeperd.throttle`) within ``check_every``. A pause ``--for`` a duration ends by
itself (``until``); pausing again replaces the pause (its reason and end), resuming deletes it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from dataclasses import dataclass
from typing import Any

from .db import AsyncConn, Database

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
_UPSERT = f"""
INSERT INTO sweeperd.pause (paused_by, reason, until)
VALUES (%(by)s, %(reason)s, now() + %(for)s::interval)
ON CONFLICT (only_one) DO UPDATE
   SET paused_by = excluded.paused_by, paused_at = now(), reason = excluded.reason,
       until = excluded.until
RETURNING {COLUMNS}
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

    def describe(self) -> str:
        """``paused by alice@ops1 at 2026-01-03 10:00:00+00:00 until …: reason``."""
        text = f"paused by {self.by} since {_short(self.at)}"
        text += f" until {_short(self.until)}" if self.until is not None else " (until resumed)"
        return f"{text}: {self.reason}" if self.reason else text


def _short(when: dt.datetime) -> str:
    return when.isoformat(sep=" ", timespec="seconds")


def who() -> str:
    """``user@host`` of whoever runs the command (the uid where the user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


async def pause(
    database: Database, *, by: str, reason: str | None, duration: float | None
) -> Pause:
    """Pause ``database`` (for ``duration`` seconds, or until resumed); the pause in force."""
    async with database.housekeeping("pause") as conn:
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
    assert row is not None
    paused = Pause.of(row)
    assert paused is not None
    return paused


async def resume(database: Database) -> Pause | None:
    """End the pause of ``database``; the pause that was in force, if any."""
    async with database.housekeeping("resume") as conn:
        if not await _exists(conn):
            return None
        async with database.transaction(conn):
            cur = await conn.execute(f"DELETE FROM sweeperd.pause RETURNING {COLUMNS}")
            row = await cur.fetchone()
    ended = Pause.of(row) if row is not None else None
    if ended is not None and ended.until is not None and ended.until <= dt.datetime.now(dt.UTC):
        return None  # it had ended by itself
    return ended


async def current(conn: AsyncConn) -> Pause | None:
    """The pause in force on the database of ``conn`` (None: none, or no pause table yet)."""
    if not await _exists(conn):
        return None
    cur = await conn.execute(_SELECT)
    row = await cur.fetchone()
    return Pause.of(row) if row is not None else None


async def _exists(conn: AsyncConn) -> bool:
    cur = await conn.execute("SELECT pg_catalog.to_regclass('sweeperd.pause') IS NOT NULL")
    row = await cur.fetchone()
    return bool(row and row[0])
