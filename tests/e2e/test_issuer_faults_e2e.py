"""Issuer (JWKS) faults through a real Envoy, with a scriptable JWKS endpoint that speaks real HTTP:
down at start, down while serving, slow (a hanging fetch never blocks Checks with cached keys),
500 / HTML / invalid JSON / empty / 10 MB / a gzip bomb / ten thousand entries / a redirect / an
unasked 304 / wrong key types / a symmetric key, key rotation, and an unknown-kid flood that must
cause at most one fetch per cool-down."""

from __future__ import annotations

import base64
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest

from authz_service.cognito import access_claims

from .fake_issuer import FakeIssuer, public_jwk, rsa_key
from .harness import NATIVE, UpstreamProcess, http_request, wait_for
from .security_stack import bearer, SecurityStack, deny_count, logged, start_security_stack, stop_security_stack
from .stack import Service

pytestmark = pytest.mark.e2e


def readyz(service: Service) -> tuple[int, dict]:
    status, _, body = http_request("GET", f"http://127.0.0.1:{service.http_port}/readyz")
    return status, json.loads(body)


def issuer_status(service: Service, fake: FakeIssuer) -> dict:
    return next(i for i in readyz(service)[1]["issuers"] if i["issuer"] == fake.issuer)


@pytest.fixture(scope="module")
def cooldown_stack(tmp_path_factory, upstream, module_envoy_factory, mode):
    """Default refresh interval and the minimum (10 s) unknown-kid cool-down."""
    s = start_security_stack(tmp_path_factory.mktemp("cooldown"), upstream, module_envoy_factory,
                             "--unknown-kid-cooldown", "10", fake=FakeIssuer("us-east-1_Flood0001").start(),
                             mode=mode)
    yield s
    stop_security_stack(s)


@pytest.fixture(scope="module")
def fast_stack_shared(tmp_path_factory, upstream, module_envoy_factory, mode):
    """Routine refresh every 0.5 s, so each scripted fault is met by a real fetch within a second."""
    s = start_security_stack(tmp_path_factory.mktemp("fast"), upstream, module_envoy_factory,
                             "--jwks-refresh-interval", "0.5", "--jwks-timeout", "2", mode=mode)
    yield s
    stop_security_stack(s)


@pytest.fixture
def fast_stack(fast_stack_shared: SecurityStack) -> SecurityStack:
    """The shared fast stack as every test here expects it, whatever ran before (tests run in any
    order): the issuer serves its one original key, and the service has fetched exactly that."""
    s, fake = fast_stack_shared, fast_stack_shared.fake
    fake.release()
    fake.script("ok")
    fake.keys = {"kid-1": rsa_key("kid-1")}
    if not fake.running:
        fake.start()
    fetched = refreshes(s.service, fake.pool, "ok")
    # Fetches never overlap, so the second one to succeed from now on started after the reset.
    wait_for(lambda: refreshes(s.service, fake.pool, "ok") >= fetched + 2
             and (state := issuer_status(s.service, fake))["keys"] == 1 and state["last_error"] is None,
             60, "the service fetched the original key set")
    return s


def refreshes(service: Service, pool: str, result: str) -> float:
    return sum(service.sample("authz_jwks_refreshes_total", issuer=pool, trigger=t, result=result)
               for t in ("startup", "periodic", "unknown_kid"))


def test_issuer_down_at_start_is_503_then_recovers_by_itself(tmp_path: Path, upstream: UpstreamProcess,
                                                             envoy_factory, mode: str) -> None:
    fake = FakeIssuer("us-east-1_Late00001")  # not started: its port refuses connections
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake, wait_ready=False, mode=mode)
    try:
        status, body = readyz(stack.service)
        assert status == 503 and body["ready"] is False
        assert issuer_status(stack.service, fake)["keys"] == 0
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 503 and answer.reached_upstream == []
        if mode == "grpc":
            assert answer.error == "temporarily_unavailable" and answer.headers.get("retry-after") == "5"
        else:
            # Envoy's HTTP mode treats any 5xx from the authorization server as an error of the
            # call: status_on_error (503) with no body. The service itself answered as in gRPC mode.
            assert answer.body == b"" and stack.check("POST", "/transactions", bearer(fake.token())).status == 503
        # Tokens of the healthy issuer keep working meanwhile.
        assert stack.send("POST", "/transactions", stack.dev.token("payments-writer")).status == 200
        fake.start()  # the issuer comes back; nobody restarts the service
        # Bounded by the service's retry backoff (doubling up to 60 s, +-20 %), not by the test.
        wait_for(lambda: readyz(stack.service)[0] == 200, 90, "ready after the issuer returned")
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 200 and len(answer.reached_upstream) == 1
    finally:
        stop_security_stack(stack)


def test_jwks_key_outside_the_key_rules_is_skipped_and_its_tokens_refused(tmp_path: Path, upstream: UpstreamProcess,
                                                                        envoy_factory, mode: str) -> None:
    """The trusted issuer's JWKS also publishes a 2048-bit key with public exponent 3: that key is
    skipped when the JWKS is parsed (logged with issuer, kid and why), so a token it signs is refused,
    while the good key published next to it keeps serving."""
    fake = FakeIssuer("us-east-1_Weak00001")
    fake.keys["kid-e3"] = rsa_key("exponent-3", public_exponent=3)
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake.start(), mode=mode)
    try:
        unknown = deny_count(stack, "unknown_key")
        answer = stack.send("POST", "/transactions", fake.token(kid="kid-e3"))
        assert (answer.status, answer.error) == (401, "invalid_token"), answer.body
        assert issuer_status(stack.service, fake)["keys"] == 1
        assert deny_count(stack, "unknown_key") == unknown + 1
        assert answer.reached_upstream == []
        skipped = logged(stack, msg="jwks key skipped", kid="kid-e3")
        assert skipped and skipped[0]["issuer"] == fake.issuer and "exponent" in skipped[0]["reason"]
        assert skipped[0]["level"] == "warning"
        assert public_jwk(fake.keys["kid-e3"], "kid-e3")["n"] not in stack.service.process.log_text()  # no key material
        assert stack.send("POST", "/transactions", fake.token()).status == 200
    finally:
        stop_security_stack(stack)


SYMMETRIC_SECRET = b"a shared secret published by mistake"


def test_a_symmetric_key_in_the_jwks_never_verifies_a_token(tmp_path: Path, upstream: UpstreamProcess,
                                                             envoy_factory, enforcing_mode: str) -> None:
    """The trusted issuer's JWKS also publishes an HS256 key (kty oct, with its k). A verifier that
    took it would accept any token HMAC-signed with that public secret; in native mode the keys
    Envoy's jwt_authn verifies with are the service's, so the oct key must not reach them either."""
    fake = FakeIssuer("us-east-1_Symm00001")
    fake.also_published.append({"kty": "oct", "kid": "kid-hs", "alg": "HS256", "use": "sig",
                                "k": base64.urlsafe_b64encode(SYMMETRIC_SECRET).rstrip(b"=").decode()})
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake.start(), mode=enforcing_mode)
    try:
        claims = access_claims(fake.issuer, "payments-writer", "transactions/post")
        for kid in ("kid-hs", "kid-1"):
            token = jwt.encode(claims, SYMMETRIC_SECRET, algorithm="HS256", headers={"kid": kid})
            answer = stack.send("POST", "/transactions", token)
            assert (answer.status, answer.error) == (401, "invalid_token"), (kid, answer.body)
            assert answer.reached_upstream == []
        assert issuer_status(stack.service, fake)["keys"] == 1
        skipped = logged(stack, msg="jwks key skipped", kid="kid-hs")
        assert skipped and skipped[0]["reason"] == "not an RSA key"
        assert fake.also_published[0]["k"] not in stack.service.process.log_text()  # no key material
        if enforcing_mode == NATIVE:  # what Envoy's jwt_authn is given: the RSA key alone
            status, _, body = http_request("GET", f"http://127.0.0.1:{stack.service.http_port}/jwks?iss={fake.issuer}")
            assert status == 200 and [key["kid"] for key in json.loads(body)["keys"]] == ["kid-1"]
        assert stack.send("POST", "/transactions", fake.token()).status == 200
    finally:
        stop_security_stack(stack)


FAULTS = [
    ("500", "JWKS endpoint answered HTTP 500"),
    ("html", "JWKS is not valid JSON"),
    ("badjson", "JWKS is not valid JSON"),
    ("empty", "JWKS has no usable RS256 signing keys"),
    ("huge", "JWKS larger than"),
    ("wrongtype", "JWKS has no usable RS256 signing keys"),
    ("many", "JWKS has 10000 keys (at most 100 accepted)"),
    ("gzipbomb", "JWKS larger than 524288 bytes"),
    ("redirect", "JWKS endpoint answered HTTP 302"),
    ("emptybody", "JWKS is not valid JSON"),
    ("304", "JWKS endpoint answered HTTP 304"),
]


@pytest.mark.parametrize(("kind", "error"), FAULTS, ids=[f[0] for f in FAULTS])
def test_bad_jwks_documents_keep_the_last_good_keys(fast_stack: SecurityStack, kind: str, error: str) -> None:
    s, fake = fast_stack, fast_stack.fake
    fake.script(kind)
    # The fault's own error (on a busy machine a fetch may also time out first: that is not this fault).
    state = wait_for(lambda: (st := issuer_status(s.service, fake))["last_error"] and error in st["last_error"]
                     and st, 60, f"a fetch answered with {kind}")
    assert error in state["last_error"] and state["keys"] == 1
    assert readyz(s.service)[0] == 200  # still has keys: still ready
    answer = s.send("POST", "/transactions", fake.token())
    assert answer.status == 200, answer.body  # the last good key keeps serving
    forged = s.send("POST", "/transactions", fake.token(key=rsa_key("attacker")))
    assert forged.status == 401  # ... and only that key: a fault never widens what is accepted


def test_issuer_down_while_serving_keeps_last_good_keys(fast_stack: SecurityStack) -> None:
    s, fake = fast_stack, fast_stack.fake
    token = fake.token()
    assert s.send("POST", "/transactions", token).status == 200
    errors = refreshes(s.service, fake.pool, "error")
    fake.stop()
    try:
        wait_for(lambda: refreshes(s.service, fake.pool, "error") > errors + 1, 60, "failed fetches while down")
        for _ in range(5):
            assert s.send("POST", "/transactions", token).status == 200
        assert readyz(s.service)[0] == 200
        unknown = s.send("POST", "/transactions", fake.token(kid="kid-new", key=rsa_key("kid-new")))
        assert (unknown.status, unknown.description) == (401, "token is not valid")
    finally:
        fake.start()
    errors_ok = refreshes(s.service, fake.pool, "ok")
    wait_for(lambda: refreshes(s.service, fake.pool, "ok") > errors_ok, 90, "a good fetch after the issuer returned")


def test_slow_issuer_never_blocks_checks_with_cached_keys(fast_stack: SecurityStack) -> None:
    """While a JWKS fetch hangs, Checks with cached keys complete: they finish BEFORE we release it."""
    s, fake = fast_stack, fast_stack.fake
    good = fake.token()

    def timed() -> float:
        t0 = time.perf_counter()
        assert s.send("POST", "/transactions", good).status == 200
        return time.perf_counter() - t0

    baseline = sorted(timed() for _ in range(30))
    fake.hold()  # the next fetch (periodic or unknown-kid) hangs until release()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            wait_for(fake.held.is_set, 60, "a fetch hanging at the issuer")
            unknown = fake.token(kid="kid-x", key=rsa_key("kid-x"))
            hanging = pool.submit(s.send, "POST", "/transactions", unknown)
            latencies = sorted(timed() for _ in range(30))
            assert fake.held.is_set(), "the fetch must still be hanging"
            assert not hanging.done() or hanging.result().status in (401, 503)
            fake.release()
            slow = hanging.result(timeout=60)
        # The unknown-kid Check waited for the fetch (bounded by --jwks-timeout) and was refused.
        assert slow.status == 401
        assert not [r for r in slow.reached_upstream if unknown in r["headers"].get("authorization", [""])[0]]
        print(f"\ncached-key requests through Envoy, median of 30: {baseline[15] * 1000:.1f} ms normally, "
              f"{latencies[15] * 1000:.1f} ms while a JWKS fetch hangs (ratio {latencies[15] / baseline[15]:.2f})")
    finally:
        fake.release()


def test_a_jwks_body_that_stops_coming_is_a_timeout_and_keeps_the_keys(fast_stack: SecurityStack) -> None:
    """Slow loris: the headers and half the JWKS, then nothing. --jwks-timeout (2 s here) bounds the
    whole fetch, body included; the keys held keep serving meanwhile."""
    s, fake = fast_stack, fast_stack.fake
    fake.hold("trickle")
    try:
        wait_for(fake.held.is_set, 60, "a fetch whose body stopped half way")
        state = wait_for(lambda: (st := issuer_status(s.service, fake))["last_error"] == "timed out after 2s" and st,
                         60, "the fetch timed out")
        assert state["keys"] == 1
        assert s.send("POST", "/transactions", fake.token()).status == 200
    finally:
        fake.release()


def test_key_rotation_with_tokens_of_both_keys(fast_stack: SecurityStack) -> None:
    s, fake = fast_stack, fast_stack.fake
    old = fake.token(kid="kid-1")
    fake.keys["kid-2"] = rsa_key("kid-2")  # new key published next to the old one
    new = fake.token(kid="kid-2")
    wait_for(lambda: s.send("POST", "/transactions", new).status == 200, 60, "new key accepted")
    assert s.send("POST", "/transactions", old).status == 200  # both keys valid during the overlap
    del fake.keys["kid-1"]  # old key retired
    answer = wait_for(lambda: (a := s.send("POST", "/transactions", old)).status == 401 and a, 60,
                      "retired key refused")
    assert answer.description == "token is not valid" and answer.reached_upstream == []
    assert s.send("POST", "/transactions", new).status == 200


def test_unknown_kid_flood_causes_at_most_one_fetch_per_cooldown(cooldown_stack: SecurityStack) -> None:
    s, fake = cooldown_stack, cooldown_stack.fake
    before = fake.fetch_count()
    good = fake.token()
    statuses: list[int] = []

    def attack(i: int = 0) -> int:
        kid = secrets.token_urlsafe(12)
        return s.send("POST", "/transactions", fake.token(kid=kid, key=rsa_key("attacker"))).status

    # The flood begins one request at a time until one causes the first re-fetch: the cool-down
    # runs from the start-up fetch, whose moment only the service knows. ``first`` is when that
    # request was sent, so no later fetch may start before first + 10 s.
    def one_attack_until_fetched() -> float | None:
        sent = time.monotonic()
        statuses.append(attack())
        return sent if fake.fetch_count() > before else None

    first = wait_for(one_attack_until_fetched, 60, "the first unknown-kid re-fetch", poll=0.2)
    # Then 400 more from 8 clients at once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses += pool.map(attack, range(400))
    elapsed = time.monotonic() - first
    fetches = fake.fetch_count() - before
    assert set(statuses) == {401}
    allowed_fetches = 1 + int(elapsed // 10)
    print(f"\nunknown-kid flood: {len(statuses)} requests in {elapsed:.1f}s after the first re-fetch caused "
          f"{fetches} JWKS fetch(es)")
    assert 1 <= fetches <= allowed_fetches
    assert s.service.sample("authz_jwks_refreshes_total", issuer=fake.pool, trigger="unknown_kid",
                            result="ok") == fetches
    assert s.send("POST", "/transactions", good).status == 200
