"""The verified-token cache: every rule a hit must still enforce, the bounds, and the metrics."""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.api_jwk import PyJWK
from prometheus_client import CollectorRegistry

from authz_service.claims import Claims
from authz_service.metrics import Metrics
from authz_service.policy import Issuer, Policy, parse_policy
from authz_service.tokencache import TokenCache, entry_size
from authz_service.tokens import Failure, TokenError, TokenVerifier

from .conftest import ISSUER, SigningKey, make_key
from .conftest import MemoryKeys

POOL = "us-east-1_Test00001"


def policy(client_ids: str = "[client-a, client-b]", pool: str = POOL) -> Policy:
    return parse_policy(
        f"issuers:\n  - user_pool_id: {pool}\n    client_ids: {client_ids}\n"
        "routes:\n  - path: /x\n    scopes: [transactions/post]\n"
    )


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def lookups(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("authz_token_cache_lookups_total", {"result": result}) or 0.0


def make(keys: MemoryKeys, *, size: int = 100, max_bytes: int = 1 << 20, leeway: float = 60, clock=time.time):
    metrics = Metrics(CollectorRegistry())
    cache = TokenCache(size, max_bytes, metrics)
    return TokenVerifier(keys, leeway=leeway, clock=clock, cache=cache), cache, metrics


async def failure(verifier: TokenVerifier, token: str, pol: Policy) -> Failure:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token, pol)
    return caught.value.failure


async def test_second_use_is_a_hit_with_the_same_claims(key_a: SigningKey) -> None:
    verifier, cache, metrics = make(MemoryKeys(key_a))
    token = key_a.token()
    first = await verifier.verify(token, policy())
    assert (lookups(metrics, "hit"), lookups(metrics, "miss"), len(cache)) == (0, 1, 1)
    second = await verifier.verify(token, policy())
    assert second == first
    assert (lookups(metrics, "hit"), lookups(metrics, "miss")) == (1, 1)
    assert metrics.registry.get_sample_value("authz_token_cache_entries") == 1


async def test_a_hit_does_not_parse_or_verify_again(key_a: SigningKey) -> None:
    # The cached object is returned as is: proof that no second verification produced new claims.
    verifier, _, _ = make(MemoryKeys(key_a))
    token = key_a.token()
    assert await verifier.verify(token, policy()) is await verifier.verify(token, policy())


async def test_expired_cached_token_is_denied_expired_with_leeway(key_a: SigningKey) -> None:
    clock = Clock()
    verifier, cache, metrics = make(MemoryKeys(key_a), leeway=60, clock=clock)
    exp = int(clock.now) + 100
    token = key_a.token(exp=exp)
    await verifier.verify(token, policy())
    clock.now = exp + 59  # inside the leeway: still fine, and served from the cache
    await verifier.verify(token, policy())
    assert lookups(metrics, "hit") == 1
    clock.now = exp + 60  # PyJWT's rule, kept: exp <= now - leeway is expired
    assert await failure(verifier, token, policy()) is Failure.EXPIRED
    assert len(cache) == 0  # an expired token never becomes valid again
    assert metrics.registry.get_sample_value("authz_token_cache_evictions_total", {"reason": "expired"}) == 1


async def test_zero_leeway_on_a_hit(key_a: SigningKey) -> None:
    clock = Clock()
    verifier, _, _ = make(MemoryKeys(key_a), leeway=0, clock=clock)
    exp = int(clock.now) + 10
    token = key_a.token(exp=exp)
    await verifier.verify(token, policy())
    clock.now = exp
    assert await failure(verifier, token, policy()) is Failure.EXPIRED


async def test_issuer_removed_from_current_policy_is_unknown_key(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    verifier, cache, _ = make(keys)
    token = key_a.token()
    await verifier.verify(token, policy())
    other = policy(pool="us-east-1_Other0001")
    assert ISSUER not in other.issuers_by_iss
    keys.publish(other.issuers[0].issuer, key_b)
    # No issuer of the policy in force publishes the token's kid any more.
    assert await failure(verifier, token, other) is Failure.UNKNOWN_KEY
    assert len(cache) == 0


async def test_client_no_longer_allowed_after_reload_then_allowed_again(key_a: SigningKey) -> None:
    verifier, cache, metrics = make(MemoryKeys(key_a))
    token = key_a.token()
    await verifier.verify(token, policy("[client-a]"))
    assert await failure(verifier, token, policy("[client-b]")) is Failure.CLIENT_NOT_ALLOWED
    assert lookups(metrics, "hit") == 1  # decided on the hit, against the new Issuer object
    claims = await verifier.verify(token, policy("[client-a]"))
    assert claims.client_id == "client-a" and len(cache) == 1


async def test_any_client_policy_then_allow_list(key_a: SigningKey) -> None:
    verifier, _, _ = make(MemoryKeys(key_a))
    token = key_a.token(client_id="client-z")
    open_policy = parse_policy(f"issuers:\n  - user_pool_id: {POOL}\nroutes:\n  - path: /x\n    scopes: [a]\n")
    await verifier.verify(token, open_policy)
    assert await failure(verifier, token, policy()) is Failure.CLIENT_NOT_ALLOWED


async def test_key_gone_from_jwks_is_unknown_key(key_a: SigningKey, key_b: SigningKey) -> None:
    keys = MemoryKeys(key_a, key_b)
    verifier, cache, _ = make(keys)
    token = key_a.token()
    await verifier.verify(token, policy())
    del keys.keys[key_a.kid]
    assert await failure(verifier, token, policy()) is Failure.UNKNOWN_KEY
    assert len(cache) == 0


async def test_key_replaced_under_the_same_kid_verifies_again(key_a: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    verifier, _, _ = make(keys)
    token = key_a.token()
    await verifier.verify(token, policy())
    keys.keys[key_a.kid] = PyJWK(make_key(key_a.kid).jwk())  # same kid, other key material
    assert await failure(verifier, token, policy()) is Failure.BAD_SIGNATURE


async def test_same_material_new_object_is_a_miss_that_reverifies(key_a: SigningKey) -> None:
    keys = MemoryKeys(key_a)
    verifier, _, metrics = make(keys)
    token = key_a.token()
    await verifier.verify(token, policy())
    keys.keys[key_a.kid] = PyJWK(key_a.jwk())
    await verifier.verify(token, policy())
    assert lookups(metrics, "hit") == 1 and lookups(metrics, "miss") == 1  # hit found, refused, verified


async def test_drop_key_removes_only_that_issuers_kid(key_a: SigningKey, key_b: SigningKey) -> None:
    verifier, cache, metrics = make(MemoryKeys(key_a, key_b))
    await verifier.verify(key_a.token(), policy())
    await verifier.verify(key_a.token(), policy())
    await verifier.verify(key_b.token(), policy())
    assert cache.drop_key("https://elsewhere", key_a.kid) == 0
    assert cache.drop_key(ISSUER, key_a.kid) == 2
    assert len(cache) == 1
    assert metrics.registry.get_sample_value("authz_token_cache_evictions_total", {"reason": "key_removed"}) == 2


async def test_failures_are_not_cached(key_a: SigningKey) -> None:
    verifier, cache, _ = make(MemoryKeys(key_a))
    for token in (key_a.token(client_id="client-z"), key_a.token(token_use="id"), key_a.token() + "x",
                  key_a.token(exp=int(time.time()) - 600)):
        with pytest.raises(TokenError):
            await verifier.verify(token, policy())
    assert len(cache) == 0 and cache.held_bytes == 0


async def test_bounded_by_entries_lru(key_a: SigningKey) -> None:
    verifier, cache, metrics = make(MemoryKeys(key_a), size=3)
    tokens = [key_a.token() for _ in range(4)]
    for t in tokens[:3]:
        await verifier.verify(t, policy())
    await verifier.verify(tokens[0], policy())  # most recently used now
    await verifier.verify(tokens[3], policy())  # evicts tokens[1], the least recently used
    assert len(cache) == 3
    assert cache.get(cache.digest(tokens[1].encode())) is None
    assert cache.get(cache.digest(tokens[0].encode())) is not None
    assert metrics.registry.get_sample_value("authz_token_cache_evictions_total", {"reason": "capacity"}) == 1


async def test_bounded_by_bytes(key_a: SigningKey) -> None:
    probe = await TokenVerifier(MemoryKeys(key_a)).verify(key_a.token(), policy())
    one = entry_size(probe)
    verifier, cache, metrics = make(MemoryKeys(key_a), size=1000, max_bytes=one * 2 + one // 2)
    for _ in range(5):
        await verifier.verify(key_a.token(), policy())
    assert len(cache) == 2 and cache.held_bytes == 2 * one
    assert metrics.registry.get_sample_value("authz_token_cache_bytes") == 2 * one


async def test_entry_larger_than_the_byte_limit_is_not_stored(key_a: SigningKey) -> None:
    verifier, cache, _ = make(MemoryKeys(key_a), max_bytes=100)
    await verifier.verify(key_a.token(), policy())
    assert len(cache) == 0


@pytest.mark.parametrize(("size", "max_bytes"), [(0, 1 << 20), (100, 0)])
async def test_zero_disables_the_cache(key_a: SigningKey, size: int, max_bytes: int) -> None:
    verifier, cache, metrics = make(MemoryKeys(key_a), size=size, max_bytes=max_bytes)
    token = key_a.token()
    await verifier.verify(token, policy())
    await verifier.verify(token, policy())
    assert len(cache) == 0 and lookups(metrics, "hit") == 0 and lookups(metrics, "miss") == 0


async def test_keys_are_keyed_digests_not_tokens(key_a: SigningKey) -> None:
    verifier, cache, _ = make(MemoryKeys(key_a))
    token = key_a.token()
    await verifier.verify(token, policy())
    (digest,) = cache._entries
    assert len(digest) == 32 and token.encode() not in digest
    assert TokenCache(10, 1 << 20).digest(token.encode()) != digest  # per-process secret key


def test_byte_accounting_is_not_an_underestimate(key_a: SigningKey) -> None:
    """ENTRY_OVERHEAD_BYTES must cover what an entry really allocates, so the bytes bound holds."""
    cache = TokenCache(10_000, 1 << 30)
    key = object()
    n = 2000
    claims = [
        Claims(ISSUER, f"client-{i:06d}", f"sub-{i:06d}-" + "s" * 30, frozenset({f"res/scope{i}", "res/read"}),
               f"res/scope{i} res/read", 2_000_000_000, "kid-a")
        for i in range(n)
    ]
    digests = [cache.digest(str(i).encode()) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for d, c in zip(digests, claims):
        cache.put(d, c, key)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # What the cache holds alive: its own structures plus the claims (built outside, so count them).
    held = used + sum(sum(sys.getsizeof(x) for x in (c, c.client_id, c.sub, c.scope_text, c.scopes,
                                                                  *c.scopes)) for c in claims)
    held += sum(sys.getsizeof(d) for d in digests)
    assert cache.held_bytes >= held * 0.9, (cache.held_bytes / n, held / n)
    assert cache.held_bytes <= held * 2, (cache.held_bytes / n, held / n)  # and not wildly pessimistic


# --- TokenVerifier.cached: the Check path's lookup straight from the Authorization header ---------


async def test_cached_answers_for_a_verified_token_in_any_scheme_case(key_a: SigningKey) -> None:
    verifier, _, metrics = make(MemoryKeys(key_a))
    token = key_a.token()
    assert verifier.cached((f"Bearer {token}",), policy()) is None  # never verified yet: a miss
    claims = await verifier.verify_uncached(token, policy())
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert verifier.cached((f"{scheme} {token}",), policy()) == claims
    assert (lookups(metrics, "hit"), lookups(metrics, "miss")) == (4, 1)


@pytest.mark.parametrize("shape", ["two values", "double space", "comma", "trailing space", "basic", "no space",
                                   "tab", "other token"])
async def test_cached_never_answers_for_credentials_bearer_token_would_refuse(key_a: SigningKey, shape: str) -> None:
    from authz_service.tokens import bearer_token

    verifier, _, _ = make(MemoryKeys(key_a))
    token = key_a.token()
    await verifier.verify_uncached(token, policy())
    values = {
        "two values": (f"Bearer {token}", f"Bearer {token}"), "double space": (f"Bearer  {token}",),
        "comma": (f"Bearer {token},",), "trailing space": (f"Bearer {token} ",), "basic": (f"Basic {token}",),
        "no space": (f"Bearer{token}",), "tab": (f"Bearer\t{token}",), "other token": (f"Bearer {key_a.token()}x",),
    }[shape]
    assert verifier.cached(values, policy()) is None
    try:
        assert bearer_token(values) != token  # the slow path sees no such token either ...
    except TokenError as exc:
        assert exc.failure is Failure.BAD_REQUEST  # ... or refuses the header outright


async def test_cached_enforces_expiry_like_verify(key_a: SigningKey) -> None:
    clock = Clock()
    verifier, cache, _ = make(MemoryKeys(key_a), clock=clock, leeway=0)
    token = key_a.token(exp=int(clock.now) + 30)
    await verifier.verify_uncached(token, policy())
    clock.now += 31
    with pytest.raises(TokenError) as caught:
        verifier.cached((f"Bearer {token}",), policy())
    assert caught.value.failure is Failure.EXPIRED
    assert len(cache) == 0  # dropped: it can never become valid again


async def test_cached_is_none_without_a_cache(key_a: SigningKey) -> None:
    verifier = TokenVerifier(MemoryKeys(key_a))
    token = key_a.token()
    await verifier.verify(token, policy())
    assert verifier.cached((f"Bearer {token}",), policy()) is None


_TOKENS: dict[str, str] = {}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(["Bearer ", "bearer ", "Bearer", "Bearer  ", "Basic ", " Bearer ", "Bearer\t",
                               "BEARER ", "Bearer\u00a0", ""]),
       suffix=st.sampled_from(["", " ", ",", ", Bearer x", "\n", "=", "\u00e9"]),
       extra=st.sampled_from([(), ("Bearer x",), ("",)]))
async def test_cached_hits_only_what_bearer_token_would_accept(key_a: SigningKey, prefix, suffix, extra) -> None:
    """A hit must mean bearer_token() would have returned exactly the verified token: the fast path
    may skip the header checks only because they could not have failed."""
    from authz_service.tokens import bearer_token

    verifier, _, _ = make(MemoryKeys(key_a))
    token = _TOKENS.setdefault("t", key_a.token())
    await verifier.verify_uncached(token, policy())
    values = (prefix + token + suffix, *extra)
    hit = verifier.cached(values, policy())
    try:
        parsed = bearer_token(values)
    except TokenError:
        parsed = None
    assert (hit is not None) == (parsed == token)


def test_digest_is_salted_per_process_and_stable_within_it() -> None:
    import hashlib

    token = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    one, other = TokenCache(10, 1 << 20), TokenCache(10, 1 << 20)
    assert one.digest(token) == one.digest(token)  # the salted state is copied, never consumed
    assert one.digest(token) != other.digest(token)  # a different salt per cache (per process)
    assert one.digest(token) != hashlib.sha256(token).digest()  # not matchable against known tokens
    assert len(one.digest(token)) == 32 and one.digest(token) != one.digest(token + b"x")


def test_entry_size_counts_custom_claims_but_not_the_policys_names() -> None:
    from authz_service.claims import NO_CUSTOM_CLAIMS

    names = frozenset({"tenant", "envs"})
    plain = Claims(ISSUER, "c", "s", frozenset({"a/b"}), "a/b", 2_000_000_000, "kid-a")
    assert plain.custom is NO_CUSTOM_CLAIMS
    custom = {"tenant": "t" * 1000, "envs": ("dev", "prod" * 100)}
    rich = Claims(ISSUER, "c", "s", frozenset({"a/b"}), "a/b", 2_000_000_000, "kid-a", custom, names)
    extra = entry_size(rich) - entry_size(plain)
    held = (sys.getsizeof(custom) + sys.getsizeof(custom["tenant"]) + sys.getsizeof(custom["envs"])
            + sys.getsizeof("dev") + sys.getsizeof("prod" * 100))
    assert extra == held


async def test_a_cached_token_read_for_fewer_claim_names_is_verified_again_and_replaced(key_a: SigningKey) -> None:
    verifier, cache, _ = make(MemoryKeys(key_a))
    token = key_a.token(tenant="acme")
    plain = await verifier.verify(token, policy())
    assert plain.custom == {} and plain.extracted == frozenset()
    with_claims = parse_policy(f"issuers:\n  - user_pool_id: {POOL}\nroutes:\n"
                               "  - {path: /x, scopes: [transactions/post], claims: {tenant: acme}}\n")
    claims = await verifier.verify(token, with_claims)
    assert claims.custom == {"tenant": "acme"} and claims.extracted is with_claims.claim_names
    assert len(cache) == 1 and next(iter(cache._entries.values())).claims is claims
    assert await verifier.verify(token, policy()) is claims  # more names than needed: a plain hit
