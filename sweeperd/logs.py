"""structlog set-up: JSON lines in production, console rendering on a TTY, journald-aware.

Standard-library records (psycopg_pool, APScheduler) go through the same processors, so every line
on stderr has the same shape. Inside a span, every line carries ``trace_id`` (32 hex) and
``span_id`` (16 hex) so logs and traces join; inside a sweep, ``sweep``, ``tenant`` and
``operation`` come from context variables bound by the runner. Exceptions are rendered once, as
structured data, never as a multi-line blob in the middle of a JSON stream.

Under systemd (``JOURNAL_STREAM`` names our stderr) lines carry no timestamp (journald stamps
them) and start with a ``<N>`` syslog priority, which journald turns into the entry's PRIORITY.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
import structlog.tracebacks
from opentelemetry import trace

from .config import LogConfig

# sd-daemon(3) priority prefixes.
_PRIORITY = {
    "critical": 2,
    "error": 3,
    "exception": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
    "notset": 7,
}


def add_trace_context(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event["trace_id"] = format(span_context.trace_id, "032x")
        event["span_id"] = format(span_context.span_id, "016x")
    return event


def _journal_prefix(
    _logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event["_priority"] = _PRIORITY.get(str(event.get("level", method)).lower(), 6)
    return event


class _JournalRenderer:
    """``<priority>`` + the JSON line: journald strips the prefix and keeps the level."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        priority = event.pop("_priority", 6)
        line = self._json(logger, method, event)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"


def under_journald(stream: TextIO) -> bool:
    """True if ``stream`` is the journal socket systemd connected us to (not merely inherited)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = value.partition(":")
    return f"{stat.st_dev}:{stat.st_ino}" == f"{dev}:{ino}"


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    journal = under_journald(stream)
    tty = not journal and stream.isatty()
    use_json = config.format == "json" or (config.format == "auto" and not tty)
    level = getattr(logging, config.level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_trace_context,
    ]
    if not journal:
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: structlog.typing.Processor
    if use_json:
        # Frames without their local variables: a local may hold a DSN with its password.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        if journal:
            shared.append(_journal_prefix)
            renderer = _JournalRenderer()
        else:
            renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg_pool logs every connection attempt and APScheduler every job run at INFO; at our
    # INFO that is noise (sweeperd logs its own sweep start/finish lines).
    for noisy in ("psycopg.pool", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
