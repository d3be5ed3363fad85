"""Decision -> Envoy CheckResponse.

Denials follow RFC 6750 section 3: ``WWW-Authenticate: Bearer realm=..., error=...`` plus a small
JSON body. Allowed requests get the verified identity as ``x-auth-*`` headers; any copy of those
headers the client sent (hyphen or underscore spelling) is removed so the upstream can trust them.
Denial responses depend only on (reason, description, route, realm) and allows only on (verified
identity, spoofed header spellings), so both are built once and reused (bounded LRUs).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


from ._proto.envoy.config.core.v3 import base_pb2
from ._proto.envoy.service.auth.v3 import external_auth_pb2
from ._proto.google.rpc import status_pb2
from .decision import Decision, Reason
from .policy import Route
from .request import IDENTITY_HEADERS, HttpRequest

_NO_IDENTITY = ("", "", "")

# gRPC status codes (google.rpc.Code) Envoy reads to tell allow from deny.
GRPC_OK = 0
_GRPC_BY_HTTP = {400: 3, 401: 16, 403: 7, 500: 13, 503: 14}  # INVALID_ARGUMENT ... UNAVAILABLE
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# The OAuth error code sent for each reason (RFC 6750 section 3.1 and RFC 6749 section 5.2).
_OAUTH_ERROR = {
    Reason.MISSING_TOKEN: None,  # RFC 6750: no error code when no credentials were presented
    Reason.BAD_REQUEST: "invalid_request",
    Reason.INVALID_TOKEN: "invalid_token",
    Reason.EXPIRED: "invalid_token",
    Reason.NOT_YET_VALID: "invalid_token",
    Reason.BAD_SIGNATURE: "invalid_token",
    Reason.UNKNOWN_KEY: "invalid_token",
    Reason.WRONG_ISSUER: "invalid_token",
    Reason.WRONG_TOKEN_USE: "invalid_token",
    Reason.CLIENT_NOT_ALLOWED: "invalid_token",
    Reason.INSUFFICIENT_SCOPE: "insufficient_scope",
    Reason.NO_ROUTE: "access_denied",
    Reason.KEYS_UNAVAILABLE: "temporarily_unavailable",
    Reason.INTERNAL_ERROR: "server_error",
}


class Renderer:
    """Builds CheckResponses; one per realm (the realm is part of every 401)."""

    def __init__(self, realm: str) -> None:
        self.realm = realm.replace("\\", "").replace('"', "")
        self._denials = lru_cache(maxsize=1024)(self._build_denial)
        self._allows = lru_cache(maxsize=4096)(self._build_ok)

    def render(self, decision: Decision, request: HttpRequest | None) -> external_auth_pb2.CheckResponse:
        if not decision.allowed:
            return self._denials(decision.reason, decision.status, decision.description, decision.route)
        claims = decision.claims
        # A public route, or a dry-run allow of an invalid token, has no verified identity: the
        # identity headers are then only removed, never set.
        identity = (claims.client_id, claims.scope_text, claims.sub) if claims is not None else _NO_IDENTITY
        spoofed = request.spoofed_identity_headers if request is not None else ()
        return self._allows(identity, spoofed)

    def _build_ok(self, identity: tuple[str, str, str], spoofed: tuple[str, ...]) -> external_auth_pb2.CheckResponse:
        # Built once per (verified identity, spoofed header spellings) and reused, like denials:
        # the same client sends the same token many times, and a message is never mutated later.
        response = external_auth_pb2.CheckResponse()
        response.status.code = GRPC_OK
        ok = response.ok_response
        set_names = set()
        for name, value in zip(IDENTITY_HEADERS, identity):
            if value:
                _add(ok.headers, name, value)
                set_names.add(name)
        # Envoy applies headers_to_remove after the headers it sets, so never list a set name.
        remove = [name for name in IDENTITY_HEADERS if name not in set_names]
        remove.extend(n for n in spoofed if n not in set_names and n not in remove)
        ok.headers_to_remove.extend(remove)
        return response

    def _build_denial(
        self, reason: Reason, status: int, description: str, route: Route | None
    ) -> external_auth_pb2.CheckResponse:
        error = _OAUTH_ERROR[reason]
        response = external_auth_pb2.CheckResponse()
        response.status.CopyFrom(status_pb2.Status(code=_GRPC_BY_HTTP.get(status, 7), message=reason.value))
        denied = response.denied_response
        denied.status.code = status  # type: ignore[assignment]  # proto3 enums are open
        body: dict[str, str] = {"error": error or "unauthorized"}
        if description:
            body["error_description"] = description
        headers = [("content-type", "application/json"), ("cache-control", "no-store")]
        if status in (400, 401) or reason is Reason.INSUFFICIENT_SCOPE:
            headers.append(("www-authenticate", self._challenge(error, description, route, reason)))
        if reason is Reason.INSUFFICIENT_SCOPE and route is not None:
            body["scope"] = route.scopes_text
        if status == 503:
            headers.append(("retry-after", "5"))
        for name, value in headers:
            _add(denied.headers, name, value)
        denied.body = json.dumps(body, separators=(",", ":"))
        return response

    def _challenge(self, error: str | None, description: str, route: Route | None, reason: Reason) -> str:
        parts = [f'realm="{self.realm}"']
        if error:
            parts.append(f'error="{error}"')
            parts.append(f'error_description="{_quote_safe(description)}"')
        if reason is Reason.INSUFFICIENT_SCOPE and route is not None:
            parts.append(f'scope="{route.scopes_text}"')
        return "Bearer " + ", ".join(parts)


def _add(headers: Any, name: str, value: str) -> None:
    option = headers.add(append_action=_OVERWRITE)
    option.header.key = name
    option.header.value = value


def _quote_safe(text: str) -> str:
    # RFC 6750: error_description uses %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')
