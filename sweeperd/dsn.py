"""DSNs as written in the configuration: their syntax, and text with their passwords removed.

Never connects; anything that prints a DSN or an error that may quote one goes through here.
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


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
