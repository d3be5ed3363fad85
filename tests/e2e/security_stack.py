"""The stack the security suites attack: dev issuer + scriptable fake issuer -> our service -> real Envoy
-> echo upstream, plus a direct gRPC client for CheckRequests Envoy would never forward.

Every answer carries what reached the upstream while it was in flight (the upstream's request
log), so a test can prove that a deny never reached the app and an allow carried the identity.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from authz_service.policy import parse_policy

from ..conftest import check_request
from .fake_issuer import FakeIssuer
from .harness import (
    NATIVE,
    NATIVE_XDS,
    EnvoyProcess,
    ManagedProcess,
    UpstreamProcess,
    authz_http_request,
    free_port,
    http_request,
    wait_for,
)
from .stack import TRANSACTION_ROUTES, DevIssuer, PolicyDir, Service

ISSUERS = """
issuers:
  - user_pool_id: {fake_pool}
    issuer: {fake_iss}
    jwks_uri: {fake_jwks}
    client_ids: [payments-writer, payments-reader]
  - user_pool_id: us-east-1_Demo00001
    issuer: {dev_iss}
routes:
"""
ROUTES = TRANSACTION_ROUTES + """\
  - name: admin
    path: /admin/**
    scopes: [admin/all]
  - name: healthz
    methods: [GET]
    path: /healthz
    public: true
  - name: docs
    methods: [GET]
    path: /public/**
    public: true
"""


# lighttpd passes a header to a CGI, FastCGI or SCGI app (PHP among them) as HTTP_ + its name with
# every character but letters and digits turned into '_': each of these is HTTP_X_AUTH_CLIENT_ID
# there, or the method override Symfony and Laravel read from HTTP_X_HTTP_METHOD_OVERRIDE.
ANY_SEPARATOR_IDENTITY = [("x~auth~client~id", "admin"), ("X+Auth+Scopes", "admin/all"), ("x!auth|sub", "root"),
                          ("x-auth-client*id", "admin"), ("x_auth.client#id", "admin"), ("x`auth^sub", "root")]
ANY_SEPARATOR_OVERRIDES = [("x~http~method~override", "DELETE"), ("x-http-method+override", "DELETE"),
                           ("x'http'method", "DELETE"), ("x$method$override", "DELETE"),
                           ("x%original%url", "/admin/report"), ("x&rewrite-url", "/admin/report")]


def policy_text(fake: FakeIssuer, dev: DevIssuer, extra_routes: str = "", *, routes: str = ROUTES) -> str:
    """The stack's issuers with ``routes`` (default: the suites' routes) plus ``extra_routes``."""
    return (ISSUERS + routes).format(fake_pool=fake.pool, fake_iss=fake.issuer, fake_jwks=fake.jwks_uri,
                                     dev_iss=dev.issuer) + extra_routes


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reached_upstream: list[dict] = field(default_factory=list)

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        try:
            return self.json().get("error")
        except ValueError:
            return None

    @property
    def description(self) -> str | None:
        try:
            return self.json().get("error_description")
        except ValueError:
            return None


@dataclass
class Direct:
    """What the service itself answered to a CheckRequest (no Envoy in between)."""

    grpc_code: int | None  # None in HTTP mode
    status: int  # HTTP status Envoy would relay: 200 for OK, else denied_response.status.code
    body: str
    headers: dict[str, str]


class SecurityStack:
    def __init__(self, fake: FakeIssuer, dev: DevIssuer, policy: PolicyDir, service: Service,
                 envoy: EnvoyProcess, upstream: UpstreamProcess, work: Path, mode: str = "grpc",
                 envoy_factory=None) -> None:
        self.fake, self.dev, self.policy, self.service = fake, dev, policy, service
        self.envoy, self.upstream, self.work, self.mode = envoy, upstream, work, mode
        self._envoy_factory = envoy_factory
        self.sent = 0  # requests sent through the current Envoy (see native_denials)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        self._stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def serve_policy(self, text: str, served: Callable[[], bool]) -> None:
        """Swap in a new policy and wait until ``served`` says the service serves it; in native mode
        Envoy enforces a compiled policy, so it is compiled again and Envoy replaced."""
        taken_up = listeners_taken_up(self.envoy) if self.mode == NATIVE_XDS else 0
        self.policy.write(text)
        self.service.process.wait_until(served, 30, "the new policy served")
        if self.mode == NATIVE_XDS:  # the service rewrote Envoy's listener: wait until Envoy runs it
            wait_for_listener(self.envoy, parse_policy(text).sha256, taken_up)
        if self.mode == NATIVE:
            old = self.envoy
            self.envoy = self._envoy_factory.for_service(self.service, NATIVE, self.policy.path)
            self.sent = 0
            old.stop()

    def send(self, method: str, path: str, token: str | None = None,
             headers: list[tuple[str, str]] | None = None, *, target: str | None = None,
             observe: bool = True) -> Answer:
        """One request through Envoy; ``reached_upstream`` is what the app received meanwhile
        (only when ``observe``: concurrent senders tag requests and read the upstream log afterwards)."""
        sent = list(headers or [])
        if token is not None:
            sent.append(("Authorization", f"Bearer {token}"))
        mark = self.upstream.mark() if observe else 0
        status, response_headers, data = http_request(method, self.envoy.url(path), sent, target=target)
        self.sent += 1  # answered, so Envoy logs it (a request that raised may never have been sent)
        reached = self.upstream.requests_since(mark) if observe else []
        return Answer(status, {k.lower(): v for k, v in response_headers}, data, reached)

    def send_h2(self, method: str, target: str, headers: list[tuple[str, str]] = ()) -> tuple[int, list[dict]]:
        """One HTTP/2 (h2c, curl's nghttp2) request through Envoy, the method and target sent exactly
        as written; (status, what reached the app meanwhile)."""
        curl = shutil.which("curl")
        if curl is None:
            pytest.skip("curl not installed")
        mark = self.upstream.mark()
        argv = [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--http2-prior-knowledge",
                "--path-as-is", "-X", method, "--max-time", "10"]
        for name, value in headers:
            argv += ["-H", f"{name}: {value}"]
        out = subprocess.run([*argv, self.envoy.url(target)], capture_output=True, text=True, timeout=20)
        code, version = out.stdout.split()
        self.sent += code != "000"  # curl answers 000 when no response came back
        assert version == "2", f"not HTTP/2: {out.stdout} {out.stderr}"
        return int(code), self.upstream.requests_since(mark)

    def check(self, method: str, path: str, headers: dict[str, str] | None = None) -> Direct:
        """An authorization request straight to the service's front door of this stack's mode, as
        Envoy would send it: a CheckRequest (gRPC), or the HTTP request (HTTP mode)."""
        if self.mode == "http":  # native mode's Envoy calls the gRPC door
            status, response_headers, body = authz_http_request(
                self.service.authz_port("http"), method, path, list((headers or {}).items()))
            return Direct(None, status, body.decode() if status != 200 else "",
                          {k.lower(): v for k, v in response_headers})
        resp = self._stub.Check(check_request(method, path, headers or {}), timeout=10)
        if resp.HasField("denied_response"):
            denied = resp.denied_response
            return Direct(resp.status.code, denied.status.code, denied.body,
                          {h.header.key: h.header.value for h in denied.headers})
        ok = resp.ok_response
        return Direct(resp.status.code, 200, "", {h.header.key: h.header.value for h in ok.headers})


def service_checks(envoy: EnvoyProcess) -> int:
    """Requests this Envoy had the service decide (its ext_authz filter's answers)."""
    stats = envoy.stats("ext_authz")
    return sum(v for k, v in stats.items() if k.rsplit(".", 1)[1] in ("ok", "denied", "error"))


def natively_allowed(s: SecurityStack, token: str) -> bool:
    """POST /transactions with ``token`` allowed, and without asking the service (native mode)."""
    before = service_checks(s.envoy)
    return s.send("POST", "/transactions", token).status == 200 and service_checks(s.envoy) == before


def envoy_fetches(envoy: EnvoyProcess) -> int:
    """jwt_authn's successful fetches of the service's keys (native mode)."""
    return sum(v for k, v in envoy.stats("jwks_fetch_success").items())


def listener_version(envoy: EnvoyProcess) -> str | None:
    """The version of the ingress listener Envoy loaded from its xDS file (the policy's sha256)."""
    status, _, body = http_request("GET", envoy.admin_url("/stats?filter=^listener_manager.lds.version_text$"))
    assert status == 200
    _, _, value = body.decode().partition(": ")
    return value.strip().strip('"') or None


def listeners_taken_up(envoy: EnvoyProcess) -> int:
    """Listeners Envoy's worker took up (``listener_manager.listener_create_success``, counted once
    the worker runs it: later than the listener's version, which changes when Envoy reads the file)."""
    name = "listener_manager.listener_create_success"
    return envoy.stats(f"^{name}$").get(name, 0)


def wait_for_listener(envoy: EnvoyProcess, sha256: str, taken_up: int) -> None:
    """Until Envoy serves the listener of the policy ``sha256``: its version, and its worker took up
    one more listener than ``taken_up`` (listeners_taken_up before the change)."""
    envoy.wait_until(lambda: listener_version(envoy) == sha256 and listeners_taken_up(envoy) > taken_up, 30,
                     "Envoy serving the new policy's listener")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def start_security_stack(work: Path, upstream: UpstreamProcess, envoy_factory, *service_args: str,
                         fake: FakeIssuer | None = None, wait_ready: bool = True,
                         env: dict[str, str] | None = None, wrapper: tuple[str, ...] = (),
                         mode: str = "grpc", routes: str | None = None,
                         launch: Callable[[list[str]], ManagedProcess] | None = None,
                         anonymous_limit: bool = False, envoy_config: Path | None = None) -> SecurityStack:
    """Dev issuer + fake issuer (started here unless given) + service (its CLI, or ``launch``'s process:
    see ``start_service``) + Envoy (the shipped config of ``mode``: ext_authz over gRPC, or Envoy's
    HTTP mode to the service's HTTP front door; native: the policy compiled for Envoy's own
    filters, the service as its fallback; ``envoy_config``: another config of ``mode``, such as a
    user's), serving the stack's issuers with ``routes`` (policy
    YAML, taken as written; default: the suites' routes). Envoy's anonymous token bucket is lifted
    unless ``anonymous_limit`` (the admission suite's): admission is not a decision.

    The stack owns the fake issuer it started (``stop_security_stack`` stops it, and so does a failed
    start); the processes belong to the running test or fixture (harness ``Owner``) like any other."""
    from .stack import start_dev_issuer, start_service

    own_fake = fake is None
    fake = fake or FakeIssuer().start()
    try:
        dev = start_dev_issuer(work, "us-east-1_Demo00001")
        policy = PolicyDir(work / "config")
        policy.write(policy_text(fake, dev) if routes is None else policy_text(fake, dev, routes, routes=""))
        service = start_service(work, policy.path, *service_args, wait_ready=wait_ready, env=env, wrapper=wrapper,
                                launch=launch)
        other = {} if envoy_config is None else {"source": envoy_config}
        envoy = envoy_factory.for_service(service, mode, policy.path, anonymous_limit=anonymous_limit, **other)
    except BaseException:
        if own_fake:
            fake.stop()
        raise
    return SecurityStack(fake, dev, policy, service, envoy, upstream, work, mode, envoy_factory)


def start_xds_security_stack(work: Path, upstream: UpstreamProcess, envoy_factory, *service_args: str,
                             fake: FakeIssuer | None = None) -> SecurityStack:
    """The security suites' stack in native mode's xDS form: the service writes Envoy's listener."""
    xds = work / "xds"
    xds.mkdir()
    return start_security_stack(work, upstream, envoy_factory, "--native-xds-dir", str(xds),
                                "--native-listen", f"127.0.0.1:{free_port()}", *service_args, fake=fake,
                                mode=NATIVE_XDS)


def stop_security_stack(stack: SecurityStack) -> None:
    stack.close()
    stack.service.process.stop()
    stack.dev.process.stop()
    stack.fake.stop()


def serving(stack: SecurityStack) -> dict:
    """The policy the service serves, as /readyz reports it (sha256, routes, last_reload_error)."""
    return stack.service.readyz()[1]["policy"]


def serve(stack: SecurityStack, text: str) -> None:
    """Write a policy and wait until the service serves it; a refused one fails here, with its error."""
    errors = stack.service.sample("authz_policy_reloads_total", result="error")
    want = hashlib.sha256(text.encode()).hexdigest()
    stack.policy.write(text)
    stack.service.process.wait_until(
        lambda: serving(stack)["sha256"] == want
        or stack.service.sample("authz_policy_reloads_total", result="error") > errors, 30, "the policy reload")
    assert serving(stack)["sha256"] == want, serving(stack)["last_reload_error"]


def deny_count(stack: SecurityStack, reason: str) -> float:
    """Denials counted for ``reason`` (the service's metric label), over every route and status: the
    service's, plus in native mode those Envoy made itself."""
    counted = stack.service.total("authz_check_decisions_total", decision="deny", reason=reason)
    return counted + native_denials(stack, reason) if stack.mode in (NATIVE, NATIVE_XDS) else counted


def native_denials(stack: SecurityStack, reason: str) -> int:
    """Denials native mode's Envoy made itself for ``reason``, from its access log: an RBAC policy
    of the compiled policy is named <order>-<reason>-a<answer> (authz_service/native/answers.py).
    Waits until every request sent through this Envoy is logged (it flushes every 100 ms)."""
    # A 1-tuple, so a log still empty because nothing was sent yet counts as complete.
    (entries,) = wait_for(
        lambda: (lambda log: (log,) if len(log) >= stack.sent else None)(stack.envoy.access_log()),
        30,
        f"Envoy's access log of every request answered ({stack.sent})",
    )
    denied = re.compile(rf"rbac_access_denied_matched_policy\[\d+o?-{re.escape(reason)}-a\d+\]")
    return sum(1 for entry in entries if denied.fullmatch(entry.get("response_code_details") or ""))


def native_decisions(envoy: EnvoyProcess) -> Counter[tuple[str, ...]]:
    """Envoy's envoy_authz_native_decisions, as its Prometheus endpoint (the envoy-health listener) shows it."""
    _, _, body = http_request("GET", envoy.health_url("/stats/prometheus"))
    counts: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if family.name == "envoy_authz_native_decisions":  # an Envoy counter (the parser adds _total)
                labels = sample.labels
                counts[(labels["decision"], labels["reason"], labels["route"], labels["status"])] += int(sample.value)
    return counts


def logged(stack: SecurityStack, **fields: object) -> list[dict]:
    """The service's JSON log lines whose fields include ``fields``."""
    entries = []
    for line in stack.service.process.log_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in fields.items()):
                entries.append(entry)
    return entries
