"""The options of ``authz-service compile envoy`` (imported by the CLI parser, so kept light)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import Address, Options, parse_address

ADDRESS_FLAGS = {  # flag -> (Options field, what is there)
    "--listen": ("listen", "where Envoy serves the app's clients"),
    "--admin": ("admin", "Envoy's admin interface (keep it on loopback)"),
    "--app": ("app", "the protected application"),
    "--service-grpc": ("service_grpc", "authz-service's ext_authz gRPC port (routes it decides)"),
    "--service-http": ("service_http", "authz-service's HTTP port (--http-port), which serves Envoy the JWKS"),
    "--health": ("health", "Envoy's probe and metrics listener"),
}


def add_arguments(envoy: argparse.ArgumentParser) -> None:
    defaults = Options()
    for flag, (name, what) in ADDRESS_FLAGS.items():
        envoy.add_argument(flag, metavar="IP:PORT", type=_address, default=getattr(defaults, name), help=what)
    envoy.add_argument("--realm", default=defaults.realm, help="as serve's --realm (part of every 401 challenge)")
    envoy.add_argument(
        "--leeway",
        type=_whole_seconds,
        default=defaults.leeway,
        help="as serve's --leeway, in whole seconds, at least 2",
    )
    envoy.add_argument(
        "--jwks-cache",
        type=_whole_seconds,
        default=defaults.jwks_cache_seconds,
        metavar="SECONDS",
        help="seconds between Envoy's fetches of the keys the service holds",
    )
    envoy.add_argument(
        "--jwt-cache-size",
        type=int,
        default=defaults.jwt_cache_size,
        metavar="N",
        help="verified tokens jwt_authn keeps per Envoy worker, 0 for none (see docs/native.md on removed keys)",
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
