"""Envoy's HTTP ext_authz mode and the HTTP front door must agree on where the original path is.

Envoy sends ``<path_prefix><original path>`` as the authorization request's path. When its
``path_prefix`` and the service's ``--ext-authz-http-path-prefix`` differ, the service used to
decide on another path than the one the app serves: ``/ext-authz/admin/report`` (a public
catch-all's) instead of ``/admin/report``. Whatever prefix Envoy sends or omits, a request must
never be allowed on a path the policy does not allow: here every combination of a shipped-style
Envoy (envoy/envoy-http.yaml, only its ``path_prefix`` changed) and a service prefix, through a
real Envoy, with what reached the app, the service's counter and its log line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .. import envoyconf
from .harness import UpstreamProcess, http_request
from .stack import DevIssuer, Service, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

POOL = "us-east-1_Door00001"
POLICY = """
issuers:
  - user_pool_id: us-east-1_Door00001
    issuer: {issuer}
routes:
  - name: admin
    path: /admin/**
    scopes: [admin/all]
  - name: healthz
    path: /healthz
    public: true
  - name: readable
    methods: [GET]
    path: /**
    public: true
    acknowledge: [public-catch-all]
"""
ISTIO_PREFIX = "/ext-authz"  # deploy/istio's HTTP provider pathPrefix


@dataclass
class Doors:
    issuer: DevIssuer
    upstream: UpstreamProcess
    policy: Path
    work: Path

    def service(self, prefix: str) -> Service:
        """A service of its own (its log and counters start empty) with this HTTP path prefix."""
        work = self.work / f"service-{len(list(self.work.glob('service-*')))}"  # its own log file
        work.mkdir()
        return start_service(work, self.policy, *(("--ext-authz-http-path-prefix", prefix) if prefix else ()))

    def send(self, envoy, method: str, path: str, token: str | None = None) -> tuple[int, dict, list[dict]]:
        mark = self.upstream.mark()
        headers = [("Authorization", f"Bearer {token}")] if token else []
        status, _, body = http_request(method, envoy.url(path), headers)
        return status, (json.loads(body) if body.startswith(b"{") else {}), self.upstream.requests_since(mark)


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess) -> Iterator[Doors]:
    work = tmp_path_factory.mktemp("http-door")
    issuer = start_dev_issuer(work, POOL)
    try:
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(issuer=issuer.issuer))
        yield Doors(issuer, upstream, policy, work)
    finally:
        issuer.process.stop()


def path_prefix(prefix: str | None) -> Callable[[dict[str, Any]], None]:
    """An edit of the shipped HTTP-mode config: Envoy's http_service.path_prefix (None: none)."""
    def edit(config: dict[str, Any]) -> None:
        service = envoyconf.http_filter(config, "envoy.filters.http.ext_authz")["http_service"]
        service.pop("path_prefix", None)
        if prefix is not None:
            service["path_prefix"] = prefix
    return edit


def mismatches(service: Service, problem: str) -> float:
    return service.sample("authz_ext_authz_http_config_mismatches_total", problem=problem)


def logged(service: Service, problem: str) -> list[dict]:
    lines = [json.loads(line) for line in service.process.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("problem") == problem]


# (the service's prefix, Envoy's path_prefix, the request, what a mismatch-blind service answered)
MISMATCHES = [
    # Istio's provider sends /ext-authz to a service started without the flag (the Component's):
    # the policy saw /ext-authz/admin/report, which only the public catch-all takes.
    pytest.param("", ISTIO_PREFIX, "GET", "/admin/report", id="envoy-prefix-service-none"),
    # Envoy without a prefix, the service expecting one: a client's own /ext-authz/healthz was
    # decided as /healthz (public for every method), though the policy has no route for POST on it.
    pytest.param(ISTIO_PREFIX, None, "POST", "/ext-authz/healthz", id="envoy-none-service-prefix"),
    # Envoy's prefix one segment longer than the service's: /v2/admin/report, the catch-all's.
    pytest.param(ISTIO_PREFIX, ISTIO_PREFIX + "/v2", "GET", "/admin/report", id="envoy-longer-prefix"),
    # Another prefix altogether.
    pytest.param(ISTIO_PREFIX, "/authz", "GET", "/admin/report", id="envoy-other-prefix"),
]


@pytest.mark.parametrize(("service_prefix", "envoy_prefix", "method", "path"), MISMATCHES)
def test_a_path_prefix_mismatch_is_refused_never_decided_on_another_path(
        doors: Doors, envoy_factory, service_prefix: str, envoy_prefix: str | None, method: str, path: str) -> None:
    service = doors.service(service_prefix)
    envoy = envoy_factory.for_service(service, "http", edit=path_prefix(envoy_prefix))
    for _ in range(3):
        status, body, reached = doors.send(envoy, method, path)
        assert (status, reached) == (400, []), f"{method} {path}: {status}, the app got {reached}"
        assert body["error"] == "invalid_request"
    # Even a request the policy allows is refused: the service cannot tell which path Envoy means.
    status, _, reached = doors.send(envoy, "GET", "/healthz")
    assert (status, reached) == (400, [])
    assert mismatches(service, "path_prefix_mismatch") == 4
    assert service.readyz()[1]["ext_authz_http"] == {
        "path_prefix": service_prefix, "original_path_header": "x-authz-original-path", "config_mismatches": 4}
    # One error line, naming both prefixes (rate-limited: not one per request).
    [line] = logged(service, "path_prefix_mismatch")
    assert line["level"] == "error" and line["suppressed_since_last"] == 0
    assert (line["expected_path_prefix"], line["envoy_path_prefix"]) == (service_prefix, envoy_prefix or "")


@pytest.mark.parametrize("prefix", ["", ISTIO_PREFIX], ids=["no-prefix", "istio-prefix"])
def test_matching_prefixes_decide_on_the_original_path(doors: Doors, envoy_factory, prefix: str) -> None:
    service = doors.service(prefix)
    envoy = envoy_factory.for_service(service, "http", edit=path_prefix(prefix or None))
    status, _, reached = doors.send(envoy, "GET", "/admin/report")
    assert (status, reached) == (401, [])
    status, _, reached = doors.send(envoy, "GET", "/admin/report", doors.issuer.token("payments-writer"))
    assert (status, reached) == (403, [])
    status, _, reached = doors.send(envoy, "GET", "/docs/index")
    assert status == 200 and [r["path"] for r in reached] == ["/docs/index"]
    status, _, reached = doors.send(envoy, "POST", "/ext-authz/healthz")
    assert (status, reached) == (403, []), "no route for POST: a client's own prefix is just a path"
    assert service.total("authz_ext_authz_http_config_mismatches_total") == 0
    assert mismatches(service, "path_prefix_mismatch") == 0, "the series exists from the start, at 0"


def test_an_envoy_that_does_not_send_the_original_path_is_refused(doors: Doors, envoy_factory) -> None:
    """An http_service without the header the service reads the path from (an older config): fail
    closed, every request refused and counted, even a public one."""
    def without_original_path(config: dict[str, Any]) -> None:
        envoyconf.http_filter(config, "envoy.filters.http.ext_authz")["http_service"].pop("authorization_request", None)

    service = doors.service("")
    envoy = envoy_factory.for_service(service, "http", edit=without_original_path)
    for method, path in (("GET", "/docs/index"), ("GET", "/admin/report"), ("POST", "/healthz")):
        status, body, reached = doors.send(envoy, method, path)
        assert (status, reached) == (400, []) and body["error"] == "invalid_request", (method, path)
    assert mismatches(service, "original_path_missing") == 3
    [line] = logged(service, "original_path_missing")
    assert "headers_to_add" in line["fix"] and "envoy_path_prefix" not in line
