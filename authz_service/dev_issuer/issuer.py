"""The emulated user pool's keys and tokens: signing keys with Cognito-style kids (rotated on
request), client authentication, Cognito-shaped access tokens and (to try a refusal by hand) ID
tokens. Pure: no HTTP (see ``app``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ..cognito import access_claims, id_claims
from ..policy import IssuerFormat, cognito_issuer
from ..urls import authority_problem
from .config import CLIENT_CREDENTIALS, DevIssuerConfig

log = logging.getLogger("authz_service.dev_issuer")

RSA_KEY_BITS = 2048
# A Cognito user name: 1 to 128 characters, no control characters or white space (the dev issuer
# names no real user; this keeps the claim a plain string).
_USERNAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")


class TokenRequestError(Exception):
    """A request Cognito would refuse. ``error`` is the OAuth 2.0 code; ``reason`` is for logs only."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)


def _new_signing_key() -> _SigningKey:
    """A fresh RSA key whose kid mimics Cognito's: base64 of SHA-256 over the public key's DER SPKI."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")
    return _SigningKey(kid=kid, private_key=private_key)


def _normalize_public_url(public_url: str) -> str:
    if problem := authority_problem(public_url):
        raise ValueError(f"public URL {public_url!r}: {problem}")
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"public URL {public_url!r} must be http(s)://host[:port][/path] without query or fragment")
    return public_url.rstrip("/")


class DevIssuer:
    """Keys and clients of one emulated user pool. Pure: usable and testable without HTTP."""

    def __init__(self, config: DevIssuerConfig, public_url: str) -> None:
        self.config = config
        self.base_url = _normalize_public_url(public_url)
        pool = config.user_pool_id
        if config.issuer_format is None:
            self._issuer = f"{self.base_url}/{pool}"
        else:
            self._issuer = cognito_issuer(config.issuer_format, pool.split("_")[0], pool)
        # The iss of each replica region (its token endpoint is /<region>/oauth2/token).
        self.region_issuers = {
            region: cognito_issuer(IssuerFormat.UPDATED, region, pool) for region in config.replica_regions
        }
        self._clients = {client.client_id: client for client in config.clients}
        self._keys: list[_SigningKey] = [_new_signing_key()]  # last one signs

    @property
    def issuer(self) -> str:
        """The ``iss`` claim of the pool's (primary region's) tokens. The JWKS is served at
        ``<public URL>/<pool id>/.well-known/jwks.json`` (``<issuer>/.well-known/jwks.json`` when the
        issuer is the public URL's, as with Cognito)."""
        return self._issuer

    @property
    def jwks_path(self) -> str:
        return f"/{self.config.user_pool_id}/.well-known/jwks.json"

    @property
    def signing_kid(self) -> str:
        return self._keys[-1].kid

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The published public keys, each exactly Cognito's members: alg, e, kid, kty, n, use."""
        keys = []
        for key in self._keys:
            jwk = RSAAlgorithm.to_jwk(key.private_key.public_key(), as_dict=True)
            keys.append({"alg": "RS256", "e": jwk["e"], "kid": key.kid, "kty": "RSA", "n": jwk["n"], "use": "sig"})
        return {"keys": keys}

    def authenticate(self, client_id: str, client_secret: str) -> None:
        """Raise invalid_client unless the pair matches; compared in constant time, known id or not."""
        client = self._clients.get(client_id)
        expected = client.client_secret if client is not None else "\x00unknown-client"
        secret_ok = hmac.compare_digest(client_secret.encode("utf-8"), expected.encode("utf-8"))
        if client is None:
            raise TokenRequestError("invalid_client", f"unknown client_id {client_id[:128]!r}")
        if not secret_ok:
            raise TokenRequestError("invalid_client", f"wrong client_secret for client_id {client_id[:128]!r}")

    def issue(self, client_id: str, scopes: list[str] | None = None, region: str | None = None) -> str:
        """A signed Cognito-shaped access token. None or [] means all the client's scopes, as Cognito does.
        ``region``: a replica region's token (its ``iss``); None: the pool's own.

        Does not check the secret (see ``authenticate``); raises TokenRequestError with
        invalid_client, unauthorized_client or invalid_scope, the codes Cognito would return.
        """
        if region is not None and region not in self.region_issuers:
            raise ValueError(f"{region!r} is not a replica region of this issuer")
        client = self._clients.get(client_id)
        if client is None:
            raise TokenRequestError("invalid_client", f"unknown client_id {client_id!r}")
        if CLIENT_CREDENTIALS not in client.grant_types:
            raise TokenRequestError(
                "unauthorized_client", f"client {client_id!r} is not allowed the client_credentials grant"
            )
        if scopes:
            granted = list(dict.fromkeys(scopes))  # drop repeats, keep the caller's order
            refused = [scope for scope in granted if scope not in client.allowed_scopes]
            if refused:
                raise TokenRequestError(
                    "invalid_scope", f"client {client_id!r} is not allowed scope(s) {' '.join(refused)}"
                )
        else:
            granted = list(client.allowed_scopes)
        claims = access_claims(
            self._issuer if region is None else self.region_issuers[region],
            client_id,
            granted,
            ttl=self.config.token_ttl_seconds,
            custom=client.custom_claims,
        )
        return self._sign(claims)

    def issue_id_token(self, client_id: str, username: str) -> str:
        """A signed Cognito-shaped ID token for user ``username`` of app client ``client_id`` (its
        ``aud``). Cognito issues ID tokens to signed-in users, never for client_credentials: the
        sidecar must refuse one as a bearer token, and this lets a developer see it do so.

        Does not check the secret (see ``authenticate``); raises TokenRequestError with
        invalid_client or invalid_request."""
        if client_id not in self._clients:
            raise TokenRequestError("invalid_client", f"unknown client_id {client_id!r}")
        if not _USERNAME.fullmatch(username):
            raise TokenRequestError(
                "invalid_request", "username must be 1 to 128 characters without white space or control characters"
            )
        return self._sign(id_claims(self._issuer, client_id, username, ttl=self.config.token_ttl_seconds))

    def _sign(self, claims: dict[str, object]) -> str:
        key = self._keys[-1]
        # typ=None makes PyJWT leave "typ" out: Cognito's header is only kid and alg.
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "typ": None})

    def rotate(self, retire_old: bool = False) -> str:
        """Sign with a new key from now on; keep older keys published unless ``retire_old``."""
        new_key = _new_signing_key()
        self._keys = [new_key] if retire_old else [*self._keys, new_key]
        log.info(
            "dev issuer rotated signing key: kid=%s published=%s",
            new_key.kid,
            [key.kid for key in self._keys],
        )
        return new_key.kid
