"""``sweeperd --unit UNIT <command>``: run a command as the service runs, beside it.

The service runs as its unit's (dynamic) user and reads its DSNs from credentials that only it
can see, so ``check-config``, ``status`` or ``sweep`` run by root next to it would find no
secrets and connect as role ``root``. This runs the command in a transient unit
(``systemd-run --pipe --wait``) with the service's user and credentials, the service's own
executable and configuration file: the same checks, the same role, the same secrets, and the
command's exit status.

Credentials live in ``$CREDENTIALS_DIRECTORY``, which is per unit; a config that names them with
``dsn_credential`` (not a literal ``/run/credentials/<unit>/`` path) works in both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .problems import Problems

# What the transient unit copies. Read with one GetAll: a property the running systemd does not
# have (LoadCredentialEncrypted before 250, Ubuntu 22.04's 249) is simply absent.
PROPERTIES = (
    "User",
    "Group",
    "DynamicUser",
    "SupplementaryGroups",
    "LoadCredential",
    "LoadCredentialEncrypted",
    "Environment",
    "EnvironmentFiles",
    "ExecStart",
)


_SYSTEMD = "org.freedesktop.systemd1"


class UnitError(Problems):
    """The unit cannot be inspected or run (reported as one line, exit 2)."""


def _busctl(*args: str) -> Any:
    busctl = shutil.which("busctl")
    if busctl is None:
        raise UnitError("--unit needs systemd (busctl not found)")
    done = subprocess.run(
        [busctl, "--json=short", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise UnitError(done.stderr.strip() or f"busctl {' '.join(args)} failed")
    return json.loads(done.stdout)["data"]


def unit_properties(unit: str) -> dict[str, Any]:
    """The service properties :func:`transient_argv` copies, read from systemd over D-Bus."""
    name = unit if "." in unit else f"{unit}.service"
    manager = ("/org/freedesktop/systemd1", f"{_SYSTEMD}.Manager")
    path = _busctl("call", _SYSTEMD, *manager, "LoadUnit", "s", name)[0]
    state = _busctl("get-property", _SYSTEMD, path, f"{_SYSTEMD}.Unit", "LoadState")
    if state != "loaded":
        raise UnitError(f"unit {name} is {state} (is it installed? systemctl daemon-reload?)")
    props_iface = "org.freedesktop.DBus.Properties"
    every = _busctl("call", _SYSTEMD, path, props_iface, "GetAll", "s", f"{_SYSTEMD}.Service")[0]
    props: dict[str, Any] = {"Id": name}
    for prop in PROPERTIES:
        if prop in every:
            props[prop] = every[prop]["data"]
    return props


def _unit_config(props: Mapping[str, Any]) -> str | None:
    """The ``-c`` of the unit's ExecStart, else its ``SWEEPERD_CONFIG``."""
    for _path, argv, *_rest in props.get("ExecStart") or []:
        for i, arg in enumerate(argv):
            if arg in ("-c", "--config") and i + 1 < len(argv):
                return str(argv[i + 1])
            if arg.startswith("--config="):
                return str(arg.removeprefix("--config="))
    for entry in props.get("Environment") or []:
        key, _, value = str(entry).partition("=")
        if key == "SWEEPERD_CONFIG":
            return value
    return None


def _unit_executable(props: Mapping[str, Any]) -> list[str]:
    for path, _argv, *_rest in props.get("ExecStart") or []:
        if Path(path).name == "sweeperd":
            return [str(path)]
    return [sys.executable, "-m", "sweeperd"]


def transient_argv(
    props: Mapping[str, Any], command: Sequence[str], config: str | None
) -> list[str]:
    """The ``systemd-run`` command line running ``command`` (``[name, args...]``) as the unit.

    ``config`` is the operator's ``-c`` (made absolute: the transient unit runs in ``/``);
    without one, the unit's own configuration file.
    """
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec"]
    argv += [f"--description=sweeperd {command[0]} as {props['Id']}"]
    if props.get("DynamicUser"):
        argv += ["-p", "DynamicUser=yes"]
    for prop in ("User", "Group"):
        if props.get(prop):
            argv += ["-p", f"{prop}={props[prop]}"]
    if props.get("SupplementaryGroups"):
        argv += ["-p", "SupplementaryGroups=" + " ".join(props["SupplementaryGroups"])]
    for prop in ("LoadCredential", "LoadCredentialEncrypted"):
        for ident, source in props.get(prop) or []:
            argv += ["-p", f"{prop}={ident}:{source}"]
    # Paths only: the secrets in these files and credentials never reach a command line.
    for path, optional in props.get("EnvironmentFiles") or []:
        argv += ["-p", f"EnvironmentFile={'-' if optional else ''}{path}"]
    for entry in props.get("Environment") or []:
        argv += ["-E", str(entry)]
    path = str(Path(config).absolute()) if config else _unit_config(props)
    args = [command[0], *(["-c", path] if path else []), *command[1:]]
    return [*argv, "--", *_unit_executable(props), *args]


def run_as_unit(unit: str, command: Sequence[str], config: str | None) -> int:
    """Run ``command`` in a transient unit like ``unit``; its exit status."""
    argv = transient_argv(unit_properties(unit), command, config)
    if shutil.which(argv[0]) is None:
        raise UnitError("--unit needs systemd-run (not found)")
    sys.stdout.flush()
    os.execvp(argv[0], argv)
