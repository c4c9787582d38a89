"""Many tenants: check-config, daemon start to READY=1, and idle memory.

    python benchmarks/scale.py [--tenants 10000] [--databases 1] [--dropins] [--repeat 3]

Targets (DESIGN.md; issue 13 for the drop-ins): 50 000 tenants over 5 databases in generated
``conf.d`` files, ``check-config`` <= 1 s, start to READY <= 3 s, idle memory <= 150 MB.

The tenants are spread over ``--databases`` databases (created on the one embedded server, or on
``$SWEEPERD_BENCH_DSN``'s, and dropped afterwards). Every layout is measured in the same run:
the single file (every ``[[tenants]]`` in ``sweeperd.toml``) always, and with ``--dropins`` also
``sweeperd.toml`` plus one generated ``conf.d/50-tenants-<database>.toml`` per database, read
with ``-c DIR``. For each:

* ``parse+merge``: reading the TOML files and merging them (:func:`sweeperd.dropins.read_merged`);
* ``check-config work``: what ``check-config`` does after its imports, in this process
  (:func:`sweeperd.startup.prepare`: read, merge, validate, load plugins, rehearse);
* ``check-config CLI``: ``sweeperd check-config`` as a process, Python's start-up and imports
  included (printed first for a configuration without tenants, as the baseline);
* ``start to READY=1``: ``sweeperd run`` until it sends READY=1 to a NOTIFY_SOCKET bound here;
* ``idle RSS``: the daemon's VmRSS from /proc two seconds after READY.

Timings are the best of ``--repeat`` runs (the median in brackets): the machines are shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from fanout import server_dsn

from sweeperd.dropins import read_merged
from sweeperd.settings import toml_key
from sweeperd.startup import prepare

TARGETS = {"check-config CLI": 1.0, "start to READY=1": 3.0}
RSS_TARGET_MB = 150.0


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def databases(dsn: str, n: int) -> Iterator[dict[str, str]]:
    """``n`` databases by config name: the DSN's own for one, ``n`` new ones otherwise."""
    if n == 1:
        yield {"main": dsn}
        return
    names = [f"sweeperd_scale_{os.getpid()}_{i}" for i in range(n)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield {f"db{i}": make_conninfo(dsn, dbname=name) for i, name in enumerate(names)}
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def main_lines(dsns: dict[str, str]) -> list[str]:
    lines = ["[log]", 'format = "json"', 'level = "warning"']
    for name, dsn in dsns.items():
        lines += [f"[databases.{toml_key(name)}]", f"dsn = {toml_str(dsn)}"]
    return [
        *lines,
        "[sweeps.nightly]",
        'cron = "0 3 * * *"',
        "[plugins.vacuum]",
        'tables = ["notifications", "sessions"]',
        "[[plugins.retention.rules]]",
        'name = "notifications"',
        'table = "notifications"',
        'column = "created_at"',
        'older_than = "90d"',
    ]


def tenant_lines(database: str, first: int, count: int) -> list[str]:
    """What a generator (``sweeperd discover``, a provisioning job) writes for its tenants."""
    lines: list[str] = []
    for i in range(first, first + count):
        lines += [
            "[[tenants]]",
            f'name = "t{i:05d}"',
            f"database = {toml_str(database)}",
            f'schema = "tenant_{i:05d}"',
        ]
    return lines


def share(tenants: int, dsns: dict[str, str]) -> list[tuple[str, int, int]]:
    """(database, first tenant, count): the tenants in blocks, one block per database."""
    per, extra = divmod(tenants, len(dsns))
    out, first = [], 0
    for i, name in enumerate(dsns):
        count = per + (1 if i < extra else 0)
        out.append((name, first, count))
        first += count
    return out


def write_single(directory: Path, dsns: dict[str, str], tenants: int) -> Path:
    lines = main_lines(dsns)
    for database, first, count in share(tenants, dsns):
        lines += tenant_lines(database, first, count)
    path = directory / "sweeperd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_dropins(directory: Path, dsns: dict[str, str], tenants: int) -> Path:
    (directory / "sweeperd.toml").write_text("\n".join(main_lines(dsns)) + "\n")
    conf_d = directory / "conf.d"
    conf_d.mkdir()
    for database, first, count in share(tenants, dsns):
        text = "\n".join(tenant_lines(database, first, count)) + "\n"
        (conf_d / f"50-tenants-{database}.toml").write_text(
            f"# generated: the tenants of database {database}\n" + text
        )
    return directory  # -c DIR


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def check_config_cli(config: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sweeperd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"check-config failed:\n{result.stderr}")


def start_to_ready(config: Path, directory: Path) -> tuple[float, float]:
    """(seconds from spawn to READY=1, idle RSS in MB)."""
    notify = directory / "n.sock"
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeperd", "run", "-c", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.perf_counter() - t0
        time.sleep(2)  # idle
        rss_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sock.close()
    return ready, rss_kb / 1024


def measure(config: Path, directory: Path, repeat: int) -> dict[str, list[float]]:
    figures = {
        "parse+merge": timed(lambda: read_merged(config), repeat),
        "check-config work": timed(lambda: prepare(config), repeat),
        "check-config CLI": timed(lambda: check_config_cli(config), repeat),
    }
    runs = [start_to_ready(config, directory) for _ in range(repeat)]
    figures["start to READY=1"] = [ready for ready, _ in runs]
    figures["idle RSS"] = [rss for _, rss in runs]
    return figures


def report(layout: str, figures: dict[str, list[float]]) -> None:
    print(f"\n{layout}")
    for what, values in figures.items():
        if what == "idle RSS":
            best, unit, target = max(values), "MB", RSS_TARGET_MB  # the worst, for memory
        else:
            best, unit, target = min(values), "s ", TARGETS.get(what, 0.0)
        median = statistics.median(values)
        verdict = f"target <= {target:g} {unit.strip()}: {'ok' if best <= target else 'OVER'}"
        print(
            f"  {what:<19} {best:8.3f} {unit} (median {median:.3f})"
            + (f"   {verdict}" if target else "")
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--databases", type=int, default=1, help="spread the tenants over N")
    parser.add_argument(
        "--dropins",
        action="store_true",
        help="also measure sweeperd.toml + one generated conf.d file per database (-c DIR)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.databases < 1 or args.tenants < 0 or args.repeat < 1:
        parser.error("--databases and --repeat must be at least 1, --tenants at least 0")
    with (
        server_dsn() as dsn,
        databases(dsn, args.databases) as dsns,
        tempfile.TemporaryDirectory() as tmp,
    ):
        layouts: list[tuple[str, Callable[[Path, dict[str, str], int], Path]]] = [
            ("single file (sweeperd.toml holds every [[tenants]])", write_single)
        ]
        if args.dropins:
            layouts.append(
                (f"conf.d ({args.databases} generated tenant files, -c DIR)", write_dropins)
            )
        print(f"tenants {args.tenants}, databases {args.databases}, best of {args.repeat}")
        # What any check-config costs here (Python, imports, plugins): the rest is the tenants'.
        empty = Path(tmp) / "empty"
        empty.mkdir()
        baseline = timed(lambda: check_config_cli(write_single(empty, dsns, 0)), args.repeat)
        print(f"check-config CLI without tenants: {min(baseline):.3f} s (Python and imports)")
        for i, (layout, write) in enumerate(layouts):
            directory = Path(tmp) / str(i)
            directory.mkdir()
            config = write(directory, dsns, args.tenants)
            report(layout, measure(config, directory, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
