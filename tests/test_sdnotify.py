"""sd_notify in pure Python: real AF_UNIX datagram sockets bound by the test, path and abstract.

No systemd is needed: the test plays the service manager's side of ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sweeperd.sdnotify import Notifier, monotonic_usec


@contextlib.contextmanager
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory when tmp_path is too long for an AF_UNIX path."""
    if len(os.fsencode(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="swn-"))
    try:
        yield short
    finally:
        for child in short.iterdir():
            child.unlink()
        short.rmdir()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value, the bound receiving socket) for a filesystem socket."""
    with short_dir(tmp_path) as directory:
        path = directory / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(5)
        try:
            yield str(path), sock
        finally:
            sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value "@name", the bound receiving socket) for an abstract socket."""
    name = f"sweeperd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode("utf-8").split("\n")


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65536)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


# -- without NOTIFY_SOCKET ----------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/x"}])
def test_without_a_usable_notify_socket_everything_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier(environ | {"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready("idle")
    notifier.reloading()
    notifier.stopping("bye")
    notifier.status("x")
    notifier.close()
    # The watchdog returns at once instead of pinging nobody forever.
    asyncio.run(asyncio.wait_for(notifier.watchdog(), timeout=5))


def test_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket]
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    assert notifier.enabled
    notifier.status("from the environment")
    assert receive(sock) == ["STATUS=from the environment"]
    notifier.close()

    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


# -- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_arrive_one_datagram_each(kind: str, request: pytest.FixtureRequest) -> None:
    address, sock = request.getfixturevalue(f"{kind}_socket")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    try:
        notifier.ready("idle; next nightly 2026-01-03 03:00 UTC")
        assert receive(sock) == ["READY=1", "STATUS=idle; next nightly 2026-01-03 03:00 UTC"]

        before = monotonic_usec()
        notifier.reloading()
        after = monotonic_usec()
        reloading = receive(sock)
        assert len(reloading) == 2 and reloading[0] == "RELOADING=1"
        key, _, value = reloading[1].partition("=")
        assert key == "MONOTONIC_USEC" and value.isdigit()
        assert before <= int(value) <= after

        notifier.stopping("stopping: draining 2 running sweep(s)")
        assert receive(sock) == ["STOPPING=1", "STATUS=stopping: draining 2 running sweep(s)"]

        notifier.status("running nightly")
        assert receive(sock) == ["STATUS=running nightly"]

        assert notifier.notify("A=1", "B=2", "C=3") is True
        assert receive(sock) == ["A=1", "B=2", "C=3"]
        assert nothing_pending(sock)
    finally:
        notifier.close()


def test_status_is_utf8(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.status("tenant café: 3 ok ✓")
    assert sock.recv(65536) == "STATUS=tenant café: 3 ok ✓".encode()
    notifier.close()


def test_close_then_notify_opens_a_new_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.status("one")
    notifier.close()
    notifier.close()  # idempotent
    notifier.status("two")
    assert receive(sock) == ["STATUS=one"]
    assert receive(sock) == ["STATUS=two"]
    notifier.close()


def test_send_failure_is_logged_not_raised(tmp_path: Path) -> None:
    with short_dir(tmp_path) as directory:
        missing = directory / "nobody-listens.sock"
        notifier = Notifier({"NOTIFY_SOCKET": str(missing)})
        assert notifier.enabled
        with capture_logs() as logs:
            assert notifier.notify("READY=1") is False
            notifier.ready("idle")  # no exception either
        notifier.close()
        warnings = [e for e in logs if e["event"] == "sd_notify failed"]
        assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)
        assert all(e["error"] for e in warnings)


def test_receiver_going_away_and_coming_back(tmp_path: Path) -> None:
    with short_dir(tmp_path) as directory:
        path = directory / "notify.sock"
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as first:
            first.bind(str(path))
            first.settimeout(5)
            notifier.status("a")
            assert receive(first) == ["STATUS=a"]
        path.unlink()
        with capture_logs():
            assert notifier.notify("STATUS=b") is False
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as second:
            second.bind(str(path))
            second.settimeout(5)
            assert notifier.notify("STATUS=c") is True
            assert receive(second) == ["STATUS=c"]
        notifier.close()


# -- watchdog -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "1000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "250000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 1.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "<ours>"}, 1.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "<other>"}, None),
    ],
)
def test_watchdog_interval_from_the_environment(
    environ: dict[str, str], interval: float | None
) -> None:
    env = dict(environ)
    if env.get("WATCHDOG_PID") == "<ours>":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif env.get("WATCHDOG_PID") == "<other>":
        env["WATCHDOG_PID"] = str(os.getppid() if os.getppid() != os.getpid() else 1)
    notifier = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval == interval


def test_watchdog_pings_from_the_event_loop(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval == 0.1

    async def main() -> None:
        task = asyncio.create_task(notifier.watchdog())
        loop = asyncio.get_running_loop()
        pings = 0
        deadline = time.monotonic() + 10
        while pings < 3:
            assert time.monotonic() < deadline, f"only {pings} pings"
            data = await loop.run_in_executor(None, sock.recv, 65536)
            assert data == b"WATCHDOG=1"
            pings += 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    notifier.close()


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    other = str(os.getppid() if os.getppid() != os.getpid() else 1)
    notifier = Notifier(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": other}
    )
    # It returns at once: nothing to do for this process.
    asyncio.run(asyncio.wait_for(notifier.watchdog(), timeout=5))
    assert nothing_pending(sock)
    notifier.close()


# -- monotonic_usec -----------------------------------------------------------------------------


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert isinstance(value, int)
    assert before <= value <= after
    assert monotonic_usec() >= value  # never goes back
