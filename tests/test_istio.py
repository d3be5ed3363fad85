"""deploy/istio, checked offline as far as offline tools allow.

* Every kustomization renders (``kubectl kustomize``): deploy/istio, its mesh/, sidecar/, http/
  and ambient/ parts.
* Core objects validate against the Kubernetes schemas (kubernetes-validate, strict); Istio's
  objects against typed models of Istio's own CRDs (cloudcoil-models-istio, generated from the CRD
  schemas, as the prometheus-operator models are for the ServiceMonitor): a bad enum or type is an
  error, and a misspelt field, which a model drops as the API server would, fails the round trip.
  (Their CEL rules are not evaluated.) The waypoint Gateway is checked structurally.
* deploy/istio/mesh-config.yaml uses only the MeshConfig fields and values Istio documents
  (a hand-kept list, below, with the Istio reference it follows).
* The providers carry what the service needs (every header spelling, the identity headers, fail
  closed, 503, the shipped timeout) and point at the ServiceEntries, ports and path prefix the
  manifests configure.
* The Envoy fixtures the e2e tests run (tests/data/istio/sidecar-inbound-*.yaml) are what Istio
  renders from these providers and this AuthorizationPolicy: ``istio_ext_authz`` below follows
  pilot/pkg/security/authz/builder/extauthz.go (1.30.3) field by field.
* Ambient's ValidatingAdmissionPolicy (who may run as the waypoint): its CEL is evaluated with
  cel-python on Istio's chain and on what anyone else might create, change or debug.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service.request import IDENTITY_HEADERS, override_spellings

from . import envoyconf
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
from .test_request import every_spelling

ROOT = Path(__file__).resolve().parent.parent
ISTIO = ROOT / "deploy" / "istio"
DATA = ROOT / "tests" / "data" / "istio"  # the Envoy fixtures of an Istio sidecar (their README)
KUSTOMIZATIONS = ["", "mesh", "sidecar", "http", "ambient"]
MESH = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())["meshConfig"]
EXT_AUTHZ = "envoy.filters.http.ext_authz"
SHIPPED_HTTP = yaml.safe_load((ROOT / "envoy" / "envoy-http.yaml").read_text())
ISTIO_KINDS = {"AuthorizationPolicy", "ServiceEntry", "DestinationRule"}


def render(part: str) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "apt-get install -y kubectl (or any kubectl >= 1.27 with built-in kustomize)")
    result = run([kubectl, "kustomize", str(ISTIO / part)])
    assert result.returncode == 0, f"kubectl kustomize deploy/istio/{part} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {part: render(part) for part in KUSTOMIZATIONS}


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def provider(name: str) -> dict[str, Any]:
    (found,) = [p for p in MESH["extensionProviders"] if p["name"] == name]
    return found


# --- schemas -------------------------------------------------------------------------------------


def istio_errors(doc: dict[str, Any]) -> list[str]:
    """What Istio's CRD schema refuses in ``doc`` (typed models), and any field it would drop."""
    from pydantic import ValidationError

    from cloudcoil.models.istio.networking.v1 import DestinationRule, ServiceEntry
    from cloudcoil.models.istio.security.v1 import AuthorizationPolicy

    models = {"security.istio.io/v1/AuthorizationPolicy": AuthorizationPolicy,
              "networking.istio.io/v1/ServiceEntry": ServiceEntry,
              "networking.istio.io/v1/DestinationRule": DestinationRule}
    key = f"{doc['apiVersion']}/{doc['kind']}"
    assert key in models, f"no Istio model for {key}"
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    try:
        back = models[key].model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as exc:
        return [f"{name}: {error['msg']} at {list(error['loc'])}" for error in exc.errors()]
    return [] if back == doc else [f"{name}: a field the CRD does not know would be dropped"]


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_core_objects_validate_against_kubernetes_schemas(rendered, version: str) -> None:
    errors = [f"deploy/istio/{part} {error}" for part, docs in rendered.items()
              for error in kubernetes_schema_errors([d for d in docs if "istio.io" not in d["apiVersion"]
                                                     and not d["apiVersion"].startswith(("monitoring.coreos.com",
                                                                                         "gateway.networking.k8s.io"))],
                                                    version)]
    assert not errors, "\n".join(errors)


def test_istio_objects_validate_against_istio_crd_schemas(rendered) -> None:
    docs = [d for part in rendered.values() for d in part if "istio.io" in d["apiVersion"]]
    assert {d["kind"] for d in docs} == ISTIO_KINDS
    errors = [e for d in docs for e in istio_errors(d)]
    assert not errors, "\n".join(errors)


def test_istio_schema_check_catches_mistakes(rendered) -> None:
    policy = one(rendered["sidecar"], "AuthorizationPolicy")
    typo = copy.deepcopy(policy)
    typo["spec"]["rules"][0]["to"][0]["operation"]["port"] = ["8000"]
    bad_action = copy.deepcopy(policy)
    bad_action["spec"]["action"] = "EXTERNAL"
    entry = one(rendered["mesh"], "ServiceEntry", "authz-local-grpc")
    bad_resolution = copy.deepcopy(entry)
    bad_resolution["spec"]["resolution"] = "STATIK"
    for bad in (typo, bad_action, bad_resolution):
        assert istio_errors(bad), bad["spec"]


def test_service_monitor_matches_the_crd_model(rendered) -> None:
    models = _operator_models()
    monitor = one(rendered["sidecar"], "ServiceMonitor")
    assert models.ServiceMonitor.model_validate(monitor).model_dump(by_alias=True, exclude_unset=True,
                                                                    mode="json") == monitor


def test_sidecar_service_monitor_labels_the_app(rendered) -> None:
    monitor = one(rendered["sidecar"], "ServiceMonitor")
    (service,) = [s for s in rendered["sidecar"] if s["kind"] == "Service"
                  and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert scrape_labels(monitor, endpoint, service=service["metadata"]["labels"]) == \
        {"job": "authz-service", "app": "echo-app"}


def test_ambient_pod_monitor_scrapes_every_authz_service_with_its_app(rendered) -> None:
    """Ambient has no sidecar and no metrics Service: a PodMonitor scrapes each authz-service Pod
    (unready ones too: the pod role lists every running Pod), job authz-service, app = the app that
    instance serves (its Pods' app.kubernetes.io/instance)."""
    docs = rendered["ambient"]
    monitor = one(docs, "PodMonitor")
    models = _operator_models()
    assert models.PodMonitor.model_validate(monitor).model_dump(by_alias=True, exclude_unset=True,
                                                                mode="json") == monitor
    deployments = [d for d in docs if d["kind"] == "Deployment"
                   and selects(monitor["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
    assert deployments and all(d["metadata"]["namespace"] == monitor["metadata"]["namespace"] for d in deployments)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert ports[endpoint["port"]] == 8181
        labels = pod["metadata"]["labels"]
        assert scrape_labels(monitor, endpoint, pod=labels) == {"job": "authz-service",
                                                                "app": labels["app.kubernetes.io/instance"]}
    (scrape,) = [r for r in one(docs, "NetworkPolicy")["spec"]["ingress"]
                 if [p["port"] for p in r["ports"]] == [endpoint["port"]]]
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_ambient_runs_one_authz_service_per_app(rendered) -> None:
    """One path-only policy serves every app that reaches it, so each app gets its own instance:
    Deployment, Service, policy ConfigMap and provider, named after the app, and a CUSTOM policy on
    the app's Service naming that provider; who may call it and who may scrape it select it alone."""
    docs = rendered["ambient"]
    customs = [d for d in docs if d["kind"] == "AuthorizationPolicy" and d["spec"].get("action") == "CUSTOM"]
    assert customs
    for custom in customs:
        (target,) = custom["spec"]["targetRefs"]
        app = target["name"]
        name = f"{app}-authz"
        assert custom["spec"]["provider"]["name"] == f"{name}-waypoint"
        settings = provider(f"{name}-waypoint")["envoyExtAuthzGrpc"]
        deployment = one(docs, "Deployment", name)
        namespace = deployment["metadata"]["namespace"]
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == app
        service = one(docs, "Service", name)
        assert settings["service"] == f"{namespace}/{name}.{namespace}.svc.cluster.local"
        assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["authz-policy"]["configMap"]["name"] == f"{name}-policy"
        assert one(docs, "ConfigMap", f"{name}-policy")["metadata"]["namespace"] == namespace
        others = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["namespace"] == namespace
                  and d is not deployment]
        for selector in (service["spec"]["selector"], one(docs, "PodDisruptionBudget", name)["spec"]["selector"]
                         ["matchLabels"], one(docs, "AuthorizationPolicy", f"{name}-callers")["spec"]["selector"]
                         ["matchLabels"]):
            assert selects(selector, pod["metadata"]["labels"])
            assert not any(selects(selector, o["spec"]["template"]["metadata"]["labels"]) for o in others)


def test_waypoint_gateway_structure(rendered) -> None:
    gateway = one(rendered["ambient"], "Gateway")
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gateway["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    namespace = one(rendered["ambient"], "Namespace", gateway["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["istio.io/use-waypoint"] == gateway["metadata"]["name"]
    assert namespace["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"


# --- MeshConfig -------------------------------------------------------------------------------------

# The MeshConfig fields deploy/istio sets, as Istio's MeshConfig reference documents them
# (https://istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/, checked for 1.28-1.30).
MESH_FIELDS = {"extensionProviders", "pathNormalization"}
PROVIDER_FIELDS = {"name", "envoyExtAuthzGrpc", "envoyExtAuthzHttp"}
GRPC_PROVIDER_FIELDS = {"service", "port", "timeout", "failOpen", "statusOnError", "clearRouteCache",
                        "includeRequestBodyInCheck", "pathPrefix"}
HTTP_PROVIDER_FIELDS = {"service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
                        "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck",
                        "includeRequestBodyInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnDeny",
                        "headersToDownstreamOnAllow", "clearRouteCache"}
NORMALIZATIONS = {"DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"}


def mesh_config_errors(mesh: dict[str, Any]) -> list[str]:
    errors = [f"unknown MeshConfig field {k!r}" for k in mesh if k not in MESH_FIELDS]
    normalization = mesh.get("pathNormalization", {})
    errors += [f"unknown pathNormalization field {k!r}" for k in normalization if k != "normalization"]
    if normalization.get("normalization", "DEFAULT") not in NORMALIZATIONS:
        errors.append(f"unknown normalization {normalization['normalization']!r}")
    for provider in mesh.get("extensionProviders", []):
        errors += [f"{provider.get('name')}: unknown provider field {k!r}" for k in provider if k not in PROVIDER_FIELDS]
        for kind, known in (("envoyExtAuthzGrpc", GRPC_PROVIDER_FIELDS), ("envoyExtAuthzHttp", HTTP_PROVIDER_FIELDS)):
            errors += [f"{provider['name']}: unknown {kind} field {k!r}" for k in provider.get(kind, {}) if k not in known]
            if kind in provider and not isinstance(provider[kind].get("port"), int):
                errors.append(f"{provider['name']}: {kind}.port must be a number")
    return errors


def test_mesh_config_uses_only_documented_fields_and_values() -> None:
    assert mesh_config_errors(MESH) == []
    assert MESH["pathNormalization"]["normalization"] == "MERGE_SLASHES"


@pytest.mark.parametrize("mistake", [
    {"pathNormalization": {"normalization": "MERGE_SLASH"}},
    {"extensionProviders": [{"name": "x", "envoyExtAuthzGrpc": {"includeRequestHeadersInCheck": ["a"], "port": 1}}]},
    {"extensionProviders": [{"name": "x", "envoyExtAuthzHttp": {"failopen": False, "port": 1}}]},
    {"extensionProviders": [{"name": "x", "envoyExtAuthzHttp": {"port": "9192"}}]},
    {"meshConfig": {}},
])
def test_mesh_config_check_catches_mistakes(mistake: dict[str, Any]) -> None:
    assert mesh_config_errors(mistake)


# --- providers against the service and the manifests ------------------------------------------------------


def test_providers_fail_closed_with_503_and_the_shipped_timeout() -> None:
    shipped_timeout = envoyconf.http_filter(SHIPPED_HTTP, EXT_AUTHZ)["http_service"]["server_uri"]["timeout"]
    names = [p["name"] for p in MESH["extensionProviders"]]
    for entry in MESH["extensionProviders"]:
        (settings,) = [v for k, v in entry.items() if k.startswith("envoyExtAuthz")]
        assert settings["failOpen"] is False and settings["statusOnError"] == "503", entry["name"]
        assert settings["timeout"] == shipped_timeout, entry["name"]
        assert "includeRequestBodyInCheck" not in settings, "bodies are never sent"
        # Istio 1.30 enables a provider's ext_authz on the prefix "istio-ext-authz-<name>".
        assert not [n for n in names if n != entry["name"] and n.startswith(entry["name"])], entry["name"]


def _forwarded(patterns: list[dict[str, Any]], name: str) -> bool:
    """Whether Envoy's allowed_headers patterns (every one ignore_case, as Istio renders them) take ``name``."""
    lowered = name.lower()
    return any(lowered == p["exact"].lower() if "exact" in p else
               lowered.startswith(p["prefix"].lower()) if "prefix" in p else lowered.endswith(p["suffix"].lower())
               for p in patterns)


def test_http_provider_sends_every_header_the_service_refuses_or_strips() -> None:
    """Every spelling of an identity or override header, with any separator in place of each '-'
    (x_auth.sub as PHP reads it, x~auth~sub as lighttpd does), in any case; no trace context (Envoy
    sends its own span's, a client's must not pass for it) and nothing else the service does not read."""
    http = provider("authz-service-http")["envoyExtAuthzHttp"]
    names = http["includeRequestHeadersInCheck"]
    assert len(names) == len(set(names))
    patterns = _headers(names)["patterns"]
    for header in (*IDENTITY_HEADERS, *override_spellings()):
        for spelled in every_spelling(header):
            assert _forwarded(patterns, spelled) and _forwarded(patterns, spelled.upper()), spelled
    assert _forwarded(patterns, "authorization") and _forwarded(patterns, "x-request-id")
    for name in ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-sampled", "x-cloud-trace-context",
                 "grpc-trace-bin", "uber-trace-id", "x-datadog-trace-id", "x-ot-span-context", "x-forwarded-for",
                 "cookie", "content-type", "x-envoy-original-path", "xauth-sub", "x-api-key"):
        assert not _forwarded(patterns, name), name
    assert http["headersToUpstreamOnAllow"] == list(IDENTITY_HEADERS)
    ea = envoyconf.http_filter(SHIPPED_HTTP, EXT_AUTHZ)
    assert http["headersToDownstreamOnDeny"] == [p["exact"] for p in ea["http_service"]["authorization_response"][
        "allowed_client_headers"]["patterns"]], "what a denied client sees: as envoy/envoy-http.yaml"


def test_providers_point_at_the_service_entries_and_ports(rendered) -> None:
    entries = {e["spec"]["hosts"][0]: e for e in rendered["mesh"] if e["kind"] == "ServiceEntry"}
    patch_env = env_of(container(one(rendered["sidecar"], "Deployment")["spec"]["template"]["spec"], "authz-service"))
    wanted_ports = {"authz-service-grpc": int(patch_env["AUTHZ_GRPC_PORT"]),
                    "authz-service-http": int(patch_env["AUTHZ_EXT_AUTHZ_HTTP_PORT"])}
    for name, port in wanted_ports.items():
        (settings,) = [v for k, v in provider(name).items() if k.startswith("envoyExtAuthz")]
        namespace, host = settings["service"].split("/")
        entry = entries[host]
        assert entry["metadata"]["namespace"] == namespace and entry["spec"]["exportTo"] == ["*"]
        assert entry["spec"]["resolution"] == "STATIC"
        assert entry["spec"]["endpoints"] == [{"address": "127.0.0.1"}], "the calling Pod itself"
        assert [p["number"] for p in entry["spec"]["ports"]] == [settings["port"]] == [port]
    assert patch_env["AUTHZ_GRPC_HOST"] == "127.0.0.1", "only the Pod's own sidecar may call Check"
    assert patch_env["AUTHZ_EXT_AUTHZ_HTTP_PATH_PREFIX"] == provider("authz-service-http")["envoyExtAuthzHttp"][
        "pathPrefix"]
    rules = {d["spec"]["host"]: d for d in rendered["mesh"] if d["kind"] == "DestinationRule"}
    assert set(rules) == set(entries) - {h for h in entries if h.startswith("cognito-idp.")}
    assert all(r["spec"]["trafficPolicy"]["tls"]["mode"] == "DISABLE" for r in rules.values())


def test_http_provider_and_the_sidecars_front_door_agree_on_the_path(rendered) -> None:
    """The Envoy config Istio renders from the HTTP provider (the fixture, checked against the
    provider below) and the sidecar's authz-service agree on the path prefix and the original-path
    header: a disagreement would refuse every HTTP-mode request."""
    env = env_of(container(one(rendered["http"], "Deployment")["spec"]["template"]["spec"], "authz-service"))
    fixture = yaml.safe_load((DATA / "sidecar-inbound-http.yaml").read_text())
    assert envoyconf.http_door_mismatches(fixture, env["AUTHZ_EXT_AUTHZ_HTTP_PATH_PREFIX"]) == []


def test_sidecar_policy_checks_every_request_to_the_app(rendered) -> None:
    docs = rendered["sidecar"]
    policy = one(docs, "AuthorizationPolicy")
    deployment = one(docs, "Deployment")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == "authz-service-grpc"
    assert one(rendered["http"], "AuthorizationPolicy")["spec"]["provider"]["name"] == "authz-service-http"
    assert selects(policy["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    app_ports = [str(p["containerPort"]) for p in container(deployment["spec"]["template"]["spec"], "app")["ports"]]
    (rule,) = policy["spec"]["rules"]
    assert rule == {"to": [{"operation": {"ports": app_ports}}]}, "all paths and methods of the app's port"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["traffic.sidecar.istio.io/excludeInboundPorts"] == "8181"
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]] == ["authz-service"]


def test_ambient_policy_and_the_only_way_to_the_app(rendered) -> None:
    docs = rendered["ambient"]
    custom = one(docs, "AuthorizationPolicy", "echo-app-authz")
    assert custom["spec"]["action"] == "CUSTOM" and custom["spec"]["rules"] == [{}]
    assert custom["spec"]["provider"]["name"] == "echo-app-authz-waypoint"
    (target,) = custom["spec"]["targetRefs"]
    assert one(docs, "Service", target["name"])["metadata"]["namespace"] == custom["metadata"]["namespace"]
    gateway = one(docs, "Gateway")
    waypoint = f"cluster.local/ns/{gateway['metadata']['namespace']}/sa/{gateway['metadata']['name']}"
    only_via = one(docs, "AuthorizationPolicy", "echo-app-only-via-waypoint")
    assert only_via["spec"]["action"] == "ALLOW"
    assert only_via["spec"]["rules"] == [{"from": [{"source": {"principals": [waypoint]}}]}]
    service = one(docs, "Service", "echo-app-authz")
    settings = provider("echo-app-authz-waypoint")["envoyExtAuthzGrpc"]
    namespace = service["metadata"]["namespace"]
    assert settings["service"] == f"{namespace}/echo-app-authz.{namespace}.svc.cluster.local"
    assert [p["port"] for p in service["spec"]["ports"]] == [settings["port"]]
    assert service["spec"]["ports"][0]["appProtocol"] == "grpc"
    env = env_of(container(one(docs, "Deployment", "echo-app-authz")["spec"]["template"]["spec"], "authz-service"))
    assert env["AUTHZ_GRPC_HOST"] == "0.0.0.0", "the caller is the waypoint, another Pod"
    (grpc_rule,) = [r for r in one(docs, "NetworkPolicy")["spec"]["ingress"]
                    if [p["port"] for p in r["ports"]] == ["grpc"]]
    (peer,) = grpc_rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"gateway.networking.k8s.io/gateway-name": gateway["metadata"]["name"]}


# --- ambient: who may run as the waypoint ------------------------------------------------------------------

ISTIOD = "system:serviceaccount:istio-system:istiod"
DEPLOYMENT_CONTROLLER = "system:serviceaccount:kube-system:deployment-controller"
REPLICASET_CONTROLLER = "system:serviceaccount:kube-system:replicaset-controller"


def pod_spec(account: str | None = "waypoint", image: str = "istio/proxyv2:1.30.3",
             deprecated: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "istio-proxy", "image": image}]}
    if account is not None:
        spec["serviceAccount" if deprecated else "serviceAccountName"] = account
    return spec


def workload(kind: str, spec: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    """A ``kind`` object running ``spec`` (a Pod, or a workload's Pod template)."""
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "p", "namespace": "demo"}, "spec": spec}
    template = {"metadata": {"labels": {"app": "w"}}, "spec": spec}
    body: dict[str, Any] = {"template": template}
    if kind == "CronJob":
        body = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    elif kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        body["replicas"] = replicas
    return {"kind": kind, "metadata": {"name": "w", "namespace": "demo"}, "spec": body}


def admitted(policy: dict[str, Any], obj: dict[str, Any], user: str, old: dict[str, Any] | None = None,
             subresource: str = "") -> bool:
    """The ValidatingAdmissionPolicy's verdict, its CEL evaluated as the API server does: each
    variable in order (``variables.<name>``), then every validation (cel-python)."""
    import celpy
    from celpy import celtypes, json_to_cel

    env = celpy.Environment()
    request = {"operation": "UPDATE" if old is not None else "CREATE", "subResource": subresource,
               "namespace": "demo", "userInfo": {"username": user}}
    activation: dict[str, Any] = {"object": json_to_cel(obj), "oldObject": json_to_cel(old),
                                  "request": json_to_cel(request)}
    variables = celtypes.MapType({})
    for variable in policy["spec"]["variables"]:
        activation["variables"] = variables
        value = env.program(env.compile(variable["expression"])).evaluate(activation)
        variables = celtypes.MapType({**variables, celtypes.StringType(variable["name"]): value})
    activation["variables"] = variables
    verdicts = [env.program(env.compile(v["expression"])).evaluate(activation) for v in policy["spec"]["validations"]]
    for validation in policy["spec"]["validations"]:  # the message must evaluate too
        assert env.program(env.compile(validation["messageExpression"])).evaluate(activation)
    return all(bool(v) for v in verdicts)


def test_only_istios_chain_may_run_pods_as_the_waypoint(rendered) -> None:
    """Istio's chain (istiod -> Deployment, deployment controller -> ReplicaSet, replicaset controller
    -> Pod) is admitted; anyone else starting, changing or debugging a workload that runs as the
    waypoint's ServiceAccount is refused; other workloads, and scaling or relabelling a waypoint,
    are left to RBAC."""
    docs = rendered["ambient"]
    policy = one(docs, "ValidatingAdmissionPolicy")
    waypoint = pod_spec()
    # Istio's own chain
    assert admitted(policy, workload("Deployment", waypoint), ISTIOD)
    assert admitted(policy, workload("Deployment", waypoint), ISTIOD + "-1-30-3")  # a revisioned istiod
    assert admitted(policy, workload("ReplicaSet", waypoint), DEPLOYMENT_CONTROLLER)
    assert admitted(policy, workload("Pod", waypoint), REPLICASET_CONTROLLER)
    assert admitted(policy, workload("Pod", waypoint), "system:kube-controller-manager")
    # anyone else, any kind that would run as the waypoint
    for kind in ("Pod", "Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob",
                 "ReplicationController"):
        assert not admitted(policy, workload(kind, waypoint), "alice"), kind
    assert not admitted(policy, workload("Pod", pod_spec(deprecated=True)), "alice"), "the deprecated field"
    assert not admitted(policy, workload("Job", waypoint), "system:serviceaccount:kube-system:job-controller")
    assert not admitted(policy, workload("Pod", waypoint), DEPLOYMENT_CONTROLLER), "each writer its own kind"
    assert not admitted(policy, workload("Deployment", waypoint), "system:serviceaccount:istio-system:istiodx")
    # what an existing waypoint runs: only its writer changes it; scaling and labels stay open
    deployment = workload("Deployment", waypoint)
    assert admitted(policy, workload("Deployment", waypoint, replicas=3), "alice", old=deployment)
    assert not admitted(policy, workload("Deployment", pod_spec(image="evil")), "alice", old=deployment)
    assert admitted(policy, workload("Deployment", pod_spec(image="istio/proxyv2:1.30.4")), ISTIOD, old=deployment)
    pod = workload("Pod", waypoint)
    relabelled = copy.deepcopy(pod)
    relabelled["metadata"]["labels"] = {"x": "y"}
    assert admitted(policy, relabelled, "alice", old=pod)
    assert not admitted(policy, workload("Pod", pod_spec(image="evil")), "alice", old=pod)
    assert admitted(policy, workload("Pod", pod_spec(account="default", image="other")), "alice",
                    old=workload("Pod", pod_spec(account="default")))
    assert not admitted(policy, pod, "alice", old=pod, subresource="ephemeralcontainers"), "kubectl debug"
    # everything else in the namespace is none of its business
    for kind in ("Pod", "Deployment", "Job", "CronJob"):
        assert admitted(policy, workload(kind, pod_spec(account="echo-app")), "alice"), kind
        assert admitted(policy, workload(kind, pod_spec(account=None)), "alice"), kind
    other = workload("Pod", pod_spec(account=None))
    assert admitted(policy, other, "alice", old=other, subresource="ephemeralcontainers")


def test_the_waypoint_admission_policy_guards_the_identity_the_app_admits(rendered) -> None:
    docs = rendered["ambient"]
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    gateway = one(docs, "Gateway")
    namespace = gateway["metadata"]["namespace"]
    only_via = one(docs, "AuthorizationPolicy", "echo-app-only-via-waypoint")
    assert only_via["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        f"cluster.local/ns/{namespace}/sa/{gateway['metadata']['name']}"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    assert policy["spec"]["failurePolicy"] == "Fail"
    kinds = {(group, resource) for rule in policy["spec"]["matchConstraints"]["resourceRules"]
             for group in rule["apiGroups"] for resource in rule["resources"]
             if set(rule["operations"]) == {"CREATE", "UPDATE"}}
    assert kinds == {("", "pods"), ("", "pods/ephemeralcontainers"), ("", "replicationcontrollers"),
                     ("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets"),
                     ("apps", "daemonsets"), ("batch", "jobs"), ("batch", "cronjobs")}
    # the ServiceAccount it guards is the waypoint's (the Gateway's name)
    assert not admitted(policy, workload("Pod", pod_spec(account=gateway["metadata"]["name"])), "alice")


# --- the e2e fixtures are what Istio renders --------------------------------------------------------------


def _headers(names: list[str] | None) -> dict[str, Any] | None:
    """extauthz.go generateHeaders: "*x" suffix, "x*" prefix, else exact; always ignore_case."""
    if not names:
        return None
    patterns = []
    for name in names:
        kind, value = ("suffix", name[1:]) if name.startswith("*") else \
            ("prefix", name[:-1]) if name.endswith("*") else ("exact", name)
        patterns.append({kind: value, "ignore_case": True})
    return {"patterns": patterns}


def _cluster(service: str, port: int) -> tuple[str, str]:
    """model.LookupCluster: the hostname and the outbound cluster of ``[namespace/]host``."""
    host = service.split("/")[-1]
    return host, f"outbound|{port}||{host}"


def istio_ext_authz(entry: dict[str, Any]) -> dict[str, Any]:
    """The ext_authz filter config Istio 1.30.3 renders for one extension provider."""
    status = {"503": "ServiceUnavailable", "403": "Forbidden"}
    enabled = {"filter": "envoy.filters.http.rbac", "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
               "value": {"string_match": {"prefix": f"istio-ext-authz-{entry['name']}"}}}
    if "envoyExtAuthzGrpc" in entry:
        grpc = entry["envoyExtAuthzGrpc"]
        host, cluster = _cluster(grpc["service"], grpc["port"])
        config = {"status_on_error": {"code": status[grpc["statusOnError"]]},
                  "failure_mode_allow": grpc.get("failOpen", False),
                  "grpc_service": {"envoy_grpc": {"cluster_name": cluster, "authority": host},
                                   "timeout": grpc.get("timeout", "600s")},
                  "filter_enabled_metadata": enabled, "transport_api_version": "V3"}
    else:
        http = entry["envoyExtAuthzHttp"]
        host, cluster = _cluster(http["service"], http["port"])
        service: dict[str, Any] = {"server_uri": {"uri": f"http://{host}", "cluster": cluster,
                                                  "timeout": http.get("timeout", "600s")}}
        if http.get("pathPrefix"):
            service["path_prefix"] = http["pathPrefix"]
        if http.get("includeAdditionalHeadersInCheck"):
            service["authorization_request"] = {"headers_to_add": [
                {"key": key, "value": value} for key, value in sorted(http["includeAdditionalHeadersInCheck"].items())]}
        response = {key: _headers(http.get(field)) for key, field in (
            ("allowed_upstream_headers", "headersToUpstreamOnAllow"),
            ("allowed_client_headers", "headersToDownstreamOnDeny"),
            ("allowed_client_headers_on_success", "headersToDownstreamOnAllow"))}
        if any(response.values()):
            service["authorization_response"] = {k: v for k, v in response.items() if v}
        config = {"status_on_error": {"code": status[http["statusOnError"]]},
                  "failure_mode_allow": http.get("failOpen", False), "http_service": service,
                  "filter_enabled_metadata": enabled, "transport_api_version": "V3"}
        if http.get("includeRequestHeadersInCheck"):
            config["allowed_headers"] = _headers(http["includeRequestHeadersInCheck"])
    return {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", **config}


def fixture_filters(mode: str) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((DATA / f"sidecar-inbound-{mode}.yaml").read_text())
    hcm = envoyconf.hcm(config)
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]} | {"hcm": hcm, "config": config}


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_fixture_ext_authz_is_what_istio_renders_from_the_provider(mode: str) -> None:
    filters = fixture_filters(mode)
    assert list(filters)[:3] == ["envoy.filters.http.rbac", "envoy.filters.http.ext_authz",
                                 "envoy.filters.http.router"]
    assert filters["envoy.filters.http.ext_authz"] == istio_ext_authz(provider(f"authz-service-{mode}"))


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_fixture_rbac_shadow_rule_is_the_authorization_policy(rendered, mode: str) -> None:
    """builder.go: CUSTOM rules become shadow_rules (action DENY) named after the policy."""
    docs = rendered["sidecar" if mode == "grpc" else "http"]
    policy = one(docs, "AuthorizationPolicy")
    ports = policy["spec"]["rules"][0]["to"][0]["operation"]["ports"]
    name = (f"istio-ext-authz-{policy['spec']['provider']['name']}-ns[demo]-policy[{policy['metadata']['name']}]"
            "-rule[0]")
    assert fixture_filters(mode)["envoy.filters.http.rbac"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "shadow_rules": {"action": "DENY", "policies": {name: {
            "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                {"destination_port": int(p)} for p in ports]}}]}}],
            "principals": [{"and_ids": {"ids": [{"any": True}]}}]}}},
        "shadow_rules_stat_prefix": "istio_ext_authz_"}


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_fixture_normalization_and_circuit_breakers_follow_the_mesh_config(rendered, mode: str) -> None:
    filters = fixture_filters(mode)
    hcm = filters["hcm"]
    # listener_builder.go: MERGE_SLASHES -> normalize_path + merge_slashes, escaped slashes unchanged.
    assert MESH["pathNormalization"]["normalization"] == "MERGE_SLASHES"
    assert (hcm["normalize_path"], hcm["merge_slashes"], hcm["path_with_escaped_slashes_action"]) == (
        True, True, "KEEP_UNCHANGED")
    host = {"grpc": "authz.local", "http": "authz-http.local"}[mode]
    (cluster,) = [c for c in filters["config"]["static_resources"]["clusters"] if c["name"].endswith(f"||{host}")]
    pool = one(rendered["mesh"], "DestinationRule", {"grpc": "authz-local", "http": "authz-local-http"}[mode])[
        "spec"]["trafficPolicy"]["connectionPool"]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds == {"max_connections": pool["tcp"]["maxConnections"],
                          "max_pending_requests": pool["http"]["http1MaxPendingRequests"],
                          "max_requests": pool["http"]["http2MaxRequests"],
                          "max_retries": 2**32 - 1, "track_remaining": True}
