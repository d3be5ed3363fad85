"""Interop fixture: a user pool on moto's Cognito (``moto_server``), which we did not write.

What moto 5.2.x really issues (read from moto/cognitoidp/models.py ``create_jwt`` /
``create_access_token`` and checked against live tokens by tests/e2e/test_moto_fixture.py):

* Header: ``{"alg": "RS256", "kid": "dummy"}`` (moto adds ``"typ": "JWT"`` too).
* Access token claims, always exactly these:
  ``iss`` = ``https://cognito-idp.<region>.amazonaws.com/<pool_id>`` (the real AWS host,
  not the moto endpoint), ``sub`` (user id, a UUID), ``client_id``, ``token_use`` = ``"access"``,
  ``iat``, ``auth_time`` (= iat), ``exp`` (= iat + 3600), ``jti``, ``username``,
  ``origin_jti``, ``scope`` = ``"aws.cognito.signin.user.admin"``, and ``cognito:groups`` only
  when the user is in a group. There is no ``nbf`` and no ``aud`` (id tokens carry ``aud``).
* ``scope`` is hard-coded: resource-server scopes (``transactions/get``, ``transactions/post``) and
  the client's ``AllowedOAuthScopes`` are stored but NEVER appear in tokens. moto has no
  ``/oauth2/token`` endpoint, so the client_credentials (machine-to-machine) flow that issues
  custom scopes cannot be used; tokens come from a user-password flow only.
* JWKS: ``GET <endpoint>/<pool_id>/.well-known/jwks.json`` on the moto server answers over plain
  HTTP (also ``/<pool_id>/.well-known/openid-configuration``; its ``issuer`` equals the ``iss``).
  It is a static file: ONE 2048-bit RSA key (e = 65537, kid ``dummy``, ``use`` ``sig``) shared by
  every pool, region and moto install (the private key ships inside moto), and it is served for
  any path segment, even a pool that does not exist. Good enough for interop, never for trust.
* Policy file values for a pool: ``issuer: https://cognito-idp.<region>.amazonaws.com/<pool_id>``
  and ``jwks_uri: http://127.0.0.1:<port>/<pool_id>/.well-known/jwks.json`` (the override case).
* Client secrets: ``GenerateSecret=True`` works, but moto checks ``SECRET_HASH`` only for
  USER_SRP_AUTH and REFRESH_TOKEN(_AUTH) in ``initiate_auth``; USER_PASSWORD_AUTH and
  ``admin_initiate_auth`` accept a missing one. We send it anyway, as AWS requires. moto does
  not enforce ``ExplicitAuthFlows`` or ``AllowedOAuth*`` either; we set them as AWS needs them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3

from .harness import ManagedProcess, wait_for_http

RESOURCE_SERVER_ID = "transactions"
RESOURCE_SERVER_SCOPES = ("get", "post")

_DUMMY_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}


@dataclass(frozen=True)
class MotoPool:
    endpoint: str  # http://127.0.0.1:<port> of the moto server
    region: str
    user_pool_id: str
    client_id: str
    issuer: str  # the exact `iss` moto puts in its access tokens
    jwks_uri: str  # where moto serves this pool's JWKS over HTTP (on the moto server)
    scopes_in_token: tuple[str, ...]  # what moto's access tokens carry in `scope`
    client_secret: str | None = None
    username: str = "e2e-user"
    password: str = "E2e-Passw0rd!"


def _moto_command(host: str, port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def start_moto_server(port: int, *, host: str = "127.0.0.1", timeout: float = 60.0) -> ManagedProcess:
    """Start moto_server on host:port and return once it answers HTTP.

    Like every ``ManagedProcess`` it belongs to the running test or fixture, which stops it at the
    end; ``stop_moto_server`` stops it earlier and removes its log (a temporary directory).
    """
    proc = ManagedProcess(_moto_command(host, port), tempfile.mkdtemp(prefix="moto-server-"), "moto-server",
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.start()
    try:
        wait_for_http(f"http://{host}:{port}/moto-api/config", timeout, expect_status=range(200, 300), proc=proc)
    except BaseException:
        stop_moto_server(proc)
        raise
    return proc


def stop_moto_server(proc: ManagedProcess) -> None:
    proc.stop()
    shutil.rmtree(proc.log_dir, ignore_errors=True)


def cognito_client(endpoint: str, region: str = "us-east-1") -> Any:
    return boto3.client("cognito-idp", region_name=region, endpoint_url=endpoint, **_DUMMY_CREDENTIALS)


def secret_hash(username: str, client_id: str, client_secret: str) -> str:
    digest = hmac.new(client_secret.encode(), (username + client_id).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def unverified_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def provision_pool(
    endpoint: str,
    region: str = "us-east-1",
    *,
    pool_name: str = "authz-e2e",
    generate_secret: bool = True,
    username: str = "e2e-user",
    password: str = "E2e-Passw0rd!",
) -> MotoPool:
    """Pool + resource server `transactions` (get, post) + app client + a confirmed user.

    ``issuer`` and ``scopes_in_token`` are read back from a real token, not assumed.
    """
    idp = cognito_client(endpoint, region)
    pool_id = idp.create_user_pool(PoolName=pool_name)["UserPool"]["Id"]
    idp.create_resource_server(
        UserPoolId=pool_id,
        Identifier=RESOURCE_SERVER_ID,
        Name=RESOURCE_SERVER_ID,
        Scopes=[{"ScopeName": s, "ScopeDescription": f"{s} {RESOURCE_SERVER_ID}"} for s in RESOURCE_SERVER_SCOPES],
    )
    client = idp.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName=f"{pool_name}-client",
        GenerateSecret=generate_secret,
        ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH", "ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        AllowedOAuthFlows=["client_credentials"],
        AllowedOAuthScopes=[f"{RESOURCE_SERVER_ID}/{s}" for s in RESOURCE_SERVER_SCOPES],
        AllowedOAuthFlowsUserPoolClient=True,
        SupportedIdentityProviders=["COGNITO"],
    )["UserPoolClient"]
    idp.admin_create_user(UserPoolId=pool_id, Username=username, MessageAction="SUPPRESS")
    idp.admin_set_user_password(UserPoolId=pool_id, Username=username, Password=password, Permanent=True)

    draft = MotoPool(
        endpoint=endpoint,
        region=region,
        user_pool_id=pool_id,
        client_id=client["ClientId"],
        issuer="",
        jwks_uri=f"{endpoint}/{pool_id}/.well-known/jwks.json",
        scopes_in_token=(),
        client_secret=client.get("ClientSecret"),
        username=username,
        password=password,
    )
    claims = unverified_claims(issue_access_token(draft))
    return replace(draft, issuer=claims["iss"], scopes_in_token=tuple(claims.get("scope", "").split()))


def issue_access_token(pool: MotoPool, *, flow: str = "ADMIN_USER_PASSWORD_AUTH") -> str:
    """A fresh AccessToken from moto (``flow``: ADMIN_USER_PASSWORD_AUTH or USER_PASSWORD_AUTH)."""
    idp = cognito_client(pool.endpoint, pool.region)
    params = {"USERNAME": pool.username, "PASSWORD": pool.password}
    if pool.client_secret:
        params["SECRET_HASH"] = secret_hash(pool.username, pool.client_id, pool.client_secret)
    if flow == "ADMIN_USER_PASSWORD_AUTH":
        resp = idp.admin_initiate_auth(
            UserPoolId=pool.user_pool_id, ClientId=pool.client_id, AuthFlow=flow, AuthParameters=params
        )
    elif flow == "USER_PASSWORD_AUTH":
        resp = idp.initiate_auth(ClientId=pool.client_id, AuthFlow=flow, AuthParameters=params)
    else:
        raise ValueError(f"unsupported flow {flow!r}")
    if "AuthenticationResult" not in resp:
        raise RuntimeError(f"moto answered with a challenge instead of tokens: {resp.get('ChallengeName')}")
    return resp["AuthenticationResult"]["AccessToken"]
