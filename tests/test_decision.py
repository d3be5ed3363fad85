"""decide(): route, then credentials, then scopes; dry-run; and the Authorization header rules.

The verifier here is a fake (a unit test of decide); real token verification is in test_tokens.py.
"""

from __future__ import annotations

import pytest

from authz_service.claims import Claims
from authz_service.decision import Decision, Reason, decide
from authz_service.policy import parse_policy
from authz_service.request import HttpRequest
from authz_service.tokens import Check, Failure, TokenError, bearer_token

from .test_policytool import REVIEW_POLICY

ISS = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Abc123"

POLICY = parse_policy(
    """
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: write
    methods: [POST]
    path: /tx
    scopes: [tx/write, tx/admin]
  - name: read
    methods: [GET]
    path: /tx/{id}
    scopes: [tx/read]
  - name: health
    path: /healthz
    public: true
  - name: new-rule
    path: /beta/**
    scopes: [beta/use]
    mode: dry-run
  - name: public-dry
    path: /docs
    public: true
    mode: dry-run
""",
    source="decision-test.yaml",
)

DRY_POLICY = parse_policy(
    """
mode: dry-run
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: inherits
    path: /a
    scopes: [r]
  - name: enforced
    path: /b
    scopes: [r]
    mode: enforce
""",
    source="dry.yaml",
)


def claims(*scopes: str, client_id: str = "client-a", sub: str = "client-a") -> Claims:
    return Claims(issuer=ISS, client_id=client_id, sub=sub, scopes=frozenset(scopes),
                  scope_text=" ".join(scopes), exp=2_000_000_000, kid="kid-a")


class FakeVerifier:
    """Returns the scripted Claims or raises the scripted TokenError, and records each call.

    ``from_cache`` picks the path that answers, as TokenVerifier does: the cache (the token was
    verified before; only a well-formed single Bearer value can hit) or full verification after
    ``bearer_token``. Every test runs both ways (fixture below)."""

    from_cache = False

    def __init__(self, outcome: Claims | TokenError) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, object]] = []

    def _answer(self, token: str, policy):
        self.calls.append((token, policy))
        if isinstance(self.outcome, TokenError):
            raise self.outcome
        return self.outcome

    def cached(self, authorization: tuple[str, ...], policy):
        if not self.from_cache:
            return None
        try:
            token = bearer_token(authorization)
        except TokenError:
            return None  # malformed credentials are never in the cache
        return None if token is None else self._answer(token, policy)

    async def verify_uncached(self, token: str, policy):
        assert not self.from_cache, "a cached token must not be verified again"
        return self._answer(token, policy)


@pytest.fixture(autouse=True, params=["first-sight", "cache-hit"])
def verification_path(request, monkeypatch):
    monkeypatch.setattr(FakeVerifier, "from_cache", request.param == "cache-hit")


def req(method: str, path: str, *authorization: str) -> HttpRequest:
    segments = tuple(path[1:].split("/")) if path != "/" else ()
    return HttpRequest(method=method, path=path, segments=segments, authorization=authorization,
                       request_id="rid", spoofed_identity_headers=())


async def run(request: HttpRequest, outcome: Claims | TokenError | None = None, policy=POLICY):
    verifier = FakeVerifier(outcome if outcome is not None else claims("tx/read", "tx/write"))
    decision = await decide(request, policy, verifier)
    return decision, verifier


# --- allow ---------------------------------------------------------------------------------------


async def test_valid_token_with_one_required_scope_is_allowed():
    token_claims = claims("tx/admin", "other")
    decision, verifier = await run(req("POST", "/tx", "Bearer tok.en.x"), token_claims)
    assert decision == Decision(True, Reason.ALLOWED, route=POLICY.routes[0], claims=token_claims)
    assert decision.route_label == "write"
    assert verifier.calls == [("tok.en.x", POLICY)]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(scheme):
    decision, verifier = await run(req("GET", "/tx/1", f"{scheme} abc"), claims("tx/read"))
    assert decision.allowed and decision.reason is Reason.ALLOWED
    assert verifier.calls[0][0] == "abc"


# --- no route / public ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("DELETE", "/tx"), ("GET", "/tx"), ("GET", "/")])
async def test_no_route_is_denied_403_without_verifying(method, path):
    decision, verifier = await run(req(method, path, "Bearer abc"))
    assert not decision.allowed
    assert (decision.reason, decision.status) == (Reason.NO_ROUTE, 403)
    assert decision.route is None and decision.route_label == "no_route"
    assert decision.description
    assert verifier.calls == []


@pytest.mark.parametrize("auth", [(), ("Bearer abc",), ("garbage",), ("Bearer a", "Bearer b")])
async def test_public_route_is_allowed_without_a_token(auth):
    decision, verifier = await run(req("GET", "/healthz", *auth), TokenError(Failure.EXPIRED, "token expired", check=Check.TIMES))
    assert decision.allowed and decision.reason is Reason.PUBLIC and decision.status == 200
    assert decision.route is POLICY.routes[2] and decision.claims is None and not decision.dry_run
    assert verifier.calls == []


async def test_public_dry_run_route_is_plain_public():
    decision, _ = await run(req("GET", "/docs"))
    assert decision.allowed and decision.reason is Reason.PUBLIC and not decision.dry_run


# --- denials -------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [(), ("Basic dXNlcjpwYXNz",), ("Digest x",)])
async def test_no_bearer_credentials_is_missing_token_401(auth):
    decision, verifier = await run(req("GET", "/tx/1", *auth))
    assert not decision.allowed
    assert (decision.reason, decision.status) == (Reason.MISSING_TOKEN, 401)
    assert decision.route is POLICY.routes[1]
    assert verifier.calls == []


@pytest.mark.parametrize(
    "auth",
    [
        ("Bearer a", "Bearer b"),  # two Authorization values
        ("Bearer a,Bearer b",),  # joined by Envoy's headers map
        ("Bearer",),
        ("Bearer ",),
        ("Bearer a b",),
        ("Bearer  abc",),
        ("Bearer a\"b",),
        ("Bearer a;b",),
        ("Bearer abc\n",),
        ("bearer é",),
    ],
)
async def test_malformed_authorization_is_bad_request_400(auth):
    decision, verifier = await run(req("GET", "/tx/1", *auth))
    assert not decision.allowed
    assert (decision.reason, decision.status) == (Reason.BAD_REQUEST, 400)
    assert verifier.calls == []
    for value in auth:  # the description never echoes the credentials
        token = value.partition(" ")[2].strip()
        if len(token) > 1:
            assert token not in decision.description


TOKEN_FAILURES = [
    (Failure.INVALID_TOKEN, Reason.INVALID_TOKEN, 401),
    (Failure.EXPIRED, Reason.EXPIRED, 401),
    (Failure.NOT_YET_VALID, Reason.NOT_YET_VALID, 401),
    (Failure.BAD_SIGNATURE, Reason.BAD_SIGNATURE, 401),
    (Failure.UNKNOWN_KEY, Reason.UNKNOWN_KEY, 401),
    (Failure.WRONG_ISSUER, Reason.WRONG_ISSUER, 401),
    (Failure.WRONG_TOKEN_USE, Reason.WRONG_TOKEN_USE, 401),
    (Failure.CLIENT_NOT_ALLOWED, Reason.CLIENT_NOT_ALLOWED, 401),
    (Failure.KEYS_UNAVAILABLE, Reason.KEYS_UNAVAILABLE, 503),
    (Failure.BAD_REQUEST, Reason.BAD_REQUEST, 400),
]


def test_every_failure_is_covered():
    assert {f for f, _, _ in TOKEN_FAILURES} == set(Failure)


@pytest.mark.parametrize(("failure", "reason", "status"), TOKEN_FAILURES)
async def test_token_failures_map_to_reason_and_status(failure, reason, status):
    decision, verifier = await run(req("POST", "/tx", "Bearer abc"), TokenError(failure, f"{failure.value} text", check=Check.HEADER))
    assert not decision.allowed and not decision.dry_run
    assert (decision.reason, decision.status) == (reason, status)
    assert decision.description == f"{failure.value} text"
    assert decision.route is POLICY.routes[0] and decision.claims is None
    assert len(verifier.calls) == 1


@pytest.mark.parametrize("scopes", [(), ("tx/read",), ("tx/writer",), ("TX/WRITE",), ("tx",)])
async def test_token_without_a_required_scope_is_insufficient_scope_403(scopes):
    token_claims = claims(*scopes)
    decision, _ = await run(req("POST", "/tx", "Bearer abc"), token_claims)
    assert not decision.allowed
    assert (decision.reason, decision.status) == (Reason.INSUFFICIENT_SCOPE, 403)
    assert decision.claims == token_claims and decision.route is POLICY.routes[0]


# --- dry-run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "outcome", "reason", "status"),
    [
        ((), None, Reason.MISSING_TOKEN, 401),
        (("Bearer a b",), None, Reason.BAD_REQUEST, 400),
        (("Bearer abc",), TokenError(Failure.EXPIRED, "token expired", check=Check.TIMES), Reason.EXPIRED, 401),
        (("Bearer abc",), TokenError(Failure.WRONG_ISSUER, "nope", check=Check.ISSUER), Reason.WRONG_ISSUER, 401),
        (("Bearer abc",), claims("tx/read"), Reason.INSUFFICIENT_SCOPE, 403),
    ],
)
async def test_dry_run_turns_a_denial_into_an_allow_and_keeps_the_reason(auth, outcome, reason, status):
    decision, _ = await run(req("GET", "/beta/x/y", *auth), outcome)
    assert decision.allowed and decision.dry_run
    assert (decision.reason, decision.status) == (reason, status)
    assert decision.route is POLICY.routes[3]
    assert decision.description
    if isinstance(outcome, Claims):
        assert decision.claims == outcome


async def test_dry_run_never_hides_keys_unavailable():
    decision, _ = await run(req("GET", "/beta", "Bearer abc"), TokenError(Failure.KEYS_UNAVAILABLE, "later", check=Check.KEY))
    assert not decision.allowed and not decision.dry_run
    assert (decision.reason, decision.status) == (Reason.KEYS_UNAVAILABLE, 503)


async def test_dry_run_route_allowing_normally_is_not_marked_dry_run():
    decision, _ = await run(req("GET", "/beta", "Bearer abc"), claims("beta/use"))
    assert decision.allowed and not decision.dry_run and decision.reason is Reason.ALLOWED


async def test_top_level_dry_run_applies_unless_the_route_enforces():
    inherits, _ = await run(req("GET", "/a"), policy=DRY_POLICY)
    assert inherits.allowed and inherits.dry_run and inherits.reason is Reason.MISSING_TOKEN
    enforced, _ = await run(req("GET", "/b"), policy=DRY_POLICY)
    assert not enforced.allowed and not enforced.dry_run and enforced.reason is Reason.MISSING_TOKEN
    unmatched, _ = await run(req("GET", "/c"), policy=DRY_POLICY)
    assert not unmatched.allowed and unmatched.reason is Reason.NO_ROUTE


# --- a path ending in '/': every route of both readings must allow ---------------------------------

SLASH_POLICY = parse_policy(
    "issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n" + REVIEW_POLICY + """\
  - name: a
    path: /a
    scopes: [a/read]
  - name: a-rest
    path: /a/**
    scopes: [a/all]
  - name: beta
    path: /beta
    scopes: [beta/use]
    mode: dry-run
""",
    source="slash.yaml",
)


def route_named(name: str):
    return next(r for r in SLASH_POLICY.routes if r.name == name)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_trailing_slash_needs_the_protected_route_a_lenient_router_serves(method):
    decision, verifier = await run(req(method, "/admin/report/"), policy=SLASH_POLICY)
    assert not decision.allowed and (decision.reason, decision.status) == (Reason.MISSING_TOKEN, 401)
    assert decision.route is route_named("admin-report") and verifier.calls == []
    token_claims = claims("admin/read")
    decision, verifier = await run(req(method, "/admin/report/", "Bearer abc"), token_claims, SLASH_POLICY)
    assert decision == Decision(True, Reason.ALLOWED, route=route_named("admin-report"), claims=token_claims)
    assert decision.route_label == "admin-report"


async def test_a_trailing_slash_on_a_public_path_stays_public():
    decision, verifier = await run(req("DELETE", "/admin/report/"), policy=SLASH_POLICY)
    assert decision.allowed and decision.reason is Reason.PUBLIC and decision.route is route_named("everything-else")
    assert verifier.calls == []


@pytest.mark.parametrize(("scopes", "reason", "failed"), [
    (("a/read",), Reason.INSUFFICIENT_SCOPE, "a-rest"),  # as written: /a/** needs a/all
    (("a/all",), Reason.INSUFFICIENT_SCOPE, "a"),  # without the slash: /a needs a/read
    ((), Reason.INSUFFICIENT_SCOPE, "a-rest"),  # both fail: the route as written is named
])
async def test_both_protected_readings_must_allow_and_the_denial_names_the_one_that_failed(scopes, reason, failed):
    decision, verifier = await run(req("GET", "/a/", "Bearer abc"), claims(*scopes), SLASH_POLICY)
    assert not decision.allowed and decision.reason is reason and decision.route is route_named(failed)
    assert decision.status == 403 and len(verifier.calls) == 1  # the token is verified once
    decision, verifier = await run(req("GET", "/a/", "Bearer abc"), claims("a/read", "a/all"), SLASH_POLICY)
    assert decision.allowed and decision.route is route_named("a-rest") and len(verifier.calls) == 1


async def test_a_token_failure_fails_every_reading_once():
    decision, verifier = await run(req("GET", "/a/", "Bearer abc"), TokenError(Failure.EXPIRED, "token expired", check=Check.TIMES),
                                   SLASH_POLICY)
    assert (decision.reason, decision.route) == (Reason.EXPIRED, route_named("a-rest"))
    assert len(verifier.calls) == 1


async def test_a_dry_run_reading_allows_as_dry_run_and_an_enforced_one_still_denies():
    # /beta/ as written: the public /**; without the slash: the dry-run /beta.
    decision, _ = await run(req("GET", "/beta/"), policy=SLASH_POLICY)
    assert decision.allowed and decision.dry_run and decision.reason is Reason.MISSING_TOKEN
    assert decision.route is route_named("beta")
    decision, _ = await run(req("GET", "/beta/", "Bearer abc"), claims("beta/use"), SLASH_POLICY)
    assert decision.allowed and not decision.dry_run and decision.route is route_named("beta")


async def test_no_route_for_a_reading_is_no_route():
    policy = parse_policy("issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: /b\n    public: true\n")
    decision, _ = await run(req("GET", "/b/"), policy=policy)
    assert not decision.allowed and decision.reason is Reason.NO_ROUTE and decision.route is None


# --- bearer_token --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "token"),
    [
        ((), None),
        (("Basic dXNlcjpwYXNz",), None),
        (("",), None),
        (("Bearer abc",), "abc"),
        (("bearer abc",), "abc"),
        (("BEARER abc",), "abc"),
        (("Bearer eyJ.eyJ-_.sig~+/==",), "eyJ.eyJ-_.sig~+/=="),
    ],
)
def test_bearer_token_extracts_the_token(values, token):
    assert bearer_token(values) == token


@pytest.mark.parametrize(
    "values",
    [
        ("Bearer a", "Bearer a"), ("Bearer a", "Basic b"), ("Bearer a,b",), ("Basic a, Bearer b",), ("Bearer",),
        ("Bearer ",), ("Bearer a b",), ("Bearer a=b",), ("Bearer =",), ("Bearer a\tb",), ("Bearer a\n",),
        ("Bearer a\x00",), ("Bearer é",), ("Bearer  a",), ("Bearer a ",),
    ],
)
def test_bearer_token_refuses_malformed_headers(values):
    with pytest.raises(TokenError) as caught:
        bearer_token(values)
    assert caught.value.failure is Failure.BAD_REQUEST


# --- the one table of how each reason is answered ---------------------------------------------------


def test_every_reason_has_one_outcome():
    from authz_service.decision import REASONS

    assert set(REASONS) == set(Reason), f"missing from REASONS: {set(Reason) - set(REASONS)}"


def test_outcomes_agree_with_http_and_grpc_semantics():
    from authz_service.decision import REASONS

    for reason, outcome in REASONS.items():
        allowing = reason in (Reason.ALLOWED, Reason.PUBLIC)
        assert (outcome.http_status == 200) == allowing == (outcome.grpc_code == 0), reason
        assert outcome.oauth_error is None or outcome.http_status in (400, 401, 403, 500, 503), reason
        # google.rpc.Code values Envoy sees: UNAUTHENTICATED for 401, PERMISSION_DENIED for 403, ...
        expected_grpc = {200: 0, 400: 3, 401: 16, 403: 7, 500: 13, 503: 14}[outcome.http_status]
        assert outcome.grpc_code == expected_grpc, reason


def test_every_token_failure_is_a_reason_answered_401_400_or_503():
    from authz_service.decision import REASONS, _TOKEN_FAILURES

    assert set(_TOKEN_FAILURES) == set(Failure)
    for failure, reason in _TOKEN_FAILURES.items():
        assert reason.value == failure.value
        assert REASONS[reason].http_status in (400, 401, 503), failure
