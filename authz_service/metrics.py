"""Prometheus metrics.

Gauges name a ``multiprocess_mode`` for ``--workers N`` (prometheus-client multiprocess mode, one
view over all workers): ``livemin`` where the worst worker matters (ready, keys, key age),
``livesum`` for totals (token cache), ``livemax`` for the policy serving, a refused policy file (any
worker refusing it) and the build info.

No ``*_created`` series: each counter and histogram would carry one more series holding its
creation time, which nothing here reads (Prometheus ignores it unless created-timestamp ingestion
is switched on, and our rates start from the counters created at 0). Multiprocess mode never
exports them; this module turns them off for the single process too, in every process that
builds our metrics (workers are spawned interpreters, so they run this import as well).

Every label value comes from a closed set (decision, reason, status) or from the loaded
configuration (route names, issuer pool ids, the client ids the policy names: any other client is
``other``), never from the request, so a client sending random paths or tokens cannot create new
series.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.registry import Collector

from . import __version__

disable_created_metrics()

PREFIX = "authz"
# One Check's labels: (decision, reason, route, status, client); client is the policy's label of the
# verified token's client (Policy.client_label), "" when no token was verified.
CheckKey = tuple[str, str, str, int, str]

# 10 us .. 5 s: a warm Check takes tens of microseconds, a Check waiting on a JWKS fetch up to
# seconds, and Envoy gives up on a Check after 4 s (envoy/envoy.yaml); 2.5 and 5 s tell a slow
# answer from one Envoy no longer waited for.
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Metrics:
    """The service's metric families, registered on one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Registered first, so every collection (a scrape, get_sample_value) applies the counts
        # still pending in ``per_check`` before any of our metrics is read.
        registry.register(_FlushBeforeCollect(self))
        self.decisions = Counter(
            f"{PREFIX}_check_decisions",
            "Check results by decision (allow/deny), reason, policy route name and HTTP status.",
            ["decision", "reason", "route", "status"],
            registry=registry,
        )
        self.check_duration = Histogram(
            f"{PREFIX}_check_duration_seconds",
            "Time to answer one Check, from request received to response built.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.jwks_refreshes = Counter(
            f"{PREFIX}_jwks_refreshes",
            "JWKS fetches by issuer pool id, trigger (startup/periodic/unknown_kid) and result (ok/error).",
            ["issuer", "trigger", "result"],
            registry=registry,
        )
        self.jwks_keys = Gauge(
            f"{PREFIX}_jwks_keys",
            "Usable RS256 signing keys currently loaded per issuer pool id.",
            ["issuer"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.jwks_last_success = Gauge(
            f"{PREFIX}_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS fetch per issuer (key age = time() - this).",
            ["issuer"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads",
            "Policy file loads by result (ok/error); an error keeps the previous policy serving.",
            ["result"],
            registry=registry,
        )
        self.policy_routes = Gauge(
            f"{PREFIX}_policy_routes",
            "Routes in the policy currently serving.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.policy_generation = Gauge(
            f"{PREFIX}_policy_generation",
            "Increments each time a new policy starts serving.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.policy_info = Gauge(
            f"{PREFIX}_policy_info",
            "Always 1; the sha256 label identifies the policy file content serving now.",
            ["sha256"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        # Named *_state in Python: ``policy_file_refused`` is the method that sets it.
        self.policy_file_refused_state = Gauge(
            f"{PREFIX}_policy_file_refused",
            "1 while the policy file on disk is refused (the previous policy keeps serving; a process "
            "starting now would not start), with the refused content's sha256 (empty: unreadable); else 0.",
            ["sha256"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.policy_file_refused_state.labels("").set(0)  # exists at 0 from start-up
        # Which entries the policy serving now refuses: an incident's deny-list change is
        # confirmed here (the hits are authz_check_decisions_total{reason="deny_listed"}).
        self.deny_list_entries = Gauge(
            f"{PREFIX}_deny_list_entries",
            "Entries of the deny section of the policy serving now, by kind (client_id, jti).",
            ["kind"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 when a policy is loaded and every issuer has signing keys, else 0.",
            multiprocess_mode="livemin",
            registry=registry,
        )

        self.token_cache_lookups = Counter(
            f"{PREFIX}_token_cache_lookups",
            "Verified-token cache lookups by result (hit/miss); hit rate = rate(hit) / rate(all).",
            ["result"],
            registry=registry,
        )
        self.token_cache_entries = Gauge(
            f"{PREFIX}_token_cache_entries",
            "Verified tokens held in the cache (bounded by --token-cache-size).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.token_cache_bytes = Gauge(
            f"{PREFIX}_token_cache_bytes",
            "Approximate bytes held by the verified-token cache (bounded by --token-cache-max-bytes).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.token_cache_evictions = Counter(
            f"{PREFIX}_token_cache_evictions",
            "Entries dropped from the verified-token cache by reason (capacity, expired, key_removed).",
            ["reason"],
            registry=registry,
        )

        for result in ("hit", "miss"):
            self.token_cache_lookups.labels(result)
        for reason in ("capacity", "expired", "key_removed"):
            self.token_cache_evictions.labels(reason)
        for result in ("ok", "error"):  # exist at 0 from the start, so increase() sees the first error
            self.policy_reloads.labels(result)
        # Only in HTTP mode (its series are created with the HTTP front door, see http_door_enabled).
        self.http_config_mismatches = Counter(
            f"{PREFIX}_ext_authz_http_config_mismatches",
            "HTTP ext_authz requests refused because Envoy's http_service does not match this service, by "
            "problem (original_path_missing, path_prefix_mismatch, original_path_mismatch): a configuration "
            "error; each such request is denied (400).",
            ["problem"],
            registry=registry,
        )
        # Native mode only (its series are created with it, see native_enabled).
        self.native_listener_info = Gauge(
            f"{PREFIX}_native_listener_info",
            "Native mode: always 1; the sha256 label names the policy whose compiled Envoy listener was last "
            "written into the xDS directory (Envoy names the one it loaded: listener_manager.lds.version_text).",
            ["sha256"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        # Envoy's heap on the listener last written (native/sizing.py's HeapBudget, as /readyz's
        # envoy_heap): the alert compares needed with limit exactly as a reload's refusal does, so it
        # fires while the policy still fits, before the next growth is refused.
        self.native_envoy_heap = {
            field: Gauge(
                f"{PREFIX}_native_envoy_heap_{field}_bytes",
                f"Native mode, bytes: {text} (label sha256: the policy of the listener last written).",
                ["sha256"],
                multiprocess_mode="livemax",
                registry=registry,
            )
            for field, text in (
                ("expected", "Envoy's expected heap at rest on the compiled listener"),
                ("needed", "Envoy's expected heap while a policy change holds the old listener beside this one"),
                (
                    "limit",
                    "the heap a policy may need: where Envoy's first overload action starts; a policy "
                    "needing more is refused (envoy-heap-over-cap)",
                ),
                ("cap", "Envoy's heap cap (the bootstrap's fixed_heap max_heap_size_bytes, --native-heap-cap)"),
            )
        }
        self.native_listener_writes = Counter(
            f"{PREFIX}_native_listener_writes",
            "Native mode: writes of the compiled Envoy listener into the xDS directory by result (ok/error); "
            "after an error Envoy keeps the listener it has and the write is retried.",
            ["result"],
            registry=registry,
        )
        # Per client: label values are the policy's client ids and "other" (Policy.client_label).
        self.client_decisions = Counter(
            f"{PREFIX}_client_decisions",
            "Check results of verified tokens by client (a client id the policy names, else other) and decision "
            "(allow, deny, dry_run_deny).",
            ["client", "decision"],
            registry=registry,
        )
        self.client_new_tokens = Counter(
            f"{PREFIX}_client_new_tokens",
            "Valid tokens this process verified for the first time (not in its verified-token cache), by client "
            "(a client id the policy names, else other): how often each client gets a new token.",
            ["client"],
            registry=registry,
        )
        self.client_new_tokens_alert = Gauge(
            f"{PREFIX}_client_new_tokens_alert_per_minute",
            "The rate of new tokens per minute from one client above which AuthzClientMintingTokens fires "
            "(--new-tokens-alert-per-minute): the alert reads it, so each app sets its own.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the labels name the authz-service version and the Python and gRPC it runs on.",
            ["version", "python", "grpc"],
            multiprocess_mode="livemax",  # every worker reports the same labels: one series, not one per pid
            registry=registry,
        )
        self.build_info.labels(*build_labels()).set(1)
        self.shadow = ShadowMetrics(registry)
        self.per_check = PerCheck(self)

    def http_door_enabled(self, problems: Iterable[str]) -> None:
        """Create the HTTP front door's mismatch series at 0 (alerts then see the first one)."""
        for problem in problems:
            self.http_config_mismatches.labels(problem)

    def native_enabled(self) -> None:
        """Create native mode's write series at 0 (alerts then see the first error)."""
        for result in ("ok", "error"):
            self.native_listener_writes.labels(result)

    def native_listener_written(self, sha256: str, heap: Mapping[str, int]) -> None:
        """The listener of the policy ``sha256`` is the one in the xDS directory now; ``heap`` is
        Envoy's heap on it (HeapBudget.report(): expected/needed/limit/cap_bytes)."""
        self.native_listener_writes.labels("ok").inc()
        _only(self.native_listener_info, sha256, 1)
        for field, gauge in self.native_envoy_heap.items():
            _only(gauge, sha256, heap[f"{field}_bytes"])

    def issuer_added(self, pool_id: str) -> None:
        """Create an issuer's refresh series at 0 (alerts then see its first failure)."""
        for trigger in ("startup", "periodic", "unknown_kid"):
            for result in ("ok", "error"):
                self.jwks_refreshes.labels(pool_id, trigger, result)

    def issuer_removed(self, pool_id: str) -> None:
        """Drop every series of an issuer the policy no longer lists (no stale-key alerts for it)."""
        for trigger in ("startup", "periodic", "unknown_kid"):
            for result in ("ok", "error"):
                _remove(self.jwks_refreshes, pool_id, trigger, result)
        for gauge in (self.jwks_keys, self.jwks_last_success):
            _remove(gauge, pool_id)

    def policy_loaded(self, routes: int, sha256: str, *, deny_client_ids: int = 0, deny_jtis: int = 0) -> None:
        """Record a policy that started serving (replaces the info series, so only one exists)."""
        self.policy_reloads.labels("ok").inc()
        self.policy_routes.set(routes)
        self.deny_list_entries.labels("client_id").set(deny_client_ids)
        self.deny_list_entries.labels("jti").set(deny_jtis)
        self.policy_generation.inc()
        _only(self.policy_info, sha256, 1)

    def policy_load_failed(self, refused_sha256: str | None) -> None:
        """A load that failed: counted, and the file at the path is refused now (see policy_file_refused)."""
        self.policy_reloads.labels("error").inc()
        self.policy_file_refused(refused_sha256)

    def policy_file_refused(self, sha256: str | None) -> None:
        """The file at the policy path is refused now (``sha256`` of its content; None: unreadable)."""
        _only(self.policy_file_refused_state, sha256 or "", 1)

    def policy_file_accepted(self) -> None:
        """The file at the policy path is the policy serving (a good file loaded, or the one in force
        put back): nothing is refused any more."""
        _only(self.policy_file_refused_state, "", 0)


class ShadowMetrics:
    """The shadow policy's series (``serve --shadow-policy``; shadow.py): its loads, the candidate
    in force, and the Checks it decided otherwise than the policy serving.

    Label values: ``route``, ``decision`` and ``reason`` are the serving decision's (as in
    ``authz_check_decisions_total``), ``shadow_decision`` and ``shadow_reason`` the candidate's,
    all from the policy's route names and closed sets. No series exists until a shadow policy is
    configured (``policy_file_accepted`` or a load creates them)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.reloads = Counter(
            f"{PREFIX}_shadow_policy_reloads",
            "Shadow policy file loads by result (ok/error); an error never affects serving.",
            ["result"],
            registry=registry,
        )
        self.info = Gauge(
            f"{PREFIX}_shadow_policy_info",
            "1 for the sha256 of the shadow (candidate) policy compared on every Check; no series while none loaded.",
            ["sha256"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.refused = Gauge(
            f"{PREFIX}_shadow_policy_file_refused",
            "1 while the shadow policy file on disk is refused (the previous candidate, if any, is still "
            "compared), with the refused content's sha256 (empty: unreadable); else 0.",
            ["sha256"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.disagreements = Counter(
            f"{PREFIX}_shadow_disagreements",
            "Checks the shadow policy decided otherwise (another decision or reason) than the policy serving, "
            "which answered them: by the serving decision's route, decision and reason, and the shadow's.",
            ["route", "decision", "reason", "shadow_decision", "shadow_reason"],
            registry=registry,
        )
        self._series: dict[tuple[str, str, str, str, str], Any] = {}

    def disagreement(self, key: tuple[str, str, str, str, str]) -> None:
        """One Check decided otherwise: ``key`` is (route, decision, reason, shadow_decision, shadow_reason)."""
        series = self._series.get(key)
        if series is None:  # labels() takes a lock and builds strings: once per series
            if len(self._series) >= PerCheck.MAX_SERIES:  # routes of policies no longer loaded
                self._series.clear()
            series = self._series[key] = self.disagreements.labels(*key)
        series.inc()

    # The reloader's record of the shadow file (reloader.PolicyRecord), as Metrics' for the policy.
    def policy_loaded(self, routes: int, sha256: str, *, deny_client_ids: int = 0, deny_jtis: int = 0) -> None:
        # The candidate's deny list is not exported: authz_deny_list_entries is the serving policy's.
        self.reloads.labels("ok").inc()
        _only(self.info, sha256, 1)

    def policy_load_failed(self, refused_sha256: str | None) -> None:
        self.reloads.labels("error").inc()
        _only(self.refused, refused_sha256 or "", 1)

    def policy_file_accepted(self) -> None:
        _only(self.refused, "", 0)


def build_labels() -> tuple[str, str, str]:
    """(version, python, grpc) of the running build, for ``authz_build_info``."""
    import grpc  # the service's own dependency; imported here so metrics stays cheap to import

    return __version__, platform.python_version(), grpc.__version__


class PerCheck:
    """What every Check records, counted in plain Python and applied to the metrics in batches.

    Why: a prometheus-client update takes a lock and four Python calls; the three a Check made
    (decision counter, duration histogram, cache hit or miss) cost ~7 us of CPU per Check under
    load, a quarter of the handler. Counting into a dict, a list and two ints costs ~1 us, and
    ``flush`` applies one ``inc`` per distinct series and the buffered durations in a tight loop.
    It runs before every collection (so a scrape is exact), every second (``--workers``: workers
    write the shared files the parent reads), when 4096 durations are pending, and at shutdown.
    Single-threaded: Checks, scrapes and the flush task all run on the event loop.
    """

    MAX_PENDING = 4096
    MAX_SERIES = 10_000  # label children kept for reuse; routes of many reloaded policies: start over

    def __init__(self, metrics: Metrics) -> None:
        self._decisions = metrics.decisions
        self._client_decisions = metrics.client_decisions
        self._new_tokens = metrics.client_new_tokens
        self._duration = metrics.check_duration
        self._hit = metrics.token_cache_lookups.labels("hit")
        self._miss = metrics.token_cache_lookups.labels("miss")
        self._series: dict[CheckKey, tuple[Any, Any]] = {}  # the decision series, the client's (or None)
        self.decisions: dict[CheckKey, int] = {}
        self.new_tokens: dict[str, int] = {}  # client label -> tokens verified for the first time
        self.durations: list[float] = []
        # Durations of Checks whose trace was sampled, with the trace id (tracing on only): each
        # becomes an exemplar, so a latency panel links to the trace (OpenMetrics exposition).
        self.sampled: list[tuple[float, int]] = []
        self.cache_hits = 0
        self.cache_misses = 0

    def check(self, key: CheckKey, seconds: float) -> None:
        """One answered Check: its decision labels and how long it took."""
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1
        durations = self.durations
        durations.append(seconds)
        if len(durations) >= self.MAX_PENDING:
            self.flush()

    def check_sampled(self, key: CheckKey, seconds: float, trace_id: int) -> None:
        """``check`` for a Check whose trace was sampled: ``trace_id`` is its duration's exemplar."""
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1
        sampled = self.sampled
        sampled.append((seconds, trace_id))
        if len(sampled) >= self.MAX_PENDING:
            self.flush()

    def new_token(self, client: str) -> None:
        """A valid token seen for the first time, of the client labelled ``client``."""
        new_tokens = self.new_tokens
        new_tokens[client] = new_tokens.get(client, 0) + 1

    def flush(self) -> None:
        decisions, self.decisions = self.decisions, {}
        durations, self.durations = self.durations, []
        sampled, self.sampled = self.sampled, []
        new_tokens, self.new_tokens = self.new_tokens, {}
        for key, count in decisions.items():
            series = self._series.get(key)
            if series is None:  # labels() takes a lock and builds strings: once per series
                if len(self._series) >= self.MAX_SERIES:
                    self._series.clear()
                per_client = self._client_decisions.labels(key[4], key[0]) if key[4] else None
                series = self._series[key] = (self._decisions.labels(key[0], key[1], key[2], str(key[3])), per_client)
            series[0].inc(count)
            if series[1] is not None:
                series[1].inc(count)
        for label, count in new_tokens.items():
            self._new_tokens.labels(label).inc(count)
        observe = self._duration.observe
        for seconds in durations:
            observe(seconds)
        for seconds, trace_id in sampled:  # prometheus-client keeps the last exemplar of each bucket
            observe(seconds, {"trace_id": format(trace_id, "032x")})
        if self.cache_hits:
            self._hit.inc(self.cache_hits)
            self.cache_hits = 0
        if self.cache_misses:
            self._miss.inc(self.cache_misses)
            self.cache_misses = 0


class _FlushBeforeCollect(Collector):
    """Exports nothing; collecting it flushes PerCheck (it is registered before our metrics)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> list[Any]:
        per_check = getattr(self._metrics, "per_check", None)  # None while Metrics is being built
        if per_check is not None:
            per_check.flush()
        return []


def _only(gauge: Gauge, label: str, value: float) -> None:
    """Make ``gauge{label}`` = ``value`` its one series (the others removed).

    With --workers the samples live in files that clear() cannot reach: the others are zeroed first,
    so the parent's view keeps them at 0 (queries and alerts select the value, never the mere series).
    """
    for labels in list(gauge._metrics):  # noqa: SLF001
        gauge.labels(*labels).set(0)
    with _multiprocess_caveat_known():
        gauge.clear()
    gauge.labels(label).set(value)


def _remove(metric: Counter | Gauge, *labels: str) -> None:
    try:
        with _multiprocess_caveat_known():
            metric.remove(*labels)
    except KeyError:
        pass


@contextlib.contextmanager
def _multiprocess_caveat_known() -> Iterator[None]:
    """Silence prometheus-client's warning that clear()/remove() do not reach multiprocess files.

    Why: with ``--workers`` it was printed on stderr by every worker at start-up (the first policy
    load clears the info series). The limit is known and handled where it matters (the info
    series is zeroed before it is cleared) and documented for removed issuers.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(Clearing|Removal of) labels has not been implemented", UserWarning)
        yield
