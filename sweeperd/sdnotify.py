"""systemd's notify protocol in pure Python (``sd_notify(3)``), and the watchdog.

A datagram to the AF_UNIX socket in ``$NOTIFY_SOCKET`` (``@name`` is an abstract socket). Without
``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("sweeperd.sdnotify")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self._socket: socket.socket | None = None
        self._status: str | None = None  # the last STATUS= systemd has
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False (and a log line) if it failed."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            if self._socket is None:
                # Non-blocking: a receiver that does not read (a stuck manager) fills the
                # datagram queue, and a blocking send would then freeze the event loop, every
                # sweep with it. A STATUS= that cannot be queued is superseded by the next one.
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(payload, self.address)
        except BlockingIOError:
            self._status = None  # whatever systemd shows now, resend the next one
            if fields[0].startswith("STATUS="):
                return False
            log.warning(
                "sd_notify: the notify socket's queue is full; message dropped", message=fields[0]
            )
            return False
        except OSError as exc:
            # systemd being gone must not take the daemon down; it is worth a log line though.
            log.warning("sd_notify failed", error=str(exc))
            self._status = None
            return False
        for f in fields:
            if f.startswith("STATUS="):
                self._status = f.removeprefix("STATUS=")
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """``STATUS=``, unless it is what systemd already shows (however it was last sent)."""
        if status != self._status:
            self.notify(f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def watchdog(self) -> None:
        """Ping at half the interval from the event loop: a blocked loop misses its pings."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. we were started by a wrapper)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
