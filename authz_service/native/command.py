"""``authz-service compile envoy``: print (or write) the bootstrap, report the engines on stderr."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

import yaml

from ..config import option
from ..policy import PolicyError, load_policy_file
from .arguments import ADDRESS_FLAGS
from .bootstrap import Compiled, compile_policy
from .options import Options
from .report import report_json, report_text


def options_from(args: argparse.Namespace) -> Options:
    """The compile options of a parsed command line (ValueError naming the flag)."""
    try:
        realm = option("realm").parse(args.realm)
    except ValueError as exc:
        raise ValueError(f"--realm {args.realm!r}: {exc}") from None
    if args.jwt_cache_size < 0:
        raise ValueError("--jwt-cache-size: 0 (no cache) or a positive number of tokens")
    return Options(
        **{name: getattr(args, name) for name, _ in ADDRESS_FLAGS.values()},
        realm=realm,
        leeway=args.leeway,
        jwks_cache_seconds=args.jwks_cache,
        jwt_cache_size=args.jwt_cache_size,
    )


def compile_command(policy_path: Path, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Exit 0 with the bootstrap written, 2 when the policy or an option cannot be compiled."""
    try:
        compiled = compile_policy(load_policy_file(policy_path), options_from(args))
    except (PolicyError, ValueError) as exc:
        print(f"authz-service compile envoy: error: {exc}", file=stderr)
        return 2
    text = bootstrap_yaml(compiled)
    if args.output is None:
        stdout.write(text)
    else:
        try:
            _write_atomically(args.output, text)
        except OSError as exc:
            print(
                f"authz-service compile envoy: error: -o {args.output}: cannot write it: {exc.strerror or exc}",
                file=stderr,
            )
            return 2
    if args.report == "text":
        stderr.write(report_text(compiled))
    elif args.report == "json":
        stderr.write(json.dumps(report_json(compiled), indent=2) + "\n")
    return 0


def bootstrap_yaml(compiled: Compiled) -> str:
    """The bootstrap as YAML, under a header naming the policy it enforces."""
    header = (
        f"# Envoy bootstrap compiled by `authz-service compile envoy` from {compiled.policy.source}\n"
        f"# (policy sha256 {compiled.policy.sha256}). Generated: edit the policy and compile again.\n"
        "# Its hardened settings are envoy/envoy.yaml's, where each is explained.\n"
    )
    return header + yaml.safe_dump(compiled.bootstrap(), sort_keys=False, width=1000, allow_unicode=False)


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over: Envoy (or a file watcher) never
    reads half a bootstrap."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as any file the user writes, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
