"""Connection faults the way production has them, against real servers (``sweeperd sweep``).

A server that refuses connections for a few seconds (restarting, or out of connection slots)
must cost waiting, not failed items; a standby is skipped, never written to; a database that
stays down fails its own items only.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from servers import ScratchServer, scratch_server_fixture, standby_of  # noqa: F401
from support import install_plugin, toml_str, write_config

from sweeperd.config import load_config
from sweeperd.daemon import Daemon, load
from sweeperd.planner import make_plan
from sweeperd.plugins import load_plugins

TENANTS = [f"t{i}" for i in range(6)]


def make_schemas(server: ScratchServer) -> None:
    for tenant in TENANTS:
        server.execute(f"CREATE SCHEMA tenant_{tenant}")


def config_for(directory: Path, databases: dict[str, str], *, extra: str = "") -> Path:
    plugins_d = directory / "plugins.d"
    plugins_d.mkdir(exist_ok=True)
    install_plugin(plugins_d, "work.py")
    dbs = "".join(
        f"""
        [databases.{name}]
        dsn = {toml_str(dsn)}
        max_connections = 4
        connect_timeout = "2s"
        connect_retry = "20s"
        """
        for name, dsn in databases.items()
    )
    tenants = "".join(
        f"""
        [[tenants]]
        name = "{name}-{tenant}"
        database = "{name}"
        schema = "tenant_{tenant}"
        """
        for name in databases
        for tenant in TENANTS
    )
    return write_config(
        directory,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        max_concurrency = 8
        [log]
        format = "json"
        {extra}
        {dbs}
        {tenants}
        """,
    )


def start_sweep(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeperd", "sweep", "-c", str(config), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    out, err = proc.communicate(timeout=120)
    assert out, err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(out), logs


def test_a_server_refusing_connections_for_3_s_costs_no_item(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    server = scratch_server()
    make_schemas(server)
    config = config_for(tmp_path, {"main": server.dsn()})
    server.stop()  # "connection refused" from now on
    proc = start_sweep(config)
    time.sleep(3)
    assert proc.poll() is None  # still waiting for the server, not given up
    server.start()
    code, report, logs = finish(proc)
    assert [r for r in report["results"] if r["status"] != "ok"] == []
    assert len(report["results"]) == 2 * len(TENANTS)
    assert code == 0
    waits = [e for e in logs if e["event"] == "cannot connect yet; waiting it out"]
    # Said once per episode, not once per retry (a few dozen here); a connection that gets in
    # while a slower one still fails may start a second episode.
    assert 1 <= len(waits) <= 2, logs
    assert "refused" in waits[0]["error"].lower()


def test_too_many_connections_for_3_s_costs_no_item(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    server = scratch_server(max_connections=8)
    make_schemas(server)
    config = config_for(tmp_path, {"main": server.dsn()})
    # Every slot taken (by superusers too: the reserved ones as well).
    hogs = []
    while True:
        try:
            hogs.append(psycopg.connect(server.dsn(), autocommit=True))
        except psycopg.OperationalError as exc:
            assert "too many clients" in str(exc) or "remaining connection slots" in str(exc)
            break
    assert len(hogs) >= 5
    release = threading.Timer(3.0, lambda: [h.close() for h in hogs])
    release.start()
    try:
        proc = start_sweep(config)
        code, report, logs = finish(proc)
    finally:
        release.cancel()
        for h in hogs:
            h.close()
    assert [r for r in report["results"] if r["status"] != "ok"] == []
    assert code == 0
    waits = [e for e in logs if e["event"] == "cannot connect yet; waiting it out"]
    assert 1 <= len(waits) <= 2 and "too many clients" in waits[0]["error"], logs


def test_a_database_that_stays_down_fails_its_own_items_only_with_the_reason(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    up = scratch_server()
    make_schemas(up)
    down = scratch_server()
    down.stop()
    config = config_for(tmp_path, {"up": up.dsn(), "down": down.dsn()})
    text = config.read_text(encoding="utf-8").replace(
        'connect_retry = "20s"', 'connect_retry = "1s"'
    )
    config.write_text(text, encoding="utf-8")
    code, report, _logs = finish(start_sweep(config))
    by_db: dict[str, set[str]] = {}
    for r in report["results"]:
        by_db.setdefault(r["database"], set()).add(r["status"])
    assert by_db == {"up": {"ok"}, "down": {"failed"}}
    errors = {r["error"] for r in report["results"] if r["database"] == "down"}
    assert len(errors) == 1
    (error,) = errors
    assert error.startswith("database unreachable: ") and "refused" in error.lower()
    assert code == 1  # some database could be reached: failures, not "unreachable" (3)
    # Nothing reachable at all: exit 3.
    up.stop()
    code, _report, _logs = finish(start_sweep(config))
    assert code == 3


def test_a_standby_is_skipped_and_never_written_to(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    primary = scratch_server()
    make_schemas(primary)
    standby = standby_of(primary)
    standby.wait_caught_up()
    config = config_for(
        tmp_path, {"primary": primary.dsn(), "replica": standby.dsn()}, extra="[history]"
    )
    code, report, logs = finish(start_sweep(config))
    for r in report["results"]:
        if r["database"] == "replica":
            assert r["status"] == "skipped", r
            assert "in recovery (standby)" in r["error"], r
        else:
            assert r["status"] == "ok", r
    assert code == 0
    assert not [e for e in logs if e.get("level") == "error"], logs
    # History went to the primary only (the standby has what replicated from it, no more).
    assert primary.scalar("SELECT count(*) FROM sweeperd.results") == 2 * len(TENANTS)
    standby.wait_caught_up()
    assert standby.scalar("SELECT count(DISTINCT run_id) FROM sweeperd.runs") == 1


def test_sweep_without_a_name_runs_under_the_largest_sweep_timeout(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        {"main": "host=/nonexistent dbname=x"},
        extra="""
        [sweeps.short]
        interval = "1h"
        timeout = "10min"
        [sweeps.long]
        interval = "1h"
        timeout = "2h"
        [sweeps.unbounded]
        interval = "1h"
        """,
    )
    cfg = load_config(config)
    plugins = load_plugins(cfg)
    assert make_plan(cfg, plugins.operations, []).timeout == 7200.0
    assert make_plan(cfg, plugins.operations, [], sweep="short").timeout == 600.0
    assert make_plan(cfg, plugins.operations, [], sweep="unbounded").timeout is None


NAP_RECORD = textwrap.dedent("""\
    import sweeperd

    async def record(ctx):
        await ctx.conn.execute("INSERT INTO public.runs (tenant) VALUES (%s)", (ctx.tenant.name,))
        return 1

    @sweeperd.hookimpl
    def sweeperd_operations(settings):
        return [sweeperd.Operation(name="rec.one", run=record, tables=("t",))]
    """)


def test_a_database_back_up_gets_the_firing_it_missed_and_only_it(
    tmp_path: Path, scratch_server: Callable[..., ScratchServer]
) -> None:
    """A nightly sweep must not wait a day for a database that was down for five minutes."""

    main, other = scratch_server(), scratch_server()
    for server in (main, other):
        server.execute("CREATE SCHEMA tenant_x")
        server.execute("CREATE TABLE public.runs (tenant text, at timestamptz DEFAULT now())")
    other.stop()
    plugins_d = tmp_path / "plugins.d"
    plugins_d.mkdir()
    (plugins_d / "rec.py").write_text(NAP_RECORD, encoding="utf-8")
    config = write_config(
        tmp_path,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        [log]
        format = "json"
        [databases.main]
        dsn = {toml_str(main.dsn())}
        connect_timeout = "2s"
        [databases.other]
        dsn = {toml_str(other.dsn())}
        connect_timeout = "2s"
        [[tenants]]
        name = "m"
        database = "main"
        schema = "tenant_x"
        [[tenants]]
        name = "o"
        database = "other"
        schema = "tenant_x"
        [sweeps.nightly]
        cron = "0 3 * * *"
        """,
    )

    async def scenario() -> None:
        cfg, plugins = load(config)
        daemon = Daemon(config, cfg, plugins)
        running = asyncio.create_task(daemon.run())
        for _ in range(200):  # until it is ready (its databases opened, sweeps scheduled)
            if daemon._snapshot is not None:
                break
            await asyncio.sleep(0.05)
        controller = daemon.controllers["nightly"]
        await controller.fire()  # the nightly firing, while "other" is down
        await controller.wait()
        report = controller.last_report
        assert report is not None
        assert {(r.database, r.status) for r in report.results} == {
            ("main", "ok"),
            ("other", "failed"),
        }
        assert "other" in controller.missed
        await asyncio.to_thread(other.start)
        for _ in range(400):  # the reconnector notices, then the catch-up runs
            await asyncio.sleep(0.05)
            if not controller.running and "other" not in controller.missed:
                break
        report = controller.last_report
        assert report is not None
        assert [(r.database, r.status) for r in report.results] == [("other", "ok")]
        daemon._on_stop_signal()  # what SIGTERM does
        assert await asyncio.wait_for(running, 30) == 0

    asyncio.run(scenario())
    assert main.scalar("SELECT count(*) FROM public.runs") == 1  # not swept twice
    assert other.scalar("SELECT count(*) FROM public.runs") == 1
