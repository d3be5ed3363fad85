"""Where a warm Check's CPU goes *inside the running service under load*, phase by phase.

Why: a loop that calls the handler back to back flatters it (~9 us: everything stays in the CPU
caches); under load grpc's C core, the event loop and the kernel run between two Checks, and the
same handler costs ~3x that. This starts the real service (its CLI) with the steps of the Check
pipeline (check.Checker) wrapped in timers, drives it like `make bench` row 4 (through Envoy with
wrk, or --direct with h2load), and prints the mean time per phase and the handler's thread CPU
per Check.

    .venv/bin/python bench/handler_phases.py [--duration 8] [--direct]
"""

from __future__ import annotations

import argparse
import atexit
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

PHASES = ("parse", "decide", "answer", "render", "metrics", "log")


def serve_instrumented(argv: list[str]) -> int:
    """The service's CLI with each step of check.Checker timed (the pipeline itself is not copied:
    its steps are wrapped where Checker calls them)."""
    from authz_service.check import Checker
    from authz_service.cli import main

    totals = dict.fromkeys((*PHASES, "cpu"), 0.0)
    count = [0]
    clock, cpu = time.perf_counter, time.thread_time

    def timed(name, step):
        def wrapper(*args):
            t0 = clock()
            try:
                return step(*args)
            finally:
                totals[name] += clock() - t0
        return wrapper

    def timed_async(name, step):
        async def wrapper(*args):
            t0 = clock()
            try:
                return await step(*args)
            finally:
                totals[name] += clock() - t0
        return wrapper

    original_init, original_check = Checker.__init__, Checker.check

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.decide = timed_async("decide", self.decide)
        self.answers.answer = timed("answer", self.answers.answer)
        self.counter.check = timed("metrics", self.counter.check)
        self.log = timed("log", self.log)

    async def check(self, parse, raw, render):
        c0 = cpu()
        try:
            return await original_check(self, timed("parse", parse), raw, timed("render", render))
        finally:
            totals["cpu"] += cpu() - c0
            count[0] += 1

    def report() -> None:
        n = max(1, count[0])
        fields = " ".join(f"{name}={value / n * 1e6:.2f}" for name, value in totals.items())
        print(f"PHASES n={count[0]} {fields}", flush=True)

    Checker.__init__, Checker.check = init, check
    atexit.register(report)
    return main(argv)


def run(args: argparse.Namespace) -> None:
    import run as bench_run  # bench/run.py: keys, tokens, policy, JWKS server, Envoy, wrk, h2load

    bench = bench_run.Bench(argparse.Namespace(work=args.work, cold_tokens=200, connections=16,
                                               duration=args.duration))
    jwks_proc, jwks_port = bench.start_jwks_server()
    policy = bench.policy(jwks_port)
    grpc_port, http_port = bench_run.free_port(), bench_run.free_port()
    proc = bench_run.spawn(
        "handler-phases",
        [sys.executable, __file__, "--serve", "serve", "--policy", str(policy), "--grpc-host", "127.0.0.1",
         "--grpc-port", str(grpc_port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
         "--event-loop", args.event_loop], bench.work)
    bench.procs.append(proc)
    log = proc.log_path
    try:
        bench_run.wait_for_http(f"http://127.0.0.1:{http_port}/readyz", 30, expect_status=200, proc=proc)
        if args.direct:
            body = bench.work / "check-request.bin"
            body.write_bytes(bench_run.grpc_frame(bench.warm_tokens.read_text().split()[0]))
            rate = bench_run.h2load(grpc_port, body, args.duration, 16)["rps"]
        else:
            cfg = bench_run.render_envoy("ext_authz", listener_port=bench_run.free_port(),
                                         admin_port=bench_run.free_port(), authz_port=grpc_port, jwks=bench.jwks)
            _, port = bench.start_envoy(cfg, "phases")
            bench_run.wrk(port, bench.warm_tokens, 2, 16)  # warm-up: the 8 tokens enter the cache
            rate = bench_run.wrk(port, bench.warm_tokens, args.duration, 16)["rps"]
    finally:
        bench.close()
        jwks_proc.stop()
    line = next((entry for entry in log.read_text().splitlines() if entry.startswith("PHASES ")), None)
    if line is None:
        raise SystemExit(f"the instrumented service printed no figures: see {log}")
    fields = dict(item.split("=") for item in line.split()[1:])
    print(f"{'direct gRPC (h2load)' if args.direct else 'through Envoy (wrk)'}, {args.event_loop} loop, "
          f"{rate:,.0f} Checks/s, {int(fields['n']):,} Checks measured (warm-up included)\n")
    print("| phase | mean µs per Check (wall) |\n|---|---:|")
    for name in PHASES:
        print(f"| {name} | {float(fields[name]):.1f} |")
    print(f"| **handler, thread CPU** | **{float(fields['cpu']):.1f}** |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve_instrumented(sys.argv[2:]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8, help="seconds of measured load (default 8)")
    parser.add_argument("--direct", action="store_true", help="drive the gRPC port with h2load, no Envoy")
    parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / ".work"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
