"""Health gates against a real primary and its real streaming standby (issue 11).

The standby is made with ``pg_basebackup -R``; ``pg_wal_replay_pause()`` on it makes replica lag
while the primary deletes in many small batches. The test watches from outside, as a DBA would:
the lag in ``pg_stat_replication`` and the rows left in the table, every few milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from servers import PgBouncer, ScratchServer, scratch_server_fixture, standby_of  # noqa: F401
from structlog.testing import capture_logs
from support import run_cli, toml_str, write_config

import sweeperd.pause as pause_module
import sweeperd.telemetry as telemetry_module
from sweeperd.config import load_config
from sweeperd.plugins import load_plugins
from sweeperd.report import SweepReport
from sweeperd.sweep import sweep_once
from sweeperd.telemetry import Telemetry

ROWS = 60_000
BATCH = 100
CHECK_EVERY = 0.5
RESUME_AFTER = 2.0
LAG_LIMIT = 256 * 1024


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    tel = Telemetry(trace.NoOpTracer(), provider.get_meter("sweeperd"))
    monkeypatch.setattr(telemetry_module, "_current", tel)
    yield reader
    provider.shutdown()


def throttled_metric(reader: InMemoryMetricReader) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "sweeperd.throttled":
                    for p in metric.data.data_points:
                        a = dict(p.attributes)
                        out[a["sweeperd.database"], a["sweeperd.reason"]] = p.value
    return out


def make_events(server: ScratchServer, schema: str = "tenant_a", rows: int = ROWS) -> None:
    server.execute(f"CREATE SCHEMA {schema}")
    server.execute(
        f"CREATE TABLE {schema}.events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL,"
        " pad text) WITH (autovacuum_enabled = false)"
    )
    server.execute(
        f"INSERT INTO {schema}.events (created_at, pad) SELECT now() - interval '100 days',"
        f" repeat('x', 200) FROM generate_series(1, {rows})"
    )
    server.execute(f"CREATE INDEX ON {schema}.events (created_at)")


def config(directory: Path, dsn: str, throttle: str, *, tenants: int = 1) -> Path:
    listed = "".join(
        f"""
        [[tenants]]
        name = "{chr(97 + i)}"
        database = "main"
        schema = "tenant_{chr(97 + i)}"
        """
        for i in range(tenants)
    )
    return write_config(
        directory,
        f"""
        [databases.main]
        dsn = {toml_str(dsn)}
        max_connections = 4

        [databases.main.throttle]
        {throttle}
        {listed}
        [sweeps.nightly]
        interval = "1h"
        operations = ["retention.*"]

        [[plugins.retention.rules]]
        name = "events"
        table = "events"
        column = "created_at"
        older_than = "30d"
        batch_size = {BATCH}
        """,
    )


@dataclass
class Watch:
    """What the test saw from outside, sampled every 20 ms: (time, lag bytes, rows left)."""

    samples: list[tuple[float, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def first(self, since: float, test: Callable[[float, int], bool]) -> float | None:
        return next((t for t, lag, n in self.samples if t >= since and test(lag, n)), None)

    def rows_at(self, when: float) -> int:
        return next(n for t, _lag, n in reversed(self.samples) if t <= when)


def watch(server: ScratchServer, schema: str = "tenant_a") -> tuple[Watch, threading.Thread]:
    seen = Watch()

    def loop() -> None:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            while not seen.stop.is_set():
                row = conn.execute(
                    "SELECT coalesce((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))"
                    f" FROM pg_stat_replication), 0), (SELECT count(*) FROM {schema}.events)"
                ).fetchone()
                assert row is not None
                seen.samples.append((time.monotonic(), float(row[0]), int(row[1])))
                time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return seen, thread


def sweep_in_thread(path: Path) -> tuple[list[SweepReport], threading.Thread]:
    cfg = load_config(path)
    plugins = load_plugins(cfg)
    out: list[SweepReport] = []
    thread = threading.Thread(
        target=lambda: out.append(asyncio.run(sweep_once(cfg, plugins))), daemon=True
    )
    thread.start()
    return out, thread


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_replay_stall_stops_batches_within_check_every_and_resume_after_hysteresis(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer], metrics: InMemoryMetricReader
) -> None:
    primary = scratch_server()
    make_events(primary)
    standby = standby_of(primary)
    standby.wait_caught_up()
    standby.pause_replay()
    path = config(
        tmp_path,
        primary.dsn(),
        f'max_replica_lag_bytes = {LAG_LIMIT}\ncheck_every = "{CHECK_EVERY}s"\n'
        f'resume_after = "{RESUME_AFTER}s"',
    )
    seen, watcher = watch(primary)
    with capture_logs() as logs:
        reports, sweeper = sweep_in_thread(path)
        # The lag passes the limit from the sweep's own deletes.
        wait_for(lambda: seen.first(0, lambda lag, n: lag > LAG_LIMIT) is not None, 60, "lag")
        over = seen.first(0, lambda lag, n: lag > LAG_LIMIT)
        assert over is not None
        # Within check_every + 1 s no batch starts any more; then none for 3 s.
        time.sleep(CHECK_EVERY + 1.0)
        settled = time.monotonic()
        time.sleep(3.0)
        held = seen.rows_at(time.monotonic())
        assert seen.rows_at(settled) == held, "batches went on while the standby lagged"
        assert 0 < held < ROWS
        resumed_replay = time.monotonic()
        standby.resume_replay()
        wait_for(lambda: not sweeper.is_alive(), 120, "the sweep to finish")
    seen.stop.set()
    watcher.join()
    under = seen.first(resumed_replay, lambda lag, n: lag <= LAG_LIMIT)
    restarted = seen.first(resumed_replay, lambda lag, n: n < held)
    assert under is not None and restarted is not None
    # Hysteresis: nothing restarts before the lag has been under the limit for resume_after
    # (less one sampling interval of the watcher's and the sampler's).
    assert restarted >= under + RESUME_AFTER - CHECK_EVERY - 0.1, (under, restarted)

    [report] = reports
    [result] = report.results
    assert result.status == "ok", result
    assert result.rows == ROWS
    throttled_s = result.details["throttled_s"]
    assert throttled_s >= 3.0, result.details
    assert set(result.details["throttled_by"]) == {"replica_lag_bytes"}
    # The metric has what the results' details have (those are rounded to the millisecond).
    assert throttled_metric(metrics) == pytest.approx(
        {("main", "replica_lag_bytes"): throttled_s}, abs=0.002
    )
    events = [e for e in logs if e["event"] == "database throttled"]
    assert len(events) == 1, events
    assert events[0]["reason"].startswith("replica lag "), events
    assert "standby standby_" in events[0]["reason"]
    assert any(e["event"] == "database no longer throttled" for e in logs)


def test_an_idle_primary_with_a_standby_is_never_throttled(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer], metrics: InMemoryMetricReader
) -> None:
    primary = scratch_server()
    for i in range(6):
        make_events(primary, f"tenant_{chr(97 + i)}", rows=10)
    standby = standby_of(primary)
    standby.wait_caught_up()
    time.sleep(1.5)  # replay_lag keeps the last value it measured for a while: the trap
    # Nothing is old enough to delete: the sweep writes nothing, the primary stays idle.
    path = config(
        tmp_path,
        primary.dsn(),
        'max_replica_lag = "1ms"\nmax_replica_lag_bytes = 1\ncheck_every = "100ms"',
        tenants=6,
    )
    path.write_text(path.read_text().replace('older_than = "30d"', 'older_than = "1000d"'))
    with capture_logs() as logs:
        cfg = load_config(path)
        report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    assert [r.status for r in report.results] == ["ok"] * 6
    # Where limits are set, every result says how long it waited: here never.
    assert [r.details["throttled_s"] for r in report.results] == [0.0] * 6
    assert not [r for r in report.results if "throttled_by" in r.details]
    assert not [e for e in logs if e["event"] == "database throttled"], logs
    assert throttled_metric(metrics) == {}


def test_a_gate_without_its_privilege_is_reported_once_and_treated_as_open(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    primary = scratch_server()
    for i in range(3):
        make_events(primary, f"tenant_{chr(97 + i)}", rows=50)
    primary.execute("CREATE ROLE plain LOGIN")
    for i in range(3):
        primary.execute(f"GRANT USAGE ON SCHEMA tenant_{chr(97 + i)} TO plain")
        primary.execute(
            f"GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA tenant_{chr(97 + i)} TO plain"
        )
    path = config(
        tmp_path,
        primary.dsn(user="plain"),
        'max_replica_lag = "10s"\nmax_active_sessions = 1\nmax_archive_backlog = 0\n'
        'max_slot_lag_bytes = "1GB"\ncheck_every = "100ms"',
        tenants=3,
    )
    with capture_logs() as logs:
        cfg = load_config(path)
        report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    assert [r.status for r in report.results] == ["ok"] * 3, report.results
    assert sum(r.rows or 0 for r in report.results) == 150
    unavailable = [e for e in logs if e["event"] == "health gate unavailable; treated as open"]
    assert sorted(e["gate"] for e in unavailable) == [
        "max_active_sessions",
        "max_archive_backlog",
        "max_replica_lag",
    ], unavailable
    for e in unavailable:
        assert "GRANT pg_monitor TO plain" in e["error"], e
    assert not [e for e in logs if e["event"] == "database throttled"]


def test_active_sessions_other_than_ours_throttle_until_they_end(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer], metrics: InMemoryMetricReader
) -> None:
    primary = scratch_server()
    make_events(primary, rows=2000)
    # Two application queries active for 3 s: one more than max_active_sessions allows
    # (sweeperd's own sessions and the sampler's do not count).
    sessions = [psycopg.connect(primary.dsn(), autocommit=True) for _ in range(2)]
    busy = [
        threading.Thread(target=lambda c=c: c.execute("SELECT pg_sleep(3)"), daemon=True)
        for c in sessions
    ]
    for thread in busy:
        thread.start()
    wait_for(
        lambda: (
            primary.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query = 'SELECT pg_sleep(3)'"
            )
            == 2
        ),
        10,
        "the busy sessions",
    )
    path = config(
        tmp_path,
        primary.dsn(),
        'max_active_sessions = 1\ncheck_every = "100ms"\nresume_after = "0s"',
    )
    cfg = load_config(path)
    report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    for thread in busy:
        thread.join()
    for conn in sessions:
        conn.close()
    [result] = report.results
    assert result.status == "ok" and result.rows == 2000, result
    assert result.details["throttled_s"] > 1.0, result.details
    assert set(result.details["throttled_by"]) == {"active_sessions"}
    assert throttled_metric(metrics) == pytest.approx(
        {("main", "active_sessions"): result.details["throttled_s"]}, abs=0.002
    )


def test_sampling_costs_one_statement_per_check_every(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    """Many short operations: the gates are asked about once per check_every, not per item."""
    primary = scratch_server(settings={"log_min_duration_statement": 0, "log_line_prefix": ""})
    for i in range(20):
        make_events(primary, f"tenant_{chr(97 + i)}", rows=300)
    path = config(
        tmp_path,
        primary.dsn(),
        'max_slot_lag_bytes = "1GB"\ncheck_every = "200ms"',
        tenants=20,
    )
    before = Path(primary.log).read_text(errors="replace") if Path(primary.log).exists() else ""
    cfg = load_config(path)
    started = time.monotonic()
    report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    elapsed = time.monotonic() - started
    assert all(r.status == "ok" for r in report.results)
    log_text = Path(primary.log).read_text(errors="replace")[len(before) :]
    samples = log_text.count("pg_replication_slots")
    items = len(report.results)
    # At most one sample per check_every (plus the first), and never one per batch or item.
    assert 1 <= samples <= elapsed / 0.2 + 2, (samples, elapsed)
    assert samples < items * 3


def test_a_pause_the_role_cannot_read_is_an_error_and_with_pg_monitor_every_gate_reads(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer], metrics: InMemoryMetricReader
) -> None:
    primary = scratch_server()
    make_events(primary, rows=50)
    primary.execute("CREATE ROLE plain LOGIN")
    primary.execute("GRANT USAGE ON SCHEMA tenant_a TO plain")
    primary.execute("GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA tenant_a TO plain")
    # A DBA paused the database as postgres: schema and table are not the sweeping role's.
    primary.execute("CREATE SCHEMA sweeperd")
    primary.execute(pause_module.DDL)
    primary.execute(
        "INSERT INTO sweeperd.pause (paused_by, reason, until) VALUES"
        " ('dba@ops', 'incident', now() + interval '2 seconds')"
    )
    gates = (
        'max_replica_lag = "10s"\nmax_replica_lag_bytes = "1GB"\nmax_slot_lag_bytes = "1GB"\n'
        'max_archive_backlog = 10\nmax_active_sessions = 1000\ncheck_every = "100ms"'
    )
    path = config(tmp_path, primary.dsn(user="plain"), gates)
    with capture_logs() as logs:
        cfg = load_config(path)
        report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    [result] = report.results
    assert result.status == "ok" and result.details["throttled_s"] == 0.0, result
    # (The run history cannot be written there either: another error, not this test's.)
    errors = [e for e in logs if e["event"].startswith("cannot read sweeperd.pause")]
    assert len(errors) == 1, errors
    [error] = errors
    assert error["log_level"] == "error", error
    assert "permission denied for schema sweeperd" in error["error"], error

    # With pg_monitor and the pause readable, every gate reads and the pause holds the work.
    primary.execute("GRANT pg_monitor TO plain")
    primary.execute("GRANT USAGE ON SCHEMA sweeperd TO plain")
    primary.execute("GRANT SELECT ON sweeperd.pause TO plain")
    primary.execute("UPDATE sweeperd.pause SET until = now() + interval '2 seconds'")
    primary.execute(
        "INSERT INTO tenant_a.events (created_at) SELECT now() - interval '100 days'"
        " FROM generate_series(1, 10)"
    )
    with capture_logs() as logs:
        cfg = load_config(path)
        report = asyncio.run(sweep_once(cfg, load_plugins(cfg)))
    [result] = report.results
    assert result.status == "ok" and result.rows == 10, result
    assert result.details["throttled_by"].keys() == {"paused"}
    assert 1.0 < result.details["throttled_s"] < 30, result.details
    # pg_monitor is all every gate needs: none is left unread.
    assert not [e for e in logs if e["log_level"] in ("warning", "error") and "gate" in e]
    [throttled] = [e for e in logs if e["event"] == "database throttled"]
    assert throttled["reason"].startswith("paused by dba@ops since "), throttled
    assert throttled["reason"].endswith(": incident"), throttled


def test_status_reads_every_gate_now_and_says_which_it_cannot(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    primary = scratch_server()
    make_events(primary, rows=10)
    standby = standby_of(primary)
    standby.wait_caught_up()
    standby.pause_replay()
    primary.execute(
        "CREATE TABLE public.filler AS SELECT repeat('x', 500) FROM generate_series(1, 5000)"
    )
    primary.execute("CREATE ROLE plain LOGIN")
    gates = 'max_replica_lag_bytes = "64kB"\nmax_slot_lag_bytes = "1GB"'
    (tmp_path / "a").mkdir()
    as_postgres = config(tmp_path / "a", primary.dsn(), gates)
    shown = run_cli("status", "-c", str(as_postgres))
    assert shown.returncode == 0, shown.stderr
    [line] = [ln for ln in shown.stdout.splitlines() if ln.startswith("database main gates: ")]
    assert line.startswith("database main gates: over a limit: replica lag "), line
    assert "> 64kB (standby standby_" in line and "slot lag 0B <= 1GB" in line, line
    as_json = run_cli("status", "-c", str(as_postgres), "--json")
    doc = json.loads(as_json.stdout)
    signals = {s["key"]: s for s in doc["gates"]["main"]["signals"]}
    assert signals["max_replica_lag_bytes"]["over"] is True
    assert signals["max_replica_lag_bytes"]["value"] > 64 * 1024
    assert doc["gates"]["main"]["unavailable"] == {}

    (tmp_path / "b").mkdir()
    as_plain = config(tmp_path / "b", primary.dsn(user="plain"), gates)
    shown = run_cli("status", "-c", str(as_plain))
    assert shown.returncode == 0, shown.stderr
    [line] = [ln for ln in shown.stdout.splitlines() if ln.startswith("database main gates: ")]
    assert line == (
        "database main gates: slot lag 0B <= 1GB; not read (treated as open): "
        "max_replica_lag_bytes (needs pg_read_all_stats (GRANT pg_monitor TO plain))"
    ), line
    standby.resume_replay()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_behind_pgbouncer_the_pause_and_the_gates_hold(
    tmp_path: Path, pg_dsn: str, mode: str
) -> None:
    """One statement per sample, nothing kept on a server session: any pooler mode will do."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA tenant_a")
        conn.execute(
            "CREATE TABLE tenant_a.events (id bigserial PRIMARY KEY, created_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO tenant_a.events (created_at) SELECT now() - interval '100 days'"
            " FROM generate_series(1, 500)"
        )
        conn.execute("CREATE SCHEMA sweeperd")
        conn.execute(pause_module.DDL)
        conn.execute(
            "INSERT INTO sweeperd.pause (paused_by, reason, until)"
            " VALUES ('ops@h', 'drill', now() + interval '2 seconds')"
        )
    with PgBouncer(pg_dsn, pool_mode=mode, default_pool_size=2) as bouncer:
        path = config(
            tmp_path,
            bouncer.through(pg_dsn),
            'max_slot_lag_bytes = "1TB"\ncheck_every = "100ms"\nresume_after = "0s"',
        )
        path.write_text(
            path.read_text().replace(
                "max_connections = 4", f'max_connections = 4\npooler = "{mode}"'
            )
        )
        done = run_cli("sweep", "-c", str(path), "--json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["status"] == "ok" and result["rows"] == 500, result
    assert result["details"]["throttled_by"].keys() == {"paused"}, result
    assert result["details"]["throttled_s"] >= 1.0, result
    assert "Traceback" not in done.stderr


def test_a_pause_mid_run_with_one_connection_does_not_deadlock(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    """One connection: a retention operation waits between its batches (on its connection)
    while the next tenant's operation waits for the slot; the pause ends, both finish."""
    primary = scratch_server()
    for schema in ("tenant_a", "tenant_b"):
        make_events(primary, schema, rows=20_000)
    path = config(tmp_path, primary.dsn(), 'check_every = "100ms"\nresume_after = "0s"', tenants=2)
    path.write_text(
        path.read_text()
        .replace("max_connections = 4", "max_connections = 1")
        .replace('interval = "1h"', 'interval = "1h"\ntimeout = "60s"')
    )
    seen, watcher = watch(primary)
    reports, sweeper = sweep_in_thread(path)
    wait_for(lambda: seen.first(0, lambda lag, n: n < 20_000) is not None, 30, "deletes")
    primary.execute("CREATE SCHEMA IF NOT EXISTS sweeperd")
    primary.execute(pause_module.DDL)
    primary.execute(
        "INSERT INTO sweeperd.pause (paused_by, until) VALUES ('ops@h', now() + interval '2s')"
    )
    wait_for(lambda: not sweeper.is_alive(), 60, "the sweep to finish")
    seen.stop.set()
    watcher.join()
    [report] = reports
    assert [(r.status, r.rows) for r in report.results] == [("ok", 20_000), ("ok", 20_000)]
    waited = [r.details.get("throttled_by", {}).get("paused", 0.0) for r in report.results]
    assert max(waited) > 1.0, [r.details for r in report.results]
