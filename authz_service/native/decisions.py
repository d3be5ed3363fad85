"""Native decisions as Envoy stats, with the service's labels: ``envoy_authz_native_decisions``
``{decision, reason, route, status}`` counts what ``authz_check_decisions_total`` would have
counted for each request Envoy decided itself (the service counts the rest, which it decides).

How, at what cost: Envoy's stats access logger (``envoy.access_loggers.stats``) adds one to a
counter whose tags are read from the matched route's metadata (its policy route name, and what
passing every native check there means: allowed, public, or no_route) and, for a denial, from
the RBAC filters' dynamic metadata (which filter decided) and the response code. Five loggers,
each behind an access-log filter that only looks up dynamic metadata (a few map lookups), so an
allowed request costs no expression evaluation; only a token or route denial evaluates one CEL
lookup (its reason, from a table in the listener's metadata keyed by the denying RBAC policy, one
for every route). What
a request costs is mostly its labels (each a formatted value, then the counter looked up by all
of them), so the common case, allowed on a native route, reads only its route from the metadata
(bench/native_costs.py --instructions measures it).

Which requests are native decisions (the filters below):

* native allows: on a native route, jwt_authn verified the token and the RBAC checks
  (``authz.shared``, then the route's: ``authz.rbac``) allowed it (then ext_authz does not run:
  bootstrap.py);
* screen passes: on a public route or no route (a direct 403), the request screen
  (``authz.screen``, the only RBAC filter there) let it through;
* screen denials: 400 ``bad_request`` (the screen's, or the same checks first among the shared
  checks of a native route), labelled ``no_route`` as the service labels a request it refuses before matching a route;
* token or route-condition denials: 401/403 with the denying policy's reason, labelled with the
  route's policy route, or, when a check of the second route a path ending in '/' must meet denied
  (its policy name carries answers.OTHER_ROUTE_MARK), with that route (routes.py).

A request the service decided (a route it decides, a token jwt_authn could not verify, the
request screen's routes) matches none of them: it is in ``authz_check_decisions_total``.

Every tag value comes from the compiled configuration (route names, reasons, the status of an
answer), never from the request, so a client cannot create series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..decision import REASONS, Reason
from .answers import OTHER_ROUTE_MARK, status_filter
from .cel import JWT_AUTHN
from .checks import VERIFIED_PATH

STATS_LOGGER = "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config"
STAT_SCOPE, STAT_NAME = "authz", "native_decisions"  # Prometheus: envoy_authz_native_decisions
RBAC_METADATA = "envoy.filters.http.rbac"
METADATA_KEY = "authz"  # the routes' filter_metadata namespace
OTHER_ROUTE_KEY = "other_route"  # the label of a denial by the other route's checks (route_metadata)
_POLICY_NAME = re.compile(rf"\d{{3,}}{OTHER_ROUTE_MARK}?-(?P<reason>[a-z_]+)-a\d+")  # answers.AnswerBook.policy_name
_DENIED_BY_RBAC = "rbac_access_denied_matched_policy[{}]"  # answers.RBAC_DENIED


def route_metadata(route: str, reason: Reason, other_route: str | None = None) -> dict[str, Any]:
    """A route's metadata: its policy route name and what a request that passes every native check
    there is (``reason``: allowed, public, or no_route); ``other_route``: the label of a denial by a
    check of the second route the request must meet (routes.py)."""
    outcome = REASONS[reason]
    decision = "allow" if outcome.http_status == 200 else "deny"
    labels = {"route": route, "decision": decision, "reason": reason.value, "status": str(outcome.http_status)}
    if other_route is not None:
        labels[OTHER_ROUTE_KEY] = other_route
    return {"filter_metadata": {METADATA_KEY: labels}}


def add_decision_stats(listener: dict[str, Any], hcm: dict[str, Any], prefixes: RbacPrefixes) -> None:
    """Count native decisions: the listener learns the reason of every native denial (keyed by
    what RBAC reports, once for every route), and the stats loggers join the HCM's access log."""
    reasons: dict[str, str] = {}
    for rbac_filter in hcm["http_filters"]:
        if rbac_filter["name"] == prefixes.shared_filter:
            reasons.update(_reasons(rbac_filter["typed_config"]["rules"]))
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        rbac = route.get("typed_per_filter_config", {}).get(prefixes.native_filter, {}).get("rbac")
        if rbac is not None:
            reasons.update(_reasons(rbac["rules"]))
    listener.setdefault("metadata", {}).setdefault("filter_metadata", {})[METADATA_KEY] = {"reasons": reasons}
    hcm.setdefault("access_log", []).extend(_loggers(prefixes))


@dataclass(frozen=True, slots=True)
class RbacPrefixes:
    """The native RBAC filters' names and ``rules_stat_prefix`` (which names a filter's dynamic
    metadata): the request screen's (public routes, no route), the checks every native route
    shares, the native route's own."""

    screen: str
    shared: str
    shared_filter: str
    native: str
    native_filter: str


def _reasons(rbac_rules: dict[str, Any]) -> dict[str, str]:
    """What RBAC reports of a denial by each of these rules (response.code_details): its reason."""
    return {_DENIED_BY_RBAC.format(name): _reason(name) for name in rbac_rules["policies"]}


def _reason(policy_name: str) -> str:
    match = _POLICY_NAME.fullmatch(policy_name)
    assert match is not None and Reason(match["reason"]), policy_name
    return match["reason"]


def _loggers(prefixes: RbacPrefixes) -> list[dict[str, Any]]:
    screen, shared, native = prefixes.screen, prefixes.shared, prefixes.native
    route = f"%METADATA(ROUTE:{METADATA_KEY}:route)%"
    reasons = f"xds.listener_metadata.filter_metadata['{METADATA_KEY}']['reasons']"
    # A native route's shared checks begin with the request screen's: its 400s are the screen's.
    bad_request = REASONS[Reason.BAD_REQUEST].http_status
    # The common case, a request allowed on a native route, gets its own logger whose labels other
    # than the route are fixed text: every native route's metadata says allowed (route_metadata),
    # and a route metadata lookup costs Envoy about as much per label as the stat lookup itself.
    # (The route's checks run only once the shared ones allowed.)
    allowed = REASONS[Reason.ALLOWED]
    native_allows = _logger(
        "authz.native_allows",
        _all(_jwt_verified(), _rbac_result(native, "allowed")),
        decision="allow",
        reason=Reason.ALLOWED.value,
        route=route,
        status=str(allowed.http_status),
    )
    # The request screen's RBAC filter runs only on public routes and no route: what passing it
    # means (public, no_route) is in the route's metadata.
    screen_passes = _logger(
        "authz.screen_passes",
        _rbac_result(screen, "allowed"),
        decision=f"%METADATA(ROUTE:{METADATA_KEY}:decision)%",
        reason=f"%METADATA(ROUTE:{METADATA_KEY}:reason)%",
        route=route,
        status=f"%METADATA(ROUTE:{METADATA_KEY}:status)%",
    )
    screened = _logger(
        "authz.native_screen_denials",
        _any(_rbac_result(screen, "denied"), _all(_rbac_result(shared, "denied"), _status("EQ", bad_request))),
        decision="deny",
        reason=Reason.BAD_REQUEST.value,
        route="no_route",  # as the service labels a request it refuses before matching a route
        status="%RESPONSE_CODE%",
    )
    not_bad_request = _any(_status("LE", bad_request - 1), _status("GE", bad_request + 1))
    denied = _logger(
        "authz.native_denials",
        _any(
            _all(_rbac_result(shared, "denied"), not_bad_request),
            _all(_rbac_result(native, "denied"), _denied_by(native, other_route=False)),
        ),
        decision="deny",
        reason=f"%CEL({reasons}[response.code_details])%",
        route=route,
        status="%RESPONSE_CODE%",
    )
    # A denial by a check of the second route a path ending in '/' must meet: labelled with it.
    denied_by_other_route = _logger(
        "authz.native_other_route_denials",
        _all(_rbac_result(native, "denied"), _denied_by(native, other_route=True)),
        decision="deny",
        reason=f"%CEL({reasons}[response.code_details])%",
        route=f"%METADATA(ROUTE:{METADATA_KEY}:{OTHER_ROUTE_KEY})%",
        status="%RESPONSE_CODE%",
    )
    return [native_allows, screen_passes, screened, denied, denied_by_other_route]


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


def _denied_by(prefix: str, *, other_route: bool) -> dict[str, Any]:
    """The RBAC filter of ``prefix`` denied by a check of the request's other route (or not):
    the check's name, in the filter's dynamic metadata, carries the mark (answers.AnswerBook)."""
    key = f"{prefix}enforced_effective_policy_id"
    regex = f"\\d{{3,}}{OTHER_ROUTE_MARK if other_route else ''}-.*"
    return _metadata(RBAC_METADATA, [key], {"string_match": {"safe_regex": {"regex": regex}}}, if_absent=False)


def _status(op: str, value: int) -> dict[str, Any]:
    return status_filter(op, value, f"access_log.authz_native_status_{op.lower()}_{value}")


def _jwt_verified() -> dict[str, Any]:
    """jwt_authn verified a token (its payload is in the metadata: the ext_authz filter's switch)."""
    return _metadata(JWT_AUTHN, list(VERIFIED_PATH), {"present_match": True}, if_absent=False)
