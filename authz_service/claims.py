"""What token verification proves (``Claims``), and the claim rules the policy and the verifier share.

Why a module of its own: the verifier (tokens), the verified-token cache (tokencache), the policy
loader (conditions) and the decision layer all use these types. Kept here, none of those modules
needs another only for a type, and tokens <-> tokencache import no circle. It imports nothing
of the service (where keys come from is keys.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Claims Cognito sets itself, which a pre token generation trigger can neither add nor override
# (Cognito developer guide, "Pre token generation Lambda trigger"), plus every claim whose name
# starts with "cognito:". Route claim conditions refuse them: their values come from Cognito (or
# are checked by the verifier with their own policy keys: iss, client_id, scope), never from the
# pool's own customization, so a condition on them is a mistake.
COGNITO_CONTROLLED_CLAIMS = frozenset(
    {
        "acr",
        "amr",
        "aud",
        "at_hash",
        "auth_time",
        "azp",
        "exp",
        "iat",
        "identities",
        "iss",
        "jti",
        "nbf",
        "nonce",
        "origin_jti",
        "sub",
        "token_use",
    }
)
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), scope = scope-token *( SP scope-token ).
# Printable ASCII but space, quote and backslash: what a policy may require and a scope claim may list.
SCOPE_CHARS = r"\x21\x23-\x5B\x5D-\x7E"  # a regex character class's contents
SCOPE_TOKEN = rf"[{SCOPE_CHARS}]+"
# Claims the verifier already checks, each with its own policy key (the fix a message names).
VERIFIED_CLAIM_KEYS = {"client_id": "client_ids", "scope": "scopes or all_scopes", "iss": "issuers"}


def cognito_controlled(name: str) -> bool:
    """Whether Cognito, not a pre token generation trigger, decides this claim's value."""
    return name in COGNITO_CONTROLLED_CLAIMS or name in VERIFIED_CLAIM_KEYS or name.startswith("cognito:")


class Unsupported:
    """A custom claim whose JSON type no condition compares (an object, null, a mixed list):
    present, so not "missing", but no condition ever holds for it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unsupported type>"


UNSUPPORTED = Unsupported()
# A custom claim value as Claims keeps it: a string, a number, a boolean, a list of strings.
ClaimValue = str | int | float | bool | tuple[str, ...] | Unsupported
NO_CUSTOM_CLAIMS: Mapping[str, ClaimValue] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token proves; the only token data that leaves the verifier.

    ``custom`` holds only the custom claims the policy's route conditions name (``extracted``, the
    policy's set of names when the token was verified), so a cache entry stays small; a claim of
    ``extracted`` missing from ``custom`` is absent from the token. Custom claims are never
    forwarded upstream: they are compared, not trusted as header text.
    """

    issuer: str
    client_id: str
    sub: str
    scopes: frozenset[str]
    scope_text: str  # the claim as sent (space separated), forwarded as x-auth-scopes
    exp: int
    kid: str
    custom: Mapping[str, ClaimValue] = field(default_factory=lambda: NO_CUSTOM_CLAIMS)
    extracted: frozenset[str] = frozenset()

    def covers(self, names: frozenset[str]) -> bool:
        """Whether these claims were read for every claim name in ``names`` (a cached token verified
        under a policy that named fewer claims must be read again)."""
        return not names or names is self.extracted or names <= self.extracted


def claim_value(value: object) -> ClaimValue:
    """A custom claim's JSON value as Claims keeps it (lists of strings become tuples)."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return UNSUPPORTED
