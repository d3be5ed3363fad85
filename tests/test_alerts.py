"""Alerting rules and the Grafana dashboard, checked offline.

* ``promtool check rules`` on deploy/prometheus/alerts.yaml and on the PrometheusRule's spec, whose
  groups must equal the raw file's; ``promtool test rules`` on deploy/prometheus/alerts_test.yaml
  (synthetic series: every alert must fire in some scenario and stay quiet in another).
* deploy/grafana/authz-dashboard.json is valid, every PromQL expression parses (promtool, with the
  Grafana variables substituted) and names only metrics the service exports (the contract list,
  cross-checked against authz_service.metrics), with label values from the contract's closed sets.

promtool comes from Debian's ``prometheus`` package (``apt-get install -y --no-install-recommends
prometheus``); a missing promtool fails the test with that command, it never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "authz-dashboard.json"

# The service's metrics contract (names as exposed; histograms as their _bucket/_sum/_count series).
CONTRACT_METRICS = {
    "authz_build_info",
    "authz_check_decisions_total",
    "authz_check_duration_seconds_bucket",
    "authz_check_duration_seconds_sum",
    "authz_check_duration_seconds_count",
    "authz_jwks_refreshes_total",
    "authz_jwks_keys",
    "authz_jwks_last_success_timestamp_seconds",
    "authz_policy_reloads_total",
    "authz_policy_routes",
    "authz_policy_generation",
    "authz_policy_info",
    "authz_policy_file_refused",
    "authz_ready",
    "authz_token_cache_lookups_total",
    "authz_token_cache_entries",
    "authz_token_cache_bytes",
    "authz_token_cache_evictions_total",
    "authz_ext_authz_http_config_mismatches_total",
    "authz_native_listener_info",
    "authz_native_listener_writes_total",
    "authz_native_envoy_heap_expected_bytes",
    "authz_native_envoy_heap_needed_bytes",
    "authz_native_envoy_heap_limit_bytes",
    "authz_native_envoy_heap_cap_bytes",
    "authz_client_decisions_total",
    "authz_client_new_tokens_total",
    "authz_client_new_tokens_alert_per_minute",
    "authz_shadow_policy_reloads_total",
    "authz_shadow_policy_info",
    "authz_shadow_policy_file_refused",
    "authz_shadow_disagreements_total",
    "authz_deny_list_entries",
}
# Closed label-value sets of the contract (route and issuer come from the policy).
CONTRACT_LABEL_VALUES = {
    "decision": {"allow", "deny"},
    "reason": {"allowed", "public", "missing_token", "bad_request", "invalid_token", "expired", "not_yet_valid",
               "wrong_issuer",
               "wrong_token_use", "client_not_allowed", "unknown_key", "bad_signature", "insufficient_scope",
               "no_route", "keys_unavailable", "internal_error", "missing_scope", "client_not_allowed_for_route",
               "claim_mismatch", "param_mismatch", "deny_listed"},
    "status": {"200", "400", "401", "403", "503"},
    "trigger": {"startup", "periodic", "unknown_kid"},
    "result": {"ok", "error"},
    "problem": {"original_path_missing", "path_prefix_mismatch", "original_path_mismatch"},
    "kind": {"client_id", "jti"},
}
# The shadow policy's decision and reason (authz_shadow_disagreements_total) take the same values.
CONTRACT_LABEL_VALUES["shadow_decision"] = CONTRACT_LABEL_VALUES["decision"] | {"dry_run_deny"}
CONTRACT_LABEL_VALUES["shadow_reason"] = CONTRACT_LABEL_VALUES["reason"]
CONTRACT_LABELS = set(CONTRACT_LABEL_VALUES) | {"route", "issuer", "sha256", "le", "client", "text_value"}
# Labels Prometheus attaches to every scraped series (ServiceMonitor target labels; `app`, the protected
# app's name, is set by the relabelling of every shipped ServiceMonitor and PodMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint", "app"}
# The scrape jobs the ServiceMonitor makes (deploy/k8s/servicemonitor.yaml, and the Component's).
JOBS = {"authz-service", "authz-envoy"}
# Envoy's series the rules rely on (job authz-envoy: the envoy-health listener's /stats/prometheus),
# with the one label that picks the shipped config's ext_authz filter or authz cluster. Envoy 1.40
# exports exactly these names for envoy/envoy.yaml and envoy/envoy-http.yaml; the e2e test
# tests/e2e/test_envoy_stats_e2e.py scrapes a real Envoy to prove it.
ENVOY_SERIES = {
    "envoy_http_ext_authz_ok": ("envoy_http_conn_manager_prefix", "ingress_http"),
    "envoy_http_ext_authz_denied": ("envoy_http_conn_manager_prefix", "ingress_http"),
    "envoy_http_ext_authz_error": ("envoy_http_conn_manager_prefix", "ingress_http"),
    "envoy_http_ext_authz_failure_mode_allowed": ("envoy_http_conn_manager_prefix", "ingress_http"),
    "envoy_cluster_upstream_rq_active_overflow": ("envoy_cluster_name", "authz_service"),
    "envoy_cluster_upstream_rq_pending_overflow": ("envoy_cluster_name", "authz_service"),
    "envoy_http_downstream_rq_overload_close": ("envoy_http_conn_manager_prefix", "ingress_http"),
}
ENVOY_LABEL_VALUES = {label: {value} for label, value in ENVOY_SERIES.values()}
# Native mode's Envoy series (docs/native.md): its decisions, with the contract's labels, and the
# version of the listener it runs (label text_value: the policy's sha256; only in the xDS form,
# whose health listener exports text stats). tests/e2e/test_native_xds_e2e.py scrapes a real
# Envoy for these names.
NATIVE_ENVOY_SERIES = {"envoy_authz_native_decisions", "envoy_listener_manager_lds_version_text",
                       "envoy_listener_manager_lds_update_rejected"}
# Envoy's heap (every shipped Envoy config, every mode; series without labels of their own): the
# overload manager's fixed_heap pressure (percent of the cap), the action that answers 503 and the
# load-shed point that refuses connections, and tcmalloc's heap in use (the dashboard's). The
# e2e tests tests/e2e/test_envoy_stats_e2e.py and test_native_xds_e2e.py scrape a real Envoy of
# each shipped form for these names.
ENVOY_HEAP_SERIES = {"envoy_overload_envoy_resource_monitors_fixed_heap_pressure",
                     "envoy_overload_envoy_overload_actions_stop_accepting_requests_active",
                     "envoy_overload_envoy_load_shed_points_tcp_listener_accept_shed_load_count",
                     "envoy_server_memory_allocated"}
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://github.com/example/authz-service/blob/main/docs/runbook.md#"

REQUIRED_ALERTS = {
    "AuthzHighDenyRatio",        # high overall deny ratio
    "AuthzRouteDenySpike",       # per-route deny ratio spike
    "AuthzJwksRefreshFailing",   # JWKS refresh failures
    "AuthzJwksKeysStale",        # time() - authz_jwks_last_success_timestamp_seconds > 1h
    "AuthzJwksNoKeys",           # no keys for an issuer
    "AuthzPolicyReloadFailed",   # policy reload failures
    "AuthzNotReady",             # service not ready
}

GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$namespace": ".*",
    "$app": ".*",
    "$pod": ".*",
}


# --- helpers ----------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found; install it: apt-get install -y --no-install-recommends prometheus")
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def raw_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in raw_rules()["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels(dashboard()["panels"]) for t in p.get("targets", []) if "expr" in t]


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function and aggregation names excluded)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)                       # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                      # range / subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[\w.]+", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        token = match.group(0)
        if token in _KEYWORDS or s[match.end():].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) of every matcher inside {...}."""
    found = []
    for braces in re.findall(r"\{([^}]*)\}", expr):
        found += re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"', braces)
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {l.strip() for l in group.split(",") if l.strip()}
    return labels


def runtime_metric_names() -> set[str]:
    """Series names prometheus-client's default process/platform/GC collectors expose."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def allowed_metric_names() -> set[str]:
    runtime = {n for n in runtime_metric_names() if n.startswith(("process_", "python_"))}
    assert runtime, "prometheus-client exposes no process_/python_ series on this platform?"
    return CONTRACT_METRICS | runtime | set(ENVOY_SERIES) | NATIVE_ENVOY_SERIES | ENVOY_HEAP_SERIES | {"up"}


def check_expr_vocabulary(expr: str, where: str) -> None:
    unknown = metric_names(expr) - allowed_metric_names()
    assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)} in {expr!r}"
    known_values = {**CONTRACT_LABEL_VALUES, **ENVOY_LABEL_VALUES, "job": JOBS}
    for label, op, value in label_matchers(expr):
        assert label in CONTRACT_LABELS | TARGET_LABELS | set(ENVOY_LABEL_VALUES) | {"generation"}, \
            f"{where}: unknown label {label!r}"
        if label in known_values and op in ("=", "!="):
            assert value in known_values[label], f"{where}: {label}={value!r} is not a known value"
        if label == "job" and op == "=~" and not value.startswith("$"):  # "$job": a Grafana variable
            assert set(value.split("|")) <= JOBS, f"{where}: job=~{value!r} names an unknown job"
    unknown_labels = grouping_labels(expr) - CONTRACT_LABELS - TARGET_LABELS - set(ENVOY_LABEL_VALUES) - {"generation"}
    assert not unknown_labels, f"{where}: grouping by unknown label(s) {sorted(unknown_labels)}"


# --- the extractor itself ----------------------------------------------------------------------


def test_metric_name_extractor() -> None:
    assert metric_names('sum by (le) (rate(foo_bucket{a="b", c=~"x|y"}[5m]))') == {"foo_bucket"}
    assert metric_names("histogram_quantile(0.99, x) > 1e3 and on (job) y offset 1h") == {"x", "y"}
    assert metric_names('time() - a{issuer="q"} > 3600 unless b') == {"a", "b"}
    assert metric_names('sum without (trigger, result) (increase(c[10m])) > bool 0') == {"c"}
    assert metric_names('count(up{job="a"}) by (instance)') == {"up"}
    assert grouping_labels("sum by (a, b) (x) and on(c) y") == {"a", "b", "c"}


def test_contract_metric_names_are_what_the_service_registers() -> None:
    """The names the dashboard and the rules are checked against are the service's real families."""
    from prometheus_client import CollectorRegistry

    from authz_service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    exposed = set()
    for family in registry.collect():
        if family.type == "counter":
            exposed.add(family.name + "_total")
        elif family.type == "histogram":
            exposed |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            exposed.add(family.name)
    assert exposed == CONTRACT_METRICS


# --- rules ---------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_prometheusrule_spec_equals_raw_rules(tmp_path: Path) -> None:
    wrapped = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert wrapped["apiVersion"] == "monitoring.coreos.com/v1" and wrapped["kind"] == "PrometheusRule"
    assert wrapped["spec"]["groups"] == raw_rules()["groups"], (
        "deploy/k8s/prometheusrule.yaml spec.groups differs from deploy/prometheus/alerts.yaml"
    )
    extracted = tmp_path / "prometheusrule-spec.yaml"
    extracted.write_text(yaml.safe_dump({"groups": wrapped["spec"]["groups"]}))
    result = run_promtool("check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_required_alerts_exist_with_severity_and_text() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names), f"missing: {REQUIRED_ALERTS - set(names)}"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_envoy_series_are_selected_by_their_shipped_label() -> None:
    """An Envoy series without its label would also count other listeners' or clusters' stats."""
    for rule in alert_rules():
        for name in metric_names(rule["expr"]) & set(ENVOY_SERIES):
            label, value = ENVOY_SERIES[name]
            selectors = re.findall(rf"{name}\{{([^}}]*)\}}", rule["expr"])
            assert selectors and all(f'{label}="{value}"' in sel for sel in selectors), \
                f"{rule['alert']}: {name} without {label}={value!r}"


def test_down_and_absent_targets_and_envoy_failures_are_alerted() -> None:
    """Down means an alert: the service's own metrics vanish with it, so these cannot."""
    exprs = {r["alert"]: re.sub(r"\s+", " ", r["expr"]) for r in alert_rules()}
    def alerting(pattern: str) -> list[str]:
        return [name for name, expr in exprs.items() if re.search(pattern, expr)]
    assert alerting(r'up\{job=~"authz-service\|authz-envoy"\} == 0')
    assert alerting(r'absent\(up\{job="authz-service"\}\)') and alerting(r'absent\(up\{job="authz-envoy"\}\)')
    for name in ("envoy_http_ext_authz_error", "envoy_http_ext_authz_failure_mode_allowed",
                 "envoy_cluster_upstream_rq_active_overflow", "envoy_http_ext_authz_denied"):
        assert alerting(name), name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped, spaces to '-')."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    assert RUNBOOK.is_file(), "docs/runbook.md is missing"
    return {github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines()
            if re.match(r"#{1,6} ", line)}


def test_github_anchor() -> None:
    assert github_anchor(" AuthzHighDenyRatio") == "authzhighdenyratio"
    assert github_anchor("`missing_token`: no token") == "missing_token-no-token"
    assert github_anchor("Deny reasons (status 4xx)") == "deny-reasons-status-4xx"


def test_every_alert_links_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url == RUNBOOK_BASE + rule["alert"].lower(), f"{rule['alert']}: runbook_url {url!r}"
        assert rule["alert"].lower() in anchors, f"docs/runbook.md has no section {rule['alert']}"


def test_runbook_has_a_section_per_deny_reason() -> None:
    from authz_service.decision import REASONS

    anchors = runbook_anchors()
    deny_reasons = {reason.value for reason, outcome in REASONS.items() if outcome.http_status != 200}
    missing = sorted(r for r in deny_reasons if r not in anchors)
    assert not missing, f"docs/runbook.md has no section for deny reason(s) {missing}"


def test_stale_keys_alert_uses_the_last_success_timestamp() -> None:
    (stale,) = [r for r in alert_rules() if r["alert"] == "AuthzJwksKeysStale"]
    assert re.search(r"time\(\)\s*-\s*authz_jwks_last_success_timestamp_seconds\s*>\s*3600", stale["expr"])


def test_rules_use_only_contract_metrics_and_labels() -> None:
    for rule in alert_rules():
        check_expr_vocabulary(rule["expr"], rule["alert"])


def test_service_level_alerts_aggregate_per_app() -> None:
    """Two apps in one namespace never share an alert: every aggregation that keeps the namespace
    keeps the app too (per-Pod alerts keep every target label, app included)."""
    for rule in alert_rules():
        for group in re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in group.split(",")}
            if "namespace" in labels:
                assert "app" in labels, f"{rule['alert']}: by ({group}) mixes the apps of a namespace"


def test_every_service_level_alert_is_tested_with_two_apps_in_one_namespace() -> None:
    """An alert that sums over Pods must fire for one app of a namespace while another is healthy."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    proven = set()
    for group in tests["tests"]:
        apps: dict[str, set[str]] = {}
        for series in group["input_series"]:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', series["series"]))
            if "app" in labels:
                apps.setdefault(labels["namespace"], set()).add(labels["app"])
        if not any(len(names) > 1 for names in apps.values()):
            continue
        for case in group["alert_rule_test"]:
            if any("app" in alert["exp_labels"] for alert in case.get("exp_alerts") or []):
                proven.add(case["alertname"])
    service_level = {r["alert"] for r in alert_rules() if re.search(r"\bby\s*\([^)]*\bnamespace\b", r["expr"])}
    assert service_level >= {"AuthzHighDenyRatio", "AuthzRouteDenySpike", "AuthzChecksFailingClosed",
                             "AuthzNoReadyInstance"}
    assert service_level - proven == set(), f"no two-apps scenario fires {sorted(service_level - proven)}"


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """Each alert has a scenario where it MUST fire and one where it MUST stay quiet."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    every = {r["alert"] for r in alert_rules()}
    assert every - fires == set(), f"never expected to fire: {sorted(every - fires)}"
    assert every - quiet == set(), f"never expected to stay quiet: {sorted(every - quiet)}"
    normal = [g for g in tests["tests"] if g["name"] == "normal traffic stays quiet"]
    assert normal, "the normal-traffic scenario is missing"
    assert {c["alertname"] for c in normal[0]["alert_rule_test"] if not c.get("exp_alerts")} == every


# --- dashboard -----------------------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = list(dashboard_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_uses_only_contract_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        check_expr_vocabulary(expr, "dashboard")
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+)(\{.*\})?,\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query!r}"
        assert match.group(1) in allowed_metric_names(), query
        assert match.group(3) in TARGET_LABELS, query


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) once Grafana's variables are substituted."""
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_tells_apps_apart() -> None:
    """An app variable (the target label app) that every query selects by, as it does by namespace."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["app"]["query"]["query"] == 'label_values(authz_ready{job=~"$job", namespace=~"$namespace"}, app)'
    assert 'app=~"$app"' in variables["pod"]["query"]["query"]
    for expr in dashboard_exprs():
        assert 'app=~"$app"' in expr, expr


def test_dashboard_has_the_required_views() -> None:
    exprs = [re.sub(r"\s+", " ", e) for e in dashboard_exprs()]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"sum by \(decision, reason\) \(rate\(authz_check_decisions_total"), "decisions/s by decision+reason"
    assert has(r'sum by \(route\) \(rate\(authz_check_decisions_total\{[^}]*decision="deny"[^}]*\}.*\) / '
               r"sum by \(route\) \(rate\(authz_check_decisions_total"), "deny ratio per route"
    for quantile in ("0.50", "0.90", "0.99"):
        assert has(rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\(authz_check_duration_seconds_bucket"), quantile
    assert has(r"time\(\) - authz_jwks_last_success_timestamp_seconds"), "JWKS key age per issuer"
    assert has(r"authz_policy_generation"), "policy generation"
    assert has(r"authz_policy_reloads_total"), "policy reload errors"
    assert has(r"authz_policy_file_refused"), "a policy file refused now"
    assert has(r"sum by \(client, decision\) \(rate\(authz_client_decisions_total"), "decisions per client"
    assert has(r"max by \(client\) \(rate\(authz_client_new_tokens_total"), "new tokens per client"
    assert has(r"max by \(pod\) \(envoy_overload_envoy_resource_monitors_fixed_heap_pressure"), "Envoy heap pressure"
    for gauge in ("needed", "expected", "limit", "cap"):
        assert has(rf"authz_native_envoy_heap_{gauge}_bytes"), f"native mode's expected Envoy heap: {gauge}"


def test_the_new_tokens_panel_draws_the_alerts_threshold_over_the_alerts_window() -> None:
    """The dashboard shows what AuthzClientMintingTokens evaluates: the same rate and window, and the
    threshold each app's service exports (--new-tokens-alert-per-minute), not a number of its own."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "AuthzClientMintingTokens"]
    expr = " ".join(rule["expr"].split())
    alert = re.fullmatch(r"max by \(namespace, job, app, client\) \(rate\(authz_client_new_tokens_total\[(\w+)\]\)\) "
                         r"\* 60 > on \(namespace, job, app\) group_left \(\) "
                         r"max by \(namespace, job, app\) \(authz_client_new_tokens_alert_per_minute\)", expr)
    assert alert, expr
    (panel,) = [p for p in dashboard_panels(dashboard()["panels"])
                if any("authz_client_new_tokens_total" in t.get("expr", "") for t in p.get("targets", []))]
    rate, threshold = panel["targets"]
    assert f"[{alert.group(1)}])) * 60" in rate["expr"]
    assert threshold["expr"].startswith("max(authz_client_new_tokens_alert_per_minute{")
    assert "thresholds" not in panel["fieldConfig"]["defaults"]  # no fixed line that could disagree



def test_the_contract_reasons_are_exactly_the_services_reasons():
    """Every reason label the service can emit (decision.Reason) is one alerts and dashboards may use."""
    from authz_service.decision import Reason

    assert CONTRACT_LABEL_VALUES["reason"] == {r.value for r in Reason}


def test_the_deny_ratio_alert_names_every_403_reason():
    """The AuthzHighDenyRatio description is the operator's map from reason to cause: it must know
    every reason a 403 can carry."""
    from authz_service.decision import REASONS

    (rule,) = [r for r in alert_rules() if r["alert"] == "AuthzHighDenyRatio"]
    text = " ".join(rule["annotations"]["description"].split())
    for reason, outcome in REASONS.items():
        if outcome.http_status == 403 and reason.value != "no_route":  # no_route: AuthzRouteDenySpike's note
            assert reason.value in text, reason


# --- Envoy's heap: the rules and the shipped configs agree -------------------------------------------


def shipped_overload_configs() -> dict[str, dict[str, Any]]:
    """Every Envoy config the repository ships with an overload manager (each mode's, the k8s and
    kustomize copies, native mode's bootstrap and what its compiler emits)."""
    from authz_service.native.bootstrap import compile_policy
    from authz_service.policy import load_policy_file

    found: dict[str, dict[str, Any]] = {}
    paths = [*ROOT.glob("envoy/**/*.yaml"), *ROOT.glob("deploy/**/*.yaml"), ROOT / "authz_service/native/envoy.yaml"]
    for path in sorted(paths):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "overload_manager" in doc:
                found[str(path.relative_to(ROOT))] = doc
    example = ROOT / "authz_service" / "examples" / "policy.yaml"
    found["compile envoy"] = compile_policy(load_policy_file(example)).bootstrap()
    return found


def heap_thresholds(config: dict[str, Any]) -> dict[str, float]:
    """Percent of the fixed_heap cap at which each overload action or load-shed point on it starts."""
    from authz_service.native.sizing import HEAP_MONITOR

    manager = config["overload_manager"]
    out = {}
    for entry in [*manager.get("actions", []), *manager.get("loadshed_points", [])]:
        for trigger in entry["triggers"]:
            if trigger["name"] == HEAP_MONITOR:
                value = trigger["threshold"]["value"] if "threshold" in trigger else trigger["scaled"]["scaling_threshold"]
                out[entry["name"].rsplit(".", 1)[1]] = round(value * 100)
    return out


def test_the_heap_alerts_thresholds_are_the_shipped_configs() -> None:
    """AuthzEnvoyHeapPressure warns below the first overload action of every shipped config; the
    shedding alert is about the action and load-shed point that refuse at the top; the figures the
    alerts and the runbook state are the configs'."""
    from authz_service.native.sizing import heap_cap

    configs = shipped_overload_configs()
    assert {"envoy/envoy.yaml", "envoy/envoy-http.yaml", "deploy/k8s/envoy.yaml", "deploy/k8s/native/envoy.yaml",
            "deploy/components/authz-sidecar/envoy-native.yaml", "authz_service/native/envoy.yaml",
            "compile envoy"} <= set(configs)
    thresholds = {name: heap_thresholds(config) for name, config in configs.items()}
    (shipped,) = {tuple(sorted(t.items())) for t in thresholds.values()}  # one set of figures everywhere
    figures = dict(shipped)
    first = {round(heap_cap(config)[1] * 100) for config in configs.values()}
    assert first == {min(figures.values())} == {figures["reduce_timeouts"]}
    stop = figures["stop_accepting_requests"]
    assert figures["tcp_listener_accept"] == stop == max(figures.values())

    rules = {r["alert"]: r for r in alert_rules()}
    pressure, shedding = rules["AuthzEnvoyHeapPressure"], rules["AuthzEnvoyHeapShedding"]
    warn = int(re.fullmatch(r'envoy_overload_envoy_resource_monitors_fixed_heap_pressure\{job="authz-envoy"\} >= (\d+)',
                            pressure["expr"].strip()).group(1))
    assert warn < min(first)
    dark = re.search(r'last_over_time\(envoy_overload_envoy_resource_monitors_fixed_heap_pressure\{job="authz-envoy"\}\[\w+\]\) >= (\d+)',
                     shedding["expr"])
    assert dark and int(dark.group(1)) == warn
    assert 'stop_accepting_requests_active{job="authz-envoy"} == 1' in shedding["expr"]
    assert "tcp_listener_accept_shed_load_count" in shedding["expr"]

    said = " ".join(pressure["annotations"]["description"].split())
    assert f"From {figures['reduce_timeouts']}%" in said and f"from {figures['reset_high_memory_stream']}%" in said
    assert f"at {stop}%" in said
    said = " ".join(shedding["annotations"]["description"].split())
    assert f"reached {stop}%" in said and f"at {warn}% or more" in said
    runbook = " ".join(RUNBOOK.read_text().split())
    section = runbook[runbook.index("### AuthzEnvoyHeapPressure"):runbook.index("### AuthzEnvoyHeapShedding")]
    for figure in (warn, figures["reduce_timeouts"], figures["reset_high_memory_stream"],
                   figures["disable_http_keepalive"], stop):
        assert f"{figure}%" in section, figure
    section = runbook[runbook.index("### AuthzEnvoyHeapShedding"):runbook.index("### AuthzNativePolicySkew")]
    assert f"{stop}%" in section and f"{warn}%" in section


def test_the_heap_panel_draws_the_alerts_and_the_configs_thresholds() -> None:
    """The pressure panel's lines are the warning's threshold and the shipped configs' first overload
    action and refusal point, not numbers of its own."""
    (panel,) = [p for p in dashboard_panels(dashboard()["panels"])
                if any("fixed_heap_pressure" in t.get("expr", "") for t in p.get("targets", []))]
    lines = [step["value"] for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if step["value"] is not None]
    (rule,) = [r for r in alert_rules() if r["alert"] == "AuthzEnvoyHeapPressure"]
    warn = int(rule["expr"].split(">=")[1])
    (figures,) = {tuple(sorted(heap_thresholds(c).items())) for c in shipped_overload_configs().values()}
    assert lines == [warn, min(dict(figures).values()), dict(figures)["stop_accepting_requests"]]
    text = " ".join(panel["description"].split())
    assert all(f"{line}%" in text for line in lines)
