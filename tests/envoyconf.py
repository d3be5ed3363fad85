"""The parts of an Envoy bootstrap config (its YAML loaded as dicts) that tests, the bench and the
demo read or rewrite: a listener, its HTTP connection manager, an HTTP filter, a cluster and the
address of its endpoint.

Each lookup insists on exactly one match and says which part it could not find, so a config that
gains a second listener, filter chain or endpoint fails loudly instead of a test silently checking
(or rewriting the port of) the wrong one.
"""

from __future__ import annotations

from typing import Any

Config = dict[str, Any]
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def one(items: list[Any], what: str) -> Any:
    """The single item of ``items``; ValueError naming ``what`` otherwise."""
    if len(items) != 1:
        raise ValueError(f"Envoy config: expected exactly one {what}, found {len(items)}")
    return items[0]


def listener(config: Config, name: str | None = None) -> Config:
    """The listener called ``name``; the first listener when no name is given (Istio's fixtures and
    the shipped configs put the one that serves the app first)."""
    listeners = config["static_resources"]["listeners"]
    if name is None:
        return one(listeners[:1], "listener")
    return one([item for item in listeners if item.get("name") == name], f"listener {name!r}")


def hcm(config: Config, listener_name: str | None = None) -> Config:
    """The typed config of the HTTP connection manager of a listener's single filter chain."""
    chain = one(listener(config, listener_name)["filter_chains"], f"filter chain of listener {listener_name!r}")
    found = one([f for f in chain["filters"] if f["name"] == HCM], f"{HCM} in listener {listener_name!r}")
    if found["typed_config"]["@type"] != HCM_TYPE:
        raise ValueError(f"Envoy config: {HCM} in listener {listener_name!r} is not an HttpConnectionManager")
    return found["typed_config"]


def http_filters(config: Config, listener_name: str | None = None) -> list[Config]:
    """The HTTP filter chain of a listener, in order (name and typed_config of each filter)."""
    return hcm(config, listener_name)["http_filters"]


def http_filter(config: Config, name: str, listener_name: str | None = None) -> Config:
    """The typed config of the HTTP filter called ``name``."""
    return one([f["typed_config"] for f in http_filters(config, listener_name) if f["name"] == name],
               f"HTTP filter {name!r}")


def cluster(config: Config, name: str) -> Config:
    return one([c for c in config["static_resources"]["clusters"] if c.get("name") == name], f"cluster {name!r}")


def socket_address(node: Config, where: str) -> Config:
    """``node``'s ``address.socket_address`` (a listener, the admin block, an endpoint)."""
    try:
        return node["address"]["socket_address"]
    except (KeyError, TypeError):
        raise ValueError(f"Envoy config: no socket_address at {where}") from None


def endpoint(config: Config, cluster_name: str) -> Config:
    """The socket address of the single endpoint of a cluster (a dict: rewrite its port in place)."""
    lb_endpoints = [lb for group in cluster(config, cluster_name)["load_assignment"]["endpoints"]
                    for lb in group["lb_endpoints"]]
    return socket_address(one(lb_endpoints, f"endpoint in cluster {cluster_name!r}")["endpoint"],
                          f"cluster {cluster_name}")


EXT_AUTHZ = "envoy.filters.http.ext_authz"


def http_door_mismatches(config: Config, service_prefix: str) -> list[str]:
    """How the HTTP-mode ext_authz filter of ``config`` disagrees with an authz-service whose
    ``--ext-authz-http-path-prefix`` is ``service_prefix`` (empty: they agree): the path_prefix
    Envoy puts before the original path, and the original path it must send on its own
    (authz_service/doors/http.py refuses every request otherwise)."""
    from authz_service.doors.http import ENVOY_VALUE, ORIGINAL_PATH

    service = http_filter(config, EXT_AUTHZ)["http_service"]
    problems = []
    if service.get("path_prefix", "") != service_prefix:
        problems.append(f"Envoy's path_prefix is {service.get('path_prefix', '')!r}, the service's {service_prefix!r}")
    added = {h["key"]: h["value"] for h in service.get("authorization_request", {}).get("headers_to_add", [])}
    if added.get(ORIGINAL_PATH) != ENVOY_VALUE:
        problems.append(f"Envoy sends {ORIGINAL_PATH}: {added.get(ORIGINAL_PATH)!r}, not {ENVOY_VALUE!r}")
    return problems


def without_anonymous_limit(config: Config) -> None:
    """Lift the ``ingress`` listener's anonymous token bucket (the shipped 100 burst, 50/s) out of reach.

    Why: admission control answers 429 before any decision is made, so a suite about decisions that
    sends anonymous requests faster than 50/s (a fast, idle machine does) would test the bucket
    instead. The admission suite keeps the shipped bucket; every other suite runs without it."""
    for route in hcm(config, "ingress")["route_config"]["virtual_hosts"][0]["routes"]:
        limit = route.get("typed_per_filter_config", {}).get("envoy.filters.http.local_ratelimit")
        if limit is not None:
            limit["token_bucket"].update(max_tokens=1_000_000, tokens_per_fill=1_000_000)
