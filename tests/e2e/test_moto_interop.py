"""Interoperability: access tokens from moto's Cognito (not written by us) verified through Envoy.

A user points the policy at an emulator with the `issuer` and `jwks_uri` overrides, exactly as
documented in the README.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import free_port, http_request
from .moto_cognito import MotoPool, issue_access_token, provision_pool, start_moto_server, stop_moto_server
from .stack import PolicyDir, Service, start_service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def moto_stack(tmp_path_factory: pytest.TempPathFactory, upstream, module_envoy_factory) -> Iterator[tuple[MotoPool, Service, object]]:
    work = tmp_path_factory.mktemp("moto")
    port = free_port()
    server = start_moto_server(port)
    try:
        pool = provision_pool(f"http://127.0.0.1:{port}")
        policy = PolicyDir(work / "config")
        policy.write(f"""
issuers:
  - user_pool_id: {pool.user_pool_id}
    issuer: {pool.issuer}
    jwks_uri: {pool.jwks_uri}
    client_ids: [{pool.client_id}]
routes:
  - name: profile
    methods: [GET]
    path: /profile
    scopes: [aws.cognito.signin.user.admin]
  - name: create-transaction
    methods: [POST]
    path: /transactions
    scopes: [transactions/post]
""")
        service = start_service(work, policy.path)
        envoy = module_envoy_factory(service.grpc_port)
        yield pool, service, envoy
        service.process.stop()
    finally:
        stop_moto_server(server)


def test_moto_access_token_allowed_through_envoy(moto_stack, upstream) -> None:
    pool, service, envoy = moto_stack
    token = issue_access_token(pool)
    mark = upstream.mark()
    status, _, body = http_request("GET", envoy.url("/profile"), [("Authorization", f"Bearer {token}")])
    assert status == 200, body
    [seen] = upstream.requests_since(mark)
    assert seen["headers"]["x-auth-client-id"] == [pool.client_id]
    assert seen["headers"]["x-auth-scopes"] == ["aws.cognito.signin.user.admin"]


def test_moto_token_without_required_scope_is_403(moto_stack, upstream) -> None:
    pool, service, envoy = moto_stack
    token = issue_access_token(pool, flow="USER_PASSWORD_AUTH")
    mark = upstream.mark()
    status, headers, _ = http_request("POST", envoy.url("/transactions"), [("Authorization", f"Bearer {token}")])
    assert status == 403
    assert 'error="insufficient_scope"' in dict((k.lower(), v) for k, v in headers)["www-authenticate"]
    assert upstream.requests_since(mark) == []


def test_moto_id_token_is_refused(moto_stack, upstream) -> None:
    pool, service, envoy = moto_stack
    import boto3

    client = boto3.client("cognito-idp", region_name=pool.region, endpoint_url=pool.endpoint,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    from .moto_cognito import secret_hash

    params = {"USERNAME": pool.username, "PASSWORD": pool.password}
    if pool.client_secret:
        params["SECRET_HASH"] = secret_hash(pool.username, pool.client_id, pool.client_secret)
    result = client.admin_initiate_auth(UserPoolId=pool.user_pool_id, ClientId=pool.client_id,
                                        AuthFlow="ADMIN_USER_PASSWORD_AUTH", AuthParameters=params)
    id_token = result["AuthenticationResult"]["IdToken"]
    status, _, body = http_request("GET", envoy.url("/profile"), [("Authorization", f"Bearer {id_token}")])
    assert status == 401
    assert b"not an access token" in body
