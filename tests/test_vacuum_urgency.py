"""``tables = "auto"`` across a fleet: every table scored at plan time, the most urgent first.

The fleet is real: two databases of one scratch server (autovacuum off, ``log_statement = all``),
a few hundred tables across tenants, each with known dead tuples, inserts since its last vacuum
and transaction-ID age. XID ages come from the server itself: tables are frozen (or not) and then
transaction IDs are consumed (``txid_current()`` in a committed loop), so ``age(relfrozenxid)``
differs by construction. The plugin's ``freeze_max_age`` and the server's ``vacuum_failsafe_age``
are set low enough for those ages to cross them. What the server did is read back from the
server: its statement log (which VACUUMs ran, in which order, with which options, and which
catalog queries planning cost) and ``age(relfrozenxid)`` after the sweep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from psycopg import sql
from servers import ScratchServer, scratch_server_fixture  # noqa: F401
from support import run_cli, write_config
from test_daemon import Daemon, start_daemon, wait_until  # noqa: F401 (start_daemon: a fixture)
from test_vacuum import make_settled_table, stats

from sweeperd.config import Config, load_config
from sweeperd.model import Result
from sweeperd.plugins import Plugins, load_plugins
from sweeperd.report import SweepReport, render_text
from sweeperd.sweep import sweep_once
from sweeperd.urgency import FAILSAFE

FREEZE_MAX_AGE = 20_000  # [plugins.vacuum] freeze_max_age
FAILSAFE_AGE = 50_000  # the server's vacuum_failsafe_age
CONSUMED = 30_000  # XIDs consumed at each of the two ageing steps
SERVER_SETTINGS = {
    "autovacuum": False,
    "vacuum_failsafe_age": FAILSAFE_AGE,
    "log_statement": "all",
    "log_line_prefix": "%m [%p] %q%d ",  # the database of each statement
    "log_min_messages": "warning",
}
ROWS = 1000  # rows of every seeded table


# -- seeding ---------------------------------------------------------------------------------------


def consume_xids(conn: psycopg.Connection[Any], n: int) -> None:
    """``n`` transaction IDs assigned and committed (cluster-wide: every database ages)."""
    before = int(conn.execute("SELECT txid_current()").fetchone()[0])  # type: ignore[index]
    conn.execute(
        sql.SQL(
            "DO $$ BEGIN FOR i IN 1..{} LOOP PERFORM txid_current(); COMMIT; END LOOP; END $$"
        ).format(sql.Literal(n))
    )
    after = int(conn.execute("SELECT txid_current()").fetchone()[0])  # type: ignore[index]
    assert after - before >= n, (before, after)


def flush_stats(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the flush happens when the backend goes idle


@dataclass(frozen=True)
class Seeded:
    """One seeded table and what its statistics must show before the sweep."""

    database: str  # the configuration's name of its database
    tenant: str
    schema: str
    table: str
    kind: str  # fine | dead | inserts | old | ancient
    dead: int = 0
    inserts: int = 0  # since the last vacuum
    mods: int = 0  # since the last analyze

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.database, self.schema, self.table)


def wait_for_stats(
    conn: psycopg.Connection[Any], tables: Sequence[Seeded], *, what: str, timeout: float = 20
) -> None:
    """Poll until every table's statistics show exactly its expected counts."""
    want = {(t.schema, t.table): (t.dead, t.inserts, t.mods) for t in tables}
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute(
            "SELECT schemaname, relname, n_dead_tup, n_ins_since_vacuum, n_mod_since_analyze"
            " FROM pg_stat_user_tables WHERE schemaname = ANY(%s)",
            (sorted({t.schema for t in tables}),),
        ).fetchall()
        seen = {(s, t): (int(d), int(i), int(m)) for s, t, d, i, m in rows}
        wrong = {k: (seen.get(k), v) for k, v in want.items() if seen.get(k) != v}
        if not wrong:
            return
        if time.monotonic() > deadline:
            sample = dict(list(wrong.items())[:5])
            pytest.fail(f"{what}: {len(wrong)} tables' statistics (seen, wanted), e.g. {sample}")
        time.sleep(0.05)


def create_tables(conn: psycopg.Connection[Any], tables: Sequence[Seeded]) -> None:
    for schema in sorted({t.schema for t in tables}):
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    for t in tables:
        ident = sql.Identifier(t.schema, t.table)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(ident))
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'x' FROM generate_series(1, {}) g").format(
                ident, sql.Literal(ROWS)
            )
        )
    flush_stats(conn)
    wait_for_stats(
        conn,
        [Seeded(t.database, t.tenant, t.schema, t.table, t.kind, 0, ROWS, ROWS) for t in tables],
        what="after the inserts",
    )


def vacuum(conn: psycopg.Connection[Any], tables: Sequence[Seeded], options: str) -> None:
    for t in tables:
        conn.execute(
            sql.SQL("VACUUM ({}) {}").format(sql.SQL(options), sql.Identifier(t.schema, t.table))
        )


def analyze(conn: psycopg.Connection[Any], tables: Sequence[Seeded]) -> None:
    for t in tables:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(t.schema, t.table)))


def xid_ages(server: ScratchServer, dbname: str) -> dict[tuple[str, str], int]:
    """age(relfrozenxid) of every tenant table (the older of the table's and its TOAST's)."""
    rows = server.execute(
        "SELECT n.nspname, c.relname, greatest(age(c.relfrozenxid),"
        " coalesce(age(t.relfrozenxid), 0))"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_class t ON t.oid = c.reltoastrelid"
        " WHERE n.nspname LIKE 'tenant\\_%%' AND c.relkind = 'r'",
        dbname=dbname,
    )
    return {(s, t): int(a) for s, t, a in rows}


@dataclass
class Fleet:
    server: ScratchServer
    dbnames: dict[str, str]  # configuration name → database name
    tables: list[Seeded]
    tenants: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (database, schema)

    def by_key(self) -> dict[tuple[str, str, str], Seeded]:
        return {t.key: t for t in self.tables}

    def config_doc(self, vacuum: Mapping[str, Any] | None = None, **daemon: Any) -> dict[str, Any]:
        return {
            "daemon": {"max_concurrency": 1, **daemon},
            "history": {"enabled": False},
            "databases": {
                name: {"dsn": self.server.dsn(db), "max_connections": 1}
                for name, db in self.dbnames.items()
            },
            "tenants": [
                {"name": name, "database": database, "schema": schema}
                for name, (database, schema) in self.tenants.items()
            ],
            "plugins": {
                "vacuum": {"tables": "auto", "freeze_max_age": FREEZE_MAX_AGE, **(vacuum or {})}
            },
        }


TENANTS_PER_DATABASE = 5
DEAD, INSERTS, OLD, FINE = 10, 2, 3, 15  # tables of each kind per tenant: 30 per tenant


def seed_fleet(server: ScratchServer) -> Fleet:
    """Two databases x 5 tenants x 30 tables (300 tables), plus one ancient table:

    * ``dead_<i>``: ``ROWS`` rows, vacuumed and frozen, then k rows deleted and analyzed: only
      the dead tuples are over a threshold (k differs for every table of the fleet, and the two
      databases' values interleave);
    * ``ins_<i>``: vacuumed and frozen, then more rows inserted (inserts and analyze over);
    * ``old_<i>``: vacuumed without freezing before ``CONSUMED`` XIDs went by: only its XID age is
      over ``freeze_max_age``;
    * ``fine_<i>``: vacuumed, frozen and analyzed last: under every threshold;
    * ``ancient`` (first tenant of the first database): made before ``2 * CONSUMED`` XIDs went
      by, past ``vacuum_failsafe_age``.
    """
    dbnames = {"one": "fleet_one", "two": "fleet_two"}
    for db in dbnames.values():
        server.execute(f"CREATE DATABASE {db}")
    fleet = Fleet(server, dbnames, [])
    for d, name in enumerate(dbnames):
        for t in range(TENANTS_PER_DATABASE):
            tenant = f"{name}{t}"
            schema = f"tenant_{tenant}"
            fleet.tenants[tenant] = (name, schema)
            for i in range(DEAD):
                # Distinct k for every table: 300 + 2 * (the table's rank), ranks interleaved
                # across databases (d) and tenants (t).
                k = 300 + 2 * ((i * TENANTS_PER_DATABASE + t) * 2 + d)
                fleet.tables.append(Seeded(name, tenant, schema, f"dead_{i}", "dead", dead=k))
            for i in range(INSERTS):
                n = 2000 + 500 * i + 50 * t + 10 * d
                fleet.tables.append(
                    Seeded(name, tenant, schema, f"ins_{i}", "inserts", inserts=n, mods=n)
                )
            for i in range(OLD):
                fleet.tables.append(Seeded(name, tenant, schema, f"old_{i}", "old"))
            for i in range(FINE):
                fleet.tables.append(Seeded(name, tenant, schema, f"fine_{i}", "fine"))
    first_tenant = next(iter(fleet.tenants))
    ancient = Seeded("one", first_tenant, fleet.tenants[first_tenant][1], "ancient", "ancient")
    fleet.tables.append(ancient)

    conns = {name: psycopg.connect(server.dsn(db), autocommit=True) for name, db in dbnames.items()}
    try:

        def of(database: str, *kinds: str) -> list[Seeded]:
            return [t for t in fleet.tables if t.database == database and t.kind in kinds]

        create_tables(conns["one"], [ancient])
        vacuum(conns["one"], [ancient], "ANALYZE")
        consume_xids(conns["one"], CONSUMED)
        for name, conn in conns.items():
            create_tables(conn, of(name, "dead", "inserts", "old", "fine"))
            vacuum(conn, of(name, "old"), "ANALYZE")  # no FREEZE: their XID age stays
        consume_xids(conns["one"], CONSUMED)
        for name, conn in conns.items():
            vacuum(conn, of(name, "dead", "inserts", "fine"), "FREEZE, ANALYZE")
            for t in of(name, "dead"):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE id <= {}").format(
                        sql.Identifier(t.schema, t.table), sql.Literal(t.dead)
                    )
                )
            for t in of(name, "inserts"):
                conn.execute(
                    sql.SQL("INSERT INTO {} SELECT g, 'y' FROM generate_series({}, {}) g").format(
                        sql.Identifier(t.schema, t.table),
                        sql.Literal(ROWS + 1),
                        sql.Literal(ROWS + t.inserts),
                    )
                )
            flush_stats(conn)
            # The deletes are counted before the analyze (else they would count as changes
            # since it): the analyze leaves the dead tuples as the only reason.
            wait_for_stats(
                conn,
                [
                    Seeded(t.database, t.tenant, t.schema, t.table, t.kind, t.dead, 0, t.dead)
                    for t in of(name, "dead")
                ],
                what="after the deletes",
            )
            analyze(conn, of(name, "dead"))
        for name, conn in conns.items():
            wait_for_stats(conn, of(name, *KINDS), what="before the sweep")
    finally:
        for conn in conns.values():
            conn.close()
    return fleet


KINDS = ("fine", "dead", "inserts", "old", "ancient")


# -- the log: which statements the server ran ------------------------------------------------------

_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[(\d+)\] (\S*) ?(\w+):  (.*)$")


@dataclass(frozen=True)
class Logged:
    pid: int
    database: str
    level: str
    text: str  # the message, continuation lines included


def read_log(server: ScratchServer, since: int = 0) -> list[Logged]:
    """The server log's entries from byte offset ``since`` on."""
    with server.log.open("rb") as f:
        f.seek(since)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    out: list[Logged] = []
    for line in lines:
        found = _ENTRY.match(line)
        if found:
            pid, database, level, text = found.groups()
            out.append(Logged(int(pid), database, level, text))
        elif out and line.startswith("\t"):
            last = out[-1]
            out[-1] = Logged(last.pid, last.database, last.level, last.text + "\n" + line[1:])
    return out


def log_size(server: ScratchServer) -> int:
    return server.log.stat().st_size


_VACUUM = re.compile(r'^(?:statement|execute [^:]*): VACUUM \(([^)]*)\) "([^"]+)"\."([^"]+)"$')


def vacuums_logged(entries: Sequence[Logged]) -> list[tuple[str, str, str, list[str]]]:
    """(database, schema, table, options) of every logged table VACUUM, in the log's order."""
    out = []
    for e in entries:
        found = _VACUUM.match(e.text)
        if found:
            options = [o.strip() for o in found[1].split(",")]
            out.append((e.database, found[2], found[3], options))
    return out


# -- sweeping --------------------------------------------------------------------------------------


def load(directory: Path, doc: Mapping[str, Any]) -> tuple[Config, Plugins]:
    path = write_config(directory, tomli_w.dumps(doc))
    config = load_config(path)
    return config, load_plugins(config, entry_points=False)


def sweep(
    config: Config, plugins: Plugins, *, dry_run: bool = False, only: str = "vacuum.auto"
) -> SweepReport:
    return asyncio.run(sweep_once(config, plugins, only_globs=[only], dry_run=dry_run))


def auto_results(report: SweepReport) -> list[Result]:
    results = [r for r in report.results if r.operation == "vacuum.auto"]
    assert len({(r.database, r.schema, r.details["table"]) for r in results}) == len(results)
    return results


def key(r: Result) -> tuple[str, str, str]:
    assert r.schema is not None
    return (r.database, r.schema, r.details["table"])


def in_start_order(results: Sequence[Result]) -> list[Result]:
    assert all(r.started_at is not None for r in results), results
    return sorted(results, key=lambda r: r.started_at)  # type: ignore[arg-type,return-value]


# -- one fleet, swept once with max_concurrency = 1 ------------------------------------------------


@dataclass
class Swept:
    fleet: Fleet
    report: SweepReport
    log: list[Logged]  # the server's log of the sweep
    ages_before: dict[tuple[str, str, str], int]  # (database, schema, table) → XID age
    ages_after: dict[tuple[str, str, str], int]
    vacuums_before: dict[tuple[str, str, str], int]  # vacuum_count
    vacuums_after: dict[tuple[str, str, str], int]


def fleet_state(fleet: Fleet) -> tuple[dict[Any, int], dict[Any, int]]:
    ages: dict[tuple[str, str, str], int] = {}
    counts: dict[tuple[str, str, str], int] = {}
    for name, db in fleet.dbnames.items():
        ages.update({(name, s, t): a for (s, t), a in xid_ages(fleet.server, db).items()})
        rows = fleet.server.execute(
            "SELECT schemaname, relname, vacuum_count FROM pg_stat_user_tables", dbname=db
        )
        counts.update({(name, s, t): int(n) for s, t, n in rows})
    return ages, counts


def seed_and_sweep(server: ScratchServer, directory: Path, *, max_connections: int) -> Swept:
    fleet = seed_fleet(server)
    ages_before, vacuums_before = fleet_state(fleet)
    doc = fleet.config_doc()
    for database in doc["databases"].values():
        database["max_connections"] = max_connections
    config, plugins = load(directory, doc)
    since = log_size(server)
    report = sweep(config, plugins)
    log = read_log(server, since)
    ages_after, vacuums_after = fleet_state(fleet)
    return Swept(fleet, report, log, ages_before, ages_after, vacuums_before, vacuums_after)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:
    """The fleet swept with max_concurrency = 1 and max_connections = 1 per database."""
    with ScratchServer(settings=SERVER_SETTINGS) as server:
        yield seed_and_sweep(server, tmp_path_factory.mktemp("swept"), max_connections=1)


@pytest.fixture(scope="module")
def swept_two_connections(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:
    """The fleet swept with max_concurrency = 1 and max_connections = 2 per database."""
    with ScratchServer(settings=SERVER_SETTINGS) as server:
        yield seed_and_sweep(server, tmp_path_factory.mktemp("swept2"), max_connections=2)


@pytest.mark.parametrize(
    "which",
    [
        "swept",
        "swept_two_connections",
    ],
    ids=["max_connections=1", "max_connections=2"],
)
def test_items_start_in_descending_score_order_across_both_databases(
    request: pytest.FixtureRequest, which: str
) -> None:
    swept: Swept = request.getfixturevalue(which)
    results = auto_results(swept.report)
    assert {r.status for r in results} == {"ok"}, [r.error for r in results if r.status != "ok"]
    started = in_start_order(results)
    order = [key(r) for r in started]
    # The server ran the VACUUMs in that order too (its log, one statement at a time).
    dbname_of = {db: name for name, db in swept.fleet.dbnames.items()}
    logged = [(dbname_of[db], s, t) for db, s, t, _ in vacuums_logged(swept.log)]
    assert logged == order
    # The test means something: both databases' items, interleaved, with scores that differ.
    switches = sum(a[0] != b[0] for a, b in itertools.pairwise(order))
    assert switches >= 50, order
    assert len({r.details["score"] for r in started}) >= 100
    scores = [r.details["score"] for r in started]
    misplaced = [
        (key(a), a.details["score"], key(b), b.details["score"])
        for a, b in itertools.pairwise(started)
        if b.details["score"] > a.details["score"]
    ]
    assert scores == sorted(scores, reverse=True), f"{len(misplaced)} out of order: {misplaced[:3]}"


def test_the_table_past_the_failsafe_age_starts_first(swept: Swept) -> None:
    first, *rest = in_start_order(auto_results(swept.report))
    assert key(first) == ("one", "tenant_one0", "ancient")
    assert first.details["failsafe"] is True
    assert first.details["score"] >= FAILSAFE
    assert first.details["freeze"] is True
    reason = first.details["reasons"]["xid_age"]
    assert next(iter(first.details["reasons"])) == "xid_age"
    assert reason["value"] >= FAILSAFE_AGE and reason["threshold"] == FREEZE_MAX_AGE
    assert all("failsafe" not in r.details and r.details["score"] < FAILSAFE for r in rest)
    [(db, schema, table, options)] = vacuums_logged(swept.log)[:1]
    assert (db, schema, table) == ("fleet_one", "tenant_one0", "ancient")
    assert "FREEZE" in options


def test_tables_under_every_threshold_get_no_result_and_are_counted(swept: Swept) -> None:
    seeded = swept.fleet.by_key()
    results = auto_results(swept.report)
    fine = {k for k, t in seeded.items() if t.kind == "fine"}
    assert {key(r) for r in results} == set(seeded) - fine
    assert len(results) == len(seeded) - len(fine) == 151
    assert swept.report.not_needed == {"vacuum.auto": len(fine)} == {"vacuum.auto": 150}
    assert swept.report.to_json()["not_needed"] == {"vacuum.auto": 150}
    assert (
        "  vacuum.auto: 150 not needed (under every threshold)"
        in render_text(swept.report).splitlines()
    )
    # The server agrees: only the needed tables were vacuumed (once), the fine ones not at all.
    vacuumed = {k for k in seeded if swept.vacuums_after[k] != swept.vacuums_before[k]}
    assert vacuumed == set(seeded) - fine
    assert all(swept.vacuums_after[k] == swept.vacuums_before[k] + 1 for k in vacuumed)
    assert {(s, t) for _, s, t, _ in vacuums_logged(swept.log)} == {(s, t) for _, s, t in vacuumed}


def test_freeze_is_used_where_a_freeze_threshold_is_passed(swept: Swept) -> None:
    seeded = swept.fleet.by_key()
    dbname_of = {db: name for name, db in swept.fleet.dbnames.items()}
    options = {(dbname_of[db], s, t): o for db, s, t, o in vacuums_logged(swept.log)}
    frozen = {k for k, t in seeded.items() if t.kind in ("old", "ancient")}
    assert len(frozen) == 2 * TENANTS_PER_DATABASE * OLD + 1
    assert {k for k, o in options.items() if "FREEZE" in o} == frozen
    for r in auto_results(swept.report):
        assert r.details["freeze"] is (key(r) in frozen), key(r)
    for k in frozen:
        # Past freeze_max_age before, frozen to almost nothing after: VACUUM FREEZE did it (a
        # VACUUM without it leaves tuples younger than vacuum_freeze_min_age, 50M, unfrozen).
        assert swept.ages_before[k] >= FREEZE_MAX_AGE, k
        assert swept.ages_after[k] < 1000, (k, swept.ages_after[k])
    young = [k for k, t in seeded.items() if t.kind not in ("old", "ancient")]
    assert max(swept.ages_before[k] for k in young) < FREEZE_MAX_AGE


def test_reasons_are_the_seeded_values(swept: Swept) -> None:
    seeded = swept.fleet.by_key()
    for r in auto_results(swept.report):
        t = seeded[key(r)]
        reasons = r.details["reasons"]
        assert set(reasons) == {"dead", "inserts", "analyze", "xid_age", "mxid_age"}, reasons
        ratios = [c["ratio"] for c in reasons.values()]
        assert ratios == sorted(ratios, reverse=True)  # most pressing first
        for c in reasons.values():
            assert c["ratio"] == round(c["value"] / c["threshold"], 4), c
        if t.kind != "ancient":
            assert r.details["score"] == max(ratios), r.details  # every weight 1
        live = ROWS - t.dead
        if t.kind == "dead":
            assert next(iter(reasons)) == "dead"
            assert reasons["dead"] == {
                "value": t.dead,
                "threshold": round(50 + 0.2 * live, 4),
                "ratio": round(t.dead / (50 + 0.2 * live), 4),
            }
            assert reasons["analyze"]["value"] == 0 and reasons["inserts"]["value"] == 0
            assert r.rows == t.dead  # and the vacuum removed exactly those
        elif t.kind == "inserts":
            assert reasons["inserts"] == {
                "value": t.inserts,
                "threshold": 1200,
                "ratio": round(t.inserts / 1200, 4),
            }
            assert reasons["analyze"]["value"] == t.inserts
            assert reasons["analyze"]["threshold"] == 150
        else:  # old, ancient: only their age
            age = swept.ages_before[key(r)]
            assert age <= reasons["xid_age"]["value"] <= age + 50, (reasons, age)
            assert reasons["xid_age"]["threshold"] == FREEZE_MAX_AGE
            assert reasons["dead"]["value"] == reasons["analyze"]["value"] == 0


# -- planning costs the same few queries per database, whatever the number of tables ---------------

PLANNING_QUERIES = {  # what the statement shows: a pattern in its text
    "statistics": "pg_stat_get_dead_tuples(",
    "settings": "pg_settings",
    "pg_class": "pg_class",
    "history": "sweeperd.results",
}


def planning_queries(entries: Sequence[Logged]) -> Counter[tuple[str, str]]:
    """(database, kind) → how many statements of that kind the sweep's connections ran."""
    counts: Counter[tuple[str, str]] = Counter()
    for e in entries:
        if not e.text.startswith(("statement: ", "execute ")):
            continue
        if e.text.startswith(("statement: VACUUM", "execute <unnamed>: VACUUM")):
            continue
        for kind, pattern in PLANNING_QUERIES.items():
            if pattern in e.text:
                counts[(e.database, kind)] += 1
    return counts


def add_tenants(server: ScratchServer, dbname: str, first: int, last: int, tables: int) -> None:
    with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
        for n in range(first, last):
            schema = sql.Identifier(f"tenant_{n:03d}")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            for i in range(tables):
                ident = sql.Identifier(f"tenant_{n:03d}", f"t{i}")
                conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(ident))
                conn.execute(sql.SQL("INSERT INTO {} SELECT generate_series(1, 100)").format(ident))
        flush_stats(conn)


def test_planning_queries_per_database_do_not_grow_with_the_tables(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    server = scratch_server(settings=SERVER_SETTINGS)
    dbnames = ["plan_one", "plan_two"]
    for db in dbnames:
        server.execute(f"CREATE DATABASE {db}")
        add_tenants(server, db, 0, 2, 10)  # 20 tables
    doc = {  # the daemon's defaults (run history on), tenants discovered at each sweep
        "databases": {db: {"dsn": server.dsn(db), "max_connections": 4} for db in dbnames},
        "tenant_sources": [{"database": db, "schemas": "tenant_%"} for db in dbnames],
        "plugins": {"vacuum": {"tables": "auto"}},
    }
    config, plugins = load(tmp_path, doc)

    def sweep_logged() -> tuple[SweepReport, Counter[tuple[str, str]]]:
        since = log_size(server)
        report = sweep(config, plugins)
        return report, planning_queries(read_log(server, since))

    # The run history made first (a sweep without it skips reading it: fewer queries).
    sweep(config, plugins, only="vacuum.database_stats")
    small, small_queries = sweep_logged()
    for db in dbnames:
        add_tenants(server, db, 2, 20, 10)  # 200 tables
    large, large_queries = sweep_logged()

    for report, tables in ((small, 20), (large, 180)):  # the new tables need a vacuum
        assert report.counts()["ok"] == 2 * tables, report.counts()
        assert {r.status for r in report.results} == {"ok"}
    assert large.not_needed == {"vacuum.auto": 2 * 20}  # the first sweep's, vacuumed since
    assert large_queries == small_queries, (small_queries, large_queries)
    for db in dbnames:
        # One pass over the statistics and one read of the settings for the whole database.
        assert small_queries[(db, "statistics")] == 1, small_queries
        assert 1 <= small_queries[(db, "settings")] <= 2, small_queries


# -- on the suite's server: an old table, two with dead tuples, one fine ---------------------------

SMALL_FREEZE_MAX_AGE = 1000


def seed_small(dsn: str) -> int:
    """tenant_a: ``old`` (XID age 8x SMALL_FREEZE_MAX_AGE, nothing else), ``bloated`` and
    ``dirty`` (dead tuples only, ratios 5.71 and 1.58), ``fine`` (under every threshold).
    Returns the old table's XID age."""
    make_settled_table(dsn, "tenant_a", "old", rows=ROWS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        consume_xids(conn, 8 * SMALL_FREEZE_MAX_AGE)
    make_settled_table(dsn, "tenant_a", "bloated", rows=2000, delete=1200)  # 1200 / 210
    make_settled_table(dsn, "tenant_a", "dirty", rows=ROWS, delete=300)  # 300 / 190
    make_settled_table(dsn, "tenant_a", "fine", rows=ROWS, delete=10)  # 10 / 248
    with psycopg.connect(dsn, autocommit=True) as conn:
        ages = dict(
            conn.execute(
                "SELECT relname, age(relfrozenxid) FROM pg_class"
                " WHERE relnamespace = 'tenant_a'::regnamespace AND relkind = 'r'"
            ).fetchall()
        )
    assert ages["old"] >= 8 * SMALL_FREEZE_MAX_AGE, ages
    assert max(ages[t] for t in ("bloated", "dirty", "fine")) < SMALL_FREEZE_MAX_AGE, ages
    return int(ages["old"])


def small_doc(dsn: str, **vacuum: Any) -> dict[str, Any]:
    return {
        "daemon": {"max_concurrency": 1},
        "history": {"enabled": False},
        "databases": {"main": {"dsn": dsn, "max_connections": 1}},
        "tenants": [{"name": "a", "database": "main", "schema": "tenant_a"}],
        "plugins": {"vacuum": {"tables": "auto", "freeze_max_age": SMALL_FREEZE_MAX_AGE, **vacuum}},
    }


def test_dry_run_json_explains_each_planned_vacuum(tmp_path: Path, pg_dsn: str) -> None:
    old_age = seed_small(pg_dsn)
    before = {t: stats(pg_dsn, "tenant_a", t) for t in ("old", "bloated", "dirty", "fine")}
    path = write_config(tmp_path, tomli_w.dumps(small_doc(pg_dsn)))
    proc = run_cli("sweep", "-c", str(path), "--only", "vacuum.auto", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["not_needed"] == {"vacuum.auto": 1}  # fine
    planned = {r["details"]["table"]: r for r in report["results"]}
    assert list(planned) == ["old", "bloated", "dirty"]  # most urgent first
    assert {r["operation"] for r in report["results"]} == {"vacuum.auto"}
    assert {r["status"] for r in report["results"]} == {"dry-run"}
    for r in planned.values():
        reasons = r["details"]["reasons"]
        assert set(reasons) == {"dead", "inserts", "analyze", "xid_age", "mxid_age"}
        assert all(set(c) == {"value", "threshold", "ratio"} for c in reasons.values())
        assert r["details"]["score"] == max(c["ratio"] for c in reasons.values())
    old = planned["old"]["details"]
    assert next(iter(old["reasons"])) == "xid_age"
    xid = old["reasons"]["xid_age"]
    assert old_age <= xid["value"] <= old_age + 50, (xid, old_age)
    assert xid["threshold"] == SMALL_FREEZE_MAX_AGE
    assert xid["ratio"] == round(xid["value"] / SMALL_FREEZE_MAX_AGE, 4) >= 8
    assert old["freeze"] is True and "failsafe" not in old
    bloated = planned["bloated"]
    assert bloated["details"]["reasons"]["dead"] == {
        "value": 1200,
        "threshold": 210,
        "ratio": round(1200 / 210, 4),
    }
    assert bloated["details"]["freeze"] is False
    assert bloated["rows"] == 1200  # what the vacuum would remove
    # A dry run vacuums nothing.
    assert {t: stats(pg_dsn, "tenant_a", t) for t in before} == before

    text = run_cli("sweep", "-c", str(path), "--only", "vacuum.auto", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "  vacuum.auto: 1 not needed (under every threshold)" in text.stdout.splitlines()


def test_weights_change_the_order_not_what_is_vacuumed(tmp_path: Path, pg_dsn: str) -> None:
    old_age = seed_small(pg_dsn)

    def planned(doc: Mapping[str, Any], *, dry_run: bool = True) -> list[Result]:
        config, plugins = load(tmp_path, doc)
        return in_start_order(auto_results(sweep(config, plugins, dry_run=dry_run)))

    default = planned(small_doc(pg_dsn))
    assert [r.details["table"] for r in default] == ["old", "bloated", "dirty"]
    no_xid = planned(small_doc(pg_dsn, weights={"xid_age": 0}))
    assert [r.details["table"] for r in no_xid] == ["bloated", "dirty", "old"]
    assert no_xid[-1].details["score"] == 0.0 and no_xid[-1].details["freeze"] is True
    twice_dirty = planned(small_doc(pg_dsn, weights={"dead": 2, "xid_age": 0.5}))
    assert [r.details["table"] for r in twice_dirty] == ["bloated", "old", "dirty"]
    assert twice_dirty[0].details["score"] == round(2 * 1200 / 210, 4)

    # Still vacuumed, last, and with FREEZE: its age drops (a VACUUM without FREEZE would leave
    # tuples younger than vacuum_freeze_min_age unfrozen, the age as it was).
    ran = planned(small_doc(pg_dsn, weights={"xid_age": 0}), dry_run=False)
    assert [(r.details["table"], r.status) for r in ran] == [
        ("bloated", "ok"),
        ("dirty", "ok"),
        ("old", "ok"),
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT age(relfrozenxid) FROM pg_class WHERE oid = 'tenant_a.old'::regclass"
        ).fetchone()
    assert row is not None and row[0] < 100 < old_age, (row, old_age)


def test_a_typo_in_weights_is_one_line_naming_the_key(tmp_path: Path) -> None:
    doc = small_doc("dbname=x", weights={"xid": 2})
    path = write_config(tmp_path, tomli_w.dumps(doc))
    proc = run_cli("check-config", "-c", str(path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"sweeperd: {path}: plugins.vacuum.weights.xid: unknown component"), line
    assert "xid_age" in line  # what it could have been


def test_score_settings_with_a_list_of_tables_are_an_error_not_ignored(tmp_path: Path) -> None:
    doc = small_doc("dbname=x", weights={"xid_age": 2})
    doc["plugins"]["vacuum"]["tables"] = ["events"]
    del doc["plugins"]["vacuum"]["freeze_max_age"]
    path = write_config(tmp_path, tomli_w.dumps(doc))
    proc = run_cli("check-config", "-c", str(path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"sweeperd: {path}: plugins.vacuum.weights: only with tables"), line


# -- window fit, through the daemon ----------------------------------------------------------------

_TOO_LONG = re.compile(
    r"^would not finish before the window closes \(≈ 1h needed, (?:(\d+)m)?(?:(\d+)s)? left\)$"
)


def test_a_table_that_would_outlast_the_window_is_skipped_by_the_daemon(
    tmp_path: Path, pg_dsn: str, request: pytest.FixtureRequest
) -> None:
    """History says ``long`` took an hour the last time, ``short`` 10 ms; ``fresh`` has none
    (its size says milliseconds). The window closes in about ten minutes: ``long`` is skipped,
    the others are vacuumed."""
    for table in ("long", "short", "fresh"):
        make_settled_table(pg_dsn, "tenant_a", table, rows=ROWS, delete=500)
    now = dt.datetime.now(dt.UTC)
    opens = (now - dt.timedelta(minutes=1)).strftime("%H:%M")  # wraps past midnight as it must
    closes = (now + dt.timedelta(minutes=10)).strftime("%H:%M")
    doc = {
        "daemon": {"timezone": "UTC", "max_concurrency": 1, "drain_timeout": "5s"},
        "log": {"format": "json", "level": "info"},
        "history": {"enabled": True},
        "databases": {"main": {"dsn": pg_dsn, "max_connections": 2}},
        "tenants": [{"name": "a", "database": "main", "schema": "tenant_a"}],
        "sweeps": {
            "windowed": {
                "interval": "1s",
                "window": f"{opens}-{closes}",
                "operations": ["vacuum.auto"],
            }
        },
        "plugins": {"vacuum": {"tables": "auto"}},
    }
    path = write_config(tmp_path, tomli_w.dumps(doc))
    # The run history made by a sweep of something else, then the earlier vacuums written in.
    once = {k: v for k, v in doc.items() if k != "sweeps"}
    once_path = write_config(tmp_path, tomli_w.dumps(once), name="once.toml")
    made = run_cli("sweep", "-c", str(once_path), "--only", "vacuum.database_stats", "--json")
    assert made.returncode == 0, made.stderr
    assert [r["operation"] for r in json.loads(made.stdout)["results"]] == ["vacuum.database_stats"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        [(run_id,)] = conn.execute(
            "INSERT INTO sweeperd.runs (run_id, sweep, instance, started_at, finished_at,"
            " ok, failed, skipped, cancelled)"
            " VALUES (gen_random_uuid(), 'windowed', 'test', now() - interval '1 day',"
            " now() - interval '23 hours', 2, 0, 0, 0) RETURNING run_id"
        ).fetchall()
        for table, took in (("long", 3600.0), ("short", 0.01)):
            conn.execute(
                "INSERT INTO sweeperd.results (run_id, tenant, schema_name, operation, status,"
                " rows, started_at, finished_at, duration_s, error, target)"
                " VALUES (%s, 'a', 'tenant_a', 'vacuum.auto', 'ok', 0,"
                " now() - interval '1 day', now() - interval '23 hours', %s, NULL, %s)",
                (run_id, took, table),
            )

    def since_then() -> list[tuple[str, str, str | None]]:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT r.target, r.status, r.error FROM sweeperd.results r"
                " JOIN sweeperd.runs USING (run_id)"
                " WHERE r.operation = 'vacuum.auto' AND run_id <> %s AND trigger = 'schedule'"
                " ORDER BY r.started_at NULLS FIRST",
                (run_id,),
            ).fetchall()
        return [(t, s, e) for t, s, e in rows]

    start: Callable[..., Daemon] = request.getfixturevalue("start_daemon")
    daemon = start(path)
    daemon.ready()
    wait_until(
        lambda: {"long", "short", "fresh"} <= {t for t, _, _ in since_then()},
        30,
        f"the daemon's results for every table\n{daemon.stderr()}",
    )
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.stderr()

    results = since_then()
    outcome = {t: (s, e) for t, s, e in results if t != "long"}
    assert outcome == {"short": ("ok", None), "fresh": ("ok", None)}
    long = [(s, e) for t, s, e in results if t == "long"]
    assert long, results
    for status, error in long:  # once per firing: never started
        assert status == "skipped"
        assert error is not None
        found = _TOO_LONG.match(error)
        assert found, error
        left = int(found[1] or 0) * 60 + int(found[2] or 0)
        assert 0 < left <= 11 * 60, error
    assert stats(pg_dsn, "tenant_a", "long")[2] == 1  # the settling vacuum only
    assert stats(pg_dsn, "tenant_a", "short")[2] == 2
    assert stats(pg_dsn, "tenant_a", "fresh")[2] == 2
