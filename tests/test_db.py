"""sweeperd.db against a real PostgreSQL: failing fast, session set-up, pool hygiene, errors.

Every test that connects uses a fresh database from the ``pg_dsn`` fixture; nothing here mocks the
driver or the server. The pure helpers (redaction, DSN checking) are tested without a server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlencode

import psycopg
import pytest
from psycopg import sql as psql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from support import run_sql

from sweeperd.config import DatabaseConfig
from sweeperd.db import Database, application_name
from sweeperd.dsn import check_dsn, redact, redact_dsn
from sweeperd.errors import DatabaseUnreachable, describe_error

T = TypeVar("T")

# -- helpers ---------------------------------------------------------------------------------------


def db_config(dsn: str, **kw: Any) -> DatabaseConfig:
    kw.setdefault("connect_timeout", 5.0)
    return DatabaseConfig(name="main", dsn=dsn, **kw)


@asynccontextmanager
async def opened(dsn: str, **kw: Any) -> AsyncIterator[Database]:
    db = Database(db_config(dsn, **kw))
    await db.open()
    try:
        yield db
    finally:
        await db.close()


def run(dsn: str, body: Callable[[Database], Awaitable[T]], **kw: Any) -> T:
    """Open a Database on ``dsn`` (config keywords ``kw``), run ``body(db)``, close it."""

    async def main() -> T:
        async with opened(dsn, **kw) as db:
            return await body(db)

    return asyncio.run(main())


def open_error(dsn: str, **kw: Any) -> tuple[DatabaseUnreachable, float]:
    """The DatabaseUnreachable that open() raises, and how long open() took."""
    db = Database(db_config(dsn, **kw))
    t0 = time.monotonic()
    with pytest.raises(DatabaseUnreachable) as excinfo:
        asyncio.run(db.open())
    elapsed = time.monotonic() - t0
    assert db.pool_stats() == {}  # no pool was left behind
    return excinfo.value, elapsed


async def show(conn: psycopg.AsyncConnection[Any], setting: str) -> str:
    cur = await conn.execute(psql.SQL("SHOW {}").format(psql.Identifier(setting)))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def scalar(conn: psycopg.AsyncConnection[Any], query: str, params: Any = None) -> Any:
    cur = await conn.execute(query, params)  # type: ignore[arg-type]
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def admin_scalar(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]


def pool_backends(dsn: str) -> dict[int, str]:
    """pid → application_name of this database's sweeperd connections (seen from outside)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE 'sweeperd%%'"
        ).fetchall()
    return {int(pid): str(name) for pid, name in rows}


async def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll ``check`` without blocking the event loop (the pool works in background tasks)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def assert_one_line(text: str) -> None:
    assert text
    assert "\n" not in text and "\r" not in text, repr(text)


@pytest.fixture
def role(pg_dsn: str) -> Any:
    """A throw-away role (roles are cluster-wide: dropped again after the test)."""
    name = f"r_{uuid.uuid4().hex[:10]}"
    # Membership lets a non-superuser test role (SWEEPERD_TEST_DSN) SET ROLE to it and drop
    # what it owns; for a superuser it changes nothing.
    run_sql(pg_dsn, f"CREATE ROLE {name}", f"GRANT {name} TO CURRENT_USER")
    yield name
    run_sql(pg_dsn, f"DROP OWNED BY {name}", f"DROP ROLE IF EXISTS {name}")


# -- open(): failing fast with the real reason -----------------------------------------------------


def test_open_fails_fast_for_a_socket_directory_without_a_server() -> None:
    exc, elapsed = open_error("host=/nonexistent dbname=app", connect_timeout=10.0)
    assert exc.database == "main"
    assert "/nonexistent" in exc.reason
    assert str(exc).startswith("database 'main' unreachable: ")
    assert_one_line(exc.reason)
    assert "Traceback" not in exc.reason
    assert elapsed < 5.0  # nothing to wait for: no pool timeout, no retries


def test_open_fails_fast_for_a_host_name_that_does_not_exist() -> None:
    exc, elapsed = open_error("host=nonexistent.invalid dbname=app", connect_timeout=5.0)
    assert "nonexistent.invalid" in exc.reason
    assert_one_line(exc.reason)
    assert elapsed < 5.0  # a typo, not a blip: no connect_retry (30 s) of waiting


def test_open_fails_fast_for_a_database_that_does_not_exist(pg_dsn: str) -> None:
    dsn = make_conninfo(pg_dsn, dbname="no_such_database_xyz")
    exc, elapsed = open_error(dsn, connect_timeout=10.0)
    assert "no_such_database_xyz" in exc.reason
    assert "does not exist" in exc.reason
    assert_one_line(exc.reason)
    assert elapsed < 5.0


def test_open_fails_fast_for_a_user_that_does_not_exist_and_never_shows_the_password(
    pg_dsn: str,
) -> None:
    dsn = make_conninfo(pg_dsn, user="no_such_user_xyz", password="s3cret")
    exc, elapsed = open_error(dsn, connect_timeout=10.0)
    assert "no_such_user_xyz" in exc.reason
    assert_one_line(exc.reason)
    assert "s3cret" not in exc.reason
    assert "s3cret" not in str(exc)
    assert "s3cret" not in repr(exc)
    # The driver's exception (whose text could echo the conninfo) is not chained onto ours.
    assert exc.__cause__ is None and exc.__suppress_context__
    assert elapsed < 5.0


def test_the_password_is_not_shown_for_a_uri_dsn_either(pg_dsn: str) -> None:
    params = conninfo_to_dict(pg_dsn)
    query = urlencode({k: v for k, v in params.items() if k in ("host", "port") and v})
    dsn = f"postgresql://no_such_user_xyz:s3cret@/{params['dbname']}?{query}"
    exc, _ = open_error(dsn)
    assert "no_such_user_xyz" in exc.reason
    assert "s3cret" not in str(exc)


def test_open_records_the_server_version_and_opens_the_pool(pg_dsn: str) -> None:
    async def body(db: Database) -> tuple[int, dict[str, int]]:
        return db.server_version, db.pool_stats()

    version, stats = run(pg_dsn, body)
    assert version >= 100000
    # Open, and holding nothing: connections exist while something uses the database.
    assert stats["pool_max"] == 8 and stats["pool_size"] == 0


def test_a_connection_before_open_or_after_close_is_a_clear_error(pg_dsn: str) -> None:
    async def main() -> None:
        db = Database(db_config(pg_dsn))
        with pytest.raises(DatabaseUnreachable, match="not open"):
            async with db.connection("x"):
                pass
        await db.open()
        await db.close()
        assert db.pool_stats() == {}
        with pytest.raises(DatabaseUnreachable, match="not open"):
            async with db.connection("x"):
                pass

    asyncio.run(main())


# -- application_name ------------------------------------------------------------------------------


def test_application_name_labels_the_checkout_and_idle_connections_close_after_use(
    pg_dsn: str,
) -> None:
    async def body(db: Database) -> None:
        async with db.use():
            async with db.connection("retention.notifications acme") as conn:
                label = await show(conn, "application_name")
                assert label == "sweeperd: retention.notifications acme"
                await conn.execute("SELECT pg_advisory_lock(42)")
                pid = conn.info.backend_pid
                # Seen from another session too (what pg_stat_activity users look at).
                assert pool_backends(pg_dsn)[pid] == "sweeperd: retention.notifications acme"
            async with db.connection("vacuum.jobs globex") as conn:
                assert conn.info.backend_pid == pid  # the same connection, labelled anew
                assert await show(conn, "application_name") == "sweeperd: vacuum.jobs globex"
        # The last user is done (a sweep ended): idle connections are closed, so nothing an
        # operation left on a session (here an advisory lock) outlives the sweep.
        assert await eventually(lambda: pid not in pool_backends(pg_dsn))
        with psycopg.connect(pg_dsn) as other:
            held = other.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s", (pid,)
            ).fetchone()
        assert held == (0,)
        assert db.pool_stats()["pool_size"] == 0

    run(pg_dsn, body, max_connections=1)


def test_application_name_is_ascii_and_cut_to_63_bytes(pg_dsn: str) -> None:
    long_label = "retention.notifications " + "t" * 100
    accented = "vacuum.jobs tenant_müller_北京"

    async def body(db: Database) -> tuple[str, str]:
        async with db.connection(long_label) as conn:
            long_name = await show(conn, "application_name")
        async with db.connection(accented) as conn:
            accented_name = await show(conn, "application_name")
        return long_name, accented_name

    long_name, accented_name = run(pg_dsn, body, max_connections=1)
    assert long_name == ("sweeperd: " + long_label)[:63]
    assert len(long_name.encode()) == 63
    assert accented_name == "sweeperd: vacuum.jobs tenant_m?ller_??"
    assert accented_name.isascii()
    # The helper agrees with what the server shows.
    assert application_name(long_label) == long_name
    assert application_name(accented) == accented_name
    assert application_name("x") == "sweeperd: x"


# -- session settings: timeouts, DSN options -------------------------------------------------------


def test_lock_and_statement_timeouts_are_in_effect_and_survive_reset_all(pg_dsn: str) -> None:
    async def body(db: Database) -> list[tuple[str, str]]:
        seen = []
        async with db.connection("a") as conn:
            seen.append((await show(conn, "lock_timeout"), await show(conn, "statement_timeout")))
            await conn.execute("SET lock_timeout = '9s'; SET statement_timeout = '9min'")
            await conn.execute("RESET ALL")
            seen.append((await show(conn, "lock_timeout"), await show(conn, "statement_timeout")))
            await conn.execute("SET lock_timeout = '9s'; SET statement_timeout = '9min'")
        # The same connection (max_connections=1) after the pool's reset.
        async with db.connection("b") as conn:
            seen.append((await show(conn, "lock_timeout"), await show(conn, "statement_timeout")))
        return seen

    seen = run(pg_dsn, body, max_connections=1, lock_timeout=1.5, statement_timeout=42.0)
    assert seen == [("1500ms", "42s")] * 3


def test_lock_timeout_really_stops_a_lock_wait(pg_dsn: str) -> None:
    run_sql(pg_dsn, "CREATE TABLE busy (id int)")

    async def body(db: Database) -> str:
        holder = await psycopg.AsyncConnection.connect(pg_dsn)
        async with holder:
            await holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")  # held: in a txn
            async with db.connection("waiter") as conn:
                with pytest.raises(psycopg.errors.LockNotAvailable) as excinfo:
                    await conn.execute("SELECT count(*) FROM busy")
            await holder.rollback()
        return describe_error(excinfo.value)

    message = run(pg_dsn, body, lock_timeout=0.2, statement_timeout=30.0)
    assert message.startswith("LockNotAvailable (SQLSTATE 55P03): ")
    assert "lock timeout" in message


def test_statement_timeout_really_cancels_a_long_statement(pg_dsn: str) -> None:
    async def body(db: Database) -> str:
        async with db.connection("slow") as conn:
            with pytest.raises(psycopg.errors.QueryCanceled) as excinfo:
                await conn.execute("SELECT pg_sleep(10)")
            # The connection is still usable afterwards (autocommit: no aborted transaction).
            assert await scalar(conn, "SELECT 1") == 1
        return describe_error(excinfo.value)

    message = run(pg_dsn, body, statement_timeout=0.2)
    assert message.startswith("QueryCanceled (SQLSTATE 57014): ")
    assert "statement timeout" in message


def test_options_already_in_the_dsn_are_preserved(pg_dsn: str) -> None:
    dsn = make_conninfo(pg_dsn, options="-c work_mem=7MB")

    async def body(db: Database) -> list[str]:
        out = []
        async with db.connection("a") as conn:
            out += [await show(conn, "work_mem"), await show(conn, "lock_timeout")]
            await conn.execute("SET work_mem = '1MB'")
        async with db.connection("b") as conn:  # after the pool's RESET ALL
            out += [await show(conn, "work_mem"), await show(conn, "lock_timeout")]
        return out

    out = run(dsn, body, max_connections=1, lock_timeout=2.0)
    assert out == ["7MB", "2s", "7MB", "2s"]


OPTIONS_BUG = (
    "BUG: sweeperd/db.py Database._connect_kwargs always passes options= (built only "
    "from the DSN string), which overrides libpq's PGOPTIONS and a service file's "
    "options; DESIGN.md says PG* env vars and service files apply"
)


def test_pgoptions_from_the_environment_are_preserved(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=7MB")

    async def body(db: Database) -> tuple[str, str]:
        async with db.connection("a") as conn:
            return await show(conn, "work_mem"), await show(conn, "lock_timeout")

    assert run(pg_dsn, body, lock_timeout=2.0) == ("7MB", "2s")


def test_options_from_a_service_file_are_preserved(
    pg_dsn: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = conninfo_to_dict(pg_dsn)
    lines = [f"{key}={value}" for key, value in params.items() if value]
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        "[app]\n" + "\n".join([*lines, "options=-c work_mem=9MB"]) + "\n", encoding="utf-8"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    with psycopg.connect("service=app") as conn:  # plain libpq honours it
        assert conn.execute("SHOW work_mem").fetchone() == ("9MB",)

    async def body(db: Database) -> tuple[str, str]:
        async with db.connection("a") as conn:
            return await show(conn, "work_mem"), await show(conn, "lock_timeout")

    assert run("service=app", body, lock_timeout=2.0) == ("9MB", "2s")


def test_connections_are_autocommit(pg_dsn: str) -> None:
    run_sql(pg_dsn, "CREATE TABLE t (id int)")

    async def body(db: Database) -> None:
        async with db.connection("a") as conn:
            assert conn.autocommit
            await conn.execute("INSERT INTO t VALUES (1)")
            # Committed at once: visible from another session while we still hold the connection.
            assert admin_scalar(pg_dsn, "SELECT count(*) FROM t") == 1

    run(pg_dsn, body)


# -- nothing leaks from one checkout to the next ---------------------------------------------------


def test_session_state_does_not_leak_to_the_next_checkout(pg_dsn: str) -> None:
    default_search_path = admin_scalar(pg_dsn, "SELECT current_setting('search_path')")

    async def body(db: Database) -> None:
        async with db.connection("first") as conn:
            pid = conn.info.backend_pid
            await conn.execute("SET search_path TO pg_catalog")
            await conn.execute("SELECT pg_advisory_lock(4242)")
            await conn.execute("SELECT set_config('work_mem', '3MB', false)")
            await conn.execute("CREATE TEMP TABLE scratch (id int)")
            await conn.execute("LISTEN sweeperd_test")
            await conn.execute("DECLARE held CURSOR WITH HOLD FOR SELECT 1")
        async with db.connection("second") as conn:
            # Another session can take the lock: it was released when the connection returned.
            assert admin_scalar(pg_dsn, "SELECT pg_try_advisory_lock(4242)") is True
            assert conn.info.backend_pid == pid  # the same server session
            assert await show(conn, "search_path") == default_search_path
            assert await show(conn, "work_mem") != "3MB"
            held = await scalar(
                conn,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                (pid,),
            )
            assert held == 0
            assert await scalar(conn, "SELECT to_regclass('pg_temp.scratch')") is None
            assert await scalar(conn, "SELECT count(*) FROM pg_listening_channels()") == 0
            assert await scalar(conn, "SELECT count(*) FROM pg_cursors") == 0
            # And the connection works normally (psycopg's own state is intact).
            assert await scalar(conn, "SELECT %s::int + 1", (41,)) == 42

    run(pg_dsn, body, max_connections=1)


def test_an_open_transaction_does_not_leak_to_the_next_checkout(pg_dsn: str) -> None:
    run_sql(pg_dsn, "CREATE TABLE t (id int)")

    async def body(db: Database) -> None:
        async with db.connection("first") as conn:
            pid = conn.info.backend_pid
            await conn.set_autocommit(False)
            await conn.execute("INSERT INTO t VALUES (1)")  # left uncommitted
        async with db.connection("second") as conn:
            assert conn.info.backend_pid == pid
            assert conn.autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert await scalar(conn, "SELECT count(*) FROM t") == 0

    run(pg_dsn, body, max_connections=1)


@pytest.mark.parametrize("statement", ["SET ROLE {}", "SET SESSION AUTHORIZATION {}"])
def test_a_role_change_does_not_leak_to_the_next_checkout(
    pg_dsn: str, role: str, statement: str
) -> None:
    login_user = admin_scalar(pg_dsn, "SELECT current_user")
    if "AUTHORIZATION" in statement and not admin_scalar(
        pg_dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ):
        pytest.skip("SET SESSION AUTHORIZATION needs a superuser (the suite's role is not one)")

    async def body(db: Database) -> tuple[str, str]:
        async with db.connection("first") as conn:
            pid = conn.info.backend_pid
            await conn.execute(statement.format(role))  # type: ignore[arg-type]
            assert await scalar(conn, "SELECT current_user") == role
        async with db.connection("second") as conn:
            assert conn.info.backend_pid == pid
            return (
                await scalar(conn, "SELECT current_user"),
                await scalar(conn, "SELECT session_user"),
            )

    assert run(pg_dsn, body, max_connections=1) == (login_user, login_user)


# -- stale connections -----------------------------------------------------------------------------


def terminate(dsn: str, pids: set[int]) -> None:
    """pg_terminate_backend() the given sessions and wait until they are gone."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
            (list(pids),),
        )
        for _ in range(200):
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
            ).fetchone()
            if left == (0,):
                return
            time.sleep(0.025)
    raise AssertionError(f"sessions {sorted(pids)} were not terminated")


def test_connections_terminated_by_the_server_are_replaced_on_checkout(pg_dsn: str) -> None:
    async def hold_two(db: Database) -> set[int]:
        """Check out two connections at once; return their server pids."""
        pids: set[int] = set()
        both = asyncio.Event()

        async def one(label: str) -> None:
            async with db.connection(label) as conn:
                pids.add(conn.info.backend_pid)
                if len(pids) == 2:
                    both.set()
                await asyncio.wait_for(both.wait(), 10)
                assert await scalar(conn, "SELECT 1") == 1

        await asyncio.gather(one("a"), one("b"))
        return pids

    async def body(db: Database) -> tuple[set[int], set[int], list[str]]:
        before = await hold_two(db)
        # Both back in the pool, reset and idle (the pool resets them in background tasks).
        assert await eventually(lambda: db.pool_stats().get("pool_available") == 2)
        # Terminate every idle pool connection from another session (a restart, an admin, a
        # proxy's idle timeout): the pool still believes they are fine.
        await asyncio.to_thread(terminate, pg_dsn, before)
        after = await hold_two(db)  # both checkouts work: stale connections were replaced
        schemas = await db.find_schemas("pg_catalog")
        return before, after, schemas

    before, after, schemas = run(pg_dsn, body, max_connections=2)
    assert len(before) == 2 and len(after) == 2
    assert not before & after
    assert schemas == ["pg_catalog"]


# -- describe_error --------------------------------------------------------------------------------


def error_of(dsn: str, query: str) -> psycopg.Error:
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as excinfo:
        conn.execute(query)  # type: ignore[arg-type]
    return excinfo.value


def test_describe_error_names_the_class_and_sqlstate(pg_dsn: str) -> None:
    assert (
        describe_error(error_of(pg_dsn, "SELECT 1/0"))
        == "DivisionByZero (SQLSTATE 22012): division by zero"
    )
    assert (
        describe_error(error_of(pg_dsn, "SELECT * FROM nope"))
        == 'UndefinedTable (SQLSTATE 42P01): relation "nope" does not exist'
    )


def test_describe_error_makes_a_multi_line_error_one_line(pg_dsn: str) -> None:
    exc = error_of(pg_dsn, "DO $$ BEGIN RAISE EXCEPTION E'first line\\n  second line\\n'; END $$")
    assert exc.diag.message_primary is not None and "\n" in exc.diag.message_primary
    assert describe_error(exc) == "RaiseException (SQLSTATE P0001): first line second line"


def test_describe_error_for_a_connection_error_is_one_line(pg_dsn: str) -> None:
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect("host=/nonexistent dbname=x")
    message = describe_error(excinfo.value)
    assert message.startswith("OperationalError: ")
    assert "/nonexistent" in message
    assert_one_line(message)


def test_describe_error_redacts_passwords_in_the_message(pg_dsn: str) -> None:
    exc = error_of(pg_dsn, "DO $$ BEGIN RAISE EXCEPTION 'cannot use password=hunter2'; END $$")
    message = describe_error(exc)
    assert message.startswith("RaiseException (SQLSTATE P0001): ")
    assert "hunter2" not in message


def test_describe_error_for_other_exceptions() -> None:
    assert describe_error(ValueError("bad\n   value\n")) == "ValueError: bad value"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert (
        describe_error(RuntimeError("see postgresql://u:s3cret@h/db"))
        == "RuntimeError: see postgresql://u:***@h/db"
    )


# -- redact, redact_dsn, check_dsn -------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://alice:s3cret@db.example.test:5432/app",
        "postgres://alice:s3cret@db.example.test/app?sslmode=require",
        "postgresql://db.example.test/app?user=alice&password=s3cret",
        "host=db.example.test user=alice password=s3cret dbname=app",
        "host=db.example.test user=alice password='s3cret' dbname=app",
        "host=db.example.test user=alice password = s3cret dbname=app",
    ],
)
def test_redact_dsn_removes_the_password(dsn: str) -> None:
    out = redact_dsn(dsn)
    assert "s3cret" not in out
    params = conninfo_to_dict(out)
    assert "password" not in params
    assert params["host"] == "db.example.test"
    assert params["user"] == "alice"
    assert params["dbname"] == "app"


def test_redact_dsn_of_an_unparseable_or_empty_dsn() -> None:
    assert redact_dsn("host=h password=s3cret 'unterminated") == "<unparseable dsn>"
    assert redact_dsn("") == "<defaults from PG* environment>"
    assert redact_dsn("password=s3cret") == "<defaults from PG* environment>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("failed: postgresql://alice:s3cret@db/app", "failed: postgresql://alice:***@db/app"),
        ("host=db password=s3cret dbname=app", "host=db password=*** dbname=app"),
        ("host=db PASSWORD = s3cret dbname=app", "host=db PASSWORD = *** dbname=app"),
        ("postgresql://db/app?password=s3cret", "postgresql://db/app?password=***"),
        ("no secrets here: host=db dbname=app", "no secrets here: host=db dbname=app"),
        ("postgresql://alice@db/app", "postgresql://alice@db/app"),
    ],
)
def test_redact_removes_passwords_from_free_text(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_removes_a_quoted_password_with_spaces() -> None:
    out = redact("host=db password='my s3cret phrase' dbname=app")
    assert "s3cret" not in out
    assert "phrase" not in out
    assert "host=db" in out and "dbname=app" in out


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "postgresql:///app",
        "postgresql://u@h:5432/db?sslmode=require",
        "host=/tmp dbname=app",
        "host=h user=u password='a b' dbname=d",
    ],
)
def test_check_dsn_accepts_valid_dsns(dsn: str) -> None:
    assert check_dsn(dsn) is None


@pytest.mark.parametrize(
    "dsn",
    [
        "host=h dbname",
        "host=h dbname='unterminated",
        "host=h nosuchoption=1",
        "postgresql://h/db?nosuchoption=1",
        "password=s3cret garbage",
    ],
)
def test_check_dsn_flags_a_malformed_dsn(dsn: str) -> None:
    problem = check_dsn(dsn)
    assert problem
    assert_one_line(problem)
    assert "s3cret" not in problem


# -- find_schemas ----------------------------------------------------------------------------------


def test_find_schemas_with_a_like_pattern(pg_dsn: str) -> None:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_b",
        "CREATE SCHEMA tenant_a",
        'CREATE SCHEMA "tenant_C d"',
        "CREATE SCHEMA tenantx",
        "CREATE SCHEMA other_tenant_z",
        "CREATE SCHEMA tenant_",
    )

    async def body(db: Database) -> dict[str, list[str]]:
        return {
            "tenant_%": await db.find_schemas("tenant_%"),  # '_' is a LIKE wildcard too
            "tenant\\_%": await db.find_schemas("tenant\\_%"),
            "tenant\\__": await db.find_schemas("tenant\\__"),
            "none_%": await db.find_schemas("none_%"),
            "injection": await db.find_schemas("x' OR '1'='1"),
        }

    found = run(pg_dsn, body)
    assert found["tenant_%"] == ["tenant_", "tenant_C d", "tenant_a", "tenant_b", "tenantx"]
    assert found["tenant\\_%"] == ["tenant_", "tenant_C d", "tenant_a", "tenant_b"]
    assert found["tenant\\__"] == ["tenant_a", "tenant_b"]
    assert found["none_%"] == []
    assert found["injection"] == []
