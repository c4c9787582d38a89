"""Retention against schemas, tables and columns whose names are hostile.

Every name reaches PostgreSQL through :class:`psycopg.sql.Identifier` (catalog lookups bind names
as values). These tests create objects with names a string-formatted statement would break on or
be hijacked by — double quotes, ``;``, ``--``, spaces, upper case, non-ASCII letters, 63 bytes
(PostgreSQL's limit), a trailing backslash, ``%`` (psycopg's placeholder sign), ``_`` and ``%``
(LIKE's wildcards), a dot — and check three things: the right rows went (the oldest first, as
always), look-alike "decoy" tables that a mis-quoted, case-folded or pattern-matched name would
reach kept every row, and a canary table that the injected statements would drop, alter or empty
is exactly as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sweeperd.bundled import retention
from test_retention import config_doc, connect, load, only_result, sweep
from test_retention_order import explain, index_warnings

# 63-byte names (PostgreSQL keeps identifiers up to NAMEDATALEN - 1 = 63 bytes): one of mostly
# two-byte letters, one of LIKE wildcards ending in a backslash.
LONG_NON_ASCII = "Ünïcødé_" + "é" * 20 + "x" * 11
LONG_ASCII = "T" + "_" * 30 + "%" * 31 + "\\"
assert len(LONG_NON_ASCII.encode()) == 63 and len(LONG_ASCII.encode()) == 63

# (schema, table, cutoff column), each a name an unquoted or half-quoted statement would trip on.
CASES = {
    "quotes-semicolons-comments": (
        'Tenant "A"; DROP TABLE public.canary; --',
        'notif"; ALTER TABLE public.canary ADD COLUMN pwned int; --',
        'created "at" -- ; DELETE FROM public.canary',
    ),
    "upper-case-and-spaces": ("Tenant A", "Notifications", "Created At"),
    "non-ascii-and-63-bytes": (LONG_NON_ASCII, LONG_ASCII, "créé_à"),
    "backslash-percent-underscore": ("tenant_50%off\\", "%(cutoff)s_%s\\", "100%_at\\"),
    "dots-and-quotes": ("a.b'c", "public.canary", "x'); DROP TABLE public.canary; --"),
}
MATCH_COLUMN = 'kind"; DROP TABLE public.canary; --'
MATCH_VALUE = "x'; DROP TABLE public.canary; --"
PARTITIONS = ('p "0"; DROP TABLE public.canary; --', "P1%s\\")

# Ids 1-20 are expired (id minutes past 100 days old: the higher the id, the older), 21-30 are a
# day old, 31-33 have NULL in the cutoff column. Ids 19 and 20 have another MATCH_COLUMN value.
EXPIRED = set(range(1, 21))
EVERY_ID = set(range(1, 34))
MATCHING = set(range(1, 19))


def decoy(name: str) -> str:
    """A name that a case-folding (unquoted) or LIKE-matching lookup could mistake for ``name``."""
    return name.lower().replace("_", "X").replace("%", "Y")


def build(
    conn: psycopg.Connection[Any], schema: str, table: str, column: str, *, kind: str, index: bool
) -> sql.Identifier:
    """``schema.table`` with the cutoff column ``column``, filled; plain or hash-partitioned."""
    ident = sql.Identifier(schema, table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    columns = sql.SQL("id int, {} timestamptz, {} text").format(
        sql.Identifier(column), sql.Identifier(MATCH_COLUMN)
    )
    if kind == "partitioned":
        conn.execute(sql.SQL("CREATE TABLE {} ({}) PARTITION BY HASH (id)").format(ident, columns))
        for i, part in enumerate(PARTITIONS):
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS 2, REMAINDER {})"
                ).format(sql.Identifier(schema, part), ident, sql.Literal(i))
            )
    else:
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, columns))
    if index:
        conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(ident, sql.Identifier(column)))
    # The value as a literal, not a parameter: psycopg would read a "%" in the names as one.
    conn.execute(
        sql.SQL(
            "INSERT INTO {} SELECT g,"
            " CASE WHEN g <= 20 THEN now() - interval '100 days' - make_interval(mins => g)"
            "      WHEN g <= 30 THEN now() - interval '1 day' END,"
            " CASE WHEN g IN (19, 20) THEN 'other' ELSE {} END"
            " FROM generate_series(1, 33) AS g ORDER BY random()"
        ).format(ident, sql.Literal(MATCH_VALUE))
    )
    return ident


def build_with_decoys(
    conn: psycopg.Connection[Any], case: str, *, kind: str = "plain", index: bool = True
) -> tuple[sql.Identifier, list[sql.Identifier]]:
    """The case's table, its look-alikes (same rows), and the canary."""
    conn.execute("CREATE TABLE public.canary (x int)")
    conn.execute("INSERT INTO public.canary VALUES (1)")
    schema, table, column = CASES[case]
    ident = build(conn, schema, table, column, kind=kind, index=index)
    decoys: list[sql.Identifier] = []
    made = {(schema, table)}
    for other in (
        (decoy(schema), decoy(table), decoy(column)),
        (schema, decoy(table), decoy(column)),
        (decoy(schema), table, column),
    ):
        if other[:2] not in made:  # no look-alike when folding changes nothing
            made.add(other[:2])
            decoys.append(build(conn, *other, kind="plain", index=False))
    return ident, decoys


def rules(case: str, scope: str) -> list[dict[str, Any]]:
    """ "capped": the oldest 5 matching rows, 2 per batch; "all": every expired matching row."""
    schema, table, column = CASES[case]
    where = {"scope": "database", "schema": schema} if scope == "database" else {}
    common = {"table": table, "column": column, "older_than": "30d"} | where
    return [
        {"name": "capped", "max_rows": 5, "batch_size": 2, "match": {MATCH_COLUMN: MATCH_VALUE}}
        | common,
        {"name": "all", "batch_size": 4, "match": {MATCH_COLUMN: MATCH_VALUE}} | common,
    ]


def tenants(case: str, scope: str) -> list[tuple[str, str]]:
    return [("a", CASES[case][0])] if scope == "tenant" else []


def ids(conn: psycopg.Connection[Any], ident: sql.Identifier) -> set[int]:
    return {r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}").format(ident)).fetchall()}


def assert_canary_intact(conn: psycopg.Connection[Any]) -> None:
    columns = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('public.canary')"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    ).fetchall()
    assert columns == [("x",)]
    assert conn.execute("SELECT x FROM public.canary").fetchall() == [(1,)]


@pytest.mark.parametrize("kind", ["plain", "partitioned"])
@pytest.mark.parametrize("scope", ["tenant", "database"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_names_prune_the_right_rows_and_nothing_else(
    tmp_path: Path, pg_dsn: str, case: str, scope: str, kind: str
) -> None:
    with connect(pg_dsn) as conn:
        ident, decoys = build_with_decoys(conn, case, kind=kind)
    config, plugins = load(tmp_path, config_doc(pg_dsn, tenants(case, scope), rules(case, scope)))

    capped = only_result(sweep(config, plugins, only=["retention.capped"]), "retention.capped")
    assert (capped.status, capped.rows) == ("ok", 5), capped.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == EVERY_ID - {14, 15, 16, 17, 18}  # the oldest 5 that match

    dry = only_result(sweep(config, plugins, only=["retention.all"], dry_run=True), "retention.all")
    assert (dry.status, dry.rows) == ("dry-run", 13), dry.error

    full = only_result(sweep(config, plugins, only=["retention.all"]), "retention.all")
    assert (full.status, full.rows) == ("ok", 13), full.error
    with connect(pg_dsn) as conn:
        assert ids(conn, ident) == EVERY_ID - MATCHING
        for other in decoys:
            assert ids(conn, other) == EVERY_ID, other
        assert_canary_intact(conn)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_names_batch_is_an_index_scan(pg_dsn: str, case: str) -> None:
    _schema, table, column = CASES[case]
    with connect(pg_dsn) as conn:
        ident, _decoys = build_with_decoys(conn, case)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, now() - interval '1 year', {}"
                " FROM generate_series(100, 20000) AS g"
            ).format(ident, sql.Literal(MATCH_VALUE))
        )
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        rule = retention.Rule("r", table, column, 30 * 86400, match=((MATCH_COLUMN, MATCH_VALUE),))
        cutoff = conn.execute("SELECT now() - interval '30 days'").fetchone()
        assert cutoff is not None
        params = {"cutoff": cutoff[0], "m0": MATCH_VALUE, "limit": 100}
        nodes = explain(conn, retention.batch_statement(conn, rule, ident), params)
        assert_canary_intact(conn)
    [scan] = [n for n in nodes if n["Node Type"] == "Index Scan"]
    assert scan["Relation Name"] == table
    assert not [n for n in nodes if n["Node Type"] in ("Sort", "Seq Scan")], nodes


@pytest.mark.parametrize("kind", ["plain", "partitioned"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_names_in_the_missing_index_warning_are_quoted(
    tmp_path: Path, pg_dsn: str, logs: list[dict[str, Any]], case: str, kind: str
) -> None:
    schema, table, column = CASES[case]
    with connect(pg_dsn) as conn:
        build_with_decoys(conn, case, kind=kind, index=False)
        how = (
            "CREATE INDEX ON {} ({})"
            if kind == "partitioned"
            else ("CREATE INDEX CONCURRENTLY ON {} ({})")
        )
        # The rule's match column first: the index then orders every batch of its value.
        columns = sql.SQL(", ").join([sql.Identifier(MATCH_COLUMN), sql.Identifier(column)])
        fix = sql.SQL(how).format(sql.Identifier(schema, table), columns)
        expected = fix.as_string(conn)
    config, plugins = load(
        tmp_path, config_doc(pg_dsn, tenants(case, "tenant"), rules(case, "tenant"))
    )
    result = only_result(sweep(config, plugins, only=["retention.capped"]), "retention.capped")
    assert (result.status, result.rows) == ("ok", 5), result.error

    [warning] = index_warnings(logs)
    assert warning["fix"] == expected
    # The fix, run as it stands, creates the index and nothing else.
    with connect(pg_dsn) as conn:
        conn.execute(warning["fix"])
        assert_canary_intact(conn)
        indexed = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass",
            (sql.Identifier(schema, table).as_string(conn),),
        ).fetchone()
    assert indexed == (1,)
