"""`authz-service` command line: serve, dev-issuer.

Every `serve` flag has an AUTHZ_* environment variable (see config.OPTIONS); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, logs
from .config import OPTIONS, ConfigError, settings_from
from .policy import PolicyError

log = logging.getLogger("authz_service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy ext_authz sidecar for Amazon Cognito machine-to-machine access tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ext_authz gRPC server",
                                description="Run the ext_authz gRPC server and the HTTP health/metrics server.")
    for option in OPTIONS:
        default = "required" if option.default is None else option.default
        serve.add_argument(option.flag, dest=option.name, default=None, metavar=option.name.split("_")[-1].upper(),
                           help=f"{option.help} Env: {option.env}. Default: {default}.".replace("%", "%%"))

    issuer = commands.add_parser("dev-issuer", help="run a local Cognito-style token issuer (development only)",
                                 description="Serve a JWKS and a Cognito-style /oauth2/token (client_credentials) "
                                             "for local development and tests. Not for production.")
    issuer.add_argument("--config", type=Path, required=True, help="dev issuer YAML (pool, resource servers, clients)")
    issuer.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    issuer.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    issuer.add_argument("--public-url", default=None,
                        help="base URL clients use to reach the issuer; the token iss is <public-url>/<pool id> "
                             "(default http://<host>:<port>)")
    issuer.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _dev_issuer(args)


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    try:
        settings = settings_from({o.name: getattr(args, o.name) for o in OPTIONS})
    except ConfigError as exc:
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        if settings.workers > 1:
            from .workers import supervise

            return asyncio.run(supervise(settings))
        asyncio.run(serve(settings))
    except PolicyError as exc:
        log.error("policy file refused; not starting", extra={"error": str(exc)})
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _dev_issuer(args: argparse.Namespace) -> int:
    from .dev_issuer import DevIssuerConfigError, load_config, serve

    logs.configure(args.log_level.upper())
    try:
        config = load_config(args.config)
    except DevIssuerConfigError as exc:
        print(f"authz-service dev-issuer: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.host, args.port, args.public_url))
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError) as exc:
        print(f"authz-service dev-issuer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
