"""Plan-time work items: operations whose items are found when the sweep starts.

An operation with ``expand`` (:class:`~sweeperd.model.Operation`) is planned like any other, one
item per selected tenant; then, once per database, its ``expand`` is called with every one of
those tenants and a connection, and returns :class:`~sweeperd.model.Target` objects, each of which
becomes an item of its own (its own tables, result, span, ordering and score). The whole plan is
then ordered by score, most urgent first, and its dependencies are linked again, so prune-before-
vacuum, the same-table exclusion and ``after`` hold for the new items exactly as for static ones.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog

from .db import Database
from .errors import describe_error
from .model import PlanContext, Target
from .planner import Plan, PlanError, WorkItem, link

log = structlog.get_logger("sweeperd.expansion")


async def expand(
    plan: Plan,
    databases: Mapping[str, Database],
    settings: Mapping[str, Mapping[str, Any]],
    *,
    dry_run: bool = False,
) -> Plan:
    """``plan`` with the items of expanding operations replaced by their targets' items."""
    groups: dict[tuple[str, str], list[WorkItem]] = defaultdict(list)
    for item in plan.items:
        if item.operation.expand is not None:
            groups[(item.database, item.operation.name)].append(item)
    if not groups:
        return plan
    outcomes = await asyncio.gather(
        *(
            _expand_group(members, databases.get(db), settings, plan.sweep, dry_run)
            for (db, _name), members in groups.items()
        )
    )
    replaced: dict[int, list[WorkItem]] = {}
    not_needed: dict[str, int] = dict(plan.not_needed)
    for members, (new_items, skipped) in zip(groups.values(), outcomes, strict=True):
        replaced[members[0].index] = new_items
        for member in members[1:]:
            replaced[member.index] = []
        name = members[0].operation.name
        if skipped:
            not_needed[name] = not_needed.get(name, 0) + skipped
    items: list[WorkItem] = []
    for item in plan.items:
        items.extend(replaced.get(item.index, [item]))
    planned = list(items)
    # Most urgent first, the plan's own order among equals (sorted() is stable).
    items.sort(key=lambda it: -it.priority)
    try:
        _relink(items)
    except PlanError as exc:
        # Same-table order follows position within a phase; by score, it can contradict an
        # operation's `after`. The plan's own order never does: keep that one (the slots still
        # hand out work by score).
        log.warning(
            "plan order by score contradicts `after`; keeping the plan's order", error=str(exc)
        )
        items = planned
        _relink(items)
    return replace(plan, items=tuple(items), not_needed=not_needed)


def _relink(items: list[WorkItem]) -> None:
    for i, item in enumerate(items):
        item.index = i
    link(items)


async def _expand_group(
    members: list[WorkItem],
    database: Database | None,
    settings: Mapping[str, Mapping[str, Any]],
    sweep: str,
    dry_run: bool,
) -> tuple[list[WorkItem], int]:
    """One (database, operation): its items as targets, and how many were not needed."""
    template = members[0]
    operation = template.operation
    if database is None or not database.is_open or database.in_recovery:
        return members, 0  # the runner reports them: unreachable, or a standby
    tenants = [m.tenant for m in members if m.tenant is not None]
    try:
        async with database.housekeeping(f"plan {operation.name}") as conn:
            ctx = PlanContext(
                conn=conn,
                operation=operation,
                database=template.database,
                tenants=tenants,
                settings=settings.get(operation.plugin, {}),
                log=log.bind(operation=operation.name, database=template.database),
                sweep=sweep,
                server_version=database.server_version,
                dry_run=dry_run,
            )
            assert operation.expand is not None
            targets = list(await operation.expand(ctx))
        by_tenant = {(m.tenant.name if m.tenant else None): m for m in members}
        new_items = [_item(by_tenant, target, operation.name) for target in targets]
    except Exception as exc:
        reason = f"could not plan {operation.name}: {describe_error(exc)}"
        log.warning(
            "expansion failed", operation=operation.name, database=database.name, error=reason
        )
        for member in members:
            member.failure = reason
        return members, 0
    return new_items, ctx.not_needed


def _item(by_tenant: Mapping[str | None, WorkItem], target: Target, name: str) -> WorkItem:
    key = target.tenant.name if target.tenant is not None else None
    member = by_tenant.get(key)
    if member is None or (target.tenant is not None and target.tenant != member.tenant):
        raise ValueError(f"{name}: expand returned a target for tenant {key!r}, not one asked for")
    return WorkItem(
        index=-1,
        operation=member.operation,
        tenant=member.tenant,
        database=member.database,
        timeout=member.timeout,
        target=target,
    )
