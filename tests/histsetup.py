"""The set-up shared by the run-history and ``sweeperd status`` tests (``from histsetup import``).

A drop-in plugin (``plugins.d/hist.py``) contributes deterministic operations that need no
privileges:

- ``hist.ok``: returns the length of the tenant's name as its row count (honours ``--dry-run``);
- ``hist.flaky``: fails with a division by zero in the tenants named by ``[plugins.hist] fail``,
  returns None (rows not meaningful) elsewhere;
- ``hist.db``: scope ``database``, returns 7.

:func:`write_setup` writes the plugin and a ``sweeperd.toml`` that uses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from support import install_plugin

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


TENANTS = ("acme", "globex", "initech")
FAILING = "globex"
DIVISION_BY_ZERO = "DivisionByZero (SQLSTATE 22012): division by zero"

SWEEPS: dict[str, dict[str, Any]] = {
    "nightly": {"cron": "0 3 * * *", "operations": ["hist.ok", "hist.flaky"]},
    "hourly": {"interval": "1h", "operations": ["hist.ok", "hist.db"], "tenants": ["acme"]},
}


def write_setup(
    directory: Path,
    databases: Mapping[str, str],
    *,
    tenants: Mapping[str, str] | None = None,
    fail: Sequence[str] = (FAILING,),
    history: Mapping[str, Any] | None = None,
    sweeps: Mapping[str, Mapping[str, Any]] = SWEEPS,
    name: str = "sweeperd.toml",
    connect_timeout: str = "5s",
    numbered_schemas: bool = False,
) -> Path:
    """The plugin in ``plugins.d`` and a config (``name``); ``tenants`` maps name → database.

    A tenant's schema is ``tenant_<name>``, or ``tenant_<i>`` (its position) with
    ``numbered_schemas``, for tenant names that are not identifiers.
    """
    (directory / "plugins.d").mkdir(exist_ok=True)
    install_plugin(directory / "plugins.d", "hist.py")
    if tenants is None:
        tenants = dict.fromkeys(TENANTS, "main")
    doc: dict[str, Any] = {
        "daemon": {"max_concurrency": 8, "plugin_dirs": ["plugins.d"]},
        "log": {"format": "json", "level": "info"},
        "history": dict(history or {}),
        "databases": {
            db: {"dsn": dsn, "max_connections": 4, "connect_timeout": connect_timeout}
            for db, dsn in databases.items()
        },
        "tenants": [
            {
                "name": t,
                "database": db,
                "schema": f"tenant_{i}" if numbered_schemas else f"tenant_{t}",
            }
            for i, (t, db) in enumerate(tenants.items())
        ],
        "sweeps": {sweep: dict(body) for sweep, body in sweeps.items()},
        "plugins": {"hist": {"fail": list(fail)}},
    }
    path = directory / name
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path
