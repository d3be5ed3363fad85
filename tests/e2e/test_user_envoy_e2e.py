"""The service behind an Envoy config of the user's own, not ours.

Many users, and any outside conformance suite, run the service behind the smallest Envoy config
Envoy's ext_authz example and docs/deploy.md ("What each mode needs from Envoy") lead to:
tests/data/envoy-user-{grpc,http}.yaml, with Envoy's default path handling (no normalize_path, no
merge_slashes, escaped slashes kept), no early header mutation and no admission control. What the
shipped configs' hardening does there must be the service's own doing. The attacks whose defence
is the service's, through those configs, in both ext_authz modes:

* a path Envoy leaves as sent is refused (400) by the service where the shipped Envoy normalizes
  it, and no path trick, over HTTP/1.1 or HTTP/2, reaches what the policy protects;
* a method that is not an upper-case token, and a method or URL override (a header in any
  spelling, or ``?_method``), are refused;
* no spelling of an identity header the client sent reaches the app, the verified identity does;
* two Authorization fields are refused, a client's x-authz-original-path decides nothing, a
  client's x-request-id (which Envoy's defaults keep) is bounded in the decision log;
* request smuggling shapes carry no protected request to the app.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import yaml

from .. import envoyconf
from .harness import USER_ENVOY_CONFIGS, Http2Connection, UpstreamProcess, http_request
from .security_stack import (ANY_SEPARATOR_IDENTITY, ANY_SEPARATOR_OVERRIDES, SecurityStack, deny_count, logged,
                             start_security_stack, stop_security_stack)
from .test_path_confusion_e2e import TRICKS, assert_justified, oracle_allows

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("user-envoy"), upstream, module_envoy_factory, mode=mode,
                             envoy_config=USER_ENVOY_CONFIGS[mode])
    yield s
    stop_security_stack(s)


def test_the_envoy_runs_without_the_shipped_hardening(stack: SecurityStack) -> None:
    """Guards what this module is about: Envoy runs the user's config, not a shipped one."""
    config = yaml.safe_load(stack.envoy.config_path.read_text())
    hcm = envoyconf.hcm(config, "ingress")
    hardening = {"normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
                 "early_header_mutation_extensions", "max_request_headers_kb"}
    assert hardening.isdisjoint(hcm), sorted(hardening & set(hcm))
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    if stack.mode == "http":
        assert envoyconf.http_door_mismatches(config, "") == []


# --- paths ------------------------------------------------------------------------------------------

# Each is /transactions to a lenient reader; the shipped Envoy forwards the first five as
# /transactions (normalized) and answers 400 itself for the escaped slashes. Envoy's defaults pass
# them on as sent.
LEFT_AS_SENT = ["//transactions", "/public/../transactions", "/public/%2e%2e/transactions", "/./transactions",
                "/%74ransactions", "/transactions%2F", "/transactions%5C", "/public%2F..%2Ftransactions",
                "/transactions;x=1", "/public/..;/transactions", "/transactions/."]


@pytest.mark.parametrize("target", LEFT_AS_SENT)
def test_a_path_envoy_leaves_as_sent_is_refused_by_the_service(stack: SecurityStack, target: str) -> None:
    """Refused with the service's own 400 (its JSON body), never forwarded, even with the scope."""
    writer = stack.dev.token("payments-writer")
    answer = stack.send("POST", "/", writer, target=target)
    assert (answer.status, answer.error, answer.reached_upstream) == (400, "invalid_request", []), answer.body


def test_no_path_trick_reaches_a_protected_resource(stack: SecurityStack) -> None:
    """The path-confusion suite's tricks and oracle: what reached the app is what the policy allows
    for the path the app received."""
    reader = stack.dev.token("payments-reader")
    for target in TRICKS:
        for method in ("GET", "POST"):
            assert assert_justified(stack, method, target, None, set()) != 500, target
        assert_justified(stack, "POST", target, reader, {"transactions/get"})


@pytest.mark.parametrize("target", ["/public/../admin/users", "/public/%2e%2e/admin/users", "//admin/users",
                                    "/./admin/users", "/public%2F..%2Fadmin", "/admin;x=1",
                                    "/public/%c0%ae%c0%ae/admin", "/public/..%5Cadmin"])
def test_http2_path_tricks_are_refused_by_the_service(stack: SecurityStack, target: str) -> None:
    refused = deny_count(stack, "bad_request")
    assert stack.send_h2("GET", target) == (400, [])
    assert deny_count(stack, "bad_request") == refused + 1  # the service's 400, not Envoy's


# What HTTP/2's :path carries and no HTTP/1.1 request line can, and Envoy's codec passes on: raw
# non-ASCII and line separators, quotes, braces, a backslash, a bare '%'. (A '#' Envoy refuses itself.)
RAW_HTTP2_PATHS = ["/public/\u00e9/../admin", "/public/\u2028", '/public/"', "/public/{x}", "/public/\\../admin",
                   "/public/%"]


def test_http2_paths_no_request_line_carries_are_refused_by_the_service(stack: SecurityStack) -> None:
    with Http2Connection(stack.envoy.listener_port) as connection:
        for target in RAW_HTTP2_PATHS:
            mark, refused = stack.upstream.mark(), deny_count(stack, "bad_request")
            assert (connection.request("GET", target), stack.upstream.requests_since(mark)) == (400, []), target
            assert deny_count(stack, "bad_request") == refused + 1, target


def test_a_path_rewrite_in_the_route_comes_after_the_decision(stack: SecurityStack, envoy_factory) -> None:
    """What docs/deploy.md warns of, and the service cannot see: ext_authz decides on the path the
    client sent, then the router's prefix_rewrite hands the app another (public /public/admin/x,
    served as /admin/x)."""
    def rewrite(config: dict) -> None:
        envoyconf.virtual_host(config)["routes"].insert(
            0, {"match": {"prefix": "/public/"}, "route": {"cluster": "app", "prefix_rewrite": "/"}})

    envoy = envoy_factory(stack.service.authz_port(stack.mode), source=USER_ENVOY_CONFIGS[stack.mode], edit=rewrite)
    mark = stack.upstream.mark()
    assert http_request("GET", envoy.url("/public/admin/x"))[0] == 200
    assert [r["path"] for r in stack.upstream.requests_since(mark)] == ["/admin/x"]


# --- methods and overrides ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "Get", "post"])
def test_a_method_that_is_not_an_upper_case_token_is_refused(stack: SecurityStack, method: str) -> None:
    """HTTP/2 carries ``:method: get`` as sent, and frameworks upper-case it."""
    reader = stack.dev.token("payments-reader")
    assert stack.send_h2(method, "/transactions/7", [("authorization", f"Bearer {reader}")]) == (400, [])


@pytest.mark.parametrize(("name", "value"), [("X-HTTP-Method-Override", "DELETE"), ("x_http_method", "DELETE"),
                                             ("X.Original.URL", "/admin/users"), *ANY_SEPARATOR_OVERRIDES])
def test_a_method_or_url_override_header_is_refused(stack: SecurityStack, name: str, value: str) -> None:
    reader = stack.dev.token("payments-reader")
    answer = stack.send("GET", "/transactions/7", reader, [(name, value)])
    assert (answer.status, answer.error, answer.reached_upstream) == (400, "invalid_request", []), name


def test_a_method_override_in_the_query_is_refused(stack: SecurityStack) -> None:
    reader = stack.dev.token("payments-reader")
    answer = stack.send("GET", "/transactions/7?_method=DELETE", reader)
    assert (answer.status, answer.error, answer.reached_upstream) == (400, "invalid_request", [])


# --- identity and credentials -------------------------------------------------------------------------

# The first is the real name, which an allow sets to the verified identity (or removes).
IDENTITY = [("X-Auth-Client-Id", "admin"), ("x_auth_scopes", "admin/all"), ("x.auth.sub", "root"),
            *ANY_SEPARATOR_IDENTITY]


@pytest.mark.parametrize("token_scope", [None, "transactions/get"], ids=["public-route", "protected-route"])
def test_no_spelling_of_an_identity_header_reaches_the_app(stack: SecurityStack, token_scope: str | None) -> None:
    token = stack.fake.token("payments-reader", token_scope) if token_scope else None
    answer = stack.send("GET", "/transactions/7" if token else "/public/x", token, IDENTITY + [("x~other", "kept")])
    assert answer.status == 200 and len(answer.reached_upstream) == 1, answer.body
    seen = answer.reached_upstream[0]["headers"]
    assert not [name for name, _ in IDENTITY[1:] if name.lower() in seen], seen
    assert seen.get("x~other") == ["kept"]  # other names pass
    assert seen.get("x-auth-client-id") == (["payments-reader"] if token else None)  # the verified one


def test_two_authorization_fields_are_refused(stack: SecurityStack) -> None:
    writer, reader = stack.dev.token("payments-writer"), stack.dev.token("payments-reader")
    both = [("authorization", f"Bearer {reader}"), ("authorization", f"Bearer {writer}")]
    answer = stack.send("POST", "/transactions", headers=both)
    assert (answer.status, answer.error, answer.reached_upstream) == (400, "invalid_request", [])
    assert stack.send_h2("POST", "/transactions", both) == (400, [])


def test_a_clients_original_path_header_decides_nothing(stack: SecurityStack) -> None:
    """HTTP mode decides on x-authz-original-path, which Envoy's headers_to_add overwrites."""
    answer = stack.send("GET", "/admin/users", None, [("x-authz-original-path", "/public/x")])
    assert (answer.status, answer.reached_upstream) == (401, [])


def test_a_clients_request_id_reaches_the_decision_log_bounded(stack: SecurityStack) -> None:
    """Envoy's defaults keep a client's x-request-id (the shipped configs remove it early): the
    decision log carries it cut to 128 characters, JSON-escaped (docs/security.md)."""
    forged = f"forged-{stack.mode}-\"}}\\" + "x" * 300
    answer = stack.send("GET", "/admin/users", None, [("X-Request-Id", forged)])
    assert (answer.status, answer.reached_upstream) == (401, [])
    stack.service.process.wait_until(lambda: logged(stack, request_id=forged[:128]), 10, "the decision log line")


# --- request smuggling --------------------------------------------------------------------------------

HIDDEN = b"GET /admin/users HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = {
    "cl-te": b"GET /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
             % (5 + len(HIDDEN)) + HIDDEN,
    "te-cl": b"GET /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n"
             % len(HIDDEN) + HIDDEN + b"\r\n0\r\n\r\n",
    "te-obfuscated": b"GET /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n"
                     b"0\r\n\r\n" + HIDDEN,
    "te-space-before-colon": b"GET /public/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
                             + HIDDEN,
    "two-content-lengths": b"GET /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n"
                           % len(HIDDEN) + HIDDEN,
    "obs-fold": b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
    "bare-lf": b"GET /public/x HTTP/1.1\nHost: x\n\n" + HIDDEN.replace(b"\r\n", b"\n"),
}
CLOSE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("shape", SMUGGLING)
def test_request_smuggling_shapes_carry_no_protected_request(stack: SecurityStack, shape: str) -> None:
    """Sent on one connection with a last request that closes it: whatever Envoy makes of the bytes,
    each request that reached the app is one the policy allows without a token."""
    mark = stack.upstream.mark()
    with socket.create_connection(("127.0.0.1", stack.envoy.listener_port), timeout=10) as sock:
        sock.sendall(SMUGGLING[shape] + CLOSE)
        answered = b""
        while chunk := sock.recv(65536):  # until Envoy closes: after the last answer it will give
            answered += chunk
    assert answered.startswith(b"HTTP/1.1 "), answered[:200]
    for seen in stack.upstream.requests_since(mark):
        assert oracle_allows(seen["method"], seen["path"], set()), (shape, seen["method"], seen["path"])
