"""The running service: the ext_authz gRPC server plus the HTTP health/metrics server.

One path per Check: ``request.parse_check_request`` -> ``decision.decide`` ->
``response.Renderer.render``. Everything else here is lifecycle: start-up, readiness,
policy reloads, JWKS refreshers and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import gc_collector, platform_collector, process_collector

from ._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from .config import Settings
from .decision import Decision, Reason, decide, deny
from .jwks import JwksCache
from .metrics import Metrics
from .policy import Policy, load_policy_file
from .reloader import PolicyReloader
from .request import BadRequest, HttpRequest, parse_check_request
from .response import Renderer
from .tokencache import TokenCache
from .tokens import TokenVerifier

log = logging.getLogger(__name__)
T = TypeVar("T")
AUTHZ_SERVICE_NAME = "envoy.service.auth.v3.Authorization"
METRICS_FLUSH_INTERVAL = 1.0  # seconds; see metrics.PerCheck


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Authorization/Check. Never raises: every failure becomes a deny."""

    def __init__(self, reloader: PolicyReloader, verifier: TokenVerifier, renderer: Renderer, metrics: Metrics) -> None:
        self._reloader = reloader
        self._verifier = verifier
        self._renderer = renderer
        self._per_check = metrics.per_check

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        http: HttpRequest | None = None
        try:
            http = parse_check_request(request)
            decision = await decide(http, self._reloader.policy, self._verifier)
        except BadRequest as exc:
            decision = deny(Reason.BAD_REQUEST, 400, str(exc))
        except Exception:  # noqa: BLE001 - fail closed on any bug, and say so loudly
            log.exception("check failed; denying")
            decision = deny(Reason.INTERNAL_ERROR, 500, "internal error")
        response = self._renderer.render(decision, http)
        self._per_check.check((decision.kind, decision.reason.value, decision.route_label, decision.status),
                              time.perf_counter() - started)
        self._log(decision, http)
        return response

    def _log(self, decision: Decision, http: HttpRequest | None) -> None:
        if decision.allowed and not decision.dry_run:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("allow", extra=_log_fields(decision, http))
            return
        log.info("dry-run deny" if decision.dry_run else "deny", extra=_log_fields(decision, http))


def _log_fields(decision: Decision, http: HttpRequest | None) -> dict[str, object]:
    # Never the token, never the query string (it may carry secrets).
    return {
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason.value,
        "status": decision.status,
        "route": decision.route_label,
        "description": decision.description,
        "client_id": decision.claims.client_id if decision.claims else None,
        "method": http.method if http else None,
        "path": http.path if http else None,
        "request_id": http.request_id if http else None,
    }


class Service:
    """Wires the parts together and runs them until stopped."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        worker: bool = False,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        # A worker of `--workers N` (see workers.py): shares the gRPC port (SO_REUSEPORT), serves no
        # HTTP (the parent does) and reports readiness through ``on_ready``.
        self.worker = worker
        self._on_ready = on_ready
        if registry is None:
            registry = CollectorRegistry()
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        self.registry = registry
        self.metrics = Metrics(registry)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    def ready(self) -> bool:
        return not self._stopping.is_set() and self.jwks.ready()

    async def start(self) -> None:
        """Load the policy (PolicyError propagates: refuse to start), bind ports, start refreshers."""
        policy = load_policy_file(self.settings.policy)
        self._session = aiohttp.ClientSession(headers={"User-Agent": "authz-service"})
        self.token_cache = TokenCache(
            self.settings.token_cache_size, self.settings.token_cache_max_bytes, self.metrics
        )
        self.jwks = JwksCache(self.settings.jwks, self.metrics, self._session, on_key_removed=self.token_cache.drop_key)
        self.jwks.sync(policy.issuers)
        self.reloader = PolicyReloader(self.settings.policy, policy, self.metrics, on_change=self._policy_changed)
        self.reloader.open_watch(self.settings.policy_watch)  # --policy-watch inotify without inotify: OSError
        self.metrics.policy_loaded(len(policy.routes), policy.sha256)
        verifier = TokenVerifier(self.jwks, leeway=self.settings.leeway, cache=self.token_cache)
        servicer = AuthorizationServicer(self.reloader, verifier, Renderer(self.settings.realm), self.metrics)

        self._health = health.aio.HealthServicer()
        # One process: SO_REUSEPORT off, so a port already in use is an error, not a silent share.
        # Workers share the port the parent reserved (workers.reserve_port keeps that guarantee).
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self.worker else 0)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{_host(self.settings.grpc_host)}:{self.settings.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {self.settings.grpc_host}:{self.settings.grpc_port}")
        await self._grpc.start()

        self._http: web.AppRunner | None = None
        if not self.worker:
            self._http = web.AppRunner(self._admin_app(), access_log=None)
            await self._http.setup()
            site = web.TCPSite(self._http, self.settings.http_host, self.settings.http_port)
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self._tasks.append(asyncio.create_task(self.reloader.watch(self.settings.policy_poll_interval)))
        self._tasks.append(asyncio.create_task(self._track_readiness()))
        self._tasks.append(asyncio.create_task(self._flush_metrics()))
        await self.jwks.wait_first_attempts(self.settings.jwks_timeout + 1)
        await self._set_health()
        # Everything allocated so far (modules, policy, keys) lives as long as the process: move it
        # out of the collector's view, so the full collections the Check path's allocations trigger
        # do not walk ~10^5 long-lived objects each time (profiled: see README "Performance").
        gc.freeze()
        log.info(
            "authz-service started",
            extra={"grpc": f"{self.settings.grpc_host}:{self.grpc_port}",
                   "http": f"{self.settings.http_host}:{self.http_port}",
                   "policy": str(self.settings.policy), "routes": len(policy.routes), "event_loop": loop_name(),
                   "issuers": [i.issuer for i in policy.issuers], "ready": self.ready()},
        )

    def _policy_changed(self, policy: Policy) -> None:
        self.jwks.sync(policy.issuers)

    async def _set_health(self) -> None:
        ready = self.ready()
        self.metrics.ready.set(1 if ready else 0)
        if self._on_ready is not None:
            self._on_ready(ready)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", AUTHZ_SERVICE_NAME):
            await self._health.set(name, status)

    async def _track_readiness(self) -> None:
        was = None
        while True:
            now = self.ready()
            if now != was:
                await self._set_health()
                if was is not None:
                    log.info("readiness changed", extra={"ready": now, "issuers": self.jwks.status()})
                was = now
            await asyncio.sleep(0.25)

    async def _flush_metrics(self) -> None:
        # Scrapes of this process flush first; this is for --workers, whose parent reads the files.
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            self.metrics.per_check.flush()

    def _admin_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def readyz(_: web.Request) -> web.Response:
            body = {
                "ready": self.ready(),
                "policy": {"sha256": self.reloader.policy.sha256, "routes": len(self.reloader.policy.routes),
                           "last_reload_error": self.reloader.last_error},
                "issuers": self.jwks.status(),
            }
            return web.json_response(body, status=200 if body["ready"] else 503)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Drain: readiness goes false first, in-flight Checks get the grace period, then close."""
        self._stopping.set()
        await self._set_health()
        log.info("shutting down", extra={"grace_seconds": self.settings.shutdown_grace})
        await self._grpc.stop(self.settings.shutdown_grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.metrics.per_check.flush()  # the drained Checks count too
        await self.jwks.close()
        if self._http is not None:
            await self._http.cleanup()
        await self._session.close()


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run ``main`` to completion on the configured event loop.

    uvloop (libuv) answers the same Checks with ~30 us less CPU each than asyncio's default loop,
    measured through Envoy (README "Performance"); asyncio stays available as a fallback.
    """
    if event_loop == "asyncio" or (event_loop == "auto" and importlib.util.find_spec("uvloop") is None):
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running loop's implementation, for the start-up log line."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(
    settings: Settings, *, worker: bool = False, on_ready: Callable[[bool], None] | None = None
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    service = Service(settings, CollectorRegistry() if worker else None, worker=worker, on_ready=on_ready)
    await service.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, service.request_stop)
    loop.add_signal_handler(signal.SIGINT, service.request_stop)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: asyncio.ensure_future(service.reloader.reload("SIGHUP"))
    )
    await service.wait_stopped()
    await service.stop()
