"""Helpers shared by the tests (import as ``from support import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PgServer:
    admin_dsn: str

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)


def run_sql(dsn: str, *statements: str) -> None:
    """Run set-up statements in autocommit (test data, roles, schemas)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def write_config(directory: Path, text: str, name: str = "sweeperd.toml") -> Path:
    """Write a TOML config (dedented) and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def toml_str(value: str) -> str:
    """A TOML basic string literal (DSNs contain characters that need no escaping, but be safe)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``sweeperd`` CLI in a subprocess (``python -m sweeperd``)."""
    full_env = dict(os.environ)
    full_env.pop("SWEEPERD_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sweeperd", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, check=False,
    )
