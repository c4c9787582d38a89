"""``sweeperd check-config`` end to end, through the real CLI (``python -m sweeperd``).

check-config never connects, so none of these tests needs a database.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import REPO, run_cli, write_config

from sweeperd.config import DEFAULT_CONFIG_PATH

EXIT_OK, EXIT_USAGE = 0, 2

GOOD = """
    [daemon]
    max_concurrency = 4

    [databases.main]
    dsn = "host=/nonexistent dbname=app"
    connect_timeout = "1s"

    [[tenants]]
    name = "acme"
    database = "main"
    schema = "tenant_acme"

    [[tenant_sources]]
    database = "main"
    schemas = "tenant_%"

    [sweeps.nightly]
    cron = "0 3 * * *"

    [sweeps.frequent]
    interval = "15m"
"""

# Five independent mistakes, one problem line each.
BAD = """
    colour = "blue"

    [daemon]
    max_concurrency = true

    [databases.main]
    dsn = "host=/nonexistent dbname=app"
    lock_timeout = "5"

    [[tenants]]
    name = "acme"
    database = "mian"
    schema = "tenant_acme"

    [sweeps.nightly]
    cron = "0 3 * * *"
    interval = "15m"
"""


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check-config", "-c", str(path))


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_good_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = check_config(path)
    assert result.returncode == EXIT_OK, result.stderr
    assert "OK" in result.stdout
    assert str(path) in result.stdout
    assert_no_traceback(result)


def test_unreachable_dsn_still_passes(tmp_path: Path) -> None:
    """check-config never connects: a DSN pointing nowhere is fine as long as it parses."""
    path = write_config(
        tmp_path,
        """
        [databases.main]
        dsn = "host=/nonexistent port=1 dbname=nowhere connect_timeout=1"

        [databases.other]
        dsn = "postgresql://nobody@unresolvable.invalid:1/none"

        [sweeps.nightly]
        interval = "1h"
    """,
    )
    result = check_config(path)
    assert result.returncode == EXIT_OK, result.stderr
    assert "OK" in result.stdout
    assert_no_traceback(result)


def test_bad_config_reports_every_problem(tmp_path: Path) -> None:
    path = write_config(tmp_path, BAD)
    result = check_config(path)
    assert result.returncode == EXIT_USAGE, (result.stdout, result.stderr)
    assert_no_traceback(result)
    assert "OK" not in result.stdout
    lines = stderr_lines(result)
    assert len(lines) == 5, lines
    for line in lines:
        assert line.startswith(f"sweeperd: {path}: "), line
        assert "expected" in line, line
    keys = sorted(line.removeprefix(f"sweeperd: {path}: ").split(": ", 1)[0] for line in lines)
    assert keys == sorted(
        [
            "colour",
            "daemon.max_concurrency",
            "databases.main.lock_timeout",
            "tenants[0].database",
            "sweeps.nightly",
        ]
    )


def test_config_from_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = run_cli("check-config", env={"SWEEPERD_CONFIG": str(path)})
    assert result.returncode == EXIT_OK, result.stderr
    assert str(path) in result.stdout


def test_flag_wins_over_environment(tmp_path: Path) -> None:
    good = write_config(tmp_path, GOOD, name="good.toml")
    bad = write_config(tmp_path, BAD, name="bad.toml")
    result = run_cli("check-config", "-c", str(good), env={"SWEEPERD_CONFIG": str(bad)})
    assert result.returncode == EXIT_OK, result.stderr
    assert str(good) in result.stdout


def test_default_path_when_nothing_given() -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    result = run_cli("check-config")
    assert result.returncode == EXIT_USAGE
    assert_no_traceback(result)
    (line,) = stderr_lines(result)
    assert line.startswith(f"sweeperd: {DEFAULT_CONFIG_PATH}: cannot read")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[daemon\n", "invalid TOML"),
        (b'[log]\nlevel = "\xff"\n', "UTF-8"),
        (None, "cannot read"),
    ],
    ids=["invalid-toml", "not-utf8", "missing"],
)
def test_unusable_file(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    path = tmp_path / "sweeperd.toml"
    if content is not None:
        path.write_bytes(content)
    result = check_config(path)
    assert result.returncode == EXIT_USAGE
    assert_no_traceback(result)
    (line,) = stderr_lines(result)
    assert line.startswith(f"sweeperd: {path}: ")
    assert fragment in line


def test_dsn_file_problem(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [databases.main]
        dsn_file = "credentials/main-dsn"
    """,
    )
    result = check_config(path)
    assert result.returncode == EXIT_USAGE
    assert_no_traceback(result)
    (line,) = stderr_lines(result)
    assert line.startswith(f"sweeperd: {path}: databases.main.dsn_file: ")


def test_dsn_file_password_never_printed(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("host=/nonexistent password=hunter2-s3cret bogus\n")
    path = write_config(
        tmp_path,
        """
        [databases.main]
        dsn_file = "dsn"
    """,
    )
    result = check_config(path)
    assert result.returncode == EXIT_USAGE
    assert "hunter2-s3cret" not in result.stderr + result.stdout


def test_drop_in_plugin_dir_relative_to_config(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "plugins.d").mkdir(parents=True)
    (etc / "plugins.d" / "nap.py").write_text(
        "import sweeperd\n\n"
        "async def nap(ctx):\n"
        "    return None\n\n"
        "@sweeperd.hookimpl\n"
        "def sweeperd_operations(config):\n"
        "    return [sweeperd.Operation(name='nap.sleep', run=nap)]\n"
    )
    path = write_config(
        etc,
        """
        [daemon]
        plugin_dirs = ["plugins.d"]

        [databases.main]
        dsn = "host=/nonexistent"
    """,
    )
    result = check_config(path)  # the test process's cwd is not etc/
    assert result.returncode == EXIT_OK, result.stderr
    listing = run_cli("plugins", "-c", str(path))
    assert listing.returncode == EXIT_OK, listing.stderr
    assert "nap.sleep" in listing.stdout


@pytest.mark.parametrize("name", ["sweeperd.toml", "demo.toml"])
def test_shipped_example_configs(name: str) -> None:
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    result = check_config(path)
    assert result.returncode == EXIT_OK, result.stderr
    assert "OK" in result.stdout
    assert_no_traceback(result)
