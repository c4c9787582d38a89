"""The trace of one sweep: ``sweep <name>`` → one span per tenant → one span per operation.

Operation spans follow the stable database semantic conventions (kind CLIENT,
``db.system.name``, ``db.namespace``, ``db.collection.name``, ``db.operation.name``,
``server.address``/``server.port``, ``db.response.status_code``, ``error.type``); sweeperd's own
attributes are prefixed ``sweeperd.``. Database-scope operations hang off the sweep span. A
cancelled operation is marked explicitly (the SDK would leave it UNSET, which reads as success).
Metrics are recorded here too, so the runner calls one object per item.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from .model import ALL_TABLES, Result
from .telemetry import Telemetry

METRICS_FLUSH_S = 5.0

if TYPE_CHECKING:
    from .db import Database
    from .planner import Plan, WorkItem


class SweepTrace:
    def __init__(self, telemetry: Telemetry, plan: Plan) -> None:
        self.t = telemetry
        self.plan = plan
        self.span = telemetry.tracer.start_span(
            f"sweep {plan.sweep}",
            kind=SpanKind.INTERNAL,
            attributes={"sweeperd.sweep": plan.sweep, "sweeperd.items": len(plan.items)},
        )
        self.context = trace.set_span_in_context(self.span)
        self.recording = self.span.is_recording()
        self._remaining = Counter(_tenant_key(item) for item in plan.items if item.tenant)
        self._tenant_spans: dict[tuple[str, str], tuple[Span, otel_context.Context]] = {}
        self._tenant_failed: Counter[tuple[str, str]] = Counter()
        self._counts: Counter[tuple[str, str, tuple[str, str] | None]] = Counter()
        self._rows: Counter[str] = Counter()
        self._dead: Counter[str] = Counter()
        self._flushed_at = time.monotonic()

    def parent(self, item: WorkItem) -> otel_context.Context:
        """The context an item's span starts in: its tenant's span (started on first use)."""
        if item.tenant is None:
            return self.context
        key = _tenant_key(item)
        entry = self._tenant_spans.get(key)
        if entry is None:
            span = self.t.tracer.start_span(
                f"tenant {item.tenant.name}",
                context=self.context,
                kind=SpanKind.INTERNAL,
                attributes={
                    "sweeperd.tenant": item.tenant.name,
                    "sweeperd.schema": item.tenant.schema,
                    "sweeperd.database": item.database,
                },
            )
            entry = self._tenant_spans[key] = (span, trace.set_span_in_context(span))
        return entry[1]

    def start(self, item: WorkItem, database: Database) -> Span:
        if not self.recording:
            return INVALID_SPAN  # tracing off: no attributes to build, nothing to end
        op = item.operation
        schema = item.schema
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",  # at creation: samplers may look at it
            # The real database name (the config key is only sweeperd's alias for it).
            "db.namespace": f"{database.dbname or item.database}|{schema}"
            if schema
            else (database.dbname or item.database),
            "sweeperd.operation": op.name,
            "sweeperd.plugin": op.plugin,
            "sweeperd.scope": op.scope,
        }
        if item.tenant is not None:
            attributes["sweeperd.tenant"] = item.tenant.name
        if database.server_address:
            attributes["server.address"] = database.server_address
        if database.server_port:
            attributes["server.port"] = database.server_port
        collection = _collection(item)
        if collection:
            attributes["db.collection.name"] = collection
        if op.db_operation:
            attributes["db.operation.name"] = op.db_operation
        name = f"{op.db_operation} {collection}" if op.db_operation and collection else op.name
        return self.t.tracer.start_span(
            name, context=self.parent(item), kind=SpanKind.CLIENT, attributes=attributes
        )

    def finish(self, item: WorkItem, span: Span | None, result: Result) -> None:
        """End the item's span (if it started one) and record its metrics."""
        if not self.recording:
            self._record(item, result)
            return
        if span is None:
            # Never started (vetoed, dry run of an unsafe op, cancelled early): a short span
            # still makes the skip or cancel visible in the trace.
            span = self.t.tracer.start_span(
                item.operation.name,
                context=self.parent(item),
                kind=SpanKind.INTERNAL,
                attributes={"sweeperd.operation": item.operation.name},
            )
        _annotate(span, result)
        span.end()
        self._record(item, result)
        if item.tenant is not None:
            key = _tenant_key(item)
            if result.status in ("failed", "cancelled"):
                self._tenant_failed[key] += 1
            self._remaining[key] -= 1
            if self._remaining[key] <= 0:
                self._end_tenant(key)

    def _end_tenant(self, key: tuple[str, str]) -> None:
        entry = self._tenant_spans.pop(key, None)
        if entry is None:
            return
        span = entry[0]
        failed = self._tenant_failed.get(key, 0)
        span.set_attribute("sweeperd.failed", failed)
        if failed:
            span.set_status(Status(StatusCode.ERROR, f"{failed} operation(s) failed or cancelled"))
        span.end()

    def close(self, counts: Mapping[str, int], duration_s: float) -> None:
        self._flush()
        for key in list(self._tenant_spans):
            self._end_tenant(key)
        for status, n in counts.items():
            self.span.set_attribute(f"sweeperd.{status.replace('-', '_')}", n)
        if counts.get("failed") or counts.get("cancelled"):
            self.span.set_status(Status(StatusCode.ERROR, "operations failed or were cancelled"))
        self.span.end()
        outcome = "failed" if counts.get("failed") or counts.get("cancelled") else "ok"
        self.t.sweep_duration.record(
            duration_s, {"sweeperd.sweep": self.plan.sweep, "sweeperd.outcome": outcome}
        )

    def _record(self, item: WorkItem, result: Result) -> None:
        # Counters are summed here and added in bulk (every few seconds and at the end): one
        # SDK call per (operation, status) instead of one per item. Durations stay per item.
        # A tenant is (database, name): "acme" in two databases is two series.
        tenant = (
            (result.database, result.tenant)
            if self.t.tenant_metrics and result.tenant is not None
            else None
        )
        key = (result.operation, result.status, tenant)
        self._counts[key] += 1
        if result.duration_s is not None:
            self.t.operation_duration.record(result.duration_s, _attrs(key))
        if result.status == "ok":
            if result.rows:
                self._rows[result.operation] += result.rows
            removed = _dead_tuples_removed(result)
            if removed:
                self._dead[result.operation] += removed
        now = time.monotonic()
        if now - self._flushed_at >= METRICS_FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        for key, n in self._counts.items():
            self.t.operations.add(n, _attrs(key))
        for operation, rows in self._rows.items():
            self.t.rows.add(rows, {"sweeperd.operation": operation})
        for operation, removed in self._dead.items():
            self.t.dead_tuples.add(removed, {"sweeperd.operation": operation})
        self._counts.clear()
        self._rows.clear()
        self._dead.clear()


def _attrs(key: tuple[str, str, tuple[str, str] | None]) -> dict[str, Any]:
    operation, status, tenant = key
    attrs: dict[str, Any] = {"sweeperd.operation": operation, "sweeperd.status": status}
    if tenant is not None:
        attrs["sweeperd.database"], attrs["sweeperd.tenant"] = tenant
    return attrs


def _tenant_key(item: WorkItem) -> tuple[str, str]:
    assert item.tenant is not None
    return item.database, item.tenant.name


def _collection(item: WorkItem) -> str | None:
    tables = [t for t in item.tables if t != ALL_TABLES]
    if len(tables) != 1:
        return None
    return f"{item.schema}.{tables[0]}" if item.schema else tables[0]


def _dead_tuples_removed(result: Result) -> int:
    before = result.details.get("dead_tuples_before")
    after = result.details.get("dead_tuples_after")
    if isinstance(before, int) and isinstance(after, int):
        return max(0, before - after)
    return 0


def _annotate(span: Span, result: Result) -> None:
    span.set_attribute("sweeperd.status", result.status)
    if result.rows is not None:
        span.set_attribute("sweeperd.rows", result.rows)
    for key, value in result.details.items():
        if isinstance(value, bool | int | float | str):
            span.set_attribute(f"sweeperd.{key}", value)
    if result.status == "failed":
        if result.sqlstate:
            span.set_attribute("db.response.status_code", result.sqlstate)
        span.set_attribute("error.type", result.sqlstate or result.error_type or "_OTHER")
        span.set_status(Status(StatusCode.ERROR, result.error or "failed"))
    elif result.status == "cancelled":
        span.set_attribute("error.type", "cancelled")
        span.set_attribute("sweeperd.cancel_reason", result.error or "cancelled")
        span.set_status(Status(StatusCode.ERROR, f"cancelled: {result.error or ''}".strip()))
    elif result.status == "skipped":
        span.set_attribute("sweeperd.skip_reason", result.error or "")
    else:
        span.set_status(Status(StatusCode.OK))
