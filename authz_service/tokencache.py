"""Verified-token cache: a bounded LRU of tokens whose signature and claims were verified.

Why: an RSA verify plus JOSE parsing costs ~40-60 us, and clients reuse one access token for up to
an hour, so most Checks present a token we have already verified. A hit skips parsing and RSA, but
never trusts a stale decision: the verifier re-checks, on every hit, that the issuer is still in
the *current* policy, that the signing key is still the same key in that issuer's JWKS, that the
token has not expired (same leeway) and that the client is still allowed (see tokens.py).

Keys are a SHA-256 digest of a per-process random salt and the token, not the token: the cache
then holds no bearer credential (a heap dump reveals no token, and without the salt a digest
cannot even be matched against a list of known tokens), entries are small and of fixed key size,
and handing one token's claims to another would need a SHA-256 second preimage. SHA-256 rather
than keyed BLAKE2b because OpenSSL's SHA-256 is ~2x faster here (~0.8 us per ~1 KB token), and
this runs on every Check; the salted state is copied per token rather than rebuilt, which spares
OpenSSL's per-call digest lookup (~2 us under load). Only successful verifications are stored.

Bounded twice: by entries and by (approximate) bytes; the least recently used entry goes first.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .claims import Claims

# Per-entry overhead besides the claim strings, measured with tracemalloc on CPython 3.11
# (OrderedDict slot and link, digest bytes, entry object, Claims object, frozenset): see
# tests/test_tokencache.py::test_byte_accounting_is_not_an_underestimate.
ENTRY_OVERHEAD_BYTES = 450


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One verified token: its claims and the exact key object that verified its signature."""

    claims: Claims
    key: Any  # the PyJWK; a hit requires the JWKS to still hold this very object for the kid
    size: int


def entry_size(claims: Claims) -> int:
    """Approximate bytes one entry holds (strings counted at their real size).

    Custom claims count with their dict and values; their names are the policy's own strings and
    the ``extracted`` set is the policy's, shared by every entry, so neither is counted per entry.
    """
    strings = (claims.issuer, claims.client_id, claims.sub, claims.scope_text, claims.kid, *claims.scopes)
    size = ENTRY_OVERHEAD_BYTES + sum(sys.getsizeof(s) for s in strings)
    if claims.custom:
        size += sys.getsizeof(claims.custom) + sum(_value_size(v) for v in claims.custom.values())
    return size


def _value_size(value: object) -> int:
    if type(value) is tuple:  # a list-of-strings claim
        return sys.getsizeof(value) + sum(sys.getsizeof(v) for v in value)
    return sys.getsizeof(value)


class TokenCache:
    """LRU of verified tokens, bounded by ``max_entries`` and ``max_bytes`` (0 entries disables)."""

    def __init__(self, max_entries: int, max_bytes: int, metrics: Any = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._bytes = 0
        # The salt is hashed once; each digest copies that state (no OpenSSL digest fetch per call).
        self._salted = hashlib.sha256(os.urandom(32))
        self._metrics = metrics
        if metrics is not None:
            self._per_check = metrics.per_check  # hits and misses are counted there (see PerCheck)
            self._entries_gauge = metrics.token_cache_entries
            self._bytes_gauge = metrics.token_cache_bytes
            self._evicted = {r: metrics.token_cache_evictions.labels(r) for r in ("capacity", "expired", "key_removed")}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def digest(self, token: bytes) -> bytes:
        state = self._salted.copy()
        state.update(token)
        return state.digest()

    def get(self, digest: bytes) -> CacheEntry | None:
        """The entry (marked most recently used) or None; counts a hit or a miss."""
        entry = self._entries.get(digest)
        if entry is None:
            if self._metrics is not None:
                self._per_check.cache_misses += 1
            return None
        self._entries.move_to_end(digest)
        if self._metrics is not None:
            self._per_check.cache_hits += 1
        return entry

    def put(self, digest: bytes, claims: Claims, key: Any) -> None:
        if not self.enabled:
            return
        entry = CacheEntry(claims, key, entry_size(claims))
        if entry.size > self.max_bytes:
            return
        old = self._entries.pop(digest, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[digest] = entry
        self._bytes += entry.size
        evicted = 0
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size
            evicted += 1
        if self._metrics is not None:
            if evicted:
                self._evicted["capacity"].inc(evicted)
            self._gauges()

    def discard(self, digest: bytes, reason: str) -> None:
        """Drop one entry a hit found unusable (expired, issuer or key gone)."""
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._bytes -= entry.size
            if self._metrics is not None:
                self._evicted[reason].inc()
                self._gauges()

    def drop_key(self, issuer: str, kid: str) -> int:
        """Drop every entry verified with a key that left the issuer's JWKS (a rare O(n) scan)."""
        doomed = [d for d, e in self._entries.items() if e.claims.kid == kid and e.claims.issuer == issuer]
        for digest in doomed:
            self._bytes -= self._entries.pop(digest).size
        if doomed and self._metrics is not None:
            self._evicted["key_removed"].inc(len(doomed))
            self._gauges()
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        if self._metrics is not None:
            self._gauges()

    def _gauges(self) -> None:
        self._entries_gauge.set(len(self._entries))
        self._bytes_gauge.set(self._bytes)
