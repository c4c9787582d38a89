"""``sweeperd run`` end to end: real daemon processes against a real PostgreSQL.

Each test starts ``python -m sweeperd run -c <config>`` as a subprocess with ``NOTIFY_SOCKET``
pointing at an AF_UNIX datagram socket the test binds, and reads the sd_notify messages the daemon
sends. The work is a drop-in plugin (``plugins.d/nap.py``) whose one operation records its start in
``public.runs`` (``clock_timestamp()`` on the server), runs ``SELECT pg_sleep(x)`` with ``x`` from
``[plugins.nap] seconds``, then records its end. A run whose ``finished`` stays NULL was cancelled.

Whether a query still runs is asked of the server (``pg_stat_activity``), never inferred from
wall-clock time. The only timed assertions are generous upper bounds on how long a stop takes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from servers import (  # noqa: F401
    PgBouncer,
    ScratchServer,
    scratch_server_fixture,
    standby_of,
)
from support import run_cli, run_sql

from sweeperd.config import ConfigError, load_config
from sweeperd.sdnotify import monotonic_usec

UNREACHABLE_DSN = "host=/nonexistent dbname=x connect_timeout=1"
STOP_SLACK = 10.0  # "exits within drain_timeout + N s"
NAP_APP = "sweeperd: nap.sleep"

NAP_PLUGIN = textwrap.dedent('''\
    """Test drop-in: record the run, sleep on the server, record the end."""
    import sweeperd


    def make_run(seconds):
        async def run(ctx):
            cur = await ctx.conn.execute(
                "INSERT INTO public.runs (sweep, tenant, pid, started) "
                "VALUES (%s, %s, pg_backend_pid(), clock_timestamp()) RETURNING id",
                (ctx.sweep, ctx.tenant.name),
            )
            (run_id,) = await cur.fetchone()
            await ctx.conn.execute("SELECT pg_sleep(%s)", (seconds,))
            await ctx.conn.execute(
                "UPDATE public.runs SET finished = clock_timestamp() WHERE id = %s", (run_id,)
            )
            return None

        return run


    @sweeperd.hookimpl
    def sweeperd_operations(settings):
        seconds = float(settings.get("seconds", 0))
        return [sweeperd.Operation(name="nap.sleep", run=make_run(seconds), tables=("t",))]
    ''')


# -- the database side --------------------------------------------------------------------------


def query(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run:
    id: int
    sweep: str
    tenant: str
    pid: int
    started: Any
    finished: Any


def runs(dsn: str, *, sweep: str | None = None, tenant: str | None = None) -> list[Run]:
    rows = query(
        dsn,
        "SELECT id, sweep, tenant, pid, started, finished FROM public.runs ORDER BY started, id",
    )
    out = [Run(*row) for row in rows]
    return [
        r
        for r in out
        if (sweep is None or r.sweep == sweep) and (tenant is None or r.tenant == tenant)
    ]


def active_naps(dsn: str) -> list[tuple[int, Any, str]]:
    """(pid, query_start, application_name) of sweeperd backends running pg_sleep right now."""
    return [
        (pid, started, app)
        for pid, started, app in query(
            dsn,
            "SELECT pid, query_start, application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'sweeperd:%%' "
            "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
        )
    ]


def sweeperd_backends(dsn: str) -> list[tuple[int, str, str | None]]:
    """Every sweeperd connection to the test database, busy or idle."""
    return [
        tuple(row)
        for row in query(  # type: ignore[misc]
            dsn,
            "SELECT pid, application_name, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'sweeperd%%'",
        )
    ]


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_no_backends(dsn: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    left = sweeperd_backends(dsn)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = sweeperd_backends(dsn)
    assert left == [], f"sweeperd connections remain after exit: {left}"


@pytest.fixture
def db(pg_dsn: str) -> str:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_acme",
        "CREATE SCHEMA tenant_globex",
        "CREATE TABLE public.runs (id bigserial PRIMARY KEY, sweep text NOT NULL, "
        "tenant text NOT NULL, pid int NOT NULL, started timestamptz NOT NULL, "
        "finished timestamptz)",
    )
    return pg_dsn


# -- the configuration --------------------------------------------------------------------------


def write_daemon_config(
    directory: Path,
    dsn: str,
    *,
    sweeps: Mapping[str, Mapping[str, Any]],
    tenants: tuple[str, ...] = ("acme",),
    seconds: float = 0.0,
    drain: str = "5s",
    database: Mapping[str, Any] | None = None,
    raw_extra: str = "",
    history: bool = False,
) -> Path:
    """``sweeperd.toml`` with database "main", the tenants, the sweeps (of ``nap.*``) and the
    plugin directory ``plugins.d`` holding the nap plugin; written whole, then renamed."""
    plugins_d = directory / "plugins.d"
    plugins_d.mkdir(exist_ok=True)
    (plugins_d / "nap.py").write_text(NAP_PLUGIN, encoding="utf-8")
    doc: dict[str, Any] = {
        "daemon": {"plugin_dirs": ["plugins.d"], "drain_timeout": drain},
        "log": {"format": "json", "level": "info"},
        "history": {"enabled": history},
        "databases": {
            "main": {"dsn": dsn, "max_connections": 4, "connect_timeout": "5s", **(database or {})}
        },
        "tenants": [{"name": t, "database": "main", "schema": f"tenant_{t}"} for t in tenants],
        "sweeps": {name: {"operations": ["nap.*"], **body} for name, body in sweeps.items()},
        "plugins": {"nap": {"seconds": seconds}},
    }
    path = directory / "sweeperd.toml"
    tmp = directory / "sweeperd.toml.new"
    tmp.write_text(tomli_w.dumps(doc) + raw_extra, encoding="utf-8")
    tmp.replace(path)
    return path


# -- the notify socket --------------------------------------------------------------------------


Message = tuple[str, ...]


def fields(message: Message) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message)


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting what the daemon sends to NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sender: subprocess.Popen[bytes] | None = None  # fail fast once it has exited
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[Message] = []
        self._cursor = 0

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        self.messages.append(tuple(data.decode("utf-8").split("\n")))
        return True

    def drain(self) -> list[Message]:
        """Everything received so far (without waiting for more)."""
        while self._receive(0.001):
            pass
        return list(self.messages)

    def expect(self, predicate: Callable[[Message], bool], timeout: float, what: str) -> Message:
        """The next message (after the last one expected) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.messages):
                message = self.messages[self._cursor]
                self._cursor += 1
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            exited = self.sender is not None and self.sender.poll() is not None
            if left <= 0 or (exited and not self._receive(0.05)):
                raise AssertionError(
                    f"no notify message {what} within {timeout}s"
                    f"{' (the daemon exited)' if exited else ''}; got {self.messages}"
                )
            self._receive(min(left, 0.2))

    def expect_first(self, key: str, timeout: float = 15.0) -> Message:
        return self.expect(lambda m: m[0] == key, timeout, f"starting with {key}")

    def lifecycle(self) -> list[str]:
        """The READY/RELOADING/STOPPING messages' first lines, in order."""
        return [m[0] for m in self.drain() if m[0] in ("READY=1", "RELOADING=1", "STOPPING=1")]

    def close(self) -> None:
        self.sock.close()


# -- the daemon process -------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    notify: NotifySocket
    stderr_path: Path
    stdout_path: Path

    def send(self, signo: int) -> float:
        now = time.monotonic()
        self.proc.send_signal(signo)
        return now

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """stderr parsed as JSON lines; a line that is not JSON fails the test."""
        out = []
        for line in self.stderr().splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"stderr line is not JSON: {line!r}\n{self.stderr()}")
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == event]

    def wait_log(self, event: str, timeout: float, count: int = 1) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (lambda found: found if len(found) >= count else None)(self.events(event)),
            timeout,
            f"log event {event!r} x{count}\n{self.stderr()}",
        )

    def ready(self, timeout: float = 20.0) -> Message:
        try:
            return self.notify.expect_first("READY=1", timeout)
        except AssertionError:
            raise AssertionError(
                f"daemon not ready; exit code {self.proc.poll()}\n{self.stderr()}"
            ) from None

    def reload(self, timeout: float = 15.0) -> tuple[Message, Message, int, int]:
        """SIGHUP; the RELOADING and following READY messages, and the monotonic bracket."""
        before = monotonic_usec()
        self.send(signal.SIGHUP)
        reloading = self.notify.expect_first("RELOADING=1", timeout)
        after = monotonic_usec()
        ready = self.notify.expect_first("READY=1", timeout)
        return reloading, ready, before, after

    def stop(self, signo: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.send(signo)
        return self.wait_exit(timeout)


def socket_path(directory: Path, stack: contextlib.ExitStack) -> Path:
    """``directory/notify.sock``, or a short temporary directory's if that path is too long
    for AF_UNIX (about 107 bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "notify.sock"
    if len(os.fsencode(path)) < 100:
        return path
    short = Path(tempfile.mkdtemp(prefix="swd-"))
    stack.callback(lambda: ((short / "n.sock").unlink(missing_ok=True), short.rmdir()))
    return short / "n.sock"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``sweeperd run -c <config>``; every daemon started is killed after the test."""
    started: list[Daemon] = []
    with contextlib.ExitStack() as stack:

        def start(
            config: Path, *, env: Mapping[str, str] | None = None, argv_prefix: tuple[str, ...] = ()
        ) -> Daemon:
            n = len(started)
            notify = NotifySocket(socket_path(tmp_path / f"d{n}" if n else tmp_path, stack))
            stack.callback(notify.close)
            full_env = {
                k: v
                for k, v in os.environ.items()
                if k
                not in (
                    "SWEEPERD_CONFIG",
                    "NOTIFY_SOCKET",
                    "WATCHDOG_USEC",
                    "WATCHDOG_PID",
                    "LISTEN_FDS",
                    "LISTEN_PID",
                )
                and not k.startswith("OTEL_")
            }
            full_env["NOTIFY_SOCKET"] = str(notify.path)
            full_env.update(env or {})
            out = tmp_path / f"daemon{n}.stdout"
            err = tmp_path / f"daemon{n}.stderr"
            with out.open("wb") as fout, err.open("wb") as ferr:
                proc = subprocess.Popen(
                    [*argv_prefix, sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
                    stdout=fout,
                    stderr=ferr,
                    stdin=subprocess.DEVNULL,
                    env=full_env,
                    cwd=tmp_path,
                )
            notify.sender = proc
            daemon = Daemon(proc=proc, notify=notify, stderr_path=err, stdout_path=out)
            started.append(daemon)
            return daemon

        try:
            yield start
        finally:
            for daemon in started:
                if daemon.proc.poll() is None:
                    daemon.proc.kill()
                    daemon.proc.wait(timeout=10)


def no_traceback(daemon: Daemon) -> None:
    text = daemon.stderr()
    assert "Traceback" not in text, text


# -- start-up and the notify sequence -----------------------------------------------------------


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_daemon_ready_then_stops_on_signal_with_exact_notify_sequence(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon], signo: int
) -> None:
    config = write_daemon_config(tmp_path, db, sweeps={"hourly": {"interval": "1h"}})
    daemon = start_daemon(config)
    daemon.ready()
    sent = daemon.send(signo)
    assert daemon.wait_exit(STOP_SLACK) == 0
    assert time.monotonic() - sent < STOP_SLACK

    messages = daemon.notify.drain()
    assert len(messages) == 2, messages
    ready, stopping = messages
    assert ready[0] == "READY=1"
    assert len(ready) == 2 and ready[1].startswith("STATUS="), ready
    assert fields(ready)["STATUS"]
    assert stopping[0] == "STOPPING=1"
    assert len(stopping) == 2 and stopping[1].startswith("STATUS="), stopping

    logs = daemon.logs()  # every line is JSON
    assert [e["event"] for e in logs if e["event"] in ("sweeperd ready", "sweeperd stopped")] == [
        "sweeperd ready",
        "sweeperd stopped",
    ]
    no_traceback(daemon)
    wait_for_no_backends(db)
    assert runs(db) == []


def test_interval_sweep_runs_repeatedly(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    # With the defaults (run history on), as a production daemon runs.
    config = write_daemon_config(tmp_path, db, sweeps={"often": {"interval": "1s"}}, history=True)
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(
        lambda: len([r for r in runs(db) if r.finished is not None]) >= 3, 15, "three finished runs"
    )
    assert {(r.sweep, r.tenant) for r in runs(db)} == {("often", "acme")}
    assert daemon.stop() == 0
    assert len(daemon.events("sweep finished")) >= 3
    no_traceback(daemon)


def test_unreachable_database_at_startup_is_retried_and_the_daemon_is_ready(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path,
        UNREACHABLE_DSN,
        sweeps={"h": {"interval": "1h"}},
        database={"connect_timeout": "1s"},
    )
    daemon = start_daemon(config)
    ready = daemon.ready()
    assert "unreachable: main (retrying)" in fields(ready)["STATUS"], ready
    errors = daemon.wait_log("database unreachable", 10)
    assert errors[0]["database"] == "main" and errors[0]["level"] == "error"
    assert "/nonexistent" in errors[0]["error"]  # the reason libpq gave
    # Retried in the background: one line per attempt, each with the reason.
    retries = daemon.wait_log("database still unreachable; retrying", 15, count=2)
    assert all("/nonexistent" in e["error"] for e in retries)
    assert [e["attempt"] for e in retries[:2]] == [1, 2]
    assert daemon.stop() == 0
    no_traceback(daemon)


def test_broken_config_at_startup_exits_2_with_one_line_per_problem(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path,
        "dbname=x",
        sweeps={"bad": {"interval": "1s", "overlap": "sometimes", "bogus": 1}},
        drain="soon",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)
    problems = excinfo.value.problems
    assert len(problems) == 3, problems
    daemon = start_daemon(config)
    assert daemon.wait_exit(30) == 2
    assert daemon.stderr().splitlines() == [f"sweeperd: {p}" for p in problems]
    assert daemon.notify.drain() == []


# -- reload -------------------------------------------------------------------------------------


def test_reload_adds_tenant_and_sweep_without_restart(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(tmp_path, db, sweeps={"first": {"interval": "1s"}})
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: runs(db, sweep="first", tenant="acme"), 15, "a run of first/acme")

    write_daemon_config(
        tmp_path,
        db,
        tenants=("acme", "globex"),
        sweeps={"first": {"interval": "1s"}, "second": {"interval": "1s", "tenants": ["globex"]}},
    )
    reloading, ready, before, after = daemon.reload()
    assert len(reloading) == 2 and reloading[0] == "RELOADING=1", reloading
    key, _, value = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC" and value.isdigit(), reloading
    assert before <= int(value) <= after  # CLOCK_MONOTONIC, taken while reloading
    assert ready[0] == "READY=1" and ready[1].startswith("STATUS=")
    assert "reload failed" not in ready[1]

    wait_until(lambda: runs(db, sweep="first", tenant="globex"), 15, "first runs the new tenant")
    wait_until(lambda: runs(db, sweep="second", tenant="globex"), 15, "the new sweep runs")
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    assert daemon.notify.lifecycle() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert runs(db, sweep="second", tenant="acme") == []  # the new sweep's tenant globs hold
    reloaded = daemon.events("configuration reloaded")
    assert len(reloaded) == 1 and reloaded[0]["sweeps"] == ["first", "second"]
    no_traceback(daemon)


def test_reload_reopens_the_pool_whose_database_settings_changed(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    # Connections exist only while a sweep runs: nap, so that there is one to see.
    config = write_daemon_config(tmp_path, db, sweeps={"s": {"interval": "1s"}}, seconds=0.5)
    daemon = start_daemon(config)
    daemon.ready()
    old_pids = wait_until(
        lambda: {pid for pid, _app, _q in sweeperd_backends(db)}, 15, "a sweep's connections"
    )

    write_daemon_config(
        tmp_path,
        db,
        sweeps={"s": {"interval": "1s"}},
        seconds=0.5,
        database={"max_connections": 3},
    )
    _reloading, ready, _before, _after = daemon.reload()
    assert "reload failed" not in ready[1]
    assert daemon.events("configuration reloaded")[0]["reopened"] == ["main"]
    # The old pool is closed once no sweep uses it; runs go on through the new one.
    wait_until(
        lambda: not old_pids & {pid for pid, _a, _q in sweeperd_backends(db)},
        15,
        "the old pool's connections to close",
    )
    seen = len(runs(db))
    wait_until(lambda: len(runs(db)) > seen, 15, "a run through the new pool")
    assert daemon.stop() == 0
    no_traceback(daemon)


BROKEN_PLUGIN = "import sweeperd\n\ndef sweeperd_operations(settings)\n    return []\n"


@pytest.mark.parametrize("breakage", ["config", "plugin"])
def test_reload_with_a_broken_config_keeps_the_old_one_running(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon], breakage: str
) -> None:
    config = write_daemon_config(tmp_path, db, sweeps={"s": {"interval": "1s"}})
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: runs(db), 15, "a first run")

    expected: list[str] | None = None
    if breakage == "config":
        write_daemon_config(
            tmp_path,
            db,
            sweeps={"s": {"interval": "1s", "overlap": "maybe", "bogus_key": True}},
            raw_extra="\n[daemon2]\nx = 1\n",
        )
        with pytest.raises(ConfigError) as excinfo:
            load_config(config)
        expected = excinfo.value.problems
        assert len(expected) == 3, expected
    else:
        (tmp_path / "plugins.d" / "broken.py").write_text(BROKEN_PLUGIN, encoding="utf-8")

    reloading, ready, _before, _after = daemon.reload(timeout=30)
    assert reloading[0] == "RELOADING=1"
    status = fields(ready)["STATUS"]
    assert ready[0] == "READY=1"
    assert "reload failed" in status, status

    # Still the old sweeps, still running.
    seen = len(runs(db))
    wait_until(lambda: len(runs(db)) > seen + 1, 15, "runs to go on after the failed reload")
    assert daemon.proc.poll() is None
    assert {r.sweep for r in runs(db)} == {"s"}
    # ...and STATUS keeps saying so while it runs (the once-a-second refresh included), until
    # a reload succeeds.
    later = [fields(m)["STATUS"] for m in daemon.notify.drain() if "STATUS" in fields(m)]
    assert later and later[-1].startswith("reload failed"), later

    failed = daemon.events("reload failed; keeping the previous configuration")
    problems = [e["problem"] for e in failed]
    assert all(e["level"] == "error" for e in failed)
    assert all(n == 1 for n in Counter(problems).values()), problems
    if expected is not None:
        assert sorted(problems) == sorted(expected)
    else:
        assert len(problems) == 1 and "broken" in problems[0], problems
    # Each problem once in the whole log, not repeated by other lines.
    text = daemon.stderr()
    for problem in problems:
        assert text.count(json.dumps(problem)[1:-1]) == 1, problem

    assert daemon.stop() == 0
    assert daemon.notify.lifecycle() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert daemon.events("configuration reloaded") == []
    no_traceback(daemon)


def test_reload_with_subsecond_misfire_grace_time_does_not_kill_the_daemon(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    # Regression: APScheduler wants whole seconds; round(0.5) == 0 used to make it raise
    # TypeError in the reload and take the daemon down with a traceback.
    config = write_daemon_config(tmp_path, db, sweeps={"s": {"interval": "1h"}})
    daemon = start_daemon(config)
    daemon.ready()
    write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1h", "misfire_grace_time": "500ms"}}
    )
    load_config(config)  # check-config accepts it
    _reloading, ready, _before, _after = daemon.reload()
    assert ready[0] == "READY=1"
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    no_traceback(daemon)


# -- stopping -----------------------------------------------------------------------------------


def test_sigterm_waits_for_a_running_operation_within_drain_timeout(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s"}}, seconds=1.5, drain="30s"
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: active_naps(db), 15, "the operation to run")
    sent = daemon.send(signal.SIGTERM)
    stopping = daemon.notify.expect_first("STOPPING=1", 10)
    assert fields(stopping)["STATUS"]
    assert daemon.wait_exit(30 + STOP_SLACK) == 0
    assert time.monotonic() - sent < 30 + STOP_SLACK
    done = runs(db)
    assert len(done) == 1 and done[0].finished is not None  # finished, not cancelled
    assert daemon.events("cancelling running operations") == []
    wait_for_no_backends(db)
    no_traceback(daemon)


def test_sigterm_cancels_what_is_still_running_after_drain_timeout(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    drain = 2.0
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s"}}, seconds=30, drain="2s"
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: active_naps(db), 15, "the operation to run")
    sent = daemon.send(signal.SIGTERM)
    daemon.notify.expect_first("STOPPING=1", 10)
    assert daemon.wait_exit(drain + STOP_SLACK) == 0
    elapsed = time.monotonic() - sent
    assert elapsed < drain + STOP_SLACK
    print(f"SIGTERM to exit with a 2s drain and a running pg_sleep(30): {elapsed:.2f}s")

    wait_for_no_backends(db)
    (run,) = runs(db)
    assert run.finished is None  # cancelled on the server, never reached its UPDATE
    cancelling = daemon.events("cancelling running operations")
    assert len(cancelling) == 1 and "drain timeout" in cancelling[0]["reason"]
    assert daemon.notify.lifecycle() == ["READY=1", "STOPPING=1"]
    no_traceback(daemon)


@pytest.mark.parametrize(
    ("signals", "reason"),
    [
        ((signal.SIGTERM, signal.SIGTERM), "second stop signal"),
        # A second `systemctl stop` joins the pending stop job and sends no signal: "stop now"
        # is `systemctl kill -s SIGQUIT sweeperd`, during a drain or as the first signal.
        ((signal.SIGTERM, signal.SIGQUIT), "stop now (SIGQUIT)"),
        ((signal.SIGQUIT,), "stop now (SIGQUIT)"),
    ],
    ids=["second SIGTERM", "SIGQUIT during the drain", "SIGQUIT"],
)
def test_stop_now_cancels_at_once(
    tmp_path: Path,
    db: str,
    start_daemon: Callable[..., Daemon],
    signals: tuple[int, ...],
    reason: str,
) -> None:
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s"}}, seconds=30, drain="60s"
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: active_naps(db), 15, "the operation to run")
    if len(signals) == 2:
        daemon.send(signals[0])
        daemon.notify.expect_first("STOPPING=1", 10)
        daemon.wait_log("stopping", 10)
        assert daemon.proc.poll() is None  # draining: the operation may take its 60 s
        assert active_naps(db)
    last = daemon.send(signals[-1])
    assert daemon.wait_exit(STOP_SLACK) == 0
    assert time.monotonic() - last < STOP_SLACK
    wait_for_no_backends(db)
    (run,) = runs(db)
    assert run.finished is None  # cancelled on the server
    cancelling = daemon.events("cancelling running operations")
    assert len(cancelling) == 1 and reason in cancelling[0]["reason"]
    assert daemon.notify.lifecycle() == ["READY=1", "STOPPING=1"]
    no_traceback(daemon)


# -- STATUS= ------------------------------------------------------------------------------------


def test_status_is_idle_with_the_last_result_after_each_run_and_the_next_firing_to_the_second(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(tmp_path, db, sweeps={"often": {"interval": "3s"}}, seconds=0.2)
    daemon = start_daemon(config)
    daemon.ready()

    def statuses() -> list[str]:
        return [fields(m)["STATUS"] for m in daemon.notify.drain() if "STATUS" in fields(m)]

    running = wait_until(
        lambda: [s for s in statuses() if s.startswith("running often")], 15, "running often"
    )
    # After the run (its history written, its task done) systemd must hear "idle", not keep
    # showing "running" until the next event.
    idle = wait_until(
        lambda: [s for s in statuses() if s.startswith("idle") and "last often: 1 ok" in s],
        15,
        f"an idle STATUS after the run; got {statuses()}",
    )
    assert running and idle
    assert re.search(r"next often \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", idle[0]), idle
    assert daemon.stop() == 0
    no_traceback(daemon)


# -- watchdog -----------------------------------------------------------------------------------


@pytest.mark.parametrize("watchdog_pid", ["unset", "ours", "another"])
def test_watchdog_pings(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon], watchdog_pid: str
) -> None:
    config = write_daemon_config(tmp_path, db, sweeps={"h": {"interval": "1h"}})
    env = {"WATCHDOG_USEC": "1000000"}
    prefix: tuple[str, ...] = ()
    if watchdog_pid == "another":
        env["WATCHDOG_PID"] = str(os.getpid())  # the test process, not the daemon
    elif watchdog_pid == "ours":
        # exec keeps the shell's pid, so $$ is the daemon's pid
        prefix = ("/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh")
    daemon = start_daemon(config, env=env, argv_prefix=prefix)
    daemon.ready()
    if watchdog_pid == "another":
        time.sleep(2.0)  # four half-intervals: long enough for pings that must not come
        assert [m for m in daemon.notify.drain() if "WATCHDOG=1" in m] == []
    else:
        wait_until(
            lambda: len([m for m in daemon.notify.drain() if m == ("WATCHDOG=1",)]) >= 2,
            10,
            "two WATCHDOG=1 pings",
        )
    assert daemon.stop() == 0
    no_traceback(daemon)


# -- overlap, timeout ---------------------------------------------------------------------------


def assert_no_overlap(done: list[Run]) -> None:
    for earlier, later in itertools.pairwise(done):
        assert earlier.finished is not None, earlier
        assert later.started >= earlier.finished, (earlier, later)


def test_overlap_skip_never_runs_twice_at_once(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s", "overlap": "skip"}}, seconds=1.5
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: active_naps(db), 15, "the first run")
    # A reload mid-run keeps the sweep's controller, and with it the overlap policy.
    _reloading, ready, _b, _a = daemon.reload()
    assert "reload failed" not in ready[1]
    wait_until(
        lambda: len([r for r in runs(db) if r.finished is not None]) >= 2, 20, "two finished runs"
    )
    assert len(active_naps(db)) <= 1
    assert daemon.stop() == 0
    done = [r for r in runs(db) if r.finished is not None]
    assert_no_overlap(done)
    assert daemon.events("sweep still running; firing skipped")
    no_traceback(daemon)


def test_overlap_queue_runs_once_more_right_after_and_never_piles_up(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    # Firings every second while a run takes 3 s: the first one queues, the next ones fold into
    # it. Once two firings have arrived, a reload moves the next firing an hour away: exactly one
    # more run follows, back to back, however many firings arrived meanwhile.
    sweeps = {"s": {"interval": "1s", "overlap": "queue"}}
    config = write_daemon_config(tmp_path, db, sweeps=sweeps, seconds=3)
    daemon = start_daemon(config)
    daemon.ready()
    daemon.wait_log("sweep already queued; firing folded into it", 20)
    write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1h", "overlap": "queue"}}, seconds=3
    )
    _reloading, ready, _b, _a = daemon.reload()
    assert "reload failed" not in ready[1]

    wait_until(
        lambda: len(runs(db)) >= 2 and all(r.finished for r in runs(db)),
        20,
        "the queued run to start and finish",
    )
    time.sleep(1.0)  # a third run, if one had been piled up, would start right away
    done = runs(db)
    assert len(done) == 2, done
    assert_no_overlap(done)
    assert len(daemon.events("sweep still running; queued to run again when it ends")) == 1
    assert daemon.stop() == 0
    no_traceback(daemon)


def test_overlap_replace_cancels_the_running_one_on_the_server(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s", "overlap": "replace"}}, seconds=30, drain="1s"
    )
    daemon = start_daemon(config)
    daemon.ready()
    samples: list[int] = []

    def three_runs() -> bool:
        samples.append(len(active_naps(db)))
        return len(runs(db)) >= 3

    wait_until(three_runs, 20, "three runs, each replacing the previous one")
    latest = runs(db)[-1]
    # Every replaced run's query is gone from the server: nothing older than the latest run
    # is still sleeping there.
    wait_until(
        lambda: not [s for _p, s, _a in active_naps(db) if s < latest.started],
        5,
        "replaced queries to disappear from pg_stat_activity",
    )
    assert max(samples) <= 1, samples  # never two sleeping at once
    assert daemon.stop() == 0
    done = runs(db)
    assert all(r.finished is None for r in done), done  # each one cancelled before its end
    assert len(daemon.events("sweep still running; replacing it")) >= 2
    wait_for_no_backends(db)
    no_traceback(daemon)


def test_sweep_timeout_cancels_the_query_and_the_schedule_goes_on(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = write_daemon_config(
        tmp_path, db, sweeps={"s": {"interval": "1s", "timeout": "1s"}}, seconds=30, drain="1s"
    )
    daemon = start_daemon(config)
    daemon.ready()
    first = wait_until(lambda: runs(db), 15, "a first run")[0]
    wait_until(lambda: len(runs(db)) >= 2, 15, "a later run")
    # The first run's query was cancelled on the server: no sweeperd pg_sleep started before
    # the second run is still there.
    second = runs(db)[1]
    wait_until(
        lambda: not [s for _p, s, _a in active_naps(db) if s < second.started],
        5,
        "the timed-out query to disappear from pg_stat_activity",
    )
    assert runs(db)[0].finished is None
    assert first.id == runs(db)[0].id
    stopped = daemon.wait_log("sweep stopped early; unfinished operations cancelled", 10)
    assert stopped[0]["reason"] == "sweep timed out"
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    no_traceback(daemon)


# -- maintenance window -------------------------------------------------------------------------


def test_maintenance_window_outside_it_the_sweep_does_not_start(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    now = dt.datetime.now(dt.UTC)

    def hhmm(hours: int) -> str:
        return (now + dt.timedelta(hours=hours)).strftime("%H:%M")

    config = write_daemon_config(
        tmp_path,
        db,
        tenants=("acme", "globex"),
        sweeps={
            "inside": {"interval": "1s", "tenants": ["acme"], "window": f"{hhmm(-1)}-{hhmm(2)}"},
            "outside": {"interval": "1s", "tenants": ["globex"], "window": f"{hhmm(2)}-{hhmm(3)}"},
        },
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: len(runs(db, sweep="inside")) >= 2, 15, "two runs inside the window")
    not_started = daemon.wait_log("outside the maintenance window; not started", 10, count=2)
    assert {e["sweep"] for e in not_started} == {"outside"}
    assert daemon.stop() == 0
    assert runs(db, sweep="outside") == []
    no_traceback(daemon)


# -- connections: bounded across firings, databases that fail alone, standbys ------------------


RUNS_TABLE = (
    "CREATE TABLE public.runs (id bigserial PRIMARY KEY, sweep text NOT NULL, "
    "tenant text NOT NULL, pid int NOT NULL, started timestamptz NOT NULL, finished timestamptz)"
)


def write_databases_config(
    directory: Path,
    databases: Mapping[str, str],
    *,
    sweeps: Mapping[str, Mapping[str, Any]],
    tenants: Mapping[str, str],
    seconds: float = 0.0,
    history: bool = True,
) -> Path:
    """Like write_daemon_config, with several databases (name → dsn) and tenants
    (name → database, schema tenant_<name>)."""
    plugins_d = directory / "plugins.d"
    plugins_d.mkdir(exist_ok=True)
    (plugins_d / "nap.py").write_text(NAP_PLUGIN, encoding="utf-8")
    doc: dict[str, Any] = {
        "daemon": {"plugin_dirs": ["plugins.d"], "drain_timeout": "5s"},
        "log": {"format": "json", "level": "info"},
        "history": {"enabled": history},
        "databases": {
            name: {"dsn": dsn, "max_connections": 4, "connect_timeout": "2s"}
            for name, dsn in databases.items()
        },
        "tenants": [
            {"name": name, "database": database, "schema": f"tenant_{name}"}
            for name, database in tenants.items()
        ],
        "sweeps": {name: {"operations": ["nap.*"], **body} for name, body in sweeps.items()},
        "plugins": {"nap": {"seconds": seconds}},
    }
    path = directory / "sweeperd.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def finished_sweeps(daemon: Daemon) -> list[dict[str, Any]]:
    return daemon.events("sweep finished")


def primary_and_standby(
    scratch_server: Callable[..., ScratchServer], *schemas: str
) -> tuple[ScratchServer, ScratchServer]:
    """A primary with the runs table and ``schemas``, and a streaming standby caught up."""
    primary = scratch_server()
    for schema in schemas:
        primary.execute(f"CREATE SCHEMA {schema}")
    primary.execute(RUNS_TABLE)
    standby = standby_of(primary)
    standby.wait_caught_up()
    return primary, standby


def a_stopped_server(scratch_server: Callable[..., ScratchServer]) -> ScratchServer:
    """A server with tenant_initech and the runs table, stopped (connections are refused)."""
    server = scratch_server()
    server.execute("CREATE SCHEMA tenant_initech")
    server.execute(RUNS_TABLE)
    server.stop()
    return server


def wait_for_a_run_since(server: ScratchServer, since: Any, daemon: Daemon, within: float) -> None:
    wait_until(
        lambda: server.scalar("SELECT count(*) FROM public.runs WHERE started > %s", (since,)),
        within,
        f"a run on {server} since {since}\n{daemon.stderr()}",
    )


def test_a_daemon_never_holds_more_than_max_connections_over_many_firings(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    tenants = tuple(f"t{i}" for i in range(10))
    run_sql(db, *(f"CREATE SCHEMA tenant_{t}" for t in tenants))
    # History on: sweeperd's own bookkeeping (claims, history) counts against the bound too.
    config = write_daemon_config(
        tmp_path,
        db,
        sweeps={"often": {"interval": "2s", "per_tenant_concurrency": 4}},
        tenants=tenants,
        seconds=0.2,
        history=True,
        database={"max_connections": 4},
    )
    daemon = start_daemon(config)
    daemon.ready()
    counts: list[int] = []
    deadline = time.monotonic() + 90
    while len(finished_sweeps(daemon)) < 15:
        assert time.monotonic() < deadline, f"15 firings not done in 90 s\n{daemon.stderr()}"
        counts.append(len(sweeperd_backends(db)))
        time.sleep(0.02)
    assert daemon.stop() == 0
    assert max(counts) <= 4, Counter(counts)  # the leak took it to 8, 15, 22, 29 ...
    assert max(counts) == 4, Counter(counts)  # and the bound is really used
    assert 0 in counts[len(counts) // 2 :]  # between firings the daemon holds no connection
    assert all(e["ok"] == len(tenants) for e in finished_sweeps(daemon)[:15])
    no_traceback(daemon)


def test_a_database_down_at_start_is_swept_as_soon_as_it_comes_up(
    tmp_path: Path,
    db: str,
    start_daemon: Callable[..., Daemon],
    scratch_server: Callable[..., ScratchServer],
) -> None:
    other = a_stopped_server(scratch_server)
    config = write_databases_config(
        tmp_path,
        {"main": db, "other": other.dsn()},
        sweeps={"often": {"interval": "1s"}},
        tenants={"acme": "main", "initech": "other"},
    )
    daemon = start_daemon(config)
    ready = daemon.ready()
    assert "unreachable: other (retrying)" in fields(ready)["STATUS"], ready
    # The healthy database is swept while the other is down; the other's items say why.
    wait_until(lambda: len(runs(db)) >= 2, 20, "runs in the healthy database")
    down = [e for e in daemon.events("operation failed") if e.get("database") == "other"]
    assert down and all("database unreachable" in e["error"] for e in down), daemon.stderr()
    assert "refused" in down[0]["error"].lower()
    retries = daemon.wait_log("database still unreachable; retrying", 20)
    assert "refused" in retries[0]["error"].lower()

    other.start()
    wait_until(
        lambda: other.scalar("SELECT count(*) FROM public.runs"),
        40,
        f"a run in the database that came up\n{daemon.stderr()}",
    )
    assert daemon.events("database reachable again")
    assert daemon.proc.poll() is None  # no restart
    assert daemon.stop() == 0
    no_traceback(daemon)


def test_standby_items_are_skipped_and_run_there_after_promotion(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    scratch_server: Callable[..., ScratchServer],
) -> None:
    primary, standby = primary_and_standby(scratch_server, "tenant_acme", "tenant_beta")
    assert standby.in_recovery()
    config = write_databases_config(
        tmp_path,
        {"primary": primary.dsn(), "replica": standby.dsn()},
        sweeps={"often": {"interval": "1s"}},
        tenants={"acme": "primary", "beta": "replica"},
        history=True,
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: len(finished_sweeps(daemon)) >= 2, 20, "two sweeps")
    for event in finished_sweeps(daemon):
        assert (event["ok"], event["skipped"], event["failed"]) == (1, 1, 0), event
    # Nothing was attempted on the standby: no claim, no history write, no failure.
    text = daemon.stderr()
    assert "could not claim" not in text and "cannot write the run history" not in text
    assert daemon.events("operation failed") == []

    promoted_at = standby.scalar("SELECT now()")
    standby.promote()
    wait_for_a_run_since(standby, promoted_at, daemon, 30)
    assert daemon.events("database is no longer a standby; its work runs again")
    # A sweep that began before the promotion may still end (and write its history) after it
    # with the standby's item skipped; a later one runs both.
    wait_until(
        lambda: any((e["ok"], e["skipped"]) == (2, 0) for e in finished_sweeps(daemon)),
        30,
        f"a sweep running both items\n{daemon.stderr()}",
    )
    # And the promoted server got the run history.
    assert standby.scalar("SELECT count(*) FROM sweeperd.runs") >= 1
    assert daemon.stop() == 0
    no_traceback(daemon)


def test_a_multi_host_dsn_follows_a_failover(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    scratch_server: Callable[..., ScratchServer],
) -> None:
    primary, standby = primary_and_standby(scratch_server, "tenant_acme")
    dsn = (
        f"host={primary.host},{standby.host} port={primary.port},{standby.port} "
        "dbname=postgres user=postgres target_session_attrs=read-write connect_timeout=2"
    )
    config = write_databases_config(
        tmp_path, {"main": dsn}, sweeps={"often": {"interval": "1s"}}, tenants={"acme": "main"}
    )
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: primary.scalar("SELECT count(*) FROM public.runs"), 20, "a run")
    primary.stop()
    standby.promote()
    promoted_at = standby.scalar("SELECT now()")
    wait_for_a_run_since(standby, promoted_at, daemon, 40)
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    no_traceback(daemon)


def test_reloads_and_overlapping_sweeps_never_exceed_max_connections(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    tenants = tuple(f"t{i}" for i in range(8))
    run_sql(db, *(f"CREATE SCHEMA tenant_{t}" for t in tenants))
    sweeps = {"a": {"interval": "1s"}, "b": {"interval": "1s"}}

    def write(max_connections: int) -> None:
        write_daemon_config(
            tmp_path,
            db,
            sweeps=sweeps,
            tenants=tenants,
            seconds=0.3,
            history=True,
            database={"max_connections": max_connections},
        )

    write(4)
    daemon = start_daemon(tmp_path / "sweeperd.toml")
    daemon.ready()
    counts: list[int] = []

    def sample(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            counts.append(len(sweeperd_backends(db)))
            time.sleep(0.02)

    sample(2.0)
    for limit in (3, 4, 3):
        # A changed database setting reopens the pool while sweeps still run on the old one.
        write(limit)
        daemon.send(signal.SIGHUP)
        sample(2.5)
    reloads = wait_until(
        lambda: (lambda found: found if len(found) >= 3 else None)(
            daemon.events("configuration reloaded")
        ),
        15,
        f"three reloads\n{daemon.stderr()}",
    )
    assert all(r["reopened"] == ["main"] for r in reloads), reloads
    assert daemon.stop() == 0
    assert max(counts) <= 4, Counter(counts)
    assert max(counts) >= 3, Counter(counts)
    no_traceback(daemon)


def test_a_reload_that_adds_an_unreachable_database_is_accepted_and_it_is_retried(
    tmp_path: Path,
    db: str,
    start_daemon: Callable[..., Daemon],
    scratch_server: Callable[..., ScratchServer],
) -> None:
    other = a_stopped_server(scratch_server)
    sweeps = {"often": {"interval": "1s"}}
    config = write_databases_config(tmp_path, {"main": db}, sweeps=sweeps, tenants={"acme": "main"})
    daemon = start_daemon(config)
    daemon.ready()
    write_databases_config(
        tmp_path,
        {"main": db, "other": other.dsn()},
        sweeps=sweeps,
        tenants={"acme": "main", "initech": "other"},
    )
    _reloading, ready, _before, _after = daemon.reload()
    status = fields(ready)["STATUS"]
    assert "reload failed" not in status and "unreachable: other" in status, status
    (reloaded,) = daemon.events("configuration reloaded")
    assert reloaded["unreachable"] == ["other"]
    seen = len(runs(db))
    wait_until(lambda: len(runs(db)) > seen, 15, "main still swept")
    other.start()
    wait_until(
        lambda: other.scalar("SELECT count(*) FROM public.runs"),
        40,
        f"a run in the added database once it is up\n{daemon.stderr()}",
    )
    assert daemon.stop() == 0
    no_traceback(daemon)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_behind_pgbouncer_a_daemon_stays_bounded_over_firings_and_stops_at_once(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon], mode: str
) -> None:
    """Under a session pooler the connection leak ended in a daemon waiting for a server
    connection PgBouncer would never give, and ignoring SIGTERM for minutes."""
    tenants = tuple(f"t{i}" for i in range(6))
    run_sql(db, *(f"CREATE SCHEMA tenant_{t}" for t in tenants))
    with PgBouncer(db, pool_mode=mode, default_pool_size=4) as bouncer:
        config = write_daemon_config(
            tmp_path,
            bouncer.through(db),
            sweeps={"often": {"interval": "1s", "per_tenant_concurrency": 4}},
            tenants=tenants,
            seconds=0.1,
            history=True,
            database={"max_connections": 4, "pooler": mode},
        )
        daemon = start_daemon(config)
        daemon.ready()
        clients: list[int] = []
        deadline = time.monotonic() + 60
        while len(finished_sweeps(daemon)) < 8:
            assert time.monotonic() < deadline, daemon.stderr()
            pools = bouncer.admin("SHOW POOLS")
            clients.append(
                sum(p["cl_active"] + p["cl_waiting"] for p in pools if p["database"] != "pgbouncer")
            )
            time.sleep(0.05)
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < STOP_SLACK
    assert max(clients) <= 4, Counter(clients)
    assert all(e["ok"] == len(tenants) for e in finished_sweeps(daemon)[:8])
    no_traceback(daemon)


# -- sweeperd pause / resume: two instances, one database -------------------------------------

PAUSE_CHECK_EVERY = 0.5


def paused_daemon_config(directory: Path, dsn: str, sweep: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_daemon_config(
        directory,
        dsn,
        sweeps={sweep: {"interval": "1s"}},
        tenants=("acme", "globex"),
        seconds=0.1,
        database={"throttle": {"check_every": f"{PAUSE_CHECK_EVERY}s"}},
    )


def started_since(dsn: str, sweep: str, since: dt.datetime) -> int:
    return sum(1 for r in runs(dsn, sweep=sweep) if r.started > since)


def test_pause_stops_every_instance_within_check_every_and_resume_restarts_them(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    configs = {name: paused_daemon_config(tmp_path / name, db, name) for name in ("a", "b")}
    daemons = {name: start_daemon(path) for name, path in configs.items()}
    for name, daemon in daemons.items():
        daemon.ready()
        wait_until(lambda name=name: runs(db, sweep=name), 20, f"sweep {name} to run")

    paused = run_cli("pause", "-c", str(configs["a"]), "--reason", "incident 42")
    assert paused.returncode == 0, paused.stderr
    assert "incident 42" in paused.stdout
    [(paused_at,)] = query(db, "SELECT paused_at FROM sweeperd.pause")
    took_effect = paused_at + dt.timedelta(seconds=PAUSE_CHECK_EVERY + 1.0)
    # Both instances: within check_every + 1 s nothing new starts, then nothing for 3 s more.
    time.sleep(PAUSE_CHECK_EVERY + 1.0 + 3.0)
    for name in daemons:
        assert started_since(db, name, took_effect) == 0, runs(db, sweep=name)
    # Each says so in its STATUS line.
    for daemon in daemons.values():
        daemon.notify.expect(
            lambda m: any(
                f.startswith("STATUS=") and "throttled: main (paused by " in f for f in m
            ),
            5,
            "STATUS saying the database is paused",
        )

    resumed = run_cli("resume", "-c", str(configs["b"]))
    assert resumed.returncode == 0, resumed.stderr
    [(resumed_at,)] = query(db, "SELECT now()")
    for name in daemons:
        wait_until(
            lambda name=name: started_since(db, name, resumed_at),
            PAUSE_CHECK_EVERY + 5,
            f"sweep {name} to start work again",
        )
    for daemon in daemons.values():
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.stderr()


def test_a_pause_for_a_duration_ends_by_itself(
    tmp_path: Path, db: str, start_daemon: Callable[..., Daemon]
) -> None:
    config = paused_daemon_config(tmp_path, db, "a")
    daemon = start_daemon(config)
    daemon.ready()
    wait_until(lambda: runs(db, sweep="a"), 20, "the sweep to run")
    paused = run_cli("pause", "-c", str(config), "--for", "3s")
    assert paused.returncode == 0, paused.stderr
    [(paused_at, until)] = query(db, "SELECT paused_at, until FROM sweeperd.pause")
    assert until - paused_at == dt.timedelta(seconds=3)
    time.sleep(PAUSE_CHECK_EVERY + 1.0)
    quiet_from = paused_at + dt.timedelta(seconds=PAUSE_CHECK_EVERY + 1.0)
    wait_until(lambda: started_since(db, "a", until), 10, "work after the pause expired")
    assert [r for r in runs(db, sweep="a") if quiet_from < r.started <= until] == []
    assert daemon.stop() == 0
