"""Cognito access-token verification (client_credentials grant, RS256 JWTs).

PyJWT does the JWS work (base64url, JSON, RSA); this module decides which key and which claims
are acceptable for a Cognito *access* token, and turns every failure into a typed reason that
the decision layer maps to an HTTP answer. Nothing here logs or returns the token itself.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from jwt.api_jwk import PyJWK

from .policy import Issuer, Policy

MAX_TOKEN_BYTES = 8192  # Cognito access tokens are ~1 KB; anything this large is an attack or a mistake
ALGORITHM = "RS256"
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*\Z")  # RFC 6750 section 2.1 b64token


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
    KEYS_UNAVAILABLE = "keys_unavailable"  # we cannot verify right now: 503, not 401


class TokenError(Exception):
    """A refused token. ``description`` is safe to send to the client (no token, no key material)."""

    def __init__(self, failure: Failure, description: str) -> None:
        super().__init__(description)
        self.failure = failure
        self.description = description


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token proves; the only token data that leaves this module."""

    issuer: str
    client_id: str
    sub: str
    scopes: frozenset[str]
    scope_text: str  # the claim as sent (space separated), forwarded as x-auth-scopes
    exp: int
    kid: str


class KeySource(Protocol):
    """Where verification finds signing keys (implemented by jwks.JwksCache)."""

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None: ...

    def has_keys(self, issuer: Issuer) -> bool: ...

    async def refetch(self, issuer: Issuer) -> None:
        """Fetch the issuer's JWKS again because a token named an unknown kid (rate limited)."""


def bearer_token(values: tuple[str, ...]) -> str | None:
    """The token from the Authorization header values, None when no Bearer credentials were sent.

    RFC 6750 section 2.1: ``Bearer`` (case-insensitive), one space, one b64token. A second
    Authorization value, a second token or stray characters make the request invalid (400), so an
    intermediary and we can never disagree about which credentials were presented.
    """
    if not values:
        return None
    if len(values) > 1 or "," in values[0]:
        raise TokenError(Failure.BAD_REQUEST, "more than one Authorization value")
    value = values[0]
    scheme, sep, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme (e.g. Basic): no bearer credentials were presented
    if not sep or not rest:
        raise TokenError(Failure.BAD_REQUEST, "the Bearer scheme needs a token")
    if not _B64TOKEN.match(rest):
        raise TokenError(Failure.BAD_REQUEST, "malformed Bearer credentials (one token, no spaces)")
    return rest


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7519 section 4: a parser must reject duplicate claim names or keep the last; we reject,
    # so two parsers (ours, the upstream's) can never read different claims from one token.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise jwt.DecodeError(f"duplicate claim {key!r}")
        out[key] = value
    return out


class _StrictJWT(jwt.PyJWT):
    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = json.loads(decoded["payload"], object_pairs_hook=_reject_duplicates)
        except jwt.DecodeError:
            raise
        except (ValueError, RecursionError) as exc:
            raise jwt.DecodeError(f"Invalid payload string: {exc}") from exc
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        return payload


class TokenVerifier:
    """Verifies Cognito access tokens against the issuers of the policy in force."""

    def __init__(
        self, keys: KeySource, leeway: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._keys = keys
        self._leeway = leeway
        self._clock = clock
        self._jwt = _StrictJWT()
        self._jws = jwt.PyJWS()

    async def verify(self, token: str, policy: Policy) -> Claims:
        """Return the token's verified claims or raise TokenError with the precise reason."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(Failure.INVALID_TOKEN, "token too large")
        header = self._header(token)
        kid = header["kid"]
        issuer = self._issuer_of(token, policy)
        key = self._keys.key(issuer, kid)
        if key is None:
            if not self._keys.has_keys(issuer):
                raise TokenError(Failure.KEYS_UNAVAILABLE, "signing keys are not available yet")
            await self._keys.refetch(issuer)  # a rotation we have not seen yet?
            key = self._keys.key(issuer, kid)
            if key is None:
                raise TokenError(Failure.UNKNOWN_KEY, "token signed with an unknown key")
        payload = self._decode(token, key, issuer)
        return self._claims(payload, issuer, kid)

    def _header(self, token: str) -> dict[str, Any]:
        try:
            header = self._jws.get_unverified_header(token)
        except (jwt.PyJWTError, UnicodeError):
            raise TokenError(Failure.INVALID_TOKEN, "malformed token") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise TokenError(Failure.INVALID_TOKEN, "unsupported token algorithm (RS256 required)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise TokenError(Failure.INVALID_TOKEN, "token header has no valid kid")
        if "crit" in header or header.get("b64", True) is not True:
            raise TokenError(Failure.INVALID_TOKEN, "unsupported critical token header")
        if "jku" in header or "x5u" in header or "jwk" in header or "x5c" in header:
            # Keys come only from the configured JWKS, never from the token itself.
            raise TokenError(Failure.INVALID_TOKEN, "token header must not carry keys")
        return header

    def _issuer_of(self, token: str, policy: Policy) -> Issuer:
        # Read iss before the signature check only to pick the pool whose keys must verify it;
        # PyJWT then checks iss again against that pool after the signature is verified.
        try:
            unverified = self._jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, UnicodeError):
            raise TokenError(Failure.INVALID_TOKEN, "malformed token") from None
        iss = unverified.get("iss")
        issuer = policy.issuers_by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenError(Failure.WRONG_ISSUER, "token issuer is not trusted")
        return issuer

    def _decode(self, token: str, key: PyJWK, issuer: Issuer) -> dict[str, Any]:
        try:
            return self._jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                issuer=issuer.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss"], "verify_aud": False, "verify_sub": False, "verify_jti": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError(Failure.EXPIRED, "token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError(Failure.NOT_YET_VALID, "token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise TokenError(Failure.BAD_SIGNATURE, "token signature is invalid") from None
        except jwt.InvalidIssuerError:
            raise TokenError(Failure.WRONG_ISSUER, "token issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(Failure.INVALID_TOKEN, f"token has no {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise TokenError(Failure.INVALID_TOKEN, "malformed token") from None

    def _claims(self, payload: dict[str, Any], issuer: Issuer, kid: str) -> Claims:
        now = self._clock()
        iat = payload.get("iat")
        if iat is not None and (not _is_number(iat) or iat > now + self._leeway):
            raise TokenError(Failure.NOT_YET_VALID, "token issued in the future")
        if payload.get("token_use") != "access":
            raise TokenError(Failure.WRONG_TOKEN_USE, "not an access token (token_use must be access)")
        client_id = payload.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise TokenError(Failure.INVALID_TOKEN, "token has no client_id claim")
        if issuer.client_ids is not None and client_id not in issuer.client_ids:
            raise TokenError(Failure.CLIENT_NOT_ALLOWED, "client is not allowed")
        scope = payload.get("scope", "")
        if not isinstance(scope, str):
            raise TokenError(Failure.INVALID_TOKEN, "scope claim must be a string")
        sub = payload.get("sub", "")
        if not isinstance(sub, str):
            raise TokenError(Failure.INVALID_TOKEN, "sub claim must be a string")
        return Claims(
            issuer=issuer.issuer,
            client_id=client_id,
            sub=sub,
            scopes=frozenset(s for s in scope.split(" ") if s),
            scope_text=scope,
            exp=int(payload["exp"]),
            kid=kid,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
