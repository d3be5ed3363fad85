"""Micro-benchmark of TokenVerifier.verify in-process (no gRPC, no Envoy): cold and warm.

Cold = every call a distinct valid token (cache disabled), warm = the same token again.
Forged = a token anyone can send: a trusted kid, a signature that verifies under no key, and a
payload that is expensive JSON (the CPU a flood of them costs; run on two versions to compare).
Decide = the whole decision for a warm token, on a route with only scopes and on one with route
conditions (client_ids, all_scopes, two claim conditions): what the conditions add per Check.
Shadow policy = one allowed Check through the pipeline (check.Checker) without a shadow policy, with
one that agrees (a candidate changing another route) and one that disagrees on every Check
(counted, its lines rate-bounded): interleaved rounds, medians.
Decision log = one allowed Check's decision log line, built, JSON-formatted and written to a file
(--decision-log all), against the same allow not logged (the default).
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
    shadow_us = await shadow_per_check(keys, toks[0], args.n * 2)
    log_us = decision_log_per_allow(args.n * 10)

    print("| measure | us per call |\n|---|---|")
    print(f"| verify, cold (distinct tokens, no cache) | {cold_us:.1f} |")
    print(f"| verify, warm (same token{'' if 'cache' in inspect.signature(TokenVerifier).parameters else ', no cache in this version'}) | {warm_us:.1f} |")
    print(f"| RSA-2048 PKCS1v15 SHA-256 verify alone (cryptography) | {rsa_us:.1f} |")
    for size, us, outcome in forged:
        print(f"| forged {size}-char token, expensive JSON payload, CPU (refused: {outcome}; "
              f"MAX_TOKEN_BYTES {tokens_module.MAX_TOKEN_BYTES}) | {us:.1f} |")
    for route, us in decide_us.items():
        print(f"| decide, warm token, {route} | {'n/a in this version' if us is None else f'{us:.1f}'} |")
    for variant, us in shadow_us.items():
        print(f"| Check, warm token, {variant} | {'n/a in this version' if us is None else f'{us:.1f}'} |")
    for mode, us in log_us.items():
        print(f"| decision log, an allowed Check, --decision-log {mode} | {'n/a in this version' if us is None else f'{us:.2f}'} |")


CONDITIONS_POLICY = f"""issuers:\n  - user_pool_id: us-east-1_Bench0001\nroutes:
  - {{path: /x, scopes: [a/b]}}
  - {{path: /y, scopes: [a/b], all_scopes: [c/d], client_ids: [c1, c2],
     claims: {{"custom:tenant": acme, environments: {{contains: prod}}}}}}
"""
BINDING_POLICY = CONDITIONS_POLICY + """  - {path: '/t/{tenant}', scopes: [a/b], claims: {"custom:tenant": {equals_param: tenant}}}
"""
# The same routes with a deny list naming another client and another token: what it costs a Check.
DENY_POLICY = CONDITIONS_POLICY + "deny: {client_ids: [c9], jtis: [0f5a1c9e-8d55-4a54-9a52-0c1b8a0c7d3e]}\n"
DECIDE_CASES = (
    ("route with scopes only", CONDITIONS_POLICY, "/x"),
    ("route with client_ids, all_scopes, 2 claims", CONDITIONS_POLICY, "/y"),
    ("route with scopes and a tenant binding", BINDING_POLICY, "/t/acme"),
    ("route with scopes only, a deny list (1 client, 1 jti)", DENY_POLICY, "/x"),
)


async def decide_per_route(keys: Keys, token: str, reps: int) -> dict[str, float | None]:
    """decide() for one warm token on a scopes-only route, on routes with conditions, and under a
    deny list (n/a on a version that cannot load the policy)."""
    from authz_service.decision import decide
    from authz_service.policy import PolicyError
    from authz_service.request import HttpRequest

    verifier = make_verifier(keys, cache=True)
    out: dict[str, float | None] = {}
    for label, text, path in DECIDE_CASES:
        try:
            policy = parse_policy(text)
        except PolicyError:  # a version without these policy keys
            out[label] = None
            continue
        request = HttpRequest(method="GET", path=path, segments=tuple(path[1:].split("/")),
                              authorization=(f"Bearer {token}",), request_id="", spoofed_identity_headers=())
        assert (await decide(request, policy, verifier)).allowed
        t0 = time.perf_counter()
        for _ in range(reps):
            await decide(request, policy, verifier)
        out[label] = (time.perf_counter() - t0) / reps * 1e6
    return out


SHADOW_VARIANTS = ("no shadow policy", "shadow policy agreeing", "shadow policy disagreeing on every Check")


async def shadow_per_check(keys: Keys, token: str, reps: int, rounds: int = 7) -> dict[str, float | None]:
    """Checker.check of one warm allowed request per SHADOW_VARIANTS, interleaved; medians."""
    import statistics
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from authz_service.check import Checker
    from authz_service.metrics import Metrics
    from authz_service.request import HttpRequest
    from authz_service.response import Answers
    from authz_service.tokencache import TokenCache

    try:
        from authz_service.reloader import PolicyReloader
        from authz_service.shadow import ShadowPolicy
    except ImportError:  # a version without the shadow policy
        return dict.fromkeys(SHADOW_VARIANTS)
    text = "issuers:\n  - user_pool_id: us-east-1_Bench0001\nroutes:\n  - {{path: /x, scopes: [{x}]}}\n" \
           "  - {{path: /y, scopes: [{y}]}}\n"
    serving = parse_policy(text.format(x="a/b", y="a/b"))
    candidates = (None, parse_policy(text.format(x="a/b", y="e/f")), parse_policy(text.format(x="e/f", y="a/b")))
    metrics = Metrics(CollectorRegistry())

    class Serving:
        policy = serving

    def checker(candidate):  # as server.py wires it: a verifier and a cache of its own for the shadow
        shadow = None
        if candidate is not None:
            reloader = PolicyReloader(Path("shadow.yaml"), candidate, metrics.shadow, what="shadow policy")
            shadow = ShadowPolicy(reloader, make_verifier(keys, cache=True), metrics.shadow)
        verifier = TokenVerifier(keys, cache=TokenCache(10_000, 16 << 20, metrics))
        return Checker(Serving(), verifier, Answers("bench"), metrics.per_check, shadow=shadow)

    checkers = [checker(c) for c in candidates]
    request = HttpRequest(method="GET", path="/x", segments=("x",), authorization=(f"Bearer {token}",),
                          request_id="", spoofed_identity_headers=())
    samples: list[list[float]] = [[] for _ in checkers]
    for _ in range(rounds):
        for check, out in zip(checkers, samples):
            assert (await check.check(lambda raw: raw, request, lambda answer, decision: answer)).allowed
            t0 = time.perf_counter()
            for _ in range(reps):
                await check.check(lambda raw: raw, request, lambda answer, decision: answer)
            out.append((time.perf_counter() - t0) / reps * 1e6)
    assert metrics.registry.get_sample_value("authz_shadow_disagreements_total", {
        "route": "ANY /x", "decision": "allow", "reason": "allowed", "shadow_decision": "deny",
        "shadow_reason": "insufficient_scope"}), "the disagreeing candidate did not disagree"
    return {variant: statistics.median(out) for variant, out in zip(SHADOW_VARIANTS, samples)}


def decision_log_per_allow(reps: int) -> dict[str, float | None]:
    """DecisionLog.record for one allow: written (all: a JSON line to the log stream as the service
    sets it up, here a file) and not written (deny, the default)."""
    import contextlib
    import tempfile

    try:
        from authz_service import logs
        from authz_service.claims import Claims
        from authz_service.decision import Decision, Reason
        from authz_service.decisionlog import DecisionLog, DecisionLogMode
        from authz_service.request import HttpRequest
    except ImportError:  # a version without the decision log
        return {"all": None, "deny": None}
    route = POLICY.routes[0]
    claims = Claims(issuer=ISSUER, client_id="1example23456789abcdefghij", sub="1example23456789abcdefghij",
                    scopes=frozenset({"a/b"}), scope_text="a/b", exp=2_000_000_000, kid="k1")
    decision = Decision(True, Reason.ALLOWED, route=route, claims=claims)
    request = HttpRequest(method="GET", path="/x", segments=("x",), authorization=(), spoofed_identity_headers=(),
                          request_id="6f1c6a1e-4c1b-4a4e-9d5c-2b8f3e1d7a90")
    out: dict[str, float | None] = {}
    with tempfile.TemporaryFile("w") as sink:
        with contextlib.redirect_stdout(sink):
            logs.configure("INFO")  # the service's log stream, on the file
        for mode in (DecisionLogMode.ALL, DecisionLogMode.DENY):
            record = DecisionLog(mode).record
            t0 = time.perf_counter()
            for _ in range(reps):
                record(decision, request, POLICY)
            out[mode.value] = (time.perf_counter() - t0) / reps * 1e6
        sink.flush()
        assert sink.tell() > 0, "no decision log line was written"
    return out


if __name__ == "__main__":
    asyncio.run(main())
