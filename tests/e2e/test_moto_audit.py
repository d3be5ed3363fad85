"""`authz-service audit` against moto's Cognito (which we did not write), through the real CLI and
boto3 over HTTP: a pool provisioned the way the AWS CLI does it, with a resource server, scopes and
app clients with and without the client_credentials flow, and one whose only flow is
ALLOW_CLIENT_TOKEN_AUTH (Cognito's GetClientToken API).

What moto (5.2) supports of the audit's calls: DescribeUserPool, ListResourceServers,
ListUserPoolClients and DescribeUserPoolClient, including ExplicitAuthFlows, which it stores and
returns as given (it does not act on them, nor implement GetClientToken). It does not implement
ListUserPoolClientSecrets (it answers HTTP 500), so here the audit falls back to
DescribeUserPoolClient's ClientSecret with a warning; that call's real answers (secrets listed,
AccessDeniedException) are tested on recorded AWS responses in tests/test_audit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import free_port
from .moto_cognito import cognito_client, start_moto_server, stop_moto_server

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Provisioned:
    endpoint: str
    pool_id: str
    clients: dict[str, str]  # name -> client id


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    port = free_port()
    server = start_moto_server(port)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        idp = cognito_client(endpoint)
        # As `aws cognito-idp create-user-pool --issuer-configuration Type=UPDATED --lambda-config ...` would.
        pool_id = idp.create_user_pool(
            PoolName="audit", IssuerConfiguration={"Type": "UPDATED"},
            LambdaConfig={"PreTokenGenerationConfig": {
                "LambdaVersion": "V3_0", "LambdaArn": "arn:aws:lambda:us-east-1:123456789012:function:claims"}},
        )["UserPool"]["Id"]
        idp.create_user_pool_domain(UserPoolId=pool_id, Domain="audit-e2e")  # the token endpoint's host
        idp.create_resource_server(UserPoolId=pool_id, Identifier="transactions", Name="transactions",
                                   Scopes=[{"ScopeName": s, "ScopeDescription": s} for s in ("get", "post")])
        m2m = dict(GenerateSecret=True, AllowedOAuthFlows=["client_credentials"], AllowedOAuthFlowsUserPoolClient=True)
        clients = {
            "writer": idp.create_user_pool_client(UserPoolId=pool_id, ClientName="writer",
                                                  AllowedOAuthScopes=["transactions/post"], **m2m),
            "reader": idp.create_user_pool_client(UserPoolId=pool_id, ClientName="reader",
                                                  AllowedOAuthScopes=["transactions/get"], **m2m),
            # As `aws cognito-idp create-user-pool-client --generate-secret --explicit-auth-flows
            # ALLOW_CLIENT_TOKEN_AUTH --allowed-o-auth-scopes transactions/get`: tokens from GetClientToken.
            "ledger": idp.create_user_pool_client(UserPoolId=pool_id, ClientName="ledger", GenerateSecret=True,
                                                  ExplicitAuthFlows=["ALLOW_CLIENT_TOKEN_AUTH"],
                                                  AllowedOAuthScopes=["transactions/get"]),
            "web": idp.create_user_pool_client(UserPoolId=pool_id, ClientName="web", GenerateSecret=False,
                                               AllowedOAuthFlows=["code"], AllowedOAuthScopes=["openid"],
                                               AllowedOAuthFlowsUserPoolClient=True, CallbackURLs=["https://x.test/cb"]),
        }
        yield Provisioned(endpoint, pool_id, {name: c["UserPoolClient"]["ClientId"] for name, c in clients.items()})
    finally:
        stop_moto_server(server)


def run_audit(moto: Provisioned, policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER": moto.endpoint}
    env.pop("AWS_PROFILE", None)
    env["AWS_MAX_ATTEMPTS"] = "1"  # moto answers ListUserPoolClientSecrets with a 500: no retries with back-off
    return subprocess.run([sys.executable, "-m", "authz_service.cli", "audit", "--policy", str(policy), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def write_policy(tmp_path: Path, moto: Provisioned, routes: str, issuer_extra: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(f"issuers:\n  - user_pool_id: {moto.pool_id}\n    issuer_format: updated\n{issuer_extra}"
                    f"routes:\n{routes}")
    return path


def test_matrix_and_findings_from_the_pool(tmp_path, moto):
    writer, reader, web, ledger = (moto.clients[n] for n in ("writer", "reader", "web", "ledger"))
    policy = write_policy(tmp_path, moto, f"""\
  - {{name: create, methods: [POST], path: /transactions, scopes: [transactions/post]}}
  - {{name: read, methods: [GET], path: '/transactions/{{id}}', scopes: [transactions/get], client_ids: [{reader}, {web}]}}
  - {{name: tenant, methods: [GET], path: /tenants/acme, scopes: [transactions/get], claims: {{tenant: acme}}}}
  - {{name: delete, methods: [DELETE], path: '/transactions/{{id}}', scopes: [transactions/delete]}}
  - {{name: healthz, methods: [GET], path: /healthz, public: true}}
""", issuer_extra=f"    client_ids: [{writer}, {reader}, nobody-here]\n")
    run = run_audit(moto, policy, "--format", "json")
    assert run.returncode == 1, run.stdout + run.stderr
    data = json.loads(run.stdout)
    (pool,) = data["pools"]
    assert pool["user_pool_id"] == moto.pool_id and pool["issuer_type"] == "UPDATED"
    assert pool["pre_token_generation"] == "V3_0"
    assert pool["resource_server_scopes"] == ["transactions/get", "transactions/post"]
    access = {row["client_id"]: {r: c["access"] + (f" ({c['why']})" if "why" in c else "")
                                 for r, c in row["routes"].items()} for row in data["matrix"]}
    assert access[writer] == {"create": "yes", "read": "no (route client_ids)", "tenant": "no (scope)",
                              "delete": "no (scope)", "healthz": "public"}
    assert access[reader] == {"create": "no (scope)", "read": "yes", "tenant": "depends_on_claims",
                              "delete": "no (scope)", "healthz": "public"}
    assert set(access[web].values()) == {"no (no client_credentials)", "public"}
    assert access[ledger] == {**{r: "no (issuer client_ids)" for r in ("create", "read", "tenant", "delete")},
                              "healthz": "public"}
    assert [(f["code"], f["message"]) for f in data["findings"]] == [
        ("undefined-scope", "routes[3] 'delete' requires scope 'transactions/delete', which no resource server of "
                            "the audited pools defines"),
        ("unknown-client", f"issuers[0].client_ids: nobody-here is not an app client of {moto.pool_id}"),
        ("no-client-credentials", f"routes[1] 'read' client_ids: app client {web} cannot get client_credentials "
                                  "tokens: AllowedOAuthFlows lacks client_credentials and ExplicitAuthFlows lacks "
                                  "ALLOW_CLIENT_TOKEN_AUTH"),
        ("client-influenced-claim", f"routes[2] 'tenant' reads the claim 'tenant', which the V3_0 pre token "
                                    f"generation trigger of {moto.pool_id} sets, and that trigger receives the client "
                                    "metadata a client sends (1 app client can reach the route): the trigger must "
                                    "derive the claim from the client id, never from the client metadata"),
        ("client-secrets-unverified", f"{moto.pool_id}: ListUserPoolClientSecrets failed: 500: the endpoint does not "
                                      "offer it; whether an app client has a secret was read from "
                                      "DescribeUserPoolClient's ClientSecret instead"),
        ("unreachable-route", "routes[3] 'delete' (/transactions/{id}): no app client of the audited pools can reach it"),
        ("public-only-client", f"app client {ledger} (ledger) of {moto.pool_id} reaches only public routes "
                               "(healthz); its scopes [transactions/get] meet no protected route"),
    ]
    text = run_audit(moto, policy)
    assert text.returncode == 1
    assert f"pool {moto.pool_id} (us-east-1): 4 app clients, 2 resource server scopes, issuer updated, " \
           "pre token generation V3_0" in text.stdout
    assert "depends on claims" in text.stdout and text.stdout.rstrip().endswith(f"against {moto.pool_id})")


def test_a_policy_that_matches_the_pool_is_clean(tmp_path, moto):
    policy = write_policy(tmp_path, moto, """\
  - {name: create, methods: [POST], path: /transactions, scopes: [transactions/post]}
  - {name: read, methods: [GET], path: '/transactions/{id}', scopes: [transactions/get]}
""")
    run = run_audit(moto, policy, "--user-pool-id", moto.pool_id, "--region", "us-east-1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith(f"0 findings, 1 warning ({policy} against {moto.pool_id})")


def test_issuer_format_that_differs_from_the_pool_is_reported(tmp_path, moto):
    policy = tmp_path / "original.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: {moto.pool_id}\nroutes:\n"
                      "  - {name: read, path: /a, scopes: [transactions/get]}\n")
    run = run_audit(moto, policy)
    assert run.returncode == 1
    assert "issuer-format: issuers[0]" in run.stdout and "set issuer_format: updated" in run.stdout


def test_a_pool_aws_does_not_know_is_exit_2(tmp_path, moto):
    policy = tmp_path / "missing.yaml"
    policy.write_text("issuers:\n  - user_pool_id: us-east-1_Missing01\nroutes:\n  - {path: /a, scopes: [a/b]}\n")
    run = run_audit(moto, policy)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("authz-service audit: error: DescribeUserPool us-east-1_Missing01: "
                                 "ResourceNotFoundException"), run.stderr


def test_the_audit_reads_client_secrets_but_never_shows_them(tmp_path, moto):
    """DescribeUserPoolClient hands the audit every client secret (why its IAM policy must name the
    pools, docs/cognito.md); neither output format, nor stderr, carries one."""
    idp = cognito_client(moto.endpoint)
    secrets = [idp.describe_user_pool_client(UserPoolId=moto.pool_id, ClientId=moto.clients[name])
               ["UserPoolClient"]["ClientSecret"] for name in ("writer", "reader")]
    policy = write_policy(tmp_path, moto, "  - {name: create, methods: [POST], path: /transactions, "
                                          "scopes: [transactions/post]}\n")
    for args in ((), ("--format", "json")):
        run = run_audit(moto, policy, *args)
        assert run.returncode in (0, 1) and moto.clients["writer"] in run.stdout, run.stderr
        assert not any(secret in run.stdout + run.stderr for secret in secrets)


def test_a_client_of_the_get_client_token_api_is_machine_to_machine(tmp_path, moto):
    """A client whose only flow is ALLOW_CLIENT_TOKEN_AUTH (no OAuth flow, no domain needed) gets
    client_credentials tokens from GetClientToken: the audit counts it in. moto lacks
    ListUserPoolClientSecrets: a warning, which fails the audit only with --strict."""
    ledger = moto.clients["ledger"]
    policy = write_policy(tmp_path, moto, """\
  - {name: create, methods: [POST], path: /transactions, scopes: [transactions/post]}
  - {name: read, methods: [GET], path: '/transactions/{id}', scopes: [transactions/get], client_ids: [LEDGER, READER]}
""".replace("LEDGER", ledger).replace("READER", moto.clients["reader"]))
    run = run_audit(moto, policy, "--format", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(run.stdout)
    client = next(c for c in data["pools"][0]["clients"] if c["client_id"] == ledger)
    assert client["explicit_auth_flows"] == ["ALLOW_CLIENT_TOKEN_AUTH"] and client["allowed_oauth_flows"] == []
    assert (client["client_credentials"], client["token_paths"], client["why_not"]) == (True, ["GetClientToken"], None)
    row = next(r for r in data["matrix"] if r["client_id"] == ledger)
    assert row["routes"]["read"] == {"access": "yes"}
    assert [(f["code"], f["severity"]) for f in data["findings"]] == [("client-secrets-unverified", "warning")]
    assert data["pools"][0]["client_secrets_from"] == "DescribeUserPoolClient"
    strict = run_audit(moto, policy, "--strict")
    assert strict.returncode == 1 and "client-secrets-unverified (warning): " in strict.stdout
    assert strict.stdout.rstrip().endswith(f"0 findings, 1 warning ({policy} against {moto.pool_id})")


def test_without_a_domain_only_get_client_token_clients_get_tokens(tmp_path, moto):
    """A pool without a domain has no token endpoint: an OAuth client_credentials client cannot get
    tokens there (it is named, with why), a client of the GetClientToken API can."""
    idp = cognito_client(moto.endpoint)
    pool_id = idp.create_user_pool(PoolName="no-domain", IssuerConfiguration={"Type": "UPDATED"})["UserPool"]["Id"]
    idp.create_resource_server(UserPoolId=pool_id, Identifier="transactions", Name="transactions",
                               Scopes=[{"ScopeName": "get", "ScopeDescription": "get"}])
    oauth, api = (idp.create_user_pool_client(UserPoolId=pool_id, ClientName=name, GenerateSecret=True,
                                              AllowedOAuthScopes=["transactions/get"], **settings)
                  ["UserPoolClient"]["ClientId"]
                  for name, settings in (("oauth", {"AllowedOAuthFlows": ["client_credentials"],
                                                    "AllowedOAuthFlowsUserPoolClient": True}),
                                         ("api", {"ExplicitAuthFlows": ["ALLOW_CLIENT_TOKEN_AUTH"]})))
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: {pool_id}\n    issuer_format: updated\n"
                      f"    client_ids: [{oauth}, {api}]\nroutes:\n"
                      "  - {name: read, methods: [GET], path: /a, scopes: [transactions/get]}\n")
    run = run_audit(moto, policy, "--format", "json")
    assert run.returncode == 1, run.stdout + run.stderr
    data = json.loads(run.stdout)
    assert data["pools"][0]["domain"] is False
    (row_oauth,) = [r for r in data["matrix"] if r["client_id"] == oauth]
    (row_api,) = [r for r in data["matrix"] if r["client_id"] == api]
    assert row_oauth["routes"]["read"] == {"access": "no", "why": "no client_credentials"}
    assert row_api["routes"]["read"] == {"access": "yes"}
    assert [f["message"] for f in data["findings"] if f["severity"] == "error"] == [
        f"issuers[0].client_ids: app client {oauth} cannot get client_credentials tokens: the pool has no domain, "
        "so no token endpoint, and ExplicitAuthFlows lacks ALLOW_CLIENT_TOKEN_AUTH"]
    text = run_audit(moto, policy)
    assert ", no domain (no token endpoint: GetClientToken only)" in text.stdout.splitlines()[0]
