"""admin: the health/readiness/metrics server shared by `serve` and the `--workers` parent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from authz_service import admin
from authz_service.admin import AdminServer, CachedExposition


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(admin.time, "monotonic", c)
    return c


async def test_exposition_is_reused_within_the_interval_and_regenerated_after(clock):
    made = []

    async def generate() -> bytes:
        made.append(clock.now)
        return f"body {len(made)}".encode()

    cache = CachedExposition(generate, 1.0)
    assert await cache.get() == b"body 1"
    clock.now += 0.99
    assert await cache.get() == b"body 1", "a scrape within the interval is served from memory"
    clock.now += 0.02
    assert await cache.get() == b"body 2"
    assert len(made) == 2 and made[1] == clock.now


async def test_zero_interval_generates_every_time(clock):
    count = [0]

    async def generate() -> bytes:
        count[0] += 1
        return b"x"

    cache = CachedExposition(generate, 0.0)
    for _ in range(3):
        await cache.get()
    assert count == [3]


def gated(body: bytes) -> tuple[Callable[[], Awaitable[bytes]], asyncio.Event, list[int]]:
    """An exposition generator that counts its calls and answers ``body`` once the gate is set."""
    gate = asyncio.Event()
    count = [0]

    async def generate() -> bytes:
        count[0] += 1
        await gate.wait()
        return body

    return generate, gate, count


async def test_concurrent_scrapes_share_one_generation(clock):
    generate, gate, count = gated(b"shared")
    cache = CachedExposition(generate, 0.0)
    scrapes = [asyncio.create_task(cache.get()) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*scrapes) == [b"shared"] * 20
    assert count == [1]


async def test_a_failed_generation_fails_its_waiters_and_is_retried(clock):
    calls = [0]

    async def generate() -> bytes:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("collector broke")
        return b"ok"

    cache = CachedExposition(generate, 10.0)
    with pytest.raises(RuntimeError):
        await cache.get()
    assert await cache.get() == b"ok"


async def test_admin_server_serves_health_readiness_and_metrics_and_reports_its_port():
    ready = [False]

    async def generate() -> bytes:
        return b"# metrics\n"

    server = AdminServer(lambda: (ready[0], {"detail": 1}), CachedExposition(generate, 0))
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async def get(path: str) -> tuple[int, bytes]:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    return resp.status, await resp.read()

            assert await get("/healthz") == (200, b'{"status": "alive"}')
            assert await get("/readyz") == (503, b'{"ready": false, "detail": 1}')
            ready[0] = True
            assert (await get("/readyz"))[0] == 200
            assert await get("/metrics") == (200, b"# metrics\n")
            assert (await get("/other"))[0] == 404
    finally:
        await server.stop()


async def test_a_port_in_use_is_one_clear_oserror():
    first = AdminServer(lambda: (True, {}), CachedExposition(lambda: asyncio.sleep(0, b""), 0))
    port = await first.start("127.0.0.1", 0)
    try:
        second = AdminServer(lambda: (True, {}), CachedExposition(lambda: asyncio.sleep(0, b""), 0))
        with pytest.raises(OSError, match=f"cannot bind the HTTP \\(health/metrics\\) port 127.0.0.1:{port} .*--http-port"):
            await second.start("127.0.0.1", port)
    finally:
        await first.stop()


async def test_methods_and_paths_beyond_the_three_endpoints():
    server = AdminServer(lambda: (True, {}), CachedExposition(lambda: asyncio.sleep(0, b"m\n"), 0))
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            for method, path, status in (("HEAD", "/healthz", 200), ("POST", "/readyz", 405),
                                         ("GET", "/metrics/", 404), ("GET", "/", 404)):
                async with session.request(method, f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == status, (method, path)
                    assert resp.headers["Connection"] == "close"  # one request per connection
    finally:
        await server.stop()


async def raw_get(port: int, path: str) -> bytes:
    """One HTTP/1.1 request on its own connection; what the server answered (b"" when it closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_a_flood_is_served_only_within_the_budget_the_rest_waits_in_the_kernel():
    """Five tokens and no refill: of 20 concurrent requests, exactly 5 reach the service's code;
    the others are never accepted (they cost the event loop nothing) until the server stops."""
    calls = [0]

    def readiness() -> tuple[bool, dict]:
        calls[0] += 1
        return True, {}

    server = AdminServer(readiness, CachedExposition(lambda: asyncio.sleep(0, b""), 0),
                         budget=admin.AdminBudget(rate=1e-9, burst=5, connections=16, deadline=5, backlog=64))
    port = await server.start("127.0.0.1", 0)
    flood = [asyncio.create_task(raw_get(port, "/readyz")) for _ in range(20)]
    try:
        done, pending = await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)
        while len(done) < 5:
            more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= more
        assert calls == [5] and len(pending) == 15
        assert all(task.result().startswith(b"HTTP/1.1 200 ") for task in done)
    finally:
        await server.stop()
        await asyncio.gather(*flood, return_exceptions=True)
    assert calls == [5]


async def test_connections_open_at_once_are_bounded_and_a_slow_client_is_cut_off():
    generate, gate, _ = gated(b"m\n")
    server = AdminServer(lambda: (True, {}), CachedExposition(generate, 0),
                         budget=admin.AdminBudget(rate=1000, burst=100, connections=2, deadline=0.2, backlog=64))
    port = await server.start("127.0.0.1", 0)
    try:
        # A client that never finishes its request: cut off at the deadline, its slot freed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost")
        assert await reader.read() == b""
        writer.close()
        scrapes = [asyncio.create_task(raw_get(port, "/metrics")) for _ in range(5)]
        runner_server = server._runner.server

        async def two_open() -> None:
            while len(runner_server.connections) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(two_open(), 10)
        for _ in range(50):  # the accept loop waits for a free slot: no third connection appears
            await asyncio.sleep(0)
            assert len(runner_server.connections) == 2
        gate.set()
        assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in await asyncio.gather(*scrapes))
    finally:
        await server.stop()


async def test_jwks_serves_the_keys_an_issuer_has_and_says_why_not_otherwise():
    """What native mode's Envoy fetches: the keys of the named issuer (200), none yet (503: Envoy
    keeps what it has and fetches again), or an issuer the policy does not trust (404)."""
    documents = {"https://issuer.example/a": b'{"keys":[]}', "https://issuer.example/b": None}

    def jwks(iss: str) -> bytes | None:
        return documents[iss]  # KeyError for an unknown issuer, as JwksCache.document

    async def generate() -> bytes:
        return b""

    server = AdminServer(lambda: (True, {}), CachedExposition(generate, 0), jwks=jwks)
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async def get(iss: str) -> tuple[int, str, bytes]:
                async with session.get(f"http://127.0.0.1:{port}/jwks", params={"iss": iss}) as resp:
                    return resp.status, resp.content_type, await resp.read()

            assert await get("https://issuer.example/a") == (200, "application/jwk-set+json", b'{"keys":[]}')
            assert (await get("https://issuer.example/b"))[0] == 503
            assert (await get("https://issuer.example/c"))[0] == 404
    finally:
        await server.stop()
