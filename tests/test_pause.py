"""``sweeperd pause`` / ``sweeperd resume`` end to end: the real CLI entry point
(``sweeperd.cli.main``) against real databases, and ``sweeperd status`` showing the pause.

Checked: a pause is one row of ``sweeperd.pause`` that status shows (text and JSON) with who, since
when, why and until when; ``--for`` ends it by itself; pausing again replaces it (and says what
it replaced); resuming ends it and says who had paused; resuming what is not paused; usage errors
(unknown ``--database``, a bad ``--for``, a ``--reason`` with control characters) are one line,
exit 2, and touch no database; an unreachable database among others (exit 3, the others done);
a standby (exit 1, the primary done); a hostile reason stored verbatim and shown escaped; a role
that may not create schema sweeperd (exit 1, the GRANT that fixes it), and one that may only
write the table a DBA made. Pure logic (``who()`` without a user name, ``one_line``) by itself.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg.conninfo import conninfo_to_dict
from servers import ScratchServer, free_port, scratch_server_fixture, standby_of  # noqa: F401
from support import run_cli, run_sql, throwaway_role, toml_str, write_config

from sweeperd.cli import main
from sweeperd.pause import one_line, who

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The commands configure logging for the process (stderr as it is now: pytest's capture);
    put back what was there before, for the tests that run after these."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**saved)


def write_setup(
    directory: Path, databases: Mapping[str, str], *, name: str = "sweeperd.toml"
) -> Path:
    text = '[log]\nformat = "json"\n'
    for db, dsn in databases.items():
        text += (
            f"\n[databases.{db}]\ndsn = {toml_str(dsn)}\nmax_connections = 2\n"
            'connect_timeout = "2s"\nconnect_retry = "1s"\n'
        )
    return write_config(directory, text, name=name)


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``sweeperd ARGS...`` in this process: (exit code, stdout, stderr), never a traceback."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, (out, err)
        return code, out, err

    return run


def errors(err: str) -> list[str]:
    """The ``sweeperd: …`` lines of stderr (the JSON log lines left out)."""
    return [line for line in err.splitlines() if line.startswith("sweeperd: ")]


def status_json(cli: Cli, config: Path, expect: int = EXIT_OK) -> dict[str, Any]:
    code, out, err = cli("status", "-c", str(config), "--json")
    assert code == expect, (out, err)
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def status_text(cli: Cli, config: Path, expect: int = EXIT_OK) -> str:
    code, out, err = cli("status", "-c", str(config))
    assert code == expect, (out, err)
    return out


def pause_rows(dsn: str) -> list[tuple[Any, ...]]:
    """What ``sweeperd.pause`` holds (by, reason, until - paused_at), read directly."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT paused_by, reason, until - paused_at FROM sweeperd.pause"
        ).fetchall()


def has_pause_table(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('sweeperd.pause') IS NOT NULL").fetchone()
    return bool(row and row[0])


def ts(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    assert when.utcoffset() is not None, text
    return when


ME = who()


# -- pause, status, resume -------------------------------------------------------------------------


def test_pause_then_status_shows_who_since_when_and_why(
    cli: Cli, tmp_path: Path, pg_dsn: str, other_dsn: str
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn, "other": other_dsn})
    before = dt.datetime.now(dt.UTC)
    code, out, err = cli("pause", "-c", str(config), "--database", "main", "--reason", "disk full")
    assert code == EXIT_OK, err
    [line] = out.splitlines()
    assert line.startswith(f"main: paused by {ME} since "), line
    assert line.endswith(" (until resumed): disk full"), line
    assert pause_rows(pg_dsn) == [(ME, "disk full", None)]
    assert not has_pause_table(other_dsn)  # only the database named

    text = status_text(cli, config)
    [shown] = [x for x in text.splitlines() if x.startswith("database main paused")]
    assert shown == f"database main {line.removeprefix('main: ')}"  # as pause said
    assert not [x for x in text.splitlines() if x.startswith("database other")]  # not paused

    doc = status_json(cli, config)
    assert set(doc["paused"]) == {"main"}
    paused = doc["paused"]["main"]
    assert set(paused) == {"paused_by", "paused_at", "until", "reason"}
    assert paused["paused_by"] == ME and paused["reason"] == "disk full"
    assert paused["until"] is None
    # Clocks of this host and the server may differ a little; the time is the server's now().
    assert abs(ts(paused["paused_at"]) - before) < dt.timedelta(minutes=1)


def test_a_pause_for_a_duration_ends_by_itself(cli: Cli, tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    code, out, err = cli("pause", "-c", str(config), "--for", "1s")
    assert code == EXIT_OK, err
    assert out.startswith(f"main: paused by {ME} since "), out
    assert " until " in out and "(until resumed)" not in out
    assert pause_rows(pg_dsn) == [(ME, None, dt.timedelta(seconds=1))]
    paused = status_json(cli, config)["paused"]["main"]
    assert ts(paused["until"]) - ts(paused["paused_at"]) == dt.timedelta(seconds=1)

    deadline = time.monotonic() + 30  # waiting for the expiry, not timing it
    while "paused" in (doc := status_json(cli, config)):
        assert time.monotonic() < deadline, doc
        time.sleep(0.25)
    assert " paused by " not in status_text(cli, config)
    # Ended by itself: there is nothing to resume.
    code, out, err = cli("resume", "-c", str(config))
    assert (code, out) == (EXIT_OK, "main: was not paused\n"), err


def test_pausing_again_replaces_the_pause(cli: Cli, tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    assert cli("pause", "-c", str(config), "--reason", "first", "--for", "2h")[0] == EXIT_OK
    code, out, err = cli("pause", "-c", str(config), "--reason", "second")
    assert code == EXIT_OK, err
    [line] = out.splitlines()
    # What it replaced is said, so a second operator knows whose pause they took over.
    assert line.startswith(f"main: paused by {ME} since "), line
    assert " (until resumed): second (replaces: paused by " in line, line
    assert line.endswith(": first)"), line
    assert pause_rows(pg_dsn) == [(ME, "second", None)]  # one row: the reason and end replaced
    paused = status_json(cli, config)["paused"]["main"]
    assert (paused["reason"], paused["until"]) == ("second", None)


def test_resume_ends_the_pause_and_says_who_had_paused(
    cli: Cli, tmp_path: Path, pg_dsn: str
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    _, paused_line, _ = cli("pause", "-c", str(config), "--reason", "migration", "--for", "1h")
    code, out, err = cli("resume", "-c", str(config))
    assert code == EXIT_OK, err
    was = paused_line.strip().removeprefix("main: ")
    assert out == f"main: resumed (was {was})\n"
    assert pause_rows(pg_dsn) == []
    # A pause without an end: not "(until resumed)" once it has been.
    _, paused_line, _ = cli("pause", "-c", str(config), "--reason", "hold")
    was = paused_line.strip().removeprefix("main: ").replace(" (until resumed)", "")
    code, out, err = cli("resume", "-c", str(config))
    assert (code, out) == (EXIT_OK, f"main: resumed (was {was})\n"), err
    assert out.endswith(": hold)\n") and "(until resumed)" not in out
    doc = status_json(cli, config)
    # An empty pause table shows nothing extra.
    assert set(doc) == {"runs", "last_success", "unreachable"}, doc
    assert " paused " not in status_text(cli, config)


def test_resume_when_not_paused(cli: Cli, tmp_path: Path, pg_dsn: str, other_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn, "other": other_dsn})
    code, out, err = cli("resume", "-c", str(config))
    assert code == EXIT_OK, err
    assert out == "main: was not paused\nother: was not paused\n"
    assert not has_pause_table(pg_dsn)  # resuming creates nothing
    assert cli("pause", "-c", str(config), "--database", "other")[0] == EXIT_OK
    code, out, err = cli("resume", "-c", str(config), "--database", "other")
    assert code == EXIT_OK and out.startswith("other: resumed (was paused by "), (out, err)
    code, out, err = cli("resume", "-c", str(config), "--database", "other")
    assert (code, out) == (EXIT_OK, "other: was not paused\n"), err


def test_reason_line_breaks_are_folded_into_one_line(cli: Cli, tmp_path: Path, pg_dsn: str) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    code, out, err = cli("pause", "-c", str(config), "--reason", "  line one\r\n\tline two\u2028 ")
    assert code == EXIT_OK, err
    assert out.endswith(": line one line two\n"), out
    assert pause_rows(pg_dsn) == [(ME, "line one line two", None)]


def test_a_hostile_reason_is_stored_verbatim_and_shown_on_one_line(
    cli: Cli, tmp_path: Path, pg_dsn: str
) -> None:
    reason = 'it\'s "x"; DROP TABLE sweeperd.pause; -- $$ \\ %s %(by)s ünïcødé 🧹 \u202eevil'
    config = write_setup(tmp_path, {"main": pg_dsn})
    code, out, err = cli("pause", "-c", str(config), "--reason", reason)
    assert code == EXIT_OK, err
    assert pause_rows(pg_dsn) == [(ME, reason, None)]
    # Shown as itself, except the right-to-left override, which would reorder the terminal's
    # line: escaped, as every one-line message escapes what would not print as itself.
    shown = reason.replace("\u202e", "\\u202e")
    assert out.endswith(f": {shown}\n"), out
    assert len(out.splitlines()) == 1
    assert f"database main paused by {ME} since " in status_text(cli, config)
    assert status_text(cli, config).count(shown) == 1
    assert status_json(cli, config)["paused"]["main"]["reason"] == reason  # JSON: verbatim


# -- usage errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pause", "resume"])
def test_an_unknown_database_is_one_line_exit_2(
    cli: Cli, tmp_path: Path, pg_dsn: str, other_dsn: str, command: str
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn, "other": other_dsn})
    code, out, err = cli(command, "-c", str(config), "--database", "main", "--database", "mian")
    assert code == EXIT_USAGE
    assert out == ""
    assert err.splitlines() == [
        f"sweeperd: no database named 'mian' in {config} (known: main, other)"
    ]
    assert not has_pause_table(pg_dsn)  # nothing done anywhere


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--for", "soon"], "--for: expected a duration"),
        (["--for", "30"], "--for: expected a duration"),
        (["--for", "0s"], "--for: expected a duration longer than 0"),
        (["--for", "200000d"], "--for: expected a duration of at most"),
        (["--reason", "bell\x07"], "--reason: expected one line of text"),
        (["--reason", "nul\x00"], "--reason: expected one line of text"),
        (["--reason", "esc\x1b[31m"], "--reason: expected one line of text"),
    ],
)
def test_a_bad_for_or_reason_is_one_line_exit_2(
    cli: Cli, tmp_path: Path, pg_dsn: str, args: list[str], words: str
) -> None:
    config = write_setup(tmp_path, {"main": pg_dsn})
    code, out, err = cli("pause", "-c", str(config), *args)
    assert code == EXIT_USAGE
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"sweeperd: {words}"), line
    assert line.isprintable(), line
    assert not has_pause_table(pg_dsn)


def test_help(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    for command, options in (
        ("pause", ("--database NAME", "--for DURATION", "--reason TEXT", "-c FILE")),
        ("resume", ("--database NAME", "-c FILE")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for option in options:
            assert option in out, out
    # And through the installed entry point's module, as a user runs it.
    result = run_cli("pause", "--help")
    assert result.returncode == 0, result.stderr
    assert "--for DURATION" in result.stdout and "check_every" in result.stdout
    result = run_cli("--help")
    assert "pause" in result.stdout and "resume" in result.stdout


# -- databases that cannot be paused ---------------------------------------------------------------


def test_an_unreachable_database_does_not_stop_the_others(
    cli: Cli, tmp_path: Path, pg_dsn: str
) -> None:
    closed = f"host=127.0.0.1 port={free_port()} dbname=app"
    config = write_setup(tmp_path, {"gone": closed, "main": pg_dsn})
    code, out, err = cli("pause", "-c", str(config), "--reason", "r")
    assert code == EXIT_UNREACHABLE
    assert out.startswith(f"main: paused by {ME} since "), (out, err)
    [line] = errors(err)
    assert line.startswith("sweeperd: gone: unreachable: "), line
    assert "refused" in line.lower(), line
    assert pause_rows(pg_dsn) == [(ME, "r", None)]

    code, out, err = cli("resume", "-c", str(config))
    assert code == EXIT_UNREACHABLE
    assert out.startswith("main: resumed (was paused by "), (out, err)
    assert [x.split(":")[1] for x in errors(err)] == [" gone"]
    assert pause_rows(pg_dsn) == []


def test_a_standby_cannot_be_paused_the_primary_is(
    cli: Cli, tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    primary = scratch_server()
    standby = standby_of(primary)
    standby.wait_caught_up()
    config = write_setup(tmp_path, {"primary": primary.dsn(), "replica": standby.dsn()})
    code, out, err = cli("pause", "-c", str(config), "--reason", "failover drill")
    assert code == EXIT_FAILED
    assert out.startswith(f"primary: paused by {ME} since "), (out, err)
    assert errors(err) == [
        "sweeperd: replica: cannot pause: database is in recovery (standby): "
        "sweeperd works on the primary only"
    ]
    # The standby has the primary's pause (replicated), which status shows there too.
    standby.wait_caught_up()
    doc = status_json(cli, config)
    assert set(doc["paused"]) == {"primary", "replica"}
    assert doc["paused"]["replica"]["reason"] == "failover drill"

    code, out, err = cli("resume", "-c", str(config), "--database", "replica")
    assert (code, out) == (EXIT_FAILED, "")
    assert [x.split(":")[1:3] for x in errors(err)] == [[" replica", " cannot resume"]]
    code, out, err = cli("resume", "-c", str(config), "--database", "primary")
    assert code == EXIT_OK and out.startswith("primary: resumed (was paused by "), (out, err)


def test_a_role_that_cannot_create_schema_sweeperd_is_told_the_grant(
    cli: Cli, tmp_path: Path, pg_dsn: str
) -> None:
    admin = write_setup(tmp_path, {"main": pg_dsn}, name="admin.toml")
    with throwaway_role(pg_dsn, "op") as role:
        config = write_setup(tmp_path, {"main": role.dsn(pg_dsn)})
        code, out, err = cli("pause", "-c", str(config))
        assert (code, out) == (EXIT_FAILED, "")
        [line] = errors(err)
        assert line.startswith("sweeperd: main: cannot pause: missing privileges: "), line
        assert "InsufficientPrivilege (SQLSTATE 42501)" in line, line
        dbname = conninfo_to_dict(pg_dsn)["dbname"]
        assert f'GRANT CREATE ON DATABASE "{dbname}" TO "{role.name}";' in line, line
        assert not has_pause_table(pg_dsn)

        # A DBA makes the table (the first pause does) and lets the role write it, no more: the
        # role pauses and resumes without creating anything.
        assert cli("resume", "-c", str(admin))[0] == EXIT_OK
        assert cli("pause", "-c", str(admin))[0] == EXIT_OK
        assert cli("resume", "-c", str(admin))[0] == EXIT_OK
        code, out, err = cli("pause", "-c", str(config))
        [line] = errors(err)
        assert code == EXIT_FAILED
        assert (
            f'GRANT USAGE ON SCHEMA sweeperd TO "{role.name}"; GRANT SELECT, INSERT, UPDATE, '
            f'DELETE ON sweeperd.pause TO "{role.name}";'
        ) in line, line

        run_sql(
            pg_dsn,
            f"GRANT USAGE ON SCHEMA sweeperd TO {role.name}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON sweeperd.pause TO {role.name}",
        )
        code, out, err = cli("pause", "-c", str(config), "--reason", "by the operator")
        assert code == EXIT_OK, err
        assert out.startswith(f"main: paused by {ME} since ")
        code, out, err = cli("resume", "-c", str(config))
        assert code == EXIT_OK and out.startswith("main: resumed (was paused by "), (out, err)


def test_status_of_a_role_that_may_not_read_the_pause_still_shows_the_runs(
    cli: Cli, tmp_path: Path, pg_dsn: str
) -> None:
    admin = write_setup(tmp_path, {"main": pg_dsn}, name="admin.toml")
    assert cli("pause", "-c", str(admin), "--reason", "r")[0] == EXIT_OK
    with throwaway_role(pg_dsn, "mon") as role:
        run_sql(pg_dsn, f"GRANT USAGE ON SCHEMA sweeperd TO {role.name}")
        config = write_setup(tmp_path, {"main": role.dsn(pg_dsn)})
        out = status_text(cli, config)
        assert "no runs recorded yet" in out
        [line] = [x for x in out.splitlines() if "pause" in x]
        assert line.startswith("database main: cannot read its pause: InsufficientPrivilege"), line
        assert f"SELECT ON sweeperd.pause to {role.name}" in line, line
        doc = status_json(cli, config)
        assert "paused" not in doc and set(doc["pause_unknown"]) == {"main"}
        run_sql(pg_dsn, f"GRANT SELECT ON sweeperd.pause TO {role.name}")
        assert status_json(cli, config)["paused"]["main"]["reason"] == "r"


# -- pure logic ------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyError("getpwuid(): uid not found: 4242"), OSError("no")])
def test_who_without_a_user_name_is_the_uid(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def no_name() -> str:
        raise error

    monkeypatch.setattr(getpass, "getuser", no_name)
    assert who() == f"uid {os.getuid()}@{socket.gethostname()}"


def test_who_is_user_at_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    assert who() == f"alice@{socket.gethostname()}"


@pytest.mark.parametrize(
    ("reason", "stored"),
    [
        ("disk full", "disk full"),
        ("  padded  ", "padded"),
        ("a\nb\r\nc\x85d\u2028e\u2029f\tg\x0bh\x0ci", "a b c d e f g h i"),
        ("", None),
        (" \n\t ", None),
        ("ünïcødé 🧹 'quoted'; -- \"x\"", "ünïcødé 🧹 'quoted'; -- \"x\""),
        ("zero\u200bwidth \u202e", "zero\u200bwidth \u202e"),  # not control characters
    ],
)
def test_one_line(reason: str, stored: str | None) -> None:
    assert one_line(reason) == stored


@pytest.mark.parametrize("reason", ["a\x00b", "a\x1bb", "a\x7fb", "a\x9bb", "a\x07"])
def test_one_line_refuses_control_characters(reason: str) -> None:
    with pytest.raises(ValueError, match="without control characters"):
        one_line(reason)
