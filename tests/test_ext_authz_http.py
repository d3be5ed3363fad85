"""The HTTP front door (Envoy's ext_authz HTTP mode), in-process over a real socket: it parses what
Envoy sends, decides through the shared Checker, and answers as Envoy's http_service expects."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from authz_service.check import Checker
from authz_service.config import Settings
from authz_service.decision import REASONS, Reason
from authz_service.doors.base import Wiring
from authz_service.doors.grpc import GRPC
from authz_service.doors.http import EXT_AUTHZ_HTTP, MISMATCH, ORIGINAL_PATH, REMOVE_HEADER, HttpFrontDoor, Mismatch
from authz_service.metrics import Metrics
from authz_service.policy import parse_policy
from authz_service.request import SPECIAL_NAMES
from authz_service.response import Answers
from authz_service.tokens import TokenVerifier

from .conftest import ISSUER, MemoryKeys, SigningKey, check_request

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
  - name: signed-in
    path: /signed-in
    public: true
    forward_token: true
""", "http-door-test.yaml")


class Fixed:
    policy = POLICY


@pytest.fixture
async def door(key_a: SigningKey, request) -> AsyncIterator[tuple[str, Metrics]]:
    prefix = getattr(request, "param", "")
    metrics = Metrics(CollectorRegistry())
    checker = Checker(Fixed(), TokenVerifier(MemoryKeys(key_a)), Answers("r"), metrics.per_check)
    metrics.http_door_enabled(m.value for m in Mismatch)
    front = HttpFrontDoor(checker, prefix,
                          on_mismatch=lambda problem: metrics.http_config_mismatches.labels(problem.value).inc())
    port = await front.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}{prefix}", metrics
    finally:
        await front.stop()


AS_ENVOY = object()  # send(): the original path header as Envoy's shipped config sends it


async def send(base: str, method: str, path: str, headers: list[tuple[str, str]] = (),
               original: object = AS_ENVOY) -> tuple[int, dict, bytes]:
    """One request written byte for byte, as Envoy sends them: the method and ``<prefix><path>``
    exactly as given, and ``path`` in x-authz-original-path (``original``: that header's value
    instead, None: no such header)."""
    host, _, rest = base.removeprefix("http://").partition(":")
    port, _, prefix = rest.partition("/")
    original = path if original is AS_ENVOY else original
    head = f"{method} {('/' + prefix if prefix else '') + path} HTTP/1.1\r\nHost: authz\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "Content-Length: 0\r\n"
    head += "" if original is None else f"{ORIGINAL_PATH}: {original}\r\n"
    head += "\r\n"
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
    assert removed == SPECIAL_NAMES - {"x-auth-client-id", "x-auth-scopes", "x-auth-sub"} | {"authorization"}
    assert "x_auth_client_id" in removed and "x-http-method-override" in removed


async def test_public_allow_removes_every_spelling(door):
    base, _ = door
    status, headers, _ = await send(base, "GET", "/healthz", [("x_auth_sub", "spoofed")])
    assert status == 200 and "x-auth-sub" not in headers
    assert set(headers[REMOVE_HEADER].split(",")) == SPECIAL_NAMES | {"authorization"}


async def test_allow_names_the_spellings_with_other_separators_it_was_sent(door):
    """Too many to list in every answer (x~auth~sub, x!auth|client|id): Envoy forwards them when its
    allowed_headers take their shape, and the answer then has Envoy strip those it saw."""
    base, _ = door
    sent = [("X~Auth~Sub", "spoofed"), ("x!auth|client|id", "spoofed"), ("x~other", "kept")]
    status, headers, _ = await send(base, "GET", "/healthz", sent)
    assert status == 200
    assert set(headers[REMOVE_HEADER].split(",")) == SPECIAL_NAMES | {"authorization", "x~auth~sub", "x!auth|client|id"}


async def test_a_route_that_forwards_the_token_does_not_name_authorization(door):
    base, _ = door
    status, headers, _ = await send(base, "GET", "/signed-in", [("Authorization", "Basic eDp5")])
    assert status == 200 and set(headers[REMOVE_HEADER].split(",")) == SPECIAL_NAMES


@pytest.fixture
async def both_doors(key_a: SigningKey) -> AsyncIterator[tuple[str, Any, Metrics]]:
    """The gRPC and the HTTP door, built and started as the service builds them, on one Checker:
    (the HTTP door's base URL, a gRPC Authorization stub, the metrics)."""
    metrics = Metrics(CollectorRegistry())
    checker = Checker(Fixed(), TokenVerifier(MemoryKeys(key_a)), Answers("r"), metrics.per_check)
    wiring = Wiring(checker, Settings(policy=Path("unused.yaml")), metrics)
    grpc_door, http_door = GRPC.build(wiring), EXT_AUTHZ_HTTP.build(wiring)
    try:
        grpc_port = await grpc_door.start("127.0.0.1", 0, reuse_port=False)
        http_port = await http_door.start("127.0.0.1", 0, reuse_port=False)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield f"http://127.0.0.1:{http_port}", external_auth_pb2_grpc.AuthorizationStub(channel), metrics
    finally:
        await asyncio.gather(grpc_door.stop(), http_door.stop())


_TRANSPORT = {"content-length", "date", "server", REMOVE_HEADER}  # the HTTP response's own, not the answer's


@pytest.mark.parametrize(("method", "path", "headers", "status", "reason", "route"), [
    ("POST", "/transactions", [("Authorization", "Bearer {token}")], 200, "allowed", "post"),
    ("GET", "/healthz", [("x_auth_sub", "spoofed")], 200, "public", "health"),
    ("POST", "/transactions", [], 401, "missing_token", "post"),
    ("POST", "/transactions", [("Authorization", "Bearer {expired}")], 401, "expired", "post"),
    ("GET", "/nothing", [], 403, "no_route", "no_route"),
    ("post", "/transactions", [], 400, "bad_request", "no_route"),
    ("GET", "/healthz?_method=DELETE", [], 400, "bad_request", "no_route"),
    ("GET", "/a/../healthz", [], 400, "bad_request", "no_route"),
    ("GET", "/healthz", [("X-HTTP-Method-Override", "DELETE")], 400, "bad_request", "no_route"),
    ("POST", "/transactions", [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")], 400,
     "bad_request", "post"),
])
async def test_both_doors_answer_every_request_alike(both_doors, key_a, method, path, headers, status, reason,
                                                     route):
    """The same request through the HTTP door and through the gRPC door (as Envoy sends each: the
    gRPC headers map lower-cased, repeated headers comma-joined): the same status, headers, body and
    counted decision."""
    base, stub, metrics = both_doors
    tokens = {"token": key_a.token(), "expired": key_a.token(exp=1)}
    headers = [(name, value.format(**tokens)) for name, value in headers]
    joined: dict[str, str] = {}
    for name, value in headers:
        joined[name.lower()] = f"{joined[name.lower()]},{value}" if name.lower() in joined else value

    got, response_headers, body = await send(base, method, path, headers)
    answer = await stub.Check(check_request(method, path, joined), timeout=30)

    assert got == status
    http_answer = {name: value for name, value in response_headers.items() if name not in _TRANSPORT}
    if status == 200:
        assert answer.status.code == 0 and answer.HasField("ok_response")
        assert {h.header.key: h.header.value for h in answer.ok_response.headers} == http_answer
        assert body == b""
    else:
        denied = answer.denied_response
        assert answer.status.message == reason and denied.status.code == status
        assert {h.header.key: h.header.value for h in denied.headers} == http_answer
        assert denied.body.encode() == body
        assert json.loads(body)["error"] == (REASONS[Reason(reason)].oauth_error or "unauthorized")
        assert http_answer["content-type"] == "application/json" and http_answer["cache-control"] == "no-store"
        assert "www-authenticate" in http_answer or status == 403
    assert REMOVE_HEADER in response_headers
    metrics.per_check.flush()
    decision = "allow" if status == 200 else "deny"
    assert metrics.registry.get_sample_value("authz_check_decisions_total", {
        "decision": decision, "reason": reason, "route": route, "status": str(status)}) == 2  # one per door


def mismatches(metrics: Metrics, problem: str) -> float:
    return metrics.registry.get_sample_value("authz_ext_authz_http_config_mismatches_total", {"problem": problem})


@pytest.mark.parametrize("door", ["/authz"], indirect=True)
async def test_the_prefix_and_the_original_path_header_must_make_the_request_path(door, caplog):
    """Decided on x-authz-original-path only when the path is exactly the prefix and that header;
    anything else (Envoy's path_prefix is not ours, the header is missing or not the path's end)
    is refused, counted by problem and logged once per minute per problem."""
    base, metrics = door
    assert (await send(base, "GET", "/healthz"))[0] == 200
    root = base[: -len("/authz")]
    refused = [  # (request target after the host, the header's value, problem)
        ("/healthz", "/healthz", "path_prefix_mismatch"),  # Envoy sends no prefix
        ("/authz/v2/healthz", "/healthz", "path_prefix_mismatch"),  # a longer prefix: /v2 is not part of the path
        ("/other/healthz", "/healthz", "path_prefix_mismatch"),
        ("/authz/healthz", None, "original_path_missing"),
        ("/authz/healthz", "/healthz/", "original_path_mismatch"),
        ("/authz/transactions", "/healthz", "original_path_mismatch"),  # a forged header
        ("/authz/healthz", "", "original_path_mismatch"),
        ("/authz/authz/healthz", "/healthz", "path_prefix_mismatch"),  # the prefix sent twice
    ]
    with caplog.at_level(logging.ERROR, logger="authz_service.ext_authz_http"):
        for target, original, problem in refused:
            status, _, body = await send(root, "GET", target, original=original)
            assert status == 400 and json.loads(body)["error_description"] == MISMATCH, (target, original)
    assert {p: mismatches(metrics, p) for p in ("path_prefix_mismatch", "original_path_missing",
                                                 "original_path_mismatch")} == {
        "path_prefix_mismatch": 4, "original_path_missing": 1, "original_path_mismatch": 3}
    assert metrics.registry.get_sample_value("authz_check_decisions_total", {
        "decision": "deny", "reason": "bad_request", "route": "no_route", "status": "400"}) == 8
    lines = [r for r in caplog.records if r.name == "authz_service.ext_authz_http"]
    assert [r.problem for r in lines] == ["path_prefix_mismatch", "original_path_missing", "original_path_mismatch"]
    assert (lines[0].envoy_path_prefix, lines[0].expected_path_prefix) == ("", "/authz")
    assert not hasattr(lines[1], "envoy_path_prefix") and not hasattr(lines[2], "envoy_path_prefix")
    assert all("/healthz" not in r.getMessage() for r in lines), "no client path in the log line"


@pytest.mark.parametrize("door", ["/authz"], indirect=True)
async def test_a_client_path_that_starts_like_the_prefix_is_just_a_path(door):
    """Envoy prefixes every path, so the client's own /authz/healthz arrives as /authz/authz/healthz:
    decided as /authz/healthz (no route here), never as /healthz."""
    base, _ = door
    status, _, body = await send(base, "GET", "/authz/healthz")
    assert status == 403 and json.loads(body)["error"] == "access_denied"


async def test_the_original_path_is_what_is_decided_with_its_query(door):
    base, _ = door
    assert (await send(base, "GET", "/healthz?x=1"))[0] == 200
    status, _, body = await send(base, "GET", "/healthz?_method=DELETE")
    assert status == 400 and b"_method" in body, "the header's query is checked as the path's was"


async def test_the_prefix_envoy_sends_is_logged_bounded(door, caplog):
    base, _ = door
    long_prefix = "/x" * 100
    with caplog.at_level(logging.ERROR, logger="authz_service.ext_authz_http"):
        assert (await send(base, "GET", long_prefix + "/healthz", original="/healthz"))[0] == 400
    [line] = [r for r in caplog.records if r.name == "authz_service.ext_authz_http"]
    assert line.envoy_path_prefix == long_prefix[:64]


def test_the_log_throttle_admits_one_line_per_key_per_interval(monkeypatch):
    from authz_service import logs

    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    throttle = logs.Throttle(60.0)
    assert throttle.admit("a") == 0
    assert [throttle.admit("a") for _ in range(3)] == [None, None, None]
    assert throttle.admit("b") == 0, "keys are independent"
    now[0] += 60.0
    assert throttle.admit("a") == 3, "the next line says how many were left out"
    assert throttle.admit("a") is None



def test_the_shipped_http_mode_config_sends_what_the_door_expects_by_default():
    """envoy/envoy-http.yaml (the demo, the bench and the e2e harness run it against a service
    started without --ext-authz-http-path-prefix) agrees with the door's default; the comparison
    itself notices a disagreement."""
    from authz_service.config import option

    from . import envoyconf
    from .e2e.harness import HTTP_ENVOY_CONFIG, load_shipped_config

    config = load_shipped_config(HTTP_ENVOY_CONFIG)
    default = option("ext_authz_http_path_prefix").default
    assert envoyconf.http_door_mismatches(config, default) == []
    assert len(envoyconf.http_door_mismatches(config, "/ext-authz")) == 1
    service = envoyconf.http_filter(config, envoyconf.EXT_AUTHZ)["http_service"]
    del service["authorization_request"]
    assert len(envoyconf.http_door_mismatches(config, default)) == 1
