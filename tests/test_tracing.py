"""Tracing: OTEL_* settings, the Check span (parent, attributes, nothing secret), latency exemplars
in the OpenMetrics exposition, and off meaning off (tests/e2e/test_tracing_e2e.py: real Envoy, OTLP)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from authz_service import __version__
from authz_service.admin import AdminServer, CachedExposition, wants_openmetrics
from authz_service.check import Checker, TracedChecker
from authz_service.config import ConfigError, settings_from
from authz_service.metrics import Metrics
from authz_service.policy import parse_policy
from authz_service.request import HttpRequest, path_and_segments
from authz_service.response import Answers
from authz_service.tokens import TokenVerifier
from authz_service.doors.grpc import SPAN_KIND as GRPC_CHECK
from authz_service.doors.http import SPAN_KIND as HTTP_CHECK
from authz_service.tracing import tracing_settings

from .conftest import ISSUER, MemoryKeys, SigningKey
from .test_cli import cli

POLICY_TEXT = f"""
issuers:
  - user_pool_id: us-east-1_Test00001
    issuer: {ISSUER}
routes:
  - name: create-transaction
    methods: [POST]
    path: /transactions
    scopes: [transactions/post]
  - name: boom
    path: /boom
    scopes: [transactions/post]
"""
POLICY = parse_policy(POLICY_TEXT, "tracing-test.yaml")
ENVOY_SPAN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Fixed:
    policy = POLICY


# --- OTEL_* settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("environ", [
    {},
    {"OTEL_SERVICE_NAME": "authz", "OTEL_TRACES_SAMPLER": "always_on"},  # nothing says where to export
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
])
def test_tracing_is_off_unless_an_exporter_or_endpoint_is_configured(environ) -> None:
    assert tracing_settings(environ) is None


def test_the_standard_variables_configure_tracing() -> None:
    settings = tracing_settings({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pass@collector.example:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=SECRET",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_PROPAGATORS": "tracecontext,b3multi",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=payments%2Dauthz",
    })
    assert settings is not None
    assert settings.describe() == {
        "exporter": "otlp", "protocol": "http/protobuf",
        # the path the HTTP exporter appends; no userinfo, no query: an endpoint may embed credentials
        "endpoint": "https://collector.example:4318/v1/traces",
        "sampler": "parentbased_traceidratio:0.25", "propagators": "tracecontext,b3multi",
        "client_context": "link", "service_name": "payments-authz"}
    assert "SECRET" not in repr(settings)
    grpc = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                             "OTEL_SERVICE_NAME": "authz-a",
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://key@c:4317/?token=SECRET"})
    assert grpc is not None
    assert (grpc.protocol, grpc.endpoint, grpc.service_name, grpc.enabled_by) == \
        ("grpc", "http://c:4317/", "authz-a", "OTEL_TRACES_EXPORTER")


@pytest.mark.parametrize("environ, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported: use otlp"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported: use grpc"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "jaeger_remote"},
     "OTEL_TRACES_SAMPLER='jaeger_remote' is not supported"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5%"},
     "OTEL_TRACES_SAMPLER_ARG='5%' is invalid for traceidratio: a ratio 0.0..1.0"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "tracecontext,xray"},
     "OTEL_PROPAGATORS names 'xray', which is not supported"),
])
def test_unusable_variables_are_refused_naming_the_variable_and_the_fix(environ, message) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        settings_from({"policy": "p.yaml"}, environ)


def test_settings_carry_the_tracing_settings(tmp_path: Path) -> None:
    assert settings_from({"policy": "p.yaml"}, {}).tracing is None
    settings = settings_from({"policy": "p.yaml"}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert settings.tracing is not None and settings.tracing.enabled_by == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"


def test_configured_without_the_extra_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    # An `opentelemetry` package without the SDK and exporters, first on the path: what a service
    # installed without the tracing extra sees (opentelemetry-api may come with other packages).
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text("")
    result = cli("serve", "--policy", "unused.yaml",
                 env={"PYTHONPATH": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                      "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer SECRET"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "authz-service: error: tracing is configured (OTEL_EXPORTER_OTLP_ENDPOINT is set) but the tracing extra "
        "is not installed (no opentelemetry.sdk.trace): pip install '.[tracing]' in a clone of the repository, or "
        f"pip install 'authz_service-{__version__}-py3-none-any.whl[tracing]' from a built wheel (the image "
        "includes it), or unset OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert "SECRET" not in result.stdout + result.stderr


def test_tracing_off_imports_no_opentelemetry_and_checks_untraced(tmp_path: Path) -> None:
    """Off means free: the service's modules, a Check and the wiring never touch OpenTelemetry."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_TEXT)
    code = f"""
import asyncio, sys
from authz_service import cli, server, workers
from authz_service.doors import grpc, http
from authz_service.check import Checker, TracedChecker
from authz_service.config import settings_from
from authz_service.doors.grpc import authorization_servicer, AuthorizationServicer
settings = settings_from({{"policy": {str(policy)!r}}})
service = server.Service(settings)
assert settings.tracing is None and not service.tracing.enabled
async def main():
    from authz_service.reloader import PolicyReloader
    from authz_service.response import Answers
    from authz_service.tokens import TokenVerifier
    from authz_service.policy import load_policy_file
    checker = Checker(PolicyReloader(settings.policy, load_policy_file(settings.policy), service.metrics),
                      TokenVerifier(None), Answers("r"), service.metrics.per_check)
    assert type(authorization_servicer(checker)) is AuthorizationServicer
    return await checker.check(lambda raw: raw, raw, lambda answer, decision: answer)
from authz_service.request import HttpRequest, path_and_segments
raw = HttpRequest("GET", "/nowhere", ("nowhere",), (), "", ())
assert asyncio.run(main()).status == 403
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert result.returncode == 0, result.stderr


# --- the Check span ------------------------------------------------------------------------------


def traced_checker(tracing, keys: MemoryKeys) -> tuple[TracedChecker, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return TracedChecker(Fixed(), TokenVerifier(keys), Answers("r"), metrics.per_check, tracing), metrics


def post(target: str, *authorization: str) -> HttpRequest:
    return HttpRequest("POST", *path_and_segments(target), authorization, "rid", ())


def answer_of(answer, decision):
    return answer


async def test_a_check_span_continues_the_callers_trace_and_describes_the_decision(traced, key_a: SigningKey):
    tracing, spans = traced
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    token = key_a.token(client_id="payments-writer")
    answer = await checker.check_traced(GRPC_CHECK, {"traceparent": ENVOY_SPAN}, lambda raw: raw,
                                        post("/transactions", f"Bearer {token}"), answer_of)
    assert answer.allowed
    (span,) = spans.get_finished_spans()
    assert span.name == "envoy.service.auth.v3.Authorization/Check"
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331" and span.parent.is_remote
    assert span.kind.name == "SERVER"
    assert dict(span.attributes) == {
        "rpc.system": "grpc", "rpc.service": "envoy.service.auth.v3.Authorization", "rpc.method": "Check",
        "authz.decision": "allow", "authz.reason": "allowed", "authz.route": "create-transaction",
        "http.response.status_code": 200, "authz.client_id": "payments-writer", "http.request.method": "POST"}
    assert token not in repr(span.to_json())


async def test_an_http_check_span_is_named_by_method_and_route_and_a_denial_shows_its_reason(traced, key_a):
    tracing, spans = traced
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    expired = key_a.token(exp=1_000_000)
    await checker.check_traced(HTTP_CHECK, {}, lambda raw: raw, post("/transactions?sig=QUERYSECRET",
                                                                    f"Bearer {expired}"), answer_of)
    await checker.check_traced(HTTP_CHECK, {}, lambda raw: raw, post("/nowhere"), answer_of)
    denied, no_route = spans.get_finished_spans()
    assert denied.name == "POST /transactions" and denied.parent is None  # no context: a new trace
    assert {k: v for k, v in denied.attributes.items() if k.startswith(("authz.", "http."))} == {
        "authz.decision": "deny", "authz.reason": "expired", "authz.route": "create-transaction",
        "http.response.status_code": 401, "http.request.method": "POST", "http.route": "/transactions"}
    assert denied.status.status_code.name == "UNSET"  # a 4xx is the client's error, not ours
    assert no_route.name == "POST" and no_route.attributes["authz.reason"] == "no_route"
    for span in (denied, no_route):
        assert "QUERYSECRET" not in span.to_json() and expired not in span.to_json()


async def test_a_failing_check_is_an_error_span(traced, key_a):
    tracing, spans = traced
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))

    def parse(raw):
        raise RuntimeError("bug")

    answer = await checker.check_traced(GRPC_CHECK, {}, parse, None, answer_of)
    assert answer.status == 500
    (span,) = spans.get_finished_spans()
    assert (span.status.status_code.name, span.status.description) == ("ERROR", "internal_error")
    assert span.attributes["http.response.status_code"] == 500


async def test_b3_context_is_continued_when_configured(key_a, monkeypatch):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from authz_service.tracing import Tracing

    spans = InMemorySpanExporter()
    settings = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "tracecontext,b3,b3multi"})
    checker, _ = traced_checker(Tracing(settings, "test", exporter=spans), MemoryKeys(key_a))
    single = {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"}
    multi = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "0020000000000001",
             "x-b3-sampled": "1"}
    for carrier in (single, multi):
        await checker.check_traced(GRPC_CHECK, carrier, lambda raw: raw, post("/nowhere"), answer_of)
    first, second = spans.get_finished_spans()
    assert format(first.context.trace_id, "032x") == "80f198ee56343ba864fe8b2a57d3eff7"
    assert format(first.parent.span_id, "016x") == "e457b5a2e4d86bd1"
    assert format(second.context.trace_id, "032x") == "463ac35c9f6413ad48485a3953bb6124"


# --- exemplars ------------------------------------------------------------------------------------


async def test_sampled_checks_carry_their_trace_id_as_a_latency_exemplar(traced, key_a):
    tracing, spans = traced
    checker, metrics = traced_checker(tracing, MemoryKeys(key_a))
    unsampled = "00-11111111111111111111111111111111-2222222222222222-00"
    await checker.check_traced(GRPC_CHECK, {"traceparent": unsampled}, lambda raw: raw, post("/nowhere"), answer_of)
    assert metrics.per_check.sampled == []  # not sampled: no trace to link to
    await checker.check_traced(GRPC_CHECK, {"traceparent": ENVOY_SPAN}, lambda raw: raw, post("/nowhere"),
                               answer_of)
    assert len(metrics.per_check.sampled) == 1  # buffered like every duration, applied at the flush
    text = generate_openmetrics(metrics.registry).decode()
    exemplars = [(s.labels.get("le"), s.exemplar.labels) for f in text_string_to_metric_families(text)
                 for s in f.samples if s.name == "authz_check_duration_seconds_bucket" and s.exemplar]
    assert [labels for _, labels in exemplars] == [{"trace_id": "0af7651916cd43dd8448eb211c80319c"}]
    assert metrics.registry.get_sample_value("authz_check_duration_seconds_count") == 2


@pytest.mark.parametrize("accept, openmetrics", [
    ("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2", True),
    ("application/openmetrics-text; version=0.0.1", True),
    ("text/plain;version=0.0.4", False),
    ("", False),
    ("*/*", False),
    ("application/openmetrics-text;q=0, text/plain", False),
])
def test_accept_header_negotiation(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics


async def test_metrics_endpoint_serves_openmetrics_to_who_asks_and_the_classic_format_to_others():
    async def text() -> bytes:
        return b"classic\n"

    async def openmetrics() -> bytes:
        return b"openmetrics\n# EOF\n"

    server = AdminServer(lambda: (True, {}), CachedExposition(text, 0), CachedExposition(openmetrics, 0))
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async def get(accept: str) -> tuple[str, bytes]:
                async with session.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}) as resp:
                    return resp.headers["Content-Type"], await resp.read()

            assert await get("application/openmetrics-text;version=1.0.0") == (
                "application/openmetrics-text; version=1.0.0; charset=utf-8", b"openmetrics\n# EOF\n")
            content_type, body = await get("*/*")
            assert content_type.startswith("text/plain") and body == b"classic\n"
    finally:
        await server.stop()


def test_untraced_checker_is_not_a_traced_one() -> None:
    assert not issubclass(Checker, TracedChecker)


class Metadata:
    """A grpc.aio context as far as the traced servicer reads it."""

    def __init__(self, *pairs: tuple[str, str | bytes]) -> None:
        self.pairs = pairs

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.pairs


@pytest.mark.parametrize("metadata, parent, link", [
    # Envoy traces: its ext_authz span's context is in the gRPC metadata: the Check's parent
    ((("traceparent", "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"), ("tracestate", ""),
      ("x-bin", b"\x00")), "00f067aa0ba902b7", None),
    # Envoy does not trace: the client's context, in the original request's headers: linked only
    ((("x-envoy-internal", "true"),), None, "b7ad6b7169203331"),
])
async def test_grpc_door_prefers_envoys_context_in_the_metadata(traced, key_a, metadata, parent, link):
    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2
    from authz_service.doors.grpc import TracedAuthorizationServicer, authorization_servicer

    tracing, spans = traced
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    servicer = authorization_servicer(checker)
    assert isinstance(servicer, TracedAuthorizationServicer)
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.path = "/nowhere"
    request.attributes.request.http.headers["traceparent"] = ENVOY_SPAN
    response = await servicer.Check(request, Metadata(*metadata))
    assert response.denied_response.status.code == 403
    (span,) = spans.get_finished_spans()
    assert (span.parent and format(span.parent.span_id, "016x")) == parent
    assert [format(each.context.span_id, "016x") for each in span.links] == ([link] if link else [])


# --- what a client's trace headers may cost, and who decides sampling -----------------------------

CLIENT_TEXT = "client-text-5c1e"  # in every hostile header: it must never reach the log
HOSTILE_HEADERS = [
    pytest.param({"baggage": ",".join(f"{CLIENT_TEXT}{i}=a b;c" for i in range(180))}, id="baggage-180-bad-members"),
    pytest.param({"baggage": f"{CLIENT_TEXT}=" + "v" * 9000}, id="baggage-9kb"),
    pytest.param({"tracestate": f"vendor=1,{CLIENT_TEXT} @@=2"}, id="tracestate-bad-member"),
    pytest.param({"tracestate": ",".join([f"{CLIENT_TEXT}=1"] * 20)}, id="tracestate-duplicate-keys"),
    pytest.param({"tracestate": ",".join(f"{CLIENT_TEXT}{i}=1" for i in range(33))}, id="tracestate-33-members"),
    pytest.param({"tracestate": f"{CLIENT_TEXT}=" + "v" * 600}, id="tracestate-over-512"),
    pytest.param({"traceparent": ENVOY_SPAN + "-" + CLIENT_TEXT * 60}, id="traceparent-over-128"),
]


def tracing_of(environ: dict[str, str], client_context: str = "link"):
    """Tracing from ``environ`` (plus OTEL_TRACES_EXPORTER=otlp), spans kept in memory: (tracing, exporter)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from authz_service.tracing import Tracing

    spans = InMemorySpanExporter()
    settings = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp", **environ}, client_context)
    assert settings is not None
    return Tracing(settings, "test", exporter=spans), spans


@pytest.mark.parametrize("hostile", HOSTILE_HEADERS)
async def test_hostile_trace_headers_are_read_bounded_and_never_logged(key_a, caplog, monkeypatch, hostile):
    """Whatever the trace headers hold, a Check reads at most the W3C sizes, parses no baggage
    (even with OTEL_PROPAGATORS naming it), logs nothing of them, and still continues a usable
    traceparent."""
    from opentelemetry import baggage
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    parsed = []
    monkeypatch.setattr(W3CBaggagePropagator, "extract", lambda self, *a, **k: parsed.append(a))
    tracing, spans = tracing_of({"OTEL_PROPAGATORS": "tracecontext,baggage"})
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    seen_baggage = []

    def parse(raw):
        seen_baggage.append(dict(baggage.get_all()))
        return raw

    caplog.set_level(logging.DEBUG)
    carrier = {"traceparent": ENVOY_SPAN, "tracestate": "envoy=abc", **hostile}
    await checker.check_traced(GRPC_CHECK, carrier, parse, post("/nowhere"), answer_of)
    assert not [r.getMessage()[:200] for r in caplog.records if CLIENT_TEXT in r.getMessage()]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING]
    assert parsed == [] and seen_baggage == [{}]
    assert "baggage" not in tracing.propagation_fields
    assert tracing.settings.describe()["propagators"] == "tracecontext"
    (span,) = spans.get_finished_spans()
    if "traceparent" in hostile:  # too long to be a traceparent: not read, a trace of its own
        assert span.parent is None
        return
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    # What the span exports of the tracestate: the caller's, when within the W3C bounds; else nothing.
    exported = span.context.trace_state.to_header()
    assert CLIENT_TEXT not in exported and len(exported) <= 512
    assert exported in ("", "envoy=abc")


async def test_a_tracestate_within_the_w3c_bounds_is_continued_and_exported(traced, key_a):
    tracing, spans = traced
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    members = ",".join(f"v{i}=x" for i in range(32))
    await checker.check_traced(GRPC_CHECK, {"traceparent": ENVOY_SPAN, "tracestate": members}, lambda raw: raw,
                               post("/nowhere"), answer_of)
    (span,) = spans.get_finished_spans()
    assert span.context.trace_state.to_header() == members


def check_request(**headers: str):
    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.path = "/nowhere"
    request.attributes.request.http.headers.update(headers)
    return request


CLIENT_SPAN = "00-1234567890abcdef1234567890abcdef-00000000000000c1-01"  # sampled, by the client


async def test_a_clients_sampled_flag_never_forces_sampling_envoys_does(key_a):
    """parentbased_traceidratio at 0: only a sampled parent from Envoy is sampled. The client's
    own traceparent (gRPC mode, Envoy not tracing) no longer is."""
    from authz_service.doors.grpc import authorization_servicer

    tracing, spans = tracing_of({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    checker, metrics = traced_checker(tracing, MemoryKeys(key_a))
    servicer = authorization_servicer(checker)
    for _ in range(20):
        await servicer.Check(check_request(traceparent=CLIENT_SPAN), Metadata())
    assert spans.get_finished_spans() == ()
    await servicer.Check(check_request(traceparent=CLIENT_SPAN), Metadata(("traceparent", ENVOY_SPAN)))
    (span,) = spans.get_finished_spans()
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"


async def test_a_clients_context_is_linked_from_a_trace_of_our_own(key_a):
    from authz_service.doors.grpc import authorization_servicer

    tracing, spans = tracing_of({})
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    await authorization_servicer(checker).Check(check_request(traceparent=CLIENT_SPAN, tracestate="c=secret"),
                                                Metadata())
    (span,) = spans.get_finished_spans()
    assert span.parent is None and format(span.context.trace_id, "032x") != CLIENT_SPAN[3:35]
    (link,) = span.links
    assert (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) == \
        (CLIENT_SPAN[3:35], CLIENT_SPAN[36:52])
    assert not link.context.trace_state and not span.context.trace_state  # nothing of the client's exported


async def test_trusted_clients_can_be_continued_with_their_sampled_flag(key_a):
    from authz_service.doors.grpc import authorization_servicer

    tracing, spans = tracing_of({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
                                client_context="continue")
    assert tracing.settings.describe()["client_context"] == "continue"
    checker, _ = traced_checker(tracing, MemoryKeys(key_a))
    await authorization_servicer(checker).Check(check_request(traceparent=CLIENT_SPAN), Metadata())
    (span,) = spans.get_finished_spans()
    assert format(span.parent.span_id, "016x") == CLIENT_SPAN[36:52] and not span.links


def test_the_client_context_setting() -> None:
    assert settings_from({"policy": "p.yaml"}, {}).trace_client_context == "link"
    settings = settings_from({"policy": "p.yaml"}, {"AUTHZ_TRACE_CLIENT_CONTEXT": "Continue",
                                                    "OTEL_TRACES_EXPORTER": "otlp"})
    assert settings.trace_client_context == "continue" and settings.tracing.client_context == "continue"
    with pytest.raises(ConfigError, match="AUTHZ_TRACE_CLIENT_CONTEXT='follow' is invalid: one of link, continue"):
        settings_from({"policy": "p.yaml"}, {"AUTHZ_TRACE_CLIENT_CONTEXT": "follow"})
