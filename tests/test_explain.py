"""`authz-service explain`: the route, the why, the checks and the exact answer Envoy would relay."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz_service.tools.explain import _checklist
from authz_service.tokens import TokenError, TokenVerifier
from tests.e2e.harness import free_port
from tests.e2e.stack import DevIssuer, start_dev_issuer

from .conftest import ISSUER, make_key
from .conftest import MemoryKeys
from .test_policytool import REVIEW_POLICY
from .test_tokens import POLICY, b64, resign

EXAMPLE = Path(__file__).resolve().parents[1] / "authz_service" / "examples" / "policy.yaml"


def explain(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz_service.cli", "explain", *args], capture_output=True,
                          text=True, timeout=60, input=stdin)


def test_simulated_token_without_the_scope_shows_the_exact_403():
    run = explain("--policy", str(EXAMPLE), "--method", "POST", "--path", "/transactions",
                  "--scopes", "transactions/get")
    assert run.returncode == 1, run.stderr
    out = run.stdout
    assert "route:     routes[0] 'create-transaction' (POST /transactions, mode enforce)" in out
    assert "routes[1] 'list-transactions': GET /transactions (does not list POST)" in out
    assert "required:  any of [transactions/post]" in out
    assert "present:   [transactions/get] -> none of them" in out
    assert "decision:  DENY, reason insufficient_scope" in out
    assert "  HTTP 403\n" in out
    assert ('  www-authenticate: Bearer realm="authz-service", error="insufficient_scope", '
            'error_description="token lacks a required scope", scope="transactions/post"') in out
    assert '{"error":"insufficient_scope","error_description":"token lacks a required scope",' \
           '"scope":"transactions/post"}' in out


def test_allowed_request_shows_the_identity_headers_upstream_gets():
    run = explain("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions/7",
                  "--scopes", "transactions/get other/x", "--client-id", "payments-reader", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["route"]["name"] == "get-transaction"
    assert data["decision"] == {"envoy": "allow", "dry_run": False, "reason": "allowed", "status": 200,
                                "description": ""}
    assert data["response"]["upstream_headers_set"] == [
        ["x-auth-client-id", "payments-reader"], ["x-auth-scopes", "transactions/get other/x"],
        ["x-auth-sub", "payments-reader"]]


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [("DELETE", "/transactions/7", 403, "access_denied"), ("GET", "/transactions;x=1", 400, "invalid_request"),
     ("POST", "/transactions", 401, "unauthorized")],
)
def test_denials_without_a_token(method, path, status, error):
    run = explain("--policy", str(EXAMPLE), "--method", method, "--path", path, "--json")
    assert run.returncode == 1
    answer = json.loads(run.stdout)["response"]
    assert answer["status"] == status and json.loads(answer["body"])["error"] == error


@pytest.mark.parametrize("method", ["get", "Post"])
def test_a_method_not_in_upper_case_is_the_400_the_service_answers(method):
    run = explain("--policy", str(EXAMPLE), "--method", method, "--path", "/healthz")
    assert run.returncode == 1
    assert "decision:  DENY, reason bad_request" in run.stdout and "  HTTP 400\n" in run.stdout
    assert f"hint:      HTTP methods are case-sensitive; did you mean {method.upper()}?" in run.stdout


def test_head_follows_the_get_route():
    run = explain("--policy", str(EXAMPLE), "--method", "HEAD", "--path", "/transactions/7", "--json")
    assert json.loads(run.stdout)["route"]["name"] == "get-transaction"


def test_dry_run_route_is_shown_as_an_allow_that_would_deny(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\nmode: dry-run\n"
                      "routes:\n  - path: /a\n    scopes: [a/b]\n")
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/a", "--scopes", "a/c")
    assert run.returncode == 0
    assert "decision:  ALLOW (dry-run: would be DENY 403), reason insufficient_scope" in run.stdout


TRAILING_SLASH_POLICY = "issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n" + REVIEW_POLICY


def test_a_trailing_slash_shows_both_readings_and_needs_the_protected_route(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(TRAILING_SLASH_POLICY)
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/admin/report/?x=1")
    assert run.returncode == 1, run.stdout
    assert "route:     routes[0] 'admin-report' (GET /admin/report, mode enforce)" in run.stdout
    assert ("slash:     the path ends in '/': a strict router serves it as written (routes[3] 'everything-else'), "
            "a lenient one as /admin/report (routes[0] 'admin-report'); the request must meet both") in run.stdout
    assert "decision:  DENY, reason missing_token" in run.stdout
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/admin/report/", "--scopes", "admin/read",
                  "--json")
    data = json.loads(run.stdout)
    assert run.returncode == 0 and data["decision"]["reason"] == "allowed" and data["route"]["name"] == "admin-report"
    assert data["trailing_slash"]["as_written"]["name"] == "everything-else"
    assert data["trailing_slash"]["without_slash"]["name"] == "admin-report"
    plain = json.loads(explain("--policy", str(policy), "--method", "GET", "--path", "/admin/report", "--json").stdout)
    assert plain["trailing_slash"] is None


def test_bad_policy_is_exit_2_with_the_loader_message(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: /a\n    methods: [get]\n"
                      "    scopes: [a/b]\n")
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/a")
    assert run.returncode == 2
    assert f"{policy}:5:15: routes[0].methods[0]: 'get' is not an HTTP method" in run.stderr


# --- real tokens: the JWKS is fetched from a real (dev) issuer over HTTP --------------------------


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    dev = start_dev_issuer(tmp_path_factory.mktemp("explain"), "us-east-1_Demo00001")
    yield dev
    dev.process.stop()


@pytest.fixture
def policy(tmp_path: Path, issuer: DevIssuer) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE.read_text().replace("http://127.0.0.1:9000/us-east-1_Demo00001", issuer.issuer))
    return path


def test_a_token_file_is_read_up_to_a_bound(tmp_path, policy):
    """/dev/zero (or any endless file) as --token-file is refused after 64 KiB, not read forever."""
    zero = tmp_path / "token"
    zero.symlink_to("/dev/zero")
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/x", "--token-file", str(zero))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (f"authz-service explain: error: {zero}: larger than a token file may be "
                                  "(65536 bytes, 64 KiB); --token-file names a file holding one access token")


def test_real_token_every_check_passes_and_the_token_is_never_printed(issuer, policy):
    token = issuer.token("payments-writer")
    run = explain("--policy", str(policy), "--method", "POST", "--path", "/transactions", "--token-file", "-",
                  stdin=token + "\n")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    checks = [line.split()[:2] for line in lines if line.startswith("  passed") or line.startswith("  FAILED")]
    assert checks == [["passed", n] for n in
                      ("header", "key", "signature", "payload", "issuer", "times", "token_use", "client", "claims",
                       "deny_list", "scopes")]
    assert f"token:     real: {token[:8]}... ({len(token)} chars)" in run.stdout
    assert "client_id='payments-writer'" in run.stdout
    assert token not in run.stdout and token[8:40] not in run.stdout and token.split(".")[2] not in run.stdout
    assert "x-auth-client-id: payments-writer" in run.stdout
    reader = explain("--policy", str(policy), "--method", "POST", "--path", "/transactions", "--token",
                     issuer.token("payments-reader"))
    assert reader.returncode == 1
    assert "  FAILED       scopes     token holds one of the route's scopes [transactions/post]" in reader.stdout


def test_real_token_with_a_forged_payload_fails_at_the_signature(issuer, policy, tmp_path):
    from tests.e2e.test_service_e2e import tamper

    token_file = tmp_path / "token"
    token_file.write_text(tamper(issuer.token("payments-reader")))
    run = explain("--policy", str(policy), "--method", "POST", "--path", "/transactions", "--token-file",
                  str(token_file), "--json")
    assert run.returncode == 1
    data = json.loads(run.stdout)
    assert [(c["check"], c["result"]) for c in data["checks"]][1:4] == [
        ("key", "passed"), ("signature", "FAILED"), ("payload", "not checked")]
    assert data["checks"][2]["detail"] == "RS256 signature: token signature is invalid"  # precise for the operator
    assert data["response"]["status"] == 401
    assert json.loads(data["response"]["body"])["error_description"] == "token is not valid"  # uniform for clients


def test_unreachable_jwks_is_shown_and_answers_503(issuer, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: us-east-1_Demo00001\n    issuer: {issuer.issuer}\n"
                      f"    jwks_uri: http://127.0.0.1:{free_port()}/jwks.json\n"
                      "routes:\n  - path: /a\n    scopes: [transactions/post]\n")
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/a", "--token", issuer.token("payments-writer"))
    assert run.returncode == 1
    assert "  FAILED       jwks" in run.stdout
    assert "  FAILED       key        signing key with this kid in a trusted issuer's JWKS: signing keys are not" in run.stdout
    assert "  HTTP 503" in run.stdout
    assert run.stderr == ""  # the failed fetch is the jwks check above, not a stray log line


def test_credentials_in_an_unreachable_jwks_uri_are_not_shown(issuer, tmp_path):
    secret = "s3cret-Pa55word"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n  - user_pool_id: us-east-1_Demo00001\n    issuer: {issuer.issuer}\n"
                      f"    jwks_uri: http://keys-user:{secret}@127.0.0.1:{free_port()}/jwks.json?sig={secret}\n"
                      "routes:\n  - path: /a\n    scopes: [transactions/post]\n")
    run = explain("--policy", str(policy), "--method", "GET", "--path", "/a", "--token", issuer.token("payments-writer"))
    assert run.returncode == 1 and "  FAILED       jwks       fetching http://127.0.0.1:" in run.stdout
    assert secret not in run.stdout + run.stderr and "keys-user" not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("make_token", "check"),
    [
        (lambda key: key.token(sub="\ud800"), "claims"),
        (lambda key: key.token(scope="transactions/post\r\nx: y"), "claims"),
        (lambda key: key.token(client_id="client-a\n"), "client"),
        (lambda key: resign(key, key.token().split(".")[0], b64(b"{not json")), "payload"),
        (lambda key: key.token(iss=ISSUER + "/"), "issuer"),
        (lambda key: make_key(key.kid).token(), "signature"),
    ],
    ids=["sub-surrogate", "scope-crlf", "client-id-newline", "payload", "issuer", "signature"],
)
async def test_checklist_names_the_check_the_verifier_failed(key_a, make_token, check: str) -> None:
    """explain names the check the verifier says failed (TokenError.check): the two stay in step."""
    with pytest.raises(TokenError) as caught:
        await TokenVerifier(MemoryKeys(key_a)).verify(make_token(key_a), POLICY)
    failed = [(name, detail) for name, result, detail in _checklist(caught.value) if result == "FAILED"]
    assert failed == [(check, failed[0][1])] and failed[0][1].endswith(caught.value.detail)


# Run in a fresh interpreter: the verifier's checklist for each token given on stdin, with every
# TokenError message of tokens.py reworded first when asked (its source rewritten: "reworded: " + text).
_CHECKLIST_RUN = """
import ast, asyncio, importlib.util, json, sys

if sys.argv[1] == "reworded":
    spec = importlib.util.find_spec("authz_service.tokens")
    tree = ast.parse(open(spec.origin).read())

    class Reword(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance(node.func, ast.Name) and node.func.id == "TokenError":
                node.args[1:] = [ast.BinOp(ast.Constant("reworded: "), ast.Add(), arg) for arg in node.args[1:]]
            return node

    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(ast.fix_missing_locations(Reword().visit(tree)), spec.origin, "exec"), module.__dict__)

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from authz_service.tokens import TokenError, TokenVerifier
from authz_service.tools.explain import _checklist
from tests.conftest import MemoryKeys, SigningKey
from tests.test_tokens import POLICY

given = json.load(sys.stdin)
keys = MemoryKeys(SigningKey(given["kid"], load_pem_private_key(given["pem"].encode(), None)))
out = []
for token in given["tokens"]:
    try:
        asyncio.run(TokenVerifier(keys).verify(token, POLICY))
        out.append(None)
    except TokenError as exc:
        out.append({"checks": [(name, result) for name, result, _ in _checklist(exc)], "detail": exc.detail})
print(json.dumps(out))
"""


def test_explain_reads_which_check_failed_not_the_message(key_a) -> None:
    """Every TokenError message reworded, explain names the same failed check for every token: it
    reads the error's code (TokenError.check), never its wording."""
    from cryptography.hazmat.primitives import serialization

    other = make_key(key_a.kid)
    tokens = [
        key_a.token(header={"crit": ["exp"]}), key_a.token()[:-3], key_a.token(header={"kid": "nobody"}),
        other.token(), resign(key_a, key_a.token().split(".")[0], b64(b"{not json")), key_a.token(iss=ISSUER + "/"),
        key_a.token(exp=1), key_a.token(exp=None), key_a.token(exp="soon"), key_a.token(nbf=4_000_000_000),
        key_a.token(token_use="id"), key_a.token(client_id=None), key_a.token(client_id="client-a\n"),
        key_a.token(scope=["a"]), key_a.token(scope="a\tb"), key_a.token(scope="a\"b"), key_a.token(sub=7),
        key_a.token(sub=" padded"),
    ]
    pem = key_a.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
    given = json.dumps({"kid": key_a.kid, "pem": pem, "tokens": tokens})
    runs = {}
    for wording in ("as written", "reworded"):
        run = subprocess.run([sys.executable, "-c", _CHECKLIST_RUN, wording], input=given, capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr
        runs[wording] = json.loads(run.stdout)
    written, reworded = runs["as written"], runs["reworded"]
    assert all(result is not None for result in written), "every token is refused"
    assert [r["checks"] for r in reworded] == [r["checks"] for r in written]
    assert all(r["detail"].startswith("reworded: ") and not w["detail"].startswith("reworded")
               for r, w in zip(reworded, written))
    failed = {name for result in written for name, state in result["checks"] if state == "FAILED"}
    assert failed == {"header", "key", "signature", "payload", "issuer", "times", "token_use", "client", "claims"}


@pytest.mark.parametrize("written", ["Bearer {t}", "  bearer \t{t}\n", "BEARER {t}", " {t} "])
def test_a_token_copied_with_its_bearer_prefix_or_spaces_is_verified(issuer, policy, tmp_path, written):
    token = issuer.token("payments-writer")
    token_file = tmp_path / "token"
    token_file.write_text(written.format(t=token))
    for how in (("--token", written.format(t=token)), ("--token-file", str(token_file))):
        run = explain("--policy", str(policy), "--method", "POST", "--path", "/transactions", *how)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"token:     real: {token[:8]}... ({len(token)} chars)" in run.stdout
        assert "decision:  ALLOW" in run.stdout


# --- route conditions -------------------------------------------------------------------------------

CLAIMS_EXAMPLE = EXAMPLE.parent / "policy-custom-claims.yaml"


def test_simulated_claims_show_each_condition_and_the_exact_403():
    run = explain("--policy", str(CLAIMS_EXAMPLE), "--method", "POST", "--path", "/reports/export",
                  "--scopes", "reports/read reports/export", "--claim", "tier=bronze", "--claim", 'environments=["prod"]')
    assert run.returncode == 1, run.stderr
    out = run.stdout
    assert 'with scopes [reports/read reports/export], claims {"tier":"bronze","environments":["prod"]}' in out
    assert ("required:  all of [reports/export reports/read]\n"
            "           claim tier any of ['gold', 'platinum']\n"
            "           claim environments contains 'prod'\n") in out
    assert "present:   [reports/export reports/read], client_id 'simulated-client'" in out
    assert "           passed  all_scopes: token holds all of the route's all_scopes" in out
    assert "           FAILED  claim: tier any of ['gold', 'platinum'] (token: \"bronze\")" in out
    assert "           passed  claim: environments contains 'prod' (token: [\"prod\"])" in out
    assert "decision:  DENY, reason claim_mismatch: token claim does not have a required value: tier" in out
    assert ('www-authenticate: Bearer realm="authz-service", error="insufficient_scope", '
            'error_description="token claim does not have a required value: tier"') in out


def test_simulated_claims_json_output():
    run = explain("--policy", str(CLAIMS_EXAMPLE), "--method", "GET", "--path", "/tenants/acme/reports/1",
                  "--scopes", "reports/read", "--claim", "custom:tenant=acme", "--claim", "level=3", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(run.stdout)
    assert data["claim_conditions"] == [{"claim": "custom:tenant", "equals": "acme"}]
    assert data["present_claims"] == {"custom:tenant": "acme"}  # only claims the policy names are read
    assert data["required_all_scopes"] == [] and data["route_client_ids"] is None
    admin = json.loads(explain("--policy", str(CLAIMS_EXAMPLE), "--method", "GET", "--path", "/admin/x",
                               "--scopes", "admin/all", "--json").stdout)
    assert admin["route_client_ids"] == ["ops-bot"]
    assert admin["decision"]["reason"] == "client_not_allowed_for_route"


@pytest.mark.parametrize(("args", "message"), [
    (("--claim", "tenant"), "--claim 'tenant': write NAME=VALUE"),
    (("--claim", "=x"), "write NAME=VALUE"),
    (("--claim", "scope=admin/all"), "--claim scope: set by Cognito"),
    (("--token", "x.y.z", "--claim", "tenant=acme"), "--claim simulates a token"),
])
def test_bad_claim_options_exit_2(args, message):
    run = explain("--policy", str(CLAIMS_EXAMPLE), "--method", "GET", "--path", "/healthz", *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_real_token_with_custom_claims_lists_each_condition(tmp_path):
    dev = start_dev_issuer(tmp_path, "us-east-1_Demo00002", example="dev-issuer-custom-claims.yaml")
    try:
        policy = tmp_path / "p.yaml"
        policy.write_text(CLAIMS_EXAMPLE.read_text().replace("http://127.0.0.1:9001/us-east-1_Demo00002/.well-known/"
                                                             "jwks.json", dev.jwks_uri))
        run = explain("--policy", str(policy), "--method", "POST", "--path", "/reports/export",
                      "--token", dev.token("globex-reporting"))
        assert run.returncode == 1, run.stdout + run.stderr
        checks = [line.split(None, 2)[:2] for line in run.stdout.splitlines() if line.startswith(("  passed", "  FAILED"))]
        assert checks[-3:] == [["FAILED", "all_scopes"], ["FAILED", "claim"], ["FAILED", "claim"]]
        assert "  FAILED       claim      tier any of ['gold', 'platinum'] (token: \"bronze\")" in run.stdout
        assert "reason missing_scope: token lacks a required scope: reports/export" in run.stdout
        replica = explain("--policy", str(policy), "--method", "POST", "--path", "/reports/export",
                          "--token", dev.token("acme-reporting", region="eu-west-1"))
        assert replica.returncode == 0, replica.stdout
        assert "iss='https://issuer-cognito-idp.eu-west-1.amazonaws.com/us-east-1_Demo00002'" in replica.stdout
    finally:
        dev.process.stop()


# --- what explain takes from the command line and the environment ------------------------------------


def explain_env(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """explain with serve's environment: the test run's without AUTHZ_* variables, plus ``env``."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    return subprocess.run([sys.executable, "-m", "authz_service.cli", "explain", *args], capture_output=True,
                          text=True, timeout=60, input=stdin, env={**base, **env})


@pytest.mark.parametrize("token", ["hunter2", "Bearer hunter2", "s3cr3t-not-a-jwt-but-long-enough-to-cut"])
def test_a_token_that_is_not_a_jwt_is_never_shown(token):
    """What is given as a token may be anything pasted (a client secret): no part of it that is not a
    JWT's public header is printed, not even its first characters."""
    run = explain("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions", "--token", token)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    secret = token.removeprefix("Bearer ")
    assert secret[:4] not in run.stdout + run.stderr
    assert f"token:     real: ({len(secret)} chars), not a readable JWT" in run.stdout


@pytest.mark.parametrize("given", [("--token", "  "), ("--token", "Bearer "), ("--token-file", "-")])
def test_an_empty_token_is_refused_with_exit_2(given):
    run = explain("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions", *given, stdin="\n")
    source = "--token" if given[0] == "--token" else "--token-file -"
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"authz-service explain: error: {source}: the token is empty; give the access token\n"


@pytest.mark.parametrize("flag", [("--client-id", "x"), ("--issuer", "https://example.com/us-east-1_Abc123")])
def test_simulated_token_options_with_a_real_token_are_refused(flag):
    """--client-id and --issuer shape a simulated token: with a real one they would be silently ignored."""
    run = explain("--policy", str(EXAMPLE), "--method", "GET", "--path", "/x", "--token", "a.b.c", *flag)
    assert run.returncode == 2 and run.stdout == ""
    assert f"authz-service explain: error: {flag[0]} simulates a token; a real token carries its own" in run.stderr


def test_the_realm_is_serves_own():
    """Run where the service is configured (kubectl exec), explain answers with serve's AUTHZ_REALM."""
    args = ("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions")
    run = explain_env(*args, env={"AUTHZ_REALM": "payments"})
    assert run.returncode == 1 and '  www-authenticate: Bearer realm="payments"' in run.stdout, run.stderr
    flag = explain_env(*args, "--realm", "shop", env={"AUTHZ_REALM": "payments"})
    assert '  www-authenticate: Bearer realm="shop"' in flag.stdout  # the flag wins, as with serve


@pytest.mark.parametrize(("given", "env", "message"), [
    (("--realm", 'a"b'), {}, "--realm 'a\"b': printable text without quotes or backslashes"),
    ((), {"AUTHZ_REALM": 'a"b'}, "AUTHZ_REALM='a\"b' (serve's --realm, which explain follows): printable text"),
    (("--leeway", "nan"), {}, "--leeway 'nan': "),
    (("--leeway", "-5"), {}, "--leeway '-5': "),
    ((), {"AUTHZ_LEEWAY": "soon"}, "AUTHZ_LEEWAY='soon' (serve's --leeway, which explain follows): "),
    ((), {"AUTHZ_JWKS_TIMEOUT": "0"}, "AUTHZ_JWKS_TIMEOUT='0' (serve's --jwks-timeout, which explain follows): "),
])
def test_a_setting_serve_would_refuse_is_refused(given, env, message):
    run = explain_env("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions", "--token", "a.b.c",
                      *given, env=env)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"authz-service explain: error: {message}"), run.stderr


def test_the_verifier_settings_are_read_as_serve_reads_them():
    from argparse import Namespace

    from authz_service.config import JwksSettings
    from authz_service.tools.explain import settings_as_serve

    none = Namespace(realm=None, leeway=None)
    assert settings_as_serve(none, {}) == ("authz-service", 60.0, JwksSettings())
    env = {"AUTHZ_REALM": "payments", "AUTHZ_LEEWAY": "5", "AUTHZ_JWKS_TIMEOUT": "7.5",
           "AUTHZ_JWKS_MAX_BYTES": "1000"}
    realm, leeway, jwks = settings_as_serve(none, env)
    assert (realm, leeway, jwks.timeout, jwks.max_bytes) == ("payments", 5.0, 7.5, 1000)
    assert settings_as_serve(Namespace(realm="shop", leeway="0"), env)[:2] == ("shop", 0.0)


def test_the_json_keys_are_the_documented_ones():
    """docs/policy.md lists explain --json's keys: a key renamed or added is a documented change."""
    import re

    docs = (Path(__file__).resolve().parents[1] / "docs" / "policy.md").read_text()
    table = docs.split("`explain --json` prints one object with these keys")[1].split("\n\n")[1]
    documented = {key for row in table.splitlines()[2:] for key in re.findall(r"`([a-z_]+)`", row.split(" | ")[0])}
    run = explain("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions/1", "--scopes",
                  "transactions/get", "--json")
    assert set(json.loads(run.stdout)) == documented


def test_a_mistyped_authz_variable_is_named_not_ignored():
    """explain reads serve's AUTHZ_* variables: one that is no setting is warned about, as serve and
    validate do, rather than silently leaving the realm (or leeway) at its default."""
    run = explain_env("--policy", str(EXAMPLE), "--method", "GET", "--path", "/transactions",
                      env={"AUTHZ_RELAM": "payments"})
    assert run.returncode == 1 and '  www-authenticate: Bearer realm="authz-service"' in run.stdout
    assert run.stderr == ("authz-service explain: warning: AUTHZ_RELAM is not a setting of authz-service; it is "
                          "ignored (did you mean AUTHZ_REALM?)\n")
