"""Route by route, which engine enforces the policy and why: what ``compile envoy`` reports."""

from __future__ import annotations

from typing import Any

from ..policy import deny_list_sizes
from .bootstrap import Compiled
from .plan import Engine, TrailingSlashEntry, engine_of_all, trailing_slash_plan
from .routes import SCREEN_NAMES

ENGINE_TEXT = {Engine.NATIVE: "native", Engine.EXT_AUTHZ: "ext_authz", Engine.NONE: "none"}


def report_text(compiled: Compiled) -> str:
    """One line per route, in the order Envoy tries them, then the requests the service decides."""
    plans = compiled.plans
    width = max((len(p.route.name) for p in plans), default=0)
    counts = {engine: sum(1 for p in plans if p.engine is engine) for engine in Engine}
    lines = [
        f"{compiled.policy.source}: {len(plans)} routes: {counts[Engine.NATIVE]} native, "
        f"{counts[Engine.EXT_AUTHZ]} ext_authz, {counts[Engine.NONE]} public (routes in Envoy's order)"
    ]
    for p in plans:
        methods = "ANY" if p.methods is None else "|".join(sorted(p.methods))
        lines.append(f"  {ENGINE_TEXT[p.engine]:<9}  {p.route.name:<{width}}  {methods} {p.route.path}: {p.why}")
    lines.append(
        "  ext_authz  every route: a request the service must read itself ("
        + ", ".join(SCREEN_NAMES)
        + "); on native routes, a credential jwt_authn does not verify (not one canonical bearer JWT "
        "within the native size limits, or a token it cannot verify: the service answers it and "
        "re-fetches keys for an unknown kid)"
    )
    pairs = _trailing_slash_pairs(compiled)
    if pairs:
        engines = [engine_of_all(pair.sides) for pair in pairs]
        service = sorted(
            {pair.names for pair, engine in zip(pairs, engines, strict=True) if engine is Engine.EXT_AUTHZ}
        )
        lines.append(
            "  native     a path ending in '/' that must meet two routes (the /** route taking it as written, "
            f"then the route without the '/'): {_count(len(pairs), 'pair')}, {engines.count(Engine.NATIVE)} native, "
            f"{engines.count(Engine.EXT_AUTHZ)} ext_authz"
            + (f" ({', '.join(service)})" if service else "")
            + f", {engines.count(Engine.NONE)} public"
        )
    lines.append("  native     no route matches: 403 access_denied")
    deny = compiled.policy.deny
    if deny is not None:
        lines.append(
            f"  native     deny list: {_count(len(deny.client_ids), 'client id')}, {_count(len(deny.jtis), 'jti')}, "
            "refused on every native route (RBAC on the client_id and jti jwt_authn verified); "
            "the service refuses them elsewhere"
        )
    lines.append(f"  Envoy heap {compiled.heap.summary()}")  # last: docs/native.md names it so
    return "\n".join(lines) + "\n"


def _trailing_slash_pairs(compiled: Compiled) -> list[TrailingSlashEntry]:
    """The trailing-slash entries of two routes (the others: a /** route's own decision)."""
    return [e for e in trailing_slash_plan(compiled.plans, compiled.policy.fold) if len(e.sides) == 2]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def report_json(compiled: Compiled) -> dict[str, Any]:
    """The same, for tools: routes in Envoy's order."""
    return {
        "policy": compiled.policy.source,
        "sha256": compiled.policy.sha256,
        "routes": [
            {
                "name": p.route.name,
                "path": p.route.path,
                "methods": None if p.methods is None else sorted(p.methods),
                "engine": p.engine.value,
                "why": p.why,
                "fallback": [code.value for code in p.fallback],
            }
            for p in compiled.plans
        ],
        "screen": list(SCREEN_NAMES),
        # A path ending in '/' that must meet two routes: each pair in Envoy's order (routes: the
        # /** route, then the route without the '/').
        "trailing_slash": [
            {
                "routes": [side.route.name for side in pair.sides],
                "methods": None if pair.methods is None else sorted(pair.methods),
                "engine": engine_of_all(pair.sides).value,
            }
            for pair in _trailing_slash_pairs(compiled)
        ],
        "deny_list": deny_list_sizes(compiled.policy),
        "envoy_heap": compiled.heap.report(),
    }
