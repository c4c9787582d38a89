"""Several sweeperd instances against the same databases: each (sweep firing, tenant) runs once.

Firings have a nominal time that every instance computes alike: the cron time, or a point on an
interval grid anchored at a fixed epoch (jitter only delays the start, it does not change the
firing). A firing's tenants are rows of ``sweeperd.claims`` in their own database, inserted by
whichever instance comes first (in urgency order, ``rank``); from there each instance claims them
a few at a time as its slots free up, under a lease it renews (:mod:`sweeperd.claimer`).
Database-scope operations are claimed under the tenant name ``""``. Claims are pruned after a
week.

Without the privileges to create the table the instance logs it once and runs everything (a
second instance might then repeat work, which is safe for retention and vacuum; missing cleanup
would not be).
"""

from __future__ import annotations

import datetime as dt
import time
import weakref
from collections.abc import Mapping

import structlog

from .claimer import FiringClaims
from .db import Database

log = structlog.get_logger("sweeperd.coordination")

DATABASE_SCOPE = ""  # the "tenant" under which database-scope work is claimed

# The first version's table had only (sweep, firing, tenant, instance, claimed_at), each row a
# claim made at the start of a firing; its rows are finished claims for this one. The DO block
# adds the columns once (ALTER TABLE takes an ACCESS EXCLUSIVE lock, even with IF NOT EXISTS).
_DDL = """
CREATE TABLE IF NOT EXISTS sweeperd.claims (
    sweep       text NOT NULL,
    firing      timestamptz NOT NULL,
    tenant      text NOT NULL,
    instance    text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep, firing, tenant)
);
CREATE INDEX IF NOT EXISTS claims_claimed_at ON sweeperd.claims (claimed_at);
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_attribute
        WHERE attrelid = 'sweeperd.claims'::regclass AND attname = 'lease_until'
            AND NOT attisdropped
    ) THEN
        ALTER TABLE sweeperd.claims
            ALTER COLUMN instance DROP NOT NULL,
            ADD COLUMN rank integer NOT NULL DEFAULT 0,
            ADD COLUMN lease_until timestamptz,
            ADD COLUMN started_at timestamptz,
            ADD COLUMN finished_at timestamptz,
            ADD COLUMN released_at timestamptz,
            ADD COLUMN taken_from text,
            ADD COLUMN taken_why text,
            ADD COLUMN attempts integer NOT NULL DEFAULT 0;
        UPDATE sweeperd.claims SET finished_at = claimed_at, started_at = claimed_at;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS claims_open ON sweeperd.claims (sweep, firing, rank)
    WHERE finished_at IS NULL
"""
_PRUNE = "DELETE FROM sweeperd.claims WHERE claimed_at < now() - interval '7 days'"
PRUNE_EVERY_S = 3600.0


class Claims:
    """One per process: who this instance is, and which databases have the table."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        # Databases whose schema exists. Weak: a Database a reload replaced is forgotten with it
        # (remembering id()s let a new object at a freed address skip creating the schema).
        self._ready: weakref.WeakSet[Database] = weakref.WeakSet()
        self.unavailable: set[str] = set()  # no privilege: logged once, everything runs
        self._pruned_at: dict[str, float] = {}

    def firing(
        self,
        databases: Mapping[str, Database],
        sweep: str,
        firing: dt.datetime,
        *,
        lease: float,
    ) -> FiringClaims:
        """The claims of one run of ``sweep`` for ``firing`` on ``databases``."""
        return FiringClaims(self, databases, sweep, firing, lease=lease)

    async def prepare(self, database: Database) -> None:
        """Create the table if this process has not yet; prune old claims once an hour."""
        async with database.housekeeping("claim") as conn:
            if database not in self._ready:
                await database.ensure_schema(conn, _DDL)
                self._ready.add(database)
            now = time.monotonic()
            if now - self._pruned_at.get(database.name, -PRUNE_EVERY_S) >= PRUNE_EVERY_S:
                async with database.transaction(conn):
                    await conn.execute(_PRUNE)  # claims only matter while a firing can recur
                self._pruned_at[database.name] = now
