"""What token verification proves (``Claims``) and where it finds signing keys (``KeySource``).

Why a module of its own: the verifier (tokens), the verified-token cache (tokencache), the key
sources (jwks, simulate) and the decision layer all use these types. Kept here, none of those
modules needs another only for a type, and tokens <-> tokencache import no circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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


class KeySource(Protocol):
    """Where verification finds signing keys (implemented by jwks.JwksCache)."""

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None: ...

    def has_keys(self, issuer: Issuer) -> bool: ...

    async def refetch(self, issuer: Issuer) -> None:
        """Fetch the issuer's JWKS again because a token named an unknown kid (rate limited)."""
