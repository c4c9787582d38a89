"""Bounds on concurrency shared by every sweep of a process, and how a sweep is stopped early."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .gates import TableGate, TenantGate
from .model import Status

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int
    per_database: Mapping[str, int]

    @classmethod
    def of(cls, config: Config) -> Limits:
        """The configuration's: ``[daemon] max_concurrency`` and each database's connections."""
        return cls(
            max_concurrency=config.daemon.max_concurrency,
            per_database={name: db.max_connections for name, db in config.databases.items()},
        )


class Bounds:
    """The global and per-database slots, shared by every sweep running in one process.

    A reload builds new bounds from the new limits but keeps each semaphore whose limit did not
    change, so sweeps that straddle a reload still count against the same slots.
    """

    def __init__(self, limits: Limits, previous: Bounds | None = None) -> None:
        self.limits = limits
        # Not tied to any limit: always carried over, so exclusion holds across a reload.
        self.tables: TableGate = previous.tables if previous is not None else TableGate()
        self.tenants: TenantGate = previous.tenants if previous is not None else TenantGate()
        self.global_slots: asyncio.Semaphore
        if previous is not None and previous.limits.max_concurrency == limits.max_concurrency:
            self.global_slots = previous.global_slots
        else:
            self.global_slots = asyncio.Semaphore(limits.max_concurrency)
        self.per_database: dict[str, asyncio.Semaphore] = {}
        for name, n in limits.per_database.items():
            old = previous.per_database.get(name) if previous is not None else None
            same = previous is not None and previous.limits.per_database.get(name) == n
            self.per_database[name] = old if same and old is not None else asyncio.Semaphore(n)


class Stop:
    """Ends a sweep early: at a deadline (timeout, window end) or on request (replace, drain).

    The earliest deadline wins; ``reason`` says why, for the cancelled items' ``error``.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None
        self._deadline: float | None = None
        self._deadline_reason = ""

    def at(self, seconds_from_now: float, reason: str) -> None:
        deadline = time.monotonic() + seconds_from_now
        if self._deadline is None or deadline < self._deadline:
            self._deadline, self._deadline_reason = deadline, reason

    def now(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def remaining(self) -> float | None:
        """Seconds until the deadline (None: there is none)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def why(self) -> str:
        """Why the sweep ended early: the request's reason, else the deadline's."""
        return self.reason or self._deadline_reason or "sweep timed out"


# Asked right before an item starts: None to run it, or the status and reason to report instead
# (the daemon is stopping, the maintenance window has closed).
Gate = Callable[[], tuple[Status, str] | None]
