"""Shared test material: RSA keys and a token factory shaped exactly like Cognito's."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

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
