"""The Envoy series the alerts rely on exist, under the names and labels the rules select, in what a
real Envoy serves on the envoy-health listener's /stats/prometheus (the ServiceMonitor's
authz-envoy job) for both shipped configs and native mode's bootstrap; and a request Envoy fails
closed on is counted there. (Native mode's xDS form: tests/e2e/test_native_xds_e2e.py.)

Nothing listens on the authz port, as when authz-service has crashed.

And what AuthzEnvoyHeapShedding is built on: an Envoy whose heap is past 95% of its cap refuses
the app's requests and the envoy-health listener's scrapes alike, and counts what it refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from authz_service.native.sizing import HEAP_MONITOR

from ..test_alerts import ENVOY_HEAP_SERIES, ENVOY_SERIES
from ..test_native import EXAMPLE_POLICY
from .harness import (
    ENVOY_CONFIGS,
    MODES,
    UpstreamProcess,
    envoy_binary,
    free_port,
    http_request,
    render_envoy_config,
    render_native_config,
    start_envoy,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")]


def samples(text: str) -> dict[tuple[str, str, str], float]:
    """(name, label, value) -> sample value, for every sample with one label or none (("name", "", ""):
    Envoy's own series, such as the overload manager's), with the names exactly as exposed (what
    Prometheus stores; prometheus_client's parser would add ``_total`` to counters)."""
    out = {}
    for name, label, value, sample in re.findall(r'^(\w+)\{(?:(\w+)="([^"]*)")?\} (\S+)$', text, re.MULTILINE):
        out[(name, label, value)] = float(sample)
    return out


def missing_series(exported: dict[tuple[str, str, str], float]) -> list[str]:
    """The alerted Envoy series (test_alerts.py) a scrape lacks."""
    wanted = [(name, *selector) for name, selector in ENVOY_SERIES.items()]
    wanted += [(name, "", "") for name in ENVOY_HEAP_SERIES]
    return [name for name, label, value in wanted if (name, label, value) not in exported]


@pytest.mark.parametrize("mode", MODES)
def test_alerted_envoy_series_exist_and_count_a_fail_closed_request(tmp_path: Path, upstream: UpstreamProcess,
                                                                    mode: str) -> None:
    path = render_envoy_config(tmp_path, listener_port=free_port(), admin_port=free_port(),
                               authz_port=free_port(), app_port=upstream.port,
                               source=ENVOY_CONFIGS[mode])
    envoy = start_envoy(path, tmp_path)
    try:
        scrape_after_failing_closed(envoy, ENVOY_CONFIGS[mode].name)
    finally:
        envoy.stop()


def scrape_after_failing_closed(envoy, what: str) -> str:
    """A token sent to ext_authz with nothing listening: Envoy fails closed (503), and its scrape
    holds every alerted series, that request counted as an ext_authz error (not allowed). The scrape."""
    status, _, _ = http_request("GET", envoy.url("/transactions/1"), [("Authorization", "Bearer a.b.c")])
    assert status == 503
    status, _, body = http_request("GET", envoy.health_url("/stats/prometheus"))
    assert status == 200
    exported = samples(body.decode())
    missing = missing_series(exported)
    assert not missing, f"{what}: Envoy exports no {missing}"
    assert exported[("envoy_http_ext_authz_error", "envoy_http_conn_manager_prefix", "ingress_http")] == 1
    assert exported[("envoy_http_ext_authz_failure_mode_allowed", "envoy_http_conn_manager_prefix",
                     "ingress_http")] == 0
    return body.decode()


def test_alerted_envoy_series_exist_in_native_mode_and_count_a_fail_closed_request(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    """The bootstrap `compile envoy` emits (native mode), the service not running: the ext_authz,
    circuit-breaker and heap series the rules read, under the same names and labels. A token
    jwt_authn cannot verify goes to the service through ext_authz, which fails closed and is counted
    as in the other modes; a request Envoy decides itself is in its decisions."""
    path = render_native_config(tmp_path, EXAMPLE_POLICY, listener_port=free_port(), admin_port=free_port(),
                                app_port=upstream.port, grpc_port=free_port(), http_port=free_port())
    envoy = start_envoy(path, tmp_path)
    try:
        status, _, _ = http_request("GET", envoy.url("/transactions/1"))
        assert status == 401  # Envoy's own answer: no token
        body = scrape_after_failing_closed(envoy, "native bootstrap")
        assert 'envoy_authz_native_decisions{decision="deny",reason="missing_token",route="get-transaction",' \
               'status="401"} 1' in body
    finally:
        envoy.stop()


def test_an_envoy_past_its_heap_cap_refuses_requests_and_scrapes_and_counts_them(envoy_factory) -> None:
    """The shipped config with its heap cap below what Envoy holds at rest: the overload manager
    turns stop_accepting_requests on, and the tcp_listener_accept load-shed point closes every new
    connection, the envoy-health listener's too (no scrape, no readiness: why AuthzEnvoyHeapShedding
    also reads a target gone down at a high heap). The admin interface still answers, and counts."""

    def tiny_heap_cap(config: dict) -> None:
        (monitor,) = [m for m in config["overload_manager"]["resource_monitors"] if m["name"] == HEAP_MONITOR]
        monitor["typed_config"]["max_heap_size_bytes"] = 1 << 20  # 1 MiB: Envoy holds ~6 MB at rest

    envoy = envoy_factory(free_port(), edit=tiny_heap_cap)

    def overload() -> dict[str, int]:
        return envoy.stats("^overload\\.")

    envoy.wait_until(lambda: overload().get(
        "overload.envoy.overload_actions.stop_accepting_requests.active") == 1, 30, "stop_accepting_requests on")
    assert overload()["overload.envoy.resource_monitors.fixed_heap.pressure"] >= 95
    for url in (envoy.url("/transactions/1"), envoy.health_url("/stats/prometheus"), envoy.health_url("/ready")):
        with pytest.raises(ConnectionError):  # closed at accept: reset, or closed before an answer (not a timeout)
            http_request("GET", url, timeout=30)
    assert overload()["overload.envoy.load_shed_points.tcp_listener_accept.shed_load_count"] >= 3
