"""The vacuum plugin on schemas and tables whose names try to break out of an identifier.

Every name below is a legal PostgreSQL identifier: double quotes, ``;`` and ``--`` (an injected
``DROP TABLE public.canary`` would succeed if any name reached SQL as text), spaces, upper
case, non-ASCII, the 63-byte maximum, a trailing backslash, ``%`` and ``%s`` (psycopg's
placeholders), ``_`` (LIKE's wildcard), glob characters and a dot. Each is vacuumed by name and
through ``tables = "auto"`` (names read back from the catalog), the canary must survive, and
the statistics must show each hostile table vacuumed exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from psycopg import sql
from support import PgServer, run_cli, write_config
from sweeperd.bundled.vacuum import table_operation_name
from test_vacuum import (
    auto_results,
    config_doc,
    connect,
    load,
    make_table,
    result_of,
    stats,
    sweep,
    wait_for_dead_tuples,
)

from sweeperd.model import quote_name

INJECTION = "; DROP TABLE public.canary; --"
SCHEMAS = [
    f'Tenant "A"{INJECTION}',
    "ünï côdé\\",
    "50%_off",
    "S" + "ß" * 31,  # 63 bytes
]
TABLES = [
    'Events "x"',
    f'x"{INJECTION}',
    f"x'{INJECTION}",
    "ÜBER tab",
    "back\\",
    "50%_off %s %(x)s",
    "a.b",
    "é" * 31 + "z",  # 63 bytes
    "UPPER",
    "a*b?[c]",
    # Reads like the line of VACUUM VERBOSE's report the removed tuples are taken from.
    "tuples: 9 removed, 9 remain, 9 are dead but not yet removable",
]
TENANTS = [(f"t{i}", schema) for i, schema in enumerate(SCHEMAS)]
ROWS, DELETED = 100, 40
CANARY_ROWS = 3


def test_the_names_are_as_long_as_postgresql_allows() -> None:
    for name in [*SCHEMAS, *TABLES]:
        assert len(name.encode("utf-8")) <= 63, name
    assert len(SCHEMAS[3].encode("utf-8")) == len(TABLES[7].encode("utf-8")) == 63


@pytest.fixture
def hostile_db(pg_dsn: str) -> str:
    """Every hostile table in every hostile schema, each with DELETED dead tuples, and a canary."""
    with connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE public.canary (id int)")
        conn.execute("INSERT INTO public.canary SELECT generate_series(1, %s)", (CANARY_ROWS,))
    for schema in SCHEMAS:
        for table in TABLES:
            make_table(pg_dsn, schema, table, rows=ROWS, delete=DELETED)
    for schema in SCHEMAS:
        for table in TABLES:
            wait_for_dead_tuples(pg_dsn, schema, table, DELETED)
    return pg_dsn


def assert_canary_intact(dsn: str) -> None:
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM public.canary").fetchone()
    assert row == (CANARY_ROWS,)


def vacuum_counts(dsn: str) -> dict[tuple[str, str], int]:
    return {(s, t): stats(dsn, s, t)[2] for s in SCHEMAS for t in TABLES}


def test_hostile_tables_vacuumed_by_name(tmp_path: Path, hostile_db: str) -> None:
    config, plugins = load(tmp_path, config_doc(hostile_db, TENANTS, vacuum={"tables": TABLES}))
    names = [table_operation_name(t) for t in TABLES]
    assert len(set(names)) == len(TABLES)
    assert set(names) <= set(plugins.operations)

    report = sweep(config, plugins, only=["vacuum.*"])

    for tenant, schema in TENANTS:
        for table, name in zip(TABLES, names, strict=True):
            result = result_of(report, name, tenant)
            assert result.status == "ok", (schema, table, result.error)
            assert result.schema == schema
            # The counts are this table's own, however much its name looks like a report line.
            assert result.rows == DELETED, (schema, table, result.details)
            assert result.details["dead_tuples_after"] == 0
    assert vacuum_counts(hostile_db) == {key: 1 for key in vacuum_counts(hostile_db)}
    with connect(hostile_db) as conn:
        never = conn.execute(
            "SELECT count(*) FROM pg_stat_user_tables"
            " WHERE schemaname <> 'public' AND last_vacuum IS NULL"
        ).fetchone()
    assert never == (0,)
    assert_canary_intact(hostile_db)


def test_hostile_tables_vacuumed_by_auto(tmp_path: Path, hostile_db: str) -> None:
    """Names read back from the catalog, one item per table: each result names its table
    exactly, each table is vacuumed once, and the run history keeps each name as it is (the
    next sweep's expected durations are looked up by it)."""
    vacuum = {"tables": "auto", "min_dead_tuples": 1, "min_dead_ratio": 0.0}
    doc = {**config_doc(hostile_db, TENANTS, vacuum=vacuum), "history": {"enabled": True}}
    config, plugins = load(tmp_path, doc)
    report = sweep(config, plugins, only=["vacuum.auto"])

    for tenant, schema in TENANTS:
        results = auto_results(report, tenant)
        assert sorted(results) == sorted(TABLES), schema
        for table, result in results.items():
            assert result.status == "ok", (schema, table, result.error)
            assert result.schema == schema
            assert result.details["table"] == table
            # The counts are this table's own, however much its name looks like a report line.
            assert result.rows == DELETED, (schema, table, result.details)
    assert len(report.results) == len(TENANTS) * len(TABLES)
    assert report.not_needed == {}
    assert vacuum_counts(hostile_db) == {key: 1 for key in vacuum_counts(hostile_db)}
    assert stats(hostile_db, "public", "canary")[2] == 0  # not a tenant table
    with connect(hostile_db) as conn:
        history = conn.execute(
            "SELECT schema_name, target, status FROM sweeperd.results"
            " WHERE operation = 'vacuum.auto'"
        ).fetchall()
    assert sorted(history) == sorted((s, t, "ok") for s in SCHEMAS for t in TABLES)

    # A second sweep plans with that history (its last durations are asked for by the hostile
    # schema names): it plans without failing, and finds nothing over a threshold any more
    # (every table was vacuumed and analyzed).
    again = sweep(config, plugins, only=["vacuum.auto"])
    assert again.results == [] and again.not_needed == {"vacuum.auto": len(SCHEMAS) * len(TABLES)}
    assert_canary_intact(hostile_db)


@pytest.mark.parametrize("table", ["a*b?[c]", f'x"{INJECTION}', "a.b", "back\\"])
def test_only_with_the_operation_name_vacuums_that_table_alone(
    tmp_path: Path, hostile_db: str, table: str
) -> None:
    config, plugins = load(tmp_path, config_doc(hostile_db, TENANTS, vacuum={"tables": TABLES}))
    name = table_operation_name(table)
    report = sweep(config, plugins, only=[name])

    assert {r.operation for r in report.results} == {name}
    assert {r.status for r in report.results} == {"ok"}
    assert len(report.results) == len(TENANTS)
    counts = vacuum_counts(hostile_db)
    assert {key for key, n in counts.items() if n} == {(s, table) for s in SCHEMAS}
    assert_canary_intact(hostile_db)


def test_cli_report_spells_the_operation_as_only_selects_it(
    tmp_path: Path, hostile_db: str
) -> None:
    """The JSON report's ``operation`` is the name ``--only`` takes back, to the character."""
    doc = config_doc(hostile_db, TENANTS[:2], vacuum={"tables": TABLES})
    path = write_config(tmp_path, tomli_w.dumps(doc))
    name = 'vacuum."Events ""x"""'
    proc = run_cli("sweep", "-c", str(path), "--only", name, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["tenant"], r["operation"], r["status"]) for r in report["results"]] == [
        ("t0", name, "ok"),
        ("t1", name, "ok"),
    ]
    assert '"operation": "vacuum.\\"Events \\"\\"x\\"\\"\\""' in proc.stdout
    assert stats(hostile_db, SCHEMAS[0], 'Events "x"')[2] == 1
    assert stats(hostile_db, SCHEMAS[0], "ÜBER tab")[2] == 0
    assert_canary_intact(hostile_db)


def test_postgresql_reads_the_quoted_names_back(pg_server: PgServer) -> None:
    """parse_ident, PostgreSQL's own reader of qualified names, splits every operation name of a
    quoted table into the plugin and exactly that table name (names passed as values)."""
    quoted = [t for t in [*TABLES, *SCHEMAS] if quote_name(t) != t]
    assert len(quoted) == len(TABLES) + len(SCHEMAS) - 1  # all but UPPER
    with connect(pg_server.admin_dsn) as conn:
        for name in quoted:
            row = conn.execute(
                "SELECT pg_catalog.parse_ident(%s)", (table_operation_name(name),)
            ).fetchone()
            assert row == (["vacuum", name],)
            # And a quoted part is what psycopg's Identifier renders for it.
            assert quote_name(name) == sql.Identifier(name).as_string(conn)
