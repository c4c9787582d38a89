"""Bounds on concurrency shared by every sweep of a process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .gates import TableGate, TenantGate
from .slots import PrioritySlots
from .throttle import Throttle

if TYPE_CHECKING:
    from .config import Config, ThrottleConfig


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int
    per_database: Mapping[str, int]
    throttles: Mapping[str, ThrottleConfig] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config) -> Limits:
        """The configuration's: ``[daemon] max_concurrency`` and each database's connections."""
        return cls(
            max_concurrency=config.daemon.max_concurrency,
            per_database={name: db.max_connections for name, db in config.databases.items()},
            throttles={name: db.throttle for name, db in config.databases.items()},
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
        self.global_slots: PrioritySlots
        if previous is not None and previous.limits.max_concurrency == limits.max_concurrency:
            self.global_slots = previous.global_slots
        else:
            self.global_slots = PrioritySlots(limits.max_concurrency)
        self.per_database: dict[str, PrioritySlots] = {}
        for name, n in limits.per_database.items():
            old = previous.per_database.get(name) if previous is not None else None
            same = previous is not None and previous.limits.per_database.get(name) == n
            self.per_database[name] = old if same and old is not None else PrioritySlots(n)
        # One sampler per database per process; a reload that keeps a database's [throttle]
        # keeps its state (a throttled database stays throttled, no fresh sample needed).
        self.throttles: dict[str, Throttle] = {}
        for name, throttle_config in limits.throttles.items():
            kept = previous.throttles.get(name) if previous is not None else None
            if kept is not None and kept.config == throttle_config:
                self.throttles[name] = kept
            else:
                self.throttles[name] = Throttle(name, throttle_config)
