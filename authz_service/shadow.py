"""The shadow policy (``serve --shadow-policy FILE``): a candidate policy decided beside the serving one.

Why: a policy change is otherwise tried on live traffic only by serving it. The shadow decides
every Check the service decides, with the candidate, after the serving policy has decided it; the
answer is always the serving policy's. A Check the two decide otherwise (another decision, or
another reason) is a disagreement: counted by route and reasons (``authz_shadow_disagreements_total``)
and logged with the decision log's fields plus the candidate's (``shadow_*``), at most one line per
kind of disagreement every ``LOG_INTERVAL`` seconds. Never the token or the query.

The candidate follows its file as the policy does (reloader.PolicyReloader: complete files only,
SIGHUP, inotify or polling); a file that does not load (at start-up too) is logged and counted
(``authz_shadow_policy_reloads_total{result="error"}``, ``authz_shadow_policy_file_refused``) and
changes nothing else: the service starts, stays ready, and compares the previous candidate, if any.

What the candidate sees: the same request and the signing keys of the serving policy's issuers
(an issuer only the candidate names has none: its tokens are denied by the shadow). Its tokens are
verified by a verifier of its own, with a cache of its own (same bounds as the service's, no
metrics), which never fetches a JWKS: a Check never waits for the shadow's I/O, so the shadow costs
CPU only (docs/performance.md#the-shadow-policy).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jwt.api_jwk import PyJWK

from . import logs
from .decision import Decision, Reason, decide, deny
from .decisionlog import decision_fields
from .keys import IssuerKey, KeySource
from .metrics import ShadowMetrics
from .policy import Issuer, Policy
from .reloader import PolicyReloader
from .request import HttpRequest
from .tokencache import TokenCache
from .tokens import TokenVerifier
from .tracing import NO_TRACING, NoTracing

log = logging.getLogger(__name__)
LOGGER = "authz_service.shadow"  # the disagreement lines' logger
LOG_INTERVAL = 10.0  # seconds: at most one line per kind of disagreement (route, decisions, reasons)
WHAT = "shadow policy"

DisagreementKey = tuple[str, str, str, str, str]  # route, decision, reason, shadow_decision, shadow_reason


class KeysWithoutFetches:
    """The service's keys, read only: the shadow never triggers a JWKS fetch, so never waits on one
    (the serving decision of the same Check has fetched whatever the serving policy needs)."""

    def __init__(self, keys: KeySource) -> None:
        self._keys = keys

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        return self._keys.keys_for_kid(kid)

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self._keys.key(issuer, kid)

    def has_keys(self, issuer: Issuer) -> bool:
        return self._keys.has_keys(issuer)

    async def refetch(self, issuer: Issuer) -> None:
        return None


def disagreement(live: Decision, shadow: Decision) -> DisagreementKey | None:
    """The disagreement's labels, or None when both decided alike: the same decision (allow, deny,
    dry-run deny) for the same reason (hence the same status)."""
    if live.reason is shadow.reason and live.kind == shadow.kind:
        return None
    return (live.route_label, live.kind, live.reason.value, shadow.kind, shadow.reason.value)


def shadow_fields(shadow: Decision, candidate: Policy) -> dict[str, object]:
    """The candidate's side of a disagreement line: decision_fields' decision fields, prefixed."""
    fields = decision_fields(shadow, None, candidate)
    return {
        f"shadow_{key}": fields[key]
        for key in ("decision", "reason", "status", "route", "description", "scopes_used", "policy_sha256")
    }


class ShadowPolicy:
    """Decides each Check again with the candidate policy, and records where it disagrees."""

    def __init__(self, reloader: PolicyReloader, verifier: TokenVerifier, metrics: ShadowMetrics) -> None:
        self.reloader = reloader
        self.verifier = verifier
        self.metrics = metrics
        self._throttle = logs.Throttle(LOG_INTERVAL)

    @classmethod
    async def open(
        cls,
        path: Path,
        keys: KeySource,
        metrics: ShadowMetrics,
        *,
        leeway: float,
        cache_size: int,
        cache_bytes: int,
        watch: str,
        tracing: NoTracing = NO_TRACING,
    ) -> ShadowPolicy:
        """The shadow of the file at ``path``, loaded now as a reload loads it (a file that does not
        load is logged and counted, and nothing is compared until it does): never raises for the
        file, which must not stop the service from serving."""
        reloader = PolicyReloader(path, None, metrics, tracing=tracing, what=WHAT)
        # inotify when it can, polling otherwise: even --policy-watch inotify must not fail start-up
        # over the shadow's file.
        reloader.open_watch("poll" if watch == "poll" else "auto")
        await reloader.reload("start-up")
        verifier = TokenVerifier(KeysWithoutFetches(keys), leeway=leeway, cache=TokenCache(cache_size, cache_bytes))
        return cls(reloader, verifier, metrics)

    async def compare(self, request: HttpRequest, live: Decision, policy: Policy) -> None:
        """Decide ``request`` with the candidate; count and log a disagreement with ``live`` (the
        serving ``policy``'s decision). Never raises: the shadow cannot fail a Check."""
        candidate = self.reloader.current
        if candidate is None:
            return
        try:
            try:
                shadow = await decide(request, candidate, self.verifier)
            except Exception:
                log.exception(f"{WHAT}: check failed; counted as internal_error")
                shadow = deny(Reason.INTERNAL_ERROR, "internal error")
            key = disagreement(live, shadow)
            if key is None:
                return
            self.metrics.disagreement(key)
            left_out = self._throttle.admit("\0".join(key))
            if left_out is not None:
                fields = decision_fields(live, request, policy)
                fields.update(shadow_fields(shadow, candidate))
                fields["suppressed_since_last"] = left_out
                logs.record(LOGGER, "shadow disagreement", fields)
        except Exception:
            log.exception(f"{WHAT}: recording a disagreement failed")
