"""Several sweeperd instances against the same databases: each (sweep firing, tenant) runs once.

Firings have a nominal time that every instance computes alike: the cron time, or a point on an
interval grid anchored at a fixed epoch (jitter only delays the start, it does not change the
firing). At the start of a firing an instance claims its tenants in ``sweeperd.claims`` with one
``INSERT … ON CONFLICT DO NOTHING RETURNING`` per database; only what it claimed, it runs.
Database-scope operations are claimed under the tenant name ``""``. Claims are pruned after a week.

Without the privileges to create the table the instance logs it once and runs everything (a
second instance might then repeat work, which is safe for retention and vacuum; missing cleanup
would not be).
"""

from __future__ import annotations

import datetime as dt
import time
import weakref
from collections.abc import Iterable, Mapping

import structlog

from .db import Database
from .errors import describe_error, is_insufficient_privilege

log = structlog.get_logger("sweeperd.coordination")

DATABASE_SCOPE = ""  # the "tenant" under which database-scope work is claimed

_DDL = """
CREATE TABLE IF NOT EXISTS sweeperd.claims (
    sweep      text NOT NULL,
    firing     timestamptz NOT NULL,
    tenant     text NOT NULL,
    instance   text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep, firing, tenant)
);
CREATE INDEX IF NOT EXISTS claims_claimed_at ON sweeperd.claims (claimed_at)
"""
_PRUNE = "DELETE FROM sweeperd.claims WHERE claimed_at < now() - interval '7 days'"
PRUNE_EVERY_S = 3600.0
_CLAIM = """
INSERT INTO sweeperd.claims (sweep, firing, tenant, instance)
SELECT %(sweep)s, %(firing)s, t, %(instance)s FROM unnest(%(tenants)s::text[]) AS t
ON CONFLICT DO NOTHING
RETURNING tenant
"""


class Claims:
    def __init__(self, instance: str) -> None:
        self.instance = instance
        # Databases whose schema exists. Weak: a Database a reload replaced is forgotten with it
        # (remembering id()s let a new object at a freed address skip creating the schema).
        self._ready: weakref.WeakSet[Database] = weakref.WeakSet()
        self._unavailable: set[str] = set()
        self._pruned_at: dict[str, float] = {}

    async def claim(
        self,
        databases: Mapping[str, Database],
        sweep: str,
        firing: dt.datetime,
        wanted: Mapping[str, Iterable[str]],
    ) -> tuple[dict[str, set[str]], dict[str, str]]:
        """For each database, the subset of ``wanted`` this instance now owns; and the databases
        where claiming failed (name → reason), whose work is then not done by this instance.

        Only a missing privilege (coordination impossible, not just failing right now) makes an
        instance run everything; a transient error must not let two instances do the same work.
        """
        owned: dict[str, set[str]] = {}
        failed: dict[str, str] = {}
        for name, tenants in wanted.items():
            names = sorted(set(tenants))
            database = databases.get(name)
            if database is None or not names or database.in_recovery or not database.is_open:
                # Unreachable or a standby: nothing runs there (its items say why), and a
                # standby cannot be written to.
                owned[name] = set(names)
                continue
            try:
                owned[name] = await self._claim_in(database, sweep, firing, names)
            except Exception as exc:
                if not is_insufficient_privilege(exc):
                    failed[name] = f"could not claim tenants for this firing: {describe_error(exc)}"
                    continue
                if name not in self._unavailable:
                    self._unavailable.add(name)
                    log.error(
                        "cannot coordinate with other instances; running every tenant",
                        database=name,
                        error=describe_error(exc),
                        fix=f"GRANT CREATE ON DATABASE {database.dbname} TO {database.user} "
                        "(or create schema sweeperd for it)",
                    )
                owned[name] = set(names)
        return owned, failed

    async def _claim_in(
        self, database: Database, sweep: str, firing: dt.datetime, names: list[str]
    ) -> set[str]:
        async with database.housekeeping("claim") as conn:
            if database not in self._ready:
                await database.ensure_schema(conn, _DDL)
                self._ready.add(database)
            now = time.monotonic()
            if now - self._pruned_at.get(database.name, -PRUNE_EVERY_S) >= PRUNE_EVERY_S:
                async with database.transaction(conn):
                    await conn.execute(_PRUNE)  # claims only matter while a firing can recur
                self._pruned_at[database.name] = now
            async with database.transaction(conn):
                cur = await conn.execute(
                    _CLAIM,
                    {"sweep": sweep, "firing": firing, "tenants": names, "instance": self.instance},
                )
                claimed = {row[0] for row in await cur.fetchall()}
        self._unavailable.discard(database.name)
        skipped = len(names) - len(claimed)
        if skipped:
            log.info(
                "tenants already claimed by another instance for this firing",
                database=database.name,
                sweep=sweep,
                firing=firing.isoformat(),
                claimed=len(claimed),
                skipped=skipped,
            )
        return claimed
