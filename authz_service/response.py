"""Decision -> Answer: what every front door sends back, in protocol-neutral terms.

Denials follow RFC 6750 section 3: ``WWW-Authenticate: Bearer realm=..., error=...`` plus a small
JSON body. Allowed requests get the verified identity as ``x-auth-*`` headers; any copy of those
headers the client sent (in any spelling a server reads as theirs: x_auth_sub, x.auth.sub,
x~auth~sub) is removed so the upstream can trust them, and so is the Authorization header, unless
the route forwards the token (``forward_token``): the app has the identity, and an app that logs
its headers cannot leak a credential it never gets.
Each front door turns an Answer into its protocol once (``Answer.rendered``) and reuses it.

Denial answers depend only on (reason, description, route, realm) and allows only on (verified
identity, spoofed header spellings, whether the token is forwarded), so both are built once and
reused (bounded LRUs): a Check costs a cache lookup, not a JSON dump and a header list. (An allow
with more spoofed spellings than there are identity headers is built each time: no client but a
hostile one sends them.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .decision import REASONS, Decision, Reason
from .policy import Route
from .request import IDENTITY_HEADERS, HttpRequest

_NO_IDENTITY = ("", "", "")
# An allow answer is cached for at most this many spoofed identity-header spellings (one for each
# identity header): there are thousands of spellings (request.special_names), so a cache keyed by
# any set of them would let a client fill it with entries of up to Envoy's 100 headers each.
_MAX_CACHED_SPOOFED = len(IDENTITY_HEADERS)
AUTHORIZATION = "authorization"


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity, as a memo key
class Answer:
    """One answer, whatever the protocol.

    Allowed: ``headers`` are set on the request Envoy forwards upstream and ``remove`` are removed
    from it (never a name that is set: Envoy removes after it sets). Denied: ``status``, ``headers``
    and ``body`` are the HTTP response Envoy sends the client.
    """

    allowed: bool
    reason: Reason
    status: int
    headers: tuple[tuple[str, str], ...]
    remove: tuple[str, ...] = ()
    body: str = ""
    # Per front door, its protocol form of this answer (a CheckResponse, a response head), built
    # on first use: answers are cached, so each form is built once per distinct answer.
    rendered: dict[str, Any] = field(default_factory=dict)

    @property
    def grpc_code(self) -> int:
        """0 (OK) allows; a dry-run allow keeps its denial reason but is still an allow."""
        return 0 if self.allowed else REASONS[self.reason].grpc_code


class Answers:
    """Builds (and caches) Answers for one realm (the realm is part of every 401)."""

    def __init__(self, realm: str) -> None:
        self.realm = realm.replace("\\", "").replace('"', "")
        self._denials = lru_cache(maxsize=1024)(self._build_denial)
        self._allows = lru_cache(maxsize=4096)(self._build_allow)

    def answer(self, decision: Decision, request: HttpRequest | None) -> Answer:
        if not decision.allowed:
            return self._denials(decision.reason, decision.description, decision.route)
        claims = decision.claims
        # A public route, or a dry-run allow of an invalid token, has no verified identity: the
        # identity headers are then only removed, never set.
        identity = (claims.client_id, claims.scope_text, claims.sub) if claims is not None else _NO_IDENTITY
        spoofed = request.spoofed_identity_headers if request is not None else ()
        if len(spoofed) > _MAX_CACHED_SPOOFED:  # only a hostile client sends many: built, not cached
            return self._build_allow(decision.reason, identity, spoofed, decision.forwards_token)
        return self._allows(decision.reason, identity, spoofed, decision.forwards_token)

    def _build_allow(
        self, reason: Reason, identity: tuple[str, str, str], spoofed: tuple[str, ...], forward_token: bool
    ) -> Answer:
        headers = tuple((name, value) for name, value in zip(IDENTITY_HEADERS, identity, strict=True) if value)
        set_names = {name for name, _ in headers}
        remove = [name for name in IDENTITY_HEADERS if name not in set_names]
        remove.extend(n for n in spoofed if n not in set_names and n not in remove)
        if not forward_token:
            remove.append(AUTHORIZATION)
        return Answer(True, reason, 200, headers, tuple(remove))

    def _build_denial(self, reason: Reason, description: str, route: Route | None) -> Answer:
        outcome = REASONS[reason]
        error = outcome.oauth_error
        body: dict[str, str] = {"error": error or "unauthorized"}
        if description:
            body["error_description"] = description
        headers = [("content-type", "application/json"), ("cache-control", "no-store")]
        scope = _required_scope(reason, route)
        # RFC 6750 section 3: a challenge with every 400/401 and with insufficient_scope, the 403
        # of a verified token that fails a route's scopes or conditions.
        if outcome.http_status in (400, 401) or error == "insufficient_scope":
            headers.append(("www-authenticate", self._challenge(error, description, scope)))
        if scope:
            body["scope"] = scope
        if outcome.http_status == 503:
            headers.append(("retry-after", "5"))
        return Answer(False, reason, outcome.http_status, tuple(headers), body=json.dumps(body, separators=(",", ":")))

    def _challenge(self, error: str | None, description: str, scope: str) -> str:
        parts = [f'realm="{self.realm}"']
        if error:
            parts.append(f'error="{error}"')
            parts.append(f'error_description="{_quote_safe(description)}"')
        if scope:
            parts.append(f'scope="{scope}"')
        return "Bearer " + ", ".join(parts)


def _required_scope(reason: Reason, route: Route | None) -> str:
    """RFC 6750's ``scope`` attribute of a scope denial: the scopes that would do (any of the route's
    ``scopes``, or all of its ``all_scopes``); empty for every other answer (no scope helps)."""
    if route is None:
        return ""
    if reason is Reason.INSUFFICIENT_SCOPE:
        return route.scopes_text
    if reason is Reason.MISSING_SCOPE:
        return route.all_scopes_text
    return ""


def _quote_safe(text: str) -> str:
    # RFC 6750: error_description uses %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')
