"""Abuse next to legitimate traffic, measured through a real Envoy (the shipped config, as `make
bench` renders it: routes answer directly, one worker) in front of the real service (its CLI).

  admin        a flood of GET /metrics, /readyz or 404s on the service's admin port (8181), while a
               legitimate client sends valid tokens through Envoy and a kubelet-like probe asks the
               flooded port for /healthz every 0.5 s (2 s timeout). Control: the same flood aimed
               at the admin port of a second authz-service process, so the machine carries the
               same load but the measured service's event loop does not; "ours / control" is what
               the admin port itself costs the Checks.

Every scenario runs its variants interleaved, round after round; figures are medians over the
rounds with the per-round values (the machine is shared: compare ratios within one run).

    .venv/bin/python bench/abuse.py admin [--rounds 3] [--duration 6]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BENCH, Bench, ManagedProcess, free_port, render_envoy, wrk  # noqa: E402

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
def wrk_flood(url: str, connections: int, duration: float, work: Path) -> Iterator[Callable[[], float]]:
    """``wrk`` hammering ``url`` in the background for the block; yields a function giving its
    requests per second once the block ends."""
    out = work / "flood.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", url],
                                stdout=sink, stderr=subprocess.STDOUT)
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


SCENARIOS: dict[str, Callable[[Bench, argparse.Namespace], None]] = {"admin": admin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=6, help="seconds per measured run (default 6)")
    parser.add_argument("--connections", type=int, default=4, help="the legitimate client's connections")
    parser.add_argument("--flood-connections", type=int, default=64, help="the flood's connections")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(work=args.work, cold_tokens=1, connections=args.connections,
                                     duration=args.duration))
    SCENARIOS[args.scenario](bench, args)


if __name__ == "__main__":
    main()
