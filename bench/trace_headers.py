"""What a client's trace headers cost a traced Check, in-process (no Envoy): CPU, log lines, sampling.

Tracing is configured as docs/tracing.md advises for busy services (`parentbased_traceidratio` at
1%), and every request carries a forged bearer token (a trusted kid, a signature that verifies
under no key: what any client can send, and what Envoy's anonymous bucket never limits). Each case
adds trace headers to the same Check, through the front door that reads them:

* gRPC door, Envoy not tracing: the CheckRequest's headers are the client's own;
* HTTP door: the authorization request's headers (when Envoy traces, its tracestate is the one the
  client sent, copied onto Envoy's span).

Prints CPU microseconds per Check (median over interleaved rounds), its ratio to the same Check
without trace headers (median of per-round ratios, with the range), the log lines per Check and
the share of Checks sampled (exported). Run it on two versions to compare (it uses only APIs both
have); compare figures from one run only (the machine is shared).

    .venv/bin/python bench/trace_headers.py [--n 400] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # micro_verify: the bench's key and tokens

from aiohttp.test_utils import make_mocked_request  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from jwt.algorithms import RSAAlgorithm  # noqa: E402
from micro_verify import POLICY, Keys, make_verifier, tokens  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from authz_service.check import TracedChecker  # noqa: E402
from authz_service.doors.grpc import authorization_servicer  # noqa: E402
from authz_service.doors.http import HttpFrontDoor  # noqa: E402
from authz_service.response import Answers  # noqa: E402
from authz_service.tracing import Tracing, tracing_settings  # noqa: E402

CLIENT_SPAN = "00-1234567890abcdef1234567890abcdef-00000000000000c1-01"  # the client says: sampled
ENVOY_SPAN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # Envoy's, not sampled
BAD_TRACESTATE = ",".join(f"k{i}@@=v{i}" for i in range(180))
BAD_BAGGAGE = ",".join(f"k{i}=a b;c" for i in range(180))
BIG_BAGGAGE = "k=" + "v" * 9000
GRPC_CASES: dict[str, dict[str, str]] = {
    "no trace headers": {},
    "traceparent (sampled) + tracestate": {"traceparent": CLIENT_SPAN, "tracestate": "vendor=abc"},
    "tracestate, 180 bad members": {"traceparent": CLIENT_SPAN, "tracestate": BAD_TRACESTATE},
    "baggage, 180 bad members": {"traceparent": CLIENT_SPAN, "baggage": BAD_BAGGAGE},
    "baggage, 9 KB": {"traceparent": CLIENT_SPAN, "baggage": BIG_BAGGAGE},
}
HTTP_CASES: dict[str, dict[str, str]] = {
    "no trace headers": {},
    "Envoy's traceparent + tracestate": {"traceparent": ENVOY_SPAN, "tracestate": "vendor=abc"},
    "Envoy's traceparent + the client's tracestate, 180 bad members": {"traceparent": ENVOY_SPAN,
                                                                       "tracestate": BAD_TRACESTATE},
}


class Discard(SpanExporter):
    """Counts the spans it is given (the sampled Checks) and drops them."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


class CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class Metadata:
    """A grpc.aio context without trace context: Envoy does not trace."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


def grpc_request(token: str, headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/x"
    http.headers.update({"authorization": f"Bearer {token}", "x-request-id": "bench", **headers})
    return request


async def run(check: Callable[[], Any], n: int) -> float:
    """CPU microseconds per call of ``check`` (awaited ``n`` times)."""
    t0 = time.process_time()
    for _ in range(n):
        await check()
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=400, help="Checks per case per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args()

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k1", "alg": "RS256", "use": "sig"}
    valid = tokens(private, 1)[0]
    forged = valid.rsplit(".", 1)[0] + "." + "A" * 342  # a signature that verifies under no key

    # In the environment too: a version whose SDK reads the sampler from there samples alike.
    os.environ.update({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    settings = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp", **os.environ})
    exporter = Discard()
    tracing = Tracing(settings, "bench", exporter=exporter)

    class Fixed:
        policy = POLICY

    checker = TracedChecker(Fixed(), make_verifier(Keys(jwk), cache=True), Answers("bench"), None, tracing)
    servicer = authorization_servicer(checker)
    door = HttpFrontDoor(checker)
    log = CountingHandler()
    root = logging.getLogger()
    root.handlers[:] = [log]
    root.setLevel(logging.INFO)

    cases: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, headers in GRPC_CASES.items():
        request = grpc_request(forged, headers)
        cases[("gRPC", name)] = lambda request=request: servicer.Check(request, Metadata())
    for name, headers in HTTP_CASES.items():
        mocked = make_mocked_request("GET", "/x", headers={"Authorization": f"Bearer {forged}", **headers})
        cases[("HTTP", name)] = lambda mocked=mocked: door.handle_traced(mocked)

    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    lines: dict[tuple[str, str], int] = dict.fromkeys(cases, 0)
    sampled: dict[tuple[str, str], int] = dict.fromkeys(cases, 0)
    for key, check in cases.items():  # warm-up, and the check that each is denied
        await run(check, 20)
    for _ in range(args.rounds):
        for key, check in cases.items():
            log.count, exporter.count = 0, 0
            cpu[key].append(await run(check, args.n))
            lines[key] += log.count
            sampled[key] += exporter.count

    total = args.n * args.rounds
    print("| door | trace headers | CPU us/Check | x no trace headers (range) | log lines/Check | sampled |")
    print("|---|---|---:|---:|---:|---:|")
    for key in cases:
        base = cpu[(key[0], "no trace headers")]
        ratios = sorted(a / b for a, b in zip(cpu[key], base))
        print(f"| {key[0]} | {key[1]} | {statistics.median(cpu[key]):.0f} | {statistics.median(ratios):.2f} "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f}) | {lines[key] / total:.1f} | {sampled[key] / total:.0%} |")


if __name__ == "__main__":
    asyncio.run(main())
