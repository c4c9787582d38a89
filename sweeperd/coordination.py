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
from collections.abc import Iterable, Mapping

import structlog

from .db import Database, describe_error, is_insufficient_privilege

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
DELETE FROM sweeperd.claims WHERE claimed_at < now() - interval '7 days'
"""
_CLAIM = """
INSERT INTO sweeperd.claims (sweep, firing, tenant, instance)
SELECT %(sweep)s, %(firing)s, t, %(instance)s FROM unnest(%(tenants)s::text[]) AS t
ON CONFLICT DO NOTHING
RETURNING tenant
"""


class Claims:
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._ready: set[int] = set()
        self._unavailable: set[str] = set()

    async def claim(
        self,
        databases: Mapping[str, Database],
        sweep: str,
        firing: dt.datetime,
        wanted: Mapping[str, Iterable[str]],
    ) -> dict[str, set[str]]:
        """For each database, the subset of ``wanted`` tenant names this instance now owns."""
        out: dict[str, set[str]] = {}
        for name, tenants in wanted.items():
            names = sorted(set(tenants))
            database = databases.get(name)
            if database is None or not names:
                out[name] = set(names)
                continue
            try:
                out[name] = await self._claim_in(database, sweep, firing, names)
            except Exception as exc:
                if name not in self._unavailable:
                    self._unavailable.add(name)
                    extra = {}
                    if is_insufficient_privilege(exc):
                        extra["fix"] = (f"GRANT CREATE ON DATABASE {database.dbname} TO "
                                        f"{database.user} (or create schema sweeperd for it)")
                    log.error("cannot coordinate with other instances; running every tenant",
                              database=name, error=describe_error(exc), **extra)
                out[name] = set(names)
        return out

    async def _claim_in(self, database: Database, sweep: str, firing: dt.datetime,
                        names: list[str]) -> set[str]:
        async with database.housekeeping("claim") as conn:
            if id(database) not in self._ready:
                await database.ensure_schema(conn, _DDL)
                self._ready.add(id(database))
            cur = await conn.execute(_CLAIM, {"sweep": sweep, "firing": firing,
                                              "tenants": names, "instance": self.instance})
            claimed = {row[0] for row in await cur.fetchall()}
        self._unavailable.discard(database.name)
        skipped = len(names) - len(claimed)
        if skipped:
            log.info("tenants already claimed by another instance for this firing",
                     database=database.name, sweep=sweep, firing=firing.isoformat(),
                     claimed=len(claimed), skipped=skipped)
        return claimed
