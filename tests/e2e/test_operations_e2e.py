"""Operations as a platform team meets them: a real Prometheus scraping the sidecar, the standard
gRPC health service tracking readiness, and SIGTERM draining in-flight Checks."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from ..conftest import check_request, SigningKey, make_key
from .harness import (MODES, REPO_ROOT, ManagedProcess, UpstreamProcess, authz_http_request, free_port, http_request,
                      wait_for, wait_for_http)
from .stack import PUBLIC_HEALTHZ, TRANSACTION_ROUTES, Service, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

AUTHZ = "envoy.service.auth.v3.Authorization"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

POLICY = """
issuers:
  - user_pool_id: us-east-1_Demo00001
    issuer: {issuer}
routes:
""" + TRANSACTION_ROUTES + PUBLIC_HEALTHZ


# --- helpers ---------------------------------------------------------------------------------------


def check(grpc_port: int, method: str, path: str, token: str | None = None,
          timeout: float = 10) -> external_auth_pb2.CheckResponse:
    """One ext_authz Check sent straight to the service, as Envoy would send it."""
    request = check_request(method, path, {"authorization": f"Bearer {token}"} if token is not None else {})
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=timeout)


def health(grpc_port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def denied_status(response: external_auth_pb2.CheckResponse) -> int:
    assert response.status.code != 0, "expected a denial"
    return response.denied_response.status.code


class ScriptedJwks:
    """A real HTTP JWKS endpoint whose answers the test controls: the first fetch answers at once,
    later fetches wait until ``release`` is set (an issuer that hangs during a key rotation);
    ``held_from=1``: every fetch waits, the start-up fetch too."""

    def __init__(self, first: list[SigningKey], later: list[SigningKey], held_from: int = 2) -> None:
        self.first, self.later = first, later
        self.release = threading.Event()
        self.fetches = 0
        self.hanging = threading.Event()
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                with lock:
                    outer.fetches += 1
                    fetch = outer.fetches
                keys = outer.first
                if fetch >= held_from:
                    outer.hanging.set()
                    outer.release.wait(60)
                    keys = outer.later
                body = json.dumps({"keys": [k.jwk() for k in keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --- a real Prometheus -----------------------------------------------------------------------------


def prometheus_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, _, body = http_request("GET", url)
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", body[:500]
    return data["data"]["result"]


def by_labels(result: list[dict], *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(n, "") for n in names): float(r["value"][1]) for r in result}


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make test` installs Debian's prometheus package (make system-deps)")
    return binary


def test_real_prometheus_scrapes_deny_rates_by_reason_and_route(
    tmp_path: Path, upstream: UpstreamProcess, envoy_factory, prometheus_binary: str
) -> None:
    issuer = start_dev_issuer(tmp_path, "us-east-1_Demo00001")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(issuer=issuer.issuer))
    service = start_service(tmp_path, policy)
    envoy = envoy_factory(service.grpc_port)
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml")],
        "scrape_configs": [{
            "job_name": "authz-service",
            "static_configs": [{"targets": [f"127.0.0.1:{service.http_port}"], "labels": {"namespace": "e2e"}}],
        }],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = ManagedProcess(
        [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        tmp_path, name="prometheus",
    ).start()
    try:
        wait_for_http(f"http://127.0.0.1:{prom_port}/-/ready", 60, expect_status=200, proc=prom)
        prom.wait_until(lambda: by_labels(prometheus_query(prom_port, 'up{job="authz-service"}'))
                        .get(()) == 1.0, 60, "first scrape of the sidecar")

        writer, reader = issuer.token("payments-writer"), issuer.token("payments-reader")

        def send(method: str, path: str, token: str | None, times: int, expect: int) -> None:
            headers = [("Authorization", f"Bearer {token}")] if token else []
            for _ in range(times):
                assert http_request(method, envoy.url(path), headers)[0] == expect

        def traffic(times: int) -> None:
            send("POST", "/transactions", writer, 3 * times, 200)
            send("POST", "/transactions", reader, 2 * times, 403)      # insufficient_scope
            send("POST", "/transactions", None, 1 * times, 401)        # missing_token
            send("GET", "/transactions/7", reader, 2 * times, 200)
            send("GET", "/transactions/7", writer, 1 * times, 403)     # insufficient_scope
            send("GET", "/admin", writer, 1 * times, 403)              # no_route

        def denies_per_wave(waves: int) -> dict[tuple[str, str], float]:
            return {("insufficient_scope", "create-transaction"): 2 * waves,
                    ("missing_token", "create-transaction"): 1 * waves,
                    ("insufficient_scope", "get-transaction"): 1 * waves,
                    ("no_route", "no_route"): 1 * waves}

        query = 'sum by (reason, route) (authz_check_decisions_total{job="authz-service", decision="deny"})'

        def scraped(expected: dict[tuple[str, str], float]) -> dict | None:
            got = by_labels(prometheus_query(prom_port, query), "reason", "route")
            return got if got == expected else None

        traffic(1)  # creates every series
        # A scrape saw them before the next increments, so rate() has two samples per series.
        prom.wait_until(lambda: scraped(denies_per_wave(1)), 60, "scraped deny counters of the first wave")
        traffic(2)

        expected_denies = denies_per_wave(3)
        denies = prom.wait_until(lambda: scraped(expected_denies), 60, "scraped deny counters equal to the traffic sent")
        assert denies == expected_denies

        # The deny ratio per route, as the dashboard and the AuthzRouteDenySpike alert compute it.
        ratio = by_labels(prometheus_query(
            prom_port,
            'sum by (route) (authz_check_decisions_total{decision="deny"})'
            ' / sum by (route) (authz_check_decisions_total)'), "route")
        assert ratio == {("create-transaction",): pytest.approx(9 / 18),
                         ("get-transaction",): pytest.approx(3 / 9),
                         ("no_route",): pytest.approx(1.0)}

        # rate() over the window sees the second wave of denials for every reason and route.
        rates = by_labels(prometheus_query(
            prom_port, 'sum by (reason, route) (rate(authz_check_decisions_total{decision="deny"}[1m]))'),
            "reason", "route")
        for key in expected_denies:
            assert rates.get(key, 0) > 0, (key, rates)

        # The shipped alert rules load into a real Prometheus and evaluate cleanly against real series.
        def evaluated_rules() -> list[dict] | None:
            status, _, body = http_request("GET", f"http://127.0.0.1:{prom_port}/api/v1/rules")
            rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

        rules = prom.wait_until(evaluated_rules, 60, "every alert rule evaluated")
        assert {r["health"] for r in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
        firing = {r["name"] for r in rules if r.get("state") == "firing"}
        assert not firing, f"no alert may fire on this short healthy run: {firing}"
    finally:
        prom.stop()
        service.process.stop()
        issuer.process.stop()


# --- gRPC health follows readiness -----------------------------------------------------------------


def test_grpc_health_serves_only_when_ready(tmp_path: Path) -> None:
    """The issuer is down at start: NOT_SERVING, /readyz 503 and Checks 503; it comes up: SERVING."""
    issuer_port = free_port()
    issuer_url = f"http://127.0.0.1:{issuer_port}/us-east-1_Demo00001"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(issuer=issuer_url))
    service = start_service(tmp_path, policy, wait_ready=False)
    grpc_port, http_port = service.grpc_port, service.http_port
    issuer = None
    try:
        assert health(grpc_port, "") == NOT_SERVING
        assert health(grpc_port, AUTHZ) == NOT_SERVING
        status, _, body = http_request("GET", f"http://127.0.0.1:{http_port}/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        # Without keys nothing can be verified: a 503 (retry later), never an allow and never a 401.
        unverifiable = make_key("kid-x").token(iss=issuer_url)
        assert denied_status(check(grpc_port, "POST", "/transactions", unverifiable)) == 503

        issuer = start_dev_issuer(tmp_path, "us-east-1_Demo00001", port=issuer_port)
        service.process.wait_until(lambda: health(grpc_port, "") == SERVING, 60,
                                   "gRPC health SERVING after the issuer came up")
        assert health(grpc_port, AUTHZ) == SERVING
        assert http_request("GET", f"http://127.0.0.1:{http_port}/readyz")[0] == 200
        allowed = check(grpc_port, "POST", "/transactions", issuer.token("payments-writer"))
        assert allowed.status.code == 0 and allowed.HasField("ok_response")
        with pytest.raises(grpc.RpcError) as unknown:
            health(grpc_port, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        service.process.stop()
        if issuer is not None:
            issuer.process.stop()


# --- SIGTERM -----------------------------------------------------------------------------------------


@pytest.fixture
def rotating_jwks(key_a: SigningKey, key_b: SigningKey) -> Iterator[ScriptedJwks]:
    jwks = ScriptedJwks(first=[key_a], later=[key_a, key_b])
    yield jwks
    jwks.close()


def door_check(service: Service, door: str, token: str | None, timeout: float) -> tuple[int, str]:
    """One Check sent straight to a front door, as Envoy would: (HTTP status, reason or OAuth error).
    Raises when the door refuses or drops the call (grpc.RpcError, or OSError/HTTPException)."""
    if door == "grpc":
        response = check(service.grpc_port, "POST", "/transactions", token, timeout=timeout)
        return (200 if response.status.code == 0 else denied_status(response)), response.status.message
    headers = [("authorization", f"Bearer {token}")] if token is not None else []
    status, _, body = authz_http_request(service.authz_port("http"), "POST", "/transactions", headers,
                                         timeout=timeout)
    return status, json.loads(body)["error"] if status != 200 else ""


REFUSED = (grpc.RpcError, OSError, http.client.HTTPException)


def start_held_check(tmp_path: Path, jwks: ScriptedJwks, key_b: SigningKey, door: str, *flags: str):
    """A service with one Check in flight through ``door`` ("grpc" or "http"): a token with a kid it
    has not seen, held in the unknown-kid JWKS re-fetch that the scripted endpoint keeps hanging
    until ``jwks.release`` is set.

    The re-fetch is rate limited: at most one per cool-down (10 s at least, on purpose) counted from
    the start-up fetch, whose moment the test cannot know. So no clock arithmetic: Checks go one at
    a time, each denied ``unknown_key`` at once while the cool-down lasts, until one triggers the
    re-fetch, which the endpoint sees as its second request. That Check is the one held.
    """
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"issuers:\n  - user_pool_id: us-east-1_Test00001\n    jwks_uri: {jwks.url}\n"
        "routes:\n  - path: /transactions\n    scopes: [transactions/post]\n")
    # --jwks-timeout: the held fetch must outlast the test's steps on a busy machine (default 3 s).
    service = start_service(tmp_path, policy, "--jwks-timeout", "60", *flags)  # a later flag wins
    held: list[tuple[threading.Thread, dict[str, object]]] = []

    def one_check_held() -> bool:
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["response"] = door_check(service, door, key_b.token(), timeout=120)
            except REFUSED as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for(lambda: jwks.hanging.is_set() or not thread.is_alive(), 60, "the Check answered or held")
        if jwks.hanging.is_set():
            held.append((thread, outcome))
            return True
        # Denied at once while the cool-down lasts: unknown_key (gRPC says the reason; the HTTP
        # answer carries only the uniform invalid_token).
        assert outcome.get("response") in ((401, "unknown_key"), (401, "invalid_token")), outcome
        return False

    wait_for(one_check_held, 60, "a Check held in the unknown-kid JWKS re-fetch", poll=0.2)
    thread, outcome = held[0]
    return service, thread, outcome


@pytest.mark.parametrize("door", MODES)
def test_sigterm_drains_in_flight_checks(tmp_path: Path, rotating_jwks: ScriptedJwks, key_b: SigningKey,
                                         door: str) -> None:
    service, thread, outcome = start_held_check(tmp_path, rotating_jwks, key_b, door, "--shutdown-grace", "30")
    try:
        drain_in_flight_check(service, door, thread, outcome, rotating_jwks)
    finally:
        service.process.stop()  # a no-op once it has exited; stops it when an assertion failed first


def drain_in_flight_check(service: Service, door: str, thread: threading.Thread, outcome: dict[str, object],
                          rotating_jwks: ScriptedJwks) -> None:
    ready_url = f"http://127.0.0.1:{service.http_port}/readyz"
    assert http_request("GET", ready_url)[0] == 200

    service.process.proc.send_signal(signal.SIGTERM)
    # Readiness goes false at once, so Kubernetes stops routing here ...
    service.process.wait_until(lambda: http_request("GET", ready_url, timeout=2)[0] == 503, 60, "/readyz 503")
    # ... new Checks are refused once the drain began (Envoy turns that into a 503, never an allow):
    # one without a token would otherwise be answered (a 401 deny) at once, so a failed call is a
    # refusal (gRPC: UNAVAILABLE at connect or CANCELLED by the shutdown; HTTP: the listener is gone).
    service.process.wait_until(lambda: '"msg":"shutting down"' in service.process.log_text(), 60, "the drain began")
    service.process.wait_until(lambda: refused(service, door), 60, "new Checks refused")
    # ... while the Check already in flight is still being served.
    assert thread.is_alive() and service.process.alive()

    rotating_jwks.release.set()
    thread.join(60)
    assert outcome.get("response") == (200, ""), f"the drained Check got its answer: {outcome}"
    assert service.process.proc.wait(60) == 0
    assert '"msg":"shutting down"' in service.process.log_text()


def refused(service: Service, door: str) -> bool:
    try:
        door_check(service, door, None, timeout=10)
    except grpc.RpcError as exc:
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    except (OSError, http.client.HTTPException):
        return True
    return False


@pytest.mark.parametrize("door", MODES)
def test_sigterm_grace_period_bounds_the_drain(tmp_path: Path, rotating_jwks: ScriptedJwks, key_b: SigningKey,
                                               door: str) -> None:
    """A Check that outlives the grace period is cut off (Envoy: 503) and the process still exits."""
    service, thread, outcome = start_held_check(tmp_path, rotating_jwks, key_b, door, "--shutdown-grace", "1")
    assert service.process.exit_code_after(signal.SIGTERM) == 0  # after the grace, though a JWKS fetch hangs
    thread.join(60)
    assert "error" in outcome and "response" not in outcome, outcome


def test_sigterm_while_starting_is_a_drain_once_started(tmp_path: Path, key_a: SigningKey) -> None:
    """A stop signal that arrives while start-up waits for the first JWKS fetch (the ports are open
    by then) stops the service once the start is done: exit 0, never the default death by signal."""
    jwks = ScriptedJwks(first=[key_a], later=[key_a], held_from=1)
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(f"issuers:\n  - user_pool_id: us-east-1_Test00001\n    jwks_uri: {jwks.url}\n"
                          "routes:\n  - path: /transactions\n    scopes: [transactions/post]\n")
        service = start_service(tmp_path, policy, "--jwks-timeout", "60", wait_ready=False)
        assert jwks.hanging.wait(60), "the start-up JWKS fetch never came"
        service.process.proc.send_signal(signal.SIGTERM)
        jwks.release.set()
        assert service.process.proc.wait(60) == 0, service.process.log_tail()
        assert '"msg":"shutting down"' in service.process.log_text()
    finally:
        jwks.close()


def test_sighup_while_starting_reloads_once_started(tmp_path: Path, key_a: SigningKey) -> None:
    """A SIGHUP that arrives while start-up waits for the first JWKS fetch (the ports are open by
    then) neither kills the service (the signal's default action) nor is lost: the policy file,
    changed after start-up read it, is loaded once the start is done (polling an hour apart, so only
    the SIGHUP can load it)."""
    jwks = ScriptedJwks(first=[key_a], later=[key_a], held_from=1)
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(f"issuers:\n  - user_pool_id: us-east-1_Test00001\n    jwks_uri: {jwks.url}\n"
                          "routes:\n  - path: /transactions\n    scopes: [transactions/post]\n")
        service = start_service(tmp_path, policy, "--jwks-timeout", "60", "--policy-watch", "poll",
                                "--policy-poll-interval", "3600", wait_ready=False)
        assert jwks.hanging.wait(60), "the start-up JWKS fetch never came"
        policy.write_text(policy.read_text() + "  - name: docs\n    path: /docs/**\n    public: true\n")
        changed = hashlib.sha256(policy.read_bytes()).hexdigest()
        service.process.proc.send_signal(signal.SIGHUP)
        jwks.release.set()

        def serving() -> str | None:
            assert service.process.proc.poll() is None, service.process.log_tail()
            try:
                answer = http_request("GET", f"http://127.0.0.1:{service.http_port}/readyz")[2]
            except OSError:
                return None
            return json.loads(answer)["policy"]["sha256"]

        wait_for(lambda: serving() == changed, 60, "the policy changed during start-up, loaded by the SIGHUP")
    finally:
        jwks.close()


def test_sighup_reloads_the_policy_at_once(tmp_path: Path) -> None:
    """SIGHUP loads at once (with inotify, the close of this in-place write would load it too)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(issuer="http://127.0.0.1:9/us-east-1_Demo00001"))
    # Polling mode, an hour apart (the last flag wins): only SIGHUP can make the new policy serve.
    service = start_service(tmp_path, policy, "--policy-watch", "poll", "--policy-poll-interval", "3600",
                            wait_ready=False)
    http_port = service.http_port
    try:

        def serving() -> dict:
            return json.loads(http_request("GET", f"http://127.0.0.1:{http_port}/readyz")[2])["policy"]

        def failed_jwks_fetches() -> float:  # the issuer (port 9) refuses: retries back off 1 s, 2 s, 4 s ...
            return sum(service.sample("authz_jwks_refreshes_total", issuer="us-east-1_Demo00001", trigger=t,
                                      result="error") for t in ("startup", "periodic"))

        before = serving()
        policy.write_text(policy.read_text() + "  - name: docs\n    path: /docs/**\n    public: true\n")
        # No sleep: two more failed JWKS retries after the write mean the service's event loop ran its
        # timers for 1.6 s or more (backoff >= 0.8 s, then >= 1.6 s), so a poll timer of a shorter
        # interval (start_service's 0.2 s) would have fired several times before them.
        fetches = failed_jwks_fetches()
        service.process.wait_until(lambda: failed_jwks_fetches() >= fetches + 2, 60, "two more JWKS retries")
        assert serving() == before, "without SIGHUP the 1 h poll interval keeps the old policy"
        service.process.proc.send_signal(signal.SIGHUP)
        after = service.process.wait_until(lambda: (p := serving())["sha256"] != before["sha256"] and p, 60, "reload on SIGHUP")
        assert after["routes"] == before["routes"] + 1 and after["last_reload_error"] is None
        assert '"reason":"SIGHUP"' in service.process.log_text()
    finally:
        service.process.stop()
