"""What counting native decisions costs Envoy: the compiled policy with and without its decision
stats (native/decisions.py: four stats access loggers behind metadata filters), in one run.

Two Envoys (one worker each) on the bootstrap `compile envoy` makes of one policy, one of them with
`--no-decision-stats`, both fetching their keys from one authz-service, their routes answering
directly (the upstream costs nothing) and their stdout access log removed (the same in both; the
stats loggers stay in the measured one). `wrk` sends the same valid tokens to each in turn, every
request allowed natively; Envoy's CPU comes from /proc/<pid>/stat. Rounds alternate the two, and
the ratio pairs each round's two runs (median and every round printed).

    .venv/bin/python bench/native_stats.py [--rounds 5] [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bench.run import (
    BENCH,
    ISSUER,
    POOL,
    WARM_TOKENS,
    cpu_seconds,
    envoy_binary,
    jwks_document,
    load_or_make_key,
    spawn,
    tokens,
    wrk,
)
from tests import envoyconf
from tests.e2e.harness import free_port, listening, render_native_config, wait_for_http


def policy(work: Path, jwks_uri: str) -> Path:
    path = work / "native-stats-policy.yaml"
    path.write_text(yaml.safe_dump({
        "issuers": [{"user_pool_id": POOL, "issuer": ISSUER, "jwks_uri": jwks_uri}],
        "routes": [{"name": "get-transaction", "methods": ["GET"], "path": "/transactions/{id}",
                    "scopes": ["transactions/get"]}]}))
    return path


def answering_directly(bootstrap: dict[str, Any]) -> None:
    hcm = envoyconf.hcm(bootstrap, "ingress")
    hcm["access_log"] = [log for log in hcm["access_log"] if log["name"] != "envoy.access_loggers.stdout"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if "route" in route:
            route.pop("route")
            route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    work = BENCH / ".work"
    work.mkdir(exist_ok=True)
    key = load_or_make_key(work)
    (work / "jwks.json").write_text(jwks_document(key))
    token_file = tokens(work, "warm", WARM_TOKENS)
    issuer_port, grpc_port, http_port = free_port(), free_port(), free_port()
    processes = []
    try:
        processes.append(listening(spawn("jwks-server", [sys.executable, "-m", "http.server", str(issuer_port),
                                                          "--bind", "127.0.0.1", "--directory", str(work)], work),
                                   issuer_port, 10))
        path = policy(work, f"http://127.0.0.1:{issuer_port}/jwks.json")
        service = spawn("authz-service", [sys.executable, "-m", "authz_service.cli", "serve", "--policy", str(path),
                                          "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                          "--log-level", "warning"], work)
        processes.append(service)
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", 60, expect_status=200, proc=service)
        envoys = {}
        for name, stats in (("with", True), ("without", False)):
            port = free_port()
            config = render_native_config(work, path, listener_port=port, admin_port=free_port(), app_port=free_port(),
                                          grpc_port=grpc_port, http_port=http_port, transform=answering_directly,
                                          decision_stats=stats)
            envoy = spawn(f"envoy-{name}", [envoy_binary(), "-c", str(config), "--concurrency", "1",
                                            "--disable-hot-restart", "--log-level", "warning"], work)
            processes.append(listening(envoy, port, 30))
            envoys[name] = (envoy, port)
        for _, port in envoys.values():  # warm: keys fetched, tokens cached, every request native
            wrk(port, token_file, 2, args.connections)
        per_request: dict[str, list[float]] = {name: [] for name in envoys}
        for _ in range(args.rounds):
            for name, (envoy, port) in envoys.items():
                before = cpu_seconds([envoy.pid])
                run = wrk(port, token_file, args.duration, args.connections)
                assert run["errors"] == 0, run
                per_request[name].append((cpu_seconds([envoy.pid]) - before) / run["requests"] * 1e6)
        ratios = [w / wo for w, wo in zip(per_request["with"], per_request["without"], strict=True)]
        print(json.dumps({"envoy_cpu_us_per_request": per_request}, indent=1))
        print(f"Envoy CPU per natively allowed request, with decision stats / without: median "
              f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)}); "
              f"median {statistics.median(per_request['with']):.1f} vs "
              f"{statistics.median(per_request['without']):.1f} us")
    finally:
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    main()
