"""Checks of the process's environment that a connection would otherwise fail on obscurely.

A service with systemd's ``DynamicUser=`` runs under a uid that only ``libnss-systemd`` can turn
into a name, and Debian's systemd does not pull that package in. Without it libpq cannot choose
a default role ("local user with ID 63081 does not exist") and a server doing ``peer``
authentication cannot name the client ("could not look up local user ID", which the client sees
only as "Peer authentication failed"). Both are permanent: say what to do, once, before starting.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict

NSS_FIX = (
    "under systemd's DynamicUser= install libnss-systemd (Debian/Ubuntu: "
    "apt-get install libnss-systemd), or run as a user that exists"
)


def os_user_name() -> str | None:
    """The name of the process's uid, or None where the system cannot resolve it."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def os_user_problems(
    dsns: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """One problem per database whose role libpq would take from an unresolvable OS user."""
    env = os.environ if environ is None else environ
    if env.get("PGUSER") or os_user_name() is not None:
        return []
    problems = []
    for name, dsn in dsns.items():
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            continue  # the config check reports it
        # A service file may name the user; libpq reads it, we do not second-guess it.
        if params.get("user") or params.get("service") or env.get("PGSERVICE"):
            continue
        problems.append(
            f"databases.{name}: this process's uid {os.getuid()} has no user name, so libpq "
            f"cannot choose the role to connect as: {NSS_FIX}; or set user= in the DSN"
        )
    return problems


def peer_hint(message: str) -> str | None:
    """What to add to a failed peer authentication that an unresolvable uid explains."""
    if "peer authentication failed" not in message.lower() or os_user_name() is not None:
        return None
    return (
        f"the server cannot name this process's uid {os.getuid()} (peer authentication "
        f"needs the OS user name to equal the role): {NSS_FIX}"
    )
