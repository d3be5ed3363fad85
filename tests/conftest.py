"""Shared test material: RSA keys, a token factory shaped exactly like Cognito's, and the one
in-memory key source (what the JWKS cache would hold) for in-process tests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.api_jwk import PyJWK

from authz_service.claims import IssuerKey
from authz_service.policy import Issuer

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test00001"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        data = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def token(self, **overrides: Any) -> str:
        """A Cognito client_credentials access token; pass claim=None to drop a claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": "client-a", "token_use": "access", "scope": "transactions/post",
            "auth_time": now, "iss": ISSUER, "exp": now + 3600, "iat": now,
            "version": 2, "jti": str(uuid.uuid4()), "client_id": "client-a",
        }
        headers = {"kid": self.kid, "alg": "RS256"}
        for key, value in overrides.pop("header", {}).items():
            headers[key] = value
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return jwt.encode(claims, self.private, algorithm="RS256", headers=headers)


def make_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def key_a() -> SigningKey:
    return make_key("kid-a")


@pytest.fixture(scope="session")
def key_b() -> SigningKey:
    return make_key("kid-b")


class MemoryKeys:
    """A real in-memory KeySource: the key sets the JWKS cache would hold per issuer (``keys`` is
    the ``issuer``'s, ``publish`` adds another issuer's), plus a refetch we can script."""

    def __init__(self, *keys: SigningKey, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.keys = {k.kid: PyJWK(k.jwk()) for k in keys}
        self.others: dict[str, dict[str, PyJWK]] = {}
        self.after_refetch: dict[str, PyJWK] | None = None
        self.refetched: list[str] = []

    def publish(self, issuer: str, *keys: SigningKey) -> None:
        self.others[issuer] = {k.kid: PyJWK(k.jwk()) for k in keys}

    def _key_sets(self) -> dict[str, dict[str, PyJWK]]:
        return {self.issuer: self.keys, **self.others}

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        return tuple(IssuerKey(iss, keys[kid]) for iss, keys in self._key_sets().items() if kid in keys)

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self._key_sets().get(issuer.issuer, {}).get(kid)

    def has_keys(self, issuer: Issuer) -> bool:
        return bool(self._key_sets().get(issuer.issuer))

    async def refetch(self, issuer: Issuer) -> None:
        self.refetched.append(issuer.issuer)
        if self.after_refetch is not None and issuer.issuer == self.issuer:
            self.keys = self.after_refetch


@pytest.fixture
def traced():
    """Tracing on, its spans kept in memory as each ends: ``(tracing, exporter)``."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from authz_service.tracing import Tracing, tracing_settings

    exporter = InMemorySpanExporter()
    settings = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp"})
    assert settings is not None
    return Tracing(settings, "test", exporter=exporter), exporter
