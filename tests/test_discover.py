"""`sweeperd discover`: [[tenants]] TOML for the schemas found, through the real CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path

from support import run_cli, run_sql, toml_str, write_config

from sweeperd.discover import tenants_for


def test_prefix_and_names() -> None:
    found = tenants_for(["tenant_a", "tenants_archive", "tenant_"], "main", "tenant_%")
    assert found == [
        {"name": "a", "database": "main", "schema": "tenant_a"},
        {"name": "tenant_", "database": "main", "schema": "tenant_"},
    ]


def test_discover_prints_tenants_that_load_back(tmp_path: Path, pg_dsn: str) -> None:
    hostile = 'tenant_x"; DROP SCHEMA public; --'
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_acme",
        'CREATE SCHEMA "tenant_Émile"',
        'CREATE SCHEMA "tenant_x""; DROP SCHEMA public; --"',
        "CREATE SCHEMA other",
    )
    config = write_config(
        tmp_path,
        f"""
        [databases.main]
        dsn = {toml_str(pg_dsn)}
        """,
    )
    result = run_cli("discover", "-c", str(config), "--database", "main")
    assert result.returncode == 0, result.stderr
    assert "password" not in result.stdout
    doc = tomllib.loads(result.stdout)
    assert sorted(t["schema"] for t in doc["tenants"]) == sorted(
        ["tenant_acme", "tenant_Émile", hostile]
    )
    assert {t["name"] for t in doc["tenants"]} == {"acme", "Émile", hostile[len("tenant_") :]}
    # The output appended to the config is a valid configuration naming those tenants.
    combined = write_config(tmp_path, config.read_text() + "\n" + result.stdout, "all.toml")
    check = run_cli("check-config", "-c", str(combined))
    assert check.returncode == 0, check.stderr
    assert "3 tenants" in check.stdout


def test_discover_errors(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
        [databases.gone]
        dsn = "host=/nonexistent dbname=x"
        connect_timeout = "1s"
        """,
    )
    unknown = run_cli("discover", "-c", str(config), "--database", "main")
    assert unknown.returncode == 2 and "no database named 'main'" in unknown.stderr
    gone = run_cli("discover", "-c", str(config), "--database", "gone")
    assert gone.returncode == 3 and "unreachable" in gone.stderr
    assert "Traceback" not in unknown.stderr + gone.stderr
