"""Property-based fuzzing of the whole Check path and of the policy loader.

* ``Check`` (parse -> decide -> render, the real servicer and TokenVerifier) on random policies,
  raw paths, headers and tokens: it never raises, never answers 500, and every allow is granted by a
  reference matcher written differently from policy.py (regular expressions over the raw path).
* ``normalized_path``: only BadRequest, and an accepted path is normal by a reference check that
  percent-decodes first.
* ``parse_policy``: arbitrary YAML structures and bytes give a Policy or a PolicyError, nothing else.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2
from authz_service.metrics import Metrics
from authz_service.policy import Policy, PolicyError, parse_policy
from authz_service.request import BadRequest, normalized_path
from authz_service.check import Checker
from authz_service.doors.grpc import AuthorizationServicer
from authz_service.response import Answers
from authz_service.tokens import TokenVerifier

from .conftest import ISSUER, MemoryKeys, SigningKey, make_key


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEGMENTS = ["a", "b", "admin", "pay", "A", ".", "..", "%2e%2e", "%2E", "%2f", "%5C", "%41", "%20", "%c0%ae", "%",
            "%zz", ";x", "..;", "", "\\", "\x00", "\t", "é", " ", "a?b", "a#b", "~", "-", "{x}", "**", "*"]
SCOPES = ["s1", "s2", "s3"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "get"]

_KEY: SigningKey | None = None


def signing_key() -> SigningKey:
    global _KEY
    if _KEY is None:
        _KEY = make_key("kid-fuzz")
    return _KEY


class Holder:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.last_error = None


# --- random policies -------------------------------------------------------------------------------

route_specs = st.lists(
    st.tuples(
        st.lists(st.sampled_from(["a", "b", "admin", "pay", "{p}"]), max_size=3),
        st.booleans(),  # trailing /**
        st.one_of(st.none(), st.lists(st.sampled_from(METHODS), min_size=1, max_size=2, unique=True)),
        st.one_of(st.none(), st.lists(st.sampled_from(SCOPES), min_size=1, max_size=2, unique=True)),  # None: public
    ),
    min_size=1, max_size=6,
)


def pattern(parts: list[str], rest: bool) -> str:
    named = [f"{{p{i}}}" if p == "{p}" else p for i, p in enumerate(parts)]
    return "/" + "/".join(named + (["**"] if rest else []))


def build_policy(specs) -> tuple[Policy, list[dict]] | None:
    routes = []
    for i, (parts, rest, methods, scopes) in enumerate(specs):
        route: dict = {"name": f"r{i}", "path": pattern(parts, rest)}
        if methods is not None:
            route["methods"] = methods
        if scopes is None:
            route["public"] = True
        else:
            route["scopes"] = scopes
        routes.append(route)
    doc = {"issuers": [{"user_pool_id": "us-east-1_Test00001", "issuer": ISSUER}], "routes": routes}
    try:
        return parse_policy(yaml.safe_dump(doc), source="fuzz.yaml"), routes
    except PolicyError:
        return None  # e.g. two routes with equal specificity: refused at load, nothing to check


def reference_regex(path_pattern: str) -> re.Pattern[str]:
    """Route pattern -> regex over the raw path, independent of the trie."""
    if path_pattern == "/**":
        return re.compile(r"/.*\Z")
    out = ""
    for part in path_pattern[1:].split("/") if path_pattern != "/" else []:
        if part == "**":
            out += r"(?:/.*)?"
        elif part.startswith("{"):
            out += r"/[^/]+"
        else:
            out += "/" + re.escape(part)
    return re.compile((out or "/") + r"\Z")


def reference_grants(routes: list[dict], method: str, raw_path: str, scopes: set[str] | None) -> bool:
    """True if *some* route matching this request would let it through (public, or a held scope)."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    for route in routes:
        listed = route.get("methods")
        if listed is not None and method not in listed and not (method == "HEAD" and "GET" in listed):
            continue
        if method != method.upper():
            continue  # methods are upper-case tokens: anything else is refused
        if not reference_regex(route["path"]).match(path):
            continue
        if route.get("public") or (scopes is not None and set(route["scopes"]) & scopes):
            return True
    return False


tokens = st.one_of(
    st.tuples(st.just("valid"), st.lists(st.sampled_from(SCOPES + ["s1x", "s", "S1"]), max_size=3, unique=True)),
    st.tuples(st.sampled_from(["expired", "wrong-iss", "id-token", "foreign", "junk", "none", "tampered"]),
              st.just([])),
)


def make_token(kind: str, scopes: list[str]) -> str | None:
    key = signing_key()
    if kind == "valid":
        return key.token(scope=" ".join(scopes))
    if kind == "expired":
        return key.token(exp=1_000_000)
    if kind == "wrong-iss":
        return key.token(iss=ISSUER + "/")
    if kind == "id-token":
        return key.token(token_use="id", scope="s1 s2 s3")
    if kind == "foreign":
        return key.token(header={"kid": "other"}, scope="s1 s2 s3")
    if kind == "tampered":
        h, p, s = key.token(scope="s1").split(".")
        return f"{h}.{p[:-2]}AA.{s}"
    if kind == "junk":
        return "e30.e30.e30"
    return None


def grpc_servicer(policy: Policy) -> AuthorizationServicer:
    """The gRPC front door over the real Check pipeline, with this policy and the fuzz key."""
    checker = Checker(Holder(policy), TokenVerifier(MemoryKeys(signing_key())), Answers("fuzz"),
                      Metrics(CollectorRegistry()).per_check)
    return AuthorizationServicer(checker)


@FUZZ
@given(specs=route_specs, method=st.sampled_from(METHODS),
       segments=st.lists(st.sampled_from(SEGMENTS), max_size=4), query=st.sampled_from(["", "?x=/../admin", "#f"]),
       token=tokens, extra_auth=st.sampled_from([None, "Basic eDp5", "Bearer", "Bearer a b"]))
def test_check_never_crashes_and_never_allows_what_the_policy_does_not_grant(
        specs, method, segments, query, token, extra_auth) -> None:
    built = build_policy(specs)
    if built is None:
        return
    policy, routes = built
    servicer = grpc_servicer(policy)
    raw_path = "/" + "/".join(segments) + query
    kind, scopes = token
    bearer = make_token(kind, scopes)
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = method, raw_path
    auth = [f"Bearer {bearer}"] if bearer else []
    if extra_auth:
        auth.append(extra_auth)
    if auth:
        http.headers["authorization"] = ",".join(auth)  # what Envoy does with repeated headers
    response = asyncio.run(servicer.Check(request, None))
    if response.HasField("denied_response"):
        assert response.denied_response.status.code in (400, 401, 403), response.denied_response.body
        return
    assert response.status.code == 0
    held = set(scopes) if kind == "valid" and extra_auth is None else None
    assert reference_grants(routes, method, raw_path, held), (raw_path, method, kind, scopes, extra_auth)


def reference_is_normal(path: str) -> bool:
    """Independent statement of 'normal form': printable ASCII, and after strict percent-decoding
    no dot segments, no empty inner segments, no slash/backslash/semicolon/controls/percent."""
    if not path.startswith("/") or any(not (0x21 <= ord(c) <= 0x7E) for c in path):
        return False
    raw_segments = path[1:].split("/")
    for i, raw in enumerate(raw_segments):
        if raw == "" and i != len(raw_segments) - 1:
            return False
        if any(c in raw for c in ";\\\"<>`^{}|[]"):
            return False
        try:
            decoded = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return False
        if decoded in (".", "..") or any(c in decoded for c in "/\\%") or any(ord(c) < 0x20 or ord(c) == 0x7F
                                                                             for c in decoded):
            return False
        if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
            return False
        if any(urllib.parse.unquote(m) == urllib.parse.quote(urllib.parse.unquote(m), safe="")
               for m in re.findall(r"%[0-9A-Fa-f]{2}", raw)):
            return False  # an escaped unreserved character (RFC 3986 6.2.2.2 says decode it)
    return True


path_text = st.lists(
    st.one_of(st.sampled_from(SEGMENTS + ["/", "//", "%2e", "%", "%0", "%ff", "%c3%a9", "?", "#"]),
              st.text(max_size=4)),
    max_size=8,
).map("".join)


@FUZZ
@given(tail=path_text)
def test_normalized_path_only_raises_bad_request_and_accepts_only_normal_paths(tail: str) -> None:
    target = "/" + tail
    try:
        path = normalized_path(target)
    except BadRequest:
        return
    assert target.startswith(path)
    assert reference_is_normal(path), path


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=12), st.sampled_from(["GET", "/a/{x}", "/**", "s1", "dry-run", "enforce",
                                                                "us-east-1_Abc123", "https://x.example/p"]))
yaml_keys = st.sampled_from(["issuers", "routes", "mode", "user_pool_id", "region", "issuer", "jwks_uri", "client_ids",
                             "name", "methods", "path", "scopes", "public", "other"])
yaml_docs = st.recursive(yaml_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(yaml_keys, children, max_size=5)), max_leaves=25)


@FUZZ
@given(doc=yaml_docs)
def test_parse_policy_gives_a_policy_or_a_policy_error(doc) -> None:
    try:
        policy = parse_policy(yaml.safe_dump(doc), source="fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    assert policy.routes and policy.issuers


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_parse_policy_on_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_policy(data, source="fuzz.yaml")
    except PolicyError:
        pass


@pytest.mark.parametrize("path", ["/pay/%c0%ae%c0%ae/admin", "/pay/%2e%2e/admin", "/pay/../admin", "/pay;/../admin"])
def test_reference_and_product_agree_on_known_tricks(path: str) -> None:
    """The fuzz oracle itself must call these not normal (a test of the test)."""
    assert not reference_is_normal(path)
    with pytest.raises(BadRequest):
        normalized_path(path)


def test_the_fuzz_harness_can_allow_and_deny() -> None:
    """The Check property above is not vacuous: this harness allows a granted request."""
    built = build_policy([(["pay", "{p}"], False, ["POST"], ["s1"]), (["a"], True, None, None)])
    assert built is not None
    policy, routes = built
    servicer = grpc_servicer(policy)
    outcomes = []
    for method, path, scope in [("POST", "/pay/7", "s1"), ("POST", "/pay/7", "s2"), ("GET", "/a/b/c", None),
                                ("GET", "/pay/7", "s1")]:
        request = external_auth_pb2.CheckRequest()
        request.attributes.request.http.method = method
        request.attributes.request.http.path = path
        if scope:
            request.attributes.request.http.headers["authorization"] = f"Bearer {make_token('valid', [scope])}"
        response = asyncio.run(servicer.Check(request, None))
        outcomes.append(response.status.code == 0)
        assert outcomes[-1] == reference_grants(routes, method, path, {scope} if scope else None)
    assert outcomes == [True, False, True, False]
