"""Abuse next to legitimate traffic, measured through a real Envoy (the shipped config, as `make
bench` renders it: routes answer directly, one worker) in front of the real service (its CLI).

  admin        a flood of GET /metrics, /readyz or 404s on the service's admin port (8181), while a
               legitimate client sends valid tokens through Envoy and a kubelet-like probe asks the
               flooded port for /healthz every 0.5 s (2 s timeout). Control: the same flood aimed
               at the admin port of a second authz-service process, so the machine carries the
               same load but the measured service's event loop does not; "ours / control" is what
               the admin port itself costs the Checks.

  forged       a flood of forged bearer tokens (well-shaped JWTs with a bad signature: Envoy's anonymous
               bucket never applies) through Envoy, more connections than the authz cluster's
               circuit breaker admits, while a legitimate client on another source address
               (127.0.0.2) sends valid tokens: the share of its requests answered 503. Variants:
               the shipped config; the same flood with valid tokens (every Check a verified-token
               cache hit, the cheapest Check there is: what any cheaper refusal in the service
               could at best achieve); a token bucket per downstream connection on the bearer
               route; and one per source address (Envoy's peer address, use_remote_address).

  connections  one client holds every downstream connection Envoy admits (the overload manager's global
               limit) with request headers it never finishes, reopening each connection Envoy
               closes, while a legitimate client opens a new connection every 0.25 s and sends a
               valid token: how many of its connections are refused. Variants: the shipped config,
               and the overload manager's timer scaling tightened.

Every scenario runs its variants interleaved, round after round; figures are medians over the
rounds with the per-round values (the machine is shared: compare ratios within one run).

    .venv/bin/python bench/abuse.py admin|forged|connections [--rounds 3] [--duration 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import re
import statistics
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BENCH, Bench, envoyconf, free_port, render_envoy, wrk  # noqa: E402

ADMIN_PATHS = ("/metrics", "/readyz", "/no-such-path")


@dataclass
class Legit:
    """What the legitimate client saw in one run."""

    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def legit_run(port: int, tokens: Path, duration: float, connections: int) -> Legit:
    data = wrk(port, tokens, duration, connections)
    return Legit(data["p50_us"] / 1000, data["p99_us"] / 1000, data["rps"], data["errors"])


@contextlib.contextmanager
def probing(url: str, period: float = 0.5, timeout: float = 2.0) -> Iterator[list[bool]]:
    """A kubelet-like probe of ``url`` every ``period`` s (``timeout`` s each) for the block: one
    entry per probe, True when it was answered 200 in time."""
    results: list[bool] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.wait(period):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    results.append(response.status == 200)
            except (OSError, ValueError):
                results.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def wrk_flood(url: str, connections: int, duration: float, work: Path, options: Sequence[str] = (),
              script_args: Sequence[str] = ()) -> Iterator[Callable[[], float]]:
    """``wrk`` hammering ``url`` in the background for the block; yields a function giving its
    requests per second once the block ends."""
    out = work / "flood.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", *options,
                                 url, *script_args], stdout=sink, stderr=subprocess.STDOUT)
    rate: list[float] = []
    try:
        yield lambda: rate[0] if rate else 0.0
    finally:
        proc.wait(duration + 10)
        found = re.search(r"Requests/sec:\s+([\d.]+)", out.read_text())
        rate.append(float(found[1]) if found else 0.0)


def median_line(label: str, values: list[float], spec: str = ".2f") -> str:
    values = sorted(values)
    return f"- {label}: **{statistics.median(values):{spec}}** (rounds: {', '.join(format(v, spec) for v in values)})"


def admin(bench: Bench, args: argparse.Namespace) -> None:
    jwks_proc, jwks_port = bench.start_jwks_server()
    try:
        policy = bench.policy(jwks_port)
        _, grpc_port, ours = bench.start_service(policy, 1, name="service-measured")
        _, _, control = bench.start_service(policy, 1, name="service-control")
        cfg = render_envoy("ext_authz", listener_port=free_port(), admin_port=free_port(), authz_port=grpc_port)
        _, envoy_port = bench.start_envoy(cfg, "abuse-admin")
        legit_run(envoy_port, bench.warm_tokens, 2, args.connections)  # warm-up
        runs: dict[tuple[str, str], list[tuple[Legit, float, list[bool]]]] = {}
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}/{args.rounds}", flush=True)
            with probing(f"http://127.0.0.1:{ours}/healthz") as probes:
                legit = legit_run(envoy_port, bench.warm_tokens, args.duration, args.connections)
            runs.setdefault(("-", "no flood"), []).append((legit, 0.0, probes))
            for path in ADMIN_PATHS:
                for target, port in (("control", control), ("ours", ours)):
                    with wrk_flood(f"http://127.0.0.1:{port}{path}", args.flood_connections, args.duration + 1,
                                   bench.work) as flood_rate, probing(f"http://127.0.0.1:{port}/healthz") as probes:
                        legit = legit_run(envoy_port, bench.warm_tokens, args.duration, args.connections)
                    runs.setdefault((path, target), []).append((legit, flood_rate(), probes))
    finally:
        bench.close()
        jwks_proc.stop()

    print(f"\nLegitimate client: wrk -c{args.connections} through Envoy, valid tokens; flood: wrk "
          f"-c{args.flood_connections} on an admin port; {args.duration:g} s per run, median of {args.rounds} rounds\n")
    print("| flood | on the admin port of | legit p50 ms | legit p99 ms | legit req/s | legit errors | flood req/s "
          "| probes of that port answered in 2 s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (path, target), values in runs.items():
        legit = [v[0] for v in values]
        probes = [ok for v in values for ok in v[2]]
        print(f"| {path} | {target} | {statistics.median(l.p50_ms for l in legit):.2f} | "
              f"{statistics.median(l.p99_ms for l in legit):.2f} | {statistics.median(l.rps for l in legit):,.0f} | "
              f"{sum(l.errors for l in legit)} | {statistics.median(v[1] for v in values):,.0f} | "
              f"{sum(probes)}/{len(probes)} |")
    print()
    for path in ADMIN_PATHS:
        pairs = list(zip(runs[(path, "ours")], runs[(path, "control")]))
        print(median_line(f"legit p50 with a {path} flood on our admin port / on the control's",
                          [a[0].p50_ms / b[0].p50_ms for a, b in pairs]))
        print(median_line(f"legit req/s with a {path} flood on our admin port / on the control's",
                          [a[0].rps / b[0].rps for a, b in pairs]))


# --- forged bearer tokens -------------------------------------------------------------------------

LEGIT_SOURCE = "127.0.0.2"  # the legitimate client's address; the flood comes from 127.0.0.1
PER_CONNECTION = {"max_tokens": 100, "tokens_per_fill": 50, "fill_interval": "1s"}
PER_SOURCE = {"max_tokens": 200, "tokens_per_fill": 100, "fill_interval": "1s"}


def bearer_bucket(cfg: dict[str, Any], variant: str) -> dict[str, Any]:
    """``cfg`` with a token bucket on the bearer-jwt route: per downstream connection, or per
    source address (a dynamic descriptor on Envoy's peer address: use_remote_address)."""
    cfg = copy.deepcopy(cfg)
    hcm = envoyconf.hcm(cfg, "ingress")
    (bearer,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == "bearer-jwt"]
    limit: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "bearer_" + variant.replace("-", "_"),
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    }
    if variant == "per-connection":
        limit |= {"token_bucket": PER_CONNECTION, "local_rate_limit_per_downstream_connection": True}
    else:
        hcm["use_remote_address"] = True
        limit |= {"token_bucket": {"max_tokens": 1_000_000, "tokens_per_fill": 1_000_000, "fill_interval": "1s"},
                  "rate_limits": [{"actions": [{"remote_address": {}}]}],
                  "descriptors": [{"entries": [{"key": "remote_address"}], "token_bucket": PER_SOURCE}],
                  "always_consume_default_token_bucket": False, "max_dynamic_descriptors": 10_000}
    bearer["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": limit}
    return cfg


def forged_tokens(work: Path, valid: Path) -> Path:
    """The valid tokens with a signature that verifies under no key."""
    path = work / "tokens-forged.txt"
    path.write_text("".join(t.rsplit(".", 1)[0] + "." + "A" * 342 + "\n" for t in valid.read_text().split()))
    return path


async def legit_client(port: int, tokens: list[str], duration: float, connections: int,
                       source: str = LEGIT_SOURCE) -> tuple[Counter[int], list[float]]:
    """Keep-alive clients from ``source`` sending valid tokens for ``duration`` s: statuses, latencies (ms)."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            n = index
            while loop.time() < deadline:
                token = tokens[n % len(tokens)]
                n += 1
                started = loop.time()
                writer.write(f"GET /transactions/7 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n"
                             .encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                latencies.append((loop.time() - started) * 1000)
                statuses[int(head.split(b" ", 2)[1])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return statuses, latencies


def forged(bench: Bench, args: argparse.Namespace) -> None:
    jwks_proc, jwks_port = bench.start_jwks_server()
    tokens = bench.warm_tokens.read_text().split()
    forged_file = forged_tokens(bench.work, bench.warm_tokens)
    variants = [("shipped config, forged tokens", "shipped", forged_file),
                ("shipped config, valid tokens (cheapest Check: cache hits)", "shipped", bench.warm_tokens),
                ("+ bucket per downstream connection, forged tokens", "per-connection", forged_file),
                ("+ bucket per source address, forged tokens", "per-source", forged_file)]
    results: dict[str, list[tuple[Counter[int], list[float], float]]] = {}
    try:
        policy = bench.policy(jwks_port)
        _, grpc_port, _ = bench.start_service(policy, 1)
        base = render_envoy("ext_authz", listener_port=free_port(), admin_port=free_port(), authz_port=grpc_port)
        ports: dict[str, int] = {}
        for kind in ("shipped", "per-connection", "per-source"):
            cfg = base if kind == "shipped" else bearer_bucket(base, kind)
            cfg = copy.deepcopy(cfg)
            envoyconf.socket_address(envoyconf.listener(cfg, "ingress"), "ingress")["port_value"] = free_port()
            envoyconf.socket_address(cfg["admin"], "admin")["port_value"] = free_port()
            ports[kind] = bench.start_envoy(cfg, f"abuse-{kind}")[1]
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}/{args.rounds}", flush=True)
            for label, kind, flood_tokens in variants:
                with wrk_flood_tokens(ports[kind], flood_tokens, args.flood_connections, args.duration + 1,
                                      bench.work) as flood_rate:
                    statuses, latencies = asyncio.run(legit_client(ports[kind], tokens, args.duration,
                                                                   args.connections))
                results.setdefault(label, []).append((statuses, latencies, flood_rate()))
    finally:
        bench.close()
        jwks_proc.stop()

    print(f"\nFlood: wrk -c{args.flood_connections} from 127.0.0.1; legitimate client: {args.connections} keep-alive "
          f"connections from {LEGIT_SOURCE}, valid tokens; {args.duration:g} s per run, {args.rounds} rounds\n")
    print("| variant | legit 503 (median share) | rounds | legit 429 | legit p50 ms | flood req/s answered |")
    print("|---|---:|---|---:|---:|---:|")
    for label, runs_ in results.items():
        shares = sorted(r[0][503] / max(1, sum(r[0].values())) for r in runs_)
        p50 = statistics.median(statistics.median(r[1]) for r in runs_ if r[1])
        print(f"| {label} | {statistics.median(shares):.1%} | {', '.join(f'{v:.1%}' for v in shares)} | "
              f"{sum(r[0][429] for r in runs_)} | {p50:.1f} | {statistics.median(r[2] for r in runs_):,.0f} |")


@contextlib.contextmanager
def wrk_flood_tokens(port: int, tokens: Path, connections: int, duration: float, work: Path
                     ) -> Iterator[Callable[[], float]]:
    """``wrk_flood`` with every request carrying the next token of ``tokens`` (bench/rotate.lua)."""
    with wrk_flood(f"http://127.0.0.1:{port}", connections, duration, work,
                   ["-s", str(BENCH / "rotate.lua")], ["--", str(tokens), "0"]) as rate:
        yield rate


# --- one client holding every connection ------------------------------------------------------------


def connection_limit(cfg: dict[str, Any]) -> int:
    monitor = next(m for m in cfg["overload_manager"]["resource_monitors"]
                   if m["name"] == "envoy.resource_monitors.global_downstream_max_connections")
    return int(monitor["typed_config"]["max_active_downstream_connections"])


def tightened_timers(cfg: dict[str, Any], minimum: str, scaling: float | None = None,
                     saturation: float | None = None) -> dict[str, Any]:
    """``cfg`` with the idle timers scaled down to ``minimum`` at saturation, and (when given) the
    connection monitor's trigger of that scaling moved to ``scaling``..``saturation``."""
    cfg = copy.deepcopy(cfg)
    (action,) = [a for a in cfg["overload_manager"]["actions"] if a["name"] == "envoy.overload_actions.reduce_timeouts"]
    action["typed_config"]["timer_scale_factors"] = [
        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": minimum},
        {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_timeout": minimum}]
    if scaling is not None:
        (trigger,) = [t for t in action["triggers"]
                      if t["name"] == "envoy.resource_monitors.global_downstream_max_connections"]
        trigger["scaled"] = {"scaling_threshold": scaling, "saturation_threshold": saturation}
    return cfg


async def hold_connections(port: int, count: int, stop: asyncio.Event, opened: list[int]) -> None:
    """``count`` connections, each sending request headers it never finishes; every one Envoy
    closes (or refuses) is opened again at once, until ``stop``."""
    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            opened[0] += 1
            try:
                writer.write(b"GET /transactions/1 HTTP/1.1\r\nHost: api\r\nX-Slow: ")
                stop_wait = asyncio.ensure_future(stop.wait())
                closed = asyncio.ensure_future(reader.read())
                await asyncio.wait([stop_wait, closed], return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                closed.cancel()
            except OSError:
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


async def connection_attempts(port: int, token: str, duration: float, period: float = 0.25) -> Counter[str]:
    """A new connection every ``period`` s with one valid request: what each got."""
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration

    async def attempt() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(LEGIT_SOURCE, 0))
        except OSError:
            return "refused"
        try:
            writer.write(f"GET /transactions/7 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n"
                         .encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            return head.split(b" ", 2)[1].decode()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            return "closed without an answer"
        finally:
            writer.close()

    tasks = []
    while loop.time() < deadline:
        tasks.append(asyncio.ensure_future(attempt()))
        await asyncio.sleep(period)
    for outcome in await asyncio.gather(*tasks):
        outcomes[outcome] += 1
    return outcomes


async def connections_run(port: int, holders: int, token: str, duration: float) -> tuple[Counter[str], int]:
    stop = asyncio.Event()
    opened = [0]
    holding = asyncio.ensure_future(hold_connections(port, holders, stop, opened))
    while opened[0] < holders:  # the limit is reached before the legitimate client starts
        await asyncio.sleep(0.1)
    try:
        return await connection_attempts(port, token, duration), opened[0]
    finally:
        stop.set()
        await holding


def connections(bench: Bench, args: argparse.Namespace) -> None:
    jwks_proc, jwks_port = bench.start_jwks_server()
    token = bench.warm_tokens.read_text().split()[0]
    results: dict[str, list[tuple[Counter[str], int]]] = {}
    try:
        policy = bench.policy(jwks_port)
        _, grpc_port, _ = bench.start_service(policy, 1)
        base = render_envoy("ext_authz", listener_port=free_port(), admin_port=free_port(), authz_port=grpc_port)
        limit = connection_limit(base)
        variants = {"shipped config": base,
                    "idle timers down to 1 s (at 90% of the limit)": tightened_timers(base, "1s"),
                    "idle timers down to 1 s, scaling from 25% to 50% of the limit":
                        tightened_timers(base, "1s", 0.25, 0.5)}
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}/{args.rounds}", flush=True)
            for label, cfg in variants.items():  # a fresh Envoy per run: no connection left over
                cfg = copy.deepcopy(cfg)
                envoyconf.socket_address(envoyconf.listener(cfg, "ingress"), "ingress")["port_value"] = free_port()
                envoyconf.socket_address(cfg["admin"], "admin")["port_value"] = free_port()
                proc, port = bench.start_envoy(cfg, "abuse-connections")
                try:
                    results.setdefault(label, []).append(
                        asyncio.run(connections_run(port, limit + args.flood_connections, token, args.duration)))
                finally:
                    proc.stop()
                    bench.procs.remove(proc)
    finally:
        bench.close()
        jwks_proc.stop()

    print(f"\nOne client holding {limit} + {args.flood_connections} connections with unfinished headers, reopening; "
          f"a legitimate client opening a connection every 0.25 s for {args.duration:g} s; {args.rounds} rounds\n")
    print("| variant | legitimate connections answered (per round) | outcomes (all rounds) | holder's connections opened |")
    print("|---|---|---|---:|")
    for label, runs_ in results.items():
        answered = [sum(n for outcome, n in r[0].items() if outcome.isdigit()) for r in runs_]
        total = [sum(r[0].values()) for r in runs_]
        outcomes = sum((r[0] for r in runs_), Counter())
        print(f"| {label} | {', '.join(f'{a}/{t}' for a, t in zip(answered, total))} | {dict(outcomes)} | "
              f"{statistics.median(r[1] for r in runs_):,.0f} |")


SCENARIOS: dict[str, Callable[[Bench, argparse.Namespace], None]] = {
    "admin": admin, "forged": forged, "connections": connections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=6, help="seconds per measured run (default 6)")
    parser.add_argument("--connections", type=int, default=4, help="the legitimate client's connections")
    parser.add_argument("--flood-connections", type=int, default=None,
                        help="the flood's connections (default: admin 64, forged 400; connections: "
                             "how many more than Envoy's limit the holder opens, 64)")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    args = parser.parse_args()
    if args.flood_connections is None:
        args.flood_connections = {"admin": 64, "forged": 400, "connections": 64}[args.scenario]
    bench = Bench(argparse.Namespace(work=args.work, cold_tokens=1, connections=args.connections,
                                     duration=args.duration))
    SCENARIOS[args.scenario](bench, args)


if __name__ == "__main__":
    main()
