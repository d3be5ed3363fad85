"""TokenVerifier: every way a Cognito access token can be wrong maps to one precise failure."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from jwt.api_jwk import PyJWK

from authz_service import tokens
from authz_service.keys import IssuerKey
from authz_service.policy import Issuer, Policy, parse_policy
from authz_service.tokens import (MAX_TOKEN_BYTES, SCOPE_CHARACTER, SCOPE_SPACING, Failure, TokenError,
                                   TokenVerifier)

from .conftest import ISSUER, MemoryKeys, SigningKey, make_key

POLICY = parse_policy(
    f"""
issuers:
  - user_pool_id: us-east-1_Test00001
    client_ids: [client-a, client-b]
routes:
  - path: /x
    scopes: [transactions/post]
"""
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def failure_of(verifier: TokenVerifier, token: str) -> Failure:
    return await failure_of_policy(verifier, token, POLICY)


async def failure_of_policy(verifier: TokenVerifier, token: str, policy: Policy) -> Failure:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token, policy)
    assert not token or token not in caught.value.description
    return caught.value.failure


async def test_valid_cognito_token(key_a: SigningKey) -> None:
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope="transactions/post transactions/get"), POLICY)
    assert claims.client_id == "client-a"
    assert claims.sub == "client-a"
    assert claims.scopes == {"transactions/post", "transactions/get"}
    assert claims.issuer == ISSUER
    assert claims.kid == "kid-a"


@dataclass(frozen=True)
class In:
    """A time claim ``seconds`` from when the test runs (never from collection)."""

    seconds: int


@pytest.mark.parametrize(
    ("claims", "failure"),
    [
        ({"exp": In(-120)}, Failure.EXPIRED),
        ({"exp": None}, Failure.INVALID_TOKEN),
        ({"nbf": In(600)}, Failure.NOT_YET_VALID),
        ({"iat": In(600)}, Failure.NOT_YET_VALID),
        ({"iss": ISSUER + "/"}, Failure.WRONG_ISSUER),
        ({"iss": ISSUER.upper()}, Failure.WRONG_ISSUER),
        ({"iss": None}, Failure.WRONG_ISSUER),
        ({"token_use": "id"}, Failure.WRONG_TOKEN_USE),
        ({"token_use": None}, Failure.WRONG_TOKEN_USE),
        ({"client_id": "client-z"}, Failure.CLIENT_NOT_ALLOWED),
        ({"client_id": None}, Failure.INVALID_TOKEN),
        ({"scope": ["transactions/post"]}, Failure.INVALID_TOKEN),
        ({"scope": 7}, Failure.INVALID_TOKEN),
        ({"sub": 5}, Failure.INVALID_TOKEN),
    ],
)
async def test_claim_failures(key_a: SigningKey, claims: dict, failure: Failure) -> None:
    now = int(time.time())  # read when the test runs: a suite on a busy machine outlasts any offset
    claims = {name: now + value.seconds if isinstance(value, In) else value for name, value in claims.items()}
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), key_a.token(**claims)) is failure


async def test_leeway_accepts_small_skew(key_a: SigningKey) -> None:
    verifier = TokenVerifier(MemoryKeys(key_a), leeway=60)
    await verifier.verify(key_a.token(exp=int(time.time()) - 30, iat=int(time.time()) + 30), POLICY)
    strict = TokenVerifier(MemoryKeys(key_a), leeway=0)
    assert await failure_of(strict, key_a.token(exp=int(time.time()) - 30)) is Failure.EXPIRED


async def test_alg_none_rejected(key_a: SigningKey) -> None:
    token = jwt.encode(json.loads(json.dumps({"iss": ISSUER, "token_use": "access"})), None, algorithm="none",
                       headers={"kid": "kid-a"})
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


async def test_hs256_with_public_key_as_secret_rejected(key_a: SigningKey) -> None:
    # Classic key confusion: HMAC keyed with the RSA public key a verifier might pass as "key".
    pem = key_a.private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "kid-a"}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "token_use": "access", "client_id": "client-a",
                              "exp": int(time.time()) + 600, "scope": "transactions/post"}).encode())
    sig = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), f"{header}.{payload}.{sig}") is Failure.INVALID_TOKEN


async def test_rs256_header_with_hmac_signature_rejected(key_a: SigningKey) -> None:
    pem = key_a.private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "RS256", "kid": "kid-a"}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "token_use": "access", "client_id": "client-a",
                              "exp": int(time.time()) + 600}).encode())
    sig = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), f"{header}.{payload}.{sig}") is Failure.BAD_SIGNATURE


async def test_foreign_key_with_known_kid_rejected(key_a: SigningKey) -> None:
    forger = make_key("kid-a")  # same kid, different key
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), forger.token()) is Failure.BAD_SIGNATURE


async def test_unknown_kid_refetches_once_then_fails(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    assert await failure_of(TokenVerifier(keys), key_b.token()) is Failure.UNKNOWN_KEY
    assert keys.refetched == [ISSUER]


async def test_unknown_kid_picked_up_after_rotation(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    keys.after_refetch = {key_b.kid: PyJWK(key_b.jwk())}
    claims = await TokenVerifier(keys).verify(key_b.token(), POLICY)
    assert claims.kid == "kid-b"


async def test_no_keys_yet_is_unavailable_not_invalid(key_a: SigningKey) -> None:
    assert await failure_of(TokenVerifier(MemoryKeys()), key_a.token()) is Failure.KEYS_UNAVAILABLE


# --- the key is found by kid and the signature checked before the payload is read ------------------

OTHER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test00002"
TWO_ISSUERS = parse_policy(
    """
issuers:
  - user_pool_id: us-east-1_Test00001
  - user_pool_id: us-east-1_Test00002
routes:
  - path: /x
    scopes: [transactions/post]
"""
)


def forged(payload_segment: str, kid: str = "kid-a") -> str:
    """A trusted kid, the payload segment as given, and a signature that verifies under no key."""
    return f"{b64(json.dumps({'alg': 'RS256', 'kid': kid}).encode())}.{payload_segment}.{b64(bytes(256))}"


@pytest.mark.parametrize("payload", ["~~~not~base64url~~~", b64(b"{not json"), b64(b"\xff\xfe"),
                                     b64(json.dumps({"iss": ISSUER, "token_use": "access", "client_id": "client-a",
                                                     "exp": 9999999999}).encode()),
                                     b64(b"[" * 900 + b"]" * 900)],
                         ids=["not-base64url", "not-json", "not-utf8", "valid-claims", "deep-nesting"])
async def test_payload_is_not_decoded_before_the_signature_verifies(key_a: SigningKey, payload: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = tokens._json_object
    monkeypatch.setattr(tokens, "_json_object", lambda raw: parsed.append(raw) or real(raw))
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), forged(payload)) is Failure.BAD_SIGNATURE
    assert parsed == [b'{"alg": "RS256", "kid": "kid-a"}']  # the header only


@pytest.mark.parametrize("published", ["own-kid", "same-kid-other-key", "same-key"])
async def test_key_is_found_by_kid_and_proves_only_its_issuers_tokens(key_a: SigningKey, key_b: SigningKey,
                                                                      published: str) -> None:
    # The second issuer publishes its own kid, the first issuer's kid for another key (pools pick
    # kids independently), or the very same key (two policy entries sharing one JWKS).
    others = {"own-kid": key_b, "same-kid-other-key": make_key("kid-a"), "same-key": key_a}[published]
    keys = MemoryKeys(key_a)
    keys.publish(OTHER, others)
    verifier = TokenVerifier(keys)
    assert (await verifier.verify(others.token(iss=OTHER), TWO_ISSUERS)).issuer == OTHER
    assert (await verifier.verify(key_a.token(), TWO_ISSUERS)).issuer == ISSUER
    third = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test00003"
    assert await failure_of_policy(verifier, others.token(iss=third), TWO_ISSUERS) is Failure.WRONG_ISSUER
    if others is not key_a:  # a key of one issuer proves nothing for the other
        assert await failure_of_policy(verifier, others.token(iss=ISSUER), TWO_ISSUERS) is Failure.WRONG_ISSUER
    assert keys.refetched == []


async def test_keys_under_one_kid_are_tried_a_bounded_number_of_times(key_a: SigningKey,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pools = [f"us-east-1_Many{i:05d}" for i in range(tokens.MAX_KEYS_PER_KID + 2)]
    many = parse_policy("issuers:\n" + "".join(f"  - user_pool_id: {p}\n" for p in pools)
                        + "routes:\n  - path: /x\n    scopes: [a]\n")
    keys = MemoryKeys(issuer=many.issuers[0].issuer)
    for issuer in many.issuers:
        keys.publish(issuer.issuer, make_key("kid-shared"))
    tried: list[object] = []
    real = tokens._signature_ok
    monkeypatch.setattr(tokens, "_signature_ok", lambda key, parsed: tried.append(key) or real(key, parsed))
    token = forged(b64(json.dumps(good_body()).encode()), kid="kid-shared")
    assert await failure_of_policy(TokenVerifier(keys), token, many) is Failure.BAD_SIGNATURE
    assert len(tried) == tokens.MAX_KEYS_PER_KID


async def test_keys_of_an_issuer_outside_the_policy_prove_nothing(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    keys.publish(OTHER, key_b)  # still held, but the policy in force (POLICY) no longer trusts OTHER
    assert await failure_of(TokenVerifier(keys), key_b.token(iss=OTHER)) is Failure.UNKNOWN_KEY


async def test_unknown_kid_refetches_every_trusted_issuer_that_has_keys(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    keys.publish(OTHER, key_b)
    stranger = make_key("kid-stranger")
    assert await failure_of_policy(TokenVerifier(keys), stranger.token(), TWO_ISSUERS) is Failure.UNKNOWN_KEY
    assert sorted(keys.refetched) == [ISSUER, OTHER]


async def test_unknown_kid_while_a_trusted_issuer_has_no_keys_is_unavailable(key_a: SigningKey,
                                                                            key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)  # OTHER's keys have not been fetched yet
    verifier = TokenVerifier(keys)
    # It may be OTHER's token: we cannot tell yet, so 503 rather than 401.
    assert await failure_of_policy(verifier, key_b.token(iss=OTHER), TWO_ISSUERS) is Failure.KEYS_UNAVAILABLE
    assert keys.refetched == [ISSUER]  # OTHER's own refresher is retrying already
    # Tokens whose key we hold verify meanwhile.
    assert (await verifier.verify(key_a.token(), TWO_ISSUERS)).issuer == ISSUER


async def test_oversized_header_is_refused_before_it_is_parsed(key_a: SigningKey) -> None:
    head = b64(json.dumps({"alg": "RS256", "kid": "kid-a", "pad": "x" * tokens.MAX_HEADER_CHARS}).encode())
    token = resign(key_a, head, b64(json.dumps(good_body()).encode()))
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


def test_max_token_bytes_fits_cognito_tokens_with_headroom(key_a: SigningKey) -> None:
    typical = key_a.token(scope=" ".join(f"payments/scope-{i}" for i in range(20)))
    assert 1000 < len(typical) < MAX_TOKEN_BYTES // 2  # a long scope list still has room to spare
    assert MAX_TOKEN_BYTES == 4096


async def test_key_issuer_and_signature_failures_share_one_client_text(key_a: SigningKey, key_b: SigningKey) -> None:
    """What the client reads is the same; the failure (metrics, logs) and the detail (explain) differ."""
    keys = MemoryKeys(key_a)
    keys.publish(OTHER, key_b)
    verifier = TokenVerifier(keys)
    refused = {}
    for token in (make_key("kid-nobody").token(), make_key("kid-a").token(), key_b.token(iss=ISSUER)):
        with pytest.raises(TokenError) as caught:
            await verifier.verify(token, TWO_ISSUERS)
        refused[caught.value.failure] = (caught.value.description, caught.value.detail)
    assert set(refused) == {Failure.UNKNOWN_KEY, Failure.BAD_SIGNATURE, Failure.WRONG_ISSUER}
    assert {description for description, _ in refused.values()} == {"token is not valid"}
    assert len({detail for _, detail in refused.values()}) == 3


def signed_with_header(key: SigningKey, header: dict) -> str:
    """Sign a valid claim set under an arbitrary JOSE header (PyJWT refuses some of these on encode)."""
    head = b64(json.dumps({"alg": "RS256", **header}).encode())
    body = b64(json.dumps({"iss": ISSUER, "token_use": "access", "client_id": "client-a",
                           "exp": int(time.time()) + 600}).encode())
    signature = key.private.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64(signature)}"


@pytest.mark.parametrize(
    "header",
    [{}, {"kid": ""}, {"kid": 5}, {"kid": "x" * 300}, {"kid": "kid-a", "jku": "https://evil/jwks"},
     {"kid": "kid-a", "crit": ["exp"]}, {"kid": "kid-a", "x5u": "https://evil"},
     {"kid": "kid-a", "jwk": {"kty": "RSA"}}, {"kid": "kid-a", "alg": "RS512"}, {"kid": "kid-a", "alg": "PS256"}],
)
async def test_bad_headers_rejected(key_a: SigningKey, header: dict) -> None:
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), signed_with_header(key_a, header)) is Failure.INVALID_TOKEN


async def test_handmade_header_helper_is_accepted_when_header_is_fine(key_a: SigningKey) -> None:
    # Guards the test above: the same construction with a proper header verifies.
    await TokenVerifier(MemoryKeys(key_a)).verify(signed_with_header(key_a, {"kid": "kid-a"}), POLICY)


async def test_kid_with_path_and_sql_is_just_unknown(key_a: SigningKey) -> None:
    for kid in ("../../etc/passwd", "' OR 1=1 --"):
        forged = SigningKey(kid, key_a.private)
        assert await failure_of(TokenVerifier(MemoryKeys(key_a)), forged.token()) is Failure.UNKNOWN_KEY


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.@@@.###", "eyJhbGciOiJSUzI1NiJ9.e30", "x" * (MAX_TOKEN_BYTES + 1),
     "\udcff.\udcfe.x"],
)
async def test_malformed_tokens(key_a: SigningKey, token: str) -> None:
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


async def test_extra_segment_and_bad_json(key_a: SigningKey) -> None:
    good = key_a.token()
    verifier = TokenVerifier(MemoryKeys(key_a))
    assert await failure_of(verifier, good + ".extra") is Failure.INVALID_TOKEN
    header, _, sig = good.split(".")
    # The signature is checked before the payload is read: a swapped-in payload is a bad signature...
    assert await failure_of(verifier, f"{header}.{b64(b'{not json')}.{sig}") is Failure.BAD_SIGNATURE
    # ... and a signed one that is not JSON is malformed.
    assert await failure_of(verifier, resign(key_a, header, b64(b"{not json"))) is Failure.INVALID_TOKEN


async def test_duplicate_claims_rejected_even_when_signed(key_a: SigningKey) -> None:
    now = int(time.time())
    payload = (f'{{"iss":"{ISSUER}","token_use":"access","client_id":"client-a","exp":{now + 600},'
               f'"scope":"transactions/get","scope":"transactions/post"}}').encode()
    token = jwt.PyJWS().encode(payload, key_a.private, algorithm="RS256", headers={"kid": "kid-a"})
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


@pytest.mark.parametrize(
    ("claims", "description"),
    [
        ({"sub": "\ud800"}, "sub claim is not valid HTTP header text"),
        ({"sub": "client-\udfff"}, "sub claim is not valid HTTP header text"),
        ({"scope": "transactions/post \ud83d"}, SCOPE_CHARACTER),
        ({"client_id": "client-a\r\nx-auth-sub: admin"}, "client_id claim is not valid HTTP header text"),
        ({"sub": "client-a\x00"}, "sub claim is not valid HTTP header text"),
        ({"sub": "client\x1fa"}, "sub claim is not valid HTTP header text"),
        ({"sub": "client\x7fa"}, "sub claim is not valid HTTP header text"),
        ({"scope": "transactions/post\n"}, SCOPE_SPACING),
        ({"sub": " client-a"}, "sub claim is not valid HTTP header text"),
        ({"scope": "transactions/post\t"}, SCOPE_SPACING),
    ],
    ids=["lone-high-surrogate", "lone-low-surrogate", "scope-surrogate", "client-id-crlf", "nul", "unit-separator",
         "del", "scope-newline", "leading-space", "trailing-tab"],
)
async def test_forwarded_claims_must_be_header_text(key_a: SigningKey, claims: dict, description: str) -> None:
    """client_id, scope and sub become x-auth-* headers: signed or not, they must be text a header can carry."""
    with pytest.raises(TokenError) as caught:
        await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(**claims), POLICY)
    assert (caught.value.failure, caught.value.description) == (Failure.INVALID_TOKEN, description)


async def test_non_ascii_text_and_inner_tabs_are_header_text(key_a: SigningKey) -> None:
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(
        key_a.token(sub="zahlungs-dienst-\u00e9\U0001f600\tx", scope="transactions/post"), POLICY)
    assert claims.sub == "zahlungs-dienst-\u00e9\U0001f600\tx"


async def test_scope_compared_exactly(key_a: SigningKey) -> None:
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope="transactions/postx transactions"), POLICY)
    assert "transactions/post" not in claims.scopes


@pytest.mark.parametrize(("scope", "description"), [
    ("transactions/get\tadmin/all", SCOPE_SPACING),  # one scope here, two for an app splitting on whitespace
    ("transactions/get\radmin/all", SCOPE_SPACING),
    ("transactions/get\x0badmin/all", SCOPE_SPACING),
    ("transactions/get  transactions/post", SCOPE_SPACING),  # an empty scope between two spaces
    (" transactions/get", SCOPE_SPACING),
    ("transactions/get ", SCOPE_SPACING),
    (" ", SCOPE_SPACING),
    ('transactions/get "admin/all"', SCOPE_CHARACTER),
    ("transactions\\get", SCOPE_CHARACTER),
    ("transactions/g\u00e9t", SCOPE_CHARACTER),
    ("transactions/get\u00a0admin/all", SCOPE_CHARACTER),  # a no-break space is not ASCII
    ("transactions/get\x1cadmin/all", SCOPE_CHARACTER),
    ("transactions/get\tadmin/all \x00", SCOPE_CHARACTER),  # a bad character is named before the spacing
])
async def test_a_scope_claim_outside_rfc_6749_is_refused_with_its_reason(key_a: SigningKey, scope: str,
                                                                        description: str) -> None:
    """x-auth-scopes carries the claim as signed: the app must be able to split it as we did."""
    with pytest.raises(TokenError) as caught:
        await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope=scope), POLICY)
    assert (caught.value.failure, caught.value.description) == (Failure.INVALID_TOKEN, description)


@pytest.mark.parametrize("scope", ["transactions/post", "transactions/post transactions/get", "",
                                   "https://api.example.com/read!#$%&'()*+,-./:;<=>?@[]^_`{|}~ x"])
async def test_scope_claims_cognito_issues_are_accepted(key_a: SigningKey, scope: str) -> None:
    """Cognito's resource server identifiers and scope names follow RFC 6749's scope-token."""
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope=scope), POLICY)
    assert claims.scope_text == scope and claims.scopes == frozenset(scope.split(" ")) - {""}


@pytest.mark.parametrize("value", ["Bearer abc\n", "Bearer abc.def.ghi\n", "Bearer  abc"])
def test_bearer_refuses_trailing_newline_and_odd_spacing(value: str) -> None:
    # Regression: a regex ending in `$` also matches before a final newline.
    from authz_service.tokens import bearer_token

    with pytest.raises(TokenError) as caught:
        bearer_token((value,))
    assert caught.value.failure is Failure.BAD_REQUEST


# --- strict JOSE parsing (our own base64url + JSON, no PyJWT leniency) -----------------------------


def resign(key: SigningKey, head: str, body: str) -> str:
    signature = key.private.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64(signature)}"


def good_body() -> dict:
    return {"iss": ISSUER, "token_use": "access", "client_id": "client-a", "exp": int(time.time()) + 600}


def non_canonical(segment: str) -> str:
    """The same bytes with different unused trailing bits (base64 malleability)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3), "needs unused bits"
    last = alphabet.index(segment[-1])
    return segment[:-1] + alphabet[last + 1]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda h, b, s: f"{h}.{b}.{non_canonical(s) if len(s) % 4 else s}", id="sig-trailing-bits"),
        pytest.param(lambda h, b, s: f"{h}=.{b}.{s}", id="padding-in-header"),
        pytest.param(lambda h, b, s: f"{h}.{b}.{s.replace('_', '/').replace('-', '+')}", id="std-alphabet-sig"),
    ],
)
async def test_non_canonical_encodings_rejected(key_a: SigningKey, mangle) -> None:
    head, body, sig = key_a.token().split(".")
    # Make sure the signature segment actually contains '-' or '_' for the alphabet case.
    token = mangle(head, body, sig)
    if token == f"{head}.{body}.{sig}":
        pytest.skip("this signature has nothing to mangle")
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


async def test_payload_with_unused_bits_rejected_even_when_signed(key_a: SigningKey) -> None:
    head = b64(json.dumps({"alg": "RS256", "kid": "kid-a"}).encode())
    raw = json.dumps(good_body()).encode()
    while len(b64(raw)) % 4 == 0:  # need a length with unused trailing bits
        raw += b" "
    body = non_canonical(b64(raw))
    assert base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)) == raw  # same bytes, other text
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), resign(key_a, head, body)) is Failure.INVALID_TOKEN


@pytest.mark.parametrize(
    "raw_header",
    [b'{"alg":"RS256","kid":"kid-a","kid":"kid-b"}', b'["RS256"]', b'\xef\xbb\xbf{"alg":"RS256","kid":"kid-a"}',
     '{"alg":"RS256","kid":"kid-a"}'.encode("utf-16"), b'{"alg":"RS256","kid":"kid-\xff"}'],
    ids=["duplicate-key", "array", "bom", "utf-16", "bad-utf8"],
)
async def test_strict_header_json(key_a: SigningKey, raw_header: bytes) -> None:
    token = resign(key_a, b64(raw_header), b64(json.dumps(good_body()).encode()))
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


@pytest.mark.parametrize(
    "raw_body",
    [b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":NaN}',
     b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":Infinity}',
     b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":"9999999999"}',
     b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":true}',
     b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":9999999999,"nbf":"0"}',
     b'{"iss":"%s","token_use":"access","client_id":"client-a","exp":9999999999,"iat":[1]}',
     b'{"iss":"%s","token_use":"access","client_id":"client-\xff","exp":9999999999}',
     b'"just a string"'],
    ids=["nan", "infinity", "exp-string", "exp-bool", "nbf-string", "iat-list", "bad-utf8", "not-object"],
)
async def test_strict_payload(key_a: SigningKey, raw_body: bytes) -> None:
    body = raw_body.replace(b"%s", ISSUER.encode()) if b"%s" in raw_body else raw_body
    token = resign(key_a, b64(json.dumps({"alg": "RS256", "kid": "kid-a"}).encode()), b64(body))
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


async def test_resign_helper_makes_valid_tokens(key_a: SigningKey) -> None:
    # Guards the two tests above: the same construction with clean JSON verifies.
    token = resign(key_a, b64(json.dumps({"alg": "RS256", "kid": "kid-a"}).encode()), b64(json.dumps(good_body()).encode()))
    await TokenVerifier(MemoryKeys(key_a)).verify(token, POLICY)


async def test_iat_in_future_beyond_leeway_not_yet_valid_even_with_float(key_a: SigningKey) -> None:
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), key_a.token(iat=time.time() + 600.5)) is Failure.NOT_YET_VALID


# RFC 6750 section 2.1, written as the grammar reads; bearer_token's check is a faster rewrite.
B64TOKEN_GRAMMAR = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
b64token_text = st.text(st.sampled_from(list("Aa09-._~+/=") + [" ", "\n", "\t", ",", "é", "%", "\x00", "\\"]),
                        max_size=12)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(b64token_text, st.text(max_size=12)))
def test_bearer_token_characters_follow_the_rfc_6750_grammar(text: str) -> None:
    from authz_service.tokens import bearer_token

    value = f"Bearer {text}"
    if B64TOKEN_GRAMMAR.fullmatch(text):
        assert bearer_token((value,)) == text
    elif "," not in text:  # a comma is refused earlier, as a second Authorization value
        with pytest.raises(TokenError) as caught:
            bearer_token((value,))
        assert caught.value.failure is Failure.BAD_REQUEST
