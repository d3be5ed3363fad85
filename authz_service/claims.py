"""What token verification proves (``Claims``) and where it finds signing keys (``KeySource``).

Why a module of its own: the verifier (tokens), the verified-token cache (tokencache), the key
sources (jwks, simulate) and the decision layer all use these types. Kept here, none of those
modules needs another only for a type, and tokens <-> tokencache import no circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from jwt.api_jwk import PyJWK

if TYPE_CHECKING:
    from .policy import Issuer


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token proves; the only token data that leaves the verifier."""

    issuer: str
    client_id: str
    sub: str
    scopes: frozenset[str]
    scope_text: str  # the claim as sent (space separated), forwarded as x-auth-scopes
    exp: int
    kid: str


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
