"""Several real `sweeperd run` processes share one firing of 200 tenants.

Each test makes one firing happen a few seconds ahead and none after it during the test: an
interval sweep fires on a grid anchored at 2000-01-01 (schedule.INTERVAL_EPOCH), so an interval
of about an hour whose next grid point is 5-7 s away is searched for. Every tenant's work
(tests/plugins/share.py) sleeps ~50 ms and writes a row with its process id inside
ctx.transaction(), so per-tenant rows show who wrote what.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from servers import PgBouncer, pgbouncer_version
from support import install_plugin, run_sql, toml_str, write_config

from sweeperd.schedule import INTERVAL_EPOCH

TENANTS = 200
LEASE_S = 3.0


def interval_firing_soon(low: float = 5.0, high: float = 7.0) -> tuple[str, dt.datetime]:
    """An interval (about an hour, in ms) whose next firing is ``low``..``high`` s away."""
    now = dt.datetime.now(dt.UTC)
    since_ms = int((now - INTERVAL_EPOCH).total_seconds() * 1000)
    for ms in range(3_600_000, 3_700_000):  # one in ~1800 fits
        ahead = (ms - since_ms % ms) / 1000
        if low <= ahead <= high:
            return f"{ms}ms", now + dt.timedelta(seconds=ahead)
    raise AssertionError("no interval found")


def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def done_count(dsn: str) -> int:
    return int(rows(dsn, "SELECT count(*) FROM public.done")[0][0])


@pytest.fixture
def shared(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[..., tuple[Path, list[Any]]]]:
    """Set up 200 tenant schemas, the plugin and a config; start N instances on it."""
    run_sql(
        pg_dsn,
        "CREATE TABLE public.done (tenant text NOT NULL, pid int NOT NULL, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
        "DO $$ BEGIN FOR i IN 0..199 LOOP "
        "EXECUTE format('CREATE SCHEMA %I', 'tenant_' || lpad(i::text, 3, '0')); "
        "END LOOP; END $$",
    )
    (tmp_path / "plugins.d").mkdir()
    install_plugin(tmp_path / "plugins.d", "share.py")
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int, dsn: str = pg_dsn, *, pooler: str = "none") -> tuple[Path, list[Any]]:
        interval, _firing = interval_firing_soon()
        config = write_config(
            tmp_path,
            f"""
            [daemon]
            plugin_dirs = ["plugins.d"]
            drain_timeout = "2s"
            claim_lease = "{LEASE_S:g}s"
            [log]
            format = "json"
            [history]
            enabled = false
            [databases.main]
            dsn = {toml_str(dsn)}
            pooler = "{pooler}"
            max_connections = 2
            [[tenant_sources]]
            database = "main"
            schemas = "tenant_%"
            [sweeps.shared]
            interval = "{interval}"
            operations = ["share.*"]
            [plugins.share]
            seconds = 0.05
            """,
        )
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp_path / f"daemon{len(procs)}.log").open("wb"),
                    stdin=subprocess.DEVNULL,
                    cwd=tmp_path,
                )
            )
        return config, procs

    try:
        yield start
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=10)


def claims(dsn: str) -> dict[str, tuple[Any, ...]]:
    """tenant → (instance pid, finished, taken_from pid, taken_why, attempts)."""
    out = {}
    for tenant, instance, finished, taken_from, why, attempts in rows(
        dsn,
        "SELECT tenant, instance, finished_at IS NOT NULL, taken_from, taken_why, attempts "
        "FROM sweeperd.claims WHERE sweep = 'shared' AND tenant <> ''",
    ):
        pid = int(instance.rsplit(":", 1)[1]) if instance else None
        from_pid = int(taken_from.rsplit(":", 1)[1]) if taken_from else None
        out[tenant] = (pid, finished, from_pid, why, attempts)
    return out


def assert_exactly_once(dsn: str) -> Counter[int]:
    """Every tenant done once, by the instance its claim names; per pid, how many."""
    done = rows(dsn, "SELECT tenant, pid FROM public.done")
    per_tenant = Counter(tenant for tenant, _pid in done)
    assert len(per_tenant) == TENANTS
    assert set(per_tenant.values()) == {1}, [t for t, n in per_tenant.items() if n > 1]
    owner = claims(dsn)
    assert len(owner) == TENANTS
    for tenant, pid in done:
        assert owner[tenant][0] == pid, (tenant, pid, owner[tenant])
        assert owner[tenant][1], f"{tenant} done but its claim is not finished"
    firings = rows(dsn, "SELECT count(DISTINCT firing) FROM sweeperd.claims")
    assert firings == [(1,)]
    return Counter(pid for _tenant, pid in done)


@pytest.mark.parametrize("instances", [2, 3])
def test_instances_split_a_firing_by_capacity_each_tenant_once(
    pg_dsn: str, shared: Callable[..., tuple[Path, list[Any]]], instances: int
) -> None:
    _, procs = shared(instances)
    wait_until(lambda: done_count(pg_dsn) >= TENANTS, 60, "every tenant done")
    time.sleep(0.5)  # a tenant done twice would show up now
    per_pid = assert_exactly_once(pg_dsn)
    assert set(per_pid) == {p.pid for p in procs}
    for pid, n in per_pid.items():
        assert n >= 0.2 * TENANTS, (pid, per_pid)
    assert all(row[2] is None for row in claims(pg_dsn).values())  # nothing taken over


def test_a_killed_instances_tenants_are_finished_by_a_survivor(
    pg_dsn: str, shared: Callable[..., tuple[Path, list[Any]]]
) -> None:
    _, procs = shared(2)
    victim, survivor = procs
    wait_until(lambda: done_count(pg_dsn) >= 40, 60, "the firing under way")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    held = [t for t, row in claims(pg_dsn).items() if row[0] == victim.pid and not row[1]]
    assert held, "the victim held no unfinished tenant when killed"
    # Liveness, the bound: within claim_lease + 10 s of the kill.
    wait_until(lambda: done_count(pg_dsn) >= TENANTS, LEASE_S + 10, "the survivor finishing")
    assert time.monotonic() - killed_at <= LEASE_S + 10
    time.sleep(0.5)
    assert_exactly_once(pg_dsn)
    after = claims(pg_dsn)
    for tenant in held:
        pid, finished, from_pid, why, attempts = after[tenant]
        assert (pid, finished, from_pid, why, attempts) == (
            survivor.pid,
            True,
            victim.pid,
            "lease expired",
            2,
        )


def test_an_instance_stopped_past_its_lease_writes_nothing_for_tenants_taken_over(
    pg_dsn: str, shared: Callable[..., tuple[Path, list[Any]]]
) -> None:
    config, procs = shared(2)
    paused, other = procs
    wait_until(lambda: done_count(pg_dsn) >= 40, 60, "the firing under way")
    paused.send_signal(signal.SIGSTOP)
    try:
        held = [t for t, row in claims(pg_dsn).items() if row[0] == paused.pid and not row[1]]
        # The other instance takes them over once the lease ran out, and finishes the firing.
        wait_until(
            lambda: all(claims(pg_dsn)[t][0] == other.pid for t in held),
            LEASE_S + 10,
            "the stopped instance's tenants taken over",
        )
        wait_until(lambda: done_count(pg_dsn) >= TENANTS, 60, "every tenant done")
        time.sleep(LEASE_S)  # the stopped one's open transaction, if any, ended by the server
    finally:
        paused.send_signal(signal.SIGCONT)
    # Awake again: it must find its leases gone and write nothing more (the fence).
    time.sleep(LEASE_S)
    per_pid = assert_exactly_once(pg_dsn)
    assert per_pid[other.pid] > 0
    log = (config.parent / "daemon0.log").read_text()
    assert "lease lost" in log
    assert paused.poll() is None and other.poll() is None  # both still running


@pytest.mark.skipif(pgbouncer_version() is None, reason="PgBouncer is not installed")
def test_two_instances_share_a_firing_through_pgbouncer_transaction_mode(
    pg_dsn: str, shared: Callable[..., tuple[Path, list[Any]]]
) -> None:
    with PgBouncer(pg_dsn, pool_mode="transaction", default_pool_size=3) as bouncer:
        _, procs = shared(2, bouncer.through(pg_dsn), pooler="transaction")
        wait_until(lambda: done_count(pg_dsn) >= TENANTS, 60, "every tenant done")
        time.sleep(0.5)
        per_pid = assert_exactly_once(pg_dsn)
        for n in per_pid.values():
            assert n >= 0.2 * TENANTS, per_pid
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=20) == 0
