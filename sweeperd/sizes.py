"""Sizes in bytes as written in the config: ``"64MB"``, ``"1GB"``, ``"512kB"``, ``"16MiB"``.

Units are PostgreSQL's (``kB``, ``MB``, ``GB``, ``TB``, powers of 1024, as in ``postgresql.conf``),
in any case, with or without an ``i`` (``MiB``); ``B`` is bytes. A bare integer is bytes too, so
``max_replica_lag_bytes = 67108864`` means what it says.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|(b)?)", re.IGNORECASE)
EXPECTATION = 'a size such as "64MB", "1GB" or "512kB" (or an integer number of bytes)'
MAX_BYTES = 1 << 60  # an exabyte: nothing WAL-sized is bigger, and it stays exact in a double


def parse_size(value: str | int) -> int:
    """The size in bytes; raise ValueError naming the expected form."""
    if isinstance(value, bool):
        raise ValueError(f"expected {EXPECTATION}, got a boolean")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        found = _SIZE.fullmatch(value.strip())
        if found is None:
            raise ValueError(f"expected {EXPECTATION}, got {value!r}")
        number, unit = float(found[1]), (found[2] or found[3] or "").lower()
    size = round(number * _UNITS[unit])
    if size < 0:
        raise ValueError(f"expected {EXPECTATION}, got {value!r}")
    if size > MAX_BYTES:
        raise ValueError(f"expected a size of at most 1EB, got {value!r}")
    return size


def format_size(size: float) -> str:
    """Bytes for humans, PostgreSQL-style (``pg_size_pretty``-like): ``64MB``, ``1.5GB``, ``0B``."""
    for unit, factor in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if abs(size) >= factor:
            scaled = size / factor
            return f"{scaled:.3g}{unit}" if scaled != int(scaled) else f"{int(scaled)}{unit}"
    return f"{int(size)}B"
