"""The TOML configuration → frozen, typed objects.

Validation never stops at the first problem: every error is collected and reported at once,
each naming the file, the key path and what was expected (Patroni-style). Unknown keys are errors:
a typo such as ``opertions`` must not silently disable cleanup. Nothing here connects to a database.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import like
from .dsn import check_dsn
from .problems import Problems
from .validation import Validator, kind_of, toml_key

DEFAULT_CONFIG_PATH = Path("/etc/sweeperd/sweeperd.toml")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")

Overlap = Literal["skip", "queue", "replace"]
Pooler = Literal["none", "session", "transaction"]
POOLERS: tuple[Pooler, ...] = ("none", "session", "transaction")


class ConfigError(Problems):
    """One or more configuration problems; ``problems`` holds one line each."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    timezone: str = "UTC"
    max_concurrency: int = 16
    plugin_dirs: tuple[Path, ...] = ()
    drain_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    enabled: bool = True
    keep: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    # Metrics carry no tenant label by default: thousands of tenants would mean thousands of
    # time series per metric in the backend.
    tenant_metrics: bool = False


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    name: str
    # The conninfo may hold a password: never in repr (it would end up in logs and tracebacks).
    dsn: str = field(repr=False)
    max_connections: int = 8
    lock_timeout: float = 5.0
    statement_timeout: float = 1800.0
    connect_timeout: float = 10.0
    # What sits between sweeperd and the server: "none" (a direct connection), or a pooler
    # that keeps sessions ("session") or hands out a server connection per transaction.
    pooler: Pooler = "none"
    # How long transient connection failures (too many connections, starting up, refused) are
    # waited out before the work that needed a connection fails.
    connect_retry: float = 30.0


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    database: str
    schema: str


@dataclass(frozen=True, slots=True)
class TenantSource:
    database: str
    schemas: str  # a LIKE pattern
    prefix: str  # stripped from the schema name to make the tenant name


@dataclass(frozen=True, slots=True)
class SweepConfig:
    name: str
    cron: str | None = None
    interval: float | None = None
    operations: tuple[str, ...] = ("*",)
    tenants: tuple[str, ...] = ("*",)
    per_tenant_concurrency: int = 4
    timeout: float | None = None
    operation_timeout: float | None = None
    overlap: Overlap = "skip"
    jitter: float = 0.0
    # Maintenance window as minutes after midnight (start, end) in [daemon] timezone; end < start
    # spans midnight. No operation starts outside it; at its end running ones are cancelled
    # (window_end = "cancel") or allowed to finish ("finish").
    window: tuple[int, int] | None = None
    window_end: Literal["cancel", "finish"] = "cancel"
    misfire_grace_time: float | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    log: LogConfig = field(default_factory=LogConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    tenants: tuple[TenantConfig, ...] = ()
    tenant_sources: tuple[TenantSource, ...] = ()
    sweeps: Mapping[str, SweepConfig] = field(default_factory=dict)
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def plugin_settings(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.<name>]`` table, empty if absent."""
        return self.plugins.get(name, MappingProxyType({}))


def resolve_config_path(explicit: str | None) -> Path:
    """``-c`` wins, then ``$SWEEPERD_CONFIG``, then ``/etc/sweeperd/sweeperd.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("SWEEPERD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` with every problem found."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [f"{path}: cannot read the configuration: {exc.strerror or exc}"]
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(doc, path)


def parse_config(doc: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document (see :func:`load_config`)."""
    v = _ConfigReader(path)
    config = v.config(doc)
    if v.problems:
        raise ConfigError(v.problems)
    return config


_MAX_DSN_BYTES = 64 * 1024


class _ConfigReader(Validator):
    """Reads each section of the document into the typed objects above."""

    def config(self, doc: Mapping[str, Any]) -> Config:
        self.unknown(
            doc,
            "",
            {
                "daemon",
                "log",
                "history",
                "databases",
                "tenants",
                "tenant_sources",
                "sweeps",
                "plugins",
                "telemetry",
            },
        )
        daemon = self.daemon(
            self.table(
                doc,
                "daemon",
                "daemon",
                {"timezone", "max_concurrency", "plugin_dirs", "drain_timeout"},
            )
        )
        log = self.log(self.table(doc, "log", "log", {"format", "level"}))
        history = self.history(self.table(doc, "history", "history", {"enabled", "keep"}))
        telemetry_t = self.table(doc, "telemetry", "telemetry", {"tenant_metrics"})
        telemetry = TelemetryConfig(
            tenant_metrics=self.get(
                telemetry_t, "tenant_metrics", "telemetry", bool, False, "true or false"
            )
        )
        databases = self.databases(doc.get("databases", {}))
        tenants = self.tenants(doc.get("tenants", []), databases)
        sources = self.tenant_sources(doc.get("tenant_sources", []), databases)
        sweeps = self.sweeps(doc.get("sweeps", {}), daemon.timezone)
        plugins = doc.get("plugins", {})
        if not isinstance(plugins, dict):
            self.error("plugins", f"expected tables [plugins.<name>], got {kind_of(plugins)}")
            plugins = {}
        for name, value in list(plugins.items()):
            if not isinstance(value, dict):
                expected = f"expected a table of settings, got {kind_of(value)}"
                self.error(f"plugins.{toml_key(name)}", expected)
                plugins = {k: v for k, v in plugins.items() if k != name}
        return Config(
            path=self.path,
            daemon=daemon,
            log=log,
            history=history,
            telemetry=telemetry,
            databases=MappingProxyType(databases),
            tenants=tenants,
            tenant_sources=sources,
            sweeps=MappingProxyType(sweeps),
            plugins=MappingProxyType({k: MappingProxyType(v) for k, v in plugins.items()}),
        )

    def daemon(self, t: Mapping[str, Any]) -> DaemonConfig:
        tz = self.string(t, "timezone", "daemon", "UTC", 'an IANA time zone such as "UTC"')
        if isinstance(tz, str) and tz:
            try:
                ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                self.error(
                    "daemon.timezone",
                    f'expected an IANA time zone such as "Europe/Berlin", got {tz!r}',
                )
                tz = "UTC"
        dirs_raw = self.get(t, "plugin_dirs", "daemon", list, [], "a list of directory paths")
        dirs: list[Path] = []
        for i, d in enumerate(dirs_raw):
            if not isinstance(d, str) or not d:
                self.error(f"daemon.plugin_dirs[{i}]", "expected a directory path string")
                continue
            # Relative paths are relative to the config file, not to wherever the daemon started.
            p = self.expand(d, f"daemon.plugin_dirs[{i}]")
            if p is not None:
                dirs.append(p)
        return DaemonConfig(
            timezone=tz or "UTC",
            max_concurrency=self.positive_int(t, "max_concurrency", "daemon", 16),
            plugin_dirs=tuple(dirs),
            drain_timeout=self.duration(t, "drain_timeout", "daemon", 30.0) or 0.0,
        )

    def log(self, t: Mapping[str, Any]) -> LogConfig:
        fmt = self.string(t, "format", "log", "auto", 'one of "auto", "json", "console"')
        if fmt not in ("auto", "json", "console"):
            self.error("log.format", f'expected one of "auto", "json", "console", got {fmt!r}')
            fmt = "auto"
        level = self.string(t, "level", "log", "info", 'one of "debug", "info", "warning", "error"')
        if not isinstance(level, str) or level.lower() not in ("debug", "info", "warning", "error"):
            self.error(
                "log.level", f'expected one of "debug", "info", "warning", "error", got {level!r}'
            )
            level = "info"
        return LogConfig(format=fmt, level=level.lower())

    def history(self, t: Mapping[str, Any]) -> HistoryConfig:
        enabled = self.get(t, "enabled", "history", bool, True, "true or false")
        keep = self.duration(t, "keep", "history", 30 * 86400.0, allow_zero=False)
        return HistoryConfig(enabled=enabled, keep=keep or 30 * 86400.0)

    def databases(self, raw: Any) -> dict[str, DatabaseConfig]:
        if not isinstance(raw, dict):
            self.error("databases", "expected tables [databases.<name>]")
            return {}
        out: dict[str, DatabaseConfig] = {}
        allowed = {
            "dsn",
            "dsn_file",
            "dsn_credential",
            "max_connections",
            "lock_timeout",
            "statement_timeout",
            "connect_timeout",
            "pooler",
            "connect_retry",
        }
        for name, t in raw.items():
            where = f"databases.{toml_key(name)}"
            if not isinstance(t, dict):
                self.error(where, f"expected a table, got {kind_of(t)}")
                continue
            if not _NAME.fullmatch(name):
                self.error(where, "expected a database key of letters, digits, '_' or '-'")
            self.unknown(t, where, allowed)
            dsn = self.dsn(t, where)
            out[name] = DatabaseConfig(
                name=name,
                dsn=dsn or "",
                max_connections=self.positive_int(t, "max_connections", where, 8),
                lock_timeout=self.server_timeout(t, "lock_timeout", where, 5.0),
                statement_timeout=self.server_timeout(t, "statement_timeout", where, 1800.0),
                connect_timeout=self.duration(t, "connect_timeout", where, 10.0, allow_zero=False)
                or 10.0,
                pooler=self.choice(t, "pooler", where, POOLERS, "none"),
                connect_retry=self.duration(t, "connect_retry", where, 30.0) or 0.0,
            )
        return out

    def dsn(self, t: Mapping[str, Any], where: str) -> str | None:
        given = [key for key in ("dsn", "dsn_file", "dsn_credential") if key in t]
        if len(given) > 1:
            self.error(where, f"expected one of dsn, dsn_file or dsn_credential, got {given}")
            return None
        if not given:
            self.error(
                f"{where}.dsn",
                "required: a libpq URI or conninfo (or dsn_file = a file holding one, or "
                "dsn_credential = the name of a systemd credential holding one)",
            )
            return None
        if given == ["dsn"]:
            value = self.get(t, "dsn", where, str, None, "a libpq URI or conninfo string")
            if isinstance(value, str):
                self.check_dsn(value, f"{where}.dsn")
            return value if isinstance(value, str) else None
        if given == ["dsn_credential"]:
            key = f"{where}.dsn_credential"
            name = self.get(t, "dsn_credential", where, str, None, "a systemd credential name")
            if not isinstance(name, str):
                return None
            if name in ("", ".", "..") or "/" in name:
                self.error(key, f"expected a systemd credential name (no '/'), got {name!r}")
                return None
            # $CREDENTIALS_DIRECTORY rather than /run/credentials/<unit>/: the same config
            # then works for the service and for `sweeperd --unit`'s transient units.
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                self.error(
                    key,
                    f"expected $CREDENTIALS_DIRECTORY to be set (systemd sets it for a unit "
                    f"with LoadCredential={name}:<file>); outside the unit, run the command "
                    f"as `sweeperd --unit <unit> <command>`",
                )
                return None
            return self.read_dsn(Path(directory) / name, key)
        value = self.get(t, "dsn_file", where, str, None, "a path to a file holding the DSN")
        if not isinstance(value, str):
            return None
        path = self.expand(value, f"{where}.dsn_file")
        return None if path is None else self.read_dsn(path, f"{where}.dsn_file")

    def expand(self, value: str, key: str) -> Path | None:
        """``~``/``~user`` expanded and relative to the config file, or None (reported)."""
        try:
            path = Path(value).expanduser()
        except RuntimeError as exc:  # ~no_such_user, or no home directory for ~
            self.error(key, f"expected a path whose ~ can be expanded, got {value!r} ({exc})")
            return None
        return path if path.is_absolute() else self.path.parent / path

    def read_dsn(self, path: Path, key: str) -> str | None:
        try:
            # A systemd credential or a secrets mount: DSN and password stay out of the TOML.
            # A regular file, and a DSN-sized read: a FIFO would block check-config forever,
            # /dev/zero would eat the memory.
            if not path.is_file():
                self.error(key, f"expected a readable file, {path}: not a regular file")
                return None
            with path.open("rb") as stream:
                data = stream.read(_MAX_DSN_BYTES + 1)
            if len(data) > _MAX_DSN_BYTES:
                self.error(key, f"expected a DSN of at most {_MAX_DSN_BYTES} bytes in {path}")
                return None
            dsn = data.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.error(key, f"expected a readable file, {path}: {reason}")
            return None
        self.check_dsn(dsn, key)
        return dsn

    def check_dsn(self, dsn: str, where: str) -> None:
        problem = check_dsn(dsn)
        if problem:
            self.error(where, f"expected a libpq URI or conninfo string ({problem})")

    def tenants(
        self, raw: Any, databases: Mapping[str, DatabaseConfig]
    ) -> tuple[TenantConfig, ...]:
        if not isinstance(raw, list):
            self.error("tenants", "expected an array of tables [[tenants]]")
            return ()
        out: list[TenantConfig] = []
        seen: dict[tuple[str, str], int] = {}
        for i, t in enumerate(raw):
            where = f"tenants[{i}]"
            if not isinstance(t, dict):
                self.error(where, "expected a table with name, database, schema")
                continue
            self.unknown(t, where, {"name", "database", "schema"})
            name = self.string(t, "name", where)
            database = self.string(t, "database", where)
            schema = self.identifier(t, "schema", where)
            if isinstance(database, str) and database and database not in databases:
                self.error(
                    f"{where}.database",
                    f"expected one of the [databases] keys "
                    f"({', '.join(sorted(databases)) or 'none defined'}), got {database!r}",
                )
            if isinstance(name, str) and name and isinstance(database, str):
                # Tenants are (database, name) everywhere: "acme" may be in two databases.
                if (database, name) in seen:
                    self.error(
                        f"{where}.name",
                        f"expected a tenant name unique in database {database!r}, {name!r} is "
                        f"also tenants[{seen[database, name]}]",
                    )
                seen[database, name] = i
            if name and database and schema:
                out.append(TenantConfig(name=name, database=database, schema=schema))
        return tuple(out)

    def tenant_sources(
        self, raw: Any, databases: Mapping[str, DatabaseConfig]
    ) -> tuple[TenantSource, ...]:
        if not isinstance(raw, list):
            self.error("tenant_sources", "expected an array of tables [[tenant_sources]]")
            return ()
        out: list[TenantSource] = []
        for i, t in enumerate(raw):
            where = f"tenant_sources[{i}]"
            if not isinstance(t, dict):
                self.error(where, "expected a table with database and schemas")
                continue
            self.unknown(t, where, {"database", "schemas", "prefix"})
            database = self.string(t, "database", where)
            pattern = self.string(
                t, "schemas", where, expectation='a LIKE pattern such as "tenant_%"'
            )
            if isinstance(database, str) and database and database not in databases:
                self.error(
                    f"{where}.database",
                    f"expected one of the [databases] keys "
                    f"({', '.join(sorted(databases)) or 'none defined'}), got {database!r}",
                )
            if isinstance(pattern, str) and pattern and (bad := like.problem(pattern)):
                self.error(f"{where}.schemas", f"expected a LIKE pattern: {bad}")
                pattern = None
            # The literal text before the first unescaped %: "tenant\\_%" strips "tenant_".
            default_prefix = like.prefix(pattern) if isinstance(pattern, str) else ""
            prefix = self.string(t, "prefix", where, default_prefix, "a string", allow_empty=True)
            if database and pattern:
                out.append(TenantSource(database=database, schemas=pattern, prefix=prefix or ""))
        return tuple(out)

    def sweeps(self, raw: Any, timezone: str) -> dict[str, SweepConfig]:
        if not isinstance(raw, dict):
            self.error("sweeps", "expected tables [sweeps.<name>]")
            return {}
        allowed = {
            "cron",
            "interval",
            "operations",
            "tenants",
            "per_tenant_concurrency",
            "timeout",
            "operation_timeout",
            "overlap",
            "jitter",
            "window",
            "window_end",
            "misfire_grace_time",
        }
        out: dict[str, SweepConfig] = {}
        for name, t in raw.items():
            where = f"sweeps.{toml_key(name)}"
            if not isinstance(t, dict):
                self.error(where, f"expected a table, got {kind_of(t)}")
                continue
            if not _NAME.fullmatch(name):
                self.error(where, "expected a sweep name of letters, digits, '_' or '-'")
            self.unknown(t, where, allowed)
            cron = self.get(t, "cron", where, str, None, 'a crontab expression such as "0 3 * * *"')
            interval = self.duration(t, "interval", where, None, allow_zero=False)
            if "cron" in t and "interval" in t:
                self.error(where, "expected either cron or interval, not both")
            elif "cron" not in t and "interval" not in t:
                self.error(
                    f"{where}.cron",
                    'required: a crontab expression such as "0 3 * * *" (or interval = "15m")',
                )
            if isinstance(cron, str):
                self.cron(cron, f"{where}.cron", timezone)
            overlap = self.string(t, "overlap", where, "skip", 'one of "skip", "queue", "replace"')
            if overlap not in ("skip", "queue", "replace"):
                self.error(
                    f"{where}.overlap",
                    f'expected one of "skip", "queue", "replace", got {overlap!r}',
                )
                overlap = "skip"
            out[name] = SweepConfig(
                name=name,
                cron=cron,
                interval=interval,
                operations=self.globs(t, "operations", where),
                tenants=self.globs(t, "tenants", where),
                per_tenant_concurrency=self.positive_int(t, "per_tenant_concurrency", where, 4),
                timeout=self.duration(t, "timeout", where, None, allow_zero=False),
                operation_timeout=self.duration(
                    t, "operation_timeout", where, None, allow_zero=False
                ),
                overlap=overlap,
                jitter=self.duration(t, "jitter", where, 0.0) or 0.0,
                window=self.window(t, where),
                window_end=self.choice(t, "window_end", where, ("cancel", "finish"), "cancel"),
                misfire_grace_time=self.duration(
                    t, "misfire_grace_time", where, None, allow_zero=False
                ),
            )
        return out
