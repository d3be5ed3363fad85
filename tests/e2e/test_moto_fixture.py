"""The moto Cognito fixture issues access tokens that verify against the JWKS moto serves over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request

import jwt
import pytest

from .harness import free_port
from .moto_cognito import (
    MotoPool,
    issue_access_token,
    provision_pool,
    start_moto_server,
    stop_moto_server,
    unverified_claims,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def moto_endpoint(request: pytest.FixtureRequest) -> str:
    port = free_port()
    started = time.monotonic()
    proc = start_moto_server(port)
    request.addfinalizer(lambda: stop_moto_server(proc))
    print(f"moto_server answered after {time.monotonic() - started:.2f}s")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def pool(moto_endpoint: str) -> MotoPool:
    return provision_pool(moto_endpoint)


def _fetch_jwks(uri: str) -> jwt.PyJWKSet:
    with urllib.request.urlopen(uri, timeout=5) as resp:
        assert resp.status == 200
        return jwt.PyJWKSet.from_dict(json.load(resp))


def _verify(token: str, pool: MotoPool) -> dict:
    jwks = _fetch_jwks(pool.jwks_uri)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(
        token,
        key=key.key,
        algorithms=["RS256"],
        issuer=pool.issuer,
        options={"verify_aud": False, "require": ["exp", "iat", "iss"]},
    )


def test_pool_shape(pool: MotoPool) -> None:
    assert pool.issuer == f"https://cognito-idp.{pool.region}.amazonaws.com/{pool.user_pool_id}"
    assert pool.jwks_uri == f"{pool.endpoint}/{pool.user_pool_id}/.well-known/jwks.json"
    assert pool.scopes_in_token == ("aws.cognito.signin.user.admin",)
    assert pool.client_secret  # GenerateSecret=True is honoured


@pytest.mark.parametrize("flow", ["ADMIN_USER_PASSWORD_AUTH", "USER_PASSWORD_AUTH"])
def test_access_token_verifies_against_served_jwks(pool: MotoPool, flow: str) -> None:
    token = issue_access_token(pool, flow=flow)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"] == "dummy"

    claims = _verify(token, pool)
    assert claims["token_use"] == "access"
    assert claims["client_id"] == pool.client_id
    assert tuple(claims["scope"].split()) == pool.scopes_in_token
    assert claims["exp"] - claims["iat"] == 3600
    assert "aud" not in claims and "nbf" not in claims
    assert set(claims) <= {
        "iss", "sub", "client_id", "token_use", "iat", "auth_time", "exp", "jti",
        "username", "origin_jti", "scope", "cognito:groups",
    }


def test_jwks_key_is_one_2048_bit_rsa_key(pool: MotoPool) -> None:
    jwks = _fetch_jwks(pool.jwks_uri)
    assert [k.key_id for k in jwks.keys] == ["dummy"]
    assert jwks.keys[0].key.key_size == 2048


def test_tampered_token_is_rejected(pool: MotoPool) -> None:
    token = issue_access_token(pool)
    head, payload, sig = token.split(".")
    claims = unverified_claims(token) | {"scope": "transactions/post"}
    forged_payload = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    with pytest.raises(jwt.InvalidSignatureError):
        _verify(f"{head}.{forged_payload}.{sig}", pool)
