"""Turns a sweep's selection into work items and the order constraints between them.

Work items are (tenant, operation) pairs, or (database, operation) for scope ``database``. Two items
that touch the same table of the same tenant must not overlap; among them, lower
:class:`~sweeperd.model.Phase` first (prune before vacuum). That is expressed as dependencies: each
item waits for the previous item on each of its tables. Since the order is a total order per
tenant, the dependency graph has no cycles, and items on different tables run concurrently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .config import Config, SweepConfig
from .model import ALL_TABLES, Operation, Target, Tenant, escape_glob
from .problems import Problems

ALL_SWEEPS = "*"


class SelectionError(Problems):
    """The requested sweep does not exist (a usage error: exit 2)."""


class PlanError(Problems):
    """Operations' ``after`` constraints contradict each other (a plugin bug)."""


@dataclass(slots=True)
class WorkItem:
    index: int
    operation: Operation
    tenant: Tenant | None
    database: str
    deps: list[int] = field(default_factory=list)
    timeout: float | None = None  # seconds before the runner cancels it
    target: Target | None = None  # what an expanding operation found for it at plan time
    failure: str | None = None  # it could not be planned: reported failed with this reason

    @property
    def schema(self) -> str | None:
        return self.tenant.schema if self.tenant else None

    @property
    def tables(self) -> tuple[str, ...]:
        return self.target.tables if self.target is not None else self.operation.tables

    @property
    def priority(self) -> float:
        """Higher starts first (the target's score; static operations 0)."""
        return self.target.score if self.target is not None else 0.0

    @property
    def label(self) -> str:
        """How the item appears in ``application_name`` and logs."""
        where = self.tenant.name if self.tenant else self.database
        if self.target is not None:
            return f"{self.operation.name} {where} {self.target.name}"
        return f"{self.operation.name} {where}"


@dataclass(frozen=True, slots=True)
class Plan:
    sweep: str
    items: tuple[WorkItem, ...]
    per_tenant_concurrency: int
    timeout: float | None
    # Per expanding operation: how much its expansion looked at and found no work for.
    not_needed: Mapping[str, int] = field(default_factory=dict)


def matches(name: str, globs: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch-style, case-sensitive, anchored ``globs``.

    A glob that is exactly ``name`` matches it even when the name holds ``*``, ``?`` or ``[``
    (``vacuum."x[1]"``, the name of the vacuum of table ``x[1]``): the name copied from a report
    must select its operation. :func:`exact_names` keeps such a glob from matching others too.
    """
    return any(name == g or fnmatchcase(name, g) for g in globs)


def exact_names(globs: Iterable[str], names: Collection[str]) -> tuple[str, ...]:
    """``globs`` with each one that is exactly one of ``names`` made to match that name only.

    Without this, ``vacuum."x[1] y"`` would also select ``vacuum."x1 y"`` (``[1]`` is a
    character set to fnmatch), and ``vacuum."a*b"`` every quoted name from ``a`` to ``b``.
    For operation names only: plugins make them, quoting what is unusual. Never for tenant
    names, which come from the catalog: a schema ``tenant_*`` would make the glob ``*`` mean
    that one tenant.
    """
    return tuple(escape_glob(g) if g in names else g for g in globs)


def make_plan(
    config: Config,
    operations: Mapping[str, Operation],
    tenants: Sequence[Tenant],
    *,
    sweep: str | None = None,
    tenant_globs: Sequence[str] = (),
    only_globs: Sequence[str] = (),
    database_scope_in: Iterable[str] | None = None,
) -> Plan:
    """Select (tenant, operation) pairs for ``sweep`` (None: every configured sweep once).

    ``tenant_globs`` and ``only_globs`` (the CLI's ``--tenant``/``--only``) narrow the selection
    further. Database-scope operations run once per database that has a selected tenant, or on
    every configured database when no ``--tenant`` narrowing was asked for; ``database_scope_in``
    (another instance owns the rest) narrows that further.
    """
    allowed_dbs = set(database_scope_in) if database_scope_in is not None else None
    sweeps = _sweeps(config, sweep)
    ops = list(operations.values())
    # A glob that is exactly a name means that name only (model.operation_name says why).
    only_globs = exact_names(only_globs, operations)
    # Tenant globs stay globs (a name equal to one also matches, see matches()): tenant names
    # come from the catalog, and a schema "tenant_*" must not turn "*" into "that one only".
    # Each pair remembers the (first) sweep that selected it: its operation_timeout applies.
    pairs: dict[tuple[str, str, str], tuple[Operation, Tenant, SweepConfig]] = {}
    db_ops: dict[tuple[str, str], tuple[Operation, str, SweepConfig]] = {}
    for sw in sweeps:
        selected_dbs: set[str] = set()  # per sweep: another sweep's tenants must not count
        sweep_globs = exact_names(sw.operations, operations)
        chosen_ops = [
            op
            for op in ops
            if matches(op.name, sweep_globs) and (not only_globs or matches(op.name, only_globs))
        ]
        chosen_tenants = [
            t
            for t in tenants
            if matches(t.name, sw.tenants) and (not tenant_globs or matches(t.name, tenant_globs))
        ]
        for tenant in chosen_tenants:
            selected_dbs.add(tenant.database)
            for op in chosen_ops:
                if op.scope == "tenant":
                    pairs.setdefault((tenant.database, tenant.name, op.name), (op, tenant, sw))
        databases = selected_dbs if tenant_globs else set(config.databases) | selected_dbs
        if allowed_dbs is not None:
            databases &= allowed_dbs
        for db in sorted(databases):
            for op in chosen_ops:
                if op.scope == "database":
                    db_ops.setdefault((db, op.name), (op, db, sw))

    op_order = {name: i for i, name in enumerate(operations)}
    tenant_order = {(t.database, t.name): i for i, t in enumerate(tenants)}
    items: list[WorkItem] = []
    # Database-scope work first (there is little of it and it is often the largest table), then
    # by phase so that pruning, which unblocks vacuums, is queued ahead of them.
    for op, db, sw in sorted(
        db_ops.values(), key=lambda p: (p[0].phase, p[1], op_order[p[0].name])
    ):
        items.append(
            WorkItem(
                index=len(items), operation=op, tenant=None, database=db, timeout=_timeout(op, sw)
            )
        )
    for op, tenant, sw in sorted(
        pairs.values(),
        key=lambda p: (p[0].phase, tenant_order[(p[1].database, p[1].name)], op_order[p[0].name]),
    ):
        items.append(
            WorkItem(
                index=len(items),
                operation=op,
                tenant=tenant,
                database=tenant.database,
                timeout=_timeout(op, sw),
            )
        )
    link(items)
    return Plan(
        sweep=sweep or ALL_SWEEPS,
        items=tuple(items),
        per_tenant_concurrency=min((s.per_tenant_concurrency for s in sweeps), default=4),
        # Without a sweep name every sweep's work runs at once: bounded by the largest of their
        # timeouts (one sweep's shorter bound would cut another's work short).
        timeout=_max_optional(s.timeout for s in sweeps),
    )


def link(items: Sequence[WorkItem]) -> None:
    """Set every item's dependencies from its tables, phases and ``after`` (indices must be
    positions); raise :class:`PlanError` on a cycle."""
    for item in items:
        item.deps = []
    _link_same_table_items(items)
    _link_after(items)
    _check_acyclic(items)


def _timeout(op: Operation, sweep: SweepConfig) -> float | None:
    """The operation's own timeout, else the selecting sweep's ``operation_timeout``."""
    return op.timeout if op.timeout is not None else sweep.operation_timeout


def require_sweep(config: Config, sweep: str) -> SweepConfig:
    """``[sweeps.<sweep>]``, or :class:`SelectionError` naming the sweeps there are."""
    if sweep not in config.sweeps:
        known = ", ".join(sorted(config.sweeps)) or "none configured"
        raise SelectionError(f"no sweep named {sweep!r} in {config.path} (known: {known})")
    return config.sweeps[sweep]


def _sweeps(config: Config, sweep: str | None) -> list[SweepConfig]:
    if sweep is not None:
        return [require_sweep(config, sweep)]
    if config.sweeps:
        return list(config.sweeps.values())
    # No sweeps configured: "every operation once" still means something useful.
    return [SweepConfig(name=ALL_SWEEPS)]


def _max_optional(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _link_same_table_items(items: Sequence[WorkItem]) -> None:
    """Give each item a dependency on the previous item touching each of its tables.

    Items are grouped per conflict domain: a tenant's schema, or a database for scope
    ``database``. Within a domain the order is (phase, position), so an earlier phase finishes
    before a later one on the same table, and "*" (any table) waits for everything before it.
    """
    domains: dict[tuple[str, str | None], list[WorkItem]] = defaultdict(list)
    for item in items:
        if item.tables:
            domains[(item.database, item.schema)].append(item)
    for members in domains.values():
        members.sort(key=lambda it: (it.operation.phase, it.index))
        last_by_table: dict[str, int] = {}
        last_all: int | None = None
        since_all: list[int] = []
        for item in members:
            deps: set[int] = set()
            if ALL_TABLES in item.tables:
                deps.update(since_all)
                if last_all is not None:
                    deps.add(last_all)
                last_all, since_all = item.index, []
                last_by_table.clear()
            else:
                for table in item.tables:
                    previous = last_by_table.get(table, last_all)
                    if previous is not None:
                        deps.add(previous)
                    last_by_table[table] = item.index
                since_all.append(item.index)
            item.deps = sorted(deps)


def _link_after(items: Sequence[WorkItem]) -> None:
    """Add dependencies from ``Operation.after``: per tenant, or per database for scope database."""
    if not any(item.operation.after for item in items):
        return
    names = {item.operation.name for item in items}
    by_tenant: dict[tuple[str, str], list[WorkItem]] = defaultdict(list)
    by_database: dict[str, list[WorkItem]] = defaultdict(list)
    for item in items:
        by_database[item.database].append(item)
        if item.tenant is not None:
            by_tenant[(item.database, item.tenant.name)].append(item)
    for item in items:
        globs = exact_names(item.operation.after, names)
        if not globs:
            continue
        pool = (
            by_database[item.database]
            if item.tenant is None
            else by_tenant[(item.database, item.tenant.name)]
        )
        extra = {
            other.index
            for other in pool
            if other is not item and matches(other.operation.name, globs)
        }
        item.deps = sorted(set(item.deps) | extra)


def _check_acyclic(items: Sequence[WorkItem]) -> None:
    """Kahn's algorithm: a cycle would leave its items waiting for each other forever."""
    waiting = {item.index: len(item.deps) for item in items}
    dependents: dict[int, list[int]] = defaultdict(list)
    for item in items:
        for dep in item.deps:
            dependents[dep].append(item.index)
    ready = [i for i, n in waiting.items() if n == 0]
    seen = 0
    while ready:
        index = ready.pop()
        seen += 1
        for nxt in dependents[index]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if seen != len(items):
        stuck = sorted({items[i].operation.name for i, n in waiting.items() if n > 0})
        raise PlanError(f"operations wait for each other in a cycle: {', '.join(stuck)}")
