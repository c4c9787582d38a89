"""LIKE patterns mean what PostgreSQL means, escapes included, in tenant_sources and discover;
schemas the prefix rule drops are said at info level, with the count. Tenants are (database,
name): one name in two databases is two tenants, shown with their database."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import run_cli, run_sql, toml_str, write_config

from sweeperd import like

SCHEMAS = ["tenant_acme", "tenant_globex", "tenantXinitech", "tenants_archive", "tenant\\odd"]


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("tenant_%", "tenant_"),
        ("tenant\\_%", "tenant_"),
        ("tenant\\\\%", "tenant\\"),
        ("100\\%%", "100%"),
        ("%", ""),
        ("a_b", "a_b"),
    ],
)
def test_prefix_resolves_escapes(pattern: str, prefix: str) -> None:
    assert like.prefix(pattern) == prefix


@pytest.mark.parametrize("pattern", ["tenant\\", "x\\\\\\"])
def test_a_trailing_escape_is_a_problem(pattern: str) -> None:
    assert like.problem(pattern) is not None


@pytest.mark.parametrize("pattern", ["tenant\\\\", "tenant\\_%", "%", ""])
def test_other_patterns_are_fine(pattern: str) -> None:
    assert like.problem(pattern) is None


def server_matches(dsn: str, pattern: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s FROM unnest(%s::text[]) s WHERE s LIKE %s ORDER BY 1", (SCHEMAS, pattern)
        ).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("pattern", ["tenant\\_%", "tenant_%", "tenant\\\\%", "%\\_a%"])
def test_every_tenant_the_server_matches_starts_with_the_prefix_or_is_reported(
    pg_dsn: str, pattern: str
) -> None:
    # PostgreSQL decides what matches; our prefix is what a match is meant to start with.
    matched = server_matches(pg_dsn, pattern)
    kept, dropped = like.split(matched, like.prefix(pattern))
    assert sorted(kept + dropped) == matched
    if pattern == "tenant\\_%":
        assert kept == ["tenant_acme", "tenant_globex"] and dropped == []
    if pattern == "tenant_%":
        assert kept == ["tenant_acme", "tenant_globex"]
        assert sorted(dropped) == ["tenantXinitech", "tenant\\odd", "tenants_archive"]


def make_schemas(dsn: str) -> None:
    run_sql(dsn, *(f'CREATE SCHEMA "{s}"' for s in SCHEMAS))


def config_with_source(tmp_path: Path, dsn: str, pattern: str, extra: str = "") -> Path:
    return write_config(
        tmp_path,
        f"""
        [log]
        format = "json"
        level = "info"

        [databases.main]
        dsn = {toml_str(dsn)}

        [[tenant_sources]]
        database = "main"
        schemas = {toml_str(pattern)}
        {extra}
        [sweeps.nightly]
        cron = "0 3 * * *"
        operations = ["vacuum.*"]

        [plugins.vacuum]
        tables = ["t"]
        """,
    )


def dry_run(config: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = run_cli("sweep", "-c", str(config), "--dry-run", "--json", "nightly")
    assert result.returncode == 0, result.stderr
    logs = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    report = json.loads(result.stdout)
    report["results"] = [r for r in report["results"] if r["tenant"] is not None]
    return report, logs


def test_an_escaped_underscore_in_tenant_sources_finds_the_tenants(
    tmp_path: Path, pg_dsn: str
) -> None:
    make_schemas(pg_dsn)
    config = config_with_source(tmp_path, pg_dsn, "tenant\\_%")
    report, logs = dry_run(config)
    assert sorted(r["tenant"] for r in report["results"]) == ["acme", "globex"]
    assert sorted(r["schema"] for r in report["results"]) == ["tenant_acme", "tenant_globex"]
    assert not [e for e in logs if "prefix" in e.get("event", "")]  # nothing dropped


def test_schemas_dropped_by_the_prefix_rule_are_said_at_info_with_the_count(
    tmp_path: Path, pg_dsn: str
) -> None:
    make_schemas(pg_dsn)
    report, logs = dry_run(config_with_source(tmp_path, pg_dsn, "tenant_%"))
    assert sorted(r["tenant"] for r in report["results"]) == ["acme", "globex"]
    (said,) = [e for e in logs if "not its prefix" in e.get("event", "")]
    assert said["level"] == "info" and said["count"] == 3 and said["prefix"] == "tenant_"
    assert said["database"] == "main" and said["pattern"] == "tenant_%"


def test_discover_with_an_escaped_underscore(tmp_path: Path, pg_dsn: str) -> None:
    make_schemas(pg_dsn)
    config = write_config(tmp_path, f"[databases.main]\ndsn = {toml_str(pg_dsn)}\n")
    result = run_cli("discover", "-c", str(config), "--database", "main", "--schemas", "tenant\\_%")
    assert result.returncode == 0, result.stderr
    doc = tomllib.loads(result.stdout)
    assert sorted(t["schema"] for t in doc["tenants"]) == ["tenant_acme", "tenant_globex"]
    assert result.stdout.startswith("# 2 schema(s) matching")
    assert "Left out" not in result.stdout

    default = run_cli("discover", "-c", str(config), "--database", "main")
    assert default.returncode == 0, default.stderr
    assert "# Left out: 3 more schema(s)" in default.stdout
    assert len(tomllib.loads(default.stdout)["tenants"]) == 2


def test_discover_refuses_a_pattern_the_server_would_refuse(tmp_path: Path, pg_dsn: str) -> None:
    config = write_config(tmp_path, f"[databases.main]\ndsn = {toml_str(pg_dsn)}\n")
    result = run_cli("discover", "-c", str(config), "--database", "main", "--schemas", "x\\")
    assert result.returncode == 2
    assert result.stderr.startswith("sweeperd: --schemas: expected a LIKE pattern")
    assert "Traceback" not in result.stderr


def test_one_tenant_name_in_two_databases(tmp_path: Path, pg_dsn: str, other_dsn: str) -> None:
    config = write_config(
        tmp_path,
        f"""
        [databases.main]
        dsn = {toml_str(pg_dsn)}
        [databases.other]
        dsn = {toml_str(other_dsn)}

        [[tenants]]
        name = "acme"
        database = "main"
        schema = "tenant_acme"
        [[tenants]]
        name = "acme"
        database = "other"
        schema = "tenant_acme"

        [sweeps.nightly]
        cron = "0 3 * * *"
        operations = ["vacuum.*"]
        [plugins.vacuum]
        tables = ["t"]
        """,
    )
    check = run_cli("check-config", "-c", str(config))
    assert check.returncode == 0, check.stderr
    result = run_cli("sweep", "-c", str(config), "--dry-run", "--json", "--tenant", "acme")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted((r["database"], r["tenant"]) for r in report["results"] if r["tenant"]) == [
        ("main", "acme"),
        ("other", "acme"),
    ]
    text = run_cli("sweep", "-c", str(config), "--dry-run", "--tenant", "acme")
    assert text.returncode == 0, text.stderr
    assert "acme [main]" in text.stdout and "acme [other]" in text.stdout
