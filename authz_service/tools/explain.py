"""`authz-service explain`: which route a request matches, why, and exactly what Envoy would answer.

Why: the people editing the policy need to see the service's real behaviour, not a description
of it. The route comes from ``Policy.match``, the decision from ``decide`` and the answer from
the Check pipeline (``simulate.run_check``); a real token is verified by the real TokenVerifier
with keys fetched by the real JwksCache. This module only gathers and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import jwt
from prometheus_client import CollectorRegistry

from ..claims import Claims, cognito_controlled
from ..conditions import Unmet
from ..config import JwksSettings, option
from ..files import FileReadError, read_bounded, too_large, utf8_text
from ..jwks import JwksCache, http_session
from ..metrics import Metrics
from ..policy import Policy, PolicyError, Route, load_policy_file, pattern_matches
from ..request import BadRequest, normalized_path, path_segments
from ..response import Answer
from ..tokens import Check, TokenError, TokenVerifier
from ..urls import shown
from .simulate import Outcome, Simulator, run_check

_BEARER = re.compile(r"^bearer(\s+|\Z)", re.IGNORECASE)

# What each of the verifier's checks verifies; CHECKS lists them in tokens.Check's order, the
# verifier's. The Authorization header's own check is left out: explain is given the token itself.
_WHAT = {
    Check.HEADER: "JOSE header: alg RS256, a kid, no embedded keys or crit",
    Check.KEY: "signing key with this kid in a trusted issuer's JWKS",
    Check.SIGNATURE: "RS256 signature",
    Check.PAYLOAD: "payload is strict base64url JSON (read only once the signature verified)",
    Check.ISSUER: "iss is the trusted issuer whose key verified the signature",
    Check.TIMES: "exp / nbf / iat (with leeway)",
    Check.TOKEN_USE: "token_use is 'access'",
    Check.CLIENT: "client_id present, valid header text and allowed",
    Check.CLAIMS: "scope and sub claims are strings; scope lists RFC 6749 scopes, sub is valid header text",
    Check.DENY_LIST: "neither client_id nor jti is in the policy's deny list",
}
CHECKS: dict[Check, str] = {check: _WHAT[check] for check in Check if check is not Check.CREDENTIALS}
# Each route condition (conditions.Unmet) as the checklist names it.
_CONDITION_NAMES = {
    Unmet.CLIENT: "clients",
    Unmet.ANY_SCOPE: "scopes",
    Unmet.ALL_SCOPES: "all_scopes",
    Unmet.CLAIM: "claim",
    Unmet.PARAM: "path parameter",
}


@dataclass
class Explanation:
    """Everything explain shows; ``as_dict`` is the --json output."""

    method: str
    path: str
    token: str  # how the token is described (never the token itself)
    candidates: list[str] = field(default_factory=list)
    # A path ending in '/' whose two readings have two routes: (as written, without the '/').
    readings: tuple[Route, Route] | None = None
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (check, result, detail)
    outcome: Outcome | None = None

    def as_dict(self) -> dict[str, Any]:
        decision = self.outcome.decision if self.outcome else None
        route = decision.route if decision else None
        claims = decision.claims if decision else None
        return {
            "request": {"method": self.method, "path": self.path, "token": self.token},
            "route": _route_dict(route),
            "candidates": self.candidates,
            "trailing_slash": None
            if self.readings is None
            else {"as_written": _route_dict(self.readings[0]), "without_slash": _route_dict(self.readings[1])},
            "required_scopes": sorted(route.scopes) if route and not route.public else [],
            "required_all_scopes": sorted(route.all_scopes) if route else [],
            "route_client_ids": sorted(route.client_ids) if route and route.client_ids is not None else None,
            "claim_conditions": [c.describe() for c in route.claims] if route else [],
            "present_scopes": sorted(claims.scopes) if claims else None,
            # Only the custom claims the policy's conditions name are read from a token.
            "present_claims": {name: _json_claim(v) for name, v in claims.custom.items()} if claims else None,
            "checks": [{"check": c, "result": r, "detail": d} for c, r, d in self.checks],
            "decision": None
            if decision is None
            else {
                "envoy": "allow" if decision.allowed else "deny",
                "dry_run": decision.dry_run,
                "reason": decision.reason.value,
                "status": decision.status,
                "description": decision.description,
            },
            "response": envoy_answer(self.outcome.answer) if self.outcome else None,
        }


def _json_claim(value: object) -> object:
    return (
        list(value)
        if isinstance(value, tuple)
        else value
        if isinstance(value, (str, int, float, bool))
        else repr(value)
    )


def condition_checks(route: Route, claims: Claims, path: str) -> list[tuple[str, str, str]]:
    """The route's scopes and conditions, each passed or FAILED for these claims and this request
    path, in decide()'s order (``Conditions.each``; the first failure is the decision's reason).
    Values shown are the operator's own token's and path's."""
    out = []
    segments = _segments(path) or ()
    for unmet, cond, failure in route.requirements.each(claims, segments):
        if unmet is Unmet.CLIENT:
            clients = " ".join(sorted(route.client_ids or ()))
            detail = f"client_id {claims.client_id!r} is one of the route's client_ids [{clients}]"
        elif unmet is Unmet.ANY_SCOPE:
            detail = f"token holds one of the route's scopes [{route.scopes_text}]"
        elif unmet is Unmet.ALL_SCOPES:
            detail = f"token holds all of the route's all_scopes [{route.all_scopes_text}]"
        else:
            assert cond is not None
            present = cond.name in claims.custom
            shown_value = _show_claim(claims.custom[cond.name]) if present else "no such claim"
            detail = f"{cond.text} (token: {shown_value})"
            if cond.segment >= 0:
                detail = f"{cond.text} (token: {shown_value}, path: {json.dumps(segments[cond.segment])})"
        out.append((_CONDITION_NAMES[unmet], "passed" if failure is None else "FAILED", detail))
    return out


def _show_claim(value: object) -> str:
    return json.dumps(_json_claim(value))


def _route_dict(route: Route | None) -> dict[str, Any] | None:
    if route is None:
        return None
    return {
        "name": route.name,
        "index": route.index,
        "path": route.path,
        "public": route.public,
        "methods": sorted(route.methods) if route.methods is not None else None,
        "mode": route.mode.value,
    }


def envoy_answer(answer: Answer) -> dict[str, Any]:
    """What Envoy does with an answer: the denial it sends, or what it changes upstream."""
    if not answer.allowed:
        return {
            "allowed": False,
            "grpc_status": answer.grpc_code,
            "status": answer.status,
            "headers": [list(h) for h in answer.headers],
            "body": answer.body,
        }
    return {
        "allowed": True,
        "grpc_status": answer.grpc_code,
        "upstream_headers_set": [list(h) for h in answer.headers],
        "upstream_headers_removed": list(answer.remove),
    }


def describe_token(token: str) -> str:
    """Enough to recognise a token (kid, jti, client) without printing it. Of a readable JWT the
    first characters (its public JOSE header) are shown; of anything else none: what was pasted
    may be a secret."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, UnicodeError, ValueError):
        return f"({len(token)} chars), not a readable JWT"
    shown = f"{token[:8]}... ({len(token)} chars)"
    parts = [f"kid={header.get('kid')!r}", f"alg={header.get('alg')!r}"]
    for key in ("iss", "client_id", "jti", "token_use", "exp"):
        if key in claims:
            parts.append(f"{key}={claims[key]!r}")
    return f"{shown}, unverified: {', '.join(parts)}"


def _segments(path: str) -> tuple[str, ...] | None:
    try:
        return path_segments(normalized_path(path))
    except BadRequest:
        return None


def readings(policy: Policy, method: str, path: str) -> tuple[Route, Route] | None:
    """For a path ending in '/' whose two readings (as written, without the '/') have two routes:
    both (Policy.routes_for), since the request must meet each."""
    segments = _segments(path)
    routes = policy.routes_for(method, segments) if segments is not None else ()
    return (routes[0], routes[1]) if len(routes) == 2 else None


def candidates(policy: Policy, method: str, path: str) -> list[str]:
    """Routes whose pattern covers the path, for the "why": the chosen one is the most specific."""
    segments = _segments(path)
    if segments is None:
        return []
    out = []
    for route in policy.routes:
        if not pattern_matches(route.path, segments, policy.path_case):
            continue
        methods = "any method" if route.methods is None else "|".join(sorted(route.methods))
        fits = route.takes(method)
        out.append(
            f"routes[{route.index}] {route.name!r}: {methods} {route.path}"
            + ("" if fits else f" (does not list {method})")
        )
    return out


def _checklist(error: TokenError | None) -> list[tuple[str, str, str]]:
    """The verifier's checks in order: passed up to the one the error names (``TokenError.check``),
    FAILED there with the error's operator detail, not checked after it."""
    out = []
    state = "passed"
    for check, what in CHECKS.items():
        if error is not None and check is error.check:
            out.append((check.value, "FAILED", f"{what}: {error.detail}"))
            state = "not checked"
        else:
            out.append((check.value, state, what))
    return out


async def _explain_real(
    policy: Policy, method: str, path: str, token: str, realm: str, leeway: float, jwks: JwksSettings
) -> Explanation:
    """Fetch the policy's JWKS once (the real JwksCache), verify for the checklist, then decide.

    Every trusted issuer's JWKS, as the server holds them: the key is found by kid before the
    payload (and its iss) is read."""
    info = Explanation(method, path, "real: " + describe_token(token))
    async with http_session() as session:
        cache = JwksCache(jwks, Metrics(CollectorRegistry()), session)
        try:
            cache.sync(policy.issuers)
            await cache.wait_first_attempts(jwks.timeout + 1)
            for state in cache.status():
                if state["last_error"]:
                    uri = policy.issuers_by_iss[str(state["issuer"])].jwks_uri
                    info.checks.append(("jwks", "FAILED", f"fetching {shown(uri)}: {state['last_error']}"))
            verifier = TokenVerifier(cache, leeway=leeway)
            try:
                await verifier.verify(token, policy)
                error = None
            except TokenError as exc:
                error = exc
            info.checks.extend(_checklist(error))
            # The decision is the server's own (decide verifies again with the same keys);
            # the checklist above only explains it.
            info.outcome = await run_check(policy, verifier, method, path, token, realm)
            decision = info.outcome.decision
            if error is None and decision.route is not None and not decision.route.public and decision.claims:
                info.checks.extend(condition_checks(decision.route, decision.claims, path))
        finally:
            await cache.close()
    return info


async def explain(
    policy: Policy,
    method: str,
    path: str,
    *,
    token: str | None = None,
    scopes: list[str] | None = None,
    client_id: str | None = None,
    issuer: str | None = None,
    claims: dict[str, Any] | None = None,
    realm: str = "authz-service",
    leeway: float = 60.0,
    jwks: JwksSettings | None = None,
) -> Explanation:
    """Explain one request; a real ``token`` is verified for real, ``scopes``/``client_id``/``claims``
    are simulated (a token minted with them)."""
    if token is not None:
        info = await _explain_real(policy, method, path, token, realm, leeway, jwks or JwksSettings())
    elif scopes is not None or client_id is not None or claims:
        simulator = Simulator(policy)
        iss = issuer or policy.issuers[0].issuer
        minted = simulator.token(iss, scopes or [], client_id, claims)
        who = f"simulated: a verified token from {iss} with scopes [{' '.join(scopes or [])}]"
        who += f", client_id {client_id!r}" if client_id else ""
        who += f", claims {json.dumps(claims, separators=(',', ':'))}" if claims else ""
        info = Explanation(method, path, who)
        info.outcome = await run_check(policy, simulator.verifier, method, path, minted, realm)
    else:
        info = Explanation(method, path, "none (no Authorization header)")
        info.outcome = await run_check(policy, Simulator(policy).verifier, method, path, None, realm)
    info.candidates = candidates(policy, method, path)
    info.readings = readings(policy, method, path)
    return info


def render_text(info: Explanation, out: TextIO) -> None:
    data = info.as_dict()
    decision, route, answer = data["decision"], data["route"], data["response"]
    print(f"request:   {info.method} {info.path}", file=out)
    print(f"token:     {info.token}", file=out)
    if route is None:
        print("route:     none matches", file=out)
    else:
        methods = "any method" if route["methods"] is None else "|".join(route["methods"])
        print(
            f"route:     routes[{route['index']}] {route['name']!r} ({methods} {route['path']}, "
            f"{'public' if route['public'] else 'mode ' + route['mode']})",
            file=out,
        )
    if info.candidates:
        print("why:       the most specific route wins; routes whose path pattern covers this path:", file=out)
        for line in info.candidates:
            print(f"             {line}", file=out)
    elif decision["reason"] != "bad_request":
        print("why:       no route's path pattern covers this path", file=out)
    if info.readings is not None:
        written, lenient = info.readings
        without = "/" + "/".join((_segments(info.path) or ("",))[:-1])
        print(
            f"slash:     the path ends in '/': a strict router serves it as written (routes[{written.index}] "
            f"{written.name!r}), a lenient one as {without} (routes[{lenient.index}] {lenient.name!r}); "
            "the request must meet both",
            file=out,
        )
    if route is not None and not route["public"]:
        _render_requirements(info, data, out)
    if info.checks:
        print("checks:", file=out)
        for name, result, detail in info.checks:
            print(f"  {result:<12} {name:<10} {detail}", file=out)
    if decision["reason"] == "bad_request" and info.method.upper() != info.method:
        print(f"hint:      HTTP methods are case-sensitive; did you mean {info.method.upper()}?", file=out)
    verdict = "ALLOW" if decision["envoy"] == "allow" else "DENY"
    if decision["dry_run"]:
        verdict = f"ALLOW (dry-run: would be DENY {decision['status']})"
    print(
        f"decision:  {verdict}, reason {decision['reason']}"
        + (f": {decision['description']}" if decision["description"] else ""),
        file=out,
    )
    print("envoy:", file=out)
    if answer["allowed"]:
        print("  forwards the request upstream with:", file=out)
        for name, value in answer["upstream_headers_set"]:
            print(f"    {name}: {value}", file=out)
        if answer["upstream_headers_removed"]:
            print(f"  and removes: {', '.join(answer['upstream_headers_removed'])}", file=out)
    else:
        print(f"  HTTP {answer['status']}", file=out)
        for name, value in answer["headers"]:
            print(f"  {name}: {value}", file=out)
        print("", file=out)
        print(f"  {answer['body']}", file=out)


def _render_requirements(info: Explanation, data: dict[str, Any], out: TextIO) -> None:
    """required: what the route asks for; present: what the token holds (scopes, then conditions)."""
    required = []
    if data["required_scopes"]:
        required.append(f"any of [{' '.join(data['required_scopes'])}]")
    if data["required_all_scopes"]:
        required.append(f"all of [{' '.join(data['required_all_scopes'])}]")
    if data["route_client_ids"] is not None:
        required.append(f"client_id one of [{' '.join(data['route_client_ids'])}]")
    decision = info.outcome.decision if info.outcome else None
    route = decision.route if decision else None
    if route is not None:
        required.extend(f"claim {c.text}" for c in route.claims)
    for k, line in enumerate(required):
        print(f"{'required:' if k == 0 else '':<10} {line}", file=out)
    present = data["present_scopes"]
    if present is None or decision is None or decision.claims is None or route is None:
        return
    if data["required_scopes"] and not route.conditions:  # the one-line form for a scopes-only route
        held = sorted(set(present) & set(data["required_scopes"]))
        print(f"present:   [{' '.join(present)}] -> {'holds ' + ' '.join(held) if held else 'none of them'}", file=out)
        return
    print(f"present:   [{' '.join(present)}], client_id {decision.claims.client_id!r}", file=out)
    if not info.checks:  # simulated: the real token's checklist shows the same per condition
        for name, result, detail in condition_checks(route, decision.claims, info.path):
            print(f"           {result:<7} {name}: {detail}", file=out)


# An access token is 1 to 2 KB; a token file larger than this is the wrong file (or /dev/zero).
TOKEN_FILE_MAX_BYTES = 64 * 1024
_TOKEN_FILE_FIX = "--token-file names a file holding one access token"


def read_token(args: argparse.Namespace) -> str | None:
    """The token from --token or --token-file ('-': stdin); None when neither was given.

    Surrounding whitespace and a ``Bearer `` prefix (any case) are dropped, so a token copied
    from an Authorization header or a curl command line works as it is.
    """
    if args.token is not None:
        text = args.token
    elif args.token_file == "-":
        raw = sys.stdin.buffer.read(TOKEN_FILE_MAX_BYTES + 1)
        if len(raw) > TOKEN_FILE_MAX_BYTES:
            raise too_large("<stdin>", "more", "token file", TOKEN_FILE_MAX_BYTES, _TOKEN_FILE_FIX)
        text = utf8_text(raw, "<stdin>")
    elif args.token_file is not None:
        # Not only a regular file: a pipe (--token-file <(command)) is read as it comes.
        text = utf8_text(
            read_bounded(args.token_file, "token file", TOKEN_FILE_MAX_BYTES, _TOKEN_FILE_FIX), args.token_file
        )
    else:
        return None
    token = _BEARER.sub("", text.strip(), count=1)
    if not token:
        source = "--token" if args.token is not None else f"--token-file {args.token_file}"
        raise FileReadError(f"{source}: the token is empty; give the access token")
    return token


def parse_claim_options(options: list[str]) -> dict[str, Any]:
    """``--claim NAME=VALUE`` options: VALUE is read as JSON when it is JSON (3, true, ["a","b"],
    "quoted"), else as a string, as a pre token generation trigger would set it."""
    claims: dict[str, Any] = {}
    for given in options:
        name, sep, raw = given.partition("=")
        if not sep or not name:
            raise ValueError(f"--claim {given!r}: write NAME=VALUE, e.g. --claim tenant=acme")
        if cognito_controlled(name):
            raise ValueError(
                f"--claim {name}: set by Cognito, not by a pre token generation trigger; use "
                "--scopes, --client-id or --issuer"
            )
        try:
            claims[name] = json.loads(raw)
        except ValueError:
            claims[name] = raw
    return claims


def settings_as_serve(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> tuple[str, float, JwksSettings]:
    """The realm, leeway and JWKS fetch settings of the answer: a flag given (--realm, --leeway),
    else serve's AUTHZ_* variable, else serve's default, each parsed as serve parses it (ValueError
    naming the flag or variable). Why: run where the service is configured (kubectl exec), explain
    must answer what that service answers, challenge and clock skew included."""

    def value(name: str, given: str | None) -> Any:
        setting = option(name)
        if given is not None:
            try:
                return setting.parse(given)
            except ValueError as exc:
                raise ValueError(f"{setting.flag} {given!r}: {exc}") from None
        raw = environ.get(setting.env)
        if raw is None:
            return setting.default
        try:
            return setting.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{setting.env}={raw!r} (serve's {setting.flag}, which explain follows): {exc}") from None

    jwks = JwksSettings(timeout=value("jwks_timeout", None), max_bytes=value("jwks_max_bytes", None))
    return value("realm", args.realm), value("leeway", args.leeway), jwks


def explain_command(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 0 when Envoy would let the request through, 1 when it would deny, 2 on unusable input."""
    try:
        realm, leeway, jwks = settings_as_serve(args)
        policy = load_policy_file(args.policy)
        token = read_token(args)
        claims = parse_claim_options(getattr(args, "claims", None) or [])
    except (PolicyError, FileReadError, ValueError) as exc:
        print(f"authz-service explain: error: {exc}", file=sys.stderr)
        return 2
    scopes = args.scopes.split() if args.scopes is not None else None
    # Options that shape a simulated token would be silently ignored with a real one.
    simulated = [flag for flag, given in (("--client-id", args.client_id), ("--issuer", args.issuer)) if given]
    if token is not None and (simulated or claims):
        flag = simulated[0] if simulated else "--claim"
        print(
            f"authz-service explain: error: {flag} simulates a token; a real token carries its own "
            + ("claims" if flag == "--claim" else flag.removeprefix("--").replace("-", "_")),
            file=sys.stderr,
        )
        return 2
    # A JWKS that cannot be fetched is a FAILED check of the output; no log line beside it.
    logging.getLogger().addHandler(logging.NullHandler())
    info = asyncio.run(
        explain(
            policy,
            args.method,
            args.path,
            token=token,
            scopes=scopes,
            client_id=args.client_id,
            issuer=args.issuer,
            claims=claims,
            realm=realm,
            leeway=leeway,
            jwks=jwks,
        )
    )
    if args.json:
        print(json.dumps(info.as_dict(), indent=2), file=out)
    else:
        render_text(info, out)
    assert info.outcome is not None
    return 0 if info.outcome.decision.allowed else 1
