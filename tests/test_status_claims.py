"""``sweeperd status`` on the claims of shared firings (issue 13, "exactly-once accounting").

The table is made by the real DDL (``sweeperd.coordination._DDL`` through
``Database.ensure_schema``); its rows are either inserted to stand for each state a tenant can be
in (finished by two instances, in progress, taken over after its lease expired, released,
released and taken over, stalled, not yet claimed, the database scope) or written by two real
in-process runs of one firing. The real CLI reads them, in text and as JSON.

Checked: the latest firing per sweep and database only; per instance its finished tenants (text:
the first few and "(+N)"; JSON: all) and those it holds; the takeovers (from, by, why,
attempts); the one-line verdict; ``--sweep`` and ``--tenant``; a database without the table and
a role that may not read it (one line each, no traceback, the runs still shown); a table of the
first version (its rows are finished claims).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import histsetup
import psycopg
import pytest
from histsetup import EXIT_OK
from support import run_sql, throwaway_role
from test_coordination import record_op, run_firing, setup_tenants
from test_status import status

from sweeperd.config import DatabaseConfig
from sweeperd.coordination import _DDL
from sweeperd.db import Database

FIRING = dt.datetime(2026, 1, 3, 3, 0, tzinfo=dt.UTC)
EARLIER = FIRING - dt.timedelta(days=1)
A, B, C = "host-a:11", "host-b:12", "host-c:13"


# -- helpers ---------------------------------------------------------------------------------------


def create_claims_table(dsn: str) -> None:
    """The table as ``sweeperd run`` creates it."""

    async def main() -> None:
        database = Database(DatabaseConfig(name="main", dsn=dsn))
        await database.open()
        try:
            async with database.housekeeping("test") as conn:
                await database.ensure_schema(conn, _DDL)
        finally:
            await database.close()

    asyncio.run(main())


def insert(dsn: str, rows: list[dict[str, Any]]) -> None:
    """Claims rows; times are SQL expressions relative to now() (``lease`` etc.)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, r in enumerate(rows):
            # now() + NULL is NULL: a time not given stays unset.
            conn.execute(
                "INSERT INTO sweeperd.claims (sweep, firing, tenant, instance, rank, lease_until,"
                " started_at, finished_at, released_at, taken_from, taken_why, attempts)"
                " VALUES (%s, %s, %s, %s, %s, now() + %s::interval, now() + %s::interval,"
                " now() + %s::interval, now() + %s::interval, %s, %s, %s)",
                (
                    r.get("sweep", "nightly"),
                    r.get("firing", FIRING),
                    r["tenant"],
                    r.get("instance"),
                    i,
                    r.get("lease"),
                    r.get("started", "-1 min" if r.get("instance") else None),
                    r.get("finished"),
                    r.get("released"),
                    r.get("taken_from"),
                    r.get("taken_why"),
                    r.get("attempts", 1 if r.get("instance") else 0),
                ),
            )


def done(tenant: str, instance: str, **kw: Any) -> dict[str, Any]:
    return {"tenant": tenant, "instance": instance, "finished": "-10 s", **kw}


# Every state once: (database scope) and t001..t007 finished by A, t008 and t009 by B; t010 in
# progress at A; t011 taken over by B from C after C's lease expired, and finished; t012
# released by C (a stop) and not yet retaken; t013 released by C and taken over by A, in
# progress; t014 held by C with its lease run out (stalled); t015, t016 not claimed yet.
EVERY_STATE: list[dict[str, Any]] = [
    done("", A),
    *(done(f"t{i:03d}", A) for i in range(1, 8)),
    done("t008", B),
    done("t009", B),
    {"tenant": "t010", "instance": A, "lease": "1 hour"},
    done("t011", B, taken_from=C, taken_why="lease expired", attempts=2),
    {"tenant": "t012", "instance": C, "lease": "-5 s", "released": "-5 s"},
    {
        "tenant": "t013",
        "instance": A,
        "lease": "1 hour",
        "taken_from": C,
        "taken_why": "released",
        "attempts": 2,
    },
    {"tenant": "t014", "instance": C, "lease": "-1 min"},
    {"tenant": "t015"},
    {"tenant": "t016"},
]
VERDICT = (
    "17 tenants: 11 finished (host-a:11 8, host-b:12 3), 2 in progress, 2 not yet claimed, "
    "1 released (waiting for another instance), 1 stalled (lease expired, waiting for "
    "takeover), 2 taken over"
)


def status_doc(config: Path, *args: str, expect: int = EXIT_OK) -> dict[str, Any]:
    out = status(config, *args, "--json", expect=expect)
    doc = json.loads(out)
    assert isinstance(doc, dict)
    assert {"runs", "last_success", "unreachable"} <= set(doc), doc  # the keys stay
    return doc


def claims_lines(out: str) -> list[str]:
    """The claims section of the text: from its first line to the end."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("claims"))
    return lines[first:]


def parse_ts(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str) -> Path:
    return histsetup.write_setup(tmp_path, {"main": pg_dsn}, connect_timeout="2s")


@pytest.fixture
def every_state(config: Path, pg_dsn: str) -> Path:
    create_claims_table(pg_dsn)
    # An earlier firing of the same sweep (not shown) and the latest of another sweep.
    insert(pg_dsn, [done(f"t{i:03d}", "host-z:1", firing=EARLIER) for i in range(1, 4)])
    insert(pg_dsn, [done("acme", B, sweep="hourly"), done("globex", B, sweep="hourly")])
    insert(pg_dsn, EVERY_STATE)
    return config


# -- what status shows -----------------------------------------------------------------------------


def test_text_shows_who_did_which_tenants_of_the_latest_firing(every_state: Path) -> None:
    out = status(every_state)
    assert "Traceback" not in out
    lines = claims_lines(out)
    # hourly first (sweeps in name order), then nightly.
    assert lines[0] == (
        "claims of hourly on main, firing 2026-01-03 03:00:00 UTC: 2 tenants: "
        "2 finished (host-b:12 2), 0 in progress, 0 taken over"
    )
    assert lines[1] == "    host-b:12: finished 2: acme, globex"
    nightly = lines[2:]
    assert nightly[0] == f"claims of nightly on main, firing 2026-01-03 03:00:00 UTC: {VERDICT}"
    assert nightly[1] == (
        "    host-a:11: finished 8: (database scope), t001, t002, t003, t004, … (+3)"
    )
    assert re.fullmatch(
        r"    host-a:11: in progress 2: t010 \(lease \S+ left\), t013 \(lease \S+ left\)",
        nightly[2],
    ), nightly[2]
    assert nightly[3] == "    host-b:12: finished 3: t008, t009, t011"
    assert re.fullmatch(r"    host-c:13: released 1: t012 \(released \S+ ago\)", nightly[4])
    assert re.fullmatch(r"    host-c:13: stalled 1: t014 \(lease expired \S+ ago\)", nightly[5])
    assert nightly[6:] == [
        "    taken over: t011 from host-c:13 by host-b:12 (lease expired, attempt 2, finished now)",
        "    taken over: t013 from host-c:13 by host-a:11 (released, attempt 2, in progress now)",
    ]
    assert "host-z:1" not in out  # the earlier firing


def test_json_lists_every_tenant_by_instance_and_every_takeover(every_state: Path) -> None:
    doc = status_doc(every_state)
    assert set(doc) == {"runs", "last_success", "unreachable", "claims"}
    hourly, nightly = doc["claims"]
    assert (hourly["sweep"], hourly["database"]) == ("hourly", "main")
    assert (nightly["sweep"], nightly["database"]) == ("nightly", "main")
    assert parse_ts(nightly["firing"]) == FIRING
    assert nightly["counts"] == {
        "tenants": 17,
        "finished": 11,
        "in_progress": 2,
        "released": 1,
        "stalled": 1,
        "unclaimed": 2,
        "taken_over": 2,
    }
    assert nightly["verdict"] == VERDICT
    by = {i["instance"]: i for i in nightly["instances"]}
    assert list(by) == [A, B, C]
    # Database-scope work is "tenant": null, as in the reports.
    assert by[A]["finished"] == [None, *(f"t{i:03d}" for i in range(1, 8))]
    assert by[A]["counts"] == {"finished": 8, "in_progress": 2, "released": 0, "stalled": 0}
    assert [h["tenant"] for h in by[A]["in_progress"]] == ["t010", "t013"]
    for held in by[A]["in_progress"]:
        assert parse_ts(held["lease_until"]) > parse_ts(held["started_at"])
        assert held["released_at"] is None
    assert [h["attempts"] for h in by[A]["in_progress"]] == [1, 2]
    assert by[A]["released"] == by[A]["stalled"] == []
    assert by[B]["finished"] == ["t008", "t009", "t011"]
    assert by[B]["in_progress"] == []
    assert by[C]["finished"] == [] and by[C]["counts"]["finished"] == 0
    [released] = by[C]["released"]
    assert released["tenant"] == "t012" and released["released_at"] is not None
    [stalled] = by[C]["stalled"]
    assert stalled["tenant"] == "t014"
    assert parse_ts(stalled["lease_until"]) < parse_ts(released["released_at"])
    assert nightly["taken_over"] == [
        {
            "tenant": "t011",
            "from": C,
            "by": B,
            "why": "lease expired",
            "attempts": 2,
            "state": "finished",
        },
        {
            "tenant": "t013",
            "from": C,
            "by": A,
            "why": "released",
            "attempts": 2,
            "state": "in_progress",
        },
    ]
    assert hourly["counts"]["tenants"] == 2
    assert hourly["instances"] == [
        {
            "instance": B,
            "counts": {"finished": 2, "in_progress": 0, "released": 0, "stalled": 0},
            "finished": ["acme", "globex"],
            "in_progress": [],
            "released": [],
            "stalled": [],
        }
    ]


def test_sweep_and_tenant_select_the_claims_too(every_state: Path) -> None:
    doc = status_doc(every_state, "--sweep", "hourly")
    assert [f["sweep"] for f in doc["claims"]] == ["hourly"]
    out = status(every_state, "--sweep", "nightly", "--tenant", "t01[0-2]")
    [verdict, *rest] = claims_lines(out)
    assert verdict == (
        "claims of nightly on main, firing 2026-01-03 03:00:00 UTC: 3 tenants: 1 finished "
        "(host-b:12 1), 1 in progress, 1 released (waiting for another instance), 1 taken over"
    )
    assert rest[-1] == (
        "    taken over: t011 from host-c:13 by host-b:12 (lease expired, attempt 2, finished now)"
    )
    # Nothing of the sweep matches: said so, not an empty section.
    out = status(every_state, "--sweep", "hourly", "--tenant", "nobody")
    assert claims_lines(out) == ["claims: none recorded in main"]


def test_long_lists_are_abbreviated_in_text_and_whole_in_json(config: Path, pg_dsn: str) -> None:
    create_claims_table(pg_dsn)
    insert(pg_dsn, [done(f"t{i:03d}", A) for i in range(60)])
    insert(
        pg_dsn,
        [
            done(f"u{i:03d}", B, taken_from=C, taken_why="lease expired", attempts=2)
            for i in range(12)
        ],
    )
    lines = claims_lines(status(config))
    assert lines[0].endswith(
        "72 tenants: 72 finished (host-a:11 60, host-b:12 12), 0 in progress, 12 taken over"
    )
    assert lines[1] == "    host-a:11: finished 60: t000, t001, t002, t003, t004, … (+55)"
    assert lines[2] == "    host-b:12: finished 12: u000, u001, u002, u003, u004, … (+7)"
    taken = [line for line in lines if line.startswith("    taken over: ")]
    # Which ten is the server's scan order; each names its tenant, from, by and why.
    assert len(taken) == 10, lines
    for line in taken:
        assert re.fullmatch(
            r"    taken over: u0\d\d from host-c:13 by host-b:12 \(lease expired, attempt 2, "
            r"finished now\)",
            line,
        ), line
    assert lines[-1] == "    … and 2 more taken over (--json lists them all)"

    [firing] = status_doc(config)["claims"]
    by = {i["instance"]: i for i in firing["instances"]}
    assert by[A]["finished"] == [f"t{i:03d}" for i in range(60)]
    assert [t["tenant"] for t in firing["taken_over"]] == [f"u{i:03d}" for i in range(12)]
    assert firing["counts"]["taken_over"] == 12


def test_two_in_process_runs_of_a_firing_are_accounted_for(config: Path, pg_dsn: str) -> None:
    tenants = setup_tenants(pg_dsn, 20)

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(
            run_firing(pg_dsn, A, tenants, record_op(0.01)),
            run_firing(pg_dsn, B, tenants, record_op(0.01)),
        )

    reports = dict(zip((A, B), asyncio.run(both()), strict=True))
    did = {
        instance: sorted(r.tenant for r in report.results if r.status == "ok")
        for instance, report in reports.items()
    }
    [firing] = status_doc(config)["claims"]
    assert firing["counts"] == {
        "tenants": 20,
        "finished": 20,
        "in_progress": 0,
        "released": 0,
        "stalled": 0,
        "unclaimed": 0,
        "taken_over": 0,
    }
    by = {i["instance"]: i["finished"] for i in firing["instances"]}
    assert {i: names for i, names in by.items() if names} == {
        i: names for i, names in did.items() if names
    }
    shares = ", ".join(f"{i} {len(names)}" for i, names in sorted(did.items()) if names)
    [verdict, *_] = claims_lines(status(config))
    assert verdict.endswith(f"20 tenants: 20 finished ({shares}), 0 in progress, 0 taken over")


# -- no claims, no privilege, an old table ------------------------------------------------------


def test_a_database_without_the_table_says_so_in_one_line(
    tmp_path: Path, pg_dsn: str, other_dsn: str
) -> None:
    config = histsetup.write_setup(
        tmp_path, {"main": pg_dsn, "other": other_dsn}, connect_timeout="2s"
    )
    create_claims_table(other_dsn)
    insert(other_dsn, [done("acme", A)])
    out = status(config)
    assert "Traceback" not in out
    lines = claims_lines(out)
    assert lines[0] == (
        "claims: none recorded yet in main (no table sweeperd.claims: `sweeperd run` creates it "
        "at its first firing; `sweeperd sweep` claims nothing)"
    )
    assert lines[1].startswith("claims of nightly on other, firing ")
    doc = status_doc(config)
    assert [f["database"] for f in doc["claims"]] == ["other"]
    assert "claims_unknown" not in doc


def test_no_claims_anywhere_adds_no_json_key(config: Path, pg_dsn: str) -> None:
    assert status_doc(config) == {"runs": [], "last_success": [], "unreachable": {}}
    assert claims_lines(status(config))[0].startswith("claims: none recorded yet in main (")


def test_a_role_that_may_not_read_the_claims_still_sees_the_runs(
    tmp_path: Path, pg_dsn: str, config: Path
) -> None:
    create_claims_table(pg_dsn)
    insert(pg_dsn, [done("acme", A)])
    with throwaway_role(pg_dsn, "mon") as role:
        run_sql(pg_dsn, f"GRANT USAGE ON SCHEMA sweeperd TO {role.name}")
        as_role = histsetup.write_setup(
            tmp_path, {"main": role.dsn(pg_dsn)}, connect_timeout="2s", name="role.toml"
        )
        out = status(as_role)
        assert "no runs recorded yet" in out
        [line] = [x for x in out.splitlines() if "claims" in x]
        assert line.startswith("database main: cannot read its claims: InsufficientPrivilege"), line
        assert line.endswith(f"(GRANT SELECT ON sweeperd.claims to {role.name})"), line
        doc = status_doc(as_role)
        assert "claims" not in doc
        assert set(doc["claims_unknown"]) == {"main"}
        run_sql(pg_dsn, f"GRANT SELECT ON sweeperd.claims TO {role.name}")
        [firing] = status_doc(as_role)["claims"]
        assert firing["counts"]["finished"] == 1


def test_claims_of_the_first_version_are_finished_by_their_instance(
    config: Path, pg_dsn: str
) -> None:
    run_sql(
        pg_dsn,
        "CREATE SCHEMA sweeperd",
        "CREATE TABLE sweeperd.claims (sweep text NOT NULL, firing timestamptz NOT NULL, "
        "tenant text NOT NULL, instance text NOT NULL, claimed_at timestamptz NOT NULL "
        "DEFAULT now(), PRIMARY KEY (sweep, firing, tenant))",
        f"INSERT INTO sweeperd.claims (sweep, firing, tenant, instance) VALUES "
        f"('nightly', '{FIRING.isoformat()}', 'acme', 'old:1'), "
        f"('nightly', '{FIRING.isoformat()}', 'globex', 'old:2'), "
        f"('nightly', '{EARLIER.isoformat()}', 'initech', 'old:3')",
    )
    [verdict, *_] = claims_lines(status(config))
    assert verdict.endswith("2 tenants: 2 finished (old:1 1, old:2 1), 0 in progress, 0 taken over")
    [firing] = status_doc(config)["claims"]
    assert {i["instance"]: i["finished"] for i in firing["instances"]} == {
        "old:1": ["acme"],
        "old:2": ["globex"],
    }
