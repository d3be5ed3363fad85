"""With ``--workers N``, how far apart the workers start serving a changed policy.

Why: each worker loads the policy file on its own (its own inotify watch and reload), so for a
moment after a change some workers answer under the new policy and others under the previous one.
The real service (its CLI, ``--workers N``) serves a policy of ``--routes`` generated routes plus
the benchmark's own; each round renames a changed policy into place (as a ConfigMap update does)
and waits until the parent's /readyz names it as the policy every worker serves
(``policy.sha256``). Per reload it records:

* the skew: from the first worker's ``policy reloaded`` log line to the last one's (the lines'
  ``ts``, milliseconds: under 1 ms reads as 0);
* the rename to every worker serving it, as /readyz shows it (polled every 2 ms).

Each size runs ``idle`` and ``busy`` (a client in this process sending ``--rate`` Checks/s, each a
verified-token cache hit, straight to the shared gRPC port), interleaved, ``--reloads`` reloads
each. Figures are medians and maxima over the reloads.

    .venv/bin/python bench/worker_skew.py [--workers 2] [--routes 10,1000] [--reloads 10] [--rate 300]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reload_latency import measure, policy_texts, write_policy
from run import BENCH, Bench, machine

from tests.e2e.harness import http_request


class Workers:
    """One authz-service with ``--workers N``: its gRPC port (``measure`` sends there) and /readyz."""

    def __init__(self, bench: Bench, policy: Path, workers: int, name: str) -> None:
        self.process, self.port, self.http_port = bench.start_service(policy, workers, name=name)

    def in_force(self) -> str | None:
        """The sha256 every worker serves (None while they differ), as the parent's /readyz says."""
        _, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/readyz")
        return json.loads(body)["policy"]["sha256"]

    def checks(self) -> float:
        """Checks answered by every worker so far (the parent's aggregated /metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/metrics")
        return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                   if s.name == "authz_check_duration_seconds_count")

    def reload_times(self, sha256: str) -> list[float]:
        """Unix times of the workers' ``policy reloaded`` lines for the policy ``sha256``."""
        times = []
        for line in self.process.log_text().splitlines():
            if line.startswith("{") and '"policy reloaded"' in line:
                entry = json.loads(line)
                if entry.get("sha256") == sha256:
                    times.append(datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp())
        return times


async def reloads(service: Workers, path: Path, texts: tuple[str, str], count: int, workers: int,
                  first: int) -> list[tuple[float, float]]:
    """``count`` reloads, each once the previous one serves everywhere: (skew ms, rename -> all ms)."""
    loop = asyncio.get_running_loop()
    out = []
    for i in range(first, first + count):
        text = texts[i % 2]
        sha256 = hashlib.sha256(text.encode()).hexdigest()
        begin = time.monotonic()
        write_policy(path, text)
        while await loop.run_in_executor(None, service.in_force) != sha256:
            await asyncio.sleep(0.002)
        served = (time.monotonic() - begin) * 1000
        times = service.reload_times(sha256)[-workers:]
        out.append(((max(times) - min(times)) * 1000, served))
        await asyncio.sleep(0.3)  # Checks between reloads, so the next one meets a busy service again
    return out


async def measured(service: Workers, path: Path, texts: tuple[str, str], count: int, workers: int, first: int,
                   token: str, rate: float) -> list[tuple[float, float]]:
    """``reloads`` while idle (``rate`` 0) or while Checks arrive at ``rate`` per second."""
    work = reloads(service, path, texts, count, workers, first)
    if not rate:
        return await work
    load = asyncio.ensure_future(measure(service, token, 1e9, rate, None))  # type: ignore[arg-type]
    try:
        return await work
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--routes", default="10,1000", help="generated routes per size, comma-separated (at least 1)")
    parser.add_argument("--reloads", type=int, default=10, help="reloads per size and load (default 10)")
    parser.add_argument("--rate", type=float, default=300, help="Checks per second while busy (default 300)")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    args = parser.parse_args()

    bench = Bench(argparse.Namespace(work=args.work, cold_tokens=1, connections=1, duration=1))
    token = bench.warm_tokens.read_text().split()[0]
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        _, jwks_port = bench.start_jwks_server()
        base = yaml.safe_load(bench.policy(jwks_port).read_text())
        for routes in (int(r) for r in args.routes.split(",")):
            texts = policy_texts(base, routes)
            path = bench.work / f"policy-skew-{routes}.yaml"
            write_policy(path, texts[0])
            service = Workers(bench, path, args.workers, f"service-skew-{routes}")
            done = 1  # texts[0] serves: the next reload writes texts[1]
            for _ in range(2):  # interleaved: idle, busy, idle, busy
                for kind in ("idle", "busy"):
                    half = args.reloads // 2
                    before = service.checks()
                    rate = args.rate if kind == "busy" else 0
                    round_ = measured(service, path, texts, half, args.workers, done, token, rate)
                    results.setdefault((routes, kind), []).extend(asyncio.run(round_))
                    done += half
                    # Workers apply their counts every second: the figure lags a little (it proves the load ran).
                    print(f"{routes} routes {kind}: {len(results[(routes, kind)])} reloads, "
                          f"~{service.checks() - before:.0f} Checks answered meanwhile", flush=True)
            service.process.stop()
    finally:
        bench.close()
    print()
    print(f"--workers {args.workers}; {args.rate:g} Checks/s while busy; medians (max) over the reloads")
    print()
    print("| generated routes | load | reloads | skew, first to last worker, ms | rename to all serving, ms |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for (routes, kind), values in results.items():
        skews, served = [v[0] for v in values], [v[1] for v in values]
        print(f"| {routes} | {kind} | {len(values)} | {statistics.median(skews):.0f} ({max(skews):.0f}) | "
              f"{statistics.median(served):.0f} ({max(served):.0f}) |")
    print(f"\nMachine: {machine()}")


if __name__ == "__main__":
    main()
