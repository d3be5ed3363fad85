"""``serve --native-xds-dir DIR``: the service as Envoy's local control plane.

Every policy the service loads is compiled into Envoy's ingress listener, and the listener is
written into DIR (xds.py), where Envoy, started once on ``compile envoy --xds-dir DIR``'s
bootstrap, picks it up without a restart. So a ConfigMap change reaches the service and Envoy
alike. Keys need no write: Envoy fetches them from the service's ``/jwks`` every
``--native-jwks-cache`` seconds, so a key rotation reaches Envoy without a new listener (a new
listener would drain Envoy's connections, a key fetch does not).

Why a sibling of the front doors rather than one of them (doors/base.py): a door answers Checks
on a port, shares it with ``--workers`` and drains requests; this answers nothing and binds no
port. What it shares with them is the lifecycle, driven by ``server.Service``: built from the
settings, started before the service is reachable, told of every policy change, reported in
``/readyz`` and in readiness, stopped with the service. And it has a say in what a policy load
is: the service loads a policy through ``load``, which compiles it too, so a policy that cannot
be compiled is refused exactly as one that cannot be parsed (the previous policy keeps serving,
in the service and in Envoy alike; ``authz_policy_reloads_total{result="error"}``,
``authz_policy_file_refused``, ``/readyz`` ``last_reload_error``).

Order at start-up: the directory is claimed first (an exclusive lock on its ``.authz-service.lock``,
held for the life of the process: a second service given the same directory is refused before it
writes anything, instead of the two overwriting each other's listener); every port is bound
before the first write, so a service that cannot start leaves Envoy's listener as it was; and the
listener is written before the service's HTTP port accepts, so once ``/healthz`` answers (the
sidecar's startup probe, which gates Envoy's start) the file Envoy needs exists. A write that
fails later (the directory full or read-only) is retried every second; the service is not ready
meanwhile and Envoy keeps the listener it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Settings
from ..metrics import Metrics
from ..policy import Policy, PolicyError, load_policy_file
from ..waiting import set_within
from .bootstrap import compile_policy
from .options import Address, Options
from .plan import Engine
from .sizing import HeapBudget, check_fits
from .xds import LISTENERS_FILE, listener_text, write_atomically

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
LOCK_FILE = ".authz-service.lock"  # in the xDS directory; holds the pid of the process writing there
SETTING = "--native-xds-dir {directory} (AUTHZ_NATIVE_XDS_DIR)"
WRITABLE = "the directory must exist and be writable by the service (Envoy reads it)"  # the fix, in errors


@dataclass(frozen=True, slots=True)
class Listener:
    """A compiled policy, ready to write."""

    sha256: str
    text: str
    engines: dict[str, list[str]]  # engine -> the policy's route names it enforces
    heap: HeapBudget  # Envoy's expected heap on it, against the cap


def options_for(settings: Settings) -> Options:
    """The compile options of the service's own settings (the listener's side of the bootstrap)."""
    return Options(
        listen=settings.native_listen,
        service_grpc=_connectable(settings.grpc_host, settings.grpc_port),
        service_http=_connectable(settings.http_host, settings.http_port),
        realm=settings.realm,
        leeway=int(settings.leeway),  # a whole number in native mode (config._check_native)
        jwks_cache_seconds=settings.native_jwks_cache,
        jwt_cache_size=settings.native_jwt_cache_size,
        heap_cap_mib=settings.native_heap_cap,
    )


def _connectable(host: str, port: int) -> Address:
    """Where Envoy, in the same Pod, reaches a port the service binds on ``host``."""
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            return Address(host, port)
    except ValueError:  # a host name: the listener names addresses only
        pass
    return Address("127.0.0.1", port)


class NativeControlPlane:
    """Compiles each policy the service loads and keeps its listener in the xDS directory."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.native_xds_dir is not None
        self.directory = settings.native_xds_dir
        self.path = self.directory / LISTENERS_FILE
        self.options = options_for(settings)
        self._metrics = metrics
        self._prepared: Listener | None = None  # the last policy ``load`` compiled
        self._wanted: Listener | None = None  # the serving policy's
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.written_sha256: str | None = None
        self.written_at: float | None = None
        self.last_error: str | None = None
        self._lock: int | None = None  # the descriptor holding the directory's lock
        self._written_file: tuple[int, int, int, int] | None = None  # the file as written (``_identity``)
        self._recheck_seconds = settings.policy_poll_interval
        metrics.native_enabled()

    def claim(self) -> None:
        """Take the directory's lock for the life of the process, before anything is written: two
        processes writing one directory would each overwrite the other's listener, and Envoy would
        enforce whichever policy was written last. OSError naming the setting when it is held."""
        path = self.directory / LOCK_FILE
        setting = SETTING.format(directory=self.directory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OSError(f"{setting}: cannot create {path}: {exc.strerror or exc}; {WRITABLE}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise OSError(f"{setting}: cannot lock {path}: {exc.strerror or exc}") from None
            raise OSError(
                f"{setting}: another authz-service (pid {holder or 'unknown'}) writes Envoy's listener "
                f"there (it holds {path}); give each service a directory of its own, or stop the other first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    # --- the policy loads (a worker thread: the reloader's loader, and start-up's) ---------------

    def load(self, path: Path) -> Policy:
        """Load the policy file and compile it; PolicyError for either failure."""
        policy = load_policy_file(path)
        self._prepared = self._compile(policy)
        return policy

    def _compile(self, policy: Policy) -> Listener:
        try:
            compiled = compile_policy(policy, self.options)
            # Envoy holds the old listener beside this one while its connections drain.
            heap = replace(compiled.heap, changing=True)
            check_fits(heap, policy.source, sum(1 for p in compiled.plans if p.engine is Engine.NATIVE))
            text = listener_text(compiled)
        except PolicyError as exc:  # e.g. it would not fit Envoy's heap (sizing.py): said as it is
            raise PolicyError(
                f"{policy.source}: cannot be compiled into Envoy's listener (native mode): {exc}", code=exc.code
            ) from exc
        except Exception as exc:  # whatever stops the compiler refuses the policy
            raise PolicyError(
                f"{policy.source}: cannot be compiled into Envoy's listener (native mode): {type(exc).__name__}: {exc}"
            ) from exc
        engines: dict[str, list[str]] = {engine.value: [] for engine in Engine}
        for plan in compiled.plans:
            engines[plan.engine.value].append(plan.route.name)
        return Listener(policy.sha256, text, engines, heap)

    def _listener(self, policy: Policy) -> Listener:
        prepared = self._prepared
        if prepared is not None and prepared.sha256 == policy.sha256:
            return prepared
        return self._compile(policy)  # a policy loaded otherwise than through ``load``

    # --- lifecycle (the event loop) ----------------------------------------------------------------

    async def start(self, policy: Policy) -> None:
        """Write the serving policy's listener now (OSError naming the setting when it cannot be
        written: the service does not start), then keep it in step with every policy change. The
        service calls it after ``claim`` and after binding every port it serves."""
        self._changed = asyncio.Event()
        self._wanted = await asyncio.to_thread(self._listener, policy)
        await asyncio.to_thread(self._write, self._wanted)
        self._task = asyncio.create_task(self._keep_written(), name="native-xds")

    def policy_changed(self, policy: Policy) -> None:
        """A new policy serves (the reloader swapped it in): its listener is written next."""
        self._wanted = self._listener(policy)
        if self._changed is not None:
            self._changed.set()

    def ready(self) -> bool:
        """The xDS directory holds the serving policy's listener."""
        return self._wanted is not None and self.written_sha256 == self._wanted.sha256

    def status(self) -> dict[str, object]:
        """For /readyz: what Envoy is given, and whether it is the serving policy."""
        wanted = self._wanted
        return {
            "xds_file": str(self.path),
            "written_sha256": self.written_sha256,
            "written_at": self.written_at,
            "last_write_error": self.last_error,
            "routes": wanted.engines if wanted is not None else None,
            "envoy_heap": wanted.heap.report() if wanted is not None else None,
        }

    async def stop(self) -> None:
        """Stop writing and let the directory go; the file stays, so Envoy keeps enforcing the last
        policy written."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def recheck(self) -> None:
        """Write the listener again when the file is no longer the one written (replaced, edited
        or removed by another program): Envoy would enforce that file while the service reports
        its own policy as written. A stat, cheap enough for every policy poll; also on SIGHUP."""
        if self.written_sha256 is None or self._identity() == self._written_file:
            return
        log.warning(
            "native listener file changed by another program; writing the serving policy's again",
            extra={"path": str(self.path), "written_sha256": self.written_sha256},
        )
        self.written_sha256 = None
        if self._changed is not None:
            self._changed.set()

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns

    async def _keep_written(self) -> None:
        """Write the wanted listener whenever it changes, or when the file was changed by another
        program (checked every policy poll interval); after a failure, retry every second until it
        is written or another one is wanted."""
        assert self._changed is not None
        while True:
            await set_within(self._changed, self._recheck_seconds)
            self._changed.clear()
            self.recheck()
            while (listener := self._wanted) is not None and listener.sha256 != self.written_sha256:
                try:
                    await asyncio.to_thread(self._write, listener)
                except OSError:
                    await set_within(self._changed, RETRY_SECONDS)
                    self._changed.clear()

    def _write(self, listener: Listener) -> None:
        started = time.perf_counter()
        try:
            write_atomically(self.path, listener.text)
        except OSError as exc:
            error = f"cannot write {self.path}: {exc.strerror or exc}"
            self._metrics.native_listener_writes.labels("error").inc()
            if error != self.last_error:  # once per failure, not at every retry (the counter counts each)
                log.error(
                    "native listener not written; Envoy keeps the listener it has (retried every second)",
                    extra={"error": error, "sha256": listener.sha256, "written_sha256": self.written_sha256},
                )
            self.last_error = error
            raise OSError(f"{SETTING.format(directory=self.directory)}: {error}; {WRITABLE}") from None
        self.written_sha256, self.written_at, self.last_error = listener.sha256, time.time(), None
        self._written_file = self._identity()
        self._metrics.native_listener_written(listener.sha256, listener.heap.report())
        log.info(
            "native listener written",
            extra={
                "path": str(self.path),
                "sha256": listener.sha256,
                "bytes": len(listener.text),
                "seconds": round(time.perf_counter() - started, 4),
                "routes": {engine: len(names) for engine, names in listener.engines.items()},
                "ext_authz_routes": listener.engines[Engine.EXT_AUTHZ.value],
                "envoy_heap": listener.heap.summary(),
            },
        )
