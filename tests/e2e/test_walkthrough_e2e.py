"""The real-Cognito walkthrough (docs/walkthrough-cognito.md), run as written, so the page cannot rot.

The page's shell blocks marked ``<!-- walkthrough:test STAGE -->`` run in bash, stage by stage, each
stage seeing the shell variables the earlier ones set (pool id, client ids and secrets, tokens):

* ``provision`` and ``cleanup``: the ``aws cognito-idp ...`` commands, verbatim, with the real AWS
  CLI against moto's Cognito (``AWS_ENDPOINT_URL``); what they created is read back with boto3.
* ``token``: moto implements the user-pool API and the JWKS but no ``/oauth2/token`` (see
  ``test_moto_has_no_token_endpoint``), so no client_credentials token can come from it. The page's
  curl command runs instead against the dev issuer, the project's implementation of Cognito's token
  endpoint, loaded with the app clients, secrets and scopes read back from moto and issuing
  ``iss`` = Cognito's issuer URL for moto's pool. The one change to the page's text is the token
  endpoint's host.
* ``decode`` and ``policy``: verbatim; the policy names moto's pool id and client ids and must pass
  ``authz-service validate --strict``.
* ``request``: verbatim but for Envoy's port, through the shipped Envoy and our service; the policy
  is the page's plus a ``jwks_uri`` pointing at the dev issuer's keys. The output must be the page's.

And the page's policy against moto's own keys and tokens (as test_moto_interop does): an access
token moto issues for the reader's app client, checked by ``authz-service explain`` with the policy
pointed at moto's JWKS, passes every check but the scope (moto's tokens carry only
``aws.cognito.signin.user.admin``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from .harness import REPO_ROOT, free_port, http_request
from .moto_cognito import MotoPool, cognito_client, issue_access_token, start_moto_server, stop_moto_server
from .stack import PolicyDir, cli, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

PAGE = REPO_ROOT / "docs" / "walkthrough-cognito.md"
BLOCK = re.compile(r"<!-- walkthrough:(test|expect) ([a-z]+) -->\n```[a-z]*\n(.*?)^```", re.S | re.M)
# The literal text the test swaps for its local stand-ins (each must be on the page).
TOKEN_ENDPOINT_HOST = "https://$DOMAIN.auth.$REGION.amazoncognito.com"
ENVOY_URL = "http://127.0.0.1:8080"


def page_blocks(kind: str, stage: str) -> str:
    """The page's blocks of one kind ("test" or "expect") and stage, in order, joined."""
    blocks = [code for k, s, code in BLOCK.findall(PAGE.read_text(encoding="utf-8")) if (k, s) == (kind, stage)]
    assert blocks, f"{PAGE.name} has no block marked <!-- walkthrough:{kind} {stage} -->"
    return "\n".join(blocks)


def run_stage(stage: str, env: Mapping[str, str], cwd: Path,
              replace: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """Run the page's ``stage`` blocks in bash (errexit, every variable exported) with ``env``; return
    the environment they leave (the next stage's input) and what they printed."""
    script = page_blocks("test", stage)
    for literal, local in (replace or {}).items():
        assert literal in script, f"the page's {stage} commands no longer contain {literal!r}"
        script = script.replace(literal, local)
    state = cwd / f".walkthrough-{stage}.env"
    result = subprocess.run(
        ["bash", "-c", f'set -euo pipefail\nset -a\n{script}\nenv -0 > "$WALKTHROUGH_STATE"\n'],
        cwd=cwd, env={**env, "WALKTHROUGH_STATE": str(state)}, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{stage} commands failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    left = dict(item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
    left.pop("WALKTHROUGH_STATE", None)
    return left, result.stdout


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = free_port()
    server = start_moto_server(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_moto_server(server)


@pytest.fixture(scope="module")
def provisioned(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The shell environment after the page's provisioning commands ran against moto; the page's
    clean-up commands run at the end and must delete the pool."""
    home = tmp_path_factory.mktemp("walkthrough-home")
    base = {
        # The venv's aws, authz-service and python3 first; nothing from the machine's AWS config.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    }
    env, _ = run_stage("provision", base, home)
    for name in ("REGION", "DOMAIN", "POOL_ID", "WRITER_ID", "WRITER_SECRET", "READER_ID", "READER_SECRET"):
        assert env.get(name), f"the provisioning commands left {name} empty"
    yield env
    run_stage("cleanup", env, home)
    idp = cognito_client(moto_endpoint, env["REGION"])
    with pytest.raises(idp.exceptions.ResourceNotFoundException):
        idp.describe_user_pool(UserPoolId=env["POOL_ID"])


def test_moto_has_no_token_endpoint(moto_endpoint: str) -> None:
    """Why the token step runs against the dev issuer. When this fails, moto has gained Cognito's
    token endpoint: take the walkthrough's tokens from moto instead."""
    status, _, body = http_request(
        "POST", f"{moto_endpoint}/oauth2/token", [("Content-Type", "application/x-www-form-urlencoded")],
        "grant_type=client_credentials",
    )
    assert status != 200 or b"access_token" not in body, body


def test_provisioning_creates_what_the_page_describes(provisioned: dict[str, str], moto_endpoint: str) -> None:
    env = provisioned
    idp = cognito_client(moto_endpoint, env["REGION"])
    domain = idp.describe_user_pool_domain(Domain=env["DOMAIN"])["DomainDescription"]
    assert domain["UserPoolId"] == env["POOL_ID"]
    server = idp.describe_resource_server(UserPoolId=env["POOL_ID"], Identifier="payments")["ResourceServer"]
    assert [s["ScopeName"] for s in server["Scopes"]] == ["transactions.read", "transactions.write"]
    for who, scope in (("WRITER", "payments/transactions.write"), ("READER", "payments/transactions.read")):
        client = idp.describe_user_pool_client(UserPoolId=env["POOL_ID"], ClientId=env[f"{who}_ID"])["UserPoolClient"]
        assert client["ClientSecret"] == env[f"{who}_SECRET"]
        assert client["AllowedOAuthFlows"] == ["client_credentials"]
        assert client["AllowedOAuthFlowsUserPoolClient"] is True
        assert client["AllowedOAuthScopes"] == [scope]


def test_page_tokens_policy_and_requests_through_envoy(
    provisioned: dict[str, str], moto_endpoint: str, upstream, envoy_factory, tmp_path: Path
) -> None:
    env = provisioned
    pool, region = env["POOL_ID"], env["REGION"]
    idp = cognito_client(moto_endpoint, region)
    server = idp.describe_resource_server(UserPoolId=pool, Identifier="payments")["ResourceServer"]
    clients = [idp.describe_user_pool_client(UserPoolId=pool, ClientId=env[name])["UserPoolClient"]
               for name in ("WRITER_ID", "READER_ID")]
    issuer = start_dev_issuer(
        tmp_path, pool, public_url=f"https://cognito-idp.{region}.amazonaws.com",
        config={
            "resource_servers": [{"identifier": server["Identifier"],
                                  "scopes": [s["ScopeName"] for s in server["Scopes"]]}],
            "clients": [{"client_id": c["ClientId"], "client_secret": c["ClientSecret"],
                         "allowed_scopes": c["AllowedOAuthScopes"], "grant_types": c["AllowedOAuthFlows"]}
                        for c in clients],
        },
    )
    try:
        env, _ = run_stage("token", env, tmp_path, replace={TOKEN_ENDPOINT_HOST: issuer.base})

        _, printed = run_stage("decode", env, tmp_path)
        claims = json.loads(printed)
        assert {name: claims[name] for name in ("iss", "token_use", "scope", "client_id")} == {
            "iss": f"https://cognito-idp.{region}.amazonaws.com/{pool}",
            "token_use": "access",
            "scope": "payments/transactions.read",
            "client_id": env["READER_ID"],
        }
        assert claims["exp"] > time.time()

        env, printed = run_stage("policy", env, tmp_path)
        assert printed.strip() == "policy.yaml: OK: 3 routes, 1 issuer, 0 warnings"
        policy = yaml.safe_load((tmp_path / "policy.yaml").read_text())
        assert policy["issuers"] == [{"user_pool_id": pool, "client_ids": [env["WRITER_ID"], env["READER_ID"]]}]
        policy["issuers"][0]["jwks_uri"] = issuer.jwks_uri  # the keys of the stand-in token endpoint
        served = PolicyDir(tmp_path / "config")
        served.write(yaml.safe_dump(policy, sort_keys=False))
        validated = subprocess.run(cli("validate", "--strict", str(served.path)), capture_output=True, text=True)
        assert validated.returncode == 0, validated.stdout + validated.stderr

        service = start_service(tmp_path, served.path)
        try:
            envoy = envoy_factory(service.grpc_port)
            mark = upstream.mark()
            _, printed = run_stage("request", env, tmp_path, replace={ENVOY_URL: envoy.url("").rstrip("/")})
            assert printed.split() == page_blocks("expect", "request").split()
            reached = [(r["method"], r["path"], r["headers"].get("x-auth-client-id"))
                       for r in upstream.requests_since(mark)]
            assert reached == [("GET", "/transactions/7", [env["READER_ID"]]),
                               ("POST", "/transactions", [env["WRITER_ID"]])]
        finally:
            service.process.stop()
    finally:
        issuer.process.stop()


def test_page_policy_accepts_moto_access_tokens_of_the_pool(
    provisioned: dict[str, str], moto_endpoint: str, tmp_path: Path
) -> None:
    env = provisioned
    pool, region = env["POOL_ID"], env["REGION"]
    idp = cognito_client(moto_endpoint, region)
    moto_pool = MotoPool(endpoint=moto_endpoint, region=region, user_pool_id=pool, client_id=env["READER_ID"],
                         client_secret=env["READER_SECRET"], issuer="", jwks_uri="", scopes_in_token=())
    idp.admin_create_user(UserPoolId=pool, Username=moto_pool.username, MessageAction="SUPPRESS")
    idp.admin_set_user_password(UserPoolId=pool, Username=moto_pool.username, Password=moto_pool.password,
                                Permanent=True)
    token = issue_access_token(moto_pool)

    run_stage("policy", env, tmp_path)
    policy = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    policy["issuers"][0]["jwks_uri"] = f"{moto_endpoint}/{pool}/.well-known/jwks.json"
    (tmp_path / "policy-moto.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    explained = subprocess.run(
        cli("explain", "--policy", str(tmp_path / "policy-moto.yaml"), "--method", "GET",
            "--path", "/transactions/7", "--token-file", "-"),
        input=token, capture_output=True, text=True, timeout=60,
    )
    assert explained.returncode == 1, explained.stdout + explained.stderr
    outcome = {name: verdict for verdict, name in re.findall(r"^\s*(passed|FAILED)\s+(\w+)", explained.stdout, re.M)}
    assert {name: outcome.get(name) for name in ("issuer", "key", "signature", "token_use", "client", "scopes")} == {
        "issuer": "passed", "key": "passed", "signature": "passed", "token_use": "passed", "client": "passed",
        "scopes": "FAILED",
    }, explained.stdout
    assert "reason insufficient_scope" in explained.stdout
