"""`authz-service` command line: serve, dev-issuer, the policy tools validate, explain, test, audit,
compile (the native fast path), and example and completion (docs/cli.md is generated from this
parser by tools/cli_reference.py).

Every `serve` flag has an AUTHZ_* environment variable (see config.OPTIONS); flags win. Every
command that reads a policy names it the same way: a POLICY argument or --policy, else AUTHZ_POLICY.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from . import __version__, install_hint, logs
from .config import OPTIONS, ConfigError, option, settings_from, unknown_variables
from .policy import PolicyError

log = logging.getLogger("authz_service")

POLICY_ENV = option("policy").env
# `authz-service example NAME` prints a file of the package (package data: pip users get it too).
EXAMPLES = {
    "policy": ("examples/policy.yaml", "a route policy (the demo's)"),
    "policy-schema": ("policy.schema.json", "the policy's JSON Schema for editors: save it beside the policy"),
    "policy-tests": ("examples/policy-tests.yaml", "expectations for that policy, for `authz-service test`"),
    "dev-issuer": ("examples/dev-issuer.yaml", "the dev issuer's configuration (pool, resource servers, clients)"),
}
# An example's first line may point editors at the schema (yaml-language-server): in the package it
# names ../policy.schema.json; printed, the schema it names is the one `example policy-schema` saves
# beside it, so the line resolves outside the package too.
SCHEMA_MODELINE = "# yaml-language-server: $schema="
SHELLS = ("bash", "zsh")
EXIT_CODES = {
    0: "success; serve and dev-issuer: stopped by SIGTERM or SIGINT (serve after draining)",
    1: "a negative answer: validate refused a file (or found warnings, with --strict), a policy test failed, "
    "explain's request would be denied, audit has findings (or warnings, with --strict)",
    2: "the command could not do its work: a usage error, an unusable file or setting, or serve could not start "
    "(then one line on stderr names the flag, environment variable or file to fix)",
}


class UsageError(Exception):
    """A command line that names too little or too much; one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authz-service",
        description="Envoy ext_authz sidecar for Amazon Cognito machine-to-machine access tokens.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_dev_issuer(commands)
    _add_policy_tools(commands)
    _add_compile(commands)
    _add_example(commands)
    _add_completion(commands)
    return parser


def _files(action: argparse.Action) -> argparse.Action:
    """Mark an argument that names a file, for shell completion (see ``completion_script``)."""
    action.completes_files = True  # type: ignore[attr-defined]
    return action


def _policy_positional(parser: argparse.ArgumentParser, many: bool = False) -> None:
    help_text = (
        f"policy files (or --policy; default: ${POLICY_ENV}); '-' reads one from standard input"
        if many
        else f"the policy file (or --policy; default: ${POLICY_ENV})"
    )
    _files(parser.add_argument("policy_args", nargs="*" if many else "?", metavar="POLICY", help=help_text))


def _policy_flag(parser: argparse.ArgumentParser, many: bool = False) -> None:
    help_text = "a policy file, as POLICY" + ("; may be repeated" if many else "")
    _files(parser.add_argument("--policy", action="append" if many else "store", metavar="POLICY", help=help_text))


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the service: the ext_authz front doors and the health/metrics server",
        description="Run the service: its ext_authz front doors (gRPC, and HTTP when --ext-authz-http-port is "
        "set) and the HTTP health/metrics server. Every flag has an AUTHZ_* environment variable.",
    )
    _policy_positional(serve)
    for setting in OPTIONS:
        default = "required" if setting.default is None else setting.default
        action = serve.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{setting.help} Env: {setting.env}. Default: {default}.".replace("%", "%%"),
        )
        if setting.name == "policy":
            _files(action)


def _add_dev_issuer(commands: argparse._SubParsersAction) -> None:
    issuer = commands.add_parser(
        "dev-issuer",
        help="run a local Cognito-style token issuer (development only)",
        description="Serve a JWKS and a Cognito-style /oauth2/token (client_credentials) "
        "for local development and tests, with dev-only helpers: POST /admin/id-token (a user's "
        "ID token, which the sidecar refuses), POST /admin/rotate, GET /admin/health. Not for production.",
    )
    _files(
        issuer.add_argument(
            "--config",
            type=Path,
            required=True,
            help="dev issuer YAML (pool, resource servers, clients); `authz-service example dev-issuer` prints one",
        )
    )
    issuer.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    issuer.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    issuer.add_argument(
        "--public-url",
        default=None,
        help="base URL clients use to reach the issuer; the token iss is <public-url>/<pool id> "
        "unless the config sets issuer_format (default http://<host>:<port>)",
    )
    issuer.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")


def _add_policy_tools(commands: argparse._SubParsersAction) -> None:
    """validate / explain / test: the policy authors' tools (logic in tools/policytool.py and tools/explain.py)."""
    validate = commands.add_parser(
        "validate",
        help="check policy files as the server loads them, plus lint warnings (for CI)",
        description="Load each policy file exactly as the server would and report every error (file:line:column, "
        "place, fix) and every warning. Exit 1 when a file is refused (or has warnings with --strict).",
    )
    _policy_positional(validate, many=True)
    _policy_flag(validate, many=True)
    validate.add_argument("--strict", action="store_true", help="warnings also make the exit code 1")
    validate.add_argument(
        "--explain-issuers",
        action="store_true",
        help="list what each issuers entry accepts: the exact iss values and their JWKS URLs",
    )

    explain = commands.add_parser(
        "explain",
        help="show which route matches a request, why, and the exact answer Envoy would get",
        description="Run one request through the real matcher, decision and response code. Without --token a "
        "verified token holding --scopes (and --client-id) is simulated; with --token the token is "
        "verified for real (its issuer's JWKS is fetched).",
    )
    _policy_positional(explain)
    _policy_flag(explain)
    explain.add_argument("--method", required=True, help="the request's HTTP method, as sent (GET, POST, ...)")
    explain.add_argument("--path", required=True, help="the request's path as Envoy sees it, query included")
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--scopes", help='simulate a valid token holding these scopes (space separated: "a/b c/d")')
    who.add_argument(
        "--token", help="a real access token to verify, with or without 'Bearer ' (prefer --token-file: shell history)"
    )
    _files(who.add_argument("--token-file", help="read the real token from this file ('-' for stdin)"))
    explain.add_argument("--client-id", help="client_id of the simulated token (not with --token or --token-file)")
    explain.add_argument(
        "--claim",
        action="append",
        dest="claims",
        metavar="NAME=VALUE",
        help="a custom claim of the simulated token (repeatable); VALUE is JSON when it parses "
        'as JSON (3, true, ["a"]), else a string',
    )
    explain.add_argument(
        "--issuer",
        help="iss of the simulated token (default: the policy's first issuer) (not with --token or --token-file)",
    )
    # None when not given: then serve's AUTHZ_* variable, as serve parses it (tools/explain.settings_as_serve).
    explain.add_argument(
        "--realm",
        help="realm in WWW-Authenticate, as serve's --realm (default $AUTHZ_REALM as serve reads it, else "
        f"{option('realm').default})",
    )
    explain.add_argument(
        "--leeway",
        help="clock skew for a real token in seconds, as serve's --leeway (default $AUTHZ_LEEWAY as serve reads "
        f"it, else {option('leeway').default:g}); a real token's JWKS fetch follows $AUTHZ_JWKS_TIMEOUT and "
        "$AUTHZ_JWKS_MAX_BYTES",
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    test = commands.add_parser(
        "test",
        help="run table-driven expectations (method, path, scopes -> decision) against a policy",
        description="Each case in TESTS is sent through the real request -> decision -> response path with a "
        "token holding exactly its scopes. Exit 0 when all pass, 1 when one fails, 2 on unusable files.",
    )
    _policy_positional(test)
    _files(
        test.add_argument(
            "tests",
            type=Path,
            metavar="TESTS",
            help="the expectations file (`authz-service example policy-tests` prints one)",
        )
    )
    _policy_flag(test)

    audit = commands.add_parser(
        "audit",
        help="check a policy against its Cognito user pools through the AWS API (needs boto3)",
        description="Read each user pool (DescribeUserPool, ListResourceServers, ListUserPoolClients, "
        "DescribeUserPoolClient, ListUserPoolClientSecrets; standard AWS credential chain), print which "
        "app client can reach which route and report what cannot work. Exit 0 when clean (warnings "
        "allowed unless --strict), 1 with findings, 2 when the policy or AWS cannot be used. Needs the "
        f"audit extra: {install_hint('audit')}.",
    )
    _policy_positional(audit)
    _policy_flag(audit)
    audit.add_argument(
        "--user-pool-id",
        action="append",
        metavar="ID",
        help="audit this pool of the policy (repeatable; default: every pool of the policy)",
    )
    audit.add_argument("--region", help="AWS region of the pools (default: the region in each pool id)")
    audit.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")
    audit.add_argument(
        "--strict", action="store_true", help="exit 1 on warnings too (what the API cannot show to be safe)"
    )


def _add_compile(commands: argparse._SubParsersAction) -> None:
    """compile envoy: the native fast path (logic in authz_service/native/)."""
    from .native.arguments import add_arguments

    compile_ = commands.add_parser(
        "compile",
        help="compile a policy for an enforcer of its own: envoy (jwt_authn + RBAC)",
        description="Compile a policy into another enforcer's configuration. TARGET envoy: a complete Envoy "
        "bootstrap that enforces the policy with Envoy's own filters where they decide exactly as the "
        "service does, and calls the service (ext_authz) for the rest.",
    )
    targets = compile_.add_subparsers(dest="target", required=True, metavar="TARGET", help="envoy (the only target)")
    envoy = targets.add_parser(
        "envoy",
        help="an Envoy bootstrap enforcing the policy natively, the service as fallback",
        description="Print an Envoy (1.40) bootstrap enforcing POLICY: envoy/envoy.yaml's hardened listener, "
        "jwt_authn (keys from the service's HTTP port), RBAC and the service's own answers, with "
        "ext_authz to the service for the routes and requests Envoy's filters cannot decide exactly. "
        "The engine of each route, and why, goes to standard error. Exit 0 when compiled, 2 when the "
        "policy or an option cannot be.",
    )
    _policy_positional(envoy)
    _policy_flag(envoy)
    add_arguments(envoy)


def _add_example(commands: argparse._SubParsersAction) -> None:
    example = commands.add_parser(
        "example",
        help="print a bundled example file (policy, policy tests, dev issuer config)",
        description="Print one of the example files shipped inside the package, to start your own from: "
        + "; ".join(f"{name}: {what}" for name, (_, what) in EXAMPLES.items())
        + ".",
    )
    example.add_argument("name", choices=list(EXAMPLES), metavar="NAME", help=f"which example: {', '.join(EXAMPLES)}")


def _add_completion(commands: argparse._SubParsersAction) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for the shell, e.g. "
        "`authz-service completion bash > /etc/bash_completion.d/authz-service` or, for zsh, "
        '`authz-service completion zsh > "${fpath[1]}/_authz-service"`.',
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=f"the shell: {', '.join(SHELLS)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command they were given to, with its usage (argparse names the top parser)
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("validate", "explain", "test", "audit"):
            return _policy_tool(args)
        if args.command == "compile":
            from .native.command import compile_command

            for variable in unknown_variables():  # compile envoy reads serve's AUTHZ_LEEWAY, AUTHZ_REALM, ...
                print(f"authz-service compile envoy: warning: {variable}", file=sys.stderr)
            return compile_command(_compiled_policy(args), args, sys.stdout, sys.stderr)
        if args.command == "example":
            sys.stdout.write(example_text(args.name))
            return 0
        if args.command == "completion":
            sys.stdout.write(completion_script(args.shell))
            return 0
        return _dev_issuer(args)
    except UsageError as exc:
        prefix = "authz-service" if args.command == "serve" else f"authz-service {args.command}"
        if args.command == "compile":  # as compile_command's own errors: "authz-service compile envoy"
            prefix += f" {args.target}"
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` ran: ``compile envoy``'s own for compile."""
    for name in ("command", "target"):
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        parser = commands.choices[getattr(args, name)]
        if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):  # noqa: SLF001
            break
    return parser


def _compiled_policy(args: argparse.Namespace) -> Path | None:
    """compile envoy's policy: none with --xds-dir (its bootstrap does not depend on one)."""
    if args.xds_dir is None:
        return Path(policy_names(args)[0])
    if named_policies(args):
        raise UsageError(
            "--xds-dir: that bootstrap does not depend on the policy (`serve --native-xds-dir` writes the "
            "listener from the policy it serves); name no POLICY"
        )
    return None


def named_policies(args: argparse.Namespace) -> list[str]:
    """The policy files named on the command line: POLICY or --policy, not both."""
    given = args.policy_args if isinstance(args.policy_args, list) else [args.policy_args]
    flagged = args.policy if isinstance(args.policy, list) else [args.policy]
    given, flagged = [p for p in given if p is not None], [p for p in flagged if p is not None]
    if given and flagged:
        raise UsageError("name the policy once: as POLICY or with --policy, not both")
    return given or flagged


def policy_names(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The policy files a command was given: POLICY or --policy (not both), else $AUTHZ_POLICY."""
    names = named_policies(args)
    if not names and environ.get(POLICY_ENV):
        names = [environ[POLICY_ENV]]
    if not names:
        raise UsageError(f"name the policy file: POLICY, --policy or {POLICY_ENV}")
    return names


def example_text(name: str) -> str:
    """A bundled example file (package data), as text, its schema line naming the schema beside it."""
    text = resources.files("authz_service").joinpath(EXAMPLES[name][0]).read_text(encoding="utf-8")
    first, newline, rest = text.partition("\n")
    if first.startswith(SCHEMA_MODELINE):
        schema = EXAMPLES["policy-schema"][0]
        text = f"{SCHEMA_MODELINE}{schema}{newline}{rest}"
    return text


def completion_script(shell: str) -> str:
    """Completion for ``shell``, generated from the same parser the command runs with (shtab)."""
    import shtab

    parser = build_parser()
    for action in _all_actions(parser):
        if getattr(action, "completes_files", False):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    return shtab.complete(parser, shell=shell)


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    out = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        out.append(action)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                out.extend(_all_actions(sub))
    return out


def _policy_tool(args: argparse.Namespace) -> int:
    names = policy_names(args)
    if args.command == "validate":
        from .tools.policytool import STDIN, validate_command

        if names.count(STDIN) > 1:  # read once; a second '-' would judge an empty policy it never got
            raise UsageError(f"'{STDIN}' (standard input) can be named once")

        for unknown in unknown_variables():  # CI may validate with the Deployment's environment
            print(f"authz-service validate: warning: {unknown}", file=sys.stderr)
        return validate_command(names, args.strict, sys.stdout, args.explain_issuers)
    if args.command == "test":
        from .tools.policytool import tests_command

        return tests_command(Path(names[0]), args.tests, sys.stdout)
    args.policy = Path(names[0])
    if args.command == "audit":
        from .tools.audit import audit_command

        return audit_command(args, sys.stdout)
    from .tools.explain import explain_command

    for unknown in unknown_variables():  # explain reads serve's AUTHZ_REALM, AUTHZ_LEEWAY, ...
        print(f"authz-service explain: warning: {unknown}", file=sys.stderr)
    return explain_command(args, sys.stdout)


def _serve(args: argparse.Namespace) -> int:
    from .server import run, serve

    named = named_policies(args)
    values = {o.name: getattr(args, o.name) for o in OPTIONS}
    if named:
        values["policy"] = named[0]
    try:
        settings = settings_from(values)
    except ConfigError as exc:
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    for unknown in unknown_variables():
        log.warning(
            "unknown environment variable: not a setting of authz-service, ignored",
            extra={"variable": unknown.name, **({"did_you_mean": unknown.closest} if unknown.closest else {})},
        )
    try:
        if settings.workers > 1:
            from .workers import supervise

            return run(supervise(settings), settings.event_loop)
        run(serve(settings), settings.event_loop)
    except PolicyError as exc:
        log.error("policy file refused; not starting", extra={"error": str(exc)})
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port that cannot be bound, --policy-watch inotify without inotify
        log.error("cannot start", extra={"error": str(exc)})
        print(f"authz-service: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _dev_issuer(args: argparse.Namespace) -> int:
    from .dev_issuer.app import serve_until_stopped
    from .dev_issuer.config import DevIssuerConfigError, load_config

    try:  # validated as serve validates --log-level
        level = option("log_level").parse(args.log_level)
    except ValueError as exc:
        print(f"authz-service dev-issuer: error: --log-level={args.log_level!r} is invalid: {exc}", file=sys.stderr)
        return 2
    logs.configure(level)
    try:  # as serve's ports: getaddrinfo would take 99999 as 99999 - 65536
        option("http_port").parse(str(args.port))
    except ValueError as exc:
        print(f"authz-service dev-issuer: error: --port={str(args.port)!r} is invalid: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except DevIssuerConfigError as exc:
        print(f"authz-service dev-issuer: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_until_stopped(config, args.host, args.port, args.public_url))
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        pass
    except (ValueError, OSError) as exc:
        print(f"authz-service dev-issuer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
