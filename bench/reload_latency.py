"""A Check's latency while a large policy reloads, with each YAML parser the service may use.

Why: a reload parses the policy on a thread of the service's own process, and parsing holds the
interpreter lock the Checks need. PyYAML's own parser (pure Python) spent most of a reload; the
service now reads policies with libyaml's (C) where PyYAML has it (authz_service/yamlfile.py).

The real service (its CLI) serves a policy of ``--routes`` generated routes plus the benchmark's
own; a client in this process sends Checks straight to its gRPC port (a verified-token cache hit
each, the common Check) at a steady rate, and records each Check's latency and when it started.
One service per parser runs at once: libyaml's (the default) and PyYAML's own (libyaml switched
off for that process by a ``sitecustomize`` on its PYTHONPATH, which says so in its log). Each
round measures every parser twice, interleaved: ``idle`` (no reload) and ``reload`` (a changed
policy file renamed into place, the next one once the service logged ``policy reloaded``, then
``--gap`` seconds). "During a reload" counts the Checks that were in flight at any moment between
the rename and that log line. Figures are medians over the rounds, with the per-round values.

    .venv/bin/python bench/reload_latency.py [--routes 1000] [--rounds 3] [--duration 8] [--rate 300]

``--parse-only`` measures just the parse of that policy by each parser, in this process (CPU
time, interleaved rounds): the part of a reload the parser decides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BENCH, ROOT, Bench, grpc_frame, machine  # noqa: E402

PARSERS = ("libyaml", "python")
# On the PYTHONPATH of the service that must use PyYAML's own parser: runs before authz_service is
# imported, so yamlfile finds no libyaml and says which parser it uses.
NO_LIBYAML = """\
import sys, yaml
yaml.__with_libyaml__ = False
print("bench: libyaml switched off, PyYAML's own parser reads the policy", file=sys.stderr, flush=True)
"""


@dataclass
class Phase:
    """One measured run: every Check's (start, latency) and every reload's (start, end), monotonic s."""

    checks: list[tuple[float, float]] = field(default_factory=list)
    reloads: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0

    def latencies(self, during_reload: bool | None = None) -> list[float]:
        """Latencies in ms: all, or only those of Checks in flight (or not) during a reload."""
        def overlaps(start: float, latency: float) -> bool:
            return any(start < end and start + latency > begin for begin, end in self.reloads)

        return sorted(latency * 1000 for start, latency in self.checks
                      if during_reload is None or overlaps(start, latency) == during_reload)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(share * len(values)) - 1))]


def policy_texts(base: dict, routes: int) -> tuple[str, str]:
    """Two policies: ``base`` plus ``routes`` generated routes, differing in one scope (so each
    write is a new policy). Rendered once, before anything is measured: dumping YAML here would
    compete with the service for the CPU and hold this process's own loop."""
    def text(generation: int) -> str:
        extra = [{"name": f"svc-{i}", "methods": ["GET", "POST"], "path": f"/svc{i}/items/{{id}}",
                  "scopes": [f"svc{i}/read", f"svc{i}/write" if i else f"svc0/gen{generation}"]}
                 for i in range(routes)]
        return yaml.safe_dump({**base, "routes": base["routes"] + extra}, sort_keys=False)

    return text(0), text(1)


def write_policy(path: Path, text: str) -> None:
    """A complete file renamed into place, as a ConfigMap update is."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Service:
    """One authz-service under measurement: its gRPC port and the count of reloads in its log."""

    def __init__(self, bench: Bench, parser: str, policy: Path) -> None:
        env = None
        if parser == "python":
            shim = bench.work / "no-libyaml"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(NO_LIBYAML)
            env = {"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}
        self.process, self.port, _ = bench.start_service(policy, 1, env=env, name=f"service-{parser}")
        switched_off = "libyaml switched off" in self.process.log_text()
        if switched_off != (parser == "python"):
            raise SystemExit(f"service-{parser}: the parser is not the one asked for (see its log)")

    def reloads(self) -> int:
        return sum('"msg":"policy reloaded"' in line for line in self.process.log_text().splitlines())


async def measure(service: Service, token: str, duration: float, rate: float,
                  reload: tuple[Path, tuple[str, str], float] | None) -> Phase:
    """Checks at ``rate`` per second for ``duration`` s; with ``reload`` = (policy file, the two
    policy texts, gap), one changed policy after another meanwhile."""
    import grpc

    from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    request = external_auth_pb2.CheckRequest.FromString(grpc_frame(token)[5:])
    phase = Phase()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await stub.Check(request, timeout=5)  # connected before the clock starts
        loop = asyncio.get_running_loop()
        end = loop.time() + duration

        async def one() -> None:
            started = time.monotonic()
            try:
                reply = await stub.Check(request, timeout=10)
                if reply.status.code != 0:
                    phase.errors += 1
            except grpc.aio.AioRpcError:
                phase.errors += 1
                return
            phase.checks.append((started, time.monotonic() - started))

        async def checks() -> None:
            tasks, next_at = [], loop.time()
            while next_at < end:
                tasks.append(asyncio.create_task(one()))
                next_at += 1 / rate
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await asyncio.gather(*tasks)

        async def reloads() -> None:
            assert reload is not None
            path, texts, gap = reload
            while loop.time() < end:
                seen = service.reloads()
                begin = time.monotonic()
                write_policy(path, texts[(seen + 1) % 2])
                while service.reloads() == seen:
                    await asyncio.sleep(0.002)
                phase.reloads.append((begin, time.monotonic()))
                await asyncio.sleep(gap)

        await asyncio.gather(checks(), *([reloads()] if reload else []))
    return phase


def parse_times(text: str, rounds: int) -> dict[str, list[float]]:
    """CPU ms of ``load_strict_yaml`` on ``text`` with each parser PyYAML has, interleaved."""
    from authz_service import yamlfile

    times: dict[str, list[float]] = {}
    default = yamlfile.Loader
    try:
        for _ in range(rounds):
            for name, loader in yamlfile.LOADERS.items():
                yamlfile.Loader = loader
                started = time.process_time()
                yamlfile.load_strict_yaml(text, "policy.yaml")
                times.setdefault(name, []).append((time.process_time() - started) * 1000)
    finally:
        yamlfile.Loader = default
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--routes", type=int, default=1000, help="generated routes in the policy (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=8, help="seconds per measured run (default 8)")
    parser.add_argument("--rate", type=float, default=300, help="Checks per second (default 300)")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between a reload and the next (default 0.3)")
    parser.add_argument("--parse-only", action="store_true", help="measure only the parse, in this process")
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    args = parser.parse_args()

    bench = Bench(argparse.Namespace(work=args.work, cold_tokens=1, connections=1, duration=args.duration))
    token = bench.warm_tokens.read_text().split()[0]
    _, jwks_port = bench.start_jwks_server()
    base = yaml.safe_load(bench.policy(jwks_port).read_text())
    texts = policy_texts(base, args.routes)
    if args.parse_only:
        times = parse_times(texts[0], args.rounds)
        for name, values in times.items():
            print(f"{name:7} parse of {args.routes} routes: {statistics.median(values):.1f} ms CPU "
                  f"({', '.join(f'{v:.1f}' for v in values)})")
        if len(times) == 2:
            ratios = [p / c for p, c in zip(times["python"], times["libyaml"], strict=True)]
            print(f"python / libyaml: {statistics.median(ratios):.1f}x ({', '.join(f'{r:.1f}' for r in ratios)})")
        print(f"\nMachine: {machine()}")
        bench.close()
        return
    services, policies = {}, {}
    try:
        for name in PARSERS:
            policies[name] = bench.work / f"policy-{name}.yaml"
            write_policy(policies[name], texts[0])
            services[name] = Service(bench, name, policies[name])
        results: dict[tuple[str, str], list[Phase]] = {}
        for round_ in range(args.rounds):
            for name in PARSERS:
                for kind in ("idle", "reload"):
                    reload = (policies[name], texts, args.gap) if kind == "reload" else None
                    phase = asyncio.run(measure(services[name], token, args.duration, args.rate, reload))
                    results.setdefault((name, kind), []).append(phase)
                    print(f"round {round_ + 1} {name:7} {kind:6}: {len(phase.checks)} Checks, "
                          f"{len(phase.reloads)} reloads, {phase.errors} errors", flush=True)
    finally:
        bench.close()
        for process in [s.process for s in services.values()]:
            process.stop()
    print()
    print(report(results, args))
    print(f"\nMachine: {machine()}")


def report(results: dict[tuple[str, str], list[Phase]], args: argparse.Namespace) -> str:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"

    rows = [f"{args.routes} generated routes, {args.rate:g} Checks/s, {args.duration:g} s per run, "
            f"{args.rounds} rounds; medians (per round)", "",
            "| parser | reload, wall ms | Checks during reloads | p50 ms idle | p99 ms idle | p50 ms during a reload "
            "| p99 ms during a reload | p99 during / idle | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in PARSERS:
        idle, busy = results[(name, "idle")], results[(name, "reload")]
        reload_ms = [statistics.median((e - b) * 1000 for b, e in p.reloads) for p in busy]
        during = [p.latencies(during_reload=True) for p in busy]
        idle_lat = [p.latencies() for p in idle]
        p99_idle = [percentile(v, 0.99) for v in idle_lat]
        p99_during = [percentile(v, 0.99) for v in during]
        rows.append(
            f"| {name} | {med(reload_ms)} | {sum(map(len, during)) // len(during)} | "
            f"{med([percentile(v, 0.5) for v in idle_lat])} | {med(p99_idle)} | "
            f"{med([percentile(v, 0.5) for v in during])} | {med(p99_during)} | "
            f"{med([d / i for d, i in zip(p99_during, p99_idle, strict=True)])} | "
            f"{sum(p.errors for p in idle + busy)} |")
    return "\n".join(rows) + "\n\n" + json.dumps(
        {f"{name}/{kind}": [len(p.checks) for p in phases] for (name, kind), phases in results.items()})


if __name__ == "__main__":
    main()
