"""``sweeperd discover``: print ``[[tenants]]`` TOML for the schemas found in a database."""

from __future__ import annotations

import tomli_w

from .config import Config
from .db import Database
from .sweep import open_databases


def prefix_of(like: str) -> str:
    """The literal start of a LIKE pattern (up to its first ``%``), stripped from tenant names."""
    return like.split("%", 1)[0]


def tenants_for(schemas: list[str], database: str, like: str) -> list[dict[str, str]]:
    prefix = prefix_of(like)
    out = []
    for schema in schemas:
        if not schema.startswith(prefix):
            continue  # LIKE's "_" matched something else: not one of ours (see sweep.py)
        out.append(
            {"name": schema[len(prefix) :] or schema, "database": database, "schema": schema}
        )
    return out


def render(tenants: list[dict[str, str]], database: str, like: str) -> str:
    lines = [
        f"# {len(tenants)} schema(s) matching {like!r} in database {database!r}.",
        "# Paste into the configuration, or use [[tenant_sources]] to discover at each sweep.",
    ]
    for tenant in tenants:
        # One [[tenants]] table each (tomli_w would inline a list of small tables).
        lines += ["", "[[tenants]]", tomli_w.dumps(tenant).rstrip("\n")]
    return "\n".join(lines) + "\n"


async def discover(config: Config, database: str, like: str) -> tuple[str | None, str | None]:
    """(TOML text, None), or (None, reason) if the database could not be reached."""
    databases, unreachable = await open_databases(config, [database])
    if unreachable:
        return None, unreachable[database]
    db: Database = databases[database]
    try:
        schemas = await db.find_schemas(like)
    finally:
        await db.close()
    return render(tenants_for(schemas, database, like), database, like), None
