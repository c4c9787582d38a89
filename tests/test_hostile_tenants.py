"""Hostile tenant names and schemas, in the config and discovered from the database, end to end.

The schemas below are created in the test database; each holds a ``notifications`` table with
expired and fresh rows. They reach sweeperd twice: discovered by ``[[tenant_sources]]`` (the
schema names come from the catalog) and as static ``[[tenants]]`` whose *tenant names* are
hostile too. One real ``sweeperd sweep`` runs retention and vacuum on all of them with the run
history on; then the expired rows are gone and only those, every table was vacuumed, the
history holds the names exactly, ``--tenant`` with an exact hostile name selects that tenant
only, and the canary table that any injected statement would drop is intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from support import run_cli, toml_str, write_config

HOSTILE = [
    'Acme "x"; DROP TABLE public.canary; --',
    "ÜBER tab",
    "UPPER",
    "back\\",
    "50%off_%s",
    "semi;colon -- comment",
    "é" * 30,  # with the prefix: 62 bytes
    "[glob]*?",
    "*",  # a glob to some: it must not make a sweep's tenants = ["*"] mean this one only
]
PREFIX = "t_"
EXPIRED, FRESH = 7, 3


@pytest.fixture
def hostile_db(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.canary (x int)")
        conn.execute("INSERT INTO public.canary VALUES (1)")
        for name in HOSTILE:
            schema = PREFIX + name
            assert len(schema.encode()) <= 63, schema
            table = sql.Identifier(schema, "notifications")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE TABLE {} (id int, created_at timestamptz)").format(table))
            conn.execute(sql.SQL("CREATE INDEX ON {} (created_at)").format(table))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, CASE WHEN g <= {} THEN now() - interval '100 days'"
                    " ELSE now() END FROM generate_series(1, {}) g"
                ).format(table, sql.Literal(EXPIRED), sql.Literal(EXPIRED + FRESH))
            )
    return pg_dsn


def config(tmp_path: Path, dsn: str, *, discovered: bool) -> Path:
    if discovered:
        pattern = PREFIX.replace("_", "\\_") + "%"  # t\_%: a literal underscore
        tenants = f"""
            [[tenant_sources]]
            database = "main"
            schemas = {toml_str(pattern)}
            """
    else:
        tenants = "".join(
            f"""
            [[tenants]]
            name = {toml_str(name)}
            database = "main"
            schema = {toml_str(PREFIX + name)}
            """
            for name in HOSTILE
        )
    return write_config(
        tmp_path,
        f"""
        [log]
        format = "json"
        [databases.main]
        dsn = {toml_str(dsn)}
        {tenants}
        [sweeps.nightly]
        cron = "0 3 * * *"
        operations = ["retention.*", "vacuum.notifications"]

        [plugins.vacuum]
        tables = ["notifications"]

        [[plugins.retention.rules]]
        name = "notifications"
        table = "notifications"
        column = "created_at"
        older_than = "30d"
        batch_size = 3
        """,
    )


def sweep(path: Path, *args: str) -> dict[str, Any]:
    result = run_cli("sweep", "-c", str(path), "--json", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def rows(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        table = sql.Identifier(schema, "notifications")
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
        assert row is not None
        return int(row[0])


def assert_canary_intact(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM public.canary").fetchall() == [(1,)]


@pytest.mark.parametrize("discovered", [True, False], ids=["discovered", "configured"])
def test_hostile_tenants_are_swept_and_recorded_exactly(
    tmp_path: Path, hostile_db: str, discovered: bool
) -> None:
    path = config(tmp_path, hostile_db, discovered=discovered)
    check = run_cli("check-config", "-c", str(path))
    assert check.returncode == 0, check.stderr

    report = sweep(path, "nightly")
    results = [r for r in report["results"] if r["tenant"] is not None]
    assert {(r["tenant"], r["schema"]) for r in results} == {(n, PREFIX + n) for n in HOSTILE}
    assert {r["status"] for r in results} == {"ok"}, [r for r in results if r["status"] != "ok"]
    retention = {r["tenant"]: r["rows"] for r in results if r["operation"].startswith("retention")}
    assert retention == dict.fromkeys(HOSTILE, EXPIRED)
    for name in HOSTILE:
        assert rows(hostile_db, PREFIX + name) == FRESH
    with psycopg.connect(hostile_db) as conn:
        vacuumed = conn.execute(
            "SELECT schemaname FROM pg_stat_user_tables"
            " WHERE relname = 'notifications' AND vacuum_count > 0"
        ).fetchall()
    assert {r[0] for r in vacuumed} == {PREFIX + n for n in HOSTILE}
    assert_canary_intact(hostile_db)

    # The history holds the names as they are, and status reads them back.
    status = run_cli("status", "-c", str(path), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["runs"] and doc["runs"][0]["counts"]["failed"] == 0

    # --tenant with a tenant's exact name selects it, glob characters and all (and what else
    # the glob matches: fnmatch's [[] [*] [?] spell them literally).
    for name in ("[glob]*?", 'Acme "x"; DROP TABLE public.canary; --', "back\\", "*"):
        only = sweep(path, "nightly", "--dry-run", "--tenant", name)
        assert name in {r["tenant"] for r in only["results"] if r["tenant"]}
    exact = sweep(path, "nightly", "--dry-run", "--tenant", "[[]glob][*][?]")
    assert {r["tenant"] for r in exact["results"] if r["tenant"]} == {"[glob]*?"}
    # status --tenant reads the history with the same rule, in SQL.
    for glob, expected in (("[[]glob][*][?]", 1), ("[glob]*?", 2), ("*", len(HOSTILE))):
        done = run_cli("status", "-c", str(path), "--json", "--tenant", glob)
        assert done.returncode == 0, done.stderr
        counts = {o["operation"]: o["tenants"] for o in json.loads(done.stdout)["last_success"]}
        assert counts["retention.notifications"] == expected, (glob, counts)
    assert_canary_intact(hostile_db)
