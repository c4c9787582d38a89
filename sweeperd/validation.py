"""Typed, problem-collecting getters for the TOML configuration (used by sweeperd.config).

Every getter returns a usable default after recording a problem, so one pass over the document
reports every mistake at once, each naming the file, the key path and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .durations import EXPECTATION as DURATION_EXPECTATION
from .durations import parse_duration

MAX_PG_TIMEOUT_MS = 2_147_483_647  # INT_MAX: PostgreSQL rejects larger timeout settings
NAMEDATALEN = 63  # PostgreSQL truncates longer identifiers; a truncated schema is another schema
_WINDOW = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")

_MISSING = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """``key`` as TOML writes it in a dotted key path: bare, or quoted (``daemon."my key"``)."""
    if _BARE_KEY.fullmatch(key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Validator:
    """Typed getters that collect problems (file, key path, expectation) instead of raising."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def error(self, key: str, expectation: str) -> None:
        self.problems.append(f"{self.path}: {key}: {expectation}")

    # -- typed getters ---------------------------------------------------------------------------
    def table(
        self, parent: Mapping[str, Any], key: str, where: str, allowed: set[str]
    ) -> dict[str, Any]:
        value = parent.get(key, _MISSING)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.error(where, f"expected a table, got {kind_of(value)}")
            return {}
        self.unknown(value, where, allowed)
        return value

    def unknown(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                self.error(
                    f"{prefix}{toml_key(key)}",
                    f"unknown key (expected one of: {', '.join(sorted(allowed))})",
                )

    def get(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        kind: type | tuple[type, ...],
        default: Any,
        expectation: str,
    ) -> Any:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return default
        # TOML booleans are not integers here, whatever Python thinks.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.error(f"{where}.{key}", f"expected {expectation}, got a boolean")
            return default
        if not isinstance(value, kind):
            self.error(f"{where}.{key}", f"expected {expectation}, got {kind_of(value)}")
            return default
        return value

    def string(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        default: Any = _MISSING,
        expectation: str = "a non-empty string",
        allow_empty: bool = False,
    ) -> Any:
        """A string value; one problem at most per key (wrong type, empty, or missing)."""
        fallback = None if default is _MISSING else default
        if key not in t:
            if default is _MISSING:
                self.error(f"{where}.{key}", f"required: {expectation}")
            return fallback
        value = t[key]
        if not isinstance(value, str):
            self.error(f"{where}.{key}", f"expected {expectation}, got {kind_of(value)}")
            return fallback
        if not value and not allow_empty:
            self.error(f"{where}.{key}", f"expected {expectation}, got an empty string")
            return fallback
        return value

    def positive_int(self, t: Mapping[str, Any], key: str, where: str, default: int) -> int:
        value = self.get(t, key, where, int, default, "a positive integer")
        if value < 1:
            self.error(f"{where}.{key}", f"expected a positive integer, got {value}")
            return default
        return int(value)

    def duration(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        default: float | None,
        allow_zero: bool = True,
    ) -> float | None:
        value = self.get(t, key, where, str, _MISSING, DURATION_EXPECTATION)
        if value is _MISSING:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(f"{where}.{key}", str(exc))
            return default
        if seconds == 0 and not allow_zero:
            self.error(f"{where}.{key}", "expected a duration greater than zero")
            return default
        return seconds

    def server_timeout(self, t: Mapping[str, Any], key: str, where: str, default: float) -> float:
        """A duration PostgreSQL accepts as a timeout setting (at most 2147483647 ms; 0 = off)."""
        value = self.duration(t, key, where, default) or 0.0
        if value * 1000 > MAX_PG_TIMEOUT_MS:
            self.error(
                f"{where}.{key}",
                "expected at most 24d20h31m23s (PostgreSQL's limit for "
                f'timeouts, {MAX_PG_TIMEOUT_MS} ms); use "0s" to disable it',
            )
            return default
        return value

    def globs(self, t: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = t.get(key, _MISSING)
        if value is _MISSING:
            return ("*",)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(g, str) and g for g in value)
        ):
            self.error(f"{where}.{key}", 'expected a non-empty list of glob strings, e.g. ["*"]')
            return ("*",)
        return tuple(value)

    def identifier(self, t: Mapping[str, Any], key: str, where: str) -> str | None:
        value = self.string(t, key, where)
        if isinstance(value, str) and len(value.encode("utf-8")) > NAMEDATALEN:
            self.error(
                f"{where}.{key}",
                f"expected a PostgreSQL name of at most {NAMEDATALEN} bytes "
                f"(longer names are silently truncated by the server)",
            )
            return None
        return value if isinstance(value, str) and value else None

    # -- sections ---------------------------------------------------------------------------------

    def choice(
        self, t: Mapping[str, Any], key: str, where: str, options: tuple[str, ...], default: str
    ) -> Any:
        expectation = "one of " + ", ".join(f'"{o}"' for o in options)
        value = self.string(t, key, where, default, expectation)
        if value not in options:
            self.error(f"{where}.{key}", f"expected {expectation}, got {value!r}")
            return default
        return value

    def window(self, t: Mapping[str, Any], where: str) -> tuple[int, int] | None:
        expectation = 'a time window such as "01:00-05:00" (24-hour clock; may span midnight)'
        value = self.string(t, "window", where, None, expectation)
        if value is None:
            return None
        match = _WINDOW.fullmatch(value.strip())
        if match is None:
            self.error(f"{where}.window", f"expected {expectation}, got {value!r}")
            return None
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2) or (h1, m1) == (h2, m2):
            self.error(f"{where}.window", f"expected {expectation}, got {value!r}")
            return None
        return h1 * 60 + m1, h2 * 60 + m2

    def cron(self, expr: str, where: str, timezone: str) -> None:
        # APScheduler is the authority on what it will accept; validating with it avoids a
        # config that passes check-config and then fails at daemon start.
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(expr, timezone=timezone)
        except (ValueError, TypeError) as exc:
            self.error(
                where,
                f'expected a 5-field crontab expression such as "0 3 * * *", got {expr!r} ({exc})',
            )


def kind_of(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
