"""What ``compile envoy`` is told: where the compiled Envoy listens and what it calls, and the
service settings its native answers must agree with.

The address defaults are envoy/envoy.yaml's, so a compiled bootstrap drops into the same Pod.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

MIN_HEAP_CAP_MIB = 64
# Envoy reads max_heap_size_bytes as an unsigned 64-bit number: a larger cap would not start it.
MAX_HEAP_CAP_MIB = (2**64 - 1) // (1 << 20)
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d{1,5})\Z")


@dataclass(frozen=True, slots=True)
class Address:
    """An IP address and a port (Envoy binds listeners to addresses and its static clusters name
    addresses, not host names)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def socket_address(self) -> dict[str, Any]:
        return {"address": self.host, "port_value": self.port}

    @property
    def unspecified(self) -> bool:
        """0.0.0.0 or ::: fine to listen on, not an address to connect to."""
        return ipaddress.ip_address(self.host).is_unspecified


def parse_address(text: str) -> Address:
    """``IP:PORT`` (``[::1]:9191`` for IPv6); ValueError saying what is expected."""
    match = _ADDRESS.match(text)
    port = int(match["port"]) if match else -1
    host = (match["v6"] or match["v4"]) if match else ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        match = None
    if match is None or not 0 < port <= 65535:
        raise ValueError(
            "expected IP:PORT with a port 1..65535, e.g. 127.0.0.1:9191 or [::1]:9191 "
            "(an address: Envoy's listeners and static clusters take no host names)"
        )
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class Options:
    """Addresses (envoy/envoy.yaml's by default) and the service settings the answers depend on."""

    listen: Address = Address("0.0.0.0", 8080)
    admin: Address = Address("127.0.0.1", 9901)
    app: Address = Address("127.0.0.1", 8000)
    service_grpc: Address = Address("127.0.0.1", 9191)  # the service's ext_authz gRPC door (fallback routes)
    service_http: Address = Address("127.0.0.1", 8181)  # the service's HTTP port (the JWKS it serves Envoy)
    health: Address = Address("0.0.0.0", 9902)
    realm: str = "authz-service"  # the service's --realm: part of every 401 challenge
    leeway: int = 60  # the service's --leeway, whole seconds
    jwks_cache_seconds: int = 5  # how often Envoy fetches the service's current JWKS
    jwt_cache_size: int = 10_000  # verified tokens jwt_authn keeps per worker (0: none)
    decision_stats: bool = True  # count native decisions as Envoy stats (decisions.py; Envoy >= 1.39)
    heap_cap_mib: int | None = None  # Envoy's heap cap (overload manager); None: envoy/envoy.yaml's


def heap_cap_refusal(mib: int) -> str | None:
    """Why Envoy cannot run with a heap cap of ``mib`` MiB (None: it can), for the option's own
    error: ``compile envoy --heap-cap`` and ``serve --native-heap-cap`` alike."""
    if mib < MIN_HEAP_CAP_MIB:
        return f"at least {MIN_HEAP_CAP_MIB} MiB (Envoy's own heap, with no policy and no connections, is ~11 MB)"
    if mib > MAX_HEAP_CAP_MIB:
        return f"at most {MAX_HEAP_CAP_MIB} MiB (Envoy reads the cap as a 64-bit count of bytes)"
    return None
