"""sweeperd: PostgreSQL maintenance for multi-tenant (schema-per-tenant) databases.

The public plugin API is ``hookimpl``, ``Operation``, ``Context``, ``Tenant``, ``Phase``, ``Skip``,
``LeaseLost``, ``Target`` and ``PlanContext`` (work items found at plan time: ``Operation.expand``),
``sql`` (psycopg's :mod:`psycopg.sql`, for composing queries with safely quoted names) and
``settings`` (:mod:`sweeperd.settings`: a plugin's settings table read into its own dataclass, with
every problem named by key, as the core configuration is read).
"""

from __future__ import annotations

import pluggy
from psycopg import sql

from . import settings
from .model import (
    ALL_TABLES,
    Context,
    LeaseLost,
    Operation,
    Phase,
    PlanContext,
    Result,
    Skip,
    Target,
    Tenant,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("sweeperd")

__all__ = [
    "ALL_TABLES",
    "Context",
    "LeaseLost",
    "Operation",
    "Phase",
    "PlanContext",
    "Result",
    "Skip",
    "Target",
    "Tenant",
    "__version__",
    "hookimpl",
    "settings",
    "sql",
]
