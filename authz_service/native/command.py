"""``authz-service compile envoy``: print (or write) the bootstrap, report the engines on stderr."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import yaml

from ..config import option, same_port
from ..policy import PolicyError, load_policy_file
from .arguments import ADDRESS_FLAGS, LISTENER_FLAGS, SERVE_DOORS, SERVE_SETTINGS
from .bootstrap import Compiled, compile_policy
from .options import Address, Options, heap_cap_refusal
from .report import report_json, report_text
from .xds import ENVOY_FLAGS, LISTENERS_FILE, write_atomically, xds_bootstrap


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str], *, xds: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of SERVE_SETTINGS and SERVE_DOORS not given as flags, from serve's AUTHZ_*
    variables, parsed as serve parses them (ValueError naming the variable), by args attribute; and
    by flag, the variables each came from (a refusal names them beside the flag). A fractional
    leeway is rounded down: jwt_authn's clock skew then stays under the service's leeway."""
    found: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for flag, name in SERVE_SETTINGS.items():
        setting = option(name)
        raw = environ.get(setting.env)
        if raw is None or getattr(args, _dest(flag)) is not None or (xds and flag in LISTENER_FLAGS):
            continue
        try:
            value = setting.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{setting.env}={raw!r} (serve's {setting.flag}, which {flag} follows): {exc}") from None
        if name == "leeway":
            value = int(value)
            if value < 2:
                raise ValueError(
                    f"{setting.env}={raw!r}: Envoy's jwt_authn needs a leeway of at least 2 seconds (its clock "
                    "skew is one second less); give the service at least 2, or compile envoy --leeway"
                )
        if name == "native_heap_cap" and (refusal := heap_cap_refusal(value)):
            raise ValueError(f"{setting.env}={raw!r}: {refusal}")
        found[_dest(flag)], origins[flag] = value, setting.env
    for flag, names in SERVE_DOORS.items():
        if getattr(args, _dest(flag)) is None and (door := serve_door(flag, environ)) is not None:
            found[_dest(flag)] = door
            origins[flag] = " and ".join(env for env in (option(name).env for name in names) if env in environ)
    return found, origins


def _dest(flag: str) -> str:
    """The parsed arguments' attribute of ``flag`` (argparse's dest)."""
    return flag.lstrip("-").replace("-", "_")


def serve_door(flag: str, environ: Mapping[str, str]) -> Address | None:
    """Where Envoy reaches the service's door of ``flag`` (SERVE_DOORS), from serve's host and port
    variables; None when neither is set (ValueError naming them when Envoy cannot connect there)."""
    host_setting, port_setting = (option(name) for name in SERVE_DOORS[flag])
    raw_host, raw_port = environ.get(host_setting.env), environ.get(port_setting.env)
    if raw_host is None and raw_port is None:
        return None
    given = " and ".join(
        f"{o.env}={raw!r}" for o, raw in ((host_setting, raw_host), (port_setting, raw_port)) if raw is not None
    )
    try:
        port = port_setting.default if raw_port is None else port_setting.parse(raw_port)
    except ValueError as exc:
        raise ValueError(f"{given} (serve's {port_setting.flag}, which {flag} follows): {exc}") from None
    try:  # as serve parses it: a host serve refuses (empty, a stray bracket) is no address to reach
        host = host_setting.default if raw_host is None else host_setting.parse(raw_host)
    except ValueError as exc:
        served = f"serve's {host_setting.flag}, which {flag} follows"
        raise ValueError(f"{host_setting.env}={raw_host!r} ({served}): {exc}") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{given}: Envoy connects to an IP address, not a host name; give {flag} IP:PORT") from None
    if port == 0:
        raise ValueError(f"{given}: port 0 lets the kernel pick the service's port; give {flag} IP:PORT")
    if ip.is_unspecified:  # serve listens on every address: Envoy, in the same Pod, on loopback
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return Address(str(ip), port)


def options_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> tuple[Options, dict[str, str]]:
    """The compile options of a parsed command line (ValueError naming the flag or variable); a
    flag not given takes serve's variable (serve_settings), else Options' default. With them, by
    flag, the variables a value came from."""
    defaults = Options()
    from_serve, origins = serve_settings(args, environ, xds=args.xds_dir is not None)
    args = argparse.Namespace(**{**vars(args), **from_serve})
    realm = defaults.realm
    if args.realm is not None:
        try:
            realm = option("realm").parse(args.realm)
        except ValueError as exc:
            raise ValueError(f"--realm {args.realm!r}: {exc}") from None
    if args.jwt_cache_size is not None and args.jwt_cache_size < 0:
        raise ValueError("--jwt-cache-size: 0 (no cache) or a positive number of tokens")

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    options = Options(
        **{name: given(getattr(args, name), getattr(defaults, name)) for name, _ in ADDRESS_FLAGS.values()},
        realm=realm,
        leeway=given(args.leeway, defaults.leeway),
        jwks_cache_seconds=given(args.jwks_cache, defaults.jwks_cache_seconds),
        jwt_cache_size=given(args.jwt_cache_size, defaults.jwt_cache_size),
        decision_stats=not args.no_decision_stats,
        heap_cap_mib=args.heap_cap,
    )
    return options, origins


def compile_command(policy_path: Path | None, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Exit 0 with the bootstrap written, 2 when the policy or an option cannot be compiled.
    ``policy_path`` is None exactly with ``--xds-dir`` (that bootstrap does not depend on it)."""
    xds_dir = None if args.xds_dir is None else PurePosixPath(os.path.abspath(args.xds_dir))  # Envoy's cwd is not ours
    try:
        options, origins = options_from(args)
        refuse_shared_ports(options, xds=xds_dir is not None, origins=origins)
        if xds_dir is not None:
            _refuse_listener_flags(args)
            text = xds_bootstrap_yaml(options, xds_dir)
            compiled = None
        else:
            assert policy_path is not None
            compiled = compile_policy(load_policy_file(policy_path), options)
            text = bootstrap_yaml(compiled)
    except (PolicyError, ValueError) as exc:
        code = exc.code if isinstance(exc, PolicyError) and exc.code else None
        print(f"authz-service compile envoy: error: {exc}" + (f" [{code}]" if code else ""), file=stderr)
        return 2
    if args.output is None:
        stdout.write(text)
    else:
        try:
            write_atomically(args.output, text)
        except OSError as exc:
            print(
                f"authz-service compile envoy: error: -o {args.output}: cannot write it: {exc.strerror or exc}",
                file=stderr,
            )
            return 2
    if compiled is None:
        if args.report != "none":
            stderr.write(xds_report(xds_dir))
    elif args.report == "text":
        stderr.write(report_text(compiled))
    elif args.report == "json":
        stderr.write(json.dumps(report_json(compiled), indent=2) + "\n")
    return 0


ENVOY_LISTENERS = ("--listen", "--admin", "--health")  # the addresses Envoy binds
ENVOY_CALLS = ("--app", "--service-grpc", "--service-http")  # ... and the ones it connects to


def refuse_shared_ports(options: Options, *, xds: bool, origins: Mapping[str, str] | None = None) -> None:
    """ValueError naming both flags when two of Envoy's listeners would take one port (Envoy would
    not start), or when Envoy would connect to one of its own listeners (the app's requests, or
    its Checks, sent back to Envoy). ``xds``: the ingress listener is serve's --native-listen.
    ``origins``: the variables a flag's value came from (serve_settings), named beside it."""
    defaults = Options()
    origins = origins or {}

    def address(flag: str) -> Address:
        return getattr(options, ADDRESS_FLAGS[flag][0])

    def shown(flag: str) -> str:
        given = address(flag)
        if flag in origins:
            return f"{flag} {given} (from {origins[flag]})"
        return f"{flag} {given}" + (" (default)" if given == getattr(defaults, ADDRESS_FLAGS[flag][0]) else "")

    def same(a: str, b: str) -> bool:
        return same_port(address(a).host, address(a).port, address(b).host, address(b).port)

    listeners = [flag for flag in ENVOY_LISTENERS if not (xds and flag == "--listen")]
    for i, first in enumerate(listeners):
        for second in listeners[i + 1 :]:
            if same(first, second):
                raise ValueError(
                    f"{shown(first)} and {shown(second)} are one port: give each of Envoy's listeners a port of its own"
                )
    for called in ENVOY_CALLS:
        for listener in listeners:
            if same(called, listener):
                raise ValueError(
                    f"{shown(called)} and {shown(listener)} are one port: Envoy would connect to its own listener, "
                    f"not to {ADDRESS_FLAGS[called][1]}; give each its own address"
                )


def bootstrap_yaml(compiled: Compiled) -> str:
    """The bootstrap as YAML, under a header naming the policy it enforces."""
    header = (
        f"# Envoy bootstrap compiled by `authz-service compile envoy` from {compiled.policy.source}\n"
        f"# (policy sha256 {compiled.policy.sha256}). Generated: edit the policy and compile again.\n"
        "# Its hardened settings are envoy/envoy.yaml's, where each is explained.\n"
    )
    return header + yaml.safe_dump(compiled.bootstrap(), sort_keys=False, width=1000, allow_unicode=False)


def xds_bootstrap_yaml(options: Options, xds_dir: Any) -> str:
    """The xDS form's bootstrap as YAML, under a header saying who writes its listener."""
    header = (
        "# Envoy bootstrap of authz-service's native mode, xDS form, printed by\n"
        f"# `authz-service compile envoy --xds-dir {xds_dir}`. Its ingress listener is the file\n"
        f"# {xds_dir}/{LISTENERS_FILE}, which `authz-service serve --native-xds-dir {xds_dir}` writes\n"
        "# from the policy it serves and rewrites at every policy change; Envoy follows without a\n"
        "# restart. Start Envoy once that file exists, with: " + " ".join(ENVOY_FLAGS) + "\n"
        "# Its hardened settings are envoy/envoy.yaml's, where each is explained.\n"
    )
    return header + yaml.safe_dump(xds_bootstrap(options, xds_dir), sort_keys=False, width=1000)


def xds_report(xds_dir: Any) -> str:
    return (
        f"xDS bootstrap: the ingress listener is {xds_dir}/{LISTENERS_FILE}, written by "
        f"`authz-service serve --native-xds-dir {xds_dir}` (it logs each route's engine at every load); "
        f"start Envoy after the service, with {' '.join(ENVOY_FLAGS)}\n"
    )


def _refuse_listener_flags(args: argparse.Namespace) -> None:
    for flag, serve_flag in LISTENER_FLAGS.items():
        if getattr(args, _dest(flag)) is not None:
            where = f"give it to serve as {serve_flag}" if serve_flag else "it is not an option of the xDS form"
            raise ValueError(f"{flag} with --xds-dir: the service writes the listener it sets; {where}")
