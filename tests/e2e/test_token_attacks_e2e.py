"""Token attacks through a real Envoy: each is denied with the right status and reason, nothing reaches
the app, and the service keeps serving. Forged tokens are signed with keys the test controls and
published by a fake (scriptable) issuer the policy trusts; the positive controls use the dev issuer's
/oauth2/token over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from authz_service.cognito import access_claims

from .fake_issuer import FakeIssuer, rsa_key
from .harness import UpstreamProcess, wait_for
from .security_stack import (ROUTES, SecurityStack, bearer, deny_count, logged, start_security_stack,
                             stop_security_stack)

pytestmark = pytest.mark.e2e


# Routes that hand the token on to the app (the policy's forward_token), beside the suites' routes.
FORWARDING_ROUTES = """\
  - name: token-exchange
    methods: [POST]
    path: /exchange/**
    scopes: [transactions/post]
    forward_token: true
  - name: public-forwarding
    methods: [GET]
    path: /signed-in/**
    public: true
    forward_token: true
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, enforcing_mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("token-attacks"), upstream, module_envoy_factory,
                             mode=enforcing_mode, routes=ROUTES.format() + FORWARDING_ROUTES)
    yield s
    stop_security_stack(s)


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jws(header: dict | bytes, payload: dict | bytes, sign: Callable[[bytes], bytes]) -> str:
    """Hand-built compact JWS, so we can send what PyJWT would refuse to produce."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    return f"{signing_input.decode()}.{b64(sign(signing_input))}"


def rs256(signing_input: bytes) -> bytes:
    return jwt.get_algorithm_by_name("RS256").sign(signing_input, rsa_key("kid-1"))


def claims(fake: FakeIssuer, **overrides) -> dict:
    return access_claims(fake.issuer, "payments-writer", "transactions/post", replace={"jti": "j", **overrides})


def alg_none(f: FakeIssuer) -> str:
    return raw_jws({"alg": "none", "kid": "kid-1"}, claims(f), lambda _: b"")


def hs256_with_public_key(f: FakeIssuer) -> str:
    pem = rsa_key("kid-1").public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw_jws({"alg": "HS256", "kid": "kid-1"}, claims(f), lambda m: hmac.new(pem, m, hashlib.sha256).digest())


def duplicated_claims(f: FakeIssuer) -> str:
    # Signed correctly by the trusted key; the payload names scope twice (the second one grants).
    body = json.dumps(claims(f, scope="transactions/get"))[:-1] + ', "scope": "transactions/post"}'
    return raw_jws({"alg": "RS256", "kid": "kid-1"}, body.encode(), rs256)


# (id, token factory, status, body error, error_description)
ATTACKS: list[tuple[str, Callable[[FakeIssuer], str], int, str, str]] = [
    ("alg-none", alg_none, 401, "invalid_token", "unsupported token algorithm (RS256 required)"),
    ("hs256-public-key-as-secret", hs256_with_public_key, 401, "invalid_token",
     "unsupported token algorithm (RS256 required)"),
    ("foreign-key-known-kid", lambda f: f.token(key=rsa_key("attacker")), 401, "invalid_token",
     "token is not valid"),
    ("unknown-kid", lambda f: f.token(kid="kid-unknown", key=rsa_key("attacker")), 401, "invalid_token",
     "token is not valid"),
    ("kid-path-traversal", lambda f: f.token(kid="../../../../etc/passwd", key=rsa_key("attacker")), 401,
     "invalid_token", "token is not valid"),
    ("kid-sql", lambda f: f.token(kid="x' OR '1'='1'; --", key=rsa_key("attacker")), 401, "invalid_token",
     "token is not valid"),
    ("kid-missing", lambda f: f.token(header={"kid": None}), 401, "invalid_token", "token header has no valid kid"),
    ("kid-not-a-string", lambda f: raw_jws({"alg": "RS256", "kid": 1}, claims(f), rs256), 401, "invalid_token",
     "token header has no valid kid"),
    ("jku-header", lambda f: f.token(header={"jku": "http://evil.example/jwks"}), 401, "invalid_token",
     "token header must not carry keys"),
    # Signed by the trusted key, refused for their JOSE header or the type of a claim (native mode
    # checks each in its own way: these keep every mode's answer the same).
    ("kid-empty", lambda f: f.token(header={"kid": ""}), 401, "invalid_token", "token header has no valid kid"),
    ("kid-too-long", lambda f: f.token(kid="k" * 257), 401, "invalid_token", "token header has no valid kid"),
    ("crit-header", lambda f: f.token(header={"crit": ["exp"]}), 401, "invalid_token",
     "unsupported critical token header"),
    ("b64-false", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1", "b64": False}, claims(f), rs256), 401,
     "invalid_token", "unsupported critical token header"),
    ("x5u-header", lambda f: f.token(header={"x5u": "http://evil.example/cert"}), 401, "invalid_token",
     "token header must not carry keys"),
    ("jwk-header", lambda f: f.token(header={"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}), 401, "invalid_token",
     "token header must not carry keys"),
    ("x5c-header", lambda f: f.token(header={"x5c": ["MIIB"]}), 401, "invalid_token", "token header must not carry keys"),
    ("client-id-number", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, claims(f, client_id=7), rs256), 401,
     "invalid_token", "token has no client_id claim"),
    ("client-id-empty", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, claims(f, client_id=""), rs256), 401,
     "invalid_token", "token has no client_id claim"),
    ("scope-null", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, {**claims(f), "scope": None}, rs256), 401,
     "invalid_token", "scope claim must be a string"),
    ("sub-number", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, claims(f, sub=7), rs256), 401,
     "invalid_token", "sub claim must be a string"),
    ("long-jose-header", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1", "pad": "x" * 400}, claims(f), rs256),
     401, "invalid_token", "malformed token"),
    ("expired", lambda f: f.token(exp=int(time.time()) - 3600), 401, "invalid_token", "token expired"),
    ("nbf-future", lambda f: f.token(nbf=int(time.time()) + 3600), 401, "invalid_token", "token not yet valid"),
    ("iat-far-future", lambda f: f.token(iat=int(time.time()) + 86400 * 365), 401, "invalid_token",
     "token not yet valid"),
    ("no-exp", lambda f: f.token(exp=None), 401, "invalid_token", "token has no exp claim"),
    ("wrong-iss", lambda f: f.token(iss="https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Evil00001"), 401,
     "invalid_token", "token is not valid"),
    ("iss-trailing-slash", lambda f: f.token(iss=f.issuer + "/"), 401, "invalid_token", "token is not valid"),
    ("iss-different-case", lambda f: f.token(iss=f.issuer.replace("cognito-idp", "Cognito-IDP")), 401,
     "invalid_token", "token is not valid"),
    ("iss-pool-case", lambda f: f.token(iss=f.issuer.lower()), 401, "invalid_token", "token is not valid"),
    ("iss-not-a-string", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, claims(f, iss=["x"]), rs256), 401, "invalid_token", "token is not valid"),
    ("token-use-id", lambda f: f.token(token_use="id"), 401, "invalid_token",
     "not an access token (token_use must be access)"),
    ("client-not-allowed", lambda f: f.token(client_id="reporting"), 401, "invalid_token", "client is not allowed"),
    ("scope-list", lambda f: f.token(scope=["transactions/post"]), 401, "invalid_token",
     "scope claim must be a string"),
    ("scope-number", lambda f: f.token(scope=7), 401, "invalid_token", "scope claim must be a string"),
    ("scope-superstring", lambda f: f.token(scope="transactions/postx"), 403, "insufficient_scope",
     "token lacks a required scope"),
    ("scope-prefix", lambda f: f.token(scope="transactions"), 403, "insufficient_scope", "token lacks a required scope"),
    ("scope-prefix-2", lambda f: f.token(scope="transactions/pos"), 403, "insufficient_scope",
     "token lacks a required scope"),
    ("scope-joined", lambda f: f.token(scope="transactions/get,transactions/post"), 403, "insufficient_scope",
     "token lacks a required scope"),
    ("scope-case", lambda f: f.token(scope="Transactions/Post"), 403, "insufficient_scope",
     "token lacks a required scope"),
    ("duplicated-claims", duplicated_claims, 401, "invalid_token", "malformed token"),
    ("extra-segments", lambda f: f.token() + ".AAAA", 401, "invalid_token", "malformed token"),
    ("two-segments", lambda f: f.token().rsplit(".", 1)[0], 401, "invalid_token", "malformed token"),
    ("bad-base64-header", lambda f: "A." + f.token().split(".", 1)[1],
     401, "invalid_token", "malformed token"),
    ("bad-json-header", lambda f: b64("{not json") + "." + f.token().split(".", 1)[1], 401, "invalid_token",
     "malformed token"),
    ("bad-json-payload", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, b'{"iss": ', rs256), 401,
     "invalid_token", "malformed token"),
    ("payload-not-object", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, b"[1, 2]", rs256), 401,
     "invalid_token", "malformed token"),
    ("non-utf8-header-segment", lambda f: b64(b"\xff\xfe{}") + "." + f.token().split(".", 1)[1], 401,
     "invalid_token", "malformed token"),
    ("non-utf8-payload", lambda f: raw_jws({"alg": "RS256", "kid": "kid-1"}, b'{"iss": "\xff"}', rs256), 401,
     "invalid_token", "malformed token"),
    ("too-large-for-service", lambda f: f.token(pad="x" * 20_000), 401, "invalid_token", "token too large"),
]


@pytest.mark.parametrize(("factory", "status", "error", "description"), [a[1:] for a in ATTACKS],
                         ids=[a[0] for a in ATTACKS])
def test_token_attack_is_denied_and_never_reaches_the_app(stack: SecurityStack, factory, status: int, error: str,
                                                          description: str) -> None:
    token = factory(stack.fake)
    answer = stack.send("POST", "/transactions", token)
    assert (answer.status, answer.error, answer.description) == (status, error, description), answer.body
    assert answer.reached_upstream == []
    assert token not in answer.body.decode() and token not in answer.headers.get("www-authenticate", "")
    stack.service.process.check_alive()


def test_positive_controls_are_allowed(stack: SecurityStack) -> None:
    """The attacks above fail for the stated reason, not because nothing is ever allowed."""
    forged_ok = stack.fake.token(scope="transactions/get transactions/post")
    answer = stack.send("POST", "/transactions", forged_ok)
    assert answer.status == 200
    assert answer.reached_upstream[0]["headers"]["x-auth-client-id"] == ["payments-writer"]
    real = stack.dev.token("payments-writer")  # real issuer, real /oauth2/token
    answer = stack.send("POST", "/transactions", real)
    assert answer.status == 200 and len(answer.reached_upstream) == 1


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ([("Authorization", "Bearer")], 400, "invalid_request"),
        ([("Authorization", "Bearer ")], 400, "invalid_request"),
        ([("Authorization", "Bearer a.b.c d.e.f")], 400, "invalid_request"),
        ([("Authorization", "Bearer  a.b.c")], 400, "invalid_request"),
        ([("Authorization", "Basic cGF5bWVudHMtd3JpdGVyOnNlY3JldA==")], 401, "unauthorized"),
        ([("Authorization", "Token abc")], 401, "unauthorized"),
        ([("Authorization", "Bearer a.b.c,Bearer d.e.f")], 400, "invalid_request"),
    ],
    ids=["bearer-alone", "bearer-space", "two-tokens", "double-space", "basic", "other-scheme", "comma-joined"],
)
def test_malformed_authorization_headers(stack: SecurityStack, headers, status: int, error: str) -> None:
    answer = stack.send("POST", "/transactions", headers=headers)
    assert (answer.status, answer.error) == (status, error), answer.body
    assert answer.reached_upstream == []


def test_two_authorization_headers_even_if_both_valid_are_400(stack: SecurityStack) -> None:
    good = stack.dev.token("payments-writer")
    for second in (good, stack.fake.token(), "garbage"):
        answer = stack.send("POST", "/transactions",
                            headers=[("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {second}")])
        assert (answer.status, answer.error) == (400, "invalid_request")
        assert answer.reached_upstream == []
    # A valid bearer token plus a Basic header: still two credentials, still refused.
    answer = stack.send("POST", "/transactions", headers=[("Authorization", "Basic eDp5"),
                                                          ("Authorization", f"Bearer {good}")])
    assert answer.status == 400 and answer.reached_upstream == []


def test_64k_token_is_refused_by_envoy_and_a_large_one_by_the_service(stack: SecurityStack) -> None:
    huge = stack.fake.token(pad="x" * 64 * 1024)
    answer = stack.send("POST", "/transactions", huge)
    assert answer.status == 431  # Envoy's 32 KiB header limit: a deny before any Check
    assert answer.reached_upstream == []
    # Under Envoy's limit, far over the service's MAX_TOKEN_BYTES: the service says why.
    big = stack.fake.token(pad="x" * 16 * 1024)  # ~22 KiB once base64url-encoded
    answer = stack.send("POST", "/transactions", big)
    assert (answer.status, answer.description) == (401, "token too large")
    assert answer.reached_upstream == []
    # And directly on the gRPC port, a 64 KiB token Envoy would never forward.
    direct = stack.check("POST", "/transactions", bearer(huge))
    assert direct.status == 401 and json.loads(direct.body)["error_description"] == "token too large"


def test_non_utf8_bytes_in_the_authorization_header(stack: SecurityStack) -> None:
    token = stack.fake.token()
    for value in (b"Bearer \xff\xfe" + token.encode(), b"Bearer " + token.encode() + b"\x80",
                  "Bearer ".encode() + token.encode()[:20] + "é".encode() + token.encode()[20:]):
        answer = stack.send("POST", "/transactions", headers=[("Authorization", value)])  # type: ignore[list-item]
        # Envoy passes the bytes on; the service refuses anything outside RFC 6750's b64token.
        assert (answer.status, answer.description) == (400, "malformed Bearer credentials (one token, no spaces)"), (
            value[:30], answer.status, answer.body)
        assert answer.reached_upstream == []


def test_service_keeps_serving_after_every_attack(stack: SecurityStack) -> None:
    for _ in range(2):
        for _, factory, *_ in ATTACKS:
            assert stack.send("POST", "/transactions", factory(stack.fake)).status != 200
    stack.service.process.check_alive()
    answer = stack.send("POST", "/transactions", stack.dev.token("payments-writer"))
    assert answer.status == 200
    assert stack.service.sample("authz_check_decisions_total", decision="deny", reason="internal_error") == 0


# --- the signature is checked before the payload is read ------------------------------------------

def forged_payload(payload_segment: str) -> str:
    """A header naming the trusted kid, ``payload_segment`` as sent, and a signature that cannot verify."""
    return f"{b64(json.dumps({'alg': 'RS256', 'kid': 'kid-1'}))}.{payload_segment}.{b64(bytes(256))}"


UNPARSABLE_PAYLOADS = [
    ("not-base64url", "~~~~not~base64url~~~~"),
    ("not-json", b64("{not json")),
    ("not-utf8", b64(b"\xff\xfe\xfd")),
    ("deep-nesting", b64("[" * 900 + "]" * 900)),
]


@pytest.mark.parametrize("payload", [p[1] for p in UNPARSABLE_PAYLOADS], ids=[p[0] for p in UNPARSABLE_PAYLOADS])
def test_payload_of_a_forged_token_is_never_parsed(stack: SecurityStack, payload: str) -> None:
    """A payload nobody could parse, under a signature that does not verify, is refused as a bad
    signature: the signature was checked first and the payload never read (a parse would have said
    'malformed'). This is what keeps forged tokens with expensive payloads cheap."""
    bad_signature, malformed = deny_count(stack, "bad_signature"), deny_count(stack, "invalid_token")
    answer = stack.send("POST", "/transactions", forged_payload(payload))
    assert (deny_count(stack, "bad_signature"), deny_count(stack, "invalid_token")) == (bad_signature + 1, malformed)
    assert (answer.status, answer.error, answer.description) == (401, "invalid_token", "token is not valid")
    assert answer.reached_upstream == []


def test_a_signed_token_with_an_unparsable_payload_is_malformed(stack: SecurityStack) -> None:
    """Control for the test above: once the signature verifies, the payload is read strictly."""
    malformed = deny_count(stack, "invalid_token")
    answer = stack.send("POST", "/transactions", raw_jws({"alg": "RS256", "kid": "kid-1"}, b"{not json", rs256))
    assert (answer.status, answer.description) == (401, "malformed token")
    assert deny_count(stack, "invalid_token") == malformed + 1


def test_signed_token_larger_than_cognito_issues_is_refused(stack: SecurityStack) -> None:
    """Cognito access tokens are ~1 KB; a validly signed 5 KB one is refused, a 3.5 KB one still passes."""
    big = stack.fake.token(pad="x" * 3800)
    assert 4096 < len(big) < 8192
    answer = stack.send("POST", "/transactions", big)
    assert (answer.status, answer.description) == (401, "token too large")
    assert answer.reached_upstream == []
    roomy = stack.fake.token(pad="x" * 2400)
    assert 3000 < len(roomy) <= 4096
    assert stack.send("POST", "/transactions", roomy).status == 200


# --- one client-visible answer for every key/issuer/signature failure -----------------------------

PROBES = [
    ("unknown_key", lambda f: f.token(kid="kid-nobody-publishes", key=rsa_key("attacker"))),
    ("bad_signature", lambda f: f.token(key=rsa_key("attacker"))),
    ("wrong_issuer", lambda f: f.token(iss="https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other0001")),
]


def test_key_issuer_and_signature_failures_look_the_same_to_the_client(stack: SecurityStack) -> None:
    """Nobody can probe which pools or kids are trusted from the answer; metrics and the deny log line
    keep the precise reason for operators."""
    answers = set()
    for reason, factory in PROBES:
        before = deny_count(stack, reason)
        lines_before = len(logged(stack))
        answer = stack.send("POST", "/transactions", factory(stack.fake))
        assert deny_count(stack, reason) == before + 1
        # Envoy makes every request id itself, so the probe's log line is the next deny logged.
        entry = wait_for(lambda: [e for e in logged(stack)[lines_before:] if e.get("msg") == "deny"], 10,
                         "the deny log line")[0]
        assert entry["reason"] == reason
        assert answer.reached_upstream == []
        answers.add((answer.status, answer.body, answer.headers["www-authenticate"]))
    assert answers == {(401, b'{"error":"invalid_token","error_description":"token is not valid"}',
                        'Bearer realm="authz-service", error="invalid_token", error_description="token is not valid"')}


# --- claims forwarded as headers must be header-safe text -----------------------------------------

UNSAFE_CLAIMS = [
    ("sub-lone-surrogate", {"sub": "\ud800"}),
    ("sub-lone-low-surrogate", {"sub": "payments\udfff"}),
    ("scope-lone-surrogate", {"scope": "transactions/post \ud83d"}),
    ("sub-crlf", {"sub": "payments-writer\r\nx-auth-client-id: admin"}),
    ("sub-nul", {"sub": "payments\x00writer"}),
    ("scope-crlf", {"scope": "transactions/post admin/all\r\nx-auth-client-id: admin"}),
    ("sub-del", {"sub": "payments\x7fwriter"}),
]


@pytest.mark.parametrize("claims", [c[1] for c in UNSAFE_CLAIMS], ids=[c[0] for c in UNSAFE_CLAIMS])
def test_signed_claims_that_cannot_be_a_header_value_are_refused(stack: SecurityStack, claims: dict) -> None:
    """The trusted issuer signed it, but a forwarded claim (sub, scope) is not text an HTTP header can
    carry: a clear 401, never a crash (a lone surrogate used to make every such Check fail with 503)."""
    malformed = deny_count(stack, "invalid_token")
    answer = stack.send("POST", "/transactions", stack.fake.token(**claims))
    assert (answer.status, answer.error) == (401, "invalid_token"), answer.body
    assert deny_count(stack, "invalid_token") == malformed + 1
    assert answer.reached_upstream == []
    assert not [entry for entry in logged(stack) if "exception" in entry]  # no traceback, here or earlier
    stack.service.process.check_alive()


# (id, signed scope claim, error_description): RFC 6749 scope tokens separated by single spaces only.
# Each holds transactions/post, so only the grammar stands between it and the app.
SCOPE_GRAMMAR = [
    ("tab", "transactions/post admin/read\tadmin/all", "scope claim must list scopes separated by single spaces"),
    ("two-spaces", "transactions/post  admin/all", "scope claim must list scopes separated by single spaces"),
    ("leading-space", " transactions/post", "scope claim must list scopes separated by single spaces"),
    ("quote", 'transactions/post "admin/all"', "scope claim holds a character a scope cannot have (RFC 6749: "
                                               "printable ASCII, no quote or backslash)"),
    ("backslash", "transactions/post admin\\all", "scope claim holds a character a scope cannot have (RFC 6749: "
                                                  "printable ASCII, no quote or backslash)"),
]


@pytest.mark.parametrize(("scope", "description"), [s[1:] for s in SCOPE_GRAMMAR], ids=[s[0] for s in SCOPE_GRAMMAR])
def test_a_signed_scope_claim_outside_rfc_6749_is_refused(stack: SecurityStack, scope: str, description: str) -> None:
    """x-auth-scopes carries the claim as signed: a tab inside it is one opaque scope to the service
    but two to an app that splits on whitespace. The token is refused, with the reason."""
    answer = stack.send("POST", "/transactions", stack.fake.token(scope=scope))
    assert (answer.status, answer.error, answer.description) == (401, "invalid_token", description), answer.body
    assert answer.reached_upstream == []


def test_non_ascii_claims_that_are_valid_text_are_forwarded(stack: SecurityStack) -> None:
    """Control for the test above: the rule is 'header-safe text', not 'ASCII only'."""
    answer = stack.send("POST", "/transactions", stack.fake.token(sub="zahlungs-dienst-\u00e9\U0001f600"))
    assert answer.status == 200, answer.body
    sent = answer.reached_upstream[0]["headers"]["x-auth-sub"][0]  # the upstream reads header bytes as Latin-1
    assert sent.encode("latin-1").decode("utf-8") == "zahlungs-dienst-\u00e9\U0001f600"


# --- the bearer token stays at the door -------------------------------------------------------------

def test_the_app_never_receives_the_bearer_token(stack: SecurityStack) -> None:
    """An allowed request reaches the app with the verified identity but without the token, as Envoy's
    jwt_authn (forward: false) and Istio (forwardOriginalToken: false) do: an app that logs its
    request headers would otherwise write an hour-long credential into its logs. On a public route
    too (a client that sends its token everywhere), and when the service decides in native mode (a
    path ending in '/' goes to the service there)."""
    token = stack.dev.token("payments-writer")
    for method, path in (("POST", "/transactions"), ("GET", "/healthz"), ("GET", "/public/docs"),
                         ("GET", "/public/docs/")):
        answer = stack.send(method, path, token)
        assert answer.status == 200, (path, answer.body)
        seen = answer.reached_upstream[0]["headers"]
        assert "authorization" not in seen, path
        assert token not in json.dumps(answer.reached_upstream), path
    seen = stack.send("POST", "/transactions", token).reached_upstream[0]["headers"]
    assert seen["x-auth-client-id"] == ["payments-writer"]
    # Another scheme sent to a public route is removed alike: the app behind a public route gets no
    # Authorization header unless the route forwards it.
    answer = stack.send("GET", "/healthz", headers=[("Authorization", "Basic cGF5bWVudHM6c2VjcmV0")])
    assert answer.status == 200 and "authorization" not in answer.reached_upstream[0]["headers"]


def test_a_route_that_forwards_the_token_hands_it_to_the_app(stack: SecurityStack) -> None:
    """forward_token: true (an app that exchanges the token, or checks it again itself) passes the
    header on unchanged, on a protected route and on a public one; the routes beside it still strip it."""
    token = stack.dev.token("payments-writer")
    for method, path in (("POST", "/exchange/orders"), ("GET", "/signed-in/profile"), ("POST", "/exchange/orders/")):
        answer = stack.send(method, path, token)
        assert answer.status == 200, (path, answer.body)
        assert answer.reached_upstream[0]["headers"]["authorization"] == [f"Bearer {token}"], path
    answer = stack.send("GET", "/signed-in/profile", headers=[("Authorization", "Basic eDp5")])
    assert answer.reached_upstream[0]["headers"]["authorization"] == ["Basic eDp5"]
    assert "authorization" not in stack.send("POST", "/transactions", token).reached_upstream[0]["headers"]
