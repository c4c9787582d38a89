"""``sweeperd sweep`` end to end: the real CLI (``python -m sweeperd``) against real databases.

A drop-in plugin directory (``plugins.d/jobs.py`` next to the config) contributes tiny operations
so that results are deterministic:

- ``jobs.purge_done``: deletes the tenant's done jobs (honours ``--dry-run``);
- ``jobs.flaky``: records that it ran in the tenant's ``audit`` table, then fails on purpose with
  a division by zero in tenant ``globex`` (does not promise to honour ``--dry-run``);
- ``jobs.expire_sessions``: scope ``database``, deletes expired ``public.sessions`` rows.

Checked: the JSON report's contract shape, exit codes 0/1/2/3, ``--only``/``--tenant``/SWEEP
selection, ``--dry-run``, the human summary, JSON log lines on stderr (and only the report on
stdout), ``$SWEEPERD_CONFIG``, and ``[[tenant_sources]]`` discovery.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from support import install_plugin, run_cli, run_sql, toml_str, write_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

REPORT_KEYS = {"sweep", "started_at", "finished_at", "duration_s", "counts", "results"}
RESULT_KEYS = {
    "tenant",
    "database",
    "schema",
    "operation",
    "status",
    "rows",
    "started_at",
    "finished_at",
    "duration_s",
    "error",
}
COUNT_KEYS = {"ok", "failed", "skipped", "cancelled"}
STATUSES = {"ok", "failed", "skipped", "cancelled", "dry-run"}

TENANTS = ("acme", "globex", "initech")
# Per tenant: (done jobs, jobs not done).
JOBS = {"acme": (3, 2), "globex": (1, 4), "initech": (5, 0)}
EXPIRED_SESSIONS, LIVE_SESSIONS = 7, 2


SWEEPS = """
    [sweeps.nightly]
    cron = "0 3 * * *"
    operations = ["jobs.purge_done", "jobs.flaky"]

    [sweeps.hourly]
    interval = "1h"
    operations = ["jobs.purge_done", "jobs.expire_sessions"]
    tenants = ["acme"]
"""


# -- helpers ---------------------------------------------------------------------------------------


def create_data(dsn: str, *, schema_prefix: str = "tenant_") -> None:
    statements = [
        "CREATE TABLE public.sessions (id int, expires_at timestamptz)",
        f"INSERT INTO public.sessions SELECT g, now() - interval '1 day' "
        f"FROM generate_series(1, {EXPIRED_SESSIONS}) g",
        f"INSERT INTO public.sessions SELECT g, now() + interval '1 day' "
        f"FROM generate_series(1, {LIVE_SESSIONS}) g",
    ]
    for tenant, (done, not_done) in JOBS.items():
        schema = f"{schema_prefix}{tenant}"
        statements += [
            f"CREATE SCHEMA {schema}",
            f"CREATE TABLE {schema}.jobs (id int, done bool)",
            f"CREATE TABLE {schema}.audit (what text)",
            f"INSERT INTO {schema}.jobs SELECT g, true FROM generate_series(1, {done}) g",
            f"INSERT INTO {schema}.jobs SELECT g, false FROM generate_series(1, {not_done}) g",
        ]
    run_sql(dsn, *statements)


def write_plugin(directory: Path) -> None:
    (directory / "plugins.d").mkdir(exist_ok=True)
    install_plugin(directory / "plugins.d", "jobs.py")


def config_text(
    dsn: str, *, tenants: bool = True, extra: str = "", sweeps: str = SWEEPS, level: str = "info"
) -> str:
    text = f"""
        [daemon]
        max_concurrency = 4
        plugin_dirs = ["plugins.d"]

        [log]
        level = "{level}"

        [history]
        enabled = false

        [databases.main]
        dsn = {toml_str(dsn)}
        max_connections = 4
        connect_timeout = "5s"
        """
    if tenants:
        for t in TENANTS:
            text += f"""
        [[tenants]]
        name = "{t}"
        database = "main"
        schema = "tenant_{t}"
        """
    return textwrap.dedent(text) + textwrap.dedent(extra) + textwrap.dedent(sweeps)


@pytest.fixture
def setup(tmp_path: Path, pg_dsn: str) -> tuple[Path, str]:
    """(config path, dsn): three tenants with jobs, a sessions table, the plugin, the config."""
    create_data(pg_dsn)
    write_plugin(tmp_path)
    return write_config(tmp_path, config_text(pg_dsn)), pg_dsn


def sweep(
    config: Path | None,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = ["sweep", *(["-c", str(config)] if config is not None else []), *args]
    result = run_cli(*cmd, env=env)
    assert_no_traceback(result)
    return result


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def the_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON document on stdout (nothing else there but whitespace)."""
    decoder = json.JSONDecoder()
    text = result.stdout.lstrip()
    try:
        doc, end = decoder.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not JSON: {result.stdout!r}\n{result.stderr}") from exc
    assert text[end:].strip() == "", f"more than one document on stdout: {text[end:]!r}"
    assert isinstance(doc, dict)
    return doc


def by_key(report: dict[str, Any]) -> dict[tuple[str | None, str], dict[str, Any]]:
    """Results keyed by (tenant, operation); asserts there are no duplicates."""
    keys = [(r["tenant"], r["operation"]) for r in report["results"]]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, duplicates
    return {(r["tenant"], r["operation"]): r for r in report["results"]}


def log_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """stderr as JSON log lines (each line must be one JSON object)."""
    out = []
    for line in result.stderr.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not a JSON log line: {line!r}") from exc
        assert isinstance(record, dict), line
        out.append(record)
    return out


def parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    assert ts.tzinfo is not None, f"timestamp without offset: {value!r}"
    return ts


def scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]


def done_jobs(dsn: str) -> dict[str, int]:
    return {t: scalar(dsn, f"SELECT count(*) FROM tenant_{t}.jobs WHERE done") for t in TENANTS}


def audit_rows(dsn: str) -> dict[str, int]:
    return {t: scalar(dsn, f"SELECT count(*) FROM tenant_{t}.audit") for t in TENANTS}


# -- the JSON report -------------------------------------------------------------------------------


def test_json_report_has_the_contract_shape(setup: tuple[Path, str]) -> None:
    config, _dsn = setup
    result = sweep(config, "nightly", "--json")
    report = the_json(result)

    assert set(report) == REPORT_KEYS
    assert report["sweep"] == "nightly"
    started, finished = parse_ts(report["started_at"]), parse_ts(report["finished_at"])
    assert started <= finished
    assert isinstance(report["duration_s"], int | float) and report["duration_s"] >= 0
    assert abs((finished - started).total_seconds() - report["duration_s"]) < 0.01

    assert set(report["counts"]) >= COUNT_KEYS
    assert all(isinstance(n, int) for n in report["counts"].values())
    assert report["counts"] == {"ok": 5, "failed": 1, "skipped": 0, "cancelled": 0}
    assert sum(report["counts"].values()) == len(report["results"])

    for r in report["results"]:
        assert RESULT_KEYS <= set(r) <= RESULT_KEYS | {"details"}, r
        assert r["status"] in STATUSES
        assert r["database"] == "main"
        assert r["rows"] is None or isinstance(r["rows"], int)
        assert r["error"] is None or isinstance(r["error"], str)
        r_started, r_finished = parse_ts(r["started_at"]), parse_ts(r["finished_at"])
        assert started <= r_started <= r_finished <= finished
        assert isinstance(r["duration_s"], int | float) and r["duration_s"] >= 0

    results = by_key(report)
    assert set(results) == {(t, op) for t in TENANTS for op in ("jobs.purge_done", "jobs.flaky")}
    for t in TENANTS:
        purge = results[(t, "jobs.purge_done")]
        assert purge["schema"] == f"tenant_{t}"
        assert (purge["status"], purge["rows"], purge["error"]) == ("ok", JOBS[t][0], None)


def test_database_scope_operations_report_tenant_null(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "hourly", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = the_json(result)
    assert report["sweep"] == "hourly"
    results = by_key(report)
    expire = results[(None, "jobs.expire_sessions")]
    assert expire["tenant"] is None
    assert expire["database"] == "main"
    assert expire["status"] == "ok"
    assert expire["rows"] == EXPIRED_SESSIONS
    assert scalar(dsn, "SELECT count(*) FROM public.sessions") == LIVE_SESSIONS


# -- exit codes ------------------------------------------------------------------------------------


def test_exit_0_when_every_selected_operation_succeeds(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "nightly", "--only", "jobs.purge_done", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = the_json(result)
    assert {r["status"] for r in report["results"]} == {"ok"}
    assert {r["tenant"]: r["rows"] for r in report["results"]} == {t: JOBS[t][0] for t in TENANTS}
    assert done_jobs(dsn) == dict.fromkeys(TENANTS, 0)
    # Jobs not done were left alone.
    assert scalar(dsn, "SELECT count(*) FROM tenant_acme.jobs") == JOBS["acme"][1]


def test_exit_1_when_one_operation_failed_and_the_rest_still_ran(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "nightly", "--json")
    assert result.returncode == EXIT_FAILED, result.stderr
    results = by_key(the_json(result))
    failed = results[("globex", "jobs.flaky")]
    assert failed["status"] == "failed"
    assert failed["rows"] is None
    assert failed["error"] == "DivisionByZero (SQLSTATE 22012): division by zero"
    assert "\n" not in failed["error"]
    for key, r in results.items():
        if key != ("globex", "jobs.flaky"):
            assert (r["status"], r["error"]) == ("ok", None), r
    # The failure isolated: every tenant's jobs were still purged, flaky ran everywhere.
    assert done_jobs(dsn) == dict.fromkeys(TENANTS, 0)
    # Autocommit: globex's audit row was committed before its statement failed.
    assert audit_rows(dsn) == dict.fromkeys(TENANTS, 1)


def test_exit_2_for_an_unknown_sweep_name(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "weekly", "--json")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "weekly" in lines[0]
    assert done_jobs(dsn) == {t: JOBS[t][0] for t in TENANTS}  # nothing ran


def test_exit_2_for_a_bad_config_with_one_line_per_problem(tmp_path: Path, pg_dsn: str) -> None:
    write_plugin(tmp_path)
    text = config_text(pg_dsn) + textwrap.dedent("""
        [sweeps.broken]
        crn = "0 3 * * *"
        opertions = ["jobs.*"]
        """)
    config = write_config(tmp_path, text)
    result = sweep(config, "--json")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("sweeps.broken.opertions" in line for line in lines), result.stderr
    assert any("sweeps.broken.crn" in line for line in lines), result.stderr
    assert all(str(config) in line for line in lines), result.stderr


def test_exit_2_for_a_missing_config_file(tmp_path: Path) -> None:
    result = sweep(tmp_path / "nope.toml")
    assert result.returncode == EXIT_USAGE
    assert "nope.toml" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--tenant"], ["--only"], ["--tenants", "acme"], ["nightly", "extra-positional"]]
)
def test_exit_2_for_bad_option_usage(setup: tuple[Path, str], args: list[str]) -> None:
    config, dsn = setup
    result = sweep(config, *args)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "usage:" in result.stderr
    assert done_jobs(dsn) == {t: JOBS[t][0] for t in TENANTS}


def test_exit_3_when_a_database_is_unreachable(tmp_path: Path) -> None:
    write_plugin(tmp_path)
    config = write_config(tmp_path, config_text("host=/nonexistent dbname=app"))
    result = sweep(config, "nightly", "--json")
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    report = the_json(result)
    assert report["results"], report
    for r in report["results"]:
        assert r["status"] == "failed"
        assert "/nonexistent" in r["error"]
        assert "\n" not in r["error"]
    # The human summary says so too.
    result = sweep(config, "nightly")
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
    assert "unreachable" in result.stdout and "/nonexistent" in result.stdout


def test_a_password_in_the_dsn_never_appears_in_the_output(tmp_path: Path, pg_dsn: str) -> None:
    write_plugin(tmp_path)
    dsn = make_conninfo(pg_dsn, user="no_such_user_xyz", password="s3cret")
    config = write_config(tmp_path, config_text(dsn))
    for args in (["nightly", "--json"], ["nightly"]):
        result = sweep(config, *args)
        assert result.returncode == EXIT_UNREACHABLE, result.stderr
        assert "no_such_user_xyz" in result.stdout
        assert "s3cret" not in result.stdout
        assert "s3cret" not in result.stderr


def test_an_unreachable_database_does_not_stop_the_others(tmp_path: Path, pg_dsn: str) -> None:
    create_data(pg_dsn)
    write_plugin(tmp_path)
    extra = """
        [databases.gone]
        dsn = "host=/nonexistent dbname=app"
        connect_timeout = "1s"

        [[tenants]]
        name = "lost"
        database = "gone"
        schema = "tenant_lost"
        """
    config = write_config(tmp_path, config_text(pg_dsn, extra=extra))
    result = sweep(config, "nightly", "--only", "jobs.purge_done", "--json")
    # Another database was reached: the lost one's items are failures (1); 3 is for "none".
    assert result.returncode == EXIT_FAILED, result.stderr
    results = by_key(the_json(result))
    lost = results[("lost", "jobs.purge_done")]
    assert lost["status"] == "failed" and lost["database"] == "gone"
    assert "unreachable" in lost["error"] and "/nonexistent" in lost["error"]
    for t in TENANTS:
        assert results[(t, "jobs.purge_done")]["status"] == "ok"
    assert done_jobs(pg_dsn) == dict.fromkeys(TENANTS, 0)


# -- selection -------------------------------------------------------------------------------------


def test_tenant_and_only_globs_are_repeatable_and_select(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(
        config,
        "nightly",
        "--tenant",
        "acme",
        "--tenant",
        "ini*",
        "--only",
        "jobs.purge*",
        "--only",
        "jobs.purge_done",
        "--json",
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert set(by_key(the_json(result))) == {
        ("acme", "jobs.purge_done"),
        ("initech", "jobs.purge_done"),
    }
    assert done_jobs(dsn) == {"acme": 0, "globex": JOBS["globex"][0], "initech": 0}
    assert audit_rows(dsn) == dict.fromkeys(TENANTS, 0)


@pytest.mark.parametrize(("flag", "glob"), [("--only", "jobs.purge-typo"), ("--tenant", "acmee")])
def test_a_glob_that_matches_nothing_is_a_usage_error(
    setup: tuple[Path, str], flag: str, glob: str
) -> None:
    """A typo must not look like a clean run of nothing."""
    config, dsn = setup
    result = sweep(config, "nightly", flag, glob, "--json")
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert glob in result.stderr and "Traceback" not in result.stderr
    assert done_jobs(dsn) == {t: JOBS[t][0] for t in TENANTS}  # nothing ran


def test_tenant_glob_excluding_the_failing_tenant_exits_0(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "nightly", "--tenant", "[ai]*", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    assert {r["tenant"] for r in the_json(result)["results"]} == {"acme", "initech"}
    assert audit_rows(dsn) == {"acme": 1, "globex": 0, "initech": 1}


def test_sweep_name_selects_its_operations_and_tenants(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "hourly", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = the_json(result)
    assert report["sweep"] == "hourly"
    assert set(by_key(report)) == {("acme", "jobs.purge_done"), (None, "jobs.expire_sessions")}
    assert done_jobs(dsn) == {"acme": 0, "globex": JOBS["globex"][0], "initech": JOBS["initech"][0]}
    assert audit_rows(dsn) == dict.fromkeys(TENANTS, 0)


def test_without_a_sweep_name_every_sweeps_operations_run_once(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "--json")
    assert result.returncode == EXIT_FAILED, result.stderr  # nightly's flaky fails in globex
    results = by_key(the_json(result))  # no duplicates, although both sweeps purge acme
    expected = {(t, op) for t in TENANTS for op in ("jobs.purge_done", "jobs.flaky")}
    expected.add((None, "jobs.expire_sessions"))
    assert set(results) == expected
    assert done_jobs(dsn) == dict.fromkeys(TENANTS, 0)
    assert scalar(dsn, "SELECT count(*) FROM public.sessions") == LIVE_SESSIONS
    assert audit_rows(dsn) == dict.fromkeys(TENANTS, 1)


def test_a_tenant_glob_matching_no_tenant_runs_nothing(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "nightly", "--tenant", "nobody*", "--json")
    assert result.returncode in (EXIT_OK, EXIT_USAGE), result.stderr
    if result.returncode == EXIT_OK:
        assert the_json(result)["results"] == []
    assert done_jobs(dsn) == {t: JOBS[t][0] for t in TENANTS}


# -- dry run ---------------------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_reports_what_would_go(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(config, "--dry-run", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = the_json(result)
    results = by_key(report)
    assert {r["status"] for r in report["results"]} == {"dry-run"}
    for t in TENANTS:
        assert results[(t, "jobs.purge_done")]["rows"] == JOBS[t][0]
        # An operation that does not promise to honour dry_run is not run at all.
        assert results[(t, "jobs.flaky")]["error"] is None
    assert results[(None, "jobs.expire_sessions")]["rows"] == EXPIRED_SESSIONS
    assert done_jobs(dsn) == {t: JOBS[t][0] for t in TENANTS}
    assert audit_rows(dsn) == dict.fromkeys(TENANTS, 0)
    assert scalar(dsn, "SELECT count(*) FROM public.sessions") == EXPIRED_SESSIONS + LIVE_SESSIONS


# -- the human summary, logs, stdout/stderr --------------------------------------------------------


def test_human_summary_lists_operations_statuses_and_failure_reasons(
    setup: tuple[Path, str],
) -> None:
    config, _dsn = setup
    result = sweep(config, "nightly")
    assert result.returncode == EXIT_FAILED, result.stderr
    out = result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert "nightly" in out
    for name in ("jobs.purge_done", "jobs.flaky", *TENANTS, "ok", "failed"):
        assert name in out, f"{name!r} missing from:\n{out}"
    failure_lines = [
        line
        for line in out.splitlines()
        if "globex" in line and "jobs.flaky" in line and "DivisionByZero" in line
    ]
    assert failure_lines, out
    assert "SQLSTATE 22012" in failure_lines[0]
    assert "division by zero" in failure_lines[0]


def test_logs_are_json_lines_on_stderr_and_stdout_is_only_the_report(
    setup: tuple[Path, str],
) -> None:
    config, _dsn = setup
    result = sweep(config, "nightly", "--json")
    the_json(result)  # stdout: exactly the report
    records = log_lines(result)
    assert records, "expected log lines on stderr at level info"
    for record in records:
        assert "event" in record and "level" in record, record
    events = {record["event"] for record in records}
    assert "sweep started" in events and "sweep finished" in events, events
    failures = [
        r
        for r in records
        if r.get("operation") == "jobs.flaky" and r["level"] in ("warning", "error")
    ]
    assert failures, records
    assert failures[0].get("tenant") == "globex"
    assert "22012" in json.dumps(failures[0])


def test_nothing_but_the_report_on_stdout_without_json_either(setup: tuple[Path, str]) -> None:
    config, _dsn = setup
    result = sweep(config, "hourly")
    assert result.returncode == EXIT_OK, result.stderr
    log_lines(result)  # stderr is still JSON lines only
    assert not any(line.lstrip().startswith("{") for line in result.stdout.splitlines())


# -- configuration path ----------------------------------------------------------------------------


def test_sweeperd_config_is_honoured_when_c_is_absent(setup: tuple[Path, str]) -> None:
    config, dsn = setup
    result = sweep(None, "hourly", "--json", env={"SWEEPERD_CONFIG": str(config)})
    assert result.returncode == EXIT_OK, result.stderr
    assert the_json(result)["sweep"] == "hourly"
    assert done_jobs(dsn)["acme"] == 0


def test_c_wins_over_sweeperd_config(setup: tuple[Path, str], tmp_path: Path) -> None:
    config, _dsn = setup
    result = sweep(
        config, "hourly", "--json", env={"SWEEPERD_CONFIG": str(tmp_path / "does-not-exist.toml")}
    )
    assert result.returncode == EXIT_OK, result.stderr


def test_a_bad_sweeperd_config_path_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "from-env.toml"
    result = sweep(None, "--json", env={"SWEEPERD_CONFIG": str(missing)})
    assert result.returncode == EXIT_USAGE
    assert str(missing) in result.stderr


# -- tenant discovery ------------------------------------------------------------------------------


def test_tenant_sources_discover_tenants_by_schema_pattern(tmp_path: Path, pg_dsn: str) -> None:
    create_data(pg_dsn)
    run_sql(
        pg_dsn,
        "CREATE SCHEMA other",
        "CREATE TABLE other.jobs (id int, done bool)",
        "INSERT INTO other.jobs VALUES (1, true)",
    )
    write_plugin(tmp_path)
    extra = """
        [[tenant_sources]]
        database = "main"
        schemas = "tenant_%"
        """
    config = write_config(tmp_path, config_text(pg_dsn, tenants=False, extra=extra))
    result = sweep(config, "nightly", "--only", "jobs.purge_done", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    results = by_key(the_json(result))
    assert set(results) == {(t, "jobs.purge_done") for t in TENANTS}
    for t in TENANTS:
        assert results[(t, "jobs.purge_done")]["schema"] == f"tenant_{t}"
        assert results[(t, "jobs.purge_done")]["rows"] == JOBS[t][0]
    assert scalar(pg_dsn, "SELECT count(*) FROM other.jobs") == 1  # not a tenant

    # Discovered tenants are selected by --tenant like static ones.
    result = sweep(config, "nightly", "--tenant", "globex", "--json")
    assert result.returncode == EXIT_FAILED
    assert {r["tenant"] for r in the_json(result)["results"]} == {"globex"}
