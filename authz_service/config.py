"""Service settings: every CLI flag has an AUTHZ_* environment variable (the Kubernetes way).

Parsed once into a frozen dataclass; a bad value stops start-up with a message naming the flag,
its environment variable and what would be accepted.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .decisionlog import DecisionLogMode
from .native.options import Address, heap_cap_refusal, parse_address
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


def _host(text: str) -> str:
    """A host name or address to bind; an IPv6 address may be written in brackets, as with a port
    (``[::1]``), and is kept without them, so every listener and the start-up line read it alike."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in inner or text.startswith("["):
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(_HOST_EXPECTED) from None
        return inner
    if not inner or inner != inner.strip() or any(c.isspace() for c in inner):
        raise ValueError(_HOST_EXPECTED)
    return inner


_HOST_EXPECTED = (
    "an address or host name without a port, e.g. 127.0.0.1, 0.0.0.0 (every IPv4 address), :: (every address) or ::1"
)


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must name the policy file, e.g. /etc/authz/policy.yaml")
    if text == "-":  # the server follows a file (reloads); only `validate -` reads standard input
        raise ValueError(
            "the server reads a policy file, not standard input; name the file, e.g. /etc/authz/policy.yaml"
        )
    return Path(text)


def _shadow_path(text: str) -> str:
    if text == "-":
        raise ValueError("the shadow policy is a file the server follows, not standard input; name the file")
    return text.strip()


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


def _decision_log(text: str) -> str:
    value = text.lower()
    if value not in {mode.value for mode in DecisionLogMode}:
        raise ValueError(f"one of {', '.join(mode.value for mode in DecisionLogMode)}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise ValueError("a share of the allowed requests: more than 0, at most 1 (0.01: one in a hundred)")
    return value


def _rate_per_minute(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("a positive number of new tokens per minute, e.g. 2")
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
        _host,
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
    Option("http_host", "0.0.0.0", _host, "Address for the HTTP server (/healthz, /readyz, /metrics)."),
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
    Option(
        "log_level",
        "INFO",
        _log_level,
        "debug, info, warning or error (the decision log is not affected: see --decision-log).",
    ),
    Option(
        "shadow_policy",
        "",
        _shadow_path,
        "A candidate policy file decided beside the policy on every Check, never changing an answer: "
        "Checks it decides otherwise are counted (authz_shadow_disagreements_total) and logged. Reloaded as the "
        "policy is; a file that does not load changes nothing else. Empty (default): none.",
    ),
    Option(
        "decision_log",
        "deny",
        _decision_log,
        "Which decisions get a JSON line on the decision log: deny (every denial and dry-run denial), all, "
        "sampled (every denial, and allowed requests at --decision-log-sample-rate) or off.",
    ),
    Option(
        "decision_log_sample_rate",
        0.01,
        _fraction,
        "With --decision-log sampled: the share of allowed requests logged (0.01: one in a hundred), at random.",
    ),
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
        "new_tokens_alert_per_minute",
        2.0,
        _rate_per_minute,
        "New tokens per minute from one client, as one process sees them, above which the shipped alert "
        "AuthzClientMintingTokens fires (exported as authz_client_new_tokens_alert_per_minute, which the alert "
        "reads): raise it for clients with many replicas or short-lived tokens.",
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
        "native_listen",
        str(NATIVE_LISTEN),
        _address,
        "Native mode: where Envoy's ingress listener listens (IP:PORT); only with --native-xds-dir, and on "
        "a port of none of the service's own listeners.",
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
    Option(
        "native_heap_cap",
        160,  # envoy/envoy.yaml's (tests/test_native_sizing.py keeps them equal)
        _positive_int,
        "Native mode: the heap cap in MiB of the bootstrap Envoy runs (compile envoy --heap-cap): a policy "
        "whose expected Envoy heap would reach its first overload action is refused.",
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
    shadow_policy: str = ""  # a file path; empty: no shadow policy
    decision_log: str = "deny"
    decision_log_sample_rate: float = 0.01
    token_cache_size: int = 10_000
    token_cache_max_bytes: int = 16 * 1024 * 1024
    new_tokens_alert_per_minute: float = 2.0
    workers: int = 1
    event_loop: str = "auto"
    metrics_min_interval: float = 1.0
    trace_client_context: str = "link"
    native_xds_dir: Path | None = None
    native_listen: Address = NATIVE_LISTEN
    native_jwks_cache: int = 5
    native_jwt_cache_size: int = 10_000
    native_heap_cap: int = 160
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
    given: dict[str, str] = {}  # by option name: how it was given, e.g. "AUTHZ_GRPC_PORT=9191"
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
        given[option.name] = f"{source}={raw}"
    _refuse_shared_ports(values, given)
    _check_native(values, given)
    names = {f.name for f in fields(Settings) if f.init}
    try:  # tracing_settings imports no OpenTelemetry: tracing may be off and not installed
        tracing = tracing_settings(environ, values.get("trace_client_context", "link"))
    except TracingSettingsError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(**{k: v for k, v in values.items() if k in names}, tracing=tracing)


# --- listeners that would share a port ------------------------------------------------------------

# Every listening port of `serve`, as (host option, port option); port 0 is never shared (the
# gRPC and admin ports: one the kernel picks; the HTTP door: off).
LISTENERS: tuple[tuple[str, str], ...] = (
    ("grpc_host", "grpc_port"),
    ("grpc_host", "ext_authz_http_port"),
    ("http_host", "http_port"),
)


def _refuse_shared_ports(values: Mapping[str, Any], given: Mapping[str, str]) -> None:
    """ConfigError naming both settings when two listeners would bind one port on overlapping
    addresses. Why before binding: the second bind's "Address already in use" names only its own
    setting, as if another program held the port; and with --workers, whose doors share their
    ports through SO_REUSEPORT, the gRPC and HTTP doors on one port both bind, and Envoy's Checks
    reach one door or the other at random. Native mode's Envoy listener (--native-listen) counts
    too: the service binds its port first and Envoy's listener is then rejected, while the
    service reports ready."""
    listeners = _listeners(values, given)
    for i, (host_a, port_a, shown_a) in enumerate(listeners):
        for host_b, port_b, shown_b in listeners[i + 1 :]:
            if not same_port(host_a, port_a, host_b, port_b):
                continue
            hosts = host_a if host_a == host_b else f"{host_a} and {host_b}"
            raise ConfigError(
                f"{shown_a} and {shown_b} are the same port on {hosts}: give each listener a port of its own"
            )


def _listeners(values: Mapping[str, Any], given: Mapping[str, str]) -> list[tuple[str, int, str]]:
    """Every listener the settings open, as (host, port, how its port was given)."""

    def value(name: str) -> Any:
        return values.get(name, option(name).default)

    def shown(name: str) -> str:
        return given.get(name) or f"{option(name).flag} (default {option(name).default})"

    found = [(value(host), value(port), shown(port)) for host, port in LISTENERS]
    if values.get("native_xds_dir") is not None:
        listen: Address = values.get("native_listen", NATIVE_LISTEN)
        found.append((listen.host, listen.port, shown("native_listen")))
    return found


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a listener on ``host`` binds; None when the name does not resolve (the bind
    then reports it, naming the host's setting)."""
    text = host.strip("[]") or "0.0.0.0"
    try:
        return {ipaddress.ip_address(text)}
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found}


def same_port(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """Whether listeners on the two addresses would take one port from each other (the service's
    and Envoy's alike; port 0 asks for a free port, so it is never shared)."""
    return port_a != 0 and port_a == port_b and _hosts_overlap(host_a, host_b)


def _hosts_overlap(host_a: str, host_b: str) -> bool:
    """Whether listeners on the two hosts would take one port from each other: a shared address,
    or a wildcard (0.0.0.0 takes every IPv4 address; :: every address, dual-stack as Linux has it)."""
    if host_a == host_b:
        return True
    a, b = _addresses(host_a), _addresses(host_b)
    if a is None or b is None:
        return False
    for x in a:
        for y in b:
            if x == y or (x.is_unspecified and (x.version == 6 or y.version == 4)):
                return True
            if y.is_unspecified and (y.version == 6 or x.version == 4):
                return True
    return False


# --- AUTHZ_* variables that are no setting ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    """An AUTHZ_* environment variable that names no setting (ignored), and the setting it most
    resembles, if any: what a typo in a Deployment's env list looks like."""

    name: str
    closest: str | None

    def __str__(self) -> str:
        hint = f" (did you mean {self.closest}?)" if self.closest else ""
        return f"{self.name} is not a setting of authz-service; it is ignored{hint}"


# What Kubernetes puts in every container's environment for each Service of the namespace unless
# the Pod sets enableServiceLinks: false (a Service "authz-metrics" gives AUTHZ_METRICS_SERVICE_HOST,
# AUTHZ_METRICS_PORT=tcp://10.0.0.12:8181, AUTHZ_METRICS_PORT_8181_TCP_ADDR, ...): not a typo of ours.
_SERVICE_LINK = re.compile(
    r"AUTHZ(_\w+)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"
)
_SERVICE_LINK_URL = re.compile(r"(tcp|udp|sctp)://\S+:\d+")


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[UnknownVariable]:
    """Every AUTHZ_* variable of ``environ`` that is no setting of `serve`, sorted, each with the
    closest setting's variable. Why: a misspelt variable is otherwise ignored without a word, and
    the service runs with the default the operator meant to change."""
    known = [o.env for o in OPTIONS]
    found = []
    for name in sorted(environ):
        if not name.startswith("AUTHZ_") or name in known or _SERVICE_LINK.fullmatch(name):
            continue
        if name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(environ[name]):
            continue  # a Service's own AUTHZ_<NAME>_PORT=tcp://<ip>:<port>
        closest = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        found.append(UnknownVariable(name, closest[0] if closest else None))
    return found


def _check_native(values: Mapping[str, Any], given: Mapping[str, str]) -> None:
    """Native mode's limits on other settings (ConfigError naming both)."""
    if values.get("native_xds_dir") is None:
        if "native_listen" in given:
            raise ConfigError(
                f"{given['native_listen']} without --native-xds-dir (AUTHZ_NATIVE_XDS_DIR): it is where the "
                "listener the service writes into that directory listens; set --native-xds-dir too, or drop it"
            )
        return
    if values.get("workers", 1) > 1:
        raise ConfigError(
            "--native-xds-dir (AUTHZ_NATIVE_XDS_DIR) with --workers (AUTHZ_WORKERS) above 1: in native mode "
            "one process compiles the policy for Envoy and serves Envoy its keys; run one worker (Envoy "
            "decides the native routes itself, the service only the rest)"
        )
    heap_cap = values.get("native_heap_cap")  # None: the default, which Envoy runs with
    refusal = None if heap_cap is None else heap_cap_refusal(heap_cap)
    if refusal is not None:
        raise ConfigError(f"--native-heap-cap (AUTHZ_NATIVE_HEAP_CAP) {heap_cap}: {refusal}")
    leeway = values.get("leeway", 60.0)
    if leeway != int(leeway) or leeway < 2:
        raise ConfigError(
            f"--leeway (AUTHZ_LEEWAY) {leeway:g} with --native-xds-dir (AUTHZ_NATIVE_XDS_DIR): Envoy counts "
            "whole seconds; use a whole number of seconds, at least 2"
        )
