"""TokenVerifier: every way a Cognito access token can be wrong maps to one precise failure."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from jwt.api_jwk import PyJWK

from authz_service.policy import Issuer, parse_policy
from authz_service.tokens import MAX_TOKEN_BYTES, Failure, TokenError, TokenVerifier

from .conftest import ISSUER, SigningKey, make_key

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


class MemoryKeys:
    """A real in-memory KeySource: what the JWKS cache would hold, plus a refetch we can script."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = {k.kid: PyJWK(k.jwk()) for k in keys}
        self.after_refetch: dict[str, PyJWK] | None = None
        self.refetches = 0

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self.keys.get(kid)

    def has_keys(self, issuer: Issuer) -> bool:
        return bool(self.keys)

    async def refetch(self, issuer: Issuer) -> None:
        self.refetches += 1
        if self.after_refetch is not None:
            self.keys = self.after_refetch


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def failure_of(verifier: TokenVerifier, token: str) -> Failure:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token, POLICY)
    assert not token or token not in caught.value.description
    return caught.value.failure


async def test_valid_cognito_token(key_a: SigningKey) -> None:
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope="transactions/post transactions/get"), POLICY)
    assert claims.client_id == "client-a"
    assert claims.sub == "client-a"
    assert claims.scopes == {"transactions/post", "transactions/get"}
    assert claims.issuer == ISSUER
    assert claims.kid == "kid-a"


@pytest.mark.parametrize(
    ("claims", "failure"),
    [
        ({"exp": int(time.time()) - 120}, Failure.EXPIRED),
        ({"exp": None}, Failure.INVALID_TOKEN),
        ({"nbf": int(time.time()) + 600}, Failure.NOT_YET_VALID),
        ({"iat": int(time.time()) + 600}, Failure.NOT_YET_VALID),
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
    assert keys.refetches == 1


async def test_unknown_kid_picked_up_after_rotation(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    keys.after_refetch = {key_b.kid: PyJWK(key_b.jwk())}
    claims = await TokenVerifier(keys).verify(key_b.token(), POLICY)
    assert claims.kid == "kid-b"


async def test_no_keys_yet_is_unavailable_not_invalid(key_a: SigningKey) -> None:
    assert await failure_of(TokenVerifier(MemoryKeys()), key_a.token()) is Failure.KEYS_UNAVAILABLE


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
    assert await failure_of(verifier, f"{header}.{b64(b'{not json')}.{sig}") is Failure.INVALID_TOKEN


async def test_duplicate_claims_rejected_even_when_signed(key_a: SigningKey) -> None:
    now = int(time.time())
    payload = (f'{{"iss":"{ISSUER}","token_use":"access","client_id":"client-a","exp":{now + 600},'
               f'"scope":"transactions/get","scope":"transactions/post"}}').encode()
    token = jwt.PyJWS().encode(payload, key_a.private, algorithm="RS256", headers={"kid": "kid-a"})
    assert await failure_of(TokenVerifier(MemoryKeys(key_a)), token) is Failure.INVALID_TOKEN


async def test_scope_compared_exactly(key_a: SigningKey) -> None:
    claims = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope="transactions/postx transactions"), POLICY)
    assert "transactions/post" not in claims.scopes
    tabbed = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(scope="transactions/post\ttransactions/get"), POLICY)
    assert "transactions/post" not in tabbed.scopes


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
