"""The health, readiness and metrics HTTP server, shared by ``serve`` and the ``--workers`` parent.

Never put this port behind Envoy's ext_authz: the kubelet probes it and Prometheus scrapes it.
It runs on the Checks' event loop, so a scrape must stay cheap whoever sends it: the exposition
is generated at most once per ``min_interval`` and served from memory in between (a flood of
scrapes then costs a cached write each, not a full collection each).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

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


class AdminServer:
    """``GET /healthz`` (alive), ``GET /readyz`` (ready, with details; 503 when not) and ``GET /metrics``."""

    def __init__(self, readiness: Callable[[], tuple[bool, dict[str, Any]]], metrics: CachedExposition) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def readyz(_: web.Request) -> web.Response:
            ready, body = self._readiness()
            return web.json_response({"ready": ready, **body}, status=200 if ready else 503)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=await self._metrics.get(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; the bound port (``port`` 0 picks one). OSError naming the address."""
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ports.ADMIN.error(host, port, exc) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
