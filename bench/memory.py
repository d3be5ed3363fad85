"""Memory bound of the verified-token cache: 1M distinct tokens, RSS measured.

Signing 1M RSA tokens takes ~20 min here, so this drives the cache in-process the way
TokenVerifier.verify does after a successful verification (digest of the token text, then put
with the token's own Claims), with 1M distinct ~1 KB token strings and distinct claim strings
(client_id, sub, scope). The through-Envoy cold run of bench/run.py covers real signed tokens
(tens of thousands per run). Prints RSS (VmRSS) as the cache fills and after 1M tokens.

    .venv/bin/python bench/memory.py [--tokens 1000000] [--size 10000] [--max-bytes 16777216]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from authz_service.claims import Claims  # noqa: E402
from authz_service.tokencache import TokenCache  # noqa: E402

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Bench0001"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=10_000, help="--token-cache-size")
    parser.add_argument("--max-bytes", type=int, default=16 * 1024 * 1024, help="--token-cache-max-bytes")
    args = parser.parse_args()
    cache = TokenCache(args.size, args.max_bytes)
    key = object()
    pad = os.urandom(700).hex()[:900]  # token-sized text; the index makes each token distinct
    gc.collect()
    base = rss_mb()
    print(f"cache limits: {args.size} entries, {args.max_bytes} bytes; RSS before: {base:.1f} MB\n")
    print("| tokens seen | entries | cache bytes (accounted) | RSS MB | RSS growth MB |")
    print("|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    checkpoints = {10**3, 10**4, 10**5, args.tokens} | {args.tokens * k // 4 for k in (1, 2, 3)}
    for i in range(1, args.tokens + 1):
        token = f"eyJ{i:09d}.{pad}.{i:09d}".encode()
        scope = f"res{i % 97}/read res{i % 89}/write"
        claims = Claims(ISSUER, f"client-{i:09d}", f"sub-{i:09d}-{i % 7919:05d}", frozenset(scope.split()), scope,
                        2_000_000_000 + i, "bench-key-1")
        cache.put(cache.digest(token), claims, key)
        if i in checkpoints:
            gc.collect()
            rss = rss_mb()
            print(f"| {i:,} | {len(cache):,} | {cache.held_bytes:,} | {rss:.1f} | {rss - base:.1f} |", flush=True)
    print(f"\n{args.tokens:,} puts in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
