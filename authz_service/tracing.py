"""OpenTelemetry tracing (the optional ``tracing`` extra), configured only by the standard OTEL_*
environment variables, and off unless they ask for it (docs/tracing.md).

Why this shape:

* Off means free. ``tracing_settings`` reads the environment without importing OpenTelemetry; when
  it returns None nothing else here is used: the front doors keep the untraced Check path, and
  the JWKS cache and the policy reloader get ``NO_TRACING`` (no-op spans, never per Check).
* On, a Check is one SERVER span (``check.TracedChecker``) continuing the trace Envoy propagated
  (W3C ``traceparent``/``tracestate``, B3 through ``OTEL_PROPAGATORS``); an unknown-kid JWKS
  re-fetch inside a Check is its child; background JWKS refreshes and policy reloads are root
  spans of their own. A sampled Check's trace id becomes the exemplar of its latency observation.
* A trace context is read from text an attacker may write, so reading it is bounded: only the
  headers the configured propagators use, each up to a W3C/B3 size (``FIELD_LIMITS``), the rest
  dropped unread; W3C baggage is never read (nothing here uses it, and OpenTelemetry's parser is
  quadratic in the members); OpenTelemetry's parse warnings, which quote the header, are silenced.
* Only Envoy's context decides sampling. A context from the client's own headers (gRPC mode,
  Envoy not tracing) starts a trace of the service's own, linked to the client's span, unless
  ``--trace-client-context continue`` says the clients are trusted.
* Span attributes are a closed list (``record_check``): decision, reason, route, status, method,
  client_id. Never the token, the path, the query string or any header value.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import install_hint
from .urls import shown

if TYPE_CHECKING:
    from .decision import Decision
    from .metrics import PerCheck
    from .request import HttpRequest

log = logging.getLogger(__name__)

EXTRA = f"{install_hint('tracing')} (the image includes it)"
DEFAULT_SERVICE_NAME = "authz-service"
PROTOCOLS = ("grpc", "http/protobuf")
# The OpenTelemetry specification's default. The OTLP/gRPC port is 4317, OTLP/HTTP's 4318.
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318/v1/traces"}
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
PROPAGATORS = ("tracecontext", "baggage", "b3", "b3multi", "none")
DEFAULT_PROPAGATORS = "tracecontext"
# Accepted in OTEL_PROPAGATORS (the SDK's own default names it) but never read: no span records
# baggage and no Check calls anything it would travel on.
IGNORED_PROPAGATORS = ("baggage", "none")
CLIENT_CONTEXTS = ("link", "continue")
# The most of each trace-context header that is read: longer is not what a conforming tracer
# sends, and is dropped unread. W3C Trace Context: a version-00 traceparent is 55 characters;
# tracestate has at most 32 members, and 512 characters is what every vendor must propagate.
# B3: ids of 16 or 32 hex digits, a sampling state of one character ("d", "0", "1"; old
# clients send "true"/"false").
FIELD_LIMITS = {
    "traceparent": 128,
    "tracestate": 512,
    "b3": 128,
    "x-b3-traceid": 32,
    "x-b3-spanid": 16,
    "x-b3-sampled": 5,
    "x-b3-flags": 1,
}
_B3_FIELDS = ("b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags")
# The headers each propagator reads (both B3 formats read both encodings).
PROPAGATOR_FIELDS = {"tracecontext": ("traceparent", "tracestate"), "b3": _B3_FIELDS, "b3multi": _B3_FIELDS}
MAX_TRACESTATE_MEMBERS = 32
# OpenTelemetry's loggers whose warnings about a malformed trace context quote the header.
_QUOTING_LOGGERS = (
    "opentelemetry.trace.span",
    "opentelemetry.trace.propagation",
    "opentelemetry.propagators",
    "opentelemetry.baggage",
)
SHUTDOWN_FLUSH_SECONDS = 3.0  # spans still queued at shutdown get this long to export


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """What the OTEL_* variables ask for (the SDK and exporters read the rest themselves)."""

    protocol: str  # grpc or http/protobuf
    endpoint: str  # where spans go, without credentials or query: for the start-up log
    sampler: str
    sampler_arg: str | None
    propagators: tuple[str, ...]  # the ones in force: never baggage
    service_name: str
    version_in_environment: bool  # OTEL_RESOURCE_ATTRIBUTES names service.version
    enabled_by: str  # the variable that turned tracing on
    client_context: str = "link"  # --trace-client-context: link (default) or continue

    def describe(self) -> dict[str, object]:
        """The start-up log's view (never OTEL_EXPORTER_OTLP_HEADERS: it may carry API keys)."""
        sampler = f"{self.sampler}:{self.sampler_arg}" if self.sampler in RATIO_SAMPLERS else self.sampler
        return {
            "exporter": "otlp",
            "protocol": self.protocol,
            "endpoint": self.endpoint,
            "sampler": sampler,
            "propagators": ",".join(self.propagators) or "none",
            "client_context": self.client_context,
            "service_name": self.service_name,
        }


def describe(settings: TracingSettings | None) -> str | dict[str, object]:
    """The start-up log's ``tracing`` field: "off", or where spans go."""
    return settings.describe() if settings is not None else "off"


class TracingSettingsError(ValueError):
    """OTEL_* variables that cannot be used; the message names the variable and the fix
    (config.settings_from reports it as the service's ConfigError)."""


def _get(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def tracing_settings(environ: Mapping[str, str], client_context: str = "link") -> TracingSettings | None:
    """None when tracing is off; TracingSettingsError (naming the variable and the fix) when the variables
    cannot be used, or ask for tracing while the tracing extra is not installed.
    ``client_context``: what a Check does with a client's own trace context (--trace-client-context).

    On when OTEL_TRACES_EXPORTER names otlp or an OTLP endpoint variable is set; off when neither,
    when OTEL_TRACES_EXPORTER=none, or when OTEL_SDK_DISABLED=true.
    """
    if _get(environ, "OTEL_SDK_DISABLED").lower() == "true":
        return None
    exporters = [e.strip().lower() for e in _get(environ, "OTEL_TRACES_EXPORTER").split(",") if e.strip()]
    endpoint_var = next(
        (v for v in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") if _get(environ, v)), None
    )
    if exporters == ["none"] or (not exporters and endpoint_var is None):
        return None
    if exporters and exporters != ["otlp"]:
        raise TracingSettingsError(
            f"OTEL_TRACES_EXPORTER={_get(environ, 'OTEL_TRACES_EXPORTER')!r} is not supported: "
            "use otlp (or none to turn tracing off)"
        )
    enabled_by = "OTEL_TRACES_EXPORTER" if exporters else str(endpoint_var)

    protocol_var = next(
        (v for v in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if _get(environ, v)), None
    )
    protocol = _get(environ, protocol_var).lower() if protocol_var else DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise TracingSettingsError(
            f"{protocol_var}={_get(environ, str(protocol_var))!r} is not supported: use grpc "
            "(OTLP/gRPC, port 4317) or http/protobuf (OTLP/HTTP, port 4318)"
        )

    sampler = (_get(environ, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    if sampler not in SAMPLERS:
        raise TracingSettingsError(
            f"OTEL_TRACES_SAMPLER={sampler!r} is not supported: use one of {', '.join(SAMPLERS)}"
        )
    sampler_arg = None
    if sampler in RATIO_SAMPLERS:
        sampler_arg = _get(environ, "OTEL_TRACES_SAMPLER_ARG") or "1.0"
        try:
            ratio = float(sampler_arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingSettingsError(
                f"OTEL_TRACES_SAMPLER_ARG={sampler_arg!r} is invalid for {sampler}: a ratio 0.0..1.0, e.g. 0.01 for 1%"
            )

    propagators = tuple(
        p.strip().lower() for p in (_get(environ, "OTEL_PROPAGATORS") or DEFAULT_PROPAGATORS).split(",") if p.strip()
    )
    unknown = [p for p in propagators if p not in PROPAGATORS]
    if unknown:
        raise TracingSettingsError(
            f"OTEL_PROPAGATORS names {', '.join(map(repr, unknown))}, which is not supported: use "
            f"{', '.join(PROPAGATORS[:-1])} (comma-separated) or none"
        )

    modules = [
        "opentelemetry.sdk.trace",
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
        if protocol == "grpc"
        else "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    ]
    if {"b3", "b3multi"} & set(propagators):
        modules.append("opentelemetry.propagators.b3")
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise TracingSettingsError(
            f"tracing is configured ({enabled_by} is set) but the tracing extra is not installed "
            f"(no {missing[0]}): {EXTRA}, or unset {enabled_by}"
        )

    return TracingSettings(
        protocol=protocol,
        endpoint=_endpoint(environ, protocol),
        sampler=sampler,
        sampler_arg=sampler_arg,
        propagators=tuple(p for p in propagators if p not in IGNORED_PROPAGATORS),
        service_name=_service_name(environ),
        version_in_environment="service.version" in _resource_attributes(environ),
        enabled_by=enabled_by,
        client_context=client_context,
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _endpoint(environ: Mapping[str, str], protocol: str) -> str:
    """Where the exporter sends spans, as the exporters resolve it, for the log: without userinfo,
    query or fragment (an endpoint may embed credentials)."""
    url = _get(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not url:
        base = _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if not base:
            return DEFAULT_ENDPOINTS[protocol]
        url = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
    return shown(url)


def _service_name(environ: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, else authz-service."""
    return (
        _get(environ, "OTEL_SERVICE_NAME") or _resource_attributes(environ).get("service.name") or DEFAULT_SERVICE_NAME
    )


def _resource_attributes(environ: Mapping[str, str]) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES (key=value,... with percent-encoded values) as the SDK reads it."""
    attributes = {}
    for pair in _get(environ, "OTEL_RESOURCE_ATTRIBUTES").split(","):
        key, _, value = pair.partition("=")
        if key.strip() and value.strip():
            attributes[key.strip()] = urllib.parse.unquote(value.strip())
    return attributes


@dataclass(frozen=True, slots=True)
class CheckSpanKind:
    """How a front door's Check spans are named (OpenTelemetry semantic conventions); each door
    defines its own (doors.grpc.SPAN_KIND, doors.http.SPAN_KIND)."""

    name: str
    attributes: Mapping[str, str]
    http_server: bool  # named "{method} {http.route}" once the request and route are known


# The kind of the Check span current in this task (Checks of every front door interleave).
_CHECK_KIND: ContextVar[CheckSpanKind | None] = ContextVar("authz_check_span_kind", default=None)


class Recorder:
    """What a JWKS fetch or policy reload may record on its span (a no-op when tracing is off)."""

    def set(self, key: str, value: str | int) -> None:
        pass

    def error(self, description: str) -> None:
        pass


class _SpanRecorder(Recorder):
    def __init__(self, span: Any, error: Any) -> None:
        self._span = span
        self._error = error  # description -> the span's error Status

    def set(self, key: str, value: str | int) -> None:
        self._span.set_attribute(key, value)

    def error(self, description: str) -> None:
        self._span.set_status(self._error(description))


class NoTracing:
    """Tracing off: spans that record nothing (for the JWKS cache and reloader, never per Check)."""

    enabled = False

    @contextmanager
    def root(self, name: str, **attributes: str | int) -> Iterator[Recorder]:
        yield Recorder()

    @contextmanager
    def child(self, name: str, **attributes: str | int) -> Iterator[Recorder]:
        yield Recorder()


NO_TRACING = NoTracing()


class Tracing(NoTracing):
    """The OpenTelemetry SDK set up from ``TracingSettings``: a tracer provider with a batching OTLP
    exporter (its own thread: Checks only enqueue finished spans) and the configured propagators."""

    enabled = True

    def __init__(self, settings: TracingSettings, version: str, exporter: Any = None) -> None:
        """``exporter``: where spans go instead of OTLP, exported as each span ends (tests)."""
        from opentelemetry import context, trace
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

        if settings.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]

        self.settings = settings
        # OTEL_RESOURCE_ATTRIBUTES and the detectors first; then our service.name (already resolved
        # from the variables) and, unless the variables name one, our service.version.
        attributes = {"service.name": settings.service_name}
        if not settings.version_in_environment:
            attributes["service.version"] = version
        resource = Resource.create(attributes)
        # shutdown_on_exit=False: ``close`` flushes with a bound; the SDK's exit hook would wait up
        # to 30 s for a collector that is down.
        self._provider = TracerProvider(resource=resource, sampler=_sampler(settings), shutdown_on_exit=False)
        self._provider.add_span_processor(  # OTEL_BSP_*, OTEL_EXPORTER_OTLP_*
            BatchSpanProcessor(OTLPSpanExporter()) if exporter is None else SimpleSpanProcessor(exporter)
        )
        self._tracer = self._provider.get_tracer("authz_service", version)
        self._propagator = CompositePropagator([_propagator(name) for name in settings.propagators])
        # The header names the propagators read: a front door with two places to look for a
        # trace context (gRPC metadata, the original request's headers) checks which has one.
        self.propagation_fields = frozenset(f for name in settings.propagators for f in PROPAGATOR_FIELDS[name])
        self._limits = tuple((name, FIELD_LIMITS[name]) for name in sorted(self.propagation_fields))
        self._trust_clients = settings.client_context == "continue"
        for name in _QUOTING_LOGGERS:  # their warnings would put a client's text in our log
            logging.getLogger(name).setLevel(logging.ERROR)
        self._trace = trace
        self._context = context
        self._link = Link
        self._span_context = SpanContext
        self._server = SpanKind.SERVER
        self._status = Status
        self._error = StatusCode.ERROR

    # --- Checks (only through check.TracedChecker) ------------------------------------------------

    def trace_headers(self, carrier: Mapping[str, str]) -> dict[str, str]:
        """The headers of ``carrier`` the propagators read, each within its ``FIELD_LIMITS`` (a
        longer one, or a tracestate of more than 32 members, is dropped unread)."""
        picked = {}
        for name, limit in self._limits:
            value = carrier.get(name)
            if value and len(value) <= limit:
                picked[name] = value
        tracestate = picked.get("tracestate")
        if tracestate is not None and tracestate.count(",") >= MAX_TRACESTATE_MEMBERS:
            del picked["tracestate"]
        return picked

    @contextmanager
    def check_span(
        self, kind: CheckSpanKind, carrier: Mapping[str, str], *, from_client: bool = False
    ) -> Iterator[None]:
        """One Check's span, current while the Check runs (so a JWKS re-fetch becomes its child and
        the latency observation finds its trace id), parented on the context in ``carrier``.

        ``from_client``: the context comes from the client's own headers, not from Envoy. Unless
        clients are trusted, the span then starts a trace of its own (sampled by our sampler, not
        by the client's flag) with a link to the client's span (ids only, not its tracestate).
        """
        parent = self._propagator.extract(self.trace_headers(carrier))
        links: tuple[Any, ...] = ()
        if from_client and not self._trust_clients:
            remote = self._trace.get_current_span(parent).get_span_context()
            if remote.is_valid:
                links = (self._link(self._span_context(remote.trace_id, remote.span_id, is_remote=True)),)
            parent = self._context.Context()
        span = self._tracer.start_span(
            kind.name, context=parent, kind=self._server, attributes=kind.attributes, links=links
        )
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        kind_token = _CHECK_KIND.set(kind)
        try:
            yield
        finally:
            _CHECK_KIND.reset(kind_token)
            self._context.detach(token)
            span.end()

    def record_check(self, decision: Decision, request: HttpRequest | None) -> None:
        """The decision's attributes on the current Check span (the closed list in the module doc)."""
        span = self._trace.get_current_span()
        if not span.is_recording():
            return
        status = 200 if decision.allowed else decision.status
        span.set_attribute("authz.decision", decision.kind)
        span.set_attribute("authz.reason", decision.reason.value)
        span.set_attribute("authz.route", decision.route_label)
        span.set_attribute("http.response.status_code", status)
        if decision.claims is not None and decision.claims.client_id:
            span.set_attribute("authz.client_id", decision.claims.client_id)
        if request is not None:
            span.set_attribute("http.request.method", request.method)
            kind = _CHECK_KIND.get()
            if kind is not None and kind.http_server:
                route = decision.route
                span.update_name(f"{request.method} {route.path}" if route is not None else request.method)
                if route is not None:
                    span.set_attribute("http.route", route.path)
        if status >= 500:
            span.set_status(self._status(self._error, decision.reason.value))

    def sampled_trace_id(self) -> int:
        """The current span's trace id when it is sampled (exported), else 0."""
        context = self._trace.get_current_span().get_span_context()
        return context.trace_id if context.trace_flags.sampled else 0

    # --- background work --------------------------------------------------------------------------

    @contextmanager
    def root(self, name: str, **attributes: str | int) -> Iterator[Recorder]:
        """A root span for background work. Never a child of whatever is current: a refresher task
        created during a policy reload would otherwise hang every later refresh under that reload."""
        span = self._tracer.start_span(name, context=self._context.Context(), attributes=attributes)
        with self._trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            yield _SpanRecorder(span, self._error_status)

    @contextmanager
    def child(self, name: str, **attributes: str | int) -> Iterator[Recorder]:
        """A child of the current span (a Check's, for an unknown-kid JWKS re-fetch)."""
        with self._tracer.start_as_current_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            yield _SpanRecorder(span, self._error_status)

    def _error_status(self, description: str) -> Any:
        return self._status(self._error, description)

    async def close(self, timeout: float = SHUTDOWN_FLUSH_SECONDS) -> None:
        """Export what is queued, waiting at most ``timeout`` (a collector that is down must not
        hold up shutdown); spans not exported by then are dropped, and the log says so."""
        thread = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.warning(
                "tracing: queued spans not exported within the shutdown bound; dropped",
                extra={"timeout_seconds": timeout, "endpoint": self.settings.endpoint},
            )


def _sampler(settings: TracingSettings) -> Any:
    """The sampler the settings name (built here, so what the start-up log says is what runs)."""
    from opentelemetry.sdk.trace import sampling

    ratio = float(settings.sampler_arg or "1")
    return {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }[settings.sampler]()


def _propagator(name: str) -> Any:
    if name == "tracecontext":
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator()
    from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat

    return B3SingleFormat() if name == "b3" else B3MultiFormat()


class ExemplarCounter:
    """PerCheck for a TracedChecker: a sampled Check's duration carries its trace id, so a latency
    panel links to the trace (metrics.PerCheck.check_sampled)."""

    def __init__(self, per_check: PerCheck, tracing: Tracing) -> None:
        self._per_check = per_check
        self._trace_id = tracing.sampled_trace_id

    def check(self, key: tuple[str, str, str, int], seconds: float) -> None:
        trace_id = self._trace_id()
        if trace_id:
            self._per_check.check_sampled(key, seconds, trace_id)
        else:
            self._per_check.check(key, seconds)
