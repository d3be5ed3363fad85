"""Run one request through the real Check pipeline, outside the server.

Why: `explain` and `test` must show what the service would do, so they send the request, built
by the front doors' own ``request.http_request``, through the same ``check.Checker`` the doors
use; nothing here decides, and no front door or protocol is involved.
With ``--scopes`` instead of a real token, a token is minted and signed with a throw-away RSA
key that only this process trusts, so the real TokenVerifier (issuer, client allow-list, scopes,
custom claims) checks it: the simulation covers the policy, not Cognito's crypto.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.api_jwk import PyJWK

from ..check import Checker
from ..cognito import access_claims
from ..decision import Decision
from ..keys import IssuerKey, KeySource
from ..policy import Issuer, Policy
from ..request import HttpRequest, request_from
from ..response import Answer, Answers
from ..tokens import TokenVerifier

SIMULATED_KID = "authz-service-simulated"
DEFAULT_CLIENT_ID = "simulated-client"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The exact answer Envoy would get, and the decision behind it (built by Checker.check)."""

    answer: Answer
    decision: Decision


class _FixedPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy


async def run_check(
    policy: Policy, verifier: TokenVerifier, method: str, path: str, token: str | None, realm: str = "authz-service"
) -> Outcome:
    """What the service answers one request (the Check pipeline, without metrics)."""
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    checker = Checker(_FixedPolicy(policy), verifier, Answers(realm))
    return await checker.check(_request, (method, path, headers), Outcome)


def _request(raw: tuple[str, str, dict[str, str]]) -> HttpRequest:
    return request_from(*raw)


class _SimulatedKeys(KeySource):
    """Trusts exactly one in-memory key, published by every issuer of the policy."""

    def __init__(self, public: PyJWK, policy: Policy) -> None:
        self._public = public
        self._published = tuple(IssuerKey(issuer.issuer, public) for issuer in policy.issuers)

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        return self._published if kid == SIMULATED_KID else ()

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self._public if kid == SIMULATED_KID else None

    def has_keys(self, issuer: Issuer) -> bool:
        return True

    async def refetch(self, issuer: Issuer) -> None:
        return None


@lru_cache(maxsize=1)
def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Simulator:
    """Mints Cognito-shaped access tokens for a policy's issuers and verifies them for real.

    The simulated key is published by every issuer of ``policy``, so a token minted for an issuer
    the policy does not trust is signed by a trusted key but names another issuer: wrong_issuer.
    """

    def __init__(self, policy: Policy) -> None:
        private = _private_key()
        public = PyJWK.from_dict(
            {
                **jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True),
                "kid": SIMULATED_KID,
                "alg": "RS256",
                "use": "sig",
            }
        )
        self._private = private
        self.verifier = TokenVerifier(_SimulatedKeys(public, policy))

    def token(
        self,
        issuer: str,
        scopes: list[str],
        client_id: str | None = None,
        custom: Mapping[str, Any] | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """A client_credentials access token as Cognito shapes it, holding exactly ``scopes`` and the
        ``custom`` claims a pre token generation trigger would add (they never replace Cognito's).
        ``overrides`` and ``header`` replace claims and header members (None removes one): tokens
        Cognito would not issue, to see how the verifier refuses each."""
        claims = access_claims(
            issuer, client_id or DEFAULT_CLIENT_ID, scopes, ttl=300, custom=custom, replace=overrides
        )
        jose = {name: value for name, value in {"kid": SIMULATED_KID, **(header or {})}.items() if value is not None}
        return jwt.encode(claims, self._private, algorithm="RS256", headers=jose)
