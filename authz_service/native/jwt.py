"""The jwt_authn filter: one provider per accepted ``iss``, keys from the service's JWKS endpoint.

jwt_authn only verifies here (``allow_missing_or_failed``), and only a credential sent exactly as
the service reads it (``patterns.BEARER_JWT``, its one rule): a token it verifies leaves its payload
and header in the request's metadata for the RBAC checks; one it cannot or may not verify (bad
signature, unknown kid, expired, malformed, too long, keys unavailable...) leaves none, and the
ext_authz filter, enabled exactly then, lets the service decide it with its own words, its
unknown-kid re-fetch and its 503. Its clock skew is one second less than the service's leeway, so
jwt_authn never accepts a token the service would find expired or not yet valid (its seconds are
whole, the service's are not).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ..policy import Policy
from ..request import IDENTITY_HEADERS
from ..tokens import MAX_TOKEN_BYTES
from .checks import HEADER, PAYLOAD
from .options import Options
from .patterns import BEARER, BEARER_JWT

JWT_AUTHN_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
SERVICE_HTTP_CLUSTER = "authz_service_http"
REQUIREMENT = "verify"
# The claims the service forwards upstream, in IDENTITY_HEADERS order (response.Answers._build_allow).
_FORWARDED_CLAIMS = ("client_id", "scope", "sub")


def jwks_uri(options: Options, issuer: str) -> str:
    """Where the service serves ``issuer``'s current keys (admin.AdminServer, ``/jwks``)."""
    return f"http://{options.service_http}/jwks?iss={quote(issuer, safe='')}"


def provider_names(policy: Policy) -> list[str]:
    return [f"issuer-{i}" for i in range(len(policy.issuers))]


def jwt_authn(policy: Policy, options: Options) -> dict[str, Any]:
    """The filter's typed config."""
    requirement = {
        "requires_any": {
            "requirements": [
                *({"provider_name": name} for name in provider_names(policy)),
                {"allow_missing_or_failed": {}},
            ]
        }
    }
    return {
        "@type": JWT_AUTHN_TYPE,
        "providers": {
            name: _provider(issuer.issuer, options)
            for name, issuer in zip(provider_names(policy), policy.issuers, strict=True)
        },
        "requirement_map": {REQUIREMENT: requirement},
        # The filter runs on native routes only (routes.py), and verifies only a canonical bearer
        # JWT within the service's limits: one regex over the token, once per request. Any other
        # credential meets no rule, so no token is verified and the service decides.
        "rules": [
            {
                "match": {
                    "prefix": "/",
                    "headers": [{"name": "authorization", "string_match": {"safe_regex": {"regex": BEARER_JWT}}}],
                },
                "requirement_name": REQUIREMENT,
            }
        ],
    }


def _provider(issuer: str, options: Options) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "issuer": issuer,
        "remote_jwks": {
            "http_uri": {"uri": jwks_uri(options, issuer), "cluster": SERVICE_HTTP_CLUSTER, "timeout": "2s"},
            # Fetched in the background, before the listener starts and then every cache_duration;
            # a failed fetch keeps the keys Envoy has and is retried after failed_refetch_duration.
            "cache_duration": f"{options.jwks_cache_seconds}s",
            "async_fetch": {"fast_listener": False, "failed_refetch_duration": "1s"},
        },
        # Only "Bearer <token>" in Authorization (never an access_token query parameter). The header
        # stays on the request through the filters (forward: the token checks after this filter read
        # it); each route that does not forward the token removes it on the way to the app (routes.py).
        "from_headers": [{"name": "authorization", "value_prefix": BEARER}],
        "forward": True,
        "require_expiration": True,
        "clock_skew_seconds": options.leeway - 1,
        "payload_in_metadata": PAYLOAD,
        "header_in_metadata": HEADER,
        # Set only for a non-empty string claim, as the service sets them; the client's own copies
        # were removed before any filter ran (the listener's early header mutation).
        "claim_to_headers": [
            {"header_name": header, "claim_name": claim}
            for header, claim in zip(IDENTITY_HEADERS, _FORWARDED_CLAIMS, strict=True)
        ],
    }
    if options.jwt_cache_size:
        provider["jwt_cache_config"] = {"jwt_cache_size": options.jwt_cache_size, "jwt_max_token_size": MAX_TOKEN_BYTES}
    return provider
