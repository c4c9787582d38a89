"""Opening the configured databases and, at each sweep, asking them what they are now.

Concurrently, one database at a time failing alone: each returns the databases that could not
be reached, with libpq's reason, and logs each once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import structlog

from .config import Config
from .db import Database
from .errors import DatabaseUnreachable, describe_error
from .pool import Budget

log = structlog.get_logger("sweeperd.databases")


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
