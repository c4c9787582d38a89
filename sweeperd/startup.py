"""What ``check-config``, ``run``, ``sweep`` and a reload share: everything built from the
configuration before the first connection.

One path, so they cannot disagree: if ``check-config`` says OK, ``run`` starts. Validation
(:mod:`sweeperd.config`, each plugin's ``sweeperd_validate_settings``) says what is wrong with a
value; the rehearsal then builds what the daemon builds at start and at each firing (triggers and
their next fire times, the nominal firing, windows, limits, every sweep's plan over the static
tenants) so that anything validation missed is still one line naming the sweep, never a traceback
at run time.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .config import Config, ConfigError, load_config
from .limits import Bounds, Limits
from .model import Tenant
from .planner import PlanError, make_plan, matches
from .plugins import Plugins, load_plugins
from .schedule import Window, build_trigger, misfire_grace, nominal_firing
from .settings import toml_key


def _a_match(glob: str) -> str:
    """A name ``glob`` matches (fnmatch): its wildcards filled in, a set by its first member."""
    name = re.sub(r"\[!?(.)[^\]]*\]", lambda m: m.group(1) if m.group(0)[1] != "!" else "\0", glob)
    return name.replace("*", "").replace("?", "x") or "x"


def _representatives(config: Config, tenants: list[Tenant]) -> list[Tenant]:
    """One tenant per database and set of sweeps selecting it: the others plan the same items.

    A plan's items and their order depend on which sweeps select a tenant, never on the tenant
    itself, so 50 000 tenants rehearse as a handful (planning all of them took 8 s).
    """
    sweeps = list(config.sweeps.values())
    seen: set[tuple[str, tuple[bool, ...]]] = set()
    out = []
    for tenant in tenants:
        key = (tenant.database, tuple(matches(tenant.name, sw.tenants) for sw in sweeps))
        if key not in seen:
            seen.add(key)
            out.append(tenant)
    return out


@dataclass(frozen=True, slots=True)
class Prepared:
    config: Config
    plugins: Plugins


def prepare(path: Path, *, now: dt.datetime | None = None) -> Prepared:
    """The validated config, its plugins and operations; ConfigError/PluginError otherwise."""
    config = load_config(path)
    plugins = load_plugins(config)
    problems = rehearse(config, plugins, now=now)
    if problems:
        raise ConfigError(problems)
    return Prepared(config=config, plugins=plugins)


def rehearse(config: Config, plugins: Plugins, *, now: dt.datetime | None = None) -> list[str]:
    """Build what the daemon builds from ``config``; one problem per sweep that cannot be."""
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    tz = config.daemon.timezone
    Bounds(Limits.of(config))
    for name, sweep in config.sweeps.items():
        try:
            trigger = build_trigger(sweep, tz)
            trigger.get_next_fire_time(None, now)
            nominal_firing(sweep, tz, now)
            misfire_grace(sweep)
            if sweep.window:
                Window(sweep.window, tz).closes_after(now)
        except Exception as exc:  # a gap in validation: still a line, not a traceback
            key = f"sweeps.{toml_key(name)}"
            problems.append(
                f"{config.file_of(key)}: {key}: cannot be scheduled: {type(exc).__name__}: {exc}"
            )
    # Discovered tenants are like static ones to the planner: per source, one stands in for
    # each name a sweep's tenant globs select, so that every sweep plans some tenants.
    tenants = [Tenant(name=t.name, database=t.database, schema=t.schema) for t in config.tenants]
    for source in config.tenant_sources:
        for sweep in config.sweeps.values():
            for glob in sweep.tenants:
                name = _a_match(glob)
                if fnmatchcase(name, glob):  # best effort: an odd set may find no stand-in
                    schema = source.prefix + name
                    tenants.append(Tenant(name=name, database=source.database, schema=schema))
    tenants = _representatives(config, tenants)
    selections: list[str | None] = [None, *config.sweeps]
    for selection in selections:
        try:
            make_plan(config, plugins.operations, tenants, sweep=selection)
        except PlanError as exc:
            where = f"sweeps.{toml_key(selection)}" if selection is not None else "sweeps"
            problems.append(f"{config.file_of(where)}: {where}: {exc}")
            break  # the same cycle in every sweep that selects it: once is enough
    return problems
