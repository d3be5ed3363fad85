"""Route conditions and both Cognito issuer formats through a real Envoy, in both ext_authz modes.

Tokens come over HTTP from two dev issuers: one issues like a pool with the updated issuer
(``issuer-cognito-idp``), a replica region and a pre token generation trigger adding custom claims
(authz_service/examples/dev-issuer-custom-claims.yaml); the other like a pool with the original
issuer (``cognito-idp``). The policy uses Cognito's own issuer URLs; only the JWKS URLs point at
the local issuers. Every request goes client -> Envoy -> (our service) -> echo upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .harness import MODES, EnvoyProcess, wait_for
from .security_stack import Answer, logged
from .stack import TRANSACTION_ROUTES, EXAMPLES, DevIssuer, PolicyDir, Service, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

CLAIMS_POOL = "us-east-1_Demo00002"
ORIGINAL_POOL = "us-east-1_Demo00003"


def policy_text(claims: DevIssuer, original: DevIssuer, tenant: str = "acme") -> str:
    """The custom-claims example policy with its JWKS URL pointing at ``claims``, plus a pool with the
    original issuer format and the transaction routes its clients use."""
    example = (EXAMPLES / "policy-custom-claims.yaml").read_text()
    example = example.replace("http://127.0.0.1:9001/us-east-1_Demo00002/.well-known/jwks.json", claims.jwks_uri)
    example = example.replace('"custom:tenant": acme ', f'"custom:tenant": {tenant} ')
    head, routes = example.split("routes:\n")
    return (head + f"  - user_pool_id: {ORIGINAL_POOL}\n    jwks_uri: {original.jwks_uri}\n"
            + "routes:\n" + routes + TRANSACTION_ROUTES.format())


@dataclass
class Stack:
    claims: DevIssuer
    original: DevIssuer
    policy: PolicyDir
    service: Service
    envoys: dict[str, EnvoyProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, module_envoy_factory, upstream) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("conditions")
    started = []
    try:
        claims = start_dev_issuer(work, CLAIMS_POOL, example="dev-issuer-custom-claims.yaml")
        started.append(claims.process)
        original = start_dev_issuer(work, ORIGINAL_POOL, issuer_format="original")
        started.append(original.process)
        policy = PolicyDir(work / "config")
        policy.write(policy_text(claims, original))
        service = start_service(work, policy.path)
        started.append(service.process)
        envoys = {mode: module_envoy_factory.for_service(service, mode) for mode in MODES}
        yield Stack(claims, original, policy, service, envoys)
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture(params=MODES)
def send(request, stack: Stack, upstream):
    """One request through the Envoy of one ext_authz mode; the answer says what reached the app."""
    from .harness import http_request

    envoy = stack.envoys[request.param]

    def send(method: str, path: str, token: str) -> Answer:
        mark = upstream.mark()
        status, headers, body = http_request(method, envoy.url(path), [("Authorization", f"Bearer {token}")])
        return Answer(status, {k.lower(): v for k, v in headers}, body, upstream.requests_since(mark))

    return send


def denied(answer: Answer, description: str, scope: str | None = None) -> None:
    """A condition's 403: the RFC 6750 challenge naming what is missing, and nothing reached the app."""
    assert answer.status == 403, answer.body
    challenge = f'Bearer realm="authz-service", error="insufficient_scope", error_description="{description}"'
    assert answer.headers["www-authenticate"] == challenge + (f', scope="{scope}"' if scope else "")
    assert answer.error == "insufficient_scope" and answer.description == description
    assert answer.reached_upstream == []


def test_a_token_meeting_the_claim_condition_reaches_the_app_without_its_claims(stack, send):
    answer = send("GET", "/tenants/acme/reports/7", stack.claims.token("acme-reporting"))
    assert answer.status == 200, answer.body
    [seen] = answer.reached_upstream
    assert seen["headers"]["x-auth-client-id"] == ["acme-reporting"]
    forwarded = " ".join(f"{k}: {v}" for k, v in seen["headers"].items())
    assert "acme" not in forwarded.replace("acme-reporting", "") and "gold" not in forwarded  # claims stay here


def test_another_tenants_token_is_refused_naming_the_claim_not_the_values(stack, send):
    before = stack.service.sample("authz_check_decisions_total", decision="deny", reason="claim_mismatch",
                                  route="acme-reports", status="403")
    answer = send("GET", "/tenants/acme/reports/7", stack.claims.token("globex-reporting"))
    denied(answer, "token claim does not have a required value: custom:tenant")
    assert b"globex" not in answer.body and "globex" not in answer.headers["www-authenticate"]
    assert stack.service.sample("authz_check_decisions_total", decision="deny", reason="claim_mismatch",
                                route="acme-reports", status="403") == before + 1


def test_a_token_without_the_claim_is_told_which_claim_it_lacks(stack, send):
    denied(send("GET", "/tenants/acme/reports/7", stack.claims.token("ops-bot")),
           "token lacks a required claim: custom:tenant")


def test_all_scopes_and_claims_on_export(stack, send):
    assert send("POST", "/reports/export", stack.claims.token("acme-reporting")).status == 200
    # acme asking for one scope only: the all-of requirement names the missing one
    denied(send("POST", "/reports/export", stack.claims.token("acme-reporting", "reports/read")),
           "token lacks a required scope: reports/export", scope="reports/export reports/read")
    denied(send("POST", "/reports/export", stack.claims.token("globex-reporting")),
           "token lacks a required scope: reports/export", scope="reports/export reports/read")


def test_route_client_ids_refuse_every_other_client(stack, send):
    assert send("DELETE", "/admin/users/1", stack.claims.token("ops-bot")).status == 200
    answer = send("DELETE", "/admin/users/1", stack.claims.token("acme-reporting"))
    denied(answer, "client is not allowed on this route")
    assert stack.service.sample("authz_check_decisions_total", decision="deny",
                                reason="client_not_allowed_for_route", route="admin", status="403") >= 1
    entries = logged(stack, msg="deny", reason="client_not_allowed_for_route")  # type: ignore[arg-type]
    assert entries and entries[-1]["client_id"] == "acme-reporting" and entries[-1]["route"] == "admin"


def test_updated_issuer_tokens_from_the_primary_and_the_replica_region(stack, send):
    primary = stack.claims.token("acme-reporting")
    replica = stack.claims.token("acme-reporting", region="eu-west-1")
    assert stack.claims.region_issuer("eu-west-1") == f"https://issuer-cognito-idp.eu-west-1.amazonaws.com/{CLAIMS_POOL}"
    for token in (primary, replica):
        assert send("GET", "/tenants/acme/reports/1", token).status == 200
    status, ready = stack.service.readyz()
    assert status == 200
    keys = {i["issuer"]: i["keys"] for i in ready["issuers"]}  # every accepted issuer has its own keys
    assert keys == {stack.claims.issuer: 1, stack.claims.region_issuer("eu-west-1"): 1, stack.original.issuer: 1}
    series = {label: stack.service.sample("authz_jwks_keys", issuer=label)
              for label in (CLAIMS_POOL, f"{CLAIMS_POOL}@eu-west-1", ORIGINAL_POOL)}
    assert series == {CLAIMS_POOL: 1.0, f"{CLAIMS_POOL}@eu-west-1": 1.0, ORIGINAL_POOL: 1.0}


def test_original_issuer_tokens(stack, send):
    assert stack.original.issuer == f"https://cognito-idp.us-east-1.amazonaws.com/{ORIGINAL_POOL}"
    assert send("POST", "/transactions", stack.original.token("payments-writer")).status == 200
    assert send("POST", "/transactions", stack.original.token("payments-reader")).status == 403


def test_a_cached_token_meets_the_policy_in_force_after_a_reload(stack, send):
    """The same token (a cache hit the second time) is re-checked against the reloaded conditions."""
    token = stack.claims.token("acme-reporting")
    assert send("GET", "/tenants/acme/reports/2", token).status == 200
    assert send("GET", "/tenants/acme/reports/2", token).status == 200
    generation = stack.service.sample("authz_policy_generation")
    try:
        stack.policy.write(policy_text(stack.claims, stack.original, tenant="globex"))
        wait_for(lambda: stack.service.sample("authz_policy_generation") > generation, 20, "policy reload")
        hits = stack.service.sample("authz_token_cache_lookups_total", result="hit")
        denied(send("GET", "/tenants/acme/reports/2", token),
               "token claim does not have a required value: custom:tenant")
        assert stack.service.sample("authz_token_cache_lookups_total", result="hit") == hits + 1  # from the cache
        assert send("GET", "/tenants/acme/reports/2", stack.claims.token("globex-reporting")).status == 200
    finally:
        generation = stack.service.sample("authz_policy_generation")
        stack.policy.write(policy_text(stack.claims, stack.original))
        wait_for(lambda: stack.service.sample("authz_policy_generation") > generation, 20, "policy restored")
    assert send("GET", "/tenants/acme/reports/2", token).status == 200
