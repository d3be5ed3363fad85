"""authz-service behind Envoy configured the way Istio configures a CUSTOM provider.

tests/data/istio/sidecar-inbound-{grpc,http}.yaml are what an Istio 1.30 sidecar runs for
deploy/istio (the providers of deploy/istio/mesh-config.yaml, the CUSTOM AuthorizationPolicy):
the RBAC shadow filter whose metadata switches ext_authz on, the ext_authz filter Istio renders
from each provider (failure_mode_allow false, status_on_error 503, the gRPC provider's "all
headers", the HTTP provider's header lists, no request body) and the HTTP connection manager's
path normalization. tests/test_istio.py proves those fixtures are what Istio's code renders from
our mesh config; here a real Envoy runs them in front of the real service and a real upstream,
with tokens from the dev issuer:

* the decisions (public, allowed, 401, 403) in both modes, ext_authz enabled by Istio's metadata;
* spoofed identity headers never reach the app, in both modes, and in HTTP mode even when the
  provider does not list them (x-envoy-auth-headers-to-remove): but override headers are refused
  only when listed, which is why the shipped provider lists every spelling;
* fail closed: authz-service down gives 503 and nothing reaches the app;
* Istio's default BASE normalization leaves ``//transactions`` to our 400, MERGE_SLASHES (what
  deploy/istio/mesh-config.yaml sets) serves it as ``/transactions``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .. import envoyconf
from .harness import (MODES, REPO_ROOT, EnvoyProcess, Owner, UpstreamProcess, envoy_binary, free_port, http_request,
                      start_envoy)
from .security_stack import ANY_SEPARATOR_IDENTITY, ANY_SEPARATOR_OVERRIDES
from .stack import PUBLIC_HEALTHZ, TRANSACTION_ROUTES, DevIssuer, PolicyDir, Service, start_dev_issuer, start_service

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")]

FIXTURES = REPO_ROOT / "tests" / "data" / "istio"
HTTP_PATH_PREFIX = "/ext-authz"  # the provider's pathPrefix
POLICY = """
issuers:
  - user_pool_id: us-east-1_Demo00001
    issuer: {issuer}
routes:
""" + TRANSACTION_ROUTES + PUBLIC_HEALTHZ
WRITER_IDENTITY = {"x-auth-client-id": ["payments-writer"], "x-auth-scopes": ["transactions/post"],
                   "x-auth-sub": ["payments-writer"]}
SPOOFED = [("X-Auth-Client-Id", "admin"), ("x_auth_client_id", "admin"), ("X-Auth-Scopes", "admin/all"),
           ("x-auth_scopes", "admin/all"), ("x_auth_sub", "root"), ("X_AUTH_SUB", "root")]


def istio_sidecar_config(out_dir: Path, mode: str, *, merge_slashes: bool, app_port: int, authz_port: int,
                         allowed_headers: list[str] | None = None) -> Path:
    """The fixture with its ports rewritten (and, for BASE, ``merge_slashes`` off: the one field
    in which Istio's BASE and MERGE_SLASHES differ). ``allowed_headers`` replaces the HTTP
    provider's includeRequestHeadersInCheck, rendered as Istio renders it."""
    config = yaml.safe_load((FIXTURES / f"sidecar-inbound-{mode}.yaml").read_text())
    listener_port = free_port()
    envoyconf.socket_address(config["admin"], "admin")["port_value"] = free_port()
    envoyconf.socket_address(envoyconf.listener(config), "the first listener")["port_value"] = listener_port
    envoyconf.endpoint(config, "inbound|8000||")["port_value"] = app_port
    authz_cluster = "outbound|9191||authz.local" if mode == "grpc" else "outbound|9192||authz-http.local"
    envoyconf.endpoint(config, authz_cluster)["port_value"] = authz_port
    # Istio matches the app's port (8000) as the connection's original destination; here the
    # client connects to the listener itself.
    for policy in envoyconf.http_filter(config, "envoy.filters.http.rbac")["shadow_rules"]["policies"].values():
        policy["permissions"][0]["and_rules"]["rules"][0]["or_rules"]["rules"][0]["destination_port"] = listener_port
    envoyconf.hcm(config)["merge_slashes"] = merge_slashes
    if allowed_headers is not None:
        envoyconf.http_filter(config, "envoy.filters.http.ext_authz")["allowed_headers"] = {
            "patterns": [{"exact": name, "ignore_case": True} for name in allowed_headers]}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"istio-{mode}-{listener_port}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class IstioStack:
    issuer: DevIssuer
    service: Service
    upstream: UpstreamProcess
    work: Path
    envoys: dict[tuple, EnvoyProcess] = field(default_factory=dict)
    # The variants' Envoys are started lazily by the tests but live as long as the stack: they
    # belong to it, not to the test that happened to start one (harness process ownership).
    owner: Owner = field(default_factory=lambda: Owner("istio stack envoys"))

    def envoy(self, mode: str, *, merge_slashes: bool = True, authz_port: int | None = None,
              allowed_headers: tuple[str, ...] | None = None) -> EnvoyProcess:
        """An Envoy on the Istio-rendered config (started once per variant, stopped with the stack)."""
        key = (mode, merge_slashes, authz_port, allowed_headers)
        if key not in self.envoys:
            port = authz_port or self.service.authz_port(mode)
            config = istio_sidecar_config(self.work / "envoy", mode, merge_slashes=merge_slashes,
                                          app_port=self.upstream.port, authz_port=port,
                                          allowed_headers=list(allowed_headers) if allowed_headers else None)
            with self.owner.current():
                self.envoys[key] = start_envoy(config, self.work / "envoy")
        return self.envoys[key]

    def send(self, envoy: EnvoyProcess, method: str, path: str, token: str | None = None,
             headers: list[tuple[str, str]] = ()) -> tuple[int, dict[str, str], bytes, list[dict]]:
        """One request; what the app received meanwhile."""
        sent = list(headers) + ([("Authorization", f"Bearer {token}")] if token else [])
        mark = self.upstream.mark()
        status, response_headers, body = http_request(method, envoy.url(path), sent)
        return status, {k.lower(): v for k, v in response_headers}, body, self.upstream.requests_since(mark)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess) -> Iterator[IstioStack]:
    work = tmp_path_factory.mktemp("istio")
    issuer = start_dev_issuer(work, "us-east-1_Demo00001")
    try:
        policy = PolicyDir(work / "config")
        policy.write(POLICY.format(issuer=issuer.issuer))
        service = start_service(work, policy.path, "--ext-authz-http-path-prefix", HTTP_PATH_PREFIX)
    except BaseException:
        issuer.process.stop()
        raise
    istio = IstioStack(issuer, service, upstream, work)
    try:
        yield istio
    finally:
        istio.owner.close()
        service.process.stop()
        issuer.process.stop()


def identity_seen(reached: list[dict]) -> dict[str, list[str]]:
    """Every identity header the app received, in any spelling."""
    assert len(reached) == 1, reached
    return {name: values for name, values in reached[0]["headers"].items()
            if name.replace("_", "-").startswith("x-auth-")}


@pytest.mark.parametrize("mode", MODES)
def test_decisions_through_the_istio_rendered_ext_authz(stack: IstioStack, mode: str) -> None:
    envoy = stack.envoy(mode)
    status, _, _, reached = stack.send(envoy, "GET", "/healthz")
    assert status == 200 and len(reached) == 1, "public route"
    status, headers, body, reached = stack.send(envoy, "POST", "/transactions")
    assert (status, reached) == (401, []), body
    assert headers["www-authenticate"].startswith('Bearer realm="authz-service"')
    assert headers["content-type"] == "application/json"
    status, _, body, reached = stack.send(envoy, "POST", "/transactions", stack.issuer.token("payments-reader"))
    assert (status, reached) == (403, []) and b"insufficient_scope" in body
    status, _, _, reached = stack.send(envoy, "POST", "/transactions", stack.issuer.token("payments-writer"))
    assert status == 200
    assert identity_seen(reached) == WRITER_IDENTITY
    # ext_authz ran for every request because Istio's shadow RBAC rule matched (never "disabled").
    stats = envoy.stats("ext_authz")
    prefix = "http.inbound_0.0.0.0_8000.ext_authz"
    assert stats[f"{prefix}.ok"] >= 2 and stats[f"{prefix}.denied"] >= 2
    assert stats.get(f"{prefix}.disabled", 0) == 0 and stats[f"{prefix}.error"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_spoofed_identity_headers_never_reach_the_app(stack: IstioStack, mode: str) -> None:
    envoy = stack.envoy(mode)
    status, _, _, reached = stack.send(envoy, "POST", "/transactions", stack.issuer.token("payments-writer"), SPOOFED)
    assert status == 200
    assert identity_seen(reached) == WRITER_IDENTITY
    status, _, _, reached = stack.send(envoy, "GET", "/healthz", headers=SPOOFED)
    assert status == 200 and identity_seen(reached) == {}


@pytest.mark.parametrize("mode", MODES)
def test_identity_look_alikes_are_stripped_and_override_look_alikes_refused(stack: IstioStack, mode: str) -> None:
    """Istio's sidecar runs no early header mutation, so names lighttpd reads as the real headers
    (``x~auth~client~id``, ``x-http-method+override``) reach the service: in gRPC mode it sees every
    header, in HTTP mode the provider's includeRequestHeadersInCheck forwards their shape (prefixes);
    it strips the identity ones and refuses the override ones, as it does their '-'/'_'/'.'
    spellings."""
    envoy = stack.envoy(mode)
    token = stack.issuer.token("payments-writer")
    spoofed = {name.lower() for name, _ in ANY_SEPARATOR_IDENTITY}
    sent = [*ANY_SEPARATOR_IDENTITY, ("x~other", "kept")]
    for method, path, credential in (("POST", "/transactions", token), ("GET", "/healthz", None)):
        status, _, _, reached = stack.send(envoy, method, path, credential, sent)
        assert status == 200 and len(reached) == 1, path
        seen = reached[0]["headers"]
        assert spoofed.isdisjoint(seen), (path, seen)
        assert seen.get("x~other") == ["kept"]  # other names pass
    for name, value in ANY_SEPARATOR_OVERRIDES:
        status, _, body, reached = stack.send(envoy, "POST", "/transactions", token, [(name, value)])
        assert (status, reached) == (400, []), (name, body)
        assert b"method or URL override" in body


def test_http_provider_strips_identity_headers_it_does_not_send_for_the_check(stack: IstioStack) -> None:
    """An HTTP provider listing only authorization: the service never sees the spoofed headers, and
    they are still removed, by the x-envoy-auth-headers-to-remove every answer carries."""
    envoy = stack.envoy("http", allowed_headers=("authorization",))
    status, _, _, reached = stack.send(envoy, "POST", "/transactions", stack.issuer.token("payments-writer"), SPOOFED)
    assert status == 200
    assert identity_seen(reached) == WRITER_IDENTITY
    status, _, _, reached = stack.send(envoy, "GET", "/healthz", headers=SPOOFED)
    assert status == 200 and identity_seen(reached) == {}


@pytest.mark.parametrize("name", ["X-HTTP-Method-Override", "x_http_method_override", "X-Original-URL"])
def test_http_provider_refuses_override_headers_only_when_it_sends_them(stack: IstioStack, name: str) -> None:
    """The shipped provider lists every spelling of the override headers, so they are refused (400)
    as in gRPC mode; a provider that leaves them out lets them through unseen."""
    token = stack.issuer.token("payments-writer")
    for envoy in (stack.envoy("grpc"), stack.envoy("http")):
        status, _, body, reached = stack.send(envoy, "POST", "/transactions", token, [(name, "DELETE")])
        assert (status, reached) == (400, []), body
    unlisted = stack.envoy("http", allowed_headers=("authorization",))
    status, _, _, reached = stack.send(unlisted, "POST", "/transactions", token, [(name, "DELETE")])
    assert status == 200 and len(reached) == 1, "not sent for the check, so not refused"


@pytest.mark.parametrize("mode", MODES)
def test_authz_service_down_fails_closed_with_503(stack: IstioStack, mode: str) -> None:
    envoy = stack.envoy(mode, authz_port=free_port())  # nothing listens there
    for path, token in (("/healthz", None), ("/transactions", stack.issuer.token("payments-writer"))):
        status, _, _, reached = stack.send(envoy, "POST" if token else "GET", path, token)
        assert (status, reached) == (503, [])
    assert envoy.stats("ext_authz")["http.inbound_0.0.0.0_8000.ext_authz.error"] >= 2


@pytest.mark.parametrize("mode", MODES)
def test_base_normalization_leaves_double_slashes_to_our_400_and_merge_slashes_serves_them(
        stack: IstioStack, mode: str) -> None:
    token = stack.issuer.token("payments-writer")
    base = stack.envoy(mode, merge_slashes=False)
    status, _, body, reached = stack.send(base, "POST", "//transactions", token)
    assert (status, reached) == (400, []) and b"invalid_request" in body
    merged = stack.envoy(mode, merge_slashes=True)
    status, _, _, reached = stack.send(merged, "POST", "//transactions", token)
    assert status == 200 and [r["path"] for r in reached] == ["/transactions"]
    # Both resolve dot segments (normalize_path), and keep an encoded slash for our 400.
    for envoy in (base, merged):
        status, _, _, reached = stack.send(envoy, "POST", "/healthz/../transactions", token)
        assert status == 200 and [r["path"] for r in reached] == ["/transactions"]
        status, _, _, reached = stack.send(envoy, "GET", "/transactions%2F1", token)
        assert (status, reached) == (400, [])


def test_fixtures_differ_only_in_the_provider() -> None:
    """The two fixtures are one sidecar: only the ext_authz filter, its cluster and the policy id differ."""
    def without_provider(mode: str) -> dict[str, Any]:
        config = yaml.safe_load((FIXTURES / f"sidecar-inbound-{mode}.yaml").read_text())
        hcm = envoyconf.hcm(config)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"]
        rbac = envoyconf.http_filter(config, "envoy.filters.http.rbac")["shadow_rules"]
        rbac["policies"] = list(rbac["policies"].values())
        config["static_resources"]["clusters"] = [c for c in config["static_resources"]["clusters"]
                                                  if not c["name"].startswith("outbound|")]
        return copy.deepcopy(config)

    assert without_provider("grpc") == without_provider("http")


def test_http_provider_prefix_against_a_service_without_it_is_refused(stack: IstioStack) -> None:
    """The HTTP provider sends pathPrefix /ext-authz; a service started without the flag (as the
    Component's sidecar is) must refuse, not decide on /ext-authz/<path>: with a public catch-all
    in the policy, that path was allowed whatever the original path needed."""
    policy = stack.work / "catch-all" / "policy.yaml"
    policy.parent.mkdir(exist_ok=True)
    policy.write_text(POLICY.format(issuer=stack.issuer.issuer) + """\
  - name: readable
    methods: [GET]
    path: /**
    public: true
    acknowledge: [public-catch-all]
""")
    unprefixed = start_service(policy.parent, policy)
    try:
        envoy = stack.envoy("http", authz_port=unprefixed.authz_port("http"))
        status, _, body, reached = stack.send(envoy, "GET", "/transactions/7")
        assert (status, reached) == (400, []), body
        assert unprefixed.sample("authz_ext_authz_http_config_mismatches_total", problem="path_prefix_mismatch") == 1
        status, _, _, reached = stack.send(stack.envoy("http"), "GET", "/transactions/7")
        assert (status, reached) == (401, []), "the matching service still decides"
    finally:
        unprefixed.process.stop()



@pytest.mark.parametrize("mode", MODES)
def test_the_sidecar_keeps_a_callers_request_id_and_the_log_bounds_it(stack: IstioStack, mode: str) -> None:
    """Istio's sidecar deems mesh requests internal and keeps their x-request-id (the shipped
    Envoy configs replace it): the decision log then carries the caller's id, cut to 128
    characters and JSON-escaped (docs/security.md, "Request ids are Envoy's own")."""
    envoy = stack.envoy(mode)
    forged = f"forged-{mode}-\"}}\\" + "x" * 300
    status, _, _, reached = stack.send(envoy, "POST", "/transactions", None, [("X-Request-Id", forged)])
    assert (status, reached) == (401, [])
    lines = stack.service.process.wait_until(
        lambda: [json.loads(line) for line in stack.service.process.log_text().splitlines()
                 if f"forged-{mode}-" in line], 10, "the decision log line")
    assert [entry["request_id"] for entry in lines] == [forged[:128]]
