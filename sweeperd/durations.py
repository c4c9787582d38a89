"""Durations as written in the config.

``"500ms"``, ``"30s"``, ``"15m"`` (or ``"15min"``), ``"2h"``, ``"90d"``, ``"1h30m"``.
"""

from __future__ import annotations

import re

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
# Longest alternatives first: "ms" and "min" must not be read as "m" followed by junk.
_UNIT = r"(ms|min|sec|s|m|h|d|w)"
_PART = re.compile(r"(\d+(?:\.\d+)?)" + _UNIT)
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?" + _UNIT + r")+")

EXPECTATION = 'a duration such as "500ms", "30s", "15m", "2h", "90d" or "1h30m"'

# The longest duration anything accepts. Every consumer can represent it: datetime arithmetic
# around now (year 9999), APScheduler's triggers and grace times, PostgreSQL intervals and
# timestamps (a cutoff of now() minus it), timeouts as float seconds. Nothing sensible is longer.
MAX_SECONDS = 36500 * 86400.0
MAX_TEXT = "36500d (100 years)"


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError naming the expected form.

    Units must be written (a bare ``"30"`` is ambiguous: seconds? minutes?), so they are required.
    At most :data:`MAX_SECONDS`.
    """
    compact = text.strip().replace(" ", "")
    if not compact or not _WHOLE.fullmatch(compact):
        raise ValueError(f"expected {EXPECTATION}, got {text!r}")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    if not seconds <= MAX_SECONDS:  # also infinity: "1" followed by 400 zeros
        raise ValueError(f"expected a duration of at most {MAX_TEXT}, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds compactly for humans (``1h30m``, ``250ms``); the inverse of parse_duration."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds != int(seconds) else f"{int(seconds)}s"
    parts = []
    remaining = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= size:
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
    return "".join(parts)
