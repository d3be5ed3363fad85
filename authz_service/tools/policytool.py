"""Policy tooling for the people who edit the route ConfigMap: `validate` (errors + lints) and `test`.

Why a separate module: the loader (``policy``) decides what the server accepts; this module only
adds advice on top (warnings never change what the server loads) and runs table-driven
expectations through the real request -> decision -> response path (``simulate``).
"""

from __future__ import annotations

import asyncio
import difflib
import io
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..claims import cognito_controlled
from ..decision import Reason
from ..files import REGULAR_FILE_FIX, FileReadError, read_bounded, utf8_text
from ..policy import (
    LINT_CODES,
    OTHER_SEGMENT,
    Mode,
    PathCase,
    Policy,
    PolicyError,
    Route,
    check_policy,
    pattern_matches,
    read_policy_file,
    read_policy_stream,
)
from ..urls import shown
from ..yamlfile import YamlError, compose_yaml, load_strict_yaml, place, position, scalar_text, where_text
from .simulate import Simulator, run_check

# RFC 9110 section 9 plus QUERY (the IETF httpbis safe method with a body; Envoy forwards it).
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY")
# Scopes a user pool knows but a client_credentials (machine-to-machine) token can never carry.
USER_POOL_SCOPES = frozenset({"openid", "email", "phone", "profile", "aws.cognito.signin.user.admin"})
# Cognito custom scopes are "<resource server identifier>/<scope name>"; the identifier may itself
# contain '/' (e.g. a URL), the scope name may not.
_CUSTOM_SCOPE = re.compile(r"^\S+/[^/\s]+\Z")
_UNLISTED_METHOD = "X-UNLISTED-METHOD"  # stands for every method no route lists
# How JSON (and so a token's claim) writes a number or a boolean; YAML 1.1 also reads yes, on, 0x1f, 010...
_JSON_LITERAL = re.compile(r"^(true|false|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?)\Z")


@dataclass(frozen=True, slots=True)
class Lint:
    """One lint finding: where (file:line:col + document place), what, and the fix."""

    source: str
    line: int | None
    column: int | None
    where: str
    what: str
    hint: str
    code: str  # which kind of warning (WARNING_CODES), for tools: they read the code, not the text

    def __str__(self) -> str:
        at = place(self.source, self.line, self.column)
        return f"{at}: warning: {self.where}: {self.what}; {self.hint} [{self.code}]"


@dataclass(frozen=True, slots=True)
class Report:
    """Everything `validate` found in one file."""

    source: str
    policy: Policy | None
    errors: list[PolicyError]
    warnings: list[Lint]


# --- validate ------------------------------------------------------------------------------------

# Every warning's code (printed as "[code]" at the end of its line; docs/policy.md lists them). The
# ones of LINT_CODES may be acknowledged on a route; the others are fixed, never acknowledged.
WARNING_CODES = {
    "non-standard-method": "a method that is not standard",
    "duplicate-scope": "a scope listed twice",
    "scope-in-both": "a scope in both scopes and all_scopes",
    "user-pool-scope": "a user-pool scope client_credentials tokens never carry",
    "scope-shape": "a scope not shaped <resource server identifier>/<scope name>",
    "claim-literal": "a claim condition value YAML reads as a boolean or number",
    "unreachable-route": "a route that can never match",
    "unreachable-methods": "methods of a route that never reach it",
    "slash-only-route": "a route that only matches paths ending in /",
    **LINT_CODES,
}


STDIN = "-"  # `validate -`: the policy comes from standard input, reported as <stdin>


def validate_file(path: Path | str) -> Report:
    """Load like the server does (collecting every error), then lint what loaded."""
    source = "<stdin>" if str(path) == STDIN else str(path)
    try:
        data = read_policy_stream(sys.stdin.buffer, source) if str(path) == STDIN else read_policy_file(path)
    except PolicyError as exc:
        return Report(source, None, [exc], [])
    policy, errors = check_policy(data, source)
    warnings = lint(policy, data.decode("utf-8")) if policy is not None else []
    return Report(source, policy, errors, warnings)


def lint(policy: Policy, text: str) -> list[Lint]:
    """Warnings about a policy that loads: each one is legal but very likely not what was meant."""
    tree = compose_yaml(text)
    raw_routes = load_strict_yaml(text, policy.source)["routes"]

    def warn(code: str, where: tuple[str | int, ...], what: str, hint: str) -> Lint:
        assert code in WARNING_CODES, code
        line, column = position(tree, where)
        return Lint(policy.source, line, column, where_text(where), what, hint, code)

    out: list[Lint] = []
    for route, raw in zip(policy.routes, raw_routes, strict=True):
        out.extend(_lint_methods(route, raw, warn))
        out.extend(_lint_scopes(route, raw, warn))
        out.extend(_lint_claim_literals(route, tree, warn))
    out.extend(_lint_reachability(policy, warn))
    out.sort(key=lambda w: (w.line or 0, w.column or 0))
    return out


def _lint_methods(route: Route, raw: dict[str, Any], warn: Any) -> list[Lint]:
    out = []
    for j, method in enumerate(raw.get("methods") or ()):
        if method in STANDARD_METHODS:
            continue
        close = difflib.get_close_matches(method, STANDARD_METHODS, n=1, cutoff=0.5)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else f"standard methods are {', '.join(STANDARD_METHODS)}; a custom method is matched exactly"
        )
        out.append(
            warn(
                "non-standard-method",
                ("routes", route.index, "methods", j),
                f"{method!r} is not a standard HTTP method",
                hint,
            )
        )
    return out


def _lint_scopes(route: Route, raw: dict[str, Any], warn: Any) -> list[Lint]:
    out = []
    listed = [("scopes", j, scope) for j, scope in enumerate(raw.get("scopes") or ())]
    listed += [("all_scopes", j, scope) for j, scope in enumerate(raw.get("all_scopes") or ())]
    seen: dict[str, str] = {}
    for key, j, scope in listed:
        where = ("routes", route.index, key, j)
        if seen.get(scope) == key:
            out.append(warn("duplicate-scope", where, f"scope {scope!r} is listed twice", "remove the duplicate"))
        elif scope in seen:
            out.append(
                warn(
                    "scope-in-both",
                    where,
                    f"scope {scope!r} is in both scopes and all_scopes, so holding all_scopes always meets scopes",
                    "remove it from one of them",
                )
            )
        seen.setdefault(scope, key)
        if scope in USER_POOL_SCOPES:
            out.append(
                warn(
                    "user-pool-scope",
                    where,
                    f"{scope!r} is a user-pool (OpenID) scope; machine-to-machine "
                    "(client_credentials) tokens never carry it",
                    "require a custom scope '<resource server identifier>/<scope name>'",
                )
            )
        elif not _CUSTOM_SCOPE.match(scope):
            out.append(
                warn(
                    "scope-shape",
                    where,
                    f"{scope!r} is not shaped '<resource server identifier>/<scope name>', "
                    "so no Cognito client_credentials token can carry it",
                    f"write the full custom scope, e.g. 'transactions/{scope}'",
                )
            )
    return out


def _lint_claim_literals(route: Route, tree: Any, warn: Any) -> list[Lint]:
    """A claim condition value YAML read as a boolean or number from text JSON writes otherwise
    (``yes``, ``on``, ``010``, ``1_000``): the condition compares with true or 8, not the text."""
    out = []
    for cond in route.claims:
        base: tuple[str | int, ...] = ("routes", route.index, "claims", cond.name)
        if cond.operator == "any_of":
            places = [((*base, "any_of", j), value) for j, value in enumerate(cond.values)]
        else:  # equals written as a bare value or as {equals: ...}; contains takes strings only
            places = [(base, cond.values[0]), ((*base, cond.operator), cond.values[0])]
        for where, value in places:
            text = scalar_text(tree, where)
            if text is None or isinstance(value, str) or _JSON_LITERAL.match(text):
                continue
            out.append(
                warn(
                    "claim-literal",
                    where,
                    f"YAML reads {text!r} as {json.dumps(value)}, so the claim must be that JSON value, not the text",
                    f"write {json.dumps(value)} if that is meant, or quote the text: '{text}'",
                )
            )
    return out


def _example(route: Route) -> tuple[str, ...]:
    """A concrete path the route's own pattern covers (params and /** filled in)."""
    if route.path in ("/", "/**"):
        return ()
    parts = []
    for part in route.path[1:].split("/"):
        if part == "**":
            break
        parts.append("x" if part.startswith("{") else part)
    return tuple(parts)


def _show(segments: tuple[str, ...]) -> str:
    return "/" + "/".join("x" if s == OTHER_SEGMENT else s for s in segments)


@dataclass(frozen=True, slots=True)
class Reach:
    """Which requests reach which route, over every class of request path (see reachability)."""

    chosen: dict[int, set[str]]  # route index -> methods for which some path reaches it
    plain: set[int]  # routes reached by some path without a trailing '/'
    holes: dict[tuple[int, int], tuple[str, tuple[str, ...]]]  # (public, protected) -> an example request
    # (public, protected) -> an example request the protected route takes and the public pattern covers
    covers: dict[tuple[int, int], tuple[str, tuple[str, ...]]]
    # (first method-limited route of a path pattern, weaker route) -> (methods that fall through, a path)
    falls: dict[tuple[int, int], tuple[set[str], tuple[str, ...]]]
    # (public, protected) -> an example request the public route takes whose path is a case variant of
    # the protected route's (what a case-insensitive router serves with the protected handler)
    cases: dict[tuple[int, int], tuple[str, tuple[str, ...]]]


def weaker(other: Route, route: Route) -> bool:
    """Whether ``other`` lets through a request ``route`` would refuse: it is public, only dry-run
    where ``route`` enforces, or accepts a token ``route`` does not (see ``requirement_gap``)."""
    if route.public:
        return False
    return (
        other.public
        or (other.mode is Mode.DRY_RUN and route.mode is Mode.ENFORCE)
        or requirement_gap(other, route) is not None
    )


def requirement_gap(other: Route, route: Route) -> tuple[str, tuple[str, ...]] | None:
    """How protected ``other`` accepts a token ``route`` refuses: (kind, what), kind one of scopes
    (other's scopes route lacks), all_scopes (route's that other does not require), clients, claims
    (route's conditions other lacks); None when every token ``other`` accepts meets ``route``'s scopes
    and conditions. Conservative: a requirement counts only when ``other`` states it itself."""
    # Scopes other guarantees: all of its all_scopes, and its only any-of scope when it has one.
    held = other.all_scopes | (other.scopes if len(other.scopes) == 1 else frozenset())
    if route.scopes and not (held & route.scopes or (other.scopes and other.scopes <= route.scopes)):
        return "scopes", tuple(sorted(other.scopes - route.scopes) or sorted(other.all_scopes))
    if not route.all_scopes <= held:
        return "all_scopes", tuple(sorted(route.all_scopes - held))
    if route.client_ids is not None and (other.client_ids is None or not other.client_ids <= route.client_ids):
        return "clients", ()
    missing = tuple(c.text for c in route.claims if c not in other.claims)
    return ("claims", missing) if missing else None


def reachability(policy: Policy) -> Reach | None:
    """Run every class of request path the matcher can tell apart (Policy.representative_paths)
    through the real ``Policy.routes_for`` for every listed method, every standard method and one
    unlisted method. Exact, not heuristic; None when the policy has too many path classes.

    A request passes only when every route ``routes_for`` names allows it (a path ending in '/'
    must meet the route of the path without it too), so it counts as public only when all of them
    are public. A case-sensitive policy is also compared with its case-folded twin (what a
    case-insensitive router serves) on paths that spell a literal in other letter case."""
    folded = policy.case_folded() if policy.path_case is PathCase.SENSITIVE else None
    paths = policy.representative_paths(folded=folded)
    if paths is None:
        return None
    listed = {m for r in policy.routes for m in r.methods or ()}
    methods = [*STANDARD_METHODS, *sorted(listed - set(STANDARD_METHODS)), _UNLISTED_METHOD]
    reach = Reach(defaultdict(set), set(), {}, {}, {}, {})
    protected = [r for r in policy.routes if not r.public]
    public = [r for r in policy.routes if r.public]
    for segments in paths:
        taken = {method: policy.routes_for(method, segments) for method in methods}
        trailing = bool(segments) and not segments[-1]
        for method, routes in taken.items():
            for route in routes:
                reach.chosen[route.index].add(method)
                if not trailing:
                    reach.plain.add(route.index)
            guards = [r for r in routes if not r.public]
            if routes and not guards:
                route = routes[0]
                for other in protected:
                    _note_first(reach.holes, (route.index, other.index), other, method, segments, policy.path_case)
                if folded is not None:
                    for other in folded.routes_for(method, segments):
                        if not other.public:
                            reach.cases.setdefault((route.index, other.index), (method, segments))
                continue
            for route in guards:
                for other in public:
                    _note_first(reach.covers, (other.index, route.index), other, method, segments, policy.path_case)
                if route.methods is not None:
                    _record_falls(policy, route, taken, segments, reach)
    return reach


def _note_first(
    found: dict, key: tuple[int, int], other: Route, method: str, segments: tuple[str, ...], path_case: PathCase
) -> None:
    """Record under ``key`` the first request (method, segments) that ``other`` also takes."""
    if key not in found and other.takes(method) and pattern_matches(other.path, segments, path_case):
        found[key] = (method, segments)


def _record_falls(
    policy: Policy, route: Route, taken: dict[str, tuple[Route, ...]], segments: tuple[str, ...], reach: Reach
) -> None:
    """Methods this method-limited route does not take on this path go elsewhere: to a sibling at
    the same path (fine), nowhere (denied), or through to less specific routes that are all weaker.
    Siblings share one finding, under the first of them."""
    first = min(r.index for r in policy.routes if r.path == route.path and r.methods is not None)
    for method, others in taken.items():
        if others and all(o.path != route.path and weaker(o, route) for o in others):
            fell, _ = reach.falls.setdefault((first, others[0].index), (set(), segments))
            fell.add(method)


def _methods_text(methods: set[str]) -> str:
    named = [m for m in (*STANDARD_METHODS, *sorted(methods)) if m in methods and m != _UNLISTED_METHOD]
    named = list(dict.fromkeys(named))
    return ", ".join(named) + (" and any other method" if _UNLISTED_METHOD in methods else "")


def _lint_reachability(policy: Policy, warn: Any) -> list[Lint]:
    """Routes (or methods of a route) that no request can reach, public routes that carve holes or
    cover protected ones, and methods that fall through to weaker routes."""
    reach = reachability(policy)
    if reach is None:
        return []  # too many path classes to enumerate; reachability is not checked (documented)
    chosen, plain, holes = reach.chosen, reach.plain, reach.holes
    routes = policy.routes
    out = []
    for route in routes:
        where = ("routes", route.index, "path")
        listed = sorted(route.methods) if route.methods is not None else None
        reached = chosen[route.index]
        never = [m for m in listed if m not in reached] if listed is not None else ([] if reached else ["any"])
        if never and (listed is None or len(never) == len(listed)):
            method = (listed or ["GET"])[0]
            taker = policy.match(method, _example(route))
            example = f" (e.g. {method} {_show(_example(route))} goes to {taker.name!r})" if taker else ""
            out.append(
                warn(
                    "unreachable-route",
                    where,
                    f"route {route.name!r} can never match: every request it covers is taken by "
                    f"more specific routes{example}",
                    "remove it or change its path or methods",
                )
            )
        elif never:
            out.append(
                warn(
                    "unreachable-methods",
                    where,
                    f"route {route.name!r}: {', '.join(never)} never reach this route, more specific "
                    "routes take every such request",
                    f"remove {', '.join(never)} from its methods",
                )
            )
        elif reached and route.index not in plain:
            out.append(
                warn(
                    "slash-only-route",
                    where,
                    f"route {route.name!r} only matches paths ending in '/': more specific routes "
                    "take every other request it covers",
                    "remove it or change its path",
                )
            )
    # Public routes that let requests for protected ones through: (pairs, lint code, the key a
    # warning points at, its text for "public route P {problem}", the fix); {listed} names the
    # protected routes with an example request each, {s} makes "route" plural.
    public_findings = (
        (
            holes,
            "public-hole",
            "public",
            "is more specific than protected route{s} {listed}: those requests pass without a token",
            "if that hole is not intended, narrow the public route's path or methods, or remove 'public: true'; "
            "if it is, add 'acknowledge: [public-hole]' to the public route",
        ),
        (
            reach.covers,
            "public-catch-all",
            "path",
            "({path}) also covers the paths of protected route{s} {listed}: every request they do not take "
            "(another method, a path beside them) is allowed without a token, so unmatched requests are no longer "
            "denied",
            "narrow the public route to the paths meant to be public; if a public catch-all is intended, add "
            "'acknowledge: [public-catch-all]' to it",
        ),
        (
            reach.cases,
            "case-variant",
            "path",
            "({path}) takes case variants of the paths of protected route{s} {listed}: an app whose router ignores "
            "case serves them with the protected handler, without a token",
            "if the app's router ignores case, add 'path_case: insensitive' at the top of the policy; if it does "
            "not, add 'acknowledge: [case-variant]' to the public route",
        ),
    )
    for pairs, code, key, problem, fix in public_findings:
        for public, protected, s in _public_route_findings(routes, pairs, code):
            text = problem.format(path=public.path, s=s, listed=protected)
            out.append(warn(code, ("routes", public.index, key), f"public route {public.name!r} {text}", fix))
    for (route_i, other_i), (fell, segments) in sorted(reach.falls.items()):
        route, other = routes[route_i], routes[other_i]
        siblings = [r for r in routes if r.path == route.path and r.methods is not None]
        if any("fallthrough" in r.acknowledge for r in siblings):
            continue
        takes = "; ".join(f"{r.name!r} takes only {'|'.join(sorted(r.methods or ()))}" for r in siblings)
        weak = [r for r in siblings if weaker(other, r)]
        why = (
            "is public"
            if other.public
            else "is dry-run"
            if other.mode is Mode.DRY_RUN and route.mode is Mode.ENFORCE
            else _gaps_text(other, weak, "this route" if len(siblings) == 1 else "these routes")
        )
        examples = [m for m in ("DELETE", "PUT", "POST", "PATCH", *STANDARD_METHODS) if m in fell] or ["PUT"]
        out.append(
            warn(
                "fallthrough",
                ("routes", route_i, "methods"),
                f"route {takes}; {_methods_text(fell)} on {'its' if len(siblings) == 1 else 'their'} paths "
                f"fall through to route {other.name!r} ({other.path}), which {why} "
                f"(e.g. {examples[0]} {_show(segments)})",
                "list those methods on a route of this path (same or stricter scopes), or narrow "
                f"{other.name!r}; if intended, add 'acknowledge: [fallthrough]' to this route",
            )
        )
    return out


def _public_route_findings(
    routes: tuple[Route, ...], pairs: dict[tuple[int, int], tuple[str, tuple[str, ...]]], code: str
) -> Iterator[tuple[Route, str, str]]:
    """Per public route of ``pairs`` ((public, protected) -> example) that does not acknowledge
    ``code``: the route, its protected routes each with an example request, and "s" for several."""
    for public_i, found in _grouped(pairs).items():
        if code not in routes[public_i].acknowledge:
            listed = [f"{routes[i].name!r} (e.g. {_request_text(*example)})" for i, example in found]
            yield routes[public_i], ", ".join(listed), "s" if len(listed) > 1 else ""


def _gaps_text(other: Route, weak: list[Route], this: str) -> str:
    """Why ``other`` is weaker than the routes ``weak`` (``this``: "this route" or "these routes")."""
    found: dict[str, list[str]] = {}
    for route in weak:
        gap = requirement_gap(other, route)
        if gap is not None:
            found.setdefault(gap[0], []).extend(gap[1])
    does = "does" if this == "this route" else "do"
    texts = {
        "scopes": lambda items: f"accepts scopes {this} {does} not ({' '.join(sorted(set(items)))})",
        "all_scopes": lambda items: f"does not require all of {' '.join(sorted(set(items)))}",
        "clients": lambda items: f"accepts clients {this} {does} not",
        "claims": lambda items: (
            f"does not require the claim condition{'s' if len(set(items)) > 1 else ''} "
            + "; ".join(dict.fromkeys(items))
        ),
    }
    return "; ".join(texts[kind](items) for kind, items in found.items())


def _grouped(
    pairs: dict[tuple[int, int], tuple[str, tuple[str, ...]]],
) -> dict[int, list[tuple[int, tuple[str, tuple[str, ...]]]]]:
    """{(a, b): example} -> {a: [(b, example), ...]} in route order."""
    out: dict[int, list[tuple[int, tuple[str, tuple[str, ...]]]]] = defaultdict(list)
    for (a, b), example in sorted(pairs.items()):
        out[a].append((b, example))
    return out


def _request_text(method: str, segments: tuple[str, ...]) -> str:
    return f"{'any method' if method == _UNLISTED_METHOD else method} {_show(segments)}"


def print_report(report: Report, out: TextIO, explain_issuers: bool = False) -> None:
    for error in report.errors:
        print(f"{error}" + (f" [{error.code}]" if error.code else ""), file=out)
    for warning in report.warnings:
        print(str(warning), file=out)
    if report.policy is not None:
        accepted = len(report.policy.issuers)
        issuers = len({i.block for i in report.policy.issuers})  # entries; a multi-Region one accepts several iss
        status = "OK" if not report.warnings else "OK with warnings"
        routes = len(report.policy.routes)
        print(
            f"{report.source}: {status}: {routes} route{'s' if routes != 1 else ''}, {issuers} issuer"
            f"{'s' if issuers != 1 else ''}{f' ({accepted} accepted iss)' if accepted != issuers else ''}, "
            f"{len(report.warnings)} warning{'s' if len(report.warnings) != 1 else ''}",
            file=out,
        )
        if explain_issuers:
            for line in issuer_lines(report.policy):
                print(line, file=out)
    else:
        print(
            f"{report.source}: REFUSED: {len(report.errors)} error{'s' if len(report.errors) != 1 else ''}"
            f" (the server would not load this file)",
            file=out,
        )


def issuer_lines(policy: Policy) -> list[str]:
    """What each ``issuers`` entry accepts: the exact ``iss`` values, their JWKS URLs and clients."""
    out = []
    for block in sorted({i.block for i in policy.issuers}):
        accepted = [i for i in policy.issuers if i.block == block]
        first = accepted[0]
        kind = f"{first.format.value} issuer format" if first.format is not None else "explicit issuer"
        clients = (
            "any app client of the pool"
            if first.client_ids is None
            else "app clients " + ", ".join(sorted(first.client_ids))
        )
        out.append(f"  issuers[{block}] {first.user_pool_id} ({kind}) accepts {clients}, with iss:")
        for issuer in accepted:
            where = (
                f"replica region {issuer.region}"
                if issuer.replica
                else (f"region {issuer.region}" if issuer.region else "")
            )
            out.append(f"    {issuer.issuer}" + (f"  ({where})" if where else ""))
            out.append(f"      keys from {shown(issuer.jwks_uri)}")
    return out


def validate_command(paths: Sequence[Path | str], strict: bool, out: TextIO, explain_issuers: bool = False) -> int:
    """Exit code for CI: 1 when any file is refused (or, with ``strict``, has warnings)."""
    failed = False
    for path in paths:
        report = validate_file(path)
        print_report(report, out, explain_issuers)
        failed |= bool(report.errors) or (strict and bool(report.warnings))
    return 1 if failed else 0


# --- test ----------------------------------------------------------------------------------------

_TEST_KEYS = {
    "name",
    "method",
    "path",
    "scopes",
    "client_id",
    "issuer",
    "token",
    "expect",
    "status",
    "route",
    "reason",
    "claims",
    "jti",
}
_EXPECT = ("allow", "deny", "dry_run_deny")
_REASONS = tuple(reason.value for reason in Reason)


class CaseFileError(ValueError):
    """A tests file we cannot run; the message names file:line:column and the fix."""


# A tests file is a few KB of cases: anything near this is the wrong path (or /dev/zero).
TESTS_MAX_BYTES = 4 * 1024 * 1024
_TESTS_TOO_LARGE_FIX = "check that the path names the tests file"


@dataclass(frozen=True, slots=True)
class Case:
    """One expectation: a request (and who sends it) -> the decision Envoy would get."""

    name: str
    line: int
    method: str
    path: str
    token: bool  # False: the request carries no Authorization header
    scopes: tuple[str, ...]
    client_id: str | None
    issuer: str | None
    expect: str
    status: int | None
    route: str | None
    reason: str | None
    claims: dict[str, Any] | None = None  # custom claims of the minted token (what a trigger would add)
    jti: str | None = None  # the minted token's jti (None: a fresh one), to test the deny list

    @property
    def wanted(self) -> dict[str, object]:
        """The expected fields (None: not checked), keyed like ``Result.got``."""
        return {"expect": self.expect, "status": self.status, "route": self.route, "reason": self.reason}


def load_tests(path: Path | str) -> list[Case]:
    """Parse a tests file strictly (unknown keys and wrong types are errors with a line)."""
    source = str(path)
    try:
        text = utf8_text(
            read_bounded(path, "tests file", TESTS_MAX_BYTES, _TESTS_TOO_LARGE_FIX, regular_fix=REGULAR_FILE_FIX),
            source,
        )
    except FileReadError as exc:
        raise CaseFileError(str(exc)) from None
    try:
        doc = load_strict_yaml(text, source)
    except YamlError as exc:
        raise CaseFileError(str(exc)) from None
    tree = compose_yaml(text)

    def fail(where: tuple[str | int, ...], problem: str, key: str | None = None) -> CaseFileError:
        line, column = position(tree, (*where, key) if key is not None else where, at_key=key is not None)
        return CaseFileError(f"{place(source, line, column)}: {where_text(where)}: {problem}")

    if not isinstance(doc, dict) or set(doc) != {"tests"} or not isinstance(doc["tests"], list) or not doc["tests"]:
        raise fail((), "a tests file is a mapping with one key, 'tests': a non-empty list of cases")
    cases = []
    for i, item in enumerate(doc["tests"]):
        where: tuple[str | int, ...] = ("tests", i)
        if not isinstance(item, dict):
            raise fail(where, "each test is a mapping with method, path and expect")
        for key in item:
            if key not in _TEST_KEYS:
                raise fail(
                    where,
                    f"unknown key {key!r}; allowed keys: {', '.join(sorted(_TEST_KEYS))}",
                    key if isinstance(key, str) else None,
                )
        for key in ("method", "path", "expect"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise fail((*where, key) if key in item else where, f"{key!r} is required and must be a string")
        if item["expect"] not in _EXPECT:
            raise fail((*where, "expect"), f"must be one of {', '.join(_EXPECT)}, got {item['expect']!r}")
        scopes = item.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
            raise fail((*where, "scopes"), "must be a list of scope strings, e.g. [transactions/get]")
        for key in ("client_id", "issuer", "route", "reason", "name", "jti"):
            if key in item and (not isinstance(item[key], str) or not item[key]):
                raise fail((*where, key), "must be a non-empty string")
        if "reason" in item and item["reason"] not in _REASONS:  # it could never match: the case always fails
            raise fail((*where, "reason"), f"{item['reason']!r} is no reason; one of {', '.join(_REASONS)}")
        status = item.get("status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599):
            raise fail((*where, "status"), f"must be an HTTP status code, got {status!r}")
        claims = item.get("claims")
        if claims is not None and (not isinstance(claims, dict) or not claims or not _json_value(claims)):
            raise fail((*where, "claims"), "must be a mapping of claim name to JSON value, e.g. {tenant: acme}")
        for name in claims or ():
            if cognito_controlled(name):
                raise fail(
                    (*where, "claims", name),
                    f"{name!r} is set by Cognito, not by a pre token generation "
                    "trigger; use the case's scopes, client_id or issuer",
                )
        token = item.get("token", "scopes" in item or "client_id" in item or "jti" in item or claims is not None)
        if not isinstance(token, bool):
            raise fail((*where, "token"), "must be true or false (false: send no Authorization header)")
        cases.append(
            Case(
                name=item.get("name") or f"{item['method']} {item['path']}",
                line=position(tree, where)[0] or 0,
                method=item["method"],
                path=item["path"],
                token=token,
                scopes=tuple(scopes),
                client_id=item.get("client_id"),
                issuer=item.get("issuer"),
                expect=item["expect"],
                status=status,
                route=item.get("route"),
                reason=item.get("reason"),
                claims=claims,
                jti=item.get("jti"),
            )
        )
    return cases


def _json_value(value: object) -> bool:
    """Whether a YAML value is also JSON (no dates, no non-string keys), as a token's claims are."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, dict) or all(isinstance(k, str) for k in value)


@dataclass(frozen=True, slots=True)
class Result:
    case: Case
    got: dict[str, object]
    mismatches: list[str]  # field names that differ

    @property
    def passed(self) -> bool:
        return not self.mismatches


async def run_tests(policy: Policy, cases: list[Case]) -> list[Result]:
    """Each case through parse -> decide -> render with a token holding exactly its scopes."""
    simulator = Simulator(policy)
    results = []
    for case in cases:
        if case.issuer is not None and case.issuer not in policy.issuers_by_iss:
            iss = case.issuer  # an untrusted issuer is a legitimate thing to test: it must be refused
        else:
            iss = case.issuer or policy.issuers[0].issuer
        token = None
        if case.token:
            jti = {"jti": case.jti} if case.jti is not None else None
            token = simulator.token(iss, list(case.scopes), case.client_id, case.claims, overrides=jti)
        outcome = await run_check(policy, simulator.verifier, case.method, case.path, token)
        decision = outcome.decision
        got: dict[str, object] = {
            "expect": decision.kind,
            "status": 200 if decision.allowed else decision.status,
            "route": decision.route.name if decision.route else None,
            "reason": decision.reason.value,
        }
        mismatches = [k for k, v in case.wanted.items() if v is not None and got[k] != v]
        results.append(Result(case, got, mismatches))
    return results


def _describe(values: dict[str, object]) -> str:
    parts = [str(values["expect"])]
    if values.get("status") is not None:
        parts.append(str(values["status"]))
    for key in ("route", "reason"):
        if values.get(key) is not None:
            parts.append(f"{key}={values[key]}")
    return " ".join(parts)


def tests_command(policy_path: Path, tests_path: Path, out: TextIO, err: TextIO = sys.stderr) -> int:
    """Exit 0 when every expectation holds, 1 when one fails, 2 when a file cannot be used (then
    the errors go to ``err``, as every command's, and nothing to ``out``)."""
    report = validate_file(policy_path)
    if report.policy is None:
        refused = io.StringIO()
        print_report(report, refused)
        for line in refused.getvalue().splitlines():
            print(f"authz-service test: error: {line}", file=err)
        return 2
    try:
        cases = load_tests(tests_path)
    except CaseFileError as exc:
        print(f"authz-service test: error: {exc}", file=err)
        return 2
    results = asyncio.run(run_tests(report.policy, cases))
    for result in results:
        case = result.case
        who = (
            "no token"
            if not case.token
            else f"scopes [{' '.join(case.scopes)}]"
            + (f" client {case.client_id}" if case.client_id else "")
            + (f" claims {json.dumps(case.claims, separators=(',', ':'))}" if case.claims else "")
            + (f" jti {case.jti}" if case.jti else "")
        )
        if result.passed:
            print(f"PASS  {case.name}: {case.method} {case.path} ({who}) -> {_describe(result.got)}", file=out)
            continue
        print(f"FAIL  {case.name} ({tests_path}:{case.line}): {case.method} {case.path} ({who})", file=out)
        print(f"        expected: {_describe(case.wanted)}", file=out)
        print(f"        got:      {_describe(result.got)}", file=out)
        print(f"        differs:  {', '.join(result.mismatches)}", file=out)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed ({tests_path} against {policy_path})", file=out)
    return 1 if failed else 0
