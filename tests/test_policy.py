"""Policy loading (every mistake is a PolicyError naming file + place) and route matching."""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service.policy import (POLICY_MAX_BYTES, DenyList, Mode, PathCase, PolicyError, check_policy,
                                  deny_list_sizes, load_policy_file,
                                  parse_policy, read_policy_file)

from authz_service import yamlfile

from .test_policytool import REVIEW_POLICY

ROOT = Path(__file__).resolve().parents[1]

SOURCE = "policies/test.yaml"
ISSUERS = "issuers:\n  - user_pool_id: us-east-1_Abc123\n"


def load(text: str):
    return parse_policy(textwrap.dedent(text), source=SOURCE)


def routes_policy(routes_yaml: str, extra: str = ""):
    return load(ISSUERS + extra + "routes:\n" + textwrap.dedent(routes_yaml))


def refused(text: str | bytes) -> str:
    data = textwrap.dedent(text) if isinstance(text, str) else text
    with pytest.raises(PolicyError) as caught:
        parse_policy(data, source=SOURCE)
    message = str(caught.value)
    assert SOURCE in message, message
    return message


def segs(path: str) -> tuple[str, ...]:
    # Same split as request.parse_check_request: "/" -> (), "/a/" -> ("a", "").
    return tuple(path[1:].split("/")) if path != "/" else ()


def matched_name(policy, method: str, path: str) -> str | None:
    route = policy.match(method, segs(path))
    return route.name if route is not None else None


# --- defaults ------------------------------------------------------------------------------------


def test_issuer_defaults_are_derived_from_the_pool_id():
    policy = routes_policy("  - path: /a\n    scopes: [r]\n")
    (issuer,) = policy.issuers
    assert issuer.user_pool_id == "us-east-1_Abc123"
    assert issuer.region == "us-east-1"
    assert issuer.issuer == "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Abc123"
    assert issuer.jwks_uri == "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Abc123/.well-known/jwks.json"
    assert issuer.client_ids is None
    assert policy.issuers_by_iss[issuer.issuer] is issuer
    assert policy.source == SOURCE
    assert len(policy.sha256) == 64


def test_issuer_overrides_and_client_allow_list():
    policy = load(
        """
        issuers:
          - user_pool_id: eu-west-2_Xyz
            region: eu-west-2
            issuer: http://127.0.0.1:9000/eu-west-2_Xyz
            client_ids: [client-a, client-b]
          - user_pool_id: us-gov-west-1_Q1
            jwks_uri: https://keys.example/jwks.json
        routes:
          - path: /a
            scopes: [r]
        """
    )
    first, second = policy.issuers
    assert first.issuer == "http://127.0.0.1:9000/eu-west-2_Xyz"
    assert first.jwks_uri == "http://127.0.0.1:9000/eu-west-2_Xyz/.well-known/jwks.json"
    assert first.client_ids == frozenset({"client-a", "client-b"})
    assert second.region == "us-gov-west-1"
    assert second.issuer == "https://cognito-idp.us-gov-west-1.amazonaws.com/us-gov-west-1_Q1"
    assert second.jwks_uri == "https://keys.example/jwks.json"


def test_route_defaults_names_and_modes():
    policy = routes_policy(
        """\
          - path: /a
            scopes: [r]
          - methods: [POST, GET]
            path: /b/{id}
            scopes: [w, r]
            mode: enforce
          - name: health
            path: /healthz
            public: true
          - path: /c
            scopes: [r]
            mode: dry-run
        """,
        extra="mode: dry-run\n",
    )
    a, b, health, c = policy.routes
    assert a.name == "ANY /a" and a.methods is None and a.mode is Mode.DRY_RUN and not a.public
    assert b.name == "POST|GET /b/{id}" and b.methods == frozenset({"GET", "POST"})
    assert b.mode is Mode.ENFORCE
    assert b.scopes == frozenset({"w", "r"}) and b.scopes_text == "r w"
    assert health.name == "health" and health.public and health.scopes == frozenset()
    assert c.mode is Mode.DRY_RUN
    assert [r.index for r in policy.routes] == [0, 1, 2, 3]


def test_forward_token_defaults_to_false_and_a_route_overrides_the_policy():
    routes = """\
      - path: /a
        scopes: [r]
      - path: /b
        public: true
        forward_token: true
      - path: /c
        scopes: [r]
        forward_token: false
    """
    assert [r.forward_token for r in routes_policy(routes).routes] == [False, True, False]
    assert [r.forward_token for r in routes_policy(routes, extra="forward_token: true\n").routes] == [True, True, False]


@pytest.mark.parametrize(("extra", "route", "place"), [
    ("forward_token: yes please\n", "", "forward_token"),
    ("", "    forward_token: 1\n", "routes[0].forward_token"),
])
def test_forward_token_must_be_a_boolean(extra, route, place):
    message = refused(ISSUERS + extra + "routes:\n  - path: /a\n    scopes: [r]\n" + route)
    assert f"{place}: must be true or false" in message


def test_client_labels_are_the_client_ids_the_policy_names():
    """Issuer and route client_ids label the per-client metrics; any other client is 'other', so no
    token can add a series."""
    policy = load("""\
        issuers:
          - user_pool_id: us-east-1_Abc123
            client_ids: [client-a, client-b]
          - user_pool_id: us-east-1_Def456
        routes:
          - path: /a
            scopes: [r]
            client_ids: [client-c, client-a]
          - path: /b
            scopes: [r]
        """)
    assert policy.clients == frozenset({"client-a", "client-b", "client-c"})
    assert [policy.client_label(c) for c in ("client-a", "client-c", "client-z", "")] == [
        "client-a", "client-c", "other", "other"]
    assert routes_policy("  - path: /a\n    scopes: [r]\n").clients == frozenset()
    assert routes_policy("  - path: /a\n    scopes: [r]\n", extra="path_case: insensitive\n").case_folded().clients == (
        frozenset())


def test_top_level_mode_defaults_to_enforce():
    policy = routes_policy("  - path: /a\n    scopes: [r]\n")
    assert policy.routes[0].mode is Mode.ENFORCE


def test_example_policy_file_loads(tmp_path):
    from importlib.resources import files

    text = files("authz_service").joinpath("examples/policy.yaml").read_bytes()
    path = tmp_path / "policy.yaml"
    path.write_bytes(text)
    policy = load_policy_file(path)
    assert policy.source == str(path)
    assert matched_name(policy, "GET", "/transactions/42") == "get-transaction"
    assert matched_name(policy, "POST", "/transactions") == "create-transaction"
    assert matched_name(policy, "DELETE", "/transactions") is None


def test_unreadable_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="nope.yaml"):
        load_policy_file(missing)


def read_in_thread(path):
    """read_policy_file in a thread, so a reader that blocks (the old one on a FIFO) fails the test
    instead of hanging it; the blocked thread is released by opening the FIFO's other end."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["data"] = read_policy_file(path)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # unblocks the reader's open
        thread.join(10)
        pytest.fail(f"reading {path} blocked")
    return outcome


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    error = read_in_thread(fifo).get("error")
    assert isinstance(error, PolicyError) and str(error).startswith(f"{fifo}: not a regular file (a FIFO); point")


@pytest.mark.parametrize("target, kind", [("/dev/zero", "a character device"), (".", "a directory")])
def test_devices_and_directories_are_refused(tmp_path, target, kind):
    link = tmp_path / "policy.yaml"
    link.symlink_to(target if target.startswith("/") else tmp_path)
    with pytest.raises(PolicyError, match=f"^{re.escape(str(link))}: not a regular file \\({kind}\\)"):
        load_policy_file(link)


def test_a_file_over_the_cap_is_refused_by_size_and_one_at_it_loads(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"#" * (POLICY_MAX_BYTES + 1))
    with pytest.raises(PolicyError, match=f"{POLICY_MAX_BYTES + 1} bytes is larger than a policy file may be "
                                          f"\\({POLICY_MAX_BYTES} bytes, 1 MiB\\)"):
        load_policy_file(path)
    text = (ISSUERS + "routes:\n  - path: /a\n    public: true\n#").encode()
    path.write_bytes(text + b"#" * (POLICY_MAX_BYTES - len(text)))  # exactly at the cap
    assert load_policy_file(path).routes[0].path == "/a"


def test_a_file_growing_past_the_cap_while_read_is_refused(tmp_path):
    """st_size is only a hint: a file that grows after fstat is still cut at the cap (reads count)."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"")
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size as it was before a writer appended the rest
        return os.stat_result((*real_fstat(fd)[:6], 0, *real_fstat(fd)[7:]))

    path.write_bytes(b"#" * (POLICY_MAX_BYTES + 10))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fstat", stale_fstat)
        with pytest.raises(PolicyError, match="larger than a policy file may be"):
            read_policy_file(path)


# --- every mistake is a PolicyError that names the file, the place and the problem ---------------

GOOD_ROUTE = "  - path: /ok\n    scopes: [r]\n"

UPDATED_POOL = "issuers:\n  - user_pool_id: us-east-1_A\n    issuer_format: updated\n"
MISTAKES = [
    # (id, policy text, fragments the message must contain)
    ("unknown top key", ISSUERS + "route:\n" + GOOD_ROUTE, ["top level", "'route'"]),
    ("bad path_case", ISSUERS + "path_case: ignore\nroutes:\n" + GOOD_ROUTE, ["path_case", "'insensitive'"]),
    ("forward_token not a boolean", ISSUERS + "forward_token: 'no'\nroutes:\n" + GOOD_ROUTE,
     ["forward_token", "true or false"]),
    ("route forward_token not a boolean", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    forward_token: []\n",
     ["routes[0].forward_token", "true or false"]),
    ("trailing slash pattern", ISSUERS + "routes:\n  - path: /a/b/\n    scopes: [r]\n",
     ["routes[0].path", "cannot end in '/'", "write '/a/b'"]),
    ("unknown issuer key", "issuers:\n  - user_pool_id: us-east-1_A\n    pool: x\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0]", "'pool'"]),
    ("unknown route key", ISSUERS + "routes:\n" + GOOD_ROUTE + "  - path: /x\n    scope: [r]\n",
     ["routes[1]", "'scope'"]),
    ("missing issuers", "routes:\n" + GOOD_ROUTE, ["issuers"]),
    ("empty issuers", "issuers: []\nroutes:\n" + GOOD_ROUTE, ["issuers", "non-empty"]),
    ("missing routes", ISSUERS, ["routes"]),
    ("empty routes", ISSUERS + "routes: []\n", ["routes", "non-empty"]),
    ("issuer not a mapping", "issuers: [us-east-1_A]\nroutes:\n" + GOOD_ROUTE, ["issuers[0]"]),
    ("missing pool id", "issuers:\n  - region: us-east-1\nroutes:\n" + GOOD_ROUTE, ["issuers[0]", "user_pool_id"]),
    ("bad pool id", "issuers:\n  - user_pool_id: Abc123\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0].user_pool_id", "Abc123"]),
    ("region mismatch", "issuers:\n  - user_pool_id: us-east-1_A\n    region: us-west-2\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0].region", "us-west-2"]),
    ("issuer not a url", "issuers:\n  - user_pool_id: us-east-1_A\n    issuer: cognito\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0].issuer"]),
    ("client_ids a string", "issuers:\n  - user_pool_id: us-east-1_A\n    client_ids: abc\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0].client_ids", "[abc]"]),
    ("duplicate issuer", "issuers:\n  - user_pool_id: us-east-1_A\n  - user_pool_id: us-east-1_A\nroutes:\n"
     + GOOD_ROUTE, ["issuers[1]", "twice"]),
    ("client id with newline", 'issuers:\n  - user_pool_id: us-east-1_A\n    client_ids: ["abc\\n"]\nroutes:\n'
     + GOOD_ROUTE, ["issuers[0].client_ids[0]"]),
    ("pool id with newline", 'issuers:\n  - user_pool_id: "us-east-1_A\\n"\nroutes:\n' + GOOD_ROUTE,
     ["issuers[0].user_pool_id"]),
    ("issuer with newline", 'issuers:\n  - user_pool_id: us-east-1_A\n    issuer: "https://idp.example/p\\n"\n'
     '    jwks_uri: https://idp.example/jwks\nroutes:\n' + GOOD_ROUTE, ["issuers[0].issuer"]),
    ("name with newline", ISSUERS + 'routes:\n  - name: "ok\\n"\n    path: /a\n    scopes: [r]\n', ["routes[0].name"]),
    ("route not a mapping", ISSUERS + "routes:\n  - /a\n", ["routes[0]"]),
    ("missing path", ISSUERS + "routes:\n  - scopes: [r]\n", ["routes[0]", "'path'"]),
    ("missing scopes", ISSUERS + "routes:\n" + GOOD_ROUTE + "  - path: /a\n", ["routes[1]", "scopes"]),
    ("scopes a string", ISSUERS + "routes:\n  - path: /a\n    scopes: read\n", ["routes[0].scopes", "[read]"]),
    ("scopes empty", ISSUERS + "routes:\n  - path: /a\n    scopes: []\n", ["routes[0].scopes"]),
    ("scope with a space", ISSUERS + "routes:\n  - path: /a\n    scopes: [ok, 'a b']\n",
     ["routes[0].scopes[1]", "'a b'"]),
    ("scope with a quote", ISSUERS + "routes:\n  - path: /a\n    scopes: ['a\"b']\n", ["routes[0].scopes[0]"]),
    ("scope not a string", ISSUERS + "routes:\n  - path: /a\n    scopes: [1]\n", ["routes[0].scopes[0]"]),
    ("public with scopes", ISSUERS + "routes:\n  - path: /a\n    public: true\n    scopes: [r]\n",
     ["routes[0]", "public"]),
    ("public not a bool", ISSUERS + "routes:\n  - path: /a\n    public: maybe\n", ["routes[0].public"]),
    ("lowercase method", ISSUERS + "routes:\n  - path: /x\n    scopes: [r]\n"
     "  - path: /y\n    scopes: [r]\n  - path: /a\n    methods: [get]\n    scopes: [r]\n",
     ["routes[2].methods[0]", "'get'", "'GET'"]),
    ("methods a string", ISSUERS + "routes:\n  - path: /a\n    methods: GET\n    scopes: [r]\n",
     ["routes[0].methods"]),
    ("method twice", ISSUERS + "routes:\n  - path: /a\n    methods: [GET, GET]\n    scopes: [r]\n",
     ["routes[0].methods", "twice"]),
    ("bad top mode", ISSUERS + "mode: audit\nroutes:\n" + GOOD_ROUTE, ["mode", "'audit'"]),
    ("unknown version", ISSUERS + "version: 2\nroutes:\n" + GOOD_ROUTE,
     ["policies/test.yaml:3:10: version: 2 is not a policy format", "reads version 1", "write 'version: 1'", "upgrade"]),
    ("version a string", 'version: "1"\n' + ISSUERS + "routes:\n" + GOOD_ROUTE, [":1:10: version: '1'"]),
    ("version a boolean", "version: true\n" + ISSUERS + "routes:\n" + GOOD_ROUTE, [":1:10: version: True"]),
    ("bad route mode", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    mode: dryrun\n",
     ["routes[0].mode", "dryrun"]),
    ("bad name", ISSUERS + "routes:\n  - name: '#x'\n    path: /a\n    scopes: [r]\n", ["routes[0].name"]),
    ("conflicting routes", ISSUERS + "routes:\n  - path: /a/{id}\n    scopes: [r]\n"
     "  - path: /b\n    scopes: [r]\n  - path: /a/{name}\n    scopes: [w]\n",
     ["routes[2]", "routes[0]", "conflicts"]),
    ("duplicate yaml key", ISSUERS + "routes:\n  - path: /a\n    path: /b\n    scopes: [r]\n",
     ["duplicate key", "'path'", ":5:5:"]),
    ("duplicate top key", ISSUERS + "routes:\n" + GOOD_ROUTE + "routes:\n" + GOOD_ROUTE, ["duplicate key"]),
    ("not yaml", "issuers: [\n  - {{{\n", ["not valid YAML"]),
    ("yaml but a string", "just some text\n", ["mapping"]),
    ("yaml but a list", "- a\n- b\n", ["mapping"]),
    ("empty file", "", ["mapping"]),
    ("python tag", "!!python/object:os.system {}\n", ["YAML"]),
    ("bad issuer format", "issuers:\n  - user_pool_id: us-east-1_A\n    issuer_format: new\nroutes:\n" + GOOD_ROUTE,
     ["issuers[0].issuer_format", "'new'", "'updated'"]),
    ("replicas need updated", "issuers:\n  - user_pool_id: us-east-1_A\n    replica_regions: [eu-west-1]\nroutes:\n"
     + GOOD_ROUTE, ["issuers[0].replica_regions", "issuer_format: updated"]),
    ("replicas with original", "issuers:\n  - user_pool_id: us-east-1_A\n    issuer_format: original\n"
     "    replica_regions: [eu-west-1]\nroutes:\n" + GOOD_ROUTE, ["issuers[0].replica_regions", "updated"]),
    ("issuer format and explicit issuer", "issuers:\n  - user_pool_id: us-east-1_A\n    issuer: https://idp.example/p\n"
     "    issuer_format: updated\nroutes:\n" + GOOD_ROUTE, ["issuers[0].issuer_format", "explicit 'issuer'"]),
    ("replica not a region", UPDATED_POOL + "    replica_regions: [europe]\nroutes:\n" + GOOD_ROUTE, ["issuers[0].replica_regions[0]", "'europe'"]),
    ("replica twice", UPDATED_POOL + "    replica_regions: [eu-west-1, eu-west-1]\nroutes:\n" + GOOD_ROUTE, ["replica_regions[1]", "twice"]),
    ("replica is the primary", UPDATED_POOL + "    replica_regions: [us-east-1]\nroutes:\n" + GOOD_ROUTE, ["replica_regions[0]", "primary region"]),
    ("replicas empty", UPDATED_POOL + "    replica_regions: []\nroutes:\n" + GOOD_ROUTE, ["issuers[0].replica_regions", "non-empty"]),
    ("duplicate route name", ISSUERS + "routes:\n  - name: r\n    path: /a\n    scopes: [r]\n"
     "  - name: r\n    path: /b\n    scopes: [r]\n", ["routes[1].name", "'r' is also the name of routes[0]", ":4:11)"]),
    ("public with claims", ISSUERS + "routes:\n  - path: /a\n    public: true\n    claims: {t: x}\n",
     ["routes[0]", "public route takes no claims"]),
    ("only claims", ISSUERS + "routes:\n  - path: /a\n    claims: {t: x}\n", ["routes[0]", "all_scopes"]),
    ("all_scopes empty", ISSUERS + "routes:\n  - path: /a\n    all_scopes: []\n", ["routes[0].all_scopes"]),
    ("route client_ids empty", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    client_ids: []\n",
     ["routes[0].client_ids"]),
    ("claim on client_id", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    claims: {client_id: x}\n",
     ["routes[0].claims.client_id", "client_ids"]),
    ("claim on a cognito: claim", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n"
     "    claims: {'cognito:groups': {contains: x}}\n", ["routes[0].claims.cognito:groups"]),
    ("claim condition a list", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    claims: {t: [a, b]}\n",
     ["routes[0].claims.t", "any_of"]),
    ("unknown claim operator", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    claims: {t: {in: [a]}}\n",
     ["routes[0].claims.t", "equals, any_of, contains"]),
]

BAD_PATTERNS = [
    "a", "", "/a/", "/a//b", "//", "/a/**/b", "/**/a", "/a*", "/a/*", "/a**", "/{id}x", "/{id", "/{1d}",
    "/{id}/{id}", "/.", "/a/..", "/a%20b", "/a b", "/a;b", "/a\\b", "/é", "/a?b", "/a#b",
]


@pytest.mark.parametrize(("text", "fragments"), [(t, f) for _, t, f in MISTAKES], ids=[m[0] for m in MISTAKES])
@pytest.mark.usefixtures("yaml_parser")
def test_mistakes_are_policy_errors_naming_file_and_place(text, fragments):
    message = refused(text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_path_patterns_are_refused(pattern):
    message = refused(ISSUERS + "routes:\n" + GOOD_ROUTE + f"  - path: {json.dumps(pattern)}\n    scopes: [r]\n")
    assert "routes[1].path" in message


@pytest.mark.parametrize("pattern", ["/", "/**", "/a", "/a/b-c_d.e~f", "/{id}", "/a/{id}/b/**", "/v1:batch", "/@me"])
def test_good_path_patterns_load(pattern):
    policy = routes_policy(f"  - path: {json.dumps(pattern)}\n    scopes: [r]\n")
    assert policy.routes[0].path == pattern


def test_not_utf8_is_refused():
    message = refused(ISSUERS.encode() + b"routes:\n  - path: /caf\xe9\n    scopes: [r]\n")
    assert "UTF-8" in message


def test_non_mapping_route_mode_value_is_a_policy_error():
    message = refused(ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    mode: [x]\n")
    assert "routes[0].mode" in message


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", ISSUERS + "routes:\n  - path: /a\n    scopes: [r]\n    ? {x: 1}\n    : y\n"])
@pytest.mark.usefixtures("yaml_parser")
def test_unhashable_yaml_key_is_a_policy_error(text):
    refused(text)


@pytest.mark.parametrize(
    ("route", "place"),
    [
        ('  - path: /a\n    scopes: ["read\\n"]\n', "routes[0].scopes[0]"),
        ('  - path: /a\n    methods: ["GET\\n"]\n    scopes: [r]\n', "routes[0].methods[0]"),
        ('  - path: "/a\\n"\n    scopes: [r]\n', "routes[0].path"),
    ],
    ids=["scope", "method", "path"],
)
def test_trailing_newline_is_refused(route, place):
    assert place in refused(ISSUERS + "routes:\n" + route)



@pytest.mark.parametrize("depth", [400, 999, 1200])
@pytest.mark.parametrize("where", ["mode: {}", "routes:\n  - path: /a\n    scopes: [r]\n    claims: {{x: {}}}"])
@pytest.mark.usefixtures("yaml_parser")
def test_deeply_nested_yaml_is_a_policy_error(tmp_path, depth, where):
    """Whichever parser reads it (libyaml refuses nesting beyond 1,000 levels; PyYAML's own parser
    runs out of stack first), and wherever the nesting is: an error, never a crash."""
    nested = "[" * depth + "]" * depth
    text = ISSUERS + ("routes:\n" + GOOD_ROUTE if where.startswith("mode") else "") + where.format(nested) + "\n"
    assert SOURCE in refused(text)
    from authz_service.tools.policytool import validate_command

    path = tmp_path / "policy.yaml"
    path.write_text(text)
    out = io.StringIO()
    assert validate_command([str(path)], True, out) == 1, out.getvalue()
    assert "REFUSED" in out.getvalue()


@pytest.mark.usefixtures("yaml_parser")
def test_nesting_up_to_the_limit_loads_and_one_level_more_is_refused():
    depth = yamlfile.MAX_DEPTH
    assert yamlfile.load_strict_yaml("[" * depth + "]" * depth, SOURCE) is not None
    with pytest.raises(yamlfile.YamlError, match=f"^{SOURCE}: nested more than {depth} levels deep"):
        yamlfile.load_strict_yaml("[" * (depth + 1) + "]" * (depth + 1), SOURCE)


@pytest.mark.usefixtures("yaml_parser")
def test_an_alias_inside_its_own_anchor_is_a_policy_error():
    assert "nested more than 64 levels deep" in refused(ISSUERS + "routes:\n" + GOOD_ROUTE + "mode: &a [*a]\n")


@pytest.mark.usefixtures("yaml_parser")
def test_aliases_shared_many_times_are_measured_once():
    """A "billion laughs" file: 10^9 leaves through nine levels of ten aliases, a few hundred bytes."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    message = refused("\n".join(levels) + "\n" + ISSUERS + "routes:\n" + GOOD_ROUTE)
    assert "unknown key 'l0'" in message


def test_policies_are_read_with_libyaml_where_pyyaml_has_it():
    """PyYAML's own parser spent about 1 ms per route on a reload (docs/performance.md)."""
    assert yamlfile.Loader is yamlfile.LOADERS["libyaml" if yaml.__with_libyaml__ else "python"]
    if yaml.__with_libyaml__:
        assert issubclass(yamlfile.Loader, yaml.CSafeLoader)


SHIPPED_YAML = sorted(
    path for pattern in ("authz_service/**/*.yaml", "deploy/**/*.yaml", "envoy/*.yaml", "tests/data/**/*.yaml")
    for path in ROOT.glob(pattern)
)


@pytest.mark.skipif("libyaml" not in yamlfile.LOADERS, reason="this PyYAML has no libyaml")
@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_both_parsers_read_every_shipped_yaml_file_alike(path):
    """The same documents, and the same line and column for every node (what error messages name)."""
    text = path.read_text()
    python, libyaml = yamlfile.LOADERS["python"], yamlfile.LOADERS["libyaml"]
    assert list(yaml.load_all(text, Loader=libyaml)) == list(yaml.load_all(text, Loader=python))
    for ours, theirs in zip(yaml.compose_all(text, Loader=libyaml), yaml.compose_all(text, Loader=python), strict=True):
        assert _marks(ours) == _marks(theirs)


def _marks(node: yaml.Node) -> list[tuple[str, int, int]]:
    out, stack = [], [node]
    while stack:
        node = stack.pop()
        out.append((node.tag, node.start_mark.line, node.start_mark.column))
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return out


# --- matching ------------------------------------------------------------------------------------


SPECIFICITY_ROUTES = """\
  - name: rest
    path: /a/**
    scopes: [r]
  - name: param-b
    path: /a/{x}/b
    scopes: [r]
  - name: param
    path: /a/{x}
    scopes: [r]
  - name: literal-get
    methods: [GET]
    path: /a/lit
    scopes: [r]
  - name: literal-any
    path: /a/lit
    scopes: [r]
  - name: root
    path: /
    public: true
  - name: left-lit
    path: /l/{y}
    scopes: [r]
  - name: left-param
    path: /{z}/r
    scopes: [r]
  - name: fallthrough-post
    methods: [POST]
    path: /f/exact
    scopes: [r]
  - name: fallthrough-param
    path: /f/{x}
    scopes: [r]
"""


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/a/lit", "literal-get"),
        ("POST", "/a/lit", "literal-any"),
        ("GET", "/a/other", "param"),
        ("GET", "/a/x/b", "param-b"),
        ("GET", "/a/x/c", "rest"),
        ("GET", "/a", "rest"),  # /** matches zero remaining segments
        ("GET", "/a/", "rest"),  # {x} never matches an empty segment
        ("GET", "/a/lit/b", "param-b"),  # falls back from the literal branch to {x}
        ("GET", "/a/x/b/c", "rest"),
        ("GET", "/", "root"),
        ("GET", "/l/r", "left-lit"),  # literal at the first segment wins over a later literal
        ("GET", "/q/r", "left-param"),
        ("POST", "/f/exact", "fallthrough-post"),
        ("GET", "/f/exact", "fallthrough-param"),  # a method the specific route lacks falls through
        ("GET", "/ab", None),
        ("GET", "/nothing/here", None),
        ("GET", "/l", None),
    ],
)
def test_most_specific_route_wins(method, path, expected):
    policy = routes_policy(SPECIFICITY_ROUTES)
    assert matched_name(policy, method, path) == expected


# --- a trailing '/': the route as written and the route without the '/' -------------------------

LENIENT_ROUTES = REVIEW_POLICY + """\
  - name: a
    path: /a
    public: true
  - name: a-rest
    path: /a/**
    scopes: [a/all]
  - name: b
    path: /b
    scopes: [b/read]
  - name: b-rest
    path: /b/**
    public: true
  - name: item
    path: /items/{id}
    scopes: [items/read]
  - name: docs
    path: /docs/**
    public: true
  - name: root
    path: /
    scopes: [root/read]
"""


@pytest.mark.parametrize(("method", "path", "names"), [
    ("GET", "/admin/report/", ("everything-else", "admin-report")),  # the reviewer's bypass
    ("HEAD", "/admin/report/", ("everything-else", "admin-report")),  # HEAD from GET, in both readings
    ("DELETE", "/admin/report/", ("everything-else",)),  # no route for DELETE /admin/report either
    ("GET", "/admin/report", ("admin-report",)),
    ("GET", "/a/", ("a-rest", "a")),  # /a public, /a/** protected: a-rest still applies
    ("GET", "/b/", ("b-rest", "b")),  # /b/** public, /b protected: b applies
    ("GET", "/items/7/", ("everything-else", "item")),  # {id} never takes an empty segment
    ("GET", "/docs/", ("docs",)),  # one route takes both readings
    ("GET", "/docs/x/", ("docs",)),
    ("GET", "/", ("root",)),  # "/" has no other reading
])
def test_a_path_ending_in_a_slash_must_meet_the_route_of_each_reading(method, path, names):
    policy = routes_policy(LENIENT_ROUTES)
    assert tuple(r.name for r in policy.routes_for(method, segs(path))) == names
    assert policy.routes_for(method, segs(path))[0] is policy.match(method, segs(path))


def test_without_a_route_for_either_reading_nothing_applies():
    policy = routes_policy("  - path: /a/**\n    scopes: [r]\n  - path: /b\n    scopes: [r]\n")
    assert policy.routes_for("GET", segs("/b/")) == ()  # as written, no route takes /b/
    assert policy.routes_for("GET", segs("/c/")) == ()
    assert [r.path for r in policy.routes_for("GET", segs("/a/"))] == ["/a/**"]


ESCAPED_ROUTES = """\
  - name: batch-get
    methods: [POST]
    path: /v1/items:batchGet
    scopes: [items/admin]
  - name: item-methods
    path: /v1/{name}
    scopes: [items/read]
  - name: mail
    path: /v1/users/a@b.example
    scopes: [users/admin]
  - name: everything-else
    path: /**
    public: true
"""


@pytest.mark.parametrize(("method", "path", "names"), [
    ("POST", "/v1/items%3AbatchGet", ("item-methods", "batch-get")),  # Spring and Go decode %3A first
    ("POST", "/v1/items%3abatchGet", ("item-methods", "batch-get")),  # either hex case
    ("POST", "/v1/items:batchGet", ("batch-get",)),
    ("GET", "/v1/items%3AbatchGet", ("item-methods",)),  # batch-get takes POST only
    ("POST", "/v1/items%3Alist", ("item-methods",)),  # decoded, the same route
    ("POST", "/v1/items%3AbatchGet/", ("everything-else", "item-methods", "batch-get")),  # four readings
    ("GET", "/v1/users/a%40b.example", ("everything-else", "mail")),
    ("GET", "/v1/users/a%2540b.example", ("everything-else",)),  # %25 is refused before; never decoded twice
    ("GET", "/v1/x%20y", ("item-methods",)),  # no literal holds a space: one reading
])
def test_a_path_escaping_a_literal_character_must_meet_the_route_of_each_reading(method, path, names):
    policy = routes_policy(ESCAPED_ROUTES)
    assert tuple(r.name for r in policy.routes_for(method, segs(path))) == names
    assert policy.routes_for(method, segs(path))[0] is policy.match(method, segs(path))


def test_paths_are_read_decoded_only_for_the_characters_the_literals_hold():
    assert routes_policy(ESCAPED_ROUTES).literal_escapes.pattern == "%3A|%40"
    assert routes_policy("  - path: /a/{b}\n    scopes: [r]\n").literal_escapes is None


def test_a_pattern_ending_in_a_slash_is_refused_with_the_rule():
    message = refused(ISSUERS + "routes:\n  - path: /a/\n    scopes: [r]\n")
    assert ("routes[0].path: '/a/': a pattern cannot end in '/': write '/a', whose route a request for '/a/' "
            "must meet too") in message


# --- path_case: insensitive ------------------------------------------------------------------------


def test_path_case_is_sensitive_by_default():
    policy = routes_policy("  - path: /admin/report\n    scopes: [r]\n  - path: /**\n    public: true\n")
    assert policy.path_case is PathCase.SENSITIVE
    assert matched_name(policy, "GET", "/admin/report") == "ANY /admin/report"
    assert matched_name(policy, "GET", "/ADMIN/Report") == "ANY /**"


@pytest.mark.parametrize("path", ["/admin/report", "/ADMIN/REPORT", "/Admin/report", "/admin/Report/",
                                  "/AdMiN/rEpOrT/x"])
def test_path_case_insensitive_matches_literals_in_any_case(path):
    policy = routes_policy("""\
      - name: report
        path: /Admin/report/**
        scopes: [r]
      - name: rest
        path: /**
        public: true
    """, "path_case: insensitive\n")
    assert policy.path_case is PathCase.INSENSITIVE
    assert [r.name for r in policy.routes_for("GET", segs(path))][-1] == "report"
    assert matched_name(policy, "GET", "/Admin/reports") == "rest"  # still whole segments


def test_path_case_insensitive_refuses_routes_that_differ_only_in_case():
    message = refused(ISSUERS + "path_case: insensitive\nroutes:\n  - path: /Admin\n    scopes: [r]\n"
                      "  - path: /admin\n    scopes: [w]\n")
    assert "routes[1] (/admin) conflicts with routes[0] (/Admin)" in message
    assert "(path_case is insensitive)" in message
    assert routes_policy("  - path: /Admin\n    scopes: [r]\n  - path: /admin\n    scopes: [w]\n")


@pytest.mark.parametrize("value", ["yes", "true", "Insensitive", "[insensitive]"])
def test_path_case_takes_sensitive_or_insensitive(value):
    message = refused(ISSUERS + f"path_case: {value}\nroutes:\n  - path: /a\n    scopes: [r]\n")
    assert "path_case: must be 'sensitive'" in message and "or 'insensitive'" in message


def test_case_folded_matches_as_an_insensitive_policy_would():
    policy = routes_policy("  - path: /Admin\n    scopes: [r]\n  - path: /admin\n    scopes: [w]\n")
    folded = policy.case_folded()
    assert folded.path_case is PathCase.INSENSITIVE and folded.routes is policy.routes
    assert folded.match("GET", ("ADMIN",)).path == "/Admin"  # two that tie when folded: the first wins
    assert policy.match("GET", ("ADMIN",)) is None


def test_match_does_not_depend_on_file_order():
    lines = SPECIFICITY_ROUTES.split("  - ")[1:]
    reversed_policy = routes_policy("".join("  - " + item for item in reversed(lines)))
    policy = routes_policy(SPECIFICITY_ROUTES)
    for method in ("GET", "POST"):
        for path in ("/a/lit", "/a/x/b", "/a", "/f/exact", "/l/r", "/q/r", "/a/lit/b"):
            assert matched_name(policy, method, path) == matched_name(reversed_policy, method, path)


def test_method_route_falls_through_to_rest_and_root_wildcard():
    policy = routes_policy(
        """\
          - name: everything
            path: /**
            scopes: [r]
          - name: get-a
            methods: [GET]
            path: /a
            scopes: [r]
        """
    )
    assert matched_name(policy, "GET", "/a") == "get-a"
    assert matched_name(policy, "DELETE", "/a") == "everything"
    assert matched_name(policy, "GET", "/") == "everything"
    assert matched_name(policy, "GET", "/a/b/c") == "everything"


def test_explicit_method_only_route_does_not_match_other_methods():
    policy = routes_policy("  - methods: [GET, HEAD]\n    path: /a\n    scopes: [r]\n")
    assert matched_name(policy, "HEAD", "/a") == "GET|HEAD /a"
    assert matched_name(policy, "POST", "/a") is None
    assert matched_name(policy, "get", "/a") is None


def test_a_get_route_also_takes_head():
    """Apps run the GET handler for HEAD: HEAD must not fall through to a weaker route."""
    policy = routes_policy(
        """\
          - name: rest
            path: /**
            public: true
          - name: get-a
            methods: [GET]
            path: /a
            scopes: [r]
          - name: any-b
            path: /b
            scopes: [b/any]
          - name: get-b
            methods: [GET]
            path: /b
            scopes: [b/get]
        """
    )
    assert matched_name(policy, "HEAD", "/a") == "get-a"
    assert matched_name(policy, "HEAD", "/b") == "get-b", "HEAD goes where GET goes, not to the any-method route"
    assert matched_name(policy, "OPTIONS", "/a") == "rest"


@pytest.mark.parametrize("order", [1, -1])
def test_an_explicit_head_route_wins_over_the_implied_head(order):
    items = ["  - name: get-a\n    methods: [GET]\n    path: /a\n    scopes: [r]\n",
             "  - name: head-a\n    methods: [HEAD]\n    path: /a\n    scopes: [h]\n"]
    policy = routes_policy("".join(items[::order]))
    assert matched_name(policy, "HEAD", "/a") == "head-a"
    assert matched_name(policy, "GET", "/a") == "get-a"


@pytest.mark.parametrize(
    "routes",
    [
        "  - path: /a\n    scopes: [r]\n  - path: /a\n    scopes: [w]\n",
        "  - path: /{x}/b\n    scopes: [r]\n  - path: /{y}/b\n    scopes: [w]\n",
        "  - path: /a/**\n    scopes: [r]\n  - path: /a/**\n    scopes: [w]\n",
        "  - methods: [GET]\n    path: /a\n    scopes: [r]\n  - methods: [POST, GET]\n    path: /a\n    scopes: [w]\n",
    ],
)
def test_equal_specificity_overlap_is_a_load_error(routes):
    message = refused(ISSUERS + "routes:\n" + routes)
    assert "routes[1]" in message and "routes[0]" in message


@pytest.mark.parametrize(
    "routes",
    [
        "  - methods: [GET]\n    path: /a\n    scopes: [r]\n  - methods: [POST]\n    path: /a\n    scopes: [w]\n",
        "  - methods: [GET]\n    path: /a\n    scopes: [r]\n  - path: /a\n    scopes: [w]\n",
        "  - path: /a\n    scopes: [r]\n  - path: /a/**\n    scopes: [w]\n",
        "  - path: /a/{x}\n    scopes: [r]\n  - path: /a/b\n    scopes: [w]\n",
        "  - path: /a/{x}\n    scopes: [r]\n  - path: /a/{x}/**\n    scopes: [w]\n",
    ],
)
def test_different_specificity_is_not_a_conflict(routes):
    assert len(routes_policy(routes).routes) == 2


# --- property: the trie agrees with a simple matching predicate + specificity order -------------

LIT, PARAM, REST = 2, 1, 0

segment_kinds = st.sampled_from(["a", "b", "{}"])
route_specs = st.tuples(
    st.lists(segment_kinds, max_size=2),
    st.booleans(),  # trailing /**
    st.one_of(st.none(), st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2, unique=True)),
)
request_paths = st.tuples(
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=4), st.booleans()
).map(lambda t: tuple(t[0]) + (("",) if t[1] and t[0] else ()))
request_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE"])


def pattern_of(spec) -> str:
    parts, rest, _ = spec
    parts = [f"{{p{i}}}" if p == "{}" else p for i, p in enumerate(parts)]
    if rest:
        parts.append("**")
    return "/" + "/".join(parts)


def policy_text(specs) -> str:
    routes = []
    for tag, spec in specs:
        route = {"name": f"r{tag}", "path": pattern_of(spec), "scopes": [f"s{tag}"]}
        if spec[2] is not None:
            route["methods"] = spec[2]
        routes.append(route)
    return json.dumps({"issuers": [{"user_pool_id": "us-east-1_Abc123"}], "routes": routes})


def oracle_matches(spec, method: str, segments: tuple[str, ...]) -> bool:
    parts, rest, methods = spec
    if methods is not None and method not in methods:
        return False
    if len(segments) < len(parts) or (not rest and len(segments) != len(parts)):
        return False
    return all(seg != "" if p == "{}" else seg == p for p, seg in zip(parts, segments))


def oracle_key(spec, segments: tuple[str, ...]) -> tuple[int, ...]:
    parts, rest, methods = spec
    kinds = [LIT if p != "{}" else PARAM for p in parts] + [REST] * (len(segments) - len(parts))
    return (*kinds, 0 if rest else 1, 0 if methods is None else 1)


def oracle_conflict(specs) -> bool:
    for i, (_, a) in enumerate(specs):
        for _, b in specs[i + 1:]:
            if a[0] == b[0] and a[1] == b[1]:
                if a[2] is None and b[2] is None:
                    return True
                if a[2] is not None and b[2] is not None and set(a[2]) & set(b[2]):
                    return True
    return False


def compiled(specs):
    try:
        policy = parse_policy(policy_text(specs), source="gen.yaml")
    except PolicyError:
        return None
    return policy


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def requests_for(specs):
    """Request (method, segments) pairs: random ones plus concrete instances of the routes' patterns."""

    def instance(spec):
        parts, rest, methods = spec
        fixed = st.tuples(*[st.sampled_from(["a", "b", "c"]) if p == "{}" else st.just(p) for p in parts])
        tail = st.lists(st.sampled_from(["a", "b", "c"]), max_size=2) if rest else st.just([])
        method = st.sampled_from(methods) if methods else request_methods
        return st.tuples(method, st.tuples(fixed, tail).map(lambda t: tuple(t[0]) + tuple(t[1])))

    instances = st.sampled_from(specs).flatmap(instance)
    return st.lists(st.one_of(st.tuples(request_methods, request_paths), instances, instances.map(
        lambda r: ("DELETE" if r[0] != "DELETE" else "GET", r[1]))), min_size=1, max_size=12)


@PROPERTY_SETTINGS
@given(st.lists(route_specs, min_size=1, max_size=6), st.data())
def test_matcher_picks_a_matching_route_and_none_is_more_specific(raw_specs, data):
    specs = list(enumerate(raw_specs))
    policy = compiled(specs)
    # Conflicts (equal specificity that can overlap) are exactly the load errors.
    assert (policy is None) == oracle_conflict(specs)
    if policy is None:
        return
    requests = data.draw(requests_for(raw_specs))
    by_tag = dict(specs)
    for method, segments in requests:
        route = policy.match(method, segments)
        candidates = [(tag, spec) for tag, spec in specs if oracle_matches(spec, method, segments)]
        if route is None:
            assert candidates == [], (method, segments)
            continue
        tag = int(route.name[1:])
        assert oracle_matches(by_tag[tag], method, segments), (route.path, method, segments)
        best = oracle_key(by_tag[tag], segments)
        for other_tag, other in candidates:
            other_key = oracle_key(other, segments)
            assert not other_key > best, (route.path, pattern_of(other), method, segments)
            if other_tag != tag:
                assert other_key != best  # ties would have been refused at load


@PROPERTY_SETTINGS
@given(st.lists(route_specs, min_size=2, max_size=6), st.data())
def test_route_order_in_the_file_never_changes_the_result(specs, data):
    permuted = data.draw(st.permutations(list(enumerate(specs))))
    original = compiled(list(enumerate(specs)))
    shuffled = compiled(permuted)
    assert (original is None) == (shuffled is None)
    if original is None:
        return
    requests = data.draw(requests_for(specs))
    for method, segments in requests:
        a = original.match(method, segments)
        b = shuffled.match(method, segments)
        assert (a.name if a else None) == (b.name if b else None), (method, segments)


# --- line numbers and collecting every error (used by `authz-service validate`) -----------------

LINED = """\
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - path: /a
    scopes: [r]
  - path: /b
    methods: [GET, get]
    scopes: [r]
  - path: /c
    bogus: 1
    scopes: [r]
  - path: /a
    scopes: [w]
"""


@pytest.mark.usefixtures("yaml_parser")
def test_errors_carry_file_line_column_and_place():
    message = refused(LINED)
    assert message == f"{SOURCE}:7:20: routes[1].methods[1]: 'get' is not an HTTP method; write 'GET'"


@pytest.mark.usefixtures("yaml_parser")
def test_check_policy_collects_every_error_in_file_order_and_the_first_is_what_the_server_raises():
    from authz_service.policy import check_policy

    policy, errors = check_policy(LINED, SOURCE)
    assert policy is None
    assert [(e.line, e.column, e.where) for e in errors] == [
        (7, 20, ("routes", 1, "methods", 1)),
        (10, 5, ("routes", 2)),  # points at the unknown key itself
        (12, 11, ("routes", 3, "path")),  # the conflict
    ]
    assert "unknown key 'bogus'" in str(errors[1]) and "conflicts with routes[0]" in str(errors[2])
    assert str(errors[0]) == refused(LINED)


def test_check_policy_on_a_good_file_returns_the_same_policy_as_parse_policy():
    from authz_service.policy import check_policy

    text = ISSUERS + "routes:\n" + GOOD_ROUTE
    policy, errors = check_policy(text, SOURCE)
    assert errors == [] and policy == parse_policy(text, SOURCE)


@pytest.mark.usefixtures("yaml_parser")
def test_yaml_syntax_errors_get_the_same_file_line_column_prefix():
    message = refused(ISSUERS + "routes:\n  - path: /a\n    path: /b\n    scopes: [r]\n")
    assert message.startswith(f"{SOURCE}:5:5: not valid YAML: duplicate key 'path'"), message


def test_emulator_pool_ids_need_an_explicit_issuer() -> None:
    """cognito-local names pools local_<id>: accepted when the issuer is spelled out, refused otherwise."""
    policy = parse_policy("issuers:\n  - user_pool_id: local_5oDD2Qxe\n    issuer: http://127.0.0.1:9229/local_5oDD2Qxe\n"
                          "routes:\n" + GOOD_ROUTE)
    (issuer,) = policy.issuers
    assert issuer.jwks_uri == "http://127.0.0.1:9229/local_5oDD2Qxe/.well-known/jwks.json"
    with pytest.raises(PolicyError, match="needs an explicit issuer"):
        parse_policy("issuers:\n  - user_pool_id: local_5oDD2Qxe\nroutes:\n" + GOOD_ROUTE)


@pytest.mark.parametrize("line", ["", "version: 1\n", "version: 1.0\n"])
def test_the_policy_format_version_is_1_by_default_and_when_given(line):
    assert load(line + ISSUERS + "routes:\n" + GOOD_ROUTE).version == 1


def test_an_unknown_version_is_reported_before_keys_a_later_format_may_know():
    errors = check_policy("version: 2\nscope_sets: {}\n" + ISSUERS + "routes:\n" + GOOD_ROUTE, "p.yaml")[1]
    assert [str(e).split(": ")[1] for e in errors] == ["version"]


# --- issuer formats and multi-Region pools ---------------------------------------------------------


def test_issuer_format_original_is_the_default_and_updated_uses_issuer_cognito_idp():
    from authz_service.policy import IssuerFormat

    original = parse_policy("issuers:\n  - user_pool_id: eu-west-2_Xyz\n    issuer_format: original\nroutes:\n"
                            + GOOD_ROUTE)
    default = parse_policy("issuers:\n  - user_pool_id: eu-west-2_Xyz\nroutes:\n" + GOOD_ROUTE)
    assert original.issuers == default.issuers
    (issuer,) = default.issuers
    assert issuer.format is IssuerFormat.ORIGINAL
    updated = parse_policy("issuers:\n  - user_pool_id: eu-west-2_Xyz\n    issuer_format: updated\nroutes:\n"
                           + GOOD_ROUTE)
    (issuer,) = updated.issuers
    assert issuer.issuer == "https://issuer-cognito-idp.eu-west-2.amazonaws.com/eu-west-2_Xyz"
    assert issuer.jwks_uri == "https://issuer-cognito-idp.eu-west-2.amazonaws.com/eu-west-2_Xyz/.well-known/jwks.json"
    assert issuer.format is IssuerFormat.UPDATED and not issuer.replica
    assert updated.issuers_by_iss == {issuer.issuer: issuer}


def test_replica_regions_each_yield_an_accepted_issuer_with_its_own_jwks_and_metric_label():
    policy = parse_policy("""
issuers:
  - user_pool_id: us-east-1_Multi1
    issuer_format: updated
    replica_regions: [eu-west-1, ap-southeast-2]
    client_ids: [app-1]
  - user_pool_id: us-east-1_Other
routes:
""" + GOOD_ROUTE)
    primary, ireland, sydney, other = policy.issuers
    assert [(i.region, i.replica, i.block) for i in policy.issuers] == [
        ("us-east-1", False, 0), ("eu-west-1", True, 0), ("ap-southeast-2", True, 0), ("us-east-1", False, 1)]
    assert ireland.issuer == "https://issuer-cognito-idp.eu-west-1.amazonaws.com/us-east-1_Multi1"
    assert ireland.jwks_uri == "https://issuer-cognito-idp.eu-west-1.amazonaws.com/us-east-1_Multi1/.well-known/jwks.json"
    assert sydney.issuer == "https://issuer-cognito-idp.ap-southeast-2.amazonaws.com/us-east-1_Multi1"
    assert {i.user_pool_id for i in (primary, ireland, sydney)} == {"us-east-1_Multi1"}
    assert ireland.client_ids == primary.client_ids == {"app-1"}
    assert [i.metric_label for i in policy.issuers] == [
        "us-east-1_Multi1", "us-east-1_Multi1@eu-west-1", "us-east-1_Multi1@ap-southeast-2", "us-east-1_Other"]
    assert set(policy.issuers_by_iss) == {i.issuer for i in policy.issuers}
    assert other.issuer == "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other"


def test_a_jwks_uri_override_serves_every_region_of_the_entry():
    policy = parse_policy("issuers:\n  - user_pool_id: us-east-1_Multi1\n    issuer_format: updated\n"
                          "    replica_regions: [eu-west-1]\n    jwks_uri: http://127.0.0.1:9000/keys.json\nroutes:\n"
                          + GOOD_ROUTE)
    assert [i.jwks_uri for i in policy.issuers] == ["http://127.0.0.1:9000/keys.json"] * 2
    assert len({(i.issuer, i.jwks_uri) for i in policy.issuers}) == 2  # two JWKS cache states


def test_an_issuer_accepted_by_two_entries_is_refused():
    message = refused("issuers:\n  - user_pool_id: us-east-1_Multi1\n    issuer_format: updated\n"
                      "    replica_regions: [eu-west-1]\n"
                      "  - user_pool_id: us-east-1_Multi1\n    issuer: https://issuer-cognito-idp.eu-west-1.amazonaws.com/"
                      "us-east-1_Multi1\nroutes:\n" + GOOD_ROUTE)
    assert "issuers[1]" in message and "listed twice" in message


@pytest.mark.usefixtures("yaml_parser")
def test_duplicate_route_names_point_at_both_routes():
    message = refused(ISSUERS + "routes:\n  - name: list\n    path: /a\n    scopes: [r]\n"
                      "  - path: /b\n    scopes: [r]\n  - name: list\n    path: /c\n    scopes: [r]\n")
    assert message == (f"{SOURCE}:9:11: routes[2].name: 'list' is also the name of routes[0] ({SOURCE}:4:11); "
                       "route names label the metrics (route=...), so both would be counted as one: give each route "
                       "its own name")
    # a written name equal to another route's default name is the same mistake
    message = refused(ISSUERS + "routes:\n  - path: /a\n    methods: [GET]\n    scopes: [r]\n"
                      "  - name: GET /a\n    path: /b\n    scopes: [r]\n")
    assert "routes[1].name: 'GET /a' is also the name of routes[0] (" in message
    assert f"({SOURCE}:4:5)" in message  # routes[0] has no name key: its entry


def test_check_policy_reports_errors_in_file_order():
    from authz_service.policy import check_policy

    _, errors = check_policy(ISSUERS + "routes:\n  - name: x\n    path: /a\n    scopes: [r]\n"
                             "  - name: x\n    path: /b\n    scopes: [r]\n  - path: c\n    scopes: [r]\n", SOURCE)
    assert [e.where for e in errors] == [("routes", 1, "name"), ("routes", 2, "path")]


def test_an_issuer_url_with_credentials_is_refused_without_showing_them():
    """An iss is compared as written and names no credentials; a password there would be shown
    wherever the issuer is (logs, /readyz, tools), so it is refused. Credentials for a JWKS
    belong in jwks_uri, which is never shown with them."""
    message = refused("issuers:\n  - user_pool_id: us-east-1_A\n    issuer: https://user:s3cret@idp.example/p\n"
                      "    jwks_uri: https://idp.example/jwks\nroutes:\n" + GOOD_ROUTE)
    assert "issuers[0].issuer" in message and "credentials" in message and "s3cret" not in message


def test_a_bad_jwks_uri_is_refused_without_showing_its_credentials():
    message = refused("issuers:\n  - user_pool_id: us-east-1_A\n"
                      "    jwks_uri: 'https://user:s3cret@idp.example/jw ks'\nroutes:\n" + GOOD_ROUTE)
    assert "issuers[0].jwks_uri" in message and "s3cret" not in message and "idp.example" in message


@pytest.mark.parametrize(("key", "url", "problem"), [
    ("jwks_uri", "http://[::1/jwks", "'[' and ']' in the host do not pair"),
    ("jwks_uri", "http://127.0.0.1:99999/jwks", "port 99999 is not 1 to 65535"),
    ("jwks_uri", "https://idp.example:0/jwks", "port 0 is not 1 to 65535"),
    ("jwks_uri", "https://idp.example:https/jwks", "port 'https' is not 1 to 65535"),
    ("jwks_uri", "https://user:s3cret@:443/jwks", "no host"),
    ("issuer", "https://[::1/p", "'[' and ']' in the host do not pair"),
    ("issuer", "https://idp.example:70000/p", "port 70000 is not 1 to 65535"),
], ids=["jwks-ipv6-unclosed", "jwks-port-too-big", "jwks-port-0", "jwks-port-name", "jwks-no-host", "issuer-ipv6",
        "issuer-port"])
def test_an_issuer_url_no_http_client_can_use_is_refused(key: str, url: str, problem: str) -> None:
    """The HTTP client refused these at every fetch with the URL as its only message (keys never
    came, and the log said nothing of why); the loader names the problem."""
    other = ("jwks_uri", "https://idp.example/jwks") if key == "issuer" else ("issuer", "https://idp.example/p")
    message = refused(f"issuers:\n  - user_pool_id: us-east-1_A\n    {key}: '{url}'\n    {other[0]}: {other[1]}\n"
                      "routes:\n" + GOOD_ROUTE)
    assert f"issuers[0].{key}: " in message and problem in message and "s3cret" not in message


@pytest.mark.parametrize(("key", "url", "problem"), [
    ("issuer", "https://idp.example/p?tenant=1", "has a query or fragment"),
    ("issuer", "https://idp.example/p#frag", "has a query or fragment"),
    ("issuer", "https://idp.example/p q", "holds whitespace"),
    ("issuer", "ftp://idp.example/p", "is not an http(s) URL"),
    ("jwks_uri", "https://idp.example/jw ks?X-Amz-Signature=s3cret", "holds whitespace"),
    ("jwks_uri", "https://idp.example?X-Amz-Signature=s3cret", "is not an http(s) URL"),
], ids=["issuer-query", "issuer-fragment", "issuer-space", "issuer-scheme", "jwks-space", "jwks-no-path"])
def test_a_malformed_issuer_url_is_refused_saying_what_is_wrong(key: str, url: str, problem: str) -> None:
    """The URL is shown without its query (it may be signed), so 'is not an http(s) URL' alone
    would quote a URL that looks right: the message names what is wrong with it."""
    other = ("jwks_uri", "https://idp.example/jwks") if key == "issuer" else ("issuer", "https://idp.example/p")
    message = refused(f"issuers:\n  - user_pool_id: us-east-1_A\n    {key}: '{url}'\n    {other[0]}: {other[1]}\n"
                      "routes:\n" + GOOD_ROUTE)
    assert f"issuers[0].{key}: " in message and problem in message and "s3cret" not in message


# --- the deny section ------------------------------------------------------------------------------

DENY_HEAD = "issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - {path: /a, scopes: [r/x]}\n"


def test_the_deny_section_lists_clients_and_jtis_and_may_be_empty_or_repeat():
    policy = parse_policy(DENY_HEAD + "deny:\n  client_ids: [c1, c2, c1]\n  jtis: [0f7a-uuid]\n")
    assert policy.deny is not None
    assert (policy.deny.client_ids, policy.deny.jtis) == ({"c1", "c2"}, {"0f7a-uuid"})
    assert deny_list_sizes(policy) == {"deny_client_ids": 2, "deny_jtis": 1}
    for empty in ("deny:\n", "deny: {}\n", "deny:\n  client_ids: []\n  jtis: []\n", "deny: {client_ids: null}\n", ""):
        policy = parse_policy(DENY_HEAD + empty)
        assert policy.deny is None and deny_list_sizes(policy) == {"deny_client_ids": 0, "deny_jtis": 0}, empty
    assert parse_policy(DENY_HEAD + "deny: {jtis: [j]}\n").case_folded().deny == DenyList(frozenset(), frozenset({"j"}))


@pytest.mark.parametrize(("deny", "message"), [
    ("deny: [c1]\n", "p.yaml:5:7: deny: must be a mapping with client_ids and/or jtis, got a list"),
    ("deny: {clients: [c1]}\n", "p.yaml:5:8: deny: unknown key 'clients'; allowed keys: client_ids, jtis"),
    ("deny: {client_ids: c1}\n", "p.yaml:5:20: deny.client_ids: must be a list (it may be empty), got a string"),
    ("deny: {client_ids: ['a b']}\n", "deny.client_ids[0]: 'a b' is not an app client id"),
    ("deny: {jtis: [7]}\n", "deny.jtis[0]: 7 is not a token's jti claim"),
    ("deny: {jtis: ['']}\n", "deny.jtis[0]: '' is not a token's jti claim"),
])
def test_deny_section_mistakes_name_the_place(deny, message):
    with pytest.raises(PolicyError) as caught:
        parse_policy(DENY_HEAD + deny, source="p.yaml")
    assert message in str(caught.value), str(caught.value)
