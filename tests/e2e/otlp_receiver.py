"""An OTLP trace receiver for tests: the real protocol on both transports, on loopback.

* OTLP/gRPC: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (the generated stubs of
  the ``opentelemetry-proto`` package), what Envoy's OpenTelemetry tracer and our
  ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` exporter send;
* OTLP/HTTP: ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` body (gzip or not),
  what our ``http/protobuf`` exporter sends.

Every span received is kept (with the ``service.name`` of its resource and the transport it came
by); tests wait for the spans they expect with ``wait_for_spans`` (bounded polling, never sleeps).
"""

from __future__ import annotations

import gzip
import threading
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .harness import wait_for


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    transport: str  # "grpc" or "http"
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 SERVER, 3 CLIENT
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    trace_state: str = ""  # the W3C tracestate exported with the span
    links: tuple[tuple[str, str, str], ...] = ()  # (trace id, span id, tracestate) of each link


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


class OtlpReceiver:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    # --- what was received -------------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for_spans(self, predicate: Callable[[ReceivedSpan], bool], count: int, what: str,
                       timeout: float = 20) -> list[ReceivedSpan]:
        """The first ``count`` received spans matching ``predicate``, once that many arrived."""
        def matching() -> list[ReceivedSpan] | None:
            found = [s for s in self.spans() if predicate(s)]
            return found[:count] if len(found) >= count else None

        return wait_for(matching, timeout, what)

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = next((_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service, transport, span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(), {a.key: _value(a.value) for a in span.attributes},
                        span.status.code, span.status.message, span.trace_state,
                        tuple((link.trace_id.hex(), link.span_id.hex(), link.trace_state) for link in span.links)))
        with self._lock:
            self._spans.extend(received)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                receiver._receive(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

        class Traces(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's method name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._receive(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Traces)
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
