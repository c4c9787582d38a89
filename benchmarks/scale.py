"""10 000 tenants: config validation, daemon start to READY=1, and idle memory.

    python benchmarks/scale.py [--tenants 10000]     # embedded PostgreSQL (needs sweeperd[test])

Targets (DESIGN.md): validation <= 1 s, start to READY <= 3 s, idle memory <= 150 MB. The
daemon runs as a real process with a NOTIFY_SOCKET bound here; its RSS is read from /proc.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fanout import server_dsn

from sweeperd.config import load_config
from sweeperd.plugins import load_plugins


def write_config(path: Path, dsn: str, tenants: int) -> None:
    lines = [
        "[log]",
        'format = "json"',
        'level = "warning"',
        "[databases.main]",
        f'dsn = "{dsn}"',
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
    for i in range(tenants):
        lines += [
            "[[tenants]]",
            f'name = "t{i:05d}"',
            'database = "main"',
            f'schema = "tenant_{i:05d}"',
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    args = parser.parse_args()
    with server_dsn() as dsn, tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "scale.toml"
        write_config(config_path, dsn, args.tenants)
        t0 = time.perf_counter()
        config = load_config(config_path)
        load_plugins(config, entry_points=False)
        validate = time.perf_counter() - t0

        notify = Path(tmp) / "n.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        sock.settimeout(30)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeperd", "run", "-c", str(config_path)],
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
    print(f"tenants                 {args.tenants}")
    print(f"validate config+plugins {validate:.3f} s   (target <= 1 s)")
    print(f"start to READY=1        {ready:.3f} s   (target <= 3 s)")
    print(f"idle RSS                {rss_kb / 1024:.1f} MB (target <= 150 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
