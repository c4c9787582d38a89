"""``conf.d/*.toml`` drop-ins: merged after the main file in name order, problems naming the file
that set their key, ``-c DIR``, ``check-config`` through the real CLI, and a daemon's reload.

Everything but the reload tests is configuration only: nothing connects to a database.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from support import run_cli, write_config
from test_daemon import (  # noqa: F401  (db and start_daemon are fixtures)
    Daemon,
    db,
    fields,
    runs,
    start_daemon,
    wait_until,
    write_daemon_config,
)

from sweeperd.config import ConfigError, load_config
from sweeperd.dropins import Origins, read_merged
from sweeperd.startup import prepare

EXIT_OK, EXIT_USAGE = 0, 2

MAIN = """
    [databases.main]
    dsn = "host=/nonexistent dbname=app"

    [[tenants]]
    name = "acme"
    database = "main"
    schema = "tenant_acme"

    [sweeps.nightly]
    cron = "0 3 * * *"
"""


def tenant(name: str, database: str = "main") -> str:
    return f'[[tenants]]\nname = "{name}"\ndatabase = "{database}"\nschema = "tenant_{name}"\n'


def dropin(directory: Path, name: str, text: str) -> Path:
    conf_d = directory / "conf.d"
    conf_d.mkdir(exist_ok=True)
    path = conf_d / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def main_file(directory: Path, text: str = MAIN) -> Path:
    return write_config(directory, text)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


# -- the merge rules ------------------------------------------------------------------------------


def test_without_conf_d_the_main_file_alone(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    config = load_config(path)
    assert config.path == path
    assert config.dropins == ()
    assert [t.name for t in config.tenants] == ["acme"]


def test_tables_merge_recursively(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    dropin(
        tmp_path,
        "10-databases.toml",
        """
        [databases.main]
        max_connections = 3

        [databases.other]
        dsn = "host=/nonexistent dbname=other"

        [databases.main.throttle]
        max_active_sessions = 40
        """,
    )
    dropin(tmp_path, "20-more.toml", "[databases.other]\nlock_timeout = '1s'\n")
    config = load_config(path)
    assert config.path == path  # the main file, whatever else was read
    main, other = config.databases["main"], config.databases["other"]
    assert (main.dsn, main.max_connections, main.throttle.max_active_sessions) == (
        "host=/nonexistent dbname=app",
        3,
        40,
    )
    assert (other.dsn, other.lock_timeout) == ("host=/nonexistent dbname=other", 1.0)
    assert list(config.databases) == ["main", "other"]


def test_arrays_of_tables_append_in_file_name_order(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    # Written out of order: the merge order is the names', not the files' ages.
    dropin(tmp_path, "30-c.toml", tenant("c1") + tenant("c2"))
    dropin(tmp_path, "10-a.toml", tenant("a1"))
    dropin(tmp_path, "20-b.toml", "tenants = [{ name = 'b1', database = 'main', schema = 's' }]")
    config = load_config(path)
    assert [t.name for t in config.tenants] == ["acme", "a1", "b1", "c1", "c2"]
    assert [p.name for p in config.dropins] == ["10-a.toml", "20-b.toml", "30-c.toml"]


def test_the_order_is_the_bytes_of_the_names_not_the_locale(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    names = ["a.toml", "_x.toml", "B.toml", "9.toml", "10.toml"]
    for name in names:
        dropin(tmp_path, name, tenant(name.removesuffix(".toml").strip("_") or "u"))
    config = load_config(path)
    assert [p.name for p in config.dropins] == ["10.toml", "9.toml", "B.toml", "_x.toml", "a.toml"]
    assert [t.name for t in config.tenants] == ["acme", "10", "9", "B", "x", "a"]


def test_plugin_rules_append_too(tmp_path: Path) -> None:
    path = main_file(
        tmp_path,
        MAIN
        + """
        [[plugins.retention.rules]]
        name = "notifications"
        table = "notifications"
        column = "created_at"
        older_than = "90d"
        """,
    )
    dropin(
        tmp_path,
        "50-sessions.toml",
        """
        [[plugins.retention.rules]]
        name = "sessions"
        table = "sessions"
        column = "expires_at"
        older_than = "0s"
        """,
    )
    prepared = prepare(path)
    rules = prepared.config.plugin_settings("retention")["rules"]
    assert [r["name"] for r in rules] == ["notifications", "sessions"]
    assert {"retention.notifications", "retention.sessions"} <= set(prepared.plugins.operations)


def test_a_value_set_in_two_files_names_the_key_and_both_files(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    first = dropin(tmp_path, "10-x.toml", "[daemon]\nmax_concurrency = 4\n")
    second = dropin(
        tmp_path,
        "20-x.toml",
        '[databases.main]\ndsn = "host=/elsewhere"\n[daemon]\nmax_concurrency = 8\n',
    )
    assert problems_of(path) == [
        f"{second}: databases.main.dsn: already set in {path}",
        f"{second}: daemon.max_concurrency: already set in {first}",
    ]


def test_plain_arrays_and_empty_arrays_are_values_not_appended(tmp_path: Path) -> None:
    path = main_file(tmp_path, MAIN + '[daemon]\nplugin_dirs = ["a"]\n')
    plain = dropin(tmp_path, "10-dirs.toml", '[daemon]\nplugin_dirs = ["b"]\n')
    empty = dropin(tmp_path, "20-none.toml", "tenants = []\n")
    assert problems_of(path) == [
        f"{plain}: daemon.plugin_dirs: already set in {path}",
        f"{empty}: tenants: already set in {path} (an array of tables there, an array here)",
    ]


@pytest.mark.parametrize(
    ("text", "key", "kinds"),
    [
        ('databases = "main"\n', "databases", "a table there, a string here"),
        (
            "[sweeps.nightly.cron]\nminute = 0\n",
            "sweeps.nightly.cron",
            "a string there, a table here",
        ),
        ("[tenants]\nname = 'x'\n", "tenants", "an array of tables there, a table here"),
    ],
    ids=["table-then-value", "value-then-table", "array-then-table"],
)
def test_a_table_where_another_file_has_a_value_is_a_problem(
    tmp_path: Path, text: str, key: str, kinds: str
) -> None:
    path = main_file(tmp_path)
    clash = dropin(tmp_path, "10-clash.toml", text)
    assert problems_of(path) == [f"{clash}: {key}: already set in {path} ({kinds})"]


def test_every_problem_at_once(tmp_path: Path) -> None:
    """Keys set twice and validation problems together, one line each (a value set twice
    keeps the first file's, which is validated)."""
    path = main_file(tmp_path)
    twice = dropin(tmp_path, "10-twice.toml", "[sweeps.nightly]\ncron = '0 4 * * *'\n")
    typo = dropin(tmp_path, "20-typo.toml", tenant("b") + "colour = 'blue'\n")
    assert problems_of(path) == [
        f"{twice}: sweeps.nightly.cron: already set in {path}",
        f"{typo}: tenants[1].colour: unknown key (expected one of: database, name, schema)",
    ]


# -- which files are drop-ins ---------------------------------------------------------------------


def test_only_regular_files_ending_in_toml_and_not_hidden(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    kept = dropin(tmp_path, "10-kept.toml", tenant("kept"))
    broken = "this is not TOML ["
    for name in (
        "10-kept.toml~",
        "10-kept.toml.dpkg-old",
        "10-kept.toml.dpkg-dist",
        "10-kept.toml.rpmnew",
        ".10-kept.toml.swp",
        ".hidden.toml",
        "#10-kept.toml#",
        "README",
        "tenants.conf",
        "tenants.TOML",
    ):
        dropin(tmp_path, name, broken)
    (tmp_path / "conf.d" / "directory.toml").mkdir()
    os.mkfifo(tmp_path / "conf.d" / "fifo.toml")  # a read would block: never opened
    (tmp_path / "conf.d" / ".#10-kept.toml").symlink_to("user@host.1234")  # Emacs' lock
    config = load_config(path)
    assert config.dropins == (kept,)
    assert [t.name for t in config.tenants] == ["acme", "kept"]


def test_a_symbolic_link_to_a_file_is_a_drop_in(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    target = write_config(tmp_path, tenant("linked"), name="generated.toml.src")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-linked.toml").symlink_to(target)
    assert [t.name for t in load_config(path).tenants] == ["acme", "linked"]


def test_a_link_to_nothing_is_a_problem_naming_it(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    (tmp_path / "conf.d").mkdir()
    link = tmp_path / "conf.d" / "50-tenants.toml"
    link.symlink_to(tmp_path / "gone.toml")
    (line,) = problems_of(path)
    assert line.startswith(f"{link}: cannot read the drop-in: ")
    assert "No such file" in line


def test_bad_toml_in_a_drop_in_names_it_and_every_bad_file_is_reported(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    dropin(tmp_path, "10-fine.toml", tenant("fine"))
    bad = dropin(tmp_path, "20-bad.toml", "[[tenants]\nname = 'x'\n")
    (tmp_path / "conf.d" / "30-latin1.toml").write_bytes(b"# caf\xe9\n")
    twice = dropin(tmp_path, "40-twice.toml", "[databases.main]\ndsn = 'x'\n")
    # 20-bad.toml's tenants are missing: the rest is not validated (a tenant naming a database
    # defined there would be a false problem), only the files and the keys set twice are.
    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{bad}: invalid TOML: ")
    assert problems[1] == f"{tmp_path / 'conf.d' / '30-latin1.toml'}: not UTF-8 text"
    assert problems[2] == f"{twice}: databases.main.dsn: already set in {path}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_drop_in_names_it(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    secret = dropin(tmp_path, "50-secret.toml", tenant("secret"))
    secret.chmod(0)
    (line,) = problems_of(path)
    assert line.startswith(f"{secret}: cannot read the configuration: ")
    assert "Permission denied" in line


def test_conf_d_that_is_no_directory(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    (tmp_path / "conf.d").write_text(tenant("x"))
    assert problems_of(path) == [f"{tmp_path / 'conf.d'}: expected a directory of *.toml drop-ins"]


def test_an_empty_conf_d_is_fine(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    (tmp_path / "conf.d").mkdir()
    assert load_config(path).dropins == ()


def test_a_bad_main_file_is_reported_alone(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[daemon\n")
    dropin(tmp_path, "10-x.toml", tenant("x", database="nowhere"))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: invalid TOML")


# -- problems name the file that set the key ------------------------------------------------------


def test_validation_problems_name_the_drop_in_that_set_the_key(tmp_path: Path) -> None:
    path = main_file(tmp_path, MAIN + "[databases.main.throttle]\ncheck_every = 'often'\n")
    dropin(tmp_path, "10-db.toml", "[databases.main]\nmax_connections = 0\n")
    tenants = dropin(
        tmp_path,
        "tenants.toml",
        tenant("b") + tenant("c") + '[[tenants]]\nname = "d"\ndatabase = "main"\nschma = "t_d"\n',
    )
    sweeps = dropin(tmp_path, "sweeps.toml", "[sweeps.hourly]\ntimeout = '1h'\n")
    problems = problems_of(path)
    database = tmp_path / "conf.d" / "10-db.toml"
    assert sorted(problems) == sorted(
        [
            f"{path}: databases.main.throttle.check_every: expected a duration such as "
            '"500ms", "30s", "15m", "2h", "90d" or "1h30m", got \'often\'',
            f"{database}: databases.main.max_connections: expected a positive integer, got 0",
            f"{tenants}: tenants[3].schma: unknown key (expected one of: database, name, schema)",
            f"{tenants}: tenants[3].schema: required: a non-empty string",
            # Required and missing: the file that made the table it would be in.
            f"{sweeps}: sweeps.hourly.cron: required: a crontab expression such as "
            '"0 3 * * *" (or interval = "15m")',
        ]
    ), problems


def test_a_duplicate_tenant_names_the_file_of_the_second(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    again = dropin(tmp_path, "10-again.toml", tenant("b") + tenant("acme"))
    (line,) = problems_of(path)
    assert line.startswith(f"{again}: tenants[2].name: expected a tenant name unique"), line


def test_quoted_keys_are_followed_to_their_file(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    odd = dropin(tmp_path, "10-odd.toml", '[databases."bad name"]\ndsn = "dbname=x"\n')
    (line,) = problems_of(path)
    assert line.startswith(f'{odd}: databases."bad name": expected a database key'), line


def test_plugin_settings_problems_name_the_drop_in(tmp_path: Path) -> None:
    path = main_file(
        tmp_path,
        MAIN
        + """
        [[plugins.retention.rules]]
        name = "notifications"
        table = "notifications"
        column = "created_at"
        older_than = "90d"
        """,
    )
    rules = dropin(
        tmp_path,
        "20-rules.toml",
        """
        [[plugins.retention.rules]]
        name = "sessions"
        table = "sessions"
        column = "expires_at"
        older_than = "ninety days"
        """,
    )
    unknown = dropin(tmp_path, "30-unknown.toml", "[plugins.nosuchplugin]\nx = 1\n")
    with pytest.raises(ConfigError) as info:
        prepare(path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{unknown}: plugins.nosuchplugin: no plugin named"), problems
    assert problems[1].startswith(f"{rules}: plugins.retention.rules[1].older_than: "), problems


def test_a_missing_plugin_dir_names_the_drop_in(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    dirs = dropin(tmp_path, "10-plugins.toml", '[daemon]\nplugin_dirs = ["plugins.d"]\n')
    with pytest.raises(Exception) as info:  # PluginError: a directory is checked when loading
        prepare(path)
    problems = info.value.problems  # type: ignore[attr-defined]
    assert problems == [
        f"{dirs}: daemon.plugin_dirs[0]: expected a directory, {tmp_path / 'plugins.d'} does "
        "not exist or is not a directory"
    ]


def test_relative_paths_in_a_drop_in_are_relative_to_the_main_file(tmp_path: Path) -> None:
    """The directory of sweeperd.toml, whichever file sets them: a key means the same in any
    file, so moving it into conf.d changes nothing."""
    path = main_file(tmp_path)
    (tmp_path / "dsn").write_text("host=/nonexistent dbname=from_file\n")
    dropin(
        tmp_path,
        "10-paths.toml",
        '[daemon]\nplugin_dirs = ["plugins.d"]\n[databases.other]\ndsn_file = "dsn"\n',
    )
    config = load_config(path)
    assert config.daemon.plugin_dirs == (tmp_path / "plugins.d",)
    assert config.databases["other"].dsn == "host=/nonexistent dbname=from_file"


def test_origins_of_keys_no_file_set() -> None:
    origins = Origins((Path("/etc/sweeperd/sweeperd.toml"),))
    assert origins.file_of("") == origins.main
    assert origins.file_of("tenants[7].name") == origins.main
    assert origins.file_of('plugins."x y".a[0]."]"') == origins.main
    assert origins.dropins == ()


def test_origins_of_array_items_by_file(tmp_path: Path) -> None:
    main_file(tmp_path, tenant("m0") + tenant("m1"))
    a = dropin(tmp_path, "a.toml", tenant("a0"))
    b = dropin(tmp_path, "b.toml", "".join(tenant(f"b{i}") for i in range(3)))
    merged = read_merged(tmp_path)
    assert merged.problems == []
    got = [merged.origins.file_of(f"tenants[{i}].schema") for i in range(6)]
    assert got == [tmp_path / "sweeperd.toml"] * 2 + [a] + [b] * 3
    assert merged.origins.file_of("tenants") == tmp_path / "sweeperd.toml"


# -- -c DIR -------------------------------------------------------------------------------------


def test_a_directory_holding_sweeperd_toml_and_conf_d(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    dropin(tmp_path, "10-x.toml", tenant("x"))
    config = load_config(tmp_path)
    assert config.path == path
    assert [t.name for t in config.tenants] == ["acme", "x"]


def test_a_directory_without_sweeperd_toml(tmp_path: Path) -> None:
    dropin(tmp_path, "10-x.toml", tenant("x"))
    (line,) = problems_of(tmp_path)
    assert line == (
        f"{tmp_path}: cannot read the configuration: a directory without sweeperd.toml "
        f"(expected {tmp_path / 'sweeperd.toml'}, and drop-ins in {tmp_path / 'conf.d'}/*.toml)"
    )


def test_drop_ins_are_beside_the_main_file_whatever_its_name(tmp_path: Path) -> None:
    """``check-config -c sweeperd.toml.new`` checks a new main file with the drop-ins in use."""
    main_file(tmp_path)
    new = write_config(tmp_path, MAIN.replace("0 3", "0 4"), name="sweeperd.toml.new")
    dropin(tmp_path, "10-x.toml", tenant("x"))
    config = load_config(new)
    assert config.path == new
    assert [t.name for t in config.tenants] == ["acme", "x"]


# -- check-config through the CLI ---------------------------------------------------------------


def test_check_config_counts_the_merged_result_and_the_drop_ins(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    dropin(tmp_path, "10-db.toml", "[databases.other]\ndsn = 'host=/nonexistent dbname=o'\n")
    dropin(tmp_path, "20-tenants.toml", tenant("b", "other") + tenant("c"))
    result = run_cli("check-config", "-c", str(tmp_path))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: OK (2 databases, 3 tenants, 0 tenant sources, 1 sweeps, 0 operations, 2 drop-ins)"
    ]
    by_env = run_cli("check-config", env={"SWEEPERD_CONFIG": str(tmp_path)})
    assert (by_env.returncode, by_env.stdout) == (EXIT_OK, result.stdout), by_env.stderr
    alone = run_cli("check-config", "-c", str(write_config(tmp_path / "conf.d", MAIN)))
    assert alone.returncode == EXIT_OK, alone.stderr  # conf.d/sweeperd.toml: no conf.d beside it
    assert alone.stdout.rstrip().endswith(", 0 drop-ins)")


def test_check_config_reports_every_drop_in_problem_exit_2(tmp_path: Path) -> None:
    path = main_file(tmp_path)
    twice = dropin(tmp_path, "10-twice.toml", "[databases.main]\ndsn = 'host=/x'\n")
    typo = dropin(tmp_path, "20-tenants.toml", tenant("b") + "schma = 'x'\n")
    result = run_cli("check-config", "-c", str(tmp_path))
    assert result.returncode == EXIT_USAGE, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"sweeperd: {twice}: databases.main.dsn: already set in {path}",
        f"sweeperd: {typo}: tenants[1].schma: unknown key (expected one of: database, name, "
        "schema)",
    ]


def test_check_config_of_a_directory_without_sweeperd_toml(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(tmp_path))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        f"sweeperd: {tmp_path}: cannot read the configuration: a directory without "
        f"sweeperd.toml (expected {tmp_path / 'sweeperd.toml'}, and drop-ins in "
        f"{tmp_path / 'conf.d'}/*.toml)"
    ]


# -- reload ---------------------------------------------------------------------------------------


def test_reload_reads_the_drop_ins_again_and_a_broken_one_keeps_the_old_config(
    tmp_path: Path,
    db: str,  # noqa: F811
    start_daemon: Callable[..., Daemon],  # noqa: F811
) -> None:
    write_daemon_config(tmp_path, db, sweeps={"s": {"interval": "1s"}})
    daemon = start_daemon(tmp_path)  # -c DIR
    daemon.ready()
    wait_until(lambda: runs(db, tenant="acme"), 15, "a run of acme")

    # A generated tenants file appears: the next reload runs its tenant.
    dropin(tmp_path, "50-tenants.toml", tenant("globex"))
    _reloading, ready, _before, _after = daemon.reload()
    assert "reload failed" not in fields(ready)["STATUS"], ready
    wait_until(lambda: runs(db, tenant="globex"), 15, "a run of the drop-in's tenant")

    # A broken drop-in: the reload fails, naming it, and both tenants keep running.
    broken = dropin(tmp_path, "60-broken.toml", "[[tenants]\n")
    twice = dropin(tmp_path, "70-twice.toml", "[databases.main]\nmax_connections = 1\n")
    _reloading, ready, _before, _after = daemon.reload()
    assert fields(ready)["STATUS"].startswith("reload failed (2 problem(s))"), ready
    failed = daemon.events("reload failed; keeping the previous configuration")
    problems = [e["problem"] for e in failed]
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{broken}: invalid TOML: "), problems
    assert problems[1] == (
        f"{twice}: databases.main.max_connections: already set in {tmp_path / 'sweeperd.toml'}"
    )
    seen = {r.id for r in runs(db)}
    wait_until(
        lambda: {r.tenant for r in runs(db) if r.id not in seen} >= {"acme", "globex"},
        15,
        "both tenants to run on after the failed reload",
    )
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    reloaded = daemon.events("configuration reloaded")
    assert len(reloaded) == 1, reloaded
    assert "Traceback" not in daemon.stderr()
    assert json.dumps(str(broken))[1:-1] in daemon.stderr()
