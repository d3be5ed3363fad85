"""Service settings: every CLI flag has an AUTHZ_* environment variable (the Kubernetes way).

Parsed once into a frozen dataclass; a bad value stops start-up with a message naming the flag,
its environment variable and what would be accepted.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .native.options import Address, parse_address
from .tracing import CLIENT_CONTEXTS, TracingSettings, TracingSettingsError, tracing_settings


@dataclass(frozen=True, slots=True)
class JwksSettings:
    """How the JWKS of each issuer is fetched (jwks.JwksCache)."""

    refresh_interval: float = 900.0  # seconds between routine refreshes (jittered +-10%)
    timeout: float = 3.0  # total time for one fetch
    max_bytes: int = 512 * 1024  # Cognito's JWKS is ~1 KB; a huge document is refused
    unknown_kid_cooldown: float = 10.0  # at most one unknown-kid fetch per issuer per this period
    retry_min: float = 1.0  # backoff after a failed fetch, doubling up to retry_max
    retry_max: float = 60.0


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the flag, the env var and the fix."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, env var, parser, default and help (drives argparse, env vars and docs/cli.md)."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "AUTHZ_" + self.name.upper()


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("a port is 0..65535")
    return value


def _positive(text: str) -> float:
    value = _float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _non_negative(text: str) -> float:
    value = _float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be zero or a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be zero (disabled) or a positive integer")
    return value


def _workers(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 64:
        raise ValueError("must be 1..64 (one per CPU core the container may use)")
    return value


def _event_loop(text: str) -> str:
    value = text.lower()
    if value not in {"auto", "uvloop", "asyncio"}:
        raise ValueError("one of auto, uvloop, asyncio")
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install uvloop), or use auto/asyncio")
    return value


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must name the policy file, e.g. /etc/authz/policy.yaml")
    if text == "-":  # the server follows a file (reloads); only `validate -` reads standard input
        raise ValueError(
            "the server reads a policy file, not standard input; name the file, e.g. /etc/authz/policy.yaml"
        )
    return Path(text)


def _policy_watch(text: str) -> str:
    value = text.lower()
    if value not in {"auto", "inotify", "poll"}:
        raise ValueError("one of auto, inotify, poll")
    return value


def _log_level(text: str) -> str:
    value = text.upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("one of debug, info, warning, error")
    return value


def _realm(text: str) -> str:
    if not text or any(c in text for c in '"\\') or not text.isprintable():
        raise ValueError("printable text without quotes or backslashes")
    return text


def _cooldown(text: str) -> float:
    value = _positive(text)
    if value < 10:
        raise ValueError("at least 10 seconds, so unknown kids cannot cause a fetch storm")
    return value


def _request_bytes(text: str) -> int:
    value = _int(text)
    if not 16 * 1024 <= value <= 64 * 1024 * 1024:
        raise ValueError("must be 16384..67108864 bytes (above Envoy's max_request_headers_kb, 60 KiB by default)")
    return value


def _trace_client_context(text: str) -> str:
    value = text.lower()
    if value not in CLIENT_CONTEXTS:
        raise ValueError(f"one of {', '.join(CLIENT_CONTEXTS)}")
    return value


def _path_prefix(text: str) -> str:
    if text and (
        not text.startswith("/")
        or text.endswith("/")
        or not text.isascii()
        or not text.isprintable()
        or any(c in text for c in "?#%\\ ")
    ):
        raise ValueError("empty, or a path like /authz (leading '/', no trailing '/', no '?', '#', '%' or spaces)")
    return text


NATIVE_LISTEN = Address("0.0.0.0", 8080)  # native mode's ingress listener: envoy/envoy.yaml's


def _xds_dir(text: str) -> Path | None:
    return Path(text) if text.strip() else None


def _address(text: str) -> Address:
    return parse_address(text)


OPTIONS: tuple[Option, ...] = (
    Option("policy", None, _path, "Policy YAML file (mount the ConfigMap as a directory; the path is watched)."),
    Option(
        "grpc_host",
        "127.0.0.1",
        str,
        "Address of the ext_authz front doors (gRPC, and HTTP when enabled); loopback: only the Pod's "
        "Envoy or mesh sidecar calls them.",
    ),
    Option(
        "grpc_port",
        9191,
        _port,
        "Port of the gRPC front door (Envoy's ext_authz gRPC mode; also serves grpc.health.v1), on --grpc-host.",
    ),
    Option(
        "ext_authz_http_port",
        0,
        _port,
        "Port of the HTTP front door (Envoy's HTTP ext_authz mode, http_service), on --grpc-host; 0 (default) "
        "turns it off.",
    ),
    Option(
        "ext_authz_http_path_prefix",
        "",
        _path_prefix,
        "Envoy's http_service path_prefix (empty: none). A request is decided only when its path is this "
        "prefix followed by Envoy's x-authz-original-path header; any other is refused (400).",
    ),
    # Envoy caps a request's headers at max_request_headers_kb (60 KiB by default) and sends no body
    # unless with_request_body is set, so a real authorization request stays far below 128 KiB; a
    # larger CheckRequest is refused by gRPC before it is parsed (RESOURCE_EXHAUSTED, which Envoy
    # turns into its status_on_error 503) instead of costing ~65 us of CPU per KiB.
    Option(
        "max_request_bytes",
        128 * 1024,
        _request_bytes,
        "Largest authorization request accepted (a gRPC CheckRequest, or the HTTP request head), in bytes.",
    ),
    Option("http_host", "0.0.0.0", str, "Address for the HTTP server (/healthz, /readyz, /metrics)."),
    Option("http_port", 8181, _port, "Port for the HTTP server; never put it behind Envoy's ext_authz."),
    Option("leeway", 60.0, _non_negative, "Clock skew tolerated on exp, nbf and iat, in seconds."),
    Option("jwks_refresh_interval", 900.0, _positive, "Seconds between routine JWKS refreshes (+-10% jitter)."),
    Option("jwks_timeout", 3.0, _positive, "Timeout of one JWKS fetch, in seconds."),
    Option("jwks_max_bytes", 512 * 1024, _positive_int, "Largest JWKS document accepted, in bytes."),
    Option("unknown_kid_cooldown", 10.0, _cooldown, "Minimum seconds between unknown-kid JWKS re-fetches per issuer."),
    Option(
        "policy_watch",
        "auto",
        _policy_watch,
        "How policy changes are noticed: auto (inotify, else polling), inotify (refuse to start without it) "
        "or poll (stat the path; for network filesystems, whose remote changes inotify cannot see).",
    ),
    Option(
        "policy_poll_interval",
        1.0,
        _positive,
        "Seconds between polls of the policy file (a change loads once it has held for one interval); "
        "with inotify, between safety re-checks for changes inotify cannot report.",
    ),
    Option("realm", "authz-service", _realm, "Realm in WWW-Authenticate challenges."),
    Option("shutdown_grace", 10.0, _non_negative, "Seconds in-flight Checks get to finish on SIGTERM."),
    Option("log_level", "INFO", _log_level, "debug, info, warning or error (allowed requests log at debug)."),
    Option(
        "token_cache_size",
        10_000,
        _non_negative_int,
        "Most verified tokens kept in the cache (per worker); 0 disables the cache.",
    ),
    Option(
        "token_cache_max_bytes",
        16 * 1024 * 1024,
        _non_negative_int,
        "Most bytes (approximate) the verified-token cache holds (per worker); 0 disables the cache.",
    ),
    Option(
        "workers",
        1,
        _workers,
        "Worker processes sharing every front door's port (SO_REUSEPORT), each port watched for other "
        "listeners; 1 serves in-process.",
    ),
    Option(
        "event_loop",
        "auto",
        _event_loop,
        "auto (uvloop when installed, else asyncio), uvloop or asyncio; uvloop saves ~30 us of CPU per Check.",
    ),
    Option(
        "metrics_min_interval",
        1.0,
        _non_negative,
        "Seconds a /metrics exposition is reused before it is generated again (0: every scrape), so a flood "
        "of scrapes cannot starve Checks.",
    ),
    Option(
        "trace_client_context",
        "link",
        _trace_client_context,
        "Tracing: what a Check does with the client's own trace context when Envoy sends none (Envoy does "
        "not trace): link (a trace of its own, sampled by OTEL_TRACES_SAMPLER, linked to the client's span) or "
        "continue (the client's trace and sampled flag: only for trusted clients).",
    ),
    # Native mode (docs/native.md): Envoy decides with its own filters what they can decide exactly.
    Option(
        "native_xds_dir",
        "",
        _xds_dir,
        "Native mode: write the Envoy listener compiled from the policy into this directory (file-based "
        "xDS; Envoy runs on `compile envoy --xds-dir DIR`'s bootstrap) at start-up and at every policy "
        "reload; empty (default): off.",
    ),
    Option(
        "native_listen", str(NATIVE_LISTEN), _address, "Native mode: where Envoy's ingress listener listens (IP:PORT)."
    ),
    Option(
        "native_jwks_cache",
        5,
        _positive_int,
        "Native mode: seconds between Envoy's fetches of the keys this service holds (its /jwks).",
    ),
    Option(
        "native_jwt_cache_size",
        10_000,
        _non_negative_int,
        "Native mode: verified tokens Envoy's jwt_authn keeps per Envoy worker; 0: none (docs/native.md).",
    ),
)


def option(name: str) -> Option:
    """The option called ``name`` (e.g. "log_level"): its flag, env var and parser, for other commands."""
    return next(o for o in OPTIONS if o.name == name)


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated settings of `authz-service serve`."""

    policy: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9191
    ext_authz_http_port: int = 0
    ext_authz_http_path_prefix: str = ""
    max_request_bytes: int = 128 * 1024
    http_host: str = "0.0.0.0"
    http_port: int = 8181
    leeway: float = 60.0
    jwks_refresh_interval: float = 900.0
    jwks_timeout: float = 3.0
    jwks_max_bytes: int = 512 * 1024
    unknown_kid_cooldown: float = 10.0
    policy_poll_interval: float = 1.0
    policy_watch: str = "auto"
    realm: str = "authz-service"
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    token_cache_size: int = 10_000
    token_cache_max_bytes: int = 16 * 1024 * 1024
    workers: int = 1
    event_loop: str = "auto"
    metrics_min_interval: float = 1.0
    trace_client_context: str = "link"
    native_xds_dir: Path | None = None
    native_listen: Address = NATIVE_LISTEN
    native_jwks_cache: int = 5
    native_jwt_cache_size: int = 10_000
    # OpenTelemetry tracing, from the standard OTEL_* variables (tracing.py); None: off.
    tracing: TracingSettings | None = None
    jwks: JwksSettings = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "jwks",
            JwksSettings(
                refresh_interval=self.jwks_refresh_interval,
                timeout=self.jwks_timeout,
                max_bytes=self.jwks_max_bytes,
                unknown_kid_cooldown=self.unknown_kid_cooldown,
            ),
        )


def settings_from(cli_values: Mapping[str, str | None], environ: Mapping[str, str] = os.environ) -> Settings:
    """Build Settings: a flag given on the command line wins over its env var, then the default."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = cli_values.get(option.name)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None:
            if option.default is None:
                raise ConfigError(f"{option.flag} (or {option.env}) is required: {option.help}")
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} is invalid: {exc}") from None
    _check_native(values)
    names = {f.name for f in fields(Settings) if f.init}
    try:  # tracing_settings imports no OpenTelemetry: tracing may be off and not installed
        tracing = tracing_settings(environ, values.get("trace_client_context", "link"))
    except TracingSettingsError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(**{k: v for k, v in values.items() if k in names}, tracing=tracing)


def _check_native(values: Mapping[str, Any]) -> None:
    """Native mode's limits on other settings (ConfigError naming both)."""
    if values.get("native_xds_dir") is None:
        return
    if values.get("workers", 1) > 1:
        raise ConfigError(
            "--native-xds-dir (AUTHZ_NATIVE_XDS_DIR) with --workers (AUTHZ_WORKERS) above 1: in native mode "
            "one process compiles the policy for Envoy and serves Envoy its keys; run one worker (Envoy "
            "decides the native routes itself, the service only the rest)"
        )
    leeway = values.get("leeway", 60.0)
    if leeway != int(leeway) or leeway < 2:
        raise ConfigError(
            f"--leeway (AUTHZ_LEEWAY) {leeway:g} with --native-xds-dir (AUTHZ_NATIVE_XDS_DIR): Envoy counts "
            "whole seconds; use a whole number of seconds, at least 2"
        )
