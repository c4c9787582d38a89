"""The plugin manager: bundled plugins, entry points, drop-in files, and their operations.

All three sources go through the same registration, so the bundled retention and vacuum plugins
are ordinary plugins (pytest's and datasette's pattern). The manager is built by a function, never
at import time, so a reload builds a fresh one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import __version__, hookspecs, model
from .config import Config, ConfigError
from .model import Operation, OperationError
from .problems import Problems, printable
from .validation import toml_key

PROJECT = "sweeperd"
BUNDLED_PACKAGE = "sweeperd.bundled"


class PluginError(Problems):
    """Plugins could not be loaded or disagree; ``problems`` holds one line each."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    source: str  # "bundled", "entry point <dist>", or the drop-in file's path
    version: str | None


@dataclass(frozen=True, slots=True)
class Plugins:
    """A loaded plugin manager and the operations its plugins contribute, by name."""

    pm: pluggy.PluginManager
    infos: tuple[PluginInfo, ...]
    operations: Mapping[str, Operation]

    def by_plugin(self) -> dict[str, list[Operation]]:
        out: dict[str, list[Operation]] = {info.name: [] for info in self.infos}
        for op in self.operations.values():
            out.setdefault(op.plugin, []).append(op)
        return out


class _PluginManager(pluggy.PluginManager):
    """Treats every ``sweeperd_*`` function of a plugin as a hook implementation, decorated or not.

    pytest does the same for ``pytest_*``: a forgotten ``@hookimpl`` must not make a plugin
    silently do nothing, and a misspelled name then fails in check_pending like any other.
    """

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not name.startswith(f"{PROJECT}_"):
            return opts
        if not inspect.isroutine(getattr(plugin, name, None)):
            return None
        return pluggy.HookimplOpts(
            wrapper=False,
            hookwrapper=False,
            optionalhook=False,
            tryfirst=False,
            trylast=False,
            specname=None,
        )


def new_plugin_manager() -> pluggy.PluginManager:
    pm = _PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _unknown_hooks(pm: pluggy.PluginManager) -> list[str]:
    """Every hook implementation that matches no hookspec (check_pending stops at the first)."""
    problems = []
    for name in sorted(vars(pm.hook)):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                known = ", ".join(
                    sorted(
                        n
                        for n in vars(pm.hook)
                        if not n.startswith("_") and getattr(pm.hook, n).has_spec()
                    )
                )
                problems.append(
                    f"plugin {impl.plugin_name!r}: unknown hook {name!r} (known hooks: {known})"
                )
    return problems


def load_plugins(config: Config, *, entry_points: bool = True) -> Plugins:
    """Load every plugin, validate their settings and collect their operations.

    Raises :class:`PluginError` (load failures, clashes) or :class:`~sweeperd.config.ConfigError`
    (settings problems), each with every problem found.
    """
    pm = new_plugin_manager()
    infos: list[PluginInfo] = []
    problems: list[str] = []

    def register(module: ModuleType | None, info: PluginInfo) -> None:
        if module is None:
            return
        if pm.has_plugin(info.name):
            other = next(i for i in infos if i.name == info.name)
            problems.append(
                f"plugin {info.name!r} from {info.source} has the same name as the one "
                f"from {other.source}"
            )
            return
        try:
            pm.register(module, name=info.name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            problems.append(f"plugin {info.name!r} ({info.source}): {_one_line(exc)}")
            return
        infos.append(info)

    for module, info in _bundled(problems):
        register(module, info)
    if entry_points:
        for module, info in _entry_points(problems):
            register(module, info)
    for i, directory in enumerate(config.daemon.plugin_dirs):
        if not directory.is_dir():
            # A configured but missing directory is most likely a deployment mistake.
            key = f"daemon.plugin_dirs[{i}]"
            problems.append(
                f"{config.file_of(key)}: {key}: expected a directory, "
                f"{directory} does not exist or is not a directory"
            )
            continue
        for module, info in _drop_ins(directory, problems):
            register(module, info)

    # A sweeperd_* function that matches no hook is a typo that would silently do nothing.
    problems.extend(_unknown_hooks(pm))
    if not problems:
        pm.check_pending()  # belt and braces: pluggy's own check agrees with ours
    if problems:
        raise PluginError(problems)

    settings_problems = _validate_settings(pm, config)
    if settings_problems:
        raise ConfigError(settings_problems)
    operations = _collect_operations(pm, config)
    return Plugins(pm=pm, infos=tuple(infos), operations=operations)


def _bundled(problems: list[str]) -> list[tuple[ModuleType | None, PluginInfo]]:
    package = importlib.import_module(BUNDLED_PACKAGE)
    out: list[tuple[ModuleType | None, PluginInfo]] = []
    for mod in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        info = PluginInfo(name=mod.name, source="bundled", version=__version__)
        try:
            out.append((importlib.import_module(f"{BUNDLED_PACKAGE}.{mod.name}"), info))
        except Exception as exc:
            problems.append(_load_failure(info, exc))
    return out


def _entry_points(problems: list[str]) -> list[tuple[ModuleType | None, PluginInfo]]:
    out: list[tuple[ModuleType | None, PluginInfo]] = []
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            source=f"entry point {dist.name if dist else '?'} ({ep.value})",
            version=dist.version if dist else None,
        )
        try:
            out.append((ep.load(), info))
        except Exception as exc:
            problems.append(_load_failure(info, exc))
    return out


def _drop_ins(directory: Path, problems: list[str]) -> list[tuple[ModuleType | None, PluginInfo]]:
    out: list[tuple[ModuleType | None, PluginInfo]] = []
    for path in sorted(directory.glob("*.py")):
        name = path.stem
        if name.startswith("_"):
            continue
        info = PluginInfo(name=name, source=str(path), version=None)
        # Imported under a private module name so that a drop-in called "json.py" does not
        # shadow (or get shadowed by) the standard library; registered under its file name.
        module_name = f"_sweeperd_plugin_{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            problems.append(f"plugin {name!r} ({path}): cannot be imported")
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            problems.append(_load_failure(info, exc))
            continue
        version = getattr(module, "__version__", None)
        out.append((module, replace(info, version=str(version) if version else None)))
    return out


def _load_failure(info: PluginInfo, exc: BaseException) -> str:
    return (
        f"plugin {info.name!r} ({info.source}) failed to load: "
        f"{type(exc).__name__}: {_one_line(exc)}{_innermost_location(exc)}"
    )


def _one_line(exc: BaseException) -> str:
    # One line per problem, whatever the exception text looks like (libpq and C extensions
    # produce multi-line messages).
    return printable(" ".join(str(exc).split()))


def _innermost_location(exc: BaseException, *, skip: frozenset[str] = frozenset()) -> str:
    """`` [file:line]`` of the innermost frame of ``exc``'s traceback, leaving out ``skip`` files.

    When skipping, frames of generated code (a dataclass's ``__init__``, file ``<string>``) are
    left out too: they are nothing anyone can open.
    """
    if isinstance(exc, SyntaxError):
        return ""  # its message already names the file and line; the traceback ends in importlib
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not skip or (filename not in skip and not filename.startswith("<")):
            found = f" [{filename}:{tb.tb_lineno}]"
        tb = tb.tb_next
    return found


# An invalid Operation is the plugin's mistake, not model.py's: point at the plugin's line.
_MODEL_FILES = frozenset({model.__file__})


def _call_per_plugin(
    pm: pluggy.PluginManager, hook_name: str, config: Config, problems: list[str]
) -> list[tuple[str, Any]]:
    """Call a hook on each plugin with *that plugin's* settings; (plugin name, result) pairs.

    pluggy passes the same arguments to every implementation, but settings are per plugin: each
    plugin is called through a hook caller of its own (``pm.subset_hook_caller``, as pytest
    does), so hook wrappers and call monitoring keep working.
    """
    results: list[tuple[str, Any]] = []
    plugins = pm.get_plugins()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        name = pm.get_name(impl.plugin) or "?"
        others = [p for p in plugins if p is not impl.plugin]
        call = pm.subset_hook_caller(hook_name, remove_plugins=others)
        try:
            # pluggy leaves a None result out of the list: no result is None, as before.
            found = call(settings=config.plugin_settings(name), config=config)
            results.append((name, found[0] if found else None))
        except OperationError as exc:
            # Raised by Operation() inside the hook: usually a setting the plugin turned into
            # a name without checking it, so name the settings key and the plugin's own line.
            problems.append(
                f"{_plugin_key(config, name)}: {hook_name} built an invalid operation: "
                f"{_one_line(exc)}{_innermost_location(exc, skip=_MODEL_FILES)}"
            )
        except Exception as exc:
            # A plugin bug must name the plugin, keep the cause, and not become a traceback.
            problems.append(
                f"{_plugin_key(config, name)}: {hook_name} raised {type(exc).__name__}: "
                f"{_one_line(exc)}{_innermost_location(exc)}"
            )
    return results


def _plugin_key(config: Config, name: str, key: str = "") -> str:
    """Where a plugin's settings (or their ``key``) live, ``<file>: plugins.<name>[.<key>]``:
    what its problems name. The file is the one that set them (a drop-in, maybe)."""
    path = f"plugins.{toml_key(name)}" + (f".{key}" if key else "")
    return f"{config.file_of(path)}: {printable(path)}"


def _validate_settings(pm: pluggy.PluginManager, config: Config) -> list[str]:
    problems: list[str] = []
    for name in config.plugins:
        if not pm.has_plugin(name):
            loaded = ", ".join(sorted(n for n, _ in pm.list_name_plugin())) or "none"
            problems.append(
                f"{_plugin_key(config, name)}: no plugin named {name!r} is loaded "
                f"(loaded: {loaded})"
            )
    for name, found in _call_per_plugin(pm, "sweeperd_validate_settings", config, problems):
        pairs = _problem_pairs(found)
        if pairs is None:
            problems.append(
                f"{_plugin_key(config, name)}: sweeperd_validate_settings returned "
                f"{_one_line_repr(found)}, expected a list of (key, expectation) pairs"
            )
            continue
        for key, expectation in pairs:
            problems.append(f"{_plugin_key(config, name, key)}: {_one_line_text(expectation)}")
    return problems


def _problem_pairs(found: Any) -> list[tuple[str, str]] | None:
    """The (key, expectation) pairs a validate hook returned; None if it returned something else.

    A malformed return value is the plugin's bug; it must become a problem naming the plugin,
    not a traceback from unpacking it here.
    """
    if found is None:
        return []
    if isinstance(found, str | bytes | Mapping) or not isinstance(found, Iterable):
        return None
    pairs = list(found)
    if not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
        return None
    return [(str(key), str(expectation)) for key, expectation in pairs]


def _one_line_text(text: str) -> str:
    return printable(" ".join(text.split()))


def _one_line_repr(value: Any) -> str:
    text = _one_line_text(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _collect_operations(pm: pluggy.PluginManager, config: Config) -> dict[str, Operation]:
    operations: dict[str, Operation] = {}
    problems: list[str] = []
    for name, contributed in _call_per_plugin(pm, "sweeperd_operations", config, problems):
        where = _plugin_key(config, name)
        if contributed is None:
            continue
        if not isinstance(contributed, Sequence) or isinstance(contributed, str):
            problems.append(
                f"{where}: sweeperd_operations must return a list of Operation, "
                f"got {_one_line_repr(contributed)}"
            )
            continue
        for op in contributed:
            if not isinstance(op, Operation):
                problems.append(
                    f"{where}: sweeperd_operations returned "
                    f"{_one_line_repr(op)}, expected sweeperd.Operation"
                )
                continue
            if op.name in operations:
                other = operations[op.name].plugin
                problems.append(
                    f"{where}: sweeperd_operations returned operation {op.name!r} twice"
                    if other == name
                    else f"operation {op.name!r} is contributed by both plugin {other!r} "
                    f"and plugin {name!r}"
                )
                continue
            operations[op.name] = replace(op, plugin=name)
    if problems:
        raise PluginError(problems)
    return operations
