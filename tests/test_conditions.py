"""Route conditions (all_scopes, client_ids, claims): loading, semantics, the decision and its answer,
with real tokens verified by the real TokenVerifier (and its cache, re-checked on every hit)."""

from __future__ import annotations

import re
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.claims import UNSUPPORTED, Claims, claim_value
from authz_service.decision import REASONS, Reason, decide
from authz_service.policy import PolicyError, parse_policy
from authz_service.request import HttpRequest
from authz_service.response import Answers
from authz_service.tokencache import TokenCache
from authz_service.tokens import TokenVerifier

from .conftest import MemoryKeys, SigningKey

SOURCE = "conditions.yaml"
HEAD = "issuers:\n  - user_pool_id: us-east-1_Test00001\nroutes:\n"
ROUTES = """\
  - name: tenant-report
    path: /reports/{id}
    scopes: [reports/read]
    claims:
      custom:tenant: acme
      tier: {any_of: [gold, platinum]}
      environments: {contains: prod}
  - name: audit
    path: /audit
    all_scopes: [audit/read, audit/export]
  - name: both
    path: /both
    scopes: [a/x, a/y]
    all_scopes: [a/z]
  - name: ops-only
    path: /ops/**
    scopes: [ops/run]
    client_ids: [ops-bot]
  - name: numbers
    path: /n
    scopes: [n/r]
    claims: {level: 3, beta: true, ratio: {any_of: [0.5, 1]}}
  - name: plain
    path: /plain
    scopes: [p/r]
  - name: trial
    path: /trial
    scopes: [t/r]
    claims: {tier: gold}
    mode: dry-run
"""
POLICY = parse_policy(HEAD + ROUTES, SOURCE)
GOOD_REPORT = {"scope": "reports/read", "custom:tenant": "acme", "tier": "gold", "environments": ["dev", "prod"]}


def load(routes: str):
    return parse_policy(HEAD + textwrap.dedent(routes), SOURCE)


def refused(routes: str) -> str:
    with pytest.raises(PolicyError) as caught:
        load(routes)
    return str(caught.value)


def request(method: str, path: str, token: str | None) -> HttpRequest:
    return HttpRequest(method=method, path=path, segments=tuple(path[1:].split("/")),
                       authorization=(f"Bearer {token}",) if token else (), request_id="rid",
                       spoofed_identity_headers=())


@pytest.fixture
def verifier(key_a: SigningKey) -> TokenVerifier:
    return TokenVerifier(MemoryKeys(key_a), cache=TokenCache(100, 1 << 20))


async def decide_for(verifier: TokenVerifier, key: SigningKey, path: str, policy=POLICY, **claims):
    return await decide(request("GET", path, key.token(**claims)), policy, verifier)


# --- loading ---------------------------------------------------------------------------------------


def test_loaded_conditions_and_the_claim_names_the_verifier_keeps():
    report, audit, both, ops, numbers, plain, _ = POLICY.routes
    assert [c.text for c in report.claims] == [
        "custom:tenant = 'acme'", "tier any of ['gold', 'platinum']", "environments contains 'prod'"]
    assert audit.scopes == frozenset() and audit.all_scopes == {"audit/read", "audit/export"}
    assert audit.all_scopes_text == "audit/export audit/read"
    assert ops.client_ids == {"ops-bot"}
    assert [c.text for c in numbers.claims] == ["level = 3", "beta = true", "ratio any of [0.5, 1]"]
    assert plain.conditions is None  # only scopes: decide does one set operation, as before
    assert all(r.conditions is not None for r in (report, audit, both, ops, numbers))
    assert POLICY.claim_names == {"custom:tenant", "tier", "environments", "level", "beta", "ratio"}


@pytest.mark.parametrize(("routes", "message"), [
    ("  - {path: /a, public: true, claims: {t: x}}\n", "a public route takes no claims"),
    ("  - {path: /a, public: true, all_scopes: [a/b], client_ids: [c]}\n",
     "a public route takes no all_scopes, client_ids; remove them"),
    ("  - {path: /a, claims: {t: x}}\n", "missing 'scopes' (the token must hold one of them), 'all_scopes'"),
    ("  - {path: /a, all_scopes: []}\n", "all_scopes: must be a non-empty list"),
    ("  - {path: /a, all_scopes: [a b]}\n", "'a b' is not a valid OAuth scope"),
    ("  - {path: /a, scopes: [r], client_ids: ['a b']}\n", "'a b' is not an app client id"),
    ("  - {path: /a, scopes: [r], claims: {}}\n", "must be a mapping of claim name to condition"),
    ("  - {path: /a, scopes: [r], claims: [t]}\n", "must be a mapping of claim name to condition"),
    ("  - {path: /a, scopes: [r], claims: {'a b': x}}\n", "claim name 'a b': use 1 to 128 printable ASCII"),
    ("  - {path: /a, scopes: [r], claims: {'a\"b': x}}\n", "without spaces, quotes or backslashes"),
    ("  - {path: /a, scopes: [r], claims: {client_id: x}}\n",
     "'client_id' is set by Cognito itself; use the route key 'client_ids' instead"),
    ("  - {path: /a, scopes: [r], claims: {scope: x}}\n", "use the route key 'scopes or all_scopes' instead"),
    ("  - {path: /a, scopes: [r], claims: {token_use: access}}\n",
     "'token_use' is set by Cognito itself; claim conditions are for custom claims"),
    ("  - {path: /a, scopes: [r], claims: {'cognito:groups': {contains: x}}}\n", "set by Cognito itself"),
    ("  - {path: /a, scopes: [r], claims: {t: [a, b]}}\n", "a list is ambiguous; write {any_of: [...]}"),
    ("  - {path: /a, scopes: [r], claims: {t: null}}\n", "must be a string, number or boolean, got nothing (null)"),
    ("  - {path: /a, scopes: [r], claims: {t: {equals: a, any_of: [b]}}}\n", "exactly one of equals, any_of"),
    ("  - {path: /a, scopes: [r], claims: {t: {regex: a}}}\n", "exactly one of equals, any_of, contains"),
    ("  - {path: /a, scopes: [r], claims: {t: {any_of: []}}}\n", "must be a non-empty list"),
    ("  - {path: /a, scopes: [r], claims: {t: {any_of: [a, a]}}}\n", "'a' is listed twice"),
    ("  - {path: /a, scopes: [r], claims: {t: {any_of: [{x: 1}]}}}\n", "must be a string, number or boolean"),
    ("  - {path: /a, scopes: [r], claims: {t: {contains: 1}}}\n", "must be a string (list claims hold strings)"),
    ("  - {path: /a, scopes: [r], claims: {t: .nan}}\n", "is not a JSON number"),
])
def test_condition_mistakes_are_refused_with_file_line_and_place(routes, message):
    text = refused(routes)
    assert re.match(rf"{SOURCE}:\d+:\d+: routes\[0\]", text), text
    assert message in text, text


def test_any_of_keeps_values_of_different_types_apart():
    """1 and true are equal in Python; in a condition they are different JSON values."""
    policy = load("  - {path: /a, scopes: [r], claims: {t: {any_of: [1, true, '1']}}}\n")
    (cond,) = policy.routes[0].claims
    assert cond.holds(1) and cond.holds(1.0) and cond.holds(True) and cond.holds("1")
    assert not cond.holds(False) and not cond.holds(0) and not cond.holds("true")
    only_number = load("  - {path: /a, scopes: [r], claims: {t: 1}}\n").routes[0].claims[0]
    assert not only_number.holds(True) and only_number.holds(1.0)
    only_true = load("  - {path: /a, scopes: [r], claims: {t: true}}\n").routes[0].claims[0]
    assert not only_true.holds(1) and only_true.holds(True)


@pytest.mark.parametrize(("operator", "value", "holds"), [
    ("equals", "acme", True), ("equals", "ACME", False), ("equals", ("acme",), False),
    ("any_of", "gold", True), ("any_of", "bronze", False), ("any_of", ("bronze", "gold"), True),
    ("any_of", ("bronze",), False), ("contains", ("dev", "prod"), True), ("contains", ("dev",), False),
    ("contains", "prod", False),  # a string is not a list that holds the value
    ("equals", UNSUPPORTED, False), ("any_of", UNSUPPORTED, False), ("contains", UNSUPPORTED, False),
])
def test_operator_semantics(operator, value, holds):
    spec = {"equals": "acme", "any_of": "{any_of: [gold, silver]}", "contains": "{contains: prod}"}[operator]
    (cond,) = load(f"  - {{path: /a, scopes: [r], claims: {{t: {spec}}}}}\n").routes[0].claims
    assert cond.holds(value) is holds


@pytest.mark.parametrize(("raw", "kept"), [
    ("acme", "acme"), (3, 3), (2.5, 2.5), (True, True), (["a", "b"], ("a", "b")), ([], ()),
    ({"a": 1}, UNSUPPORTED), (None, UNSUPPORTED), (["a", 1], UNSUPPORTED), ([["a"]], UNSUPPORTED),
])
def test_claim_values_kept_by_json_type(raw, kept):
    assert claim_value(raw) == kept if kept is not UNSUPPORTED else claim_value(raw) is UNSUPPORTED


# --- decisions (real tokens, real verifier) ---------------------------------------------------------


async def test_token_meeting_every_claim_condition_is_allowed(verifier, key_a):
    decision = await decide_for(verifier, key_a, "/reports/7", **GOOD_REPORT)
    assert decision.allowed and decision.reason is Reason.ALLOWED


@pytest.mark.parametrize(("changes", "description"), [
    ({"custom:tenant": None}, "token lacks a required claim: custom:tenant"),
    ({"custom:tenant": "globex"}, "token claim does not have a required value: custom:tenant"),
    ({"custom:tenant": ["acme"]}, "token claim does not have a required value: custom:tenant"),
    ({"custom:tenant": {"id": "acme"}}, "token claim does not have a required value: custom:tenant"),
    ({"tier": "bronze"}, "token claim does not have a required value: tier"),
    ({"environments": ["dev"]}, "token claim does not have a required value: environments"),
    ({"environments": "prod"}, "token claim does not have a required value: environments"),
    ({"environments": None}, "token lacks a required claim: environments"),
])
async def test_claim_mismatch_is_a_403_naming_the_claim_never_its_value(verifier, key_a, changes, description):
    decision = await decide_for(verifier, key_a, "/reports/7", **{**GOOD_REPORT, **changes})
    assert (decision.allowed, decision.reason, decision.status) == (False, Reason.CLAIM_MISMATCH, 403)
    assert decision.description == description
    answer = Answers("realm").answer(decision, None)
    challenge = dict(answer.headers)["www-authenticate"]
    assert challenge == f'Bearer realm="realm", error="insufficient_scope", error_description="{description}"'
    for value in ("globex", "bronze", "dev", "acme"):
        assert value not in challenge and value not in answer.body


async def test_scope_is_checked_before_claims(verifier, key_a):
    decision = await decide_for(verifier, key_a, "/reports/7", **{**GOOD_REPORT, "scope": "other/x", "tier": "no"})
    assert decision.reason is Reason.INSUFFICIENT_SCOPE and decision.description == "token lacks a required scope"


@pytest.mark.parametrize(("scope", "reason", "missing"), [
    ("audit/read audit/export", Reason.ALLOWED, None),
    ("audit/read audit/export other/x", Reason.ALLOWED, None),
    ("audit/read", Reason.MISSING_SCOPE, "audit/export"),
    ("audit/export", Reason.MISSING_SCOPE, "audit/read"),
    ("other/x", Reason.MISSING_SCOPE, "audit/export"),
])
async def test_all_scopes_need_every_scope(verifier, key_a, scope, reason, missing):
    decision = await decide_for(verifier, key_a, "/audit", scope=scope)
    assert decision.reason is reason
    if missing is None:
        return
    assert decision.status == 403 and decision.description == f"token lacks a required scope: {missing}"
    answer = Answers("realm").answer(decision, None)
    assert dict(answer.headers)["www-authenticate"] == (
        f'Bearer realm="realm", error="insufficient_scope", error_description="token lacks a required scope: '
        f'{missing}", scope="audit/export audit/read"')
    assert '"scope":"audit/export audit/read"' in answer.body


@pytest.mark.parametrize(("scope", "reason"), [
    ("a/x a/z", Reason.ALLOWED), ("a/y a/z", Reason.ALLOWED), ("a/z", Reason.INSUFFICIENT_SCOPE),
    ("a/x", Reason.MISSING_SCOPE), ("a/x a/y", Reason.MISSING_SCOPE),
])
async def test_any_of_and_all_of_together(verifier, key_a, scope, reason):
    decision = await decide_for(verifier, key_a, "/both", scope=scope)
    assert decision.reason is reason
    if reason is Reason.INSUFFICIENT_SCOPE:  # the challenge names the scopes that would do
        assert 'scope="a/x a/y"' in dict(Answers("r").answer(decision, None).headers)["www-authenticate"]


async def test_route_client_ids_refuse_other_clients_before_scopes(verifier, key_a):
    allowed = await decide_for(verifier, key_a, "/ops/restart", scope="ops/run", client_id="ops-bot")
    assert allowed.allowed
    other = await decide_for(verifier, key_a, "/ops/restart", scope="other/x", client_id="client-b")
    assert (other.reason, other.status, other.description) == (
        Reason.CLIENT_NOT_ALLOWED_FOR_ROUTE, 403, "client is not allowed on this route")
    answer = Answers("realm").answer(other, None)
    assert dict(answer.headers)["www-authenticate"] == (
        'Bearer realm="realm", error="insufficient_scope", error_description="client is not allowed on this route"')
    assert "client-b" not in answer.body and "scope" not in answer.body.replace("insufficient_scope", "")


@pytest.mark.parametrize(("claims", "allowed"), [
    ({"level": 3, "beta": True, "ratio": 1}, True),
    ({"level": 3.0, "beta": True, "ratio": 0.5}, True),
    ({"level": "3", "beta": True, "ratio": 1}, False),
    ({"level": 3, "beta": 1, "ratio": 1}, False),
    ({"level": 3, "beta": "true", "ratio": 1}, False),
    ({"level": 3, "beta": True, "ratio": True}, False),
])
async def test_numbers_and_booleans_compare_by_json_type(verifier, key_a, claims, allowed):
    decision = await decide_for(verifier, key_a, "/n", scope="n/r", **claims)
    assert decision.allowed is allowed


async def test_dry_run_route_allows_a_claim_mismatch_and_reports_it(verifier, key_a):
    decision = await decide_for(verifier, key_a, "/trial", scope="t/r", tier="bronze")
    assert decision.allowed and decision.dry_run and decision.reason is Reason.CLAIM_MISMATCH
    assert decision.kind == "dry_run_deny" and decision.status == 403


async def test_cached_token_is_checked_against_the_current_policy_on_every_hit(key_a):
    """A token verified (and cached) under one policy meets new conditions only if its claims do;
    claims the old policy did not name are read again, never assumed absent."""
    cache = TokenCache(100, 1 << 20)
    verifier = TokenVerifier(MemoryKeys(key_a), cache=cache)
    token = key_a.token(scope="p/r", team="blue", tier="gold")
    before = parse_policy(HEAD + "  - {name: plain, path: /plain, scopes: [p/r]}\n", SOURCE)
    assert (await decide(request("GET", "/plain", token), before, verifier)).allowed
    assert len(cache) == 1 and next(iter(cache._entries.values())).claims.custom == {}

    after_red = parse_policy(HEAD + "  - {name: plain, path: /plain, scopes: [p/r], claims: {team: red}}\n", SOURCE)
    denied = await decide(request("GET", "/plain", token), after_red, verifier)
    assert denied.reason is Reason.CLAIM_MISMATCH  # not "lacks a required claim": team was read again
    assert denied.description == "token claim does not have a required value: team"
    assert next(iter(cache._entries.values())).claims.custom == {"team": "blue"}

    after_blue = parse_policy(HEAD + "  - {name: plain, path: /plain, scopes: [p/r], claims: {team: blue}}\n",
                              SOURCE)
    hits = []
    original = verifier.verify_uncached

    async def counting(token_, policy_):
        hits.append(token_)
        return await original(token_, policy_)

    verifier.verify_uncached = counting  # type: ignore[method-assign]
    assert (await decide(request("GET", "/plain", token), after_blue, verifier)).allowed
    assert hits == []  # same claim names: a cache hit, re-checked against the new condition

    ops = parse_policy(HEAD + "  - {name: plain, path: /plain, scopes: [p/r], client_ids: [ops-bot]}\n", SOURCE)
    assert (await decide(request("GET", "/plain", token), ops, verifier)).reason is Reason.CLIENT_NOT_ALLOWED_FOR_ROUTE
    assert hits == []


def test_every_condition_reason_is_a_403_insufficient_scope_in_every_protocol():
    for reason in (Reason.MISSING_SCOPE, Reason.CLIENT_NOT_ALLOWED_FOR_ROUTE, Reason.CLAIM_MISMATCH):
        outcome = REASONS[reason]
        assert (outcome.http_status, outcome.oauth_error, outcome.grpc_code) == (403, "insufficient_scope", 7)


async def test_claims_keep_only_the_claims_the_policy_names(verifier, key_a):
    decision = await decide_for(verifier, key_a, "/reports/7", secret="x" * 500, other=[1, 2], **GOOD_REPORT)
    assert decision.allowed
    assert dict(decision.claims.custom) == {"custom:tenant": "acme", "tier": "gold", "environments": ("dev", "prod")}
    assert decision.claims.extracted is POLICY.claim_names
    plain = await decide_for(verifier, key_a, "/plain", scope="p/r", team="x")
    assert plain.allowed and "team" not in plain.claims.custom


async def test_custom_claims_are_never_forwarded_upstream(verifier, key_a):
    decision = await decide_for(verifier, key_a, "/reports/7", **GOOD_REPORT)
    answer = Answers("realm").answer(decision, request("GET", "/reports/7", "t"))
    assert [name for name, _ in answer.headers] == ["x-auth-client-id", "x-auth-scopes", "x-auth-sub"]


_CLAIM_VALUES = st.one_of(st.sampled_from(["acme", "globex", "gold", "silver", "prod", 3, 3.0, 0.5, 1, True, False]),
                          st.lists(st.sampled_from(["dev", "prod", "gold"]), max_size=3).map(tuple),
                          st.just(UNSUPPORTED))


@settings(max_examples=300, deadline=None)
@given(route=st.sampled_from([r for r in POLICY.routes if not r.public]),
       client=st.sampled_from(["ops-bot", "client-a"]),
       scopes=st.frozensets(st.sampled_from(["reports/read", "audit/read", "audit/export", "a/x", "a/z", "ops/run",
                                             "n/r", "p/r", "t/r"])),
       custom=st.dictionaries(st.sampled_from(["custom:tenant", "tier", "environments", "level", "beta", "ratio"]),
                              _CLAIM_VALUES))
def test_each_lists_the_conditions_unmet_checks_in_its_order(route, client, scopes, custom):
    """explain shows every condition through Conditions.each; decide() uses unmet: the first
    failure of one is the answer of the other, for any route and token."""
    claims = Claims("iss", client, client, scopes, " ".join(sorted(scopes)), 0, "kid", custom,
                    POLICY.claim_names)
    requirements = route.requirements
    failures = [(unmet, failure) for unmet, _, failure in requirements.each(claims) if failure is not None]
    assert requirements.unmet(claims) == (failures[0] if failures else None)
