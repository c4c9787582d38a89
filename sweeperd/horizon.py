"""The xmin horizon: who keeps VACUUM from removing dead tuples ("dead but not yet removable").

VACUUM removes no row version deleted after the oldest of (for a table of the database it runs
in):

- a backend of the *same database* with a snapshot or a transaction id: a long transaction, a
  session left ``idle in transaction`` (backends of other databases do not count for its tables);
- a replication slot's ``xmin`` (a physical slot fed by a standby with ``hot_standby_feedback``),
  whatever database the slot is for. A slot's ``catalog_xmin`` (logical slots) only holds back
  the system catalogs, never a tenant's table, so it is left out here;
- a prepared transaction (``PREPARE TRANSACTION``) of the same database, until it is committed or
  rolled back: it survives restarts;
- the feedback of a standby that streams without a slot (``hot_standby_feedback = on``): the
  walsender's ``backend_xmin``.

:func:`find_holder` asks for all of them in one query and returns the oldest (by ``age(xmin)``)
as a :class:`Horizon`, or None when nothing holds the horizon back. Left out: the querying
backend itself, and backends running VACUUM (autovacuum workers, and ``VACUUM`` statements other
than ``VACUUM FULL``): PostgreSQL ignores their xmin (``PROC_IN_VACUUM``) when it computes the
horizon of other vacuums. Parallel workers are left out in favour of their leader.

Privileges (checked on PostgreSQL 18 and 15 with a plain ``LOGIN`` role, and with one granted
``pg_monitor``):

- ``pg_stat_activity``: ``pid``, ``datid``, ``usesysid``, ``application_name``, ``backend_xid``
  and ``backend_xmin`` are visible to every role, so a holder is always *found*. Its
  ``state``, ``query``, ``backend_type``, ``xact_start``, ``state_change`` and ``backend_start``
  are NULL for the sessions of other roles unless the role has ``pg_read_all_stats`` (a member
  of ``pg_monitor``) or is a member of the session's role: then the holder reads
  ``pid 4711 (details need pg_read_all_stats, application billing)``, with no age (``age_s``
  None: it never makes a vacuum skip). Without ``backend_type`` an autovacuum worker is told by
  its missing role (``usesysid`` NULL) and left out, and a ``VACUUM`` statement of another role
  cannot be told from any other holder.
- ``pg_replication_slots`` and ``pg_prepared_xacts``: readable by every role, in full.
- ``pg_stat_replication``: ``pid``, ``application_name`` and ``backend_xmin`` are visible to every
  role (they come from ``pg_stat_activity``); nothing else is needed here.

So a role without ``pg_monitor`` names every holder but cannot say how long a backend has held it
nor in which state; ``GRANT pg_monitor TO sweeperd`` gives the whole picture.

Wording of :attr:`Horizon.held_by`:

- ``pid 4711 (idle in transaction 10m, application billing)``: the state and for how long (since
  ``state_change`` when idle in transaction, since ``xact_start`` otherwise), ``application …``
  only when it has a name; ``age_s`` is the seconds since ``xact_start`` (``backend_start``
  when there is no transaction);
- ``replication slot cdc``: ``age_s`` None, except on PostgreSQL 17+ for an inactive slot
  (seconds since ``inactive_since``);
- ``prepared transaction <gid>``: ``age_s`` since it was prepared;
- ``standby feedback (walsender pid 4712, application standby1)``: ``age_s`` None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg.rows import tuple_row

from .durations import format_duration

if TYPE_CHECKING:
    from .db import AsyncConn

__all__ = ["Horizon", "find_holder", "holder_query"]


@dataclass(frozen=True, slots=True)
class Horizon:
    """The oldest holder of the xmin horizon.

    :param held_by: who, in words (see the module docstring).
    :param age_s: for how long, in seconds, when that is known (None: a replication slot that
        is in use, a standby's feedback, a backend whose details the role may not see).
    :param xmin_age: ``age()`` of the xmin (or transaction id) it holds: how many transactions
        the horizon lags behind.
    :param kind: ``"backend"``, ``"replication slot"``, ``"prepared transaction"`` or
        ``"standby feedback"``.
    """

    held_by: str
    age_s: float | None
    xmin_age: int
    kind: str

    def to_json(self) -> dict[str, Any]:
        """What a result's ``details["horizon"]`` holds."""
        return {
            "held_by": self.held_by,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "xmin_age": self.xmin_age,
        }


# Rows: kind, pid, visible, state, application_name, state_s, age_s, xmin_age, name.
# No parameters and no '%': the text is sent as it is; E'' strings whatever
# standard_conforming_strings says. The database filter compares datid with
# the current database's oid (a backend of another database does not hold this one's tables).
_BACKENDS = r"""
SELECT 'backend', a.pid, a.backend_type IS NOT NULL, coalesce(a.state, a.backend_type),
       a.application_name,
       extract(epoch FROM statement_timestamp()
                          - CASE WHEN starts_with(a.state, 'idle in transaction')
                                 THEN a.state_change ELSE a.xact_start END)::float8,
       extract(epoch FROM statement_timestamp()
                          - coalesce(a.xact_start, a.backend_start))::float8,
       greatest(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid)),
       NULL::text
  FROM pg_catalog.pg_stat_activity a
 WHERE a.datid = (SELECT d.oid FROM pg_catalog.pg_database d
                   WHERE d.datname = pg_catalog.current_database())
   AND a.pid <> pg_catalog.pg_backend_pid()
   AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
   AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
   AND a.backend_type IS DISTINCT FROM 'walsender'
   AND NOT (a.backend_type IS NULL AND a.usesysid IS NULL)
   AND (a.leader_pid IS NULL OR a.leader_pid = a.pid)
   AND NOT (a.query ~* E'^\\s*vacuum\\M' AND a.query !~* E'^\\s*vacuum\\s*(\\([^)]*)?\\mfull\\M')
"""
# The slot's xmin only: catalog_xmin (logical slots) holds back the system catalogs, not the
# tables sweeperd vacuums.
_SLOTS = """
SELECT 'replication slot', NULL::int, true, NULL::text, NULL::text, NULL::float8,
       {inactive_s}, pg_catalog.age(s.xmin), s.slot_name::text
  FROM pg_catalog.pg_replication_slots s
 WHERE s.xmin IS NOT NULL
"""
_PREPARED = """
SELECT 'prepared transaction', NULL::int, true, NULL::text, NULL::text, NULL::float8,
       extract(epoch FROM statement_timestamp() - p.prepared)::float8,
       pg_catalog.age(p.transaction), p.gid
  FROM pg_catalog.pg_prepared_xacts p
 WHERE p.database = pg_catalog.current_database()
"""
# A standby streaming through a slot feeds the slot's xmin (above); without a slot its feedback
# is the walsender's own xmin.
_FEEDBACK = """
SELECT 'standby feedback', r.pid, true, NULL::text, r.application_name, NULL::float8,
       NULL::float8, pg_catalog.age(r.backend_xmin), NULL::text
  FROM pg_catalog.pg_stat_replication r
 WHERE r.backend_xmin IS NOT NULL
"""


def holder_query(server_version: int) -> str:
    """The one query :func:`find_holder` runs on a server of this ``server_version_num``."""
    inactive_s = (
        "extract(epoch FROM statement_timestamp() - s.inactive_since)::float8"
        if server_version >= 170000
        else "NULL::float8"
    )
    parts = [_BACKENDS, _SLOTS.format(inactive_s=inactive_s), _PREPARED, _FEEDBACK]
    return "SELECT * FROM (" + " UNION ALL ".join(parts) + ") h ORDER BY 8 DESC LIMIT 1"


async def find_holder(conn: AsyncConn) -> Horizon | None:
    """The oldest holder of the xmin horizon of ``conn``'s database; None when there is none.

    One query (:func:`holder_query`) on ``conn``, which may be autocommit or inside a
    transaction (its own snapshot is left out either way).
    """
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(holder_query(conn.info.server_version))
        row = await cur.fetchone()
    return None if row is None else _horizon(row)


def _horizon(row: tuple[Any, ...]) -> Horizon:
    kind, pid, visible, state, application, state_s, age_s, xmin_age, name = row
    app = f", application {application}" if application else ""
    if kind == "backend":
        if not visible:
            held_by = f"pid {pid} (details need pg_read_all_stats{app})"
        else:
            how_long = f" {format_duration(max(0.0, state_s))}" if state_s is not None else ""
            held_by = f"pid {pid} ({state or 'unknown state'}{how_long}{app})"
    elif kind == "replication slot":
        held_by = f"replication slot {name}"
    elif kind == "prepared transaction":
        held_by = f"prepared transaction {name}"
    else:
        held_by = f"standby feedback (walsender pid {pid}{app})"
    return Horizon(
        held_by=held_by,
        age_s=None if age_s is None else max(0.0, float(age_s)),
        xmin_age=int(xmin_age),
        kind=str(kind),
    )
