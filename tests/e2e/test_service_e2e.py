"""The product as a user runs it: dev issuer -> token over HTTP -> Envoy -> authz-service -> upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .harness import EnvoyProcess, UpstreamProcess, http_request, wait_for
from .stack import PUBLIC_HEALTHZ, TRANSACTION_ROUTES, DevIssuer, PolicyDir, Service, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

POLICY = """
issuers:
  - user_pool_id: us-east-1_Demo00001
    issuer: {main}
    client_ids: [payments-writer, payments-reader]
  - user_pool_id: us-east-1_Short0001
    issuer: {short}
routes:
""" + TRANSACTION_ROUTES + PUBLIC_HEALTHZ + """\
  - name: refunds-dry-run
    methods: [POST]
    path: /refunds
    scopes: [refunds/post]
    mode: dry-run
"""

RELOADED = POLICY + """
  - name: reports
    methods: [GET]
    path: /reports/**
    scopes: [transactions/get]
"""


@dataclass
class Stack:
    main: DevIssuer
    short: DevIssuer
    stranger: DevIssuer
    policy: PolicyDir
    service: Service
    envoy: EnvoyProcess
    upstream: UpstreamProcess

    def send(self, method: str, path: str, token: str | None = None,
             headers: list[tuple[str, str]] | None = None, body: bytes | None = None):
        sent = list(headers or [])
        if token is not None:
            sent.append(("Authorization", f"Bearer {token}"))
        mark = self.upstream.mark()
        status, response_headers, data = http_request(method, self.envoy.url(path), sent, body)
        return Answer(status, {k.lower(): v for k, v in response_headers}, data, self.upstream.requests_since(mark))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reached_upstream: list[dict]

    def json(self) -> dict:
        return json.loads(self.body)

    def upstream_headers(self) -> dict[str, list[str]]:
        assert len(self.reached_upstream) == 1, self.reached_upstream
        return self.reached_upstream[0]["headers"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory,
          mode: str) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    issuers = [start_dev_issuer(work, "us-east-1_Demo00001"), start_dev_issuer(work, "us-east-1_Short0001", ttl=1),
               start_dev_issuer(work, "us-east-1_Other0001")]
    main, short, stranger = issuers
    policy = PolicyDir(work / "config")
    policy.write(POLICY.format(main=main.issuer, short=short.issuer))
    service = start_service(work, policy.path, "--leeway", "0")
    envoy = module_envoy_factory.for_service(service, mode)
    yield Stack(main, short, stranger, policy, service, envoy, upstream)
    service.process.stop()
    for issuer in issuers:
        issuer.process.stop()


def challenge(answer: Answer) -> str:
    return answer.headers.get("www-authenticate", "")


def test_allowed_request_reaches_upstream_with_identity(stack: Stack) -> None:
    token = stack.main.token("payments-writer")
    answer = stack.send("POST", "/transactions", token, body=b'{"amount": 5}')
    assert answer.status == 200
    seen = answer.upstream_headers()
    assert seen["x-auth-client-id"] == ["payments-writer"]
    assert seen["x-auth-scopes"] == ["transactions/post"]
    assert seen["x-auth-sub"] == ["payments-writer"]
    assert answer.reached_upstream[0]["method"] == "POST"


def test_spoofed_identity_headers_are_replaced_or_removed(stack: Stack) -> None:
    token = stack.main.token("payments-writer")
    spoof = [("X-Auth-Client-Id", "admin"), ("x_auth_client_id", "admin"), ("X-Auth-Scopes", "admin/all"),
             ("x_auth_sub", "root"), ("x-auth_scopes", "admin/all")]
    answer = stack.send("POST", "/transactions", token, headers=spoof)
    assert answer.status == 200
    seen = answer.upstream_headers()
    assert seen["x-auth-client-id"] == ["payments-writer"]
    assert seen["x-auth-scopes"] == ["transactions/post"]
    assert not [name for name in seen if "_" in name and name.replace("_", "-").startswith("x-auth-")]


def test_public_route_needs_no_token_and_strips_identity_headers(stack: Stack) -> None:
    answer = stack.send("GET", "/healthz?probe=1", headers=[("x-auth-client-id", "admin"), ("x_auth_sub", "root")])
    assert answer.status == 200
    seen = answer.upstream_headers()
    assert not [name for name in seen if name.replace("_", "-").startswith("x-auth-")]


def test_missing_token_is_401_with_bearer_challenge(stack: Stack) -> None:
    answer = stack.send("POST", "/transactions")
    assert answer.status == 401
    assert challenge(answer) == 'Bearer realm="authz-service"'
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]
    assert answer.reached_upstream == []


def test_basic_scheme_is_treated_as_no_token(stack: Stack) -> None:
    answer = stack.send("POST", "/transactions", headers=[("Authorization", "Basic cGF5bWVudHM6c2VjcmV0")])
    assert answer.status == 401 and answer.reached_upstream == []


@pytest.mark.parametrize(
    ("make_token", "description"),
    [
        (lambda s: "not-a-jwt", "malformed token"),
        (lambda s: tamper(s.main.token("payments-writer")), "token is not valid"),
        (lambda s: s.main.token("reporting"), "client is not allowed"),
        (lambda s: s.stranger.token("payments-writer"), "token is not valid"),
        (lambda s: s.main.id_token("payments-writer"), "not an access token (token_use must be access)"),
    ],
    ids=["malformed", "bad-signature", "client-not-allowed", "untrusted-issuer", "id-token"],
)
def test_bad_tokens_are_401_invalid_token(stack: Stack, make_token, description: str) -> None:
    token = make_token(stack)
    answer = stack.send("POST", "/transactions", token)
    assert answer.status == 401
    assert 'error="invalid_token"' in challenge(answer)
    assert answer.json() == {"error": "invalid_token", "error_description": description}
    assert token not in answer.body.decode() and token not in challenge(answer)
    assert answer.reached_upstream == []


def test_expired_token_is_401(stack: Stack) -> None:
    # This pool issues 1-second tokens in whole seconds (exp = iat + 1), so one may have only a few
    # milliseconds left when it is issued: fetch fresh ones until one arrives in time.
    def accepted_token() -> str | None:
        token = stack.short.token("payments-writer")
        answer = stack.send("POST", "/transactions", token)
        if answer.status == 200:
            return token
        assert (answer.status, answer.json()["error_description"]) == (401, "token expired"), answer.body
        return None

    token = wait_for(accepted_token, 60, "a 1-second token accepted before it expired")  # a 2nd issuer is trusted
    answer = wait_for(lambda: (a := stack.send("POST", "/transactions", token)).status != 200 and a, 60,
                      "the token refused once it expired")
    assert answer.status == 401
    assert answer.json()["error_description"] == "token expired"
    assert answer.reached_upstream == []


def test_valid_token_without_scope_is_403_insufficient_scope(stack: Stack) -> None:
    answer = stack.send("POST", "/transactions", stack.main.token("payments-reader"))
    assert answer.status == 403
    assert 'error="insufficient_scope"' in challenge(answer)
    assert 'scope="transactions/post"' in challenge(answer)
    assert answer.json()["error"] == "insufficient_scope"
    assert answer.reached_upstream == []


def test_unmatched_route_is_403(stack: Stack) -> None:
    answer = stack.send("DELETE", "/transactions/42", stack.main.token("payments-writer"))
    assert answer.status == 403
    assert answer.json()["error"] == "access_denied"
    assert answer.reached_upstream == []


def test_two_authorization_headers_are_400(stack: Stack) -> None:
    token = stack.main.token("payments-writer")
    answer = stack.send("POST", "/transactions", headers=[("Authorization", f"Bearer {token}"),
                                                          ("Authorization", f"Bearer {token}")])
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_request"
    assert answer.reached_upstream == []


def test_path_tricks_cannot_reach_a_protected_route_without_scope(stack: Stack) -> None:
    reader = stack.main.token("payments-reader")
    for path in ["//transactions", "/healthz/../transactions", "/./transactions", "/healthz/%2e%2e/transactions",
                 "/transactions;x=1", "/transactions%2F", "/%74ransactions"]:
        answer = stack.send("POST", path, reader)
        assert answer.status in (400, 403), (path, answer.status)
        assert answer.reached_upstream == [], path


def test_metrics_count_decisions_by_reason_and_route(stack: Stack) -> None:
    before = stack.service.sample("authz_check_decisions_total", decision="deny", reason="insufficient_scope",
                                  route="create-transaction", status="403")
    stack.send("POST", "/transactions", stack.main.token("payments-reader"))
    after = stack.service.sample("authz_check_decisions_total", decision="deny", reason="insufficient_scope",
                                 route="create-transaction", status="403")
    assert after == before + 1
    # Its own public request (tests run in any order: none may rely on another's traffic).
    public = stack.service.sample("authz_check_decisions_total", decision="allow", reason="public", route="healthz")
    assert stack.send("GET", "/healthz").status == 200
    assert stack.service.sample("authz_check_decisions_total", decision="allow", reason="public",
                                route="healthz") == public + 1


def test_dry_run_route_lets_a_token_without_the_scope_through_but_logs_and_counts_the_denial(stack: Stack) -> None:
    labels = {"decision": "dry_run_deny", "reason": "insufficient_scope", "route": "refunds-dry-run",
              "status": "403"}
    before = stack.service.sample("authz_check_decisions_total", **labels)
    answer = stack.send("POST", "/refunds", stack.main.token("payments-writer"))
    assert answer.status == 200, answer.body  # the new requirement is only watched, not enforced
    seen = answer.upstream_headers()
    assert seen["x-auth-client-id"] == ["payments-writer"]  # the verified identity, as on any allow
    assert seen["x-auth-scopes"] == ["transactions/post"]
    assert stack.service.sample("authz_check_decisions_total", **labels) == before + 1
    assert stack.service.sample("authz_check_decisions_total", decision="allow", route="refunds-dry-run") == 0
    (request_id,) = seen["x-request-id"]  # Envoy's own id: the app and the service log share it
    entries = [json.loads(line) for line in stack.service.process.log_text().splitlines() if request_id in line]
    assert [(e["msg"], e["decision"], e["reason"], e["route"], e["client_id"], e["status"]) for e in entries] == [
        ("dry-run deny", "dry_run_deny", "insufficient_scope", "refunds-dry-run", "payments-writer", 403)]
    # An enforced route in the same policy still denies the same kind of token.
    assert stack.send("POST", "/transactions", stack.main.token("payments-reader")).status == 403


def decision_log(stack: Stack) -> list[dict]:
    return [entry for line in stack.service.process.log_text().splitlines() if line.startswith("{")
            and (entry := json.loads(line))["logger"] == "authz_service.decisions"]


def test_the_decision_log_records_denials_only_by_default(stack: Stack) -> None:
    """One line per denial, naming the caller and the policy; an allowed call leaves no line unless
    --decision-log says so (test_decision_log_e2e.py)."""
    before = len(decision_log(stack))
    allowed = stack.send("POST", "/transactions", stack.main.token("payments-writer"))
    (request_id,) = allowed.upstream_headers()["x-request-id"]
    assert stack.send("POST", "/transactions", stack.main.token("payments-reader")).status == 403
    new = wait_for(lambda: decision_log(stack)[before:], 10, "the denial's decision log line")
    sha256 = stack.service.readyz()[1]["policy"]["sha256"]
    assert [(e["msg"], e["reason"], e["route"], e["client_id"], e["policy_sha256"], e["policy_version"])
            for e in new] == [("deny", "insufficient_scope", "create-transaction", "payments-reader", sha256, 1)]
    assert request_id not in stack.service.process.log_text()


def test_dry_run_route_never_lets_an_invalid_token_hide_as_an_identity(stack: Stack) -> None:
    # A forged token on a dry-run route passes (dry-run) but the upstream gets no identity from it.
    answer = stack.send("POST", "/refunds", tamper(stack.main.token("payments-writer")),
                        headers=[("x-auth-client-id", "spoofed")])
    assert answer.status == 200
    assert not [n for n in answer.upstream_headers() if n.replace("_", "-").startswith("x-auth-")]
    assert stack.service.sample("authz_check_decisions_total", decision="dry_run_deny", reason="bad_signature",
                                route="refunds-dry-run", status="401") >= 1


def test_key_rotation_is_picked_up(stack: Stack) -> None:
    old_token = stack.main.token("payments-writer")
    assert stack.send("POST", "/transactions", old_token).status == 200
    stack.main.rotate(retire_old=True)
    new_token = stack.main.token("payments-writer")

    # The unknown-kid re-fetch is rate limited (one per 10 s per issuer, counted from the start-up
    # fetch): until the service allows it, the new kid is refused as unknown; then one re-fetch
    # finds the new key. The service decides when that is; the test only watches.
    def allowed() -> Answer | None:
        answer = stack.send("POST", "/transactions", new_token)
        if answer.status == 200:
            return answer
        assert (answer.status, answer.json()["error_description"]) == (401, "token is not valid")
        return None

    wait_for(allowed, 60, "the new key found by an unknown-kid re-fetch", poll=0.25)
    assert stack.service.sample("authz_jwks_refreshes_total", issuer="us-east-1_Demo00001",
                                trigger="unknown_kid", result="ok") == 1
    retired = stack.send("POST", "/transactions", old_token)  # its key left the JWKS with the re-fetch
    assert retired.status == 401
    assert retired.json()["error_description"] == "token is not valid"


def test_policy_reload_while_serving_and_bad_file_keeps_old_policy(stack: Stack) -> None:
    token = stack.main.token("payments-reader")
    assert stack.send("GET", "/reports/daily", token).status == 403
    stack.policy.write(RELOADED.format(main=stack.main.issuer, short=stack.short.issuer))
    wait_for(lambda: stack.send("GET", "/reports/daily", token).status == 200, 60, "policy change picked up")
    errors = stack.service.sample("authz_policy_reloads_total", result="error")
    stack.policy.write("routes: [this is: not a policy")
    wait_for(lambda: stack.service.sample("authz_policy_reloads_total", result="error") > errors, 60,
             "bad policy file noticed")
    assert stack.send("GET", "/reports/daily", token).status == 200  # old policy still serving
    assert "policy reload failed" in stack.service.process.log_text()


def tamper(token: str) -> str:
    """Change the payload (one claim) but keep the header and signature."""
    import base64

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "transactions/post transactions/get"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"
