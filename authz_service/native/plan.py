"""Which engine enforces each route, and the order Envoy must try the routes in.

Why a plan before any Envoy config: the choice (native, ext_authz or none) and its reason are what
``compile envoy`` reports, and the order is what makes Envoy's first-match routing take the same
route as ``Policy.match``. Both come from the Policy object (its routes, their patterns and the
methods its trie gives each route, GET's implied HEAD included), never from the YAML text.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..policy import PARAM, REST, Mode, Policy, Route, pattern_parts

# Integers beyond 2**53 are not all doubles: Envoy reads a JSON number into a double, so it would
# find 2**53 + 1 equal to 2**53 where the service, which compares Python ints, does not.
EXACT_DOUBLE_LIMIT = 2**53


class Engine(enum.Enum):
    """What decides a route's requests."""

    NATIVE = "native"  # Envoy's own filters: jwt_authn, RBAC, local replies
    EXT_AUTHZ = "ext_authz"  # the service, called by Envoy's ext_authz filter
    NONE = "none"  # a public route: nothing is called


class Fallback(enum.Enum):
    """Why a route goes to the service: the codes ``compile envoy --report json`` lists."""

    DRY_RUN = "dry_run"
    CLAIM_BOUND_TO_PATH = "claim_bound_to_path"
    CLAIM_MAY_BE_LIST = "claim_may_be_list"
    NUMBER_BEYOND_DOUBLE = "number_beyond_double"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """One policy route as Envoy will see it."""

    route: Route
    parts: tuple[object, ...]  # pattern_parts(route.path)
    methods: frozenset[str] | None  # what the policy's trie gives the route (None: any method)
    engine: Engine
    why: str
    fallback: tuple[Fallback, ...]  # why the service decides it, for tools (empty unless EXT_AUTHZ)


def plan(policy: Policy) -> tuple[RoutePlan, ...]:
    """Every route of ``policy``, in the order Envoy must try them (first match wins)."""
    plans = [
        RoutePlan(route, tuple(pattern_parts(route.path)), policy.methods_of(route), *engine_of(route))
        for route in policy.routes
    ]
    return tuple(sorted(plans, key=match_order, reverse=True))


def match_order(plan: RoutePlan) -> tuple[tuple[int, ...], int]:
    """The key that sorts routes most specific first, so that the first route whose path and method
    match is the one ``Policy.match`` returns.

    ``Policy.match`` walks its trie depth first: at each segment a literal child, then the
    ``{param}`` child, then a ``/**`` ending at that node; where the path ends, the route ending
    there, then a ``/**`` there; at one ending, a route listing methods before one for any method,
    and backtracking when the method is not taken. Ranking each pattern part (literal 3, param 2)
    followed by its ending (exact 1, ``/**`` 0), then method-specific before any-method, and
    comparing lexicographically, orders any two routes that can take the same request as that walk
    does. Routes that cannot take the same request may come in any order.
    """
    ranks: list[int] = []
    ending = 1
    for part in plan.parts:
        if part is REST:
            ending = 0
        else:
            ranks.append(2 if part is PARAM else 3)
    ranks.append(ending)
    return tuple(ranks), 0 if plan.methods is None else 1


@dataclass(frozen=True, slots=True)
class TrailingSlashEntry:
    """One route of the section deciding paths ending in '/' (X/) that the ``/**`` routes refuse
    because a route without ``/**`` takes X: such a path must meet the route of X/ as written (a
    ``/**`` route C) and the route of X (R), in the core's order (Policy.routes_for: C, then R).

    ``sides`` is what the entry decides: (C0,) a ``/**`` route that is the route of both readings
    (``parts``: its own pattern); (C, R) the pair (``parts``: the paths X both take)."""

    parts: tuple[object, ...]
    methods: frozenset[str] | None
    sides: tuple[RoutePlan, ...]

    @property
    def names(self) -> str:
        """The policy routes it decides, as Envoy's route name and the report show them."""
        return " + ".join(side.route.name for side in self.sides)


def trailing_slash_plan(plans: tuple[RoutePlan, ...], fold: Callable[[str], str]) -> list[TrailingSlashEntry]:
    """The entries deciding X/ where a route without ``/**`` takes X, in ``plans``' order (most
    specific first). Envoy's first match over them takes, for a request's method, X's route R
    first (as in the normal routes), and among R's entries the first ``/**`` route C taking X/:
    ``Policy.match``'s route of each reading. An entry of R per C that can take some X R takes
    (other prefixes and methods pruned, and those after a C that takes every X and method of R);
    an entry per ``/**`` route C0 for the X whose route it is for the method. A path ending in '/'
    that R's entries do not take has no ``/**`` route for the method (any would have met R in an
    entry), so no entry after them takes it either: no route, the default deny. Empty when the
    policy has no ``/**`` route or no route without one."""
    rests = [p for p in plans if p.parts and p.parts[-1] is REST]
    exacts = [p for p in plans if p.parts and p.parts[-1] is not REST]
    if not rests or not exacts:
        return []
    entries: list[TrailingSlashEntry] = []
    for p in plans:
        if p.parts and p.parts[-1] is REST:
            if any(meet(p.parts[:-1], r.parts, fold) is not None for r in exacts):
                entries.append(TrailingSlashEntry(p.parts, p.methods, (p,)))
            continue
        if not p.parts:
            continue  # "/" has one reading
        for c in rests:
            parts = meet(c.parts[:-1], p.parts, fold)
            methods = both_methods(c.methods, p.methods)
            if parts is None or methods == frozenset():
                continue
            entries.append(TrailingSlashEntry(parts, methods, (c, p)))
            if parts == p.parts and methods == p.methods:
                break  # C takes X/ for every X and method of R: no request passes this entry
    return entries


def engine_of_all(plans: tuple[RoutePlan, ...]) -> Engine:
    """Who decides a request that must meet every route of ``plans``: the service when any route
    falls back to it, nothing when all are public, else Envoy."""
    engines = {p.engine for p in plans}
    if Engine.EXT_AUTHZ in engines:
        return Engine.EXT_AUTHZ
    return Engine.NATIVE if Engine.NATIVE in engines else Engine.NONE


def meet(
    prefix: tuple[object, ...], parts: tuple[object, ...], fold: Callable[[str], str]
) -> tuple[object, ...] | None:
    """The pattern (without ``/**``) of the paths both ``parts`` and a ``/**`` route whose pattern
    before ``/**`` is ``prefix`` take (a literal is more specific than a parameter); None: no path."""
    if len(prefix) > len(parts):
        return None
    out = list(parts)
    for i, (mine, theirs) in enumerate(zip(prefix, parts, strict=False)):
        if mine is PARAM:
            continue
        if theirs is PARAM:
            out[i] = mine
        elif fold(str(mine)) != fold(str(theirs)):
            return None
    return tuple(out)


def both_methods(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The methods two routes both take (None: any)."""
    if a is None:
        return b
    return a if b is None else a & b


def engine_of(route: Route) -> tuple[Engine, str, tuple[Fallback, ...]]:
    """The engine that can enforce ``route`` exactly, and why (for the report): every reason a route
    falls back, so that a user who removes one learns at once whether the route would then compile."""
    if route.public:
        return Engine.NONE, "public: no token is checked, nothing is called", ()
    reasons = fallback_reasons(route)
    if reasons:
        return Engine.EXT_AUTHZ, "; ".join(text for _, text in reasons), tuple(code for code, _ in reasons)
    return Engine.NATIVE, "jwt_authn + RBAC: " + requirements_text(route), ()


def fallback_reasons(route: Route) -> list[tuple[Fallback, str]]:
    """Why Envoy's filters cannot enforce ``route`` exactly: each reason, for the mode and for each
    claim condition, with its code."""
    reasons: list[tuple[Fallback, str]] = []
    if route.mode is Mode.DRY_RUN:
        reasons.append((Fallback.DRY_RUN, "dry-run: the service allows, and logs and counts what it would deny"))
    for condition in route.claims:
        claim = f"claim condition on {condition.name!r}"
        if condition.segment >= 0:
            text = f"claim {condition.name!r} is bound to the path parameter {{{condition.values[0]}}}; "
            reasons.append(
                (Fallback.CLAIM_BOUND_TO_PATH, text + "Envoy's RBAC cannot compare a claim with a path segment")
            )
        elif condition.operator == "contains" or (condition.operator == "any_of" and condition.strings):
            text = f"{claim} may meet a list claim, whose elements must all be strings; "
            reasons.append((Fallback.CLAIM_MAY_BE_LIST, text + "Envoy's matchers cannot require that"))
        if any(abs(number) >= EXACT_DOUBLE_LIMIT for number in condition.numbers):
            text = f"{claim} compares a number beyond 2^53, which Envoy reads as a double"
            reasons.append((Fallback.NUMBER_BEYOND_DOUBLE, text))
    return reasons


def requirements_text(route: Route) -> str:
    """What a native route requires, in one line."""
    parts = []
    if route.scopes:
        parts.append(f"any of [{route.scopes_text}]")
    if route.all_scopes:
        parts.append(f"all of [{route.all_scopes_text}]")
    if route.client_ids is not None:
        parts.append(f"clients [{' '.join(sorted(route.client_ids))}]")
    parts.extend(f"claim {condition.text}" for condition in route.claims)
    return ", ".join(parts)
