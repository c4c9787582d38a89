"""Running beside and under systemd on a stock install: what the service and its operator need.

* A uid without a user name (``DynamicUser=`` without ``libnss-systemd``) is a clear exit 2 before
  any connection, and a failed peer authentication under it says what to install.
* ``sweeperd --unit UNIT <command>`` builds the ``systemd-run`` command line that runs the command
  with the unit's user, credentials, executable and configuration.
* Problems printed at start carry the journal's ``err`` priority when stderr is the journal.

The real thing (a booted Debian with systemd 252) is ``tests/system/debian.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import toml_str

from sweeperd.cli import _command_argv
from sweeperd.unit import transient_argv

NO_SUCH_UID = 63081  # as systemd would pick for a DynamicUser

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run as a uid with no user name",
)


def sweeperd(
    *args: str, env: dict[str, str] | None = None, uid: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = []
    if uid is not None:
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sweeperd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another uid can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sweeperd-service-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(directory: Path, dsn: str) -> Path:
    path = directory / "sweeperd.toml"
    path.write_text(
        f"[databases.main]\ndsn = {toml_str(dsn)}\n"
        '[[tenants]]\nname = "acme"\ndatabase = "main"\nschema = "tenant_acme"\n'
        '[sweeps.nightly]\ncron = "0 3 * * *"\n',
        encoding="utf-8",
    )
    path.chmod(0o644)
    return path


# -- a uid with no name ----------------------------------------------------------------------


@as_root
@pytest.mark.parametrize("command", ["run", "sweep", "status", "check-config"])
def test_a_uid_without_a_name_is_exit_2_naming_libnss_systemd(
    public_dir: Path, command: str
) -> None:
    config = write(public_dir, "host=/nonexistent dbname=app")
    env = {"PGUSER": ""}
    done = sweeperd(command, "-c", str(config), env=env, uid=NO_SUCH_UID, cwd=public_dir)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sweeperd: {config}: databases.main: "), lines
    assert f"uid {NO_SUCH_UID} has no user name" in lines[0]
    assert "apt-get install libnss-systemd" in lines[0]
    assert "user=" in lines[0]  # the other way out


@as_root
def test_a_named_role_or_pguser_passes_the_check(public_dir: Path) -> None:
    named = write(public_dir, "host=/nonexistent dbname=app user=sweeperd")
    done = sweeperd("check-config", "-c", str(named), uid=NO_SUCH_UID, cwd=public_dir)
    assert done.returncode == 0, done.stderr
    anon = write(public_dir, "host=/nonexistent dbname=app")
    done = sweeperd(
        "check-config", "-c", str(anon), env={"PGUSER": "sweeperd"}, uid=NO_SUCH_UID, cwd=public_dir
    )
    assert done.returncode == 0, done.stderr


@as_root
def test_failed_peer_authentication_under_such_a_uid_says_what_to_install() -> None:
    probe = (
        "from sweeperd.preflight import peer_hint; "
        "print(peer_hint('FATAL:  Peer authentication failed for user \"sweeperd\"')); "
        "print(peer_hint('FATAL:  password authentication failed for user \"sweeperd\"'))"
    )
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={NO_SUCH_UID}",
            f"--regid={NO_SUCH_UID}",
            "--clear-groups",
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    peer, password = done.stdout.splitlines()
    assert f"uid {NO_SUCH_UID}" in peer and "libnss-systemd" in peer
    assert password == "None"


def test_a_resolvable_uid_gets_no_peer_hint() -> None:
    from sweeperd.preflight import peer_hint

    assert peer_hint('FATAL:  Peer authentication failed for user "x"') is None


# -- the journal's priority ------------------------------------------------------------------


def test_problems_at_start_are_at_err_priority_under_journald(tmp_path: Path) -> None:
    config = tmp_path / "sweeperd.toml"
    config.write_text('[daemon]\ndrain_timeout = "soon"\n', encoding="utf-8")
    err = tmp_path / "stderr"
    with err.open("wb") as stream:
        st = os.fstat(stream.fileno())
        # What systemd sets when stderr is its journal stream: the sd-daemon prefix is honoured.
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = subprocess.run(
            [sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
            stderr=stream,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=60,
            check=False,
        ).returncode
    assert code == 2
    lines = err.read_text().splitlines()
    assert lines and all(line.startswith("<3>sweeperd: ") for line in lines), lines
    # Not the journal (a terminal, a file): no prefix.
    plain = sweeperd("run", "-c", str(config), env={"JOURNAL_STREAM": "1:2"})
    assert plain.returncode == 2
    assert plain.stderr.startswith("sweeperd: "), plain.stderr


# -- --unit ----------------------------------------------------------------------------------


PROPS: dict[str, Any] = {
    "Id": "sweeperd.service",
    "User": "sweeperd",
    "Group": "",
    "DynamicUser": True,
    "SupplementaryGroups": [],
    "LoadCredential": [["main-dsn", "/etc/sweeperd/credentials/main-dsn"]],
    "LoadCredentialEncrypted": [["other", "/etc/credstore.encrypted/other"]],
    "Environment": ["PYTHONUNBUFFERED=1"],
    "EnvironmentFiles": [["/etc/default/sweeperd", True], ["/etc/sweeperd/env", False]],
    "ExecStart": [
        [
            "/opt/sweeperd/bin/sweeperd",
            ["/opt/sweeperd/bin/sweeperd", "run", "-c", "/etc/sweeperd/sweeperd.toml"],
            False,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ]
    ],
}


def test_transient_unit_has_the_units_user_credentials_executable_and_config() -> None:
    argv = transient_argv(PROPS, ["status", "--json"], None)
    assert argv[:6] == [
        "systemd-run",
        "--quiet",
        "--wait",
        "--pipe",
        "--collect",
        "--service-type=exec",
    ]
    options, _, command = " ".join(argv).partition(" -- ")
    assert "-p DynamicUser=yes" in options
    assert "-p User=sweeperd" in options
    assert "-p Group=" not in options
    assert "-p LoadCredential=main-dsn:/etc/sweeperd/credentials/main-dsn" in options
    assert "-p LoadCredentialEncrypted=other:/etc/credstore.encrypted/other" in options
    assert "-E PYTHONUNBUFFERED=1" in options
    # EnvironmentFile= by path (a "-" where the unit ignores a missing one), never its content.
    assert "-p EnvironmentFile=-/etc/default/sweeperd" in options
    assert "-p EnvironmentFile=/etc/sweeperd/env" in options
    assert command == "/opt/sweeperd/bin/sweeperd status -c /etc/sweeperd/sweeperd.toml --json"


def test_transient_unit_takes_the_operators_config_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = transient_argv(PROPS, ["check-config"], "new.toml")
    assert argv[argv.index("--") + 1 :] == [
        "/opt/sweeperd/bin/sweeperd",
        "check-config",
        "-c",
        str(tmp_path / "new.toml"),
    ]


def test_transient_unit_falls_back_to_sweeperd_config_and_this_python() -> None:
    props = {
        **PROPS,
        "DynamicUser": False,
        "User": "",
        "ExecStart": [
            [
                "/usr/bin/python3",
                ["/usr/bin/python3", "-m", "sweeperd", "run"],
                False,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        ],
        "Environment": ["SWEEPERD_CONFIG=/srv/s.toml"],
    }
    argv = transient_argv(props, ["status"], None)
    assert not [a for a in argv if a.startswith(("DynamicUser=", "User="))], argv
    assert argv[argv.index("--") + 1 :] == [
        sys.executable,
        "-m",
        "sweeperd",
        "status",
        "-c",
        "/srv/s.toml",
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--unit", "sweeperd", "status", "--json"], ["status", "--json"]),
        (["--unit=sweeperd", "sweep", "-c", "x.toml", "nightly"], ["sweep", "nightly"]),
        (["--unit", "sweeperd", "sweep", "--config=x.toml", "--dry-run"], ["sweep", "--dry-run"]),
        (["--unit", "sweeperd", "check-config", "-cx.toml"], ["check-config"]),
        (["--unit", "status", "status"], ["status"]),  # a unit named like the command
        (["--unit", "x", "sweep", "--dry-run", "--", "-c"], ["sweep", "--dry-run", "--", "-c"]),
    ],
)
def test_command_argv_drops_the_config_option(argv: list[str], expected: list[str]) -> None:
    assert _command_argv(argv, expected[0]) == expected


@pytest.mark.parametrize("argv", [["--uni", "x", "status"], ["check-config", "--conf", "x"]])
def test_options_are_never_abbreviated(argv: list[str]) -> None:
    # --unit hands options on by their exact spelling: an abbreviation would slip past it.
    done = sweeperd(*argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["run", "demo"])
def test_unit_refuses_run_and_demo(command: str) -> None:
    done = sweeperd("--unit", "sweeperd", command)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"sweeperd: --unit runs commands beside the service, not {command!r}"
    )


def test_unit_without_a_reachable_systemd_is_one_line_exit_2(tmp_path: Path) -> None:
    # CI and containers have busctl but no system bus (or no busctl at all): a clear line.
    env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    done = sweeperd("--unit", "sweeperd", "status", env=env)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("sweeperd: ")
