"""Hook specifications: what a sweeperd plugin can implement.

A plugin is a module (bundled in ``plugins/``, installed under the ``sweeperd`` entry-point group,
or a drop-in ``*.py`` file in a ``plugin_dirs`` directory) with functions decorated with
``@sweeperd.hookimpl`` (the decorator is optional, as in pytest: every ``sweeperd_*`` function of a
plugin module is taken as a hook implementation). A function with that prefix that
matches no hook below is an error at start-up (``pm.check_pending()``), so typos fail loudly.

Arguments are passed by name; an implementation may accept any subset of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Config
    from .model import Operation, Result, Tenant

hookspec = pluggy.HookspecMarker("sweeperd")


@hookspec
def sweeperd_validate_settings(
    settings: Mapping[str, Any], config: Config
) -> Iterable[tuple[str, str]] | None:
    """Check this plugin's own ``[plugins.<name>]`` table before anything runs.

    Called once per load of the configuration (``check-config``, start-up, reload), for every
    plugin, with the settings of the plugin named like the implementing module. Return problems
    as ``(key, expectation)`` pairs, where ``key`` is relative to ``plugins.<name>``
    (``"rules[0].older_than"``) and ``expectation`` says what was expected; all problems of all
    plugins are reported together with the core configuration errors.
    :func:`sweeperd.settings.read` reads a table into a dataclass of the plugin's own and returns
    exactly these pairs (the bundled plugins do that).

    :param settings: the plugin's ``[plugins.<name>]`` table (empty if absent).
    :param config: the validated core configuration.

    Not first-result: every plugin is asked. Settings tables for which no plugin is loaded are
    an error in their own right (a typo must not silently disable cleanup).
    """


@hookspec
def sweeperd_operations(settings: Mapping[str, Any], config: Config) -> Sequence[Operation] | None:
    """Contribute cleanup operations.

    Called once per load of the configuration, after validation succeeded, with the settings of
    the implementing plugin. Operation names must be unique across all plugins; a clash is an
    error naming both plugins.

    :param settings: the plugin's ``[plugins.<name>]`` table (empty if absent).
    :param config: the validated core configuration.
    :return: the operations, or None for none.

    **Work found at plan time.** An operation whose items are only known once the sweep starts
    ("vacuum every table that needs it", "reindex every bloated index") sets
    ``Operation(expand=…)``: ``async def expand(plan_ctx) -> Iterable[sweeperd.Target]``.
    It is called once per database per sweep, with a :class:`~sweeperd.model.PlanContext`
    holding a connection and every tenant of that database the sweep selected for the
    operation: one catalog query for all of them, not one per tenant. Each returned
    :class:`~sweeperd.model.Target` (tenant, name, tables, score, details, params, expected
    duration) becomes a work item of its own, with everything a static item has: its tables'
    exclusion and phase ordering (retention on a table still finishes before its vacuum),
    the bounds, isolation, a result line (operation name unchanged, ``details`` starting with
    the target's) and a span; ``run`` sees it as ``ctx.target``. Items start in descending
    ``score`` across every tenant and database (freed slots go to the most urgent waiting
    item); static operations have score 0. Count what was examined and needs nothing in
    ``plan_ctx.not_needed``: the report shows the sum (``"not_needed"``) instead of a result
    line each. An ``expand`` that raises fails that database's items of the operation with
    its reason; other databases and operations are planned as usual. The bundled
    ``vacuum.auto`` (``plugins/vacuum.py``) is the worked example.

    Not first-result: the operations of every plugin are collected.
    """


@hookspec(firstresult=True)
def sweeperd_skip_operation(operation: Operation, tenant: Tenant | None, sweep: str) -> str | None:
    """Veto one work item before it starts, e.g. a tenant being migrated or on a legal hold.

    Called for each (tenant, operation) just before it would run; cheap implementations only
    (it is on the hot path).

    :param operation: the operation about to run.
    :param tenant: its tenant, or None for scope ``database``.
    :param sweep: the sweep's name.
    :return: a reason to report the item as ``skipped``, or None to let it run.

    First-result: the first non-None reason wins and the remaining implementations are not called.
    """


@hookspec
def sweeperd_sweep_started(sweep: str, items: int) -> None:
    """Observe the start of a sweep, after the work items are planned.

    :param sweep: the sweep's name (``"*"`` for "every sweep once").
    :param items: how many work items were planned.

    Not first-result; return values are ignored.
    """


@hookspec
def sweeperd_operation_finished(result: Result, sweep: str) -> None:
    """Observe each work item's result as it finishes (ok, failed, skipped, cancelled, dry-run).

    Exceptions raised here are logged and otherwise ignored: an observer never fails a sweep.

    :param result: the item's result, as it appears in the JSON report.
    :param sweep: the sweep's name.

    Not first-result; return values are ignored.
    """


@hookspec
def sweeperd_sweep_finished(sweep: str, results: Sequence[Result]) -> None:
    """Observe the end of a sweep with all its results (e.g. to send a notification).

    Exceptions raised here are logged and otherwise ignored.

    :param sweep: the sweep's name.
    :param results: every work item's result.

    Not first-result; return values are ignored.
    """
