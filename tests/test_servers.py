"""The real-server helpers of tests/servers.py work: scratch servers, standbys, PgBouncer."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from servers import (
    PgBouncer,
    ScratchServer,
    backends,
    free_port,
    pgbouncer_fixture,  # noqa: F401
    scratch_server_fixture,  # noqa: F401
    standby_of,
)
from support import PgServer

MakeServer = Callable[..., ScratchServer]
MakeBouncer = Callable[..., PgBouncer]


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_scratch_server_stops_and_starts_on_the_same_port(scratch_server: MakeServer) -> None:
    server = scratch_server(max_connections=12)
    dsn = server.dsn()
    assert server.scalar("SHOW max_connections") == "12"
    assert server.scalar("SHOW wal_level") == "replica"
    assert server.scalar("SHOW listen_addresses") == "127.0.0.1"
    assert not server.in_recovery()
    server.execute("CREATE TABLE kept (x int)")
    server.execute("INSERT INTO kept VALUES (%s)", (7,))

    server.stop()
    assert not server.running
    with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused"):
        psycopg.connect(dsn, connect_timeout=5)

    server.start()
    assert server.dsn() == dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(7,)]

    before = server.scalar("SELECT pg_postmaster_start_time()")
    server.restart()
    assert server.scalar("SELECT pg_postmaster_start_time()") > before
    assert server.psql("SELECT x FROM kept;").strip() == "7"
    assert server.scalar("SELECT current_database()", dbname="template1") == "template1"


def test_scratch_servers_are_independent_and_removed(scratch_server: MakeServer) -> None:
    first, second = scratch_server(), scratch_server()
    assert first.port != second.port
    first.execute("CREATE DATABASE only_here")
    assert second.scalar("SELECT count(*) FROM pg_database WHERE datname = 'only_here'") == 0

    with ScratchServer(start=False) as manual:
        assert not manual.running
        manual.start()
        assert manual.scalar("SELECT 1") == 1
    assert not manual.base.exists()


def test_standby_replicates_pauses_and_promotes(scratch_server: MakeServer) -> None:
    primary = scratch_server()
    standby = standby_of(primary)
    assert standby.port != primary.port
    assert standby.in_recovery()
    assert not primary.in_recovery()
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        standby.execute("CREATE TABLE nope (x int)")

    primary.execute("CREATE TABLE t (x int)")
    primary.execute("INSERT INTO t VALUES (1)")
    standby.wait_caught_up()
    assert standby.execute("SELECT x FROM t") == [(1,)]
    streaming = primary.execute("SELECT state FROM pg_stat_replication")
    assert streaming == [("streaming",)]

    standby.pause_replay()
    primary.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(TimeoutError, match="replay"):
        standby.wait_caught_up(timeout=0.5)
    assert standby.execute("SELECT x FROM t") == [(1,)]
    standby.resume_replay()
    standby.wait_caught_up()
    assert standby.execute("SELECT x FROM t ORDER BY x") == [(1,), (2,)]

    standby.promote()
    assert not standby.in_recovery()
    standby.execute("INSERT INTO t VALUES (3)")
    assert standby.execute("SELECT x FROM t ORDER BY x") == [(1,), (2,), (3,)]
    assert primary.execute("SELECT x FROM t ORDER BY x") == [(1,), (2,)]

    primary.cleanup()  # takes its standby along
    assert not standby.base.exists()


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_pgbouncer_forwards_to_any_database(
    pgbouncer: MakeBouncer, pg_server: PgServer, pg_dsn: str, pool_mode: str
) -> None:
    bouncer = pgbouncer(pg_server.admin_dsn, pool_mode=pool_mode)
    dbname = dbname_of(pg_dsn)
    with psycopg.connect(bouncer.dsn(dbname), autocommit=True) as conn:
        assert conn.info.port == bouncer.port
        assert conn.execute("SELECT current_database()").fetchone() == (dbname,)
        conn.execute("CREATE TABLE via_bouncer (x int)")
        conn.execute("INSERT INTO via_bouncer VALUES (1), (2)")
    with psycopg.connect(pg_dsn) as direct:
        assert direct.execute("SELECT count(*) FROM via_bouncer").fetchone() == (2,)
    with psycopg.connect(bouncer.through(pg_dsn)) as conn:
        assert conn.execute("SELECT count(*) FROM via_bouncer").fetchone() == (2,)

    pools = {row["database"]: row for row in bouncer.admin("SHOW POOLS")}
    assert pools[dbname]["pool_mode"] == pool_mode
    assert any(row["database"] == dbname for row in bouncer.admin("SHOW SERVERS"))


def test_pgbouncer_rejects_options_unless_ignored(
    pgbouncer: MakeBouncer, pg_server: PgServer, pg_dsn: str
) -> None:
    dbname = dbname_of(pg_dsn)
    options = "-c statement_timeout=1234"
    strict = pgbouncer(pg_server.admin_dsn)
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(strict.dsn(dbname, options=options), connect_timeout=5)

    lenient = pgbouncer(pg_server.admin_dsn, ignore_startup_parameters="options")
    with psycopg.connect(lenient.dsn(dbname, options=options)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Ignored means dropped: the setting never reaches the server.
        assert conn.execute("SHOW statement_timeout").fetchone() != ("1234ms",)


def test_pgbouncer_transaction_mode_shares_server_connections(
    pgbouncer: MakeBouncer, pg_server: PgServer, pg_dsn: str
) -> None:
    dbname = dbname_of(pg_dsn)
    shared = pgbouncer(pg_server.admin_dsn, pool_mode="transaction", default_pool_size=1)
    session = pgbouncer(pg_server.admin_dsn, pool_mode="session", default_pool_size=2)
    pid = "SELECT pg_backend_pid()"
    with (
        psycopg.connect(shared.dsn(dbname), autocommit=True) as one,
        psycopg.connect(shared.dsn(dbname), autocommit=True) as two,
    ):
        assert one.execute(pid).fetchone() == two.execute(pid).fetchone()
        servers = [row for row in shared.admin("SHOW SERVERS") if row["database"] == dbname]
        assert len(servers) == 1
    with (
        psycopg.connect(session.dsn(dbname), autocommit=True) as one,
        psycopg.connect(session.dsn(dbname), autocommit=True) as two,
    ):
        assert one.execute(pid).fetchone() != two.execute(pid).fetchone()


def test_pgbouncer_in_front_of_a_scratch_server(
    scratch_server: MakeServer, pgbouncer: MakeBouncer
) -> None:
    server = scratch_server()
    bouncer = pgbouncer(server.dsn(), pool_mode="transaction")
    assert bouncer.target_port == server.port
    with psycopg.connect(bouncer.dsn("postgres")) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (server.port,)
    assert bouncer.admin("SHOW VERSION")
    bouncer.stop()
    with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused"):
        psycopg.connect(bouncer.dsn("postgres"), connect_timeout=5)


def test_pgbouncer_start_failure_shows_its_log(pgbouncer: MakeBouncer, pg_server: PgServer) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)PgBouncer exited.*pgbouncer\.log"):
        pgbouncer(pg_server.admin_dsn, settings={"no_such_setting": 1, "pool_mode": "bogus"})


def test_backends_counts_prefixed_client_sessions(pg_server: PgServer, pg_dsn: str) -> None:
    dbname = dbname_of(pg_dsn)
    assert backends(pg_server.admin_dsn, dbname) == 0
    with (
        psycopg.connect(pg_dsn, application_name="sweeperd-worker-1"),
        psycopg.connect(pg_dsn, application_name="sweeperd-worker-2"),
        psycopg.connect(pg_dsn, application_name="someone-else"),
    ):
        assert backends(pg_server.admin_dsn, dbname) == 2
        assert backends(pg_server.admin_dsn, dbname, "sweeperd-worker-2") == 1
        assert backends(pg_server.admin_dsn, dbname, "someone") == 1
        assert backends(pg_server.admin_dsn, dbname, "nobody") == 0
    deadline = time.monotonic() + 10  # a closed session's backend exits a moment later
    while backends(pg_server.admin_dsn, dbname) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backends(pg_server.admin_dsn, dbname) == 0
