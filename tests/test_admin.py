"""admin: the health/readiness/metrics server shared by `serve` and the `--workers` parent."""

from __future__ import annotations

import asyncio

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


async def test_concurrent_scrapes_share_one_generation(clock):
    gate = asyncio.Event()
    count = [0]

    async def generate() -> bytes:
        count[0] += 1
        await gate.wait()
        return b"shared"

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
