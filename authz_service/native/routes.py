"""The ingress routes: the request screen, then every policy route most specific first, then the
paths ending in '/' that must meet two routes (plan.trailing_slash_plan), then a default deny.

Which filters act on a route is set per route (``typed_per_filter_config``):

=============  ======  ===  ======  ==============  =========  ===================================
route          screen  jwt  shared  rbac            ext_authz  admission (anonymous token bucket)
=============  ======  ===  ======  ==============  =========  ===================================
screen         -       -    -       -               yes        yes, unless a bearer JWT is sent
native         -       yes  yes     route's checks  if needed  -
ext_authz      -       -    -       -               yes        yes, unless a bearer JWT is sent
public         yes     -    -       -               -          -
no route       yes     -    -       -               -          - (direct 403)
=============  ======  ===  ======  ==============  =========  ===================================

"If needed": the ext_authz filter runs only when jwt_authn verified no token (bootstrap.py). A
route the service decides gets the whole request decided there, its 400s included, so Envoy's own
checks are off on it. Each filter costs CPU on every request it runs for, so a route runs only
the ones it needs. The request screen is an RBAC filter of its own (``screen``) rather than the
native routes' checks (``shared``, ``rbac``): the two never run on one route, so which one left its
result in the request's dynamic metadata tells a native route's decision from a public route's
(decisions.py).

The checks every native route makes first (the screen's 400s, then the token's 401s) are one RBAC
filter's own rules (``shared``), configured once: as a copy in every route's RBAC config, Envoy
compiled them once per route, most of a native route's memory (docs/performance.md, "Native mode's
memory"). The route's RBAC config (``rbac``) holds only the route's checks, numbered after the
shared ones, so the first check that matches still answers, in the service's order.

Every policy route whose token is not forwarded (``forward_token``) removes the Authorization header
from the request it sends to the app, whoever decided it; on the screen routes, which match no
policy route, the service's answer says whether to remove it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..decision import NO_ROUTE_LABEL, NO_ROUTE_TEXT, Reason
from ..policy import REST, PathCase, Policy, escaped_literal_chars
from ..response import AUTHORIZATION
from . import patterns
from .answers import AnswerBook
from .checks import Check, route_checks, rules, screen_checks, token_checks
from .decisions import route_metadata
from .plan import Engine, RoutePlan, TrailingSlashEntry, engine_of_all, meet, trailing_slash_plan

SCREEN, JWT, SHARED, RBAC = "authz.screen", "authz.jwt", "authz.shared", "authz.rbac"
# Each RBAC filter's stat prefix, which also names its dynamic metadata (decisions.py).
SCREEN_STAT_PREFIX, SHARED_STAT_PREFIX, RBAC_STAT_PREFIX = "authz_screen_", "authz_shared_", "authz_rbac_"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
RATE_LIMIT = "envoy.filters.http.local_ratelimit"
APP_CLUSTER = "app"
_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_RBAC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"


@dataclass(frozen=True, slots=True)
class Admission:
    """envoy/envoy.yaml's anonymous token bucket: who is a bearer (never limited), and the limit."""

    bearer_regex: str
    anonymous_limit: dict[str, Any]  # the local_ratelimit per-route config


def screen_routes(policy: Policy) -> list[tuple[str, list[dict[str, Any]]]]:
    """Requests the service must read itself (patterns.py says why), in its order of checks, as
    (name, header matchers). Each costs every request that passes it (twice: the bearer and the
    anonymous route): the checks that need the whole token are jwt_authn's (jwt.py), made once and
    only on native routes. The target's pattern is the policy's: a path escaping a character its
    literals hold has two readings (patterns.native_target), any other escape one. (A path ending in
    '/' has two readings too, when a route without ``/**`` takes it without the '/': the routes that
    could take it, the ``/**`` ones, refuse it, and the trailing-slash section after every policy
    route decides it: see ingress_routes.)"""
    target = patterns.native_target(escaped_literal_chars(policy.routes))
    return [
        (
            "screen: method",
            [{"name": ":method", "string_match": {"safe_regex": {"regex": patterns.METHOD}}, "invert_match": True}],
        ),
        (
            "screen: target",
            [{"name": ":path", "string_match": {"safe_regex": {"regex": target}}, "invert_match": True}],
        ),
        (
            "screen: _method query",
            [{"name": ":path", "string_match": {"safe_regex": {"regex": patterns.METHOD_OVERRIDE_QUERY}}}],
        ),
        # Credentials of another scheme, or "Bearer" spelled otherwise (an absent header never
        # matches an inverted matcher): a bearer credential jwt_authn does not verify goes to the
        # service too, through ext_authz on the route, but is then no anonymous request.
        (
            "screen: credentials",
            [{"name": "authorization", "string_match": {"prefix": patterns.BEARER}, "invert_match": True}],
        ),
    ]


# What the screen checks, by name (the report's words).
SCREEN_NAMES = ("method", "target", "_method query", "credentials")


def disabled(*filters: str) -> dict[str, Any]:
    return {name: {"@type": _FILTER_CONFIG, "disabled": True} for name in filters}


def shared_checks(policy: Policy, leeway: int) -> list[Check]:
    """What every native route checks first, in the service's order: the screen's, then the token's."""
    return [*screen_checks(), *token_checks(policy, leeway)]


def ingress_routes(
    policy: Policy, plans: tuple[RoutePlan, ...], book: AnswerBook, admission: Admission, shared: int
) -> list[dict[str, Any]]:
    """Envoy's routes, in its order; ``shared``: how many checks the ``shared`` filter makes before
    any route's (the route's are numbered after them)."""
    routes: list[dict[str, Any]] = []
    for name, headers in screen_routes(policy):
        routes.extend(_to_service(name, {"prefix": "/", "headers": headers}, admission))
    insensitive = policy.path_case is PathCase.INSENSITIVE
    # A path ending in '/' whose path without it a route without /** takes: the /** routes (the only
    # ones that take such a path) pass it on, to the trailing-slash section after every policy route.
    # Only requests that reach a /** route pay for the pattern, not those the most specific routes take.
    trailing = patterns.trailing_slash_target((plan.parts for plan in plans), insensitive)
    exacts = [plan.parts for plan in plans if plan.parts and plan.parts[-1] is not REST]
    build = _Builder(policy, book, admission, shared)
    for plan in plans:
        match = _match(plan.parts, plan.methods, insensitive)
        if trailing is not None and plan.parts and plan.parts[-1] is REST:
            # Only the paths this route can take: each copy of the whole pattern would cost Envoy
            # memory for every route of the policy, on every /** route.
            below = [parts for parts in exacts if meet(plan.parts[:-1], parts, policy.fold) is not None]
            own = patterns.trailing_slash_target(below, insensitive)
            if own is not None:
                match["headers"] = [*match.get("headers", []), _path_matcher(own, invert=True)]
        routes.extend(build.decided(f"{plan.engine.value}: {plan.route.name}", match, (plan,)))
    if trailing is not None:
        for entry in trailing_slash_plan(plans, policy.fold):
            routes.extend(_trailing_slash_route(entry, build, insensitive))
    response, headers = book.direct_response(Reason.NO_ROUTE, NO_ROUTE_TEXT)
    routes.append(
        {
            "name": "no route",
            "match": {"prefix": "/"},
            "direct_response": response,
            "response_headers_to_add": headers,
            "metadata": route_metadata(NO_ROUTE_LABEL, Reason.NO_ROUTE),
            "typed_per_filter_config": disabled(JWT, SHARED, RBAC, EXT_AUTHZ),
        }
    )
    return routes


def _trailing_slash_route(entry: TrailingSlashEntry, build: _Builder, insensitive: bool) -> list[dict[str, Any]]:
    """The Envoy routes of one trailing-slash entry (plan.trailing_slash_plan). A pair's entry takes
    the paths X/ of its ``parts`` (the '' after them: the empty last segment)."""
    name = f"{engine_of_all(entry.sides).value}: {entry.names} (trailing slash)"
    if len(entry.sides) == 1:  # a /** route, the route of both readings: its own decision
        return build.decided(name, _match(entry.parts, entry.methods, insensitive), entry.sides)
    return build.decided(name, _match((*entry.parts, ""), entry.methods, insensitive), entry.sides)


@dataclass(frozen=True, slots=True)
class _Builder:
    """What every decided route is built from: the policy, its answers, and how many checks the
    ``shared`` filter makes first."""

    policy: Policy
    book: AnswerBook
    admission: Admission
    shared: int

    def decided(self, name: str, match: dict[str, Any], sides: tuple[RoutePlan, ...]) -> list[dict[str, Any]]:
        """Routes deciding a request that must meet every route of ``sides`` (Policy.routes_for's
        order; decision._decide_all): the service when one falls back to it; else public when all
        are; else the shared checks (their own filter), then each protected route's checks in order (the first that
        denies answers, labelled with its route), allowed as the first protected route. The token
        reaches the app only when every route forwards it."""
        engine = engine_of_all(sides)
        if engine is Engine.EXT_AUTHZ:
            routes = _to_service(name, match, self.admission)
        elif engine is Engine.NONE:
            routes = [
                {
                    "name": name,
                    "match": match,
                    "route": {"cluster": APP_CLUSTER},
                    "metadata": route_metadata(sides[0].route.name, Reason.PUBLIC),
                    "typed_per_filter_config": disabled(JWT, SHARED, RBAC, EXT_AUTHZ),
                }
            ]
        else:
            guards = [side.route for side in sides if not side.route.public]
            other = guards[1] if len(guards) > 1 else None
            checks: list[Check] = []
            for guard in guards:
                checks.extend(route_checks(self.policy, guard))
            routes = [
                {
                    "name": name,
                    "match": match,
                    "route": {"cluster": APP_CLUSTER},
                    "metadata": route_metadata(guards[0].name, Reason.ALLOWED, None if other is None else other.name),
                    "typed_per_filter_config": {
                        **disabled(SCREEN),
                        RBAC: {
                            "@type": _RBAC_PER_ROUTE,
                            "rbac": {
                                "rules": rules(self.book, checks, other, first=self.shared),
                                "rules_stat_prefix": RBAC_STAT_PREFIX,
                            },
                        },
                    },
                }
            ]
        if not all(side.route.forward_token for side in sides):
            for route in routes:
                route["request_headers_to_remove"] = [AUTHORIZATION]
        return routes


def _path_matcher(regex: str, *, invert: bool = False) -> dict[str, Any]:
    """A header matcher on ``:path`` (query included)."""
    matcher: dict[str, Any] = {"name": ":path", "string_match": {"safe_regex": {"regex": regex}}}
    if invert:
        matcher["invert_match"] = True
    return matcher


def _match(parts: tuple[object, ...], methods: frozenset[str] | None, case_insensitive: bool) -> dict[str, Any]:
    match: dict[str, Any] = dict(patterns.route_path(parts, case_insensitive))
    if methods is not None:
        ordered = sorted(methods)
        method = (
            {"exact": ordered[0]}
            if len(ordered) == 1
            else {"safe_regex": {"regex": "|".join(patterns.re2_literal(m) for m in ordered)}}
        )
        match["headers"] = [{"name": ":method", "string_match": method}]
    return match


def _to_service(name: str, match: dict[str, Any], admission: Admission) -> list[dict[str, Any]]:
    """Routes whose requests the service decides entirely: as in envoy/envoy.yaml, one for bearer
    JWTs and one, rate limited, for everything else."""
    off = disabled(SCREEN, JWT, SHARED, RBAC)
    bearer = {
        **match,
        "headers": [
            *match.get("headers", []),
            {"name": "authorization", "string_match": {"safe_regex": {"regex": admission.bearer_regex}}},
        ],
    }
    return [
        {
            "name": f"{name} (bearer)",
            "match": bearer,
            "route": {"cluster": APP_CLUSTER},
            "typed_per_filter_config": off,
        },
        {
            "name": f"{name} (anonymous)",
            "match": match,
            "route": {"cluster": APP_CLUSTER},
            "typed_per_filter_config": {**off, RATE_LIMIT: admission.anonymous_limit},
        },
    ]
