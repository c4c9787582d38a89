"""Telemetry set-up from the standard ``OTEL_*`` variables (``setup_telemetry``).

Cases that end with no-op telemetry or an error run in this process: they never install a global
provider. Cases that build real SDK providers run in a subprocess (``python -c``), because
OpenTelemetry's global providers can be set only once per process. OTLP exports go to a small
OTLP/HTTP receiver started here; console exports are read from the subprocess's stderr.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otlp import OtlpReceiver
from support import run_cli, write_config

import sweeperd.telemetry as telemetry_module
from sweeperd.telemetry import Telemetry, TelemetryError, setup_telemetry, telemetry

HAVE_GRPC = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None


@pytest.fixture(autouse=True)
def _restore_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_telemetry replaces the module's current telemetry: put the old one back after."""
    monkeypatch.setattr(telemetry_module, "_current", telemetry_module._current)


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any OTEL_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def run_python(code: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=dict(env or clean_environ()),
        timeout=60,
        check=False,
    )


def console_spans(stderr: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter wrote (pretty-printed JSON objects, one after the other)."""
    decoder = json.JSONDecoder()
    spans, i = [], 0
    text = stderr.strip()
    while i < len(text):
        if text[i] != "{":
            i += 1
            continue
        obj, end = decoder.raw_decode(text, i)
        if isinstance(obj, dict) and "context" in obj and "name" in obj:
            spans.append(obj)
        i = end
    return spans


def assert_noop(tel: Telemetry) -> None:
    assert isinstance(tel.tracer, trace.NoOpTracer)
    assert isinstance(tel.meter, metrics.NoOpMeter)
    span = tel.tracer.start_span("nothing")
    assert not span.is_recording()
    assert not span.get_span_context().is_valid
    span.end()
    # Instruments exist and accept measurements, at no cost.
    tel.operations.add(1, {"sweeperd.operation": "x.y", "sweeperd.status": "ok"})
    tel.operation_duration.record(0.1)
    assert tel._shutdown == []
    tel.shutdown()
    assert telemetry() is tel


# -- no-op -----------------------------------------------------------------------------------------


def test_default_telemetry_before_setup_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry_module, "_current", None)
    assert_noop(telemetry())


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "svc", "OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        },
        {"OTEL_TRACES_EXPORTER": " None ", "OTEL_METRICS_EXPORTER": ""},
    ],
    ids=["empty", "no-exporter", "empty-endpoint", "explicit-none", "none-spelling"],
)
def test_no_exporter_and_no_endpoint_means_noop(environ: dict[str, str]) -> None:
    assert_noop(setup_telemetry(environ=environ))


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_sdk_disabled_means_noop_even_with_exporters(value: str) -> None:
    tel = setup_telemetry(
        environ={
            "OTEL_SDK_DISABLED": value,
            "OTEL_TRACES_EXPORTER": "console,otlp",
            "OTEL_METRICS_EXPORTER": "console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            # Would be an error if anything were built:
            "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon",
        }
    )
    assert_noop(tel)


def test_tenant_metrics_flag_is_kept() -> None:
    assert setup_telemetry(environ={}, tenant_metrics=True).tenant_metrics is True
    assert setup_telemetry(environ={}).tenant_metrics is False


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, ["OTEL_TRACES_EXPORTER", "zipkin"]),
        ({"OTEL_TRACES_EXPORTER": "console,jaeger"}, ["OTEL_TRACES_EXPORTER", "jaeger"]),
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, ["OTEL_METRICS_EXPORTER", "prometheus"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            ["OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"],
        ),
    ],
    ids=["traces", "traces-list", "metrics", "protocol"],
)
def test_unsupported_values_are_telemetry_errors(
    environ: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(TelemetryError) as info:
        setup_telemetry(environ=environ)
    message = str(info.value)
    assert "\n" not in message
    for word in expected:
        assert word in message


@pytest.mark.skipif(HAVE_GRPC, reason="the gRPC exporter is installed here")
@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "GRPC",
        },
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
    ],
    ids=["exporter", "endpoint", "per-signal"],
)
def test_grpc_without_the_grpc_extra_names_it(environ: dict[str, str]) -> None:
    with pytest.raises(TelemetryError, match=r"sweeperd\[grpc\]"):
        setup_telemetry(environ=environ)


# -- real providers (in a subprocess) --------------------------------------------------------------

SPAN_SCRIPT = """
    import json, os, sys
    from opentelemetry import trace
    from sweeperd.telemetry import setup_telemetry
    environ = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
    tel = setup_telemetry(environ=environ)
    span = tel.tracer.start_span("probe-span", attributes={"probe": 1})
    recording = span.is_recording()
    span.end()
    provider = trace.get_tracer_provider()
    print(json.dumps({
        "tracer": type(tel.tracer).__module__ + "." + type(tel.tracer).__name__,
        "global_is_ours": getattr(tel.tracer, "resource", None) is getattr(provider, "resource", 0),
        "resource": dict(getattr(tel.tracer, "resource", None).attributes
                         if hasattr(tel.tracer, "resource") else {}),
        "recording": recording,
    }), flush=True)
    if os.environ.get("PROBE_SHUTDOWN", "1") == "1":
        tel.shutdown()
    sys.stderr.flush()
    os._exit(0)  # no atexit handlers: only shutdown() may flush
"""


def run_span_script(
    environ: Mapping[str, str] | None,
    *,
    shutdown: bool = True,
    os_environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], str]:
    args = [sys.executable, "-c", textwrap.dedent(SPAN_SCRIPT)]
    if environ is not None:
        args.append(json.dumps(dict(environ)))
    env = clean_environ(PROBE_SHUTDOWN="1" if shutdown else "0", **(os_environ or {}))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_console_exporter_prints_spans_on_stderr_and_shutdown_flushes() -> None:
    info, stderr = run_span_script({"OTEL_TRACES_EXPORTER": "console"})
    assert info["tracer"].startswith("opentelemetry.sdk.trace")
    assert info["global_is_ours"] is True
    assert info["recording"] is True
    spans = console_spans(stderr)
    assert [s["name"] for s in spans] == ["probe-span"]
    assert spans[0]["attributes"] == {"probe": 1}
    assert spans[0]["resource"]["attributes"]["service.name"] == "sweeperd"
    assert spans[0]["resource"]["attributes"]["service.version"]


def test_without_shutdown_nothing_is_flushed_at_exit() -> None:
    """The control for the test above: spans are batched, only shutdown() pushes them out."""
    _info, stderr = run_span_script({"OTEL_TRACES_EXPORTER": "console"}, shutdown=False)
    assert console_spans(stderr) == []


def test_service_name_and_resource_attributes_from_the_environment() -> None:
    info, stderr = run_span_script(
        None,
        os_environ={
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_SERVICE_NAME": "billing-sweeper",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging,team=dba",
        },
    )
    for attributes in (info["resource"], console_spans(stderr)[0]["resource"]["attributes"]):
        assert attributes["service.name"] == "billing-sweeper"
        assert attributes["deployment.environment.name"] == "staging"
        assert attributes["team"] == "dba"


def test_service_name_from_an_explicit_environ() -> None:
    info, _stderr = run_span_script(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "billing-sweeper"}
    )
    assert info["resource"]["service.name"] == "billing-sweeper"


def test_resource_attributes_from_an_explicit_environ() -> None:
    info, _stderr = run_span_script(
        {
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging,team=dba",
        }
    )
    assert info["resource"].get("team") == "dba"
    assert info["resource"].get("deployment.environment.name") == "staging"


def test_sampler_always_off_exports_nothing() -> None:
    info, stderr = run_span_script(
        None, os_environ={"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"}
    )
    assert info["recording"] is False
    assert console_spans(stderr) == []


def test_sampler_always_off_from_an_explicit_environ() -> None:
    info, stderr = run_span_script(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"}
    )
    assert info["recording"] is False
    assert console_spans(stderr) == []


def test_metrics_console_exporter_flushes_on_shutdown() -> None:
    proc = run_python("""
        import os
        from sweeperd.telemetry import setup_telemetry
        tel = setup_telemetry(environ={"OTEL_METRICS_EXPORTER": "console"})
        tel.operations.add(3, {"sweeperd.operation": "retention.x", "sweeperd.status": "ok"})
        tel.sweep_duration.record(1.5, {"sweeperd.sweep": "nightly"})
        tel.shutdown()
        os._exit(0)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "sweeperd.operations" in proc.stderr
    assert "sweeperd.sweep.duration" in proc.stderr
    assert "retention.x" in proc.stderr


# -- OTLP over HTTP --------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def test_otlp_http_export_with_endpoint_and_headers(receiver: OtlpReceiver) -> None:
    """An endpoint alone selects OTLP/HTTP; headers from OTEL_EXPORTER_OTLP_HEADERS are sent."""
    info, stderr = run_span_script(
        None,
        os_environ={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=abc123",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "billing-sweeper",
        },
    )
    assert info["recording"] is True, stderr
    traces = [(h, b) for p, h, b in receiver.requests if p == "/v1/traces"]
    assert len(traces) == 1, [p for p, _h, _b in receiver.requests]
    headers, body = traces[0]
    assert headers["x-api-key"] == "abc123"
    assert headers["content-type"] == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    (rs,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "billing-sweeper"
    names = [span.name for ss in rs.scope_spans for span in ss.spans]
    assert names == ["probe-span"]
    assert [ss.scope.name for ss in rs.scope_spans] == ["sweeperd"]


def test_otlp_metrics_go_to_v1_metrics(receiver: OtlpReceiver) -> None:
    proc = run_python(
        """
        import os
        from sweeperd.telemetry import setup_telemetry
        tel = setup_telemetry()
        tel.operations.add(1, {"sweeperd.operation": "retention.x", "sweeperd.status": "ok"})
        tel.shutdown()
        os._exit(0)
    """,
        env=clean_environ(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_TRACES_EXPORTER="none"
        ),
    )
    assert proc.returncode == 0, proc.stderr
    paths = [p for p, _h, _b in receiver.requests]
    assert paths == ["/v1/metrics"]
    assert b"sweeperd.operations" in receiver.requests[0][2]


# -- pool usage ------------------------------------------------------------------------------------


def test_pool_usage_is_observed_from_the_watched_source() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    tel = Telemetry(trace.NoOpTracer(), provider.get_meter("sweeperd"))
    stats = {
        "main": {"pool_size": 4, "pool_available": 1, "requests_waiting": 2},
        "reports": {"pool_size": 2, "pool_available": 2},
    }
    tel.watch_pools(lambda: stats)
    data = reader.get_metrics_data()
    points: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points[metric.name] = [
                    (dict(p.attributes), p.value) for p in metric.data.data_points
                ]
    provider.shutdown()
    pool = "db.client.connection.pool.name"
    state = "db.client.connection.state"
    assert sorted(points["db.client.connection.count"], key=repr) == sorted(
        [
            ({pool: "main", state: "idle"}, 1),
            ({pool: "main", state: "used"}, 3),
            ({pool: "reports", state: "idle"}, 2),
            ({pool: "reports", state: "used"}, 0),
        ],
        key=repr,
    )
    assert sorted(points["db.client.connection.pending_requests"], key=repr) == sorted(
        [({pool: "main"}, 2), ({pool: "reports"}, 0)], key=repr
    )


# -- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        """
        [databases.main]
        dsn = "host=/nonexistent dbname=x connect_timeout=1"

        [[tenants]]
        name = "a"
        database = "main"
        schema = "tenant_a"

        [sweeps.nightly]
        interval = "1h"
        operations = ["vacuum.*"]

        [plugins.vacuum]
        tables = ["notifications"]
    """,
    )


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (["sweep", "--json"], {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (["sweep"], {"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER"),
        (["run"], {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        pytest.param(
            ["sweep"],
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            "sweeperd[grpc]",
            marks=pytest.mark.skipif(HAVE_GRPC, reason="gRPC exporter installed"),
        ),
    ],
    ids=["sweep-traces", "sweep-metrics", "run-traces", "sweep-grpc"],
)
def test_cli_bad_otel_variable_exits_2_with_one_line(
    config_path: Path, command: list[str], env: dict[str, str], expected: str
) -> None:
    proc = run_cli(*command[:1], "-c", str(config_path), *command[1:], env=env, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sweeperd: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
