"""`authz-service validate` (errors + lints) and `authz-service test` (table-driven expectations)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.policy import PolicyError, parse_policy
from authz_service.tools.policytool import CaseFileError, lint, load_tests, reachability, validate_command, validate_file

from .test_cli import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "authz_service" / "examples"
ISSUERS = "issuers:\n  - user_pool_id: us-east-1_Abc123\n"


def lints(routes: str, top: str = "") -> list[str]:
    """The warnings' lines; each ends in its code, one of WARNING_CODES (tools read the code)."""
    from authz_service.tools.policytool import WARNING_CODES

    text = ISSUERS + top + "routes:\n" + textwrap.dedent(routes)
    found = lint(parse_policy(text, "p.yaml"), text)
    assert all(w.code in WARNING_CODES and str(w).endswith(f" [{w.code}]") for w in found), found
    return [str(w) for w in found]


@pytest.mark.parametrize(("routes", "code"), [
    ("  - path: /a\n    scopes: [r/x, r/x]\n", "duplicate-scope"),
    ("  - path: /a\n    scopes: [r/x]\n    all_scopes: [r/x]\n", "scope-in-both"),
    ("  - path: /a\n    scopes: [openid]\n", "user-pool-scope"),
    ("  - path: /a\n    scopes: [read]\n", "scope-shape"),
    ("  - path: /a\n    scopes: [r/x]\n    claims: {tier: yes}\n", "claim-literal"),
    ("  - path: /a\n    methods: [GTE]\n    scopes: [r/x]\n", "non-standard-method"),
])
def test_each_warning_names_its_code(routes, code):
    (warning,) = lints(routes)
    assert warning.endswith(f" [{code}]")


def test_every_warning_code_is_documented():
    from authz_service.tools.policytool import WARNING_CODES

    section = (Path(__file__).resolve().parents[1] / "docs" / "policy.md").read_text().split(
        "## `validate`: errors and warnings")[1].split("\n## ")[0]
    assert [code for code in WARNING_CODES if f"`{code}`" not in section] == []


# --- validate: errors ----------------------------------------------------------------------------


@pytest.mark.usefixtures("yaml_parser")
def test_validate_reports_every_error_with_line_and_exits_1(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text(ISSUERS + "routes:\n  - path: /a\n    methods: [get]\n    scopes: [r/x]\n"
                   "  - path: /b\n    scope: [r/x]\n  - path: c\n    scopes: [r/x]\n")
    run = cli("validate", str(bad))
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines[0] == f"{bad}:5:15: routes[0].methods[0]: 'get' is not an HTTP method; write 'GET'"
    assert lines[1].startswith(f"{bad}:8:5: routes[1]: unknown key 'scope'")
    assert lines[2].startswith(f"{bad}:9:11: routes[2].path: 'c' must start with '/'")
    assert lines[3] == f"{bad}: REFUSED: 3 errors (the server would not load this file)"


def test_validate_example_policy_is_clean():
    run = cli("validate", str(EXAMPLES / "policy.yaml"), "--strict")
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip().endswith("OK: 4 routes, 1 issuer, 0 warnings")


def test_unreadable_file_is_an_error():
    report = validate_file("/nonexistent/policy.yaml")
    assert report.policy is None and "cannot read policy file" in str(report.errors[0])


def test_validate_reads_through_the_safe_reader(tmp_path):
    """validate refuses what the server refuses, without blocking on a FIFO or reading /dev/zero."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    run = cli("validate", str(fifo), str(zero))
    assert run.returncode == 1
    assert f"{fifo}: not a regular file (a FIFO)" in run.stdout
    assert f"{zero}: not a regular file (a character device)" in run.stdout


def test_warnings_exit_0_unless_strict(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ISSUERS + "routes:\n  - path: /a\n    methods: [PSOT]\n    scopes: [r/x]\n")
    out = io.StringIO()
    assert validate_command([path], strict=False, out=out) == 0
    assert "did you mean 'POST'?" in out.getvalue()
    assert validate_command([path], strict=True, out=io.StringIO()) == 1


def test_query_method_is_standard_under_strict(tmp_path):
    # QUERY (the httpbis safe method with a body) is forwarded by Envoy: no warning, strict exits 0.
    path = tmp_path / "p.yaml"
    path.write_text(ISSUERS + "routes:\n  - path: /search\n    methods: [QUERY, GET]\n    scopes: [r/x]\n")
    out = io.StringIO()
    assert validate_command([path], strict=True, out=out) == 0, out.getvalue()
    assert "warning:" not in out.getvalue() and "0 warnings" in out.getvalue()


# --- validate: lints -----------------------------------------------------------------------------


def test_misspelled_method_gets_a_suggestion_with_its_line():
    (warning,) = lints("  - path: /a\n    methods: [GET, PSOT]\n    scopes: [r/x]\n")
    assert warning.startswith("p.yaml:5:18: warning: routes[0].methods[1]: 'PSOT' is not a standard HTTP method")
    assert warning.endswith("did you mean 'POST'? [non-standard-method]")


def test_duplicated_and_badly_shaped_scopes():
    warnings = lints("  - path: /a\n    scopes: [tx/read, tx/read, read, openid, https://api.example.com/read]\n")
    assert len(warnings) == 3, warnings
    assert "routes[0].scopes[1]: scope 'tx/read' is listed twice" in warnings[0]
    assert "routes[0].scopes[2]: 'read' is not shaped '<resource server identifier>/<scope name>'" in warnings[1]
    assert "routes[0].scopes[3]: 'openid' is a user-pool (OpenID) scope" in warnings[2]


def test_a_catch_all_taken_everywhere_by_more_specific_routes_can_never_match():
    warnings = lints("""\
      - name: catch-all
        methods: [GET]
        path: /**
        scopes: [a/b]
      - name: root
        methods: [GET]
        path: /
        scopes: [a/b]
      - name: deep
        path: /{p}/**
        scopes: [a/b]
    """)
    assert len(warnings) == 1, warnings
    assert "route 'catch-all' can never match" in warnings[0] and "p.yaml:6:9:" in warnings[0]


def test_a_catch_all_with_one_uncovered_path_is_not_flagged():
    # Same as above without the "/" route: GET / still reaches the catch-all.
    assert lints("""\
      - name: catch-all
        methods: [GET]
        path: /**
        scopes: [a/b]
      - name: deep
        path: /{p}/**
        scopes: [a/b]
    """) == []


def test_methods_of_a_route_that_more_specific_routes_always_take():
    warnings = lints("""\
      - name: reports
        methods: [GET, POST]
        path: /reports/**
        scopes: [a/b]
      - name: reports-root
        methods: [GET]
        path: /reports
        scopes: [a/b]
      - name: report
        methods: [GET]
        path: /reports/{id}/**
        scopes: [a/b]
    """)
    # GET /reports/ (trailing slash) still reaches 'reports' for GET: only "/x/" paths do.
    assert warnings == [], warnings


def test_route_only_reachable_with_trailing_slash():
    warnings = lints("""\
      - name: reports
        path: /reports/**
        scopes: [a/b]
      - name: reports-root
        path: /reports
        scopes: [a/b]
      - name: report
        path: /reports/{id}/**
        scopes: [a/b]
    """)
    assert len(warnings) == 1 and "only matches paths ending in '/'" in warnings[0], warnings


def test_public_route_more_specific_than_a_protected_one_is_a_hole():
    warnings = lints("""\
      - name: tx
        path: /transactions/**
        scopes: [transactions/get]
      - name: tx-one
        methods: [GET]
        path: /transactions/{id}
        public: true
    """)
    assert len(warnings) == 1, warnings
    assert "routes[1].public: public route 'tx-one' is more specific than protected route 'tx'" in warnings[0]
    assert "GET /transactions/x" in warnings[0]


def test_public_hole_can_be_acknowledged():
    assert lints("""\
      - name: tx
        path: /transactions/**
        scopes: [transactions/get]
      - name: tx-one
        methods: [GET]
        path: /transactions/{id}
        public: true
        acknowledge: [public-hole]
    """) == []


def test_public_catch_all_covering_protected_routes_is_not_a_hole_but_is_reported():
    """A public /** below protected routes is no hole (they still win), but it turns default-deny
    into default-allow for everything beside them: DELETE /api/x, /api/y, /admin."""
    warnings = lints("""\
      - name: rest
        path: /**
        public: true
      - name: api-x
        path: /api/x
        scopes: [a/b]
    """, "path_case: insensitive\n")
    assert len(warnings) == 1 and "hole" not in warnings[0], warnings
    assert "routes[0].path: public route 'rest' (/**) also covers the paths of protected route 'api-x'" in warnings[0]
    assert "acknowledge: [public-catch-all]" in warnings[0]


def test_public_catch_all_can_be_acknowledged():
    assert lints("""\
      - path: /**
        public: true
        acknowledge: [public-catch-all]
      - path: /api/x
        scopes: [a/b]
    """, "path_case: insensitive\n") == []


# --- case variants: what a case-insensitive router serves with a protected handler ----------------


def test_a_public_route_taking_case_variants_of_a_protected_path_is_named():
    warnings = lints("""\
      - name: rest
        path: /**
        public: true
        acknowledge: [public-catch-all]
      - name: admin-report
        methods: [GET]
        path: /admin/report
        scopes: [admin/read]
        acknowledge: [fallthrough]
    """)
    assert len(warnings) == 1, warnings
    assert ("routes[0].path: public route 'rest' (/**) takes case variants of the paths of protected route "
            "'admin-report' (e.g. GET /admin/Report): an app whose router ignores case serves them with the "
            "protected handler, without a token") in warnings[0]
    assert "add 'path_case: insensitive' at the top of the policy" in warnings[0]
    assert "add 'acknowledge: [case-variant]' to the public route" in warnings[0]


@pytest.mark.parametrize(("top", "acknowledge"), [("", ", case-variant"), ("path_case: insensitive\n", "")])
def test_case_variants_are_silenced_by_acknowledging_or_by_path_case_insensitive(top, acknowledge):
    assert lints(f"""\
      - name: rest
        path: /**
        public: true
        acknowledge: [public-catch-all{acknowledge}]
      - name: admin-report
        path: /admin/report
        scopes: [admin/read]
    """, top) == []


def test_case_variants_taken_by_a_public_route_spelled_otherwise_are_found():
    """Exact, not the upper-case spelling only: a public /Admin/** takes /Admin/report, which a
    case-insensitive router serves with the /admin/report handler."""
    warnings = lints("""\
      - name: admin-report
        path: /admin/report
        scopes: [admin/read]
      - name: odd
        path: /Admin/**
        public: true
    """)
    assert len(warnings) == 1 and "public route 'odd' (/Admin/**) takes case variants" in warnings[0], warnings
    assert "(e.g. GET /Admin/report)" in warnings[0]


def test_no_case_variant_warning_without_letters_or_without_a_public_route():
    assert lints("""\
      - path: /**
        public: true
        acknowledge: [public-catch-all]
      - path: /2024/{id}
        scopes: [a/b]
    """) == []
    assert lints("""\
      - path: /**
        scopes: [a/c]
      - path: /admin/report
        scopes: [a/b]
    """) == []


def test_public_catch_all_beside_protected_routes_covers_nothing():
    assert lints("""\
      - path: /docs/**
        public: true
      - path: /api/x
        scopes: [a/b]
    """) == []


REVIEW_POLICY = """\
  - name: admin-report
    methods: [GET]
    path: /admin/report
    scopes: [admin/read]
  - name: delete-transaction
    methods: [DELETE]
    path: /transactions/{id}
    scopes: [transactions/delete]
  - name: get-transaction
    methods: [GET]
    path: /transactions/{id}
    scopes: [transactions/get]
  - name: everything-else
    path: /**
    public: true
    acknowledge: [public-catch-all, case-variant]
"""


def test_methods_falling_through_to_a_public_route_are_reported_with_the_methods():
    warnings = lints(REVIEW_POLICY)
    assert len(warnings) == 2, warnings
    admin, tx = sorted(warnings, key=lambda w: "admin" not in w)
    assert "routes[0].methods: route 'admin-report' takes only GET; " in admin
    assert "POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT, QUERY and any other method" in admin
    assert "fall through to route 'everything-else' (/**), which is public (e.g. DELETE /admin/report)" in admin
    assert "HEAD" not in admin.split("fall through")[0].split("takes only")[1], "GET implies HEAD"
    # Two method-limited siblings share a path: only what neither takes falls through.
    assert ("routes[1].methods: route 'delete-transaction' takes only DELETE; 'get-transaction' takes only GET; "
            "POST, PUT, PATCH, OPTIONS") in tx
    assert "GET" not in tx.split("takes only GET;")[1].split("fall through")[0]


def test_fallthrough_can_be_acknowledged_per_route():
    policy = REVIEW_POLICY.replace("    scopes: [admin/read]\n", "    scopes: [admin/read]\n    acknowledge: [fallthrough]\n")
    warnings = lints(policy)
    assert len(warnings) == 1 and "admin-report" not in warnings[0], warnings


@pytest.mark.parametrize(("rest", "why"), [
    ("scopes: [transactions/get]", "accepts scopes this route does not (transactions/get)"),
    ("scopes: [admin/read]\n        mode: dry-run", "is dry-run"),
])
def test_fallthrough_to_a_weaker_protected_route(rest, why):
    assert_fallthrough("scopes: [admin/read]", rest, why)


def assert_fallthrough(route: str, rest: str, why: str | None) -> None:
    """A GET-only route (``route``: its requirements) under a /** route (``rest``): ``why`` is the
    fall-through warning's reason, None for no warning."""
    warnings = lints(f"""\
      - name: admin-report
        methods: [GET]
        path: /admin/report
        {route}
      - name: rest
        path: /**
        {rest}
    """)
    if why is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and why in warnings[0], warnings


def test_fallthrough_to_a_stricter_or_equal_route_is_fine():
    assert lints("""\
      - name: admin-report
        methods: [GET]
        path: /admin/report
        scopes: [admin/read, admin/all]
      - name: admin
        path: /admin/**
        scopes: [admin/all]
    """) == []


def test_unknown_acknowledge_code_is_an_error():
    with pytest.raises(PolicyError, match="'fall-through' is not a lint warning code; known: case-variant, fallthrough, "):
        parse_policy(ISSUERS + "routes:\n  - path: /x\n    public: true\n    acknowledge: [fall-through]\n", "p.yaml")


# --- test ----------------------------------------------------------------------------------------


def test_example_tests_pass_through_the_cli():
    run = cli("test", str(EXAMPLES / "policy.yaml"), str(EXAMPLES / "policy-tests.yaml"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "11 passed, 0 failed" in run.stdout
    assert "FAIL" not in run.stdout


def test_a_broken_expectation_exits_1_with_a_readable_report(tmp_path):
    tests = tmp_path / "t.yaml"
    tests.write_text("tests:\n  - name: reader can create?\n    method: POST\n    path: /transactions\n"
                     "    scopes: [transactions/get]\n    expect: allow\n    status: 200\n"
                     "  - name: health\n    method: GET\n    path: /healthz\n    expect: allow\n")
    run = cli("test", str(EXAMPLES / "policy.yaml"), str(tests))
    assert run.returncode == 1
    assert f"FAIL  reader can create? ({tests}:2): POST /transactions (scopes [transactions/get])" in run.stdout
    assert "expected: allow 200" in run.stdout
    assert "got:      deny 403 route=create-transaction reason=insufficient_scope" in run.stdout
    assert "differs:  expect, status" in run.stdout
    assert "PASS  health" in run.stdout
    assert "1 passed, 1 failed" in run.stdout


def test_client_allow_list_is_checked_by_the_real_verifier(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\n    client_ids: [good]\n"
                      "routes:\n  - path: /a\n    scopes: [a/b]\n")
    tests = tmp_path / "t.yaml"
    tests.write_text("tests:\n  - {method: GET, path: /a, scopes: [a/b], client_id: good, expect: allow}\n"
                     "  - {method: GET, path: /a, scopes: [a/b], client_id: evil, expect: deny, status: 401,"
                     " reason: client_not_allowed}\n")
    run = cli("test", str(policy), str(tests))
    assert run.returncode == 0, run.stdout


TRUSTED_POOL = "us-east-1_Abc123"


@pytest.mark.parametrize(("issuer", "reason"), [
    # Another pool signs with keys of its own, which no JWKS the policy trusts publishes.
    ("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Evil00001", "unknown_key"),
    ("https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Abc123", "unknown_key"),
    # The trusted pool under the issuer format the policy does not accept: its key, another iss.
    (f"https://issuer-cognito-idp.us-east-1.amazonaws.com/{TRUSTED_POOL}", "wrong_issuer"),
])
async def test_the_simulator_refuses_another_issuers_token_as_the_server_does(key_a, issuer, reason):
    """`test` and `explain` mint tokens for the issuer a case names; the server verifies the token a
    pool signed against the keys the policy's pools publish. Both must give the same reason."""
    from authz_service.tokens import TokenVerifier
    from authz_service.tools.simulate import Simulator, run_check

    from .conftest import MemoryKeys, make_key

    policy = parse_policy(f"issuers:\n  - user_pool_id: {TRUSTED_POOL}\nroutes:\n  - path: /a\n    scopes: [a/b]\n")
    signer = key_a if issuer.endswith("/" + TRUSTED_POOL) else make_key("kid-of-another-pool")
    server = await run_check(policy, TokenVerifier(MemoryKeys(key_a, issuer=policy.issuers[0].issuer)), "GET", "/a",
                             signer.token(iss=issuer, scope="a/b"))
    simulator = Simulator(policy)
    simulated = await run_check(policy, simulator.verifier, "GET", "/a", simulator.token(issuer, ["a/b"]))
    assert (server.decision.reason.value, simulated.decision.reason.value) == (reason, reason)


def test_deny_list_cases_by_client_and_by_jti(tmp_path):
    run = run_cases(tmp_path, ISSUERS + "deny: {client_ids: [leaked], jtis: [stolen-jti]}\n"
                    "routes:\n  - path: /a\n    scopes: [a/b]\n  - {path: /h, public: true}\n",
                    "tests:\n  - {method: GET, path: /a, scopes: [a/b], client_id: leaked, expect: deny, status: 401,"
                    " reason: deny_listed}\n"
                    "  - {method: GET, path: /a, scopes: [a/b], jti: stolen-jti, expect: deny, reason: deny_listed}\n"
                    "  - {method: GET, path: /a, scopes: [a/b], jti: another-jti, expect: allow}\n"
                    "  - {method: GET, path: /h, client_id: leaked, expect: allow, reason: public}\n")
    assert run.returncode == 0, run.stdout
    assert "(scopes [a/b] jti stolen-jti) -> deny 401 route=ANY /a reason=deny_listed" in run.stdout


def test_validate_prints_the_code_of_an_unknown_path_parameter(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ISSUERS + "routes:\n  - path: /t/{id}\n    scopes: [r/x]\n"
                    "    claims: {tenant: {equals_param: tenant}}\n")
    out = io.StringIO()
    assert validate_command([path], strict=False, out=out) == 1
    first = out.getvalue().splitlines()[0]
    assert first.startswith(f"{path}:6:37: ")
    assert "routes[0].claims.tenant.equals_param: 'tenant' is not a parameter of the route's path" in first
    assert first.endswith("or add {tenant} to the path [unknown-path-parameter]")


def test_dry_run_expectation(tmp_path):
    run = run_cases(tmp_path, ISSUERS + "routes:\n  - path: /a\n    scopes: [a/b]\n    mode: dry-run\n",
                    "tests:\n  - {method: GET, path: /a, scopes: [a/c], expect: dry_run_deny, status: 200,"
                    " reason: insufficient_scope}\n")
    assert run.returncode == 0, run.stdout


def run_cases(tmp_path, policy_text: str, tests_text: str) -> subprocess.CompletedProcess[str]:
    """`authz-service test` on a policy and a tests file written from these texts."""
    policy, tests = tmp_path / "p.yaml", tmp_path / "t.yaml"
    policy.write_text(policy_text)
    tests.write_text(tests_text)
    return cli("test", str(policy), str(tests))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tests:\n  - method: GET\n    path: /a\n    expect: allow\n    scope: [a/b]\n",
         "t.yaml:5:5: tests[0]: unknown key 'scope'"),
        ("tests:\n  - method: GET\n    path: /a\n    expect: maybe\n", "t.yaml:4:13: tests[0].expect: must be one of"),
        ("tests:\n  - method: GET\n    expect: allow\n", "t.yaml:2:5: tests[0]: 'path' is required"),
        ("tests:\n  - {method: GET, path: /a, expect: deny, status: '403'}\n", "tests[0].status"),
        ("tests:\n  - {method: GET, path: /a, expect: deny, scopes: a/b}\n", "tests[0].scopes"),
        ("tests: []\n", "non-empty list"),
        ("tests: [\n", "t.yaml:2:1: not valid YAML: "),  # file:line:column, as a policy's
        # a reason that does not exist never matches: the case would fail whatever the policy says
        ("tests:\n  - {method: GET, path: /a, expect: deny, reason: insufficent_scope}\n",
         "t.yaml:2:51: tests[0].reason: 'insufficent_scope' is no reason; one of allowed, public, missing_token,"),
        ("cases: []\n", "one key, 'tests'"),
        # claims: the custom claims of the simulated token, as a pre token generation trigger adds them
        *((f"tests:\n  - method: GET\n    path: /a\n    {claims}\n    expect: allow\n", message) for claims, message in [
            ("claims: [tenant]", "tests[0].claims: must be a mapping of claim name to JSON value"),
            ("claims: {}", "tests[0].claims: must be a mapping"),
            ("claims: {when: 2024-01-01}", "tests[0].claims: must be a mapping of claim name to JSON value"),
            ("claims: {client_id: x}", "tests[0].claims.client_id: 'client_id' is set by Cognito"),
            ("claims: {exp: 1}", "'exp' is set by Cognito, not by a pre token generation trigger"),
        ]),
    ],
)
@pytest.mark.usefixtures("yaml_parser")
def test_bad_tests_files_are_errors_with_a_line(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(CaseFileError) as caught:
        load_tests(path)
    assert message in str(caught.value)
    run = cli("test", str(EXAMPLES / "policy.yaml"), str(path))
    # exit 2 (the file cannot be used): the error on stderr, as every command's, stdout empty
    assert run.returncode == 2 and run.stdout == "" and message in run.stderr
    assert run.stderr.startswith("authz-service test: error: ") and len(run.stderr.splitlines()) == 1


def test_a_tests_file_is_read_through_the_safe_reader(tmp_path):
    """Like a policy: a FIFO is never opened (it would block), /dev/zero never read, and a file that
    is not UTF-8 gets the same message as a policy's."""
    fifo, zero, latin = tmp_path / "fifo.yaml", tmp_path / "zero.yaml", tmp_path / "latin.yaml"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    latin.write_bytes(b"tests:\n  - method: GET\n    path: /caf\xe9\n    expect: allow\n")
    for path, message in [(fifo, f"{fifo}: not a regular file (a FIFO); point the path at a regular file"),
                          (zero, f"{zero}: not a regular file (a character device)"),
                          (latin, f"{latin}: not UTF-8 text (byte 37); save the file as UTF-8")]:
        with pytest.raises(CaseFileError, match=f"^{re.escape(message)}"):
            load_tests(path)
        run = cli("test", str(EXAMPLES / "policy.yaml"), str(path))
        assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
        assert run.stderr.startswith(f"authz-service test: error: {message}")


# --- the reachability analysis is exact: no concrete request reaches a route it calls unreachable ---

SEGMENTS = ["a", "b", "B", "{p}"]


@st.composite
def small_policies(draw: st.DrawFn) -> str:
    routes = []
    for i in range(draw(st.integers(1, 6))):
        parts = draw(st.lists(st.sampled_from(SEGMENTS), max_size=3))
        names = iter(f"{{p{k}}}" for k in range(9))
        path = "/" + "/".join(next(names) if p == "{p}" else p for p in parts)
        if draw(st.booleans()):
            path = path.rstrip("/") + "/**"
        methods = draw(st.sampled_from([None, ["GET"], ["POST"], ["GET", "POST"]]))
        access = "public: true" if draw(st.integers(0, 3)) == 0 else "scopes: [a/b]"
        route = f"  - name: r{i}\n    path: '{path}'\n    {access}\n"
        if methods:
            route += f"    methods: [{', '.join(methods)}]\n"
        routes.append(route)
    return ISSUERS + "routes:\n" + "".join(routes)


@settings(max_examples=200, deadline=None)
@given(small_policies(), st.lists(st.tuples(st.sampled_from(["GET", "POST", "PUT"]),
                                            st.lists(st.sampled_from(["a", "A", "b", "B", "c", "zz"]), max_size=5),
                                            st.booleans()), min_size=1, max_size=30))
def test_every_concrete_request_reaches_only_routes_the_analysis_found_reachable(text, requests):
    """Every route a concrete request must meet (both readings of a trailing '/') was found, and so
    was every public route taking a case variant that a case-insensitive router would protect."""
    try:
        policy = parse_policy(text, "p.yaml")
    except PolicyError:
        return  # conflicting routes: the loader refuses them, nothing to analyse
    reach = reachability(policy)
    assert reach is not None
    folded = policy.case_folded()
    for method, segments, trailing_slash in requests:
        path = tuple(segments) + (("",) if trailing_slash and segments else ())
        routes = policy.routes_for(method, path)
        for route in routes:
            assert method in reach.chosen[route.index], (route.name, method, path)
            if not trailing_slash or not segments:
                assert route.index in reach.plain, (route.name, method, path)
        if routes and all(r.public for r in routes):
            for other in folded.routes_for(method, path):
                assert other.public or (routes[0].index, other.index) in reach.cases, (routes[0].name, other.name, path)


# --- route conditions, issuer formats, the issue's public catch-all example -------------------------


def test_the_public_catch_all_example_warns_and_explain_shows_the_allow(tmp_path):
    """A method-limited admin route under a public catch-all: DELETE /admin/users/1 is not taken by
    the admin route, falls to the public /**, and passes without a token. validate --strict must say
    so before explain has to."""
    routes = """\
      - name: admin-read
        methods: [GET]
        path: /admin/**
        scopes: [admin/read]
      - name: site
        path: /**
        public: true
    """
    policy = tmp_path / "p.yaml"
    policy.write_text(ISSUERS + "routes:\n" + textwrap.dedent(routes))
    run = cli("explain", "--policy", str(policy), "--method", "DELETE", "--path", "/admin/users/1")
    assert run.returncode == 0 and "decision:  ALLOW, reason public" in run.stdout, run.stdout
    warnings = lints(routes)
    catch_all = [w for w in warnings if "also covers the paths of protected route 'admin-read'" in w]
    assert len(catch_all) == 1 and "acknowledge: [public-catch-all]" in catch_all[0], warnings
    assert cli("validate", "--strict", str(policy)).returncode == 1


def test_all_scopes_duplicates_and_overlap_with_scopes_warn():
    warnings = lints("""\
      - path: /a
        scopes: [a/x, a/y]
        all_scopes: [a/y, a/z, a/z]
    """)
    assert len(warnings) == 2, warnings
    assert "routes[0].all_scopes[0]: scope 'a/y' is in both scopes and all_scopes" in warnings[0]
    assert "routes[0].all_scopes[2]: scope 'a/z' is listed twice" in warnings[1]


def test_all_scopes_are_linted_for_cognito_shape_too():
    (warning,) = lints("  - {path: /a, all_scopes: [openid]}\n")
    assert "routes[0].all_scopes[0]: 'openid' is a user-pool (OpenID) scope" in warning


@pytest.mark.parametrize(("value", "reads"), [("yes", "true"), ("on", "true"), ("010", "8"), ("1_000", "1000"),
                                              ("0x1f", "31"), ("No", "false")])
@pytest.mark.usefixtures("yaml_parser")
def test_claim_values_yaml_reads_otherwise_warn(value, reads):
    (warning,) = lints(f"  - {{path: /a, scopes: [a/b], claims: {{flag: {value}}}}}\n")
    assert f"routes[0].claims.flag: YAML reads '{value}' as {reads}" in warning
    assert f"or quote the text: '{value}'" in warning


def test_claim_values_written_as_json_do_not_warn():
    assert lints("  - {path: /a, scopes: [a/b], claims: {a: true, b: 3, c: -2.5e3, d: 'yes', "
                 "e: {any_of: [gold, 1, false]}, f: {equals: 0}}}\n") == []
    (warning,) = lints("  - {path: /a, scopes: [a/b], claims: {e: {any_of: [gold, on]}}}\n")
    assert "routes[0].claims.e.any_of[1]: YAML reads 'on' as true" in warning


@pytest.mark.parametrize(("rest", "why"), [
    ("scopes: [admin/read]", "does not require the claim condition tenant = 'acme'"),
    ("scopes: [admin/read]\n        claims: {tenant: acme}", None),
    ("all_scopes: [admin/read]\n        claims: {tenant: acme}", None),
    ("scopes: [admin/read, other/x]\n        claims: {tenant: acme}", "accepts scopes this route does not (other/x)"),
])
def test_fallthrough_to_a_route_without_the_conditions(rest, why):
    assert_fallthrough("scopes: [admin/read]\n        claims: {tenant: acme}", rest, why)


@pytest.mark.parametrize(("route", "rest", "why"), [
    ("all_scopes: [a/x, a/y]", "scopes: [a/x]", "does not require all of a/y"),
    ("all_scopes: [a/x, a/y]", "all_scopes: [a/y, a/x, a/z]", None),
    ("scopes: [a/x]\n        client_ids: [bot]", "scopes: [a/x]", "accepts clients this route does not"),
    ("scopes: [a/x]\n        client_ids: [bot]", "scopes: [a/x]\n        client_ids: [bot]", None),
    ("scopes: [a/x, a/y]", "all_scopes: [a/y, a/q]", None),  # holding a/y meets "any of a/x a/y"
])
def test_fallthrough_compares_all_scopes_and_clients(route, rest, why):
    assert_fallthrough(route, rest, why)


def explain_issuers(tmp_path, issuers: str) -> tuple[Path, list[str]]:
    """``validate --explain-issuers`` on a policy of these ``issuers:`` entries: (its path, the lines)."""
    policy = tmp_path / "p.yaml"
    policy.write_text(f"issuers:\n{issuers}routes:\n  - {{path: /a, scopes: [a/b]}}\n")
    run = cli("validate", "--explain-issuers", str(policy))
    assert run.returncode == 0, run.stdout
    return policy, run.stdout.splitlines()


def test_validate_explain_issuers_lists_every_accepted_iss_and_jwks(tmp_path):
    policy, lines = explain_issuers(tmp_path, "  - user_pool_id: us-east-1_Multi1\n    issuer_format: updated\n"
                                              "    replica_regions: [eu-west-1]\n    client_ids: [app-1, app-2]\n"
                                              "  - user_pool_id: eu-central-1_Old\n")
    assert lines == [
        f"{policy}: OK: 1 route, 2 issuers (3 accepted iss), 0 warnings",
        "  issuers[0] us-east-1_Multi1 (updated issuer format) accepts app clients app-1, app-2, with iss:",
        "    https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_Multi1  (region us-east-1)",
        "      keys from https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_Multi1/.well-known/jwks.json",
        "    https://issuer-cognito-idp.eu-west-1.amazonaws.com/us-east-1_Multi1  (replica region eu-west-1)",
        "      keys from https://issuer-cognito-idp.eu-west-1.amazonaws.com/us-east-1_Multi1/.well-known/jwks.json",
        "  issuers[1] eu-central-1_Old (original issuer format) accepts any app client of the pool, with iss:",
        "    https://cognito-idp.eu-central-1.amazonaws.com/eu-central-1_Old  (region eu-central-1)",
        "      keys from https://cognito-idp.eu-central-1.amazonaws.com/eu-central-1_Old/.well-known/jwks.json",
    ]
    assert "issuers[0]" not in cli("validate", str(policy)).stdout  # only on request


def test_validate_explain_issuers_never_shows_jwks_credentials(tmp_path):
    _, lines = explain_issuers(tmp_path, "  - user_pool_id: us-east-1_Abc123\n"
                                         "    jwks_uri: https://keys-user:s3cret@keys.example/jwks.json?sig=s3cret\n")
    assert "      keys from https://keys.example/jwks.json" in lines
    assert not [line for line in lines if "s3cret" in line or "keys-user" in line]


def test_custom_claims_example_passes_through_the_cli():
    run = cli("test", str(EXAMPLES / "policy-custom-claims.yaml"), str(EXAMPLES / "policy-custom-claims-tests.yaml"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12 passed, 0 failed" in run.stdout
    assert cli("validate", "--strict", str(EXAMPLES / "policy-custom-claims.yaml")).returncode == 0


def test_case_claims_reach_the_real_decision(tmp_path):
    run = run_cases(tmp_path,
                    ISSUERS + "routes:\n  - {name: r, path: /a, scopes: [a/b], claims: {level: {any_of: [2, 3]}}}\n",
                    "tests:\n  - {method: GET, path: /a, scopes: [a/b], claims: {level: 3}, expect: allow}\n"
                    "  - {method: GET, path: /a, scopes: [a/b], claims: {level: '3'}, expect: allow}\n")
    assert run.returncode == 1
    assert 'PASS  GET /a: GET /a (scopes [a/b] claims {"level":3}) -> allow 200 route=r reason=allowed' in run.stdout
    assert "got:      deny 403 route=r reason=claim_mismatch" in run.stdout


def test_a_policy_test_cannot_use_is_exit_2_with_every_error_on_stderr(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: x\n    scopes: [a/b]\n"
                      "  - path: /y\n    bogus: 1\n")
    run = cli("test", str(policy), str(EXAMPLES / "policy-tests.yaml"))
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[0].startswith(f"authz-service test: error: {policy}:4:11: routes[0].path: 'x' must start with '/'")
    assert lines[1].startswith(f"authz-service test: error: {policy}:7:5: routes[1]: unknown key 'bogus'")
    assert lines[2] == f"authz-service test: error: {policy}: REFUSED: 2 errors (the server would not load this file)"
