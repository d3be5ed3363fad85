"""The front doors: how Envoy's authorization requests reach the one ``check.Checker``.

One module per protocol (``grpc``: Envoy's ext_authz gRPC ``Authorization/Check``; ``http``: its
HTTP ext_authz mode), each implementing ``base.FrontDoor``, so the service starts, drains and
guards every door with the same code.
"""

from __future__ import annotations

from ..config import Settings
from .base import DoorKind
from .grpc import GRPC
from .http import EXT_AUTHZ_HTTP

KINDS: tuple[DoorKind, ...] = (GRPC, EXT_AUTHZ_HTTP)


def enabled(settings: Settings) -> list[tuple[DoorKind, int]]:
    """The doors the settings turn on, each with its configured port (0: any free port)."""
    return [(kind, port) for kind in KINDS if (port := kind.port(settings)) is not None]
