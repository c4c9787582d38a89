"""The planner: which (tenant, operation) work items a sweep selects, and their ordering deps.

Pure logic: no database. Configurations are built with ``parse_config`` (the same validation the
TOML file goes through); operations and tenants are constructed directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sweeperd.bundled.vacuum import table_operation_name

from sweeperd import ALL_TABLES, Operation, Phase, Tenant
from sweeperd.config import Config, parse_config
from sweeperd.planner import Plan, PlanError, SelectionError, WorkItem, make_plan


async def _noop(ctx: Any) -> None:
    return None


def op(
    name: str,
    *tables: str,
    phase: int = Phase.DEFAULT,
    scope: str = "tenant",
    after: Sequence[str] = (),
) -> Operation:
    return Operation(
        name=name, run=_noop, tables=tables, phase=phase, scope=scope, after=tuple(after)
    )  # type: ignore[arg-type]


def ops(*operations: Operation) -> dict[str, Operation]:
    return {o.name: o for o in operations}


DATABASES = {
    "main": {"dsn": "dbname=main"},
    "other": {"dsn": "dbname=other"},
    "empty": {"dsn": "dbname=empty"},
}
TENANTS = [
    Tenant(name="acme", database="main", schema="tenant_acme"),
    Tenant(name="globex", database="main", schema="tenant_globex"),
    Tenant(name="initech", database="other", schema="tenant_initech"),
    Tenant(name="umbrella", database="other", schema="tenant_umbrella"),
]


def config(
    sweeps: Mapping[str, Mapping[str, Any]] | None = None,
    databases: Mapping[str, Any] | None = None,
) -> Config:
    doc: dict[str, Any] = {
        "databases": dict(databases if databases is not None else DATABASES),
        "tenants": [
            {"name": t.name, "database": t.database, "schema": t.schema}
            for t in TENANTS
            if t.database in (databases if databases is not None else DATABASES)
        ],
        "sweeps": {name: {"cron": "0 3 * * *", **sw} for name, sw in (sweeps or {}).items()},
    }
    return parse_config(doc, Path("t.toml"))


# A realistic plugin set: retention (prune phase), vacuum (maintain phase), a cache purge, and a
# database-scope retention rule.
OPERATIONS = ops(
    op("retention.notifications", "notifications", phase=Phase.PRUNE),
    op("retention.sessions", "public.sessions", phase=Phase.PRUNE, scope="database"),
    op("vacuum.notifications", "notifications", phase=Phase.MAINTAIN),
    op("vacuum.reports", "report_executions", phase=Phase.MAINTAIN),
    op("cache.purge", "analytics_cache"),
)

SWEEPS = {
    "nightly": {
        "operations": ["retention.*", "vacuum.*"],
        "tenants": ["*"],
        "per_tenant_concurrency": 3,
        "timeout": "2h",
    },
    "hourly": {
        "operations": ["cache.*", "retention.notifications"],
        "tenants": ["acme", "g*"],
        "per_tenant_concurrency": 2,
    },
}


def keys(plan: Plan) -> list[tuple[str | None, str, str]]:
    """(tenant or None, database, operation) per item, in plan order."""
    return [
        (it.tenant.name if it.tenant else None, it.database, it.operation.name) for it in plan.items
    ]


def tenant_pairs(plan: Plan) -> set[tuple[str, str]]:
    return {(it.tenant.name, it.operation.name) for it in plan.items if it.tenant is not None}


def database_pairs(plan: Plan) -> set[tuple[str, str]]:
    return {(it.database, it.operation.name) for it in plan.items if it.tenant is None}


def by_key(plan: Plan) -> dict[tuple[str | None, str], WorkItem]:
    return {
        (it.tenant.name if it.tenant else it.database, it.operation.name): it for it in plan.items
    }


def ancestors(plan: Plan, item: WorkItem) -> set[int]:
    """Every item ``item`` waits for, directly or transitively."""
    seen: set[int] = set()
    stack = list(item.deps)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(plan.items[i].deps)
    return seen


def assert_acyclic(plan: Plan) -> None:
    indegree = {it.index: len(it.deps) for it in plan.items}
    dependants: dict[int, list[int]] = {it.index: [] for it in plan.items}
    for it in plan.items:
        for d in it.deps:
            assert d in dependants, f"item {it.index} depends on unknown item {d}"
            assert d != it.index, f"item {it.index} depends on itself"
            dependants[d].append(it.index)
    ready = [i for i, n in indegree.items() if n == 0]
    ordered = 0
    while ready:
        i = ready.pop()
        ordered += 1
        for j in dependants[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    assert ordered == len(plan.items), "the dependency graph has a cycle"


def assert_well_formed(plan: Plan) -> None:
    assert [it.index for it in plan.items] == list(range(len(plan.items)))
    assert len(set(keys(plan))) == len(plan.items), "duplicate work items"
    for it in plan.items:
        if it.operation.scope == "tenant":
            assert it.tenant is not None and it.database == it.tenant.database
        else:
            assert it.tenant is None
    assert_acyclic(plan)


# -- selection -------------------------------------------------------------------------------------


def test_sweep_selects_operations_and_tenants_by_glob() -> None:
    plan = make_plan(config(SWEEPS), OPERATIONS, TENANTS, sweep="hourly")
    assert_well_formed(plan)
    assert plan.sweep == "hourly"
    assert tenant_pairs(plan) == {
        ("acme", "cache.purge"),
        ("acme", "retention.notifications"),
        ("globex", "cache.purge"),
        ("globex", "retention.notifications"),
    }
    assert database_pairs(plan) == set()
    assert plan.per_tenant_concurrency == 2
    assert plan.timeout is None


def test_sweep_with_all_tenants_and_database_scope_operations() -> None:
    plan = make_plan(config(SWEEPS), OPERATIONS, TENANTS, sweep="nightly")
    assert_well_formed(plan)
    tenant_ops = {"retention.notifications", "vacuum.notifications", "vacuum.reports"}
    assert tenant_pairs(plan) == {(t.name, o) for t in TENANTS for o in tenant_ops}
    # Without --tenant: once per configured database (even one without tenants).
    assert database_pairs(plan) == {
        ("main", "retention.sessions"),
        ("other", "retention.sessions"),
        ("empty", "retention.sessions"),
    }
    assert sum(1 for k in keys(plan) if k[2] == "retention.sessions") == 3
    assert plan.per_tenant_concurrency == 3
    assert plan.timeout == 7200.0


def test_tenant_narrowing_intersects_with_the_sweep() -> None:
    cfg = config(SWEEPS)
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="nightly", tenant_globs=["acme", "init*"])
    assert_well_formed(plan)
    assert {t for t, _ in tenant_pairs(plan)} == {"acme", "initech"}
    # Database-scope operations only where a selected tenant lives.
    assert database_pairs(plan) == {("main", "retention.sessions"), ("other", "retention.sessions")}

    # --tenant narrows, it never widens: umbrella is not in the hourly sweep.
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="hourly", tenant_globs=["umbrella"])
    assert plan.items == ()

    # A --tenant glob matching nothing selects nothing at all, not even database-scope work.
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="nightly", tenant_globs=["nobody"])
    assert plan.items == ()


def test_only_narrowing_intersects_with_the_sweep() -> None:
    cfg = config(SWEEPS)
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="nightly", only_globs=["vacuum.*"])
    assert_well_formed(plan)
    assert {o for _, o in tenant_pairs(plan)} == {"vacuum.notifications", "vacuum.reports"}
    assert database_pairs(plan) == set()

    # cache.purge exists but is not in the nightly sweep: --only cannot add it.
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="nightly", only_globs=["cache.*"])
    assert plan.items == ()

    plan = make_plan(
        cfg,
        OPERATIONS,
        TENANTS,
        sweep="nightly",
        only_globs=["retention.s*"],
        tenant_globs=["globex"],
    )
    assert keys(plan) == [(None, "main", "retention.sessions")]


# The vacuums of tables with hostile names, named as the vacuum plugin names them.
HOSTILE_TABLES = [
    "events",
    'Events "x"',
    "ÜBER tab",
    "a.b",
    "back\\",
    "50%_off",
    "x[1] y",
    "x1 y",
    "a*b",
    "a b",
    "auto",
]
HOSTILE_OPERATIONS = ops(
    *(op(table_operation_name(t), t, phase=Phase.MAINTAIN) for t in HOSTILE_TABLES),
    op("vacuum.database_stats", scope="database", phase=Phase.MAINTAIN, after=["vacuum.*"]),
)


def selected(only: Sequence[str], **kw: Any) -> set[str]:
    plan = make_plan(config(), HOSTILE_OPERATIONS, TENANTS[:1], only_globs=only, **kw)
    assert_well_formed(plan)
    return {it.operation.name for it in plan.items}


def test_hostile_table_names_are_distinct_operations_all_matched_by_vacuum_star() -> None:
    assert len(HOSTILE_OPERATIONS) == len(HOSTILE_TABLES) + 1
    assert selected(["vacuum.*"]) == set(HOSTILE_OPERATIONS)


@pytest.mark.parametrize("table", HOSTILE_TABLES)
def test_only_with_an_operation_name_selects_that_one_table(table: str) -> None:
    name = table_operation_name(table)
    assert selected([name]) == {name}


def test_only_exact_names_are_not_globs_but_other_patterns_are() -> None:
    # fnmatch alone would select "x1 y" for "x[1] y" (and not "x[1] y" itself), and "a b" too
    # for "a*b": an exact name means that operation only.
    assert selected(['vacuum."x[1] y"']) == {'vacuum."x[1] y"'}
    assert selected(['vacuum."a*b"']) == {'vacuum."a*b"'}
    # Patterns that are not names are fnmatch globs; [[] and [*] match the characters.
    assert selected(['vacuum."x*']) == {'vacuum."x[1] y"', 'vacuum."x1 y"'}
    assert selected(['vacuum."x[[]*']) == {'vacuum."x[1] y"'}
    assert selected(['vacuum."a[*]*']) == {'vacuum."a*b"'}
    assert selected(["vacuum.auto"]) == set()  # the table "auto" is vacuum."auto"
    assert selected(['vacuum."auto"']) == {'vacuum."auto"'}


def test_sweep_operations_and_after_take_exact_names_too() -> None:
    cfg = config({"s": {"operations": ['vacuum."x[1] y"', "vacuum.database_stats"]}})
    plan = make_plan(cfg, HOSTILE_OPERATIONS, TENANTS[:1], sweep="s")
    assert {it.operation.name for it in plan.items} == {'vacuum."x[1] y"', "vacuum.database_stats"}
    after = ops(
        op('vacuum."x[1] y"', "x[1] y"),
        op('vacuum."x1 y"', "x1 y"),
        op("late.one", "other", after=['vacuum."x[1] y"']),
    )
    plan = make_plan(config(), after, TENANTS[:1])
    items = by_key(plan)
    assert items[("acme", "late.one")].deps == [items[("acme", 'vacuum."x[1] y"')].index]


def test_globs_are_case_sensitive_and_anchored() -> None:
    cfg = config({"s": {"operations": ["Vacuum.*", "cache"], "tenants": ["ACME", "glo"]}})
    assert make_plan(cfg, OPERATIONS, TENANTS, sweep="s").items == ()


def test_unknown_sweep_is_a_selection_error() -> None:
    with pytest.raises(SelectionError, match="weekly"):
        make_plan(config(SWEEPS), OPERATIONS, TENANTS, sweep="weekly")
    with pytest.raises(SelectionError):
        make_plan(config({}), OPERATIONS, TENANTS, sweep="nightly")


def test_no_sweep_is_the_union_of_all_sweeps_without_duplicates() -> None:
    cfg = config(SWEEPS)
    plan = make_plan(cfg, OPERATIONS, TENANTS)
    assert_well_formed(plan)
    nightly = make_plan(cfg, OPERATIONS, TENANTS, sweep="nightly")
    hourly = make_plan(cfg, OPERATIONS, TENANTS, sweep="hourly")
    assert set(keys(plan)) == set(keys(nightly)) | set(keys(hourly))
    # acme/globex retention.notifications are selected by both sweeps, but planned once.
    assert len(keys(plan)) == len(set(keys(plan)))
    assert sum(1 for k in keys(plan) if k[0] == "acme" and k[2] == "retention.notifications") == 1
    # Every sweep's work at once: bounded by the largest timeout (one sweep's shorter bound
    # would cut another's work short); hourly sets none, nightly 2h.
    assert plan.timeout == 7200.0


def test_no_sweep_and_none_configured_runs_every_operation_for_every_tenant() -> None:
    plan = make_plan(config({}), OPERATIONS, TENANTS)
    assert_well_formed(plan)
    tenant_ops = [o.name for o in OPERATIONS.values() if o.scope == "tenant"]
    assert tenant_pairs(plan) == {(t.name, o) for t in TENANTS for o in tenant_ops}
    assert database_pairs(plan) == {(db, "retention.sessions") for db in DATABASES}


def test_no_sweep_with_tenant_narrowing_keeps_database_work_to_selected_databases() -> None:
    plan = make_plan(config(SWEEPS), OPERATIONS, TENANTS, tenant_globs=["umbrella"])
    assert_well_formed(plan)
    assert {t for t, _ in tenant_pairs(plan)} == {"umbrella"}
    assert database_pairs(plan) == {("other", "retention.sessions")}


def test_database_scope_operation_runs_once_per_database_with_a_selected_tenant() -> None:
    # The sweep covers only tenants of "main": with --tenant, "other" and "empty" get nothing.
    cfg = config({"s": {"operations": ["*"], "tenants": ["acme", "globex"]}})
    plan = make_plan(cfg, OPERATIONS, TENANTS, sweep="s", tenant_globs=["*"])
    assert database_pairs(plan) == {("main", "retention.sessions")}
    assert {t for t, _ in tenant_pairs(plan)} == {"acme", "globex"}


def test_database_scope_selection_does_not_depend_on_sweep_declaration_order() -> None:
    a = {"operations": ["retention.sessions"], "tenants": ["acme"]}
    b = {"operations": ["cache.*"], "tenants": ["*"]}
    for sweeps in ({"a": a, "b": b}, {"b": b, "a": a}):
        plan = make_plan(config(sweeps), OPERATIONS, TENANTS, tenant_globs=["umbrella"])
        assert tenant_pairs(plan) == {("umbrella", "cache.purge")}
        # Narrowed to umbrella, sweep "a" selects no tenant at all, so its database-scope rule
        # has no selected tenant anywhere; sweep "b" has no database-scope operation. Nothing
        # database-wide may run, whichever sweep is declared first.
        assert database_pairs(plan) == set(), list(sweeps)


def test_empty_tenant_list_and_no_operations() -> None:
    cfg = config(SWEEPS)
    assert make_plan(cfg, {}, TENANTS, sweep="nightly").items == ()
    plan = make_plan(cfg, OPERATIONS, [], sweep="nightly")
    assert tenant_pairs(plan) == set()
    assert_well_formed(plan)


# -- dependencies ----------------------------------------------------------------------------------


def plan_for(operations: Iterable[Operation], tenants: Sequence[Tenant] = TENANTS[:1]) -> Plan:
    plan = make_plan(config({}), ops(*operations), tenants)
    assert_well_formed(plan)
    return plan


def test_same_table_same_tenant_is_chained_by_phase_then_position() -> None:
    # Declared in the "wrong" order: vacuum first, prune last.
    plan = plan_for(
        [
            op("vacuum.t", "t", phase=Phase.MAINTAIN),
            op("app.first", "t"),
            op("app.second", "t"),
            op("retention.t", "t", phase=Phase.PRUNE),
        ]
    )
    it = by_key(plan)
    prune, first, second, vacuum = (
        it[("acme", n)] for n in ("retention.t", "app.first", "app.second", "vacuum.t")
    )
    assert prune.deps == []
    assert first.deps == [prune.index]
    assert second.deps == [first.index]
    assert vacuum.deps == [second.index]


def test_different_tables_have_no_dependencies() -> None:
    plan = plan_for(
        [
            op("retention.a", "a", phase=Phase.PRUNE),
            op("vacuum.b", "b", phase=Phase.MAINTAIN),
            op("app.c", "c"),
            op("app.none"),
        ]
    )
    assert all(item.deps == [] for item in plan.items)


def test_different_tenants_have_no_dependencies() -> None:
    plan = plan_for(
        [op("retention.t", "t", phase=Phase.PRUNE), op("vacuum.t", "t", phase=Phase.MAINTAIN)],
        tenants=TENANTS,
    )
    for item in plan.items:
        assert item.tenant is not None
        assert all(plan.items[d].tenant == item.tenant for d in item.deps)
        if item.operation.name == "vacuum.t":
            assert [plan.items[d].operation.name for d in item.deps] == ["retention.t"]
        else:
            assert item.deps == []


def test_tenants_sharing_a_schema_name_in_different_databases_are_independent() -> None:
    tenants = [Tenant("a", "main", "app"), Tenant("b", "other", "app")]
    plan = plan_for(
        [op("retention.t", "t", phase=Phase.PRUNE), op("vacuum.t", "t", phase=Phase.MAINTAIN)],
        tenants=tenants,
    )
    for item in plan.items:
        assert all(plan.items[d].tenant == item.tenant for d in item.deps)


def test_an_operation_on_several_tables_waits_for_each() -> None:
    plan = plan_for(
        [
            op("retention.a", "a", phase=Phase.PRUNE),
            op("retention.b", "b", phase=Phase.PRUNE),
            op("app.ab", "a", "b"),
            op("vacuum.a", "a", phase=Phase.MAINTAIN),
            op("vacuum.c", "c", phase=Phase.MAINTAIN),
        ]
    )
    it = by_key(plan)
    assert it[("acme", "app.ab")].deps == sorted(
        [it[("acme", "retention.a")].index, it[("acme", "retention.b")].index]
    )
    assert it[("acme", "vacuum.a")].deps == [it[("acme", "app.ab")].index]
    assert it[("acme", "vacuum.c")].deps == []


def test_all_tables_waits_for_everything_before_and_blocks_everything_after() -> None:
    plan = plan_for(
        [
            op("retention.a", "a", phase=Phase.PRUNE),
            op("retention.b", "b", phase=Phase.PRUNE),
            op("app.everything", ALL_TABLES),
            op("vacuum.a", "a", phase=Phase.MAINTAIN),
            op("vacuum.c", "c", phase=Phase.MAINTAIN),
            op("app.late_everything", ALL_TABLES, phase=Phase.MAINTAIN + 1),
            op("app.unrelated_tenant_free"),
        ]
    )
    it = by_key(plan)
    star = it[("acme", "app.everything")]
    late = it[("acme", "app.late_everything")]
    before = {it[("acme", n)].index for n in ("retention.a", "retention.b")}
    after = {it[("acme", n)].index for n in ("vacuum.a", "vacuum.c")}
    assert before <= ancestors(plan, star)
    for i in after:
        assert star.index in ancestors(plan, plan.items[i]), plan.items[i].operation.name
    assert before | after | {star.index} <= ancestors(plan, late)
    # "*" is per tenant, not global.
    plan2 = plan_for(
        [op("app.everything", ALL_TABLES), op("vacuum.a", "a", phase=Phase.MAINTAIN)],
        tenants=TENANTS,
    )
    for item in plan2.items:
        assert all(plan2.items[d].tenant == item.tenant for d in item.deps)


def test_all_tables_in_an_early_phase_still_precedes_later_phases() -> None:
    plan = plan_for(
        [
            op("vacuum.a", "a", phase=Phase.MAINTAIN),
            op("app.everything", ALL_TABLES, phase=Phase.PRUNE),
            op("retention.b", "b", phase=Phase.PRUNE),
        ]
    )
    it = by_key(plan)
    star = it[("acme", "app.everything")]
    assert star.deps == []
    assert star.index in ancestors(plan, it[("acme", "retention.b")])
    assert star.index in ancestors(plan, it[("acme", "vacuum.a")])


def test_database_scope_items_are_chained_per_database() -> None:
    plan = plan_for(
        [
            op("vacuum.sessions", "public.sessions", phase=Phase.MAINTAIN, scope="database"),
            op("retention.sessions", "public.sessions", phase=Phase.PRUNE, scope="database"),
            op("retention.audit", "public.audit", phase=Phase.PRUNE, scope="database"),
        ]
    )
    it = by_key(plan)
    for db in DATABASES:
        vac, ret, audit = (
            it[(db, n)] for n in ("vacuum.sessions", "retention.sessions", "retention.audit")
        )
        assert vac.deps == [ret.index]
        assert ret.deps == []
        assert audit.deps == []


def test_after_waits_for_the_named_operations_of_the_same_tenant() -> None:
    plan = plan_for(
        [
            op("vacuum.a", "a", phase=Phase.MAINTAIN),
            op("vacuum.b", "b", phase=Phase.MAINTAIN),
            op("cache.purge", "c"),
            op("report.summary", after=["vacuum.*"]),
        ],
        tenants=TENANTS[:2],
    )
    for item in plan.items:
        if item.operation.name != "report.summary":
            continue
        assert item.tenant is not None
        assert sorted(
            (plan.items[d].tenant.name, plan.items[d].operation.name)  # type: ignore[union-attr]
            for d in item.deps
        ) == [(item.tenant.name, "vacuum.a"), (item.tenant.name, "vacuum.b")]


def test_database_scope_after_waits_for_every_tenant_of_that_database_only() -> None:
    plan = plan_for(
        [
            op("vacuum.a", "a", phase=Phase.MAINTAIN),
            op("stats.refresh", "public.stats", scope="database", after=["vacuum.*"]),
        ],
        tenants=TENANTS,
    )
    it = by_key(plan)
    for db in ("main", "other"):
        expected = {it[(t.name, "vacuum.a")].index for t in TENANTS if t.database == db}
        assert set(it[(db, "stats.refresh")].deps) == expected
    assert it[("empty", "stats.refresh")].deps == []


def test_contradictory_after_is_a_plan_error_not_a_hang() -> None:
    with pytest.raises(PlanError):
        make_plan(config({}), ops(op("p.x", after=["p.y"]), op("p.y", after=["p.x"])), TENANTS[:1])
    # "after" against the phase order on a shared table is a cycle too.
    with pytest.raises(PlanError):
        make_plan(
            config({}),
            ops(
                op("retention.t", "t", phase=Phase.PRUNE, after=["vacuum.t"]),
                op("vacuum.t", "t", phase=Phase.MAINTAIN),
            ),
            TENANTS[:1],
        )


# -- property: never a cycle, and every conflicting pair is ordered by phase -----------------------

_TABLES = ["a", "b", "c", ALL_TABLES]


@st.composite
def random_operations(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(min_value=1, max_value=8))
    out = []
    for i in range(n):
        tables = draw(st.lists(st.sampled_from(_TABLES), max_size=3, unique=True))
        phase = draw(st.sampled_from([Phase.PRUNE, Phase.DEFAULT, Phase.MAINTAIN, 42]))
        out.append(op(f"p.op{i}", *tables, phase=phase))
    return out


def _conflict(a: Operation, b: Operation) -> bool:
    if not a.tables or not b.tables:
        return False
    return ALL_TABLES in a.tables or ALL_TABLES in b.tables or bool(set(a.tables) & set(b.tables))


@settings(max_examples=300, deadline=None)
@given(operations=random_operations(), n_tenants=st.integers(min_value=1, max_value=3))
def test_dependencies_never_cycle_and_order_every_conflict(
    operations: list[Operation], n_tenants: int
) -> None:
    plan = plan_for(operations, tenants=TENANTS[:n_tenants])
    closure = {item.index: ancestors(plan, item) for item in plan.items}
    for x in plan.items:
        for y in plan.items:
            if x.index >= y.index:
                continue
            if x.tenant != y.tenant:
                assert x.index not in closure[y.index] and y.index not in closure[x.index]
                continue
            if not _conflict(x.operation, y.operation):
                continue
            # Conflicting items are serialized, the lower phase first (ties: declaration order).
            first, second = sorted((x, y), key=lambda i: (i.operation.phase, i.index))
            assert first.index in closure[second.index], (
                f"{second.operation.name} {second.operation.tables} does not wait for "
                f"{first.operation.name} {first.operation.tables}"
            )
