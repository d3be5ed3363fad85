"""Request + policy + verified token -> a typed Decision.

This is the whole authorization logic in one function; parsing lives in ``request``, rendering
in ``response``. Everything that is not explicitly allowed is denied.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .claims import Claims
from .conditions import ANY_SCOPE_TEXT, Unmet
from .policy import Mode, Policy, Route
from .request import HttpRequest
from .tokens import Failure, TokenError, TokenVerifier, bearer_token


class Reason(enum.Enum):
    """Why a decision was made. A closed set: the values are metric labels and log fields."""

    ALLOWED = "allowed"
    PUBLIC = "public"
    MISSING_TOKEN = "missing_token"
    BAD_REQUEST = "bad_request"
    INVALID_TOKEN = "invalid_token"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_TOKEN_USE = "wrong_token_use"
    CLIENT_NOT_ALLOWED = "client_not_allowed"
    INSUFFICIENT_SCOPE = "insufficient_scope"  # none of the route's scopes
    MISSING_SCOPE = "missing_scope"  # one of the route's all_scopes
    CLIENT_NOT_ALLOWED_FOR_ROUTE = "client_not_allowed_for_route"  # the route's client_ids
    CLAIM_MISMATCH = "claim_mismatch"  # a claim condition: claim absent or another value
    PARAM_MISMATCH = "param_mismatch"  # a claim bound to a path parameter: absent or another value
    DENY_LISTED = "deny_listed"  # the policy's deny section lists the token's client or jti
    NO_ROUTE = "no_route"
    KEYS_UNAVAILABLE = "keys_unavailable"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one Reason is answered, in every protocol: the single source of these mappings."""

    http_status: int  # what the client gets (Envoy relays it); 200 for the allowing reasons
    oauth_error: str | None  # RFC 6750 section 3.1 / RFC 6749 section 5.2 error code; None: no code
    grpc_code: int  # google.rpc.Code of the CheckResponse status (0 OK allows)


_UNAUTHENTICATED = Outcome(401, "invalid_token", 16)

# Every Reason, once (tests/test_decision.py fails when a Reason is missing). RFC 6750: no error
# code when no credentials were presented; 400/401/403 carry WWW-Authenticate (see response.py).
REASONS: dict[Reason, Outcome] = {
    Reason.ALLOWED: Outcome(200, None, 0),
    Reason.PUBLIC: Outcome(200, None, 0),
    Reason.MISSING_TOKEN: Outcome(401, None, 16),  # UNAUTHENTICATED
    Reason.BAD_REQUEST: Outcome(400, "invalid_request", 3),  # INVALID_ARGUMENT
    Reason.INVALID_TOKEN: _UNAUTHENTICATED,
    Reason.EXPIRED: _UNAUTHENTICATED,
    Reason.NOT_YET_VALID: _UNAUTHENTICATED,
    Reason.BAD_SIGNATURE: _UNAUTHENTICATED,
    Reason.UNKNOWN_KEY: _UNAUTHENTICATED,
    Reason.WRONG_ISSUER: _UNAUTHENTICATED,
    Reason.WRONG_TOKEN_USE: _UNAUTHENTICATED,
    Reason.CLIENT_NOT_ALLOWED: _UNAUTHENTICATED,
    # RFC 6750's invalid_token covers a revoked token: the deny list is the revocation Cognito
    # does not offer for client_credentials tokens.
    Reason.DENY_LISTED: _UNAUTHENTICATED,
    Reason.INSUFFICIENT_SCOPE: Outcome(403, "insufficient_scope", 7),  # PERMISSION_DENIED
    # A verified token that fails a route condition: RFC 6750's 403 code ("requires higher
    # privileges than provided by the access token"); the description names what is missing.
    Reason.MISSING_SCOPE: Outcome(403, "insufficient_scope", 7),
    Reason.CLIENT_NOT_ALLOWED_FOR_ROUTE: Outcome(403, "insufficient_scope", 7),
    Reason.CLAIM_MISMATCH: Outcome(403, "insufficient_scope", 7),
    # A valid token of another tenant: 403 like claim_mismatch (a new token of the same client is
    # no better, so not 401), its own reason so that cross-tenant attempts have a series of their own.
    Reason.PARAM_MISMATCH: Outcome(403, "insufficient_scope", 7),
    Reason.NO_ROUTE: Outcome(403, "access_denied", 7),
    Reason.KEYS_UNAVAILABLE: Outcome(503, "temporarily_unavailable", 14),  # UNAVAILABLE
    Reason.INTERNAL_ERROR: Outcome(500, "server_error", 13),  # INTERNAL
}

NO_ROUTE_TEXT = "no route matches this request"
NO_ROUTE_LABEL = "no_route"  # the route label of a decision no route took (metrics, logs)
MISSING_TOKEN_TEXT = "no bearer token"
# Each token failure is the reason of the same name.
_TOKEN_FAILURES: dict[Failure, Reason] = {failure: Reason(failure.value) for failure in Failure}
# Which Reason each unmet route condition is (public: the native compiler renders the same answers).
UNMET_REASONS: dict[Unmet, Reason] = {
    Unmet.CLIENT: Reason.CLIENT_NOT_ALLOWED_FOR_ROUTE,
    Unmet.ANY_SCOPE: Reason.INSUFFICIENT_SCOPE,
    Unmet.ALL_SCOPES: Reason.MISSING_SCOPE,
    Unmet.CLAIM: Reason.CLAIM_MISMATCH,
    Unmet.PARAM: Reason.PARAM_MISMATCH,
}
# Denials a dry-run route still enforces: keys unavailable (a 503 is never an allow) and the deny
# list (an emergency measure holds on every protected route).
_ENFORCED_IN_DRY_RUN = frozenset({Reason.KEYS_UNAVAILABLE, Reason.DENY_LISTED})


# Not frozen, though never modified once built: one is built on every Check, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs ~1 us against ~0.25 us.
@dataclass(slots=True)
class Decision:
    """The outcome of one Check.

    ``allowed`` is what Envoy is told. ``dry_run`` marks a denial that a dry-run route turned
    into an allow: ``reason``/``status`` then still describe the denial that would have happened.
    ``forward_token`` (None: as ``route`` says) overrides the route's when a request had to meet
    two routes that disagree (``_decide_all``).
    """

    allowed: bool
    reason: Reason
    description: str = ""
    route: Route | None = None
    claims: Claims | None = None
    dry_run: bool = False
    forward_token: bool | None = None

    @property
    def forwards_token(self) -> bool:
        """Whether the app gets the request's Authorization header (an allow only)."""
        if self.forward_token is not None:
            return self.forward_token
        return self.route is not None and self.route.forward_token

    @property
    def status(self) -> int:
        """The HTTP status of the reason (200 when allowed; a dry-run allow keeps the denial's)."""
        return REASONS[self.reason].http_status

    @property
    def route_label(self) -> str:
        return self.route.name if self.route is not None else NO_ROUTE_LABEL

    @property
    def kind(self) -> str:
        """The ``decision`` metric label: allow, deny, or dry_run_deny (allowed, but only by dry-run)."""
        return "dry_run_deny" if self.dry_run else "allow" if self.allowed else "deny"


def deny(reason: Reason, description: str, route: Route | None = None) -> Decision:
    return Decision(False, reason, description, route)


async def decide(request: HttpRequest, policy: Policy, verifier: TokenVerifier) -> Decision:
    """Decide one request: route, then credentials, then the route's scopes and conditions."""
    segments = request.segments
    if (segments and not segments[-1]) or (policy.literal_escapes is not None and "%" in request.path):
        # A trailing '/' or an escape: the routes of every reading (Policy.routes_for)
        return await _decide_all(request, policy.routes_for(request.method, segments), policy, verifier)
    route = policy.match(request.method, segments)
    if route is None:
        return deny(Reason.NO_ROUTE, NO_ROUTE_TEXT)
    if route.public:
        return Decision(True, Reason.PUBLIC, route=route)
    decision = await _authorize(request, route, policy, verifier)
    if not decision.allowed:
        return _as_mode(route, decision)
    return decision


async def _decide_all(
    request: HttpRequest, routes: tuple[Route, ...], policy: Policy, verifier: TokenVerifier
) -> Decision:
    """A request that must meet every route of ``routes`` (Policy.routes_for: the route as
    written, then those of the path's other readings). The first route that denies answers (the denial names
    it); else the first dry-run denial; else an allow labelled with the first protected route, the
    one whose requirements the request met. The token is verified once. The app gets the token only
    when every route forwards it (either route's handler may serve the request)."""
    if not routes:
        return deny(Reason.NO_ROUTE, NO_ROUTE_TEXT)
    forward = all(route.forward_token for route in routes)
    guards = [route for route in routes if not route.public]
    if not guards:
        return Decision(True, Reason.PUBLIC, route=routes[0], forward_token=forward)
    first = await _authorize(request, guards[0], policy, verifier)
    decisions = [_as_mode(guards[0], first)]
    for route in guards[1:]:
        if first.claims is None or first.reason is Reason.DENY_LISTED:  # the token failed: every route alike
            decision = deny(first.reason, first.description, route)
        else:
            decision = await _authorize(request, route, policy, _Verified(first.claims))
        decisions.append(_as_mode(route, decision))
    decision = (
        next((d for d in decisions if not d.allowed), None)
        or next((d for d in decisions if d.dry_run), None)
        or decisions[0]
    )
    return replace(decision, forward_token=forward)


class _Verified:
    """A token's claims, verified already, in the verifier's place: ``_authorize`` then checks only
    the route's requirements (the token of a request that must meet two routes is verified once)."""

    def __init__(self, claims: Claims) -> None:
        self._claims = claims

    def cached(self, authorization: tuple[str, ...], policy: Policy) -> Claims:
        return self._claims

    async def verify_uncached(self, token: str, policy: Policy) -> Claims:
        return self._claims


def _as_mode(route: Route, decision: Decision) -> Decision:
    """A denial as the route's mode answers it: a dry-run route allows it (marked dry-run), except
    keys unavailable (a 503 is never turned into an allow) and a deny-listed token."""
    if not decision.allowed and route.mode is Mode.DRY_RUN and decision.reason not in _ENFORCED_IN_DRY_RUN:
        return Decision(True, decision.reason, decision.description, route, decision.claims, dry_run=True)
    return decision


async def _authorize(
    request: HttpRequest, route: Route, policy: Policy, verifier: TokenVerifier | _Verified
) -> Decision:
    try:
        # A token verified before skips parsing and verification (see TokenVerifier.cached).
        claims = verifier.cached(request.authorization, policy)
        if claims is None:
            token = bearer_token(request.authorization)
            if token is None:
                return deny(Reason.MISSING_TOKEN, MISSING_TOKEN_TEXT, route)
            claims = await verifier.verify_uncached(token, policy)
    except TokenError as exc:
        # A deny-listed token verified: its claims name the client in the log line.
        return Decision(False, _TOKEN_FAILURES[exc.failure], exc.description, route, exc.claims)
    conditions = route.conditions
    if conditions is None:  # only any-of scopes: the common route, one set operation
        if route.scopes.isdisjoint(claims.scopes):
            return Decision(False, Reason.INSUFFICIENT_SCOPE, ANY_SCOPE_TEXT, route, claims)
        return Decision(True, Reason.ALLOWED, "", route, claims)
    # Conditions are route properties, checked here on every Check (a cached token included)
    # against the policy in force.
    unmet = conditions.unmet(claims, request.segments)
    if unmet is not None:
        return Decision(False, UNMET_REASONS[unmet[0]], unmet[1], route, claims)
    return Decision(True, Reason.ALLOWED, "", route, claims)
