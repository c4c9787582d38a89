"""``[plugins.vacuum] truncate``: whether a vacuum may cut the empty end off a table.

Cutting the empty pages at the end of a table takes ACCESS EXCLUSIVE (the application stalls, the
replayed lock cancels queries on hot standbys); retention followed by a vacuum leaves exactly that
layout. So by default the table vacuums say ``TRUNCATE false``. Each test builds that layout for
real: a table of a few MB, then a retention-like DELETE of its newest rows (its last pages), with
autovacuum off for the table and no other session left open, so that nothing but the option
decides whether the table shrinks: every result also shows all the deleted tuples removed (an
old snapshot holding the xmin horizon would keep them, and then nothing could shrink anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from support import PgServer, write_config
from sweeperd.bundled.vacuum import Settings, truncate_option, vacuum_options
from test_vacuum import config_doc, connect, load, result_of, sweep

from sweeperd.config import ConfigError, load_config
from sweeperd.model import Result
from sweeperd.plugins import load_plugins

ROWS = 50_000
KEPT = ROWS // 2  # the DELETE takes the newest half: the second half of the table's pages
DELETED = ROWS - KEPT


def retention_layout(dsn: str, reloptions: str = "autovacuum_enabled = false") -> int:
    """tenant_a.events (some 8 MB) with its newest half deleted; its size before any vacuum."""
    with connect(dsn) as conn:
        conn.execute("CREATE SCHEMA tenant_a")
        conn.execute(
            f"CREATE TABLE tenant_a.events (id int PRIMARY KEY, payload text) WITH ({reloptions})"
        )
        conn.execute(
            "INSERT INTO tenant_a.events"
            f" SELECT g, repeat('x', 120) FROM generate_series(1, {ROWS}) g"
        )
        conn.execute(f"DELETE FROM tenant_a.events WHERE id > {KEPT}")
        return table_size(conn)


def table_size(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_relation_size('tenant_a.events')").fetchone()
    assert row is not None
    return int(row[0])


def size_of(dsn: str) -> int:
    with connect(dsn) as conn:
        return table_size(conn)


def vacuum_events(tmp_path: Path, dsn: str, **settings: Any) -> Result:
    """The sweep's vacuum of tenant_a.events, which must be ok and remove every deleted row."""
    config, plugins = load(
        tmp_path, config_doc(dsn, [("a", "tenant_a")], vacuum={"tables": ["events"], **settings})
    )
    result = result_of(sweep(config, plugins), "vacuum.events", "a")
    assert result.status == "ok", result.error
    assert result.rows == DELETED, result.details
    assert result.details["dead_tuples_after"] == 0
    assert "horizon" not in result.details
    return result


def test_by_default_the_empty_end_of_the_table_stays(tmp_path: Path, pg_dsn: str) -> None:
    before = retention_layout(pg_dsn)
    assert before > 4 * 1024 * 1024

    vacuum_events(tmp_path, pg_dsn)

    assert size_of(pg_dsn) == before
    # The space is not lost: a VACUUM (TRUNCATE true) in a quiet hour gives it back.
    with connect(pg_dsn) as conn:
        conn.execute("VACUUM (TRUNCATE true) tenant_a.events")
        assert table_size(conn) < before * 0.6


def test_truncate_true_gives_the_empty_end_back(tmp_path: Path, pg_dsn: str) -> None:
    before = retention_layout(pg_dsn)

    vacuum_events(tmp_path, pg_dsn, truncate=True)

    assert size_of(pg_dsn) < before * 0.6


def test_truncate_true_respects_the_tables_vacuum_truncate_reloption(
    tmp_path: Path, pg_dsn: str
) -> None:
    """truncate = true adds no TRUNCATE option, so a DBA's reloption still decides."""
    before = retention_layout(pg_dsn, "autovacuum_enabled = false, vacuum_truncate = false")

    vacuum_events(tmp_path, pg_dsn, truncate=True)

    assert size_of(pg_dsn) == before


@pytest.mark.parametrize(
    ("settings", "version", "expected"),
    [
        (Settings(), 110000, None),
        (Settings(), 120000, "TRUNCATE false"),
        (Settings(), 180000, "TRUNCATE false"),
        (Settings(truncate=True), 180000, None),
    ],
)
def test_truncate_option_by_server_version(
    pg_server: PgServer, settings: Settings, version: int, expected: str | None
) -> None:
    option = truncate_option(settings, version)
    with connect(pg_server.admin_dsn) as conn:
        assert (option.as_string(conn) if option is not None else None) == expected
        # Never among the options ONLY_DATABASE_STATS could be given.
        rendered = [o.as_string(conn) for o in vacuum_options(settings, version)]
    assert not any(o.startswith("TRUNCATE") for o in rendered)


def test_truncate_must_be_a_boolean(tmp_path: Path) -> None:
    doc = config_doc("dbname=x", [], vacuum={"tables": ["events"], "truncate": "yes"})
    path = write_config(tmp_path, tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(load_config(path), entry_points=False)
    [problem] = excinfo.value.problems
    assert problem.startswith(f"{path}: plugins.vacuum.truncate: expected true or false"), problem
