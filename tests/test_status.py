"""``sweeperd status`` end to end: real sweeps write the run history, the real CLI reads it.

A drop-in plugin (``plugins.d/hist.py``) contributes deterministic operations:

- ``hist.ok``: returns the length of the tenant's name as its row count;
- ``hist.flaky``: fails with a division by zero in the tenants listed in ``[plugins.hist] fail``;
- ``hist.db``: scope ``database``, returns 7.

Checked: the latest run per sweep with its counts, its failures with their reasons, and each
operation's last success, in text and as one JSON document (``runs``, ``last_success``,
``unreachable``, ISO timestamps), all describing the same runs the ``sweep --json`` reports did;
``--sweep`` (unknown → exit 2), ``--failed``, ``--tenant GLOB`` (``glob_to_regex`` unit-tested too,
including LIKE's own wildcards in tenant names); no history yet; an unreachable database (exit 3).
"""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import histsetup
import psycopg
import pytest
from histsetup import DIVISION_BY_ZERO, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, FAILING
from support import PgServer, run_cli

from sweeperd.status import glob_to_regex

UNREACHABLE_DSN = "host=/nonexistent dbname=app"

COUNT_KEYS = ("ok", "failed", "skipped", "cancelled")


# -- helpers ---------------------------------------------------------------------------------------


def write_setup(directory: Path, databases: Mapping[str, str], **kw: Any) -> Path:
    """histsetup's config, with numbered tenant schemas (some tenant names here are wildcards)."""
    return histsetup.write_setup(
        directory, databases, connect_timeout="2s", numbered_schemas=True, **kw
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def sweep(config: Path, *args: str, expect: int) -> dict[str, Any]:
    """``sweep --json``: the report."""
    result = cli("sweep", "-c", str(config), *args, "--json")
    assert result.returncode == expect, result.stderr
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def status(config: Path, *args: str, expect: int = EXIT_OK) -> str:
    """``status`` (text): stdout."""
    result = cli("status", "-c", str(config), *args)
    assert result.returncode == expect, (result.stdout, result.stderr)
    return result.stdout


def status_json(config: Path, *args: str, expect: int = EXIT_OK) -> dict[str, Any]:
    """``status --json``: exactly one JSON document on stdout, ISO timestamps with offsets."""
    out = status(config, *args, "--json", expect=expect)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not one JSON document: {out!r}") from exc
    assert isinstance(doc, dict)
    assert set(doc) == {"runs", "last_success", "unreachable"}, doc
    assert isinstance(doc["runs"], list)
    assert isinstance(doc["last_success"], list)
    assert isinstance(doc["unreachable"], dict)
    for run in doc["runs"]:
        assert {
            "database",
            "sweep",
            "run_id",
            "instance",
            "started_at",
            "finished_at",
            "counts",
            "failures",
        } <= set(run), run
        assert parse_ts(run["started_at"]) <= parse_ts(run["finished_at"])
        assert set(run["counts"]) == set(COUNT_KEYS)
        uuid.UUID(run["run_id"])
        for f in run["failures"]:
            assert set(f) == {"tenant", "operation", "status", "error"}, f
    for entry in doc["last_success"]:
        assert {"database", "operation", "last_success", "tenants"} <= set(entry), entry
        parse_ts(entry["last_success"])
    return doc


def parse_ts(value: str) -> datetime:
    assert isinstance(value, str), value
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"timestamp without offset: {value!r}"
    return parsed


def runs_by_sweep(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {r["sweep"]: r for r in doc["runs"]}
    assert len(out) == len(doc["runs"]), f"more than one run per sweep: {doc['runs']}"
    return out


def last_success(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {o["operation"]: o for o in doc["last_success"]}
    assert len(out) == len(doc["last_success"]), doc["last_success"]
    return out


def failures_of(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's failed/cancelled items, as status lists them."""
    items = [
        {
            "tenant": r["tenant"],
            "operation": r["operation"],
            "status": r["status"],
            "error": r["error"],
        }
        for r in report["results"]
        if r["status"] in ("failed", "cancelled")
    ]
    return sorted(items, key=lambda f: (f["operation"], f["tenant"] or ""))


def last_ok_from(reports: Sequence[Mapping[str, Any]], operation: str) -> tuple[datetime, int]:
    """(latest finished_at, distinct tenants) over the reports' successful items of operation."""
    oks = [
        r
        for rep in reports
        for r in rep["results"]
        if r["operation"] == operation and r["status"] == "ok"
    ]
    assert oks, operation
    tenants = {r["tenant"] for r in oks if r["tenant"] is not None}
    return max(parse_ts(r["finished_at"]) for r in oks), len(tenants)


def utc_text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def line_with(out: str, *parts: str) -> str:
    lines = [line for line in out.splitlines() if all(p in line for p in parts)]
    assert len(lines) == 1, f"expected one line with {parts} in:\n{out}"
    return lines[0]


def has_history_schema(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regnamespace('sweeperd') IS NOT NULL").fetchone()
        assert row is not None
        return bool(row[0])


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str) -> Path:
    return write_setup(tmp_path, {"main": pg_dsn})


@pytest.fixture
def swept(config: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(config, nightly report, hourly report): nightly fails in globex, hourly succeeds."""
    nightly = sweep(config, "nightly", expect=EXIT_FAILED)
    hourly = sweep(config, "hourly", expect=EXIT_OK)
    return config, nightly, hourly


# -- no history ------------------------------------------------------------------------------------


def test_no_runs_recorded_yet(config: Path, pg_dsn: str) -> None:
    out = status(config)
    assert "no runs recorded yet" in out
    assert status_json(config) == {"runs": [], "last_success": [], "unreachable": {}}
    assert not has_history_schema(pg_dsn)  # status only reads


def test_disabled_history_is_noted(tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn}, history={"enabled": False})
    sweep(config, "hourly", expect=EXIT_OK)
    out = status(config)
    assert "enabled = false" in out
    assert "no runs recorded yet" in out


# -- what status shows -----------------------------------------------------------------------------


def test_text_shows_latest_run_per_sweep_counts_failures_and_last_success(
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    config, nightly, hourly = swept
    out = status(config)
    assert "no runs recorded yet" not in out

    night = line_with(out, "nightly", "[main]")
    assert "5 ok, 1 failed, 0 skipped, 0 cancelled" in night
    assert utc_text(parse_ts(nightly["finished_at"])) in night
    assert f"{socket.gethostname()}:" in night
    hour = line_with(out, "hourly", "[main]")
    assert "2 ok, 0 failed, 0 skipped, 0 cancelled" in hour
    assert utc_text(parse_ts(hourly["finished_at"])) in hour

    failure = line_with(out, FAILING, "hist.flaky")
    assert "failed" in failure
    assert DIVISION_BY_ZERO in failure

    assert "last success" in out
    for op, tenants in (("hist.ok", 3), ("hist.flaky", 2)):
        when, n = last_ok_from([nightly, hourly], op)
        assert n == tenants
        line = line_with(out, op, utc_text(when))
        assert f"{tenants} tenant(s)" in line
    when, _ = last_ok_from([hourly], "hist.db")
    line_with(out, "hist.db", utc_text(when))


def test_json_describes_the_same_runs_as_the_sweep_reports(
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
    pg_dsn: str,
) -> None:
    config, nightly, hourly = swept
    doc = status_json(config)
    assert doc["unreachable"] == {}
    runs = runs_by_sweep(doc)
    assert set(runs) == {"nightly", "hourly"}
    for report in (nightly, hourly):
        run = runs[report["sweep"]]
        assert run["database"] == "main"
        assert run["counts"] == report["counts"]
        assert parse_ts(run["started_at"]) == parse_ts(report["started_at"])
        assert parse_ts(run["finished_at"]) == parse_ts(report["finished_at"])
        assert run["failures"] == failures_of(report)
        assert run["instance"].startswith(f"{socket.gethostname()}:")
    assert runs["nightly"]["failures"] == [
        {
            "tenant": FAILING,
            "operation": "hist.flaky",
            "status": "failed",
            "error": DIVISION_BY_ZERO,
        }
    ]
    assert runs["hourly"]["failures"] == []
    # The run ids are the history's own.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        ids = {str(r[0]) for r in conn.execute("SELECT run_id FROM sweeperd.runs").fetchall()}
    assert {r["run_id"] for r in runs.values()} == ids

    ops = last_success(doc)
    assert set(ops) == {"hist.ok", "hist.flaky", "hist.db"}
    for op in ("hist.ok", "hist.flaky"):
        when, tenants = last_ok_from([nightly, hourly], op)
        assert parse_ts(ops[op]["last_success"]) == when
        assert ops[op]["tenants"] == tenants
        assert ops[op]["database"] == "main"
    when, _ = last_ok_from([hourly], "hist.db")
    assert parse_ts(ops["hist.db"]["last_success"]) == when


def test_the_latest_run_of_a_sweep_is_shown(config: Path) -> None:
    sweep(config, "nightly", expect=EXIT_FAILED)
    latest = sweep(config, "nightly", "--tenant", "acme", expect=EXIT_OK)
    doc = status_json(config)
    [run] = doc["runs"]
    assert run["sweep"] == "nightly"
    assert run["counts"] == latest["counts"] == {"ok": 2, "failed": 0, "skipped": 0, "cancelled": 0}
    assert parse_ts(run["finished_at"]) == parse_ts(latest["finished_at"])
    assert run["failures"] == []
    # Last success still covers the earlier run's tenants.
    assert last_success(doc)["hist.ok"]["tenants"] == 3
    out = status(config)
    line_with(out, "nightly", "2 ok, 0 failed")
    assert DIVISION_BY_ZERO not in out


# -- filters ---------------------------------------------------------------------------------------


def test_sweep_filter(swept: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    config, _nightly, hourly = swept
    doc = status_json(config, "--sweep", "hourly")
    assert set(runs_by_sweep(doc)) == {"hourly"}
    assert runs_by_sweep(doc)["hourly"]["counts"] == hourly["counts"]
    ops = last_success(doc)
    assert set(ops) == {"hist.ok", "hist.db"}  # hist.flaky ran only in nightly
    when, tenants = last_ok_from([hourly], "hist.ok")
    assert (parse_ts(ops["hist.ok"]["last_success"]), ops["hist.ok"]["tenants"]) == (when, 1)
    assert tenants == 1
    out = status(config, "--sweep", "hourly")
    line_with(out, "hourly", "[main]")
    assert not [line for line in out.splitlines() if line.startswith("nightly")]
    assert "hist.flaky" not in out


def test_unknown_sweep_is_a_usage_error(swept: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    config = swept[0]
    for args in (["--sweep", "weekly"], ["--sweep", "weekly", "--json"]):
        result = cli("status", "-c", str(config), *args)
        assert result.returncode == EXIT_USAGE
        assert result.stdout == ""
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert "weekly" in lines[0]


def test_failed_shows_only_runs_with_failures(
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    config, nightly, _hourly = swept
    doc = status_json(config, "--failed")
    assert set(runs_by_sweep(doc)) == {"nightly"}
    assert runs_by_sweep(doc)["nightly"]["failures"] == failures_of(nightly)
    out = status(config, "--failed")
    line_with(out, "nightly", "1 failed")
    assert not [line for line in out.splitlines() if line.startswith("hourly")]
    assert status_json(config, "--failed", "--sweep", "hourly")["runs"] == []


def test_failed_with_no_failures_does_not_claim_there_is_no_history(config: Path) -> None:
    sweep(config, "hourly", expect=EXIT_OK)
    assert status_json(config, "--failed")["runs"] == []
    out = status(config, "--failed")
    assert "no runs recorded yet" not in out


def test_tenant_filter_narrows_failures_and_last_success(
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    config, nightly, _hourly = swept
    expected_failure = failures_of(nightly)

    doc = status_json(config, "--tenant", "acme")
    runs = runs_by_sweep(doc)
    assert set(runs) == {"nightly", "hourly"}
    assert runs["nightly"]["failures"] == []  # globex's failure is filtered out
    assert runs["nightly"]["counts"] == nightly["counts"]  # the run's counts are the run's
    ops = last_success(doc)
    assert {op: o["tenants"] for op, o in ops.items()} == {"hist.ok": 1, "hist.flaky": 1}

    for glob in ("g*", "?lobe?", "globex", "*bex"):
        doc = status_json(config, "--tenant", glob)
        assert runs_by_sweep(doc)["nightly"]["failures"] == expected_failure, glob
        # globex never succeeded at hist.flaky
        assert {op: o["tenants"] for op, o in last_success(doc).items()} == {"hist.ok": 1}, glob

    doc = status_json(config, "--tenant", "*")
    assert runs_by_sweep(doc)["nightly"]["failures"] == expected_failure
    ops = last_success(doc)
    assert (ops["hist.ok"]["tenants"], ops["hist.flaky"]["tenants"]) == (3, 2)

    doc = status_json(config, "--tenant", "nobody*")
    assert runs_by_sweep(doc)["nightly"]["failures"] == []
    assert doc["last_success"] == []

    out = status(config, "--tenant", "acme")
    assert DIVISION_BY_ZERO not in out
    out = status(config, "--tenant", "g*")
    line_with(out, FAILING, "hist.flaky", DIVISION_BY_ZERO)


WILD_TENANTS = ("a_b", "axb", "50%", "500", "c\\d", "cd")


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("a_b", {"a_b"}),
        ("axb", {"axb"}),
        ("a?b", {"a_b", "axb"}),
        ("50%", {"50%"}),
        ("5*", {"50%", "500"}),
        ("%", set()),
        ("_", set()),
        ("c\\d", {"c\\d"}),
        ("c*d", {"c\\d", "cd"}),
    ],
)
def test_tenant_glob_matches_like_wildcards_literally(
    tmp_path: Path,
    pg_dsn: str,
    glob: str,
    expected: set[str],
) -> None:
    config = write_setup(
        tmp_path, {"main": pg_dsn}, tenants=dict.fromkeys(WILD_TENANTS, "main"), fail=WILD_TENANTS
    )
    sweep(config, "nightly", expect=EXIT_FAILED)
    assert {t for t in WILD_TENANTS if fnmatchcase(t, glob)} == expected  # same as sweep's
    doc = status_json(config, "--tenant", glob)
    [run] = doc["runs"]
    assert {f["tenant"] for f in run["failures"]} == expected
    ops = last_success(doc)
    assert (ops["hist.ok"]["tenants"] if "hist.ok" in ops else 0) == len(expected)


def test_tenant_glob_character_classes_match_like_sweep_does(
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    config, nightly, _hourly = swept
    doc = status_json(config, "--tenant", "[ag]*")
    assert runs_by_sweep(doc)["nightly"]["failures"] == failures_of(nightly)
    assert last_success(doc)["hist.ok"]["tenants"] == 2


@pytest.mark.parametrize(
    ("glob", "regex"),
    [
        ("acme", "^acme$"),
        ("acme*", "^acme.*$"),
        ("*", "^.*$"),
        ("a?c", "^a.c$"),
        ("[ag]*", "^[ag].*$"),
        ("[!a]?", "^[^a].$"),
        ("50%", "^50\\%$"),
        ("a_b", "^a_b$"),
        ("a.b", "^a\\.b$"),
        ("[", "^\\[$"),
        ("", "^$"),
    ],
)
def test_glob_to_regex(glob: str, regex: str) -> None:
    assert glob_to_regex(glob) == regex


NAMES = (
    "acme",
    "acme2",
    "ACME",
    "a_b",
    "axb",
    "a%b",
    "50%",
    "500",
    "c\\d",
    "cd",
    "",
    "x",
    "ab",
    "abc",
    "a.b",
    "[x",
    "globex",
    "b]",
    "a^b",
)
GLOBS = (
    "acme",
    "acme*",
    "*",
    "?",
    "a?b",
    "a_b",
    "a%b",
    "5*",
    "50%",
    "c\\d",
    "c*d",
    "*b*",
    "?*",
    "",
    "[ag]*",
    "[!a]*",
    "a.b",
    "[x",
    "[]]",
    "a[^]b",
    "[a-c]*",
)


def test_glob_to_regex_agrees_with_fnmatch_in_postgresql(pg_server: PgServer) -> None:
    """Evaluated by PostgreSQL's ``~``, as status uses it, against Python's fnmatchcase."""
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        for glob in GLOBS:
            regex = glob_to_regex(glob)
            for name in NAMES:
                row = conn.execute("SELECT %s::text ~ %s::text", (name, regex)).fetchone()
                assert row is not None
                assert row[0] == fnmatchcase(name, glob), (name, glob, regex)


# -- several databases, unreachable ones -----------------------------------------------------------


def test_each_database_reports_its_own_part_of_a_run(
    tmp_path: Path,
    pg_dsn: str,
    other_dsn: str,
) -> None:
    config = write_setup(
        tmp_path,
        {"main": pg_dsn, "other": other_dsn},
        tenants={"acme": "main", "globex": "main", "initech": "other"},
    )
    report = sweep(config, "nightly", expect=EXIT_FAILED)
    doc = status_json(config)
    by_db = {r["database"]: r for r in doc["runs"]}
    assert set(by_db) == {"main", "other"}
    assert by_db["main"]["run_id"] == by_db["other"]["run_id"]
    assert by_db["main"]["counts"] == {"ok": 3, "failed": 1, "skipped": 0, "cancelled": 0}
    assert by_db["other"]["counts"] == {"ok": 2, "failed": 0, "skipped": 0, "cancelled": 0}
    assert sum(r["counts"]["ok"] for r in by_db.values()) == report["counts"]["ok"]
    assert by_db["main"]["failures"] == failures_of(report)
    assert by_db["other"]["failures"] == []
    ok_by_db = {
        o["database"]: o["tenants"] for o in doc["last_success"] if o["operation"] == "hist.ok"
    }
    assert ok_by_db == {"main": 2, "other": 1}
    out = status(config)
    line_with(out, "nightly", "[main]", "3 ok, 1 failed")
    line_with(out, "nightly", "[other]", "2 ok, 0 failed")


def test_an_unreachable_database_exits_3_and_is_named(
    tmp_path: Path,
    pg_dsn: str,
    swept: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    _config, nightly, _hourly = swept
    both = write_setup(tmp_path, {"main": pg_dsn, "gone": UNREACHABLE_DSN}, name="both.toml")

    out = status(both, expect=EXIT_UNREACHABLE)
    line = line_with(out, "gone", "unreachable")
    assert "/nonexistent" in line
    line_with(out, "nightly", "[main]", "5 ok, 1 failed")  # the reachable one is still shown

    doc = status_json(both, expect=EXIT_UNREACHABLE)
    assert set(doc["unreachable"]) == {"gone"}
    assert "/nonexistent" in doc["unreachable"]["gone"]
    assert runs_by_sweep(doc)["nightly"]["counts"] == nightly["counts"]

    only_gone = write_setup(tmp_path, {"gone": UNREACHABLE_DSN}, tenants={}, name="gone.toml")
    out = status(only_gone, expect=EXIT_UNREACHABLE)
    line_with(out, "gone", "unreachable")
    # Nothing could be read: that is not "no runs recorded yet".
    assert "no runs recorded yet" not in out
    line_with(out, "no run history could be read")
