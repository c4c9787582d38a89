"""Retention takes the oldest expired rows first, and reads them through an index where it can.

The rows are inserted in a shuffled physical order, so a batch that took rows in heap order (the
order a plain ``LIMIT`` returns) would pick a random sample of the expired rows, not the oldest.
Each row's age is a whole number of minutes well past the cutoff: which rows are the oldest never
depends on how long anything takes. What each batch removed is logged on the server by a
statement-level trigger (per partition for partitioned tables: a DELETE aimed at one partition
fires that partition's triggers, not its parent's).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sweeperd.bundled import retention
from test_retention import (
    INDEX_WARNING,
    TABLE,
    config_doc,
    connect,
    ids,
    load,
    only_result,
    rule,
    sweep,
)

EXPIRED = 1000  # rows older than the cutoff: id i is 100 days + i minutes old
FRESH = 200  # rows newer than the cutoff (ids from 1_000_001)
NULLS = 50  # rows whose cutoff column is NULL (ids from 2_000_001): never expired

# -- helpers ---------------------------------------------------------------------------------------


def make_table(conn: psycopg.Connection[Any], *, index: str | None = "btree") -> sql.Identifier:
    """``tenant_a.notifications`` (id, cutoff column), with an index of that kind (None: none)."""
    ident = sql.Identifier("tenant_a", TABLE)
    conn.execute("CREATE SCHEMA IF NOT EXISTS tenant_a")
    conn.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, created_at timestamptz)").format(ident)
    )
    if index is not None:
        conn.execute(
            sql.SQL("CREATE INDEX ON {} USING {} (created_at)").format(ident, sql.SQL(index))
        )
    return ident


def fill(
    conn: psycopg.Connection[Any], ident: sql.Identifier, *, expired: int = EXPIRED, seed: int = 9
) -> None:
    """``expired`` expired rows, ``FRESH`` recent ones and ``NULLS`` NULL ones, shuffled.

    Expired id i is 100 days + i minutes old (the higher the id, the older); fresh id 1_000_000 + i
    is 1 day - i minutes old, far inside the 30-day window. Rows go in in the shuffled order, so
    that is their order in the heap.
    """
    rows: list[tuple[int, int | None]] = [(i, i) for i in range(1, expired + 1)]
    rows += [(1_000_000 + i, -i) for i in range(1, FRESH + 1)]
    rows += [(2_000_000 + i, None) for i in range(1, NULLS + 1)]
    random.Random(seed).shuffle(rows)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, created_at)"
            " SELECT i, now() - CASE WHEN m > 0 THEN interval '100 days' ELSE interval '1 day' END"
            "          - make_interval(mins => m)"
            " FROM unnest(%s::int[], %s::int[]) WITH ORDINALITY AS u(i, m, o) ORDER BY o"
        ).format(ident),
        ([i for i, _m in rows], [m for _i, m in rows]),
    )


def oldest(n: int, expired: int = EXPIRED) -> set[int]:
    """The ids of the ``n`` oldest rows :func:`fill` wrote."""
    return set(range(expired - n + 1, expired + 1))


def everything(expired: int = EXPIRED) -> set[int]:
    return (
        set(range(1, expired + 1))
        | set(range(1_000_001, 1_000_001 + FRESH))
        | set(range(2_000_001, 2_000_001 + NULLS))
    )


def log_deleted_ids(conn: psycopg.Connection[Any], ident: sql.Identifier) -> None:
    """Log the ids every DELETE statement on ``ident`` removed, with its transaction."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS public.deleted_log ("
        " seq bigserial PRIMARY KEY, ids int[], xid xid8)"
    )
    conn.execute(
        "CREATE OR REPLACE FUNCTION public.log_deleted() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN"
        "   INSERT INTO public.deleted_log (ids, xid)"
        "   SELECT array_agg(id), pg_current_xact_id() FROM old_rows;"
        "   RETURN NULL;"
        " END $$"
    )
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER deleted_log AFTER DELETE ON {} REFERENCING OLD TABLE AS old_rows"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.log_deleted()"
        ).format(ident)
    )


def deleted_per_batch(conn: psycopg.Connection[Any]) -> list[set[int]]:
    """The ids each batch (transaction) removed, in the order the batches ran."""
    rows = conn.execute(
        "SELECT xid::text, ids FROM public.deleted_log WHERE ids IS NOT NULL ORDER BY seq"
    ).fetchall()
    batches: dict[str, set[int]] = {}
    for xid, batch_ids in rows:
        batches.setdefault(xid, set()).update(batch_ids)
    return list(batches.values())


def one_tenant(dsn: str, rules: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return config_doc(dsn, [("a", "tenant_a")], rules)


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first (subplans included)."""
    nodes = [plan]
    for child in plan.get("Plans", ()):
        nodes += plan_nodes(child)
    return nodes


def explain(
    conn: psycopg.Connection[Any], statement: sql.Composable, params: dict[str, Any]
) -> list[dict[str, Any]]:
    # The statement goes in as the plugin runs it, parameters bound by the server: EXPLAIN (not
    # ANALYZE) plans it with these values and executes nothing.
    row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), params).fetchone()
    assert row is not None
    document = row[0] if isinstance(row[0], list) else json.loads(row[0])
    return plan_nodes(document[0]["Plan"])


def cutoff(conn: psycopg.Connection[Any], older_than: str = "30 days") -> Any:
    row = conn.execute("SELECT now() - %s::interval", (older_than,)).fetchone()
    assert row is not None
    return row[0]


# -- oldest first ----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["btree", None])
def test_max_rows_deletes_exactly_the_oldest_expired_rows(
    tmp_path: Path, pg_dsn: str, index: str | None
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=index)
        fill(conn, ident)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(max_rows=100)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", 100), result.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == everything() - oldest(100)


def test_batches_go_oldest_first_across_batches(tmp_path: Path, pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn)
        fill(conn, ident)
        log_deleted_ids(conn, ident)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=10, max_rows=30)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", 30), result.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == everything() - oldest(30)
        batches = deleted_per_batch(conn)
    # The first batch took the ten oldest, the second the next ten, and so on.
    assert batches == [oldest(10), oldest(20) - oldest(10), oldest(30) - oldest(20)]


def test_a_full_run_still_deletes_every_expired_row_and_only_those(
    tmp_path: Path, pg_dsn: str
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn)
        fill(conn, ident)
        log_deleted_ids(conn, ident)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=300)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", EXPIRED), result.error
    with connect(pg_dsn) as conn:
        # NULL cutoff values never match column < cutoff: they stay, wherever NULLs sort.
        assert ids(conn, ident) == everything() - oldest(EXPIRED)
        batches = deleted_per_batch(conn)
    assert batches == [
        oldest(300),
        oldest(600) - oldest(300),
        oldest(900) - oldest(600),
        oldest(1000) - oldest(900),
    ]


def test_ties_on_the_max_rows_boundary_take_rows_of_that_value_only(
    tmp_path: Path, pg_dsn: str
) -> None:
    """40 rows share one timestamp: max_rows cuts through them, never skips past to newer rows."""
    with connect(pg_dsn) as conn:
        ident = make_table(conn)
        # ids 1-20 are the oldest (distinct ages), ids 21-60 share the next age, 61-100 are newer.
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, created_at)"
                " SELECT g, now() - interval '200 days' - make_interval(mins => CASE"
                "   WHEN g <= 20 THEN 1000 - g WHEN g <= 60 THEN 900 ELSE 900 - g END)"
                " FROM generate_series(1, 100) AS g ORDER BY random()"
            ).format(ident)
        )
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=7, max_rows=35)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", 35), result.error
    with connect(pg_dsn) as conn:
        gone = set(range(1, 101)) - ids(conn, ident)
    assert len(gone) == 35
    assert set(range(1, 21)) <= gone  # all 20 strictly older rows
    assert gone - set(range(1, 21)) <= set(range(21, 61))  # and 15 of the tied ones


def make_partitioned(conn: psycopg.Connection[Any], kind: str, *, index: bool) -> sql.Identifier:
    """``tenant_a.notifications`` split into three tables whose rows interleave in age.

    ``kind`` "hash": hash partitions of a partitioned table; "inherited": a parent holding rows
    of its own plus two children (classic inheritance). Every age range spans every table, so
    the oldest rows of the whole table are spread over all of them.
    """
    ident = sql.Identifier("tenant_a", TABLE)
    conn.execute("CREATE SCHEMA tenant_a")
    parts = [sql.Identifier("tenant_a", f"part{i}") for i in range(3)]
    if kind == "hash":
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int, created_at timestamptz) PARTITION BY HASH (id)"
            ).format(ident)
        )
        for i, part in enumerate(parts):
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS 3, REMAINDER {})"
                ).format(part, ident, sql.Literal(i))
            )
        if index:  # on the partitioned table: cascades to every partition
            conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(ident))
        fill(conn, ident, expired=300)
    else:
        conn.execute(sql.SQL("CREATE TABLE {} (id int, created_at timestamptz)").format(ident))
        tables = [ident, *parts[1:]]
        for part in parts[1:]:
            conn.execute(sql.SQL("CREATE TABLE {} () INHERITS ({})").format(part, ident))
        for i, table in enumerate(tables):
            if index:
                conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(table))
            # Each table gets every third id (the ONLY: a plain INSERT into the parent is ONLY).
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, created_at)"
                    " SELECT g, now() - interval '100 days' - make_interval(mins => g)"
                    " FROM generate_series(1, 300) AS g WHERE g % 3 = {} ORDER BY random()"
                ).format(table, sql.Literal(i))
            )
    for table in parts if kind == "hash" else [ident, *parts[1:]]:
        log_deleted_ids(conn, table)
    return ident


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("kind", ["hash", "inherited"])
def test_partitioned_and_inherited_tables_give_up_their_oldest_rows_first(
    tmp_path: Path, pg_dsn: str, kind: str, index: bool
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_partitioned(conn, kind, index=index)
        before = ids(conn, ident)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=10, max_rows=25)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", 25), result.error
    with connect(pg_dsn) as conn:
        # The 25 oldest of all three tables (id = minutes past 100 days: the highest ids).
        assert before - ids(conn, ident) == set(range(276, 301))
        batches = deleted_per_batch(conn)
    # Oldest first across batches too, each batch one transaction over every table it touched.
    assert batches == [set(range(291, 301)), set(range(281, 291)), set(range(276, 281))]

    # Without max_rows a run takes all the expired rows, and nothing else.
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=40)]), "all.toml")
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 275), result.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == before - set(range(1, 301))


# -- the index -------------------------------------------------------------------------------------


def large_table(conn: psycopg.Connection[Any], index: str | None) -> sql.Identifier:
    """20,000 expired rows (plus the fresh and NULL ones), statistics up to date."""
    ident = make_table(conn, index=index)
    fill(conn, ident, expired=20_000)
    conn.execute(sql.SQL("ANALYZE {}").format(ident))
    return ident


@pytest.mark.parametrize("limit", [100, 5000])
def test_a_batch_is_planned_as_an_index_scan_when_there_is_an_index(
    pg_dsn: str, limit: int
) -> None:
    with connect(pg_dsn) as conn:
        ident = large_table(conn, "btree")
        statement = retention.batch_statement(
            conn, retention.Rule(TABLE, TABLE, "created_at", 30 * 86400), ident
        )
        nodes = explain(conn, statement, {"cutoff": cutoff(conn), "limit": limit})

    # enable_seqscan and friends at their defaults: the planner chooses the index by itself.
    scans = [n for n in nodes if n.get("Relation Name") == TABLE]
    index_scans = [n for n in scans if n["Node Type"] == "Index Scan"]
    assert [n["Index Name"] for n in index_scans] == [f"{TABLE}_created_at_idx"], scans
    assert index_scans[0]["Scan Direction"] == "Forward"  # ascending: the oldest first
    # Rows come in index order: nothing sorts the expired rows, no scan reads the whole table.
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Seq Scan")], nodes


def test_a_descending_index_is_read_backwards(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = large_table(conn, None)
        conn.execute(sql.SQL("CREATE INDEX newest_first ON {} (created_at DESC)").format(ident))
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        statement = retention.batch_statement(
            conn, retention.Rule(TABLE, TABLE, "created_at", 30 * 86400), ident
        )
        nodes = explain(conn, statement, {"cutoff": cutoff(conn), "limit": 100})
    [scan] = [n for n in nodes if n["Node Type"] == "Index Scan"]
    assert (scan["Index Name"], scan["Scan Direction"]) == ("newest_first", "Backward")
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Seq Scan")], nodes


def test_a_partitioned_batch_merges_the_partitions_index_scans(pg_dsn: str) -> None:
    with connect(pg_dsn) as conn:
        ident = make_partitioned(conn, "hash", index=True)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, now() - interval '1 year'"
                " FROM generate_series(100000, 130000) AS g"
            ).format(ident)
        )
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        oids = [
            r[0]
            for r in conn.execute(
                "SELECT inhrelid FROM pg_inherits WHERE inhparent = %s::regclass",
                (f"tenant_a.{TABLE}",),
            ).fetchall()
        ]
        statement = retention.pick_statement(
            conn, retention.Rule(TABLE, TABLE, "created_at", 30 * 86400), ident
        )
        nodes = explain(conn, statement, {"cutoff": cutoff(conn), "limit": 100, "members": oids})
    assert "Merge Append" in [n["Node Type"] for n in nodes]
    scans = [n for n in nodes if n.get("Relation Name", "").startswith("part")]
    assert sorted(n["Relation Name"] for n in scans) == ["part0", "part1", "part2"]
    assert {n["Node Type"] for n in scans} == {"Index Scan"}, scans
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Seq Scan")], nodes


def test_a_run_reads_the_index_not_the_table(tmp_path: Path, pg_dsn: str) -> None:
    """The server's own counters: the sweep scanned the index, a few rows per batch."""
    with connect(pg_dsn) as conn:
        ident = large_table(conn, "btree")
        # Flush this session's counters now (PostgreSQL 15+ flushes them before it answers the
        # statement), so that the numbers read below move only for what the sweep did.
        conn.execute("SELECT pg_catalog.pg_stat_force_next_flush()")
        before = table_counters(conn)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(batch_size=50, max_rows=200)]))
    result = only_result(sweep(config, plugins))

    assert (result.status, result.rows) == ("ok", 200), result.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == everything(20_000) - oldest(200, 20_000)
        # The plugin flushes its session's counters before it returns (its own pg_stat_force_
        # next_flush), so they are already visible here.
        after = table_counters(conn)
    seq_scans, index_scans, index_entries = (a - b for a, b in zip(after, before, strict=True))
    assert seq_scans == 0
    assert index_scans >= 4  # one per batch
    # Each batch reads the entries it deletes plus those the batches before it left dead (until
    # the scan marks them so): far below the 20,000 expired rows a sort would read per batch.
    assert index_entries < 2000


def table_counters(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT t.seq_scan, i.idx_scan, i.idx_tup_read"
        "  FROM pg_stat_user_tables t JOIN pg_stat_user_indexes i USING (relid)"
        " WHERE t.schemaname = 'tenant_a' AND t.relname = %s AND i.indexrelname <> %s",
        (TABLE, f"{TABLE}_pkey"),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# -- the missing-index warning ---------------------------------------------------------------------


def index_warnings(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if INDEX_WARNING in str(e.get("event"))]


def test_missing_index_warning_says_what_it_costs(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=None)
        fill(conn, ident, expired=10)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule()]))
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 10), result.error

    [warning] = index_warnings(logs)
    assert "every batch" in warning["event"] and "sorts all" in warning["event"]
    assert (
        warning["fix"] == 'CREATE INDEX CONCURRENTLY ON "tenant_a"."notifications" ("created_at")'
    )


@pytest.mark.parametrize(
    "index",
    [
        "USING brin (created_at)",  # no order: a bitmap scan, then a sort of every expired row
        "USING hash (created_at)",  # equality only
        "((created_at AT TIME ZONE 'UTC'))",  # an expression, not the column
        "(created_at) WHERE id < 0",  # partial: a batch's rows need not be in it
        "(id, created_at)",  # the column, but not leading
        "(created_at NULLS FIRST)",  # ascending with the NULLs first: no scan order is ours
    ],
)
def test_an_index_that_cannot_order_a_batch_still_warns(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]], index: str
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=None)
        conn.execute(sql.SQL("CREATE INDEX ON {} {}").format(ident, sql.SQL(index)))
        fill(conn, ident, expired=10)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(max_rows=3)]))
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 3), result.error
    assert len(index_warnings(logs)) == 1
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == everything(10) - oldest(3, 10)


@pytest.mark.parametrize("index", ["(created_at DESC)", "(created_at, id)"])
def test_an_index_that_orders_a_batch_does_not_warn(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]], index: str
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=None)
        conn.execute(sql.SQL("CREATE INDEX ON {} {}").format(ident, sql.SQL(index)))
        fill(conn, ident, expired=10)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule()]))
    assert only_result(sweep(config, plugins)).status == "ok"
    assert index_warnings(logs) == []


def test_an_index_led_by_the_match_columns_orders_a_batch_and_does_not_warn(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    # A multi-tenant table filtered by match = {id: …}: (id, created_at) orders every batch of
    # one id; sweeperd must neither warn nor suggest an index on created_at alone.
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=None)
        conn.execute(sql.SQL("CREATE INDEX ON {} (id, created_at)").format(ident))
        fill(conn, ident, expired=10)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(match={"id": 3})]))
    result = only_result(sweep(config, plugins))
    assert (result.status, result.rows) == ("ok", 1), result.error
    assert index_warnings(logs) == []


def test_without_an_ordering_index_the_fix_puts_the_match_columns_first(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    with connect(pg_dsn) as conn:
        ident = make_table(conn, index=None)  # the primary key (id) does not order created_at
        fill(conn, ident, expired=10)
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule(match={"id": 3})]))
    assert only_result(sweep(config, plugins)).status == "ok"
    [warning] = index_warnings(logs)
    assert warning["fix"] == (
        'CREATE INDEX CONCURRENTLY ON "tenant_a"."notifications" ("id", "created_at")'
    )


def test_inherited_table_warning_names_each_unindexed_table(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]]
) -> None:
    """CREATE INDEX on an inheritance parent indexes the parent only: the fix names each table."""
    with connect(pg_dsn) as conn:
        make_partitioned(conn, "inherited", index=False)
        conn.execute("CREATE INDEX ON tenant_a.part1 (created_at)")
    config, plugins = load(tmp_path, one_tenant(pg_dsn, [rule()]))
    assert only_result(sweep(config, plugins)).status == "ok"
    [warning] = index_warnings(logs)
    assert warning["fix"] == (
        'CREATE INDEX CONCURRENTLY ON "tenant_a"."notifications" ("created_at"); '
        'CREATE INDEX CONCURRENTLY ON "tenant_a"."part2" ("created_at")'
    )
