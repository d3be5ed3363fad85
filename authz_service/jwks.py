"""Background JWKS cache: one refresher per trusted issuer, never on the hot path.

Why this shape: a Check must not wait for routine refreshes, a key rotation must be picked up
within seconds (a token naming an unknown kid triggers one rate-limited re-fetch shared by all
waiting Checks), and an issuer outage must not take the service down (the last good keys keep
serving; only an issuer that never produced keys answers 503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from base64 import b64decode, urlsafe_b64encode
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers
from jwt.api_jwk import PyJWK

from .config import JwksSettings
from .keys import IssuerKey
from .metrics import Metrics
from .policy import Issuer
from .tracing import NO_TRACING, NoTracing, Recorder
from .urls import shown

log = logging.getLogger(__name__)

# RSA keys we verify with (checked when a JWKS is parsed; anything else is skipped and logged):
# - 2048 <= modulus bits <= 4096: Cognito's keys are 2048-bit; smaller is weak, and larger only
#   makes every forged token dearer to refuse (a 16384-bit key cost 6.4 ms per Check).
# - an odd modulus: an even one is no product of two large primes, so no RSA key at all.
# - an odd public exponent e with 65537 <= e < 2**32: Cognito's is 65537. Small exponents (e = 3)
#   are what signature forgeries against lax PKCS#1 v1.5 verifiers rely on, and a huge e makes
#   each verification dearer; 2**32 is the bound common RSA implementations keep to as well.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 4096
MIN_RSA_EXPONENT = 65537
RSA_EXPONENT_LIMIT = 2**32  # exclusive
# Entries a JWKS may have: Cognito publishes two keys (a few more while it rotates). Each entry
# skipped is a log line every fetch, and 130,000 empty entries fit the default size limit
# (docs/security.md, "Hostile JWKS answers"), so a document with more is refused whole.
MAX_JWKS_KEYS = 100
# RFC 7518 6.3.1: n and e are base64url, unpadded. Python's decoder (PyJWT's) would drop any other
# character and take '+' and '/' too, reading some other number than the one published. Padding to a
# whole quantum changes no number and Envoy's jwt_authn reads it too, so it is taken.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+|(?=(?:.{4})+$)[A-Za-z0-9_-]+={1,2}", re.DOTALL)


def http_session() -> aiohttp.ClientSession:
    """The HTTP client JWKS are fetched with (the server's and ``explain``'s, so both reach the
    issuers the same way); create it inside the running event loop.

    ``trust_env``: pods without direct egress reach Cognito through a forward proxy named by
    ``HTTPS_PROXY`` / ``HTTP_PROXY`` (an ``https://`` JWKS URL is tunnelled with CONNECT, so TLS and
    the certificate check stay end to end), and ``NO_PROXY`` hosts are fetched directly. aiohttp
    reads these per request with Python's rules (docs/deploy.md, "Egress proxy"): the lower-case
    variable wins over the upper-case one, NO_PROXY entries match host names and domain suffixes
    (no ports, no CIDR ranges), and an ``https://`` proxy URL is ignored with a warning.
    """
    return aiohttp.ClientSession(headers={"User-Agent": "authz-service"}, trust_env=True)


class JwksError(Exception):
    """A JWKS document we refuse; the message says why (logged, counted, keys kept)."""

    def __init__(self, message: str, skipped: tuple[SkippedKey, ...] = ()) -> None:
        super().__init__(message)
        self.skipped = skipped


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWKS entry not used for verification, and why (logged; never key material)."""

    kid: str | None  # None when the entry has no usable kid
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedJwks:
    keys: dict[str, PyJWK]  # usable RS256 verification keys by kid
    skipped: tuple[SkippedKey, ...]


def parse_jwks(document: bytes) -> ParsedJwks:
    """Usable RS256 verification keys by kid, and every entry skipped with why. No usable key is an
    error (which carries the skipped entries too)."""
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        raise JwksError("JWKS is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("JWKS must be a JSON object with a 'keys' list")
    if len(data["keys"]) > MAX_JWKS_KEYS:
        raise JwksError(f"JWKS has {len(data['keys'])} keys (at most {MAX_JWKS_KEYS} accepted)")
    keys: dict[str, PyJWK] = {}
    skipped: list[SkippedKey] = []
    duplicates: set[str] = set()
    for entry in data["keys"]:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        kid = kid if isinstance(kid, str) and 0 < len(kid) <= 256 else None
        if kid is None:
            skipped.append(SkippedKey(None, "no kid of 1 to 256 characters"))
            continue
        key_or_reason = _verification_key(entry)
        if isinstance(key_or_reason, str):
            skipped.append(SkippedKey(kid, key_or_reason))
            continue
        if kid in keys:
            duplicates.add(kid)
        keys[kid] = key_or_reason
    for kid in duplicates:  # ambiguous: which key does this kid mean? Trust neither.
        del keys[kid]
        skipped.append(SkippedKey(kid, "kid published more than once"))
    if not keys:
        raise JwksError("JWKS has no usable RS256 signing keys", tuple(skipped))
    return ParsedJwks(keys, tuple(skipped))


def _verification_key(entry: dict[str, object]) -> PyJWK | str:
    """The entry as an RS256 verification key, or why it is not one (text for the log)."""
    if entry.get("kty") != "RSA":
        return "not an RSA key"
    if "d" in entry:
        return "a private key"  # published by mistake: not a verification key we trust
    if entry.get("use", "sig") != "sig":
        return "not a signing key (use)"
    if entry.get("alg", "RS256") != "RS256":
        return "not an RS256 key (alg)"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not allow verify"
    for member in ("n", "e"):
        value = entry.get(member)
        if value is not None and not (isinstance(value, str) and _BASE64URL.fullmatch(value)):
            return "n and e must be base64url (A-Z a-z 0-9 - _, unpadded or padded to 4 characters)"
    try:
        key = PyJWK(entry, algorithm="RS256")
        numbers = key.key.public_numbers()
    except Exception:  # noqa: BLE001 - PyJWT raises several types for malformed key material
        return "not a valid RSA public key"
    bits = numbers.n.bit_length()
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return f"modulus is {bits} bits (accepted: {MIN_RSA_BITS} to {MAX_RSA_BITS})"
    if numbers.n % 2 == 0:
        return "modulus is even"
    if numbers.e % 2 == 0 or not MIN_RSA_EXPONENT <= numbers.e < RSA_EXPONENT_LIMIT:
        return f"public exponent is not accepted (odd, {MIN_RSA_EXPONENT} <= e < 2**32 required)"
    if "x5c" in entry and not _certificate_holds(entry["x5c"], numbers):
        return "x5c certificate does not hold the key's n and e"
    return key


def _certificate_holds(x5c: object, numbers: RSAPublicNumbers) -> bool:
    """Whether the first certificate of an ``x5c`` chain holds the key n and e describe: RFC 7517
    4.7 requires it, and a key published as two different keys is trusted as neither (only n and e
    are ever used to verify)."""
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
        return False
    try:
        certified = x509.load_der_x509_certificate(b64decode(x5c[0], validate=True)).public_key()
    except ValueError:  # not base64 (binascii.Error is one), not a DER certificate
        return False
    return isinstance(certified, RSAPublicKey) and certified.public_numbers() == numbers


def _keep_unchanged(old: dict[str, PyJWK], new: dict[str, PyJWK]) -> tuple[dict[str, PyJWK], set[str]]:
    """``new`` with the old PyJWK object kept for every kid whose key material is unchanged, and
    the kids whose material changed. The token cache trusts a hit only while the JWKS holds the
    very object that verified it, so a routine refresh must not look like a rotation."""
    merged: dict[str, PyJWK] = {}
    changed: set[str] = set()
    for kid, key in new.items():
        previous = old.get(kid)
        if previous is not None and previous.key.public_numbers() == key.key.public_numbers():
            merged[kid] = previous
        else:
            merged[kid] = key
            if previous is not None:
                changed.add(kid)
    return merged, changed


def jwks_document(keys: dict[str, PyJWK]) -> bytes:
    """Keys we verify with, as a JWKS document for a verifier of our choosing (Envoy's jwt_authn in
    native mode): RS256 pinned on each, so a token naming another algorithm finds no key."""
    entries = []
    for kid in sorted(keys):
        numbers = keys[kid].key.public_numbers()
        entries.append(
            {
                "kty": "RSA",
                "kid": kid,
                "use": "sig",
                "alg": "RS256",
                "n": _b64_uint(numbers.n),
                "e": _b64_uint(numbers.e),
            }
        )
    return json.dumps({"keys": entries}, separators=(",", ":")).encode()


def _b64_uint(value: int) -> str:
    return urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class _IssuerState:
    """Keys and refresh bookkeeping of one issuer."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.keys: dict[str, PyJWK] = {}
        self._document: tuple[dict[str, PyJWK], bytes] | None = None  # keys -> their JWKS, built once
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_attempt = float("-inf")  # monotonic time of the last fetch start
        self.inflight: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def document(self) -> bytes:
        if self._document is None or self._document[0] is not self.keys:  # keys are swapped, never edited
            self._document = (self.keys, jwks_document(self.keys))
        return self._document[1]


class JwksCache:
    """Keys for every issuer of the serving policy, kept fresh by background tasks."""

    def __init__(
        self,
        settings: JwksSettings,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        on_key_removed: Callable[[str, str], object] | None = None,
        tracing: NoTracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self._tracing = tracing
        self._metrics = metrics
        self._session = session
        self._states: dict[tuple[str, str], _IssuerState] = {}
        # Every issuer's keys by kid, rebuilt whenever a key set or the issuer set changes: the
        # verifier finds a token's key by kid alone (it checks the signature before it reads iss).
        self._by_kid: dict[str, tuple[IssuerKey, ...]] = {}
        # Called with (issuer, kid) when a kid leaves an issuer's JWKS or changes key material,
        # so the verified-token cache can drop the tokens that key signed.
        self._on_key_removed = on_key_removed

    # --- used by the verifier (hot path: dictionary lookups only) ---------------------------------

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        return self._by_kid.get(kid, ())

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        state = self._states.get((issuer.issuer, issuer.jwks_uri))
        return state.keys.get(kid) if state else None

    def has_keys(self, issuer: Issuer) -> bool:
        state = self._states.get((issuer.issuer, issuer.jwks_uri))
        return bool(state and state.keys)

    async def refetch(self, issuer: Issuer) -> None:
        """Single-flight re-fetch for an unknown kid, at most once per cool-down per issuer."""
        state = self._states.get((issuer.issuer, issuer.jwks_uri))
        if state is None:
            return
        if state.inflight is not None:
            await asyncio.shield(state.inflight)
            return
        if time.monotonic() - state.last_attempt < self.settings.unknown_kid_cooldown:
            return
        await self._fetch_shared(state, "unknown_kid")

    def document(self, iss: str) -> bytes | None:
        """The current keys of the issuer whose ``iss`` this is, as a JWKS document (native mode's
        Envoy fetches it); None while it has none. KeyError for an issuer the policy does not trust."""
        state = next((s for s in self._states.values() if s.issuer.issuer == iss), None)
        if state is None:
            raise KeyError(iss)
        return state.document() if state.keys else None

    # --- lifecycle --------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when every issuer has keys (a readiness condition)."""
        return all(state.keys for state in self._states.values())

    def status(self) -> list[dict[str, object]]:
        """Per-issuer state for /readyz and logs."""
        return [
            {
                "issuer": s.issuer.issuer,
                "keys": len(s.keys),
                "last_success": s.last_success,
                "last_error": s.last_error,
            }
            for s in self._states.values()
        ]

    def sync(self, issuers: Iterable[Issuer]) -> None:
        """Follow the serving policy: start refreshers for new issuers, stop removed ones."""
        wanted = {(i.issuer, i.jwks_uri): i for i in issuers}
        for ident in list(self._states):
            if ident not in wanted:
                state = self._states.pop(ident)
                if state.task:
                    state.task.cancel()
                self._metrics.issuer_removed(state.issuer.metric_label)
        self._reindex()
        for ident, issuer in wanted.items():
            known = self._states.get(ident)
            if known is None:
                state = self._states[ident] = _IssuerState(issuer)
                self._metrics.issuer_added(issuer.metric_label)
                state.task = asyncio.create_task(self._refresher(state), name=f"jwks:{issuer.metric_label}")
            else:
                known.issuer = issuer  # client_ids may have changed; keys stay

    async def wait_first_attempts(self, timeout: float) -> None:
        """Wait (bounded) until every issuer has tried its first fetch, so start-up is quick to ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.last_success is not None or s.last_error is not None for s in self._states.values()):
                return
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        tasks = [s.task for s in self._states.values() if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._states.clear()
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the kid index from the issuers' key sets; one reference swap, like the key sets."""
        index: dict[str, tuple[IssuerKey, ...]] = {}
        for state in self._states.values():
            for kid, key in state.keys.items():
                index[kid] = (*index.get(kid, ()), IssuerKey(state.issuer.issuer, key))
        self._by_kid = index

    # --- fetching ---------------------------------------------------------------------------------

    async def _refresher(self, state: _IssuerState) -> None:
        trigger = "startup"
        backoff = self.settings.retry_min
        while True:
            ok = await self._fetch_shared(state, trigger)
            if ok:
                backoff = self.settings.retry_min
                delay = self.settings.refresh_interval * random.uniform(0.9, 1.1)
            else:
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, self.settings.retry_max)
            trigger = "periodic"
            await asyncio.sleep(delay)

    async def _fetch_shared(self, state: _IssuerState, trigger: str) -> bool:
        if state.inflight is not None:  # someone else is fetching: share their result
            await asyncio.shield(state.inflight)
            return state.last_error is None
        loop = asyncio.get_running_loop()
        state.inflight = loop.create_future()
        state.last_attempt = time.monotonic()
        try:
            return await self._fetch(state, trigger)
        finally:
            state.inflight.set_result(None)
            state.inflight = None

    async def _fetch(self, state: _IssuerState, trigger: str) -> bool:
        """One fetch, traced: an unknown-kid re-fetch runs inside a Check (a child of its span),
        startup and periodic refreshes are background work (root spans)."""
        span = self._tracing.child if trigger == "unknown_kid" else self._tracing.root
        with span(
            "jwks fetch", **{"authz.issuer.pool_id": state.issuer.user_pool_id, "authz.jwks.trigger": trigger}
        ) as recorder:
            return await self._fetch_keys(state, trigger, recorder)

    async def _fetch_keys(self, state: _IssuerState, trigger: str, recorder: Recorder) -> bool:
        issuer = state.issuer
        label = issuer.metric_label
        try:
            document = await self._download(issuer.jwks_uri)
            parsed = parse_jwks(document)
        except (TimeoutError, JwksError, aiohttp.ClientError, OSError, UnicodeError) as exc:
            if isinstance(exc, JwksError):
                _log_skipped(issuer, exc.skipped)
            reason = shown(str(exc)) or type(exc).__name__  # an HTTP client error may quote the URL
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"timed out after {self.settings.timeout:g}s"
            state.last_error = reason
            recorder.set("authz.jwks.result", "error")
            recorder.error(reason)
            self._metrics.jwks_refreshes.labels(label, trigger, "error").inc()
            log.warning(
                "jwks refresh failed",
                extra={
                    "issuer": issuer.issuer,
                    "jwks_uri": shown(issuer.jwks_uri),
                    "trigger": trigger,
                    "error": reason,
                    "keys_kept": len(state.keys),
                },
            )
            return False
        _log_skipped(issuer, parsed.skipped)
        keys, changed = _keep_unchanged(state.keys, parsed.keys)
        added = keys.keys() - state.keys.keys()
        removed = state.keys.keys() - keys.keys()
        if self._on_key_removed is not None:
            for kid in removed | changed:
                self._on_key_removed(issuer.issuer, kid)
        state.keys = keys  # one reference swap: readers see the old or the new set, never a mix
        self._reindex()
        state.last_success = time.time()
        state.last_error = None
        recorder.set("authz.jwks.result", "ok")
        recorder.set("authz.jwks.keys", len(keys))
        self._metrics.jwks_refreshes.labels(label, trigger, "ok").inc()
        self._metrics.jwks_keys.labels(label).set(len(keys))
        self._metrics.jwks_last_success.labels(label).set(state.last_success)
        if added or removed or trigger != "periodic":
            log.info(
                "jwks loaded",
                extra={
                    "issuer": issuer.issuer,
                    "trigger": trigger,
                    "keys": len(keys),
                    "added": sorted(added),
                    "removed": sorted(removed),
                },
            )
        return True

    async def _download(self, url: str) -> bytes:
        """The whole body, at most ``max_bytes`` of it (after any Content-Encoding is undone), within
        ``timeout`` seconds for the whole exchange: a body that trickles in is a timeout."""
        limit = self.settings.max_bytes
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise JwksError(f"JWKS endpoint answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > limit:
                raise JwksError(f"JWKS larger than {limit} bytes")
            body = bytearray()
            # read(n) answers what has arrived so far (up to n): a body sent in pieces takes a loop.
            while piece := await resp.content.read(limit + 1 - len(body)):
                body += piece
                if len(body) > limit:
                    raise JwksError(f"JWKS larger than {limit} bytes")
            return bytes(body)


def _log_skipped(issuer: Issuer, skipped: tuple[SkippedKey, ...]) -> None:
    """One warning per key entry a fetch did not use: an operator sees which kid and why."""
    for entry in skipped:
        log.warning("jwks key skipped", extra={"issuer": issuer.issuer, "kid": entry.kid, "reason": entry.reason})
