"""``sweeperd discover``: print ``[[tenants]]`` TOML for the schemas found in a database."""

from __future__ import annotations

import structlog
import tomli_w

from . import like
from .config import Config
from .databases import open_databases
from .db import Database

log = structlog.get_logger("sweeperd.discover")


def tenants_for(schemas: list[str], database: str, pattern: str) -> list[dict[str, str]]:
    the_prefix = like.prefix(pattern)
    kept, _dropped = like.split(schemas, the_prefix)
    return [
        {"name": like.tenant_name(s, the_prefix), "database": database, "schema": s} for s in kept
    ]


def render(schemas: list[str], database: str, pattern: str) -> str:
    the_prefix = like.prefix(pattern)
    kept, dropped = like.split(schemas, the_prefix)
    tenants = tenants_for(kept, database, pattern)
    if dropped:
        log.info(
            "schemas match the LIKE pattern but not its prefix; left out",
            database=database,
            pattern=pattern,
            prefix=the_prefix,
            count=len(dropped),
        )
    lines = [
        f"# {len(tenants)} schema(s) matching {pattern!r} in database {database!r}.",
        "# Paste into the configuration, or use [[tenant_sources]] to discover at each sweep.",
    ]
    if dropped:
        # Say it: a pattern that matches only such schemas must not look like "no tenants".
        lines.append(
            f"# Left out: {len(dropped)} more schema(s) match the pattern but do not start with "
            f"{the_prefix!r} (LIKE's _ matches any character; write \\_ for a literal _)."
        )
    for tenant in tenants:
        # One [[tenants]] table each (tomli_w would inline a list of small tables).
        lines += ["", "[[tenants]]", tomli_w.dumps(tenant).rstrip("\n")]
    return "\n".join(lines) + "\n"


async def discover(config: Config, database: str, pattern: str) -> tuple[str | None, str | None]:
    """(TOML text, None), or (None, reason) if the database could not be reached."""
    databases, unreachable = await open_databases(config, [database])
    if unreachable:
        return None, unreachable[database]
    db: Database = databases[database]
    try:
        schemas = await db.find_schemas(pattern)
    finally:
        await db.close()
    return render(schemas, database, pattern), None
