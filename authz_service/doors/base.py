"""The front-door seam: what every door is to the service (``FrontDoor``) and how the settings
choose and build the doors (``DoorKind``).

Why: the service (server.Service) and the ``--workers`` parent (workers.Supervisor) treat every
door alike by looping over ``doors.enabled(settings)``: each door starts on its host and port
(sharing it with SO_REUSEPORT in a worker), is told when readiness changes, drains on shutdown
within the grace period, and, with ``--workers``, has its port reserved by the parent and watched
for foreign listeners. A new door is one module beside grpc.py and http.py and one entry in
``doors.KINDS``; nothing else changes.

Every door hands its requests to the one ``check.Checker`` (building them with
``request.http_request``) and renders its answers; it decides nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import ports
from ..check import Checker
from ..config import Settings

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..tracing import CheckSpanKind


class FrontDoor(Protocol):
    """One running front door (built by its ``DoorKind.build``)."""

    span_kind: CheckSpanKind  # how its Check spans are named (tracing on)

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Bind host:port and serve; the bound port (``port`` 0 picks one). ``reuse_port``: join the
        SO_REUSEPORT group the ``--workers`` parent reserved; without it, a port in use is an
        error. A failure is the listener's OSError (the address and the setting to change), with
        nothing left running."""
        ...

    async def set_ready(self, ready: bool) -> None:
        """Readiness changed (a door whose protocol has health checks of its own reports it)."""
        ...

    async def stop(self) -> None:
        """Stop accepting; requests in flight get the shutdown grace period to finish; then close.
        Safe on a door that never started."""
        ...

    @property
    def refused(self) -> int:
        """Requests refused because Envoy's configuration does not match this door's (for /readyz)."""
        ...


@dataclass(frozen=True, slots=True)
class Wiring:
    """What the service hands each door it builds."""

    checker: Checker
    settings: Settings
    metrics: Metrics
    on_refused: Callable[[], None] | None = None  # a ``--workers`` worker's count for the parent's /readyz


@dataclass(frozen=True, slots=True)
class DoorKind:
    """A kind of front door: how the settings turn it on and which port it takes."""

    name: str  # its key in the start-up log line and in /readyz
    listener: ports.Listener  # names its port in errors; the --workers parent watches that port
    port_option: str  # the Settings field of its port (its host is --grpc-host for every door)
    build: Callable[[Wiring], FrontDoor]
    optional: bool = False  # port 0 turns it off (else port 0 picks a free port)
    # Its /readyz entry from the settings and the requests refused as misconfigured (summed over
    # the workers in the --workers parent); None: it has none.
    status: Callable[[Settings, int], dict[str, object]] | None = None

    def port(self, settings: Settings) -> int | None:
        """The port the settings give this door; None when they turn it off."""
        port: int = getattr(settings, self.port_option)
        return None if self.optional and not port else port
