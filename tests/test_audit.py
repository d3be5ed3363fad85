"""`authz-service audit` logic on plain data, and its AWS calls on recorded AWS responses.

The AWS side is tested against moto in tests/e2e/test_moto_audit.py where moto implements the
calls. moto (5.2) does not implement ListUserPoolClientSecrets, so that call is tested here, on a
real boto3 client whose responses are replayed from tests/data/cognito/ (recorded response
bodies, shaped as the AWS API reference shows them) by botocore's Stubber, which checks each
request's parameters and each response against the service model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from authz_service import __version__
from authz_service.tools.audit import AppClient, Pool, as_json, audit, render_text
from authz_service.policy import parse_policy

from .test_cli import cli

POOL_ID = "us-east-1_Audit0001"
POLICY = parse_policy(textwrap.dedent(f"""\
    issuers:
      - user_pool_id: {POOL_ID}
        issuer_format: updated
        client_ids: [writer, reader, reporting, user-app, ghost, nosecret]
    routes:
      - name: create
        methods: [POST]
        path: /transactions
        scopes: [transactions/post]
      - name: read
        methods: [GET]
        path: /transactions/{{id}}
        scopes: [transactions/get]
      - name: export
        methods: [POST]
        path: /export
        all_scopes: [transactions/get, reports/export]
      - name: tenant
        methods: [GET]
        path: /tenants/acme
        scopes: [transactions/get]
        claims: {{"custom:tenant": acme}}
      - name: ops
        path: /ops/**
        scopes: [transactions/get]
        client_ids: [reporting, ops-ghost]
      - name: healthz
        methods: [GET]
        path: /healthz
        public: true
    """), "audit.yaml")


def client(client_id: str, *scopes: str, flows=("client_credentials",), oauth=True, secret=True,
           auth_flows=()) -> AppClient:
    return AppClient(client_id, f"{client_id} app", tuple(flows), oauth, scopes, secret, tuple(auth_flows))


def pool(**overrides) -> Pool:
    base = dict(user_pool_id=POOL_ID, region="us-east-1",
                defined_scopes=frozenset({"transactions/get", "transactions/post"}),
                clients=(client("writer", "transactions/post"), client("reader", "transactions/get"),
                         client("reporting", "transactions/get", "transactions/post"),
                         client("user-app", "transactions/get", flows=("code",)),
                         client("nosecret", "transactions/get", secret=False),
                         client("badge", "badge/read")),
                issuer_type="UPDATED", pre_token_version="V3_0")
    return Pool(**{**base, **overrides})


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def test_matrix_says_who_can_reach_what():
    report = audit(POLICY, [pool()])
    cells = {client_id: {route: cell.text for route, cell in row.items()}
             for (_, client_id), row in report.matrix.items()}
    assert cells["writer"] == {"create": "yes", "read": "no (scope)", "export": "no (all_scopes)",
                               "tenant": "no (scope)", "ops": "no (route client_ids)", "healthz": "public"}
    assert cells["reporting"] == {"create": "yes", "read": "yes", "export": "no (all_scopes)",
                                  "tenant": "depends on claims", "ops": "yes", "healthz": "public"}
    assert cells["user-app"]["read"] == "no (no client_credentials)"
    assert cells["nosecret"]["read"] == "no (no client_credentials)"
    assert cells["badge"]["read"] == "no (issuer client_ids)"


def test_findings_name_every_problem():
    report = audit(POLICY, [pool()])
    messages = [f"{f.code}: {f.message}" for f in report.findings]
    assert codes(report) == ["undefined-scope", "unknown-client", "no-client-credentials", "no-client-credentials",
                             "unknown-client", "client-influenced-claim", "unreachable-route", "public-only-client"]
    assert "undefined-scope: routes[2] 'export' requires scope 'reports/export', which no resource server" in messages[0]
    assert messages[1] == f"unknown-client: issuers[0].client_ids: ghost is not an app client of {POOL_ID}"
    assert messages[2] == ("no-client-credentials: issuers[0].client_ids: app client nosecret cannot get "
                           "client_credentials tokens: it has no client secret")
    assert messages[3].endswith("user-app cannot get client_credentials tokens: AllowedOAuthFlows lacks "
                                "client_credentials and ExplicitAuthFlows lacks ALLOW_CLIENT_TOKEN_AUTH")
    assert messages[4] == f"unknown-client: routes[4] 'ops' client_ids: ops-ghost is not an app client of {POOL_ID}"
    assert messages[6] == "unreachable-route: routes[2] 'export' (/export): no app client of the audited pools can reach it"
    assert messages[7] == (f"public-only-client: app client badge (badge app) of {POOL_ID} reaches only public routes "
                           "(healthz); its scopes [badge/read] meet no protected route")
    assert report.exit_code == 1


def test_claims_need_a_v3_trigger_for_client_credentials_tokens():
    for version, trigger in ((None, "no trigger"), ("V2_0", "a V2_0 trigger")):
        report = audit(POLICY, [pool(pre_token_version=version)])
        (finding,) = [f for f in report.findings if f.code == "claims-without-trigger"]
        assert finding.message.startswith(f"{POOL_ID} has {trigger}: only a V3_0 pre token generation trigger")
        assert report.matrix[(POOL_ID, "reporting")]["tenant"].text.startswith("no (no V3_0 pre token generation")


@pytest.mark.parametrize(("policy_format", "pool_type", "fix"), [("updated", "ORIGINAL", "original"),
                                                                ("original", "UPDATED", "updated")])
def test_issuer_format_mismatch_is_a_finding(policy_format, pool_type, fix):
    policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL_ID}\n    issuer_format: {policy_format}\n"
                          "routes:\n  - {name: a, path: /a, scopes: [transactions/get]}\n")
    clients = (client("reader", "transactions/get"),)
    report = audit(policy, [pool(issuer_type=pool_type, clients=clients)])
    assert codes(report) == ["issuer-format", "unreachable-route", "public-only-client"]
    assert "wrong_issuer" in report.findings[0].message
    assert report.findings[0].message.endswith(f"set issuer_format: {fix}")
    assert report.matrix[(POOL_ID, "reader")]["a"].text == "no (issuer format)"
    assert audit(policy, [pool(issuer_type=None, clients=clients)]).findings == []  # not reported: nothing to compare


def test_a_clean_policy_has_no_findings_and_exit_0():
    policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL_ID}\n    issuer_format: updated\n"
                          "routes:\n  - {name: read, path: /a, scopes: [transactions/get]}\n")
    clients = (client("reader", "transactions/get"),)
    report = audit(policy, [pool(clients=clients)])
    assert report.findings == [] and report.exit_code == 0
    out = io.StringIO()
    render_text(report, out)
    assert out.getvalue().splitlines()[-1] == f"0 findings (<policy> against {POOL_ID})"


def test_text_and_json_output():
    report = audit(POLICY, [pool()])
    out = io.StringIO()
    render_text(report, out)
    text = out.getvalue()
    assert text.splitlines()[0] == (f"pool {POOL_ID} (us-east-1): 6 app clients, 2 resource server scopes, "
                                    "issuer updated, pre token generation V3_0")
    header = next(line for line in text.splitlines() if "app client \\ route" in line)
    assert header.split() == ["app", "client", "\\", "route", "create", "read", "export", "tenant", "ops", "healthz"]
    assert "depends on claims" in text and text.rstrip().endswith(f"7 findings, 1 warning (audit.yaml against {POOL_ID})")
    assert "\nclient-influenced-claim (warning): routes[3] 'tenant' reads" in text
    data = json.loads(json.dumps(as_json(report)))
    row = next(r for r in data["matrix"] if r["client_id"] == "reporting")
    assert row["routes"]["tenant"] == {"access": "depends_on_claims"}
    assert row["routes"]["export"] == {"access": "no", "why": "all_scopes"}
    assert data["exit_code"] == 1 and len(data["findings"]) == 8
    assert [f["severity"] for f in data["findings"]].count("warning") == 1
    assert data["pools"][0]["clients"][3]["why_not"] == ("AllowedOAuthFlows lacks client_credentials and "
                                                         "ExplicitAuthFlows lacks ALLOW_CLIENT_TOKEN_AUTH")
    assert data["pools"][0]["clients"][0]["token_paths"] == ["token_endpoint"]


def test_missing_boto3_is_one_line_with_the_install_hint(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: {POOL_ID}\nroutes:\n  - {{path: /a, scopes: [a/b]}}\n")
    code = ("import sys; sys.modules['boto3'] = None; from authz_service.cli import main; "
            f"sys.exit(main(['audit', '--policy', {str(policy)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == ("authz-service audit: error: boto3 is not installed; install the audit extra: "
                          "pip install '.[audit]' in a clone of the repository, or "
                          f"pip install 'authz_service-{__version__}-py3-none-any.whl[audit]' from a built wheel\n")


def test_a_pool_the_policy_does_not_trust_is_unusable_input(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: {POOL_ID}\nroutes:\n  - {{path: /a, scopes: [a/b]}}\n")
    run = cli("audit", "--policy", str(policy), "--user-pool-id", "us-east-1_Other")
    assert run.returncode == 2
    assert f"us-east-1_Other is not a user pool of {policy} (its pools: {POOL_ID})" in run.stderr


def test_the_documented_iam_policy_grants_exactly_the_calls_the_audit_makes():
    """docs/cognito.md's IAM policy: the audit's own calls (recorded on a stand-in client), on
    the policy's pool ARNs, never a wildcard over every pool (DescribeUserPoolClient returns
    client secrets)."""
    import re
    from pathlib import Path

    from authz_service.tools.audit import read_pool

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def __getattr__(self, name: str):
            def call(**params):
                self.calls.append(name)
                if name == "describe_user_pool":
                    return {"UserPool": {}}
                if name == "list_user_pool_clients":
                    return {"UserPoolClients": [{"ClientId": "c1"}]}
                if name == "describe_user_pool_client":
                    return {"UserPoolClient": {"ClientId": "c1", "ClientSecret": "s3cret",
                                               "ExplicitAuthFlows": ["ALLOW_CLIENT_TOKEN_AUTH"]}}
                if name == "list_user_pool_client_secrets":
                    return {"ClientSecrets": [{"ClientSecretId": "c1--1764115200"}]}
                return {}
            return call

    recorder = Recorder()
    read_pool(recorder, POOL_ID, "us-east-1")
    made = {"cognito-idp:" + "".join(part.title() for part in name.split("_")) for name in recorder.calls}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cognito.md").read_text()
    [block] = [b for b in re.findall(r"```json\n(.*?)```", doc, re.S) if "cognito-idp:" in b]
    [statement] = json.loads(textwrap.dedent(block))["Statement"]
    assert set(statement["Action"]) == made
    assert statement["Resource"] and all(re.fullmatch(r"arn:aws:cognito-idp:[a-z0-9-]+:\d{12}:userpool/[\w-]+", arn)
                                         for arn in statement["Resource"]), statement["Resource"]
    assert "DescribeUserPoolClient` returns each app client's `ClientSecret`" in doc


# --- clients of the GetClientToken API, secrets, claims a client can influence ----------------------


def test_a_client_whose_only_flow_is_client_token_auth_gets_tokens_without_a_domain():
    """GetClientToken issues client_credentials tokens to a client with a secret whose
    ExplicitAuthFlows is ALLOW_CLIENT_TOKEN_AUTH, with no OAuth flow configured at all."""
    api = client("api-only", "transactions/get", flows=(), oauth=False, auth_flows=("ALLOW_CLIENT_TOKEN_AUTH",))
    both = client("both", "transactions/get", auth_flows=("ALLOW_CLIENT_TOKEN_AUTH",))
    unsecret = client("api-nosecret", "transactions/get", flows=(), oauth=False, secret=False,
                      auth_flows=("ALLOW_CLIENT_TOKEN_AUTH",))
    assert (api.token_paths, both.token_paths, unsecret.token_paths) == (
        ("GetClientToken",), ("token_endpoint", "GetClientToken"), ())
    assert api.no_client_credentials is None and unsecret.no_client_credentials == "it has no client secret"
    policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL_ID}\n    issuer_format: updated\n"
                          "    client_ids: [api-only, api-nosecret]\n"
                          "routes:\n  - {name: read, path: /a, scopes: [transactions/get]}\n")
    report = audit(policy, [pool(clients=(api, unsecret))])
    assert report.matrix[(POOL_ID, "api-only")]["read"].text == "yes"
    assert report.matrix[(POOL_ID, "api-nosecret")]["read"].text == "no (no client_credentials)"
    assert [f.message for f in report.findings] == [
        "issuers[0].client_ids: app client api-nosecret cannot get client_credentials tokens: it has no client secret"]
    row = next(c for c in as_json(report)["pools"][0]["clients"] if c["client_id"] == "api-only")
    assert row["token_paths"] == ["GetClientToken"] and row["explicit_auth_flows"] == ["ALLOW_CLIENT_TOKEN_AUTH"]



def test_without_a_domain_the_token_endpoint_is_no_way_to_tokens():
    """A pool without a domain has no token endpoint; GetClientToken needs none."""
    from dataclasses import replace

    oauth = replace(client("oauth", "transactions/get"), pool_domain=False)
    both = replace(client("both", "transactions/get", auth_flows=("ALLOW_CLIENT_TOKEN_AUTH",)), pool_domain=False)
    assert (oauth.token_paths, both.token_paths) == ((), ("GetClientToken",))
    assert oauth.no_client_credentials == ("the pool has no domain, so no token endpoint, and ExplicitAuthFlows "
                                           "lacks ALLOW_CLIENT_TOKEN_AUTH")
    nosecret = replace(oauth, has_secret=False)
    assert nosecret.no_client_credentials == "it has no client secret"


def test_a_claim_a_client_can_influence_is_a_warning_that_fails_only_with_strict():
    """A V3_0 trigger receives the client metadata each client sends: a claim condition it serves
    is a warning (the API cannot show the trigger's code), exit 0 unless --strict."""
    policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL_ID}\n    issuer_format: updated\n"
                          "routes:\n  - {name: tenant, path: /t, scopes: [transactions/get], "
                          "claims: {'custom:tenant': acme, region: eu}}\n")
    clients = (client("reader", "transactions/get"),)
    report = audit(policy, [pool(clients=clients)])
    assert [(f.code, f.severity) for f in report.findings] == [("client-influenced-claim", "warning")]
    assert report.findings[0].message == (
        f"routes[0] 'tenant' reads the claims 'custom:tenant', 'region', which the V3_0 pre token generation "
        f"trigger of {POOL_ID} sets, and that trigger receives the client metadata a client sends (1 app client "
        "can reach the route): the trigger must derive the claim from the client id, never from the client metadata")
    assert report.exit_code == 0 and audit(policy, [pool(clients=clients)], strict=True).exit_code == 1
    out = io.StringIO()
    render_text(report, out)
    assert out.getvalue().splitlines()[-1] == f"0 findings, 1 warning (<policy> against {POOL_ID})"
    # No client reaches it, or no V3_0 trigger (then claims-without-trigger says it): no warning.
    assert codes(audit(policy, [pool(clients=(client("w", "transactions/post"),))])) == [
        "unreachable-route", "public-only-client"]
    assert "client-influenced-claim" not in codes(audit(policy, [pool(clients=clients, pre_token_version="V2_0")]))


RECORDED = Path(__file__).parent / "data" / "cognito"
RECORDED_POOL = "us-east-1_Rec0rded1"
LEDGER, BATCH = "3api0nly4ll0wc1ienttoken5", "7n0secretc1ient0000000000"


def recorded(name: str) -> dict:
    return json.loads((RECORDED / f"{name}.json").read_text())


RECORDED_POLICY = parse_policy(f"issuers:\n  - user_pool_id: {RECORDED_POOL}\n    issuer_format: updated\n"
                               "routes:\n  - {name: read, path: /a, scopes: [transactions/get]}\n")


def read_recorded_pool(secrets: str) -> Pool:
    """``read_pool`` on a real boto3 cognito-idp client answering the audit's calls, in order, with
    the recorded responses (and nothing left unasked); ``secrets``: "listed" (ListUserPoolClientSecrets
    answers) or the name of its recorded error.

    Skipped on a botocore whose service model predates the recorded responses (the lowest boto3
    the audit extra allows has no ListUserPoolClientSecrets, no UserPoolTier): the Stubber refuses
    what its model does not know, and the audit's own answer to such a botocore is tested below."""
    import boto3
    import botocore.session

    model = botocore.session.get_session().get_service_model("cognito-idp")
    pool_members = model.shape_for("UserPoolType").members
    if "ListUserPoolClientSecrets" not in model.operation_names or not {
        "UserPoolTier", "IssuerConfiguration"} <= set(pool_members):
        pytest.skip(f"botocore {botocore.__version__}'s Cognito model predates the recorded responses")
    from botocore.stub import Stubber

    from authz_service.tools.audit import read_pool

    idp = boto3.client("cognito-idp", region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    stub = Stubber(idp)
    pool_id = {"UserPoolId": RECORDED_POOL}
    stub.add_response("describe_user_pool", recorded("describe_user_pool"), pool_id)
    stub.add_response("list_resource_servers", recorded("list_resource_servers"), {**pool_id, "MaxResults": 50})
    stub.add_response("list_user_pool_clients", recorded("list_user_pool_clients"), {**pool_id, "MaxResults": 60})
    for client_id, name in ((LEDGER, "ledger"), (BATCH, "batch")):
        params = {**pool_id, "ClientId": client_id}
        stub.add_response("describe_user_pool_client", recorded(f"describe_user_pool_client.{name}"), params)
        if secrets == "listed":
            stub.add_response("list_user_pool_client_secrets", recorded(f"list_user_pool_client_secrets.{name}"),
                              params)
        elif client_id == LEDGER:  # refused once: the audit does not ask again for this pool
            error = recorded(f"list_user_pool_client_secrets.{secrets}")
            stub.add_client_error("list_user_pool_client_secrets", service_error_code=error["__type"],
                                  service_message=error["message"], http_status_code=400, expected_params=params)
    with stub:
        pool_read = read_pool(idp, RECORDED_POOL, "us-east-1")
    stub.assert_no_pending_responses()
    return pool_read


def test_client_secrets_are_counted_with_list_user_pool_client_secrets():
    """Recorded responses (moto has no ListUserPoolClientSecrets): a GetClientToken-only client
    with two secrets (a rotation) gets tokens; one whose list is empty does not."""
    pool_read = read_recorded_pool("listed")
    ledger, batch = (pool_read.client(c) for c in (LEDGER, BATCH))
    assert ledger is not None and batch is not None
    assert (ledger.secrets_listed, ledger.token_paths) == (2, ("GetClientToken",))
    assert (batch.secrets_listed, batch.no_client_credentials) == (0, "it has no client secret")
    assert pool_read.secrets_unlisted is None and pool_read.pre_token_version == "V3_0"
    assert pool_read.domain is False and ledger.pool_domain is False  # recorded pool: no domain, GetClientToken only
    report = audit(RECORDED_POLICY, [pool_read])
    assert report.findings == [] and report.matrix[(RECORDED_POOL, LEDGER)]["read"].text == "yes"
    assert as_json(report)["pools"][0]["client_secrets_from"] == "ListUserPoolClientSecrets"


def test_list_user_pool_client_secrets_refused_is_a_warning_and_describe_decides():
    """Recorded AccessDeniedException: asked once per pool, the secrets are read from
    DescribeUserPoolClient's ClientSecret, and a warning names the permission to grant."""
    pool_read = read_recorded_pool("access-denied")
    ledger, batch = (pool_read.client(c) for c in (LEDGER, BATCH))
    assert ledger is not None and batch is not None
    assert (ledger.secrets_listed, ledger.token_paths, batch.token_paths) == (None, ("GetClientToken",), ())
    report = audit(RECORDED_POLICY, [pool_read])
    assert [(f.code, f.severity, f.message) for f in report.findings] == [(
        "client-secrets-unverified", "warning",
        f"{RECORDED_POOL}: ListUserPoolClientSecrets failed: AccessDeniedException: grant "
        "cognito-idp:ListUserPoolClientSecrets on the pool to the audit's role; whether an app client has a "
        "secret was read from DescribeUserPoolClient's ClientSecret instead")]
    assert report.exit_code == 0 and as_json(report)["pools"][0]["client_secrets_from"] == "DescribeUserPoolClient"


def test_a_botocore_without_list_user_pool_client_secrets_is_a_warning():
    from authz_service.tools.audit import _SecretLister

    class OldClient:  # a botocore from before the operation: the client has no such method
        pass

    lister = _SecretLister(OldClient(), RECORDED_POOL)
    assert lister.count(LEDGER) is None
    assert lister.unlisted is not None and lister.unlisted.endswith(
        "has no ListUserPoolClientSecrets; upgrade boto3 (pip install -U boto3)")


def offline_env(**extra: str) -> dict[str, str]:
    """No AWS credentials anywhere the standard chain looks (no instance metadata either)."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "AUTHZ_POLICY"}
    return {**base, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1", **extra}


def test_without_credentials_or_an_endpoint_the_audit_is_one_line_naming_the_pool(tmp_path):
    from tests.e2e.harness import free_port

    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: {POOL_ID}\nroutes:\n  - {{path: /a, scopes: [a/b]}}\n")
    for fmt in ("text", "json"):
        run = subprocess.run([sys.executable, "-m", "authz_service.cli", "audit", str(policy), "--format", fmt],
                             capture_output=True, text=True, timeout=60, env=offline_env())
        assert run.returncode == 2 and run.stdout == ""
        assert run.stderr == f"authz-service audit: error: DescribeUserPool {POOL_ID}: Unable to locate credentials\n"
    endpoint = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run([sys.executable, "-m", "authz_service.cli", "audit", str(policy)], capture_output=True,
                         text=True, timeout=60, env=offline_env(AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
                                                                AWS_SECRET_ACCESS_KEY="not-a-secret",
                                                                AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER=endpoint))
    assert run.returncode == 2 and run.stdout == "" and "not-a-secret" not in run.stderr
    assert run.stderr == (f"authz-service audit: error: DescribeUserPool {POOL_ID}: Could not connect to the "
                          f'endpoint URL: "{endpoint}/"\n')



def test_the_json_keys_are_the_documented_ones():
    """docs/cognito.md names every key of --format json (a renamed key is a documented change)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cognito.md").read_text()
    text = docs.split("`--format json` prints one object:")[1].split("\n\n")[0]
    policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL_ID}\nroutes:\n  - {{path: /a, scopes: [a/b]}}\n"
                          "  - {path: /b, scopes: [a/c]}\n", "p.yaml")
    pool = Pool(POOL_ID, "us-east-1", frozenset({"a/b"}), (client("c1", "a/b"),))
    data = as_json(audit(policy, [pool]))
    assert data["findings"], "a finding, for its keys"
    keys = {*data, *data["pools"][0], *data["pools"][0]["clients"][0], *data["matrix"][0], *data["findings"][0]}
    keys |= {key for cell in data["matrix"][0]["routes"].values() for key in cell}
    assert sorted(k for k in keys if f"`{k}`" not in text) == []
