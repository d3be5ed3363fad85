"""The health, readiness and metrics HTTP server, shared by ``serve`` and the ``--workers`` parent.

Never put this port behind Envoy's ext_authz: the kubelet probes it and Prometheus scrapes it.
It runs on the Checks' event loop, so a scrape must stay cheap whoever sends it: the exposition
is generated at most once per ``min_interval`` and served from memory in between (a flood of
scrapes then costs a cached write each, not a full collection each).

``/metrics`` speaks OpenMetrics to a scraper that asks for it (``Accept:
application/openmetrics-text``, as Prometheus does when configured to): the only format that
carries the Check latency's trace-id exemplars. Every other scraper gets the classic text format.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE

from . import ports


class CachedExposition:
    """The metrics text, regenerated when older than ``min_interval`` seconds (0: every scrape).

    Concurrent scrapes share one generation (single flight), so even a burst that arrives while
    the exposition is being built costs one collection.
    """

    def __init__(self, generate: Callable[[], Awaitable[bytes]], min_interval: float) -> None:
        self._generate = generate
        self.min_interval = min_interval
        self._body = b""
        self._at = float("-inf")
        self._pending: asyncio.Future[bytes] | None = None

    async def get(self) -> bytes:
        if time.monotonic() - self._at < self.min_interval:
            return self._body
        if self._pending is not None:
            return await asyncio.shield(self._pending)
        self._pending = asyncio.get_running_loop().create_future()
        try:
            body = await self._generate()
        except BaseException as exc:
            self._pending.set_exception(exc)
            self._pending.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            pending, self._pending = self._pending, None
        self._body, self._at = body, time.monotonic()
        pending.set_result(body)
        return body


async def listen(runner: web.BaseRunner, host: str, port: int, listener: ports.Listener,
                 reuse_port: bool = False) -> int:
    """Set up ``runner`` and serve it on host:port; the bound port (``port`` 0 picks one).

    A port that cannot be bound is the listener's one-line OSError (the address and the setting
    to change), and the runner is cleaned up first (no half-started server, no asyncio warnings)."""
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except OSError as exc:
        await runner.cleanup()
        raise listener.error(host, port, exc) from None
    return int(runner.addresses[0][1])


def wants_openmetrics(accept: str) -> bool:
    """Whether an Accept header asks for OpenMetrics (any version, unless refused with q=0)."""
    for part in accept.split(","):
        media, *params = part.split(";")
        if media.strip().lower() == "application/openmetrics-text":
            quality = next((p.split("=", 1)[1] for p in params if p.strip().startswith("q=")), "1")
            try:
                if float(quality) > 0:
                    return True
            except ValueError:
                continue
    return False


class AdminServer:
    """``GET /healthz`` (alive), ``GET /readyz`` (ready, with details; 503 when not) and ``GET /metrics``;
    with ``jwks``, ``GET /jwks?iss=<issuer>``: the keys the service verifies that issuer's tokens
    with, for the Envoy of native mode (docs/native.md). Public keys only, as the issuer publishes them."""

    def __init__(self, readiness: Callable[[], tuple[bool, dict[str, Any]]], metrics: CachedExposition,
                 openmetrics: CachedExposition | None = None,
                 jwks: Callable[[str], bytes | None] | None = None) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._openmetrics = openmetrics
        self._jwks = jwks
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def readyz(_: web.Request) -> web.Response:
            ready, body = self._readiness()
            return web.json_response({"ready": ready, **body}, status=200 if ready else 503)

        async def metrics(request: web.Request) -> web.Response:
            if self._openmetrics is not None and wants_openmetrics(request.headers.get("Accept", "")):
                return web.Response(body=await self._openmetrics.get(),
                                    headers={"Content-Type": OPENMETRICS_CONTENT_TYPE})
            return web.Response(body=await self._metrics.get(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def jwks(request: web.Request) -> web.Response:
            assert self._jwks is not None
            try:
                document = self._jwks(request.query.get("iss", ""))
            except KeyError:
                return web.json_response({"error": "not an issuer of the policy in force"}, status=404)
            if document is None:  # Envoy keeps the keys it has and fetches again
                return web.json_response({"error": "no keys for this issuer yet"}, status=503)
            return web.Response(body=document, content_type="application/jwk-set+json",
                                headers={"Cache-Control": "no-store"})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        if self._jwks is not None:
            app.router.add_get("/jwks", jwks)
        return app

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; the bound port (``port`` 0 picks one). OSError naming the address."""
        runner = web.AppRunner(self._app(), access_log=None)
        bound = await listen(runner, host, port, ports.ADMIN)
        self._runner = runner
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
