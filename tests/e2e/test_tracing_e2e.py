"""Tracing end to end: a real Envoy with its OpenTelemetry tracer and our service both export over
OTLP to a receiver this test runs (tests/e2e/otlp_receiver.py), through both front doors and both
of our export protocols:

* gRPC mode (envoy/envoy.yaml), our service exporting OTLP/gRPC;
* HTTP mode (envoy/envoy-http.yaml, --ext-authz-http-port), our service exporting OTLP/HTTP.

Each request carries a client traceparent, so its trace id is known. We assert our Check span is
in Envoy's trace, the child of Envoy's ext_authz span (not of the client's span, which is all the
CheckRequest's own headers know of), with the decision's attributes; that a denied request's
trace shows the reason; that the latency exemplar links to the trace; and that nothing secret (the
token, the query string, the Authorization header, OTLP headers) is in any span of either process.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .. import envoyconf
from ..test_tracing_deploy import TRACED_ENVOY, tracing_additions
from .harness import (
    ENVOY_CONFIGS,
    EnvoyProcess,
    UpstreamProcess,
    envoy_binary,
    free_port,
    http_request,
    load_shipped_config,
    render_envoy_config,
    rewrite_ports,
    start_envoy,
    wait_for,
)
from .otlp_receiver import OtlpReceiver, ReceivedSpan
from .stack import TRANSACTION_ROUTES, DevIssuer, PolicyDir, Service, start_dev_issuer, start_service

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")]

QUERY_SECRET = "sig=QUERY-SECRET-" + secrets.token_hex(4)
HEADERS_SECRET = "HEADERS-SECRET-" + secrets.token_hex(4)
SERVER, CLIENT = 2, 3  # OTLP span kinds
POLICY = """
issuers:
  - user_pool_id: us-east-1_Demo00001
    issuer: {issuer}
routes:
""" + TRANSACTION_ROUTES


def traced_envoy_config(out: Path, shipped: Path, *, listener: int, admin: int, authz: int, app: int,
                        collector: int) -> Path:
    """The shipped config (ports rewritten) plus the tracing additions of the documented
    deploy/k8s/tracing/envoy.yaml: its HCM tracing block and collector cluster.

    Rendered here rather than a file of its own because the additions must be exactly the
    documented ones, applied to the shipped gRPC and HTTP configs alike, with only what a test
    needs changed: the collector's address (this test's receiver), every request sampled, and
    Envoy's span flushing (runtime keys; by default it flushes every 5 s or 5 spans).
    """
    cfg = rewrite_ports(load_shipped_config(shipped), listener_port=listener, admin_port=admin,
                        authz_port=authz, app_port=app, health_port=free_port())
    _, tracing, cluster = tracing_additions(load_shipped_config(TRACED_ENVOY))
    envoyconf.hcm(cfg)["tracing"] = {**tracing, "random_sampling": {"value": 100}}
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    address.update(address="127.0.0.1", port_value=collector)
    cfg["static_resources"]["clusters"].append(cluster)
    cfg["layered_runtime"] = {"layers": [{"name": "test-flush", "static_layer": {
        "tracing.opentelemetry.flush_interval_ms": 50, "tracing.opentelemetry.min_flush_spans": 1}}]}
    path = out / f"envoy-traced-{listener}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class TracedStack:
    mode: str
    issuer: DevIssuer
    service: Service
    envoy: EnvoyProcess
    untraced_envoy: EnvoyProcess  # the shipped config as it is: Envoy does not trace
    receiver: OtlpReceiver
    service_name: str  # of the service's spans


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    issuer = start_dev_issuer(tmp_path_factory.mktemp("tracing-issuer"), "us-east-1_Demo00001")
    try:
        yield issuer
    finally:
        issuer.process.stop()


MODES = [("grpc", "grpc"), ("http", "http/protobuf")]
MODE_IDS = ["grpc-door-otlp-grpc", "http-door-otlp-http"]


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver,
          issuer: DevIssuer, upstream: UpstreamProcess) -> Iterator[TracedStack]:
    yield from traced_stack(request.param, tmp_path_factory, receiver, issuer, upstream, {})


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def ratio_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver,
                issuer: DevIssuer, upstream: UpstreamProcess) -> Iterator[TracedStack]:
    """The sampler docs/tracing.md advises for busy services, at 0: a Check is sampled only when
    the context it continues is; a trace of the service's own, never."""
    yield from traced_stack(request.param, tmp_path_factory, receiver, issuer, upstream,
                            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
                            name="ratio")


def traced_stack(mode_and_protocol: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
                 receiver: OtlpReceiver, issuer: DevIssuer, upstream: UpstreamProcess, sampler: dict[str, str],
                 name: str = "authz-service") -> Iterator[TracedStack]:
    """The service of ``mode`` (exporting with ``sampler``'s variables) behind a tracing Envoy and
    the shipped, untraced one; the service's spans carry the service name ``{name}-{mode}``."""
    mode, protocol = mode_and_protocol
    work = tmp_path_factory.mktemp(f"tracing-{name}-{mode}")
    policy = PolicyDir(work / "config")
    policy.write(POLICY.format(issuer=issuer.issuer))
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}" + ("/v1/traces" if mode == "http" else ""),
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={HEADERS_SECRET}",  # may carry credentials: never logged
        "OTEL_SERVICE_NAME": f"{name}-{mode}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # the SDK batches spans: export them within 50 ms
        **sampler,
    }
    service = start_service(work, policy.path,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env})
    envoys: list[EnvoyProcess] = []
    try:
        shipped = ENVOY_CONFIGS[mode]
        authz = service.authz_port(mode)
        config = traced_envoy_config(work, shipped, listener=free_port(), admin=free_port(), authz=authz,
                                     app=upstream.port, collector=receiver.grpc_port)
        envoys.append(start_envoy(config, work, name=f"envoy-traced-{mode}"))
        plain = render_envoy_config(work, listener_port=free_port(), admin_port=free_port(), authz_port=authz,
                                    app_port=upstream.port, source=shipped)
        envoys.append(start_envoy(plain, work, name=f"envoy-{mode}"))
        yield TracedStack(mode, issuer, service, envoys[0], envoys[1], receiver, f"{name}-{mode}")
    finally:
        for envoy in envoys:
            envoy.stop()
        service.process.stop()


def client_traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent from a 'client': (header value, trace id, the client's span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def send(stack: TracedStack, method: str, path: str, token: str, envoy: EnvoyProcess | None = None,
         headers: list[tuple[str, str]] = ()) -> tuple[int, str, str]:
    """One request through Envoy, in a new client trace: (status, trace id, client span id)."""
    traceparent, trace_id, span_id = client_traceparent()
    status, _, _ = http_request(method, (envoy or stack.envoy).url(path),
                                [("Authorization", f"Bearer {token}"), ("traceparent", traceparent), *headers])
    return status, trace_id, span_id


def trace(stack: TracedStack, trace_id: str) -> tuple[ReceivedSpan, ReceivedSpan, ReceivedSpan]:
    """Envoy's ingress span, Envoy's ext_authz span and our Check span of one trace, once all arrived."""
    ours = stack.service_name
    stack.receiver.wait_for_spans(lambda s: s.trace_id == trace_id and s.service in ("envoy", ours), 3,
                                  f"Envoy's two spans and our Check span of trace {trace_id}")
    spans = [s for s in stack.receiver.spans() if s.trace_id == trace_id]
    (ingress,) = [s for s in spans if s.service == "envoy" and s.kind == SERVER]
    (ext_authz,) = [s for s in spans if s.service == "envoy" and s.kind == CLIENT]
    (check,) = [s for s in spans if s.service == ours]
    return ingress, ext_authz, check


def test_the_check_span_is_the_child_of_envoys_ext_authz_span(stack: TracedStack) -> None:
    token = stack.issuer.token("payments-reader")
    status, trace_id, client_span = send(stack, "GET", f"/transactions/7?{QUERY_SECRET}", token)
    assert status == 200
    ingress, ext_authz, check = trace(stack, trace_id)
    assert ingress.parent_span_id == client_span  # Envoy continued the client's trace
    assert ext_authz.parent_span_id == ingress.span_id
    assert check.parent_span_id == ext_authz.span_id, "our Check span must hang under Envoy's ext_authz span"
    assert check.kind == SERVER
    expected = {"authz.decision": "allow", "authz.reason": "allowed", "authz.route": "get-transaction",
                "http.response.status_code": 200, "authz.client_id": "payments-reader", "http.request.method": "GET"}
    if stack.mode == "grpc":
        assert check.name == "envoy.service.auth.v3.Authorization/Check"
        expected |= {"rpc.system": "grpc", "rpc.service": "envoy.service.auth.v3.Authorization", "rpc.method": "Check"}
    else:
        assert check.name == "GET /transactions/{id}"
        expected |= {"http.route": "/transactions/{id}"}
    assert check.attributes == expected
    assert check.status_code == 0


def test_without_envoy_tracing_the_check_span_starts_a_trace_of_its_own(stack: TracedStack) -> None:
    """The client's trace context is not Envoy's: a Check does not continue it. gRPC mode: the
    CheckRequest's headers hold it, and the Check span links to the client's span; HTTP mode: the
    shipped allowed_headers does not forward it, and the Check span is a root without a link."""
    earlier = {s.span_id for s in stack.receiver.spans()}  # other tests' Checks through this Envoy
    status, trace_id, client_span = send(stack, "GET", "/transactions/7?untraced", stack.issuer.token("payments-reader"),
                                         stack.untraced_envoy, [("tracestate", "client=private")])
    assert status == 200
    (check,) = stack.receiver.wait_for_spans(
        lambda s: s.service == stack.service_name and s.attributes.get("authz.route") == "get-transaction"
        and s.span_id not in earlier and s.attributes.get("authz.client_id") == "payments-reader"
        and s.parent_span_id == "" and s.trace_id != trace_id
        and (s.links == ((trace_id, client_span, ""),) if stack.mode == "grpc" else not s.links), 1,
        "our Check span, a root of its own")
    assert check.attributes["authz.reason"] == "allowed" and check.trace_state == ""
    assert not [s for s in stack.receiver.spans() if s.service == stack.service_name and s.trace_id == trace_id]


def test_a_denied_requests_trace_shows_the_reason(stack: TracedStack) -> None:
    token = stack.issuer.token("payments-reader")  # transactions/get only
    status, trace_id, _ = send(stack, "POST", "/transactions", token)
    assert status == 403
    _, ext_authz, check = trace(stack, trace_id)
    assert check.parent_span_id == ext_authz.span_id
    assert (check.attributes["authz.decision"], check.attributes["authz.reason"],
            check.attributes["http.response.status_code"]) == ("deny", "insufficient_scope", 403)
    assert ext_authz.attributes.get("ext_authz_status") == "ext_authz_unauthorized"


def test_the_latency_exemplar_links_to_the_trace(stack: TracedStack) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    status, trace_id, _ = send(stack, "GET", "/transactions/8", stack.issuer.token("reporting"))
    assert status == 200
    trace(stack, trace_id)  # exported, so its Check has been counted

    def exemplar_trace_ids() -> set[str]:
        status, headers, body = http_request(
            "GET", f"http://127.0.0.1:{stack.service.http_port}/metrics",
            [("Accept", "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3")])
        assert status == 200 and dict(headers)["Content-Type"].startswith("application/openmetrics-text")
        return {s.exemplar.labels["trace_id"] for f in text_string_to_metric_families(body.decode())
                for s in f.samples if s.name == "authz_check_duration_seconds_bucket" and s.exemplar}

    # prometheus-client keeps the latest exemplar of each bucket: this Check is the latest.
    assert trace_id in exemplar_trace_ids()


def test_background_jwks_fetches_are_root_spans(stack: TracedStack) -> None:
    (fetch,) = stack.receiver.wait_for_spans(
        lambda s: s.service == stack.service_name and s.name == "jwks fetch", 1, "the start-up JWKS fetch")
    assert fetch.parent_span_id == ""
    assert fetch.attributes == {"authz.issuer.pool_id": "us-east-1_Demo00001", "authz.jwks.trigger": "startup",
                                "authz.jwks.result": "ok", "authz.jwks.keys": 1}


def test_nothing_secret_is_in_any_span_or_the_log(stack: TracedStack) -> None:
    token = stack.issuer.token("payments-writer")
    status, trace_id, _ = send(stack, "GET", f"/transactions/9?{QUERY_SECRET}", token)
    assert status == 403
    trace(stack, trace_id)
    secrets_ = (token, token.split(".")[2], QUERY_SECRET, "Bearer", HEADERS_SECRET)
    spans = stack.receiver.spans()
    assert {s.service for s in spans} >= {"envoy", stack.service_name}
    for span in spans:
        for key, value in span.attributes.items():
            assert not any(secret in f"{key}={value}" for secret in secrets_), (span.service, span.name, key, value)
        assert not any(secret in span.name + span.status_message for secret in secrets_), span
        assert "authorization" not in {k.lower() for k in span.attributes}
    # The start-up log says where spans go, never the OTLP headers (they may carry API keys).
    started = [line for line in stack.service.process.log_text().splitlines() if '"authz-service started"' in line]
    assert started and '"tracing":{"exporter":"otlp"' in started[0]
    assert HEADERS_SECRET not in stack.service.process.log_text()


def check_spans_of(stack: TracedStack) -> list[ReceivedSpan]:
    return [s for s in stack.receiver.spans() if s.service == stack.service_name and "authz.decision" in s.attributes]


def test_a_clients_sampled_flag_does_not_decide_sampling(ratio_stack: TracedStack) -> None:
    """parentbased_traceidratio: requests whose client sends a sampled traceparent through an Envoy
    that does not trace are not sampled (the ratio, 0 here, decides); Envoy's sampled context is."""
    stack = ratio_stack
    token = stack.issuer.token("payments-reader")
    before = len(check_spans_of(stack))
    client_traces = set()
    for i in range(20):
        status, trace_id, _ = send(stack, "GET", f"/transactions/{i}", token, stack.untraced_envoy)
        assert status == 200
        client_traces.add(trace_id)
    # Envoy's context, sampled: exported, and after every span above would have been (the SDK
    # exports in order, from one queue).
    status, envoy_trace, _ = send(stack, "GET", "/transactions/sentinel", token)
    assert status == 200
    trace(stack, envoy_trace)
    exported = check_spans_of(stack)[before:]
    assert [s.trace_id for s in exported] == [envoy_trace], \
        f"{len([s for s in exported if s.trace_id in client_traces])} of 20 Checks sampled by the client's flag"


CLIENT_TEXT = "client-text-" + secrets.token_hex(4)


def test_hostile_trace_headers_reach_no_log_line_and_no_span(stack: TracedStack) -> None:
    """With a forged bearer token (as any client can send): a baggage of 180 bad members and one
    of 9 KB, a tracestate with a bad member, and one over the W3C 512 characters. Through either
    Envoy, the Check is denied as usual, no log line holds the client's text, and the span
    exports no tracestate of it."""
    forged = stack.issuer.token("payments-reader")[:-8] + "AAAAAAAA"
    cases = [
        [("baggage", ",".join(f"{CLIENT_TEXT}{i}=a b;c" for i in range(180)))],
        [("baggage", f"{CLIENT_TEXT}=" + "v" * 9000)],
        [("tracestate", f"vendor=1,{CLIENT_TEXT} @@=2")],
        [("tracestate", ",".join(f"{CLIENT_TEXT}{i}=1" for i in range(40)))],
    ]
    log_lines = len(stack.service.process.log_text().splitlines())
    sent = []
    for envoy in (stack.envoy, stack.untraced_envoy):
        for headers in cases:
            status, trace_id, _ = send(stack, "GET", "/transactions/1", forged, envoy, headers)
            assert status == 401
            sent.append(trace_id)
    # The traced Envoy's last request: its spans exported means ours of the requests before are too.
    status, trace_id, _ = send(stack, "GET", "/transactions/1", forged)
    trace(stack, trace_id)
    new_lines = stack.service.process.log_text().splitlines()[log_lines:]
    assert not [line[:300] for line in new_lines if CLIENT_TEXT in line]
    assert not [line[:300] for line in new_lines if '"level":"warning"' in line]
    assert len(new_lines) == 2 * len(cases) + 1  # one deny line per request, nothing else
    # Envoy's own spans carry the tracestate as the client sent it; ours never do.
    ours = [s for s in stack.receiver.spans() if s.service == stack.service_name and s.trace_id in sent]
    assert len(ours) == len(cases)  # the traced Envoy's requests (the others are traces of our own)
    for span in ours:
        assert CLIENT_TEXT not in span.trace_state and all(CLIENT_TEXT not in link[2] for link in span.links)
