"""What went wrong with the database, in one line for a report, a log or STATUS."""

from __future__ import annotations

import psycopg

from .dsn import redact


class DatabaseUnreachable(Exception):
    """A database could not be connected to at all (``sweeperd sweep`` exits 3)."""

    def __init__(self, database: str, reason: str) -> None:
        super().__init__(f"database {database!r} unreachable: {reason}")
        self.database = database
        self.reason = reason


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
    if isinstance(exc, DatabaseUnreachable):
        return redact(f"database unreachable: {exc.reason}")
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
