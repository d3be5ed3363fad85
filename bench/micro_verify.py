"""Micro-benchmark of TokenVerifier.verify in-process (no gRPC, no Envoy): cold and warm.

Cold = every call a distinct valid token (cache disabled), warm = the same token again.
Forged = a token anyone can send: a trusted kid, a signature that verifies under no key, and a
payload that is expensive JSON (the CPU a flood of them costs; run on two versions to compare).
Decide = the whole decision for a warm token, on a route with only scopes and on one with route
conditions (client_ids, all_scopes, two claim conditions): what the conditions add per Check.
Prints microseconds per call; compare figures from one run only (the machine is shared).

    .venv/bin/python bench/micro_verify.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.api_jwk import PyJWK

from authz_service import tokens as tokens_module
from authz_service.cognito import access_claims
from authz_service.policy import Issuer, parse_policy
from authz_service.tokens import TokenError, TokenVerifier

try:
    from authz_service.keys import IssuerKey
except ImportError:  # a version that reads iss before it looks for the key never asks by kid alone
    IssuerKey = None  # type: ignore[assignment,misc]

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Bench0001"
POLICY = parse_policy(
    f"issuers:\n  - user_pool_id: us-east-1_Bench0001\nroutes:\n  - path: /x\n    scopes: [a/b]\n"
)


class Keys:
    def __init__(self, jwk: dict) -> None:
        self._key = PyJWK(jwk)

    def keys_for_kid(self, kid: str) -> tuple:
        return (IssuerKey(ISSUER, self._key),) if kid == "k1" else ()

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self._key if kid == "k1" else None

    def has_keys(self, issuer: Issuer) -> bool:
        return True

    async def refetch(self, issuer: Issuer) -> None:
        return None


def tokens(private: rsa.RSAPrivateKey, n: int) -> list[str]:
    now = int(time.time())
    out = []
    for _ in range(n):
        claims = access_claims(ISSUER, "c1", "a/b c/d", now=now,
                               custom={"custom:tenant": "acme", "environments": ["staging", "prod"]})
        out.append(jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"}))
    return out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_expensive(size: int) -> str:
    """A forged token of about ``size`` characters: the trusted kid, a signature of zeros, and a payload
    that names the trusted issuer and then holds numbers (among the costliest JSON per byte to parse)."""
    head, signature = b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode()), b64(bytes(256))
    room = (size - len(head) - len(signature) - 2) * 3 // 4
    prefix = json.dumps({"iss": ISSUER, "n": []})[:-2]
    numbers = ",".join(["1e5"] * ((room - len(prefix) - 2) // 4))
    return f"{head}.{b64((prefix + numbers + ']}').encode())}.{signature}"


async def cpu_us_per_forged(verifier: TokenVerifier, token: str, n: int) -> tuple[float, str]:
    """CPU microseconds one verification of ``token`` costs, and how it was refused."""
    outcome = ""
    t0 = time.process_time()
    for _ in range(n):
        try:
            await verifier.verify(token, POLICY)
        except TokenError as exc:
            outcome = exc.failure.value
    return (time.process_time() - t0) / n * 1e6, outcome


def make_verifier(keys: Keys, cache: bool) -> TokenVerifier:
    params = inspect.signature(TokenVerifier).parameters
    if "cache" in params:  # new code: explicit cache (None disables)
        from authz_service.tokencache import TokenCache

        return TokenVerifier(keys, cache=TokenCache(10_000, 64 << 20) if cache else None)
    return TokenVerifier(keys)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k1", "alg": "RS256", "use": "sig"}
    keys = Keys(jwk)
    toks = tokens(private, args.n)

    cold = make_verifier(keys, cache=False)
    t0 = time.perf_counter()
    for t in toks:
        await cold.verify(t, POLICY)
    cold_us = (time.perf_counter() - t0) / len(toks) * 1e6

    warm = make_verifier(keys, cache=True)
    await warm.verify(toks[0], POLICY)
    reps = args.n * 10
    t0 = time.perf_counter()
    for _ in range(reps):
        await warm.verify(toks[0], POLICY)
    warm_us = (time.perf_counter() - t0) / reps * 1e6

    pub = keys._key.key
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    head, body, sig = toks[0].split(".")
    raw_sig = jwt.utils.base64url_decode(sig)
    t0 = time.perf_counter()
    for _ in range(args.n):
        pub.verify(raw_sig, f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    rsa_us = (time.perf_counter() - t0) / args.n * 1e6

    forged = []
    for size in (8000, 4000):
        token = forged_expensive(size)
        us, outcome = await cpu_us_per_forged(make_verifier(keys, cache=True), token, args.n)
        forged.append((len(token), us, outcome))

    decide_us = await decide_per_route(keys, toks[0], args.n * 10)

    print("| measure | us per call |\n|---|---|")
    print(f"| verify, cold (distinct tokens, no cache) | {cold_us:.1f} |")
    print(f"| verify, warm (same token{'' if 'cache' in inspect.signature(TokenVerifier).parameters else ', no cache in this version'}) | {warm_us:.1f} |")
    print(f"| RSA-2048 PKCS1v15 SHA-256 verify alone (cryptography) | {rsa_us:.1f} |")
    for size, us, outcome in forged:
        print(f"| forged {size}-char token, expensive JSON payload, CPU (refused: {outcome}; "
              f"MAX_TOKEN_BYTES {tokens_module.MAX_TOKEN_BYTES}) | {us:.1f} |")
    for route, us in decide_us.items():
        print(f"| decide, warm token, {route} | {'n/a in this version' if us is None else f'{us:.1f}'} |")


CONDITIONS_POLICY = f"""issuers:\n  - user_pool_id: us-east-1_Bench0001\nroutes:
  - {{path: /x, scopes: [a/b]}}
  - {{path: /y, scopes: [a/b], all_scopes: [c/d], client_ids: [c1, c2],
     claims: {{"custom:tenant": acme, environments: {{contains: prod}}}}}}
"""


async def decide_per_route(keys: Keys, token: str, reps: int) -> dict[str, float | None]:
    """decide() for one warm token on a scopes-only route and on a route with conditions."""
    from authz_service.decision import decide
    from authz_service.policy import PolicyError
    from authz_service.request import HttpRequest

    try:
        policy = parse_policy(CONDITIONS_POLICY)
    except PolicyError:  # a version without route conditions
        policy = None
    verifier = make_verifier(keys, cache=True)
    out: dict[str, float | None] = {}
    for label, path in (("route with scopes only", "/x"), ("route with client_ids, all_scopes, 2 claims", "/y")):
        if policy is None:
            out[label] = None
            continue
        request = HttpRequest(method="GET", path=path, segments=(path[1:],), authorization=(f"Bearer {token}",),
                              request_id="", spoofed_identity_headers=())
        assert (await decide(request, policy, verifier)).allowed
        t0 = time.perf_counter()
        for _ in range(reps):
            await decide(request, policy, verifier)
        out[label] = (time.perf_counter() - t0) / reps * 1e6
    return out


if __name__ == "__main__":
    asyncio.run(main())
