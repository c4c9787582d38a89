"""Helpers shared by the tests (import as ``from support import ...``)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PgServer:
    """The test server: the DSN the suite connects with, and what it learnt from the server.

    ``version`` is ``server_version_num`` (``150020`` for 15.20, ``180001`` for 18.1);
    ``superuser`` whether the role of ``admin_dsn`` is one (the embedded server's is; the role of
    ``SWEEPERD_TEST_DSN`` need not be, see the README).
    """

    admin_dsn: str
    version: int = 0
    superuser: bool = False
    user: str = ""

    @classmethod
    def probe(cls, admin_dsn: str) -> PgServer:
        """Connect once and record the version and the role's attributes.

        Fails (without a traceback) when the role lacks what the suite needs: CREATEDB (a fresh
        database per test) and CREATEROLE (the throw-away roles of the privilege tests).
        """
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version_num')::int, current_user,"
                "       rolsuper, rolcreatedb, rolcreaterole"
                "  FROM pg_catalog.pg_roles WHERE rolname = current_user"
            ).fetchone()
        assert row is not None
        version, user, superuser, createdb, createrole = row
        missing = [
            name
            for name, has in (("CREATEDB", createdb), ("CREATEROLE", createrole))
            if not (has or superuser)
        ]
        if missing:
            pytest.fail(
                f"the test role {user!r} lacks {' and '.join(missing)}: the suite needs a "
                "role with LOGIN CREATEDB CREATEROLE (see README, Run the tests)",
                pytrace=False,
            )
        return cls(
            admin_dsn=admin_dsn, version=int(version), superuser=bool(superuser), user=str(user)
        )

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def require_superuser(self, why: str) -> None:
        """Skip the calling test unless the suite's role is a superuser."""
        if not self.superuser:
            pytest.skip(
                f"needs a superuser ({why}); the role {self.user!r} of SWEEPERD_TEST_DSN is not one"
            )


@dataclass(frozen=True)
class Role:
    """A throw-away role made by :func:`throwaway_role`."""

    name: str
    password: str

    def dsn(self, dsn: str) -> str:
        """``dsn`` (same server and database) logging in as this role, with its password."""
        return make_conninfo(dsn, user=self.name, password=self.password)


@contextmanager
def throwaway_role(dsn: str, prefix: str = "r", *, login: bool = True) -> Iterator[Role]:
    """A new role (roles are cluster-wide: a unique name), dropped afterwards.

    Made as the suite's role, which needs no more than CREATEROLE for it:

    - the role gets a password, so it can log in wherever the server asks for one (no trust
      authentication needed: ``Role.dsn`` carries the password);
    - the suite's role is granted membership (``GRANT <role> TO CURRENT_USER``), which it needs
      to ``SET ROLE`` to it, to create objects owned by it (``CREATE SCHEMA … AUTHORIZATION``)
      and to ``DROP OWNED BY`` it. A superuser has all that anyway; CREATEROLE alone gives none
      of it on PostgreSQL 15, and only ADMIN OPTION on 16+ (``createrole_self_grant``).

    Afterwards everything the role owns in ``dsn``'s database is dropped with it (call this
    with the test's own database, so that the drop happens before that database goes).
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    password = secrets.token_hex(12)
    ident = sql.Identifier(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                ident, sql.SQL("LOGIN" if login else "NOLOGIN"), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))
    try:
        yield Role(name, password)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def with_secret_password(dsn: str, password: str) -> tuple[str, str | None]:
    """A DSN carrying a password that must never be printed, and that password (None: no check).

    - The DSN has a password of its own (``SWEEPERD_TEST_DSN`` with password authentication):
      kept, and that password is the secret when it is long enough (12+ characters) not to turn
      up in output by coincidence.
    - Otherwise ``password`` is added when the server ignores it (trust or peer authentication,
      as on the embedded server); where the server checks passwords (one from ``PGPASSWORD`` or
      a passfile, say) the DSN is kept and there is no secret.
    """
    own = conninfo_to_dict(dsn).get("password")
    if own:
        return dsn, (str(own) if len(str(own)) >= 12 else None)
    candidate = make_conninfo(dsn, password=password)
    try:
        psycopg.connect(candidate, connect_timeout=10).close()
    except psycopg.OperationalError:
        return dsn, None
    return candidate, password


PLUGINS = Path(__file__).resolve().parent / "plugins"


def install_plugin(directory: Path, source: str, as_name: str | None = None) -> Path:
    """Copy the test plugin ``tests/plugins/<source>`` into a ``plugin_dirs`` directory.

    The plugin's name (its settings table, its operations' prefix) is the file's stem:
    ``as_name`` installs it under another file name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (as_name or source)
    target.write_text((PLUGINS / source).read_text(encoding="utf-8"), encoding="utf-8")
    return target


def run_sql(dsn: str, *statements: str) -> None:
    """Run set-up statements in autocommit (test data, roles, schemas)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def write_config(directory: Path, text: str, name: str = "sweeperd.toml") -> Path:
    """Write a TOML config (dedented) and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def toml_str(value: str) -> str:
    """A TOML basic string literal (DSNs contain characters that need no escaping, but be safe)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``sweeperd`` CLI in a subprocess (``python -m sweeperd``)."""
    full_env = dict(os.environ)
    full_env.pop("SWEEPERD_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sweeperd", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


# -- version-dependent outcomes --------------------------------------------------------------------

# vacuum.database_stats runs VACUUM (ONLY_DATABASE_STATS), which PostgreSQL 16 introduced: on an
# older server the operation is skipped with this reason (plugins/vacuum.py).
DATABASE_STATS_SKIP_REASON = "VACUUM (ONLY_DATABASE_STATS) needs PostgreSQL 16 or newer"


def database_stats_status(server_version_num: int, when_supported: str = "ok") -> str:
    """The status ``vacuum.database_stats`` gets on this server (``when_supported`` on 16+)."""
    return when_supported if server_version_num >= 160000 else "skipped"


def vacuum_refusal_words(server_version_num: int) -> str:
    """What VACUUM's warning says when it skips a table for lack of privileges.

    16 says ``permission denied to vacuum "t", skipping it``; before 16 it was
    ``skipping "t" --- only table or database owner can vacuum it``.
    """
    if server_version_num >= 160000:
        return "permission denied to vacuum"
    return "only table or database owner can vacuum it"
