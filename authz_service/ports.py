"""The service's listening ports, and the one message a port that cannot be bound gets.

Why a module: four places bind ports (the gRPC and HTTP front doors, the admin server, the
``--workers`` parent's reservations) and an operator reading a failed start-up needs the same
answer from each: which address, why, and which setting to change.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from .config import option


def host_port(host: str, port: int | None) -> str:
    """``host:port`` as Envoy's configs and clients write it: an IPv6 address in brackets
    (``[::1]:9191``; ``::1:9191`` reads as another address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Listener:
    """One kind of listening port: how it is named and which settings choose its address."""

    what: str  # "gRPC", as in "the gRPC port"
    host_setting: str  # how to change the address, e.g. "--grpc-host / AUTHZ_GRPC_HOST"
    port_setting: str

    def error(self, host: str, port: int, cause: OSError | None = None) -> OSError:
        """``cannot bind the gRPC port 127.0.0.1:9191 (Address already in use): set --grpc-port / ...``.

        The setting named is the port's when the port is taken, the host's when the address is
        not this host's, and both when the cause is unknown (grpcio does not say).
        """
        code = cause.errno if cause is not None else None
        if isinstance(cause, socket.gaierror):  # a name that does not resolve: its own error codes
            reason = cause.strerror or str(cause)
        elif code is not None:
            reason = os.strerror(code)  # not aiohttp's wordy "error while attempting to bind on ..."
        elif cause is not None:
            reason = str(cause)
        else:
            reason = "in use, or not an address of this host"
        if code == errno.EADDRINUSE or code == errno.EACCES:
            fix = self.port_setting
        elif cause is not None:
            fix = self.host_setting
        else:
            fix = f"{self.port_setting} (or {self.host_setting})"
        return OSError(f"cannot bind the {self.what} port {host_port(host, port)} ({reason}): set {fix}")

    def reserve(self, host: str, port: int, *, share: bool) -> socket.socket:
        """A socket bound (not listening) to host:port; OSError (``error``) when it cannot be.

        ``share``: with SO_REUSEPORT, the ``--workers`` parent's reservation that its workers join.
        Without it, SO_REUSEADDR only, as grpcio binds: a probe that fails exactly when the
        server's bind would, before grpcio gets to log its own bind failure on stderr.
        """
        try:  # a name (localhost) or an address of either family, as the server would resolve it
            family, kind, proto, _, address = socket.getaddrinfo(
                host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except OSError as exc:
            raise self.error(host, port, exc) from None
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT if share else socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise self.error(host, port, exc) from None
        return sock


def _setting(name: str) -> str:
    found = option(name)
    return f"{found.flag} / {found.env}"


GRPC = Listener("gRPC", _setting("grpc_host"), _setting("grpc_port"))
EXT_AUTHZ_HTTP = Listener("HTTP ext_authz", _setting("grpc_host"), _setting("ext_authz_http_port"))
ADMIN = Listener("HTTP (health/metrics)", _setting("http_host"), _setting("http_port"))
DEV_ISSUER = Listener("dev issuer", "--host", "--port")
