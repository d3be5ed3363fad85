"""The dev issuer must hand out tokens our verifier cannot tell apart from Cognito's, and refuse
requests with the error codes Cognito uses, or the local setup would test a different system."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization

from authz_service.dev_issuer.app import build_app, serve
from authz_service.dev_issuer.config import DevIssuerConfig, DevIssuerConfigError, load_config
from authz_service.dev_issuer.issuer import DevIssuer, TokenRequestError
from tests.e2e.harness import free_port, port_open
from tests.e2e.stack import start_dev_issuer

POOL = "us-east-1_Demo00001"
PUBLIC_URL = "http://issuer.test:9000"
ISSUER = f"{PUBLIC_URL}/{POOL}"
JWKS_PATH = f"/{POOL}/.well-known/jwks.json"
EXAMPLE = Path(__file__).resolve().parents[1] / "authz_service" / "examples" / "dev-issuer.yaml"

CONFIG_YAML = f"""
user_pool_id: {POOL}
token_ttl_seconds: 600
resource_servers:
  - identifier: transactions
    scopes: [get, post]
  - identifier: https://reports.example.com
    scopes: [read]
clients:
  - client_id: writer
    client_secret: writer-secret
    allowed_scopes: [transactions/post]
  - client_id: reporting
    client_secret: reporting-secret
    allowed_scopes: [transactions/get, transactions/post]
  - client_id: user-app
    client_secret: user-app-secret
    allowed_scopes: [transactions/get]
    grant_types: [authorization_code]
  - client_id: disabled
    client_secret: disabled-secret
    allowed_scopes: [transactions/get]
    grant_types: []
"""

# Exactly what Cognito puts in a client_credentials access token.
COGNITO_CLAIMS = {"sub", "token_use", "scope", "auth_time", "iss", "exp", "iat", "version", "jti", "client_id"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dev-issuer.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> DevIssuerConfig:
    return load_config(write(tmp_path, CONFIG_YAML))


@pytest.fixture
def issuer(config: DevIssuerConfig) -> DevIssuer:
    return DevIssuer(config, PUBLIC_URL)


@pytest.fixture
async def client(issuer: DevIssuer) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(issuer))) as test_client:
        yield test_client


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def request_token(
    client: TestClient, data: dict[str, str] | str, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    response = await client.post("/oauth2/token", data=data, headers=headers)
    return response.status, await response.json()


async def served_jwks(client: TestClient) -> jwt.PyJWKSet:
    response = await client.get(JWKS_PATH)
    assert response.status == 200
    return jwt.PyJWKSet.from_dict(await response.json())


def verify(token: str, jwks: jwt.PyJWKSet) -> dict:
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key, algorithms=["RS256"], issuer=ISSUER, options={"require": ["exp", "iat"]})


# --- token endpoint ------------------------------------------------------------------------------


async def test_basic_auth_token_verifies_against_served_jwks_with_cognito_shape(
    client: TestClient, issuer: DevIssuer
) -> None:
    response = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "transactions/post"},
        headers=basic("writer", "writer-secret"),
    )
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert set(body) == {"access_token", "expires_in", "token_type"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600

    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header == {"kid": issuer.signing_kid, "alg": "RS256"}  # no "typ", as Cognito
    claims = verify(token, await served_jwks(client))
    assert set(claims) == COGNITO_CLAIMS
    assert claims["sub"] == claims["client_id"] == "writer"
    assert claims["token_use"] == "access"
    assert claims["scope"] == "transactions/post"
    assert claims["iss"] == ISSUER
    assert claims["version"] == 2
    assert claims["exp"] - claims["iat"] == 600
    assert claims["auth_time"] == claims["iat"]
    assert uuid.UUID(claims["jti"]).version == 4


async def test_form_body_client_authentication(client: TestClient) -> None:
    status, body = await request_token(
        client,
        {"grant_type": "client_credentials", "client_id": "writer", "client_secret": "writer-secret"},
    )
    assert status == 200
    claims = verify(body["access_token"], await served_jwks(client))
    assert claims["client_id"] == "writer"
    assert claims["scope"] == "transactions/post"


async def test_omitted_scope_grants_all_allowed_scopes(client: TestClient) -> None:
    status, body = await request_token(client, {"grant_type": "client_credentials"}, basic("reporting", "reporting-secret"))
    assert status == 200
    claims = verify(body["access_token"], await served_jwks(client))
    assert claims["scope"] == "transactions/get transactions/post"


async def test_requested_scope_narrows_the_token(client: TestClient) -> None:
    status, body = await request_token(
        client, {"grant_type": "client_credentials", "scope": "transactions/get"}, basic("reporting", "reporting-secret")
    )
    assert status == 200
    assert verify(body["access_token"], await served_jwks(client))["scope"] == "transactions/get"


@pytest.mark.parametrize(
    "scope",
    [
        "transactions/get",  # defined, but not allowed for this client
        "transactions/post transactions/get",  # one allowed, one not: all or nothing
        "https://reports.example.com/read",
        "transactions/delete",  # not defined at all
    ],
)
async def test_scope_not_allowed_for_client_is_invalid_scope(client: TestClient, scope: str) -> None:
    status, body = await request_token(
        client, {"grant_type": "client_credentials", "scope": scope}, basic("writer", "writer-secret")
    )
    assert (status, body) == (400, {"error": "invalid_scope"})


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({"grant_type": "client_credentials"}, basic("writer", "wrong-secret")),
        ({"grant_type": "client_credentials"}, basic("writer", "writer-secret-and-more")),
        ({"grant_type": "client_credentials"}, basic("nobody", "writer-secret")),
        ({"grant_type": "client_credentials", "client_id": "writer", "client_secret": "wrong"}, None),
        ({"grant_type": "client_credentials", "client_id": "writer"}, None),  # confidential client, no secret
        ({"grant_type": "client_credentials"}, {"Authorization": "Basic not-base64!"}),
        ({"grant_type": "client_credentials"}, {"Authorization": "Bearer abc"}),
    ],
    ids=["wrong-secret", "secret-prefix", "unknown-client", "wrong-secret-form", "no-secret", "bad-basic", "not-basic"],
)
async def test_failed_client_authentication_is_invalid_client(
    client: TestClient, data: dict[str, str], headers: dict[str, str] | None
) -> None:
    assert await request_token(client, data, headers) == (400, {"error": "invalid_client"})


@pytest.mark.parametrize("grant_type", ["password", "authorization_code", "refresh_token", "CLIENT_CREDENTIALS"])
async def test_other_grant_types_are_unsupported(client: TestClient, grant_type: str) -> None:
    status, body = await request_token(client, {"grant_type": grant_type}, basic("writer", "writer-secret"))
    assert (status, body) == (400, {"error": "unsupported_grant_type"})


@pytest.mark.parametrize("client_id", ["user-app", "disabled"])
async def test_client_without_client_credentials_grant_is_unauthorized_client(
    client: TestClient, client_id: str
) -> None:
    status, body = await request_token(client, {"grant_type": "client_credentials"}, basic(client_id, f"{client_id}-secret"))
    assert (status, body) == (400, {"error": "unauthorized_client"})


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({"scope": "transactions/post"}, basic("writer", "writer-secret")),  # no grant_type
        ({"grant_type": ""}, basic("writer", "writer-secret")),  # empty counts as absent (RFC 6749 3.1)
        ("grant_type=client_credentials&grant_type=client_credentials", None),  # repeated parameter
        ({"grant_type": "client_credentials"}, None),  # no client identification at all
        (  # two authentication methods at once
            {"grant_type": "client_credentials", "client_secret": "writer-secret"},
            basic("writer", "writer-secret"),
        ),
        (  # body client_id contradicts the header
            {"grant_type": "client_credentials", "client_id": "reporting"},
            basic("writer", "writer-secret"),
        ),
    ],
    ids=["missing-grant", "empty-grant", "repeated", "no-client", "two-methods", "id-mismatch"],
)
async def test_malformed_requests_are_invalid_request(
    client: TestClient, data: dict[str, str] | str, headers: dict[str, str] | None
) -> None:
    if isinstance(data, str):  # raw body, so a parameter can repeat
        headers = {**basic("writer", "writer-secret"), "Content-Type": "application/x-www-form-urlencoded"}
    assert await request_token(client, data, headers) == (400, {"error": "invalid_request"})


async def test_json_body_is_invalid_request(client: TestClient) -> None:
    response = await client.post(
        "/oauth2/token", json={"grant_type": "client_credentials"}, headers=basic("writer", "writer-secret")
    )
    assert (response.status, await response.json()) == (400, {"error": "invalid_request"})


async def test_body_client_id_matching_basic_header_is_accepted(client: TestClient) -> None:
    status, _ = await request_token(
        client, {"grant_type": "client_credentials", "client_id": "writer"}, basic("writer", "writer-secret")
    )
    assert status == 200


async def test_token_endpoint_only_accepts_post(client: TestClient) -> None:
    assert (await client.get("/oauth2/token")).status == 405


async def test_secrets_and_tokens_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    credentials = basic("writer", "writer-secret")
    status, body = await request_token(client, {"grant_type": "client_credentials"}, credentials)
    assert status == 200
    await request_token(client, {"grant_type": "client_credentials", "client_id": "writer", "client_secret": "guess"})
    await request_token(client, {"grant_type": "client_credentials"}, basic("reporting", "wrong-reporting-pw"))
    logged = caplog.text
    assert "issued an access token" in logged and "invalid_client" in logged  # the logging did happen
    token = body["access_token"]
    for forbidden in ("writer-secret", "guess", "wrong-reporting-pw", credentials["Authorization"].split()[1]):
        assert forbidden not in logged
    for part in token.split("."):
        assert part not in logged


# --- ID tokens (dev-only) -----------------------------------------------------------------------

# What Cognito puts in a signed-in user's ID token when the pool adds no attributes or groups.
COGNITO_ID_CLAIMS = {"sub", "iss", "cognito:username", "origin_jti", "aud", "event_id", "token_use", "auth_time",
                     "exp", "iat", "jti"}


async def request_id_token(client: TestClient, data: dict[str, str], headers: dict[str, str] | None = None,
                           ) -> tuple[int, dict]:
    response = await client.post("/admin/id-token", data=data, headers=headers)
    return response.status, await response.json()


async def test_id_token_has_cognitos_id_token_shape_and_verifies_against_the_served_jwks(
    client: TestClient, issuer: DevIssuer
) -> None:
    response = await client.post("/admin/id-token", data={"username": "alice"}, headers=basic("writer", "writer-secret"))
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert set(body) == {"id_token", "expires_in", "token_type"} and body["expires_in"] == 600
    token = body["id_token"]
    assert jwt.get_unverified_header(token) == {"kid": issuer.signing_kid, "alg": "RS256"}
    claims = jwt.decode(token, (await served_jwks(client))[issuer.signing_kid], algorithms=["RS256"], issuer=ISSUER,
                        audience="writer")
    assert set(claims) == COGNITO_ID_CLAIMS
    assert (claims["token_use"], claims["aud"], claims["cognito:username"]) == ("id", "writer", "alice")
    assert claims["exp"] - claims["iat"] == 600 and claims["auth_time"] == claims["iat"]
    assert "scope" not in claims and "client_id" not in claims
    # The same user keeps one sub (as in Cognito); another user has another.
    again = jwt.decode(issuer.issue_id_token("writer", "alice"), options={"verify_signature": False})
    other = jwt.decode(issuer.issue_id_token("writer", "bob"), options={"verify_signature": False})
    assert again["sub"] == claims["sub"] != other["sub"]
    assert again["jti"] != claims["jti"]


async def test_id_token_default_user_and_form_client_authentication(client: TestClient) -> None:
    status, body = await request_id_token(client, {"client_id": "reporting", "client_secret": "reporting-secret"})
    assert status == 200
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert (claims["aud"], claims["cognito:username"]) == ("reporting", "dev-user")


@pytest.mark.parametrize(
    ("data", "headers", "error"),
    [
        ({"username": "alice"}, basic("writer", "wrong"), "invalid_client"),
        ({"username": "alice"}, basic("nobody", "writer-secret"), "invalid_client"),
        ({"client_id": "writer"}, None, "invalid_client"),
        ({"username": "alice"}, None, "invalid_request"),
        ({"username": "al ice"}, basic("writer", "writer-secret"), "invalid_request"),
        ({"username": "x" * 129}, basic("writer", "writer-secret"), "invalid_request"),
        ({"username": "a\x01"}, basic("writer", "writer-secret"), "invalid_request"),
    ],
    ids=["wrong-secret", "unknown-client", "no-secret", "no-client", "space", "too-long", "control-char"],
)
async def test_id_token_requests_are_refused_as_token_requests_are(
    client: TestClient, data: dict[str, str], headers: dict[str, str] | None, error: str
) -> None:
    assert await request_id_token(client, data, headers) == (400, {"error": error})


async def test_id_token_endpoint_only_accepts_post(client: TestClient) -> None:
    assert (await client.get("/admin/id-token")).status == 405


async def test_id_tokens_and_secrets_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, body = await request_id_token(client, {"username": "alice"}, basic("writer", "writer-secret"))
    assert status == 200
    assert "issued an ID token to client_id='writer' for username='alice'" in caplog.text
    assert "writer-secret" not in caplog.text
    for part in body["id_token"].split("."):
        assert part not in caplog.text


# --- JWKS and rotation ---------------------------------------------------------------------------


async def test_jwks_keys_have_exactly_cognito_members_and_kid(client: TestClient) -> None:
    response = await client.get(JWKS_PATH)
    assert response.status == 200
    keys = (await response.json())["keys"]
    assert len(keys) == 1
    jwk = keys[0]
    assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}
    assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["e"]) == ("RSA", "sig", "RS256", "AQAB")
    public_key = jwt.PyJWK(jwk).key
    assert public_key.key_size == 2048
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert jwk["kid"] == base64.b64encode(hashlib.sha256(der).digest()).decode()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", jwk["kid"])  # Cognito's kid shape


async def test_jwks_is_served_only_under_the_configured_pool(client: TestClient) -> None:
    assert (await client.get("/us-east-1_Other0001/.well-known/jwks.json")).status == 404


async def test_rotation_signs_with_new_key_and_keeps_old_key_published(client: TestClient, issuer: DevIssuer) -> None:
    old_kid = issuer.signing_kid
    old_token = issuer.issue("writer")

    response = await client.post("/admin/rotate")
    assert response.status == 200
    rotated = await response.json()
    new_kid = rotated["kid"]
    assert new_kid != old_kid
    assert rotated["published"] == [old_kid, new_kid]

    status, body = await request_token(client, {"grant_type": "client_credentials"}, basic("writer", "writer-secret"))
    assert status == 200
    assert jwt.get_unverified_header(body["access_token"])["kid"] == new_kid
    jwks = await served_jwks(client)
    assert verify(body["access_token"], jwks)["client_id"] == "writer"
    assert verify(old_token, jwks)["client_id"] == "writer"  # tokens signed before rotation still verify


async def test_rotation_with_retire_old_unpublishes_old_key(client: TestClient, issuer: DevIssuer) -> None:
    old_kid = issuer.signing_kid
    old_token = issuer.issue("writer")

    response = await client.post("/admin/rotate", params={"retire_old": "true"})
    assert response.status == 200
    rotated = await response.json()
    assert rotated["published"] == [rotated["kid"]]
    jwks = await served_jwks(client)
    assert [key.key_id for key in jwks.keys] == [rotated["kid"]]
    with pytest.raises(KeyError):
        jwks[old_kid]
    with pytest.raises(KeyError):
        verify(old_token, jwks)
    assert verify(issuer.issue("writer"), jwks)["client_id"] == "writer"


async def test_rotation_rejects_unclear_retire_old(client: TestClient, issuer: DevIssuer) -> None:
    kid = issuer.signing_kid
    response = await client.post("/admin/rotate", params={"retire_old": "yes please"})
    assert response.status == 400
    assert issuer.signing_kid == kid


async def test_health(client: TestClient) -> None:
    response = await client.get("/admin/health")
    assert (response.status, await response.json()) == (200, {"status": "ok"})


# --- DevIssuer without HTTP ----------------------------------------------------------------------


def test_issue_refuses_with_cognito_codes(issuer: DevIssuer) -> None:
    cases = [
        (("nobody", None), "invalid_client"),
        (("disabled", None), "unauthorized_client"),
        (("writer", ["transactions/get"]), "invalid_scope"),
    ]
    for (client_id, scopes), code in cases:
        with pytest.raises(TokenRequestError) as caught:
            issuer.issue(client_id, scopes)
        assert caught.value.error == code


def test_authenticate_checks_the_secret(issuer: DevIssuer) -> None:
    issuer.authenticate("writer", "writer-secret")
    for client_id, secret in [("writer", "reporting-secret"), ("writer", ""), ("nobody", "writer-secret")]:
        with pytest.raises(TokenRequestError) as caught:
            issuer.authenticate(client_id, secret)
        assert caught.value.error == "invalid_client"


def test_issue_deduplicates_requested_scopes(issuer: DevIssuer) -> None:
    token = issuer.issue("reporting", ["transactions/post", "transactions/post", "transactions/get"])
    assert jwt.decode(token, options={"verify_signature": False})["scope"] == "transactions/post transactions/get"


def test_issuer_url_is_public_url_plus_pool(config: DevIssuerConfig) -> None:
    assert DevIssuer(config, "https://auth.example.com/base/").issuer == f"https://auth.example.com/base/{POOL}"
    for bad in ["auth.example.com", "ftp://auth.example.com", "http://auth.example.com/?x=1"]:
        with pytest.raises(ValueError, match="public URL"):
            DevIssuer(config, bad)


async def test_serve_logs_issuer_and_token_endpoint_and_serves_verifiable_tokens(
    config: DevIssuerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authz_service.dev_issuer")
    task = asyncio.create_task(serve(config, "127.0.0.1", 0, None))
    try:
        ready = None
        deadline = time.monotonic() + 60  # a generous bound on the event, which normally takes ms
        while time.monotonic() < deadline:
            ready = next((r.getMessage() for r in caplog.records if "dev issuer ready" in r.getMessage()), None)
            if ready or task.done():
                break
            await asyncio.sleep(0.02)
        assert ready is not None, "serve() never logged its ready line"
        match = re.search(r"issuer=(\S+) token_endpoint=(\S+)", ready)
        assert match is not None
        iss, token_endpoint = match.groups()
        assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/{POOL}", iss)
        assert token_endpoint == iss.removesuffix(f"/{POOL}") + "/oauth2/token"

        async with aiohttp.ClientSession() as session:
            async with session.post(
                token_endpoint,
                data={"grant_type": "client_credentials"},
                headers=basic("writer", "writer-secret"),
            ) as response:
                assert response.status == 200
                token = (await response.json())["access_token"]
        # The verifier's way in: JWKS at <iss>/.well-known/jwks.json, fetched by PyJWT itself.
        jwks_client = jwt.PyJWKClient(f"{iss}/.well-known/jwks.json")
        key = await asyncio.to_thread(jwks_client.get_signing_key_from_jwt, token)
        claims = jwt.decode(token, key, algorithms=["RS256"], issuer=iss)
        assert claims["client_id"] == "writer"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(token_endpoint)


# --- configuration -------------------------------------------------------------------------------


def test_example_config_defines_the_documented_clients() -> None:
    config = load_config(EXAMPLE)
    assert config.user_pool_id == POOL
    assert config.token_ttl_seconds == 3600
    assert [(server.identifier, server.scopes) for server in config.resource_servers] == [
        ("transactions", ("get", "post"))
    ]
    assert {client.client_id: client.allowed_scopes for client in config.clients} == {
        "payments-writer": ("transactions/post",),
        "payments-reader": ("transactions/get",),
        "reporting": ("transactions/get", "transactions/post"),
    }
    assert all(client.grant_types == ("client_credentials",) for client in config.clients)


def test_client_secret_is_not_in_config_repr(config: DevIssuerConfig) -> None:
    assert "writer-secret" not in repr(config)


def test_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            f"""
user_pool_id: {POOL}
resource_servers: [{{identifier: transactions, scopes: [get]}}]
clients: [{{client_id: c, client_secret: s, allowed_scopes: [transactions/get]}}]
""",
        )
    )
    assert config.token_ttl_seconds == 3600
    assert config.clients[0].grant_types == ("client_credentials",)


VALID_CLIENT = "  - client_id: c\n    client_secret: s\n    allowed_scopes: [transactions/get]\n"


def config_text(pool: str = POOL, extra_top: str = "", client: str = VALID_CLIENT) -> str:
    return (
        f"user_pool_id: {pool}\n{extra_top}"
        "resource_servers:\n  - identifier: transactions\n    scopes: [get, post]\n"
        f"clients:\n{client}"
    )


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (config_text(extra_top="user_pool: x\n"), "2:1: user_pool", "unknown key"),
        (config_text(client=VALID_CLIENT + "    secret: s\n"), "9:5: clients[0].secret", "unknown key"),
        (
            config_text(client="  - client_id: c\n    allowed_scopes: [transactions/get]\n"),
            "6:5: clients[0].client_secret",
            "missing required field",
        ),
        (
            config_text(client="  - client_id: c\n    client_secret: 123456\n    allowed_scopes: [transactions/get]\n"),
            "7:20: clients[0].client_secret",
            "must be a non-empty string",
        ),
        (
            config_text(client="  - client_id: c\n    client_secret: s\n    allowed_scopes: [transactions/delete]\n"),
            "8:22: clients[0].allowed_scopes[0]",
            "'transactions/delete' is not defined by any resource server",
        ),
        (
            config_text(client="  - client_id: c\n    client_secret: s\n    allowed_scopes: [get]\n"),
            "8:22: clients[0].allowed_scopes[0]",
            "'get' is not defined by any resource server",
        ),
        (config_text(pool="Demo00001"), "1:15: user_pool_id", "is not a Cognito user pool id"),
        (config_text(pool="us-east-1-Demo00001"), "1:15: user_pool_id", "is not a Cognito user pool id"),
        (config_text(extra_top="token_ttl_seconds: true\n"), "2:20: token_ttl_seconds", "whole number"),
        (config_text(extra_top="token_ttl_seconds: 0\n"), "2:20: token_ttl_seconds", "whole number"),
        (
            config_text(client=VALID_CLIENT + "    grant_types: [client_credentials, authorization_code]\n"),
            "9:18: clients[0].grant_types",
            "together with user flows",
        ),
        (config_text(client=VALID_CLIENT + "    grant_types: [password]\n"), "9:19: clients[0].grant_types[0]", "unknown"),
        (
            config_text(client="  - client_id: c\n    client_secret: s\n"),
            "6:5: clients[0].allowed_scopes",
            "needs at least one allowed scope",
        ),
        (config_text(client=VALID_CLIENT + VALID_CLIENT), "9:16: clients[1].client_id", "defined twice"),
        (config_text(client=VALID_CLIENT + "    client_secret: t\n"), "9:5: not valid YAML", "duplicate key 'client_secret'"),
        (config_text(extra_top="issuer_format: new\n"), "2:16: issuer_format", "'new' is not an issuer format"),
        (config_text(extra_top="replica_regions: [eu-west-1]\n"), "2:18: replica_regions", "updated issuer"),
        (config_text(extra_top="issuer_format: updated\nreplica_regions: [us-east-1]\n"), "3:19: replica_regions[0]",
         "is not a replica region"),
        (config_text(extra_top="issuer_format: updated\nreplica_regions: [europe]\n"), "3:19: replica_regions[0]",
         "is not a replica region"),
        (config_text(client=VALID_CLIENT + "    custom_claims: [tenant]\n"), "9:20: clients[0].custom_claims",
         "must be a mapping"),
        (config_text(client=VALID_CLIENT + "    custom_claims: {scope: admin/all}\n"), "9:21: clients[0].custom_claims.scope",
         "Cognito sets this claim"),
        (config_text(client=VALID_CLIENT + "    custom_claims: {version: 3}\n"), "9:21: clients[0].custom_claims.version",
         "Cognito sets this claim"),
        (config_text(client=VALID_CLIENT + "    custom_claims: {'cognito:groups': [a]}\n"),
         "9:21: clients[0].custom_claims.cognito:groups", "Cognito sets this claim"),
        (config_text(client=VALID_CLIENT + "    custom_claims: {when: 2024-01-01}\n"), "9:27: clients[0].custom_claims.when",
         "is not a JSON value"),
    ],
)
@pytest.mark.usefixtures("yaml_parser")
def test_config_errors_name_file_line_column_field_and_fix(tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DevIssuerConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{field}: ")  # file:line:column, as the policy loader names places
    assert problem in message
    assert "fix" in message


def test_the_valid_base_of_the_error_cases_loads(tmp_path: Path) -> None:
    # Guards the parametrized cases above: each fails for its own mistake, not a broken base.
    assert load_config(write(tmp_path, config_text())).clients[0].client_id == "c"


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(DevIssuerConfigError, match=re.escape(str(missing))):
        load_config(missing)



def test_a_config_that_is_no_regular_file_is_never_read(tmp_path: Path) -> None:
    fifo, zero = tmp_path / "fifo.yaml", tmp_path / "zero.yaml"
    os.mkfifo(fifo)  # opening it would block until a writer comes
    zero.symlink_to("/dev/zero")  # reading it would never end
    for path, kind in [(fifo, "a FIFO"), (zero, "a character device")]:
        with pytest.raises(DevIssuerConfigError, match=f"^{re.escape(f'{path}: not a regular file ({kind})')}"):
            load_config(path)


# --- issuer formats, replica regions and custom claims ---------------------------------------------

FORMATS_YAML = f"""
user_pool_id: {POOL}
issuer_format: updated
replica_regions: [eu-west-1, ap-southeast-2]
resource_servers:
  - identifier: reports
    scopes: [read]
clients:
  - client_id: acme
    client_secret: acme-secret
    allowed_scopes: [reports/read]
    custom_claims:
      "custom:tenant": acme
      tier: 3
      beta: true
      environments: [prod, staging]
      profile: {{region: eu}}
"""


@pytest.mark.parametrize(("issuer_format", "host"), [("original", "cognito-idp"), ("updated", "issuer-cognito-idp")])
def test_issuer_format_gives_cognitos_own_issuer_url(tmp_path: Path, issuer_format: str, host: str) -> None:
    config = load_config(write(tmp_path, config_text(extra_top=f"issuer_format: {issuer_format}\n")))
    dev = DevIssuer(config, PUBLIC_URL)
    assert dev.issuer == f"https://{host}.us-east-1.amazonaws.com/{POOL}"
    assert dev.jwks_path == JWKS_PATH  # keys stay on the issuer's own (public) URL
    claims = jwt.decode(dev.issue("c"), options={"verify_signature": False})
    assert claims["iss"] == dev.issuer


async def test_replica_region_endpoints_issue_with_their_region_in_iss_and_the_same_keys(tmp_path: Path) -> None:
    dev = DevIssuer(load_config(write(tmp_path, FORMATS_YAML)), PUBLIC_URL)
    async with TestClient(TestServer(build_app(dev))) as client:
        jwks = await served_jwks(client)
        issued = {}
        for path in ("/oauth2/token", "/eu-west-1/oauth2/token", "/ap-southeast-2/oauth2/token"):
            response = await client.post(path, data={"grant_type": "client_credentials"},
                                         headers=basic("acme", "acme-secret"))
            assert response.status == 200, path
            token = (await response.json())["access_token"]
            key = jwks[jwt.get_unverified_header(token)["kid"]]
            issued[path] = jwt.decode(token, key, algorithms=["RS256"], options={"verify_iss": False})["iss"]
        assert issued == {
            "/oauth2/token": f"https://issuer-cognito-idp.us-east-1.amazonaws.com/{POOL}",
            "/eu-west-1/oauth2/token": f"https://issuer-cognito-idp.eu-west-1.amazonaws.com/{POOL}",
            "/ap-southeast-2/oauth2/token": f"https://issuer-cognito-idp.ap-southeast-2.amazonaws.com/{POOL}",
        }
        assert (await client.post("/us-west-2/oauth2/token", data={"grant_type": "client_credentials"},
                                  headers=basic("acme", "acme-secret"))).status == 404
    with pytest.raises(ValueError, match="not a replica region"):
        dev.issue("acme", region="us-west-2")


def test_custom_claims_are_added_and_never_replace_cognitos(tmp_path: Path) -> None:
    dev = DevIssuer(load_config(write(tmp_path, FORMATS_YAML)), PUBLIC_URL)
    claims = jwt.decode(dev.issue("acme"), options={"verify_signature": False})
    assert set(claims) == COGNITO_CLAIMS | {"custom:tenant", "tier", "beta", "environments", "profile"}
    assert (claims["custom:tenant"], claims["tier"], claims["beta"], claims["environments"], claims["profile"]) == (
        "acme", 3, True, ["prod", "staging"], {"region": "eu"})
    assert claims["client_id"] == "acme" and claims["scope"] == "reports/read"


def test_example_custom_claims_config_loads() -> None:
    config = load_config(EXAMPLE.parent / "dev-issuer-custom-claims.yaml")
    assert config.replica_regions == ("eu-west-1",)
    acme = next(c for c in config.clients if c.client_id == "acme-reporting")
    assert acme.custom_claims == {"custom:tenant": "acme", "tier": "gold", "environments": ["prod", "staging"]}


# --- the process: signals and exit codes ---------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_dev_issuer_with_exit_code_0(tmp_path: Path, sig: signal.Signals) -> None:
    """As `serve`: a clean shutdown on SIGTERM (Kubernetes, a test harness) or Ctrl-C is a success
    (docs/cli.md, exit codes), its port closed and its last log line saying so."""
    issuer = start_dev_issuer(tmp_path, POOL, port=free_port())
    process = issuer.process
    assert process.proc is not None
    process.proc.send_signal(sig)
    assert process.proc.wait(timeout=60) == 0, process.log_tail()
    assert "dev issuer stopped" in process.log_tail()
    assert not port_open("127.0.0.1", issuer.port)
