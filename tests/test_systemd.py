"""The systemd unit: it verifies cleanly, is hardened, and the hardening does not break sweeperd."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, run_sql, toml_str, write_config

UNIT = REPO / "systemd" / "sweeperd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def unit_with_real_executable(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's sweeperd: verify checks it exists."""
    executable = Path(sys.executable).with_name("sweeperd")
    assert executable.exists(), executable
    text = UNIT.read_text().replace("/opt/sweeperd/bin/sweeperd", str(executable))
    path = tmp_path / "sweeperd.service"
    path.write_text(text)
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_systemd_analyze
def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    unit = unit_with_real_executable(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and typos: any output at all is a finding.
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


@needs_systemd_analyze
def test_unit_exposure_is_two_or_lower(tmp_path: Path) -> None:
    unit = unit_with_real_executable(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_has_the_service_contract() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    # The shell's builtin kill: /bin/kill (procps) is missing from minimal images.
    assert d["ExecReload"] == ['/bin/sh -c "kill -HUP $MAINPID"']
    assert d["ExecStart"][0].split()[1] == "run"
    assert d["Restart"] == ["on-failure"]
    # A configuration error (exit 2) is not retried every RestartSec forever.
    assert d["RestartPreventExitStatus"] == ["2"]
    assert d["Documentation"] == ["file:///usr/share/doc/sweeperd/README.md"]
    assert int(d["WatchdogSec"][0]) > 0
    # Longer than the default drain_timeout (30 s), so the drain is never cut short by SIGKILL.
    assert int(d["TimeoutStopSec"][0]) > 30
    assert d["DynamicUser"] == ["yes"]
    assert d["ConfigurationDirectory"] == ["sweeperd"]
    assert d["StateDirectory"] == ["sweeperd"]
    families = set(d["RestrictAddressFamilies"][0].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert d["MemoryDenyWriteExecute"] == ["yes"]
    assert "LoadCredential=" in UNIT.read_text()  # documented for secrets


def _mdwe_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    probe = (
        "import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); "
        f"sys.exit(0 if l.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def test_stack_runs_under_memory_deny_write_execute(pg_dsn: str, tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes must not break what sweeperd loads (e.g. libffi closures).

    PR_SET_MDWE (Linux 6.3+) is the kernel mechanism systemd uses for it: a real sweep with the
    bundled plugins runs in a process that cannot create writable+executable memory.
    """
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert ctypes  # the child uses ctypes only to call prctl, no callbacks
    run_sql(
        pg_dsn,
        "CREATE SCHEMA tenant_a",
        "CREATE TABLE tenant_a.notifications (id int, created_at timestamptz)",
        "INSERT INTO tenant_a.notifications SELECT g, now() - g * interval '1 day' "
        "FROM generate_series(1, 100) g",
    )
    config = write_config(
        tmp_path,
        f"""
        [databases.main]
        dsn = {toml_str(pg_dsn)}
        [[tenants]]
        name = "a"
        database = "main"
        schema = "tenant_a"
        [plugins.vacuum]
        tables = ["notifications"]
        [[plugins.retention.rules]]
        name = "notifications"
        table = "notifications"
        column = "created_at"
        older_than = "30d"
        """,
    )
    child = (
        "import ctypes, mmap, runpy, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit('W+X memory was allowed: MDWE not in effect')\n"
        "except OSError:\n"
        "    pass\n"
        f"sys.argv = ['sweeperd', 'sweep', '-c', {str(config)!r}, '--json']\n"
        "runpy.run_module('sweeperd', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    results = {r["operation"]: r for r in json.loads(result.stdout)["results"]}
    # Rows 31..100 days old are older than 30 days; row 30 is too by the time the sweep runs.
    assert results["retention.notifications"]["status"] == "ok"
    assert results["retention.notifications"]["rows"] in (70, 71)
    assert results["vacuum.notifications"]["status"] == "ok"
