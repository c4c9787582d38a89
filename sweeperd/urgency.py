"""How urgently each table needs a VACUUM, in the spirit of PostgreSQL 19's autovacuum scoring.

Per table, five ratios of a value to the threshold at which autovacuum would act:

========== ============================================ ===========================================
component  value                                        threshold
========== ============================================ ===========================================
dead       dead tuples                                  ``autovacuum_vacuum_threshold`` +
                                                        ``autovacuum_vacuum_scale_factor`` * tuples
inserts    tuples inserted since the last vacuum        ``autovacuum_vacuum_insert_threshold`` +
                                                        ``…_insert_scale_factor`` * tuples
analyze    tuples changed since the last analyze        ``autovacuum_analyze_threshold`` +
                                                        ``autovacuum_analyze_scale_factor`` * tuples
xid_age    ``age(relfrozenxid)`` (its TOAST table's     ``autovacuum_freeze_max_age``
           if older)
mxid_age   ``mxid_age(relminmxid)``                     ``autovacuum_multixact_freeze_max_age``
========== ============================================ ===========================================

Thresholds are the table's own (``reloptions``, e.g. ``ALTER TABLE … SET
(autovacuum_vacuum_scale_factor = 0.01)``), else the server's, unless the configuration sets them.
A table needs work when any ratio reaches 1; its score is the largest ratio times that component's
weight (all 1 by default), and a table past ``vacuum_failsafe_age`` (or the multixact one) scores
above everything else (``FAILSAFE`` plus its ratio). A table past a freeze threshold is vacuumed
with ``FREEZE``. Everything comes from two queries per database, whatever the number of tenants
and tables: the server's settings, and one pass over ``pg_class`` with the statistics functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

COMPONENTS = ("dead", "inserts", "analyze", "xid_age", "mxid_age")
FAILSAFE = 1e15  # added to the score of a table past the failsafe age; other scores stay below
PAGE = 8192

_SETTINGS = """
SELECT name, setting FROM pg_catalog.pg_settings WHERE name = ANY(%s)
"""
_SERVER_KEYS = (
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_analyze_threshold",
    "autovacuum_analyze_scale_factor",
    "autovacuum_freeze_max_age",
    "autovacuum_multixact_freeze_max_age",
    "vacuum_failsafe_age",
    "vacuum_multixact_failsafe_age",
)
# One pass over the tables of the given schemas; the statistics functions on each oid rather
# than pg_stat_user_tables, which computes twenty columns for every table of the database.
_TABLES = """
SELECT n.nspname, c.relname, c.relpages, c.reltuples,
       pg_catalog.pg_stat_get_dead_tuples(c.oid),
       pg_catalog.pg_stat_get_ins_since_vacuum(c.oid),
       pg_catalog.pg_stat_get_mod_since_analyze(c.oid),
       greatest(pg_catalog.age(c.relfrozenxid), coalesce(pg_catalog.age(t.relfrozenxid), 0)),
       greatest(pg_catalog.mxid_age(c.relminmxid), coalesce(pg_catalog.mxid_age(t.relminmxid), 0)),
       coalesce(c.reloptions, '{}')
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid
 WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'm')
"""
# reloption → the server setting it overrides
_RELOPTIONS = {
    "autovacuum_vacuum_threshold": "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_scale_factor": "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_insert_threshold": "autovacuum_vacuum_insert_threshold",
    "autovacuum_vacuum_insert_scale_factor": "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_analyze_threshold": "autovacuum_analyze_threshold",
    "autovacuum_analyze_scale_factor": "autovacuum_analyze_scale_factor",
    "autovacuum_freeze_max_age": "autovacuum_freeze_max_age",
    "autovacuum_multixact_freeze_max_age": "autovacuum_multixact_freeze_max_age",
}


@dataclass(frozen=True, slots=True)
class Knobs:
    """What the configuration sets: a weight per component, and thresholds that replace the
    table's and the server's (None: theirs). ``dead_min``/``dead_ratio`` are the dead-tuple
    threshold as ``min_dead_tuples``/``min_dead_ratio`` write it."""

    weights: Mapping[str, float] = field(default_factory=dict)
    xid_age: float | None = None
    mxid_age: float | None = None
    dead_min: float | None = None
    dead_ratio: float | None = None
    # Whether the vacuum analyzes: without ANALYZE, "changed since the last analyze" is no
    # reason to vacuum (a plain VACUUM would never reset it, so the table came back every night).
    analyze: bool = True


@dataclass(frozen=True, slots=True)
class Component:
    value: float
    threshold: float

    @property
    def ratio(self) -> float:
        return _ratio(self.value, self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "value": _number(self.value),
            "threshold": _number(self.threshold),
            "ratio": round(self.ratio, 4),
        }


@dataclass(frozen=True, slots=True)
class Scored:
    schema: str
    table: str
    pages: int
    components: Mapping[str, Component]
    score: float
    failsafe: bool
    needed: bool  # a ratio reached 1, or past the failsafe age
    freeze: bool  # past a freeze threshold: vacuum with FREEZE, as an anti-wraparound would

    def reasons(self) -> dict[str, Any]:
        """Each component with its value, threshold and ratio, most pressing first."""
        ordered = sorted(self.components.items(), key=lambda kv: -kv[1].ratio)
        return {name: c.to_json() for name, c in ordered}

    def estimate_s(self, pages_per_s: float) -> float:
        """A size-based duration estimate, for a table with no history yet."""
        return 0.05 + self.pages / pages_per_s


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 4)


async def server_settings(conn: Any) -> dict[str, float]:
    cur = await conn.execute(_SETTINGS, (list(_SERVER_KEYS),))
    return {name: float(value) for name, value in await cur.fetchall()}


async def table_rows(conn: Any, schemas: Sequence[str]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(_TABLES, (list(schemas),))
    return list(await cur.fetchall())


def _ratio(value: float, threshold: float) -> float:
    # A threshold of 0 (autovacuum_analyze_threshold = 0 on an empty table): as if it were 1,
    # never infinity (which a weight of 0 would turn into NaN, and JSON cannot hold).
    return value / threshold if threshold > 0 else float(value)


def score_tables(
    rows: Iterable[tuple[Any, ...]],
    server: Mapping[str, float],
    knobs: Knobs,
    *,
    needed_only: bool = False,
) -> list[Scored]:
    """Every table scored, from :func:`table_rows` and :func:`server_settings`; with
    ``needed_only`` the tables that need no work are left out (most of a fleet, most nights:
    for them nothing is built but a few floats)."""
    failsafe_xid = server.get("vacuum_failsafe_age", 1.6e9)
    failsafe_mxid = server.get("vacuum_multixact_failsafe_age", 1.6e9)
    weight = {k: knobs.weights.get(k, 1.0) for k in COMPONENTS}
    configured_dead = knobs.dead_min is not None or knobs.dead_ratio is not None
    out = []
    for schema, table, pages, reltuples, dead, inserts, mods, xid_age, mxid_age, opts in rows:
        s = server
        if opts:  # the table's own autovacuum reloptions, rare: copy the settings only then
            s = dict(server)
            for option in opts:
                key, _, value = option.partition("=")
                if key in _RELOPTIONS:
                    with contextlib.suppress(ValueError):  # validated by the server anyway
                        s[_RELOPTIONS[key]] = float(value)
        tuples = reltuples if reltuples > 0 else 0.0  # -1: never analyzed
        if configured_dead:
            dead_t = max(knobs.dead_min or 0.0, (knobs.dead_ratio or 0.0) * tuples)
        else:
            dead_t = s["autovacuum_vacuum_threshold"] + s["autovacuum_vacuum_scale_factor"] * tuples
        dead_t = max(dead_t, 1.0)
        analyze_t = (
            s["autovacuum_analyze_threshold"] + s["autovacuum_analyze_scale_factor"] * tuples
        )
        xid_t = knobs.xid_age or s["autovacuum_freeze_max_age"]
        mxid_t = knobs.mxid_age or s["autovacuum_multixact_freeze_max_age"]
        insert_t = s.get("autovacuum_vacuum_insert_threshold", -1.0)
        has_inserts = insert_t >= 0 and inserts is not None  # -1 disables insert vacuums
        if has_inserts:
            insert_t += s["autovacuum_vacuum_insert_scale_factor"] * tuples
        r_dead = _ratio(dead, dead_t)
        r_analyze = _ratio(mods, analyze_t) if knobs.analyze else 0.0
        r_xid, r_mxid = _ratio(xid_age, xid_t), _ratio(mxid_age, mxid_t)
        r_inserts = _ratio(inserts, insert_t) if has_inserts else 0.0
        failsafe = xid_age >= failsafe_xid or mxid_age >= failsafe_mxid
        freeze = failsafe or r_xid >= 1 or r_mxid >= 1
        needed = freeze or r_dead >= 1 or r_analyze >= 1 or r_inserts >= 1
        if needed_only and not needed:
            continue
        components = {
            "dead": Component(float(dead), dead_t),
            "xid_age": Component(float(xid_age), xid_t),
            "mxid_age": Component(float(mxid_age), mxid_t),
        }
        if knobs.analyze:
            components["analyze"] = Component(float(mods), analyze_t)
        weighted = max(
            weight["dead"] * r_dead,
            weight["analyze"] * r_analyze,
            weight["xid_age"] * r_xid,
            weight["mxid_age"] * r_mxid,
        )
        if has_inserts:
            components["inserts"] = Component(float(inserts), insert_t)
            weighted = max(weighted, weight["inserts"] * r_inserts)
        weighted = min(weighted, FAILSAFE / 2)  # an absurd ratio never passes for a failsafe
        score = FAILSAFE + weighted if failsafe else weighted
        out.append(Scored(schema, table, int(pages), components, score, failsafe, needed, freeze))
    return out
