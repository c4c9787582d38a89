"""Process-wide exclusion that outlives one sweep: tables in use, operations per tenant.

Within one sweep the planner already orders operations that share a table. Two sweeps can run at
once though (a nightly sweep still going when an hourly one fires), and they must not DELETE from
or VACUUM the same table of the same tenant at the same time, nor together exceed a tenant's
``per_tenant_concurrency``. These gates are shared by every sweep of the process.

A :data:`Gate` is the other kind, one sweep's own: asked right before each of its items starts.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from .model import ALL_TABLES, Status

# Asked right before an item starts, with how long the item is expected to take (seconds, None:
# unknown): None to run it, or the status and reason to report instead (the daemon is stopping,
# the maintenance window has closed or would close before the item could finish).
Gate = Callable[[float | None], tuple[Status, str] | None]

# (database, schema): schema None holds the schema-qualified tables of database-scope operations.
Domain = tuple[str, str | None]


class _TableState:
    def __init__(self) -> None:
        self.busy: set[str] = set()
        self.exclusive = False  # an operation on "*" (any table) is running
        self.changed = asyncio.Condition()

    def free(self, tables: frozenset[str]) -> bool:
        if self.exclusive:
            return False
        if ALL_TABLES in tables:
            return not self.busy
        return self.busy.isdisjoint(tables)


class TableGate:
    """Exclusive use of a set of tables in a domain, taken all at once (so no deadlock)."""

    def __init__(self) -> None:
        self._domains: dict[Domain, _TableState] = defaultdict(_TableState)

    @asynccontextmanager
    async def hold(self, domain: Domain, tables: Iterable[str]) -> AsyncIterator[None]:
        wanted = frozenset(tables)
        if not wanted:
            yield
            return
        state = self._domains[domain]
        async with state.changed:
            await state.changed.wait_for(lambda: state.free(wanted))
            if ALL_TABLES in wanted:
                state.exclusive = True
            else:
                state.busy |= wanted
        try:
            yield
        finally:
            async with state.changed:
                if ALL_TABLES in wanted:
                    state.exclusive = False
                else:
                    state.busy -= wanted
                state.changed.notify_all()


class _Count:
    def __init__(self) -> None:
        self.active = 0
        self.changed = asyncio.Condition()


class TenantGate:
    """At most ``limit`` operations of one tenant at once, counted across all sweeps.

    Each caller brings its own sweep's limit, so a sweep with per_tenant_concurrency 1 really
    runs alone on a tenant even while another sweep with a higher limit is busy there.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], _Count] = defaultdict(_Count)

    @asynccontextmanager
    async def hold(self, key: tuple[str, str], limit: int) -> AsyncIterator[None]:
        count = self._counts[key]
        async with count.changed:
            await count.changed.wait_for(lambda: count.active < limit)
            count.active += 1
        try:
            yield
        finally:
            async with count.changed:
                count.active -= 1
                count.changed.notify_all()
