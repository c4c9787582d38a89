"""``sweeperd sweep``: one sweep from start to finish: open the databases, find the tenants,
plan, run, record, close.

The daemon does the same steps per firing (:mod:`sweeperd.controller`) with databases it keeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from .config import Config
from .databases import open_databases
from .history import History
from .limits import Bounds, Limits
from .planner import SelectionError, make_plan, matches, require_sweep
from .plugins import Plugins
from .report import SweepReport
from .runner import Runner
from .tenants import resolve_tenants

log = structlog.get_logger("sweeperd.sweep")


def relevant_databases(config: Config, tenant_globs: Sequence[str]) -> list[str]:
    """The databases a sweep needs: all of them, or with ``--tenant`` only those that can match."""
    if not tenant_globs:
        return list(config.databases)
    wanted = {t.database for t in config.tenants if matches(t.name, tenant_globs)}
    wanted |= {s.database for s in config.tenant_sources}
    return [name for name in config.databases if name in wanted]


async def sweep_once(
    config: Config,
    plugins: Plugins,
    *,
    sweep: str | None = None,
    tenant_globs: Sequence[str] = (),
    only_globs: Sequence[str] = (),
    dry_run: bool = False,
) -> SweepReport:
    """Run one sweep now. Raises SelectionError for an unknown sweep before connecting."""
    if sweep is not None:
        require_sweep(config, sweep)
    for glob in only_globs:
        # A typo in --only must not look like a clean run of nothing (exit 0).
        if not any(matches(name, [glob]) for name in plugins.operations):
            known = ", ".join(sorted(plugins.operations)) or "none"
            raise SelectionError(f"no operation matches --only {glob!r} (known: {known})")
    databases, unreachable = await open_databases(config, relevant_databases(config, tenant_globs))
    try:
        tenants, failed = await resolve_tenants(config, databases)
        unreachable = {**unreachable, **failed}
        for glob in tenant_globs:
            if not unreachable and not any(matches(t.name, [glob]) for t in tenants):
                known = ", ".join(sorted({t.name for t in tenants})[:20]) or "none"
                raise SelectionError(f"no tenant matches --tenant {glob!r} (known: {known})")
        plan = make_plan(
            config,
            plugins.operations,
            tenants,
            sweep=sweep,
            tenant_globs=tenant_globs,
            only_globs=only_globs,
        )
        runner = Runner(databases, plugins.pm, config.plugins, Bounds(Limits.of(config)))
        report = await runner.run(plan, dry_run=dry_run, unreachable=unreachable)
        if not dry_run:
            selection = " ".join(
                [*(f"--tenant {g}" for g in tenant_globs), *(f"--only {g}" for g in only_globs)]
            )
            await History(config.history).record(
                report, databases, trigger="manual", selection=selection or None
            )
        return report
    finally:
        await asyncio.gather(*(db.close() for db in databases.values()), return_exceptions=True)
