"""The options of ``authz-service compile envoy`` (imported by the CLI parser, so kept light)."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from .options import Address, Options, parse_address

ADDRESS_FLAGS = {  # flag -> (Options field, what is there)
    "--listen": ("listen", "where Envoy serves the app's clients"),
    "--admin": ("admin", "Envoy's admin interface (keep it on loopback)"),
    "--app": ("app", "the protected application"),
    "--service-grpc": ("service_grpc", "authz-service's ext_authz gRPC port (routes it decides)"),
    "--service-http": ("service_http", "authz-service's HTTP port (--http-port), which serves Envoy the JWKS"),
    "--health": ("health", "Envoy's probe and metrics listener"),
}
# What only the ingress listener reads: with --xds-dir the service writes that listener, and these
# are its settings (serve's --native-listen, --realm, --leeway, --native-jwks-cache, ...).
LISTENER_FLAGS = {  # flag -> the serve flag that sets it in the xDS form
    "--listen": "--native-listen",
    "--realm": "--realm",
    "--leeway": "--leeway",
    "--jwks-cache": "--native-jwks-cache",
    "--jwt-cache-size": "--native-jwt-cache-size",
    "--no-decision-stats": None,
}
# The service's settings a compiled Envoy must agree with, read from serve's own variables when
# the flag is not given: compile envoy run where the service is configured answers as it does.
# In the xDS form the listener's are serve's to write; the heap cap is the bootstrap's.
SERVE_SETTINGS = {  # flag -> serve's setting (config.OPTIONS), whose AUTHZ_* variable it reads
    "--listen": "native_listen",
    "--realm": "realm",
    "--leeway": "leeway",
    "--jwks-cache": "native_jwks_cache",
    "--jwt-cache-size": "native_jwt_cache_size",
    "--heap-cap": "native_heap_cap",
}


# Where Envoy reaches the service: serve's door, by its (host, port) settings. A host serve binds
# as 0.0.0.0 or :: is reached on loopback.
SERVE_DOORS = {"--service-grpc": ("grpc_host", "grpc_port"), "--service-http": ("http_host", "http_port")}


def from_serve(flag: str) -> str:
    """Where a flag not given comes from, for its help: serve's variable."""
    return f"$AUTHZ_{SERVE_SETTINGS[flag].upper()} as serve reads it, else "


def add_arguments(envoy: argparse.ArgumentParser) -> None:
    defaults = Options()
    for flag, (name, what) in ADDRESS_FLAGS.items():
        default = getattr(defaults, name)
        if flag in SERVE_DOORS:  # None: not given, then serve's variables, else the default
            host, port = (f"$AUTHZ_{name.upper()}" for name in SERVE_DOORS[flag])
            envoy.add_argument(
                flag,
                metavar="IP:PORT",
                type=_address,
                help=f"{what} (default {host}:{port} as serve reads them "
                f"when either is set, 0.0.0.0 and :: read as loopback, else {default})",
            )
        elif flag in LISTENER_FLAGS:  # None: not given (refused with --xds-dir), else the default
            envoy.add_argument(
                flag, metavar="IP:PORT", type=_address, help=f"{what} (default {from_serve(flag)}{default})"
            )
        else:
            envoy.add_argument(flag, metavar="IP:PORT", type=_address, default=default, help=what)
    envoy.add_argument(
        "--realm",
        help=f"as serve's --realm (part of every 401 challenge; default {from_serve('--realm')}{defaults.realm})",
    )
    envoy.add_argument(
        "--leeway",
        type=_whole_seconds,
        help="as serve's --leeway, in whole seconds, at least 2 (default $AUTHZ_LEEWAY as serve reads it, "
        f"rounded down, else {defaults.leeway})",
    )
    envoy.add_argument(
        "--jwks-cache",
        type=_whole_seconds,
        metavar="SECONDS",
        help="seconds between Envoy's fetches of the keys the service holds (default "
        f"{from_serve('--jwks-cache')}{defaults.jwks_cache_seconds})",
    )
    envoy.add_argument(
        "--jwt-cache-size",
        type=int,
        metavar="N",
        help="verified tokens jwt_authn keeps per Envoy worker, 0 for none (see docs/native.md on removed keys; "
        f"default {from_serve('--jwt-cache-size')}{defaults.jwt_cache_size})",
    )
    envoy.add_argument(
        "--heap-cap",
        type=int,
        metavar="MIB",
        help=f"Envoy's heap cap in MiB (overload manager; default {from_serve('--heap-cap')}envoy/envoy.yaml's "
        "160): a policy whose expected heap would reach its first overload action is refused; give the Envoy "
        "container the cap + 96 MiB",
    )
    envoy.add_argument(
        "--no-decision-stats",
        action="store_true",
        default=None,
        help="leave out the stats of native decisions (envoy_authz_native_decisions), which need Envoy 1.39 or newer",
    )
    envoy.add_argument(
        "--xds-dir",
        type=PurePosixPath,
        metavar="DIR",
        help="print native mode's xDS bootstrap instead: Envoy's ingress listener is the file that "
        "`serve --native-xds-dir DIR` writes there and rewrites at each policy change (no POLICY then; a "
        "relative DIR is made absolute against the current directory: Envoy would read it against its own)",
    )
    envoy.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="write the bootstrap to FILE (atomically) instead of standard output",
    )
    envoy.add_argument(
        "--report",
        choices=("text", "json", "none"),
        default="text",
        help="what goes to standard error: the engine of each route as text, as JSON, or nothing",
    )


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _whole_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number of seconds")
    return value
