"""A small OTLP/HTTP collector for the tests (import as ``from otlp import OtlpReceiver``).

The receiver keeps every POST as ``(path, headers, body)``: header names in lowercase, gzip bodies
already decompressed. :meth:`OtlpReceiver.spans` and :meth:`OtlpReceiver.spans_by_id` decode the
exported traces (``/v1/traces``) for the tests that check spans.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan


def pb_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (None when it holds nothing)."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def pb_attrs(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP attributes (``KeyValue`` messages) as a dict."""
    return {kv.key: pb_value(kv.value) for kv in kvs}


class OtlpReceiver:
    """A minimal OTLP/HTTP collector on 127.0.0.1: keeps every POST (path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[tuple[dict[str, Any], PbSpan]]:
        """Every exported span with its resource's attributes."""
        out: list[tuple[dict[str, Any], PbSpan]] = []
        for path, _headers, body in self.requests:
            if path != "/v1/traces":
                continue
            request = ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                resource = pb_attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    out.extend((resource, span) for span in ss.spans)
        return out

    def spans_by_id(self) -> dict[str, dict[str, Any]]:
        """span_id (hex) → name, trace_id and parent (hex), attributes."""
        return {
            span.span_id.hex(): {
                "name": span.name,
                "trace_id": span.trace_id.hex(),
                "parent": span.parent_span_id.hex(),
                "attributes": pb_attrs(span.attributes),
            }
            for _resource, span in self.spans()
        }
