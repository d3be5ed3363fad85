"""The HTTP front door (Envoy's ext_authz HTTP mode), in-process over a real socket: it parses what
Envoy sends, decides through the shared Checker, and answers as Envoy's http_service expects."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncio
import pytest
from prometheus_client import CollectorRegistry

from authz_service.check import Checker
from authz_service.ext_authz_http import REMOVE_HEADER, HttpFrontDoor
from authz_service.metrics import Metrics
from authz_service.policy import parse_policy
from authz_service.request import SPECIAL_NAMES
from authz_service.response import Answers
from authz_service.tokens import TokenVerifier

from .conftest import ISSUER, MemoryKeys, SigningKey

POLICY = parse_policy(f"""
issuers:
  - user_pool_id: us-east-1_Test00001
    issuer: {ISSUER}
routes:
  - name: post
    methods: [POST]
    path: /transactions
    scopes: [transactions/post]
  - name: health
    path: /healthz
    public: true
""", "http-door-test.yaml")


class Fixed:
    policy = POLICY


@pytest.fixture
async def door(key_a: SigningKey, request) -> AsyncIterator[tuple[str, Metrics]]:
    prefix = getattr(request, "param", "")
    metrics = Metrics(CollectorRegistry())
    checker = Checker(Fixed(), TokenVerifier(MemoryKeys(key_a)), Answers("r"), metrics.per_check)
    front = HttpFrontDoor(checker, prefix)
    port = await front.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}{prefix}", metrics
    finally:
        await front.stop()


async def send(base: str, method: str, path: str, headers: list[tuple[str, str]] = ()) -> tuple[int, dict, bytes]:
    """One request written byte for byte (method and target exactly as given, as Envoy sends them)."""
    host, _, rest = base.removeprefix("http://").partition(":")
    port, _, prefix = rest.partition("/")
    head = f"{method} {('/' + prefix if prefix else '') + path} HTTP/1.1\r\nHost: authz\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "Content-Length: 0\r\n\r\n"
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        await writer.drain()
        status_line = await reader.readline()
        response_headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            response_headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(response_headers.get("content-length", "0")))
        return int(status_line.split()[1]), response_headers, body
    finally:
        writer.close()


async def test_allow_sets_identity_and_names_every_other_spelling_to_remove(door, key_a):
    base, _ = door
    status, headers, body = await send(base, "POST", "/transactions",
                                       [("Authorization", f"Bearer {key_a.token()}")])
    assert status == 200 and body == b""
    assert (headers["x-auth-client-id"], headers["x-auth-scopes"], headers["x-auth-sub"]) == (
        "client-a", "transactions/post", "client-a")
    removed = set(headers[REMOVE_HEADER].split(","))
    assert removed == SPECIAL_NAMES - {"x-auth-client-id", "x-auth-scopes", "x-auth-sub"}
    assert "x_auth_client_id" in removed and "x-http-method-override" in removed


async def test_public_allow_removes_every_spelling(door):
    base, _ = door
    status, headers, _ = await send(base, "GET", "/healthz", [("x_auth_sub", "spoofed")])
    assert status == 200 and "x-auth-sub" not in headers
    assert set(headers[REMOVE_HEADER].split(",")) == SPECIAL_NAMES


@pytest.mark.parametrize(("method", "path", "headers", "status", "reason", "route"), [
    ("POST", "/transactions", [], 401, "missing_token", "post"),
    ("GET", "/nothing", [], 403, "no_route", "no_route"),
    ("post", "/transactions", [], 400, "bad_request", "no_route"),
    ("GET", "/healthz?_method=DELETE", [], 400, "bad_request", "no_route"),
    ("GET", "/a/../healthz", [], 400, "bad_request", "no_route"),
    ("GET", "/healthz", [("X-HTTP-Method-Override", "DELETE")], 400, "bad_request", "no_route"),
    ("POST", "/transactions", [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")], 400,
     "bad_request", "post"),
])
async def test_denials_are_the_json_and_challenge_grpc_mode_sends(door, method, path, headers, status, reason, route):
    import json

    from authz_service.decision import REASONS, Reason

    base, metrics = door
    got, response_headers, body = await send(base, method, path, headers)
    assert got == status
    assert json.loads(body)["error"] == (REASONS[Reason(reason)].oauth_error or "unauthorized")
    assert response_headers["content-type"] == "application/json"
    assert response_headers["cache-control"] == "no-store"
    assert "www-authenticate" in response_headers or status == 403
    assert REMOVE_HEADER in response_headers
    assert metrics.registry.get_sample_value("authz_check_decisions_total", {
        "decision": "deny", "reason": reason, "route": route, "status": str(status)}) == 1


@pytest.mark.parametrize("door", ["/authz"], indirect=True)
async def test_path_prefix_is_stripped_and_required(door):
    base, _ = door
    assert (await send(base, "GET", "/healthz"))[0] == 200
    root = base[: -len("/authz")]
    for path in ("/healthz", "/authzhealthz", "/auth/healthz"):
        status, _, body = await send(root, "GET", path)
        assert status == 400 and b"path prefix" in body, path

