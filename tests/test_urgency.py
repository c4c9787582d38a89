"""The urgency score from rows as the catalog query returns them (pure logic)."""

from __future__ import annotations

import math

from sweeperd.urgency import FAILSAFE, Knobs, score_tables

SERVER = {
    "autovacuum_vacuum_threshold": 50.0,
    "autovacuum_vacuum_scale_factor": 0.2,
    "autovacuum_vacuum_insert_threshold": 1000.0,
    "autovacuum_vacuum_insert_scale_factor": 0.2,
    "autovacuum_analyze_threshold": 50.0,
    "autovacuum_analyze_scale_factor": 0.1,
    "autovacuum_freeze_max_age": 200_000_000.0,
    "autovacuum_multixact_freeze_max_age": 400_000_000.0,
    "vacuum_failsafe_age": 1_600_000_000.0,
    "vacuum_multixact_failsafe_age": 1_600_000_000.0,
}


def row(
    table: str,
    *,
    tuples: float = 1000,
    dead: int = 0,
    ins: int = 0,
    mods: int = 0,
    xid: int = 1000,
    mxid: int = 1,
    opts: list[str] | None = None,
) -> tuple[object, ...]:
    return ("tenant_a", table, 10, tuples, dead, ins, mods, xid, mxid, opts or [])


def test_dead_tuples_against_autovacuums_threshold() -> None:
    [under, over] = score_tables([row("a", dead=249), row("b", dead=500)], SERVER, Knobs())
    assert not under.needed and math.isclose(under.components["dead"].ratio, 249 / 250)
    assert over.needed and over.score == 2.0 and not over.freeze


def test_the_tables_own_reloptions_win_over_the_server() -> None:
    [t] = score_tables(
        [row("a", dead=60, opts=["autovacuum_vacuum_scale_factor=0.01"])], SERVER, Knobs()
    )
    assert t.components["dead"].threshold == 60.0 and t.needed


def test_xid_age_past_the_freeze_threshold_freezes_and_failsafe_outranks_all() -> None:
    old, ancient, dirty = score_tables(
        [row("old", xid=300_000_000), row("ancient", xid=1_700_000_000), row("dirty", dead=10**9)],
        SERVER,
        Knobs(),
    )
    assert old.freeze and old.score == 1.5
    assert ancient.failsafe and ancient.score > FAILSAFE > dirty.score
    assert not dirty.freeze


def test_weights_scale_the_score_not_whether_it_is_needed() -> None:
    [t] = score_tables([row("a", dead=500, mods=0)], SERVER, Knobs(weights={"dead": 0.25}))
    assert t.needed and t.score == 0.5


def test_configured_thresholds_replace_the_servers() -> None:
    [t] = score_tables(
        [row("a", dead=20, xid=2_000_000)], SERVER, Knobs(dead_min=10, xid_age=1_000_000)
    )
    assert t.components["dead"].threshold == 10 and t.components["xid_age"].ratio == 2.0


def test_reasons_are_most_pressing_first_with_value_threshold_ratio() -> None:
    [t] = score_tables([row("a", xid=183_000_000, dead=100)], SERVER, Knobs())
    reasons = t.reasons()
    assert next(iter(reasons)) == "xid_age"
    assert reasons["xid_age"] == {"value": 183000000, "threshold": 200000000, "ratio": 0.915}


def test_insert_vacuums_disabled_leave_the_component_out() -> None:
    [t] = score_tables(
        [row("a", ins=10**6)], {**SERVER, "autovacuum_vacuum_insert_threshold": -1}, Knobs()
    )
    assert "inserts" not in t.components and not t.needed


def test_without_analyze_changes_since_the_last_analyze_are_no_reason() -> None:
    [t] = score_tables([row("a", mods=10**6)], SERVER, Knobs(analyze=False))
    assert "analyze" not in t.components and not t.needed


def test_a_zero_threshold_never_makes_an_infinite_or_nan_score() -> None:
    server = {**SERVER, "autovacuum_analyze_threshold": 0.0, "autovacuum_analyze_scale_factor": 0.0}
    [t] = score_tables([row("a", tuples=-1, mods=7)], server, Knobs(weights={"analyze": 0}))
    assert math.isfinite(t.score) and t.components["analyze"].to_json()["ratio"] == 7.0
