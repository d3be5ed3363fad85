"""Cognito access-token verification (client_credentials grant, RS256 JWTs).

JWS parsing is strict base64url + JSON written here (canonical encoding, UTF-8 only, no duplicate
members) and the RS256 signature is verified with ``cryptography``; PyJWT provides the JWK
parsing (jwks.py). This module decides which key and which claims are acceptable for a Cognito
*access* token, and turns every failure into a typed reason that
the decision layer maps to an HTTP answer. Nothing here logs or returns the token itself.

The signature is checked before the payload is decoded: anyone can send a token, and only the
small protected header (bounded by MAX_HEADER_CHARS) is parsed before the issuer's key has
proved the payload is the issuer's. The key is found by the header's ``kid`` across the trusted
issuers' JWKS; the payload's ``iss`` must then name the issuer whose key verified it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from jwt.api_jwk import PyJWK

from .claims import NO_CUSTOM_CLAIMS, SCOPE_CHARS, SCOPE_TOKEN, Claims, claim_value
from .keys import IssuerKey, KeySource
from .policy import DenyList, Issuer, Policy, PolicySource
from .tokencache import CacheEntry, TokenCache

# Cognito client_credentials access tokens are ~0.8-1.2 KB; a long scope list or claims added by a
# pre token generation (V3) Lambda add a few hundred bytes to a few KB. 4 KB leaves that headroom
# and bounds what anyone can make us hash (and parse, in the header) before a signature is checked.
MAX_TOKEN_BYTES = 4096
# The protected header is parsed before the signature is checked, so it gets its own, tight bound.
# Cognito's is {"kid": <44 chars>, "alg": "RS256"}: ~100 characters encoded; a 256-character kid
# (the most _check_header accepts) with alg and typ still fits in 512.
MAX_HEADER_CHARS = 512
# A kid names one key of one pool; more than one trusted key under one kid is rare (two policy
# entries sharing one JWKS, two pools picking the same kid). A token naming such a kid costs at
# most this many RSA verifications.
MAX_KEYS_PER_KID = 4
ALGORITHM = "RS256"
# RFC 6750 section 2.1 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


class Failure(enum.Enum):
    """Why a token (or the Authorization header carrying it) was refused. Values are metric labels."""

    BAD_REQUEST = "bad_request"  # malformed Authorization header: 400 invalid_request
    INVALID_TOKEN = "invalid_token"  # not a well-formed JWT / unsupported header / bad claim types
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_TOKEN_USE = "wrong_token_use"
    CLIENT_NOT_ALLOWED = "client_not_allowed"
    DENY_LISTED = "deny_listed"  # the policy's deny section lists its client or its jti
    KEYS_UNAVAILABLE = "keys_unavailable"  # we cannot verify right now: 503, not 401


class Check(enum.Enum):
    """The verifier's checks, in the order it runs them; every TokenError names the one that failed,
    so tools (explain) read which check failed, never the wording of a message."""

    CREDENTIALS = "credentials"  # the Authorization header presents one Bearer token (RFC 6750)
    HEADER = "header"  # the compact JWS and its protected header: size, form, alg RS256, kid, no keys or crit
    KEY = "key"  # a trusted issuer publishes a key under the token's kid
    SIGNATURE = "signature"  # the RS256 signature verifies under that key
    PAYLOAD = "payload"  # strict base64url JSON, read only once the signature verified
    ISSUER = "issuer"  # iss names the issuer whose key verified the signature
    TIMES = "times"  # exp, nbf and iat, with the leeway
    TOKEN_USE = "token_use"  # an access token
    CLIENT = "client"  # client_id present, valid header text, allowed by the issuer entry
    CLAIMS = "claims"  # scope and sub: strings, RFC 6749 scopes, valid header text
    DENY_LIST = "deny_list"  # neither the client nor the jti is in the policy's deny section


class TokenError(Exception):
    """A refused token. ``failure`` is the decision's reason, ``check`` the check that failed.
    ``description`` is safe to send to the client (no token, no key material); ``detail`` is the
    precise reason for operators (explain), where it says more than that. ``claims``: the verified
    claims of a token refused after verification (the deny list), so the log names its client."""

    def __init__(
        self,
        failure: Failure,
        description: str,
        detail: str | None = None,
        *,
        check: Check,
        claims: Claims | None = None,
    ) -> None:
        super().__init__(description)
        self.failure = failure
        self.check = check
        self.description = description
        self.detail = detail or description
        self.claims = claims


class PolicyReloaded(Exception):
    """Another policy came into force while a verification waited on the issuer's keys (an unknown
    kid's re-fetch, up to --jwks-timeout). Raised instead of finishing under the policy the Check
    started with, which may have been tightened meanwhile; check.Checker decides the request again,
    whole, with the policy in force. Only a verification that awaited a fetch looks: the warm path
    never waits, so it pays nothing for this."""


def bearer_token(values: tuple[str, ...]) -> str | None:
    """The token from the Authorization header values, None when no Bearer credentials were sent.

    RFC 6750 section 2.1: ``Bearer`` (case-insensitive), one space, one b64token. A second
    Authorization value, a second token or stray characters make the request invalid (400), so an
    intermediary and we can never disagree about which credentials were presented.
    """
    if not values:
        return None
    if len(values) > 1 or "," in values[0]:
        raise TokenError(Failure.BAD_REQUEST, "more than one Authorization value", check=Check.CREDENTIALS)
    value = values[0]
    scheme, sep, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme (e.g. Basic): no bearer credentials were presented
    if not sep or not rest:
        raise TokenError(Failure.BAD_REQUEST, "the Bearer scheme needs a token", check=Check.CREDENTIALS)
    if not _is_b64token(rest):
        raise TokenError(
            Failure.BAD_REQUEST, "malformed Bearer credentials (one token, no spaces)", check=Check.CREDENTIALS
        )
    return rest


def _is_b64token(text: str) -> bool:
    # bytes.translate deletes the allowed characters in one C loop (a regex took ~1.3 us per token).
    if not text.isascii():
        return False
    body = text.encode("ascii").rstrip(b"=")
    return bool(body) and not body.translate(None, _B64TOKEN_CHARS)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7519 section 4: a parser must reject duplicate claim names or keep the last; we reject,
    # so two parsers (ours, the upstream's) can never read different claims from one token.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; RFC 8259 does not


_JSON = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
_MALFORMED = "malformed token"
# Not allowed in a claim forwarded as a header: C0 controls but HTAB, DEL, lone surrogates, and a
# space or tab at either end (see _check_header_text).
_NOT_HEADER_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]|^[ \t]|[ \t]\Z")
# RFC 6749's scope: scope tokens separated by single spaces (or no scope at all).
_SCOPE_CLAIM = re.compile(rf"(?:{SCOPE_TOKEN}(?: {SCOPE_TOKEN})*)?\Z")
_NOT_SCOPE_CHAR = re.compile(rf"[^{SCOPE_CHARS} \t\n\v\f\r]")  # neither a scope's nor whitespace
SCOPE_SPACING = "scope claim must list scopes separated by single spaces"
SCOPE_CHARACTER = "scope claim holds a character a scope cannot have (RFC 6749: printable ASCII, no quote or backslash)"
# One client-visible text for an untrusted issuer, an unknown kid and a bad signature: told apart,
# they would let anyone probe which pools and kids we trust. Metrics, the deny log line (reason)
# and explain (TokenError.detail) keep the precise failure.
NOT_VALID = "token is not valid"
MALFORMED_PAYLOAD = "signed payload is not a strict base64url JSON object"


def _b64(segment: bytes) -> bytes:
    """Strict base64url (RFC 7515 section 2): no padding, URL alphabet only, canonical.

    Re-encoding must give back the same text, so two different strings can never carry the same
    bytes (the cache and the logs can rely on one token, one string).
    """
    raw = urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if urlsafe_b64encode(raw).rstrip(b"=") != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _json_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON object: UTF-8 only (no BOM, no UTF-16), no duplicate members, no NaN."""
    value = _JSON.decode(raw.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class _Parsed:
    header: dict[str, Any]
    payload_b64: bytes
    signing_input: bytes
    signature: bytes


def _parse(token: str) -> _Parsed:
    """Split a compact JWS and decode its header and signature. The payload stays as sent: it is
    decoded only once a signature over it has verified (see ``_payload``)."""
    try:
        raw = token.encode("ascii")
        head, payload, signature = raw.split(b".")
        if len(head) > MAX_HEADER_CHARS:
            raise ValueError("header too large")
        return _Parsed(_json_object(_b64(head)), payload, raw[: len(head) + 1 + len(payload)], _b64(signature))
    except (ValueError, RecursionError):  # UnicodeError and binascii.Error are ValueErrors
        raise TokenError(Failure.INVALID_TOKEN, _MALFORMED, check=Check.HEADER) from None


def _payload(parsed: _Parsed) -> dict[str, Any]:
    """The payload of a token whose signature has verified, decoded as strictly as the header."""
    try:
        return _json_object(_b64(parsed.payload_b64))
    except (ValueError, RecursionError):
        raise TokenError(Failure.INVALID_TOKEN, _MALFORMED, MALFORMED_PAYLOAD, check=Check.PAYLOAD) from None


def _signature_ok(key: PyJWK, parsed: _Parsed) -> bool:
    """Whether ``key`` verifies the token's RS256 signature (a wrong key never raises)."""
    try:
        key.key.verify(parsed.signature, parsed.signing_input, _PKCS1, _SHA256)
    except InvalidSignature:
        return False
    except (ValueError, TypeError, AttributeError):  # not an RSA public key: never verifies
        return False
    return True


class TokenVerifier:
    """Verifies Cognito access tokens against the issuers of the policy in force.

    JOSE parsing is strict and done here with base64 + json (PyJWT parsed each token three times,
    ~200 us); the RS256 signature is checked with ``cryptography`` directly. Verified tokens go to
    an optional TokenCache; a hit is re-checked against the current policy and keys (see verify).
    """

    def __init__(
        self,
        keys: KeySource,
        leeway: float = 60.0,
        clock: Callable[[], float] = time.time,
        cache: TokenCache | None = None,
        policies: PolicySource | None = None,
    ) -> None:
        self._keys = keys
        # The policy in force, read again after a wait on keys (PolicyReloaded); None: a fixed policy (tools).
        self._policies = policies
        self._leeway = leeway
        self._clock = clock
        self._cache = cache if cache is not None and cache.enabled else None

    async def verify(self, token: str, policy: Policy) -> Claims:
        """Return the token's verified claims or raise TokenError with the precise reason."""
        claims = self._lookup(token, policy)
        return claims if claims is not None else await self.verify_uncached(token, policy)

    def cached(self, authorization: tuple[str, ...], policy: Policy) -> Claims | None:
        """The claims of the token an Authorization header presents, when it is one verified before
        and still valid now; None when it must be parsed and verified in full (TokenError when the
        cached token now fails: expired, client no longer allowed).

        The common Check: one ``Bearer <token>`` value whose token is in the cache. A hit means
        this very string passed ``bearer_token`` and full verification before, so neither runs
        again (~4 us under load), and no coroutine is needed. Anything else (two values, another
        scheme, odd spacing, a comma, a token never verified) is a miss, and decide() falls back
        to ``bearer_token`` and ``verify_uncached``, which give the precise answer.
        """
        if self._cache is None or len(authorization) != 1:
            return None
        value = authorization[0]
        if value[:7].lower() != "bearer ":  # RFC 6750: the scheme is case-insensitive
            return None
        return self._lookup(value[7:], policy)

    async def verify_uncached(self, token: str, policy: Policy) -> Claims:
        """Full verification, after a cache lookup found nothing usable; the result is cached."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(Failure.INVALID_TOKEN, "token too large", check=Check.HEADER)
        claims, key = await self._verify(token, policy)
        if self._cache is not None:  # cached even when deny-listed: lifting the entry needs no new RSA
            digest = self._cache.digest(token.encode("ascii"))
            self._cache.put(digest, claims, key, policy.client_label(claims.client_id))
        if policy.deny is not None:
            check_deny_list(claims, policy.deny)
        return claims

    def _lookup(self, token: str, policy: Policy) -> Claims | None:
        cache = self._cache
        if cache is None or len(token) > MAX_TOKEN_BYTES:  # never cached: no need to hash it
            return None
        try:
            digest = cache.digest(token.encode("ascii"))
        except UnicodeError:  # never cached (not a b64token); full verification says why
            return None
        entry = cache.get(digest)
        if entry is None:
            return None
        if not entry.claims.covers(policy.claim_names):
            # Verified under a policy whose conditions named fewer claims than this one: verify it
            # again, which reads the claims the current policy needs (and replaces the entry).
            return None
        try:
            claims = self._revalidate(entry, policy)
        except TokenError as exc:
            if exc.failure is Failure.EXPIRED:
                cache.discard(digest, "expired")  # it can never become valid again
            raise
        if claims is None:
            cache.discard(digest, "key_removed")  # issuer or key changed: verify from scratch
        return claims

    def _revalidate(self, entry: CacheEntry, policy: Policy) -> Claims | None:
        """A cached token's claims under the current policy and keys; None when it must be
        verified again (issuer gone or replaced, key gone or replaced). Checks run in the order
        the full verification runs them, so a hit fails exactly as a miss would."""
        claims = entry.claims
        issuer = policy.issuers_by_iss.get(claims.issuer)
        if issuer is None or self._keys.key(issuer, claims.kid) is not entry.key:
            return None
        if claims.exp <= self._clock() - self._leeway:
            raise TokenError(Failure.EXPIRED, "token expired", check=Check.TIMES)
        if issuer.client_ids is not None and claims.client_id not in issuer.client_ids:
            raise TokenError(Failure.CLIENT_NOT_ALLOWED, "client is not allowed", check=Check.CLIENT)
        if policy.deny is not None:  # the policy in force: a reload applies to cached tokens at once
            check_deny_list(claims, policy.deny)
        return claims

    async def _verify(self, token: str, policy: Policy) -> tuple[Claims, PyJWK]:
        parsed = _parse(token)
        kid = self._check_header(parsed.header)
        candidates = await self._trusted_keys(kid, policy)
        signer = next((c for c in candidates[:MAX_KEYS_PER_KID] if _signature_ok(c.key, parsed)), None)
        if signer is None:
            raise TokenError(Failure.BAD_SIGNATURE, NOT_VALID, "token signature is invalid", check=Check.SIGNATURE)
        payload = _payload(parsed)  # only now: the payload is the issuer's
        iss = payload.get("iss")
        if iss != signer.issuer:
            # The same key may be published for several trusted issuers (two policy entries sharing
            # one JWKS): the issuer the token names must then hold a key under this kid that verifies it.
            named = next((c for c in candidates if c.issuer == iss), None)
            if named is None or not _signature_ok(named.key, parsed):
                raise TokenError(
                    Failure.WRONG_ISSUER,
                    NOT_VALID,
                    "iss is not the trusted issuer whose key signed the token",
                    check=Check.ISSUER,
                )
            signer = named
        self._check_times(payload)
        return self._claims(payload, policy.issuers_by_iss[signer.issuer], kid, policy.claim_names), signer.key

    async def _trusted_keys(self, kid: str, policy: Policy) -> list[IssuerKey]:
        """The keys published under ``kid`` by the issuers of the policy in force (never empty).

        A kid no trusted JWKS holds may be a rotation we have not seen yet: each trusted issuer that
        has keys re-fetches its JWKS (single flight, at most once per cool-down each; an issuer
        without keys is being retried by its refresher already), then we look once more.
        """
        candidates = self._policy_keys(kid, policy)
        if candidates:
            return candidates
        refetches = [self._keys.refetch(i) for i in policy.issuers if self._keys.has_keys(i)]
        if len(refetches) == 1:
            await refetches[0]  # the usual single pool: no task (gather costs ~10 us per forged token)
        else:
            await asyncio.gather(*refetches)  # several pools fetch at once, not one after another
        if self._policies is not None and self._policies.policy is not policy:
            raise PolicyReloaded
        candidates = self._policy_keys(kid, policy)
        if candidates:
            return candidates
        if not all(self._keys.has_keys(i) for i in policy.issuers):
            # It may be a token of the issuer whose keys we do not have yet: we cannot tell, so 503.
            raise TokenError(Failure.KEYS_UNAVAILABLE, "signing keys are not available yet", check=Check.KEY)
        raise TokenError(
            Failure.UNKNOWN_KEY, NOT_VALID, "no trusted issuer publishes a key with the token's kid", check=Check.KEY
        )

    def _policy_keys(self, kid: str, policy: Policy) -> list[IssuerKey]:
        trusted = policy.issuers_by_iss
        return [c for c in self._keys.keys_for_kid(kid) if c.issuer in trusted]

    def _check_header(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise TokenError(Failure.INVALID_TOKEN, "unsupported token algorithm (RS256 required)", check=Check.HEADER)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise TokenError(Failure.INVALID_TOKEN, "token header has no valid kid", check=Check.HEADER)
        if "crit" in header or header.get("b64", True) is not True:
            raise TokenError(Failure.INVALID_TOKEN, "unsupported critical token header", check=Check.HEADER)
        if "jku" in header or "x5u" in header or "jwk" in header or "x5c" in header:
            # Keys come only from the configured JWKS, never from the token itself.
            raise TokenError(Failure.INVALID_TOKEN, "token header must not carry keys", check=Check.HEADER)
        return kid

    def _check_times(self, payload: dict[str, Any]) -> None:
        # RFC 7519 NumericDate claims, with the semantics (and order) PyJWT used before: exp
        # required; iat, nbf, exp compared with the leeway; a value that is not a number refused.
        if payload.get("exp") is None:
            raise TokenError(Failure.INVALID_TOKEN, "token has no exp claim", check=Check.TIMES)
        now = self._clock()
        leeway = self._leeway
        for name in ("iat", "nbf"):
            if name in payload and _numeric_date(payload[name]) > now + leeway:
                raise TokenError(Failure.NOT_YET_VALID, "token not yet valid", check=Check.TIMES)
        if _numeric_date(payload["exp"]) <= now - leeway:
            raise TokenError(Failure.EXPIRED, "token expired", check=Check.TIMES)

    def _claims(self, payload: dict[str, Any], issuer: Issuer, kid: str, names: frozenset[str]) -> Claims:
        now = self._clock()
        iat = payload.get("iat")
        if iat is not None and (not _is_number(iat) or iat > now + self._leeway):
            raise TokenError(Failure.NOT_YET_VALID, "token issued in the future", check=Check.TIMES)
        if payload.get("token_use") != "access":
            raise TokenError(
                Failure.WRONG_TOKEN_USE, "not an access token (token_use must be access)", check=Check.TOKEN_USE
            )
        client_id = payload.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise TokenError(Failure.INVALID_TOKEN, "token has no client_id claim", check=Check.CLIENT)
        _check_header_text("client_id", client_id, Check.CLIENT)
        if issuer.client_ids is not None and client_id not in issuer.client_ids:
            raise TokenError(Failure.CLIENT_NOT_ALLOWED, "client is not allowed", check=Check.CLIENT)
        scope = payload.get("scope", "")
        if not isinstance(scope, str):
            raise TokenError(Failure.INVALID_TOKEN, "scope claim must be a string", check=Check.CLAIMS)
        _check_scope(scope)
        jti = payload.get("jti")
        sub = payload.get("sub", "")
        if not isinstance(sub, str):
            raise TokenError(Failure.INVALID_TOKEN, "sub claim must be a string", check=Check.CLAIMS)
        _check_header_text("sub", sub, Check.CLAIMS)
        return Claims(
            issuer=issuer.issuer,
            client_id=client_id,
            sub=sub,
            scopes=frozenset(s for s in scope.split(" ") if s),
            scope_text=scope,
            exp=_numeric_date(payload["exp"]),
            kid=kid,
            # Only the custom claims route conditions name (keyed by the policy's own strings), so a
            # cache entry holds a few values, not the whole payload. Never forwarded as headers.
            custom={name: claim_value(payload[name]) for name in names if name in payload}
            if names
            else NO_CUSTOM_CLAIMS,
            extracted=names,
            jti=jti if isinstance(jti, str) else "",  # only compared with the deny list
        )


def check_deny_list(claims: Claims, deny: DenyList) -> None:
    """Refuse a verified token whose client or jti the policy's deny section lists (the client
    first). 401 invalid_token, as for a revoked token: Cognito has no revocation for these."""
    if claims.client_id in deny.client_ids:
        raise TokenError(Failure.DENY_LISTED, "client is revoked", check=Check.DENY_LIST, claims=claims)
    if claims.jti and claims.jti in deny.jtis:
        raise TokenError(Failure.DENY_LISTED, "token is revoked", check=Check.DENY_LIST, claims=claims)


def _check_header_text(name: str, value: str, check: Check) -> None:
    """Refuse a claim the response forwards upstream (x-auth-client-id, -scopes, -sub) unless it is
    text an HTTP header can carry as is: a lone surrogate (JSON's "\\ud800" parses to one) cannot
    be encoded as UTF-8 and made the response fail to render; CR, LF, NUL and the other controls
    are not allowed in a field value (RFC 9110 section 5.5), and leading or trailing whitespace
    would be stripped on the way, so the upstream would see another identity than the one signed."""
    if _NOT_HEADER_TEXT.search(value):
        raise TokenError(Failure.INVALID_TOKEN, f"{name} claim is not valid HTTP header text", check=check)


def _check_scope(scope: str) -> None:
    """Refuse a scope claim that is not RFC 6749 scope tokens separated by single spaces.

    Why: it is forwarded as is in x-auth-scopes, and an app splitting it on whitespace must see
    the scopes we saw. A tab (or a newline, two spaces) inside a signed scope is one opaque scope
    here and two upstream; a quote or backslash changes how it reads once quoted. Cognito's own
    scopes follow the grammar, so this refuses only tokens no Cognito pool issues."""
    if not _SCOPE_CLAIM.match(scope):
        raise TokenError(
            Failure.INVALID_TOKEN,
            SCOPE_CHARACTER if _NOT_SCOPE_CHAR.search(scope) else SCOPE_SPACING,
            check=Check.CLAIMS,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_date(value: object) -> int:
    """A NumericDate claim (a JSON number) as an int, truncated as PyJWT did; a string or a
    boolean (which PyJWT coerced with int()) is malformed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenError(Failure.INVALID_TOKEN, _MALFORMED, check=Check.TIMES)
    try:
        return int(value)
    except (ValueError, OverflowError):
        raise TokenError(Failure.INVALID_TOKEN, _MALFORMED, check=Check.TIMES) from None
