"""What Amazon Cognito writes into a client_credentials access token and into a user's ID token
(their claims, in its order), and the shape of its region and user pool names.

Why a module: the development issuer serves such tokens, the policy tools' simulator mints them,
and the tests and the benchmark sign them; one builder keeps every one of them the shape the
verifier meets from a real user pool (docs/cognito.md). The serving path never builds a token; the
policy loader and the dev issuer's configuration check pool ids and regions with the same patterns.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

# An AWS region (us-east-1) and a user pool id: its region, '_', letters and digits (us-east-1_Abc123).
REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+\Z")
POOL_ID = re.compile(r"^(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)_[0-9A-Za-z]+\Z")
# The claims Cognito writes itself into a client_credentials access token; a pre token generation
# trigger may add others (custom claims), never replace these.
TOKEN_CLAIMS = ("sub", "token_use", "scope", "auth_time", "iss", "exp", "iat", "version", "jti", "client_id")


def access_claims(
    issuer: str,
    client_id: str,
    scopes: str | Iterable[str],
    *,
    ttl: int = 3600,
    now: int | None = None,
    custom: Mapping[str, Any] | None = None,
    replace: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The claims of an access token ``issuer`` gives ``client_id`` for ``scopes``, valid ``ttl``
    seconds from ``now``: the trigger's ``custom`` claims first, then Cognito's own, in Cognito's
    order (they win over a custom claim of the same name, as with Cognito).

    ``replace``: claims set after that, a value of None removing the claim: tokens Cognito would
    not issue, to see how the verifier refuses each (tests, the native compiler's probes).
    """
    issued = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        **(custom or {}),
        "sub": client_id,
        "token_use": "access",
        "scope": scopes if isinstance(scopes, str) else " ".join(scopes),
        "auth_time": issued,
        "iss": issuer,
        "exp": issued + ttl,
        "iat": issued,
        "version": 2,
        "jti": str(uuid.uuid4()),
        "client_id": client_id,
    }
    for name, value in (replace or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def id_claims(issuer: str, client_id: str, username: str, *, ttl: int = 3600, now: int | None = None) -> dict[str, Any]:
    """The claims of the ID token ``issuer`` gives user ``username`` signed in through app client
    ``client_id``, valid ``ttl`` seconds from ``now``, in Cognito's order (without the user
    attributes, groups and identities a pool may add). ``sub`` is the same for the same user of the
    same pool, as Cognito's is. Not an access token: the verifier refuses it (token_use "id")."""
    issued = int(time.time()) if now is None else now
    return {
        "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{issuer}#{username}")),
        "iss": issuer,
        "cognito:username": username,
        "origin_jti": str(uuid.uuid4()),
        "aud": client_id,
        "event_id": str(uuid.uuid4()),
        "token_use": "id",
        "auth_time": issued,
        "exp": issued + ttl,
        "iat": issued,
        "jti": str(uuid.uuid4()),
    }
