"""One sweep from start to finish: open the databases, find the tenants, plan, run, close.

``sweeperd sweep`` uses this directly; the daemon keeps its databases open between sweeps and
calls :func:`resolve_tenants`, :func:`~sweeperd.planner.make_plan` and the runner itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import structlog

from . import like
from .config import Config
from .db import Database, DatabaseUnreachable, describe_error
from .history import History
from .limits import Limits
from .model import Tenant
from .planner import SelectionError, make_plan, matches
from .plugins import Plugins
from .pool import Budget
from .report import SweepReport
from .runner import Runner

log = structlog.get_logger("sweeperd.sweep")


def limits_for(config: Config) -> Limits:
    return Limits(
        max_concurrency=config.daemon.max_concurrency,
        per_database={name: db.max_connections for name, db in config.databases.items()},
    )


async def open_databases(
    config: Config,
    names: Sequence[str],
    *,
    keep_unreachable: bool = False,
    budgets: Mapping[str, Budget] | None = None,
) -> tuple[dict[str, Database], dict[str, str]]:
    """Open the named databases concurrently; (databases, unreachable name → reason).

    Unreachable ones are left out of the first mapping unless ``keep_unreachable``: the daemon
    keeps them to retry them in the background, and so tries each once only here (its READY
    must not wait ``connect_retry`` for a database that is down). ``budgets``: the connection
    budget each database shares with its earlier pools (the daemon's, across reloads).
    """
    budgets = budgets or {}
    databases = {name: Database(config.databases[name], budgets.get(name)) for name in names}
    unreachable = await _each(
        {name: db.open(retry=not keep_unreachable) for name, db in databases.items()}
    )
    if not keep_unreachable:
        for name in unreachable:
            del databases[name]
    return databases, unreachable


async def _each(calls: Mapping[str, Coroutine[Any, Any, None]]) -> dict[str, str]:
    """Run one call per database concurrently; the databases whose call failed → why.

    Whatever went wrong with one database is that database's problem only (logged once).
    """
    outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
    failed: dict[str, str] = {}
    for name, outcome in zip(calls, outcomes, strict=True):
        if isinstance(outcome, Exception):
            reason = (
                outcome.reason
                if isinstance(outcome, DatabaseUnreachable)
                else describe_error(outcome)
            )
            failed[name] = reason
            log.error("database unreachable", database=name, error=reason)
        elif isinstance(outcome, BaseException):
            raise outcome
    return failed


async def refresh_databases(databases: Mapping[str, Database]) -> dict[str, str]:
    """At the start of a sweep: ask every database whether it is a standby (one query each,
    concurrently); returns those that cannot be reached now (name → reason).

    One that is known to be down (it failed during an earlier sweep) gets a single quick
    attempt, not ``connect_retry`` of waiting that would hold up every other database.
    """
    unreachable = {n: db.down or "not open" for n, db in databases.items() if not db.is_open}
    live = {n: db for n, db in databases.items() if n not in unreachable}
    return unreachable | await _each(
        {name: db.refresh(retry=db.down is None) for name, db in live.items()}
    )


async def resolve_tenants(
    config: Config, databases: Mapping[str, Database]
) -> tuple[list[Tenant], dict[str, str]]:
    """Static ``[[tenants]]`` plus those discovered by ``[[tenant_sources]]`` (one query each;
    none on a database that is not open).

    Returns the tenants and the databases whose discovery failed (name → reason): one database
    in trouble must not cost every other database its sweep. A static entry wins over a
    discovered one with the same name in the same database, or the same schema. Tenants are
    identified by (database, name): ``tenant_a`` may exist in several databases.
    """
    tenants = [Tenant(name=t.name, database=t.database, schema=t.schema) for t in config.tenants]
    known = {(t.database, t.name) for t in tenants}
    schemas = {(t.database, t.schema) for t in tenants}
    failed: dict[str, str] = {}
    for source in config.tenant_sources:
        database = databases.get(source.database)
        if database is None or not database.is_open or source.database in failed:
            continue  # unreachable: reported already
        try:
            found = await database.find_schemas(source.schemas)
        except Exception as exc:
            failed[source.database] = f"tenant discovery failed: {describe_error(exc)}"
            log.error(
                "tenant discovery failed", database=source.database, error=describe_error(exc)
            )
            continue
        found, dropped = like.split(found, source.prefix)
        if dropped:
            # Said at info, with the count: a pattern whose matches all fail the prefix rule
            # must not look like a database without tenants.
            log.info(
                "schemas match the LIKE pattern but not its prefix; not tenants",
                database=source.database,
                pattern=source.schemas,
                prefix=source.prefix,
                count=len(dropped),
                first=dropped[:3],
            )
        for schema in found:
            name = like.tenant_name(schema, source.prefix)
            if (source.database, name) in known or (source.database, schema) in schemas:
                continue
            tenants.append(Tenant(name=name, database=source.database, schema=schema))
            known.add((source.database, name))
            schemas.add((source.database, schema))
    return tenants, failed


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
    if sweep is not None and sweep not in config.sweeps:
        known = ", ".join(sorted(config.sweeps)) or "none configured"
        raise SelectionError(f"no sweep named {sweep!r} in {config.path} (known: {known})")
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
        runner = Runner(databases, plugins.pm, config.plugins, limits_for(config))
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
