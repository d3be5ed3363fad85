"""Compile a policy into an Envoy bootstrap: envoy/envoy.yaml's hardened Envoy, deciding natively.

The bootstrap starts from ``envoy.yaml`` in this package, a byte-for-byte copy of the shipped
envoy/envoy.yaml (tests/test_native.py keeps them equal), so the path normalization, admission
control, overload manager, timeouts, health listener and access log are the shipped ones, and
follow it. Only what decides changes: the routes, and in place of the ext_authz filter

    authz.jwt (jwt_authn) verifies a canonical bearer token, keys from the service (jwt.py); never
                          denies
    authz.screen (RBAC)   on public routes and no route: the service's 400s that need no token
                          (checks.screen_checks)
    authz.shared (RBAC)   on native routes: the same 400s, then the 401s of a verified token
                          (checks.token_checks), configured once for every native route
    authz.rbac (RBAC)     on native routes: the 403s of the route's conditions
                          (checks.route_checks), each route with the checks it needs
    ext_authz             the shipped filter, created (composite filter, behind a matcher) only
                          when no token was verified (or the route is the service's): the
                          service then decides, in its own words

Denials Envoy makes itself are rewritten into the service's answers (answers.py). The result is a
``Compiled`` whose listeners and clusters are complete resources, so they can as well be served to
Envoy as xDS resources as be put in a static bootstrap.

What each part costs Envoy per request was measured (docs/native.md, "What it costs"): the design
keeps each check in its cheapest exact form, and every filter off the routes that do not need it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from ..policy import Policy
from ..request import identity_spellings
from .answers import AnswerBook
from .cel import JWT_AUTHN
from .checks import VERIFIED_PATH, Check, rules, screen_checks
from .decisions import RbacPrefixes, add_decision_stats
from .jwt import SERVICE_HTTP_CLUSTER, jwt_authn
from .options import Address, Options, heap_cap_refusal
from .patterns import re2_literal
from .plan import Engine, RoutePlan, plan
from .routes import (
    EXT_AUTHZ,
    JWT,
    RATE_LIMIT,
    RBAC,
    RBAC_STAT_PREFIX,
    SCREEN,
    SCREEN_STAT_PREFIX,
    SHARED,
    SHARED_STAT_PREFIX,
    Admission,
    ingress_routes,
    shared_checks,
)
from .sizing import HeapBudget, check_fits, heap_budget, set_heap_cap

HCM = "envoy.filters.network.http_connection_manager"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
EXTENSION_WITH_MATCHER = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
COMPOSITE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
EXECUTE_FILTER = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
SKIP_FILTER = "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
DYNAMIC_METADATA_INPUT = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput"
METADATA_MATCHER = "type.googleapis.com/envoy.extensions.matching.input_matchers.metadata.v3.Metadata"
INGRESS, HEALTH = "ingress", "envoy-health"
# The generated regexes (the request screen's, the bounded bearer token's) exceed RE2 program sizes
# Envoy refuses by default (100); they are ours, not a client's.
RE2_PROGRAM_SIZE = 65536
# The grace an HTTP/2 connection of a draining listener gets between Envoy's first GOAWAY (last
# stream id 2^31-1: "stop opening streams") and its final one (streams above it refused). The policy
# is in the listener, so a drain is a policy change: with Envoy's default of 5 s, a client that went
# on opening streams after the first GOAWAY was served under the old policy meanwhile (a revoked
# token, hundreds of times). None: streams racing the GOAWAY are refused (REFUSED_STREAM), which
# RFC 9113 section 8.7 lets clients retry on a new connection, under the new listener.
DRAIN_TIMEOUT = "0s"


class TemplateError(ValueError):
    """The packaged envoy.yaml is not shaped as this compiler expects (it was edited)."""


@dataclass(frozen=True)
class Compiled:
    """A compiled policy: the route plan and Envoy's resources."""

    policy: Policy
    options: Options
    plans: tuple[RoutePlan, ...]
    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    static: dict[str, Any] = field(repr=False)  # admin, overload_manager, layered_runtime
    heap: HeapBudget  # Envoy's expected heap against its cap (sizing.py)

    def bootstrap(self) -> dict[str, Any]:
        """The whole bootstrap, every resource static."""
        return {**self.static, "static_resources": {"listeners": self.listeners, "clusters": self.clusters}}


@dataclass(frozen=True)
class StaticParts:
    """What does not depend on the policy: the health listener, the clusters, and the admin
    interface, overload manager and runtime (the bootstrap of the xDS form, xds.py, is these)."""

    health: dict[str, Any]
    clusters: list[dict[str, Any]]
    static: dict[str, Any]


def static_parts(options: Options | None = None) -> StaticParts:
    """The policy-independent parts of the bootstrap (ValueError when an option cannot serve)."""
    options = Options() if options is None else options
    _check_options(options)
    template = copy.deepcopy(_template())
    return _static_parts(template, _listeners(template), options)


def compile_policy(policy: Policy, options: Options | None = None) -> Compiled:
    """Compile ``policy`` (ValueError when an option cannot serve it); ``options``: the defaults."""
    options = Options() if options is None else options
    _check_options(options)
    template = copy.deepcopy(_template())
    plans = plan(policy)
    book = AnswerBook(options.realm)
    listeners = _listeners(template)
    _set_address(listeners[INGRESS], options.listen)
    hcm = _hcm(listeners[INGRESS])
    hcm["drain_timeout"] = DRAIN_TIMEOUT
    virtual_hosts = hcm["route_config"]["virtual_hosts"]
    _expect(len(virtual_hosts) == 1, "one virtual host")
    shared = shared_checks(policy, options.leeway)
    hcm["http_filters"] = _filters(hcm["http_filters"], policy, options, book, shared)
    routes = ingress_routes(policy, plans, book, _admission(virtual_hosts[0]["routes"]), len(shared))
    virtual_hosts[0]["routes"] = routes
    hcm["local_reply_config"]["mappers"].extend(book.mappers())  # after the routes: they register answers
    if options.decision_stats:
        add_decision_stats(listeners[INGRESS], hcm, DECISION_PREFIXES)
    _strip_identity_early(hcm)
    parts = _static_parts(template, listeners, options)
    # Which policy this Envoy enforces natively (admin /server_info), to compare with the service's
    # (/readyz): a policy change needs a new compile. (The xDS form names it in the listener's
    # version instead: xds.py.)
    parts.static["node"] = {
        **NODE,
        "metadata": {"authz_policy_sha256": policy.sha256, "authz_policy_source": policy.source},
    }
    heap = heap_budget(listeners[INGRESS], parts.static)
    check_fits(heap, policy.source, sum(1 for p in plans if p.engine is Engine.NATIVE))
    return Compiled(policy, options, plans, [listeners[INGRESS], parts.health], parts.clusters, parts.static, heap)


DECISION_PREFIXES = RbacPrefixes(
    screen=SCREEN_STAT_PREFIX,
    shared=SHARED_STAT_PREFIX,
    shared_filter=SHARED,
    native=RBAC_STAT_PREFIX,
    native_filter=RBAC,
)
NODE = {"id": "authz-service-native", "cluster": "authz-service"}


def _listeners(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listeners = {item["name"]: item for item in template["static_resources"]["listeners"]}
    _expect(set(listeners) == {INGRESS, HEALTH}, f"listeners {INGRESS!r} and {HEALTH!r}")
    return listeners


def _static_parts(template: dict[str, Any], listeners: dict[str, dict[str, Any]], options: Options) -> StaticParts:
    _set_address(listeners[HEALTH], options.health)
    clusters = {item["name"]: item for item in template["static_resources"]["clusters"]}
    for name, address in (
        ("authz_service", options.service_grpc),
        ("app", options.app),
        ("envoy_admin", options.admin),
    ):
        _expect(name in clusters, f"cluster {name!r}")
        _set_endpoint(clusters[name], address)
    clusters[SERVICE_HTTP_CLUSTER] = _service_http_cluster(options.service_http)
    static = {key: value for key, value in template.items() if key != "static_resources"}
    _set_address(static["admin"], options.admin)
    if options.heap_cap_mib is not None:
        set_heap_cap(static, options.heap_cap_mib)
    static["layered_runtime"] = {
        "layers": [{"name": "native", "static_layer": {"re2.max_program_size.error_level": RE2_PROGRAM_SIZE}}]
    }
    return StaticParts(listeners[HEALTH], list(clusters.values()), static)


def _check_options(options: Options) -> None:
    for name in ("app", "service_grpc", "service_http", "admin"):
        address: Address = getattr(options, name)
        if address.unspecified:
            raise ValueError(
                f"--{name.replace('_', '-')} {address}: Envoy connects there, so name an address "
                "(e.g. 127.0.0.1), not 0.0.0.0 or ::"
            )
    refusal = None if options.heap_cap_mib is None else heap_cap_refusal(options.heap_cap_mib)
    if refusal is not None:
        raise ValueError(f"--heap-cap {options.heap_cap_mib}: {refusal}")
    if options.leeway < 2:
        raise ValueError(
            f"--leeway {options.leeway}: at least 2 seconds (jwt_authn's clock skew is one second "
            "less, and Envoy reads 0 as its own default of 60)"
        )


@lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("envoy.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise TemplateError(f"authz_service/native/envoy.yaml must be envoy/envoy.yaml with {what}")


def _set_address(node: dict[str, Any], address: Address) -> None:
    node["address"]["socket_address"] = {**node["address"]["socket_address"], **address.socket_address()}


def _set_endpoint(cluster: dict[str, Any], address: Address) -> None:
    endpoints = [lb["endpoint"] for group in cluster["load_assignment"]["endpoints"] for lb in group["lb_endpoints"]]
    _expect(len(endpoints) == 1, f"one endpoint in cluster {cluster['name']!r}")
    _set_address(endpoints[0], address)


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    chains = listener["filter_chains"]
    found = [f["typed_config"] for chain in chains for f in chain["filters"] if f["name"] == HCM]
    _expect(len(chains) == 1 and len(found) == 1, f"one HTTP connection manager in listener {listener['name']!r}")
    return found[0]


def _admission(shipped_routes: list[dict[str, Any]]) -> Admission:
    """The shipped admission routes' definitions: a bearer JWT, and the anonymous token bucket."""
    by_name = {route.get("name"): route for route in shipped_routes}
    _expect(set(by_name) == {"bearer-jwt", "anonymous"}, "routes 'bearer-jwt' and 'anonymous'")
    headers = by_name["bearer-jwt"]["match"].get("headers", [])
    _expect(len(headers) == 1 and headers[0]["name"] == "authorization", "route 'bearer-jwt' matching authorization")
    regex = headers[0]["string_match"]["safe_regex"]["regex"]
    return Admission(
        regex.removeprefix("^").removesuffix("$"), by_name["anonymous"]["typed_per_filter_config"][RATE_LIMIT]
    )


def _filters(
    shipped: list[dict[str, Any]], policy: Policy, options: Options, book: AnswerBook, shared: list[Check]
) -> list[dict[str, Any]]:
    """The shipped HTTP filters with the ext_authz filter preceded by the native ones and created
    only where no token was verified; ``shared``: the checks every native route makes first."""
    names = [f["name"] for f in shipped]
    _expect(names.count(EXT_AUTHZ) == 1, f"one {EXT_AUTHZ} filter")
    index = names.index(EXT_AUTHZ)
    native = [
        {"name": JWT, "typed_config": jwt_authn(policy, options)},
        # The request screen, for public routes and no route (the other routes turn it off).
        _rbac(SCREEN, rules(book, screen_checks()), SCREEN_STAT_PREFIX),
        # Native routes: the screen's and the token's checks, the same on every one (routes.py).
        _rbac(SHARED, rules(book, shared), SHARED_STAT_PREFIX),
        # Native routes: each brings its own checks (this filter's own rules take effect on none).
        _rbac(RBAC, {"action": "DENY", "policies": {}}, RBAC_STAT_PREFIX),
    ]
    _expect(set(shipped[index]) == {"name", "typed_config"}, f"a {EXT_AUTHZ} filter of a name and a typed_config")
    return [*shipped[:index], *native, _unless_verified(shipped[index]), *shipped[index + 1 :]]


def _unless_verified(ext_authz: dict[str, Any]) -> dict[str, Any]:
    """The shipped ext_authz filter, created for a request only when jwt_authn verified no token in
    it: then it calls the service exactly as in gRPC mode. A filter is created for every request
    its route does not disable, and the route is chosen before jwt_authn runs, so rather than the
    filter's own switch (``filter_enabled_metadata``, which it reads only once created: that idle
    filter cost Envoy ~14,000 instructions of ~310,000 per natively allowed request), a matcher
    after jwt_authn creates it, through the composite filter, where jwt_authn left no verified
    payload. The wrapper keeps the filter's name, so the routes that turn it off still do."""
    verified = {
        "single_predicate": {
            "input": {
                "name": "jwt_authn_issuer",
                "typed_config": {
                    "@type": DYNAMIC_METADATA_INPUT,
                    "filter": JWT_AUTHN,
                    "path": [{"key": key} for key in VERIFIED_PATH],
                },
            },
            "custom_match": {
                "name": "present",
                "typed_config": {"@type": METADATA_MATCHER, "value": {"present_match": True}},
            },
        }
    }
    return {
        "name": ext_authz["name"],
        "typed_config": {
            "@type": EXTENSION_WITH_MATCHER,
            "extension_config": {"name": "ext_authz_unless_verified", "typed_config": {"@type": COMPOSITE}},
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [
                        {
                            "predicate": verified,
                            "on_match": {"action": {"name": "verified", "typed_config": {"@type": SKIP_FILTER}}},
                        }
                    ]
                },
                "on_no_match": {
                    "action": {
                        "name": "not_verified",
                        "typed_config": {"@type": EXECUTE_FILTER, "typed_config": ext_authz},
                    }
                },
            },
        },
    }


def _rbac(name: str, rbac_rules: dict[str, Any], stat_prefix: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": RBAC_TYPE, "rules": rbac_rules, "rules_stat_prefix": stat_prefix}}


def _strip_identity_early(hcm: dict[str, Any]) -> None:
    """Remove a client's copy of every identity header, in every spelling ('-', '_', '.'), before any
    filter or route sees the request: on every route, public ones included, and whoever decides
    (jwt_authn then sets them from a verified token, the service from the one it verified). One
    pass over the request's headers with one regex, rather than a lookup per spelling."""
    extensions = hcm["early_header_mutation_extensions"]
    _expect(len(extensions) == 1, "one early header mutation")
    spellings = identity_spellings()
    extensions[0]["typed_config"]["mutations"].append(
        {
            "remove_on_match": {
                "key_matcher": {"safe_regex": {"regex": "|".join(re2_literal(name) for name in spellings)}}
            }
        }
    )


def _service_http_cluster(address: Address) -> dict[str, Any]:
    """The service's HTTP port, where jwt_authn fetches the keys the service holds."""
    return {
        "name": SERVICE_HTTP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": SERVICE_HTTP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": address.socket_address()}}}]}],
        },
    }
