"""Answers (Decision -> neutral Answer) rendered by the gRPC front door as Envoy CheckResponses
(RFC 6750 challenges, identity headers, no token leaks)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service._proto.envoy.config.core.v3 import base_pb2
from authz_service.claims import Claims
from authz_service.decision import Decision, Reason, decide
from authz_service.policy import parse_policy
from authz_service.request import HttpRequest
from authz_service.claims import Claims
from authz_service.doors.grpc import check_response
from authz_service.response import Answers
from authz_service.tokens import Check, Failure, TokenError

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
IDENTITY = ("x-auth-client-id", "x-auth-scopes", "x-auth-sub")
TOKEN = "eyJTOKENHEADER.eyJTOKENPAYLOAD.TOKENSIGNATURE"

POLICY = parse_policy(
    """
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: write
    methods: [POST]
    path: /tx
    scopes: [tx/write, tx/admin]
  - name: health
    path: /healthz
    public: true
  - name: beta
    path: /beta
    scopes: [beta/use]
    mode: dry-run
  - name: exchange
    path: /exchange
    scopes: [tx/write]
    forward_token: true
""",
    source="response-test.yaml",
)
WRITE, HEALTH, BETA, EXCHANGE = POLICY.routes
TOKEN_HEADER = "authorization"


def claims(client_id="client-a", scope_text="tx/write other", sub="sub-1") -> Claims:
    return Claims(issuer="https://issuer", client_id=client_id, sub=sub, scopes=frozenset(scope_text.split()),
                  scope_text=scope_text, exp=2_000_000_000, kid="kid-a")


def request(*spoofed: str, authorization: tuple[str, ...] = (f"Bearer {TOKEN}",)) -> HttpRequest:
    return HttpRequest(method="POST", path="/tx", segments=("tx",), authorization=authorization,
                       request_id="rid", spoofed_identity_headers=spoofed)


def headers_of(options) -> dict[str, str]:
    out: dict[str, str] = {}
    for option in options:
        assert option.header.key not in out, f"{option.header.key} set twice"
        out[option.header.key] = option.header.value
    return out


def render(decision: Decision, req: HttpRequest | None = None, realm: str = "my-realm"):
    return check_response(Answers(realm).answer(decision, req if req is not None else request()))


def deny(reason: Reason, status: int, description: str = "", route=WRITE) -> Decision:
    decision = Decision(False, reason, description, route)
    assert decision.status == status, "the status every reason is answered with"
    return decision


def challenge_params(value: str) -> dict[str, str]:
    assert value.startswith("Bearer ")
    rest = value[len("Bearer "):]
    params = dict(re.findall(r'([a-z_]+)="([^"\\]*)"', rest))
    # Nothing but well-formed auth-params separated by ", ".
    assert rest == ", ".join(f'{k}="{v}"' for k, v in params.items()), value
    return params


# --- denials -------------------------------------------------------------------------------------


def denial_parts(response):
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    headers = headers_of(denied.headers)
    assert all(option.append_action == OVERWRITE for option in denied.headers)
    return denied, headers, json.loads(denied.body)


@pytest.mark.parametrize(
    ("reason", "status", "grpc"),
    [
        (Reason.MISSING_TOKEN, 401, 16), (Reason.EXPIRED, 401, 16), (Reason.INVALID_TOKEN, 401, 16),
        (Reason.INSUFFICIENT_SCOPE, 403, 7), (Reason.NO_ROUTE, 403, 7), (Reason.BAD_REQUEST, 400, 3),
        (Reason.KEYS_UNAVAILABLE, 503, 14), (Reason.INTERNAL_ERROR, 500, 13),
    ],
)
def test_denials_carry_grpc_code_http_status_and_json(reason, status, grpc):
    response = render(deny(reason, status, "why"))
    assert response.status.code == grpc
    denied, headers, body = denial_parts(response)
    assert denied.status.code == status
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert isinstance(body["error"], str) and body["error"]
    assert body["error_description"] == "why"


def test_missing_token_challenge_has_no_error_attribute():
    _, headers, body = denial_parts(render(deny(Reason.MISSING_TOKEN, 401, "no bearer token")))
    assert challenge_params(headers["www-authenticate"]) == {"realm": "my-realm"}
    assert "error" in body


@pytest.mark.parametrize(
    "reason",
    [Reason.INVALID_TOKEN, Reason.EXPIRED, Reason.NOT_YET_VALID, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY,
     Reason.WRONG_ISSUER, Reason.WRONG_TOKEN_USE, Reason.CLIENT_NOT_ALLOWED],
)
def test_presented_but_rejected_token_is_invalid_token(reason):
    _, headers, body = denial_parts(render(deny(reason, 401, "token expired")))
    params = challenge_params(headers["www-authenticate"])
    assert params == {"realm": "my-realm", "error": "invalid_token", "error_description": "token expired"}
    assert body == {"error": "invalid_token", "error_description": "token expired"}


def test_insufficient_scope_names_the_route_scopes():
    _, headers, body = denial_parts(render(deny(Reason.INSUFFICIENT_SCOPE, 403, "token lacks a required scope")))
    params = challenge_params(headers["www-authenticate"])
    assert params["error"] == "insufficient_scope"
    assert params["realm"] == "my-realm"
    assert set(params["scope"].split(" ")) == {"tx/write", "tx/admin"}
    assert body["error"] == "insufficient_scope"
    assert body["error_description"] == "token lacks a required scope"


def test_bad_request_is_invalid_request():
    _, headers, body = denial_parts(render(deny(Reason.BAD_REQUEST, 400, "more than one Authorization value")))
    assert challenge_params(headers["www-authenticate"])["error"] == "invalid_request"
    assert body["error"] == "invalid_request"


def test_unavailable_has_retry_after():
    _, headers, body = denial_parts(render(deny(Reason.KEYS_UNAVAILABLE, 503, "signing keys are not available")))
    assert int(headers["retry-after"]) > 0
    assert body["error_description"] == "signing keys are not available"


def test_no_route_has_no_retry_after():
    _, headers, _ = denial_parts(render(deny(Reason.NO_ROUTE, 403, "no route", route=None)))
    assert "retry-after" not in headers


def test_description_is_made_safe_for_the_quoted_challenge():
    _, headers, body = denial_parts(render(deny(Reason.INVALID_TOKEN, 401, 'bad "kid" \\ é\r\n x')))
    params = challenge_params(headers["www-authenticate"])
    assert params["error_description"] == "bad kid   x"
    assert body["error_description"] == 'bad "kid" \\ é\r\n x'  # JSON escapes it


def test_realm_is_sanitized():
    response = render(deny(Reason.MISSING_TOKEN, 401), realm='a "quoted" \\realm')
    _, headers, _ = denial_parts(response)
    assert challenge_params(headers["www-authenticate"]) == {"realm": "a quoted realm"}


def test_cached_denials_stay_distinct():
    answers = Answers("r")
    first = check_response(answers.answer(deny(Reason.EXPIRED, 401, "token expired"), request()))
    second = check_response(answers.answer(deny(Reason.EXPIRED, 401, "token expired"), request()))
    other = check_response(answers.answer(deny(Reason.EXPIRED, 401, "token not yet valid"), request()))
    assert first == second
    assert json.loads(other.denied_response.body)["error_description"] == "token not yet valid"


# --- allows --------------------------------------------------------------------------------------


def ok_parts(response):
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    assert all(option.append_action == OVERWRITE for option in ok.headers)
    return headers_of(ok.headers), list(ok.headers_to_remove)


def test_allow_sets_identity_and_removes_spoofed_spellings():
    decision = Decision(True, Reason.ALLOWED, route=WRITE, claims=claims())
    headers, remove = ok_parts(render(decision, request("x_auth_client_id", "x-auth-sub", "x_auth_scopes")))
    assert headers == {"x-auth-client-id": "client-a", "x-auth-scopes": "tx/write other", "x-auth-sub": "sub-1"}
    assert set(remove) == {"x_auth_client_id", "x_auth_scopes", TOKEN_HEADER}
    assert not set(remove) & set(headers)


def test_an_allow_with_many_spoofed_spellings_is_built_each_time_not_cached():
    """There are thousands of spellings (any separator in place of each '-'): a cache keyed by any
    set of them could be filled with entries of up to Envoy's 100 headers each. Up to one spelling
    per identity header is cached; more is built for the request, and still strips all of them."""
    answers = Answers("my-realm")
    decision = Decision(True, Reason.ALLOWED, route=WRITE, claims=claims())
    few = request("x-auth-client-id", "x~auth~scopes", "x_auth_sub")
    assert answers.answer(decision, few) is answers.answer(decision, few)
    many = request("x-auth-client-id", "x~auth~client~id", "x+auth+client+id", "x|auth|sub")
    first, second = answers.answer(decision, many), answers.answer(decision, many)
    assert first is not second
    assert set(first.remove) == set(second.remove) == {"x~auth~client~id", "x+auth+client+id", "x|auth|sub",
                                                       TOKEN_HEADER}


def test_allow_removes_identity_headers_it_does_not_set():
    decision = Decision(True, Reason.ALLOWED, route=WRITE, claims=claims(scope_text="", sub=""))
    headers, remove = ok_parts(render(decision, request("x-auth-sub")))
    assert headers == {"x-auth-client-id": "client-a"}
    assert set(remove) == {"x-auth-scopes", "x-auth-sub", TOKEN_HEADER}


@pytest.mark.parametrize(
    "decision",
    [
        Decision(True, Reason.PUBLIC, route=HEALTH),
        Decision(True, Reason.MISSING_TOKEN, "no bearer token", BETA, dry_run=True),
        Decision(True, Reason.EXPIRED, "token expired", BETA, dry_run=True),
    ],
    ids=["public", "dry-run-missing", "dry-run-expired"],
)
def test_allows_without_verified_identity_set_nothing_and_remove_everything(decision):
    spoofed = ("x-auth-client-id", "x_auth_client_id", "x_auth_sub", "x-auth-scopes")
    headers, remove = ok_parts(render(decision, request(*spoofed)))
    assert headers == {}
    assert set(remove) == set(IDENTITY) | set(spoofed) | {TOKEN_HEADER}


def test_public_allow_without_request_removes_identity_headers():
    headers, remove = ok_parts(check_response(Answers("r").answer(Decision(True, Reason.PUBLIC, route=HEALTH), None)))
    assert headers == {} and set(remove) == set(IDENTITY) | {TOKEN_HEADER}


def test_dry_run_insufficient_scope_forwards_the_verified_identity():
    decision = Decision(True, Reason.INSUFFICIENT_SCOPE, "lacks scope", BETA, claims(), dry_run=True)
    headers, remove = ok_parts(render(decision, request("x_auth_sub")))
    assert headers["x-auth-sub"] == "sub-1" and headers["x-auth-client-id"] == "client-a"
    assert remove == ["x_auth_sub", TOKEN_HEADER]


def test_a_route_that_forwards_the_token_keeps_the_authorization_header():
    decision = Decision(True, Reason.ALLOWED, route=EXCHANGE, claims=claims())
    headers, remove = ok_parts(render(decision, request("x_auth_sub")))
    assert headers["x-auth-client-id"] == "client-a" and remove == ["x_auth_sub"]
    # The same identity on a route that does not forward it: another (cached) answer.
    _, remove = ok_parts(render(Decision(True, Reason.ALLOWED, route=WRITE, claims=claims()), request("x_auth_sub")))
    assert remove == ["x_auth_sub", TOKEN_HEADER]
    # A request that had to meet two routes forwards the token only when both do.
    _, remove = ok_parts(render(Decision(True, Reason.ALLOWED, route=EXCHANGE, claims=claims(), forward_token=False)))
    assert TOKEN_HEADER in remove


identity_value = st.one_of(st.just(""), st.text("abcXYZ019-_/. ", min_size=1, max_size=12))
spelling = st.sampled_from(["x-auth-client-id", "x_auth_client_id", "x-auth_client-id", "x-auth-scopes",
                            "x_auth_scopes", "x-auth-sub", "x_auth_sub", "x-auth-sub", "x.auth.client.id",
                            "x.auth_scopes", "x-auth.sub"])


@settings(max_examples=200, deadline=None)
@given(client_id=st.text("abc019", min_size=1, max_size=8), scope_text=identity_value, sub=identity_value,
       spoofed=st.lists(spelling, max_size=6), has_claims=st.booleans(), forward=st.booleans())
def test_allow_never_removes_what_it_sets_and_removes_everything_else(client_id, scope_text, sub, spoofed,
                                                                      has_claims, forward):
    token_claims = claims(client_id, scope_text, sub) if has_claims else None
    decision = Decision(True, Reason.ALLOWED if has_claims else Reason.PUBLIC, route=EXCHANGE if forward else WRITE,
                        claims=token_claims)
    headers, remove = ok_parts(render(decision, request(*spoofed)))
    expected = {k: v for k, v in zip(IDENTITY, (client_id, scope_text, sub)) if v} if has_claims else {}
    assert headers == expected
    assert not set(remove) & set(headers)
    assert set(remove) == (set(IDENTITY) | set(spoofed) | (set() if forward else {TOKEN_HEADER})) - set(headers)


# --- the token never leaks -----------------------------------------------------------------------


class ScriptedVerifier:
    """Full verification answers with the scripted outcome (the cache never hits)."""

    def __init__(self, outcome):
        self.outcome = outcome

    def cached(self, authorization, policy):
        return None

    async def verify_uncached(self, token, policy):
        if isinstance(self.outcome, TokenError):
            raise self.outcome
        return self.outcome


OUTCOMES = [TokenError(f, "the token was refused", check=Check.HEADER) for f in Failure] + [claims(scope_text="nothing"), claims()]


@pytest.mark.parametrize("outcome", OUTCOMES, ids=lambda o: getattr(getattr(o, "failure", None), "value", "claims"))
@pytest.mark.parametrize(
    "authorization",
    [(f"Bearer {TOKEN}",), (f"Bearer {TOKEN}", f"Bearer {TOKEN}"), (f"Bearer {TOKEN} {TOKEN}",),
     (f"Bearer {TOKEN},x",), (f"Basic {TOKEN}",)],
    ids=["ok", "twice", "two-tokens", "comma", "basic"],
)
@pytest.mark.parametrize("path", ["/tx", "/beta", "/nope"])
async def test_token_never_appears_in_the_response(outcome, authorization, path):
    req = HttpRequest(method="POST", path=path, segments=(path[1:],), authorization=authorization,
                      request_id="rid", spoofed_identity_headers=())
    decision = await decide(req, POLICY, ScriptedVerifier(outcome))
    response = check_response(Answers("realm").answer(decision, req))
    wire = response.SerializeToString()
    for fragment in ("TOKENHEADER", "TOKENPAYLOAD", "TOKENSIGNATURE"):
        assert fragment.encode() not in wire
        assert fragment not in decision.description
