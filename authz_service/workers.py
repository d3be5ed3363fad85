"""`--workers N`: N worker processes sharing the front doors' ports, one HTTP port, one metrics view.

Why: one CPython process verifies on one core (the GIL); Envoy's ext_authz opens new connections
as it needs them and the kernel spreads connections over sockets bound with SO_REUSEPORT, so N
workers use N cores with no proxy in between. Every front door the settings turn on
(``doors.enabled``: gRPC, and HTTP when enabled) is shared this way.

The parent (this module) loads the policy once to fail fast, reserves the shared ports, starts the
workers (each a full ``server.Service`` without the HTTP server), serves ``/healthz``, ``/readyz``
(ready = every worker ready) and ``/metrics`` (prometheus-client multiprocess mode: each worker
writes its samples to files in a private temporary directory that the parent aggregates), shows
which policy each worker serves (each loads the file on its own, so a change reaches them from
milliseconds to a reload's duration apart: /readyz's ``policy.sha256`` and ``authz_policy_workers``
say when all serve it), forwards SIGTERM and SIGHUP, restarts a worker that dies, and exits
non-zero when workers fail to start.

Port ownership: the parent binds each door's shared address itself with SO_REUSEPORT (without
listening) before any worker starts and holds it until exit. A port already held by another program
without SO_REUSEPORT therefore fails start-up as with one worker. The kernel lets a socket join a
SO_REUSEPORT group only when it was created by the same effective UID, so a process of another UID
cannot take a share of the Checks; one of the same UID (or root, which can become any UID) can, and
grpcio offers no way to serve an inherited listening socket that would avoid SO_REUSEPORT. Hence the
deployment rule (docs/security.md): every container of the Pod runs as its own non-root UID. What we
can see, we watch: a listening socket on a shared port that none of our workers holds (from
/proc/net/tcp{,6}, which lists the whole network namespace, i.e. the Pod) is logged as an error and
makes the parent not ready until it goes away; running as root is warned about at start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized, SynchronizedString
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, doors, ports
from .config import Settings
from .server import door_addresses
from .tracing import describe
from .waiting import set_within

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# Per-worker state in shared memory, written by the worker, read by the parent.
STARTING, SERVING, READY, STOPPED = 0, 1, 2, 3
START_TIMEOUT = 60.0
RESTART_DELAY = 1.0
PORT_CHECK_INTERVAL = 1.0  # seconds between looks for foreign listeners on the shared ports
# A stopping worker gets the grace period plus this before it is ended the hard way (by the parent,
# or by itself when the parent is gone): a drain must never turn into a process that lingers.
STOP_MARGIN = 5.0
POLICY_READ_WAIT = 0.1  # seconds the parent waits for a worker's policy array (held for microseconds)
POLICY_WORKERS = "authz_policy_workers"


def port_listeners(port: int) -> dict[int, int]:
    """inode -> UID of every listening TCP socket on ``port`` in this network namespace (Linux)."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... uid timeout inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found[int(fields[9])] = int(fields[7])
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds (our own children: same UID, readable)."""
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def worker_main(
    settings: Settings,
    index: int,
    state: Synchronized,
    log_level: str,
    mismatches: Synchronized,
    policy: SynchronizedString,
) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter, no inherited gRPC state)."""
    from . import logs
    from .policy import PolicyError
    from .server import run, serve

    logs.configure(log_level)
    logging.getLogger().handlers[0].addFilter(_WorkerField(index))

    def on_ready(ready: bool) -> None:
        state.value = READY if ready else SERVING

    def on_mismatch() -> None:
        mismatches.value += 1  # only this worker writes it: no lock

    def on_policy(sha256: str) -> None:
        policy.value = sha256.encode("ascii")  # under the array's lock: the parent never reads half of it

    _exit_with_parent(os.getppid(), settings.shutdown_grace + STOP_MARGIN)

    try:
        run(
            serve(settings, worker=True, on_ready=on_ready, on_mismatch=on_mismatch, on_policy=on_policy),
            settings.event_loop,
        )
    except PolicyError as exc:
        log.error("policy file refused; worker not starting", extra={"error": str(exc)})
        sys.exit(2)
    except OSError as exc:
        log.error("worker cannot start", extra={"error": str(exc)})
        sys.exit(2)
    state.value = STOPPED


def _exit_with_parent(parent: int, stop_deadline: float) -> None:
    """Stop when the parent is gone (e.g. SIGKILLed), so that no orphan keeps serving the port.

    The stop is the SIGTERM drain, asked of the main thread (where the event loop handles it). If it
    has not ended the process ``stop_deadline`` seconds later, the process exits anyway, as the
    parent would have killed it: with no parent, nothing else would.
    """
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("parent process gone; stopping", extra={"parent_pid": parent})
        signal.pthread_kill(main, signal.SIGTERM)
        time.sleep(stop_deadline)
        log.error(
            "worker did not stop in time after its parent was gone; exiting",
            extra={"parent_pid": parent, "seconds": stop_deadline},
        )
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _WorkerField(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


@dataclass(frozen=True, slots=True)
class ForeignListener:
    """A listening socket on a shared port that none of our workers holds."""

    listener: ports.Listener
    port: int
    uid: int
    socket_inode: int

    def status(self) -> dict[str, object]:
        return {"port": self.port, "listener": self.listener.what, "uid": self.uid, "socket_inode": self.socket_inode}


class _Worker:
    def __init__(self, index: int, ctx: Any) -> None:
        self.index = index
        self.state: Synchronized = ctx.Value("i", STARTING, lock=False)
        # Requests its doors refused as not matching Envoy's config (FrontDoor.refused), over all its lives.
        self.mismatches: Synchronized = ctx.Value("q", 0, lock=False)
        # The sha256 (hex) of the policy it serves; empty until it has loaded one. Each life gets
        # an array of its own (``new_life``): a worker killed while writing it holds its lock forever.
        self._ctx = ctx
        self.policy: SynchronizedString = ctx.Array("c", 64)
        self.process: Any = None
        self.restarts = 0

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def new_life(self) -> None:
        self.state.value = STARTING
        self.policy = self._ctx.Array("c", 64)

    def served_policy(self) -> str:
        """The sha256 of the policy it serves; empty before it loads one, or while its array's lock
        is not free within a moment (held by a worker killed as it wrote: the parent never waits on it)."""
        lock = self.policy.get_lock()
        if not lock.acquire(timeout=POLICY_READ_WAIT):
            return ""
        try:
            return bytes(self.policy.get_obj()).partition(b"\0")[0].decode("ascii")
        finally:
            lock.release()


class Supervisor:
    """The parent process of ``--workers N`` (N > 1)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(i, self._ctx) for i in range(settings.workers)]
        self._stopping = asyncio.Event()
        self._metrics_dir = ""
        self._reservations: list[socket.socket] = []
        self.door_ports: dict[str, int] = {}  # by DoorKind.name: the shared port
        self.http_port: int | None = None
        self.shared_ports: list[tuple[ports.Listener, int]] = []  # what the workers share (SO_REUSEPORT)
        self.foreign_listeners: dict[int, ForeignListener] = {}  # by socket inode, seen twice in a row
        self._suspects: set[int] = set()

    # --- readiness ------------------------------------------------------------------------------

    def ready(self) -> bool:
        return (
            not self._stopping.is_set()
            and not self.foreign_listeners
            and all(w.alive() and w.state.value == READY for w in self._workers)
        )

    def status(self) -> list[dict[str, object]]:
        names = {STARTING: "starting", SERVING: "serving (not ready)", READY: "ready", STOPPED: "stopped"}
        return [
            {
                "worker": w.index,
                "pid": w.process.pid if w.process else None,
                "alive": alive,
                "state": names.get(w.state.value, "?"),
                "restarts": w.restarts,
                "policy_sha256": self._policy_of(w, alive) or None,
            }
            for w, alive in ((w, w.alive()) for w in self._workers)
        ]

    @staticmethod
    def _policy_of(worker: _Worker, alive: bool) -> str:
        """What a worker serves; a dead one's array is not read (a lock it died holding would cost
        each read a wait) and it serves none."""
        return worker.served_policy() if alive else ""

    def policies(self) -> dict[str, int]:
        """sha256 -> how many live workers serve that policy (see ``policies_served``)."""
        return policies_served(
            (self._policy_of(w, alive), alive) for w, alive in ((w, w.alive()) for w in self._workers)
        )

    def policy_in_force(self) -> str | None:
        """The sha256 of the policy every worker serves; None while they differ (or one serves none)."""
        return policy_in_force(self.policies(), len(self._workers))

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        from .policy import load_policy_file

        load_policy_file(self.settings.policy)  # PolicyError propagates: exit 2 before any fork
        # Signals first: a SIGTERM while workers start must stop them, not orphan them.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        self._metrics_dir = tempfile.mkdtemp(prefix="authz-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # inherited by spawned workers
        try:
            worker_settings = self.settings
            for kind, port in doors.enabled(self.settings):  # each door's port, reserved and watched alike
                reservation = kind.listener.reserve(self.settings.grpc_host, port, share=True)
                self._reservations.append(reservation)
                shared = reservation.getsockname()[1]
                self.door_ports[kind.name] = shared
                self.shared_ports.append((kind.listener, shared))
                worker_settings = dataclasses.replace(worker_settings, **{kind.port_option: shared})
            for worker in self._workers:
                self._start(worker, worker_settings)
            failed = await self._wait_started()
            if failed is not None:
                await self._stop_workers()
                return failed
            if self._stopping.is_set():
                await self._stop_workers()
                return 0
            await self._serve_http()
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                log.warning(
                    "running as root with --workers: any root process in the Pod's network namespace "
                    "can join a shared port's SO_REUSEPORT group and answer Checks; run authz-service as "
                    "its own non-root UID (docs/security.md)",
                    extra={"shared_ports": [port for _, port in self.shared_ports]},
                )
            log.info(
                "authz-service started",
                extra={
                    "version": __version__,
                    **door_addresses(self.settings, self.door_ports),
                    "http": ports.host_port(self.settings.http_host, self.http_port),
                    "workers": len(self._workers),
                    "pids": [w.process.pid for w in self._workers],
                    "tracing": describe(self.settings.tracing),
                },
            )
            await self._watch(worker_settings)
            log.info("shutting down", extra={"workers": len(self._workers)})
            await self._stop_workers()
            await self._http.stop()
            return 0
        finally:
            for reservation in self._reservations:
                reservation.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _start(self, worker: _Worker, settings: Settings) -> None:
        worker.new_life()
        worker.process = self._ctx.Process(
            target=worker_main,
            args=(settings, worker.index, worker.state, self.settings.log_level, worker.mismatches, worker.policy),
            name=f"authz-worker-{worker.index}",
            daemon=False,
        )
        worker.process.start()

    async def _wait_started(self) -> int | None:
        """None when every worker serves; else the exit code the parent should exit with."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for w in self._workers:
                if not w.process.is_alive():
                    code = w.process.exitcode or 1
                    log.error("worker failed to start", extra={"worker": w.index, "exit_code": w.process.exitcode})
                    print(
                        f"authz-service: error: worker {w.index} failed to start (exit code "
                        f"{w.process.exitcode}); see its log above",
                        file=sys.stderr,
                    )
                    return code if code > 0 else 2
            if all(w.state.value in (SERVING, READY) for w in self._workers) or self._stopping.is_set():
                return None
            await asyncio.sleep(0.05)
        print(f"authz-service: error: workers did not start within {START_TIMEOUT:g}s", file=sys.stderr)
        return 2

    async def _watch(self, settings: Settings) -> None:
        """Until SIGTERM: restart any worker that exits (its counters stay in the metrics view)."""
        from prometheus_client import multiprocess

        next_port_check = 0.0
        while not self._stopping.is_set():
            if time.monotonic() >= next_port_check:
                self._check_port_owners()
                next_port_check = time.monotonic() + PORT_CHECK_INTERVAL
            for w in self._workers:
                if w.process is not None and not w.process.is_alive():
                    log.error(
                        "worker exited; restarting it",
                        extra={"worker": w.index, "pid": w.process.pid, "exit_code": w.process.exitcode},
                    )
                    multiprocess.mark_process_dead(w.process.pid, self._metrics_dir)
                    w.process.join(0)
                    w.restarts += 1
                    await asyncio.sleep(RESTART_DELAY)  # no tight loop if it keeps failing
                    if self._stopping.is_set():
                        return
                    self._start(w, settings)
            await set_within(self._stopping, 0.2)

    def _check_port_owners(self) -> None:
        """Find listening sockets on a shared port that no worker holds: another process of our UID
        (or root) that joined the SO_REUSEPORT group and receives a share of Envoy's Checks.
        Listed first, then our workers' sockets, so a worker starting in between is not a suspect;
        a suspect must be seen twice in a row (a worker that died in between is gone by then)."""
        listeners = {
            inode: (listener, port, uid)
            for listener, port in self.shared_ports
            for inode, uid in port_listeners(port).items()
        }
        ours = set().union(*(socket_inodes(w.process.pid) for w in self._workers if w.process is not None))
        suspects = listeners.keys() - ours
        foreign = {inode: ForeignListener(*listeners[inode], inode) for inode in suspects & self._suspects}
        self._suspects = suspects
        for inode, found in foreign.items():
            if inode not in self.foreign_listeners:
                log.error(
                    f"another process listens on the {found.listener.what} port and receives a share of "
                    "Envoy's Checks (SO_REUSEPORT); not ready until it is gone. Run every container of the "
                    "Pod as its own non-root UID (docs/security.md)",
                    extra={"port": found.port, "uid": found.uid, "socket_inode": inode},
                )
        for inode, gone in self.foreign_listeners.items():
            if inode not in foreign:
                log.info(
                    f"the foreign listener on the {gone.listener.what} port is gone",
                    extra={"port": gone.port, "socket_inode": inode},
                )
        self.foreign_listeners = foreign

    def _forward(self, sig: int) -> None:
        for w in self._workers:
            if w.alive():
                os.kill(w.process.pid, sig)

    async def _stop_workers(self) -> None:
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + STOP_MARGIN
        while time.monotonic() < deadline and any(w.alive() for w in self._workers):
            await asyncio.sleep(0.05)
        for w in self._workers:
            if w.alive():
                log.error("worker did not stop in time; killing it", extra={"worker": w.index})
                w.process.kill()
            if w.process is not None:
                w.process.join(1)

    # --- HTTP: health and the aggregated metrics ---------------------------------------------------

    async def _serve_http(self) -> None:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

        from .admin import AdminServer, CachedExposition

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)
        registry.register(PolicyWorkers(self.policies))

        async def exposition() -> bytes:
            # Reading every worker's files takes a while: off the event loop.
            return await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)

        async def openmetrics() -> bytes:
            # The same samples; prometheus-client keeps no exemplars in multiprocess mode.
            return await asyncio.get_running_loop().run_in_executor(None, generate_openmetrics, registry)

        def readiness() -> tuple[bool, dict[str, object]]:
            body: dict[str, object] = {
                "policy": {"sha256": self.policy_in_force(), "workers": self.policies()},
                "workers": self.status(),
                "foreign_listeners": [f.status() for f in self.foreign_listeners.values()],
            }
            for kind, _ in doors.enabled(self.settings):
                if kind.status is not None:
                    body[kind.name] = kind.status(self.settings, sum(w.mismatches.value for w in self._workers))
            return self.ready(), body

        interval = self.settings.metrics_min_interval
        self._http = AdminServer(
            readiness, CachedExposition(exposition, interval), CachedExposition(openmetrics, interval)
        )
        try:
            self.http_port = await self._http.start(self.settings.http_host, self.settings.http_port)
        except OSError:
            await self._stop_workers()
            raise


def policies_served(workers: Iterable[tuple[str, bool]]) -> dict[str, int]:
    """sha256 -> how many live workers serve that policy, from each worker's (sha256 of the policy
    it serves, "" before its first; alive). Each worker loads the file on its own, so just after a
    change two show, until the last worker's reload has run."""
    served: dict[str, int] = {}
    for sha256, alive in workers:
        if sha256 and alive:
            served[sha256] = served.get(sha256, 0) + 1
    return served


def policy_in_force(served: dict[str, int], workers: int) -> str | None:
    """The policy all ``workers`` serve (``policies_served``); None while they differ, or while one
    serves none (starting, dead)."""
    if len(served) == 1:
        ((sha256, count),) = served.items()
        if count == workers:
            return sha256
    return None


class PolicyWorkers:
    """``authz_policy_workers{sha256}`` in the parent's /metrics: live workers per policy, read from
    the workers' shared state at each scrape (a rollout waits until the new sha256 counts them all)."""

    def __init__(self, policies: Callable[[], dict[str, int]]) -> None:
        self._policies = policies

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            POLICY_WORKERS,
            "Worker processes (--workers) serving each policy, by its sha256: all serve the new policy "
            "once its count is the number of workers.",
            labels=["sha256"],
        )
        for sha256, count in sorted(self._policies().items()):
            family.add_metric([sha256], count)
        yield family


async def supervise(settings: Settings) -> int:
    return await Supervisor(settings).run()
