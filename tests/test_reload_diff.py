"""What a reload does with the databases, in-process: kept, opened, retired (no server needed:
nothing is opened, the diff only compares settings)."""

from __future__ import annotations

from sweeperd.config import DatabaseConfig
from sweeperd.db import Database
from sweeperd.reload import DatabaseChanges, diff_databases


def settings(name: str, **changes: object) -> DatabaseConfig:
    return DatabaseConfig(name=name, dsn=f"dbname={name}", **changes)  # type: ignore[arg-type]


def databases(*configs: DatabaseConfig) -> dict[str, Database]:
    return {c.name: Database(c) for c in configs}


def test_the_same_configuration_keeps_every_database_as_it_is() -> None:
    old = databases(settings("main"), settings("other"))
    changes = diff_databases(old, {"main": settings("main"), "other": settings("other")})
    assert changes.keep == old
    assert all(changes.keep[n] is old[n] for n in old)  # the same objects, pools and all
    assert changes.open == ()
    assert changes.retire == ()


def test_a_changed_setting_reopens_that_database_and_retires_its_old_pool() -> None:
    old = databases(settings("main"), settings("other"))
    new = {"main": settings("main", max_connections=3), "other": settings("other")}
    changes = diff_databases(old, new)
    assert list(changes.keep) == ["other"] and changes.keep["other"] is old["other"]
    assert changes.open == ("main",)
    assert changes.retire == (old["main"],)


def test_a_changed_dsn_reopens_too() -> None:
    old = databases(settings("main"))
    changes = diff_databases(old, {"main": DatabaseConfig(name="main", dsn="dbname=elsewhere")})
    assert changes.keep == {}
    assert changes.open == ("main",)
    assert changes.retire == (old["main"],)


def test_an_added_database_is_opened_and_a_dropped_one_retired() -> None:
    old = databases(settings("main"), settings("gone"))
    changes = diff_databases(old, {"main": settings("main"), "added": settings("added")})
    assert list(changes.keep) == ["main"]
    assert changes.open == ("added",)
    assert changes.retire == (old["gone"],)


def test_orders_opened_as_the_new_configuration_kept_and_retired_as_before() -> None:
    old = databases(settings("c"), settings("b"), settings("a"), settings("z"))
    new = {
        "y": settings("y"),
        "a": settings("a"),
        "b": settings("b", connect_timeout=1.0),
        "c": settings("c"),
        "x": settings("x"),
    }
    changes = diff_databases(old, new)
    assert list(changes.keep) == ["c", "a"]
    assert changes.open == ("y", "b", "x")
    assert [db.name for db in changes.retire] == ["b", "z"]


def test_from_nothing_everything_is_opened() -> None:
    changes = diff_databases({}, {"main": settings("main"), "other": settings("other")})
    assert changes == DatabaseChanges(keep={}, open=("main", "other"), retire=())
