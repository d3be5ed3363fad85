"""Path confusion (CVE-2019-9901, CVE-2021-31920, CVE-2021-39156, CVE-2026-26205 and friends).

The rule (README "Security model"): Envoy normalizes the path with the hardened settings in
envoy/envoy.yaml, and the service refuses (400) any path not already in normal form. What we prove:

* through Envoy, every request that reaches the app is justified by the policy *for the path the
  app received* (an independent oracle decides; query and fragment are not part of the path);
* directly on the gRPC port, every path not in normal form is a 400 before any route is matched,
  so a misconfigured Envoy cannot smuggle ``/public/../admin`` past a public route.
"""

from __future__ import annotations

import random
import socket
import urllib.parse
from collections.abc import Iterator

import pytest

from .harness import UpstreamProcess
from .security_stack import SecurityStack, bearer, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, enforcing_mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("paths"), upstream, module_envoy_factory, mode=enforcing_mode)
    yield s
    stop_security_stack(s)


def oracle_allows(method: str, target: str, scopes: set[str]) -> bool:
    """Written independently of policy.py and request.py: may the app serve this *received* target?

    It judges the path as a lenient app would see it: segments percent-decoded (strict UTF-8), so
    an encoded dot segment, slash or backslash that survived to the app counts as confusion."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return False
    try:
        segs = [urllib.parse.unquote(s, errors="strict") for s in path[1:].split("/")]
    except UnicodeDecodeError:
        return False
    if any(s in (".", "..") or any(c in s for c in "/\\;") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in s.strip())
           for s in segs):
        return False
    if "" in segs[:-1]:
        return False  # '//' inside the path
    if method == "GET" and segs == ["healthz"]:
        return True
    if method == "GET" and segs[0] == "public":
        return True
    if method == "POST" and segs == ["transactions"]:
        return "transactions/post" in scopes
    if method == "GET" and len(segs) == 2 and segs[0] == "transactions" and segs[1]:
        return "transactions/get" in scopes
    if segs[0] == "admin":
        return "admin/all" in scopes
    return False


def assert_justified(stack: SecurityStack, method: str, target: str, token: str | None, scopes: set[str]) -> int:
    answer = stack.send(method, "/", token, target=target)
    for seen in answer.reached_upstream:
        assert oracle_allows(seen["method"], seen["path"], scopes), (target, "->", seen["path"], answer.status)
    if answer.status == 200:
        assert len(answer.reached_upstream) == 1, (target, answer.reached_upstream)
    else:
        assert answer.reached_upstream == [], (target, answer.status)
    return answer.status


TRICKS = [
    "//admin", "///admin", "/admin", "/public/../admin", "/public/./../admin", "/./admin", "/public/%2e%2e/admin",
    "/public/%2E%2E/admin", "/public/.%2e/admin", "/public/%2e./admin", "/public/..%2fadmin", "/public/..%2Fadmin",
    "/public%2F..%2Fadmin", "/public/..%5Cadmin", "/public/..%5cadmin", "/public/..\\admin", "/public\\..\\admin",
    "/public;/../admin", "/public/..;/admin", "/public/..;x=1/admin", "/admin;x=1", "/public;x=1",
    "/public/x#/../../admin", "/public/x?/../../admin", "/healthz?x=/../admin", "/healthz#/../admin",
    "/ADMIN", "/Admin/x", "/Public/x", "/HEALTHZ", "/healthz/", "/public/", "/admin/", "/public/%61dmin",
    "/%61dmin", "/public/%252e%252e/admin", "/public/%25%32%65%25%32%65/admin", "/public/%00/../../admin",
    "/public/%0a", "/public/%09/../admin", "/public/%20", "/public/%ZZ", "/public/%2", "/public/%c0%ae%c0%ae/admin",
    "/public/%C3%A9", "/public/..%3B/admin", "/public/..%3bx/admin", "/public%3B/../admin", "/admin%3B",
    "/public/" + "a" * 8000, "/public/" + "a/" * 4000 + "../admin",
    "/public/../" * 50 + "admin", "/transactions/../admin", "/healthz/..", "/healthz/../", "/public/..",
    "http://127.0.0.1/public/../admin", "http://evil.example/admin", "http://evil.example//admin",
    "http://127.0.0.1/admin", "*",
]


@pytest.mark.parametrize("target", TRICKS)
def test_no_token_path_tricks_never_reach_a_protected_resource(stack: SecurityStack, target: str) -> None:
    for method in ("GET", "POST"):
        status = assert_justified(stack, method, target, None, set())
        assert status != 500, target


def test_reader_token_cannot_reach_create_or_admin_by_path_tricks(stack: SecurityStack) -> None:
    reader = stack.dev.token("payments-reader")
    for target in TRICKS + ["/transactions", "//transactions", "/public/../transactions", "/transactions/",
                            "/transactions;x", "/transactions/.", "/%74ransactions", "/transactions%2F"]:
        assert_justified(stack, "POST", target, reader, {"transactions/get"})


def test_documented_normalizations(stack: SecurityStack) -> None:
    """What the README says Envoy does with the shipped config, observed at the app."""
    writer = stack.dev.token("payments-writer")
    for target, forwarded in [("//transactions", "/transactions"), ("/public/../transactions", "/transactions"),
                              ("/public/%2e%2e/transactions", "/transactions"), ("/%74ransactions", "/transactions"),
                              ("/./transactions", "/transactions")]:
        answer = stack.send("POST", "/", writer, target=target)
        assert answer.status == 200, (target, answer.status, answer.body)
        assert [r["path"] for r in answer.reached_upstream] == [forwarded]
    for target in ["/transactions%2F", "/transactions%5C", "/public%2F..%2Ftransactions"]:
        answer = stack.send("POST", "/", writer, target=target)
        assert answer.status == 400 and answer.reached_upstream == [], target  # Envoy rejects encoded slashes
    answer = stack.send("POST", "/", writer, target="/transactions;x=1")
    assert (answer.status, answer.error) == (400, "invalid_request")  # the service refuses path parameters
    answer = stack.send("GET", "/", None, target="/healthz?probe=1")
    assert answer.status == 200 and answer.reached_upstream[0]["path"] == "/healthz?probe=1"


def test_absolute_form_target_is_checked_on_its_path(stack: SecurityStack) -> None:
    answer = stack.send("GET", "/", None, target="http://evil.example/admin/x")
    assert answer.status in (401, 403) and answer.reached_upstream == []
    answer = stack.send("GET", "/", None, target="http://evil.example/public/x")
    if answer.status == 200:
        assert answer.reached_upstream[0]["path"] == "/public/x"


def raw_request(port: int, request: bytes) -> int:
    """Send raw bytes (NUL, CR, controls the stdlib client refuses) and return the status (0: closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("path", [b"/public/\x00/../../admin", b"/admin\x00", b"/public/\x01", b"/public/\x7f/../admin",
                                  b"/public/\xff/../admin", b"/public/ /../admin", b"/public/\t/../admin"])
def test_raw_control_bytes_in_the_request_line(stack: SecurityStack, path: bytes) -> None:
    mark = stack.upstream.mark()
    status = raw_request(stack.envoy.listener_port,
                         b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for seen in stack.upstream.requests_since(mark):
        assert oracle_allows(seen["method"], seen["path"], set()), (path, seen["path"])
    assert status != 200 or stack.upstream.requests_since(mark), path


def test_very_long_path_is_refused_by_envoy(stack: SecurityStack) -> None:
    answer = stack.send("GET", "/", None, target="/public/" + "a" * 70_000)
    assert answer.status in (400, 414, 431) and answer.reached_upstream == []


def test_random_confusion_paths_agree_with_what_the_app_serves(stack: SecurityStack) -> None:
    """Differential check over many generated targets, with and without a token."""
    rng = random.Random(20260226)
    parts = ["public", "admin", "transactions", "healthz", "..", ".", "%2e%2e", "%2E", "%2f", "%5c", ";x", "..;",
             "", "x", "7", "%61", "%00", "%25", "ADMIN", "?", "#", "a?b=/../admin"]
    writer = stack.dev.token("payments-writer")
    reader = stack.dev.token("payments-reader")
    seen_statuses: set[int] = set()
    for _ in range(150):
        target = "/" + "/".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))
        method = rng.choice(["GET", "POST"])
        token, scopes = rng.choice([(None, set()), (writer, {"transactions/post"}), (reader, {"transactions/get"})])
        seen_statuses.add(assert_justified(stack, method, target, token, scopes))
    assert 200 in seen_statuses and seen_statuses - {200}  # the sample exercised both outcomes


NOT_NORMAL = [
    "/public/../admin", "/public/./x", "/./admin", "//admin", "/public//x", "/public/..", "/public/.",
    "/public/%2e%2e/admin", "/public/%2E%2E/admin", "/public/.%2e/admin", "/public%2Fadmin", "/public%2fadmin",
    "/public%5Cadmin", "/public\\admin", "/public\\..\\admin", "/public;x=1", "/public/..;/admin", "/admin;",
    "/public/\x00", "/public/\x00/../admin", "/public/\x01", "/public/\x1f", "/public/\x7f", "/public/\t",
    "/public/ x", "/public/\r\n", "/public/\u00e9", "/public/\ufeff", "/public/%00", "/public/%0a", "/public/%7f",
    "/public/%zz", "/public/%2", "/public/%", "/public/%252e%252e/admin", "/public/..%3B/admin", "/public/%3b", "/public/%61", "/public/%7E", "/%74ransactions",
    "http://evil.example/public/x", "public/x", "*", "", "/public/" + "a" * 9000, "/healthz\n", "/healthz/..",
]


@pytest.mark.parametrize("path", NOT_NORMAL, ids=[repr(p)[:40] for p in NOT_NORMAL])
def test_service_refuses_paths_not_in_normal_form(stack: SecurityStack, path: str) -> None:
    """Straight to the gRPC port, as a misconfigured or bypassed Envoy would send it: 400 before any
    route is matched, even on a public prefix and even with a token that holds every scope we have."""
    writer = stack.dev.token("payments-writer")
    for method in ("GET", "POST"):
        for headers in ({}, bearer(writer)):
            answer = stack.check(method, path, headers)
            assert answer.status == 400, (path, answer.status, answer.body)
            assert answer.body and '"invalid_request"' in answer.body


@pytest.mark.parametrize("path", ["/healthz", "/healthz?x=/../admin", "/healthz#/../admin", "/public/x", "/public/a-b_c~d",
                                  "/public/%20x", "/public/%C3%A9", "/public/a:b@c", "/public/%3A"])
def test_service_accepts_normal_paths_on_public_routes(stack: SecurityStack, path: str) -> None:
    assert stack.check("GET", path).status == 200


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/Healthz", 403), ("GET", "/healthz/", 403), ("POST", "/transactions/", 403),
    ("GET", "/transactions/", 403), ("GET", "/ADMIN/x", 403), ("GET", "/admin", 401), ("POST", "/Transactions", 403),
])
def test_case_and_trailing_slash_are_distinct_paths(stack: SecurityStack, method: str, path: str, status: int) -> None:
    assert stack.check(method, path).status == status
    answer = stack.send(method, path)
    assert answer.status == status and answer.reached_upstream == []


@pytest.mark.parametrize("name", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
                                  "x_http_method_override"])
def test_method_override_headers_are_refused(stack: SecurityStack, name: str) -> None:
    """Frameworks that honour these would run a different method than the one authorized (a reader
    allowed to GET /transactions/7 could DELETE it): the decision must be about what the app runs."""
    reader = stack.dev.token("payments-reader")
    assert stack.send("GET", "/transactions/7", reader).status == 200
    answer = stack.send("GET", "/transactions/7", reader, [(name, "DELETE")])
    assert (answer.status, answer.error) == (400, "invalid_request") and answer.reached_upstream == []
    direct = stack.check("GET", "/public/x", {name.lower(): "POST"})
    assert direct.status == 400


@pytest.mark.parametrize("name", ["X-Original-URL", "X-Rewrite-URL", "x_original_url"])
def test_url_override_headers_are_refused(stack: SecurityStack, name: str) -> None:
    """IIS/Symfony-style apps serve X-Original-URL instead of the request line: /public/x allowed,
    /admin served."""
    answer = stack.send("GET", "/public/x", None, [(name, "/admin/users")])
    assert (answer.status, answer.error) == (400, "invalid_request") and answer.reached_upstream == []


# --- HTTP/2 (h2c prior knowledge, curl's nghttp2): Envoy's codec AUTO accepts it; same rule ---------


def test_http2_requests_follow_the_same_rule(stack: SecurityStack) -> None:
    writer, reader = stack.dev.token("payments-writer"), stack.dev.token("payments-reader")
    status, reached = stack.send_h2("POST", "/transactions", [("authorization", f"Bearer {writer}")])
    assert status == 200 and reached[0]["headers"]["x-auth-client-id"] == ["payments-writer"]
    status, reached = stack.send_h2("POST", "/transactions", [("authorization", f"Bearer {reader}")])
    assert (status, reached) == (403, [])
    for target in ["/public/../admin/users", "/public/%2e%2e/admin/users", "//admin/users", "/./admin/users"]:
        status, reached = stack.send_h2("GET", target)
        assert status == 401 and reached == [], target  # normalized to /admin/users: needs a token
    for target in ["/public%2F..%2Fadmin", "/admin;x=1", "/public/%c0%ae%c0%ae/admin"]:
        status, reached = stack.send_h2("GET", target)
        assert status == 400 and reached == [], target
    status, reached = stack.send_h2("POST", "/transactions",
                         [("authorization", f"Bearer {reader}"), ("authorization", f"Bearer {writer}")])
    assert (status, reached) == (400, []), "two Authorization fields over HTTP/2"
    status, reached = stack.send_h2("GET", "/public/docs", [("x-auth-client-id", "spoofed"), ("x_auth_scopes", "admin/all"),
                                                        ("x_other", "kept")])
    assert status == 200 and reached[0]["headers"].get("x_other") == ["kept"]  # underscores do pass Envoy
    assert "x-auth-client-id" not in reached[0]["headers"] and "x_auth_scopes" not in reached[0]["headers"]
