"""OpenTelemetry: traces and metrics, configured by the standard ``OTEL_*`` variables.

Honoured: ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``none``; comma lists),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` in the default install, ``grpc`` with
``sweeperd[grpc]``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``_HEADERS`` (and their ``_TRACES_`` /
``_METRICS_`` forms, read by the exporters), ``OTEL_TRACES_SAMPLER[_ARG]``,
``OTEL_METRIC_EXPORT_INTERVAL``.

One deliberate difference from the SDK's auto-configuration: with neither an exporter variable
nor an OTLP endpoint set, nothing is exported and the no-op API is used, so an unconfigured
sweeperd neither pays for tracing nor logs connection errors to a collector that is not there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from . import __version__

log = structlog.get_logger("sweeperd.telemetry")

SCOPE = "sweeperd"


class TelemetryError(Exception):
    """An OTEL_* variable asks for something this installation cannot do."""


@dataclass
class Telemetry:
    tracer: trace.Tracer
    meter: metrics.Meter
    tenant_metrics: bool = False
    _shutdown: list[Callable[[], Any]] = field(default_factory=list)
    _pool_sources: list[Callable[[], Mapping[str, Mapping[str, int]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        m = self.meter
        self.operations = m.create_counter(
            "sweeperd.operations", unit="{operation}", description="Operations by final status"
        )
        self.rows = m.create_counter(
            "sweeperd.rows", unit="{row}", description="Rows affected (e.g. deleted) by operations"
        )
        self.dead_tuples = m.create_counter(
            "sweeperd.dead_tuples.removed",
            unit="{tuple}",
            description="Dead tuples removed by VACUUM operations",
        )
        self.throttled = m.create_counter(
            "sweeperd.throttled",
            unit="s",
            description="Seconds operations waited for a throttled or paused database, by "
            "database and reason (the sum of the results' details.throttled_s)",
        )
        self.operation_duration = m.create_histogram(
            "sweeperd.operation.duration", unit="s", description="Duration of operations"
        )
        self.sweep_duration = m.create_histogram(
            "sweeperd.sweep.duration", unit="s", description="Duration of sweeps"
        )
        self.connection_wait = m.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="Time to obtain a pooled connection (after the bounds were acquired)",
        )
        m.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_connections],
            unit="{connection}",
            description="Pooled connections by state (idle, used)",
        )
        m.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_waiting],
            unit="{request}",
            description="Requests waiting for a pooled connection",
        )

    def watch_pools(self, source: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Report pool usage from ``source()``: database name → Pool.stats()."""
        self._pool_sources = [source]

    def _pool_stats(self) -> Iterable[tuple[str, Mapping[str, int]]]:
        for source in self._pool_sources:
            yield from source().items()

    def _observe_connections(self, _options: CallbackOptions) -> Iterable[Observation]:
        for name, stats in self._pool_stats():
            size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
            attrs = {"db.client.connection.pool.name": name}
            yield Observation(idle, {**attrs, "db.client.connection.state": "idle"})
            yield Observation(size - idle, {**attrs, "db.client.connection.state": "used"})

    def _observe_waiting(self, _options: CallbackOptions) -> Iterable[Observation]:
        for name, stats in self._pool_stats():
            yield Observation(
                stats.get("requests_waiting", 0), {"db.client.connection.pool.name": name}
            )

    def shutdown(self) -> None:
        """Flush and stop exporters (SIGTERM does not run atexit handlers: call this)."""
        for stop in self._shutdown:
            try:
                stop()
            except Exception as exc:  # a dead collector must not turn a clean stop into a crash
                log.warning("telemetry shutdown failed", error=str(exc))
        self._shutdown.clear()


_current: Telemetry | None = None


def telemetry() -> Telemetry:
    """The process's telemetry (no-op until :func:`setup_telemetry` ran)."""
    global _current
    if _current is None:
        _current = Telemetry(trace.NoOpTracer(), metrics.NoOpMeter(SCOPE))
    return _current


def setup_telemetry(
    environ: Mapping[str, str] | None = None, *, tenant_metrics: bool = False
) -> Telemetry:
    """Build providers from the environment and make them this process's (and global) ones."""
    global _current
    env = os.environ if environ is None else environ
    tracer: trace.Tracer = trace.NoOpTracer()
    meter: metrics.Meter = metrics.NoOpMeter(SCOPE)
    stops: list[Callable[[], Any]] = []
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true":
        from opentelemetry.sdk.resources import Resource

        # Read from ``env`` (not only os.environ, which the SDK's detectors use) with the
        # spec's precedence: OTEL_SERVICE_NAME, then service.name in OTEL_RESOURCE_ATTRIBUTES.
        attributes: dict[str, Any] = {"service.version": __version__}
        attributes.update(
            _key_values(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES")
        )
        attributes["service.name"] = (
            env.get("OTEL_SERVICE_NAME") or attributes.get("service.name") or "sweeperd"
        )
        resource = Resource.create(attributes)
        span_exporters = _exporters(env, "TRACES")
        if span_exporters:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider = TracerProvider(
                resource=resource, sampler=_sampler(env), shutdown_on_exit=False
            )
            for exporter in span_exporters:
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(tracer_provider)
            tracer = tracer_provider.get_tracer(SCOPE, __version__)
            stops.append(tracer_provider.shutdown)
        metric_exporters = _exporters(env, "METRICS")
        if metric_exporters:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers = [PeriodicExportingMetricReader(e) for e in metric_exporters]
            meter_provider = MeterProvider(
                resource=resource,
                metric_readers=readers,
                shutdown_on_exit=False,
                exemplar_filter=_exemplar_filter(env),
            )
            metrics.set_meter_provider(meter_provider)
            meter = meter_provider.get_meter(SCOPE, __version__)
            stops.append(meter_provider.shutdown)
    _current = Telemetry(tracer, meter, tenant_metrics=tenant_metrics, _shutdown=stops)
    return _current


def _exemplar_filter(env: Mapping[str, str]) -> Any:
    """OTEL_METRICS_EXEMPLAR_FILTER, but off unless asked for.

    The SDK's default (trace_based) samples an exemplar on every measurement made inside a
    sampled span: that is most of what a histogram record costs, paid per operation.
    """
    from opentelemetry.sdk.metrics import (
        AlwaysOffExemplarFilter,
        AlwaysOnExemplarFilter,
        TraceBasedExemplarFilter,
    )

    name = env.get("OTEL_METRICS_EXEMPLAR_FILTER", "always_off").strip().lower()
    filters: dict[str, Callable[[], Any]] = {
        "always_off": AlwaysOffExemplarFilter,
        "always_on": AlwaysOnExemplarFilter,
        "trace_based": TraceBasedExemplarFilter,
    }
    if name not in filters:
        raise TelemetryError(
            f"OTEL_METRICS_EXEMPLAR_FILTER: unsupported filter {name!r} "
            "(expected always_off, always_on or trace_based)"
        )
    return filters[name]()


def _key_values(text: str, variable: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (the OTEL_* list format)."""
    from urllib.parse import unquote

    out = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TelemetryError(f"{variable}: expected key=value pairs, got {item!r}")
        out[key.strip()] = unquote(value.strip())
    return out


def _sampler(env: Mapping[str, str]) -> Any:
    """OTEL_TRACES_SAMPLER / _ARG, read from ``env``."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise TelemetryError(f"OTEL_TRACES_SAMPLER_ARG: expected a number, got {arg!r}") from None
    samplers: dict[str, Callable[[], Any]] = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise TelemetryError(
            f"OTEL_TRACES_SAMPLER: unsupported sampler {name!r} "
            f"(expected one of {', '.join(samplers)})"
        )
    return samplers[name]()


def _otlp_http_settings(env: Mapping[str, str], signal: str) -> dict[str, Any]:
    """Endpoint and headers for the HTTP exporter, from ``env`` (the rest it reads itself)."""
    path = "/v1/traces" if signal == "TRACES" else "/v1/metrics"
    settings: dict[str, Any] = {}
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if specific:
        settings["endpoint"] = specific
    elif general:
        settings["endpoint"] = general.rstrip("/") + path
    headers = env.get(f"OTEL_EXPORTER_OTLP_{signal}_HEADERS") or env.get(
        "OTEL_EXPORTER_OTLP_HEADERS"
    )
    if headers:
        settings["headers"] = _key_values(headers, "OTEL_EXPORTER_OTLP_HEADERS")
    return settings


def _exporters(env: Mapping[str, str], signal: str) -> list[Any]:
    names = env.get(f"OTEL_{signal}_EXPORTER")
    if names is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    out = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            out.append(_console(signal))
        elif name == "otlp":
            out.append(_otlp(env, signal))
        else:
            raise TelemetryError(
                f"OTEL_{signal}_EXPORTER: unsupported exporter {name!r} "
                "(expected otlp, console or none)"
            )
    return out


def _console(signal: str) -> Any:
    if signal == "TRACES":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout is for reports (sweep --json)
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    return ConsoleMetricExporter(out=sys.stderr)


def _otlp(env: Mapping[str, str], signal: str) -> Any:
    protocol = (
        (
            env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        .strip()
        .lower()
    )
    if protocol == "grpc":
        try:
            if signal == "TRACES":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter as GrpcSpanExporter,
                )

                return GrpcSpanExporter()
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            return GrpcMetricExporter()
        except ImportError:
            raise TelemetryError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: "
                "pip install 'sweeperd[grpc]'"
            ) from None
    if protocol != "http/protobuf":
        raise TelemetryError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} "
            "(expected http/protobuf or grpc)"
        )
    settings = _otlp_http_settings(env, signal)
    if signal == "TRACES":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**settings)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(**settings)
