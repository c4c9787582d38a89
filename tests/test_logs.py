"""Logs: JSON lines with sweep/tenant/operation and trace ids, stdlib records, exceptions, journald.

The real output of ``sweeperd sweep`` (a subprocess; its stderr is a pipe, not a TTY) is checked
line by line, with tracing exported over OTLP/HTTP to a small receiver started here so that the
``trace_id``/``span_id`` of the log lines can be matched with the exported spans. Rendering
details (stdlib records, exceptions, journald priorities, console output, levels) are checked
in-process with :func:`sweeperd.logs.setup_logging` writing to a stream of the test's choosing;
the previous logging configuration is restored after each test.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp import OtlpReceiver
from support import run_cli, run_sql, toml_str, with_secret_password, write_config

from sweeperd.config import LogConfig
from sweeperd.logs import setup_logging, under_journald

SWEEP = "nightly"
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")
SECRET = "s3cretPw-91c2"

# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog's and the root logger's configuration back after setup_logging."""
    saved = dict(structlog.get_config())
    saved["processors"] = list(saved["processors"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("psycopg.pool", "apscheduler")}
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


def logging_to(stream: Any, *, format: str = "json", level: str = "debug") -> None:
    setup_logging(LogConfig(format=format, level=level), stream=stream)  # type: ignore[arg-type]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be exactly one JSON object."""
    out = []
    for line in text.splitlines():
        value = json.loads(line)
        assert isinstance(value, dict), line
        out.append(value)
    return out


@pytest.fixture
def span_exporter() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A tracer of its own (not the global provider), exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def with_secret(dsn: str) -> tuple[str, str | None]:
    """The DSN with a password that must stay out of every output, and that password.

    On a server that ignores passwords (the embedded one) that is ``SECRET``; on one that checks
    them (SWEEPERD_TEST_DSN), the DSN's own password, if it has one (see
    :func:`support.with_secret_password`).
    """
    return with_secret_password(dsn, SECRET)


def sweep_config(
    tmp_path: Path,
    dsn: str,
    *,
    log_format: str = "json",
    level: str = "debug",
    connect_retry: str | None = None,
) -> Path:
    """Tenants a (table present) and b (table missing: its operations fail), one db-scope rule."""
    retry = f"connect_retry = {toml_str(connect_retry)}" if connect_retry else ""
    return write_config(
        tmp_path,
        f"""
        [log]
        format = "{log_format}"
        level = "{level}"

        [history]
        enabled = false

        [databases.main]
        dsn = {toml_str(dsn)}
        max_connections = 4
        {retry}

        [[tenants]]
        name = "a"
        database = "main"
        schema = "tenant_a"

        [[tenants]]
        name = "b"
        database = "main"
        schema = "tenant_b"

        [sweeps.{SWEEP}]
        interval = "1h"
        operations = ["retention.*", "vacuum.*"]

        [plugins.vacuum]
        tables = ["notifications"]

        [[plugins.retention.rules]]
        name = "notifications"
        table = "notifications"
        column = "created_at"
        older_than = "30d"

        [[plugins.retention.rules]]
        name = "sessions"
        scope = "database"
        schema = "public"
        table = "sessions"
        column = "expires_at"
        older_than = "0s"
    """,
    )


def create_data(dsn: str) -> None:
    # No index on the cutoff columns: the retention plugin warns from inside its operation.
    run_sql(
        dsn,
        "CREATE SCHEMA tenant_a",
        "CREATE SCHEMA tenant_b",
        "CREATE TABLE tenant_a.notifications (id serial PRIMARY KEY, created_at timestamptz)",
        "INSERT INTO tenant_a.notifications (created_at)"
        " SELECT now() - interval '100 days' FROM generate_series(1, 3)",
        "CREATE TABLE public.sessions (id serial PRIMARY KEY, expires_at timestamptz)",
        "INSERT INTO public.sessions (expires_at) VALUES (now() - interval '1 hour')",
    )


# -- the JSON output of a real sweep ---------------------------------------------------------------


@pytest.mark.parametrize("tracing", [True, False], ids=["tracing", "no-tracing"])
def test_sweep_json_log_lines(tmp_path: Path, pg_dsn: str, tracing: bool) -> None:
    create_data(pg_dsn)
    dsn, secret = with_secret(pg_dsn)
    path = sweep_config(tmp_path, dsn)
    with OtlpReceiver() as receiver:
        env = {"OTEL_METRICS_EXPORTER": "none"}
        if tracing:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        else:
            env["OTEL_TRACES_EXPORTER"] = "none"
        proc = run_cli("sweep", "-c", str(path), SWEEP, "--json", env=env)
    assert proc.returncode == 1, proc.stderr  # tenant b has no table: its operations fail
    report = json.loads(proc.stdout)  # stdout holds the report only
    assert report["counts"]["failed"] == 2

    lines = json_lines(proc.stderr)
    for line in lines:
        assert {"event", "level", "timestamp"} <= line.keys(), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
    events = [line["event"] for line in lines]
    assert events.count("sweep started") == events.count("sweep finished") == 1
    start, end = events.index("sweep started"), events.index("sweep finished")
    inside = lines[start : end + 1]
    for line in inside:
        assert line.get("sweep") == SWEEP, line
    items = [line for line in lines if "operation" in line]
    assert all("tenant" in line for line in items), items
    failures = [line for line in lines if line["event"] == "operation failed"]
    assert sorted((f["tenant"], f["operation"]) for f in failures) == [
        ("b", "retention.notifications"),
        ("b", "vacuum.notifications"),
    ]
    assert all("42P01" in f["error"] for f in failures)
    warnings = [line for line in lines if str(line["event"]).startswith("no index")]
    assert {(w["tenant"], w["operation"]) for w in warnings} == {
        ("a", "retention.notifications"),
        (None, "retention.sessions"),
    }
    assert all(line in inside for line in items)
    if secret:
        assert secret not in proc.stdout + proc.stderr

    if not tracing:
        assert not [line for line in lines if "trace_id" in line or "span_id" in line]
        assert receiver.requests == []
        return

    spans = receiver.spans_by_id()
    (root_id,) = [sid for sid, s in spans.items() if not s["parent"]]
    tenant_spans = {
        s["attributes"]["sweeperd.tenant"]: sid
        for sid, s in spans.items()
        if s["name"].startswith("tenant ")
    }

    def tenant_of(span: dict[str, Any]) -> str | None:
        if "sweeperd.tenant" in span["attributes"]:
            return span["attributes"]["sweeperd.tenant"]  # type: ignore[no-any-return]
        return next((t for t, sid in tenant_spans.items() if sid == span["parent"]), None)

    for line in inside:
        assert HEX32.fullmatch(line["trace_id"]), line
        assert HEX16.fullmatch(line["span_id"]), line
        assert line["trace_id"] == spans[root_id]["trace_id"]
        assert line["span_id"] in spans, line
    for line in items:
        span = spans[line["span_id"]]
        assert span["attributes"]["sweeperd.operation"] == line["operation"], (line, span)
        assert tenant_of(span) == line["tenant"], (line, span)
    for line in inside:
        if line["event"] in ("sweep started", "sweep finished"):
            assert line["span_id"] == root_id
    outside = lines[:start] + lines[end + 1 :]
    assert not [line for line in outside if "trace_id" in line]
    if secret:
        assert not [s for s in spans.values() if secret in json.dumps(s)]
        assert not [b for _p, _h, b in receiver.requests if secret.encode() in b]


# -- stdlib records, exceptions --------------------------------------------------------------------


def test_stdlib_records_come_out_as_json_with_the_same_fields(
    restore_logging: None, span_exporter: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = span_exporter
    stream = io.StringIO()
    logging_to(stream)
    log = structlog.get_logger("sweeperd.test")
    with (
        tracer.start_as_current_span("operation") as span,
        structlog.contextvars.bound_contextvars(
            sweep=SWEEP, tenant="acme", operation="retention.x"
        ),
    ):
        log.warning("from structlog", n=1)
        logging.getLogger("psycopg.pool").warning("pool %r is %s", "main", "busy")
        logging.getLogger("apscheduler.scheduler").error("job missed")
        logging.getLogger("psycopg.pool").info("noise")  # below WARNING for these loggers
    logging.getLogger("some.library").info("outside")
    ours, pool, scheduler, outside = json_lines(stream.getvalue())

    context = span.get_span_context()
    assert pool["event"] == "pool 'main' is busy"
    assert pool["level"] == "warning"
    assert scheduler["level"] == "error"
    for line in (ours, pool, scheduler):
        assert line["sweep"] == SWEEP
        assert line["tenant"] == "acme"
        assert line["operation"] == "retention.x"
        assert line["trace_id"] == format(context.trace_id, "032x")
        assert line["span_id"] == format(context.span_id, "016x")
        assert "timestamp" in line
    assert set(pool) == set(ours) - {"n"}
    assert outside["event"] == "outside"
    assert not {"sweep", "tenant", "operation", "trace_id", "span_id"} & outside.keys()
    assert [s.name for s in exporter.get_finished_spans()] == ["operation"]


@pytest.mark.parametrize("via", ["structlog", "stdlib"])
def test_an_exception_is_logged_once_as_structured_data(restore_logging: None, via: str) -> None:
    stream = io.StringIO()
    logging_to(stream)

    def fail() -> None:
        raise ValueError("bad value\nsecond line")

    try:
        try:
            fail()
        except ValueError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError:
        if via == "structlog":
            structlog.get_logger("sweeperd.test").exception("it broke", tenant="acme")
        else:
            logging.getLogger("psycopg.pool").exception("it broke")
    output = stream.getvalue()
    (line,) = json_lines(output)  # one record, one line: no traceback text after it
    assert line["event"] == "it broke"
    assert line["level"] == "error"
    assert "Traceback (most recent call last)" not in output
    exceptions = line["exception"]
    assert isinstance(exceptions, list)
    assert [e["exc_type"] for e in exceptions] == ["RuntimeError", "ValueError"]
    assert exceptions[1]["exc_value"] == "bad value\nsecond line"
    assert all(isinstance(e["frames"], list) and e["frames"] for e in exceptions)
    assert "exc_info" not in line


def test_a_logged_connection_error_does_not_leak_the_password(restore_logging: None) -> None:
    stream = io.StringIO()
    logging_to(stream)
    try:
        psycopg.connect(f"host=nonexistent.invalid user=u password={SECRET} connect_timeout=1")
    except psycopg.Error:
        structlog.get_logger("sweeperd.test").exception("connect failed")
    (line,) = json_lines(stream.getvalue())
    assert line["exception"][0]["exc_type"] == "OperationalError"
    assert SECRET not in stream.getvalue()


# -- journald --------------------------------------------------------------------------------------


def test_under_journald_lines_carry_priorities_and_no_timestamp(
    restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(stream)  # type: ignore[arg-type]
        logging_to(stream, format="auto")
        log = structlog.get_logger("sweeperd.test")
        with structlog.contextvars.bound_contextvars(sweep=SWEEP):
            log.debug("d")
            log.info("i")
            log.warning("w")
            log.error("e")
            log.critical("c")
            logging.getLogger("psycopg.pool").warning("stdlib w")
            logging.getLogger("some.library").error("stdlib e")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("x")
    text = (tmp_path / "journal").read_text(encoding="utf-8")
    got = []
    for raw in text.splitlines():
        match = re.fullmatch(r"<(\d)>(\{.*\})", raw)
        assert match, raw
        line = json.loads(match.group(2))
        assert "timestamp" not in line, "journald stamps entries itself"
        assert "_priority" not in line
        assert line["sweep"] == SWEEP
        got.append((line["event"], int(match.group(1))))
    assert got == [
        ("d", 7),
        ("i", 6),
        ("w", 4),
        ("e", 3),
        ("c", 2),
        ("stdlib w", 4),
        ("stdlib e", 3),
        ("x", 3),
    ]


def test_an_inherited_journal_stream_for_another_file_is_ignored(
    restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = os.stat(tmp_path)  # JOURNAL_STREAM names something else than our stream
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with open(tmp_path / "log", "w", encoding="utf-8") as stream:
        assert not under_journald(stream)  # type: ignore[arg-type]
        logging_to(stream, format="auto")
        structlog.get_logger("sweeperd.test").info("hello")
    (line,) = json_lines((tmp_path / "log").read_text(encoding="utf-8"))
    assert line["event"] == "hello"
    assert "timestamp" in line


# -- secrets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=nonexistent.invalid dbname=app user=app password={SECRET} connect_timeout=2",
        f"postgresql://app:{SECRET}@nonexistent.invalid/app?connect_timeout=2",
        f"postgresql://app@nonexistent.invalid/app?password={SECRET}&connect_timeout=2",
        f"host=127.0.0.1 port=1 dbname=app user=app password='{SECRET} x' connect_timeout=2",
    ],
    ids=["conninfo", "uri", "uri-query", "quoted"],
)
@pytest.mark.parametrize("json_report", [True, False], ids=["json", "text"])
def test_a_password_in_the_dsn_never_appears_in_output_logs_or_spans(
    tmp_path: Path, dsn: str, json_report: bool
) -> None:
    # Unreachable for good: a second of connect_retry still logs the "waiting it out" line
    # (which carries the error too) without waiting out the default 30 s eight times.
    path = sweep_config(tmp_path, dsn, connect_retry="1s")
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRICS_EXPORTER": "none"}
        proc = run_cli(
            "sweep", "-c", str(path), SWEEP, *(["--json"] if json_report else []), env=env
        )
        check = run_cli("check-config", "-c", str(path))
    assert proc.returncode == 3, proc.stderr
    assert check.returncode == 0, check.stderr
    lines = json_lines(proc.stderr)
    assert any(line["event"] == "database unreachable" for line in lines)
    for text in (proc.stdout, proc.stderr, check.stdout, check.stderr):
        assert SECRET not in text
    assert receiver.requests, "the sweep's trace was exported"
    assert not [b for _p, _h, b in receiver.requests if SECRET.encode() in b]


# -- console rendering and levels ------------------------------------------------------------------


def test_console_format_renders_human_lines_without_colours(restore_logging: None) -> None:
    stream = io.StringIO()
    logging_to(stream, format="console", level="info")
    with structlog.contextvars.bound_contextvars(sweep=SWEEP, tenant="acme"):
        structlog.get_logger("sweeperd.test").info("sweep started", items=3)
        logging.getLogger("psycopg.pool").warning("pool busy")
    first, second = stream.getvalue().splitlines()
    for line in (first, second):
        with pytest.raises(ValueError):
            json.loads(line)
        assert "\x1b[" not in line  # not a TTY: no colour codes
    assert "sweep started" in first and "[info" in first
    assert "items=3" in first and f"sweep={SWEEP}" in first and "tenant=acme" in first
    assert "pool busy" in second and "[warning" in second


def test_auto_format_is_console_on_a_tty_and_json_otherwise(restore_logging: None) -> None:
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w", encoding="utf-8", buffering=1) as tty:
        logging_to(tty, format="auto", level="info")
        structlog.get_logger("sweeperd.test").info("hello tty", n=1)
        tty.flush()
        rendered = os.read(primary, 65536).decode()
    os.close(primary)
    assert "hello tty" in rendered
    assert not rendered.lstrip().startswith("{")
    assert "\x1b[" in rendered  # a terminal gets colours

    stream = io.StringIO()
    logging_to(stream, format="auto", level="info")
    structlog.get_logger("sweeperd.test").info("hello pipe")
    (line,) = json_lines(stream.getvalue())
    assert line["event"] == "hello pipe"


def test_level_comes_from_the_configuration(restore_logging: None) -> None:
    stream = io.StringIO()
    logging_to(stream, level="warning")
    log = structlog.get_logger("sweeperd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    logging.getLogger("some.library").info("stdlib i")
    logging.getLogger("some.library").error("stdlib e")
    assert [line["event"] for line in json_lines(stream.getvalue())] == ["w", "stdlib e"]


def test_sweep_with_console_format(tmp_path: Path, pg_dsn: str) -> None:
    create_data(pg_dsn)
    path = sweep_config(tmp_path, pg_dsn, log_format="console", level="info")
    proc = run_cli(
        "sweep",
        "-c",
        str(path),
        SWEEP,
        "--json",
        env={"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
    )
    assert proc.returncode == 1, proc.stderr
    json.loads(proc.stdout)
    lines = proc.stderr.splitlines()
    assert any("sweep started" in line and f"sweep={SWEEP}" in line for line in lines), lines
    assert any("operation failed" in line and "tenant=b" in line for line in lines), lines
    assert not [line for line in lines if line.startswith("{")]
    assert "\x1b[" not in proc.stderr
