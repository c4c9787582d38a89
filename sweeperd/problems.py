"""The outcome vocabulary: what a command exits with, and the one exception that carries problems.

Every failure a user must fix (the configuration, a plugin's settings, the command line, a plan
that cannot be built) is a :class:`Problems`: one line each, printed as they are, exit
:attr:`ExitCode.USAGE`. ``sweeperd.cli.main`` is the one place that maps outcomes to exit codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum


class ExitCode(IntEnum):
    """The exit statuses of every command (the contract in the README)."""

    OK = 0  # every selected operation succeeded, or was skipped by policy
    FAILED = 1  # at least one failed (an unreachable database among reachable ones included)
    USAGE = 2  # a usage or configuration problem (one line each, no traceback)
    UNREACHABLE = 3  # no database could be reached at all
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class Problems(Exception):
    """One or more problems a user must fix; ``problems`` holds one line each."""

    def __init__(self, problems: Iterable[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def printable(text: str) -> str:
    """``text`` with what would not print as itself escaped: one problem stays one line, whatever
    a TOML key, a value or an exception holds (a newline, U+0085, U+2028, control characters)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
