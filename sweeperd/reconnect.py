"""Databases that could not be reached: retried in the background until they come up.

One task per database, with capped exponential back-off and one log line per attempt (with
libpq's reason), so a daemon started while one database is down serves the others at once and
that one as soon as it answers, without a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from .db import Database
from .errors import DatabaseUnreachable, describe_error

log = structlog.get_logger("sweeperd.reconnect")

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0


class Reconnector:
    def __init__(
        self,
        on_up: Callable[[Database], None],
        *,
        first_delay: float = FIRST_DELAY_S,
        max_delay: float = MAX_DELAY_S,
    ) -> None:
        self._on_up = on_up
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._tasks: dict[str, tuple[Database, asyncio.Task[None]]] = {}

    def watch(self, database: Database) -> None:
        """Retry ``database`` until it answers (no-op if it is being retried already)."""
        current = self._tasks.get(database.name)
        if current is not None and current[0] is database and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        task = asyncio.create_task(
            self._retry(database), name=f"sweeperd reconnect {database.name}"
        )
        self._tasks[database.name] = (database, task)

    def forget_all_but(self, keep: set[int]) -> None:
        """Stop retrying databases whose objects (by id) a reload replaced or removed."""
        for name, (database, task) in list(self._tasks.items()):
            if id(database) not in keep:
                task.cancel()
                del self._tasks[name]

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _retry(self, database: Database) -> None:
        delay = self._first_delay
        attempt = 0
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await database.open(quiet=True, retry=False)
            except DatabaseUnreachable as exc:
                delay = min(delay * 2, self._max_delay)
                log.warning(
                    "database still unreachable; retrying",
                    database=database.name,
                    error=exc.reason,
                    attempt=attempt,
                    retry_in_s=delay,
                )
                continue
            except Exception as exc:  # never let the retry loop die silently
                delay = min(delay * 2, self._max_delay)
                log.error(
                    "retrying the database failed unexpectedly",
                    database=database.name,
                    error=describe_error(exc),
                    retry_in_s=delay,
                )
                continue
            log.info("database reachable again", database=database.name, attempts=attempt)
            self._on_up(database)
            return
