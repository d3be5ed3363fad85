"""Where token verification finds signing keys: ``KeySource`` (implemented by jwks.JwksCache and
the policy tools' simulator) and the ``IssuerKey`` it hands out.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from jwt.api_jwk import PyJWK

from .policy import Issuer


class IssuerKey(NamedTuple):
    """A signing key and the issuer (its ``iss``) whose JWKS publishes it."""

    issuer: str
    key: PyJWK


class KeySource(Protocol):
    """Where verification finds signing keys (implemented by jwks.JwksCache)."""

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        """Every key published under ``kid``, whichever issuer publishes it. The verifier checks the
        signature before it reads the payload, so before it knows the issuer: the kid (in the
        protected header) is all it has to find the key with. One dictionary lookup."""
        ...

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        """The issuer's key for ``kid`` (the token cache re-checks a hit against it)."""
        ...

    def has_keys(self, issuer: Issuer) -> bool: ...

    async def refetch(self, issuer: Issuer) -> None:
        """Fetch the issuer's JWKS again because a token named an unknown kid (rate limited)."""
