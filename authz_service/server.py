"""The running service: the front doors (doors/: ext_authz gRPC, optionally HTTP) and the admin server.

Every Check takes one path, ``check.Checker`` (parse -> decide -> answer -> render -> count ->
log), whichever front door it came through. Everything here is lifecycle: start-up, readiness,
policy reloads, JWKS refreshers and graceful shutdown, the same for every door (``doors.enabled``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from prometheus_client import CollectorRegistry, gc_collector, generate_latest, platform_collector, process_collector
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from . import __version__, doors, ports
from .admin import AdminServer, CachedExposition
from .check import Checker, TracedChecker
from .config import Settings
from .decisionlog import DecisionLog, DecisionLogMode
from .doors.base import DoorKind, FrontDoor, Wiring
from .jwks import JwksCache, http_session
from .metrics import Metrics
from .policy import Policy, deny_list_sizes, load_policy_file
from .reloader import PolicyReloader
from .response import Answers
from .shadow import ShadowPolicy
from .tokencache import TokenCache
from .tokens import TokenVerifier
from .tracing import NO_TRACING, NoTracing, Tracing, describe

if TYPE_CHECKING:  # imported when native mode is on: the compiler stays out of other modes' start-up
    from .native.control import NativeControlPlane

log = logging.getLogger(__name__)
T = TypeVar("T")
METRICS_FLUSH_INTERVAL = 1.0  # seconds; see metrics.PerCheck


class Service:
    """Wires the parts together and runs them until stopped."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        worker: bool = False,
        on_ready: Callable[[bool], None] | None = None,
        on_mismatch: Callable[[], None] | None = None,
        on_policy: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        # A worker of `--workers N` (see workers.py): shares the front doors' ports (SO_REUSEPORT),
        # serves no admin HTTP (the parent does) and reports readiness through ``on_ready``, the
        # requests its doors refused as misconfigured through ``on_mismatch`` and the sha256 of each
        # policy it starts serving through ``on_policy`` (so the parent tells when all serve one).
        self.worker = worker
        self._on_ready = on_ready
        self._on_mismatch = on_mismatch
        self._on_policy = on_policy
        if registry is None:
            registry = CollectorRegistry()
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        self.registry = registry
        self.metrics = Metrics(registry)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.jwks: JwksCache | None = None
        self._doors: list[tuple[DoorKind, FrontDoor]] = []  # the started ones, in start order
        self.door_ports: dict[str, int] = {}  # by DoorKind.name: the bound port
        self._admin: AdminServer | None = None
        self.tracing: NoTracing = NO_TRACING
        self.http_port: int | None = None
        # Native mode (--native-xds-dir): Envoy's listener compiled from each policy (native/control.py).
        self.native: NativeControlPlane | None = None
        self.shadow: ShadowPolicy | None = None

    def ready(self) -> bool:
        return (
            not self._stopping.is_set()
            and self.jwks is not None
            and self.jwks.ready()
            and (self.native is None or self.native.ready())
        )

    async def start(self) -> None:
        """Load the policy (PolicyError propagates: refuse to start), bind ports, start refreshers.

        A failure part-way (a port in use) releases what was already started before it propagates.
        """
        load: Callable[[Path], Policy] = load_policy_file
        if self.settings.native_xds_dir is not None:
            from .native.control import NativeControlPlane

            native = NativeControlPlane(self.settings, self.metrics)
            native.claim()  # before anything else: a second service on the directory writes nothing
            self.native, load = native, native.load
        try:
            policy = await asyncio.to_thread(load, self.settings.policy)
            await self._start(policy)
        except BaseException:
            await self.stop(quiet=True)
            raise
        log.info(
            "authz-service started",
            extra={
                "version": __version__,
                **door_addresses(self.settings, self.door_ports),
                # a worker serves no HTTP port: the parent does, and its own line names it
                **({} if self.worker else {"http": ports.host_port(self.settings.http_host, self.http_port)}),
                "policy": str(self.settings.policy),
                "routes": len(policy.routes),
                "event_loop": loop_name(),
                "issuers": [i.issuer for i in policy.issuers],
                "ready": self.ready(),
                "tracing": describe(self.settings.tracing),
            },
        )

    async def _start(self, policy: Policy) -> None:
        settings = self.settings
        if settings.tracing is not None:
            self.tracing = Tracing(settings.tracing, __version__)
        self._session = http_session()
        self.token_cache = TokenCache(settings.token_cache_size, settings.token_cache_max_bytes, self.metrics)
        self.jwks = JwksCache(
            settings.jwks, self.metrics, self._session, on_key_removed=self.token_cache.drop_key, tracing=self.tracing
        )
        self.jwks.sync(policy.issuers)
        self.reloader = PolicyReloader(
            settings.policy,
            policy,
            self.metrics,
            on_change=self._policy_changed,
            tracing=self.tracing,
            loader=None if self.native is None else self.native.load,
        )
        self.reloader.open_watch(settings.policy_watch)  # --policy-watch inotify without inotify: OSError
        self.metrics.policy_loaded(len(policy.routes), policy.sha256, **deny_list_sizes(policy))
        if self._on_policy is not None:
            self._on_policy(policy.sha256)
        self.metrics.client_new_tokens_alert.set(settings.new_tokens_alert_per_minute)
        verifier = TokenVerifier(self.jwks, leeway=settings.leeway, cache=self.token_cache, policies=self.reloader)
        decision_log = DecisionLog(DecisionLogMode(settings.decision_log), settings.decision_log_sample_rate)
        if settings.shadow_policy:
            self.shadow = await ShadowPolicy.open(
                Path(settings.shadow_policy),
                self.jwks,
                self.metrics.shadow,
                leeway=settings.leeway,
                cache_size=settings.token_cache_size,
                cache_bytes=settings.token_cache_max_bytes,
                watch=settings.policy_watch,
                tracing=self.tracing,
            )
        answers = Answers(settings.realm)
        if isinstance(self.tracing, Tracing):
            self.checker: Checker = TracedChecker(
                self.reloader, verifier, answers, self.metrics.per_check, self.tracing, decision_log, self.shadow
            )
        else:
            self.checker = Checker(self.reloader, verifier, answers, self.metrics.per_check, decision_log, self.shadow)

        wiring = Wiring(self.checker, settings, self.metrics, self._on_mismatch)
        for kind, port in doors.enabled(settings):
            door = kind.build(wiring)
            self.door_ports[kind.name] = await door.start(settings.grpc_host, port, reuse_port=self.worker)
            self._doors.append((kind, door))

        if not self.worker:
            exposition = CachedExposition(self._exposition, settings.metrics_min_interval)
            openmetrics = CachedExposition(self._openmetrics_exposition, settings.metrics_min_interval)
            self._admin = AdminServer(self._readiness, exposition, openmetrics, jwks=self.jwks.document)
            self.http_port = self._admin.bind(settings.http_host, settings.http_port)
        # Native mode writes Envoy's listener once every port is bound (a service that cannot start
        # leaves Envoy's listener as it was) and before the HTTP port answers (/healthz answering
        # means the file Envoy needs exists: the startup probe that gates Envoy's start).
        if self.native is not None:
            await self.native.start(policy)
        if self._admin is not None:
            await self._admin.serve()

        self._tasks.append(asyncio.create_task(self.reloader.watch(settings.policy_poll_interval)))
        if self.shadow is not None:
            self._tasks.append(asyncio.create_task(self.shadow.reloader.watch(settings.policy_poll_interval)))
        self._tasks.append(asyncio.create_task(self._track_readiness()))
        self._tasks.append(asyncio.create_task(self._flush_metrics()))
        await self.jwks.wait_first_attempts(settings.jwks_timeout + 1)
        await self._set_health()
        # Everything allocated so far (modules, policy, keys) lives as long as the process: move it
        # out of the collector's view, so the full collections the Check path's allocations trigger
        # do not walk ~10^5 long-lived objects each time (profiled: see docs/performance.md).
        gc.freeze()

    def _policy_changed(self, policy: Policy) -> None:
        assert self.jwks is not None
        self.jwks.sync(policy.issuers)
        if self.native is not None:
            self.native.policy_changed(policy)
        if self._on_policy is not None:
            self._on_policy(policy.sha256)

    async def _set_health(self) -> None:
        ready = self.ready()
        self.metrics.ready.set(1 if ready else 0)
        if self._on_ready is not None:
            self._on_ready(ready)
        for _, door in self._doors:
            await door.set_ready(ready)

    async def _track_readiness(self) -> None:
        was = None
        while True:
            now = self.ready()
            if now != was:
                await self._set_health()
                if was is not None and self.jwks is not None:
                    log.info("readiness changed", extra={"ready": now, "issuers": self.jwks.status()})
                was = now
            await asyncio.sleep(0.25)

    async def _flush_metrics(self) -> None:
        # Scrapes of this process flush first; this is for --workers, whose parent reads the files.
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            self.metrics.per_check.flush()

    def _readiness(self) -> tuple[bool, dict[str, object]]:
        policy = self.reloader.policy
        body: dict[str, object] = {
            "policy": {
                "sha256": policy.sha256,
                "routes": len(policy.routes),
                "last_reload_error": self.reloader.last_error,
                "refused_sha256": self.reloader.refused_sha256,
            },
            "issuers": self.jwks.status() if self.jwks is not None else [],
        }
        if self.shadow is not None:  # shown, never a readiness condition
            shadow = self.shadow.reloader
            body["shadow_policy"] = {
                "sha256": shadow.serving_sha256,
                "last_reload_error": shadow.last_error,
                "refused_sha256": shadow.refused_sha256,
            }
        for kind, door in self._doors:
            if kind.status is not None:
                body[kind.name] = kind.status(self.settings, door.refused)
        if self.native is not None:
            body["native"] = self.native.status()
        return self.ready(), body

    async def _exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def _openmetrics_exposition(self) -> bytes:
        return generate_openmetrics(self.registry)

    async def reload(self, reason: str) -> None:
        """Load the policy file now (SIGHUP), and the shadow policy's, if any; in native mode, check
        that Envoy's listener file is still the one written."""
        await self.reloader.reload(reason)
        if self.native is not None:
            self.native.recheck()
        if self.shadow is not None:
            await self.shadow.reloader.reload(reason)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self, quiet: bool = False) -> None:
        """Drain: readiness goes false first, in-flight Checks get the grace period, then close.

        Safe on a service that started only in part (``quiet``: a failed start, nothing to log).
        """
        self._stopping.set()
        if self._doors:
            await self._set_health()
        if not quiet:
            log.info("shutting down", extra={"grace_seconds": self.settings.shutdown_grace})
        await asyncio.gather(*(door.stop() for _, door in self._doors))  # every door drains at once
        self._doors.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.metrics.per_check.flush()  # the drained Checks count too
        if self.native is not None:
            await self.native.stop()
        if self.jwks is not None:
            await self.jwks.close()
        if self._admin is not None:
            await self._admin.stop()
        if self._session is not None:
            await self._session.close()
        if isinstance(self.tracing, Tracing):
            await self.tracing.close()  # last: the drained Checks' spans are queued by now


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run ``main`` to completion on the configured event loop.

    uvloop (libuv) answers the same Checks with ~30 us less CPU each than asyncio's default loop,
    measured through Envoy (docs/performance.md); asyncio stays available as a fallback.
    """
    if event_loop == "asyncio" or (event_loop == "auto" and importlib.util.find_spec("uvloop") is None):
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running loop's implementation, for the start-up log line."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def door_addresses(settings: Settings, bound: dict[str, int]) -> dict[str, str | None]:
    """The start-up log's field per door: ``host:port`` as bound, None for a door that is off."""
    return {
        kind.name: ports.host_port(settings.grpc_host, bound[kind.name]) if kind.name in bound else None
        for kind in doors.KINDS
    }


async def serve(
    settings: Settings,
    *,
    worker: bool = False,
    on_ready: Callable[[bool], None] | None = None,
    on_mismatch: Callable[[], None] | None = None,
    on_policy: Callable[[str], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    service = Service(
        settings,
        CollectorRegistry() if worker else None,
        worker=worker,
        on_ready=on_ready,
        on_mismatch=on_mismatch,
        on_policy=on_policy,
    )
    # Signals first: one that arrives while the service starts (its ports are open by then) is never
    # the default action's death by signal. A stop is a drain once the start is done; a SIGHUP (a
    # reload may only follow a start) reloads once started.
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, service.request_stop)
    loop.add_signal_handler(signal.SIGINT, service.request_stop)
    started = asyncio.Event()

    async def reload_once_started() -> None:
        await started.wait()
        await service.reload("SIGHUP")

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_once_started()))
    await service.start()
    started.set()
    await service.wait_stopped()
    await service.stop()
