"""Native decisions as Envoy stats, with the service's labels: ``envoy_authz_native_decisions``
``{decision, reason, route, status}`` counts what ``authz_check_decisions_total`` would have
counted for each request Envoy decided itself (the service counts the rest, which it decides).

How, at what cost: Envoy's stats access logger (``envoy.access_loggers.stats``) adds one to a
counter whose tags are read from the matched route's metadata (its policy route name, and what
passing every native check there means: allowed, public, or no_route) and, for a denial, from
the RBAC filters' dynamic metadata (which filter denied) and the response code. Three loggers,
each behind an access-log filter that only looks up dynamic metadata (a few map lookups), so an
allowed request costs no expression evaluation; only a token or route denial evaluates one CEL
lookup (its reason, from a table in the route's metadata keyed by the denying RBAC policy).

Which requests are native decisions (the filters below):

* passed: the request screen let it through (RBAC ``authz.screen`` ran and allowed) and either
  jwt_authn verified the token and the route's conditions allowed it (then ext_authz does not run:
  bootstrap.py), or no token filter ran (a public route, or no route: a direct 403);
* screen denials: 400 ``bad_request``, labelled ``no_route`` as the service labels a request it
  refuses before matching a route;
* token or route-condition denials: 401/403 with the denying policy's reason.

A request the service decided (a route it decides, a token jwt_authn could not verify, the
request screen's routes) matches none of them: it is in ``authz_check_decisions_total``.

Every tag value comes from the compiled configuration (route names, reasons, the status of an
answer), never from the request, so a client cannot create series.
"""

from __future__ import annotations

import re
from typing import Any

from ..decision import REASONS, Reason
from .cel import JWT_AUTHN
from .checks import PAYLOAD

STATS_LOGGER = "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config"
STAT_SCOPE, STAT_NAME = "authz", "native_decisions"  # Prometheus: envoy_authz_native_decisions
RBAC_METADATA = "envoy.filters.http.rbac"
METADATA_KEY = "authz"  # the routes' filter_metadata namespace
_POLICY_NAME = re.compile(r"\d{3}-(?P<reason>[a-z_]+)-a\d+")  # answers.AnswerBook.policy_name
_DENIED_BY_RBAC = "rbac_access_denied_matched_policy[{}]"  # answers.RBAC_DENIED


def route_metadata(route: str, reason: Reason) -> dict[str, Any]:
    """A route's metadata: its policy route name and what a request that passes every native check
    there is (``reason``: allowed, public, or no_route)."""
    outcome = REASONS[reason]
    decision = "allow" if outcome.http_status == 200 else "deny"
    return {
        "filter_metadata": {
            METADATA_KEY: {
                "route": route,
                "decision": decision,
                "reason": reason.value,
                "status": str(outcome.http_status),
            }
        }
    }


def add_decision_stats(hcm: dict[str, Any], filter_prefixes: dict[str, str]) -> None:
    """Count native decisions: each native route learns the reasons of its token and condition
    denials, and the three stats loggers join the HCM's access log. ``filter_prefixes``: the
    ``rules_stat_prefix`` of the screen, token and route RBAC filters (keys ``screen``, ``token``,
    ``route``), which name their dynamic metadata."""
    token_policies = _policy_names(hcm["http_filters"], filter_prefixes["token"])
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        authz = route.get("metadata", {}).get("filter_metadata", {}).get(METADATA_KEY)
        rbac = route.get("typed_per_filter_config", {}).get("authz.route", {}).get("rbac")
        if authz is None or rbac is None:
            continue
        names = [*token_policies, *rbac["rules"]["policies"]]
        authz["reasons"] = {_DENIED_BY_RBAC.format(name): _reason(name) for name in names}
    hcm.setdefault("access_log", []).extend(_loggers(filter_prefixes))


def _policy_names(filters: list[dict[str, Any]], prefix: str) -> list[str]:
    found = [f["typed_config"] for f in filters if f["typed_config"].get("rules_stat_prefix") == prefix]
    assert len(found) == 1, f"one RBAC filter with rules_stat_prefix {prefix!r}"
    return list(found[0]["rules"]["policies"])


def _reason(policy_name: str) -> str:
    match = _POLICY_NAME.fullmatch(policy_name)
    assert match is not None and Reason(match["reason"]), policy_name
    return match["reason"]


def _loggers(prefixes: dict[str, str]) -> list[dict[str, Any]]:
    route = f"%METADATA(ROUTE:{METADATA_KEY}:route)%"
    reasons = f"xds.route_metadata.filter_metadata['{METADATA_KEY}']['reasons']"
    passed = _logger(
        "authz.native_passes",
        _all(
            _rbac_result(prefixes["screen"], "allowed"),
            _any(
                _all(_jwt_verified(), _rbac_result(prefixes["route"], "allowed")),
                _rbac_absent(prefixes["token"]),
            ),
        ),
        decision=f"%METADATA(ROUTE:{METADATA_KEY}:decision)%",
        reason=f"%METADATA(ROUTE:{METADATA_KEY}:reason)%",
        route=route,
        status=f"%METADATA(ROUTE:{METADATA_KEY}:status)%",
    )
    screened = _logger(
        "authz.native_screen_denials",
        _rbac_result(prefixes["screen"], "denied"),
        decision="deny",
        reason=Reason.BAD_REQUEST.value,
        route="no_route",  # as the service labels a request it refuses before matching a route
        status="%RESPONSE_CODE%",
    )
    denied = _logger(
        "authz.native_denials",
        _any(_rbac_result(prefixes["token"], "denied"), _rbac_result(prefixes["route"], "denied")),
        decision="deny",
        reason=f"%CEL({reasons}[response.code_details])%",
        route=route,
        status="%RESPONSE_CODE%",
    )
    return [passed, screened, denied]


def _logger(name: str, log_filter: dict[str, Any], **tags: str) -> dict[str, Any]:
    return {
        "name": name,
        "filter": log_filter,
        "typed_config": {
            "@type": STATS_LOGGER,
            "stats_scope": {"prefix": STAT_SCOPE},
            "counters": [
                {
                    "stat": {"name": STAT_NAME, "tags": [{"name": k, "value_format": v} for k, v in tags.items()]},
                    "value_fixed": 1,
                }
            ],
        },
    }


def _all(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": list(filters)}}


def _any(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"or_filter": {"filters": list(filters)}}


def _metadata(filter_name: str, path: list[str], value: dict[str, Any], *, if_absent: bool) -> dict[str, Any]:
    """An access-log filter on dynamic metadata: ``value`` when the key is there, ``if_absent`` when
    it is not (the access log's metadata filter ignores a matcher's ``invert``)."""
    matcher = {"filter": filter_name, "path": [{"key": key} for key in path], "value": value}
    return {"metadata_filter": {"matcher": matcher, "match_if_key_not_found": if_absent}}


def _rbac_result(prefix: str, result: str) -> dict[str, Any]:
    """The RBAC filter of ``prefix`` ran and ``result`` (allowed, denied)."""
    key = f"{prefix}enforced_engine_result"
    return _metadata(RBAC_METADATA, [key], {"string_match": {"exact": result}}, if_absent=False)


def _rbac_absent(prefix: str) -> dict[str, Any]:
    """The RBAC filter of ``prefix`` did not run on this request (disabled on its route)."""
    key = f"{prefix}enforced_engine_result"
    return _metadata(RBAC_METADATA, [key], {"null_match": {}}, if_absent=True)  # a result is never null


def _jwt_verified() -> dict[str, Any]:
    """jwt_authn verified a token (its payload is in the metadata: the ext_authz filter's switch)."""
    return _metadata(JWT_AUTHN, [PAYLOAD, "iss"], {"present_match": True}, if_absent=False)
