"""The shipped envoy/envoy.yaml: valid, hardened, and fail-closed for real.

These tests need only Envoy and the echo upstream (no authz service): the
authz cluster points at a port where nothing listens.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from typing import Any

import pytest
import yaml

from .. import envoyconf
from .harness import (
    HTTP_ENVOY_CONFIG,
    PER_CLIENT_RECIPE,
    REPO_ROOT,
    SHIPPED_ENVOY_CONFIG,
    EnvoyProcess,
    UpstreamProcess,
    envoy_binary,
    free_port,
    http_request,
    load_shipped_config,
    render_envoy_config,
    rewrite_ports,
)

EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"

needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _validate(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- #
# static checks
# --------------------------------------------------------------------------- #


@pytest.mark.e2e
@needs_envoy
def test_shipped_config_passes_envoy_validate() -> None:
    res = _validate(SHIPPED_ENVOY_CONFIG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout + res.stderr
    assert "deprecated" not in (res.stdout + res.stderr).lower()


def test_ext_authz_is_fail_closed_v3_grpc_without_body() -> None:
    cfg = load_shipped_config()
    filters = envoyconf.http_filters(cfg)
    names = [f["name"] for f in filters]
    # Admission (the anonymous token bucket, which can only refuse) before ext_authz, the
    # per-client limits (which read the identity ext_authz verified) after it, router last:
    # nothing can route around the check.
    assert names == ["envoy.filters.http.local_ratelimit", "envoy.filters.http.ext_authz",
                     envoyconf.PER_CLIENT_FILTER, "envoy.filters.http.router"], names

    ea = filters[1]["typed_config"]
    assert ea["@type"] == EXT_AUTHZ_TYPE
    assert ea["transport_api_version"] == "V3"
    assert ea["failure_mode_allow"] is False
    assert ea["status_on_error"]["code"] in (503, "ServiceUnavailable")
    assert ea["grpc_service"]["envoy_grpc"]["cluster_name"] == "authz_service"
    assert "http_service" not in ea
    # A timeout is set and leaves room for a ~3 s JWKS refetch, but is bounded.
    timeout = ea["grpc_service"]["timeout"]
    assert timeout.endswith("s")
    assert 3.0 < float(timeout[:-1]) <= 10.0
    # Body is never buffered/sent to authz; all request headers are sent.
    assert "with_request_body" not in ea
    assert "allowed_headers" not in ea
    assert ea.get("failure_mode_allow_header_add") in (None, False)




@pytest.mark.e2e
@needs_envoy
def test_shipped_http_mode_config_passes_envoy_validate() -> None:
    res = _validate(HTTP_ENVOY_CONFIG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "deprecated" not in (res.stdout + res.stderr).lower()


@pytest.mark.e2e
@needs_envoy
@pytest.mark.parametrize("source", [SHIPPED_ENVOY_CONFIG, HTTP_ENVOY_CONFIG], ids=["grpc", "http"])
def test_per_client_recipe_applied_to_a_shipped_config_passes_envoy_validate(source, tmp_path) -> None:
    """envoy/examples/per-client-ratelimit.yaml, pasted where its comment says, as shipped."""
    cfg = load_shipped_config(source)
    envoyconf.with_per_client_limits(cfg, yaml.safe_load(PER_CLIENT_RECIPE.read_text()))
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _validate(path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "deprecated" not in (res.stdout + res.stderr).lower()


def test_per_client_filter_is_inert_as_shipped_and_the_recipe_reads_the_verified_header() -> None:
    """The shipped filter limits nothing (no bucket of its own, no route or virtual host configures
    it); the recipe keys on the header the authz service sets and lets no client share a bucket."""
    cfg = load_shipped_config()
    assert envoyconf.http_filter(cfg, envoyconf.PER_CLIENT_FILTER) == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "per_client"}
    host = envoyconf.virtual_host(cfg)
    assert all(envoyconf.PER_CLIENT_FILTER not in item.get("typed_per_filter_config", {})
               for item in (host, *host["routes"]))
    block = yaml.safe_load(PER_CLIENT_RECIPE.read_text())["typed_per_filter_config"][envoyconf.PER_CLIENT_FILTER]
    assert block["rate_limits"] == [{"actions": [{"request_headers": {
        "header_name": "x-auth-client-id", "descriptor_key": "client_id"}}]}]
    assert block["always_consume_default_token_bucket"] is False
    assert block["enable_retry_after_header"] is True
    for fraction in ("filter_enabled", "filter_enforced"):
        assert block[fraction]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}


def test_operations_docs_show_the_recipe_as_shipped() -> None:
    """The block docs/operations.md shows (without the file's comments) is the recipe's, value for value."""
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = docs[docs.index("## Per-client rate limits"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    snippet = section[start:section.index("\n```", start)]
    shown = yaml.safe_load(textwrap.dedent(snippet))["virtual_hosts"][0]
    assert shown["typed_per_filter_config"] == yaml.safe_load(PER_CLIENT_RECIPE.read_text())["typed_per_filter_config"]


def _without_authz_transport(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config minus what legitimately differs between the gRPC and HTTP modes."""
    cfg = json.loads(json.dumps(cfg))
    for f in envoyconf.http_filters(cfg):
        if f["name"] == "envoy.filters.http.ext_authz":
            for key in ("grpc_service", "http_service", "allowed_headers"):
                f["typed_config"].pop(key, None)
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"]
                                           if c["name"] != "authz_service"]
    return cfg


def test_http_mode_config_differs_only_in_the_authz_transport() -> None:
    """Every hardening setting (paths, admission, timeouts, overload, logs, health listener) is
    the same in both modes: only the ext_authz transport and its cluster differ."""
    grpc_mode, http_mode = load_shipped_config(), load_shipped_config(HTTP_ENVOY_CONFIG)
    assert _without_authz_transport(http_mode) == _without_authz_transport(grpc_mode)
    ea = next(f for f in envoyconf.http_filters(http_mode) if f["name"] == "envoy.filters.http.ext_authz")
    service = ea["typed_config"]["http_service"]
    assert service["server_uri"]["cluster"] == "authz_service"
    assert ea["typed_config"]["failure_mode_allow"] is False
    assert {p["exact"] for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]} == {
        "x-auth-client-id", "x-auth-scopes", "x-auth-sub"}
    cluster = envoyconf.cluster(http_mode, "authz_service")
    assert "typed_extension_protocol_options" not in cluster, "plain HTTP/1.1 to the HTTP front door"
    limits = cluster["circuit_breakers"]["thresholds"][0]
    assert limits["max_requests"] == envoyconf.cluster(grpc_mode, "authz_service")["circuit_breakers"]["thresholds"][0][
        "max_requests"]


def test_hcm_path_hardening() -> None:
    hcm = envoyconf.hcm(load_shipped_config())
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    # Deliberately ALLOW (authz service strips spoofed identity headers in
    # both spellings); if someone changes it, they must update the comment too.
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "ALLOW"
    assert hcm.get("generate_request_id", True) is True
    (log,) = hcm["access_log"]
    assert log["name"] == "envoy.access_loggers.stdout"
    assert "json_format" in log["typed_config"]["log_format"]
    # Everything routes to the app cluster (the routes differ in admission only).
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    assert all(r["route"]["cluster"] == "app" for r in vhost["routes"])
    assert vhost["routes"][-1]["match"] == {"prefix": "/"}


def test_ingress_admission_limits_are_explicit() -> None:
    """The values the e2e admission tests exercise, and the ones they cannot (too slow to wait
    for), are set explicitly instead of left at Envoy's generous defaults."""
    cfg = load_shipped_config()
    hcm = envoyconf.hcm(cfg)
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["stream_idle_timeout"] == "60s"
    assert hcm["common_http_protocol_options"]["idle_timeout"] == "90s"
    assert "max_connection_duration" in hcm["common_http_protocol_options"]
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] <= 128
    assert hcm["max_request_headers_kb"] <= 32
    assert envoyconf.listener(cfg, "ingress")["per_connection_buffer_limit_bytes"] <= 65536

    monitors = {m["name"]: m["typed_config"] for m in cfg["overload_manager"]["resource_monitors"]}
    assert 0 < monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] <= 4096
    actions = {a["name"] for a in cfg["overload_manager"]["actions"]}
    assert {"envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests",
            "envoy.overload_actions.reset_high_memory_stream"} <= actions

    breakers = envoyconf.cluster(cfg, "authz_service")["circuit_breakers"]["thresholds"]
    (default,) = [t for t in breakers if t.get("priority", "DEFAULT") == "DEFAULT"]
    for name in ("max_requests", "max_pending_requests", "max_connections"):
        assert 0 < default[name] < 1024, name  # 1024 is Envoy's default: explicit and smaller


def test_access_log_never_writes_query_strings_or_free_text_headers() -> None:
    (log,) = envoyconf.hcm(load_shipped_config())["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    values = " ".join(str(v) for v in fields.values())
    assert fields["path"] == "%PATH(NQ:PATH)%"  # no query; :path itself, not x-envoy-original-path
    assert "%REQ(:PATH)%" not in values and "%PATH%" not in values and "WQ" not in values
    assert "USER-AGENT" not in values.upper() and "AUTHORIZATION" not in values.upper()


def test_clusters_admin_and_ports() -> None:
    cfg = load_shipped_config()
    admin = cfg["admin"]["address"]["socket_address"]
    assert (admin["address"], admin["port_value"]) == ("127.0.0.1", 9901)
    assert [l["name"] for l in cfg["static_resources"]["listeners"]] == ["ingress", "envoy-health"]
    sa = envoyconf.listener(cfg, "ingress")["address"]["socket_address"]
    assert (sa["address"], sa["port_value"]) == ("0.0.0.0", 8080)
    health = envoyconf.listener(cfg, "envoy-health")
    sa = health["address"]["socket_address"]
    assert (sa["address"], sa["port_value"]) == ("0.0.0.0", 9902)
    # The health listener reaches only the admin interface, and no HTTP filter but the router
    # (no ext_authz: probes must not depend on the authz service).
    assert envoyconf.endpoint(cfg, "envoy_admin") == {"address": "127.0.0.1", "port_value": 9901}
    assert [f["name"] for f in envoyconf.http_filters(cfg, "envoy-health")] == ["envoy.filters.http.router"]
    (vhost,) = envoyconf.hcm(cfg, "envoy-health")["route_config"]["virtual_hosts"]
    assert {r["route"]["cluster"] for r in vhost["routes"] if "route" in r} == {"envoy_admin"}

    assert envoyconf.endpoint(cfg, "authz_service") == {"address": "127.0.0.1", "port_value": 9191}
    authz = envoyconf.cluster(cfg, "authz_service")
    opts = authz["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]

    assert envoyconf.endpoint(cfg, "app") == {"address": "127.0.0.1", "port_value": 8000}


@pytest.mark.e2e
@needs_envoy
def test_rendered_config_changes_only_ports(tmp_path) -> None:
    ports = dict(listener_port=18080, admin_port=19901, authz_port=19191, app_port=18000, health_port=19902)
    rendered = render_envoy_config(tmp_path, **ports)
    got = yaml.safe_load(rendered.read_text())
    assert envoyconf.endpoint(got, "envoy_admin")["port_value"] == 19901  # follows the admin port
    # Put the shipped ports back: the result must equal the shipped config.
    restored = rewrite_ports(got, listener_port=8080, admin_port=9901, authz_port=9191, app_port=8000,
                             health_port=9902)
    assert restored == load_shipped_config()
    assert got != load_shipped_config()
    res = _validate(rendered)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- #
# live: fail closed with no authz service
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def closed_envoy(module_envoy_factory) -> EnvoyProcess:
    """Shipped config; authz_service points at a port where nothing listens."""
    return module_envoy_factory(free_port(), name="envoy-no-authz")


def _assert_upstream_works(upstream: UpstreamProcess) -> None:
    # Prove the request log is live, so "zero requests" below means something.
    before = upstream.mark()
    status, _, _ = http_request("GET", upstream.url("/direct-probe"))
    assert status == 200
    assert [r["path"] for r in upstream.requests_since(before)] == ["/direct-probe"]


@pytest.mark.e2e
def test_http_request_sends_raw_targets_and_repeated_headers(upstream: UpstreamProcess) -> None:
    status, headers, body = http_request(
        "GET",
        upstream.url("//transactions/%2e%2e/x"),
        [("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
    )
    assert status == 200
    echo = json.loads(body)
    assert echo["path"] == "//transactions/%2e%2e/x"
    assert echo["headers"]["authorization"] == ["Bearer a", "Bearer b"]
    assert ("content-type", "application/json") in [(k.lower(), v) for k, v in headers]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "method,target,headers,body",
    [
        ("GET", "/", [], None),
        ("GET", "/transactions", [("Authorization", "Bearer not-a-real-token")], None),
        ("POST", "/transactions", [("Authorization", "Bearer x"), ("Content-Type", "application/json")], b'{"a": 1}'),
        ("DELETE", "//admin/../transactions", [], None),
        ("GET", "/healthz", [], None),
    ],
)
def test_unreachable_authz_is_503_and_nothing_reaches_app(
    closed_envoy: EnvoyProcess, upstream: UpstreamProcess, method, target, headers, body
) -> None:
    _assert_upstream_works(upstream)
    before = upstream.mark()
    status, _, _ = http_request(method, closed_envoy.url(target), headers, body)
    assert status == 503, closed_envoy.log_tail()
    assert upstream.requests_since(before) == []


@pytest.mark.e2e
def test_fail_closed_is_ext_authz_error_in_access_log_and_stats(
    closed_envoy: EnvoyProcess, upstream: UpstreamProcess
) -> None:
    before = upstream.mark()
    status, _, _ = http_request("GET", closed_envoy.url("/access-log-probe"))
    assert status == 503
    entry = closed_envoy.wait_until(
        lambda: [e for e in closed_envoy.access_log() if e.get("path") == "/access-log-probe"],
        60,
        "access-log line for /access-log-probe",
    )[-1]
    assert entry["response_code"] == 503
    assert entry["response_code_details"] == "ext_authz_error"
    assert entry["request_id"]  # generated by the HCM
    stats = closed_envoy.stats(r"ext_authz")
    assert stats.get("http.ingress_http.ext_authz.error", 0) >= 1
    assert stats.get("http.ingress_http.ext_authz.failure_mode_allowed", 0) == 0
    assert upstream.requests_since(before) == []


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["/a%2Fb", "/a%2fb", "/a%5Cb", "/x/..%2fadmin"])
def test_escaped_slashes_are_rejected_before_authz(
    closed_envoy: EnvoyProcess, upstream: UpstreamProcess, target
) -> None:
    before = upstream.mark()
    errors_before = closed_envoy.stats(r"ext_authz").get("http.ingress_http.ext_authz.error", 0)
    status, _, _ = http_request("GET", closed_envoy.url(target))
    assert status == 400  # REJECT_REQUEST: never reaches ext_authz (else 503)
    assert closed_envoy.stats(r"ext_authz").get("http.ingress_http.ext_authz.error", 0) == errors_before
    assert upstream.requests_since(before) == []
