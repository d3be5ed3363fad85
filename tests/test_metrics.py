"""metrics.PerCheck: per-Check counts kept in plain Python must read exactly as direct updates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

import platform

import grpc
import yaml

import authz_service
from authz_service.metrics import LATENCY_BUCKETS, Metrics, PerCheck

ENVOY_CONFIG = Path(__file__).resolve().parents[1] / "envoy" / "envoy.yaml"

KEYS = [("allow", "allowed", "get-transaction", 200, "client-a"), ("deny", "missing_token", "get-transaction", 401, ""),
        ("deny", "no_route", "no_route", 403, ""), ("dry_run_deny", "expired", "reports", 401, ""),
        ("allow", "allowed", "get-transaction", 200, "other"), ("deny", "insufficient_scope", "reports", 403, "other"),
        ("dry_run_deny", "insufficient_scope", "reports", 403, "client-a")]


def exposition(registry: CollectorRegistry) -> list[str]:
    return generate_latest(registry).decode().splitlines()


def direct(metrics: Metrics, checks: list[tuple[tuple[str, str, str, int, str], float]], hits: int, misses: int,
           new_tokens: list[str] = ()) -> None:
    """The reference: one prometheus-client update per event, as the service did before PerCheck."""
    for (kind, reason, route, status, client), seconds in checks:
        metrics.decisions.labels(kind, reason, route, str(status)).inc()
        if client:
            metrics.client_decisions.labels(client, kind).inc()
        metrics.check_duration.observe(seconds)
    for client in new_tokens:
        metrics.client_new_tokens.labels(client).inc()
    metrics.token_cache_lookups.labels("hit").inc(hits)
    metrics.token_cache_lookups.labels("miss").inc(misses)


@settings(max_examples=60, deadline=None)
@given(checks=st.lists(st.tuples(st.sampled_from(KEYS), st.floats(0, 2, allow_nan=False)), max_size=300),
       hits=st.integers(0, 50), misses=st.integers(0, 50), scrapes=st.integers(0, 3),
       new_tokens=st.lists(st.sampled_from(["client-a", "other"]), max_size=20))
def test_batched_counts_read_exactly_as_direct_updates(checks, hits, misses, scrapes, new_tokens):
    batched, reference = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    cut = sorted(random.Random(len(checks)).sample(range(len(checks) + 1), min(scrapes, len(checks) + 1)))
    for i, (key, seconds) in enumerate(checks):
        if i in cut:
            generate_latest(batched.registry)  # a scrape in the middle flushes what is pending so far
        batched.per_check.check(key, seconds)
    for client in new_tokens:
        batched.per_check.new_token(client)
    batched.per_check.cache_hits += hits
    batched.per_check.cache_misses += misses
    direct(reference, checks, hits, misses, new_tokens)
    assert exposition(batched.registry) == exposition(reference.registry)


def test_get_sample_value_sees_pending_counts():
    metrics = Metrics(CollectorRegistry())
    metrics.per_check.check(KEYS[1], 0.00003)
    metrics.per_check.cache_hits += 2
    labels = {"decision": "deny", "reason": "missing_token", "route": "get-transaction", "status": "401"}
    assert metrics.registry.get_sample_value("authz_check_decisions_total", labels) == 1
    assert metrics.registry.get_sample_value("authz_check_duration_seconds_bucket", {"le": "5e-05"}) == 1
    assert metrics.registry.get_sample_value("authz_token_cache_lookups_total", {"result": "hit"}) == 2
    # Flushed once: reading again adds nothing.
    assert metrics.registry.get_sample_value("authz_check_decisions_total", labels) == 1


def test_pending_durations_are_bounded():
    metrics = Metrics(CollectorRegistry())
    for _ in range(PerCheck.MAX_PENDING * 2 + 5):
        metrics.per_check.check(KEYS[0], 0.001)
    assert len(metrics.per_check.durations) == 5  # flushed twice on the way, no scrape needed
    total = PerCheck.MAX_PENDING * 2 + 5
    assert metrics.registry.get_sample_value("authz_check_duration_seconds_count") == total
    assert metrics.registry.get_sample_value("authz_check_duration_seconds_sum") == pytest.approx(total * 0.001)


def test_series_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(PerCheck, "MAX_SERIES", 3)
    metrics = Metrics(CollectorRegistry())
    for i in range(10):
        metrics.per_check.check(("allow", "allowed", f"route-{i}", 200, "client-a"), 0.0)
        metrics.per_check.flush()
        assert len(metrics.per_check._series) <= 3  # noqa: SLF001
    for i in range(10):
        labels = {"decision": "allow", "reason": "allowed", "route": f"route-{i}", "status": "200"}
        assert metrics.registry.get_sample_value("authz_check_decisions_total", labels) == 1


def test_no_created_series_are_exported():
    """Counters and histograms would each add a ``*_created`` series nothing reads."""
    metrics = Metrics(CollectorRegistry())
    metrics.per_check.check(KEYS[0], 0.001)
    metrics.policy_loaded(3, "ab" * 32)
    body = generate_latest(metrics.registry).decode()
    assert "authz_check_decisions_total{" in body and "authz_check_duration_seconds_count" in body
    assert "_created" not in body


def test_client_series_exist_only_for_verified_clients():
    """No verified token, no client: a Check without one counts in the decisions only."""
    metrics = Metrics(CollectorRegistry())
    for key in KEYS[:3]:
        metrics.per_check.check(key, 0.001)
    clients = [s.labels for f in metrics.registry.collect() if f.name == "authz_client_decisions" for s in f.samples]
    assert clients == [{"client": "client-a", "decision": "allow"}]


def test_build_info_names_this_build():
    metrics = Metrics(CollectorRegistry())
    labels = {"version": authz_service.__version__, "python": platform.python_version(), "grpc": grpc.__version__}
    assert metrics.registry.get_sample_value("authz_build_info", labels) == 1
    assert metrics.build_info._multiprocess_mode == "livemax"  # --workers: one series, not one per worker pid


def _check_timeouts(node: object) -> list[str]:
    """The ``timeout`` of every ext_authz filter's grpc_service in an Envoy config."""
    if isinstance(node, list):
        return [t for value in node for t in _check_timeouts(value)]
    if not isinstance(node, dict):
        return []
    found = [t for value in node.values() for t in _check_timeouts(value)]
    if node.get("name") == "envoy.filters.http.ext_authz" and "timeout" in node["typed_config"].get("grpc_service", {}):
        found.append(node["typed_config"]["grpc_service"]["timeout"])
    return found


def test_latency_buckets_reach_past_envoys_check_timeout():
    """A Check slower than Envoy waits for must land in a bucket of its own, not only in +Inf."""
    timeouts = _check_timeouts(yaml.safe_load(ENVOY_CONFIG.read_text()))
    assert timeouts, "no ext_authz timeout found in envoy/envoy.yaml"
    longest = max(float(t.removesuffix("s")) for t in timeouts)
    assert max(LATENCY_BUCKETS) > longest
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def refused(metrics: Metrics) -> dict[str, float]:
    return {s.labels["sha256"]: s.value for f in metrics.registry.collect()
            if f.name == "authz_policy_file_refused" for s in f.samples}


def test_policy_file_refused_is_one_series_at_a_time():
    """0 (no hash) from start-up, so an alert sees the first refusal; 1 with the refused content's
    hash while refused (1 without a hash for an unreadable file); back to 0 once fixed."""
    metrics = Metrics(CollectorRegistry())
    assert refused(metrics) == {"": 0}
    metrics.policy_file_refused("ab" * 32)
    assert refused(metrics) == {"ab" * 32: 1}
    metrics.policy_file_refused("cd" * 32)
    assert refused(metrics) == {"cd" * 32: 1}
    metrics.policy_file_accepted()
    assert refused(metrics) == {"": 0}
    metrics.policy_file_refused(None)
    assert refused(metrics) == {"": 1}
    # --workers: the parent shows the worst worker (any worker refusing the file), per hash.
    assert metrics.policy_file_refused_state._multiprocess_mode == "livemax"  # noqa: SLF001


def test_the_deny_list_gauge_follows_the_policy_serving_now():
    metrics = Metrics(CollectorRegistry())
    metrics.policy_loaded(3, "ab" * 32, deny_client_ids=2, deny_jtis=5)

    def entries(kind: str) -> float | None:
        return metrics.registry.get_sample_value("authz_deny_list_entries", {"kind": kind})

    assert (entries("client_id"), entries("jti")) == (2, 5)
    metrics.policy_loaded(3, "cd" * 32)  # the incident is over: the entries were removed
    assert (entries("client_id"), entries("jti")) == (0, 0)


def test_native_mode_s_series_exist_only_in_native_mode():
    """Outside native mode no authz_native_* sample is exported (a 0 would read as a policy that
    needs no heap); in native mode the heap gauges follow the listener written, one policy at a time."""
    metrics = Metrics(CollectorRegistry())
    assert not [line for line in exposition(metrics.registry) if line.startswith("authz_native_")]
    heap = {"expected_bytes": 12, "needed_bytes": 14, "limit_bytes": 80, "cap_bytes": 100, "fits": True}
    metrics.native_listener_written("ab" * 32, heap)
    metrics.native_listener_written("cd" * 32, {**heap, "expected_bytes": 13})
    samples = {(s.name, s.labels["sha256"]): s.value for family in metrics.registry.collect()
               for s in family.samples if s.name.startswith("authz_native_envoy_heap_")}
    assert samples == {("authz_native_envoy_heap_expected_bytes", "cd" * 32): 13,
                       ("authz_native_envoy_heap_needed_bytes", "cd" * 32): 14,
                       ("authz_native_envoy_heap_limit_bytes", "cd" * 32): 80,
                       ("authz_native_envoy_heap_cap_bytes", "cd" * 32): 100}
