"""Configuration validation: all problems at once, each naming file, key path and expectation.

Pure logic: nothing here connects to a database.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from apscheduler.triggers.cron import CronTrigger
from support import toml_str, write_config

from sweeperd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    DaemonConfig,
    DatabaseConfig,
    HistoryConfig,
    LogConfig,
    SweepConfig,
    TelemetryConfig,
    TenantConfig,
    TenantSource,
    load_config,
    parse_config,
    resolve_config_path,
)
from sweeperd.settings import Duration, read
from sweeperd.validation import Known

DSN = 'dsn = "host=/nonexistent dbname=app"'
TENANT = 'name = "acme"\ndatabase = "main"\nschema = "tenant_acme"'
CRON = 'cron = "0 3 * * *"'
PASSWORD = "hunter2-s3cret"

# A problem line: "<file>: <key path>: <what was expected>".
KEY_PATH = r"[A-Za-z0-9_\-. \[\]]+"


def make_config(
    *,
    top: str = "",
    daemon: str = "",
    log: str = "",
    history: str = "",
    database: str = DSN,
    tenant: str | None = TENANT,
    source: str | None = None,
    sweep: str = CRON,
    tail: str = "",
) -> str:
    """A valid configuration, with each section's body replaceable or extendable."""
    parts = [
        top,
        "[daemon]",
        daemon,
        "[log]",
        log,
        "[history]",
        history,
        "[databases.main]",
        database,
    ]
    if tenant is not None:
        parts += ["[[tenants]]", tenant]
    if source is not None:
        parts += ["[[tenant_sources]]", source]
    parts += ["[sweeps.nightly]", sweep, tail]
    return "\n".join(parts) + "\n"


def write(tmp_path: Path, text: str) -> Path:
    return write_config(tmp_path, text)


def load_ok(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert problems, "ConfigError without problems"
    assert str(info.value) == "\n".join(problems)
    return problems


def problems_for(tmp_path: Path, text: str) -> tuple[Path, list[str]]:
    path = write(tmp_path, text)
    return path, problems_of(path)


def assert_problem(line: str, path: Path, key: str, *fragments: str) -> None:
    """``line`` starts with the file and the key path and mentions every fragment."""
    assert line.startswith(f"{path}: {key}: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def single_problem(tmp_path: Path, text: str, key: str, *fragments: str) -> str:
    path, problems = problems_for(tmp_path, text)
    assert len(problems) == 1, problems
    assert_problem(problems[0], path, key, *fragments)
    return problems[0]


def problems_at(problems: list[str], path: Path, key: str) -> list[str]:
    return [p for p in problems if p.startswith(f"{path}: {key}: ")]


# -- valid configurations and defaults -------------------------------------------------------------


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load_ok(tmp_path, f"[databases.main]\n{DSN}\n[sweeps.nightly]\n{CRON}\n")
    assert config.daemon.timezone == "UTC"
    assert config.daemon.max_concurrency == 16
    assert config.daemon.plugin_dirs == ()
    assert config.daemon.drain_timeout == 30.0
    assert config.log.format == "auto"
    assert config.log.level == "info"
    assert config.history.enabled is True
    assert config.history.keep == 30 * 86400.0
    db = config.databases["main"]
    assert (db.name, db.dsn) == ("main", "host=/nonexistent dbname=app")
    assert db.max_connections == 8
    assert db.lock_timeout == 5.0
    assert db.statement_timeout == 1800.0
    assert db.connect_timeout == 10.0
    sweep = config.sweeps["nightly"]
    assert sweep.name == "nightly"
    assert sweep.cron == "0 3 * * *"
    assert sweep.interval is None
    assert sweep.per_tenant_concurrency == 4
    assert sweep.operations == ("*",)
    assert sweep.tenants == ("*",)
    assert sweep.overlap == "skip"
    assert sweep.timeout is None
    assert sweep.operation_timeout is None
    assert sweep.jitter == 0.0
    assert config.tenants == ()
    assert config.tenant_sources == ()
    assert config.plugin_settings("vacuum") == {}


def test_the_defaults_are_the_dataclasses_own(tmp_path: Path) -> None:
    """Nothing restates a default: what a config leaves out is what the dataclass says."""
    config = load_ok(tmp_path, f"[databases.main]\n{DSN}\n[sweeps.nightly]\n{CRON}\n")
    assert config.daemon == DaemonConfig()
    assert config.log == LogConfig()
    assert config.history == HistoryConfig()
    assert config.telemetry == TelemetryConfig()
    dsn = "host=/nonexistent dbname=app"
    assert config.databases["main"] == DatabaseConfig(name="main", dsn=dsn)
    assert config.databases["main"].dsn == dsn
    assert config.sweeps["nightly"] == SweepConfig(name="nightly", cron="0 3 * * *")


# Each section: where an unknown key lands, its dataclass, the fields that are no keys (a table's
# name, the file's path) and the keys that are no fields (the DSN's sources).
SECTIONS = [
    ({"top": "bogus = 1"}, "bogus", Config, {"path"}, set()),
    ({"daemon": "bogus = 1"}, "daemon.bogus", DaemonConfig, set(), set()),
    ({"log": "bogus = 1"}, "log.bogus", LogConfig, set(), set()),
    ({"history": "bogus = 1"}, "history.bogus", HistoryConfig, set(), set()),
    ({"top": "[telemetry]\nbogus = 1"}, "telemetry.bogus", TelemetryConfig, set(), set()),
    (
        {"database": DSN + "\nbogus = 1"},
        "databases.main.bogus",
        DatabaseConfig,
        {"name"},
        {"dsn_file", "dsn_credential"},
    ),
    ({"tenant": TENANT + "\nbogus = 1"}, "tenants[0].bogus", TenantConfig, set(), set()),
    (
        {"source": 'database = "main"\nschemas = "t_%"\nbogus = 1'},
        "tenant_sources[0].bogus",
        TenantSource,
        set(),
        set(),
    ),
    ({"sweep": CRON + "\nbogus = 1"}, "sweeps.nightly.bogus", SweepConfig, {"name"}, set()),
]


@pytest.mark.parametrize(("overrides", "key", "cls", "given", "extra"), SECTIONS)
def test_each_section_allows_exactly_the_fields_of_its_dataclass(
    tmp_path: Path,
    overrides: dict[str, str],
    key: str,
    cls: type,
    given: set[str],
    extra: set[str],
) -> None:
    line = single_problem(tmp_path, make_config(**overrides), key, "unknown key")
    keys = {f.name for f in dataclasses.fields(cls)} - given | extra
    assert line.endswith(f"(expected one of: {', '.join(sorted(keys))})")


def test_a_new_setting_is_a_field_with_a_type_and_a_default(tmp_path: Path) -> None:
    @dataclass(frozen=True, slots=True)
    class Daemon(DaemonConfig):
        nap: Duration = 5.0

    known = Known(base=tmp_path, databases=frozenset(), timezone="UTC")
    assert read(Daemon, {}, "daemon", context=known)[0] == Daemon()
    assert read(Daemon, {"nap": "1m", "max_concurrency": 2}, context=known)[0] == Daemon(
        max_concurrency=2, nap=60.0
    )
    assert read(Daemon, {"nap": 5}, "daemon", context=known)[1] == [
        (
            "daemon.nap",
            'expected a duration such as "500ms", "30s", "15m", "2h", "90d" or "1h30m", '
            "got an integer",
        )
    ]


def test_empty_file_is_valid(tmp_path: Path) -> None:
    config = load_ok(tmp_path, "")
    assert config.databases == {}
    assert config.sweeps == {}
    assert config.path == tmp_path / "sweeperd.toml"


DESIGN_EXAMPLE = """
[daemon]
timezone = "UTC"
max_concurrency = 16
plugin_dirs = ["/etc/sweeperd/plugins.d"]
drain_timeout = "30s"

[log]
format = "auto"
level = "info"

[history]
enabled = true
keep = "30d"

[databases.main]
dsn = "postgresql:///app"
max_connections = 8
lock_timeout = "5s"
statement_timeout = "30min"

[[tenants]]
name = "acme"
database = "main"
schema = "tenant_acme"

[[tenant_sources]]
database = "main"
schemas = "tenant_%"

[sweeps.nightly]
cron = "0 3 * * *"
operations = ["retention.*", "vacuum.*"]
tenants = ["*"]
per_tenant_concurrency = 4
timeout = "2h"
overlap = "skip"
jitter = "60s"

[plugins.vacuum]
tables = ["notifications", "report_executions", "analytics_cache"]
analyze = true
skip_locked = true

[[plugins.retention.rules]]
name = "notifications"
table = "notifications"
column = "created_at"
older_than = "90d"
batch_size = 5000
"""


def test_design_example_is_valid(tmp_path: Path) -> None:
    config = load_ok(tmp_path, DESIGN_EXAMPLE)
    assert config.databases["main"].statement_timeout == 1800.0
    assert config.daemon.plugin_dirs == (Path("/etc/sweeperd/plugins.d"),)
    assert config.tenants[0].schema == "tenant_acme"
    assert config.tenant_sources[0].schemas == "tenant_%"
    assert config.tenant_sources[0].prefix == "tenant_"
    sweep = config.sweeps["nightly"]
    assert sweep.operations == ("retention.*", "vacuum.*")
    assert sweep.timeout == 7200.0
    assert sweep.jitter == 60.0
    assert config.plugin_settings("vacuum")["analyze"] is True
    assert config.plugin_settings("retention")["rules"][0]["batch_size"] == 5000


def test_values_are_converted(tmp_path: Path) -> None:
    config = load_ok(
        tmp_path,
        make_config(
            daemon='timezone = "Europe/Berlin"\nmax_concurrency = 3\ndrain_timeout = "1m30s"',
            log='format = "json"\nlevel = "DEBUG"',
            history='enabled = false\nkeep = "7d"',
            database=DSN + '\nmax_connections = 2\nlock_timeout = "0s"\nstatement_timeout = "0s"'
            '\nconnect_timeout = "500ms"',
            sweep='interval = "15m"\nper_tenant_concurrency = 1\noperation_timeout = "10m"'
            '\noverlap = "replace"\njitter = "0s"\ntenants = ["a*", "b?"]',
        ),
    )
    assert config.daemon.timezone == "Europe/Berlin"
    assert config.daemon.max_concurrency == 3
    assert config.daemon.drain_timeout == 90.0
    assert (config.log.format, config.log.level) == ("json", "debug")
    assert (config.history.enabled, config.history.keep) == (False, 7 * 86400.0)
    db = config.databases["main"]
    assert (db.max_connections, db.lock_timeout, db.statement_timeout, db.connect_timeout) == (
        2,
        0.0,
        0.0,
        0.5,
    )
    sweep = config.sweeps["nightly"]
    assert (sweep.cron, sweep.interval) == (None, 900.0)
    assert sweep.per_tenant_concurrency == 1
    assert sweep.operation_timeout == 600.0
    assert sweep.overlap == "replace"
    assert sweep.tenants == ("a*", "b?")


def test_config_objects_are_immutable(tmp_path: Path) -> None:
    config = load_ok(tmp_path, make_config())
    with pytest.raises(AttributeError):
        config.daemon.max_concurrency = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.databases["other"] = config.databases["main"]  # type: ignore[index]


# -- every problem at once, in the documented shape ------------------------------------------------


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = make_config(
        top="colour = 1",  # unknown top-level key
        daemon="max_concurrency = 0",  # zero not allowed
        log='level = "loud"',  # not a level
        database=DSN + '\nlock_timeout = "5"',  # bare number
        sweep='cron = "0 25 * * *"',  # hour 25
    )
    path, problems = problems_for(tmp_path, text)
    assert len(problems) == 5, problems
    for line in problems:
        assert line.startswith(f"{path}: "), line
        assert re.match(rf"{re.escape(str(path))}: {KEY_PATH}: \S", line), line
        assert "expected" in line, line
        assert "\n" not in line
    keys = [line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in problems]
    assert sorted(keys) == sorted(
        [
            "colour",
            "daemon.max_concurrency",
            "log.level",
            "databases.main.lock_timeout",
            "sweeps.nightly.cron",
        ]
    )


def test_problems_across_many_sections(tmp_path: Path) -> None:
    text = """
        [daemon]
        timezone = "Nowhere/Special"

        [databases.main]
        max_connections = true

        [[tenants]]
        name = "acme"
        database = "other"
        schema = "tenant_acme"

        [[tenants]]
        name = "acme"
        database = "other"
        schema = "tenant_acme2"

        [sweeps.nightly]
        operations = []
    """
    path, problems = problems_for(tmp_path, text)
    keys = {line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in problems}
    assert keys == {
        "daemon.timezone",
        "databases.main.dsn",
        "databases.main.max_connections",
        "tenants[0].database",
        "tenants[1].database",
        "tenants[1].name",
        "sweeps.nightly.cron",
        "sweeps.nightly.operations",
    }, problems
    assert len(problems) == 8, problems


def test_tenant_names_are_unique_per_database_not_globally(tmp_path: Path) -> None:
    two_dbs = make_config(
        database=DSN,
        tenant=TENANT,
        tail='[databases.other]\ndsn = "host=/nonexistent dbname=other"\n'
        '[[tenants]]\nname = "acme"\ndatabase = "other"\nschema = "tenant_acme"\n',
    )
    config = load_ok(tmp_path, two_dbs)
    assert sorted((t.database, t.name) for t in config.tenants) == [
        ("main", "acme"),
        ("other", "acme"),
    ]
    twice = make_config(
        tail='[[tenants]]\nname = "acme"\ndatabase = "main"\nschema = "tenant_acme2"\n'
    )
    single_problem(tmp_path, twice, "tenants[1].name", "unique in database 'main'", "tenants[0]")


# -- unknown keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"top": "opertions = 1"}, "opertions"),
        ({"daemon": "max_concurency = 4"}, "daemon.max_concurency"),
        ({"log": 'formt = "json"'}, "log.formt"),
        ({"history": 'kept = "3d"'}, "history.kept"),
        ({"database": DSN + "\nmax_conections = 4"}, "databases.main.max_conections"),
        ({"tenant": TENANT + '\nschem = "x"'}, "tenants[0].schem"),
        ({"source": 'database = "main"\nschemas = "t_%"\nprefx = "t_"'}, "tenant_sources[0].prefx"),
        ({"sweep": CRON + '\nopertions = ["vacuum.*"]'}, "sweeps.nightly.opertions"),
    ],
)
def test_unknown_keys(tmp_path: Path, overrides: dict[str, str], key: str) -> None:
    single_problem(tmp_path, make_config(**overrides), key, "unknown key", "expected one of")


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    line = single_problem(
        tmp_path, make_config(sweep=CRON + "\nopertions = []"), "sweeps.nightly.opertions"
    )
    assert "operations" in line
    assert "per_tenant_concurrency" in line


def test_plugins_section_keys_are_left_to_plugins(tmp_path: Path) -> None:
    config = load_ok(tmp_path, make_config(tail='[plugins.anything]\nwhatever = [1, "x"]'))
    assert config.plugin_settings("anything")["whatever"] == [1, "x"]


# -- wrong types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "got"),
    [
        # TOML booleans are not integers
        ({"daemon": "max_concurrency = true"}, "daemon.max_concurrency", "got a boolean"),
        (
            {"database": DSN + "\nmax_connections = false"},
            "databases.main.max_connections",
            "got a boolean",
        ),
        (
            {"sweep": CRON + "\nper_tenant_concurrency = true"},
            "sweeps.nightly.per_tenant_concurrency",
            "got a boolean",
        ),
        ({"daemon": 'max_concurrency = "16"'}, "daemon.max_concurrency", "got a string"),
        ({"daemon": "max_concurrency = 1.5"}, "daemon.max_concurrency", "got a number"),
        ({"daemon": "timezone = 1"}, "daemon.timezone", "got an integer"),
        ({"daemon": 'plugin_dirs = "plugins.d"'}, "daemon.plugin_dirs", "got a string"),
        ({"daemon": "plugin_dirs = [1]"}, "daemon.plugin_dirs[0]", "directory path"),
        ({"daemon": "drain_timeout = 30"}, "daemon.drain_timeout", "got an integer"),
        ({"log": "level = 10"}, "log.level", "got an integer"),
        ({"log": "format = true"}, "log.format", "got a boolean"),
        ({"history": "enabled = 1"}, "history.enabled", "got an integer"),
        ({"history": 'enabled = "yes"'}, "history.enabled", "got a string"),
        ({"history": "keep = 30"}, "history.keep", "got an integer"),
        ({"database": "dsn = 5"}, "databases.main.dsn", "got an integer"),
        ({"database": "dsn_file = true"}, "databases.main.dsn_file", "got a boolean"),
        ({"database": DSN + "\nlock_timeout = 5.0"}, "databases.main.lock_timeout", "got a number"),
        ({"sweep": CRON + '\noperations = "vacuum.*"'}, "sweeps.nightly.operations", "list"),
        ({"sweep": CRON + "\noperations = [1]"}, "sweeps.nightly.operations", "list"),
        ({"sweep": CRON + '\ntenants = [""]'}, "sweeps.nightly.tenants", "list"),
        ({"sweep": CRON + "\noverlap = 1"}, "sweeps.nightly.overlap", "got an integer"),
        ({"sweep": "interval = 900"}, "sweeps.nightly.interval", "got an integer"),
        (
            {"source": 'database = "main"\nschemas = "t_%"\nprefix = 1'},
            "tenant_sources[0].prefix",
            "got an integer",
        ),
    ],
)
def test_wrong_types(tmp_path: Path, overrides: dict[str, str], key: str, got: str) -> None:
    line = single_problem(tmp_path, make_config(**overrides), key, got)
    assert "expected" in line


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("daemon = 5\n", "daemon"),
        ('log = "json"\n', "log"),
        ("history = true\n", "history"),
        ("databases = 1\n", "databases"),
        ("databases = { main = 1 }\n", "databases.main"),
        ('tenants = "acme"\n', "tenants"),
        ("tenants = [1]\n", "tenants[0]"),
        ("tenant_sources = { database = 'main' }\n", "tenant_sources"),
        ('tenant_sources = ["x"]\n', "tenant_sources[0]"),
        ("sweeps = []\n", "sweeps"),
        ('sweeps = { nightly = "0 3 * * *" }\n', "sweeps.nightly"),
        ("plugins = 1\n", "plugins"),
        ("plugins = { vacuum = true }\n", "plugins.vacuum"),  # names the plugin
    ],
)
def test_wrong_section_types(tmp_path: Path, text: str, key: str) -> None:
    single_problem(tmp_path, text, key, "expected")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"tenant": 'name = 5\ndatabase = "main"\nschema = "tenant_acme"'}, "tenants[0].name"),
        (
            {"tenant": 'name = "acme"\ndatabase = true\nschema = "tenant_acme"'},
            "tenants[0].database",
        ),
        ({"tenant": 'name = "acme"\ndatabase = "main"\nschema = []'}, "tenants[0].schema"),
        ({"source": 'database = "main"\nschemas = 1\nprefix = "t_"'}, "tenant_sources[0].schemas"),
        ({"sweep": "cron = 5"}, "sweeps.nightly.cron"),
    ],
)
def test_wrong_type_of_required_key_is_one_problem(
    tmp_path: Path, overrides: dict[str, str], key: str
) -> None:
    single_problem(tmp_path, make_config(**overrides), key, "expected", "got")


# -- missing required keys -------------------------------------------------------------------------


def test_database_requires_dsn(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(database="max_connections = 2"),
        "databases.main.dsn",
        "required",
        "dsn_file",
    )


@pytest.mark.parametrize("missing", ["name", "database", "schema"])
def test_tenant_requires_name_database_schema(tmp_path: Path, missing: str) -> None:
    body = "\n".join(line for line in TENANT.splitlines() if not line.startswith(missing))
    path, problems = problems_for(tmp_path, make_config(tenant=body))
    assert len(problems) == 1, problems
    assert_problem(problems[0], path, f"tenants[0].{missing}", "required")


def test_tenant_with_problems_is_not_kept(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_ok(tmp_path, make_config(tenant='name = "acme"\ndatabase = "main"'))


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ('schemas = "t_%"', "tenant_sources[0].database"),
        ('database = "main"', "tenant_sources[0].schemas"),
    ],
)
def test_tenant_source_requires_database_and_schemas(tmp_path: Path, source: str, key: str) -> None:
    path, problems = problems_for(tmp_path, make_config(source=source))
    assert_problem(problems[0], path, key, "required")
    assert len(problems_at(problems, path, key)) == 1


def test_tenant_source_missing_schemas_is_one_problem(tmp_path: Path) -> None:
    single_problem(
        tmp_path, make_config(source='database = "main"'), "tenant_sources[0].schemas", "required"
    )


def test_sweep_requires_cron_or_interval(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(sweep='operations = ["*"]'),
        "sweeps.nightly.cron",
        "required",
        "interval",
    )


def test_sweep_with_cron_and_interval(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(sweep=CRON + '\ninterval = "15m"'),
        "sweeps.nightly",
        "cron or interval, not both",
    )


# -- cron, via APScheduler -------------------------------------------------------------------------


CRON_EXPRESSIONS = [
    "0 3 * * *",
    "*/15 * * * *",
    "0 3 * * mon-fri",
    "30 2 1 * *",
    "0 0 1 jan *",
    "0 3 * * 0",
    "0 3 * * 7",
    "61 * * * *",
    "0 25 * * *",
    "0 3 32 * *",
    "0 3 * 13 *",
    "* * * *",
    "* * * * * *",
    "0 3 * * funday",
    "every day",
    "@daily",
    "",
]


def apscheduler_accepts(expr: str) -> bool:
    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("expr", CRON_EXPRESSIONS)
def test_cron_validated_like_apscheduler(tmp_path: Path, expr: str) -> None:
    text = make_config(sweep=f"cron = {toml_str(expr)}")
    if apscheduler_accepts(expr):
        assert load_ok(tmp_path, text).sweeps["nightly"].cron == expr
    else:
        single_problem(tmp_path, text, "sweeps.nightly.cron", "crontab", repr(expr))


def test_cron_examples_cover_both_outcomes() -> None:
    outcomes = {apscheduler_accepts(e) for e in CRON_EXPRESSIONS}
    assert outcomes == {True, False}
    assert not apscheduler_accepts("61 * * * *")
    assert apscheduler_accepts("0 3 * * *")


def test_cron_with_a_configured_timezone(tmp_path: Path) -> None:
    config = load_ok(tmp_path, make_config(daemon='timezone = "America/New_York"'))
    assert config.sweeps["nightly"].cron == "0 3 * * *"


# -- timezone --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "UTC+5", "../../etc/passwd", "/etc/localtime"])
def test_invalid_timezone(tmp_path: Path, tz: str) -> None:
    single_problem(
        tmp_path,
        make_config(daemon=f"timezone = {toml_str(tz)}"),
        "daemon.timezone",
        "IANA time zone",
        repr(tz),
    )


def test_empty_timezone(tmp_path: Path) -> None:
    path, problems = problems_for(tmp_path, make_config(daemon='timezone = ""'))
    assert problems_at(problems, path, "daemon.timezone")


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Asia/Kolkata"])
def test_valid_timezone(tmp_path: Path, tz: str) -> None:
    assert load_ok(tmp_path, make_config(daemon=f'timezone = "{tz}"')).daemon.timezone == tz


# -- durations and zero ----------------------------------------------------------------------------


DURATION_KEYS = [
    ("daemon", "drain_timeout", "daemon.drain_timeout"),
    ("history", "keep", "history.keep"),
    ("database", "lock_timeout", "databases.main.lock_timeout"),
    ("database", "statement_timeout", "databases.main.statement_timeout"),
    ("database", "connect_timeout", "databases.main.connect_timeout"),
    ("sweep", "timeout", "sweeps.nightly.timeout"),
    ("sweep", "operation_timeout", "sweeps.nightly.operation_timeout"),
    ("sweep", "jitter", "sweeps.nightly.jitter"),
]
BASE_BODY = {"database": DSN, "sweep": CRON, "daemon": "", "history": ""}


def with_key(section: str, line: str) -> dict[str, str]:
    body = BASE_BODY[section]
    return {section: f"{body}\n{line}" if body else line}


@pytest.mark.parametrize("bad", ["30", "5 minutes", "-5s", "1x", ""])
@pytest.mark.parametrize(("section", "key", "key_path"), DURATION_KEYS)
def test_invalid_durations(tmp_path: Path, section: str, key: str, key_path: str, bad: str) -> None:
    text = make_config(**with_key(section, f"{key} = {toml_str(bad)}"))
    single_problem(tmp_path, text, key_path, "expected a duration", repr(bad))


def test_invalid_interval(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(sweep='interval = "15"'),
        "sweeps.nightly.interval",
        "expected a duration",
        "'15'",
    )


@pytest.mark.parametrize(
    ("section", "line", "key_path"),
    [
        ("history", 'keep = "0s"', "history.keep"),
        ("database", 'connect_timeout = "0ms"', "databases.main.connect_timeout"),
        ("sweep", 'timeout = "0s"', "sweeps.nightly.timeout"),
        ("sweep", 'operation_timeout = "0m"', "sweeps.nightly.operation_timeout"),
    ],
)
def test_zero_duration_not_allowed(tmp_path: Path, section: str, line: str, key_path: str) -> None:
    single_problem(tmp_path, make_config(**with_key(section, line)), key_path, "greater than zero")


def test_zero_interval_not_allowed(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(sweep='interval = "0s"'),
        "sweeps.nightly.interval",
        "greater than zero",
    )


def test_zero_durations_where_allowed(tmp_path: Path) -> None:
    config = load_ok(
        tmp_path,
        make_config(
            daemon='drain_timeout = "0s"',
            database=DSN + '\nlock_timeout = "0s"\nstatement_timeout = "0ms"',
            sweep=CRON + '\njitter = "0s"',
        ),
    )
    assert config.daemon.drain_timeout == 0.0
    assert config.databases["main"].lock_timeout == 0.0
    assert config.databases["main"].statement_timeout == 0.0
    assert config.sweeps["nightly"].jitter == 0.0


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize(
    ("section", "key", "key_path"),
    [
        ("daemon", "max_concurrency", "daemon.max_concurrency"),
        ("database", "max_connections", "databases.main.max_connections"),
        ("sweep", "per_tenant_concurrency", "sweeps.nightly.per_tenant_concurrency"),
    ],
)
def test_counts_must_be_positive(
    tmp_path: Path, section: str, key: str, key_path: str, value: int
) -> None:
    single_problem(
        tmp_path,
        make_config(**with_key(section, f"{key} = {value}")),
        key_path,
        "positive integer",
        str(value),
    )


# -- enumerations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"log": 'format = "xml"'}, "log.format", "'xml'"),
        ({"log": 'level = "loud"'}, "log.level", "'loud'"),
        ({"sweep": CRON + '\noverlap = "wait"'}, "sweeps.nightly.overlap", "'wait'"),
    ],
)
def test_invalid_choices(
    tmp_path: Path, overrides: dict[str, str], key: str, fragment: str
) -> None:
    line = single_problem(tmp_path, make_config(**overrides), key, fragment)
    assert "expected one of" in line


def test_empty_log_format_is_one_problem(tmp_path: Path) -> None:
    single_problem(tmp_path, make_config(log='format = ""'), "log.format", "expected")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"[databases.'bad name']\n{DSN}\n", 'databases."bad name"'),  # quoted, as TOML writes it
        (f"[sweeps.'night ly']\n{CRON}\n", 'sweeps."night ly"'),
    ],
)
def test_invalid_section_names(tmp_path: Path, text: str, key: str) -> None:
    single_problem(tmp_path, text, key, "letters, digits")


# -- tenants and tenant sources --------------------------------------------------------------------


def test_tenant_unknown_database(tmp_path: Path) -> None:
    line = single_problem(
        tmp_path,
        make_config(tenant='name = "acme"\ndatabase = "mian"\nschema = "tenant_acme"'),
        "tenants[0].database",
        "'mian'",
    )
    assert "main" in line.split("'mian'")[0]  # lists the known databases


def test_tenant_source_unknown_database(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(source='database = "mian"\nschemas = "t_%"'),
        "tenant_sources[0].database",
        "'mian'",
        "[databases]",
    )


def test_tenant_unknown_database_when_none_defined(tmp_path: Path) -> None:
    single_problem(tmp_path, f"[[tenants]]\n{TENANT}\n", "tenants[0].database", "none defined")


def test_duplicate_tenant_names(tmp_path: Path) -> None:
    text = make_config(tail="") + (
        '[[tenants]]\nname = "globex"\ndatabase = "main"\nschema = "tenant_globex"\n'
        '[[tenants]]\nname = "acme"\ndatabase = "main"\nschema = "tenant_acme_2"\n'
    )
    single_problem(tmp_path, text, "tenants[2].name", "unique", "'acme'", "tenants[0]")


def tenant_with_schema(schema: str) -> str:
    return f'name = "acme"\ndatabase = "main"\nschema = {toml_str(schema)}'


@pytest.mark.parametrize(
    "schema",
    ["a" * 63, "é" * 31 + "a", "x", 'Tenant-With Odd"Chars'],
    ids=["63-ascii", "63-bytes-utf8", "short", "odd-chars"],
)
def test_schema_name_within_63_bytes(tmp_path: Path, schema: str) -> None:
    assert len(schema.encode()) <= 63
    config = load_ok(tmp_path, make_config(tenant=tenant_with_schema(schema)))
    assert config.tenants[0].schema == schema


@pytest.mark.parametrize(
    "schema", ["a" * 64, "é" * 32, "ü" * 40, "€" * 22], ids=["64-ascii", "32x2", "40x2", "22x3"]
)
def test_schema_name_longer_than_63_bytes(tmp_path: Path, schema: str) -> None:
    assert len(schema.encode()) > 63
    single_problem(
        tmp_path, make_config(tenant=tenant_with_schema(schema)), "tenants[0].schema", "63 bytes"
    )


def test_tenant_source_prefix_defaults_to_the_literal_part_of_the_pattern(tmp_path: Path) -> None:
    config = load_ok(
        tmp_path,
        make_config(
            source='database = "main"\nschemas = "tenant_%"',
            tail='[[tenant_sources]]\ndatabase = "main"\nschemas = "org_%_x"\nprefix = "org"',
        ),
    )
    assert [(s.schemas, s.prefix) for s in config.tenant_sources] == [
        ("tenant_%", "tenant_"),
        ("org_%_x", "org"),
    ]


def test_tenant_source_pattern_without_prefix(tmp_path: Path) -> None:
    config = load_ok(tmp_path, make_config(source='database = "main"\nschemas = "%"'))
    assert config.tenant_sources[0].prefix == ""


def test_tenant_source_explicit_empty_prefix(tmp_path: Path) -> None:
    config = load_ok(
        tmp_path, make_config(source='database = "main"\nschemas = "tenant_%"\nprefix = ""')
    )
    assert config.tenant_sources[0].prefix == ""


# -- DSNs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "postgresql:///app",
        "postgres://user@db.example:5433/app?sslmode=require",
        "host=/nonexistent dbname=app",
        "service=sweeperd",
        "host=a,b port=5432,5433",
    ],
)
def test_valid_dsns(tmp_path: Path, dsn: str) -> None:
    config = load_ok(tmp_path, make_config(database=f"dsn = {toml_str(dsn)}"))
    assert config.databases["main"].dsn == dsn


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db bogus",
        "host='unterminated",
        "postgresql://db/app?nonsense=1",
        "postgresql://db/app?sslmode",
        f"postgresql://u:{PASSWORD}@[::1/app",
        f"password={PASSWORD} host='x",
    ],
)
def test_invalid_dsn_syntax(tmp_path: Path, dsn: str) -> None:
    line = single_problem(
        tmp_path,
        make_config(database=f"dsn = {toml_str(dsn)}"),
        "databases.main.dsn",
        "libpq URI or conninfo",
    )
    assert PASSWORD not in line


def test_dsn_and_dsn_file_both(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("host=/nonexistent\n")
    single_problem(
        tmp_path,
        make_config(database=DSN + '\ndsn_file = "dsn"'),
        "databases.main",
        "one of dsn, dsn_file or dsn_credential",
        "'dsn_file'",
    )


def test_dsn_file_is_read_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "secrets").mkdir(parents=True)
    secret = f"host=/nonexistent dbname=app password={PASSWORD}"
    (etc / "secrets" / "dsn").write_text(f"\n  {secret}  \n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(write_config(etc, make_config(database='dsn_file = "secrets/dsn"')))
    assert config.databases["main"].dsn == secret


def test_dsn_file_absolute(tmp_path: Path) -> None:
    dsn_file = tmp_path / "creds" / "dsn"
    dsn_file.parent.mkdir()
    dsn_file.write_text("postgresql:///app\n")
    config = load_ok(tmp_path, make_config(database=f"dsn_file = {toml_str(str(dsn_file))}"))
    assert config.databases["main"].dsn == "postgresql:///app"


def test_dsn_file_missing(tmp_path: Path) -> None:
    line = single_problem(
        tmp_path,
        make_config(database='dsn_file = "no/such/file"'),
        "databases.main.dsn_file",
        "readable file",
    )
    assert str(tmp_path / "no" / "such" / "file") in line  # the resolved path


def test_dsn_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    single_problem(
        tmp_path,
        make_config(database='dsn_file = "adir"'),
        "databases.main.dsn_file",
        "readable file",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_dsn_file_unreadable(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("host=/nonexistent\n")
    secret.chmod(0)
    try:
        single_problem(
            tmp_path,
            make_config(database='dsn_file = "dsn"'),
            "databases.main.dsn_file",
            "readable file",
        )
    finally:
        secret.chmod(0o600)


# -- dsn_credential: $CREDENTIALS_DIRECTORY/<name>, the same for the unit and `--unit` ---------


def test_dsn_credential_reads_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "run-u7.service"
    creds.mkdir()
    secret = f"host=/nonexistent dbname=app password={PASSWORD}"
    (creds / "main-dsn").write_text(secret + "\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_ok(tmp_path, make_config(database='dsn_credential = "main-dsn"'))
    assert config.databases["main"].dsn == secret


def test_dsn_credential_outside_a_unit_says_how_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    single_problem(
        tmp_path,
        make_config(database='dsn_credential = "main-dsn"'),
        "databases.main.dsn_credential",
        "$CREDENTIALS_DIRECTORY",
        "LoadCredential=main-dsn:",
        "sweeperd --unit",
    )


def test_dsn_credential_missing_from_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    single_problem(
        tmp_path,
        make_config(database='dsn_credential = "other"'),
        "databases.main.dsn_credential",
        "readable file",
        str(tmp_path / "other"),
    )


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc/passwd"])
def test_dsn_credential_must_be_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    single_problem(
        tmp_path,
        make_config(database=f"dsn_credential = {toml_str(name)}"),
        "databases.main.dsn_credential",
        "credential name",
    )


def test_dsn_credential_and_dsn_both(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(database=DSN + '\ndsn_credential = "x"'),
        "databases.main",
        "one of dsn, dsn_file or dsn_credential",
    )


# -- ~user in paths ---------------------------------------------------------------------------


def test_paths_with_a_tilde_that_cannot_expand_are_problems(tmp_path: Path) -> None:
    text = make_config(
        daemon='plugin_dirs = ["~no_such_user_sweeperd/x", "ok"]',
        database='dsn_file = "~no_such_user_sweeperd/dsn"',
    )
    path, problems = problems_for(tmp_path, text)
    assert len(problems) == 2, problems
    assert_problem(
        problems_at(problems, path, "daemon.plugin_dirs[0]")[0],
        path,
        "daemon.plugin_dirs[0]",
        "~ can be expanded",
        "~no_such_user_sweeperd/x",
    )
    assert_problem(
        problems_at(problems, path, "databases.main.dsn_file")[0],
        path,
        "databases.main.dsn_file",
        "~ can be expanded",
    )


def test_dsn_file_with_invalid_dsn(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(f"host=db password={PASSWORD} bogus\n")
    line = single_problem(
        tmp_path,
        make_config(database='dsn_file = "dsn"'),
        "databases.main.dsn_file",
        "libpq URI or conninfo",
    )
    assert PASSWORD not in line


def test_database_repr_hides_the_dsn(tmp_path: Path) -> None:
    dsn = f"postgresql://sweeper:{PASSWORD}@db.example/app"
    config = load_ok(tmp_path, make_config(database=f"dsn = {toml_str(dsn)}"))
    db = config.databases["main"]
    assert db.dsn == dsn
    for text in (repr(db), str(db), repr(config), repr(config.databases)):
        assert PASSWORD not in text
        assert "db.example" not in text
    assert "main" in repr(db)
    direct = DatabaseConfig(name="x", dsn=f"password={PASSWORD}")
    assert PASSWORD not in repr(direct)


# -- plugin_dirs -----------------------------------------------------------------------------------


def test_plugin_dirs_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    etc = tmp_path / "etc"
    etc.mkdir()
    text = make_config(daemon='plugin_dirs = ["plugins.d", "../shared", "/opt/sweeperd", "~/p"]')
    config = load_config(write_config(etc, text))
    dirs = config.daemon.plugin_dirs
    assert dirs[0] == etc / "plugins.d"
    assert dirs[1].resolve() == (tmp_path / "shared").resolve()
    assert dirs[2] == Path("/opt/sweeperd")
    assert dirs[3] == home / "p"
    assert all(d.is_absolute() for d in dirs)


def test_plugin_dirs_relative_to_a_relative_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write_config(tmp_path / "etc", make_config(daemon='plugin_dirs = ["plugins.d"]'))
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/sweeperd.toml"))
    assert config.daemon.plugin_dirs[0] == Path("etc/plugins.d")


def test_plugin_dirs_empty_entry(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(daemon='plugin_dirs = ["ok", ""]'),
        "daemon.plugin_dirs[1]",
        "directory path",
    )


# -- the file itself -------------------------------------------------------------------------------


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "sweeperd.toml"
    path.write_text("[daemon\nmax_concurrency = 4\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: invalid TOML")


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nmax_concurrency = 4\nmax_concurrency = 5\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: invalid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: cannot read")
    assert "No such file" in line


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path}: cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, make_config())
    path.chmod(0)
    try:
        (line,) = problems_of(path)
        assert line.startswith(f"{path}: cannot read")
    finally:
        path.chmod(0o600)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "sweeperd.toml"
    path.write_bytes('[daemon]\ntimezone = "Europe/Zürich"\n'.encode("latin-1"))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: ")
    assert "UTF-8" in line


def test_parse_config_reports_like_load_config() -> None:
    path = Path("/etc/sweeperd/other.toml")
    with pytest.raises(ConfigError) as info:
        parse_config({"daemon": {"max_concurrency": 0}}, path)
    (line,) = info.value.problems
    assert_problem(line, path, "daemon.max_concurrency", "positive integer")


# -- which file ------------------------------------------------------------------------------------


def test_resolve_config_path_explicit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPERD_CONFIG", "/from/env.toml")
    assert resolve_config_path("/from/flag.toml") == Path("/from/flag.toml")


def test_resolve_config_path_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPERD_CONFIG", "/from/env.toml")
    assert resolve_config_path(None) == Path("/from/env.toml")


def test_resolve_config_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWEEPERD_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("/etc/sweeperd/sweeperd.toml")


def test_resolve_config_path_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPERD_CONFIG", "")
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH


# -- connections: pooler, connect_retry ------------------------------------------------------------


def test_pooler_and_connect_retry_default_and_parse(tmp_path: Path) -> None:
    config = load_ok(tmp_path, make_config())
    assert config.databases["main"].pooler == "none"
    assert config.databases["main"].connect_retry == 30.0
    for mode in ("none", "session", "transaction"):
        text = make_config(database=f'{DSN}\npooler = "{mode}"\nconnect_retry = "2m"')
        database = load_ok(tmp_path, text).databases["main"]
        assert (database.pooler, database.connect_retry) == (mode, 120.0)
    assert (
        load_ok(tmp_path, make_config(database=f'{DSN}\nconnect_retry = "0s"'))
        .databases["main"]
        .connect_retry
        == 0.0
    )


@pytest.mark.parametrize(
    ("line", "key", "fragment"),
    [
        ('pooler = "pgbouncer"', "databases.main.pooler", '"transaction"'),
        ("pooler = true", "databases.main.pooler", "expected"),
        ('connect_retry = "soon"', "databases.main.connect_retry", "duration"),
        ("connect_retry = 30", "databases.main.connect_retry", "duration"),
        ('poolers = "session"', "databases.main.poolers", "unknown"),
    ],
)
def test_pooler_and_connect_retry_mistakes_name_the_key(
    tmp_path: Path, line: str, key: str, fragment: str
) -> None:
    single_problem(tmp_path, make_config(database=f"{DSN}\n{line}"), key, fragment)


# -- durations beyond what the program can hold ---------------------------------------------


HUGE = ["1" + "0" * 400 + "s", "99999999999999d", "36501d"]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("daemon", "drain_timeout"),
        ("history", "keep"),
        ("databases.main", "connect_timeout"),
        ("databases.main", "connect_retry"),
        ("databases.main", "lock_timeout"),
        ("sweeps.nightly", "timeout"),
        ("sweeps.nightly", "jitter"),
        ("sweeps.nightly", "misfire_grace_time"),
        ("sweeps.nightly", "operation_timeout"),
    ],
)
def test_huge_durations_are_one_problem_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    bodies = {"daemon": "", "history": "", "databases.main": DSN, "sweeps.nightly": CRON}
    bodies[section] += f"\n{key} = {toml_str(value)}"
    text = make_config(
        daemon=bodies["daemon"],
        history=bodies["history"],
        database=bodies["databases.main"],
        sweep=bodies["sweeps.nightly"],
    )
    line = single_problem(tmp_path, text, f"{section}.{key}", "at most")
    assert "Traceback" not in line


@pytest.mark.parametrize("value", HUGE)
def test_huge_interval_is_a_problem(tmp_path: Path, value: str) -> None:
    single_problem(
        tmp_path,
        make_config(sweep=f"interval = {toml_str(value)}"),
        "sweeps.nightly.interval",
        "at most",
    )


# -- LIKE patterns -----------------------------------------------------------------------------


def test_a_like_pattern_ending_in_the_escape_character_is_refused(tmp_path: Path) -> None:
    single_problem(
        tmp_path,
        make_config(source="database = \"main\"\nschemas = 'tenant\\'"),
        "tenant_sources[0].schemas",
        "must not end with the escape character",
    )


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("tenant_%", "tenant_"),
        ("tenant\\_%", "tenant_"),
        ("t\\%x%", "t%x"),
        ("a\\\\%", "a\\"),
        ("%", ""),
        ("exact", "exact"),
    ],
)
def test_the_default_prefix_resolves_escapes(tmp_path: Path, pattern: str, prefix: str) -> None:
    source = f'database = "main"\nschemas = {toml_str(pattern)}'
    config = load_ok(tmp_path, make_config(source=source))
    assert config.tenant_sources[0].prefix == prefix


@pytest.mark.parametrize("special", ["fifo", "huge"])
def test_dsn_file_that_is_not_a_small_regular_file(tmp_path: Path, special: str) -> None:
    # A FIFO would block check-config forever; a huge file (or /dev/zero) would fill memory.
    target = tmp_path / "dsn"
    if special == "fifo":
        os.mkfifo(target)
        fragment = "not a regular file"
    else:
        target.write_bytes(b"x" * (64 * 1024 + 1))
        fragment = "at most 65536 bytes"
    single_problem(
        tmp_path, make_config(database='dsn_file = "dsn"'), "databases.main.dsn_file", fragment
    )
