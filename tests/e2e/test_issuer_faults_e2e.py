"""Issuer (JWKS) faults through a real Envoy, with a scriptable JWKS endpoint that speaks real HTTP:
down at start, down while serving, slow (a hanging fetch never blocks Checks with cached keys),
500 / HTML / invalid JSON / empty / 10 MB / wrong key types, key rotation, and an unknown-kid flood
that must cause at most one fetch per cool-down."""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .fake_issuer import FakeIssuer, public_jwk, rsa_key
from .harness import UpstreamProcess, http_request, wait_for
from .security_stack import SecurityStack, deny_count, logged, start_security_stack, stop_security_stack
from .stack import Service

pytestmark = pytest.mark.e2e


def readyz(service: Service) -> tuple[int, dict]:
    status, _, body = http_request("GET", f"http://127.0.0.1:{service.http_port}/readyz")
    return status, json.loads(body)


def issuer_status(service: Service, fake: FakeIssuer) -> dict:
    return next(i for i in readyz(service)[1]["issuers"] if i["issuer"] == fake.issuer)


@pytest.fixture(scope="module")
def cooldown_stack(tmp_path_factory, upstream, module_envoy_factory):
    """Default refresh interval and the minimum (10 s) unknown-kid cool-down; started first so the
    cool-down after its start-up fetch runs out while the other tests run."""
    s = start_security_stack(tmp_path_factory.mktemp("cooldown"), upstream, module_envoy_factory,
                             "--unknown-kid-cooldown", "10", fake=FakeIssuer("us-east-1_Flood0001").start())
    yield s
    stop_security_stack(s)


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory, upstream, module_envoy_factory, cooldown_stack):
    """Routine refresh every 0.5 s, so each scripted fault is met by a real fetch within a second."""
    s = start_security_stack(tmp_path_factory.mktemp("fast"), upstream, module_envoy_factory,
                             "--jwks-refresh-interval", "0.5", "--jwks-timeout", "2")
    yield s
    stop_security_stack(s)


def refreshes(service: Service, pool: str, result: str) -> float:
    return sum(service.sample("authz_jwks_refreshes_total", issuer=pool, trigger=t, result=result)
               for t in ("startup", "periodic", "unknown_kid"))


def test_issuer_down_at_start_is_503_then_recovers_by_itself(tmp_path: Path, upstream: UpstreamProcess,
                                                             envoy_factory) -> None:
    fake = FakeIssuer("us-east-1_Late00001")  # not started: its port refuses connections
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake, wait_ready=False)
    try:
        status, body = readyz(stack.service)
        assert status == 503 and body["ready"] is False
        assert issuer_status(stack.service, fake)["keys"] == 0
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 503 and answer.error == "temporarily_unavailable"
        assert answer.headers.get("retry-after") == "5"
        assert answer.reached_upstream == []
        # Tokens of the healthy issuer keep working meanwhile.
        assert stack.send("POST", "/transactions", stack.dev.token("payments-writer")).status == 200
        fake.start()  # the issuer comes back; nobody restarts the service
        wait_for(lambda: readyz(stack.service)[0] == 200, 40, "ready after the issuer returned")
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 200 and len(answer.reached_upstream) == 1
    finally:
        stop_security_stack(stack)


def test_jwks_key_outside_the_key_rules_is_skipped_and_its_tokens_refused(tmp_path: Path, upstream: UpstreamProcess,
                                                                        envoy_factory) -> None:
    """The trusted issuer's JWKS also publishes a 2048-bit key with public exponent 3: that key is
    skipped when the JWKS is parsed (logged with issuer, kid and why), so a token it signs is refused,
    while the good key published next to it keeps serving."""
    fake = FakeIssuer("us-east-1_Weak00001")
    fake.keys["kid-e3"] = rsa_key("exponent-3", public_exponent=3)
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake.start())
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


FAULTS = [
    ("500", "JWKS endpoint answered HTTP 500"),
    ("html", "JWKS is not valid JSON"),
    ("badjson", "JWKS is not valid JSON"),
    ("empty", "JWKS has no usable RS256 signing keys"),
    ("huge", "JWKS larger than"),
    ("wrongtype", "JWKS has no usable RS256 signing keys"),
]


@pytest.mark.parametrize(("kind", "error"), FAULTS, ids=[f[0] for f in FAULTS])
def test_bad_jwks_documents_keep_the_last_good_keys(fast_stack: SecurityStack, kind: str, error: str) -> None:
    s, fake = fast_stack, fast_stack.fake
    fake.script("ok")
    wait_for(lambda: issuer_status(s.service, fake)["last_error"] is None, 10, "a good fetch first")
    errors = refreshes(s.service, fake.pool, "error")
    fake.script(kind)
    wait_for(lambda: refreshes(s.service, fake.pool, "error") > errors, 15, f"a fetch answered with {kind}")
    state = issuer_status(s.service, fake)
    assert error in state["last_error"] and state["keys"] == 1
    assert readyz(s.service)[0] == 200  # still has keys: still ready
    answer = s.send("POST", "/transactions", fake.token())
    assert answer.status == 200, answer.body  # the last good key keeps serving
    forged = s.send("POST", "/transactions", fake.token(key=rsa_key("attacker")))
    assert forged.status == 401  # ... and only that key: a fault never widens what is accepted
    fake.script("ok")


def test_issuer_down_while_serving_keeps_last_good_keys(fast_stack: SecurityStack) -> None:
    s, fake = fast_stack, fast_stack.fake
    token = fake.token()
    assert s.send("POST", "/transactions", token).status == 200
    errors = refreshes(s.service, fake.pool, "error")
    fake.stop()
    try:
        wait_for(lambda: refreshes(s.service, fake.pool, "error") > errors + 1, 15, "failed fetches while down")
        for _ in range(5):
            assert s.send("POST", "/transactions", token).status == 200
        assert readyz(s.service)[0] == 200
        unknown = s.send("POST", "/transactions", fake.token(kid="kid-new", key=rsa_key("kid-new")))
        assert (unknown.status, unknown.description) == (401, "token is not valid")
    finally:
        fake.start()
    errors_ok = refreshes(s.service, fake.pool, "ok")
    wait_for(lambda: refreshes(s.service, fake.pool, "ok") > errors_ok, 70, "a good fetch after the issuer returned")


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
            wait_for(fake.held.is_set, 10, "a fetch hanging at the issuer")
            unknown = fake.token(kid="kid-x", key=rsa_key("kid-x"))
            hanging = pool.submit(s.send, "POST", "/transactions", unknown)
            latencies = sorted(timed() for _ in range(30))
            assert fake.held.is_set(), "the fetch must still be hanging"
            assert not hanging.done() or hanging.result().status in (401, 503)
            fake.release()
            slow = hanging.result(timeout=15)
        # The unknown-kid Check waited for the fetch (bounded by --jwks-timeout) and was refused.
        assert slow.status == 401
        assert not [r for r in slow.reached_upstream if unknown in r["headers"].get("authorization", [""])[0]]
        print(f"\ncached-key requests through Envoy, median of 30: {baseline[15] * 1000:.1f} ms normally, "
              f"{latencies[15] * 1000:.1f} ms while a JWKS fetch hangs (ratio {latencies[15] / baseline[15]:.2f})")
    finally:
        fake.release()
        fake.script("ok")


def test_key_rotation_with_tokens_of_both_keys(fast_stack: SecurityStack) -> None:
    s, fake = fast_stack, fast_stack.fake
    old = fake.token(kid="kid-1")
    fake.keys["kid-2"] = rsa_key("kid-2")  # new key published next to the old one
    new = fake.token(kid="kid-2")
    wait_for(lambda: s.send("POST", "/transactions", new).status == 200, 15, "new key accepted")
    assert s.send("POST", "/transactions", old).status == 200  # both keys valid during the overlap
    del fake.keys["kid-1"]  # old key retired
    try:
        answer = wait_for(lambda: (a := s.send("POST", "/transactions", old)).status == 401 and a, 15,
                          "retired key refused")
        assert answer.description == "token is not valid" and answer.reached_upstream == []
        assert s.send("POST", "/transactions", new).status == 200
    finally:
        fake.keys["kid-1"] = rsa_key("kid-1")


def test_unknown_kid_flood_causes_at_most_one_fetch_per_cooldown(cooldown_stack: SecurityStack) -> None:
    s, fake = cooldown_stack, cooldown_stack.fake
    # Let the start-up fetch's cool-down run out, then flood with random kids from 8 clients.
    time.sleep(max(0.0, s.service.started + 10.5 - time.monotonic()))
    before = fake.fetch_count()
    good = fake.token()
    started = time.monotonic()

    def attack(i: int) -> int:
        kid = secrets.token_urlsafe(12)
        return s.send("POST", "/transactions", fake.token(kid=kid, key=rsa_key("attacker"))).status

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(attack, range(400)))
    elapsed = time.monotonic() - started
    fetches = fake.fetch_count() - before
    assert set(statuses) == {401}
    allowed_fetches = 1 + int(elapsed // 10)
    print(f"\nunknown-kid flood: 400 requests in {elapsed:.1f}s caused {fetches} JWKS fetch(es)")
    assert 1 <= fetches <= allowed_fetches
    assert s.service.sample("authz_jwks_refreshes_total", issuer=fake.pool, trigger="unknown_kid",
                            result="ok") == fetches
    assert s.send("POST", "/transactions", good).status == 200
