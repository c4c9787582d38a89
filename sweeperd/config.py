"""The TOML configuration → frozen, typed objects.

Each section is a settings dataclass that :mod:`sweeperd.settings` reads, the reader plugins use for
their own tables: a field is a key, with its default and its type (or the reader its annotation
names; :mod:`sweeperd.validation` reads the core's own kinds of values), and the rules across keys
are listed on the class. Validation never stops at the first problem: every error is collected and
reported at once, each naming the file, the key path and what was expected (Patroni-style). Unknown
keys are errors: a typo such as ``opertions`` must not silently disable cleanup. Nothing here
connects to a database.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from . import validation
from .dropins import Origins, read_merged
from .problems import Problems
from .settings import (
    At,
    Bytes,
    Duration,
    Identifier,
    Invalid,
    PositiveDuration,
    PositiveInt,
    Reader,
    array,
    choice,
    integer,
    read,
    rules,
    setting,
    table,
    tables,
    zone,
)
from .validation import Known

DEFAULT_CONFIG_PATH = Path("/etc/sweeperd/sweeperd.toml")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")

Overlap = Literal["skip", "queue", "replace"]
Pooler = Literal["none", "session", "transaction"]
POOLERS: tuple[Pooler, ...] = ("none", "session", "transaction")
# The kinds of values only the core configuration has (sweeperd.validation reads them).
ServerTimeout = Annotated[float, validation.server_timeout]
Globs = Annotated[tuple[str, ...], validation.globs]


class ConfigError(Problems):
    """One or more configuration problems; ``problems`` holds one line each."""


# A new setting is one line in its class (name, type, default) and its line in
# config/sweeperd.toml; the reader, the unknown-key check and the defaults follow from the class.


def _named(what: str) -> Reader[str]:
    """The name of a table (``[databases.<name>]``): letters, digits, ``-`` and ``_``."""

    def check(name: str, at: At) -> str:
        if not _NAME.fullmatch(name):
            raise Invalid(f"expected {what} of letters, digits, '_' or '-'")
        return name

    return Reader(check, what)


def _known_database(values: Mapping[str, Any], at: At) -> None:
    """A rule: ``database`` is one of the [databases] keys."""
    known = at.context.databases if isinstance(at.context, Known) else frozenset()
    database = values.get("database")
    if database is not None and database not in known:
        at.at("database").problem(
            f"expected one of the [databases] keys "
            f"({', '.join(sorted(known)) or 'none defined'}), got {database!r}"
        )


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    timezone: Annotated[str, zone()] = "UTC"
    max_concurrency: PositiveInt = 16
    plugin_dirs: Annotated[tuple[Path, ...], validation.directories] = ()
    drain_timeout: Duration = 30.0
    # How long a claimed tenant stays this instance's without a renewal (sweeperd.claimer).
    claim_lease: Annotated[float, validation.claim_lease] = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: Annotated[str, choice("debug", "info", "warning", "error", fold=True)] = "info"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    enabled: bool = True
    keep: PositiveDuration = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    # Metrics carry no tenant label by default: thousands of tenants would mean thousands of
    # time series per metric in the backend.
    tenant_metrics: bool = False


NonNegativeInt = Annotated[int, integer(minimum=0)]


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """``[databases.<name>.throttle]``: while a signal is over its limit (or the database is
    paused) no new operation and no new retention batch starts there (:mod:`sweeperd.throttle`).
    No limit set: no health query at all; the pause is still checked."""

    max_replica_lag: PositiveDuration | None = None  # replay_lag of a standby of this primary
    max_replica_lag_bytes: Bytes | None = None  # WAL a standby has not replayed yet
    max_slot_lag_bytes: Bytes | None = None  # WAL retained by a replication slot
    max_archive_backlog: NonNegativeInt | None = None  # WAL segments waiting for the archiver
    max_active_sessions: PositiveInt | None = None  # active client backends, sweeperd's aside
    check_every: PositiveDuration = 1.0
    resume_after: Duration = 5.0  # under every limit this long before work resumes


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    name: str
    # The conninfo may hold a password: never in repr (it would end up in logs and tracebacks).
    dsn: str = setting(repr=False, reader=validation.dsn, keys=validation.DSN_KEYS)
    max_connections: PositiveInt = 8
    lock_timeout: ServerTimeout = 5.0
    statement_timeout: ServerTimeout = 1800.0
    connect_timeout: PositiveDuration = 10.0
    # What sits between sweeperd and the server: "none" (a direct connection), or a pooler
    # that keeps sessions ("session") or hands out a server connection per transaction.
    pooler: Pooler = "none"
    # How long transient connection failures (too many connections, starting up, refused) are
    # waited out before the work that needed a connection fails.
    connect_retry: Duration = 30.0
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)


@rules(_known_database)
@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    database: str
    schema: Identifier


def _unique_per_database() -> Callable[[int, Mapping[str, Any], At], None]:
    """Tenants are (database, name) everywhere: "acme" may be in two databases, once in each."""
    seen: dict[tuple[str, str], int] = {}

    def check(i: int, tenant: Mapping[str, Any], at: At) -> None:
        name, database = tenant.get("name"), tenant.get("database")
        if name is not None and database is not None:
            also = seen.get((database, name))
            if also is not None:
                at.at(i).at("name").problem(
                    f"expected a tenant name unique in database {database!r}, {name!r} is "
                    f"also {at.at(also).key}"
                )
            seen[database, name] = i

    return check


@rules(_known_database)
@dataclass(frozen=True, slots=True)
class TenantSource:
    database: str
    schemas: Annotated[str, validation.like_pattern]  # a LIKE pattern
    # Stripped from the schema name to make the tenant name.
    prefix: str = setting(reader=validation.prefix, keys=("prefix",))


def _cron_or_interval(values: Mapping[str, Any], at: At) -> None:
    """A rule: a sweep fires by ``cron`` (valid in [daemon] timezone) or by ``interval``."""
    if "cron" in at.raw and "interval" in at.raw:
        at.problem("expected either cron or interval, not both")
    elif "cron" not in at.raw and "interval" not in at.raw:
        at.at("cron").problem(
            'required: a crontab expression such as "0 3 * * *" (or interval = "15m")'
        )
    cron = values.get("cron")
    timezone = at.context.timezone if isinstance(at.context, Known) else "UTC"
    if cron is not None and (problem := validation.cron_problem(cron, timezone)):
        at.at("cron").problem(problem)


@rules(_cron_or_interval)
@dataclass(frozen=True, slots=True)
class SweepConfig:
    name: str
    cron: Annotated[str, validation.cron] | None = None
    interval: PositiveDuration | None = None
    operations: Globs = ("*",)
    tenants: Globs = ("*",)
    per_tenant_concurrency: PositiveInt = 4
    timeout: PositiveDuration | None = None
    operation_timeout: PositiveDuration | None = None
    overlap: Overlap = "skip"
    jitter: Duration = 0.0
    # Maintenance window as minutes after midnight (start, end) in [daemon] timezone; end < start
    # spans midnight. No operation starts outside it; at its end running ones are cancelled
    # (window_end = "cancel") or allowed to finish ("finish").
    window: Annotated[tuple[int, int], validation.window] | None = None
    window_end: Literal["cancel", "finish"] = "cancel"
    misfire_grace_time: PositiveDuration | None = None


def _no_tables() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    log: LogConfig = field(default_factory=LogConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    databases: Mapping[str, DatabaseConfig] = setting(
        default_factory=_no_tables,
        reader=tables(DatabaseConfig, key="name", name=_named("a database key")),
    )
    tenants: tuple[TenantConfig, ...] = setting(
        default=(),
        reader=array(
            table(TenantConfig, message="expected a table with name, database, schema"),
            message="expected an array of tables [[tenants]]",
            each=_unique_per_database,
        ),
    )
    tenant_sources: tuple[TenantSource, ...] = setting(
        default=(),
        reader=array(
            table(TenantSource, message="expected a table with database and schemas"),
            message="expected an array of tables [[tenant_sources]]",
        ),
    )
    sweeps: Mapping[str, SweepConfig] = setting(
        default_factory=_no_tables,
        reader=tables(SweepConfig, key="name", name=_named("a sweep name")),
    )
    plugins: Mapping[str, Mapping[str, Any]] = setting(
        default_factory=_no_tables, reader=validation.plugin_tables
    )

    def plugin_settings(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.<name>]`` table, empty if absent."""
        return self.plugins.get(name, MappingProxyType({}))

    def file_of(self, key: str) -> Path:
        """The file that set the key path ``key`` (as problems spell it): what a problem with
        it names. One file here; :class:`MergedConfig` knows its drop-ins."""
        return self.path

    @property
    def dropins(self) -> tuple[Path, ...]:
        """The ``conf.d/*.toml`` files merged into this configuration, in order."""
        return ()


# A subclass, not a field of Config: every field of Config is a key of the file (or its path),
# and where keys came from is neither.
@dataclass(frozen=True, slots=True)
class MergedConfig(Config):
    """A :class:`Config` read from the main file and its drop-ins (:mod:`sweeperd.dropins`)."""

    origins: Origins | None = field(default=None, repr=False, compare=False)

    def file_of(self, key: str) -> Path:
        return self.path if self.origins is None else self.origins.file_of(key)

    @property
    def dropins(self) -> tuple[Path, ...]:
        return () if self.origins is None else self.origins.dropins


def resolve_config_path(explicit: str | None) -> Path:
    """``-c`` wins, then ``$SWEEPERD_CONFIG``, then ``/etc/sweeperd/sweeperd.toml``.

    Either may name a directory holding ``sweeperd.toml`` and ``conf.d/``; :func:`load_config`
    reads it (so a reload reads the directory again, too).
    """
    if explicit:
        return Path(explicit)
    env = os.environ.get("SWEEPERD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate ``path`` (a file, or a directory holding ``sweeperd.toml``) and the
    ``conf.d/*.toml`` drop-ins beside it, merged (:mod:`sweeperd.dropins`); raise
    :class:`ConfigError` with every problem found."""
    merged = read_merged(path)
    if not merged.complete:
        # Validating the files that could be read would report what the others were to add.
        raise ConfigError(merged.problems)
    try:
        config = parse_config(merged.doc, merged.origins.main, merged.origins)
    except ConfigError as exc:
        raise ConfigError([*merged.problems, *exc.problems]) from None
    if merged.problems:  # keys set twice; the first file's value was validated
        raise ConfigError(merged.problems)
    return config


def parse_config(doc: Mapping[str, Any], path: Path, origins: Origins | None = None) -> Config:
    """Validate an already-parsed TOML document (see :func:`load_config`); each problem names
    the file that set its key (``origins``; without, ``path``)."""
    given = {"path": path, "origins": origins}
    config, problems = read(MergedConfig, doc, context=Known.of(doc, path), given=given)
    if config is None:
        file_of = (lambda key: path) if origins is None else origins.file_of
        raise ConfigError(f"{file_of(key)}: {key}: {expectation}" for key, expectation in problems)
    return config
