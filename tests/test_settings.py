"""sweeperd.settings: the reader the core configuration and plugins share.

Pure logic: a settings dataclass, a table as TOML gives it, and the (value, problems) read returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import pytest
from support import write_config

import sweeperd
from sweeperd import settings
from sweeperd.config import ConfigError, load_config
from sweeperd.plugins import load_plugins
from sweeperd.settings import (
    At,
    Duration,
    Identifier,
    Invalid,
    PositiveDuration,
    PositiveInt,
    array,
    choice,
    flag,
    integer,
    number,
    read,
    reader,
    rules,
    setting,
    table,
    tables,
    text,
    toml_key,
    zone,
)

DURATION = 'a duration such as "500ms", "30s", "15m", "2h", "90d" or "1h30m"'


@dataclass(frozen=True)
class Jobs:
    table: str
    older_than: Duration = 7 * 86400.0
    batch_size: PositiveInt = 1000
    mode: Literal["fast", "careful"] = "careful"
    vacuum: bool = True
    ratio: float = 0.5
    retries: int = 3
    schema: Identifier | None = None
    pause: PositiveDuration | None = None


def test_a_valid_table_becomes_the_dataclass_with_its_defaults() -> None:
    jobs, problems = read(Jobs, {"table": "jobs", "older_than": "1h30m", "mode": "fast"})
    assert problems == []
    assert jobs == Jobs(table="jobs", older_than=5400.0, mode="fast")
    assert read(Jobs, MappingProxyType({"table": "t", "ratio": 1}))[0] == Jobs("t", ratio=1.0)


def test_every_problem_at_once_with_its_key_and_nothing_built() -> None:
    raw = {
        "older_than": 7,
        "batch_size": 0,
        "mode": "slow",
        "vacuum": "yes",
        "ratio": "half",
        "retries": True,
        "schema": "s" * 64,
        "pause": "0s",
        "opertions": 1,
        "my key": 2,
    }
    jobs, problems = read(Jobs, raw, "plugins.jobs")
    assert jobs is None
    assert problems == [
        (
            "plugins.jobs.opertions",
            "unknown key (expected one of: batch_size, mode, older_than, pause, ratio, retries, "
            "schema, table, vacuum)",
        ),
        ('plugins.jobs."my key"', problems[1][1]),
        ("plugins.jobs.table", "required: a non-empty string"),
        ("plugins.jobs.older_than", f"expected {DURATION}, got an integer"),
        ("plugins.jobs.batch_size", "expected a positive integer, got 0"),
        ("plugins.jobs.mode", 'expected one of "fast", "careful", got \'slow\''),
        ("plugins.jobs.vacuum", "expected true or false, got a string"),
        ("plugins.jobs.ratio", "expected a number, got a string"),
        ("plugins.jobs.retries", "expected an integer, got a boolean"),
        (
            "plugins.jobs.schema",
            "expected a PostgreSQL name of at most 63 bytes (longer names are silently "
            "truncated by the server)",
        ),
        ("plugins.jobs.pause", "expected a duration greater than zero"),
    ]


def test_keys_are_quoted_as_toml_writes_them() -> None:
    assert [toml_key(k) for k in ("a-b_1", "", "a.b", 'say "hi"', "back\\slash", "ü")] == [
        "a-b_1",
        '""',
        '"a.b"',
        '"say \\"hi\\""',
        '"back\\\\slash"',
        '"ü"',
    ]
    _, problems = read(Jobs, {"table": "t", "a.b": 1})
    assert problems[0][0] == '"a.b"'


def test_not_a_table() -> None:
    assert read(Jobs, [1], "rules[0]") == (None, [("rules[0]", "expected a table, got an array")])
    assert read(Jobs, 5, "x", not_a_table="expected a table") == (
        None,
        [("x", "expected a table")],
    )


def test_durations_are_capped_and_numbers_finite() -> None:
    _, problems = read(Jobs, {"table": "t", "older_than": "36501d", "ratio": math.inf})
    assert problems == [
        ("older_than", "expected a duration of at most 36500d (100 years), got '36501d'"),
        ("ratio", "expected a number, got inf"),
    ]


# -- readers of one's own, Annotated, setting() ----------------------------------------------------


@reader('a size such as "256MB"')
def size(value: Any, at: At) -> int:
    if not isinstance(value, str) or not value.endswith("MB") or not value[:-2].isdigit():
        raise Invalid(f'expected a size such as "256MB", got {value!r}')
    return int(value[:-2]) * 2**20


def _names(value: Any, at: At) -> tuple[str, ...]:
    """Reports each bad entry at its index and keeps reading."""
    if not isinstance(value, list):
        raise Invalid("expected a list of names")
    for i, name in enumerate(value):
        if not isinstance(name, str):
            at.at(i).problem("expected a name")
    return tuple(n for n in value if isinstance(n, str))


@dataclass(frozen=True)
class Custom:
    limit: Annotated[int, size]
    names: tuple[str, ...] = setting(default=(), reader=settings.Reader(_names, "names"))
    secret: str = setting(default="", repr=False, reader=text(empty=True))
    runs: list[str] = field(default_factory=list, init=False)  # not a setting


def test_a_reader_of_ones_own_and_its_expectation_when_required() -> None:
    assert read(Custom, {"limit": "2MB", "names": ["a"]})[0] == Custom(2 * 2**20, ("a",))
    assert read(Custom, {}) == (None, [("limit", 'required: a size such as "256MB"')])
    assert read(Custom, {"limit": "2GB", "names": ["a", 1, "b", None], "runs": []}) == (
        None,
        [
            ("runs", "unknown key (expected one of: limit, names, secret)"),
            ("limit", "expected a size such as \"256MB\", got '2GB'"),
            ("names[1]", "expected a name"),
            ("names[3]", "expected a name"),
        ],
    )
    assert "secret" not in repr(read(Custom, {"limit": "1MB", "secret": "pw"})[0])


def test_standard_readers_in_a_settings_own_words() -> None:
    @dataclass(frozen=True)
    class Worded:
        on: Annotated[bool, flag(message="expected true or false")] = True
        size: Annotated[
            int, integer(minimum=1, maximum=10, message=lambda v: f"1..10, not {v!r}")
        ] = 1

    assert read(Worded, {"on": 1, "size": True})[1] == [
        ("on", "expected true or false"),
        ("size", "1..10, not True"),
    ]


def test_integer_and_number_bounds() -> None:
    at = At()
    assert integer(minimum=0).expectation == "a non-negative integer"
    assert integer(minimum=1, maximum=9).expectation == "a positive integer up to 9"
    assert integer(minimum=5).expectation == "an integer of at least 5"
    assert number(minimum=0, maximum=1).expectation == "a number between 0 and 1"
    with pytest.raises(Invalid, match="got 11"):
        integer(maximum=10)(11, at)
    with pytest.raises(Invalid, match="got nan"):
        number(minimum=0, maximum=1)(math.nan, at)
    assert choice("debug", "info", fold=True)("DEBUG", at) == "debug"
    assert zone()("Europe/Berlin", at) == "Europe/Berlin"
    with pytest.raises(Invalid, match=r'"Europe/Berlin", got .Nowhere/Zone.'):
        zone()("Nowhere/Zone", at)


# -- rules across fields, context, given ----------------------------------------------------------


def _column_when_careful(values: Mapping[str, Any], at: At) -> None:
    if values.get("mode") == "careful" and "column" not in at.raw:
        at.at("column").problem('required with mode = "careful"')


def _not_both(values: Mapping[str, Any], at: At) -> None:
    if "a" in at.raw and "b" in at.raw:
        raise Invalid("expected a or b, not both")


def _limit_from_context(values: Mapping[str, Any], at: At) -> None:
    if values.get("n", 0) > at.context:
        at.at("n").problem(f"expected at most {at.context}")


@rules(_column_when_careful, _not_both, _limit_from_context)
@dataclass(frozen=True)
class Ruled:
    name: str
    mode: Literal["fast", "careful"] = "careful"
    column: str | None = None
    a: int = 0
    b: int = 0
    n: PositiveInt = 1


def test_rules_run_after_the_fields_with_what_was_read_well() -> None:
    got, problems = read(Ruled, {"a": 1, "b": "x", "n": 9}, "r", context=5, given={"name": "x"})
    assert got is None
    assert problems == [
        ("r.b", "expected an integer, got a string"),
        ("r.column", 'required with mode = "careful"'),
        ("r", "expected a or b, not both"),
        ("r.n", "expected at most 5"),
    ]
    ok, problems = read(Ruled, {"mode": "fast"}, context=5, given={"name": "x"})
    assert (ok, problems) == (Ruled(name="x", mode="fast"), [])


def test_given_fields_are_no_keys() -> None:
    _, problems = read(Ruled, {"name": "y", "mode": "fast"}, context=5, given={"name": "x"})
    assert problems == [("name", "unknown key (expected one of: a, b, column, mode, n)")]


# -- nested tables, tables by name, arrays of tables ----------------------------------------------


@dataclass(frozen=True)
class Inner:
    depth: PositiveInt = 1


@dataclass(frozen=True)
class Named:
    name: str
    size: PositiveInt = 1


def _unique_sizes() -> Callable[[int, Mapping[str, Any], At], None]:
    seen: dict[int, int] = {}

    def check(i: int, item: Mapping[str, Any], at: At) -> None:
        if "size" in item and item["size"] in seen:
            at.at(i).at("size").problem(f"also {at.at(seen[item['size']]).key}")
        seen.setdefault(item.get("size", 0), i)

    return check


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    named: Mapping[str, Named] = setting(
        default_factory=dict, reader=tables(Named, key="name", name=text())
    )
    items: tuple[Named, ...] = setting(
        default=(),
        reader=array(table(Named, message="expected a table with name"), each=_unique_sizes),
    )
    plain: tuple[int, ...] = ()
    by_type: Mapping[str, Inner] = field(default_factory=dict)


def test_nested_tables_arrays_and_tables_by_name() -> None:
    raw = {
        "inner": {"depth": 2},
        "named": {"a": {"size": 2}},
        "items": [{"name": "x", "size": 3}],
        "plain": [1, 2],
        "by_type": {"k": {}},
    }
    outer, problems = read(Outer, raw)
    assert problems == []
    assert outer == Outer(
        inner=Inner(2),
        named={"a": Named("a", 2)},
        items=(Named("x", 3),),
        plain=(1, 2),
        by_type={"k": Inner()},
    )
    assert isinstance(outer.named, MappingProxyType)


def test_problems_deep_inside() -> None:
    raw = {
        "inner": [],
        "named": {"a": 1, "": {"size": 0}},
        "items": [{"name": "x", "size": 3}, 7, {"name": "y", "size": 3}],
        "plain": [1, "2"],
        "by_type": 3,
    }
    assert read(Outer, raw) == (
        None,
        [
            ("inner", "expected a table, got an array"),
            ("named.a", "expected a table, got an integer"),
            ('named.""', "expected a non-empty string, got an empty string"),
            ('named."".size', "expected a positive integer, got 0"),
            ("items[1]", "expected a table with name"),
            ("items[2].size", "also items[0]"),
            ("plain[1]", "expected an integer, got a string"),
            ("by_type", "expected tables [by_type.<name>]"),
        ],
    )
    assert read(Outer, {"items": {}, "named": []})[1] == [
        ("named", "expected tables [named.<name>]"),
        ("items", "expected an array, got a table"),
    ]


def _plain(value: Any, at: At) -> int:
    return 1


def test_a_type_without_a_reader_is_the_authors_mistake() -> None:
    @dataclass(frozen=True)
    class Odd:
        when: complex = 1j

    with pytest.raises(TypeError, match=r"Odd.when: no reader for <class 'complex'>"):
        read(Odd, {})

    @dataclass(frozen=True)
    class Unwrapped:
        n: Annotated[int, _plain] = 0

    with pytest.raises(TypeError, match=r"Unwrapped.n: make _plain a Reader with @reader"):
        read(Unwrapped, {})
    with pytest.raises(TypeError, match="is not a dataclass"):
        read(dict, {})


def test_the_public_api() -> None:
    assert sweeperd.settings is settings
    assert "settings" in sweeperd.__all__
    assert set(settings.__all__) <= set(dir(settings))


# -- a plugin's settings, end to end --------------------------------------------------------------

JOBS_PLUGIN = """
from dataclasses import dataclass
from typing import Literal

import sweeperd
from sweeperd.settings import Duration, PositiveInt, read


@dataclass(frozen=True)
class Jobs:
    table: str
    older_than: Duration = 7 * 86400.0
    batch_size: PositiveInt = 1000
    mode: Literal["fast", "careful"] = "careful"


async def purge(ctx):
    return 0


@sweeperd.hookimpl
def sweeperd_validate_settings(settings):
    return read(Jobs, settings)[1] if settings else []


@sweeperd.hookimpl
def sweeperd_operations(settings):
    jobs, _problems = read(Jobs, settings)
    if jobs is None:
        return []
    return [sweeperd.Operation(name="jobs.purge", run=purge, tables=(jobs.table,),
                               description=f"{jobs.mode}, {jobs.older_than:.0f}s")]
"""


def _jobs_config(tmp_path: Path, jobs: str) -> Path:
    (tmp_path / "plugins.d").mkdir(exist_ok=True)
    (tmp_path / "plugins.d" / "jobs.py").write_text(JOBS_PLUGIN, encoding="utf-8")
    return write_config(
        tmp_path,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        [databases.main]
        dsn = "dbname=app"
        [sweeps.nightly]
        cron = "0 3 * * *"
        {jobs}
        """,
    )


def test_a_drop_in_plugin_reads_its_settings_like_the_core(tmp_path: Path) -> None:
    path = _jobs_config(tmp_path, '[plugins.jobs]\ntable = "jobs"\nolder_than = "1h"')
    operations = load_plugins(load_config(path), entry_points=False).operations
    assert operations["jobs.purge"].description == "careful, 3600s"
    assert operations["jobs.purge"].tables == ("jobs",)

    path = _jobs_config(tmp_path, "")  # not configured: no problem, no operation
    assert "jobs.purge" not in load_plugins(load_config(path), entry_points=False).operations

    path = _jobs_config(tmp_path, '[plugins.jobs]\ntable = 5\nbatch_size = 0\nmod = "x"')
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    assert excinfo.value.problems == [
        f"{path}: plugins.jobs.mod: unknown key (expected one of: batch_size, mode, "
        "older_than, table)",
        f"{path}: plugins.jobs.table: expected a non-empty string, got an integer",
        f"{path}: plugins.jobs.batch_size: expected a positive integer, got 0",
    ]
