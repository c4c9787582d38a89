"""How a sweep is stopped early: at a deadline (timeout, window end) or on request."""

from __future__ import annotations

import asyncio
import time


class Stop:
    """Ends a sweep early: at a deadline (timeout, window end) or on request (replace, drain).

    The earliest deadline wins; ``reason`` says why, for the cancelled items' ``error``.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None
        self._deadline: float | None = None
        self._deadline_reason = ""

    def at(self, seconds_from_now: float, reason: str) -> None:
        deadline = time.monotonic() + seconds_from_now
        if self._deadline is None or deadline < self._deadline:
            self._deadline, self._deadline_reason = deadline, reason

    def now(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def remaining(self) -> float | None:
        """Seconds until the deadline (None: there is none)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def why(self) -> str:
        """Why the sweep ended early: the request's reason, else the deadline's."""
        return self.reason or self._deadline_reason or "sweep timed out"
