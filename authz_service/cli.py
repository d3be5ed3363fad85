"""`authz-service` command line: serve, dev-issuer, and the policy tools validate, explain, test, audit.

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
                             "unless the config sets issuer_format (default http://<host>:<port>)")
    issuer.add_argument("--log-level", default="INFO")
    _add_policy_tools(commands)
    return parser


def _add_policy_tools(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """validate / explain / test: the policy authors' tools (logic in policytool.py and explain.py)."""
    validate = commands.add_parser(
        "validate", help="check policy files as the server loads them, plus lint warnings (for CI)",
        description="Load each policy file exactly as the server would and report every error (file:line:column, "
                    "place, fix) and every warning. Exit 1 when a file is refused (or has warnings with --strict).")
    validate.add_argument("policies", nargs="+", type=Path, metavar="POLICY")
    validate.add_argument("--strict", action="store_true", help="warnings also make the exit code 1")
    validate.add_argument("--explain-issuers", action="store_true",
                          help="list what each issuers entry accepts: the exact iss values and their JWKS URLs")

    explain = commands.add_parser(
        "explain", help="show which route matches a request, why, and the exact answer Envoy would get",
        description="Run one request through the real matcher, decision and response code. Without --token a "
                    "verified token holding --scopes (and --client-id) is simulated; with --token the token is "
                    "verified for real (its issuer's JWKS is fetched).")
    explain.add_argument("--policy", type=Path, required=True)
    explain.add_argument("--method", required=True)
    explain.add_argument("--path", required=True)
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--scopes", help='simulate a valid token holding these scopes (space separated: "a/b c/d")')
    who.add_argument("--token", help="a real access token to verify (prefer --token-file: shell history)")
    who.add_argument("--token-file", help="read the real token from this file ('-' for stdin)")
    explain.add_argument("--client-id", help="client_id of the simulated token")
    explain.add_argument("--claim", action="append", dest="claims", metavar="NAME=VALUE",
                         help="a custom claim of the simulated token (repeatable); VALUE is JSON when it parses "
                              "as JSON (3, true, [\"a\"]), else a string")
    explain.add_argument("--issuer", help="iss of the simulated token (default: the policy's first issuer)")
    explain.add_argument("--realm", default="authz-service", help="realm in WWW-Authenticate (as --realm of serve)")
    explain.add_argument("--leeway", type=float, default=60.0, help="clock skew for a real token (as serve)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    test = commands.add_parser(
        "test", help="run table-driven expectations (method, path, scopes -> decision) against a policy",
        description="Each case in TESTS is sent through the real request -> decision -> response path with a "
                    "token holding exactly its scopes. Exit 0 when all pass, 1 when one fails, 2 on unusable files.")
    test.add_argument("policy", type=Path, metavar="POLICY")
    test.add_argument("tests", type=Path, metavar="TESTS")

    audit = commands.add_parser(
        "audit", help="check a policy against its Cognito user pools through the AWS API (needs boto3)",
        description="Read each user pool (DescribeUserPool, ListResourceServers, ListUserPoolClients, "
                    "DescribeUserPoolClient; standard AWS credential chain), print which app client can reach "
                    "which route and report what cannot work. Exit 0 when clean, 1 with findings, 2 when the "
                    "policy or AWS cannot be used. Install with: pip install 'authz-service[audit]'.")
    audit.add_argument("--policy", type=Path, required=True)
    audit.add_argument("--user-pool-id", action="append", metavar="ID",
                       help="audit this pool of the policy (repeatable; default: every pool of the policy)")
    audit.add_argument("--region", help="AWS region of the pools (default: the region in each pool id)")
    audit.add_argument("--format", choices=("text", "json"), default="text")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("validate", "explain", "test", "audit"):
        return _policy_tool(args)
    return _dev_issuer(args)


def _policy_tool(args: argparse.Namespace) -> int:
    if args.command == "validate":
        from .policytool import validate_command

        return validate_command(args.policies, args.strict, sys.stdout, args.explain_issuers)
    if args.command == "test":
        from .policytool import tests_command

        return tests_command(args.policy, args.tests, sys.stdout)
    if args.command == "audit":
        from .audit import audit_command

        return audit_command(args, sys.stdout)
    from .explain import explain_command

    return explain_command(args, sys.stdout)


def _serve(args: argparse.Namespace) -> int:
    from .server import run, serve

    try:
        settings = settings_from({o.name: getattr(args, o.name) for o in OPTIONS})
    except ConfigError as exc:
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        if settings.workers > 1:
            from .workers import supervise

            return run(supervise(settings), settings.event_loop)
        run(serve(settings), settings.event_loop)
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
