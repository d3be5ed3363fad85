"""Native mode's keys: Envoy's jwt_authn verifies with the keys the service holds, fetched from the
service's HTTP port (``/jwks``) every few seconds, so key rotation, outages and retired keys behave
as docs/native.md says, measured here through a real Envoy:

* a token signed by a new key is accepted at once (jwt_authn does not know the kid, so the service
  decides, after its unknown-kid re-fetch), then decided natively once Envoy fetched the service's
  keys again (``--jwks-cache`` seconds at most);
* the issuer down: the service keeps its last good keys, and so does Envoy;
* the service down: Envoy keeps the keys it has, native decisions go on, what needs the service
  answers 503;
* a retired key: tokens it signed that jwt_authn verified before stay accepted natively until they
  expire (its verified-token cache), the one difference of the documented ones a test can show;
  without that cache (``--jwt-cache-size 0``) they are refused as soon as Envoy fetched again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .fake_issuer import FakeIssuer, rsa_key
from .harness import NATIVE, EnvoyProcess, UpstreamProcess, wait_for
from .security_stack import (SecurityStack, envoy_fetches, natively_allowed, start_security_stack,
                             stop_security_stack)

pytestmark = pytest.mark.e2e
JWKS_CACHE = 2  # seconds between Envoy's fetches of the service's keys, here


def native_stack(tmp_path, upstream: UpstreamProcess, envoy_factory, *service_args: str,
                 jwks_cache: int) -> SecurityStack:
    s = start_security_stack(tmp_path, upstream, envoy_factory, *service_args,
                             fake=FakeIssuer("us-east-1_Keys00001").start(), mode=NATIVE)
    s.envoy.stop()
    s.envoy = envoy_factory.native(s.service, s.policy.path, jwks_cache_seconds=jwks_cache)
    return s


@pytest.fixture
def stack(tmp_path, upstream: UpstreamProcess, envoy_factory) -> Iterator[SecurityStack]:
    """Native mode; the service re-reads its issuers' keys every 0.5 s, so a key the issuer retires
    leaves the service within a second, and Envoy fetches the service's every 2 s."""
    s = native_stack(tmp_path, upstream, envoy_factory, "--jwks-refresh-interval", "0.5", jwks_cache=JWKS_CACHE)
    yield s
    stop_security_stack(s)


@pytest.fixture
def default_stack(tmp_path, upstream: UpstreamProcess, envoy_factory) -> Iterator[SecurityStack]:
    """Native mode as shipped: the service refreshes keys every 15 min and re-fetches for an unknown
    kid at most every 10 s; Envoy fetches the service's keys every 5 s."""
    s = native_stack(tmp_path, upstream, envoy_factory, jwks_cache=5)
    yield s
    stop_security_stack(s)


def test_a_new_key_is_accepted_as_in_ext_authz_mode_then_natively(default_stack: SecurityStack) -> None:
    """Tokens of the new key are the service's to decide until Envoy has the key: it re-fetches the
    issuer's keys for the unknown kid (once its 10 s cool-down since the last fetch is over) and
    accepts them, exactly as in ext_authz mode; Envoy's next fetch of its keys makes them native."""
    s, fake = default_stack, default_stack.fake
    assert natively_allowed(s, fake.token())  # the start-up keys are Envoy's too
    fake.keys["kid-2"] = rsa_key("kid-2")
    rotated = time.monotonic()
    token = fake.token(kid="kid-2")
    first = wait_for(lambda: (a := s.send("POST", "/transactions", token)).status != 401 and a, 30,
                     "the new key accepted")
    accepted = time.monotonic() - rotated
    assert first.status == 200 and first.reached_upstream
    assert s.service.sample("authz_jwks_refreshes_total", issuer=fake.pool, trigger="unknown_kid", result="ok") == 1
    wait_for(lambda: natively_allowed(s, token), 30, "the new key accepted natively")
    native = time.monotonic() - rotated
    print(f"\nkey rotation: a token of the new key accepted {accepted:.2f} s after the issuer published it "
          f"(the service's unknown-kid re-fetch, after its cool-down), natively after {native:.2f} s "
          "(Envoy fetches the service's keys every 5 s)")


def test_issuer_down_keeps_the_keys(stack: SecurityStack) -> None:
    s, fake = stack, stack.fake
    token = fake.token()
    assert natively_allowed(s, token)
    fake.stop()
    failures = s.service.total("authz_jwks_refreshes_total", result="error")
    wait_for(lambda: s.service.total("authz_jwks_refreshes_total", result="error") > failures, 30,
             "the service's refresh failing")
    fetched = envoy_fetches(s.envoy)
    wait_for(lambda: envoy_fetches(s.envoy) > fetched, 30, "Envoy fetching the service's keys since")
    fresh = fake.token(jti="never-seen")  # not in jwt_authn's cache: verified with the keys Envoy holds
    assert natively_allowed(s, fresh)
    assert s.check("POST", "/transactions", {"authorization": f"Bearer {fresh}"}).status == 200


def test_service_down_native_decisions_go_on(stack: SecurityStack) -> None:
    s, fake = stack, stack.fake
    token = fake.token()
    assert natively_allowed(s, token)
    s.service.process.stop()
    answer = s.send("POST", "/transactions", fake.token(jti="fresh-while-service-down"))
    assert answer.status == 200  # jwt_authn still holds the keys it fetched
    assert s.send("POST", "/transactions", fake.token(kid="kid-unknown", key=rsa_key("attacker"))).status == 503
    assert s.send("POST", "/transactions").status == 401  # no token: decided natively, no service needed


def test_a_retired_key_stays_valid_for_tokens_envoy_verified_before(stack: SecurityStack) -> None:
    """The documented difference: the service forgets the tokens a retired key signed; jwt_authn's
    verified-token cache keeps them until they expire. A token it had not verified is refused."""
    s, fake = stack, stack.fake
    cached = fake.token(jti="cached")
    assert natively_allowed(s, cached)
    fake.keys = {"kid-2": rsa_key("kid-2")}  # kid-1 retired
    wait_for(lambda: s.check("POST", "/transactions", {"authorization": f"Bearer {cached}"}).status == 401, 30,
             "the service no longer trusting kid-1")
    wait_for_envoys_fetch(s.envoy)
    fresh = fake.token(kid="kid-1", key=rsa_key("kid-1"), jti="never-seen")  # signed by the retired key
    answer = s.send("POST", "/transactions", fresh)
    assert (answer.status, answer.description) == (401, "token is not valid")  # the service's answer
    assert natively_allowed(s, cached)  # the difference: until it expires


def test_without_the_verified_token_cache_a_retired_key_is_refused_everywhere(stack: SecurityStack,
                                                                              envoy_factory) -> None:
    s, fake = stack, stack.fake
    s.envoy.stop()
    s.envoy = envoy_factory.native(s.service, s.policy.path, jwks_cache_seconds=JWKS_CACHE, jwt_cache_size=0)
    s.sent = 0
    cached = fake.token(jti="would-be-cached")
    assert natively_allowed(s, cached)
    fake.keys = {"kid-2": rsa_key("kid-2")}
    wait_for(lambda: s.check("POST", "/transactions", {"authorization": f"Bearer {cached}"}).status == 401, 30,
             "the service no longer trusting kid-1")
    wait_for_envoys_fetch(s.envoy)
    assert s.send("POST", "/transactions", cached).status == 401


def wait_for_envoys_fetch(envoy: EnvoyProcess) -> None:
    """Until Envoy fetched the service's keys twice more: the second fetch began after now."""
    fetched = envoy_fetches(envoy)
    wait_for(lambda: envoy_fetches(envoy) >= fetched + 2, 30, "Envoy fetching the service's keys again")

