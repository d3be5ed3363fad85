"""Route conditions and both Cognito issuer formats through a real Envoy, in both ext_authz modes.

Tokens come over HTTP from two dev issuers: one issues like a pool with the updated issuer
(``issuer-cognito-idp``), a replica region and a pre token generation trigger adding custom claims
(authz_service/examples/dev-issuer-custom-claims.yaml); the other like a pool with the original
issuer (``cognito-idp``). The policy uses Cognito's own issuer URLs; only the JWKS URLs point at
the local issuers. Every request goes client -> Envoy -> (our service) -> echo upstream.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from .harness import MODES, EnvoyProcess, http_request, wait_for
from .security_stack import Answer, logged
from .stack import TRANSACTION_ROUTES, EXAMPLES, DevIssuer, PolicyDir, Service, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

CLAIMS_POOL = "us-east-1_Demo00002"
ORIGINAL_POOL = "us-east-1_Demo00003"


def policy_text(claims: DevIssuer, original: DevIssuer, tenant: str = "acme", *, deny_clients: tuple[str, ...] = (),
                deny_jtis: tuple[str, ...] = ()) -> str:
    """The custom-claims example policy with its JWKS URL pointing at ``claims``, plus a pool with the
    original issuer format and the transaction routes its clients use; ``deny_*`` fill its deny section."""
    example = (EXAMPLES / "policy-custom-claims.yaml").read_text()
    example = example.replace("http://127.0.0.1:9001/us-east-1_Demo00002/.well-known/jwks.json", claims.jwks_uri)
    example = example.replace('"custom:tenant": acme ', f'"custom:tenant": {tenant} ')
    example = example.replace("  client_ids: []\n  jtis: []\n",
                              f"  client_ids: {json.dumps(list(deny_clients))}\n  jtis: {json.dumps(list(deny_jtis))}\n")
    issuers, deny = example.split("# Emergency deny list")
    return (issuers + f"  - user_pool_id: {ORIGINAL_POOL}\n    jwks_uri: {original.jwks_uri}\n"
            + "# Emergency deny list" + deny + TRANSACTION_ROUTES.format())


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


# --- tenant binding: a claim equal to a path parameter ----------------------------------------------


def test_a_tenants_token_reaches_its_own_path_and_never_another_tenants(stack, send):
    acme = stack.claims.token("acme-reporting")
    assert send("GET", "/tenants/acme/dashboards/weekly", acme).status == 200
    before = stack.service.sample("authz_check_decisions_total", decision="deny", reason="param_mismatch",
                                  route="tenant-dashboards", status="403")
    answer = send("GET", "/tenants/globex/dashboards/weekly", acme)
    denied(answer, "token claim does not match the path parameter: custom:tenant")
    assert b"acme" not in answer.body and b"globex" not in answer.body
    assert stack.service.sample("authz_check_decisions_total", decision="deny", reason="param_mismatch",
                                route="tenant-dashboards", status="403") == before + 1
    globex = stack.claims.token("globex-reporting")
    assert send("GET", "/tenants/globex/dashboards/weekly", globex).status == 200
    # Letter case and percent-encoding never make another spelling of the tenant the token's.
    denied(send("GET", "/tenants/ACME/dashboards/weekly", acme),
           "token claim does not match the path parameter: custom:tenant")
    denied(send("GET", "/tenants/acme%3A/dashboards/weekly", acme),
           "token claim does not match the path parameter: custom:tenant")
    # Envoy normalizes an escaped unreserved character (%65 is 'e'): the decision and the app see 'acme'.
    normalized = send("GET", "/tenants/acm%65/dashboards/weekly", acme)
    assert normalized.status == 200 and normalized.reached_upstream[0]["path"] == "/tenants/acme/dashboards/weekly"


def test_a_token_without_the_tenant_claim_is_refused_on_every_tenants_path(stack, send):
    denied(send("GET", "/tenants/acme/dashboards/weekly", stack.claims.token("ops-bot")),
           "token lacks a required claim: custom:tenant")


# --- the emergency deny list -------------------------------------------------------------------------


@contextmanager
def serving(stack: Stack, text: str) -> Iterator[None]:
    """The service serves ``text`` (its reload seen in authz_policy_generation), then the original again."""

    def load(policy: str) -> None:
        generation = stack.service.sample("authz_policy_generation")
        stack.policy.write(policy)
        wait_for(lambda: stack.service.sample("authz_policy_generation") > generation, 20, "policy reload")

    load(text)
    try:
        yield
    finally:
        load(policy_text(stack.claims, stack.original))


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


def revoked(answer: Answer, description: str) -> None:
    """The deny list's 401: RFC 6750 invalid_token, and nothing reached the app."""
    assert answer.status == 401, answer.body
    assert answer.headers["www-authenticate"] == (
        f'Bearer realm="authz-service", error="invalid_token", error_description="{description}"')
    assert (answer.error, answer.description, answer.reached_upstream) == ("invalid_token", description, [])


def test_a_deny_listed_client_is_refused_on_its_next_request_though_its_token_is_cached(stack, send):
    acme, globex = stack.claims.token("acme-reporting"), stack.claims.token("globex-reporting")
    for _ in range(2):  # the second time from the verified-token cache
        assert send("GET", "/tenants/acme/reports/3", acme).status == 200
    assert send("GET", "/tenants/globex/dashboards/d", globex).status == 200
    with serving(stack, policy_text(stack.claims, stack.original, deny_clients=("acme-reporting",))):
        assert stack.service.sample("authz_deny_list_entries", kind="client_id") == 1
        hits = stack.service.sample("authz_token_cache_lookups_total", result="hit")
        before = stack.service.sample("authz_check_decisions_total", decision="deny", reason="deny_listed",
                                      route="acme-reports", status="401")
        revoked(send("GET", "/tenants/acme/reports/3", acme), "client is revoked")
        assert stack.service.sample("authz_token_cache_lookups_total", result="hit") == hits + 1  # cached
        assert stack.service.sample("authz_check_decisions_total", decision="deny", reason="deny_listed",
                                    route="acme-reports", status="401") == before + 1
        entries = logged(stack, msg="deny", reason="deny_listed")  # type: ignore[arg-type]
        assert entries and entries[-1]["client_id"] == "acme-reporting"
        revoked(send("GET", "/tenants/acme/dashboards/d", stack.claims.token("acme-reporting")), "client is revoked")
        assert send("GET", "/tenants/globex/dashboards/d", globex).status == 200  # another client: unaffected
        assert send("GET", "/healthz", acme).status == 200  # public routes stay public
    assert stack.service.sample("authz_deny_list_entries", kind="client_id") == 0
    assert send("GET", "/tenants/acme/reports/3", acme).status == 200  # lifted: the same token works again


def test_a_deny_listed_jti_refuses_that_token_only(stack, send):
    leaked, fresh = stack.claims.token("acme-reporting"), stack.claims.token("acme-reporting")
    assert send("GET", "/tenants/acme/reports/4", leaked).status == 200
    with serving(stack, policy_text(stack.claims, stack.original, deny_jtis=(jti_of(leaked),))):
        assert stack.service.sample("authz_deny_list_entries", kind="jti") == 1
        revoked(send("GET", "/tenants/acme/reports/4", leaked), "token is revoked")
        assert send("GET", "/tenants/acme/reports/4", fresh).status == 200  # the client's new token works


# --- the same policy compiled for Envoy (native mode) --------------------------------------------------


def test_native_mode_answers_bindings_and_the_deny_list_as_the_service(stack, module_envoy_factory):
    """A bound route goes to the service (ext_authz); the deny list is Envoy's own RBAC on native routes.
    Every answer equals the gRPC-mode Envoy's."""
    acme, globex, ops = (stack.claims.token(c) for c in ("acme-reporting", "globex-reporting", "ops-bot"))
    leaked = stack.claims.token("acme-reporting")
    text = policy_text(stack.claims, stack.original, deny_clients=("globex-reporting",), deny_jtis=(jti_of(leaked),))
    with serving(stack, text):
        native = module_envoy_factory.native(stack.service, stack.policy.path, name="envoy-native-conditions")
        try:
            cases = [("GET", "/tenants/acme/dashboards/x", acme, 200), ("GET", "/tenants/globex/dashboards/x", acme, 403),
                     ("GET", "/tenants/acme/reports/1", acme, 200),  # native route
                     ("GET", "/tenants/acme/reports/1", globex, 401),  # deny-listed client, native route
                     ("GET", "/tenants/acme/reports/1", leaked, 401),  # deny-listed jti, native route
                     ("GET", "/tenants/globex/dashboards/x", globex, 401),  # deny-listed, the service's route
                     ("DELETE", "/admin/users/1", ops, 200), ("GET", "/healthz", globex, 200)]
            decided = stack.service.sample("authz_check_decisions_total", decision="deny", reason="deny_listed",
                                           route="acme-reports", status="401")
            for method, path, token, status in cases:
                answers = []
                for envoy in (stack.envoys["grpc"], native):
                    got, headers, body = http_request(method, envoy.url(path), [("Authorization", f"Bearer {token}")])
                    headers = {k.lower(): v for k, v in headers}
                    answers.append((got, headers.get("www-authenticate"), body if got != 200 else b""))
                assert answers[0] == answers[1], (method, path, answers)
                assert answers[0][0] == status, (method, path, answers[0])
            # gRPC mode asked the service twice on the native route (client and jti); native mode did not.
            assert stack.service.sample("authz_check_decisions_total", decision="deny", reason="deny_listed",
                                        route="acme-reports", status="401") == decided + 2
        finally:
            native.stop()
