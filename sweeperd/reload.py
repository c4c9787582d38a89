"""What a reload does with the databases it had: keep them, open new ones, retire the old pools.

A database whose settings did not change keeps its pool (and its connections, its retry in the
background if it is down). One that is new or changed is opened afresh; the pool it replaces,
and the pool of one the new configuration dropped, is retired: it takes no new work and closes
once the sweeps still running on it are done.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import DatabaseConfig
from .db import Database


@dataclass(frozen=True, slots=True)
class DatabaseChanges:
    keep: Mapping[str, Database]  # unchanged settings: carried over as they are (old order)
    open: tuple[str, ...]  # new or changed: to be opened (the new configuration's order)
    retire: tuple[Database, ...]  # replaced or dropped: its pool is retired (old order)


def diff_databases(
    old: Mapping[str, Database], new: Mapping[str, DatabaseConfig]
) -> DatabaseChanges:
    """From the databases in use (each knows the settings it was opened with) and the new
    configuration's ``[databases]``."""
    keep = {name: db for name, db in old.items() if new.get(name) == db.config}
    return DatabaseChanges(
        keep=keep,
        open=tuple(name for name in new if name not in keep),
        retire=tuple(db for name, db in old.items() if name not in keep),
    )
