"""The native compiler (authz_service/native/) without a running Envoy but its validator.

What is checked here is what a wrong compiler would get wrong silently: the route order against
``Policy.match`` itself, each RE2 pattern of the request screen against the service rule it
stands for, the engine chosen for each kind of route, and that Envoy accepts what is printed.
tests/e2e/test_native_parity_e2e.py then proves the decisions equal through real Envoys.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authz_service.jwks import jwks_document, parse_jwks
from authz_service.native import patterns
from authz_service.native.bootstrap import compile_policy
from authz_service.native.options import Address, Options, parse_address
from authz_service.native.answers import AnswerBook
from authz_service.native.plan import Engine, Fallback, plan
from authz_service.native.report import report_json, report_text
from authz_service.native.routes import (EXT_AUTHZ, JWT, RBAC, SCREEN, SCREEN_NAMES, SHARED, Admission, ingress_routes,
                                         screen_routes, shared_checks)
from authz_service.policy import ESCAPABLE_LITERAL_CHARS, Mode, PolicyError, escaped_literal_chars, parse_policy
from authz_service.request import (IDENTITY_HEADERS, MAX_PATH_LENGTH, BadRequest, checked_method,
                                   identity_and_override_spellings, normalized_path,
                                   other_separator_spellings_pattern)
from authz_service.tokens import MAX_HEADER_CHARS, _b64

from . import envoyconf
from .conftest import make_key
from .e2e.harness import REPO_ROOT, envoy_binary
from .test_cli import assert_one_clean_line
from .test_cli import cli as cli_env

EXAMPLE_POLICY = REPO_ROOT / "authz_service" / "examples" / "policy.yaml"
ISSUERS = """
issuers:
  - user_pool_id: us-east-1_Test00001
    client_ids: [client-a, client-b]
  - user_pool_id: local_Dev
    issuer: http://127.0.0.1:9000/local_Dev
routes:
"""
# One route of every kind the compiler tells apart.
EVERY_KIND = ISSUERS + """\
  - {name: read, methods: [GET], path: '/items/{id}', scopes: [items/read, items/admin]}
  - {name: write, methods: [POST, PUT], path: '/items', all_scopes: [items/write, items/audit], client_ids: [client-a]}
  - {name: tenant, path: '/tenants/{t}/**', scopes: [t/read], claims: {tenant: acme, level: 3, beta: true}}
  - {name: tiers, path: '/tiers', scopes: [t/read], claims: {tier: {any_of: [gold, silver]}}}
  - {name: envs, path: '/envs', scopes: [t/read], claims: {envs: {contains: prod}}}
  - {name: huge, path: '/huge', scopes: [t/read], claims: {serial: 9007199254740993}}
  - {name: trial, path: '/trial/**', scopes: [t/read], mode: dry-run}
  - {name: docs, methods: [GET], path: '/docs/**', public: true}
  - {name: head, methods: [HEAD], path: '/items/{id}', scopes: [items/head]}
"""


def test_the_packaged_template_is_the_shipped_envoy_yaml() -> None:
    """The compiler starts from authz_service/native/envoy.yaml: after editing envoy/envoy.yaml run
    ``cp envoy/envoy.yaml authz_service/native/envoy.yaml``."""
    packaged = REPO_ROOT / "authz_service" / "native" / "envoy.yaml"
    assert packaged.read_bytes() == (REPO_ROOT / "envoy" / "envoy.yaml").read_bytes()


# --- engines and order ---------------------------------------------------------------------------


def test_each_route_gets_the_engine_that_decides_it_exactly() -> None:
    engines = {p.route.name: (p.engine, p.why) for p in plan(parse_policy(EVERY_KIND))}
    assert {name: engine for name, (engine, _) in engines.items()} == {
        "read": Engine.NATIVE, "write": Engine.NATIVE, "tenant": Engine.NATIVE, "head": Engine.NATIVE,
        "tiers": Engine.EXT_AUTHZ, "envs": Engine.EXT_AUTHZ, "huge": Engine.EXT_AUTHZ, "trial": Engine.EXT_AUTHZ,
        "docs": Engine.NONE}
    assert "list claim" in engines["tiers"][1] and "list claim" in engines["envs"][1]
    assert "2^53" in engines["huge"][1] and "dry-run" in engines["trial"][1]
    assert engines["write"][1] == ("jwt_authn + RBAC: all of [items/audit items/write], clients [client-a]")


BOUND_AND_DENIED = ISSUERS.replace("routes:\n", "deny: {client_ids: [client-b], jtis: [jti-1, jti-2]}\nroutes:\n") + """\
  - {name: orders, path: '/tenants/{t}/orders', scopes: [t/read], claims: {tenant: {equals_param: t}, tier: gold}}
  - {name: plain, path: '/plain', scopes: [t/read]}
  - {name: docs, path: '/docs', public: true}
"""


def test_a_claim_bound_to_a_path_parameter_sends_its_route_to_the_service_and_says_why() -> None:
    engines = {p.route.name: (p.engine, p.why) for p in plan(parse_policy(BOUND_AND_DENIED))}
    assert engines["orders"] == (Engine.EXT_AUTHZ, "claim 'tenant' is bound to the path parameter {t}; Envoy's "
                                                   "RBAC cannot compare a claim with a path segment")
    assert engines["plain"][0] is Engine.NATIVE and engines["docs"][0] is Engine.NONE


def test_a_route_that_falls_back_for_several_reasons_is_reported_with_every_one() -> None:
    """Removing one reason must not surprise its author with the next: all are named, with codes."""
    text = ISSUERS + """\
  - {name: many, path: '/t/{t}', scopes: [t/read], mode: dry-run,
     claims: {tenant: {equals_param: t}, tier: {any_of: [gold, 9007199254740993]}}}
"""
    compiled = compile_policy(parse_policy(text))
    (many,) = compiled.plans
    assert many.engine is Engine.EXT_AUTHZ
    assert many.fallback == (Fallback.DRY_RUN, Fallback.CLAIM_BOUND_TO_PATH, Fallback.CLAIM_MAY_BE_LIST,
                             Fallback.NUMBER_BEYOND_DOUBLE)
    assert all(part in many.why for part in ("dry-run", "path parameter {t}", "list claim", "2^53"))
    (reported,) = report_json(compiled)["routes"]
    assert reported["fallback"] == ["dry_run", "claim_bound_to_path", "claim_may_be_list", "number_beyond_double"]
    assert [route["fallback"] for route in report_json(compile_policy(parse_policy(EVERY_KIND)))["routes"]
            if route["engine"] != "ext_authz"] == [[]] * 5


def test_the_deny_list_is_refused_natively_with_the_services_answer_after_every_other_token_check() -> None:
    compiled = compile_policy(parse_policy(BOUND_AND_DENIED))
    ingress = next(listener for listener in compiled.listeners if listener["name"] == "ingress")
    routes = ingress["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    (plain,) = [route for route in routes if route["name"] == "native: plain"]
    # The token checks are the shared filter's, every native route's; the route's own come after.
    token = envoyconf.http_filter(compiled.bootstrap(), "authz.shared", "ingress")["rules"]
    names = sorted(token["policies"])  # RBAC tries them in name order: <order>-<reason>-a<answer>
    own = sorted(plain["typed_per_filter_config"]["authz.rbac"]["rbac"]["rules"]["policies"])
    conditions = {"insufficient_scope", "missing_scope", "client_not_allowed_for_route", "claim_mismatch"}
    assert own and all(name.split("-")[1] in conditions for name in own)
    assert not any(name.split("-")[1] in conditions for name in names)
    denied = [name for name in names if "-deny_listed-" in name]
    assert denied == names[-2:]  # the last token checks, as the verifier checks it last
    assert denied[-1] < own[0]  # numbered before the route's: its answer comes first
    by_client, by_jti = (token["policies"][name]["principals"][0] for name in denied)
    assert json.dumps(by_client).count('"exact": "client-b"') == 1 and '"client_id"' in json.dumps(by_client)
    assert [p["sourced_metadata"]["metadata_matcher"]["value"]["string_match"]["exact"]
            for p in by_jti["or_ids"]["ids"]] == ["jti-1", "jti-2"]
    hcm = ingress["filter_chains"][0]["filters"][0]["typed_config"]
    bodies = {m["body"]["inline_string"] for m in hcm["local_reply_config"]["mappers"] if "body" in m}
    assert {'{"error":"invalid_token","error_description":"client is revoked"}',
            '{"error":"invalid_token","error_description":"token is revoked"}'} <= bodies
    report = report_text(compiled)
    assert "deny list: 1 client id, 2 jtis, refused on every native route" in report
    # docs/native.md: the heap expectation is the report's last line, also with a deny list.
    assert report.splitlines()[-1].startswith("  Envoy heap ~")


def test_a_thousand_checks_are_tried_by_envoy_in_the_service_s_order() -> None:
    """RBAC tries a filter's policies in name order: past the 999th check (a route with a thousand
    all-of scopes, or a pair of routes a path ending in '/' meets), the order in the names must
    still be the service's, and the decision stats must still read each reason."""
    scopes = [f"s/{i:04d}" for i in range(1000)]
    pair = (ISSUERS + f"  - {{name: big, path: '/big/{{id}}', all_scopes: [{', '.join(scopes)}]}}\n"
            "  - {name: all, path: '/big/**', scopes: [s/0000]}\n")
    compiled = compile_policy(parse_policy(pair), Options(heap_cap_mib=1024))  # each check's answer costs heap
    ingress = next(listener for listener in compiled.listeners if listener["name"] == "ingress")
    routes = ingress["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    for name in ("native: big", "native: all + big (trailing slash)"):
        (route,) = [route for route in routes if route["name"] == name]
        names = sorted(route["typed_per_filter_config"]["authz.rbac"]["rbac"]["rules"]["policies"])
        orders = [int(re.match(r"\d+", name)[0]) for name in names]
        assert len(orders) > 1000 - len(shared_checks(compiled.policy, 60)) and orders == sorted(orders), name
    reasons = ingress["metadata"]["filter_metadata"]["authz"]["reasons"]
    assert reasons[next(key for key in reasons if "1000o-missing_scope" in key)] == "missing_scope"


def test_get_takes_head_unless_a_route_at_the_same_place_lists_it() -> None:
    methods = {p.route.name: p.methods for p in plan(parse_policy(EVERY_KIND))}
    assert methods["read"] == {"GET"} and methods["head"] == {"HEAD"} and methods["docs"] == {"GET", "HEAD"}
    assert methods["tenant"] is None


def _envoy_first_match(routes: list[dict], method: str, path: str) -> str:
    """Envoy's first-match routing over compiled routes (their path and :method matchers), in Python."""
    for route in routes:
        match = route["match"]
        fold = str.lower if match.get("case_sensitive") is False else str
        if "path" in match:
            ok = fold(path) == fold(match["path"])
        elif "prefix" in match:
            ok = path.startswith(match["prefix"])
        elif "path_separated_prefix" in match:
            prefix = fold(match["path_separated_prefix"])
            ok = fold(path) == prefix or fold(path).startswith(prefix + "/")
        else:
            ok = re.fullmatch(match["safe_regex"]["regex"], path) is not None
        for header in match.get("headers", []):
            value = {":method": method, ":path": path}.get(header["name"])  # no other header is sent
            wanted = header["string_match"]
            found = value is not None and (value == wanted["exact"] if "exact" in wanted
                                           else re.fullmatch(wanted["safe_regex"]["regex"], value) is not None)
            ok = ok and found != header.get("invert_match", False)
        if ok:
            return route["name"]
    raise AssertionError("no route, not even the default deny")


_SEGMENTS_CASED = st.sampled_from(["a", "b", "C", "Ab", "{x}", "{y}"])
_ROUTE = st.tuples(st.lists(_SEGMENTS_CASED, max_size=3), st.booleans(),
                   st.one_of(st.none(), st.sets(st.sampled_from(["GET", "HEAD", "POST"]), min_size=1)),
                   st.sampled_from(["protected", "protected", "public", "dry-run"]), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ROUTE, min_size=1, max_size=7), st.sampled_from(["sensitive", "insensitive"]))
def test_envoy_takes_the_route_policy_match_takes(routes, path_case: str) -> None:
    """Over every class of request path the matcher can tell apart (Policy.representative_paths,
    letter-case variants included) and every method, Envoy's first match over the compiled routes
    is Policy.match's route. A path ending in '/' is read with and without it (Policy.routes_for):
    Envoy takes the route deciding exactly the routes of both readings, in their order (one when
    both readings have the same route), or no route when either reading has none."""
    lines = []
    for i, (segments, rest, methods, kind, forward) in enumerate(routes):
        path = "/" + "/".join(segments + (["**"] if rest else []))
        method_text = f", methods: [{', '.join(sorted(methods))}]" if methods else ""
        body = {"protected": "scopes: [s]", "public": "public: true", "dry-run": "scopes: [s], mode: dry-run"}[kind]
        lines.append(f"  - {{name: r{i}, path: '{path}'{method_text}, {body}, forward_token: {str(forward).lower()}}}")
    try:
        policy = parse_policy(f"path_case: {path_case}\n" + ISSUERS + "\n".join(lines) + "\n")
    except PolicyError:
        return  # two routes of equal specificity: refused, nothing to compile
    shared = len(shared_checks(policy, 60))
    routes_ = ingress_routes(policy, plan(policy), AnswerBook("authz-service"), Admission("Bearer .*", {}), shared)
    # The policy's routes, the trailing-slash ones after them and the default deny; not the screens
    # before them (no request here is refused by those).
    envoy_routes = [r for r in routes_ if not r["name"].startswith("screen: ")]
    paths = policy.representative_paths(folded=policy.case_folded())
    assert paths is not None
    variants = {tuple(s.upper() for s in p) for p in paths} | {tuple(s.lower() for s in p) for p in paths}
    target = dict(screen_routes(policy))["screen: target"][0]["string_match"]["safe_regex"]["regex"]
    for segments in sorted(set(paths) | variants):
        path = "/" + "/".join(segments)
        assert re.fullmatch(target, path), path
        for method in ("GET", "HEAD", "POST", "PUT"):
            taken = _envoy_first_match(envoy_routes, method, path)
            routes_for = policy.routes_for(method, segments)
            names = [r.name for r in routes_for]
            service = "( \\(anonymous\\))?"  # the service decides: a route without credentials
            if not routes_for:
                assert taken.startswith("no route"), (method, path, taken)
            elif len(routes_for) == 1:  # the route of both readings (or of the only one): its own
                assert re.fullmatch(f"[a-z_]+: {names[0]}( \\(trailing slash\\))?{service}", taken), (method, path, taken)
            else:  # a path ending in '/': the route as written, then the route without the '/'
                assert re.fullmatch(f"[a-z_]+: {' [+] '.join(names)} \\(trailing slash\\){service}", taken), (method, path, taken)
            decided = next(r for r in envoy_routes if r["name"] == taken)
            # Which filters act there (routes.py's table): the service's route turns every native
            # filter off, a native route only the screen, a public route and no route all but it.
            off = {name for name, config in decided["typed_per_filter_config"].items() if config.get("disabled")}
            engine = taken.split(":")[0]
            assert off == {"ext_authz": {SCREEN, JWT, SHARED, RBAC}, "native": {SCREEN}}.get(
                engine, {JWT, SHARED, RBAC, EXT_AUTHZ}), (taken, off)
            guards = [r.name for r in routes_for if not r.public]
            if any(r.mode is Mode.DRY_RUN for r in routes_for):  # the service decides it all
                assert taken.startswith("ext_authz: ") and "metadata" not in decided, (method, path, taken)
                continue
            # The decision stats' labels (decisions.py): allowed as the first protected route (public
            # as the first route when none is protected), a denial by the second one's checks as it.
            labels = decided["metadata"]["filter_metadata"]["authz"]
            assert labels["route"] == (guards or [r.name for r in routes_for] or ["no_route"])[0], (taken, labels)
            assert labels.get("other_route") == (guards[1] if len(guards) > 1 else None), (taken, labels)
            if routes_for and any(not r.public for r in routes_for):
                rbac = decided["typed_per_filter_config"]["authz.rbac"]["rbac"]["rules"]["policies"]
                checked = [name.split("-")[1] for name in sorted(rbac)]
                scope_checks = [name for name in sorted(rbac) if "insufficient_scope" in name]
                # each protected route's scope check, in the order of the routes; the second marked
                assert len(scope_checks) == sum(1 for r in routes_for if not r.public), (taken, checked)
                marked = [name[3:4] == "o" for name in scope_checks]
                assert marked == [False] + [True] * (len(scope_checks) - 1), (taken, scope_checks)
            forwards = all(r.forward_token for r in routes_for)
            assert ("request_headers_to_remove" not in decided) == (forwards or not routes_for), taken


# --- the request screen against the service's own rules -------------------------------------------


def _accepts(target: str) -> bool:
    try:
        normalized_path(target)
    except BadRequest:
        return False
    return True


def _read_one_way(target: str, literal_chars: str) -> bool:
    """No escape of a character the policy's literals hold (Policy.routes_for reads such a path
    decoded too: the service's to decide)."""
    path = target.partition("?")[0].upper()
    return not any(f"%{ord(c):02X}" in path for c in literal_chars)


def _native(target: str, literal_chars: str) -> bool:
    """Whether the screen's target pattern lets Envoy decide ``target`` for a policy whose literals
    hold ``literal_chars``: the service accepts it, and its path has no escape one of those literals
    could be read through (Policy.routes_for's readings are the service's to decide). A path ending
    in '/' passes it: the trailing-slash screen decides those (test_envoy_takes_the_route_policy_match_takes)."""
    return _accepts(target) and _read_one_way(target, literal_chars)


@pytest.mark.parametrize("literal_chars", [ESCAPABLE_LITERAL_CHARS, ":@", ""], ids=["all", "colon-at", "none"])
def test_native_target_is_every_escape_the_service_accepts(literal_chars: str) -> None:
    """Every single escaped byte and every pair of them (UTF-8 sequences included), both hex cases."""
    clean = re.compile(patterns.native_target(literal_chars))
    for first in range(256):
        for second in [None, *range(256)]:
            for case in (str.upper, str.lower):
                target = "/a/" + case(f"%{first:02X}") + ("" if second is None else case(f"%{second:02X}"))
                expected = _accepts(target) and _read_one_way(target, literal_chars)
                assert (clean.fullmatch(target) is not None) == expected, target


literal_char_sets = st.sets(st.sampled_from(ESCAPABLE_LITERAL_CHARS)).map(lambda chars: "".join(sorted(chars)))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="//..ab;%-_~!$&'()*+,=:@?\\\"<>^`{|}E9eF23A", max_size=14),
       st.lists(st.sampled_from(["%C3%A9", "%e2%82%ac", "%F0%9F%98%80", "%ED%A0%80", "%C0%AE", "%f4%90%80%80"]),
                max_size=2), literal_char_sets)
@example("a/", [], "").via("a path ending in '/'")
@example("a/b%3A/?q=1", [], ":").via("and escaping a literal's character")
@example("/", [], "").via("'//'")
def test_native_target_is_the_service_path_rule(text: str, escapes: list[str], literal_chars: str) -> None:
    target = "/" + text + "".join(escapes)  # no '#': Envoy refuses a fragment (400) before any route
    assert (re.fullmatch(patterns.native_target(literal_chars), target) is not None) == _native(target, literal_chars)


def test_the_screen_sends_the_service_only_the_escapes_the_policys_literals_hold() -> None:
    """A policy whose literals hold ':' (and no other escapable character): Envoy decides a path
    escaping '@' itself, as the service reads it one way; one escaping ':' goes to the service,
    which reads it decoded too (Policy.routes_for)."""
    policy = parse_policy(ISSUERS + "  - {name: batch, path: '/v1/items:batchGet', scopes: [s]}\n"
                          "  - {name: item, path: '/v1/{name}', scopes: [s]}\n")
    screen = dict(screen_routes(policy))
    target = screen["screen: target"][0]["string_match"]["safe_regex"]["regex"]
    assert re.fullmatch(target, "/v1/a%40b") and re.fullmatch(target, "/v1/a%40b%2C")
    assert not re.fullmatch(target, "/v1/items%3AbatchGet") and not re.fullmatch(target, "/v1/items%3abatchGet")
    assert [r.name for r in policy.routes_for("GET", ("v1", "items%3AbatchGet"))] == ["item", "batch"]
    assert [r.name for r in policy.routes_for("GET", ("v1", "a%40b"))] == ["item"]
    assert [name.removeprefix("screen: ") for name in screen] == list(SCREEN_NAMES)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["_method", "_METHOD", "%5Fmethod", "%5f%4De%74hod", "_method[]", "_method%5B",
                                 "x", "=", "&", ";", "+", "y=1", "_methods", "a_method", "method", "%zz", "?",
                                 ".method", "%2eMETHOD", "_%6Dethod", "%20", "%00", "%2B", ".", "_", "[", " "]),
                max_size=5))
def test_method_override_query_is_the_service_query_rule(parts: list[str]) -> None:
    target = "/a?" + "".join(parts)
    refused = not _accepts(target)
    assert (re.fullmatch(patterns.METHOD_OVERRIDE_QUERY, target) is not None) == refused, target


@pytest.mark.parametrize("method", ["GET", "M-SEARCH", "A" * 32, "A" * 33, "get", "Get", "GE T", "", "G\u00c9T", "BREW!"])
def test_method_is_the_service_method_rule(method: str) -> None:
    try:
        checked_method(method)
        accepted = True
    except BadRequest:
        accepted = False
    assert (re.fullmatch(patterns.METHOD, method) is not None) == accepted


def _canonical(segment: str) -> bool:
    try:
        _b64(segment.encode())
    except ValueError:
        return False
    return bool(segment)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="ABCQgwAEIM048_-zZ=+/.", min_size=1, max_size=9))
def test_bearer_jwt_is_the_service_base64url_rule(segment: str) -> None:
    token = f"{segment}.{segment}.{segment}"
    wanted = "." not in segment and all(c.isalnum() or c in "-_" for c in segment) and _canonical(segment)
    assert (re.fullmatch(patterns.BEARER_JWT, f"Bearer {token}") is not None) == wanted, segment
    assert re.fullmatch(patterns.BEARER_JWT, f"bearer {token}") is None  # jwt_authn's prefix is "Bearer "


def test_bearer_jwt_bounds_the_jose_header_as_the_service_reads_it() -> None:
    """A JOSE header longer than tokens.MAX_HEADER_CHARS is "malformed" to the service: jwt_authn
    must not verify it. (The token's size is an RBAC check: tests/e2e/test_native_parity_e2e.py.)"""
    bearer = re.compile(patterns.BEARER_JWT)
    for length in range(MAX_HEADER_CHARS - 6, MAX_HEADER_CHARS + 8):
        header = "h" * (length - 1) + "Q"  # 'Q' ends a segment of any length but 4k+1
        wanted = length <= MAX_HEADER_CHARS and length % 4 != 1
        assert (bearer.fullmatch(f"Bearer {header}.{'p' * 3000}.ssss") is not None) == wanted, length


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.characters(min_codepoint=0x80))
def test_a_verified_token_is_ascii_so_its_size_in_bytes_is_its_size_in_characters(at: int, char: str) -> None:
    """The token size check (checks.token_checks) reads bytes, for a token jwt_authn verified: one
    that matched BEARER_JWT, which no character beyond ASCII matches."""
    bearer = "Bearer " + ".".join(["eyJhbGciOiJSUzI1NiJ9", "eyJzdWIiOiJ4In0", "c2lnbmF0dXJl"])
    assert re.fullmatch(patterns.BEARER_JWT, bearer)
    at = at % (len(bearer) + 1)
    assert re.fullmatch(patterns.BEARER_JWT, bearer[:at] + char + bearer[at:]) is None


def _compiled_rbac_policies() -> list[dict[str, Any]]:
    """Every RBAC policy of a compiled policy (the request screen's and every route's)."""
    compiled = compile_policy(parse_policy(EVERY_KIND))
    return [policy for rules in _all_rbac_policies(compiled.listeners) for policy in rules.values()]


def _all_rbac_policies(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("policies"), dict):
            yield node["policies"]
        for value in node.values():
            yield from _all_rbac_policies(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_rbac_policies(value)


def test_the_target_length_cel_runs_only_for_a_long_target_in_bytes() -> None:
    """A target over MAX_PATH_LENGTH characters (CEL ``size``, code points) is denied only once the
    :path header matched a byte-length regex, run here by RE2 as Envoy runs it: it must match every
    target of more than MAX_PATH_LENGTH bytes, UTF-8 or not (so nothing is loosened), and no target
    of a usual length (so the CEL does not run for it)."""
    re2 = pytest.importorskip("re2")  # google-re2, through cel-python
    found = [p for p in _compiled_rbac_policies() if '"field": "path"' in json.dumps(p.get("condition"))]
    assert found
    for policy in found:
        (principal,) = policy["principals"]
        assert principal["header"]["name"] == ":path"
        gate = re2.compile(principal["header"]["string_match"]["safe_regex"]["regex"])
        condition = policy["condition"]["call_expr"]
        assert condition["function"] == "_>_" and condition["args"][1] == {"const_expr": {"int64_value": MAX_PATH_LENGTH}}
        for value, matches in ((b"/" * 1024, False), (b"/" + b"a" * 1024, True),
                               (b"/" * (MAX_PATH_LENGTH + 1), True), ("\u00e9".encode() * 512, False),
                               ("\u00e9".encode() * 4097, True), (b"/" + b"\xff" * MAX_PATH_LENGTH, True),
                               (b"/x?" + b"\x00\n" * 5000, True)):
            assert (gate.fullmatch(value) is not None) == matches, value[:8]


def test_the_token_size_is_counted_in_bytes_of_a_verified_token_only() -> None:
    found = [p for p in _compiled_rbac_policies() if '"field": "headers"' in json.dumps(p.get("condition"))]
    assert found
    for policy in found:
        size = policy["condition"]["call_expr"]["args"][0]["call_expr"]
        assert size["function"] == "size" and size["args"][0]["call_expr"]["function"] == "bytes"
        metadata = policy["principals"][0]["sourced_metadata"]["metadata_matcher"]
        assert metadata["path"] == [{"key": "payload"}, {"key": "iss"}]  # jwt_authn verified it


@pytest.mark.parametrize(("pattern", "paths", "others"), [
    ("/", ["/"], ["/a", "/a/"]),
    ("/a/b", ["/a/b"], ["/a/b/", "/a/bc", "/a"]),
    ("/a/**", ["/a", "/a/", "/a/b/c"], ["/ab", "/b"]),
    ("/**", ["/", "/a", "/a/b/"], []),
    ("/a/{x}", ["/a/b"], ["/a/", "/a/b/", "/a"]),
    ("/a/{x}/**", ["/a/b", "/a/b/", "/a/b/c"], ["/a", "/a/"]),
    ("/a.b/{x}/(c)+", ["/a.b/x/(c)+"], ["/aXb/x/(c)+", "/a.b/x/((c))", "/a.b/x/(c)"]),
])
def test_route_path_matchers(pattern: str, paths: list[str], others: list[str]) -> None:
    from authz_service.policy import pattern_parts

    route = {"name": "r", "match": patterns.route_path(tuple(pattern_parts(pattern)))}
    default = {"name": "no route", "match": {"prefix": "/"}}
    for path in paths:
        assert _envoy_first_match([route, default], "GET", path) == "r", path
    for path in others:
        assert _envoy_first_match([route, default], "GET", path) == "no route", path


def test_every_identity_spelling_is_removed_before_any_filter() -> None:
    """'-', '_' and '.' spellings alike (request.py), on every route: the early header mutation,
    one regex over the names Envoy has lower-cased, which removes those and nothing else."""
    compiled = compile_policy(parse_policy(EVERY_KIND))
    ingress = next(listener for listener in compiled.listeners if listener["name"] == "ingress")
    hcm = ingress["filter_chains"][0]["filters"][0]["typed_config"]
    mutations = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert [m["remove"] for m in mutations if "remove" in m] == ["x-request-id", "x-auth-client-id"]  # the shipped
    shipped, on_match = [re.compile(m["remove_on_match"]["key_matcher"]["safe_regex"]["regex"])
                         for m in mutations if "remove_on_match" in m]
    assert shipped.pattern == other_separator_spellings_pattern()  # the shipped one, kept
    names = identity_and_override_spellings()
    removed = {name for name in names if on_match.fullmatch(name)}
    assert removed == {name for name in names if name.translate(str.maketrans("_.", "--")) in IDENTITY_HEADERS}
    assert len(removed) == 45 and {"x-auth-client-id", "x_auth.client-id", "x.auth.sub"} <= removed
    for other in ("x-auth-client-idx", "xx-auth-sub", "x-auth-sub-", "x-auth--sub", "x-auth", "authorization",
                  "x-http-method-override"):
        assert not on_match.fullmatch(other), other  # override spellings are refused (400), not removed


def test_the_service_is_asked_exactly_as_shipped_whenever_no_token_was_verified() -> None:
    """The ext_authz filter is created behind a matcher after jwt_authn: skipped where jwt_authn left
    a verified payload, and otherwise the shipped filter, unchanged (fail closed: 503 on error,
    never allow), under the shipped name, so the routes that turn it off still do."""
    compiled = compile_policy(parse_policy(EVERY_KIND))
    shipped = envoyconf.http_filter(yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text()),
                                    envoyconf.EXT_AUTHZ)
    names = [f["name"] for f in envoyconf.http_filters(compiled.bootstrap(), "ingress")]
    assert names.index("authz.jwt") < names.index(envoyconf.EXT_AUTHZ)
    wrapper = envoyconf.http_filter(compiled.bootstrap(), envoyconf.EXT_AUTHZ, "ingress")
    matcher = wrapper["xds_matcher"]
    (verified,) = matcher["matcher_list"]["matchers"]
    predicate = verified["predicate"]["single_predicate"]
    assert predicate["input"]["typed_config"]["filter"] == "envoy.filters.http.jwt_authn"
    assert predicate["input"]["typed_config"]["path"] == [{"key": "payload"}, {"key": "iss"}]
    assert predicate["custom_match"]["typed_config"]["value"] == {"present_match": True}
    assert verified["on_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")
    created = matcher["on_no_match"]["action"]["typed_config"]["typed_config"]
    assert created == {"name": envoyconf.EXT_AUTHZ, "typed_config": shipped}
    assert shipped["failure_mode_allow"] is False and shipped["status_on_error"] == {"code": 503}


def test_every_policy_route_removes_the_token_unless_it_forwards_it() -> None:
    """Whoever decides (Envoy natively, the service, nobody on a public route), the app gets no
    Authorization header unless the route forwards it; the screen routes leave it to the service's
    answer (they match no one policy route)."""
    compiled = compile_policy(parse_policy(EVERY_KIND + """\
  - {name: exchange, path: '/exchange', scopes: [t/read], forward_token: true}
  - {name: signed-in, path: '/signed-in/**', public: true, forward_token: true}
"""))
    ingress = next(listener for listener in compiled.listeners if listener["name"] == "ingress")
    hcm = ingress["filter_chains"][0]["filters"][0]["typed_config"]
    removes = {route["name"]: route.get("request_headers_to_remove") for route in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    policy_routes = {name: removed for name, removed in removes.items() if not name.startswith(("screen:", "no route"))}
    forwarding = {name for name in policy_routes if "exchange" in name or "signed-in" in name}
    assert forwarding == {"native: exchange", "none: signed-in"}
    assert {name: removed for name, removed in policy_routes.items() if name not in forwarding} == {
        name: ["authorization"] for name in policy_routes if name not in forwarding}
    assert len(policy_routes) > len(forwarding) + 8  # the service's routes come in pairs (bearer, anonymous)
    assert all(policy_routes[name] is None for name in forwarding)
    assert all(removed is None for name, removed in removes.items() if name.startswith("screen:"))


# --- options and errors --------------------------------------------------------------------------


def test_addresses() -> None:
    assert parse_address("127.0.0.1:9191") == Address("127.0.0.1", 9191)
    assert parse_address("[::1]:80") == Address("::1", 80) and str(Address("::1", 80)) == "[::1]:80"
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":80", "::1:80", "a b:1", "authz:8181",
                "localhost:80", "999.1.1.1:80", "[::g]:80"):
        with pytest.raises(ValueError, match="IP:PORT"):
            parse_address(bad)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz_service.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["--leeway", "1"], "--leeway 1: at least 2 seconds"),
    (["--service-http", "0.0.0.0:8181"], "--service-http 0.0.0.0:8181: Envoy connects there"),
    (["--realm", 'a"b'], "--realm 'a\"b'"),
    (["--jwt-cache-size", "-1"], "--jwt-cache-size"),
    (["--heap-cap", "63"], "--heap-cap 63: at least 64 MiB"),
    # Envoy reads the cap as a 64-bit count of bytes: one MiB more would not start it.
    (["--heap-cap", str(2**44)], f"--heap-cap {2**44}: at most {2**44 - 1} MiB"),
])
def test_options_that_cannot_serve_are_refused(args: list[str], message: str) -> None:
    run = cli("compile", "envoy", str(EXAMPLE_POLICY), *args)
    assert run.returncode == 2 and run.stdout == ""
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--admin", "127.0.0.1:9901", "--health", "127.0.0.1:9901"],
     "--admin 127.0.0.1:9901 (default) and --health 127.0.0.1:9901 are one port: give each of Envoy's listeners "
     "a port of its own"),
    (["--listen", "127.0.0.1:9902"],
     "--listen 127.0.0.1:9902 and --health 0.0.0.0:9902 (default) are one port: give each of Envoy's listeners"),
    (["--listen", "127.0.0.1:8000"],
     "--app 127.0.0.1:8000 (default) and --listen 127.0.0.1:8000 are one port: Envoy would connect to its own "
     "listener, not to the protected application"),
    (["--listen", "0.0.0.0:7000", "--service-grpc", "127.0.0.1:7000"],
     "--service-grpc 127.0.0.1:7000 and --listen 0.0.0.0:7000 are one port"),
    (["--service-http", "127.0.0.1:9901"], "--service-http 127.0.0.1:9901 and --admin 127.0.0.1:9901 (default)"),
])
def test_addresses_envoy_cannot_use_together_are_refused_naming_both(args: list[str], message: str) -> None:
    run = cli("compile", "envoy", str(EXAMPLE_POLICY), *args)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.startswith(f"authz-service compile envoy: error: {message}"), run.stderr


@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:9902", "--health", "127.0.0.2:9902"],  # one number, two addresses
    ["--listen", "[::1]:8000"],  # the app on 127.0.0.1:8000: another family
])
def test_one_port_number_on_distinct_addresses_is_no_conflict(args: list[str]) -> None:
    run = cli("compile", "envoy", str(EXAMPLE_POLICY), *args, "--report", "none")
    assert run.returncode == 0, run.stderr


def test_the_xds_bootstrap_refuses_envoy_s_listeners_on_one_port_too() -> None:
    run = cli("compile", "envoy", "--xds-dir", "/var/run/authz-xds", "--health", "127.0.0.1:9901")
    assert run.returncode == 2 and "--admin 127.0.0.1:9901 (default) and --health 127.0.0.1:9901" in run.stderr


def test_a_relative_xds_dir_is_made_absolute(tmp_path: Path) -> None:
    """Envoy resolves a relative path against its own working directory, not the one compile ran in."""
    run = subprocess.run([sys.executable, "-m", "authz_service.cli", "compile", "envoy", "--xds-dir", "xds/./run"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    source = yaml.safe_load(run.stdout)["dynamic_resources"]["lds_config"]["path_config_source"]
    assert source == {"path": f"{tmp_path}/xds/run/listeners.json", "watched_directory": {"path": f"{tmp_path}/xds/run"}}
    assert f"{tmp_path}/xds/run/listeners.json" in run.stderr


SERVE_ENVIRONMENT = {"AUTHZ_REALM": "shop", "AUTHZ_LEEWAY": "30.7", "AUTHZ_NATIVE_JWT_CACHE_SIZE": "0",
                     "AUTHZ_NATIVE_JWKS_CACHE": "9", "AUTHZ_NATIVE_LISTEN": "127.0.0.1:7080",
                     "AUTHZ_NATIVE_HEAP_CAP": "200", "AUTHZ_GRPC_PORT": "7191", "AUTHZ_HTTP_HOST": "0.0.0.0",
                     "AUTHZ_HTTP_PORT": "7181"}


def cluster_address(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def test_compile_envoy_takes_the_services_variables_for_the_flags_not_given() -> None:
    """Configured only through the environment, the service and the Envoy compiled there agree
    (tests/e2e/test_native_settings_e2e.py shows the answers); a flag still wins."""
    run = cli_env("compile", "envoy", str(EXAMPLE_POLICY), "--report", "none", env=SERVE_ENVIRONMENT)
    assert run.returncode == 0, run.stderr
    text = json.dumps(yaml.safe_load(run.stdout))
    assert 'realm=\\"shop\\"' in text and 'realm=\\"authz-service\\"' not in text
    assert '"clock_skew_seconds": 29' in text  # 30.7 rounded down, less one: never past the service's
    assert "jwt_cache_config" not in text and '"cache_duration": "9s"' in text
    assert '{"address": "127.0.0.1", "port_value": 7080}' in text
    assert f'"max_heap_size_bytes": {200 << 20}' in text
    # Envoy reaches the service where serve listens: 0.0.0.0 (every address) on loopback.
    bootstrap = yaml.safe_load(run.stdout)
    assert cluster_address(bootstrap, "authz_service") == {"address": "127.0.0.1", "port_value": 7191}
    assert cluster_address(bootstrap, "authz_service_http") == {"address": "127.0.0.1", "port_value": 7181}
    run = cli_env("compile", "envoy", str(EXAMPLE_POLICY), "--report", "none", "--realm", "other",
                  "--service-grpc", "127.0.0.2:7000", env=SERVE_ENVIRONMENT)
    assert 'realm=\\"other\\"' in json.dumps(yaml.safe_load(run.stdout))
    assert cluster_address(yaml.safe_load(run.stdout), "authz_service") == {"address": "127.0.0.2", "port_value": 7000}
    # The xDS form: the listener's settings are serve's to write; the rest is the bootstrap's.
    run = cli_env("compile", "envoy", "--xds-dir", "/var/run/authz-xds", "--report", "none", env=SERVE_ENVIRONMENT)
    assert run.returncode == 0, run.stderr
    assert f'"max_heap_size_bytes": {200 << 20}' in json.dumps(yaml.safe_load(run.stdout))
    assert cluster_address(yaml.safe_load(run.stdout), "authz_service_http")["port_value"] == 7181


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("AUTHZ_LEEWAY", "1.5", "AUTHZ_LEEWAY='1.5': Envoy's jwt_authn needs a leeway of at least 2 seconds"),
    ("AUTHZ_LEEWAY", "soon", "AUTHZ_LEEWAY='soon' (serve's --leeway, which --leeway follows): expected a number"),
    ("AUTHZ_NATIVE_HEAP_CAP", "10", "AUTHZ_NATIVE_HEAP_CAP='10': at least 64 MiB"),
    ("AUTHZ_REALM", 'a"b', "AUTHZ_REALM='a\"b' (serve's --realm, which --realm follows)"),
    ("AUTHZ_NATIVE_LISTEN", "localhost:8080", "AUTHZ_NATIVE_LISTEN='localhost:8080' (serve's --native-listen"),
    ("AUTHZ_GRPC_HOST", "localhost", "AUTHZ_GRPC_HOST='localhost': Envoy connects to an IP address, not a host name"),
    # Values serve refuses are refused here too, not read as 0.0.0.0 or with a bracket dropped.
    ("AUTHZ_GRPC_HOST", "", "AUTHZ_GRPC_HOST='' (serve's --grpc-host, which --service-grpc follows): an address"),
    ("AUTHZ_HTTP_HOST", " ", "AUTHZ_HTTP_HOST=' ' (serve's --http-host, which --service-http follows): an address"),
    ("AUTHZ_GRPC_HOST", "[::1", "AUTHZ_GRPC_HOST='[::1' (serve's --grpc-host, which --service-grpc follows): an"),
    ("AUTHZ_HTTP_PORT", "0", "AUTHZ_HTTP_PORT='0': port 0 lets the kernel pick the service's port"),
    ("AUTHZ_GRPC_PORT", "x", "AUTHZ_GRPC_PORT='x' (serve's --grpc-port, which --service-grpc follows)"),
])
def test_a_service_variable_compile_envoy_cannot_use_is_refused_naming_it(variable: str, value: str,
                                                                         message: str) -> None:
    run = cli_env("compile", "envoy", str(EXAMPLE_POLICY), env={variable: value})
    assert_one_clean_line(run, f"authz-service compile envoy: error: {message}")


@pytest.mark.parametrize(("env", "message"), [
    ({"AUTHZ_NATIVE_LISTEN": "127.0.0.1:9901"},
     "--listen 127.0.0.1:9901 (from AUTHZ_NATIVE_LISTEN) and --admin 127.0.0.1:9901 (default) are one port"),
    ({"AUTHZ_GRPC_HOST": "0.0.0.0", "AUTHZ_GRPC_PORT": "9901"},
     "--service-grpc 127.0.0.1:9901 (from AUTHZ_GRPC_HOST and AUTHZ_GRPC_PORT) and --admin 127.0.0.1:9901 "
     "(default) are one port"),
])
def test_a_port_clash_names_the_service_variable_an_address_came_from(env: dict[str, str], message: str) -> None:
    run = cli_env("compile", "envoy", str(EXAMPLE_POLICY), env=env)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"authz-service compile envoy: error: {message}"), run.stderr


def test_naming_no_policy_has_the_prefix_of_every_other_error() -> None:
    run = cli("compile", "envoy")
    assert run.returncode == 2
    assert run.stderr == "authz-service compile envoy: error: name the policy file: POLICY, --policy or AUTHZ_POLICY\n"


def test_a_policy_that_does_not_load_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("issuers: []\n")
    run = cli("compile", "envoy", str(bad))
    assert run.returncode == 2 and str(bad) in run.stderr and run.stdout == ""


# --- what is printed -------------------------------------------------------------------------------


def test_report_names_every_route_with_its_engine_and_why(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(EVERY_KIND)
    run = cli("compile", "envoy", str(policy), "-o", str(tmp_path / "envoy.yaml"))
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[0] == f"{policy}: 9 routes: 4 native, 4 ext_authz, 1 public (routes in Envoy's order)"
    assert any(re.match(r"\s+ext_authz\s+trial\s+ANY /trial/\*\*: dry-run", line) for line in lines)
    assert any(re.match(r"\s+none\s+docs\s+GET\|HEAD /docs/\*\*: public", line) for line in lines)
    report = json.loads(cli("compile", "envoy", str(policy), "--report", "json").stderr)
    assert [r["engine"] for r in report["routes"]].count("native") == 4
    assert report["sha256"] == parse_policy(EVERY_KIND).sha256


TRAILING_PAIRS = ISSUERS + """\
  - {name: report, path: /admin/report, methods: [GET], scopes: [admin/read]}
  - {name: item, path: '/items/{id}', scopes: [s]}
  - {name: trial, path: '/items/7/**', scopes: [t], mode: dry-run}
  - {name: writes, path: '/admin/**', methods: [POST], scopes: [w]}
"""


def test_report_names_the_route_pairs_a_path_ending_in_a_slash_must_meet() -> None:
    """/items/7/ must meet the dry-run /items/7/** and /items/{id}: the service's; any other
    /items/x/ and GET /admin/report/ no /** route takes (POST only under /admin/**): no route, the
    default deny."""
    compiled = compile_policy(parse_policy(TRAILING_PAIRS))
    assert report_json(compiled)["trailing_slash"] == [{"routes": ["trial", "item"], "methods": None,
                                                        "engine": "ext_authz"}]
    assert "1 pair, 0 native, 1 ext_authz (trial + item), 0 public\n" in report_text(compiled)
    assert "must meet two routes" not in report_text(compile_policy(parse_policy(EVERY_KIND)))


@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
@pytest.mark.parametrize("policy_text", [None, EVERY_KIND, BOUND_AND_DENIED, TRAILING_PAIRS],
                         ids=["example", "every-kind", "deny", "trailing-pairs"])
def test_envoy_accepts_the_bootstrap(tmp_path: Path, policy_text: str | None) -> None:
    """`envoy --mode validate`: every field, type, constraint, regex and filter name is Envoy's."""
    policy = EXAMPLE_POLICY
    if policy_text is not None:
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy_text)
    run = cli("compile", "envoy", "--policy", str(policy), "--report", "none")
    assert run.returncode == 0, run.stderr
    config = tmp_path / "envoy.yaml"
    config.write_text(run.stdout)
    assert yaml.safe_load(run.stdout)["static_resources"]["listeners"][0]["name"] == "ingress"
    envoy = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config)], capture_output=True,
                           text=True, timeout=120)
    assert envoy.returncode == 0 and f"configuration '{config}' OK" in envoy.stdout + envoy.stderr, envoy.stderr[-3000:]
    assert "Deprecated field" not in envoy.stdout + envoy.stderr


def test_the_output_file_is_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    out.write_text("previous")
    run = cli("compile", "envoy", str(EXAMPLE_POLICY), "-o", str(out), "--report", "none")
    assert run.returncode == 0 and run.stderr == ""
    assert out.read_text().startswith("# Envoy bootstrap compiled by `authz-service compile envoy`")
    assert [p.name for p in tmp_path.iterdir()] == ["envoy.yaml"]  # no temporary file left
    assert out.stat().st_mode & 0o044  # readable by Envoy's user, not mkstemp's 0600


def test_an_output_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    run = cli("compile", "envoy", str(EXAMPLE_POLICY), "-o", str(tmp_path / "missing" / "envoy.yaml"))
    assert run.returncode == 2 and "cannot write it: No such file or directory" in run.stderr
    assert "Traceback" not in run.stderr


# --- the keys Envoy fetches --------------------------------------------------------------------------


def test_the_served_jwks_holds_the_keys_the_service_verifies_with() -> None:
    keys = {k.kid: k for k in (make_key("kid-1"), make_key("kid-2"))}
    parsed = parse_jwks(json.dumps({"keys": [k.jwk() for k in keys.values()]}).encode()).keys
    served = json.loads(jwks_document(parsed))
    assert [entry["kid"] for entry in served["keys"]] == ["kid-1", "kid-2"]
    assert all(entry["alg"] == "RS256" and entry["use"] == "sig" and "d" not in entry for entry in served["keys"])
    again = parse_jwks(jwks_document(parsed)).keys
    assert {kid: key.key.public_numbers() for kid, key in again.items()} == \
           {kid: key.key.public_numbers() for kid, key in parsed.items()}


# --- the xDS form: serve --native-xds-dir writes the listener, compile envoy --xds-dir the bootstrap ----


def test_the_xds_bootstrap_reads_the_listener_the_service_writes(tmp_path: Path) -> None:
    """The bootstrap names the file and directory serve writes into; its static parts are the
    compiled bootstrap's, but for the listener and the node's policy (the listener's version)."""
    from authz_service.native.xds import LISTENERS_FILE, xds_bootstrap

    bootstrap = xds_bootstrap(Options(), PurePosixPath("/var/run/authz-xds"))
    source = bootstrap["dynamic_resources"]["lds_config"]["path_config_source"]
    assert source == {"path": f"/var/run/authz-xds/{LISTENERS_FILE}",
                      "watched_directory": {"path": "/var/run/authz-xds"}}
    compiled = compile_policy(parse_policy(EVERY_KIND)).bootstrap()
    assert [item["name"] for item in bootstrap["static_resources"]["listeners"]] == ["envoy-health"]
    assert bootstrap["static_resources"]["clusters"] == compiled["static_resources"]["clusters"]
    assert {k: v for k, v in bootstrap.items() if k not in ("dynamic_resources", "static_resources", "node")} == \
           {k: v for k, v in compiled.items() if k not in ("static_resources", "node")}
    assert "metadata" not in bootstrap["node"]  # the policy is named by the listener's version


def test_the_listener_file_is_a_discovery_response_versioned_by_the_policy(tmp_path: Path) -> None:
    from authz_service.native.xds import LISTENER_TYPE, listener_text

    policy = parse_policy(EVERY_KIND)
    compiled = compile_policy(policy)
    response = json.loads(listener_text(compiled))
    assert response["version_info"] == policy.sha256
    [listener] = response["resources"]
    assert listener.pop("@type") == LISTENER_TYPE and listener == compiled.listeners[0]


def control_plane(xds: Path, registry=None):
    """Native mode's control plane writing into ``xds``, for the example policy (settings from the
    command line only, never this process's AUTHZ_* variables)."""
    from authz_service.config import settings_from
    from authz_service.metrics import Metrics
    from authz_service.native.control import NativeControlPlane
    from prometheus_client import CollectorRegistry

    settings = settings_from({"policy": str(EXAMPLE_POLICY), "native_xds_dir": str(xds)}, {})
    return NativeControlPlane(settings, Metrics(registry or CollectorRegistry()))


@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
def test_envoy_accepts_the_xds_bootstrap_with_the_listener_serve_writes(tmp_path: Path) -> None:
    """`envoy --mode validate` on the bootstrap `compile envoy --xds-dir` prints, the listener file
    in place as `serve --native-xds-dir` writes it (the listener itself is validated in its
    bootstrap form above: the same dictionary)."""
    xds = tmp_path / "xds"
    xds.mkdir()
    run = cli("compile", "envoy", "--xds-dir", str(xds), "-o", str(tmp_path / "envoy.yaml"))
    assert run.returncode == 0 and f"{xds}/listeners.json" in run.stderr, run.stderr
    plane = control_plane(xds)
    plane._write(plane._compile(plane.load(EXAMPLE_POLICY)))
    envoy = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                           capture_output=True, text=True, timeout=120)
    assert envoy.returncode == 0 and "OK" in envoy.stdout + envoy.stderr, envoy.stderr[-3000:]
    assert "Deprecated field" not in envoy.stdout + envoy.stderr


def test_a_listener_write_failing_again_is_logged_once_and_counted_each_time(tmp_path: Path, caplog) -> None:
    """A directory that cannot be written is retried every second: one error line per failure, not
    per retry (the counter and /readyz tell the rest); a failure after a success is logged again."""
    from prometheus_client import CollectorRegistry

    xds = tmp_path / "xds"
    registry = CollectorRegistry()
    plane = control_plane(xds, registry)
    listener = plane._compile(plane.load(EXAMPLE_POLICY))

    def fail() -> None:
        with pytest.raises(OSError, match="cannot write"):
            plane._write(listener)

    def logged() -> int:
        return sum("native listener not written" in r.getMessage() for r in caplog.records)

    def errors() -> float:
        return registry.get_sample_value("authz_native_listener_writes_total", {"result": "error"})

    with caplog.at_level("ERROR", logger="authz_service.native.control"):
        fail()
        fail()
        fail()
        assert (logged(), errors()) == (1, 3) and "No such file" in plane.last_error
        xds.mkdir()
        plane._write(listener)
        assert plane.last_error is None and plane.written_sha256 == listener.sha256
        (xds / "listeners.json").unlink()
        xds.rmdir()
        fail()
        assert (logged(), errors()) == (2, 4)


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:80"], "--listen with --xds-dir: the service writes the listener it sets; give it to "
                                   "serve as --native-listen"),
    (["--leeway", "5"], "give it to serve as --leeway"),
    (["--no-decision-stats"], "--no-decision-stats with --xds-dir"),
])
def test_the_xds_bootstrap_refuses_the_listener_s_own_options(args: list[str], message: str) -> None:
    run = cli("compile", "envoy", "--xds-dir", "/var/run/authz-xds", *args)
    assert run.returncode == 2 and message in run.stderr and run.stdout == ""


def test_the_xds_bootstrap_names_no_policy() -> None:
    run = cli("compile", "envoy", "--xds-dir", "/var/run/authz-xds", str(EXAMPLE_POLICY))
    assert run.returncode == 2 and "name no POLICY" in run.stderr and run.stdout == ""


@pytest.mark.parametrize(("values", "message"), [
    ({"workers": "2"}, "--native-xds-dir (AUTHZ_NATIVE_XDS_DIR) with --workers (AUTHZ_WORKERS) above 1"),
    ({"leeway": "60.5"}, "Envoy counts whole seconds"),
    ({"leeway": "1"}, "at least 2"),
    ({"native_listen": "localhost:8080"}, "--native-listen='localhost:8080' is invalid: expected IP:PORT"),
    # Refused as the setting it is, not as a policy that does not compile.
    ({"native_heap_cap": "63"}, "--native-heap-cap (AUTHZ_NATIVE_HEAP_CAP) 63: at least 64 MiB"),
    ({"native_heap_cap": str(2**44)}, f"--native-heap-cap (AUTHZ_NATIVE_HEAP_CAP) {2**44}: at most {2**44 - 1} MiB"),
])
def test_serve_refuses_what_native_mode_cannot_serve(values: dict[str, str], message: str) -> None:
    from authz_service.config import ConfigError, settings_from

    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from({"policy": "/p", "native_xds_dir": "/var/run/authz-xds", **values}, {})


def test_a_policy_the_compiler_refuses_is_refused_as_one_that_does_not_load(tmp_path: Path, monkeypatch) -> None:
    """What stops the compiler stops the policy: the reloader then keeps the previous one, in the
    service and in Envoy (tests/e2e/test_native_xds_e2e.py shows a refused file through Envoy)."""
    from authz_service.native import control

    plane = control_plane(tmp_path)

    def refuse(policy, options):
        raise ValueError("no such Envoy matcher")

    monkeypatch.setattr(control, "compile_policy", refuse)
    with pytest.raises(PolicyError, match=r"policy.yaml: cannot be compiled into Envoy's listener \(native mode\): "
                                          r"ValueError: no such Envoy matcher"):
        plane.load(EXAMPLE_POLICY)
