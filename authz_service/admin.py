"""The health, readiness and metrics HTTP server, shared by ``serve`` and the ``--workers`` parent.

Never put this port behind Envoy's ext_authz: the kubelet probes it and Prometheus scrapes it.
It runs on the Checks' event loop, so whoever calls it, it may only take a bounded share of it:

* the exposition is generated at most once per ``min_interval`` and served from memory in
  between (a scrape then costs a cached write, not a full collection);
* connections are accepted within an ``AdminBudget`` (a rate, a burst and a number open at
  once), one request each: a flood of /metrics, /readyz or 404s waits in the kernel's accept
  queue instead of running on the Checks' loop. A thread of its own was measured and does not
  help: under the interpreter lock an unbounded admin thread still slowed Checks ~1.3-1.9x
  (docs/performance.md, "The admin port under a flood").

``/metrics`` speaks OpenMetrics to a scraper that asks for it (``Accept:
application/openmetrics-text``, as Prometheus does when configured to): the only format that
carries the Check latency's trace-id exemplars. Every other scraper gets the classic text format.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
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


async def listen(
    runner: web.BaseRunner, host: str, port: int, listener: ports.Listener, reuse_port: bool = False
) -> int:
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


@dataclass(frozen=True, slots=True)
class AdminBudget:
    """How much of the Checks' event loop the admin port may take, whoever calls it.

    Probes and scrapes need a request every few seconds. Beyond the budget, connections wait in
    the kernel's accept queue (costing no CPU of ours) until a token frees; the queue's overflow
    is refused by the kernel.
    """

    rate: float = 50.0  # connections (one request each) accepted per second, sustained
    burst: int = 50  # ... and at once after a quiet period
    connections: int = 16  # open at the same time
    deadline: float = 5.0  # seconds a connection may stay open: a slow client is cut off
    backlog: int = 64  # the kernel's accept queue


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self._rate)


_GET = ("GET", "HEAD")


class AdminServer:
    """``GET /healthz`` (alive), ``GET /readyz`` (ready, with details; 503 when not) and ``GET /metrics``,
    404 for any other path, 405 for another method; every connection within ``budget``. With ``jwks``,
    ``GET /jwks?iss=<issuer>`` too: the keys the service verifies that issuer's tokens with, for the
    Envoy of native mode (docs/native.md); public keys, as the issuer publishes them."""

    def __init__(
        self,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: CachedExposition,
        openmetrics: CachedExposition | None = None,
        budget: AdminBudget = AdminBudget(),
        jwks: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._openmetrics = openmetrics
        self._budget = budget
        self._runner: web.ServerRunner | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._routes: dict[str, Callable[[web.BaseRequest], Awaitable[web.Response]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._serve_metrics,
        }
        self._jwks = jwks
        if jwks is not None:
            self._routes["/jwks"] = self._serve_jwks

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        route = self._routes.get(request.path)
        if route is None:
            response = web.Response(status=404, text="404: Not Found")
        elif request.method not in _GET:
            response = web.Response(status=405, text="405: Method Not Allowed", headers={"Allow": "GET, HEAD"})
        else:
            response = await route(request)
        response.force_close()  # one request per connection: the budget counts connections
        return response

    async def _healthz(self, _: web.BaseRequest) -> web.Response:
        return _json({"status": "alive"}, 200)

    async def _readyz(self, _: web.BaseRequest) -> web.Response:
        ready, body = self._readiness()
        return _json({"ready": ready, **body}, 200 if ready else 503)

    async def _serve_metrics(self, request: web.BaseRequest) -> web.Response:
        if self._openmetrics is not None and wants_openmetrics(request.headers.get("Accept", "")):
            return web.Response(body=await self._openmetrics.get(), headers={"Content-Type": OPENMETRICS_CONTENT_TYPE})
        return web.Response(body=await self._metrics.get(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_jwks(self, request: web.BaseRequest) -> web.Response:
        assert self._jwks is not None
        try:
            document = self._jwks(request.query.get("iss", ""))
        except KeyError:
            return _json({"error": "not an issuer of the policy in force"}, 404)
        if document is None:  # Envoy keeps the keys it has and fetches again
            return _json({"error": "no keys for this issuer yet"}, 503)
        return web.Response(
            body=document, content_type="application/jwk-set+json", headers={"Cache-Control": "no-store"}
        )

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; the bound port (``port`` 0 picks one). OSError naming the address."""
        bound = self.bind(host, port)
        await self.serve()
        return bound

    def bind(self, host: str, port: int) -> int:
        """Bind (and listen: connections wait in the backlog) without answering yet; the bound
        port. Why apart from ``serve``: native mode binds every port before it writes Envoy's
        listener, and answers /healthz only once it is written."""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            sock = socket.create_server((host, port), family=family, backlog=self._budget.backlog)
        except OSError as exc:
            raise ports.ADMIN.error(host, port, exc) from None
        sock.setblocking(False)
        self._sock = sock
        return int(sock.getsockname()[1])

    async def serve(self) -> None:
        """Answer on the socket ``bind`` opened."""
        assert self._sock is not None
        runner = web.ServerRunner(_BudgetedServer(self._handle, self._budget.deadline), handle_signals=False)
        await runner.setup()
        self._runner = runner
        self._accepting = asyncio.create_task(self._accept(self._sock))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        bucket = _TokenBucket(self._budget.rate, self._budget.burst)
        slots = asyncio.Semaphore(self._budget.connections)
        assert self._runner is not None and isinstance(self._runner.server, _BudgetedServer)
        server = self._runner.server
        while True:
            await bucket.take()
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
                await loop.connect_accepted_socket(lambda: server.connection(slots.release), conn)
            except OSError:  # the client left before we got to it: its slot is free again
                slots.release()

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _json(body: dict[str, Any], status: int) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


class QuietRefusals(RequestHandler):
    """A connection that answers a request aiohttp's HTTP parser refused with ``refused``.

    Why: aiohttp's own answer is a 400 whose body quotes the refused header line as sent, logged
    at ERROR with it: an ``Authorization`` or ``Cookie`` line with one stray byte is a credential
    sent back and written to the log. The admin port answers a plain 400, the HTTP front door its
    counted JSON denial."""

    def refused(self, exc: HttpProcessingError) -> web.StreamResponse:
        response = web.Response(status=400, text="400: Bad Request")
        response.force_close()
        return response

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and isinstance(exc, HttpProcessingError):
            return self.refused(exc)
        return super().handle_error(request, status, exc, message)


class _BudgetedServer(web.Server):
    """aiohttp's low-level server whose connections give their slot back when closed and are
    cut off after ``deadline`` seconds, whatever the client is doing."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.Response]], deadline: float) -> None:
        self._handler_args: dict[str, Any] = {"access_log": None, "keepalive_timeout": deadline}
        super().__init__(handler, **self._handler_args)
        self._deadline = deadline

    def connection(self, release: Callable[[], None]) -> RequestHandler:
        deadline = self._deadline

        class Connection(QuietRefusals):
            _cutoff: asyncio.TimerHandle | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                self._cutoff = asyncio.get_running_loop().call_later(deadline, transport.close)

            def connection_lost(self, exc: BaseException | None) -> None:
                super().connection_lost(exc)
                if self._cutoff is not None:
                    self._cutoff.cancel()
                release()

        return Connection(self, loop=asyncio.get_running_loop(), **self._handler_args)
