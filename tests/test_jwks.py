"""JwksCache against a real HTTP JWKS endpoint whose behaviour each test scripts."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from prometheus_client import CollectorRegistry

from authz_service.jwks import JwksCache, JwksError, JwksSettings, parse_jwks
from authz_service.metrics import Metrics
from authz_service.policy import Issuer

from .conftest import SigningKey, make_key


class ScriptedJwks:
    """An HTTP JWKS endpoint: `reply` decides each answer; `hits` counts requests."""

    def __init__(self) -> None:
        self.hits = 0
        self.reply: web.Response | None = None
        self.delay = 0.0
        self.held: asyncio.Event | None = None  # when set: answers wait until it is set

    async def handle(self, _: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.held is not None:
            await self.held.wait()
        assert self.reply is not None
        return self.reply

    def keys(self, *keys: SigningKey) -> None:
        self.reply = web.json_response({"keys": [k.jwk() for k in keys]})


@pytest.fixture
async def endpoint(aiohttp_server_factory):
    return await aiohttp_server_factory()


@pytest.fixture
async def aiohttp_server_factory():
    runners: list[web.AppRunner] = []

    async def start() -> tuple[ScriptedJwks, Issuer]:
        scripted = ScriptedJwks()
        app = web.Application()
        app.router.add_get("/pool/.well-known/jwks.json", scripted.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}/pool"
        issuer = Issuer("us-east-1_Pool1", "us-east-1", base, base + "/.well-known/jwks.json", None)
        return scripted, issuer

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def make_cache():
    sessions: list[aiohttp.ClientSession] = []
    caches: list[JwksCache] = []

    def make(on_key_removed=None, **overrides) -> tuple[JwksCache, Metrics]:
        settings = JwksSettings(**{"refresh_interval": 3600, "timeout": 0.5, "retry_min": 0.05, "retry_max": 0.1,
                                   **overrides})
        metrics = Metrics(CollectorRegistry())
        session = aiohttp.ClientSession()
        sessions.append(session)
        cache = JwksCache(settings, metrics, session, on_key_removed=on_key_removed)
        caches.append(cache)
        return cache, metrics

    yield make
    for cache in caches:
        await cache.close()
    for session in sessions:
        await session.close()


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def expire_cooldown(cache: JwksCache, issuer: Issuer) -> None:
    """Pretend the unknown-kid cool-down has passed (instead of sleeping 10 s)."""
    cache._states[(issuer.issuer, issuer.jwks_uri)].last_attempt = float("-inf")


# --- parse_jwks ----------------------------------------------------------------------------------


def test_parse_keeps_only_rsa_signing_keys(key_a: SigningKey, key_b: SigningKey) -> None:
    ec_key = {**json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())), "kid": "ec"}
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = {**RSAAlgorithm.to_jwk(small.public_key(), as_dict=True), "kid": "weak"}
    enc = {**key_b.jwk(), "use": "enc", "kid": "enc"}
    other_alg = {**key_b.jwk(), "alg": "RS512", "kid": "rs512"}
    private = {**RSAAlgorithm.to_jwk(key_b.private, as_dict=True), "kid": "private"}
    doc = {"keys": [key_a.jwk(), ec_key, weak, enc, other_alg, private, "junk", {"kty": "RSA", "kid": "broken", "n": "x"}]}
    assert list(parse_jwks(json.dumps(doc).encode())) == ["kid-a"]


def test_parse_drops_ambiguous_duplicate_kids(key_a: SigningKey, key_b: SigningKey) -> None:
    dup = {**key_b.jwk(), "kid": "kid-a"}
    with pytest.raises(JwksError):
        parse_jwks(json.dumps({"keys": [key_a.jwk(), dup]}).encode())


@pytest.mark.parametrize("doc", [b"<html>oops</html>", b"{", b"[]", b'{"keys": {}}', b'{"keys": []}', b"\xff\xfe"])
def test_parse_rejects_bad_documents(doc: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(doc)


# --- the cache -----------------------------------------------------------------------------------


async def test_startup_fetch_and_metrics(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    assert cache.key(issuer, "kid-a") is not None and cache.ready()
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "startup", "result": "ok"}) == 1
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Pool1"}) == 1


@pytest.mark.parametrize(
    "reply",
    [
        lambda: web.Response(status=500, text="boom"),
        lambda: web.Response(text="<html>maintenance</html>", content_type="text/html"),
        lambda: web.Response(text="{not json", content_type="application/json"),
        lambda: web.json_response({"keys": []}),
        lambda: web.Response(body=b'{"keys": [' + b" " * (10 * 1024 * 1024) + b"]}", content_type="application/json"),
        lambda: web.Response(status=302, headers={"Location": "http://127.0.0.1:1/elsewhere"}),
    ],
    ids=["500", "html", "invalid-json", "empty-set", "10MB", "redirect"],
)
async def test_bad_refresh_keeps_last_good_keys(endpoint, make_cache, key_a, reply) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.reply = reply()
    hits = scripted.hits
    expire_cooldown(cache, issuer)
    await cache.refetch(issuer)
    assert scripted.hits == hits + 1
    assert cache.key(issuer, "kid-a") is not None
    assert cache.status()[0]["last_error"]
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "unknown_kid", "result": "error"}) == 1


async def test_issuer_down_at_start_then_recovers(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.reply = web.Response(status=503)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: scripted.hits >= 2)
    assert not cache.ready() and not cache.has_keys(issuer)
    scripted.keys(key_a)
    await wait_for(lambda: cache.has_keys(issuer))  # backoff retries, no restart needed
    assert cache.ready()


async def test_timeout_holds_and_keeps_keys(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache(timeout=0.2)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.held = asyncio.Event()  # the answer never comes while the re-fetch runs
    try:
        expire_cooldown(cache, issuer)
        # Only the 0.2 s timeout can end this re-fetch (the bound is generous, not a threshold).
        await asyncio.wait_for(cache.refetch(issuer), 60)
    finally:
        scripted.held.set()
    assert "timed out" in cache.status()[0]["last_error"]
    assert cache.key(issuer, "kid-a") is not None


async def test_unknown_kid_flood_causes_one_fetch_per_cooldown(endpoint, make_cache, key_a, key_b) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache(unknown_kid_cooldown=10)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    expire_cooldown(cache, issuer)
    scripted.keys(key_a, key_b)
    scripted.delay = 0.1
    hits = scripted.hits
    await asyncio.gather(*(cache.refetch(issuer) for _ in range(200)))
    assert scripted.hits == hits + 1  # single flight: 200 concurrent unknown kids, one fetch
    assert cache.key(issuer, "kid-b") is not None
    await asyncio.gather(*(cache.refetch(issuer) for _ in range(200)))
    assert scripted.hits == hits + 1  # within the cool-down: no fetch at all


async def test_rotation_replaces_key_set(endpoint, make_cache, key_a, key_b) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache(refresh_interval=0.05)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.keys(key_b)
    await wait_for(lambda: cache.key(issuer, "kid-b") is not None)
    assert cache.key(issuer, "kid-a") is None


async def test_routine_refresh_keeps_key_objects_and_reports_removed_kids(endpoint, make_cache, key_a, key_b) -> None:
    # The token cache trusts a hit only while the JWKS holds the very key object that verified it:
    # an unchanged key must keep its identity across refreshes, a removed kid must be reported.
    scripted, issuer = endpoint
    scripted.keys(key_a, key_b)
    removed: list[tuple[str, str]] = []
    cache, _ = make_cache(refresh_interval=0.05, on_key_removed=lambda iss, kid: removed.append((iss, kid)))
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    first = cache.key(issuer, "kid-a")
    hits = scripted.hits
    await wait_for(lambda: scripted.hits >= hits + 2)
    assert cache.key(issuer, "kid-a") is first and removed == []
    scripted.keys(key_b)
    await wait_for(lambda: cache.key(issuer, "kid-a") is None)
    assert removed == [(issuer.issuer, "kid-a")]


async def test_kid_reused_for_other_material_is_reported_and_replaced(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    removed: list[tuple[str, str]] = []
    cache, _ = make_cache(refresh_interval=0.05, on_key_removed=lambda iss, kid: removed.append((iss, kid)))
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    first = cache.key(issuer, "kid-a")
    scripted.keys(make_key("kid-a"))
    await wait_for(lambda: cache.key(issuer, "kid-a") is not first)
    assert removed == [(issuer.issuer, "kid-a")]


async def test_sync_drops_removed_issuers(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    cache.sync([])
    assert not cache.has_keys(issuer) and cache.ready()


async def test_issuer_series_exist_at_zero_and_leave_with_the_issuer(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    labels = {"issuer": "us-east-1_Pool1", "trigger": "periodic", "result": "error"}
    assert metrics.registry.get_sample_value("authz_jwks_refreshes_total", labels) == 0
    await wait_for(lambda: cache.has_keys(issuer))
    cache.sync([])
    assert metrics.registry.get_sample_value("authz_jwks_refreshes_total", labels) is None
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Pool1"}) is None
