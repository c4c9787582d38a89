"""Traces and metrics of real sweeps against a real PostgreSQL (guarantee 7 of DESIGN.md).

Sweeps run in-process through :func:`~sweeperd.sweep.sweep_once` with the bundled retention and
vacuum plugins (configured by TOML, loaded by :func:`~sweeperd.plugins.load_plugins`), on two
tenants plus one database-scope retention rule. The process's telemetry is replaced by one built
from SDK providers with in-memory exporters (``sweeperd.telemetry._current``), so nothing here
touches OpenTelemetry's process-global providers. A sampler that records what it is asked shows
which attributes were present when a span was created (samplers only see those).

The last test is end to end: ``sweeperd sweep`` in a subprocess exports over OTLP/HTTP to a
small receiver started here, and the protobuf requests are decoded and checked.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode
from otlp import OtlpReceiver, pb_attrs
from structlog.testing import capture_logs
from support import (
    DATABASE_STATS_SKIP_REASON,
    database_stats_status,
    install_plugin,
    run_cli,
    run_sql,
    toml_str,
    with_secret_password,
    write_config,
)

import sweeperd.telemetry as telemetry_module
from sweeperd.config import load_config
from sweeperd.logs import add_trace_context
from sweeperd.plugins import load_plugins
from sweeperd.report import SweepReport
from sweeperd.sweep import sweep_once
from sweeperd.telemetry import Telemetry

SWEEP = "nightly"
TENANTS = {"a": "tenant_a", "b": "tenant_b"}
# Per tenant: rows older than the cutoff, rows newer than it. batch_size is 2.
ROWS = {"a": (5, 2), "b": (3, 1)}
BATCHES = {"a": 3, "b": 2}
EXPIRED_SESSIONS, LIVE_SESSIONS = 4, 1
# Attributes the database semantic conventions want at span creation (samplers decide on them).
CREATION_TIME = (
    "db.system.name",
    "db.namespace",
    "db.collection.name",
    "db.operation.name",
    "server.address",
    "server.port",
)

# -- in-memory telemetry ---------------------------------------------------------------------------


class RecordingSampler(Sampler):
    """Samples everything and records (name, kind, attributes) as given at span creation."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, SpanKind | None, dict[str, Any]]] = []

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.seen.append((name, kind, dict(attributes or {})))
        return ALWAYS_ON.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RecordingSampler"


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    sampler: RecordingSampler
    telemetry: Telemetry

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def points(self) -> dict[str, list[Any]]:
        """Metric name → its data points (cumulative since the telemetry was built)."""
        out: dict[str, list[Any]] = defaultdict(list)
        data = self.reader.get_metrics_data()
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name].extend(metric.data.data_points)
        return out


@pytest.fixture
def make_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Otel]]:
    """Build SDK-backed telemetry and install it as sweeperd's current telemetry."""
    made: list[Telemetry] = []

    def make(*, tenant_metrics: bool = False) -> Otel:
        sampler = RecordingSampler()
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider(
            sampler=sampler,
            resource=Resource.create({"service.name": "sweeperd-test"}),
            shutdown_on_exit=False,
        )
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        tel = Telemetry(
            tracer_provider.get_tracer("sweeperd"),
            meter_provider.get_meter("sweeperd"),
            tenant_metrics=tenant_metrics,
            _shutdown=[tracer_provider.shutdown, meter_provider.shutdown],
        )
        monkeypatch.setattr(telemetry_module, "_current", tel)
        made.append(tel)
        return Otel(exporter, reader, sampler, tel)

    yield make
    for tel in made:
        tel.shutdown()


# -- database and configuration --------------------------------------------------------------------


def create_data(
    dsn: str, tenants: Mapping[str, str] = TENANTS, *, without_table: Sequence[str] = ()
) -> None:
    """Tenant schemas with ``notifications`` (old and new rows), and ``public.sessions``.

    Tenants named in ``without_table`` get the schema only. No index on the cutoff columns: the
    retention plugin then logs a warning from inside its operation (used by the log tests).
    """
    stmts = [
        "CREATE TABLE public.sessions (id serial PRIMARY KEY, expires_at timestamptz NOT NULL)",
        f"INSERT INTO public.sessions (expires_at) SELECT now() - interval '1 hour'"
        f" FROM generate_series(1, {EXPIRED_SESSIONS})",
        f"INSERT INTO public.sessions (expires_at) SELECT now() + interval '1 day'"
        f" FROM generate_series(1, {LIVE_SESSIONS})",
    ]
    for name, schema in tenants.items():
        stmts.append(f"CREATE SCHEMA {schema}")
        if name in without_table:
            continue
        old, new = ROWS.get(name, (2, 1))
        stmts += [
            f"CREATE TABLE {schema}.notifications"
            " (id serial PRIMARY KEY, created_at timestamptz NOT NULL)",
            f"INSERT INTO {schema}.notifications (created_at)"
            f" SELECT now() - interval '100 days' FROM generate_series(1, {old})",
            f"INSERT INTO {schema}.notifications (created_at)"
            f" SELECT now() FROM generate_series(1, {new})",
        ]
    run_sql(dsn, *stmts)


def write_scenario(
    tmp_path: Path,
    dsn: str,
    *,
    tenants: Mapping[str, str] = TENANTS,
    operations: Sequence[str] = ("retention.*", "vacuum.*"),
    extra_rules: str = "",
    timeout: str | None = None,
    with_probe: bool = False,
    log: str = "",
) -> Path:
    """The TOML configuration of the scenarios: database "main", the tenants, sweep "nightly"."""
    tenant_tables = "".join(
        f'[[tenants]]\nname = "{name}"\ndatabase = "main"\nschema = "{schema}"\n\n'
        for name, schema in tenants.items()
    )
    daemon = ""
    if with_probe:
        (tmp_path / "plugins.d").mkdir(exist_ok=True)
        install_plugin(tmp_path / "plugins.d", "tracing_probe.py", as_name="probe.py")
        daemon = '[daemon]\nplugin_dirs = ["plugins.d"]\n\n'
    ops = ", ".join(toml_str(o) for o in operations)
    sweep_timeout = f"timeout = {toml_str(timeout)}\n" if timeout else ""
    text = (
        f"{daemon}{log}"
        "[history]\nenabled = false\n\n"
        f"[databases.main]\ndsn = {toml_str(dsn)}\nmax_connections = 4\n\n"
        f"{tenant_tables}"
        f'[sweeps.{SWEEP}]\ncron = "0 3 * * *"\noperations = [{ops}]\n{sweep_timeout}\n'
        '[plugins.vacuum]\ntables = ["notifications"]\n\n'
        "[[plugins.retention.rules]]\n"
        'name = "notifications"\ntable = "notifications"\ncolumn = "created_at"\n'
        'older_than = "30d"\nbatch_size = 2\n\n'
        "[[plugins.retention.rules]]\n"
        'name = "sessions"\nscope = "database"\nschema = "public"\ntable = "sessions"\n'
        'column = "expires_at"\nolder_than = "0s"\n\n'
        f"{extra_rules}"
    )
    return write_config(tmp_path, text)


def run_sweep(path: Path) -> SweepReport:
    config = load_config(path)
    plugins = load_plugins(config, entry_points=False)
    return asyncio.run(sweep_once(config, plugins, sweep=SWEEP))


def assert_all_six_done(report: SweepReport, server_version_num: int) -> None:
    """The scenario's six items (retention and vacuum of two tenants, retention.sessions,
    vacuum.database_stats) are ok; before PostgreSQL 16, vacuum.database_stats is skipped
    (ONLY_DATABASE_STATS needs 16)."""
    counts = report.counts()
    expected = (6, 0) if database_stats_status(server_version_num) == "ok" else (5, 1)
    assert (counts["ok"], counts["skipped"]) == expected, report.to_json()
    assert counts["failed"] == counts["cancelled"] == 0, report.to_json()


def server_of(dsn: str) -> tuple[str, int, str]:
    """(host or socket directory, port, database name) as the client sees them."""
    with psycopg.connect(dsn) as conn:
        return conn.info.host, conn.info.port, conn.info.dbname


# -- span helpers ----------------------------------------------------------------------------------


def by_trace(spans: Sequence[ReadableSpan]) -> dict[int, list[ReadableSpan]]:
    out: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        out[span.context.trace_id].append(span)
    return out


@dataclass
class Tree:
    root: ReadableSpan
    tenants: dict[str, ReadableSpan]  # tenant name → its span
    operations: list[ReadableSpan]  # everything else

    def tenant_of(self, span: ReadableSpan) -> str | None:
        """The tenant an operation span belongs to: its attribute, else its parent's."""
        if "sweeperd.tenant" in span.attributes:
            return span.attributes["sweeperd.tenant"]  # type: ignore[return-value]
        for name, tenant_span in self.tenants.items():
            if span.parent is not None and span.parent.span_id == tenant_span.context.span_id:
                return name
        return None

    def op(self, operation: str, tenant: str | None = None) -> ReadableSpan:
        found = [
            s
            for s in self.operations
            if s.attributes.get("sweeperd.operation") == operation and self.tenant_of(s) == tenant
        ]
        assert len(found) == 1, (operation, tenant, [s.name for s in self.operations])
        return found[0]


def tree_of(spans: Sequence[ReadableSpan]) -> Tree:
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    tenants = {s.attributes["sweeperd.tenant"]: s for s in spans if s.name.startswith("tenant ")}
    operations = [s for s in spans if s is not roots[0] and not s.name.startswith("tenant ")]
    return Tree(roots[0], tenants, operations)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- the trace tree --------------------------------------------------------------------------------


def test_one_trace_per_sweep_sweep_tenant_operation_tree(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    path = write_scenario(tmp_path, pg_dsn)
    first = run_sweep(path)
    second = run_sweep(path)
    assert_all_six_done(first, server_version_num)
    assert_all_six_done(second, server_version_num)

    traces = by_trace(otel.spans())
    assert len(traces) == 2, "one trace per sweep"
    for spans in traces.values():
        tree = tree_of(spans)
        assert tree.root.name == f"sweep {SWEEP}"
        assert tree.root.kind is SpanKind.INTERNAL
        assert attrs(tree.root)["sweeperd.sweep"] == SWEEP
        root_id = tree.root.context.span_id

        assert sorted(tree.tenants) == ["a", "b"]
        for name, span in tree.tenants.items():
            assert span.name == f"tenant {name}"
            assert span.parent is not None and span.parent.span_id == root_id
            assert attrs(span)["sweeperd.schema"] == TENANTS[name]

        # Every item of the report has exactly one operation span, under the right parent.
        assert len(tree.operations) == len(first.results) == 6
        for tenant in ("a", "b"):
            tenant_id = tree.tenants[tenant].context.span_id
            for operation in ("retention.notifications", "vacuum.notifications"):
                span = tree.op(operation, tenant)
                assert span.parent is not None and span.parent.span_id == tenant_id, span.name
        for operation in ("retention.sessions", "vacuum.database_stats"):
            span = tree.op(operation, None)
            assert span.parent is not None and span.parent.span_id == root_id, (
                "database-scope operations hang directly off the sweep span"
            )
        # Children end before their parents: nothing is exported dangling.
        for span in tree.operations:
            parent = next(s for s in spans if s.context.span_id == span.parent.span_id)
            assert span.end_time <= parent.end_time


def test_operation_spans_follow_the_database_semantic_conventions(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    # Dead tuples that are there before the sweep: the vacuum has something to report.
    run_sql(pg_dsn, "DELETE FROM tenant_a.notifications WHERE created_at > now() - interval '1d'")
    report = run_sweep(write_scenario(tmp_path, pg_dsn))
    assert_all_six_done(report, server_version_num)
    host, port, _dbname = server_of(pg_dsn)
    tree = tree_of(otel.spans())

    for tenant in ("a", "b"):
        schema = TENANTS[tenant]
        for operation in ("retention.notifications", "vacuum.notifications"):
            span = tree.op(operation, tenant)
            a = attrs(span)
            assert span.kind is SpanKind.CLIENT
            assert span.status.status_code is StatusCode.OK
            assert a["db.system.name"] == "postgresql"
            database, _, ns_schema = a["db.namespace"].partition("|")
            assert database and ns_schema == schema, a["db.namespace"]
            assert a["db.collection.name"] == f"{schema}.notifications"
            assert a["server.address"] == host
            assert a["server.port"] == port
            assert a["sweeperd.tenant"] == tenant
            assert a["sweeperd.operation"] == operation
            assert a["sweeperd.status"] == "ok"
            assert all(key.startswith(("db.", "server.", "sweeperd.", "error.")) for key in a), (
                sorted(a)
            )

        deleted = tree.op("retention.notifications", tenant)
        assert attrs(deleted)["sweeperd.rows"] == ROWS[tenant][0]
        assert attrs(deleted)["sweeperd.batches"] == BATCHES[tenant]
        assert attrs(deleted)["sweeperd.plugin"] == "retention"

        vacuumed = attrs(tree.op("vacuum.notifications", tenant))
        before = vacuumed["sweeperd.dead_tuples_before"]
        after = vacuumed["sweeperd.dead_tuples_after"]
        assert isinstance(before, int) and isinstance(after, int)
        assert 0 <= after <= before
        assert vacuumed["sweeperd.rows"] == before - after
    assert attrs(tree.op("vacuum.notifications", "a"))["sweeperd.dead_tuples_before"] >= 2

    sessions = tree.op("retention.sessions")
    a = attrs(sessions)
    assert sessions.kind is SpanKind.CLIENT
    assert a["db.system.name"] == "postgresql"
    assert a["db.collection.name"] == "public.sessions"
    assert a["db.namespace"].split("|")[0] == attrs(deleted)["db.namespace"].split("|")[0]
    assert a["sweeperd.rows"] == EXPIRED_SESSIONS
    assert a["sweeperd.scope"] == "database"
    assert "sweeperd.tenant" not in a

    # Creation time: what the sampler was shown already held the conventions' attributes.
    client_spans = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    seen_client = [seen for seen in otel.sampler.seen if seen[1] is SpanKind.CLIENT]
    assert len(seen_client) == len(client_spans) == 6
    for name, _kind, at_creation in seen_client:
        assert at_creation.get("db.system.name") == "postgresql", name
    for span in client_spans:
        at_creation = next(
            seen[2]
            for seen in seen_client
            if seen[2].get("sweeperd.operation") == span.attributes["sweeperd.operation"]
            and seen[2].get("sweeperd.tenant") == span.attributes.get("sweeperd.tenant")
        )
        for key in CREATION_TIME:
            if key in span.attributes:
                assert at_creation.get(key) == span.attributes[key], (span.name, key)


def test_bundled_operation_spans_are_named_after_statement_and_table(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    report = run_sweep(write_scenario(tmp_path, pg_dsn))
    assert_all_six_done(report, server_version_num)
    tree = tree_of(otel.spans())
    expected = {
        ("retention.notifications", "a"): ("DELETE", "DELETE tenant_a.notifications"),
        ("retention.notifications", "b"): ("DELETE", "DELETE tenant_b.notifications"),
        ("vacuum.notifications", "a"): ("VACUUM", "VACUUM tenant_a.notifications"),
        ("vacuum.notifications", "b"): ("VACUUM", "VACUUM tenant_b.notifications"),
        ("retention.sessions", None): ("DELETE", "DELETE public.sessions"),
    }
    got = {
        key: (attrs(tree.op(*key)).get("db.operation.name"), tree.op(*key).name) for key in expected
    }
    assert got == expected
    assert attrs(tree.op("vacuum.database_stats")).get("db.operation.name") == "VACUUM"


def test_operation_span_name_and_db_operation_name_come_from_db_operation(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel]
) -> None:
    """An operation that declares its SQL verb gets ``<VERB> <schema>.<table>`` as span name."""
    otel = make_otel()
    create_data(pg_dsn, {"a": "tenant_a"})
    report = run_sweep(
        write_scenario(
            tmp_path,
            pg_dsn,
            tenants={"a": "tenant_a"},
            operations=["probe.nested"],
            with_probe=True,
        )
    )
    assert report.counts()["ok"] == 1, report.to_json()
    span = tree_of(otel.spans()).op("probe.nested", "a")
    assert span.name == "SELECT tenant_a.notifications"
    assert attrs(span)["db.operation.name"] == "SELECT"
    assert attrs(span)["db.collection.name"] == "tenant_a.notifications"


def test_db_namespace_names_the_postgresql_database_and_schema(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    report = run_sweep(write_scenario(tmp_path, pg_dsn))
    assert_all_six_done(report, server_version_num)
    _host, _port, dbname = server_of(pg_dsn)
    assert dbname != "main"
    tree = tree_of(otel.spans())
    assert attrs(tree.op("retention.notifications", "a"))["db.namespace"] == f"{dbname}|tenant_a"
    assert attrs(tree.op("vacuum.notifications", "b"))["db.namespace"] == f"{dbname}|tenant_b"


# -- failed, skipped, cancelled --------------------------------------------------------------------


def test_failed_and_skipped_operations(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn, without_table=["b"])
    archive = (
        '[[plugins.retention.rules]]\nname = "archive"\ntable = "archive"\n'
        'column = "created_at"\nolder_than = "1d"\nmissing = "skip"\n'
    )
    path = write_scenario(tmp_path, pg_dsn, extra_rules=archive)
    with capture_logs(
        processors=[structlog.contextvars.merge_contextvars, add_trace_context]
    ) as entries:
        report = run_sweep(path)
    statuses = {(r.tenant, r.operation): r.status for r in report.results}
    assert statuses[("b", "retention.notifications")] == "failed"
    assert statuses[("a", "retention.archive")] == "skipped"
    assert statuses[("a", "retention.notifications")] == "ok"
    tree = tree_of(otel.spans())

    failed = tree.op("retention.notifications", "b")
    a = attrs(failed)
    assert failed.kind is SpanKind.CLIENT
    assert failed.status.status_code is StatusCode.ERROR
    assert "42P01" in (failed.status.description or "")
    assert a["db.response.status_code"] == "42P01"
    assert a["error.type"] in ("42P01", "UndefinedTable")
    assert a["sweeperd.status"] == "failed"
    vacuum_failed = attrs(tree.op("vacuum.notifications", "b"))
    assert vacuum_failed["db.response.status_code"] == "42P01"

    for tenant in ("a", "b"):
        skipped = tree.op("retention.archive", tenant)
        assert attrs(skipped)["sweeperd.status"] == "skipped"
        assert "does not exist" in attrs(skipped)["sweeperd.skip_reason"]
        assert "error.type" not in attrs(skipped)

    assert tree.tenants["b"].status.status_code is StatusCode.ERROR
    assert attrs(tree.tenants["b"])["sweeperd.failed"] == 2
    assert tree.tenants["a"].status.status_code is not StatusCode.ERROR
    assert tree.root.status.status_code is StatusCode.ERROR
    assert attrs(tree.root)["sweeperd.failed"] == 2
    stats_status = database_stats_status(server_version_num)
    assert statuses[(None, "vacuum.database_stats")] == stats_status
    assert attrs(tree.root)["sweeperd.skipped"] == 2 + (stats_status == "skipped")
    assert tree.op("retention.notifications", "a").status.status_code is StatusCode.OK

    # The "operation failed" log line is emitted inside the failed operation's span.
    failures = [
        e
        for e in entries
        if e["event"] == "operation failed" and e.get("operation") == "retention.notifications"
    ]
    assert len(failures) == 1
    assert failures[0]["tenant"] == "b"
    assert failures[0]["span_id"] == format(failed.context.span_id, "016x")
    assert failures[0]["trace_id"] == format(failed.context.trace_id, "032x")

    counted = Counter()
    for point in otel.points()["sweeperd.operations"]:
        counted[(point.attributes["sweeperd.operation"], point.attributes["sweeperd.status"])] += (
            point.value
        )
    assert counted[("retention.notifications", "failed")] == 1
    assert counted[("retention.notifications", "ok")] == 1
    assert counted[("retention.archive", "skipped")] == 2
    assert counted[("vacuum.notifications", "failed")] == 1


def test_skipped_operation_span_is_not_an_error(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel]
) -> None:
    otel = make_otel()
    create_data(pg_dsn, {"a": "tenant_a"})
    archive = (
        '[[plugins.retention.rules]]\nname = "archive"\ntable = "archive"\n'
        'column = "created_at"\nolder_than = "1d"\nmissing = "skip"\n'
    )
    path = write_scenario(
        tmp_path,
        pg_dsn,
        tenants={"a": "tenant_a"},
        operations=["retention.archive"],
        extra_rules=archive,
    )
    report = run_sweep(path)
    assert [r.status for r in report.results] == ["skipped"]
    assert report.exit_code() == 0
    skipped = tree_of(otel.spans()).op("retention.archive", "a")
    assert attrs(skipped)["sweeperd.skip_reason"]
    assert skipped.status.status_code is not StatusCode.ERROR, skipped.status.description
    assert not [e.name for e in skipped.events if e.name == "exception"]


def span_text(span: ReadableSpan) -> str:
    """Everything a span carries as text: name, status, attributes, events."""
    parts = [span.name, span.status.description or "", repr(dict(span.attributes or {}))]
    parts += [f"{e.name} {dict(e.attributes or {})!r}" for e in span.events]
    return "\n".join(parts)


def test_a_password_in_an_operation_error_stays_out_of_the_span(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel]
) -> None:
    otel = make_otel()
    create_data(pg_dsn, {"a": "tenant_a"})
    report = run_sweep(
        write_scenario(
            tmp_path, pg_dsn, tenants={"a": "tenant_a"}, operations=["probe.leak"], with_probe=True
        )
    )
    (result,) = report.results
    assert result.status == "failed"
    assert "password=***" in (result.error or "")
    assert "LeakyPw-42" not in (result.error or "")
    span = tree_of(otel.spans()).op("probe.leak", "a")
    assert span.status.status_code is StatusCode.ERROR
    assert "LeakyPw-42" not in span_text(span)


def test_cancelled_operations_are_marked_explicitly(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel]
) -> None:
    otel = make_otel()
    create_data(pg_dsn, {"a": "tenant_a"})
    path = write_scenario(
        tmp_path,
        pg_dsn,
        tenants={"a": "tenant_a"},
        operations=["probe.nap", "vacuum.*"],
        timeout="500ms",
        with_probe=True,
    )
    report = run_sweep(path)
    statuses = {r.operation: r.status for r in report.results}
    assert statuses == {
        "probe.nap": "cancelled",
        "vacuum.notifications": "cancelled",
        "vacuum.database_stats": "cancelled",
    }, report.to_json()
    tree = tree_of(otel.spans())

    # Cancelled while its query ran (the span was started by the operation).
    nap = tree.op("probe.nap", "a")
    assert nap.kind is SpanKind.CLIENT
    assert nap.status.status_code is StatusCode.ERROR
    assert attrs(nap)["error.type"] == "cancelled"
    assert attrs(nap)["sweeperd.status"] == "cancelled"
    assert "timed out" in attrs(nap)["sweeperd.cancel_reason"]
    # Cancelled while it waited for the operation before it on the same table (never started).
    for span in (tree.op("vacuum.notifications", "a"), tree.op("vacuum.database_stats")):
        assert span.status.status_code is StatusCode.ERROR, span.name
        assert attrs(span)["error.type"] == "cancelled"
    assert tree.op("vacuum.database_stats").parent.span_id == tree.root.context.span_id
    assert tree.tenants["a"].status.status_code is StatusCode.ERROR
    assert tree.root.status.status_code is StatusCode.ERROR
    assert attrs(tree.root)["sweeperd.cancelled"] == 3
    assert not [s.name for s in otel.spans() if s.status.status_code is StatusCode.UNSET]

    cancelled = sum(
        p.value
        for p in otel.points()["sweeperd.operations"]
        if p.attributes["sweeperd.status"] == "cancelled"
    )
    assert cancelled == 3
    outcomes = [p.attributes["sweeperd.outcome"] for p in otel.points()["sweeperd.sweep.duration"]]
    assert outcomes == ["failed"]


# -- metrics ---------------------------------------------------------------------------------------


def sums(points: Sequence[Any], *keys: str) -> dict[tuple[Any, ...], float]:
    out: dict[tuple[Any, ...], float] = defaultdict(float)
    for point in points:
        out[tuple(point.attributes.get(k) for k in keys)] += point.value
    return dict(out)


def test_metrics_of_a_sweep_carry_no_tenant_by_default(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    run_sql(pg_dsn, "DELETE FROM tenant_a.notifications WHERE created_at > now() - interval '1d'")
    report = run_sweep(write_scenario(tmp_path, pg_dsn))
    assert_all_six_done(report, server_version_num)
    points = otel.points()

    assert sums(points["sweeperd.operations"], "sweeperd.operation", "sweeperd.status") == {
        ("retention.notifications", "ok"): 2,
        ("vacuum.notifications", "ok"): 2,
        ("retention.sessions", "ok"): 1,
        ("vacuum.database_stats", database_stats_status(server_version_num)): 1,
    }
    rows = sums(points["sweeperd.rows"], "sweeperd.operation")
    assert rows[("retention.notifications",)] == ROWS["a"][0] + ROWS["b"][0]
    assert rows[("retention.sessions",)] == EXPIRED_SESSIONS

    durations = points["sweeperd.operation.duration"]
    assert sum(p.count for p in durations) == 6
    assert all(p.sum >= 0 for p in durations)
    sweeps = points["sweeperd.sweep.duration"]
    assert [(p.count, dict(p.attributes)) for p in sweeps] == [
        (1, {"sweeperd.sweep": SWEEP, "sweeperd.outcome": "ok"})
    ]
    assert sweeps[0].sum >= 0

    tree = tree_of(otel.spans())
    removed_in_spans = sum(
        attrs(tree.op("vacuum.notifications", t))["sweeperd.dead_tuples_before"]
        - attrs(tree.op("vacuum.notifications", t))["sweeperd.dead_tuples_after"]
        for t in ("a", "b")
    )
    removed = sum(p.value for p in points["sweeperd.dead_tuples.removed"])
    assert removed == removed_in_spans > 0

    waits = points["db.client.connection.wait_time"]
    assert sum(p.count for p in waits) >= 6  # at least one checkout per operation
    assert {p.attributes["db.client.connection.pool.name"] for p in waits} == {"main"}

    for name, metric_points in points.items():
        for point in metric_points:
            assert "sweeperd.tenant" not in point.attributes, (name, dict(point.attributes))


def test_tenant_metrics_label_operation_metrics_with_the_tenant(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel], server_version_num: int
) -> None:
    otel = make_otel(tenant_metrics=True)
    create_data(pg_dsn)
    report = run_sweep(write_scenario(tmp_path, pg_dsn))
    assert_all_six_done(report, server_version_num)
    points = otel.points()
    assert sums(points["sweeperd.operations"], "sweeperd.tenant", "sweeperd.operation") == {
        ("a", "retention.notifications"): 1,
        ("b", "retention.notifications"): 1,
        ("a", "vacuum.notifications"): 1,
        ("b", "vacuum.notifications"): 1,
        (None, "retention.sessions"): 1,
        (None, "vacuum.database_stats"): 1,
    }
    tenants = {p.attributes.get("sweeperd.tenant") for p in points["sweeperd.operation.duration"]}
    assert tenants == {"a", "b", None}
    # A tenant is (database, name): its points say which database, so "acme" in two databases
    # is two series, not one.
    labelled = [p for p in points["sweeperd.operations"] if "sweeperd.tenant" in p.attributes]
    assert labelled and all(p.attributes.get("sweeperd.database") == "main" for p in labelled)


def test_tenant_metrics_flag_comes_from_the_configuration(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [telemetry]
        tenant_metrics = true

        [databases.main]
        dsn = "host=/nonexistent dbname=x"
    """,
    )
    assert load_config(path).telemetry.tenant_metrics is True


# -- context across asyncio tasks ------------------------------------------------------------------


def test_log_lines_of_an_operation_carry_its_span_across_tasks(
    tmp_path: Path, pg_dsn: str, make_otel: Callable[..., Otel]
) -> None:
    otel = make_otel()
    create_data(pg_dsn)
    path = write_scenario(
        tmp_path, pg_dsn, operations=["probe.nested", "retention.*"], with_probe=True
    )
    with capture_logs(
        processors=[structlog.contextvars.merge_contextvars, add_trace_context]
    ) as entries:
        report = run_sweep(path)
    assert report.counts()["ok"] == 5, report.to_json()
    tree = tree_of(otel.spans())
    trace_id = format(tree.root.context.trace_id, "032x")

    probes = [e for e in entries if str(e["event"]).startswith("probe:")]
    assert len(probes) == 6  # 3 per tenant: after a query, and in two child tasks
    for entry in probes:
        span = tree.op("probe.nested", entry["tenant"])
        assert entry["operation"] == "probe.nested"
        assert entry["sweep"] == SWEEP
        assert entry["trace_id"] == trace_id
        assert entry["span_id"] == format(span.context.span_id, "016x"), entry

    # A bundled plugin's own warning (no index on the cutoff column; once per rule) joins the
    # span of the operation that logged it too.
    warnings = [e for e in entries if "no index" in str(e["event"])]
    assert sorted(e["operation"] for e in warnings) == [
        "retention.notifications",
        "retention.sessions",
    ]
    assert {e["tenant"] for e in warnings} in ({"a", None}, {"b", None})
    for entry in warnings:
        span = tree.op(entry["operation"], entry["tenant"])
        assert entry["span_id"] == format(span.context.span_id, "016x"), entry

    for event in ("sweep started", "sweep finished"):
        (entry,) = [e for e in entries if e["event"] == event]
        assert entry["span_id"] == format(tree.root.context.span_id, "016x")
        assert entry["trace_id"] == trace_id


# -- end to end: sweeperd sweep exporting over OTLP/HTTP -------------------------------------------


@pytest.mark.parametrize("service_name", [None, "billing-sweeper"])
def test_sweeperd_sweep_exports_the_trace_over_otlp_http(
    tmp_path: Path, pg_dsn: str, service_name: str | None, server_version_num: int
) -> None:
    create_data(pg_dsn)
    # A password (ignored by a trust-authenticated server, or the DSN's own) that must never
    # show up anywhere.
    pg_dsn, secret = with_secret_password(pg_dsn, "s3cretPw-7f3a")
    path = write_scenario(tmp_path, pg_dsn, log='[log]\nformat = "json"\nlevel = "debug"\n\n')
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": service_name or "",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
        proc = run_cli("sweep", "-c", str(path), SWEEP, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        exported = receiver.spans()
        paths = {p for p, _h, _b in receiver.requests}
        content_types = {h.get("content-type") for _p, h, _b in receiver.requests}
        bodies = b"".join(b for _p, _h, b in receiver.requests)

    assert paths == {"/v1/traces"}, "OTEL_METRICS_EXPORTER=none: traces only"
    assert content_types == {"application/x-protobuf"}
    assert len(exported) == 9, [s.name for _r, s in exported]
    for resource, _span in exported:
        assert resource["service.name"] == (service_name or "sweeperd")
        assert resource["service.version"]

    spans = [s for _r, s in exported]
    assert len({s.trace_id for s in spans}) == 1
    (root,) = [s for s in spans if not s.parent_span_id]
    assert root.name == f"sweep {SWEEP}"
    assert root.kind == PbSpan.SpanKind.SPAN_KIND_INTERNAL
    tenants = {
        pb_attrs(s.attributes)["sweeperd.tenant"]: s for s in spans if s.name.startswith("tenant ")
    }
    assert sorted(tenants) == ["a", "b"]
    assert all(t.parent_span_id == root.span_id for t in tenants.values())
    operations = [s for s in spans if s is not root and not s.name.startswith("tenant ")]
    assert len(operations) == 6
    host, port, _dbname = server_of(pg_dsn)
    seen = set()
    for span in operations:
        a = pb_attrs(span.attributes)
        tenant = a.get("sweeperd.tenant")
        seen.add((tenant, a["sweeperd.operation"]))
        expected_parent = tenants[tenant].span_id if tenant else root.span_id
        assert span.parent_span_id == expected_parent, span.name
        assert span.kind == PbSpan.SpanKind.SPAN_KIND_CLIENT
        if (
            a["sweeperd.operation"] == "vacuum.database_stats"
            and database_stats_status(server_version_num) == "skipped"
        ):
            # Before 16: skipped, which is no error (and not an ok either).
            assert span.status.code == PbStatus.StatusCode.STATUS_CODE_UNSET
            assert a["sweeperd.status"] == "skipped"
            assert a["sweeperd.skip_reason"] == DATABASE_STATS_SKIP_REASON
        else:
            assert span.status.code == PbStatus.StatusCode.STATUS_CODE_OK
            assert a["sweeperd.status"] == "ok"
        assert a["db.system.name"] == "postgresql"
        assert a["server.address"] == host
        assert a["server.port"] == port
        if tenant:
            assert a["db.namespace"].endswith(f"|{TENANTS[tenant]}")
            assert a["db.collection.name"] == f"{TENANTS[tenant]}.notifications"
        if a["sweeperd.operation"] == "retention.notifications":
            assert a["sweeperd.rows"] == ROWS[tenant][0]
            assert a["sweeperd.batches"] == BATCHES[tenant]
    assert seen == {
        ("a", "retention.notifications"),
        ("b", "retention.notifications"),
        ("a", "vacuum.notifications"),
        ("b", "vacuum.notifications"),
        (None, "retention.sessions"),
        (None, "vacuum.database_stats"),
    }

    # The JSON log lines of the sweep join this trace.
    trace_hex = root.trace_id.hex()
    span_ids = {s.span_id.hex() for s in spans}
    in_sweep = [line for line in proc.stderr.splitlines() if '"sweep"' in line]
    assert in_sweep
    for line in in_sweep:
        assert re.search(rf'"trace_id": "{trace_hex}"', line), line
        span_id = re.search(r'"span_id": "([0-9a-f]{16})"', line)
        assert span_id and span_id.group(1) in span_ids, line

    if secret:
        assert secret.encode() not in bodies
        assert secret not in proc.stdout and secret not in proc.stderr
