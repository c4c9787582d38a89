"""structlog set-up: JSON lines in production, console rendering on a TTY.

Standard-library records (psycopg_pool, APScheduler) go through the same processors, so every
line on stderr has the same shape.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from .config import LogConfig


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    level = getattr(logging, config.level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
