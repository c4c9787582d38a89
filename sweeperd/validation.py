"""The readers of the core configuration's own kinds of values (:mod:`sweeperd.settings` reads).

Paths (``~`` expanded, relative to the config file), DSNs and the files and systemd credentials
holding them, LIKE patterns, crontab expressions, time windows, globs and PostgreSQL timeouts. Each
reports its problems at its key, saying what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import like
from .dsn import check_dsn
from .settings import (
    NAMEDATALEN,
    At,
    Invalid,
    Reader,
    duration,
    kind_of,
    reader,
    text,
    toml_key,
    zone,
)

__all__ = ["MAX_PG_TIMEOUT_MS", "NAMEDATALEN", "Known", "kind_of", "toml_key"]

MAX_PG_TIMEOUT_MS = 2_147_483_647  # INT_MAX: PostgreSQL rejects larger timeout settings
_MAX_DSN_BYTES = 64 * 1024
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class Known:
    """What some sections need from others, taken from the document up front.

    So each section's problems stand on their own: a tenant naming a database whose table has
    problems is not also told the database does not exist.
    """

    base: Path  # the config file's directory: relative paths are relative to it
    databases: frozenset[str]  # the [databases] keys whose values are tables
    timezone: str  # [daemon] timezone, or UTC if it is not one: what crons are read in

    @classmethod
    def of(cls, doc: Mapping[str, Any], path: Path) -> Known:
        databases = doc.get("databases")
        daemon = doc.get("daemon")
        timezone = daemon.get("timezone", "UTC") if isinstance(daemon, dict) else "UTC"
        try:
            zone()(timezone, At())
        except Invalid:
            timezone = "UTC"  # reported with [daemon]
        return cls(
            base=path.parent,
            databases=frozenset(name for name, t in databases.items() if isinstance(t, dict))
            if isinstance(databases, dict)
            else frozenset(),
            timezone=timezone,
        )


def _known(at: At) -> Known:
    assert isinstance(at.context, Known)
    return at.context


_DURATION = duration()


@reader(_DURATION.expectation)
def server_timeout(value: Any, at: At) -> float:
    """A duration PostgreSQL accepts as a timeout setting (at most 2147483647 ms; 0 = off)."""
    seconds = _DURATION(value, at)
    if seconds * 1000 > MAX_PG_TIMEOUT_MS:
        raise Invalid(
            "expected at most 24d20h31m23s (PostgreSQL's limit for "
            f'timeouts, {MAX_PG_TIMEOUT_MS} ms); use "0s" to disable it'
        )
    return seconds


MIN_CLAIM_LEASE_S = 2.0


@reader(_DURATION.expectation)
def claim_lease(value: Any, at: At) -> float:
    """``[daemon] claim_lease``: long enough to be renewed (every third of it) in time, and a
    server timeout (it bounds an idle transaction of a fenced batch)."""
    seconds = server_timeout(value, at)
    if seconds < MIN_CLAIM_LEASE_S:
        raise Invalid(f'expected a duration of at least 2s, got "{value}"')
    return seconds


_GLOBS = 'a non-empty list of glob strings, e.g. ["*"]'


@reader(_GLOBS)
def globs(value: Any, at: At) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(g, str) and g for g in value):
        raise Invalid(f"expected {_GLOBS}")
    return tuple(value)


_WINDOW_TEXT = text('a time window such as "01:00-05:00" (24-hour clock; may span midnight)')


@reader(_WINDOW_TEXT.expectation)
def window(value: Any, at: At) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as minutes after midnight (start, end)."""
    written = _WINDOW_TEXT(value, at)
    match = _WINDOW.fullmatch(written.strip())
    wrong = Invalid(f"expected {_WINDOW_TEXT.expectation}, got {written!r}")
    if match is None:
        raise wrong
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2) or (h1, m1) == (h2, m2):
        raise wrong
    return h1 * 60 + m1, h2 * 60 + m2


cron = text('a crontab expression such as "0 3 * * *"', empty=True)


def cron_problem(expr: str, timezone: str) -> str | None:
    """Why APScheduler would refuse ``expr``, or None.

    APScheduler is the authority on what it will accept; validating with it avoids a config that
    passes check-config and then fails at daemon start.
    """
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr, timezone=timezone)
    except (ValueError, TypeError) as exc:
        return f'expected a 5-field crontab expression such as "0 3 * * *", got {expr!r} ({exc})'
    return None


def expand(value: str, at: At) -> Path | None:
    """``~``/``~user`` expanded and relative to the config file, or None (reported)."""
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # ~no_such_user, or no home directory for ~
        at.problem(f"expected a path whose ~ can be expanded, got {value!r} ({exc})")
        return None
    return path if path.is_absolute() else _known(at).base / path


@reader("a list of directory paths")
def directories(value: Any, at: At) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of directory paths, got {kind_of(value)}")
    out: list[Path] = []
    for i, d in enumerate(value):
        if not isinstance(d, str) or not d:
            at.at(i).problem("expected a directory path string")
            continue
        # Relative paths are relative to the config file, not to wherever the daemon started.
        path = expand(d, at.at(i))
        if path is not None:
            out.append(path)
    return tuple(out)


LIKE_PATTERN = text('a LIKE pattern such as "tenant_%"')


@reader(LIKE_PATTERN.expectation)
def like_pattern(value: Any, at: At) -> str:
    pattern = LIKE_PATTERN(value, at)
    if bad := like.problem(pattern):
        raise Invalid(f"expected a LIKE pattern: {bad}")
    return pattern


_PREFIX = text("a string", empty=True)


@reader(_PREFIX.expectation)
def prefix(t: Mapping[str, Any], at: At) -> str:
    """``prefix``, by default the literal text before the first unescaped % of ``schemas``.

    ``"tenant\\\\_%"`` strips ``tenant_``. Reads the whole table (``setting(keys=("prefix",))``).
    """
    if "prefix" in t:
        return at.get("prefix", _PREFIX) or ""
    schemas = t.get("schemas")
    return like.prefix(schemas) if isinstance(schemas, str) and not like.problem(schemas) else ""


DSN_KEYS = ("dsn", "dsn_file", "dsn_credential")
_DSN = text("a libpq URI or conninfo string", empty=True)
_CREDENTIAL = text("a systemd credential name", empty=True)
_DSN_FILE = text("a path to a file holding the DSN", empty=True)


@reader("a libpq URI or conninfo")
def dsn(t: Mapping[str, Any], at: At) -> str:
    """One of ``dsn``, ``dsn_file`` or ``dsn_credential``: the DSN. Reads the whole table."""
    given = [key for key in DSN_KEYS if key in t]
    if len(given) > 1:
        raise Invalid(f"expected one of dsn, dsn_file or dsn_credential, got {given}")
    if not given:
        at.at("dsn").problem(
            "required: a libpq URI or conninfo (or dsn_file = a file holding one, or "
            "dsn_credential = the name of a systemd credential holding one)"
        )
        return ""
    if given == ["dsn"]:
        value = at.get("dsn", _DSN)
        if value is not None:
            _check_dsn(value, at.at("dsn"))
        return value or ""
    if given == ["dsn_credential"]:
        key = at.at("dsn_credential")
        name = at.get("dsn_credential", _CREDENTIAL)
        if name is None:
            return ""
        if name in ("", ".", "..") or "/" in name:
            key.problem(f"expected a systemd credential name (no '/'), got {name!r}")
            return ""
        # $CREDENTIALS_DIRECTORY rather than /run/credentials/<unit>/: the same config then
        # works for the service and for `sweeperd --unit`'s transient units.
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            key.problem(
                f"expected $CREDENTIALS_DIRECTORY to be set (systemd sets it for a unit "
                f"with LoadCredential={name}:<file>); outside the unit, run the command "
                f"as `sweeperd --unit <unit> <command>`"
            )
            return ""
        return _read_dsn(Path(directory) / name, key)
    file_at = at.at("dsn_file")
    value = at.get("dsn_file", _DSN_FILE)
    path = None if value is None else expand(value, file_at)
    return "" if path is None else _read_dsn(path, file_at)


def _read_dsn(path: Path, at: At) -> str:
    try:
        # A systemd credential or a secrets mount: DSN and password stay out of the TOML.
        # A regular file, and a DSN-sized read: a FIFO would block check-config forever,
        # /dev/zero would eat the memory.
        if not path.is_file():
            at.problem(f"expected a readable file, {path}: not a regular file")
            return ""
        with path.open("rb") as stream:
            data = stream.read(_MAX_DSN_BYTES + 1)
        if len(data) > _MAX_DSN_BYTES:
            at.problem(f"expected a DSN of at most {_MAX_DSN_BYTES} bytes in {path}")
            return ""
        value = data.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        at.problem(f"expected a readable file, {path}: {reason}")
        return ""
    _check_dsn(value, at)
    return value


def _check_dsn(value: str, at: At) -> None:
    problem = check_dsn(value)
    if problem:
        at.problem(f"expected a libpq URI or conninfo string ({problem})")


def _plugin_tables(value: Any, at: At) -> Mapping[str, Mapping[str, Any]]:
    """``[plugins.<name>]`` tables, as written: each plugin reads its own."""
    if not isinstance(value, dict):
        raise Invalid(f"expected tables [plugins.<name>], got {kind_of(value)}")
    out: dict[str, Mapping[str, Any]] = {}
    for name, settings in value.items():
        if isinstance(settings, dict):
            out[name] = MappingProxyType(settings)
        else:
            at.at(name).problem(f"expected a table of settings, got {kind_of(settings)}")
    return MappingProxyType(out)


plugin_tables: Reader[Mapping[str, Mapping[str, Any]]] = Reader(_plugin_tables, "tables")
