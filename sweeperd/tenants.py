"""The tenants of a sweep: static ``[[tenants]]`` plus those ``[[tenant_sources]]`` find."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from . import like
from .config import Config
from .db import Database
from .errors import describe_error
from .model import Tenant

log = structlog.get_logger("sweeperd.tenants")


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
