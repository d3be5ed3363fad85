"""`authz-service audit` logic on plain data (the AWS side is tested against moto in tests/e2e)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

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


def client(client_id: str, *scopes: str, flows=("client_credentials",), oauth=True, secret=True) -> AppClient:
    return AppClient(client_id, f"{client_id} app", tuple(flows), oauth, scopes, secret)


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
                             "unknown-client", "unreachable-route", "public-only-client"]
    assert "undefined-scope: routes[2] 'export' requires scope 'reports/export', which no resource server" in messages[0]
    assert messages[1] == f"unknown-client: issuers[0].client_ids: ghost is not an app client of {POOL_ID}"
    assert messages[2] == ("no-client-credentials: issuers[0].client_ids: app client nosecret cannot get "
                           "client_credentials tokens: it has no client secret")
    assert messages[3].endswith("user-app cannot get client_credentials tokens: AllowedOAuthFlows lacks "
                                "client_credentials")
    assert messages[4] == f"unknown-client: routes[4] 'ops' client_ids: ops-ghost is not an app client of {POOL_ID}"
    assert messages[5] == "unreachable-route: routes[2] 'export' (/export): no app client of the audited pools can reach it"
    assert messages[6] == (f"public-only-client: app client badge (badge app) of {POOL_ID} reaches only public routes "
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
    assert "depends on claims" in text and text.rstrip().endswith(f"7 findings (audit.yaml against {POOL_ID})")
    data = json.loads(json.dumps(as_json(report)))
    row = next(r for r in data["matrix"] if r["client_id"] == "reporting")
    assert row["routes"]["tenant"] == {"access": "depends_on_claims"}
    assert row["routes"]["export"] == {"access": "no", "why": "all_scopes"}
    assert data["exit_code"] == 1 and len(data["findings"]) == 7
    assert data["pools"][0]["clients"][3]["why_not"] == "AllowedOAuthFlows lacks client_credentials"


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
                    return {"UserPoolClient": {"ClientId": "c1", "ClientSecret": "s3cret"}}
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
