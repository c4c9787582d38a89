"""Tenant resolution and one-shot sweeps across several databases (real PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
from support import PgServer, run_sql

from sweeperd import Context, Operation
from sweeperd.config import Config, parse_config
from sweeperd.databases import open_databases
from sweeperd.plugins import Plugins, new_plugin_manager
from sweeperd.sweep import sweep_once
from sweeperd.tenants import resolve_tenants


def config_for(dsns: dict[str, str], **extra: Any) -> Config:
    doc: dict[str, Any] = {
        "history": {"enabled": False},
        "databases": {name: {"dsn": dsn, "connect_timeout": "2s"} for name, dsn in dsns.items()},
        "tenant_sources": [{"database": name, "schemas": "tenant_%"} for name in dsns],
    }
    doc.update(extra)
    return parse_config(doc, Path("t.toml"))


def marker() -> Plugins:
    async def touch(ctx: Context) -> int:
        cur = await ctx.conn.execute("SELECT 1")
        return len(await cur.fetchall())

    op = Operation(name="m.touch", run=touch)
    return Plugins(pm=new_plugin_manager(), infos=(), operations={op.name: op})


def test_like_wildcard_in_the_prefix_does_not_make_tenants(pg_dsn: str) -> None:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_acme",
        "CREATE SCHEMA tenants_archive",
        "CREATE SCHEMA tenant_",
    )

    async def main() -> list[tuple[str, str]]:
        config = config_for({"main": pg_dsn})
        databases, _ = await open_databases(config, ["main"])
        try:
            tenants, failed = await resolve_tenants(config, databases)
            assert failed == {}
            return sorted((t.name, t.schema) for t in tenants)
        finally:
            await databases["main"].close()

    # "tenants_archive" matches LIKE 'tenant_%' ('_' is a wildcard) but lacks the prefix.
    assert asyncio.run(main()) == [("acme", "tenant_acme"), ("tenant_", "tenant_")]


def test_the_same_tenant_name_in_two_databases_is_two_tenants(pg_dsn: str, other_dsn: str) -> None:
    for dsn in (pg_dsn, other_dsn):
        run_sql(dsn, "CREATE SCHEMA tenant_a")
    config = config_for({"eu": pg_dsn, "us": other_dsn})
    report = asyncio.run(sweep_once(config, marker()))
    assert sorted((r.database, r.tenant, r.status) for r in report.results) == [
        ("eu", "a", "ok"),
        ("us", "a", "ok"),
    ]


def test_one_database_failing_discovery_does_not_cost_the_others(
    pg_dsn: str, other_dsn: str, pg_server: PgServer
) -> None:
    run_sql(pg_dsn, "CREATE SCHEMA tenant_ok")
    run_sql(other_dsn, "CREATE SCHEMA tenant_lost")
    config = config_for(
        {"eu": pg_dsn, "us": other_dsn},
        tenants=[{"name": "static", "database": "us", "schema": "tenant_lost"}],
    )
    broken = psycopg.conninfo.conninfo_to_dict(other_dsn)["dbname"]

    async def main() -> tuple[list[str], dict[str, str]]:
        databases, _ = await open_databases(config, ["eu", "us"])
        try:
            # "us" goes away after start: its pooled connections die, new ones are refused.
            run_sql(
                pg_server.admin_dsn,
                f'ALTER DATABASE "{broken}" ALLOW_CONNECTIONS false',
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{broken}'",
            )
            tenants, failed = await resolve_tenants(config, databases)
            return sorted(f"{t.database}:{t.name}" for t in tenants), failed
        finally:
            await asyncio.gather(*(db.close() for db in databases.values()))

    tenants, failed = asyncio.run(main())
    assert "eu:ok" in tenants and "us:static" in tenants
    assert list(failed) == ["us"] and "tenant discovery failed" in failed["us"]
