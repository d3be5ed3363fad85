"""Envoy's admission control, attacked through the shipped Envoy in front of the real service.

Every test runs the shipped envoy/envoy.yaml (ports rewritten only) in front of our service
(its CLI), a dev issuer over HTTP and the echo upstream:

* an anonymous flood at higher concurrency than the authz cluster's circuit breakers: the
  legitimate client is always served, the flood is answered 429 by Envoy and mostly never
  reaches the service (its decision counters are compared with what was sent);
* never-finished request headers: Envoy closes those connections itself;
* the envoy-health listener: /ready and /stats/prometheus without any Check, 404 otherwise;
* request ids are Envoy's own, never the client's, in the upstream and the access log;
* the access log is strict JSON and ASCII, and has no query string, whatever the client sends.

Nothing here asserts on time: waits are bounded, counts are exact or relative.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import selectors
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from .harness import EnvoyProcess, UpstreamProcess, http_request
from .security_stack import SecurityStack, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e

# More concurrent anonymous requests than the authz cluster's circuit breaker admits
# (max_requests 256) and than Envoy's default (1024) that the shipped config used to rely on.
FLOOD_CONNECTIONS = 1200
LEGITIMATE_REQUESTS = 40
SLOW_HEADER_CONNECTIONS = 200
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("admission"), upstream, module_envoy_factory,
                             anonymous_limit=True)
    yield s
    stop_security_stack(s)


@pytest.fixture
def open_file_limit() -> Iterator[None]:
    """Room for the flood: our sockets and Envoy's (Envoy, started later, inherits the limit)."""
    needed = FLOOD_CONNECTIONS + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, \
            f"the open-file hard limit ({hard}) is below {needed}: raise `ulimit -Hn`"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def reader_token(stack: SecurityStack) -> str:
    return stack.dev.token("payments-reader", "transactions/get")


def decisions(stack: SecurityStack, **labels: str) -> float:
    """The service's authz_check_decisions_total summed over every series matching ``labels``."""
    return stack.service.total("authz_check_decisions_total", **labels)


# --------------------------------------------------------------------------- #
# a minimal keep-alive HTTP/1.1 client on asyncio streams (thousands of connections)
# --------------------------------------------------------------------------- #


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on an open connection and read its answer (Content-Length framed)."""
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers, body


def get(path: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: api.example"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Flood:
    """Anonymous requests on ``connections`` keep-alive connections until ``stop`` is set."""

    port: int
    requests: list[bytes]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: dict[int, bytes] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    answered_connections: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    async def connection(self, index: int) -> None:
        first = True
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.errors[type(exc).__name__] += 1
                return
            try:
                n = index
                while not self.stop.is_set():
                    status, headers, body = await exchange(reader, writer, self.requests[n % len(self.requests)])
                    n += 1
                    self.statuses[status] += 1
                    self.bodies.setdefault(status, body)
                    if first:
                        first = False
                        self.answered_connections += 1
                    if headers.get("connection", "").lower() == "close":
                        break
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.errors[type(exc).__name__] += 1
            finally:
                writer.close()


async def wait_async(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` inside the event loop until true, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.05)


async def flood_while_legitimate(envoy: EnvoyProcess, token: str, flood_requests: list[bytes]
                                 ) -> tuple[Flood, list[int]]:
    """Start the flood, wait until every flood connection has been answered at least once (the
    flood is at full concurrency), send the legitimate client's requests on its own keep-alive
    connection, then stop the flood. Returns the flood's tallies and the legitimate statuses."""
    flood = Flood(envoy.listener_port, flood_requests)
    tasks = [asyncio.create_task(flood.connection(i)) for i in range(FLOOD_CONNECTIONS)]
    legitimate: list[int] = []
    try:
        await wait_async(lambda: flood.answered_connections + sum(flood.errors.values()) >= FLOOD_CONNECTIONS,
                         120, "every flood connection answered once")
        reader, writer = await asyncio.open_connection("127.0.0.1", envoy.listener_port)
        try:
            for i in range(LEGITIMATE_REQUESTS):
                status, _, _ = await exchange(reader, writer, get(f"/transactions/legit-{i}",
                                                                  ("Authorization", f"Bearer {token}")))
                legitimate.append(status)
        finally:
            writer.close()
    finally:
        flood.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    return flood, legitimate


# --------------------------------------------------------------------------- #
# 1. anonymous flood vs a legitimate client
# --------------------------------------------------------------------------- #


def test_anonymous_flood_is_refused_by_envoy_while_legitimate_requests_are_served(
    stack: SecurityStack, open_file_limit: None, envoy_factory, reader_token: str
) -> None:
    # A fresh Envoy: its anonymous token bucket is full, whatever other tests did.
    envoy = envoy_factory(stack.service.grpc_port, name="envoy-flood", anonymous_limit=True)
    flood_requests = [
        get("/transactions/1"),                                   # no credentials at all
        get("/transactions/2", ("Authorization", "Basic Zm9vOmJhcg==")),  # another scheme
        get("/transactions/3", ("Authorization", "Bearer !!not-a-token")),  # garbage
        get("/transactions/4", ("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")),  # two
    ]
    anonymous_before = decisions(stack, reason="missing_token") + decisions(stack, reason="bad_request")
    allowed_before = decisions(stack, reason="allowed")
    total_before = decisions(stack)

    flood, legitimate = asyncio.run(flood_while_legitimate(envoy, reader_token, flood_requests))
    print(f"flood: {flood.sent} answered {dict(flood.statuses)}, errors {dict(flood.errors)}; "
          f"legitimate: {dict(Counter(legitimate))}")

    # The legitimate client: every request served, never a 503.
    assert legitimate == [200] * LEGITIMATE_REQUESTS, Counter(legitimate)
    assert decisions(stack, reason="allowed") - allowed_before == LEGITIMATE_REQUESTS

    # The flood: refused by Envoy with 429 (its JSON body, not the service's), or, within the
    # anonymous budget, answered by the service as usual (400/401). Nothing else, no 503.
    assert not flood.errors, flood.errors
    assert set(flood.statuses) <= {429, 401, 400}, flood.statuses
    assert json.loads(flood.bodies[429])["error"] == "rate_limited"
    # Every flood request the service saw was answered by it; the 429s never reached it.
    reached_service = decisions(stack) - total_before - LEGITIMATE_REQUESTS
    anonymous_seen = decisions(stack, reason="missing_token") + decisions(stack, reason="bad_request") \
        - anonymous_before
    assert reached_service == anonymous_seen == flood.statuses[401] + flood.statuses[400]
    # ... and that is the small part of it.
    assert flood.statuses[429] > flood.sent / 2, flood.statuses
    stats = envoy.stats(r"anonymous\.http_local_rate_limit")
    assert stats["anonymous.http_local_rate_limit.rate_limited"] == flood.statuses[429]


def test_credentials_within_the_anonymous_budget_get_the_services_own_answers(
    stack: SecurityStack, envoy_factory
) -> None:
    """The token bucket only counts; what the service answers to malformed or missing credentials
    (status, JSON body, WWW-Authenticate) is unchanged while the budget lasts."""
    envoy = envoy_factory(stack.service.grpc_port, name="envoy-budget", anonymous_limit=True)
    cases = [
        [],
        [("Authorization", "Basic Zm9vOmJhcg==")],
        [("Authorization", "Bearer !!not-a-token")],
        [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")],
        [("Authorization", "Bearer not.a.jwt")],  # JWT-shaped: not rate limited, still denied
    ]
    for headers in cases:
        direct = stack.check("GET", "/transactions/9", {n.lower(): ",".join(v for k, v in headers if k == n)
                                                        for n, _ in headers})
        status, response_headers, body = http_request("GET", envoy.url("/transactions/9"), headers)
        answer = {k.lower(): v for k, v in response_headers}
        assert (status, json.loads(body)) == (direct.status, json.loads(direct.body)), headers
        assert answer.get("www-authenticate") == direct.headers.get("www-authenticate"), headers
    # A public route is anonymous too, and works within the budget.
    assert http_request("GET", envoy.url("/healthz"))[0] == 200


# --------------------------------------------------------------------------- #
# 2. slow request headers
# --------------------------------------------------------------------------- #


def test_never_finished_request_headers_are_closed_by_envoy(stack: SecurityStack) -> None:
    envoy = stack.envoy
    before = envoy.stats(r"downstream_rq_header_timeout").get("http.ingress_http.downstream_rq_header_timeout", 0)
    selector = selectors.DefaultSelector()
    sockets = []
    try:
        for i in range(SLOW_HEADER_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", envoy.listener_port))
            sock.sendall(b"GET /transactions/1 HTTP/1.1\r\nHost: api.example\r\nX-Slow-" + str(i).encode()
                         + b": never-ends")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, bytearray())
            sockets.append(sock)
        # Wait for Envoy to close every one of them (bounded; the wait ends on the close events).
        open_count = len(sockets)
        answers: list[bytes] = []
        deadline = time.monotonic() + 90
        while open_count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{open_count} of {len(sockets)} slow-header connections still open"
            for key, _ in selector.select(timeout=min(remaining, 1.0)):
                try:
                    chunk = key.fileobj.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    key.data.extend(chunk)
                    continue
                answers.append(bytes(key.data))
                selector.unregister(key.fileobj)
                open_count -= 1
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), Counter(a[:20] for a in answers)
    after = envoy.stats(r"downstream_rq_header_timeout")["http.ingress_http.downstream_rq_header_timeout"]
    assert after - before == SLOW_HEADER_CONNECTIONS
    # Envoy is still fine afterwards.
    assert http_request("GET", envoy.url("/healthz"))[0] == 200


# --------------------------------------------------------------------------- #
# 3. probes and metrics without ext_authz
# --------------------------------------------------------------------------- #


def test_health_listener_serves_ready_and_stats_only_and_never_calls_ext_authz(stack: SecurityStack) -> None:
    envoy = stack.envoy
    checks_before = decisions(stack)
    authz_before = envoy.stats(r"cluster\.authz_service\.upstream_rq_total").get(
        "cluster.authz_service.upstream_rq_total", 0)

    status, _, body = http_request("GET", envoy.health_url("/ready"))
    assert (status, body.strip()) == (200, b"LIVE")
    status, headers, body = http_request("GET", envoy.health_url("/stats/prometheus"))
    assert status == 200
    text = body.decode()
    assert 'envoy_http_ext_authz_error{envoy_http_conn_manager_prefix="ingress_http"}' in text
    assert 'envoy_cluster_upstream_rq_pending_overflow{envoy_cluster_name="authz_service"}' in text
    assert "envoy_server_live" in text

    refused = [
        ("GET", "/"), ("GET", "/healthz"), ("GET", "/transactions/1"),
        ("GET", "/ready/"), ("GET", "/ready?verbose"), ("GET", "/READY"), ("HEAD", "/ready"), ("POST", "/ready"),
        ("GET", "/stats"), ("GET", "/stats/prometheus?filter=.*"), ("GET", "/stats/prometheus/"),
        ("GET", "/config_dump"), ("GET", "/clusters"), ("GET", "/server_info"), ("GET", "/certs"),
        ("POST", "/logging?level=trace"), ("POST", "/healthcheck/fail"), ("POST", "/drain_listeners"),
        ("POST", "/quitquitquit"), ("GET", "/quitquitquit"), ("GET", "/x/../config_dump"),
    ]
    for method, target in refused:
        status, _, body = http_request(method, envoy.health_url(target))
        assert status == 404, (method, target, status, body[:200])

    # No Check reached the service, none was even attempted; Envoy is still live.
    assert decisions(stack) == checks_before
    assert envoy.stats(r"cluster\.authz_service\.upstream_rq_total").get(
        "cluster.authz_service.upstream_rq_total", 0) == authz_before
    assert http_request("GET", envoy.admin_url("/ready"))[2].strip() == b"LIVE"
    assert http_request("GET", envoy.health_url("/ready"))[0] == 200


# --------------------------------------------------------------------------- #
# 4. request ids and the access log
# --------------------------------------------------------------------------- #


def access_log_lines(envoy: EnvoyProcess) -> list[bytes]:
    """Envoy's access-log lines (its own log lines start with '[', access-log lines with '{'), raw."""
    return [line for line in envoy.log_path.read_bytes().splitlines() if line.startswith(b"{")]


def wait_for_logged(envoy: EnvoyProcess, marker: str) -> None:
    envoy.wait_until(lambda: any(marker.encode() in line for line in access_log_lines(envoy)), 20,
                     f"access-log line containing {marker}")


def test_request_id_is_always_envoys_own(stack: SecurityStack, reader_token: str) -> None:
    envoy = stack.envoy
    marker = uuid.uuid4().hex
    client_id = f"client-chosen-{marker}"
    answer = stack.send("GET", f"/transactions/rid-{marker}", reader_token, [("X-Request-Id", client_id)])
    assert answer.status == 200
    (seen,) = answer.reached_upstream
    (upstream_id,) = seen["headers"]["x-request-id"]
    assert upstream_id != client_id and UUID4.match(upstream_id), upstream_id

    # A denied request too (anonymous, answered by the service), and a second header copy.
    denied = stack.send("GET", f"/transactions/rid-denied-{marker}",
                        headers=[("x-request-id", client_id), ("X-REQUEST-ID", "second")])
    assert denied.status == 401

    wait_for_logged(envoy, f"rid-denied-{marker}")
    entries = [json.loads(line) for line in access_log_lines(envoy) if marker.encode() in line]
    assert [e["path"] for e in entries] == [f"/transactions/rid-{marker}", f"/transactions/rid-denied-{marker}"]
    assert entries[0]["request_id"] == upstream_id
    for entry in entries:
        assert UUID4.match(entry["request_id"]), entry
        assert client_id not in json.dumps(entry)
    assert entries[0]["request_id"] != entries[1]["request_id"]


HOSTILE_TEXT = [
    "line\u2028separator", "paragraph\u2029separator", "next\u0085line", "caf\u00e9", "\u202eevil",
]


def test_access_log_is_strict_ascii_json_without_query_strings(stack: SecurityStack, reader_token: str) -> None:
    """Client-controlled bytes (non-ASCII, U+2028/U+2029, invalid UTF-8, quotes) in headers,
    path and query: every access-log line must still be one strict, ASCII-only JSON object,
    and no query string (which may hold an access_token) is logged."""
    envoy = stack.envoy
    marker = uuid.uuid4().hex
    secret = f"SECRET{marker}"
    raw_requests = []
    for i, text in enumerate(HOSTILE_TEXT):
        value = text.encode()
        raw_requests.append(
            f"GET /transactions/log-{i}-{marker}?access_token={secret}&x=1 HTTP/1.1\r\nHost: api.example\r\n".encode()
            + b"User-Agent: ua-" + value + b"\r\n"
            + b"X-Request-Id: rid-" + value + b"\r\n"
            + b"Referer: ref-" + value + b"\r\n"
            + b"X-Envoy-Original-Path: /spoofed-" + value + b"?access_token=" + secret.encode() + b"\r\n"
            + f"Authorization: Bearer {reader_token}\r\n\r\n".encode())
    raw_requests += [
        # invalid UTF-8 and quoting characters in headers
        f"GET /public/log-bytes-{marker} HTTP/1.1\r\nHost: api.example\r\n".encode()
        + b'User-Agent: \xff\xfe\xc0\xaf "q" \\ \t end\r\nX-Request-Id: \xe2\x80\xa8\r\n\r\n',
        # raw non-ASCII in the path and authority (Envoy refuses these with 400, and logs them)
        b"GET /transactions/\xe2\x80\xa8" + marker.encode() + b" HTTP/1.1\r\nHost: api.example\r\n\r\n",
        b"GET /transactions/1 HTTP/1.1\r\nHost: h\xe2\x80\xa8.example\r\n\r\n",
        # percent-encoded U+2028 and a query on a public route
        f"GET /public/%E2%80%A8-{marker}?access_token={secret} HTTP/1.1\r\nHost: api.example\r\n\r\n".encode(),
    ]
    last = f"/public/log-last-{marker}"
    raw_requests.append(f"GET {last}?access_token={secret} HTTP/1.1\r\nHost: api.example\r\n\r\n".encode())
    for raw in raw_requests:
        with socket.create_connection(("127.0.0.1", envoy.listener_port), timeout=10) as sock:
            sock.sendall(raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            while sock.recv(65536):  # until Envoy closes after its answer
                pass

    wait_for_logged(envoy, last)
    lines = access_log_lines(envoy)
    assert len(lines) >= len(raw_requests)
    for line in lines:
        text = line.decode("utf-8")  # strict: invalid UTF-8 raises
        assert text.isascii(), text
        assert "\u2028" not in text and "\u2029" not in text and "\u0085" not in text
        entry = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert isinstance(entry, dict)
    ours = [json.loads(line) for line in lines if marker.encode() in line]
    assert len(ours) >= len(HOSTILE_TEXT) + 3
    assert all("?" not in e["path"] and "spoofed" not in e["path"] for e in ours), [e["path"] for e in ours]
    assert not any(secret.encode() in line for line in lines)
    assert any(e["path"] == last for e in ours)
