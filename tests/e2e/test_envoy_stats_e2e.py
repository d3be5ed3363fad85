"""The Envoy series the alerts rely on exist, under the names and labels the rules select, in what a
real Envoy serves on the envoy-health listener's /stats/prometheus (the ServiceMonitor's
authz-envoy job) for both shipped configs; and a request Envoy fails closed on is counted there.

Nothing listens on the authz port, as when authz-service has crashed. Native mode's Envoy (the
compiled bootstrap) exports them too: the alerts read them in every mode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..test_alerts import ENVOY_SERIES
from .harness import (
    ENVOY_CONFIGS,
    MODES,
    REPO_ROOT,
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
    """(name, label, value) -> sample value, for every one-label sample, with the names exactly as
    exposed (what Prometheus stores; prometheus_client's parser would add ``_total`` to counters)."""
    out = {}
    for name, label, value, sample in re.findall(r'^(\w+)\{(\w+)="([^"]*)"\} (\S+)$', text, re.MULTILINE):
        out[(name, label, value)] = float(sample)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_alerted_envoy_series_exist_and_count_a_fail_closed_request(tmp_path: Path, upstream: UpstreamProcess,
                                                                    mode: str) -> None:
    path = render_envoy_config(tmp_path, listener_port=free_port(), admin_port=free_port(),
                               authz_port=free_port(), app_port=upstream.port,
                               source=ENVOY_CONFIGS[mode])
    envoy = start_envoy(path, tmp_path)
    try:
        status, _, _ = http_request("GET", envoy.url("/transactions/1"), [("Authorization", "Bearer a.b.c")])
        assert status == 503
        status, _, body = http_request("GET", envoy.health_url("/stats/prometheus"))
        assert status == 200
        exported = samples(body.decode())
        missing = [name for name, (label, value) in ENVOY_SERIES.items() if (name, label, value) not in exported]
        assert not missing, f"{ENVOY_CONFIGS[mode].name}: Envoy exports no {missing}"
        assert exported[("envoy_http_ext_authz_error", "envoy_http_conn_manager_prefix", "ingress_http")] == 1
        assert exported[("envoy_http_ext_authz_failure_mode_allowed", "envoy_http_conn_manager_prefix",
                         "ingress_http")] == 0
    finally:
        envoy.stop()


def test_alerted_envoy_series_exist_in_native_mode_and_count_a_fail_closed_request(
        tmp_path: Path, upstream: UpstreamProcess) -> None:
    """A token jwt_authn cannot verify goes to the service through ext_authz, which fails closed
    and is counted as in the other modes; a request Envoy decides itself is in its decisions."""
    path = render_native_config(tmp_path, REPO_ROOT / "authz_service" / "examples" / "policy.yaml",
                                listener_port=free_port(), admin_port=free_port(), app_port=upstream.port,
                                grpc_port=free_port(), http_port=free_port())
    envoy = start_envoy(path, tmp_path)
    try:
        status, _, _ = http_request("GET", envoy.url("/transactions/1"), [("Authorization", "Bearer a.b.c")])
        assert status == 503
        status, _, _ = http_request("GET", envoy.url("/transactions/1"))
        assert status == 401  # Envoy's own answer: no token
        status, _, body = http_request("GET", envoy.health_url("/stats/prometheus"))
        assert status == 200
        exported = samples(body.decode())
        missing = [name for name, (label, value) in ENVOY_SERIES.items() if (name, label, value) not in exported]
        assert not missing, f"native: Envoy exports no {missing}"
        assert exported[("envoy_http_ext_authz_error", "envoy_http_conn_manager_prefix", "ingress_http")] == 1
        assert exported[("envoy_http_ext_authz_failure_mode_allowed", "envoy_http_conn_manager_prefix",
                         "ingress_http")] == 0
        assert 'envoy_authz_native_decisions{decision="deny",reason="missing_token",route="get-transaction",' \
               'status="401"} 1' in body.decode()
    finally:
        envoy.stop()
